#![doc = include_str!("../../README.md")]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
#![warn(missing_docs)]

mod action;
mod aggregate;
mod config;
mod document;
mod env;
mod error;
pub mod feed;
mod model;
mod naming;
mod query;
mod read_times;
mod reference;
mod transaction;
mod update;
pub mod validate;
mod watch;
mod write;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use action::{ActionFuture, ActionFutureOf, InTransaction};
pub use aggregate::Aggregate;
pub use config::Config;
pub use earnorm_cache::{
    self as cache_layer, bypass as bypass_cache, CacheConfig, CacheManager, CacheStats, ConnectionStatus, LocalConfig,
    NamedStats,
};
pub use earnorm_derive::{cached, Model};
pub use env::{cache, init, shutdown, Environment};
pub use error::{Error, FieldError, Result, ValidationErrors};
pub use feed::FeedStats;
/// The stream traits for [`Find::stream`] and [`Model::watch`]
/// (`use earnorm::futures::TryStreamExt;`), so that no other dependency is needed.
pub use futures_util as futures;
pub use model::{Hooks, IndexSpec, Model, ModelId};
pub use mongodb;
pub use mongodb::bson;
pub use naming::id_key;
pub use query::{Count, Find, FindById, FindManyByIds, FindOne, Projected, Projection, RecordCache, RecordStream};
pub use read_times::note_read_time;
pub use reference::{Ref, Refs};
pub use transaction::Transaction;
pub use update::{Update, UpdateOne, UpsertOne};
pub use watch::{ChangeEvent, ChangeEvents, ChangeKind};
pub use write::{Delete, DeleteMany, InsertMany, Save, UpdateMany};

/// The span of one ORM operation: `earnorm.op` with the model's collection
/// and the operation's name (never a filter, a value or an id). Cached reads
/// inside it add an `earnorm.cache` span saying how they were served.
pub(crate) fn op_span(model: &'static str, op: &'static str) -> tracing::Span {
    tracing::debug_span!("earnorm.op", model, op)
}

/// Invalidates every value cached with `#[cached(tags("..."))]` or
/// `#[cached(scope = "...")]` naming `tag`, in the current environment (tags
/// are named per database, like models). Does nothing without an environment.
pub async fn invalidate_tag(tag: &str) {
    if let Ok(env) = Environment::current() {
        let name = env.model_scope(tag);
        env.cache().invalidate(&[earnorm_cache::Scope::Tag(&name)]).await;
    }
}

/// The names most programs need: `use earnorm::prelude::*;`.
pub mod prelude {
    pub use crate::{cached, CacheConfig, Config, Environment, Model};
}
