//! The value codec: a versioned envelope around a MessagePack payload.
//!
//! Layout of a stored value:
//!
//! ```text
//! 0xEE 'O' FORMAT_VERSION n | read_at (8 bytes) | token_1 .. token_n (16 bytes each) | payload
//! ```
//!
//! `read_at` is the database's logical time of the earliest read the value
//! was computed from, big-endian (`0`: unknown; see `read_time.rs`): the
//! consistency monitor compares it with the time of a write. The tokens are
//! the generations of the scopes the value depends on, as they
//! were when the value's computation started (see the crate docs). The payload
//! is MessagePack with named fields (self-describing, no code execution on
//! decode). Anything that does not match this layout, or whose payload does not
//! decode into the requested type, is reported as [`CacheError::Decode`] and
//! the caller treats it as a miss.

use std::any::Any;
use std::sync::Arc;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{token::TOKEN_LEN, CacheError};

/// Version of the envelope layout; bump when it changes. Values of an
/// unknown version are misses (computed and stored again); version 1 is
/// still read.
pub const FORMAT_VERSION: u8 = 2;
const MAGIC: [u8; 2] = [0xEE, b'O'];
const HEADER_LEN: usize = 12;

/// The envelope header for a value depending on `tokens` generations,
/// read at `read_at`.
pub(crate) fn header(tokens: usize, read_at: u64) -> [u8; HEADER_LEN] {
    // A key never depends on more than a handful of scopes; the cast is checked
    // where keys are built.
    let n = u8::try_from(tokens).unwrap_or(u8::MAX);
    let mut header = [0; HEADER_LEN];
    header[..4].copy_from_slice(&[MAGIC[0], MAGIC[1], FORMAT_VERSION, n]);
    header[4..].copy_from_slice(&read_at.to_be_bytes());
    header
}

/// The length of an envelope's header and `tokens` tokens: what must be
/// read of a value to know when it was read and under which generations.
pub(crate) fn envelope_head_len(tokens: usize) -> usize {
    HEADER_LEN + tokens * TOKEN_LEN
}

/// Builds a complete envelope (used where no generation check is wanted).
#[cfg(test)]
pub(crate) fn seal(tokens: &[&[u8]], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + tokens.len() * TOKEN_LEN + payload.len());
    out.extend_from_slice(&header(tokens.len(), 0));
    for token in tokens {
        out.extend_from_slice(token);
    }
    out.extend_from_slice(payload);
    out
}

/// A decoded envelope, borrowing from the stored bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Envelope<'a> {
    /// When its data was read (`0`: unknown).
    pub(crate) read_at: u64,
    tokens: &'a [u8],
    pub(crate) payload: &'a [u8],
}

impl<'a> Envelope<'a> {
    /// Splits stored bytes, checking the magic, the version and the length.
    /// The first layout (version 1: no read time) is still read, as read at
    /// an unknown time, so that processes of both versions can share a
    /// prefix while a deployment rolls out.
    pub(crate) fn open(bytes: &'a [u8]) -> Result<Self, CacheError> {
        if bytes.len() < 4 || bytes[..2] != MAGIC {
            return Err(CacheError::Envelope("not an earnorm cache value"));
        }
        let (header_len, read_at) = match bytes[2] {
            FORMAT_VERSION => {
                let Some(Ok(stamp)) = bytes.get(4..HEADER_LEN).map(<[u8; 8]>::try_from) else {
                    return Err(CacheError::Envelope("truncated value"));
                };
                (HEADER_LEN, u64::from_be_bytes(stamp))
            }
            1 => (4, 0),
            _ => return Err(CacheError::Envelope("unsupported envelope version")),
        };
        let tokens_len = usize::from(bytes[3]) * TOKEN_LEN;
        if bytes.len() < header_len + tokens_len {
            return Err(CacheError::Envelope("truncated value"));
        }
        Ok(Self {
            read_at,
            tokens: &bytes[header_len..header_len + tokens_len],
            payload: &bytes[header_len + tokens_len..],
        })
    }

