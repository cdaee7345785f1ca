//! Security administration values (tokens, ACLs, quotas) and the conversions of Python
//! arguments into the core's [`ketch_client::Acl`] and [`ketch_client::Quota`]. The calls
//! themselves are the core's `Admin` calls, made by `sync::Client` and `aio::AsyncClient`.

use std::time::Duration;

use ketch_client::{Operation, Permission};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

/// A token just made. `token` is the secret, shown this once (the broker keeps its hash):
/// give it to `Client(token=...)`. Its `repr` hides the secret.
#[pyclass(module = "ketch._native", frozen, eq, get_all)]
#[derive(Clone, PartialEq, Eq)]
pub struct NewToken {
    pub id: String,
    pub principal: String,
    pub token: String,
    /// When it stops working (ms since the Unix epoch); `None`: never.
    pub expires_at_ms: Option<i64>,
}

impl From<ketch_client::NewToken> for NewToken {
    fn from(t: ketch_client::NewToken) -> NewToken {
        NewToken {
            id: t.id,
            principal: t.principal,
            token: t.token,
            expires_at_ms: t.expires_at_ms,
        }
    }
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.__repr__())
    }
}

#[pymethods]
impl NewToken {
    fn __repr__(&self) -> String {
        format!(
            "NewToken(id={:?}, principal={:?}, token=<redacted>, expires_at_ms={:?})",
            self.id, self.principal, self.expires_at_ms
        )
    }
}

/// A token the broker knows, without its secret.
#[pyclass(module = "ketch._native", frozen, eq, get_all)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    pub principal: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    /// When it was revoked; `None` while it is not.
    pub revoked_at_ms: Option<i64>,
}

impl From<ketch_client::TokenDescription> for TokenInfo {
    fn from(t: ketch_client::TokenDescription) -> TokenInfo {
        TokenInfo {
            id: t.id,
            principal: t.principal,
            created_at_ms: t.created_at_ms,
            expires_at_ms: t.expires_at_ms,
            revoked_at_ms: t.revoked_at_ms,
        }
    }
}

#[pymethods]
impl TokenInfo {
    fn __repr__(&self) -> String {
        format!(
            "TokenInfo(id={:?}, principal={:?}, created_at_ms={}, expires_at_ms={:?}, revoked_at_ms={:?})",
            self.id, self.principal, self.created_at_ms, self.expires_at_ms, self.revoked_at_ms
        )
    }
}

/// One access rule: `principal` (`"*"` for everyone) may (`permission="allow"`) or may not
/// (`"deny"`, which wins) do `operation` on one resource, named by exactly one of `topic`,
/// `topic_prefix`, `group`, `group_prefix`, `filter`, `transform` or `cluster=True`.
/// Operations: read, write, create, delete, describe, alter, deploy-filter, all.
#[pyclass(module = "ketch._native", frozen, eq, hash)]
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Acl {
    pub inner: ketch_client::Acl,
}

