//! Access rules and their evaluation: principal × resource (literal name or prefix) ×
//! operation × allow/deny. A matching deny wins over every allow; read and write imply
//! describe of the same resource; principal `*` matches everyone. Pure: no I/O.

use std::collections::HashMap;
use std::sync::Mutex;

use ketch_protocol::messages::AclEntry;
use ketch_protocol::security::{Operation, PatternType, Permission, ResourceType};

/// The principal of ACLs that apply to everyone (anonymous connections too).
pub const ANY_PRINCIPAL: &str = "*";
/// Decisions remembered between changes; past this the cache starts afresh.
const DECISIONS_CACHED_MAX: usize = 65_536;

/// One rule, decoded and checked.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct Acl {
    pub principal: String,
    pub resource_type: ResourceKind,
    pub pattern: Pattern,
    pub resource_name: String,
    pub operation: Op,
    pub permission: Allowed,
}

macro_rules! serde_as_name {
    ($wrapper:ident, $inner:ty) => {
        /// The protocol enum, stored by name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $wrapper(pub $inner);

        impl serde::Serialize for $wrapper {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.0.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $wrapper {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map($wrapper).map_err(serde::de::Error::custom)
            }
        }
    };
}

serde_as_name!(ResourceKind, ResourceType);
serde_as_name!(Pattern, PatternType);
serde_as_name!(Op, Operation);
serde_as_name!(Allowed, Permission);

/// Why a wire ACL entry is not a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("unknown {field} {value}")]
    UnknownValue { field: &'static str, value: u8 },
    #[error("an ACL needs a principal (or `*`)")]
    NoPrincipal,
    #[error("a {0} ACL needs a resource name")]
    NoResourceName(ResourceType),
    #[error("a cluster ACL names no resource")]
    ClusterWithName,
}

impl Acl {
    pub fn from_wire(entry: &AclEntry) -> Result<Acl, AclError> {
        let unknown = |field, value| AclError::UnknownValue { field, value };
        let resource_type = ResourceType::from_u8(entry.resource_type)
            .ok_or(unknown("resource type", entry.resource_type))?;
        let pattern = PatternType::from_u8(entry.pattern_type)
            .ok_or(unknown("pattern type", entry.pattern_type))?;
        let operation =
            Operation::from_u8(entry.operation).ok_or(unknown("operation", entry.operation))?;
        let permission =
            Permission::from_u8(entry.permission).ok_or(unknown("permission", entry.permission))?;
        if entry.principal.is_empty() {
            return Err(AclError::NoPrincipal);
        }
        let literal_empty = entry.resource_name.is_empty() && pattern == PatternType::Literal;
        if resource_type == ResourceType::Cluster {
            if !entry.resource_name.is_empty() {
                return Err(AclError::ClusterWithName);
            }
        } else if literal_empty {
            return Err(AclError::NoResourceName(resource_type));
        }
        Ok(Acl {
            principal: entry.principal.clone(),
            resource_type: ResourceKind(resource_type),
            pattern: Pattern(pattern),
            resource_name: entry.resource_name.clone(),
            operation: Op(operation),
            permission: Allowed(permission),
        })
    }

    pub fn to_wire(&self) -> AclEntry {
        AclEntry {
            principal: self.principal.clone(),
            resource_type: self.resource_type.0.as_u8(),
            pattern_type: self.pattern.0.as_u8(),
            resource_name: self.resource_name.clone(),
            operation: self.operation.0.as_u8(),
            permission: self.permission.0.as_u8(),
        }
    }

    fn matches_resource(&self, kind: ResourceType, name: &str) -> bool {
        self.resource_type.0 == kind
            && match self.pattern.0 {
                PatternType::Literal => self.resource_name == name,
                PatternType::Prefix => name.starts_with(&self.resource_name),
            }
    }

    fn matches_principal(&self, principal: &str) -> bool {
        self.principal == ANY_PRINCIPAL || self.principal == principal
    }

    /// Whether this rule speaks about `operation`: its own, `all`, and for an allow of read
    /// or write, describe too.
    fn covers(&self, operation: Operation) -> bool {
        let op = self.operation.0;
        op == operation
            || op == Operation::All
            || (operation == Operation::Describe
                && self.permission.0 == Permission::Allow
                && matches!(op, Operation::Read | Operation::Write))
    }

