//! Produce-path validator: a record whose value is not well-formed JSON is a record error
//! (the attachment's policy fails the produce, skips the record or dead-letters it); good
//! records pass through untouched. Params (optional): `{"require_object":true}`.

use std::cell::Cell;

use ketch_filter::Record;

thread_local! {
    static REQUIRE_OBJECT: Cell<bool> = const { Cell::new(false) };
}

#[ketch_filter::init]
fn init(params: &str) -> Result<(), String> {
    if params.trim().is_empty() {
        return Ok(());
    }
    let params: serde_json::Value =
        serde_json::from_str(params).map_err(|e| format!("params are not JSON: {e}"))?;
    let require = params
        .get("require_object")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    REQUIRE_OBJECT.with(|r| r.set(require));
    Ok(())
}

#[ketch_filter::filter]
fn valid(record: &Record) -> Result<bool, String> {
    let value: serde_json::Value =
        serde_json::from_slice(record.value()).map_err(|e| format!("malformed JSON: {e}"))?;
    if REQUIRE_OBJECT.with(Cell::get) && !value.is_object() {
        return Err("expected a JSON object".into());
    }
    Ok(true)
}
