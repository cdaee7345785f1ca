//! The core's [`ketch_client::Error`] as the one string a rejection carries.
//!
//! napi-rs async functions reject with a plain `Error` whose `code` is a napi status, so the
//! Ketch fields travel in the message: `KETCH<US>code<US>raw<US>retriable<US>message`
//! (`<US>` is U+001F). `lib/errors.ts` parses exactly this. No napi here, so
//! `tests/conversions.rs` can test it outside Node.

use ketch_client::Error;

/// Separator of the encoded fields; cannot occur in a code or number.
const SEPARATOR: char = '\u{1f}';
/// Marks a message encoded by [`encode`].
const MARK: &str = "KETCH";

/// The stable `code` string of an error: the wire code's name for broker errors, a name per
/// client-side kind otherwise. The facade's class table is keyed by these.
pub(crate) fn code_name(error: &Error) -> &'static str {
    match error {
        Error::Broker { code, .. } => code.name(),
        Error::Config(_) => "config",
        Error::Tls { .. } => "tls",
        Error::Connect { .. } => "connect",
        Error::Transport { .. } => "transport",
        Error::Protocol(_) => "protocol",
        Error::CorruptBatch { .. } => "corrupt_batch",
        Error::RecordTooLarge { .. } => "record_too_large",
        Error::Timeout(_) => "timeout",
        Error::Closed => "closed",
        Error::InvalidOperation(_) => "invalid_operation",
        _ => "unknown",
    }
}

/// The error's fields in one string (see the module docs).
pub(crate) fn encode(error: &Error) -> String {
    let raw = match error {
        Error::Broker { raw_code, .. } => i32::from(*raw_code),
        other => other.code().map_or(-1, |code| i32::from(code.as_u16())),
    };
    format!(
        "{MARK}{SEPARATOR}{}{SEPARATOR}{raw}{SEPARATOR}{}{SEPARATOR}{error}",
        code_name(error),
        u8::from(error.is_retriable()),
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ketch_client::ErrorCode;

    fn check(error: Error, expected: &str) {
        assert_eq!(encode(&error), expected.replace('|', "\u{1f}"));
    }

    #[test]
    fn encodes_code_raw_number_retriable_and_message() {
        check(
            Error::Broker {
                code: ErrorCode::UnknownTopic,
                raw_code: 6,
                message: "no such topic".into(),
                partition: None,
            },
            "KETCH|unknown_topic|6|1|broker error unknown_topic (6): no such topic",
        );
        check(
            Error::Broker {
                code: ErrorCode::Unknown,
                raw_code: 999,
                message: "newer".into(),
                partition: None,
            },
            "KETCH|unknown|999|0|broker error unknown (1): newer",
        );
        check(
            Error::Broker {
                code: ErrorCode::Unauthorized,
                raw_code: 29,
                message: "produce to orders: not allowed".into(),
                partition: None,
            },
            "KETCH|unauthorized|29|0|broker error unauthorized (29): produce to orders: not allowed",
        );
        check(Error::Closed, "KETCH|closed|-1|0|closed");
        check(
            Error::RecordTooLarge { bytes: 9, limit: 8 },
            "KETCH|record_too_large|13|0|record of 9 bytes exceeds the limit of 8 bytes",
        );
        check(
            Error::Connect {
                addr: "127.0.0.1:1".into(),
                message: "refused".into(),
                source: None,
            },
            "KETCH|connect|-1|1|cannot connect to 127.0.0.1:1: refused",
        );
    }
}
