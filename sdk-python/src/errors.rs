//! The core's errors as the exceptions of `ketch._errors` (one class per family, each with the
//! stable `code` string, `retriable`, and the cause chain in the message).

use ketch_client::{Error, ErrorCode};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyModule};

static ERRORS_MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

/// The stable code string of an error: the wire code's name, or the name of the client-side
/// failure.
pub fn code_name(error: &Error) -> &'static str {
    match error {
        Error::Broker { code, .. } => code.name(),
        Error::Config(_) => "config",
        Error::Tls { .. } => "tls",
        Error::Connect { .. } => "connect",
        Error::Transport { .. } => "transport",
        Error::Protocol(e) => e.code().name(),
        Error::CorruptBatch { .. } => ErrorCode::CorruptBatch.name(),
        Error::RecordTooLarge { .. } => ErrorCode::RecordTooLarge.name(),
        Error::Timeout(_) => ErrorCode::Timeout.name(),
        Error::Closed => "closed",
        Error::InvalidOperation(_) => "invalid_operation",
        _ => "unknown",
    }
}

/// The `ketch._errors` class for a code string.
pub fn class_name(code: &str) -> &'static str {
    match code {
        "unknown_topic" => "TopicNotFound",
        "unknown_partition" => "PartitionNotFound",
        "topic_already_exists" => "TopicAlreadyExists",
        "record_too_large" | "frame_too_large" => "RecordTooLarge",
        "unauthorized" => "NotAuthorized",
        "authentication_failed" => "AuthenticationFailed",
        "unknown_transform" | "transform_exists" => "TransformError",
        "unknown_filter" | "invalid_filter" | "filter_rejected" | "filter_failed"
        | "filter_in_use" => "FilterError",
        "connect"
        | "transport"
        | "shutting_down"
        | "not_leader"
        | "overloaded"
        | "not_coordinator"
        | "not_enough_replicas"
        | "fenced_leader_epoch"
        | "no_space" => "BrokerUnavailable",
        "closed" => "Closed",
        "timeout" => "KetchTimeout",
        "config" | "tls" | "invalid_config" | "invalid_topic_name" | "invalid_partitions" => {
            "ConfigError"
        }
        "offset_out_of_range" => "OffsetOutOfRange",
        "unknown_member" | "stale_member_epoch" | "invalid_group_id" | "group_not_found" => {
            "GroupError"
        }
        "corrupt_batch"
        | "malformed_frame"
        | "unsupported_api"
        | "unsupported_version"
        | "unsupported_compression"
        | "invalid_request" => "ProtocolError",
        "invalid_operation" => "InvalidOperation",
        _ => "KetchError",
    }
}

