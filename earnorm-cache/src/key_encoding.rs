//! The canonical encoding of key arguments: a serde serializer that streams
//! an unambiguous, process-independent form of a value into the key hash.
//!
//! Unlike MessagePack (which writes `None`, `Some(None)` and `Some(())` all
//! as `nil`, and a newtype as its content), every value starts with a tag
//! naming its kind, `Some` wraps its content, names of structs, fields and
//! variants are written out, and compound values are closed by an end tag,
//! so two different values of one type never encode alike, and consecutive
//! arguments cannot run into each other. Integers are written at full width
//! (signed as `i128`, unsigned as `u128`), floats by their bits.

use serde::ser::{self, Serialize};
use xxhash_rust::xxh3::Xxh3;

/// Why a key argument could not be encoded: its `Serialize` impl refused,
/// with this message.
#[derive(Debug)]
pub struct KeyArgumentError(String);

impl std::fmt::Display for KeyArgumentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyArgumentError {}

impl ser::Error for KeyArgumentError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

/// Kinds of values, the first byte of each encoded value.
mod tag {
    pub(super) const BOOL: u8 = 1;
    pub(super) const INT: u8 = 2;
    pub(super) const UINT: u8 = 3;
    pub(super) const F32: u8 = 4;
    pub(super) const F64: u8 = 5;
    pub(super) const CHAR: u8 = 6;
    pub(super) const STR: u8 = 7;
    pub(super) const BYTES: u8 = 8;
    pub(super) const NONE: u8 = 9;
    pub(super) const SOME: u8 = 10;
    pub(super) const UNIT: u8 = 11;
    pub(super) const UNIT_STRUCT: u8 = 12;
    pub(super) const UNIT_VARIANT: u8 = 13;
    pub(super) const NEWTYPE_STRUCT: u8 = 14;
    pub(super) const NEWTYPE_VARIANT: u8 = 15;
    pub(super) const SEQ: u8 = 16;
    pub(super) const TUPLE: u8 = 17;
    pub(super) const TUPLE_STRUCT: u8 = 18;
    pub(super) const TUPLE_VARIANT: u8 = 19;
    pub(super) const MAP: u8 = 20;
    pub(super) const STRUCT: u8 = 21;
    pub(super) const STRUCT_VARIANT: u8 = 22;
    pub(super) const END: u8 = 23;
    pub(super) const FIELD: u8 = 24;
    pub(super) const SKIPPED: u8 = 25;
}

/// Writes values into a hash.
pub(crate) struct KeyEncoder<'a, S: Sink = Xxh3>(pub(crate) &'a mut S);

/// Where the encoding goes: streamed into a hasher, or written into a
/// buffer that is hashed at once (cheaper for short encodings).
pub(crate) trait Sink {
    fn update(&mut self, bytes: &[u8]);
}

/// Writes raw bytes (already canonical) into `sink`, length first.
pub(crate) fn encode_raw<S: Sink>(sink: &mut S, bytes: &[u8]) {
    sink.update(&(bytes.len() as u64).to_le_bytes());
    sink.update(bytes);
}

/// Writes the canonical encoding of `value` into `sink`.
pub(crate) fn encode_arg<S: Sink, T: serde::Serialize + ?Sized>(
    sink: &mut S,
    value: &T,
) -> std::result::Result<(), crate::CacheError> {
    value
        .serialize(&mut KeyEncoder(sink))
        .map_err(crate::CacheError::KeyArgument)
}

impl Sink for Xxh3 {
    #[inline]
    fn update(&mut self, bytes: &[u8]) {
        Xxh3::update(self, bytes);
    }
}

