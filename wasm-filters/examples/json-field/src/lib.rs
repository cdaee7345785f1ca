//! Keeps JSON records whose top-level numeric field compares true against a bound.
//! Params: `{"field":"amount","gt":100}` (also `gte`, `lt`, `lte`, `eq`). A record that is not
//! a JSON object, or lacks the field, or holds a non-number there, is dropped.
//!
//! Records are scanned, not parsed into a tree: the filter walks the top-level object and
//! skips every value but the one it compares.

use std::cell::RefCell;

use ketch_filter::Record;

#[derive(Debug, Clone, Copy)]
enum Op {
    Gt,
    Gte,
    Lt,
    Lte,
    Eq,
}

#[derive(Debug)]
struct Rule {
    field: Vec<u8>,
    op: Op,
    bound: f64,
}

thread_local! {
    static RULE: RefCell<Option<Rule>> = const { RefCell::new(None) };
}

#[ketch_filter::init]
fn init(params: &str) -> Result<(), String> {
    let params: serde_json::Value =
        serde_json::from_str(params).map_err(|e| format!("params are not JSON: {e}"))?;
    let field = params
        .get("field")
        .and_then(|f| f.as_str())
        .ok_or("params need \"field\": a string")?;
    let ops = [
        ("gt", Op::Gt),
        ("gte", Op::Gte),
        ("lt", Op::Lt),
        ("lte", Op::Lte),
        ("eq", Op::Eq),
    ];
    let mut rule = None;
    for (name, op) in ops {
        if let Some(bound) = params.get(name) {
            let bound = bound
                .as_f64()
                .ok_or_else(|| format!("\"{name}\" must be a number"))?;
            if rule.is_some() {
                return Err("give exactly one of gt, gte, lt, lte, eq".into());
            }
            rule = Some(Rule {
                field: field.as_bytes().to_vec(),
                op,
                bound,
            });
        }
    }
    let rule = rule.ok_or("params need one of gt, gte, lt, lte, eq")?;
    RULE.with(|r| *r.borrow_mut() = Some(rule));
    Ok(())
}

#[ketch_filter::filter]
fn keep(record: &Record) -> bool {
    RULE.with(|rule| {
        let rule = rule.borrow();
        let Some(rule) = rule.as_ref() else {
            return false;
        };
        match top_level_number(record.value(), &rule.field) {
            Some(v) => match rule.op {
                Op::Gt => v > rule.bound,
                Op::Gte => v >= rule.bound,
                Op::Lt => v < rule.bound,
                Op::Lte => v <= rule.bound,
                Op::Eq => v == rule.bound,
            },
            None => false,
        }
    })
}

fn ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The end of the string starting at `b[i] == '"'` (index after the closing quote).
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end of the value starting at `i`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            Some(j)
        }
    }
}

fn top_level_number(b: &[u8], field: &[u8]) -> Option<f64> {
    let mut i = ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = ws(b, i);
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let end = skip_string(b, i)?;
        let name = &b[i + 1..end - 1];
        i = ws(b, end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = ws(b, i + 1);
        let value_end = skip_value(b, i)?;
        if name == field {
            return std::str::from_utf8(&b[i..value_end]).ok()?.parse().ok();
        }
        i = ws(b, value_end);
        match b.get(i)? {
            b',' => i += 1,
            _ => return None,
        }
    }
}
