//! Frames and message bodies from hostile bytes.
//!
//! Input: `limit u32 | chunk u8 | stream...`. The stream is pushed into a [`FrameDecoder`] with
//! that frame limit, `chunk` bytes at a time (0: all at once), and every frame it yields is
//! decoded as a request and as each response type. Checked, besides "never panics":
//! - the decoder yields exactly the frames (and the error) of a one-pass reference splitter,
//!   however the stream is chunked, and never a frame over the limit;
//! - a request that decodes re-encodes to the very same bytes (the request encoding has one
//!   form per value);
//! - a response that decodes survives encode → decode unchanged, and an error response with a
//!   known code re-encodes to the same bytes.

#![no_main]

use std::fmt::Debug;

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::error::DecodeError;
use ketch_protocol::frame::{
    FRAME_LENGTH_BYTES, FrameDecoder, decode_request, decode_response, encode_any_request,
    encode_error_response, encode_response,
};
use ketch_protocol::messages::*;
use ketch_protocol::wire::Wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((head, stream)) = data.split_first_chunk::<5>() else {
        return;
    };
    let limit = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let chunk = usize::from(head[4]);

    let (expected_frames, expected_error) = reference_split(stream, limit);
    let (frames, error) = split_with_decoder(stream, limit, chunk);
    assert_eq!(frames, expected_frames, "chunk {chunk}");
    assert_eq!(error, expected_error, "chunk {chunk}");

    for frame in frames {
        assert!(frame.len() <= limit);
        check_request(&frame);
        check_responses(&frame);
    }
});

/// Splits `stream` in one pass, the obvious way: the frames, and the error that stops it.
fn reference_split(stream: &[u8], limit: usize) -> (Vec<Bytes>, Option<DecodeError>) {
    let mut frames = Vec::new();
    let mut rest = stream;
    while let Some((prefix, body)) = rest.split_first_chunk::<FRAME_LENGTH_BYTES>() {
        let length = u32::from_be_bytes(*prefix) as usize;
        if length > limit {
            return (frames, Some(DecodeError::FrameTooLarge { length, limit }));
        }
        if body.len() < length {
            break;
        }
        frames.push(Bytes::copy_from_slice(&body[..length]));
        rest = &body[length..];
    }
    (frames, None)
}

fn split_with_decoder(
    stream: &[u8],
    limit: usize,
    chunk: usize,
) -> (Vec<Bytes>, Option<DecodeError>) {
    let mut decoder = FrameDecoder::new(limit);
    let mut frames = Vec::new();
    let chunk = if chunk == 0 {
        stream.len().max(1)
    } else {
        chunk
    };
    let mut consumed = 0;
    for piece in stream.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    consumed += FRAME_LENGTH_BYTES + frame.len();
                    frames.push(frame);
                }
                Ok(None) => break,
                // The decoder keeps refusing the same prefix: the stream is dead.
                Err(error) => {
                    assert_eq!(decoder.next_frame(), Err(error.clone()));
                    return (frames, Some(error));
                }
            }
        }
    }
    assert_eq!(decoder.buffered(), stream.len() - consumed);
    (frames, None)
}

fn with_prefix(frame: &Bytes) -> Vec<u8> {
    let mut bytes = (frame.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(frame);
    bytes
}

fn check_request(frame: &Bytes) {
    match decode_request(frame.clone()) {
        Ok(request) => {
            let encoded = encode_any_request(&request);
            assert_eq!(&encoded[..], &with_prefix(frame)[..], "{request:?}");
        }
        Err(error) => {
            // Every decode failure maps to a wire error code a broker can answer with.
            assert_ne!(error.code(), ErrorCode::None);
        }
    }
}

fn check_responses(frame: &Bytes) {
    macro_rules! each {
        ($($ty:ty),* $(,)?) => {$( check_response::<$ty>(frame); )*};
    }
    each!(
        MetadataResponse,
        CreateTopicResponse,
        DeleteTopicResponse,
        ListTopicsResponse,
        DescribeTopicResponse,
        ProduceResponse,
        FetchResponse,
        ListOffsetsResponse,
        FetchPartitionResponse,
        GroupHeartbeatResponse,
        GroupLeaveResponse,
        OffsetCommitResponse,
        OffsetFetchResponse,
        ListGroupsResponse,
        DescribeGroupResponse,
        InitProducerIdResponse,
        FilterUploadResponse,
        FilterListResponse,
        FilterDeleteResponse,
        ApiVersionsResponse,
    );
    // Fetched records are whole batches, possibly cut at the end: split them too.
    if let Ok(Ok(response)) = decode_response::<FetchPartitionResponse>(frame.clone()) {
        let (batches, _rest) = ketch_protocol::batch::split_batches(response.records);
        for batch in batches.into_iter().flatten() {
            let _ = batch.decode_all();
        }
    }
}

fn check_response<T: Wire + PartialEq + Debug>(frame: &Bytes) {
    match decode_response::<T>(frame.clone()) {
        Ok(Ok(response)) => {
            // Error codes inside bodies from a newer peer decode as `Unknown`, so the bytes may
            // differ; the value must not.
            let encoded = encode_response(&response);
            let again = decode_response::<T>(encoded.slice(FRAME_LENGTH_BYTES..));
            assert_eq!(again, Ok(Ok(response)));
        }
        Ok(Err(error)) => {
            assert_ne!(error.raw_code, 0);
            match ErrorCode::from_u16(error.raw_code) {
                Some(code) => {
                    assert_eq!(error.code, code);
                    let encoded = encode_error_response(code, &error.message);
                    assert_eq!(&encoded[..], &with_prefix(frame)[..]);
                }
                None => assert_eq!(error.code, ErrorCode::Unknown),
            }
        }
        Err(error) => assert_ne!(error.code(), ErrorCode::None),
    }
}
