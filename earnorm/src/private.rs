//! Support for generated code. Not a public API: names here may change in
//! any release. `#[derive(Model)]` and `#[cached]` name only these paths.

use std::time::Duration;

use std::marker::PhantomData;

use earnorm_cache::{CacheKey, CacheManager, Fingerprint, Keeper, KeyBuilder, Scope, Stored};
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

/// What identifies a cached function, as `#[cached]` writes it out.
#[derive(Debug, Clone, Copy)]
pub struct Method<'a> {
    /// The key's name (the function's, or `key = ".."`).
    pub name: &'a str,
    /// `version = N`.
    pub version: u32,
    /// Whether its values may be kept in the in-process tier (`local`).
    pub local: bool,
    /// The type names of `Self`, of its type parameters and of its return type.
    pub identity: &'a [&'static str],
    /// `depends_on(..)` and `tags(..)`.
    pub deps: &'a [Dep],
}

fn finish<A: Serialize + ?Sized>(mut builder: KeyBuilder, method: &Method<'_>, args: &A) -> Option<CacheKey> {
    builder = builder.raw(&method.version.to_le_bytes());
    for name in method.identity {
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
/// identifies the function and the arguments. `None` (call uncached)
/// without an environment or an id.
pub fn record_method_key<M: Model, A: Serialize + ?Sized>(
    record: &M,
    method: &Method<'_>,
    args: &A,
) -> Option<(CacheManager, CacheKey)> {
    let id = record.id_key()?;
    key(
        Namespace::Model(M::COLLECTION),
        method,
        record,
        args,
        |builder, model| builder.scope(Scope::Record(model, &id)).arg(record).ok(),
    )
}

/// Key of a model-scope associated function.
pub fn model_key<M: Model, A: Serialize + ?Sized>(method: &Method<'_>, args: &A) -> Option<(CacheManager, CacheKey)> {
    key(Namespace::Model(M::COLLECTION), method, &(), args, |builder, model| {
        Some(builder.scope(Scope::Model(model)))
    })
}

/// Key of a function with an explicit scope (`namespace` is its module path).
pub fn free_key<A: Serialize + ?Sized>(
    namespace: &str,
    method: &Method<'_>,
    args: &A,
) -> Option<(CacheManager, CacheKey)> {
    key(Namespace::Free(namespace), method, &(), args, |builder, _| {
        Some(builder)
    })
}

/// The in-process hit of a record-scope method: its value, when the current
/// environment's in-process tier holds a current one, found without
/// building its key ([`record_method_key`] names it by the same
/// fingerprint).
pub fn record_method_hit<M: Model, R: 'static, O: Output<R>, A: Serialize + ?Sized>(
    record: &M,
    method: &Method<'_>,
    args: &A,
    keeper: Option<Keeper>,
) -> Option<R> {
    hit::<R, O, _, _>(Namespace::Model(M::COLLECTION), method, record, args, keeper)
}

/// The in-process hit of a model-scope associated function.
pub fn model_hit<M: Model, R: 'static, O: Output<R>, A: Serialize + ?Sized>(
    method: &Method<'_>,
    args: &A,
    keeper: Option<Keeper>,
) -> Option<R> {
    hit::<R, O, _, _>(Namespace::Model(M::COLLECTION), method, &(), args, keeper)
}

/// The in-process hit of a function with an explicit scope.
pub fn free_hit<R: 'static, O: Output<R>, A: Serialize + ?Sized>(
    namespace: &str,
    method: &Method<'_>,
    args: &A,
    keeper: Option<Keeper>,
) -> Option<R> {
    hit::<R, O, _, _>(Namespace::Free(namespace), method, &(), args, keeper)
}

fn hit<R: 'static, O: Output<R>, S: Serialize + ?Sized, A: Serialize + ?Sized>(
    namespace: Namespace<'_>,
    method: &Method<'_>,
    owner: &S,
    args: &A,
    keeper: Option<Keeper>,
) -> Option<R> {
    if !method.local {
        return None;
    }
    with_current(|cache, database| {
        if !cache.has_local() {
            return None;
        }
        let id = fingerprint(&namespace, database, method, owner, args)?;
        cache.local_hit::<R, O>(id, keeper)
    })?
}

