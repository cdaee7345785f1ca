//! Primitive encodings shared by every message: big-endian integers, `u16`-length UTF-8
//! strings, `u32`-length byte strings, `u8`-tagged options and `u32`-counted arrays.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::DecodeError;

/// Elements reserved up front when decoding an array.
const ARRAY_PREALLOCATED_MAX: usize = 64;

/// The version argument of [`Wire::encode_at`] that means "every field this build knows".
pub const VERSION_LATEST: u16 = u16::MAX;

/// A value with a wire encoding.
///
/// Messages change by API version: a field declared `=> since N` in [`wire_struct!`] is on
/// the wire only at versions `N` and later (decoded as its default below them). The
/// `*_at(version)` methods encode and decode one version's layout; `encode`/`decode` are the
/// newest layout (every field). Types without versioned fields need only `encode`/`decode`.
pub trait Wire: Sized {
    fn encode(&self, buf: &mut BytesMut);
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError>;

    /// The layout of API version `version`.
    fn encode_at(&self, buf: &mut BytesMut, version: u16) {
        let _ = version;
        self.encode(buf);
    }

    /// [`Wire::encode_chunked`] in the layout of API version `version`.
    fn encode_chunked_at(&self, out: &mut Chunked, version: u16) {
        let _ = version;
        self.encode_chunked(out);
    }

    /// Decodes the layout of API version `version`.
    fn decode_at(reader: &mut Reader, version: u16) -> Result<Self, DecodeError> {
        let _ = version;
        Self::decode(reader)
    }

    /// The same bytes as [`Wire::encode`], written into `out`, where large byte strings
    /// (record batches) are kept as shared chunks instead of being copied.
    fn encode_chunked(&self, out: &mut Chunked) {
        self.encode(out.buf());
    }

    /// Encodes into a fresh buffer.
    fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }

    /// Decodes exactly one value from `bytes`; trailing bytes are an error.
    fn from_bytes(bytes: Bytes) -> Result<Self, DecodeError> {
        Self::from_bytes_at(bytes, VERSION_LATEST)
    }

    /// [`Wire::from_bytes`] for the layout of API version `version`.
    fn from_bytes_at(bytes: Bytes, version: u16) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        let value = Self::decode_at(&mut reader, version)?;
        reader.finish()?;
        Ok(value)
    }

    /// Encodes the layout of API version `version` into a fresh buffer.
    fn to_bytes_at(&self, version: u16) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode_at(&mut buf, version);
        buf.freeze()
    }
}

/// Byte strings at least this long are passed along by [`Chunked`] rather than copied.
///
/// Not smaller: every piece handed to a QUIC stream is a segment of its send buffer, and
/// quinn finds each packet's bytes by a scan over the stream's unacknowledged segments. At
/// 1 KiB, a produce request across 10,000 partitions (one-record batches of 1 KiB records)
/// was thousands of segments, and that scan took 15% of the client's CPU
/// (`ketch-bench partitions`); copying batches below 32 KiB costs less than it did. Batches
/// of the producer's default size (256 KiB) still travel uncopied.
pub const SHARED_CHUNK_BYTES_MIN: usize = 32 * 1024;

/// An encoding as a list of chunks: small fields are written into a growing buffer, large
/// byte strings are kept as the shared [`Bytes`] they already are. Writing the chunks one
/// after the other (QUIC `write_chunks`) sends the same bytes as the contiguous encoding
/// without copying records into it.
#[derive(Debug, Default)]
pub struct Chunked {
    /// Finished chunks; the first stays mutable so a frame's length prefix can be patched.
    head: Option<BytesMut>,
    chunks: Vec<Bytes>,
    current: BytesMut,
    len: usize,
}

impl Chunked {
    pub fn new() -> Chunked {
        Chunked::default()
    }

    /// The buffer small fields are written into.
    pub fn buf(&mut self) -> &mut BytesMut {
        &mut self.current
    }

