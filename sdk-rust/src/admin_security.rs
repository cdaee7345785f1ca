//! Security administration: API tokens, ACLs and quotas (the broker's `admin` principal, or
//! any principal allowed `alter` on the cluster).

use std::time::Duration;

use ketch_protocol::messages::{
    AclChangeRequest, AclEntry, QuotaSetRequest, SecurityListRequest, TokenCreateRequest,
    TokenRevokeRequest,
};
pub use ketch_protocol::security::{Operation, PatternType, Permission, ResourceType};

use crate::admin::Admin;
use crate::error::Result;

/// A token just made: `token` is shown this once; the broker keeps only its hash.
#[derive(Clone, PartialEq, Eq)]
pub struct NewToken {
    /// Names the token in listings and revocations.
    pub id: String,
    /// Who the token authenticates as.
    pub principal: String,
    /// The secret to give to [`crate::ClientConfig::bearer_token`].
    pub token: String,
    /// When it stops working (ms since the epoch), if it expires.
    pub expires_at_ms: Option<i64>,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("id", &self.id)
            .field("principal", &self.principal)
            .field("token", &"<redacted>")
            .field("expires_at_ms", &self.expires_at_ms)
            .finish()
    }
}

/// A token in [`Admin::list_tokens`] (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenDescription {
    /// Names the token.
    pub id: String,
    /// Who it authenticates as.
    pub principal: String,
    /// When it was made (ms since the epoch).
    pub created_at_ms: i64,
    /// When it stops working, if it expires.
    pub expires_at_ms: Option<i64>,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
}

/// One access rule: `principal` (`*` for everyone) may (or may not) do `operation` on the
/// resources `resource_type` + `pattern` + `resource_name` name.
///
/// ```
/// use ketch_client::{Acl, Operation};
/// let rule = Acl::allow("alice", Operation::Read).topic_prefix("orders.");
/// assert_eq!(rule.to_string(), "allow alice read topic-prefix orders.");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Acl {
    /// Who the rule is about; `*` is everyone.
    pub principal: String,
    /// What kind of resource it protects.
    pub resource_type: ResourceType,
    /// Whether `resource_name` is a whole name or a prefix.
    pub pattern: PatternType,
    /// The name or prefix (empty for the cluster).
    pub resource_name: String,
    /// What it allows or denies.
    pub operation: Operation,
    /// Allow or deny; a matching deny wins.
    pub permission: Permission,
}

impl Acl {
    /// A rule allowing `operation` (on the cluster until a resource is named).
    pub fn allow(principal: impl Into<String>, operation: Operation) -> Acl {
        Acl::new(principal.into(), operation, Permission::Allow)
    }

    /// A rule denying `operation`; a matching deny wins over every allow.
    pub fn deny(principal: impl Into<String>, operation: Operation) -> Acl {
        Acl::new(principal.into(), operation, Permission::Deny)
    }

    fn new(principal: String, operation: Operation, permission: Permission) -> Acl {
        Acl {
            principal,
            resource_type: ResourceType::Cluster,
            pattern: PatternType::Literal,
            resource_name: String::new(),
            operation,
            permission,
        }
    }

    fn on(self, kind: ResourceType, pattern: PatternType, name: &str) -> Acl {
        Acl {
            resource_type: kind,
            pattern,
            resource_name: name.to_owned(),
            ..self
        }
    }

    /// On one topic.
    pub fn topic(self, name: &str) -> Acl {
        self.on(ResourceType::Topic, PatternType::Literal, name)
    }
    /// On every topic whose name starts with `prefix`.
    pub fn topic_prefix(self, prefix: &str) -> Acl {
        self.on(ResourceType::Topic, PatternType::Prefix, prefix)
    }
    /// On one consumer group.
    pub fn group(self, name: &str) -> Acl {
        self.on(ResourceType::Group, PatternType::Literal, name)
    }
    /// On every group whose name starts with `prefix`.
    pub fn group_prefix(self, prefix: &str) -> Acl {
        self.on(ResourceType::Group, PatternType::Prefix, prefix)
    }
    /// On one Wasm filter (read: run it on a subscription).
    pub fn filter(self, name: &str) -> Acl {
        self.on(ResourceType::Filter, PatternType::Literal, name)
    }
    /// On one transform.
    pub fn transform(self, name: &str) -> Acl {
        self.on(ResourceType::Transform, PatternType::Literal, name)
    }
    /// On the broker itself.
    pub fn cluster(self) -> Acl {
        self.on(ResourceType::Cluster, PatternType::Literal, "")
    }

    fn to_wire(&self) -> AclEntry {
        AclEntry {
            principal: self.principal.clone(),
            resource_type: self.resource_type.as_u8(),
            pattern_type: self.pattern.as_u8(),
            resource_name: self.resource_name.clone(),
            operation: self.operation.as_u8(),
            permission: self.permission.as_u8(),
        }
    }