    /// Whether the stored tokens equal the current generations, in order.
    /// An absent generation (`None`) never matches: stored tokens are never empty.
    pub(crate) fn is_current(&self, current: &[Option<Vec<u8>>]) -> bool {
        self.tokens.len() == current.len() * TOKEN_LEN
            && self
                .tokens
                .chunks_exact(TOKEN_LEN)
                .zip(current)
                .all(|(stored, now)| now.as_deref() == Some(stored))
    }
}

/// Deepest nesting of arrays and maps a payload may have. Decoding is
/// recursive, so a deeper value could overflow the stack of the thread that
/// reads it; it is neither stored nor decoded (a miss).
pub const MAX_DEPTH: usize = 128;

/// Encodes a value as the envelope payload.
///
/// # Errors
/// [`CacheError::Encode`] when serde refuses the value, or when it is nested
/// deeper than [`MAX_DEPTH`] (it could not be decoded again).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CacheError> {
    let payload = rmp_serde::to_vec_named(value).map_err(CacheError::Encode)?;
    let mut check = decoder(&payload);
    serde::de::IgnoredAny::deserialize(&mut check).map_err(|_| CacheError::TooDeep(MAX_DEPTH))?;
    Ok(payload)
}

/// Decodes an envelope payload, with the depth limit.
///
/// # Errors
/// [`CacheError::Decode`] for bytes that are not a `T`, or nested deeper
/// than [`MAX_DEPTH`].
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, CacheError> {
    T::deserialize(&mut decoder(payload)).map_err(CacheError::Decode)
}

fn decoder(payload: &[u8]) -> rmp_serde::Deserializer<rmp_serde::decode::ReadRefReader<'_, [u8]>> {
    let mut de = rmp_serde::Deserializer::from_read_ref(payload);
    de.set_max_depth(MAX_DEPTH);
    de
}

/// How a function's return value is cached: which results are stored, and how
/// a stored payload becomes a return value again.
///
/// `#[cached]` picks the implementation from the return type: [`ResultOutput`]
/// for `Result<T, E>` (only `Ok` is stored), [`OptionOutput`] for `Option<T>`
/// (only `Some` is stored: a `None` is recomputed next time), [`PlainOutput`]
/// otherwise (always stored).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot cache a `{R}`",
    label = "the return type decides what is cached",
    note = "#[cached] caches only `Ok` of a return type named `Result` (or ending in `Result`) and only `Some` of an \
            `Option`; write #[cached(store = \"all\")] to cache every value of another type"
)]
pub trait Output<R> {
    /// The encoded payload to store, or `None` when this result is not cached.
    ///
    /// # Errors
    /// When the value cannot be encoded (the result is then returned, not stored).
    fn encode(result: &R) -> Option<Result<Vec<u8>, CacheError>>;
    /// A result from a stored payload.
    ///
    /// # Errors
    /// When the payload does not decode.
    fn decode(payload: &[u8]) -> Result<R, CacheError>;
}

/// Caches every value. See [`Output`].
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainOutput;
/// Caches `Ok` values of a `Result<T, E>`, for any `E`. See [`Output`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ResultOutput;
/// Caches `Some` values of an `Option<T>`. See [`Output`].
#[derive(Debug, Clone, Copy, Default)]
pub struct OptionOutput;

impl<T: Serialize + DeserializeOwned> Output<T> for PlainOutput {
    fn encode(result: &T) -> Option<Result<Vec<u8>, CacheError>> {
        Some(encode(result))
    }
    fn decode(payload: &[u8]) -> Result<T, CacheError> {
        decode(payload)
    }
}