    /// For display: `allow alice read topic-prefix orders.`.
    pub fn describe(&self) -> String {
        let resource = match (self.resource_type.0, self.pattern.0) {
            (ResourceType::Cluster, _) => "cluster".to_owned(),
            (kind, PatternType::Literal) => format!("{kind} {}", self.resource_name),
            (kind, PatternType::Prefix) => format!("{kind}-prefix {}", self.resource_name),
        };
        format!(
            "{} {} {} {resource}",
            self.permission.0, self.principal, self.operation.0
        )
    }
}

/// Whether `rules` let `principal` do `operation` on the resource: some rule allows it and no
/// rule denies it. A deny of describe does not deny read (Kafka's model): denies apply to the
/// operation they name (or `all`).
pub fn allowed(
    rules: &[Acl],
    principal: &str,
    operation: Operation,
    kind: ResourceType,
    name: &str,
) -> bool {
    let mut allow = false;
    for rule in rules {
        if !rule.matches_principal(principal) || !rule.matches_resource(kind, name) {
            continue;
        }
        if !rule.covers(operation) {
            continue;
        }
        match rule.permission.0 {
            Permission::Deny => return false,
            Permission::Allow => allow = true,
        }
    }
    allow
}

/// Whether some rule allows `principal` `operation` on some resource of `kind` (and it is not
/// denied on the whole kind): for requests that act on no one resource, such as
/// `InitProducerId` (any topic write).
pub fn allowed_anywhere(
    rules: &[Acl],
    principal: &str,
    operation: Operation,
    kind: ResourceType,
) -> bool {
    rules.iter().any(|rule| {
        rule.matches_principal(principal)
            && rule.resource_type.0 == kind
            && rule.permission.0 == Permission::Allow
            && rule.covers(operation)
            && allowed(rules, principal, operation, kind, &rule.resource_name)
    })
}

/// The rules and a cache of decisions, emptied whenever the rules change.
#[derive(Debug, Default)]
pub struct AclTable {
    rules: Vec<Acl>,
    cache: Mutex<HashMap<(String, Operation, ResourceType, String), bool>>,
}

impl AclTable {
    pub fn new(mut rules: Vec<Acl>) -> AclTable {
        rules.sort();
        rules.dedup();
        AclTable {
            rules,
            cache: Mutex::default(),
        }
    }

    pub fn rules(&self) -> &[Acl] {
        &self.rules
    }

    pub fn allowed(
        &self,
        principal: &str,
        operation: Operation,
        kind: ResourceType,
        name: &str,
    ) -> bool {
        let key = (principal.to_owned(), operation, kind, name.to_owned());
        let mut cache = self.cache.lock().expect("acl cache lock");
        if let Some(decision) = cache.get(&key) {
            return *decision;
        }
        let decision = allowed(&self.rules, principal, operation, kind, name);
        if cache.len() >= DECISIONS_CACHED_MAX {
            cache.clear();
        }
        cache.insert(key, decision);
        decision
    }

    pub fn allowed_anywhere(
        &self,
        principal: &str,
        operation: Operation,
        kind: ResourceType,
    ) -> bool {
        allowed_anywhere(&self.rules, principal, operation, kind)
    }

