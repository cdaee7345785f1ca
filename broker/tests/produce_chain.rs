//! The produce-path chain as a function (input batch in, output batch out), with the real
//! engine and the example modules: outputs are valid batches with a fresh CRC and the
//! input's producer identity ending at its last sequence; each on-error policy; a hostile
//! module fails the batch with its name and the reason.

use std::path::PathBuf;
use std::sync::Arc;

use ketch_broker::transform::chain::ChainModule;
use ketch_broker::transform::{
    ChainOutput, ChainSpec, OnError, TransformConfig, TransformError, Transforms,
};
use ketch_protocol::batch::{self, BatchBuilder, ProducerStamp, RecordBatch};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example(crate_name: &str) -> Vec<u8> {
    let dir = std::env::var_os("KETCH_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/wasm/wasm32-unknown-unknown/release"));
    let path = dir.join(format!("{crate_name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the examples first (scripts/test-all.sh)",
            path.display()
        )
    })
}

async fn transforms(dir: &std::path::Path) -> Arc<Transforms> {
    let t = Arc::new(Transforms::open(dir, TransformConfig::default()).expect("open"));
    for (name, wasm) in [
        ("validate", example("json_validate")),
        ("pii", example("pii_redact")),
        (
            "bomb",
            wat::parse_file(repo().join("wasm-filters/hostile/memory-bomb.wat")).unwrap(),
        ),
    ] {
        t.upload(name.into(), String::new(), wasm.into(), 0)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    t
}

fn input(stamp: ProducerStamp, values: &[&str]) -> RecordBatch {
    let mut builder = BatchBuilder::new(1 << 20).with_producer(stamp);
    for (i, v) in values.iter().enumerate() {
        assert!(builder.try_append(1_000 + i as i64, Some(b"k"), Some(v.as_bytes()), &[]));
    }
    RecordBatch::new(builder.finish()).unwrap()
}

async fn apply(
    t: &Arc<Transforms>,
    modules: &[&str],
    on_error: OnError,
    batch: RecordBatch,
) -> Result<ChainOutput, TransformError> {
    let spec = ChainSpec {
        topic_id: 1,
        modules: modules
            .iter()
            .map(|m| ChainModule {
                name: (*m).to_owned(),
                version: 1,
            })
            .collect(),
        params: String::new(),
        on_error,
    };
    let chain = t.produce_chain("orders", spec).await?;
    t.run(move || chain.apply(0, &batch)).await?
}

fn values(output: &ChainOutput) -> Vec<String> {
    let Some(bytes) = &output.batch else {
        return vec![];
    };
    batch::validate(bytes).expect("a valid batch with a fresh CRC");
    RecordBatch::new(bytes.clone())
        .unwrap()
        .decode_all()
        .unwrap()
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap()).into_owned())
        .collect()
}

#[tokio::test]
async fn a_chain_maps_and_stamps_the_output_with_the_input_last_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let t = transforms(dir.path()).await;
    let stamp = ProducerStamp {
        producer_id: 7,
        producer_epoch: 2,
        base_sequence: 10,
    };
    let batch = input(stamp, &["\"ann@example.com\"", "{bad", "\"plain\""]);
    let output = apply(&t, &["validate", "pii"], OnError::Skip, batch)
        .await
        .unwrap();
    assert_eq!(values(&output), ["\"[email]\"", "\"plain\""]);
    assert_eq!((output.records_in, output.records_out), (3, 2));
    let header = RecordBatch::new(output.batch.clone().unwrap()).unwrap();
    let header = header.header();
    assert_eq!(
        (
            header.producer_id,
            header.producer_epoch,
            header.base_sequence
        ),
        (7, 2, 11),
        "two records ending at the input's last sequence 12"
    );
    // Timestamps and keys travel with the records.
    let records = RecordBatch::new(output.batch.unwrap())
        .unwrap()
        .decode_all()
        .unwrap();
    assert_eq!(records[1].timestamp, 1_002);
    assert_eq!(records[1].key.as_deref(), Some(&b"k"[..]));
}

#[tokio::test]
async fn a_chain_that_changes_nothing_stores_the_batch_as_produced() {
    let dir = tempfile::tempdir().unwrap();
    let t = transforms(dir.path()).await;
    let stamp = ProducerStamp {
        producer_id: 7,
        producer_epoch: 2,
        base_sequence: 10,
    };
    let batch = input(stamp, &["{\"a\":1}", "\"plain\"", "2"]);
    let produced = batch.as_bytes().clone();
    // A filter that keeps every record (a map re-encodes whatever it returns).
    let output = apply(&t, &["validate"], OnError::Fail, batch)
        .await
        .unwrap();
    assert_eq!((output.records_in, output.records_out), (3, 3));
    let stored = output.batch.unwrap();
    assert_eq!(stored, produced);
    assert_eq!(
        stored.as_ptr(),
        produced.as_ptr(),
        "not re-encoded, not copied"
    );
}

#[tokio::test]
async fn record_errors_follow_the_policy() {
    let dir = tempfile::tempdir().unwrap();
    let t = transforms(dir.path()).await;
    let values_in = ["{}", "{bad", "[]"];
    let failed = apply(
        &t,
        &["validate"],
        OnError::Fail,
        input(ProducerStamp::NONE, &values_in),
    )
    .await
    .unwrap_err();
    let text = failed.to_string();
    assert!(
        text.starts_with("filter `validate` v1 rejected a record: malformed JSON")
            && text.ends_with("(record at offset 1)"),
        "{text}"
    );
    assert_eq!(failed.code(), ketch_protocol::ErrorCode::FilterRejected);

    let dead = apply(
        &t,
        &["validate"],
        OnError::DeadLetter("dlq".into()),
        input(ProducerStamp::NONE, &values_in),
    )
    .await
    .unwrap();
    assert_eq!(values(&dead), ["{}", "[]"]);
    assert_eq!(dead.dead_letters.len(), 1);
    assert_eq!(
        dead.dead_letters[0].record.value.as_deref(),
        Some(&b"{bad"[..])
    );
    assert!(dead.dead_letters[0].reason.contains("malformed JSON"));

    let none = apply(
        &t,
        &["validate"],
        OnError::Skip,
        input(ProducerStamp::NONE, &["{"]),
    )
    .await
    .unwrap();
    assert_eq!(none.batch, None, "nothing kept, nothing to append");
}

#[tokio::test]
async fn a_hostile_module_fails_the_batch_with_its_name_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let t = transforms(dir.path()).await;
    let failed = apply(
        &t,
        &["validate", "bomb"],
        OnError::Skip,
        input(ProducerStamp::NONE, &["1"]),
    )
    .await
    .unwrap_err();
    let text = failed.to_string();
    assert!(
        text.starts_with("filter `bomb` v1 exceeded its memory limit"),
        "{text}"
    );
    assert_eq!(failed.code(), ketch_protocol::ErrorCode::FilterFailed);
}
