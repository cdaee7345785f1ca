//! Frames: the envelope of every request and response.
//!
//! ```text
//! request frame:  length u32 | api_key u16 | api_version u16 | body
//! response frame: length u32 | error_code u16 | body
//! ```
//!
//! `length` counts the bytes after itself. A response whose error code is not `0` carries a
//! UTF-8 message (`u16` length + bytes) as its body instead of the API's response. One request
//! travels per QUIC stream; a `Subscribe` stream carries many response frames.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, ErrorCode};
use crate::messages::{Api, Request};
use crate::wire::{Chunked, Reader, Wire};

/// Bytes of the length prefix.
pub const FRAME_LENGTH_BYTES: usize = 4;
/// Bytes of a request header after the length: api key and version.
pub const REQUEST_HEADER_BYTES: usize = 4;
/// Bytes of a response header after the length: the error code.
pub const RESPONSE_HEADER_BYTES: usize = 2;
/// Default largest frame (after the length prefix) a peer accepts: what a client accepts as
/// a response (a fetch may carry many partitions' batches).
pub const FRAME_BYTES_MAX_DEFAULT: usize = 64 * 1024 * 1024;
/// Default largest request frame a broker accepts (its `frame_bytes_max`): a produce request
/// carries a few batches, so it is smaller, and a broker reserves memory for it.
pub const REQUEST_FRAME_BYTES_MAX_DEFAULT: usize = 8 * 1024 * 1024;

const _: () = assert!(FRAME_BYTES_MAX_DEFAULT > crate::batch::BATCH_BYTES_MAX + 64 * 1024);
const _: () = assert!(REQUEST_FRAME_BYTES_MAX_DEFAULT <= FRAME_BYTES_MAX_DEFAULT);

/// Reads a frame's length prefix and checks it against `frame_bytes_max` before anything
/// of the frame is read into memory.
pub fn frame_length(
    prefix: [u8; FRAME_LENGTH_BYTES],
    frame_bytes_max: usize,
) -> Result<usize, DecodeError> {
    let length = u32::from_be_bytes(prefix) as usize;
    if length > frame_bytes_max {
        return Err(DecodeError::FrameTooLarge {
            length,
            limit: frame_bytes_max,
        });
    }
    Ok(length)
}

/// The fixed part of a request frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub api_key: u16,
    pub api_version: u16,
}

/// Encodes a complete request frame (length prefix included) at the newest version this
/// build speaks.
pub fn encode_request<R: Api>(request: &R) -> Bytes {
    encode_request_at(request, R::VERSION)
}

/// Encodes a complete request frame at `version` (one both sides speak: see
/// [`crate::messages::negotiate_version`]).
pub fn encode_request_at<R: Api>(request: &R, version: u16) -> Bytes {
    debug_assert!((R::MIN_VERSION..=R::VERSION).contains(&version));
    encode_frame(|buf| {
        buf.put_u16(R::KEY as u16);
        buf.put_u16(version);
        request.encode_at(buf, version);
    })
}

/// A request frame as chunks (see [`Chunked`]): record batches are not copied into it.
/// Written one after the other they are the bytes of [`encode_request`].
pub fn encode_request_chunks<R: Api>(request: &R) -> Vec<Bytes> {
    encode_request_chunks_at(request, R::VERSION)
}

/// [`encode_request_chunks`] at `version`.
pub fn encode_request_chunks_at<R: Api>(request: &R, version: u16) -> Vec<Bytes> {
    debug_assert!((R::MIN_VERSION..=R::VERSION).contains(&version));
    encode_frame_chunks(|out| {
        out.buf().put_u16(R::KEY as u16);
        out.buf().put_u16(version);
        request.encode_chunked_at(out, version);
    })
}

/// Encodes a complete request frame for a dynamically typed request, at the newest version
/// of its API.
pub fn encode_any_request(request: &Request) -> Bytes {
    let version = request.api_key().versions().1;
    encode_frame(|buf| {
        buf.put_u16(request.api_key() as u16);
        buf.put_u16(version);
        request.encode_body_at(buf, version);
    })
}

/// Splits a request frame (without its length prefix) into header and body.
pub fn split_request(mut frame: Bytes) -> Result<(RequestHeader, Bytes), DecodeError> {
    if frame.len() < REQUEST_HEADER_BYTES {
        return Err(DecodeError::FrameTooShort(frame.len()));
    }
    let header = RequestHeader {
        api_key: frame.get_u16(),
        api_version: frame.get_u16(),
    };
    Ok((header, frame))
}

/// Decodes a request frame (without its length prefix).
pub fn decode_request(frame: Bytes) -> Result<Request, DecodeError> {
    decode_request_versioned(frame).map(|(request, _)| request)
}

/// Decodes a request frame (without its length prefix) and says which version it is: the
/// response goes back in that version's layout.
pub fn decode_request_versioned(frame: Bytes) -> Result<(Request, u16), DecodeError> {
    let (header, body) = split_request(frame)?;
    let request = Request::decode(header.api_key, header.api_version, body)?;
    Ok((request, header.api_version))
}

