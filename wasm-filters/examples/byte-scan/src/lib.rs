//! Keeps records whose value contains a byte string (params `{"needle":"ERROR"}`; the
//! default needle is `ERROR`). The benchmark's filter: one pass over each value, 16 bytes at
//! a time with Wasm SIMD (`simd128`, which the broker's engine enables) looking for the
//! needle's first byte.

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
    #[cfg(target_arch = "wasm32")]
    {
        // Safe on Wasm: an engine without SIMD refuses the whole module at load.
        contains_simd(haystack, needle)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        contains_scalar(haystack, needle)
    }
}

/// Candidates for the needle's start, 16 at a time: the positions of its first byte from a
/// vector compare; each is checked against the rest of the needle. The last few candidates
/// (fewer than 16) go to the scalar search.
#[cfg(target_arch = "wasm32")]
#[target_feature(enable = "simd128")]
fn contains_simd(haystack: &[u8], needle: &[u8]) -> bool {
    use core::arch::wasm32::{i8x16_bitmask, u8x16_eq, u8x16_splat, v128, v128_load};
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    if haystack.len() < needle.len() {
        return false;
    }
    let candidates = haystack.len() - needle.len() + 1;
    let splat = u8x16_splat(first);
    let mut i = 0;
    while i + 16 <= candidates {
        // SAFETY: i + 16 <= candidates <= haystack.len(); v128.load takes unaligned addresses.
        let block = unsafe { v128_load(haystack.as_ptr().add(i).cast::<v128>()) };
        let mut mask = i8x16_bitmask(u8x16_eq(block, splat)) as u32;
        while mask != 0 {
            let at = i + mask.trailing_zeros() as usize;
            if &haystack[at + 1..at + needle.len()] == rest {
                return true;
            }
            mask &= mask - 1;
        }
        i += 16;
    }
    contains_scalar(&haystack[i..], needle)
}

#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
fn contains_scalar(haystack: &[u8], needle: &[u8]) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_needle_anywhere() {
        let cases: &[(&[u8], &[u8], bool)] = &[
            (b"", b"ERROR", false),
            (b"ERROR", b"ERROR", true),
            (b"ERRO", b"ERROR", false),
            (b"xxERRORxx", b"ERROR", true),
            (b"EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEERRO", b"ERROR", false),
            (b"EEEEEEEEEEEEEEEEEEEEEEEEEEEEEEERROR", b"ERROR", true),
            (b"abc", b"", true),
        ];
        for (haystack, needle, expected) in cases {
            assert_eq!(contains(haystack, needle), *expected, "{haystack:?}");
        }
    }
}
