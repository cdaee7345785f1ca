//! The Wasm transform engine without a network: upload validation with each hostile module,
//! run-time limits, instance recycling, the registry across restarts, and the example
//! filters of `wasm-filters/` (built for wasm32 by `scripts/test-all.sh`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ketch_broker::transform::{
    Action, FailureReason, FilterSession, Output, TransformConfig, TransformError, Transforms,
};
use ketch_protocol::batch::{BatchBuilder, Header, Record, RecordBatch};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn hostile(name: &str) -> Vec<u8> {
    let path = repo().join("wasm-filters/hostile").join(name);
    wat::parse_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// An example filter built by `scripts/test-all.sh` (or `cargo build --release --target
/// wasm32-unknown-unknown --target-dir ../target/wasm` in `wasm-filters/`).
pub fn example(crate_name: &str) -> Vec<u8> {
    let dir = std::env::var_os("KETCH_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/wasm/wasm32-unknown-unknown/release"));
    let path = dir.join(format!("{crate_name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the examples first: (cd wasm-filters && cargo build --release --target wasm32-unknown-unknown --target-dir ../target/wasm)",
            path.display()
        )
    })
}

fn open(dir: &std::path::Path) -> Arc<Transforms> {
    Arc::new(Transforms::open(dir, TransformConfig::default()).expect("open transforms"))
}

fn records(values: &[&str]) -> Vec<Record> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            offset: 100 + i as i64,
            timestamp: 1_700_000_000_000 + i as i64,
            key: Some(Bytes::from(format!("k{i}"))),
            value: Some(Bytes::copy_from_slice(v.as_bytes())),
            headers: Vec::new(),
        })
        .collect()
}

async fn session(
    t: &Transforms,
    name: &str,
    params: &str,
) -> Result<FilterSession, TransformError> {
    t.session(name, None, params.to_owned(), format!("test of {name}"))
        .await
}

async fn run(
    t: &Transforms,
    mut s: FilterSession,
    values: &[&str],
) -> (FilterSession, Result<Output, String>) {
    let recs = records(values);
    t.run(move || {
        let out = s.run("t", 0, &recs).map_err(|e| e.to_string());
        (s, out)
    })
    .await
    .expect("pool")
}

#[tokio::test]
async fn hostile_modules_are_refused_at_upload_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let cases: [(&str, Vec<u8>, &str); 6] = [
        (
            "forbidden-import",
            hostile("forbidden-import.wat"),
            "imports `wasi_snapshot_preview1.fd_write`, but a filter may import only `ketch.log`",
        ),
        (
            "missing-export",
            hostile("missing-export.wat"),
            "missing the ABI export `ketch_process`",
        ),
        (
            "wrong-abi",
            hostile("wrong-abi-version.wat"),
            "ABI version 99 is not supported (this broker speaks version 1)",
        ),
        (
            "memory-minimum",
            hostile("memory-minimum.wat"),
            "memory minimum of 1073741824 bytes exceeds the limit (filter_memory_bytes_max) of 33554432 bytes",
        ),
        (
            "garbage",
            b"\0asm\x01\0\0\0\xff\xff".to_vec(),
            "does not compile",
        ),
        (
            "too-big",
            {
                let mut b = b"\0asm\x01\0\0\0".to_vec();
                b.resize(100 * 1024 * 1024, 0);
                b
            },
            "module is 104857600 bytes, the limit (filter_module_bytes_max) is 16777216",
        ),
    ];
    for (name, bytes, expect) in cases {
        let started = Instant::now();
        let error = t
            .upload(name.into(), String::new(), bytes.into(), 0)
            .await
            .expect_err(name);
        println!("{name}: refused in {:?}: {error}", started.elapsed());
        assert!(
            matches!(error, TransformError::Invalid { .. }),
            "{name}: {error:?}"
        );
        assert!(
            error.to_string().contains(expect),
            "{name}: {error} lacks {expect:?}"
        );
        assert_eq!(error.code(), ketch_protocol::ErrorCode::InvalidFilter);
    }
    assert!(t.registry.list().is_empty(), "nothing refused is stored");
    let error = t
        .upload("bad/name".into(), String::new(), Bytes::new(), 0)
        .await
        .unwrap_err();
    assert!(matches!(error, TransformError::InvalidName(_)), "{error:?}");
}