/// Encodes a successful response frame in the newest layout.
pub fn encode_response<T: Wire>(response: &T) -> Bytes {
    encode_response_at(response, crate::wire::VERSION_LATEST)
}

/// Encodes a successful response frame in the layout of `version` (the request's).
pub fn encode_response_at<T: Wire>(response: &T, version: u16) -> Bytes {
    encode_frame(|buf| {
        buf.put_u16(ErrorCode::None.as_u16());
        response.encode_at(buf, version);
    })
}

/// A response frame as chunks (see [`Chunked`]): fetched records are not copied into it.
/// Written one after the other they are the bytes of [`encode_response`].
pub fn encode_response_chunks<T: Wire>(response: &T) -> Vec<Bytes> {
    encode_response_chunks_at(response, crate::wire::VERSION_LATEST)
}

/// [`encode_response_chunks`] in the layout of `version` (the request's).
pub fn encode_response_chunks_at<T: Wire>(response: &T, version: u16) -> Vec<Bytes> {
    encode_frame_chunks(|out| {
        out.buf().put_u16(ErrorCode::None.as_u16());
        response.encode_chunked_at(out, version);
    })
}

/// Encodes a failed response frame: an error code and a human-readable message.
pub fn encode_error_response(code: ErrorCode, message: &str) -> Bytes {
    debug_assert_ne!(code, ErrorCode::None);
    encode_frame(|buf| {
        buf.put_u16(code.as_u16());
        message.to_owned().encode(buf);
    })
}

/// A request-level failure reported by the peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorResponse {
    pub code: ErrorCode,
    /// The raw number, which may be newer than this build's [`ErrorCode`].
    pub raw_code: u16,
    pub message: String,
}

/// Decodes a response frame (without its length prefix) in the newest layout.
pub fn decode_response<T: Wire>(frame: Bytes) -> Result<Result<T, ErrorResponse>, DecodeError> {
    decode_response_at(frame, crate::wire::VERSION_LATEST)
}

/// Decodes a response frame (without its length prefix) in the layout of `version` (the
/// version its request was sent at).
pub fn decode_response_at<T: Wire>(
    frame: Bytes,
    version: u16,
) -> Result<Result<T, ErrorResponse>, DecodeError> {
    let mut reader = Reader::new(frame);
    let raw_code = reader.u16("response error code")?;
    if raw_code == 0 {
        let response = T::decode_at(&mut reader, version)?;
        reader.finish()?;
        return Ok(Ok(response));
    }
    let message = String::decode(&mut reader)?;
    reader.finish()?;
    let code = ErrorCode::from_u16(raw_code).unwrap_or(ErrorCode::Unknown);
    Ok(Err(ErrorResponse {
        code,
        raw_code,
        message,
    }))
}

fn encode_frame(body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut buf = BytesMut::with_capacity(64);
    buf.put_u32(0);
    body(&mut buf);
    let length = buf.len() - FRAME_LENGTH_BYTES;
    assert!(length <= u32::MAX as usize, "frame over 4 GiB");
    buf[..FRAME_LENGTH_BYTES].copy_from_slice(&(length as u32).to_be_bytes());
    buf.freeze()
}

/// A frame (its length prefix, then what `body` writes) as chunks: byte strings `body` puts
/// with [`Chunked::put_shared`] are not copied into it.
pub fn encode_frame_chunks(body: impl FnOnce(&mut Chunked)) -> Vec<Bytes> {
    let mut out = Chunked::new();
    out.buf().reserve(64);
    out.buf().put_u32(0);
    body(&mut out);
    let length = out.len() - FRAME_LENGTH_BYTES;
    assert!(length <= u32::MAX as usize, "frame over 4 GiB");
    out.first_mut(FRAME_LENGTH_BYTES)
        .copy_from_slice(&(length as u32).to_be_bytes());
    out.into_chunks()
}

/// Incremental, sans-IO frame splitter for byte streams: push bytes as they arrive, pop whole
/// frames. Refuses a frame whose declared length exceeds the limit before buffering it.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    frame_bytes_max: usize,
}

