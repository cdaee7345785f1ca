//! Keeps `PROTOCOL.md` true: its worked examples are exactly what the encoder writes (and decode
//! back to the values they describe), and its API key and error code tables list exactly the
//! keys and codes of this build. The field tables are checked by
//! `python3 protocol/tools/gen_protocol_tables.py --check`.

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BatchBuilder, RecordBatch};
use ketch_protocol::frame::{
    FRAME_LENGTH_BYTES, decode_request, decode_response, decode_response_at, encode_error_response,
    encode_request, encode_response_at,
};
use ketch_protocol::messages::{
    Acks, ApiKey, ProducePartition, ProducePartitionResponse, ProduceRequest, ProduceResponse,
    ProduceTopic, ProduceTopicResponse, Request,
};

const PROTOCOL_MD: &str = include_str!("../PROTOCOL.md");

/// The bytes of the annotated dump that follows `<!-- example: NAME -->`: every line of the
/// code block that starts with a hex byte contributes the hex bytes before its description
/// (separated from them by two spaces); other lines are commentary.
fn example_bytes(name: &str) -> Vec<u8> {
    let marker = format!("<!-- example: {name} -->");
    let start = PROTOCOL_MD
        .find(&marker)
        .unwrap_or_else(|| panic!("PROTOCOL.md has no {marker}"));
    let mut lines = PROTOCOL_MD[start + marker.len()..].lines().skip(1);
    assert_eq!(lines.next(), Some("```text"), "{name}: code block expected");
    let mut bytes = Vec::new();
    for line in lines.take_while(|line| *line != "```") {
        let hex = line.split("  ").next().unwrap_or_default();
        let is_data = hex.len() >= 2 && hex.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit);
        if !is_data {
            continue;
        }
        for token in hex.split(' ') {
            assert_eq!(token.len(), 2, "{name}: {line:?}");
            bytes.push(u8::from_str_radix(token, 16).unwrap_or_else(|_| panic!("{line:?}")));
        }
    }
    bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x} ")).collect()
}

fn check(name: &str, encoded: &Bytes) {
    assert_eq!(
        hex(&example_bytes(name)),
        hex(encoded),
        "PROTOCOL.md example {name} differs from the encoder's output"
    );
}

fn produce_request() -> ProduceRequest {
    let mut builder = BatchBuilder::new(1024);
    assert!(builder.try_append(1_700_000_000_000, Some(b"k1"), Some(b"hello"), &[]));
    ProduceRequest {
        acks: Acks::All,
        timeout_ms: 5000,
        topics: vec![ProduceTopic {
            name: "orders".into(),
            partitions: vec![ProducePartition {
                partition: 0,
                records: builder.finish(),
            }],
        }],
    }
}

#[test]
fn produce_request_example() {
    let request = produce_request();
    let frame = encode_request(&request);
    check("produce-request", &frame);

    let decoded = decode_request(frame.slice(FRAME_LENGTH_BYTES..)).unwrap();
    assert_eq!(decoded, Request::Produce(request.clone()));
    let batch = RecordBatch::new(request.topics[0].partitions[0].records.clone()).unwrap();
    assert_eq!(batch.header().crc, 0x5028_da91);
    let records = batch.decode_all().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].timestamp, 1_700_000_000_000);
    assert_eq!(records[0].key.as_deref(), Some(&b"k1"[..]));
    assert_eq!(records[0].value.as_deref(), Some(&b"hello"[..]));
}

#[test]
fn produce_response_example() {
    let response = ProduceResponse {
        topics: vec![ProduceTopicResponse {
            name: "orders".into(),
            partitions: vec![ProducePartitionResponse {
                partition: 0,
                error: ErrorCode::None,
                error_message: None,
                base_offset: 42,
                log_append_time_ms: -1,
                log_start_offset: 0,
                current_leader: None,
            }],
        }],
        throttle_time_ms: 0,
    };
    let frame = encode_response_at(&response, 2);
    check("produce-response", &frame);
    assert_eq!(
        decode_response_at::<ProduceResponse>(frame.slice(FRAME_LENGTH_BYTES..), 2),
        Ok(Ok(response))
    );
}

#[test]
fn error_response_example() {
    let frame = encode_error_response(ErrorCode::UnknownTopic, "unknown topic \"orders\"");
    check("error-response", &frame);
    let error = decode_response::<ProduceResponse>(frame.slice(FRAME_LENGTH_BYTES..))
        .unwrap()
        .unwrap_err();
    assert_eq!((error.code, error.raw_code), (ErrorCode::UnknownTopic, 6));
    assert_eq!(error.message, "unknown topic \"orders\"");
}

/// The rows of the generated table between `<!-- generated:begin NAME -->` and its end, split
/// into trimmed cells, header and separator rows dropped.
fn table_rows(name: &str) -> Vec<Vec<String>> {
    let begin = format!("<!-- generated:begin {name} -->");
    let end = format!("<!-- generated:end {name} -->");
    let start = PROTOCOL_MD.find(&begin).expect("begin marker") + begin.len();
    let stop = PROTOCOL_MD.find(&end).expect("end marker");
    PROTOCOL_MD[start..stop]
        .lines()
        .filter(|line| line.starts_with('|'))
        .skip(2)
        .map(|line| {
            line.trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().to_owned())
                .collect()
        })
        .collect()
}

#[test]
fn error_code_table_matches_the_enum() {
    let rows = table_rows("error-codes");
    let documented: Vec<(String, String, String)> = rows
        .iter()
        .map(|row| (row[0].clone(), row[1].clone(), row[3].clone()))
        .collect();
    let actual: Vec<(String, String, String)> = ErrorCode::ALL
        .iter()
        .map(|code| {
            (
                code.as_u16().to_string(),
                format!("`{}`", code.name()),
                if code.is_retriable() { "yes" } else { "no" }.to_owned(),
            )
        })
        .collect();
    assert_eq!(
        documented, actual,
        "run python3 protocol/tools/gen_protocol_tables.py"
    );
}

#[test]
fn api_key_table_matches_the_enum() {
    let documented: Vec<(String, String)> = table_rows("api-keys")
        .iter()
        .map(|row| (row[0].clone(), row[1].clone()))
        .collect();
    let actual: Vec<(String, String)> = ApiKey::ALL
        .iter()
        .map(|key| ((*key as u16).to_string(), key.name().to_owned()))
        .collect();
    assert_eq!(
        documented, actual,
        "run python3 protocol/tools/gen_protocol_tables.py"
    );
}
