//! Limits and timing of the group coordinator.

/// Longest group id, in bytes (Kafka has no limit; ours keeps every key small and bounded).
pub const GROUP_ID_BYTES_MAX: usize = 255;
/// Longest client id a member may report, in bytes.
pub const CLIENT_ID_BYTES_MAX: usize = 255;
/// Longest topic name accepted in a subscription, in bytes (at least the cluster's own limit).
pub const SUBSCRIPTION_TOPIC_BYTES_MAX: usize = 255;

const HEARTBEAT_INTERVAL_MS_DEFAULT: u32 = 1_000;
const SESSION_TIMEOUT_MS_MIN_DEFAULT: u32 = 3_000;
const SESSION_TIMEOUT_MS_MAX_DEFAULT: u32 = 300_000;
const SESSION_TIMEOUT_MS_DEFAULT: u32 = 30_000;

const _: () = assert!(HEARTBEAT_INTERVAL_MS_DEFAULT > 0);
const _: () = assert!(HEARTBEAT_INTERVAL_MS_DEFAULT <= SESSION_TIMEOUT_MS_MIN_DEFAULT);
const _: () = assert!(SESSION_TIMEOUT_MS_MIN_DEFAULT <= SESSION_TIMEOUT_MS_DEFAULT);
const _: () = assert!(SESSION_TIMEOUT_MS_DEFAULT <= SESSION_TIMEOUT_MS_MAX_DEFAULT);

/// How the coordinator times sessions and how far it lets groups grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// Sent to members in every heartbeat response: how often they should heartbeat.
    pub heartbeat_interval_ms: u32,
    /// A member's requested session timeout is clamped to `[min, max]`.
    pub session_timeout_ms_min: u32,
    pub session_timeout_ms_max: u32,
    /// Used when a member asks for `0` (then clamped like any other request).
    pub session_timeout_ms_default: u32,
    /// Joins beyond this many members in one group are refused (`Overloaded`).
    pub group_members_max: u32,
    /// New groups beyond this many are refused (`Overloaded`). Replayed commits are never
    /// refused, so a lowered limit only stops growth.
    pub groups_max: u32,
    /// Topics in one member's subscription.
    pub subscription_topics_max: u32,
    /// The metadata string of a committed offset (Kafka's `offset.metadata.max.bytes`).
    pub commit_metadata_bytes_max: u32,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS_DEFAULT,
            session_timeout_ms_min: SESSION_TIMEOUT_MS_MIN_DEFAULT,
            session_timeout_ms_max: SESSION_TIMEOUT_MS_MAX_DEFAULT,
            session_timeout_ms_default: SESSION_TIMEOUT_MS_DEFAULT,
            group_members_max: 1_000,
            groups_max: 10_000,
            subscription_topics_max: 1_000,
            commit_metadata_bytes_max: 4_096,
        }
    }
}

/// A [`GroupConfig`] whose values contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid consumer group configuration: {0}")]
pub struct InvalidGroupConfig(pub &'static str);

impl GroupConfig {
    /// Checks the relations between the values; call it where configuration is loaded.
    /// [`GroupCoordinator::new`](super::GroupCoordinator::new) panics on a config that fails.
    pub fn validate(&self) -> Result<(), InvalidGroupConfig> {
        let fail = |reason| Err(InvalidGroupConfig(reason));
        if self.heartbeat_interval_ms == 0 {
            return fail("heartbeat_interval_ms must be positive");
        }
        if self.session_timeout_ms_min == 0 {
            return fail("session_timeout_ms_min must be positive");
        }
        if self.session_timeout_ms_min > self.session_timeout_ms_max {
            return fail("session_timeout_ms_min exceeds session_timeout_ms_max");
        }
        // Equal is allowed but leaves no slack; a few heartbeats per session is healthy.
        if self.heartbeat_interval_ms > self.session_timeout_ms_min {
            return fail("heartbeat_interval_ms exceeds session_timeout_ms_min");
        }
        if self.group_members_max == 0 || self.groups_max == 0 {
            return fail("group_members_max and groups_max must be positive");
        }
        if self.subscription_topics_max == 0 {
            return fail("subscription_topics_max must be positive");
        }
        if self.commit_metadata_bytes_max > u32::from(u16::MAX) {
            return fail("commit_metadata_bytes_max exceeds the record format's 65535 bytes");
        }
        Ok(())
    }

    /// The session timeout a member gets for the one it asked for (`0` asks for the default).
    pub fn session_timeout_ms(&self, requested_ms: u32) -> u32 {
        let requested_ms = match requested_ms {
            0 => self.session_timeout_ms_default,
            ms => ms,
        };
        requested_ms.clamp(self.session_timeout_ms_min, self.session_timeout_ms_max)
    }
}

/// Why `id` is not a valid group id, if it is not.
pub(crate) fn group_id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        Some("empty")
    } else if id.len() > GROUP_ID_BYTES_MAX {
        Some("longer than 255 bytes")
    } else if id.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    }
}