impl<T: Serialize + DeserializeOwned, E> Output<Result<T, E>> for ResultOutput {
    fn encode(result: &Result<T, E>) -> Option<Result<Vec<u8>, CacheError>> {
        result.as_ref().ok().map(encode)
    }
    fn decode(payload: &[u8]) -> Result<Result<T, E>, CacheError> {
        decode(payload).map(Ok)
    }
}

impl<T: Serialize + DeserializeOwned> Output<Option<T>> for OptionOutput {
    fn encode(result: &Option<T>) -> Option<Result<Vec<u8>, CacheError>> {
        result.as_ref().map(encode)
    }
    fn decode(payload: &[u8]) -> Result<Option<T>, CacheError> {
        decode(payload).map(Some)
    }
}

/// The part of a result an [`Output`] stores (the `T` of a `Result<T, E>`
/// or of an `Option<T>`, the whole value otherwise), and the result a
/// stored part stands for: what lets the in-process tier keep that part by
/// value (see [`Keeper`]).
pub trait Stored<R>: Output<R> {
    /// The part stored.
    type Value;
    /// The part of `result` that is stored, or `None` when it is not cached.
    fn value(result: &R) -> Option<&Self::Value>;
    /// The result a stored part stands for.
    fn result(value: Self::Value) -> R;
}

impl<T: Serialize + DeserializeOwned> Stored<T> for PlainOutput {
    type Value = T;
    fn value(result: &T) -> Option<&T> {
        Some(result)
    }
    fn result(value: T) -> T {
        value
    }
}

impl<T: Serialize + DeserializeOwned, E> Stored<Result<T, E>> for ResultOutput {
    type Value = T;
    fn value(result: &Result<T, E>) -> Option<&T> {
        result.as_ref().ok()
    }
    fn result(value: T) -> Result<T, E> {
        Ok(value)
    }
}

impl<T: Serialize + DeserializeOwned> Stored<Option<T>> for OptionOutput {
    type Value = T;
    fn value(result: &Option<T>) -> Option<&T> {
        result.as_ref()
    }
    fn result(value: T) -> Option<T> {
        Some(value)
    }
}

/// A value as kept in process: the value itself, cloned out on a hit (for
/// types that are `Clone`, see [`Keeper`]), or its encoded payload,
/// decoded on a hit.
#[derive(Clone)]
pub(crate) enum Kept {
    Value(Arc<dyn Any + Send + Sync>),
    Payload(Arc<[u8]>),
}

/// How results of one type are kept in process by value (cloned) rather
/// than as their encoded payload (decoded on every hit): what makes an
/// in-process hit cost about as much as a clone. Attach one to a key with
/// [`CacheKey::kept_by`](crate::CacheKey::kept_by); `#[cached]` does it for every return type whose
/// cached part is `Clone`.
#[derive(Clone, Copy)]
pub struct Keeper {
    /// The result (a `&R`, as `Any`) as kept, when it is of the type this
    /// keeper was made for and is cached at all.
    keep: fn(&dyn Any) -> Option<Kept>,
    /// Writes the result a kept value stands for into `out` (a
    /// `&mut Option<R>`, as `Any`); says whether it could.
    restore: fn(&Kept, &mut dyn Any) -> bool,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper").finish_non_exhaustive()
    }
}

impl Keeper {
    /// Keeps the part of an `R` that output `O` stores (the `T` of a
    /// `Result<T, E>` or of an `Option<T>`, the whole value otherwise) by
    /// value, and clones it out on a hit.
    pub fn cloned<R, O>() -> Self
    where
        R: 'static,
        O: crate::codec::Stored<R>,
        O::Value: Clone + Send + Sync + 'static,
    {
        Self {
            keep: |result| {
                let result = result.downcast_ref::<R>()?;
                let value = O::value(result)?.clone();
                Some(Kept::Value(Arc::new(value)))
            },
            restore: |kept, out| {
                let (Kept::Value(value), Some(out)) = (kept, out.downcast_mut::<Option<R>>()) else {
                    return false;
                };
                match value.downcast_ref::<O::Value>() {
                    Some(value) => {
                        *out = Some(O::result(value.clone()));
                        true
                    }
                    None => false,
                }
            },
        }
    }

