//! Security administration values (tokens, ACLs, quotas) as napi objects, and their
//! conversion into the core's [`ketch_client::Acl`] and [`ketch_client::Quota`]. The calls are
//! the core's `Admin` calls, made by `NativeClient` (`client.rs`).

use std::time::Duration;

use ketch_client::{Operation, PatternType, Permission, ResourceType};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::error::invalid_argument;

/// A token just made; `token` is the secret, shown this once.
#[napi(object)]
pub struct NativeNewToken {
    pub id: String,
    pub principal: String,
    pub token: String,
    pub expires_at_ms: Option<i64>,
}

impl From<ketch_client::NewToken> for NativeNewToken {
    fn from(t: ketch_client::NewToken) -> NativeNewToken {
        NativeNewToken {
            id: t.id,
            principal: t.principal,
            token: t.token,
            expires_at_ms: t.expires_at_ms,
        }
    }
}

/// A token the broker knows, without its secret.
#[napi(object)]
pub struct NativeTokenDescription {
    pub id: String,
    pub principal: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked_at_ms: Option<i64>,
}

impl From<ketch_client::TokenDescription> for NativeTokenDescription {
    fn from(t: ketch_client::TokenDescription) -> NativeTokenDescription {
        NativeTokenDescription {
            id: t.id,
            principal: t.principal,
            created_at_ms: t.created_at_ms,
            expires_at_ms: t.expires_at_ms,
            revoked_at_ms: t.revoked_at_ms,
        }
    }
}

/// One access rule, by the names the CLI uses (`"topic"`, `"prefix"`, `"deploy-filter"`,
/// `"allow"`, ...). The facade builds these from its `Acl` objects.
#[napi(object)]
pub struct NativeAcl {
    pub principal: String,
    pub resource_type: String,
    pub pattern: String,
    pub resource_name: String,
    pub operation: String,
    pub permission: String,
}

fn word<T: std::str::FromStr<Err = String>>(what: &str, text: &str) -> Result<T> {
    text.parse()
        .map_err(|e: String| invalid_argument(format!("{what}: {e}")))
}

impl NativeAcl {
    pub(crate) fn to_core(&self) -> Result<ketch_client::Acl> {
        if self.principal.is_empty() {
            return Err(invalid_argument(
                "an ACL's principal must not be empty (\"*\" is everyone)",
            ));
        }
        let resource_type: ResourceType = word("resource type", &self.resource_type)?;
        let name_given = !self.resource_name.is_empty();
        if (resource_type == ResourceType::Cluster) == name_given {
            return Err(invalid_argument(if name_given {
                "an ACL on the cluster names no resource".to_owned()
            } else {
                format!("an ACL on a {resource_type} needs its name")
            }));
        }
        Ok(ketch_client::Acl {
            principal: self.principal.clone(),
            resource_type,
            pattern: word::<PatternType>("pattern", &self.pattern)?,
            resource_name: self.resource_name.clone(),
            operation: word::<Operation>("operation", &self.operation)?,
            permission: word::<Permission>("permission", &self.permission)?,
        })
    }
}

impl From<ketch_client::Acl> for NativeAcl {
    fn from(a: ketch_client::Acl) -> NativeAcl {
        NativeAcl {
            principal: a.principal,
            resource_type: a.resource_type.name().to_owned(),
            pattern: a.pattern.name().to_owned(),
            resource_name: a.resource_name,
            operation: a.operation.name().to_owned(),
            permission: a.permission.name().to_owned(),
        }
    }
}

/// The core's rules for a list of native ones (the first bad one is the error).
pub(crate) fn acl_list(acls: &[NativeAcl]) -> Result<Vec<ketch_client::Acl>> {
    acls.iter().map(NativeAcl::to_core).collect()
}

/// A principal's byte rates; 0 is no limit.
#[napi(object)]
pub struct NativeQuota {
    pub principal: String,
    pub produce_bytes_per_s: i64,
    pub fetch_bytes_per_s: i64,
}

impl From<ketch_client::Quota> for NativeQuota {
    fn from(q: ketch_client::Quota) -> NativeQuota {
        NativeQuota {
            principal: q.principal,
            produce_bytes_per_s: i64::try_from(q.produce_bytes_per_s).unwrap_or(i64::MAX),
            fetch_bytes_per_s: i64::try_from(q.fetch_bytes_per_s).unwrap_or(i64::MAX),
        }
    }
}

impl NativeQuota {
    pub(crate) fn to_core(&self) -> Result<ketch_client::Quota> {
        if self.principal.is_empty() {
            return Err(invalid_argument("a quota's principal must not be empty"));
        }
        let rate = |what: &str, value: i64| {
            u64::try_from(value)
                .map_err(|_| invalid_argument(format!("{what} must be 0 or more, not {value}")))
        };
        Ok(ketch_client::Quota {
            principal: self.principal.clone(),
            produce_bytes_per_s: rate("produceBytesPerS", self.produce_bytes_per_s)?,
            fetch_bytes_per_s: rate("fetchBytesPerS", self.fetch_bytes_per_s)?,
        })
    }
}

/// A token lifetime in ms (`None`: forever); it must be positive.
pub(crate) fn expires_in(ms: Option<i64>) -> Result<Option<Duration>> {
    match ms {
        None => Ok(None),
        Some(ms) if ms > 0 => Ok(Some(Duration::from_millis(ms as u64))),
        Some(ms) => Err(invalid_argument(format!(
            "expiresInMs must be a positive number of milliseconds, not {ms}"
        ))),
    }
}
