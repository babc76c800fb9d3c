//! Cache keys: the name of a value and the generations that guard it.
//!
//! Every key's name comes from [`Keyspace`](crate::keyspace::Keyspace),
//! which has the table of them; a value's key is `P v:NS:NAME:ID:HASH`.
//!
//! `HASH` is a 128-bit XXH3 of the canonical encoding of the arguments (and,
//! for record methods, of the record itself, and of the type names that
//! identify the function; see `KeyEncoder`), with fixed seeds: the same values
//! give the same key in every process and on every run. One caveat:
//! serde encodes a `HashMap` or `HashSet` in its (randomly seeded) iteration
//! order, so such arguments can give different keys in different processes;
//! that costs misses, never wrong values. Prefer `BTreeMap`/`BTreeSet` in
//! cached arguments and records.

use std::fmt::Write as _;

use serde::Serialize;
use xxhash_rust::xxh3::{xxh3_128_with_seed, xxh3_64, Xxh3};

use crate::codec::Keeper;
use crate::key_encoding::{encode_arg, encode_raw};
use crate::keyspace::Keyspace;
use crate::scope::Scope;
use crate::stats::NamedCounters;
use crate::CacheError;

/// Most scopes one key may depend on (the envelope stores one byte of count).
pub const MAX_DEPENDENCIES: usize = 32;

/// A complete cache key: where the value lives and which generations guard it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    pub(crate) value: String,
    pub(crate) generations: Vec<String>,
    /// Whether a followed database feed invalidates every scope the value
    /// depends on (record and model scopes of its database; no tag).
    pub(crate) feed_covered: bool,
    /// The counters of the key's namespace and name.
    pub(crate) named: Named,
    /// The key of the value in the in-process tier: a hash of `value`, or
    /// the caller's [`Fingerprint`], with a seed random per process.
    pub(crate) local: u128,
    /// The in-process stripe of each generation in `generations`, in order.
    pub(crate) stripes: Vec<u32>,
    /// Whether the value may be kept in the in-process tier.
    pub(crate) in_process: bool,
    /// How the value is kept there (by default, as its encoded payload).
    pub(crate) keeper: Keeping,
}

/// The [`Keeper`] of a key, if any; keys compare equal whatever they hold.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Keeping(pub(crate) Option<Keeper>);

impl PartialEq for Keeping {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Keeping {}

/// The counters of a key's name; keys compare equal whatever they hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct Named(pub(crate) Option<std::sync::Arc<NamedCounters>>);

impl PartialEq for Named {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for Named {}

impl Named {
    pub(crate) fn get(&self) -> Option<&NamedCounters> {
        self.0.as_deref()
    }
}

impl CacheKey {
    /// The Redis key of the value.
    pub fn as_str(&self) -> &str {
        &self.value
    }

    /// The Redis keys of the generations this value is checked against.
    pub fn generations(&self) -> &[String] {
        &self.generations
    }

    /// Keeps this key's value in the in-process tier as `keeper` says (by
    /// value, cloned out on a hit) instead of as its encoded payload. Make
    /// the keeper for the call's result type and output
    /// (`Keeper::cloned::<R, O>()`): one made for another result type is
    /// ignored, but one made for another output of the same type decides
    /// what is kept (a `PlainOutput` keeper would keep `None`s that an
    /// `OptionOutput` call does not cache). A value kept by value is shared
    /// by the hits that clone it: interior mutability (an `Arc<Mutex<_>>`
    /// inside) is shared too, where decoded payloads are fresh copies.
    #[must_use]
    pub fn kept_by(mut self, keeper: Keeper) -> Self {
        self.keeper = Keeping(Some(keeper));
        self
    }
}

/// A 128-bit hash of what makes a key, computed without building it: how a
/// caller names a value in the in-process tier cheaply (see
/// [`KeyBuilder::local_id`] and [`CacheManager::local_hit`](crate::CacheManager::local_hit)).
/// The same canonical encoding as the key's own hash, written into a
/// buffer and hashed at once, with a seed random per process; the caller
/// mixes in everything the key is built from (namespace, name, scopes,
/// arguments), each part self-delimiting.
#[derive(Debug, Clone, Default)]
pub struct Fingerprint(Vec<u8>);

impl Fingerprint {
    /// Mixes raw bytes in, length first.
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        encode_raw(&mut self.0, bytes);
        self
    }