#[pymethods]
impl Acl {
    #[new]
    #[pyo3(signature = (principal, operation, *, permission="allow", topic=None, topic_prefix=None, group=None, group_prefix=None, filter=None, transform=None, cluster=false))]
    fn new(
        principal: String,
        operation: &str,
        permission: &str,
        topic: Option<&str>,
        topic_prefix: Option<&str>,
        group: Option<&str>,
        group_prefix: Option<&str>,
        filter: Option<&str>,
        transform: Option<&str>,
        cluster: bool,
    ) -> PyResult<Acl> {
        if principal.is_empty() {
            return Err(PyValueError::new_err(
                "principal must not be empty (\"*\" is everyone)",
            ));
        }
        let operation: Operation = operation
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("operation: {e}")))?;
        let permission: Permission = permission
            .parse()
            .map_err(|e: String| PyValueError::new_err(format!("permission: {e}")))?;
        let rule = match permission {
            Permission::Allow => ketch_client::Acl::allow(principal, operation),
            Permission::Deny => ketch_client::Acl::deny(principal, operation),
        };
        type On = fn(ketch_client::Acl, &str) -> ketch_client::Acl;
        let named: [(&str, Option<&str>, On); 6] = [
            ("topic", topic, ketch_client::Acl::topic),
            (
                "topic_prefix",
                topic_prefix,
                ketch_client::Acl::topic_prefix,
            ),
            ("group", group, ketch_client::Acl::group),
            (
                "group_prefix",
                group_prefix,
                ketch_client::Acl::group_prefix,
            ),
            ("filter", filter, ketch_client::Acl::filter),
            ("transform", transform, ketch_client::Acl::transform),
        ];
        let given: Vec<_> = named.iter().filter(|(_, v, _)| v.is_some()).collect();
        let inner = match (given.as_slice(), cluster) {
            ([], true) => rule.cluster(),
            ([(field, Some(name), on)], false) => {
                if name.is_empty() {
                    return Err(PyValueError::new_err(format!("{field} must not be empty")));
                }
                on(rule, name)
            }
            _ => {
                return Err(PyValueError::new_err(
                    "name exactly one resource: topic=, topic_prefix=, group=, group_prefix=, \
                     filter=, transform= or cluster=True",
                ));
            }
        };
        Ok(Acl { inner })
    }

    #[getter]
    fn principal(&self) -> &str {
        &self.inner.principal
    }
    /// `"read"`, `"write"`, `"create"`, `"delete"`, `"describe"`, `"alter"`,
    /// `"deploy-filter"` or `"all"`.
    #[getter]
    fn operation(&self) -> &'static str {
        self.inner.operation.name()
    }
    /// `"allow"` or `"deny"`.
    #[getter]
    fn permission(&self) -> &'static str {
        self.inner.permission.name()
    }
    /// `"topic"`, `"group"`, `"filter"`, `"transform"` or `"cluster"`.
    #[getter]
    fn resource_type(&self) -> &'static str {
        self.inner.resource_type.name()
    }
    /// `"literal"` (the whole name) or `"prefix"`.
    #[getter]
    fn pattern(&self) -> &'static str {
        self.inner.pattern.name()
    }
    /// The name or prefix (`""` for the cluster).
    #[getter]
    fn resource_name(&self) -> &str {
        &self.inner.resource_name
    }
    fn __str__(&self) -> String {
        self.inner.to_string()
    }
    fn __repr__(&self) -> String {
        format!("<Acl {}>", self.inner)
    }
}

/// A principal's byte rates; 0 is no limit.
#[pyclass(module = "ketch._native", frozen, eq, get_all)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub principal: String,
    pub produce_bytes_per_s: u64,
    pub fetch_bytes_per_s: u64,
}

impl From<ketch_client::Quota> for Quota {
    fn from(q: ketch_client::Quota) -> Quota {
        Quota {
            principal: q.principal,
            produce_bytes_per_s: q.produce_bytes_per_s,
            fetch_bytes_per_s: q.fetch_bytes_per_s,
        }
    }
}

#[pymethods]
impl Quota {
    fn __repr__(&self) -> String {
        format!(
            "Quota(principal={:?}, produce_bytes_per_s={}, fetch_bytes_per_s={})",
            self.principal, self.produce_bytes_per_s, self.fetch_bytes_per_s
        )
    }
}

/// The core's rules for a list of `Acl`s.
pub fn acl_list(acls: Vec<PyRef<'_, Acl>>) -> Vec<ketch_client::Acl> {
    acls.iter().map(|a| a.inner.clone()).collect()
}

/// A token lifetime in seconds as a `Duration` (`None`: forever).
pub fn expires_in(seconds: Option<f64>) -> PyResult<Option<Duration>> {
    seconds
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    PyValueError::new_err(format!(
                        "expires_in must be a positive number of seconds, not {s}"
                    ))
                })
        })
        .transpose()
}

/// The core's quota for `set_quota`'s arguments.
pub fn quota(
    principal: String,
    produce_bytes_per_s: u64,
    fetch_bytes_per_s: u64,
) -> PyResult<ketch_client::Quota> {
    if principal.is_empty() {
        return Err(PyValueError::new_err("principal must not be empty"));
    }
    Ok(ketch_client::Quota {
        principal,
        produce_bytes_per_s,
        fetch_bytes_per_s,
    })
}
