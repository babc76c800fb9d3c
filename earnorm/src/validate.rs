//! Validation rules used by `#[derive(Model)]`.
//!
//! Each rule takes the field through a small trait so that it works on the
//! field's own type and on `Option` of it (an absent optional value passes
//! every rule but `required`).

use std::cmp::Ordering;
use std::sync::OnceLock;

use regex::Regex;

use crate::error::ValidationErrors;

/// A value that can be empty or absent.
pub trait Presence {
    /// Whether the value is present and not empty.
    fn is_present(&self) -> bool;
}

impl Presence for String {
    fn is_present(&self) -> bool {
        !self.trim().is_empty()
    }
}
impl<T> Presence for Vec<T> {
    fn is_present(&self) -> bool {
        !self.is_empty()
    }
}
impl<T: Presence> Presence for Option<T> {
    fn is_present(&self) -> bool {
        self.as_ref().is_some_and(Presence::is_present)
    }
}
macro_rules! always_present {
    ($($t:ty),*) => { $(impl Presence for $t { fn is_present(&self) -> bool { true } })* };
}
always_present!(
    bool,
    i8,
    i16,
    i32,
    i64,
    u8,
    u16,
    u32,
    u64,
    f32,
    f64,
    mongodb::bson::oid::ObjectId,
    mongodb::bson::DateTime,
    mongodb::bson::Document
);

/// A text field (`String` or `Option<String>`).
pub trait Text {
    /// The text, when present.
    fn text(&self) -> Option<&str>;
}
impl Text for String {
    fn text(&self) -> Option<&str> {
        Some(self)
    }
}
impl Text for Option<String> {
    fn text(&self) -> Option<&str> {
        self.as_deref()
    }
}

/// A bound of `#[earnorm(min = .., max = ..)]`, as written: an integer
/// literal is compared exactly with integer fields (no rounding through
/// `f64`, so `2^53 + 1` is above `max = 9007199254740992`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bound {
    /// An integer literal.
    Int(i128),
    /// A literal with a fraction or exponent (always finite).
    Float(f64),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::Int(n) => write!(f, "{n}"),
            Bound::Float(x) => write!(f, "{x}"),
        }
    }
}

/// How a field's value compares with a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// No value (an empty `Option`): every bound passes.
    Absent,
    /// The value is below, equal to or above the bound.
    Ordered(Ordering),
    /// The value is not a number (`NaN`): no bound passes.
    NotANumber,
}

/// A numeric field (any primitive number, or `Option` of one).
pub trait Number {
    /// How the value compares with `bound`.
    fn compare(&self, bound: Bound) -> Comparison;
}

/// An integer against a bound, exactly.
fn compare_int(value: i128, bound: Bound) -> Ordering {
    match bound {
        Bound::Int(bound) => value.cmp(&bound),
        Bound::Float(bound) => {
            let floor = bound.floor();
            #[allow(clippy::cast_precision_loss)]
            if floor < i128::MIN as f64 {
                return Ordering::Greater;
            }
            #[allow(clippy::cast_precision_loss)]
            if floor >= i128::MAX as f64 {
                return Ordering::Less;
            }
            #[allow(clippy::cast_possible_truncation)]
            let whole = floor as i128;
            match value.cmp(&whole) {
                // Equal to the floor of a bound with a fraction: below it.
                Ordering::Equal if bound > floor => Ordering::Less,
                other => other,
            }
        }
    }
}

macro_rules! integer {
    ($($t:ty),*) => { $(
        impl Number for $t {
            fn compare(&self, bound: Bound) -> Comparison {
                Comparison::Ordered(compare_int(i128::from(*self), bound))
            }
        }
    )* };
}
integer!(i8, i16, i32, i64, u8, u16, u32, u64);

macro_rules! float {
    ($($t:ty),*) => { $(
        impl Number for $t {
            fn compare(&self, bound: Bound) -> Comparison {
                #[allow(clippy::cast_precision_loss)]
                let bound = match bound {
                    Bound::Int(n) => n as f64,
                    Bound::Float(x) => x,
                };
                f64::from(*self)
                    .partial_cmp(&bound)
                    .map_or(Comparison::NotANumber, Comparison::Ordered)
            }
        }
    )* };
}
float!(f32, f64);

impl<T: Number> Number for Option<T> {
    fn compare(&self, bound: Bound) -> Comparison {
        self.as_ref().map_or(Comparison::Absent, |value| value.compare(bound))
    }
}

/// `required`: present and not empty.
pub fn required<T: Presence>(errors: &mut ValidationErrors, field: &'static str, value: &T) {
    if !value.is_present() {
        errors.add(field, "required", "is required");
    }
}