    /// Mixes a value in by its canonical encoding (see [`KeyBuilder::arg`]).
    ///
    /// # Errors
    /// [`CacheError::KeyArgument`] when the value cannot be serialized.
    pub fn arg<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<&mut Self, CacheError> {
        encode_arg(&mut self.0, value)?;
        Ok(self)
    }

    /// Empties it, for another key (its buffer is kept).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// The 128-bit id.
    pub fn finish(&self) -> u128 {
        xxh3_128_with_seed(&self.0, seed())
    }
}

/// Builds a [`CacheKey`]; get one from [`CacheManager::key`](crate::CacheManager::key).
pub struct KeyBuilder {
    /// `PREFIX v:NAMESPACE:NAME:` so far; the id and hash are appended by `build`.
    value: String,
    prefix_len: usize,
    id: Option<String>,
    generations: Vec<String>,
    /// The start of the scope names a followed database feed covers.
    feed_scopes: Option<std::sync::Arc<str>>,
    /// Whether every scope so far is one the feed covers.
    feed_covered: bool,
    named: Named,
    in_process: bool,
    /// The key's identity in the in-process tier, when the caller computed
    /// it itself (see [`Fingerprint`]).
    local_id: Option<u128>,
    hasher: Xxh3,
}

impl std::fmt::Debug for KeyBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyBuilder")
            .field("key", &self.value)
            .field("id", &self.id)
            .field("generations", &self.generations)
            .finish_non_exhaustive()
    }
}

impl KeyBuilder {
    pub(crate) fn new(
        prefix: &str,
        namespace: &str,
        name: &str,
        feed_scopes: Option<std::sync::Arc<str>>,
        named: Option<std::sync::Arc<NamedCounters>>,
    ) -> Self {
        let value = Keyspace::new(prefix).value_start(namespace, name);
        Self {
            value,
            prefix_len: prefix.len(),
            id: None,
            generations: Vec::with_capacity(3),
            feed_covered: feed_scopes.is_some(),
            feed_scopes,
            named: Named(named),
            in_process: true,
            local_id: None,
            hasher: Xxh3::new(),
        }
    }

    /// Adds a scope the value depends on. A `Record` scope also puts the
    /// record id into the key, so that it can be found by pattern.
    #[must_use]
    pub fn scope(mut self, scope: Scope<'_>) -> Self {
        if let Scope::Record(_, id) = scope {
            self.id.get_or_insert_with(|| id.to_owned());
        }
        let covered = match scope {
            Scope::Record(model, _) | Scope::Model(model) => self
                .feed_scopes
                .as_deref()
                .is_some_and(|start| model.starts_with(start)),
            Scope::Tag(_) => false,
        };
        self.feed_covered &= covered;
        Keyspace::new(&self.value[..self.prefix_len]).read_generations(scope, &mut self.generations);
        self
    }

    /// Whether the value may be kept in the in-process tier (when the
    /// manager has one; on by default). Off: every read of it goes to
    /// Redis, which no other process's write can leave stale (what
    /// `#[cached(local = false)]` does).
    #[must_use]
    pub fn local(mut self, allowed: bool) -> Self {
        self.in_process = allowed;
        self
    }

    /// Names the value in the in-process tier by `id` (a [`Fingerprint`] of
    /// everything that makes this key) instead of by a hash of the finished
    /// key, so that [`CacheManager::local_hit`](crate::CacheManager::local_hit)
    /// finds it without the key being built. Two keys that differ must have
    /// different ids.
    #[must_use]
    pub fn local_id(mut self, id: u128) -> Self {
        self.local_id = Some(id);
        self
    }

    /// Mixes one argument into the key hash, by its canonical encoding
    /// (streamed into the hash; every value is self-delimiting and no two
    /// different values of a type encode alike: `None`, `Some(None)` and
    /// `Some(())` differ, and so do unit structs of different names).
    ///
    /// # Errors
    /// [`CacheError::KeyArgument`] when the argument cannot be serialized.
    pub fn arg<T: Serialize + ?Sized>(mut self, value: &T) -> Result<Self, CacheError> {
        encode_arg(&mut self.hasher, value)?;
        Ok(self)
    }