#[tokio::test]
async fn hostile_modules_are_stopped_at_run_time_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    let cases = [
        (
            "infinite-loop.wat",
            "timed out: ran longer than 100 ms on one batch",
        ),
        (
            "memory-bomb.wat",
            "exceeded its memory limit of 33554432 bytes",
        ),
        ("trap.wat", "trapped: "),
        (
            "oob-output.wat",
            "returned a malformed output: output pointer 0x7fff0000 + length 256 is outside the module's memory of 65536 bytes",
        ),
        (
            "huge-output.wat",
            "returned a malformed output: output of 16777216 bytes exceeds the limit of 8388608 bytes",
        ),
    ];
    for (file, expect) in cases {
        let name = file.trim_end_matches(".wat");
        let version = t
            .upload(name.into(), "hostile".into(), hostile(file).into(), 0)
            .await
            .unwrap();
        let s = session(&t, name, "").await.unwrap();
        let started = Instant::now();
        let (s, out) = run(&t, s, &["a", "b"]).await;
        let elapsed = started.elapsed();
        let error = out.expect_err(name);
        println!("{name}: stopped in {elapsed:?}: {error}");
        assert!(
            error.starts_with(&format!("filter `{name}` v{} ", version.version)),
            "{error}"
        );
        assert!(error.contains(expect), "{name}: {error} lacks {expect:?}");
        assert!(elapsed < Duration::from_secs(2), "{name} took {elapsed:?}");
        // The instance was thrown away; the next batch gets a fresh one and fails the same way.
        let (_, again) = run(&t, s, &["c"]).await;
        assert!(again.unwrap_err().contains(expect), "{name} again");
    }
    // The memory bomb is reported as the limit, not as the abort that follows.
    let s = session(&t, "memory-bomb", "").await.unwrap();
    let recs = records(&["x"]);
    let error = t
        .run(move || {
            let mut s = s;
            s.run("t", 0, &recs)
        })
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(
            error.reason,
            FailureReason::MemoryLimit {
                bytes_max: 33554432,
                ..
            }
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_trap_recycles_the_instance_and_later_batches_succeed() {
    // Traps on a batch of exactly two records; keeps every record otherwise.
    let wat = r#"(module
      (memory (export "memory") 1)
      (func (export "ketch_abi_version") (result i32) (i32.const 1))
      (func (export "ketch_alloc") (param i32) (result i32) (i32.const 1024))
      (func (export "ketch_init") (param i32 i32) (result i64) (i64.const 8))
      (func (export "ketch_process") (param $p i32) (param i32) (result i64)
        (if (i32.eq (i32.load offset=4 (local.get $p)) (i32.const 2)) (then unreachable))
        (i32.store (i32.const 512) (i32.const 0))
        (i32.store (i32.const 516) (i32.load offset=4 (local.get $p)))
        (i32.store (i32.const 520) (i32.const 0xff))
        (i64.const 0x0000020000000009)))"#;
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    t.upload(
        "flaky".into(),
        String::new(),
        wat::parse_str(wat).unwrap().into(),
        0,
    )
    .await
    .unwrap();
    let s = session(&t, "flaky", "").await.unwrap();
    let (s, first) = run(&t, s, &["a"]).await;
    assert_eq!(
        first.unwrap(),
        Output::Keep(vec![0xff]),
        "extra bits past the count are ignored"
    );
    let (s, second) = run(&t, s, &["a", "b"]).await;
    assert!(second.unwrap_err().contains("trapped"));
    let (_, third) = run(&t, s, &["a", "b", "c"]).await;
    assert_eq!(
        third.unwrap(),
        Output::Keep(vec![0xff]),
        "a fresh instance after the trap"
    );
}

