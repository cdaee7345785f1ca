//! Zig-zag varints as Kafka encodes them inside records (protobuf `sint32`/`sint64`).

use bytes::BufMut;

/// The longest encoding of a zig-zag `i64`.
pub const VARLONG_BYTES_MAX: usize = 10;
/// The longest encoding of a zig-zag `i32`.
pub const VARINT_BYTES_MAX: usize = 5;

/// Why a varint could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VarintError {
    #[error("varint runs past the end of its buffer")]
    Truncated,
    #[error("varint is longer than {VARLONG_BYTES_MAX} bytes or overflows its width")]
    Overlong,
}

pub fn put_varint(buf: &mut impl BufMut, value: i32) {
    put_varlong(buf, i64::from(value));
}

pub fn put_varlong(buf: &mut impl BufMut, value: i64) {
    let mut v = ((value << 1) ^ (value >> 63)) as u64;
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

/// Bytes that `put_varlong(value)` writes.
pub fn varlong_len(value: i64) -> usize {
    let v = ((value << 1) ^ (value >> 63)) as u64;
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

pub fn varint_len(value: i32) -> usize {
    varlong_len(i64::from(value))
}

/// Reads a zig-zag varlong from the front of `input`; returns the value and bytes consumed.
pub fn get_varlong(input: &[u8]) -> Result<(i64, usize), VarintError> {
    let mut raw: u64 = 0;
    for (i, &byte) in input.iter().enumerate().take(VARLONG_BYTES_MAX) {
        let chunk = u64::from(byte & 0x7f);
        if i == VARLONG_BYTES_MAX - 1 && chunk > 1 {
            return Err(VarintError::Overlong);
        }
        raw |= chunk << (7 * i);
        if byte & 0x80 == 0 {
            let value = ((raw >> 1) as i64) ^ -((raw & 1) as i64);
            return Ok((value, i + 1));
        }
    }
    if input.len() >= VARLONG_BYTES_MAX {
        Err(VarintError::Overlong)
    } else {
        Err(VarintError::Truncated)
    }
}

/// Reads a zig-zag varint (32-bit) from the front of `input`.
pub fn get_varint(input: &[u8]) -> Result<(i32, usize), VarintError> {
    let (value, used) =
        get_varlong(&input[..input.len().min(VARINT_BYTES_MAX)]).map_err(|e| match e {
            VarintError::Truncated if input.len() > VARINT_BYTES_MAX => VarintError::Overlong,
            other => other,
        })?;
    let value = i32::try_from(value).map_err(|_| VarintError::Overlong)?;
    Ok((value, used))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_encodings() {
        // (value, bytes) pairs from the protobuf zig-zag table.
        let cases: &[(i64, &[u8])] = &[
            (0, &[0x00]),
            (-1, &[0x01]),
            (1, &[0x02]),
            (-2, &[0x03]),
            (63, &[0x7e]),
            (-64, &[0x7f]),
            (64, &[0x80, 0x01]),
            (
                i64::MAX,
                &[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
            (
                i64::MIN,
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
            ),
        ];
        for &(value, bytes) in cases {
            let mut out = Vec::new();
            put_varlong(&mut out, value);
            assert_eq!(out, bytes, "encode {value}");
            assert_eq!(varlong_len(value), bytes.len(), "len {value}");
            assert_eq!(
                get_varlong(bytes),
                Ok((value, bytes.len())),
                "decode {value}"
            );
        }
    }

    #[test]
    fn malformed() {
        assert_eq!(get_varlong(&[]), Err(VarintError::Truncated));
        assert_eq!(get_varlong(&[0x80, 0x80]), Err(VarintError::Truncated));
        assert_eq!(get_varlong(&[0xff; 11]), Err(VarintError::Overlong));
        assert_eq!(
            get_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(VarintError::Overlong)
        );
        // 2^32 does not fit an i32.
        assert_eq!(
            get_varint(&[0x80, 0x80, 0x80, 0x80, 0x20]),
            Err(VarintError::Overlong)
        );
    }

    proptest! {
        #[test]
        fn varlong_round_trip(value: i64) {
            let mut out = Vec::new();
            put_varlong(&mut out, value);
            prop_assert_eq!(out.len(), varlong_len(value));
            prop_assert_eq!(get_varlong(&out), Ok((value, out.len())));
        }

        #[test]
        fn varint_round_trip(value: i32) {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            prop_assert_eq!(get_varint(&out), Ok((value, out.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes: Vec<u8>) {
            let _ = get_varlong(&bytes);
            let _ = get_varint(&bytes);
        }
    }
}
