//! Redacts personal data in record values: e-mail addresses become `[email]` and card
//! numbers (13 to 19 digits, spaces or dashes allowed between them, passing the Luhn check)
//! become `[card]`. Records without PII pass through untouched; changed ones carry the header
//! `redacted: <count>`.

use ketch_filter::{Record, RecordOut};

#[ketch_filter::map]
fn redact(record: &Record) -> Result<RecordOut, String> {
    let value = record.value();
    let (redacted, count) = redact_bytes(value);
    if count == 0 {
        return Ok(RecordOut::from_record(record));
    }
    Ok(RecordOut::from_record(record)
        .with_value(redacted)
        .with_header("redacted", count.to_string()))
}

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn is_domain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

/// The e-mail address around the `@` at `at`, as `(start, end)`.
fn email_at(v: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut start = at;
    while start > 0 && is_local(v[start - 1]) {
        start -= 1;
    }
    let mut end = at + 1;
    while end < v.len() && is_domain(v[end]) {
        end += 1;
    }
    while end > at + 1 && v[end - 1] == b'.' {
        end -= 1;
    }
    let domain = &v[at + 1..end];
    let dot = domain.iter().rposition(|&b| b == b'.')?;
    (start < at && dot > 0 && domain.len() - dot > 2).then_some((start, end))
}

/// A card number starting at `i`, as its end; digits may be separated by one space or dash.
fn card_at(v: &[u8], i: usize) -> Option<usize> {
    if i > 0 && v[i - 1].is_ascii_digit() {
        return None;
    }
    let mut digits = Vec::with_capacity(19);
    let mut j = i;
    let mut end = i;
    while j < v.len() && digits.len() < 19 {
        if v[j].is_ascii_digit() {
            digits.push(v[j] - b'0');
            j += 1;
            end = j;
        } else if matches!(v[j], b' ' | b'-') && j + 1 < v.len() && v[j + 1].is_ascii_digit() {
            j += 1;
        } else {
            break;
        }
    }
    if end < v.len() && v[end].is_ascii_digit() {
        return None;
    }
    (digits.len() >= 13 && luhn(&digits)).then_some(end)
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

fn redact_bytes(v: &[u8]) -> (Vec<u8>, u32) {
    let mut out = Vec::with_capacity(v.len());
    let mut count = 0;
    let mut i = 0;
    while i < v.len() {
        if v[i].is_ascii_digit()
            && let Some(end) = card_at(v, i)
        {
            out.extend_from_slice(b"[card]");
            count += 1;
            i = end;
            continue;
        }
        if is_local(v[i]) {
            // Find the end of this word; if an '@' follows it, it may be an address.
            let mut j = i;
            while j < v.len() && is_local(v[j]) {
                j += 1;
            }
            if j < v.len()
                && v[j] == b'@'
                && let Some((start, end)) = email_at(v, j)
                && start == i
            {
                out.extend_from_slice(b"[email]");
                count += 1;
                i = end;
                continue;
            }
            // Copy the word's first byte and go on; digits inside may start a card number.
        }
        out.push(v[i]);
        i += 1;
    }
    (out, count)
}