#[tokio::test]
async fn the_registry_survives_a_restart_and_loads_from_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = example("byte_scan");
    {
        let t = open(dir.path());
        let v1 = t
            .upload("scan".into(), "first".into(), wasm.clone().into(), 1)
            .await
            .unwrap();
        assert_eq!(v1.version, 1);
        assert_eq!(v1.digest.len(), 64);
        let same = t
            .upload("scan".into(), "again".into(), wasm.clone().into(), 2)
            .await
            .unwrap();
        assert_eq!(same, v1, "the same bytes are the same version");
        let v2 = t
            .upload(
                "scan".into(),
                "second".into(),
                wat::parse_file(repo().join("wasm-filters/examples/wat/keep-even.wat"))
                    .unwrap()
                    .into(),
                3,
            )
            .await
            .unwrap();
        assert_eq!(v2.version, 2);
    }
    let t = open(dir.path());
    let (versions, users) = t.registry.describe("scan").unwrap();
    assert_eq!(
        versions
            .iter()
            .map(|v| (v.version, v.description.as_str()))
            .collect::<Vec<_>>(),
        vec![(1, "first"), (2, "second")]
    );
    assert!(users.is_empty());
    let s = t
        .session(
            "scan",
            Some(1),
            r#"{"needle":"ERR"}"#.into(),
            "a test".into(),
        )
        .await
        .unwrap();
    let (s, out) = run(&t, s, &["ok", "an ERR here", "fine"]).await;
    assert_eq!(out.unwrap(), Output::Keep(vec![0b010]));
    assert_eq!(
        t.registry
            .compiled_from_source
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "deserialized from the cache"
    );
    // In use: delete is refused without force and names the user.
    let error = t.registry.delete("scan", false).unwrap_err();
    assert_eq!(
        error.to_string(),
        "filter `scan` is in use by a test; delete it with --force"
    );
    drop(s);
    t.registry.delete("scan", false).unwrap();
    assert!(matches!(
        t.registry.describe("scan"),
        Err(TransformError::Unknown(_))
    ));
    drop(t);
    assert!(
        open(dir.path()).registry.list().is_empty(),
        "deleted durably"
    );
}