impl FrameDecoder {
    pub fn new(frame_bytes_max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: BytesMut::new(),
            frame_bytes_max,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame (without its length prefix), if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, DecodeError> {
        if self.buf.len() < FRAME_LENGTH_BYTES {
            return Ok(None);
        }
        let prefix: [u8; FRAME_LENGTH_BYTES] =
            self.buf[..FRAME_LENGTH_BYTES].try_into().expect("4 bytes");
        let length = frame_length(prefix, self.frame_bytes_max)?;
        if self.buf.len() < FRAME_LENGTH_BYTES + length {
            return Ok(None);
        }
        self.buf.advance(FRAME_LENGTH_BYTES);
        Ok(Some(self.buf.split_to(length).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;
    use proptest::prelude::*;

    fn body(frame: &Bytes) -> Bytes {
        frame.slice(FRAME_LENGTH_BYTES..)
    }

    #[test]
    fn request_frame_layout() {
        let frame = encode_request(&DeleteTopicRequest { name: "ab".into() });
        // length 8 | key 2 | version 0 | string "ab"
        assert_eq!(&frame[..], &[0, 0, 0, 8, 0, 2, 0, 0, 0, 2, b'a', b'b']);
        assert_eq!(
            decode_request(body(&frame)),
            Ok(Request::DeleteTopic(DeleteTopicRequest {
                name: "ab".into()
            }))
        );
    }

    #[test]
    fn response_frames() {
        let ok = encode_response(&InitProducerIdResponse {
            producer_id: 7,
            producer_epoch: 1,
        });
        assert_eq!(
            decode_response::<InitProducerIdResponse>(body(&ok)),
            Ok(Ok(InitProducerIdResponse {
                producer_id: 7,
                producer_epoch: 1
            }))
        );
        let err = encode_error_response(ErrorCode::UnknownTopic, "no topic \"x\"");
        assert_eq!(&err[..8], &[0, 0, 0, 16, 0, 6, 0, 12]);
        let decoded = decode_response::<InitProducerIdResponse>(body(&err))
            .unwrap()
            .unwrap_err();
        assert_eq!(decoded.code, ErrorCode::UnknownTopic);
        assert_eq!(decoded.message, "no topic \"x\"");
        // An error code from a newer broker is preserved as a number.
        let newer = Bytes::from_static(&[0x03, 0xe7, 0, 0]);
        let decoded = decode_response::<InitProducerIdResponse>(newer)
            .unwrap()
            .unwrap_err();
        assert_eq!((decoded.code, decoded.raw_code), (ErrorCode::Unknown, 999));
    }

    /// A request of many small batches is a few chunks, whatever the batch count: each
    /// chunk becomes a segment of the QUIC stream's send buffer, which quinn scans per
    /// packet. Large batches stay chunks of their own (not copied).
    #[test]
    fn small_batches_are_copied_into_few_chunks_and_large_ones_are_shared() {
        let small = Bytes::from(vec![7u8; 1100]);
        let large = Bytes::from(vec![9u8; crate::wire::SHARED_CHUNK_BYTES_MIN]);
        let request = |records: &Bytes, partitions: u32| ProduceRequest {
            acks: Acks::Leader,
            timeout_ms: 1000,
            topics: vec![ProduceTopic {
                name: "t".into(),
                partitions: (0..partitions)
                    .map(|partition| ProducePartition {
                        partition,
                        records: records.clone(),
                    })
                    .collect(),
            }],
        };
        let many_small = encode_request_chunks(&request(&small, 5000));
        assert_eq!(many_small.len(), 1);
        let large_ones = encode_request_chunks(&request(&large, 4));
        let shared = large_ones
            .iter()
            .filter(|chunk| chunk.as_ptr() == large.as_ptr())
            .count();
        assert_eq!(shared, 4, "each large batch is the caller's own bytes");
        // Either way, the same bytes as the contiguous encoding.
        for (chunks, contiguous) in [
            (many_small, encode_request(&request(&small, 5000))),
            (large_ones, encode_request(&request(&large, 4))),
        ] {
            assert_eq!(chunks.concat(), contiguous.to_vec());
        }
    }

    #[test]
    fn oversized_frame_is_refused_from_its_prefix() {
        let mut decoder = FrameDecoder::new(1024);
        decoder.push(&[0, 0, 4, 1]);
        assert_eq!(
            decoder.next_frame(),
            Err(DecodeError::FrameTooLarge {
                length: 1025,
                limit: 1024
            })
        );
        assert_eq!(frame_length([0, 0, 4, 0], 1024), Ok(1024));
    }

    #[test]
    fn short_frames() {
        assert_eq!(
            decode_request(Bytes::from_static(&[0, 1, 0])),
            Err(DecodeError::FrameTooShort(3))
        );
        assert!(decode_response::<ApiVersionsResponse>(Bytes::new()).is_err());
    }

    proptest! {
        #[test]
        fn decoder_reassembles_frames_split_anywhere(
            names in proptest::collection::vec("[a-z]{0,20}", 1..8),
            chunk in 1usize..17,
        ) {
            let mut stream = Vec::new();
            for name in &names {
                stream.extend_from_slice(&encode_request(&DescribeTopicRequest { name: name.clone() }));
            }
            let mut decoder = FrameDecoder::new(FRAME_BYTES_MAX_DEFAULT);
            let mut decoded = Vec::new();
            for piece in stream.chunks(chunk) {
                decoder.push(piece);
                while let Some(frame) = decoder.next_frame().unwrap() {
                    decoded.push(decode_request(frame).unwrap());
                }
            }
            let expected: Vec<_> = names
                .into_iter()
                .map(|name| Request::DescribeTopic(DescribeTopicRequest { name }))
                .collect();
            prop_assert_eq!(decoded, expected);
            prop_assert_eq!(decoder.buffered(), 0);
        }

        #[test]
        fn arbitrary_streams_never_panic(bytes: Vec<u8>, limit in 0usize..4096) {
            let mut decoder = FrameDecoder::new(limit);
            decoder.push(&bytes);
            while let Ok(Some(frame)) = decoder.next_frame() {
                let _ = decode_request(frame.clone());
                let _ = decode_response::<MetadataResponse>(frame);
            }
        }
    }
}