    /// Mixes raw bytes (already canonical) into the key hash, length first.
    #[must_use]
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        encode_raw(&mut self.hasher, bytes);
        self
    }

    /// Finishes the key.
    ///
    /// # Errors
    /// [`CacheError::InvalidKey`] when more than [`MAX_DEPENDENCIES`] scopes were added.
    pub fn build(mut self) -> Result<CacheKey, CacheError> {
        if self.generations.len() > MAX_DEPENDENCIES {
            return Err(CacheError::InvalidKey(format!(
                "a cache key may depend on at most {MAX_DEPENDENCIES} scopes"
            )));
        }
        self.value.push_str(self.id.as_deref().unwrap_or("_"));
        let _ = write!(self.value, ":{:032x}", self.hasher.digest128());
        let prefix_len = self.prefix_len;
        Ok(CacheKey {
            local: self
                .local_id
                .unwrap_or_else(|| xxh3_128_with_seed(self.value.as_bytes(), seed())),
            stripes: self
                .generations
                .iter()
                .map(|name| stripe(name.as_bytes().get(prefix_len..).unwrap_or(name.as_bytes())))
                .collect(),
            value: self.value,
            generations: self.generations,
            feed_covered: self.feed_covered,
            named: self.named,
            in_process: self.in_process,
            keeper: Keeping::default(),
        })
    }
}

/// Number of generation stripes (a power of two).
pub(crate) const STRIPES: usize = 1 << 16;

/// The seed of this process's in-process ids ([`CacheKey::local`],
/// `Fingerprint`): random per process, so that nobody who controls key
/// arguments (record ids, say) can craft two keys with one id; the tier is
/// never shared with another process, so its ids need not agree with theirs.
pub(crate) fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(crate::token::random_u64)
}

/// The stripe of the generation key `name` (relative to the prefix).
pub(crate) fn stripe(name: &[u8]) -> u32 {
    // The mask keeps 16 bits: the cast cannot truncate.
    (xxh3_64(name) as usize & (STRIPES - 1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_canonical_and_separate_arguments() {
        let a = KeyBuilder::new("p:", "users", "profile", None, None)
            .scope(Scope::Record("users", "1"))
            .arg(&(1u8, "x"))
            .and_then(KeyBuilder::build)
            .expect("key");
        let b = KeyBuilder::new("p:", "users", "profile", None, None)
            .scope(Scope::Record("users", "1"))
            .arg(&(1u8, "x"))
            .and_then(KeyBuilder::build)
            .expect("key");
        let c = KeyBuilder::new("p:", "users", "profile", None, None)
            .scope(Scope::Record("users", "2"))
            .arg(&(1u8, "x"))
            .and_then(KeyBuilder::build)
            .expect("key");
        let d = KeyBuilder::new("p:", "users", "profile", None, None)
            .arg("ab")
            .and_then(|k| k.arg("c"))
            .and_then(KeyBuilder::build)
            .expect("key");
        let e = KeyBuilder::new("p:", "users", "profile", None, None)
            .arg("a")
            .and_then(|k| k.arg("bc"))
            .and_then(KeyBuilder::build)
            .expect("key");
        assert_eq!(a, b);
        assert_ne!(a.value, c.value);
        assert_ne!(d.value, e.value);
        assert!(a.value.starts_with("p:v:users:profile:1:"));
        assert_eq!(a.generations, ["p:g:m:users", "p:g:r:users:1"]);
    }

    #[test]
    fn a_feed_covers_only_the_scopes_of_its_database() {
        let feed = Some(std::sync::Arc::from("db."));
        let key = |scope: Scope<'_>| {
            KeyBuilder::new("p:", "n", "f", feed.clone(), None)
                .scope(scope)
                .build()
                .expect("key")
                .feed_covered
        };
        assert!(key(Scope::Record("db.users", "1")));
        assert!(key(Scope::Model("db.users")));
        assert!(!key(Scope::Record("users", "1")), "a name of no database");
        assert!(!key(Scope::Model("other.users")), "another database");
        assert!(!key(Scope::Tag("db.rates")), "tags are not database writes");
        let none = KeyBuilder::new("p:", "n", "f", None, None)
            .scope(Scope::Record("db.users", "1"))
            .build()
            .expect("key");
        assert!(!none.feed_covered, "no feed followed");
    }
}
