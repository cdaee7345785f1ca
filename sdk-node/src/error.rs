//! Core errors as napi errors: the encoded message (`encode.rs`) with the `source()` chain as
//! napi `cause`s, which the facade keeps as the `KetchError`'s `cause`.

use ketch_client::Error;

use crate::encode::encode;

/// The napi error for a core error, with its `source()` chain as `cause`s.
pub(crate) fn to_napi(error: Error) -> napi::Error {
    let mut napi_error = napi::Error::from_reason(encode(&error));
    let mut causes = Vec::new();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        causes.push(cause.to_string());
        source = cause.source();
    }
    let mut chain: Option<napi::Error> = None;
    for message in causes.into_iter().rev() {
        let mut link = napi::Error::from_reason(message);
        if let Some(inner) = chain.take() {
            link.set_cause(inner);
        }
        chain = Some(link);
    }
    if let Some(cause) = chain {
        napi_error.set_cause(cause);
    }
    napi_error
}

/// An error for bad input the binding itself detects (before the core sees it).
pub(crate) fn invalid_argument(message: impl Into<String>) -> napi::Error {
    to_napi(Error::Config(message.into()))
}