/// `email`: one `@`, a non-empty local part, a dotted domain, no spaces.
pub fn email<T: Text>(errors: &mut ValidationErrors, field: &'static str, value: &T) {
    if let Some(text) = value.text() {
        if !is_email(text) {
            errors.add(field, "email", format!("`{text}` is not an email address"));
        }
    }
}

/// Whether `text` looks like an email address.
pub fn is_email(text: &str) -> bool {
    let Some((local, domain)) = text.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && !text.chars().any(char::is_whitespace)
        && domain.split('.').count() >= 2
        && domain.split('.').all(|label| !label.is_empty())
}

/// `min_length`: at least `min` characters (not bytes).
pub fn min_length<T: Text>(errors: &mut ValidationErrors, field: &'static str, value: &T, min: usize) {
    if let Some(text) = value.text() {
        if text.chars().count() < min {
            errors.add(field, "min_length", format!("must be at least {min} characters"));
        }
    }
}

/// `max_length`: at most `max` characters (not bytes).
pub fn max_length<T: Text>(errors: &mut ValidationErrors, field: &'static str, value: &T, max: usize) {
    if let Some(text) = value.text() {
        if text.chars().count() > max {
            errors.add(field, "max_length", format!("must be at most {max} characters"));
        }
    }
}

/// `min`: at least `min`. `NaN` fails.
pub fn min<T: Number>(errors: &mut ValidationErrors, field: &'static str, value: &T, min: Bound) {
    match value.compare(min) {
        Comparison::Ordered(Ordering::Less) => errors.add(field, "min", format!("must be at least {min}")),
        Comparison::NotANumber => errors.add(field, "min", "is not a number"),
        Comparison::Absent | Comparison::Ordered(_) => {}
    }
}

/// `max`: at most `max`. `NaN` fails.
pub fn max<T: Number>(errors: &mut ValidationErrors, field: &'static str, value: &T, max: Bound) {
    match value.compare(max) {
        Comparison::Ordered(Ordering::Greater) => errors.add(field, "max", format!("must be at most {max}")),
        Comparison::NotANumber => errors.add(field, "max", "is not a number"),
        Comparison::Absent | Comparison::Ordered(_) => {}
    }
}

/// `pattern`: the whole text matches the regular expression. `cell` caches
/// the compiled expression (one per field, generated by the derive).
pub fn pattern<T: Text>(
    errors: &mut ValidationErrors,
    field: &'static str,
    value: &T,
    pattern: &str,
    cell: &OnceLock<Option<Regex>>,
) {
    let Some(text) = value.text() else { return };
    let regex = cell.get_or_init(|| Regex::new(&format!("^(?:{pattern})$")).ok());
    match regex {
        Some(re) if re.is_match(text) => {}
        Some(_) => errors.add(field, "pattern", format!("must match `{pattern}`")),
        None => errors.add(
            field,
            "pattern",
            format!("the pattern `{pattern}` is not a valid regular expression"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let mut e = ValidationErrors::new();
        required(&mut e, "a", &String::new());
        required(&mut e, "b", &None::<String>);
        required(&mut e, "c", &"x".to_owned());
        email(&mut e, "d", &"no-at".to_owned());
        email(&mut e, "e", &"a@b.co".to_owned());
        email(&mut e, "f", &None::<String>);
        min_length(&mut e, "g", &"héé".to_owned(), 3);
        max_length(&mut e, "h", &"héé".to_owned(), 2);
        min(&mut e, "i", &5u8, Bound::Int(6));
        max(&mut e, "j", &Some(7i64), Bound::Int(7));
        let cell = OnceLock::new();
        pattern(&mut e, "k", &"abc1".to_owned(), "[a-z]+", &cell);
        assert_eq!(e.fields(), ["a", "b", "d", "h", "i", "k"]);
        assert!(is_email("ünï@exämple.org"));
    }

    #[test]
    fn bounds_compare_exactly_and_nan_fails() {
        let limit = Bound::Int(1 << 53);
        let mut e = ValidationErrors::new();
        max(&mut e, "above", &((1i64 << 53) + 1), limit);
        max(&mut e, "at", &(1i64 << 53), limit);
        max(&mut e, "nan", &f64::NAN, Bound::Float(1.5));
        min(&mut e, "nan_min", &Some(f32::NAN), Bound::Int(0));
        min(&mut e, "none", &None::<f64>, Bound::Int(0));
        min(&mut e, "below_fraction", &1i32, Bound::Float(1.5));
        min(&mut e, "above_fraction", &2i32, Bound::Float(1.5));
        max(&mut e, "huge", &u64::MAX, Bound::Float(1e300));
        assert_eq!(e.fields(), ["above", "nan", "nan_min", "below_fraction"]);
        assert!(!is_email("a@b"));
        assert!(!is_email("a b@c.d"));
    }
}