    fn from_wire(entry: &AclEntry) -> Option<Acl> {
        Some(Acl {
            principal: entry.principal.clone(),
            resource_type: ResourceType::from_u8(entry.resource_type)?,
            pattern: PatternType::from_u8(entry.pattern_type)?,
            resource_name: entry.resource_name.clone(),
            operation: Operation::from_u8(entry.operation)?,
            permission: Permission::from_u8(entry.permission)?,
        })
    }
}

impl std::fmt::Display for Acl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} ",
            self.permission, self.principal, self.operation
        )?;
        match (self.resource_type, self.pattern) {
            (ResourceType::Cluster, _) => write!(f, "cluster"),
            (kind, PatternType::Literal) => write!(f, "{kind} {}", self.resource_name),
            (kind, PatternType::Prefix) => write!(f, "{kind}-prefix {}", self.resource_name),
        }
    }
}

/// A principal's byte rates; 0 is no limit.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Quota {
    /// Whose rates these are.
    pub principal: String,
    /// Record batch bytes it may produce per second.
    pub produce_bytes_per_s: u64,
    /// Record bytes it may fetch per second.
    pub fetch_bytes_per_s: u64,
}

fn optional_ms(ms: i64) -> Option<i64> {
    (ms >= 0).then_some(ms)
}

impl Admin {
    /// Makes an API token for `principal`, valid for `expires_in` (or forever).
    pub async fn create_token(
        &self,
        principal: &str,
        expires_in: Option<Duration>,
    ) -> Result<NewToken> {
        let response = self
            .client
            .inner
            .call_controller(&TokenCreateRequest {
                principal: principal.to_owned(),
                expires_in_ms: expires_in
                    .map_or(-1, |d| d.as_millis().min(i64::MAX as u128) as i64),
            })
            .await?;
        Ok(NewToken {
            id: response.id,
            principal: response.principal,
            token: response.token,
            expires_at_ms: optional_ms(response.expires_at_ms),
        })
    }

    /// Revokes a token, named by itself or by its id; connections using it fail their next
    /// request. Returns the token's id.
    pub async fn revoke_token(&self, token_or_id: &str) -> Result<String> {
        let response = self
            .client
            .inner
            .call_controller(&TokenRevokeRequest {
                token_or_id: token_or_id.to_owned(),
            })
            .await?;
        Ok(response.id)
    }

    /// Every token the broker knows (revoked and expired ones too), without secrets.
    pub async fn list_tokens(&self) -> Result<Vec<TokenDescription>> {
        let response = self
            .client
            .inner
            .call_controller(&SecurityListRequest {})
            .await?;
        Ok(response
            .tokens
            .into_iter()
            .map(|t| TokenDescription {
                id: t.id,
                principal: t.principal,
                created_at_ms: t.created_at_ms,
                expires_at_ms: optional_ms(t.expires_at_ms),
                revoked_at_ms: optional_ms(t.revoked_at_ms),
            })
            .collect())
    }

    /// Adds rules (those already present are counted out); returns how many were added.
    pub async fn add_acls(&self, acls: &[Acl]) -> Result<u32> {
        let response = self
            .client
            .inner
            .call_controller(&AclChangeRequest {
                add: acls.iter().map(Acl::to_wire).collect(),
                remove: vec![],
            })
            .await?;
        Ok(response.added)
    }

    /// Removes rules; returns how many were there.
    pub async fn remove_acls(&self, acls: &[Acl]) -> Result<u32> {
        let response = self
            .client
            .inner
            .call_controller(&AclChangeRequest {
                add: vec![],
                remove: acls.iter().map(Acl::to_wire).collect(),
            })
            .await?;
        Ok(response.removed)
    }

    /// Every rule.
    pub async fn list_acls(&self) -> Result<Vec<Acl>> {
        let response = self
            .client
            .inner
            .call_controller(&SecurityListRequest {})
            .await?;
        Ok(response.acls.iter().filter_map(Acl::from_wire).collect())
    }

    /// Sets a principal's byte rates (0: no limit; both 0 removes the quota). A principal
    /// over its rate is held back, not refused.
    pub async fn set_quota(&self, quota: &Quota) -> Result<()> {
        self.client
            .inner
            .call_controller(&QuotaSetRequest {
                principal: quota.principal.clone(),
                produce_bytes_per_s: quota.produce_bytes_per_s,
                fetch_bytes_per_s: quota.fetch_bytes_per_s,
            })
            .await?;
        Ok(())
    }

    /// Every quota.
    pub async fn list_quotas(&self) -> Result<Vec<Quota>> {
        let response = self
            .client
            .inner
            .call_controller(&SecurityListRequest {})
            .await?;
        Ok(response
            .quotas
            .into_iter()
            .map(|q| Quota {
                principal: q.principal,
                produce_bytes_per_s: q.produce_bytes_per_s,
                fetch_bytes_per_s: q.fetch_bytes_per_s,
            })
            .collect())
    }
}