#[tokio::test]
async fn a_corrupt_cache_is_rebuilt_from_the_module() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path())
        .upload(
            "even".into(),
            String::new(),
            wat::parse_file(repo().join("wasm-filters/examples/wat/keep-even.wat"))
                .unwrap()
                .into(),
            0,
        )
        .await
        .unwrap();
    std::fs::write(dir.path().join("filters/even/v1.cwasm"), b"not a module").unwrap();
    let t = open(dir.path());
    let s = session(&t, "even", "").await.unwrap();
    let (_, out) = run(&t, s, &["a", "b", "c"]).await;
    assert_eq!(
        out.unwrap(),
        Output::Keep(vec![0b101]),
        "offsets 100 and 102 are even"
    );
    assert_eq!(
        t.registry
            .compiled_from_source
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[tokio::test]
async fn the_examples_do_what_they_say() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    for (name, file) in [
        ("json", "json_field"),
        ("pii", "pii_redact"),
        ("router", "key_router"),
        ("validate", "json_validate"),
        ("scan", "byte_scan"),
    ] {
        t.upload(name.into(), String::new(), example(file).into(), 0)
            .await
            .unwrap();
    }
    // JSON field predicate with params.
    let s = session(&t, "json", r#"{"field":"amount","gt":100}"#)
        .await
        .unwrap();
    let (_, out) = run(
        &t,
        s,
        &[
            r#"{"amount":150}"#,
            r#"{"amount":50}"#,
            r#"{"id":"x","nested":{"amount":500},"amount":101.5}"#,
            "not json",
            r#"{"amount":"200"}"#,
        ],
    )
    .await;
    assert_eq!(out.unwrap(), Output::Keep(vec![0b00101]));
    let refused = session(&t, "json", r#"{"field":"amount"}"#)
        .await
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        "filter `json` v1 refused its params: params need one of gt, gte, lt, lte, eq"
    );
    // PII redaction.
    let s = session(&t, "pii", "").await.unwrap();
    let (_, out) = run(
        &t,
        s,
        &[
            "mail ann@example.com, card 4111 1111 1111 1111 now",
            "nothing here 12345",
        ],
    )
    .await;
    let Output::Actions(actions) = out.unwrap() else {
        panic!("a map returns actions")
    };
    assert_eq!(actions.len(), 2);
    let Action::Emit(0, first) = &actions[0] else {
        panic!("{actions:?}")
    };
    assert_eq!(
        first.value,
        Bytes::from_static(b"mail [email], card [card] now")
    );
    assert_eq!(
        first.headers,
        vec![Header {
            key: Bytes::from_static(b"redacted"),
            value: Some(Bytes::from_static(b"2"))
        }]
    );
    let Action::Emit(1, second) = &actions[1] else {
        panic!("{actions:?}")
    };
    assert_eq!(second.value, Bytes::from_static(b"nothing here 12345"));
    assert_eq!(second.key, Some(Bytes::from_static(b"k1")));
    // Key router: keys k0, k1, k2 -> routes.
    let s = session(
        &t,
        "router",
        r#"{"routes":{"k0":"zero","k1":"one"},"default":"other"}"#,
    )
    .await
    .unwrap();
    let (_, out) = run(&t, s, &["a", "b", "c"]).await;
    let Output::Actions(actions) = out.unwrap() else {
        panic!()
    };
    let topics: Vec<_> = actions
        .iter()
        .map(|a| match a {
            Action::Emit(_, e) => e.topic.clone().unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(topics, ["zero", "one", "other"]);
    // Validator: malformed JSON is a record error with the parser's message.
    let s = session(&t, "validate", "").await.unwrap();
    let (_, out) = run(&t, s, &[r#"{"ok":true}"#, "{broken", "[1,2]"]).await;
    let Output::Actions(actions) = out.unwrap() else {
        panic!()
    };
    assert!(
        matches!(&actions[..], [Action::Keep(0), Action::Error(1, m), Action::Keep(2)] if m.starts_with("malformed JSON: key must be a string")),
        "{actions:?}"
    );
    // Byte scan with the default needle.
    let s = session(&t, "scan", "").await.unwrap();
    let (_, out) = run(&t, s, &["an ERROR", "ok", "ERRO", "xERRORx"]).await;
    assert_eq!(out.unwrap(), Output::Keep(vec![0b1001]));
}

#[tokio::test]
async fn the_consume_path_keeps_source_offsets_and_reencodes_changed_batches() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path());
    t.upload(
        "even".into(),
        String::new(),
        wat::parse_file(repo().join("wasm-filters/examples/wat/keep-even.wat"))
            .unwrap()
            .into(),
        0,
    )
    .await
    .unwrap();
    t.upload("scan".into(), String::new(), example("byte_scan").into(), 0)
        .await
        .unwrap();
    // Two stored batches: offsets 10..15 and 15..18.
    let batch = |base: i64, values: &[&str]| {
        let mut b = BatchBuilder::new(1 << 20).with_base_offset(base);
        for v in values {
            assert!(b.try_append(5, None, Some(v.as_bytes()), &[]));
        }
        b.finish()
    };
    let mut fetched = Vec::new();
    fetched.extend_from_slice(&batch(10, &["a", "b", "c", "d", "e"]));
    let second = batch(15, &["ERROR 1", "ERROR 2", "ERROR 3"]);
    fetched.extend_from_slice(&second);
    let fetched = Bytes::from(fetched);
    let decode = |bytes: Bytes| -> Vec<(i64, String)> {
        ketch_protocol::batch::BatchSlices::new(bytes)
            .map(|s| RecordBatch::new(s.unwrap().1).unwrap())
            .flat_map(|b| b.decode_all().unwrap())
            .map(|r| {
                (
                    r.offset,
                    String::from_utf8(r.value.unwrap().to_vec()).unwrap(),
                )
            })
            .collect()
    };
    // From offset 11: the filter sees 11..18 and keeps the even offsets.
    let mut even = session(&t, "even", "").await.unwrap();
    let fetched2 = fetched.clone();
    let filtered = t
        .run(move || even.filter_fetched("t", 0, 11, fetched2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(filtered.next_offset, 18);
    assert_eq!(filtered.records_in, 7);
    assert_eq!(
        decode(filtered.records),
        vec![(12, "c".into()), (14, "e".into()), (16, "ERROR 2".into())]
    );
    // Everything of the second batch kept: it travels verbatim.
    let mut scan = session(&t, "scan", "").await.unwrap();
    let filtered = t
        .run(move || scan.filter_fetched("t", 0, 10, fetched))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        filtered.records, second,
        "an untouched batch is forwarded byte for byte"
    );
    assert_eq!(filtered.next_offset, 18);

    // Whole, changed, whole: the untouched ones verbatim around the re-encoded one, in order.
    let (x, z, w) = (
        batch(20, &["ERROR x", "ERROR y"]),
        batch(22, &["ERROR z", "no"]),
        batch(24, &["ERROR w"]),
    );
    let mixed = Bytes::from([&x[..], &z[..], &w[..]].concat());
    let mut scan = session(&t, "scan", "").await.unwrap();
    let (scan, filtered) = t
        .run(move || {
            let filtered = scan.filter_fetched("t", 0, 20, mixed);
            (scan, filtered)
        })
        .await
        .unwrap();
    let filtered = filtered.unwrap();
    assert_eq!(
        decode(filtered.records.clone()),
        vec![
            (20, "ERROR x".into()),
            (21, "ERROR y".into()),
            (22, "ERROR z".into()),
            (24, "ERROR w".into())
        ]
    );
    assert!(filtered.records.starts_with(&x) && filtered.records.ends_with(&w));
    assert_eq!((filtered.records_in, filtered.records_out), (5, 4));
    // Everything kept: the read itself goes out, not a copy of it.
    let all = Bytes::from([&x[..], &w[..]].concat());
    let read = all.clone();
    let mut scan = scan;
    let filtered = t
        .run(move || scan.filter_fetched("t", 0, 20, read))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(filtered.records, all);
    assert_eq!(
        filtered.records.as_ptr(),
        all.as_ptr(),
        "forwarded without a copy"
    );
    assert_eq!(filtered.next_offset, 25);
}

#[tokio::test]
async fn the_assemblyscript_example_filters_too() {
    let dir = std::env::var_os("KETCH_WASM_DIR")
        .map(PathBuf::from)
        .map(|d| d.join("../../as"))
        .unwrap_or_else(|| repo().join("target/wasm/as"));
    let path = dir.join("value_contains.wasm");
    let wasm = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build it: (cd wasm-filters/assemblyscript && npm install && npm run build)",
            path.display()
        )
    });
    let tmp = tempfile::tempdir().unwrap();
    let t = open(tmp.path());
    t.upload("as".into(), String::new(), wasm.into(), 0)
        .await
        .unwrap();
    let s = session(&t, "as", r#"{"needle":"WARN"}"#).await.unwrap();
    let (_, out) = run(&t, s, &["a WARN", "an ERROR", "WARNING", ""]).await;
    assert_eq!(out.unwrap(), Output::Keep(vec![0b0101]));
    let refused = session(&t, "as", r#"{"needle":""}"#).await.unwrap_err();
    assert_eq!(
        refused.to_string(),
        "filter `as` v1 refused its params: \"needle\" must not be empty"
    );
}
