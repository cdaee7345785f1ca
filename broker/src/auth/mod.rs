//! Who a connection is and what it may do: principals (client certificates mapped by a
//! template, API tokens presented with `Authenticate`), the token store, ACLs, per-principal
//! quotas, the owners of producer ids, and the audit log of refusals. The server's request
//! dispatch asks [`Security`]; nothing here knows QUIC.
//!
//! State lives in `DATA_DIR/security/` (`tokens.json`, `acls.json`, `quotas.json`), each
//! written durably and swapped in memory only after it is on disk, so a change that fails
//! changes nothing.

pub mod acl;
pub mod cert;
pub mod quota;
mod store;
pub mod tokens;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use ketch_protocol::messages::{QuotaInfo, SecurityListResponse};
use ketch_protocol::security::{Operation, ResourceType};

use acl::{Acl, AclTable};
use quota::{QuotaLimits, Quotas};
use tokens::{TokenRecord, Tokens};

/// The principal of a connection that presented no credential (where that is allowed).
pub const ANONYMOUS: &str = "ANONYMOUS";
/// The principal of the token the first `--auth required` start writes.
pub const ADMIN_PRINCIPAL: &str = "admin";
/// Where that token is written, relative to the data directory (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// The security state's directory, relative to the data directory.
pub const SECURITY_DIR: &str = "security";
const TOKENS_FILE: &str = "tokens.json";
const ACLS_FILE: &str = "acls.json";
const QUOTAS_FILE: &str = "quotas.json";
/// Producer ids whose owner is remembered; past this the oldest are forgotten (their
/// producers are answered `unknown_producer` and take a new id).
pub(crate) const PRODUCER_OWNERS_MAX: usize = 262_144;
/// Audit lines written per second at most; the rest are counted and reported in the next one.
const AUDIT_EVENTS_PER_S_MAX: u32 = 20;

/// How clients must prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Nobody authenticates and nothing is checked (development, loopback).
    None,
    /// Credentials are used when presented; connections without one act as `ANONYMOUS`,
    /// and ACLs apply to everyone.
    Optional,
    /// Every connection presents a client certificate or a token before its first request.
    Required,
}

impl AuthMode {
    pub fn name(self) -> &'static str {
        match self {
            AuthMode::None => "none",
            AuthMode::Optional => "optional",
            AuthMode::Required => "required",
        }
    }
}

impl std::str::FromStr for AuthMode {
    type Err = String;
    fn from_str(s: &str) -> Result<AuthMode, String> {
        match s {
            "none" => Ok(AuthMode::None),
            "optional" => Ok(AuthMode::Optional),
            "required" => Ok(AuthMode::Required),
            other => Err(format!(
                "auth must be required, optional or none, not {other:?}"
            )),
        }
    }
}

impl<'de> serde::Deserialize<'de> for AuthMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AuthMode, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Why the security state could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("security state {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// One change of the security state, as it is applied: by this broker alone, or — in a
/// cluster — by every broker from the metadata log, in log order (so each is deterministic:
/// a token's secret never travels, only its record; a revocation carries its time).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum SecurityChange {
    TokenCreated {
        record: TokenRecord,
    },
    TokenRevoked {
        id: String,
        at_ms: i64,
    },
    AclsChanged {
        add: Vec<Acl>,
        remove: Vec<Acl>,
    },
    QuotaSet {
        principal: String,
        limits: QuotaLimits,
    },
    /// A producer id issued to a principal (cluster brokers check ids other brokers issued).
    ProducerIssued {
        producer_id: i64,
        principal: String,
    },
}

/// What applying a [`SecurityChange`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Done,
    /// A revocation of a token that does not exist.
    NoSuchToken,
    /// ACL rules added and removed.
    Acls {
        added: u32,
        removed: u32,
    },
}

/// What `Security::open` needs.
#[derive(Debug, Clone)]
pub struct SecurityConfig {
    pub mode: AuthMode,
    /// Principals every check lets through.
    pub super_users: Vec<String>,
    /// How a client certificate's subject becomes a principal (see [`cert`]).
    pub principal_template: String,
}

/// Who a connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub principal: Arc<str>,
    /// The token it authenticated with, checked again on every request.
    pub token_id: Option<String>,
}

/// The broker's security state.
#[derive(Debug)]
pub struct Security {
    config: SecurityConfig,
    dir: PathBuf,
    tokens: RwLock<Tokens>,
    acls: RwLock<Arc<AclTable>>,
    quotas: Quotas,
    /// Serialises changes: each writes its file, then swaps memory.
    change: Mutex<()>,
    producers: Mutex<ProducerOwners>,
    audit: Mutex<AuditLimiter>,
}

