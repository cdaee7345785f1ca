//! Committed offsets as records of the internal `__consumer_offsets` partition.
//!
//! A commit is durable once its record is in that partition's log; the coordinator's map is a
//! cache rebuilt by replaying the log. Byte layout (big-endian, strings are a `u16` length
//! then UTF-8, as everywhere in `ketch-protocol`):
//!
//! ```text
//! key   = key_version:u16 (0) | group:string | topic:string | partition:u32
//! value = value_version:u16 (1) | offset:i64 | metadata:string | commit_timestamp_ms:i64
//!         | topic_id:u64
//! ```
//!
//! `topic_id` is the incarnation of the topic the offset was committed for: a topic deleted
//! and created again under the same name has a new id, and offsets of the old one do not
//! apply to it. Version 0 values (no `topic_id`, written before topics had ids) read as
//! topic id 0, "unknown".
//!
//! A record with a null value is a tombstone: the group's offset for that partition is deleted.
//! The key version doubles as the record type, Kafka's way: other record kinds (group
//! metadata, say) will take new key versions, which this build reports as
//! [`OffsetRecordError::UnsupportedKeyVersion`] so a reader can skip them. Within a key, the
//! latest record wins, so the partition can be compacted by key.

use bytes::{BufMut, Bytes, BytesMut};
use ketch_protocol::DecodeError;
use ketch_protocol::wire::{Reader, Wire};

use super::config::group_id_problem;

/// The internal topic (one partition) that holds committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";

/// One group's committed offset of one partition, or its deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetRecord {
    pub group: String,
    pub topic: String,
    pub partition: u32,
    /// `None` is a tombstone.
    pub value: Option<OffsetValue>,
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetValue {
    /// The next offset to consume (Kafka's convention). Never negative.
    pub offset: i64,
    pub metadata: String,
    /// When the coordinator accepted the commit.
    pub commit_timestamp_ms: i64,
    /// The incarnation of the topic it was committed for; 0 when unknown (a version 0
    /// record, written before topics had ids).
    pub topic_id: u64,
}

/// Why a record of the offsets partition could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OffsetRecordError {
    #[error("offset record {part} is malformed: {source}")]
    Malformed {
        part: &'static str,
        source: DecodeError,
    },
    #[error("offset record key version {0} is not supported")]
    UnsupportedKeyVersion(u16),
    #[error("offset record value version {0} is not supported")]
    UnsupportedValueVersion(u16),
    #[error("offset record has an invalid group id: {0}")]
    InvalidGroupId(&'static str),
    #[error("offset record has an empty topic name")]
    EmptyTopic,
    #[error("offset record has a negative offset {0}")]
    NegativeOffset(i64),
}

impl OffsetRecord {
    pub const KEY_VERSION: u16 = 0;
    pub const VALUE_VERSION: u16 = 1;

    pub fn encode_key(&self) -> Bytes {
        self.assert_valid();
        let mut buf = BytesMut::with_capacity(2 + 2 + self.group.len() + 2 + self.topic.len() + 4);
        buf.put_u16(Self::KEY_VERSION);
        self.group.encode(&mut buf);
        self.topic.encode(&mut buf);
        buf.put_u32(self.partition);
        buf.freeze()
    }

    /// `None` for a tombstone.
    pub fn encode_value(&self) -> Option<Bytes> {
        self.assert_valid();
        let value = self.value.as_ref()?;
        let mut buf = BytesMut::with_capacity(2 + 8 + 2 + value.metadata.len() + 8 + 8);
        buf.put_u16(Self::VALUE_VERSION);
        buf.put_i64(value.offset);
        value.metadata.encode(&mut buf);
        buf.put_i64(value.commit_timestamp_ms);
        buf.put_u64(value.topic_id);
        Some(buf.freeze())
    }

    /// Reads a record back; `value` is `None` for a tombstone. Never panics on any input.
    pub fn decode(key: &[u8], value: Option<&[u8]>) -> Result<OffsetRecord, OffsetRecordError> {
        let malformed = |part| move |source| OffsetRecordError::Malformed { part, source };
        let mut reader = Reader::new(Bytes::copy_from_slice(key));
        let version = reader.u16("key version").map_err(malformed("key"))?;
        if version != Self::KEY_VERSION {
            return Err(OffsetRecordError::UnsupportedKeyVersion(version));
        }
        let group = String::decode(&mut reader).map_err(malformed("key"))?;
        let topic = String::decode(&mut reader).map_err(malformed("key"))?;
        let partition = reader.u32("partition").map_err(malformed("key"))?;
        reader.finish().map_err(malformed("key"))?;
        if let Some(reason) = group_id_problem(&group) {
            return Err(OffsetRecordError::InvalidGroupId(reason));
        }
        if topic.is_empty() {
            return Err(OffsetRecordError::EmptyTopic);
        }
        let value = match value {
            None => None,
            Some(value) => {
                let mut reader = Reader::new(Bytes::copy_from_slice(value));
                let version = reader.u16("value version").map_err(malformed("value"))?;
                if version > Self::VALUE_VERSION {
                    return Err(OffsetRecordError::UnsupportedValueVersion(version));
                }
                let offset = i64::decode(&mut reader).map_err(malformed("value"))?;
                let metadata = String::decode(&mut reader).map_err(malformed("value"))?;
                let commit_timestamp_ms = i64::decode(&mut reader).map_err(malformed("value"))?;
                let topic_id = if version >= 1 {
                    reader.u64("topic id").map_err(malformed("value"))?
                } else {
                    0
                };
                reader.finish().map_err(malformed("value"))?;
                if offset < 0 {
                    return Err(OffsetRecordError::NegativeOffset(offset));
                }
                Some(OffsetValue {
                    offset,
                    metadata,
                    commit_timestamp_ms,
                    topic_id,
                })
            }
        };
        Ok(OffsetRecord {
            group,
            topic,
            partition,
            value,
        })
    }

    /// The coordinator only builds valid records; an invalid one here is a bug that would
    /// write a record no reader accepts (or, truncated by the string codec, the wrong key).
    fn assert_valid(&self) {
        assert_eq!(
            group_id_problem(&self.group),
            None,
            "offset record group {:?}",
            self.group
        );
        assert!(!self.topic.is_empty() && self.topic.len() <= usize::from(u16::MAX));
        if let Some(value) = &self.value {
            assert!(value.offset >= 0, "offset record offset {}", value.offset);
            assert!(value.metadata.len() <= usize::from(u16::MAX));
        }
    }
}
