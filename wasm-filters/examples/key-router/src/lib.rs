//! Routes records to topics by key: the key up to its first ':' (or the whole key) is looked
//! up in `routes`; unmatched records (and records without a key) go to `default`, or are
//! dropped when there is none.
//! Params: `{"routes":{"eu":"orders-eu","us":"orders-us"},"default":"orders-other"}`.

use std::cell::RefCell;
use std::collections::HashMap;

use ketch_filter::{Record, RecordOut};

#[derive(Debug, Default)]
struct Routes {
    by_prefix: HashMap<Vec<u8>, String>,
    default: Option<String>,
}

thread_local! {
    static ROUTES: RefCell<Routes> = RefCell::new(Routes::default());
}

#[ketch_filter::init]
fn init(params: &str) -> Result<(), String> {
    let params: serde_json::Value =
        serde_json::from_str(params).map_err(|e| format!("params are not JSON: {e}"))?;
    let mut routes = Routes::default();
    let table = params
        .get("routes")
        .and_then(|r| r.as_object())
        .ok_or("params need \"routes\": an object of key prefix -> topic")?;
    for (prefix, topic) in table {
        let topic = topic
            .as_str()
            .ok_or_else(|| format!("route {prefix:?} must name a topic (a string)"))?;
        routes
            .by_prefix
            .insert(prefix.as_bytes().to_vec(), topic.to_owned());
    }
    routes.default = params
        .get("default")
        .and_then(|d| d.as_str())
        .map(str::to_owned);
    ROUTES.with(|r| *r.borrow_mut() = routes);
    Ok(())
}

#[ketch_filter::filter_map]
fn route(record: &Record) -> Option<RecordOut> {
    ROUTES.with(|routes| {
        let routes = routes.borrow();
        let topic = record
            .key()
            .and_then(|key| {
                let prefix = key.split(|&b| b == b':').next().unwrap_or(key);
                routes.by_prefix.get(prefix)
            })
            .or(routes.default.as_ref())?;
        Some(RecordOut::from_record(record).to_topic(topic.clone()))
    })
}