impl Sink for Vec<u8> {
    #[inline]
    fn update(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl<S: Sink> KeyEncoder<'_, S> {
    #[inline]
    fn tag(&mut self, tag: u8) {
        self.0.update(&[tag]);
    }

    fn len(&mut self, len: usize) {
        self.0.update(&(len as u64).to_le_bytes());
    }

    fn text(&mut self, text: &str) {
        self.len(text.len());
        self.0.update(text.as_bytes());
    }

    fn variant(&mut self, tag: u8, name: &str, index: u32, variant: &str) {
        self.tag(tag);
        self.text(name);
        self.0.update(&index.to_le_bytes());
        self.text(variant);
    }

    /// The start of a compound value of `len` elements (when known).
    fn open(&mut self, len: Option<usize>) {
        match len {
            Some(len) => {
                self.0.update(&[1]);
                self.len(len);
            }
            None => self.0.update(&[0]),
        }
    }
}

type Result<T = ()> = std::result::Result<T, KeyArgumentError>;

/// Integer methods that write their value at full width through `$wide`.
macro_rules! widen {
    ($wide:ident: $($method:ident $t:ty),*) => {$(
        fn $method(self, v: $t) -> Result {
            self.$wide(v.into())
        }
    )*};
}

impl<'a, 'b, S: Sink> ser::Serializer for &'a mut KeyEncoder<'b, S> {
    type Ok = ();
    type Error = KeyArgumentError;
    type SerializeSeq = Self;
    type SerializeTuple = Self;
    type SerializeTupleStruct = Self;
    type SerializeTupleVariant = Self;
    type SerializeMap = Self;
    type SerializeStruct = Self;
    type SerializeStructVariant = Self;