    /// The rules after removing `remove` and adding `add`, and how many of each took effect.
    pub fn changed(&self, add: &[Acl], remove: &[Acl]) -> (Vec<Acl>, u32, u32) {
        let mut rules = self.rules.clone();
        let before = rules.len();
        rules.retain(|rule| !remove.contains(rule));
        let removed = (before - rules.len()) as u32;
        let mut added = 0;
        for rule in add {
            if !rules.contains(rule) {
                rules.push(rule.clone());
                added += 1;
            }
        }
        rules.sort();
        (rules, added, removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Acl {
        // "allow alice read topic orders" / "deny * write topic-prefix tmp." / "allow bob alter cluster"
        let words: Vec<&str> = text.split_whitespace().collect();
        let (kind, pattern, name) = match words[3] {
            "cluster" => (ResourceType::Cluster, PatternType::Literal, ""),
            kind => match kind.strip_suffix("-prefix") {
                Some(kind) => (
                    kind.parse().unwrap(),
                    PatternType::Prefix,
                    words.get(4).copied().unwrap_or(""),
                ),
                None => (kind.parse().unwrap(), PatternType::Literal, words[4]),
            },
        };
        Acl {
            principal: words[1].into(),
            resource_type: ResourceKind(kind),
            pattern: Pattern(pattern),
            resource_name: name.into(),
            operation: Op(words[2].parse().unwrap()),
            permission: Allowed(words[0].parse().unwrap()),
        }
    }

    /// `(rules, principal, operation, kind, name, expected)`, one row per boundary.
    fn check(rules: &[&str], principal: &str, op: &str, kind: &str, name: &str, expected: bool) {
        let rules: Vec<Acl> = rules.iter().map(|r| rule(r)).collect();
        for rule in &rules {
            assert_eq!(Acl::from_wire(&rule.to_wire()).as_ref(), Ok(rule));
        }
        let table = AclTable::new(rules.clone());
        let operation: Operation = op.parse().unwrap();
        let kind: ResourceType = kind.parse().unwrap();
        assert_eq!(
            allowed(&rules, principal, operation, kind, name),
            expected,
            "{rules:?}: {principal} {op} {kind} {name}"
        );
        // The cached answer is the same, twice.
        for _ in 0..2 {
            assert_eq!(table.allowed(principal, operation, kind, name), expected);
        }
    }

    #[test]
    fn evaluation() {
        /// Rules, then principal, operation, resource type, name, and the decision.
        type Case<'a> = (&'a [&'a str], &'a str, &'a str, &'a str, &'a str, bool);
        let cases: &[Case<'_>] = &[
            // Nothing allowed by default.
            (&[], "alice", "read", "topic", "orders", false),
            (
                &["allow alice read topic orders"],
                "alice",
                "read",
                "topic",
                "orders",
                true,
            ),
            // Literal means the exact name.
            (
                &["allow alice read topic orders"],
                "alice",
                "read",
                "topic",
                "orders2",
                false,
            ),
            // Another principal, operation or resource type gets nothing.
            (
                &["allow alice read topic orders"],
                "bob",
                "read",
                "topic",
                "orders",
                false,
            ),
            (
                &["allow alice read topic orders"],
                "alice",
                "write",
                "topic",
                "orders",
                false,
            ),
            (
                &["allow alice read topic orders"],
                "alice",
                "read",
                "group",
                "orders",
                false,
            ),
            // Prefixes.
            (
                &["allow alice write topic-prefix orders."],
                "alice",
                "write",
                "topic",
                "orders.eu",
                true,
            ),
            (
                &["allow alice write topic-prefix orders."],
                "alice",
                "write",
                "topic",
                "orders",
                false,
            ),
            (
                &["allow alice write topic-prefix "],
                "alice",
                "write",
                "topic",
                "anything",
                true,
            ),
            // Deny wins, whatever the order and however broad the allow.
            (
                &[
                    "allow alice all topic-prefix ",
                    "deny alice write topic secret",
                ],
                "alice",
                "write",
                "topic",
                "secret",
                false,
            ),
            (
                &[
                    "deny alice write topic secret",
                    "allow alice write topic secret",
                ],
                "alice",
                "write",
                "topic",
                "secret",
                false,
            ),
            (
                &[
                    "allow alice all topic-prefix ",
                    "deny alice write topic secret",
                ],
                "alice",
                "read",
                "topic",
                "secret",
                true,
            ),
            (
                &["allow alice read topic t", "deny * read topic-prefix t"],
                "alice",
                "read",
                "topic",
                "t",
                false,
            ),
            (
                &["allow alice read topic t", "deny alice all topic t"],
                "alice",
                "read",
                "topic",
                "t",
                false,
            ),
            // Read and write imply describe; describe implies neither.
            (
                &["allow alice read topic t"],
                "alice",
                "describe",
                "topic",
                "t",
                true,
            ),
            (
                &["allow alice write topic t"],
                "alice",
                "describe",
                "topic",
                "t",
                true,
            ),
            (
                &["allow alice describe topic t"],
                "alice",
                "read",
                "topic",
                "t",
                false,
            ),
            (
                &["allow alice create topic t"],
                "alice",
                "describe",
                "topic",
                "t",
                false,
            ),
            // A denied read does not deny the describe a write implies... and a denied
            // describe denies describe only.
            (
                &["allow alice write topic t", "deny alice read topic t"],
                "alice",
                "describe",
                "topic",
                "t",
                true,
            ),
            (
                &["allow alice read topic t", "deny alice describe topic t"],
                "alice",
                "describe",
                "topic",
                "t",
                false,
            ),
            (
                &["allow alice read topic t", "deny alice describe topic t"],
                "alice",
                "read",
                "topic",
                "t",
                true,
            ),
            // `*` is everyone, anonymous too.
            (
                &["allow * describe topic t"],
                "ANONYMOUS",
                "describe",
                "topic",
                "t",
                true,
            ),
            // Cluster rules.
            (
                &["allow ops alter cluster"],
                "ops",
                "alter",
                "cluster",
                "",
                true,
            ),
            (
                &["allow ops alter cluster"],
                "ops",
                "describe",
                "cluster",
                "",
                false,
            ),
            // Filters have their own deploy permission.
            (
                &["allow dev deploy-filter filter-prefix dev."],
                "dev",
                "deploy-filter",
                "filter",
                "dev.f",
                true,
            ),
            (
                &["allow dev deploy-filter filter-prefix dev."],
                "dev",
                "read",
                "filter",
                "dev.f",
                false,
            ),
        ];
        for (rules, principal, op, kind, name, expected) in cases {
            check(rules, principal, op, kind, name, *expected);
        }
    }

    #[test]
    fn anywhere_respects_denies() {
        let rules = vec![rule("allow p write topic a")];
        assert!(allowed_anywhere(
            &rules,
            "p",
            Operation::Write,
            ResourceType::Topic
        ));
        assert!(!allowed_anywhere(
            &rules,
            "q",
            Operation::Write,
            ResourceType::Topic
        ));
        let rules = vec![
            rule("allow p write topic a"),
            rule("deny p write topic-prefix "),
        ];
        assert!(!allowed_anywhere(
            &rules,
            "p",
            Operation::Write,
            ResourceType::Topic
        ));
    }

    #[test]
    fn changes_count_what_took_effect_and_the_cache_follows_the_table() {
        let table = AclTable::new(vec![rule("allow a read topic t")]);
        assert!(table.allowed("a", Operation::Read, ResourceType::Topic, "t"));
        let (rules, added, removed) = table.changed(
            &[rule("allow b read topic t"), rule("allow b read topic t")],
            &[rule("allow a read topic t"), rule("allow z read topic t")],
        );
        assert_eq!((added, removed), (1, 1));
        let table = AclTable::new(rules);
        assert!(!table.allowed("a", Operation::Read, ResourceType::Topic, "t"));
        assert!(table.allowed("b", Operation::Read, ResourceType::Topic, "t"));
    }

    #[test]
    fn bad_wire_entries_are_refused() {
        let good = rule("allow a read topic t").to_wire();
        let cases = [
            (
                AclEntry {
                    resource_type: 9,
                    ..good.clone()
                },
                "unknown resource type 9",
            ),
            (
                AclEntry {
                    operation: 8,
                    ..good.clone()
                },
                "unknown operation 8",
            ),
            (
                AclEntry {
                    permission: 2,
                    ..good.clone()
                },
                "unknown permission 2",
            ),
            (
                AclEntry {
                    pattern_type: 5,
                    ..good.clone()
                },
                "unknown pattern type 5",
            ),
            (
                AclEntry {
                    principal: String::new(),
                    ..good.clone()
                },
                "needs a principal",
            ),
            (
                AclEntry {
                    resource_name: String::new(),
                    ..good.clone()
                },
                "needs a resource name",
            ),
            (
                AclEntry {
                    resource_type: 4,
                    ..good.clone()
                },
                "names no resource",
            ),
        ];
        for (entry, expected) in cases {
            let error = Acl::from_wire(&entry).unwrap_err().to_string();
            assert!(error.contains(expected), "{error} lacks {expected}");
        }
    }
}
