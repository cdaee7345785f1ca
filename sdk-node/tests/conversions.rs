//! The binding's napi-free parts, tested outside Node: the packed record layouts and the
//! error encoding (their `#[cfg(test)]` modules). Everything else is tested through Node
//! (`npm test`).

#[path = "../src/convert.rs"]
#[allow(dead_code)]
mod convert;
#[path = "../src/encode.rs"]
#[allow(dead_code)]
mod encode;