    /// Appends `bytes` as a chunk of its own (after what was written so far).
    pub fn put_shared(&mut self, bytes: Bytes) {
        if bytes.len() < SHARED_CHUNK_BYTES_MIN {
            self.current.extend_from_slice(&bytes);
            return;
        }
        let written = self.current.split();
        self.len += written.len();
        if self.head.is_none() {
            self.head = Some(written);
        } else if !written.is_empty() {
            self.chunks.push(written.freeze());
        }
        self.len += bytes.len();
        self.chunks.push(bytes);
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len + self.current.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first bytes written (at least `n` must have been written before the first shared
    /// chunk), to patch in place.
    pub fn first_mut(&mut self, n: usize) -> &mut [u8] {
        let first = self.head.as_mut().unwrap_or(&mut self.current);
        &mut first[..n]
    }

    /// The chunks in order; empty ones left out.
    pub fn into_chunks(mut self) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(self.chunks.len() + 2);
        let rest = self.current.split();
        match self.head {
            Some(head) => {
                out.push(head.freeze());
                out.extend(self.chunks);
                out.push(rest.freeze());
            }
            None => out.push(rest.freeze()),
        }
        out.retain(|chunk| !chunk.is_empty());
        out
    }
}

/// A cursor over shared bytes; byte-string fields are zero-copy slices of it.
#[derive(Debug)]
pub struct Reader {
    bytes: Bytes,
}

impl Reader {
    pub fn new(bytes: Bytes) -> Reader {
        Reader { bytes }
    }

    pub fn remaining(&self) -> usize {
        self.bytes.len()
    }

    pub fn finish(self) -> Result<(), DecodeError> {
        match self.bytes.len() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes(extra)),
        }
    }

    fn need(&self, field: &'static str, needed: usize) -> Result<(), DecodeError> {
        if self.bytes.len() < needed {
            return Err(DecodeError::Truncated {
                field,
                needed,
                available: self.bytes.len(),
            });
        }
        Ok(())
    }

    pub fn take(&mut self, field: &'static str, len: usize) -> Result<Bytes, DecodeError> {
        self.need(field, len)?;
        Ok(self.bytes.split_to(len))
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        self.need(field, 1)?;
        Ok(self.bytes.get_u8())
    }
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        self.need(field, 2)?;
        Ok(self.bytes.get_u16())
    }
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        self.need(field, 4)?;
        Ok(self.bytes.get_u32())
    }
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        self.need(field, 8)?;
        Ok(self.bytes.get_u64())
    }

    /// An array count, bounded by the bytes left (every element takes at least one byte), so a
    /// hostile count cannot make the decoder allocate.
    pub fn count(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let count = self.u32(field)? as usize;
        if count > self.bytes.len() {
            return Err(DecodeError::Truncated {
                field,
                needed: count,
                available: self.remaining(),
            });
        }
        Ok(count)
    }
}

macro_rules! wire_int {
    ($($ty:ty => $read:ident, $put:ident;)*) => {$(
        impl Wire for $ty {
            fn encode(&self, buf: &mut BytesMut) {
                buf.$put(*self);
            }
            fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
                Ok(reader.$read(stringify!($ty))? as $ty)
            }
        }
    )*};
}

wire_int! {
    u8 => u8, put_u8;
    i8 => u8, put_i8;
    u16 => u16, put_u16;
    i16 => u16, put_i16;
    u32 => u32, put_u32;
    i32 => u32, put_i32;
    u64 => u64, put_u64;
    i64 => u64, put_i64;
}

impl Wire for bool {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_u8(u8::from(*self));
    }
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        match reader.u8("bool")? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(DecodeError::InvalidValue {
                field: "bool",
                value: i64::from(other),
            }),
        }
    }
}

/// Strings are at most `u16::MAX` bytes; names in Ketch are far shorter. Longer strings are a
/// caller bug and are truncated at a character boundary rather than corrupting the frame.
impl Wire for String {
    fn encode(&self, buf: &mut BytesMut) {
        let mut end = self.len().min(usize::from(u16::MAX));
        while !self.is_char_boundary(end) {
            end -= 1;
        }
        buf.put_u16(end as u16);
        buf.put_slice(&self.as_bytes()[..end]);
    }
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        let len = reader.u16("string length")?;
        let bytes = reader.take("string", usize::from(len))?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::InvalidUtf8 { field: "string" })
    }
}