    /// `result` as kept, when this keeper is for its type.
    pub(crate) fn keep<R: 'static>(&self, result: &R) -> Option<Kept> {
        (self.keep)(result)
    }

    /// The result `kept` stands for, when this keeper is for its type.
    pub(crate) fn restore<R: 'static>(&self, kept: &Kept) -> Option<R> {
        let mut out: Option<R> = None;
        (self.restore)(kept, &mut out).then_some(out).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trip_and_generation_check() {
        let t1 = b"0123456789abcdef";
        let t2 = b"fedcba9876543210";
        let sealed = seal(&[t1, t2], b"payload");
        let env = Envelope::open(&sealed).expect("opens");
        assert_eq!(env.payload, b"payload");
        assert!(env.is_current(&[Some(t1.to_vec()), Some(t2.to_vec())]));
        assert!(!env.is_current(&[Some(t1.to_vec()), Some(t1.to_vec())]));
        assert!(!env.is_current(&[Some(t1.to_vec()), None]));
        assert!(!env.is_current(&[Some(t1.to_vec())]));
        assert_eq!(env.read_at, 0, "sealed with no read time");

        let mut stamped = header(1, 0x0000_0065_0000_0003).to_vec();
        stamped.extend_from_slice(t1);
        stamped.extend_from_slice(b"p");
        let env = Envelope::open(&stamped).expect("opens");
        assert_eq!((env.read_at, env.payload), (0x0000_0065_0000_0003, &b"p"[..]));

        // The first layout, without a read time, is still read.
        let env = Envelope::open(b"\xEEO\x01\x00payload").expect("opens");
        assert_eq!((env.read_at, env.payload), (0, &b"payload"[..]));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for bytes in [
            &b""[..],
            b"\xEE",
            b"\xEEO",
            b"\xEEO\x01\x02abc",
            b"\xEEO\x02\x00short",
            b"\xEEO\x09\x00",
            b"hello world",
            b"\x80\x04\x95",
        ] {
            assert!(Envelope::open(bytes).is_err(), "{bytes:?}");
        }
        assert!(decode::<String>(b"\xc1\xff").is_err());
        assert!(decode::<u32>(&encode("text").expect("encodes")).is_err());
    }

    /// A value nested `depth` levels deep (one-element arrays).
    #[derive(Debug, Serialize, Deserialize)]
    struct Nest(Vec<Nest>);

    fn nest(depth: usize) -> Nest {
        (0..depth).fold(Nest(Vec::new()), |inner, _| Nest(vec![inner]))
    }

    #[test]
    fn values_nested_too_deep_are_neither_stored_nor_decoded() {
        assert!(encode(&nest(MAX_DEPTH - 2)).is_ok());
        assert!(matches!(encode(&nest(MAX_DEPTH + 10)), Err(CacheError::TooDeep(_))));
        // 100,000 one-element arrays inside each other, as another writer
        // could store them.
        let mut deep = vec![0x91u8; 100_000];
        deep.push(0x90);
        assert!(
            matches!(decode::<Nest>(&deep), Err(CacheError::Decode(_))),
            "a miss, not a stack overflow"
        );
    }

    #[test]
    fn outputs_cache_only_what_they_should() {
        let ok: Result<u32, String> = Ok(7);
        let err: Result<u32, String> = Err("no".into());
        assert!(<ResultOutput as Output<_>>::encode(&ok).is_some());
        assert!(<ResultOutput as Output<_>>::encode(&err).is_none());
        assert!(<OptionOutput as Output<Option<u32>>>::encode(&None).is_none());
        let bytes = encode(&7u32).expect("encodes");
        let back: Result<u32, String> = <ResultOutput as Output<_>>::decode(&bytes).expect("decodes");
        assert_eq!(back, Ok(7));
    }
}