#[derive(Debug, Default)]
struct ProducerOwners {
    owners: HashMap<i64, Arc<str>>,
    order: VecDeque<i64>,
}

#[derive(Debug, Default)]
struct AuditLimiter {
    second: i64,
    written: u32,
    suppressed: u64,
}

impl AuditLimiter {
    /// Whether an event at `now_ms` is written; if so, how many were left out before it.
    fn admit(&mut self, now_ms: i64) -> Option<u64> {
        let second = now_ms.div_euclid(1000);
        if self.second != second {
            self.second = second;
            self.written = 0;
        }
        if self.written >= AUDIT_EVENTS_PER_S_MAX {
            self.suppressed += 1;
            return None;
        }
        self.written += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Whether a producer id may be used by a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProducerCheck {
    Owner,
    /// Never issued by this broker run (or forgotten): take a new one.
    Unknown,
    /// Issued to someone else.
    OtherPrincipal,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct AclFile {
    acls: Vec<Acl>,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct QuotaFile {
    quotas: BTreeMap<String, QuotaLimits>,
}

impl Security {
    /// Loads the security state from `data_dir`. With `required` auth and no token yet, makes
    /// an admin token and writes it to `DATA_DIR/admin.token` (0600); its path is returned.
    pub fn open(
        data_dir: &Path,
        config: SecurityConfig,
        now_ms: i64,
    ) -> Result<(Security, Option<PathBuf>), AuthError> {
        cert::validate_template(&config.principal_template).map_err(AuthError::Invalid)?;
        let dir = data_dir.join(SECURITY_DIR);
        let tokens: Tokens = store::read_json(&dir.join(TOKENS_FILE))?;
        let acls: AclFile = store::read_json(&dir.join(ACLS_FILE))?;
        let quotas: QuotaFile = store::read_json(&dir.join(QUOTAS_FILE))?;
        let security = Security {
            dir,
            tokens: RwLock::new(tokens),
            acls: RwLock::new(Arc::new(AclTable::new(acls.acls))),
            quotas: Quotas::new(quotas.quotas),
            change: Mutex::new(()),
            producers: Mutex::default(),
            audit: Mutex::default(),
            config,
        };
        let mut admin_token_path = None;
        let no_token_yet = security
            .tokens
            .read()
            .expect("tokens lock")
            .tokens
            .is_empty();
        if security.config.mode == AuthMode::Required && no_token_yet {
            let (_, token) = security.create_token(ADMIN_PRINCIPAL, None, now_ms)?;
            let path = data_dir.join(ADMIN_TOKEN_FILE);
            store::write_durably(&path, format!("{token}\n").as_bytes(), 0o600)?;
            admin_token_path = Some(path);
        }
        Ok((security, admin_token_path))
    }

    pub fn mode(&self) -> AuthMode {
        self.config.mode
    }

    /// Whether requests are checked at all (not in mode `none`).
    pub fn enforced(&self) -> bool {
        self.config.mode != AuthMode::None
    }

    pub fn principal_template(&self) -> &str {
        &self.config.principal_template
    }

    pub fn is_super_user(&self, principal: &str) -> bool {
        self.config.super_users.iter().any(|p| p == principal)
    }

    /// The session a presented token opens, or why it opens none.
    pub fn authenticate_token(&self, token: &str, now_ms: i64) -> Result<Session, String> {
        let tokens = self.tokens.read().expect("tokens lock");
        let record = tokens.find(token).ok_or("unknown token")?;
        if let Some(why) = record.refusal(now_ms) {
            return Err(why);
        }
        Ok(Session {
            principal: Arc::from(record.principal.as_str()),
            token_id: Some(record.id.clone()),
        })
    }

    /// Whether a session's credential still holds (a revoked or expired token does not).
    pub fn recheck(&self, session: &Session, now_ms: i64) -> Result<(), String> {
        match &session.token_id {
            None => Ok(()),
            Some(id) => self
                .tokens
                .read()
                .expect("tokens lock")
                .is_valid(id, now_ms)
                .map(|_| ()),
        }
    }

    /// Whether `principal` may do `operation` on the resource. Always true in mode `none` and
    /// for super users.
    pub fn authorize(
        &self,
        principal: &str,
        operation: Operation,
        kind: ResourceType,
        name: &str,
    ) -> bool {
        if !self.enforced() || self.is_super_user(principal) {
            return true;
        }
        self.acl_table().allowed(principal, operation, kind, name)
    }

    /// Whether `principal` may do `operation` on some resource of `kind`.
    pub fn authorize_anywhere(
        &self,
        principal: &str,
        operation: Operation,
        kind: ResourceType,
    ) -> bool {
        if !self.enforced() || self.is_super_user(principal) {
            return true;
        }
        let table = self.acl_table();
        table.allowed_anywhere(principal, operation, kind)
            || table.allowed(principal, operation, ResourceType::Cluster, "")
    }

    fn acl_table(&self) -> Arc<AclTable> {
        self.acls.read().expect("acls lock").clone()
    }

    /// Makes a token for `principal`, durably. Returns its record and the token itself.
    pub fn create_token(
        &self,
        principal: &str,
        expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(TokenRecord, String), AuthError> {
        let (change, token) = Security::new_token(principal, expires_at_ms, now_ms)?;
        self.apply(&change)?;
        let SecurityChange::TokenCreated { record } = change else {
            unreachable!("new_token makes a TokenCreated")
        };
        Ok((record, token))
    }

    /// A new token for `principal` (its creation, to apply, and the token itself), checked.
    pub fn new_token(
        principal: &str,
        expires_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<(SecurityChange, String), AuthError> {
        if principal.is_empty() || principal == acl::ANY_PRINCIPAL || principal == ANONYMOUS {
            return Err(AuthError::Invalid(format!(
                "{principal:?} cannot be a token's principal"
            )));
        }
        let (record, token) = Tokens::make(principal, now_ms, expires_at_ms);
        Ok((SecurityChange::TokenCreated { record }, token))
    }

    /// The id of the token named by itself or its id, if there is one.
    pub fn resolve_token(&self, token_or_id: &str) -> Option<String> {
        self.tokens
            .read()
            .expect("tokens lock")
            .resolve(token_or_id)
    }

    /// Revokes the token named by itself or its id; `Ok(None)` if there is no such token.
    pub fn revoke_token(
        &self,
        token_or_id: &str,
        now_ms: i64,
    ) -> Result<Option<String>, AuthError> {
        let Some(id) = self.resolve_token(token_or_id) else {
            return Ok(None);
        };
        match self.apply(&SecurityChange::TokenRevoked {
            id: id.clone(),
            at_ms: now_ms,
        })? {
            Applied::NoSuchToken => Ok(None),
            _ => Ok(Some(id)),
        }
    }

    /// Removes `remove` and adds `add` in one durable change; the decision cache starts
    /// afresh. Returns how many were added and removed.
    pub fn change_acls(&self, add: &[Acl], remove: &[Acl]) -> Result<(u32, u32), AuthError> {
        match self.apply(&SecurityChange::AclsChanged {
            add: add.to_vec(),
            remove: remove.to_vec(),
        })? {
            Applied::Acls { added, removed } => Ok((added, removed)),
            other => unreachable!("an ACL change applied as {other:?}"),
        }
    }

    /// How many of `add` and `remove` would take effect on today's rules.
    pub fn acl_change_counts(&self, add: &[Acl], remove: &[Acl]) -> (u32, u32) {
        let (_, added, removed) = self.acl_table().changed(add, remove);
        (added, removed)
    }

    /// Sets (or, with both rates 0, removes) a principal's quota, durably.
    pub fn set_quota(&self, principal: &str, limits: QuotaLimits) -> Result<(), AuthError> {
        self.apply(&SecurityChange::QuotaSet {
            principal: principal.to_owned(),
            limits,
        })
        .map(|_| ())
    }

    /// Applies one change: written durably first, then swapped into memory (a change that
    /// fails to persist changes nothing). Applying the same change again changes nothing
    /// more, so a broker replaying the metadata log over the files it wrote converges.
    pub fn apply(&self, change: &SecurityChange) -> Result<Applied, AuthError> {
        let _change = self.change.lock().expect("change lock");
        match change {
            SecurityChange::TokenCreated { record } => {
                let mut next = self.tokens.read().expect("tokens lock").clone();
                if next.tokens.get(&record.id) != Some(record) {
                    // A revocation applied before (a replay over newer files) stays.
                    let mut record = record.clone();
                    if let Some(known) = next.tokens.get(&record.id) {
                        record.revoked_at_ms = record.revoked_at_ms.or(known.revoked_at_ms);
                    }
                    next.tokens.insert(record.id.clone(), record);
                    store::write_json(&self.dir.join(TOKENS_FILE), &next)?;
                    *self.tokens.write().expect("tokens lock") = next;
                }
                Ok(Applied::Done)
            }
            SecurityChange::TokenRevoked { id, at_ms } => {
                let mut next = self.tokens.read().expect("tokens lock").clone();
                let Some(record) = next.tokens.get_mut(id) else {
                    return Ok(Applied::NoSuchToken);
                };
                if record.revoked_at_ms.is_none() {
                    record.revoked_at_ms = Some(*at_ms);
                    store::write_json(&self.dir.join(TOKENS_FILE), &next)?;
                    *self.tokens.write().expect("tokens lock") = next;
                }
                Ok(Applied::Done)
            }
            SecurityChange::AclsChanged { add, remove } => {
                let (rules, added, removed) = self.acl_table().changed(add, remove);
                if added > 0 || removed > 0 {
                    let file = AclFile { acls: rules };
                    store::write_json(&self.dir.join(ACLS_FILE), &file)?;
                    *self.acls.write().expect("acls lock") = Arc::new(AclTable::new(file.acls));
                }
                Ok(Applied::Acls { added, removed })
            }
            SecurityChange::QuotaSet { principal, limits } => {
                let mut all = self.quotas.limits();
                if limits.is_unlimited() {
                    all.remove(principal);
                } else {
                    all.insert(principal.clone(), *limits);
                }
                if all != self.quotas.limits() {
                    store::write_json(
                        &self.dir.join(QUOTAS_FILE),
                        &QuotaFile {
                            quotas: all.clone(),
                        },
                    )?;
                }
                self.quotas.set(principal, *limits);
                Ok(Applied::Done)
            }
            SecurityChange::ProducerIssued {
                producer_id,
                principal,
            } => {
                self.bind_producer(*producer_id, &Arc::from(principal.as_str()));
                Ok(Applied::Done)
            }
        }
    }

    /// Every ACL.
    pub fn acls(&self) -> Vec<Acl> {
        self.acl_table().rules().to_vec()
    }

    /// Every token record of `principal`.
    pub fn tokens_of(&self, principal: &str) -> Vec<TokenRecord> {
        let tokens = self.tokens.read().expect("tokens lock");
        tokens
            .tokens
            .values()
            .filter(|r| r.principal == principal)
            .cloned()
            .collect()
    }

    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }

    pub fn list(&self) -> SecurityListResponse {
        let tokens = self.tokens.read().expect("tokens lock");
        SecurityListResponse {
            tokens: tokens.tokens.values().map(TokenRecord::info).collect(),
            acls: self.acl_table().rules().iter().map(Acl::to_wire).collect(),
            quotas: self
                .quotas
                .limits()
                .into_iter()
                .map(|(principal, limits)| QuotaInfo {
                    principal,
                    produce_bytes_per_s: limits.produce_bytes_per_s,
                    fetch_bytes_per_s: limits.fetch_bytes_per_s,
                })
                .collect(),
        }
    }

    /// Remembers that `producer_id` was issued to `principal`.
    pub fn bind_producer(&self, producer_id: i64, principal: &Arc<str>) {
        let mut producers = self.producers.lock().expect("producers lock");
        if producers
            .owners
            .insert(producer_id, principal.clone())
            .is_none()
        {
            producers.order.push_back(producer_id);
        }
        while producers.order.len() > PRODUCER_OWNERS_MAX {
            if let Some(oldest) = producers.order.pop_front() {
                producers.owners.remove(&oldest);
            }
        }
    }

    pub fn check_producer(&self, producer_id: i64, principal: &str) -> ProducerCheck {
        match self
            .producers
            .lock()
            .expect("producers lock")
            .owners
            .get(&producer_id)
        {
            None => ProducerCheck::Unknown,
            Some(owner) if &**owner == principal => ProducerCheck::Owner,
            Some(_) => ProducerCheck::OtherPrincipal,
        }
    }

    /// Writes an audit event (target `ketch::audit`), at most [`AUDIT_EVENTS_PER_S_MAX`] a
    /// second; the ones over are counted and reported with the next written.
    pub fn audit(&self, now_ms: i64, event: &str, principal: &str, remote: &str, detail: &str) {
        let Some(suppressed) = self.audit.lock().expect("audit lock").admit(now_ms) else {
            return;
        };
        tracing::warn!(
            target: "ketch::audit",
            event,
            principal,
            remote,
            detail,
            suppressed_before = suppressed,
            "security audit"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mode: AuthMode) -> SecurityConfig {
        SecurityConfig {
            mode,
            super_users: vec![ADMIN_PRINCIPAL.into()],
            principal_template: cert::PRINCIPAL_TEMPLATE_DEFAULT.into(),
        }
    }

    #[test]
    fn state_survives_reopening_and_the_admin_token_is_written_once() {
        let dir = tempfile::tempdir().unwrap();
        let (security, admin) = Security::open(dir.path(), config(AuthMode::Required), 0).unwrap();
        let admin = admin.expect("first start writes the admin token");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&admin).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let token = std::fs::read_to_string(&admin).unwrap();
        let session = security.authenticate_token(token.trim(), 1).unwrap();
        assert_eq!(&*session.principal, ADMIN_PRINCIPAL);

        let (record, alice) = security.create_token("alice", Some(100), 1).unwrap();
        let rule = Acl::from_wire(&ketch_protocol::messages::AclEntry {
            principal: "alice".into(),
            resource_type: 0,
            pattern_type: 0,
            resource_name: "t".into(),
            operation: 0,
            permission: 0,
        })
        .unwrap();
        assert_eq!(
            security
                .change_acls(std::slice::from_ref(&rule), &[])
                .unwrap(),
            (1, 0)
        );
        security
            .set_quota(
                "alice",
                QuotaLimits {
                    produce_bytes_per_s: 10,
                    fetch_bytes_per_s: 0,
                },
            )
            .unwrap();
        drop(security);

        let (security, admin) = Security::open(dir.path(), config(AuthMode::Required), 2).unwrap();
        assert_eq!(admin, None, "not written again");
        let session = security.authenticate_token(&alice, 2).unwrap();
        assert!(security.authorize(
            &session.principal,
            Operation::Read,
            ResourceType::Topic,
            "t"
        ));
        assert!(!security.authorize(
            &session.principal,
            Operation::Write,
            ResourceType::Topic,
            "t"
        ));
        assert!(security.authorize(ADMIN_PRINCIPAL, Operation::Write, ResourceType::Topic, "t"));
        assert_eq!(security.list().quotas.len(), 1);
        // Expiry and revocation take effect on the next check.
        assert!(security.recheck(&session, 99).is_ok());
        assert!(security.recheck(&session, 100).is_err());
        assert_eq!(
            security.revoke_token(&record.id, 3).unwrap(),
            Some(record.id.clone())
        );
        assert!(
            security
                .recheck(&session, 4)
                .unwrap_err()
                .contains("revoked")
        );
        assert!(security.authenticate_token(&alice, 4).is_err());
        assert_eq!(security.revoke_token("nope", 4).unwrap(), None);
        // Nothing is checked in mode none.
        let (open, _) = Security::open(dir.path(), config(AuthMode::None), 5).unwrap();
        assert!(open.authorize("anyone", Operation::Delete, ResourceType::Topic, "t"));
    }

    #[test]
    fn audit_lines_are_rate_limited_and_count_what_they_left_out() {
        let mut limiter = AuditLimiter::default();
        let written = (0..100).filter(|_| limiter.admit(5_000).is_some()).count();
        assert_eq!(written, AUDIT_EVENTS_PER_S_MAX as usize);
        // The next second's first line reports the 80 left out.
        assert_eq!(
            limiter.admit(6_000),
            Some(100 - u64::from(AUDIT_EVENTS_PER_S_MAX))
        );
        assert_eq!(limiter.admit(6_001), Some(0));
    }

    #[test]
    fn producer_ids_belong_to_who_got_them() {
        let dir = tempfile::tempdir().unwrap();
        let (security, _) = Security::open(dir.path(), config(AuthMode::Optional), 0).unwrap();
        security.bind_producer(7, &Arc::from("alice"));
        assert_eq!(security.check_producer(7, "alice"), ProducerCheck::Owner);
        assert_eq!(
            security.check_producer(7, "bob"),
            ProducerCheck::OtherPrincipal
        );
        assert_eq!(security.check_producer(8, "alice"), ProducerCheck::Unknown);
    }

    #[test]
    fn a_damaged_store_is_an_error_not_an_empty_one() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(SECURITY_DIR)).unwrap();
        std::fs::write(
            dir.path().join(SECURITY_DIR).join(TOKENS_FILE),
            b"{not json",
        )
        .unwrap();
        let error = Security::open(dir.path(), config(AuthMode::Required), 0).unwrap_err();
        assert!(error.to_string().contains("damaged"), "{error}");
    }
}