impl Wire for Bytes {
    fn encode(&self, buf: &mut BytesMut) {
        assert!(self.len() <= u32::MAX as usize, "byte string over 4 GiB");
        buf.put_u32(self.len() as u32);
        buf.put_slice(self);
    }
    fn encode_chunked(&self, out: &mut Chunked) {
        assert!(self.len() <= u32::MAX as usize, "byte string over 4 GiB");
        out.buf().put_u32(self.len() as u32);
        out.put_shared(self.clone());
    }
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        let len = reader.u32("bytes length")?;
        reader.take("bytes", len as usize)
    }
}

impl<T: Wire> Wire for Option<T> {
    fn encode(&self, buf: &mut BytesMut) {
        self.encode_at(buf, VERSION_LATEST);
    }
    fn encode_chunked(&self, out: &mut Chunked) {
        self.encode_chunked_at(out, VERSION_LATEST);
    }
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        Self::decode_at(reader, VERSION_LATEST)
    }
    fn encode_at(&self, buf: &mut BytesMut, version: u16) {
        match self {
            None => buf.put_u8(0),
            Some(value) => {
                buf.put_u8(1);
                value.encode_at(buf, version);
            }
        }
    }
    fn encode_chunked_at(&self, out: &mut Chunked, version: u16) {
        match self {
            None => out.buf().put_u8(0),
            Some(value) => {
                out.buf().put_u8(1);
                value.encode_chunked_at(out, version);
            }
        }
    }
    fn decode_at(reader: &mut Reader, version: u16) -> Result<Self, DecodeError> {
        match reader.u8("option tag")? {
            0 => Ok(None),
            1 => Ok(Some(T::decode_at(reader, version)?)),
            other => Err(DecodeError::InvalidValue {
                field: "option tag",
                value: i64::from(other),
            }),
        }
    }
}

impl<T: Wire> Wire for Vec<T> {
    fn encode(&self, buf: &mut BytesMut) {
        self.encode_at(buf, VERSION_LATEST);
    }
    fn encode_chunked(&self, out: &mut Chunked) {
        self.encode_chunked_at(out, VERSION_LATEST);
    }
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        Self::decode_at(reader, VERSION_LATEST)
    }
    fn encode_at(&self, buf: &mut BytesMut, version: u16) {
        buf.put_u32(self.len() as u32);
        for item in self {
            item.encode_at(buf, version);
        }
    }
    fn encode_chunked_at(&self, out: &mut Chunked, version: u16) {
        out.buf().put_u32(self.len() as u32);
        for item in self {
            item.encode_chunked_at(out, version);
        }
    }
    fn decode_at(reader: &mut Reader, version: u16) -> Result<Self, DecodeError> {
        let count = reader.count("array count")?;
        // The count is bounded by the bytes left, but an element may be far larger in memory
        // than on the wire: reserve a little and let the vector grow as elements decode.
        let mut items = Vec::with_capacity(count.min(ARRAY_PREALLOCATED_MAX));
        for _ in 0..count {
            items.push(T::decode_at(reader, version)?);
        }
        Ok(items)
    }
}

