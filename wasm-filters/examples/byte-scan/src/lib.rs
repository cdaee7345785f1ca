//! Keeps records whose value contains a byte string (params `{"needle":"ERROR"}`; the
//! default needle is `ERROR`). The benchmark's filter: one pass over each value.

use std::cell::RefCell;

use ketch_filter::Record;

thread_local! {
    static NEEDLE: RefCell<Vec<u8>> = RefCell::new(b"ERROR".to_vec());
}

#[ketch_filter::init]
fn init(params: &str) -> Result<(), String> {
    // A tiny reader for `{"needle":"..."}` keeps this module free of a JSON dependency.
    let Some(at) = params.find("\"needle\"") else {
        return Ok(());
    };
    let rest = params[at + 8..]
        .trim_start()
        .strip_prefix(':')
        .ok_or("expected ':' after \"needle\"")?;
    let rest = rest
        .trim_start()
        .strip_prefix('"')
        .ok_or("\"needle\" must be a string")?;
    let end = rest.find('"').ok_or("unterminated \"needle\"")?;
    if end == 0 {
        return Err("\"needle\" must not be empty".into());
    }
    NEEDLE.with(|n| *n.borrow_mut() = rest[..end].as_bytes().to_vec());
    Ok(())
}

#[ketch_filter::filter]
fn keep(record: &Record) -> bool {
    NEEDLE.with(|needle| contains(record.value(), &needle.borrow()))
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        match haystack[i..=haystack.len() - needle.len()]
            .iter()
            .position(|&b| b == first)
        {
            Some(p) => {
                let at = i + p;
                if &haystack[at + 1..at + needle.len()] == rest {
                    return true;
                }
                i = at + 1;
            }
            None => return false,
        }
    }
    false
}