    fn serialize_bool(self, v: bool) -> Result {
        self.tag(tag::BOOL);
        self.0.update(&[u8::from(v)]);
        Ok(())
    }
    widen!(serialize_i128: serialize_i8 i8, serialize_i16 i16, serialize_i32 i32, serialize_i64 i64);
    fn serialize_i128(self, v: i128) -> Result {
        self.tag(tag::INT);
        self.0.update(&v.to_le_bytes());
        Ok(())
    }
    widen!(serialize_u128: serialize_u8 u8, serialize_u16 u16, serialize_u32 u32, serialize_u64 u64);
    fn serialize_u128(self, v: u128) -> Result {
        self.tag(tag::UINT);
        self.0.update(&v.to_le_bytes());
        Ok(())
    }
    fn serialize_f32(self, v: f32) -> Result {
        self.tag(tag::F32);
        self.0.update(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_f64(self, v: f64) -> Result {
        self.tag(tag::F64);
        self.0.update(&v.to_bits().to_le_bytes());
        Ok(())
    }
    fn serialize_char(self, v: char) -> Result {
        self.tag(tag::CHAR);
        self.0.update(&u32::from(v).to_le_bytes());
        Ok(())
    }
    fn serialize_str(self, v: &str) -> Result {
        self.tag(tag::STR);
        self.text(v);
        Ok(())
    }
    fn serialize_bytes(self, v: &[u8]) -> Result {
        self.tag(tag::BYTES);
        self.len(v.len());
        self.0.update(v);
        Ok(())
    }
    fn serialize_none(self) -> Result {
        self.tag(tag::NONE);
        Ok(())
    }
    fn serialize_some<T: ?Sized + Serialize>(self, value: &T) -> Result {
        self.tag(tag::SOME);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result {
        self.tag(tag::UNIT);
        Ok(())
    }
    fn serialize_unit_struct(self, name: &'static str) -> Result {
        self.tag(tag::UNIT_STRUCT);
        self.text(name);
        Ok(())
    }
    fn serialize_unit_variant(self, name: &'static str, index: u32, variant: &'static str) -> Result {
        self.variant(tag::UNIT_VARIANT, name, index, variant);
        Ok(())
    }
    fn serialize_newtype_struct<T: ?Sized + Serialize>(self, name: &'static str, value: &T) -> Result {
        self.tag(tag::NEWTYPE_STRUCT);
        self.text(name);
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: ?Sized + Serialize>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result {
        self.variant(tag::NEWTYPE_VARIANT, name, index, variant);
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Self> {
        self.tag(tag::SEQ);
        self.open(len);
        Ok(self)
    }
    fn serialize_tuple(self, len: usize) -> Result<Self> {
        self.tag(tag::TUPLE);
        self.open(Some(len));
        Ok(self)
    }
    fn serialize_tuple_struct(self, name: &'static str, len: usize) -> Result<Self> {
        self.tag(tag::TUPLE_STRUCT);
        self.text(name);
        self.open(Some(len));
        Ok(self)
    }
    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self> {
        self.variant(tag::TUPLE_VARIANT, name, index, variant);
        self.open(Some(len));
        Ok(self)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Self> {
        self.tag(tag::MAP);
        self.open(len);
        Ok(self)
    }
    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Self> {
        self.tag(tag::STRUCT);
        self.text(name);
        self.open(Some(len));
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self> {
        self.variant(tag::STRUCT_VARIANT, name, index, variant);
        self.open(Some(len));
        Ok(self)
    }
}

/// Elements of sequences, tuples and their struct and variant forms: each
/// element is self-delimiting; the end tag closes the value.
macro_rules! elements {
    ($($trait:ident :: $method:ident),*) => {$(
        impl<'a, 'b, S: Sink> ser::$trait for &'a mut KeyEncoder<'b, S> {
            type Ok = ();
            type Error = KeyArgumentError;
            fn $method<T: ?Sized + Serialize>(&mut self, value: &T) -> Result {
                value.serialize(&mut **self)
            }
            fn end(self) -> Result {
                self.tag(tag::END);
                Ok(())
            }
        }
    )*};
}
elements!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl<'a, 'b, S: Sink> ser::SerializeMap for &'a mut KeyEncoder<'b, S> {
    type Ok = ();
    type Error = KeyArgumentError;
    fn serialize_key<T: ?Sized + Serialize>(&mut self, key: &T) -> Result {
        key.serialize(&mut **self)
    }
    fn serialize_value<T: ?Sized + Serialize>(&mut self, value: &T) -> Result {
        value.serialize(&mut **self)
    }
    fn end(self) -> Result {
        self.tag(tag::END);
        Ok(())
    }
}

/// Fields of structs and struct variants: the name, then the value; a field
/// left out by `skip_serializing_if` is named as skipped.
macro_rules! fields {
    ($($trait:ident),*) => {$(
        impl<'a, 'b, S: Sink> ser::$trait for &'a mut KeyEncoder<'b, S> {
            type Ok = ();
            type Error = KeyArgumentError;
            fn serialize_field<T: ?Sized + Serialize>(&mut self, name: &'static str, value: &T) -> Result {
                self.tag(tag::FIELD);
                self.text(name);
                value.serialize(&mut **self)
            }
            fn skip_field(&mut self, name: &'static str) -> Result {
                self.tag(tag::SKIPPED);
                self.text(name);
                Ok(())
            }
            fn end(self) -> Result {
                self.tag(tag::END);
                Ok(())
            }
        }
    )*};
}
fields!(SerializeStruct, SerializeStructVariant);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Serialize;
    use xxhash_rust::xxh3::Xxh3;

    use super::KeyEncoder;

    fn hash<T: Serialize + ?Sized>(value: &T) -> u128 {
        let mut hasher = Xxh3::new();
        value.serialize(&mut KeyEncoder(&mut hasher)).expect("encodes");
        hasher.digest128()
    }

    #[derive(Serialize)]
    struct Celsius;
    #[derive(Serialize)]
    struct Fahrenheit;
    #[derive(Serialize)]
    struct Wrap(u8);
    #[derive(Serialize)]
    struct Point {
        x: i32,
        #[serde(skip_serializing_if = "Option::is_none")]
        y: Option<i32>,
    }

    #[test]
    fn different_values_encode_differently() {
        let none: Option<Option<u8>> = None;
        let some_none: Option<Option<u8>> = Some(None);
        assert_ne!(hash(&none), hash(&some_none));
        let unit: Option<()> = Some(());
        assert_ne!(hash(&None::<()>), hash(&unit));
        assert_ne!(hash(&Celsius), hash(&Fahrenheit));
        assert_ne!(hash(&Wrap(1)), hash(&1u8));
        assert_ne!(hash(&("ab", "c")), hash(&("a", "bc")));
        assert_ne!(hash(&vec![vec![1u8], vec![]]), hash(&vec![vec![], vec![1u8]]));
        assert_ne!(hash(&Point { x: 1, y: None }), hash(&Point { x: 1, y: Some(0) }));
        let a: BTreeMap<&str, u8> = [("k", 1)].into();
        let b: BTreeMap<&str, u8> = [("k", 2)].into();
        assert_ne!(hash(&a), hash(&b));
        assert_eq!(hash(&("same", 1u8)), hash(&("same", 1u8)), "deterministic");
    }
}