/// Defines a struct whose wire encoding is its fields in declaration order.
macro_rules! wire_struct {
    (@since) => { 0u16 };
    (@since $since:literal) => { $since };
    ($(
        $(#[$meta:meta])*
        pub struct $name:ident {
            $( $(#[$field_meta:meta])* pub $field:ident : $ty:ty $(=> since $since:literal)?, )*
        }
    )*) => {$(
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Default)]
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $crate::wire::Wire for $name {
            fn encode(&self, buf: &mut ::bytes::BytesMut) {
                self.encode_at(buf, $crate::wire::VERSION_LATEST);
            }
            fn encode_chunked(&self, out: &mut $crate::wire::Chunked) {
                self.encode_chunked_at(out, $crate::wire::VERSION_LATEST);
            }
            fn decode(reader: &mut $crate::wire::Reader) -> Result<Self, $crate::error::DecodeError> {
                Self::decode_at(reader, $crate::wire::VERSION_LATEST)
            }
            #[allow(unused_variables, unused_comparisons)]
            fn encode_at(&self, buf: &mut ::bytes::BytesMut, version: u16) {
                $(
                    if version >= $crate::wire::wire_struct!(@since $($since)?) {
                        $crate::wire::Wire::encode_at(&self.$field, buf, version);
                    }
                )*
            }
            #[allow(unused_variables, unused_comparisons)]
            fn encode_chunked_at(&self, out: &mut $crate::wire::Chunked, version: u16) {
                $(
                    if version >= $crate::wire::wire_struct!(@since $($since)?) {
                        $crate::wire::Wire::encode_chunked_at(&self.$field, out, version);
                    }
                )*
            }
            #[allow(unused_variables, unused_comparisons)]
            fn decode_at(reader: &mut $crate::wire::Reader, version: u16) -> Result<Self, $crate::error::DecodeError> {
                Ok($name { $(
                    $field: if version >= $crate::wire::wire_struct!(@since $($since)?) {
                        <$ty as $crate::wire::Wire>::decode_at(reader, version)?
                    } else {
                        <$ty as ::core::default::Default>::default()
                    },
                )* })
            }
        }

        #[cfg(test)]
        impl $crate::wire::sample::Sample for $name {
            #[allow(unused_variables)]
            fn sample(rng: &mut $crate::wire::sample::Rng) -> Self {
                $name { $( $field: $crate::wire::sample::Sample::sample(rng), )* }
            }
        }
    )*};
}
pub(crate) use wire_struct;

/// Deterministic pseudo-random values for round-trip tests of every message.
#[cfg(test)]
pub(crate) mod sample {
    use bytes::Bytes;

    /// SplitMix64: tiny, seedable, good enough to vary field values.
    #[derive(Debug)]
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    pub trait Sample {
        fn sample(rng: &mut Rng) -> Self;
    }

    macro_rules! sample_int {
        ($($ty:ty),*) => {$(
            impl Sample for $ty {
                fn sample(rng: &mut Rng) -> Self {
                    // Favour edge values: they are where codecs break.
                    match rng.below(4) {
                        0 => <$ty>::MIN,
                        1 => <$ty>::MAX,
                        _ => rng.next() as $ty,
                    }
                }
            }
        )*};
    }
    sample_int!(u8, i8, u16, i16, u32, i32, u64, i64);

    impl Sample for bool {
        fn sample(rng: &mut Rng) -> Self {
            rng.below(2) == 1
        }
    }
    impl Sample for String {
        fn sample(rng: &mut Rng) -> Self {
            const ALPHABET: &[char] = &['a', 'z', '0', '-', '.', '_', 'é', '日', '🦀'];
            let len = rng.below(12) as usize;
            (0..len)
                .map(|_| ALPHABET[rng.below(ALPHABET.len() as u64) as usize])
                .collect()
        }
    }
    impl Sample for Bytes {
        fn sample(rng: &mut Rng) -> Self {
            // Now and then long enough to travel as a shared chunk (`Chunked`).
            let len = if rng.below(8) == 0 {
                super::SHARED_CHUNK_BYTES_MIN + rng.below(3000) as usize
            } else {
                rng.below(40) as usize
            };
            (0..len)
                .map(|_| rng.next() as u8)
                .collect::<Vec<u8>>()
                .into()
        }
    }
    impl<T: Sample> Sample for Option<T> {
        fn sample(rng: &mut Rng) -> Self {
            (rng.below(3) > 0).then(|| T::sample(rng))
        }
    }
    impl<T: Sample> Sample for Vec<T> {
        fn sample(rng: &mut Rng) -> Self {
            let len = rng.below(4) as usize;
            (0..len).map(|_| T::sample(rng)).collect()
        }
    }
}
