//! Support for generated code. Not a public API: names here may change in
//! any release. `#[derive(Model)]` and `#[cached]` name only these paths.

use std::time::Duration;

use earnorm_cache::{CacheKey, CacheManager, KeyBuilder, Scope};
use serde::{de::DeserializeOwned, Serialize};
use tracing::debug;

use crate::env::with_current;
use crate::naming::model_scope;
use crate::Model;

pub use core::future::Future;
pub use core::option::Option;
pub use core::result::Result;
pub use earnorm_cache::{OptionOutput, Output, PlainOutput, ResultOutput};
pub use mongodb::bson;
pub use regex::Regex;
pub use serde;
pub use std::sync::OnceLock;
pub use std::vec::Vec;

pub use crate::model::{IndexSpec, ModelId};
pub use crate::validate;
pub use crate::ValidationErrors;

/// A dependency declared in `#[cached(depends_on(..), tags(..))]`.
#[derive(Debug, Clone, Copy)]
pub enum Dep {
    /// Any write to this collection invalidates the value.
    Model(&'static str),
    /// `earnorm::invalidate_tag(tag)` in the same environment invalidates the
    /// value (tags, like models, are named per database).
    Tag(&'static str),
}

fn add_deps(mut builder: KeyBuilder, database: &str, deps: &[Dep]) -> KeyBuilder {
    for dep in deps {
        builder = match *dep {
            Dep::Model(model) => builder.scope(Scope::Model(&model_scope(database, model))),
            Dep::Tag(tag) => builder.scope(Scope::Tag(&model_scope(database, tag))),
        };
    }
    builder
}

fn finish<A: Serialize + ?Sized>(
    mut builder: KeyBuilder,
    version: u32,
    identity: &[&str],
    args: &A,
) -> Option<CacheKey> {
    builder = builder.raw(&version.to_le_bytes());
    for name in identity {
        builder = builder.raw(name.as_bytes());
    }
    match builder.arg(args).and_then(KeyBuilder::build) {
        Ok(key) => Some(key),
        Err(err) => {
            debug!(error = %err, "arguments do not encode: calling without the cache");
            None
        }
    }
}

/// Key of a record-scope method: the model, the record id, the method, the
/// record's own content (so an outdated copy uses another entry), what
/// identifies the function (`identity`: the type names of `Self`, of its type
/// parameters and of its return type) and the arguments. `None` (call
/// uncached) without an environment or an id.
pub fn record_method_key<M: Model, A: Serialize + ?Sized>(
    record: &M,
    name: &str,
    version: u32,
    identity: &[&str],
    deps: &[Dep],
    args: &A,
) -> Option<(CacheManager, CacheKey)> {
    let id = record.id_key()?;
    key(
        Namespace::Model(M::COLLECTION),
        name,
        version,
        identity,
        deps,
        args,
        |builder, model| builder.scope(Scope::Record(model, &id)).arg(record).ok(),
    )
}

/// Key of a model-scope associated function.
pub fn model_key<M: Model, A: Serialize + ?Sized>(
    name: &str,
    version: u32,
    identity: &[&str],
    deps: &[Dep],
    args: &A,
) -> Option<(CacheManager, CacheKey)> {
    key(
        Namespace::Model(M::COLLECTION),
        name,
        version,
        identity,
        deps,
        args,
        |builder, model| Some(builder.scope(Scope::Model(model))),
    )
}

/// Key of a function with an explicit scope (`namespace` is its module path).
pub fn free_key<A: Serialize + ?Sized>(
    namespace: &str,
    name: &str,
    version: u32,
    identity: &[&str],
    deps: &[Dep],
    args: &A,
) -> Option<(CacheManager, CacheKey)> {
    key(
        Namespace::Free(namespace),
        name,
        version,
        identity,
        deps,
        args,
        |builder, _| Some(builder),
    )
}

/// Where a cached function lives.
enum Namespace<'a> {
    /// On a model: its collection (named `DATABASE.COLLECTION` in the cache).
    Model(&'a str),
    /// A free function: its module path.
    Free(&'a str),
}

/// Builds a key in the current environment: the namespace, then `scope`
/// adds the function's own scope, then the declared dependencies and the
/// arguments.
fn key<A: Serialize + ?Sized>(
    namespace: Namespace<'_>,
    name: &str,
    version: u32,
    identity: &[&str],
    deps: &[Dep],
    args: &A,
    scope: impl FnOnce(KeyBuilder, &str) -> Option<KeyBuilder>,
) -> Option<(CacheManager, CacheKey)> {
    with_current(|cache, database| {
        let namespace = match namespace {
            Namespace::Model(collection) => model_scope(database, collection),
            Namespace::Free(module) => model_scope(database, module),
        };
        let builder = scope(cache.key(&namespace, name), &namespace)?;
        let builder = add_deps(builder, database, deps);
        Some((cache.clone(), finish(builder, version, identity, args)?))
    })?
}

/// A TTL in seconds.
pub const fn ttl(seconds: u64) -> Option<Duration> {
    Some(Duration::from_secs(seconds))
}

/// Compile-time check that an argument type is serializable.
pub const fn assert_serialize<T: Serialize + ?Sized>() {}

/// Compile-time check that a cached value type round-trips.
pub const fn assert_cacheable<T: Serialize + DeserializeOwned>() {}

/// Compile-time check that `Self` is a model.
pub const fn assert_model<M: Model>() {}
