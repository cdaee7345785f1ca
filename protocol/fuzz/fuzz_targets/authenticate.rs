//! The authentication messages from hostile bytes: what a client that has not authenticated
//! yet can make a broker decode.
//!
//! Input: `version u16 | body...`. The body is decoded as an `Authenticate` request (the
//! frame a stranger sends first), at that version, and as the other security requests
//! (token create and revoke: the first an admin sends with a fresh token). Checked, besides
//! "never panics" and "never allocates more than the input justifies":
//! - a request that decodes re-encodes to the very same bytes;
//! - a version the API does not speak is refused as `unsupported_version`, whatever the body;
//! - every failure maps to a wire error code a broker can answer with;
//! - the response (principal) decodes and survives encode → decode unchanged.

#![no_main]

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::frame::{decode_request, encode_any_request};
use ketch_protocol::messages::*;
use ketch_protocol::wire::Wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((version, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let version = u16::from_be_bytes(*version);
    for key in [ApiKey::Authenticate, ApiKey::TokenCreate, ApiKey::TokenRevoke] {
        check_request(key, version, body);
    }
    if let Ok(response) = AuthenticateResponse::from_bytes_at(Bytes::copy_from_slice(body), 0) {
        let again = AuthenticateResponse::from_bytes_at(response.to_bytes_at(0), 0);
        assert_eq!(again, Ok(response));
    }
});

/// Decodes `api_key | version | body` as a request frame body.
fn check_request(key: ApiKey, version: u16, body: &[u8]) {
    let mut frame = (key as u16).to_be_bytes().to_vec();
    frame.extend(version.to_be_bytes());
    frame.extend_from_slice(body);
    let (min, max) = key.versions();
    match decode_request(Bytes::from(frame.clone())) {
        Ok(request) => {
            assert!((min..=max).contains(&version), "{key:?} v{version} decoded");
            assert_eq!(request.api_key(), key);
            let encoded = encode_any_request(&request);
            // The encoding carries the length prefix; the rest is the frame itself.
            assert_eq!(&encoded[4..], &frame[..], "{request:?}");
        }
        Err(error) => {
            assert_ne!(error.code(), ErrorCode::None);
            if !(min..=max).contains(&version) {
                assert_eq!(error.code(), ErrorCode::UnsupportedVersion, "{error:?}");
            }
        }
    }
}