/// The error's message followed by its causes.
pub fn message(error: &Error) -> String {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// The Python exception for a core error. Built attached (the `ketch._errors` class, with
/// its attributes); on a runtime thread once the interpreter exits, a plain `RuntimeError`
/// built without attaching, which nobody will see (the future it would complete is leaked).
pub fn to_py(error: Error) -> PyErr {
    crate::exit::attach(|py| build(py, &error, None)).unwrap_or_else(|| exiting(&error))
}

/// [`to_py`] with a prefix naming what failed (for example which record of a batch).
pub fn to_py_with(error: Error, context: String) -> PyErr {
    crate::exit::attach(|py| build(py, &error, Some(context))).unwrap_or_else(|| exiting(&error))
}

fn exiting(error: &Error) -> PyErr {
    pyo3::exceptions::PyRuntimeError::new_err(format!(
        "the interpreter is exiting: {}",
        message(error)
    ))
}

fn build(py: Python<'_>, error: &Error, context: Option<String>) -> PyErr {
    let code = code_name(error);
    let mut text = message(error);
    if let Some(context) = context {
        text = format!("{context}: {text}");
    }
    match raise(py, class_name(code), &text, code, error) {
        Ok(err) | Err(err) => err,
    }
}

fn raise(py: Python<'_>, class: &str, text: &str, code: &str, error: &Error) -> PyResult<PyErr> {
    let module = ERRORS_MODULE.get_or_try_init(py, || {
        PyModule::import(py, "ketch._errors").map(Bound::unbind)
    })?;
    let class = module.bind(py).getattr(class)?;
    let kwargs = PyDict::new(py);
    kwargs.set_item("code", code)?;
    kwargs.set_item("retriable", error.is_retriable())?;
    if let Error::Broker { raw_code, .. } = error {
        kwargs.set_item("raw_code", *raw_code)?;
    }
    if class_name(code) == "FilterError"
        && let Error::Broker { message, .. } = error
    {
        let (module, reason) = filter_parts(message);
        kwargs.set_item("module", module)?;
        kwargs.set_item("reason", reason)?;
    }
    let value = class.call((text,), Some(&kwargs))?;
    Ok(PyErr::from_value(value))
}

/// A filter error's module name and reason from the broker's message, which names the module
/// in backquotes when it knows it: ``filter `high-value` v2 trapped: unreachable (record at
/// offset 7)``, ``filter `x` refused: ...``, ``unknown filter `x` ``.
fn filter_parts(message: &str) -> (Option<&str>, &str) {
    let Some((before, rest)) = message.split_once('`') else {
        return (None, message);
    };
    let Some((module, after)) = rest.split_once('`') else {
        return (None, message);
    };
    let after = after.trim_start();
    // " v2 trapped: ..." names the version first.
    let after = after
        .strip_prefix('v')
        .and_then(|v| v.split_once(' '))
        .filter(|(digits, _)| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .map_or(after, |(_, reason)| reason);
    let reason = after.strip_prefix("refused:").unwrap_or(after).trim();
    if reason.is_empty() {
        // "unknown filter `x`": the whole message is the reason.
        return (Some(module), before.trim());
    }
    (Some(module), reason)
}

/// The exception a broker error with wire code `raw_code` raises, built by the same path as
/// every other (for tests of the mapping: errors no test broker can be made to send, such as
/// `unauthorized` before the broker authenticates).
#[pyfunction]
pub fn _exception_for_wire_code(raw_code: u16, message: String) -> PyErr {
    let code = ketch_client::ErrorCode::from_u16(raw_code).unwrap_or(ErrorCode::Unknown);
    to_py(Error::Broker {
        code,
        raw_code,
        message,
        partition: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_wire_code_has_a_family() {
        let check = |code: ErrorCode, class: &str| {
            assert_eq!(class_name(code.name()), class, "{code:?}");
        };
        check(ErrorCode::UnknownTopic, "TopicNotFound");
        check(ErrorCode::RecordTooLarge, "RecordTooLarge");
        check(ErrorCode::Unauthorized, "NotAuthorized");
        check(ErrorCode::AuthenticationFailed, "AuthenticationFailed");
        check(ErrorCode::UnknownTransform, "TransformError");
        check(ErrorCode::TransformExists, "TransformError");
        check(ErrorCode::FilterRejected, "FilterError");
        check(ErrorCode::FilterFailed, "FilterError");
        check(ErrorCode::FilterInUse, "FilterError");
        check(ErrorCode::ShuttingDown, "BrokerUnavailable");
        check(ErrorCode::Timeout, "KetchTimeout");
        check(ErrorCode::DuplicateSequence, "KetchError");
        for code in ErrorCode::ALL {
            assert!(!class_name(code.name()).is_empty());
        }
    }

    #[test]
    fn client_errors_have_codes() {
        assert_eq!(code_name(&Error::Closed), "closed");
        assert_eq!(class_name(code_name(&Error::Closed)), "Closed");
        let connect = Error::Connect {
            addr: "127.0.0.1:1".into(),
            message: "refused".into(),
            source: None,
        };
        assert_eq!(class_name(code_name(&connect)), "BrokerUnavailable");
        assert_eq!(
            class_name(code_name(&Error::Config("x".into()))),
            "ConfigError"
        );
    }

    #[test]
    fn filter_messages_split_into_module_and_reason() {
        let check = |message: &str, module: Option<&str>, reason: &str| {
            assert_eq!(filter_parts(message), (module, reason), "{message}");
        };
        check(
            "filter `high-value` v2 trapped: unreachable (record at offset 7)",
            Some("high-value"),
            "trapped: unreachable (record at offset 7)",
        );
        check(
            "filter `x` refused: missing the ABI export `ketch_process`",
            Some("x"),
            "missing the ABI export `ketch_process`",
        );
        check(
            "filter `x` is in use by subscription to t/0; delete it with --force",
            Some("x"),
            "is in use by subscription to t/0; delete it with --force",
        );
        check("unknown filter `nope`", Some("nope"), "unknown filter");
        check(
            "filter `v` v1 init failed: bad",
            Some("v"),
            "init failed: bad",
        );
        check("no such filter", None, "no such filter");
    }
}