/// What names a cached function's value in the in-process tier: everything
/// its key is built from (namespace and database, the method, its scopes'
/// sources, the arguments), hashed without building the key. `owner` is the
/// record of a record method (its id and content), `()` otherwise.
fn fingerprint<S: Serialize + ?Sized, A: Serialize + ?Sized>(
    namespace: &Namespace<'_>,
    database: &str,
    method: &Method<'_>,
    owner: &S,
    args: &A,
) -> Option<u128> {
    let (kind, name) = match namespace {
        Namespace::Model(collection) => (b"m", *collection),
        Namespace::Free(module) => (b"f", *module),
    };
    // One buffer per thread, reused: hashing it at once costs less than
    // streaming the parts into a hasher.
    thread_local! {
        static BUFFER: std::cell::RefCell<Fingerprint> = std::cell::RefCell::new(Fingerprint::default());
    }
    BUFFER.with(|buffer| {
        let Ok(mut print) = buffer.try_borrow_mut() else {
            return fingerprint_into(&mut Fingerprint::default(), kind, name, database, method, owner, args);
        };
        fingerprint_into(&mut print, kind, name, database, method, owner, args)
    })
}

fn fingerprint_into<S: Serialize + ?Sized, A: Serialize + ?Sized>(
    print: &mut Fingerprint,
    kind: &[u8],
    name: &str,
    database: &str,
    method: &Method<'_>,
    owner: &S,
    args: &A,
) -> Option<u128> {
    print.clear();
    print
        .raw(kind)
        .raw(database.as_bytes())
        .raw(name.as_bytes())
        .raw(method.name.as_bytes())
        .raw(&method.version.to_le_bytes());
    // The type names come from `type_name`: static strings, told apart by
    // where they are and how long, in this process (which is all the
    // tier's ids need; equal places and lengths are equal names).
    for name in method.identity {
        print
            .raw(&(name.as_ptr() as usize).to_le_bytes())
            .raw(&name.len().to_le_bytes());
    }
    for dep in method.deps {
        match *dep {
            Dep::Model(model) => print.raw(b"m").raw(model.as_bytes()),
            Dep::Tag(tag) => print.raw(b"t").raw(tag.as_bytes()),
        };
    }
    print.arg(owner).ok()?.arg(args).ok()?;
    Some(print.finish())
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
/// arguments; in the in-process tier it is named by its fingerprint.
fn key<S: Serialize + ?Sized, A: Serialize + ?Sized>(
    namespace: Namespace<'_>,
    method: &Method<'_>,
    owner: &S,
    args: &A,
    scope: impl FnOnce(KeyBuilder, &str) -> Option<KeyBuilder>,
) -> Option<(CacheManager, CacheKey)> {
    with_current(|cache, database| {
        let named = match namespace {
            Namespace::Model(collection) => model_scope(database, collection),
            Namespace::Free(module) => model_scope(database, module),
        };
        let mut builder = cache.key(&named, method.name).local(method.local);
        if cache.has_local() && method.local {
            builder = builder.local_id(fingerprint(&namespace, database, method, owner, args)?);
        }
        let builder = scope(builder, &named)?;
        let builder = add_deps(builder, database, method.deps);
        Some((cache.clone(), finish(builder, method, args)?))
    })?
}

/// Picks how a result of type `R`, cached as output `O` says, is kept in
/// the in-process tier: by value when the part stored is `Clone`
/// ([`KeepByClone`]), else as its payload ([`KeepByPayload`]). Call
/// `(&Pick::<R, O>::new()).keeper()` with both traits in scope: method
/// resolution takes the first where it applies.
pub struct Pick<R, O>(PhantomData<fn() -> (R, O)>);

impl<R, O> Pick<R, O> {
    /// The picker.
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<R, O> std::fmt::Debug for Pick<R, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pick")
    }
}

/// Kept by value: the part stored is `Clone`.
pub trait KeepByClone {
    /// The keeper.
    fn keeper(&self) -> Option<Keeper>;
}

impl<R: 'static, O> KeepByClone for Pick<R, O>
where
    O: Stored<R>,
    O::Value: Clone + Send + Sync + 'static,
{
    fn keeper(&self) -> Option<Keeper> {
        Some(Keeper::cloned::<R, O>())
    }
}

/// Kept as its payload: any other type.
pub trait KeepByPayload {
    /// No keeper.
    fn keeper(&self) -> Option<Keeper>;
}

impl<R, O> KeepByPayload for &Pick<R, O> {
    fn keeper(&self) -> Option<Keeper> {
        None
    }
}

/// `key`, kept in process as `keeper` says when there is one.
pub fn kept(key: CacheKey, keeper: Option<Keeper>) -> CacheKey {
    match keeper {
        Some(keeper) => key.kept_by(keeper),
        None => key,
    }
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

/// A deliberately broken build, for the consistency monitor's tests: while
/// set, writes through the ORM skip their invalidation (the consistency
/// monitor still sees them). Only with the `test-hooks` feature, which no
/// application should enable.
#[cfg(feature = "test-hooks")]
pub static WRITE_INVALIDATIONS_SKIPPED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
