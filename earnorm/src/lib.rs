//! # EarnORM
//!
//! An async ORM for MongoDB with a Redis cache built in. Derive [`Model`] on
//! a struct, mark expensive async methods with [`cached`], and every write
//! through the ORM invalidates exactly what it made stale.
//!
//! ```no_run
//! use earnorm::prelude::*;
//! use earnorm::bson::oid::ObjectId;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize, Model)]
//! #[earnorm(collection = "users")]
//! pub struct User {
//!     #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
//!     pub id: Option<ObjectId>,
//!     #[earnorm(required)]
//!     pub name: String,
//!     #[earnorm(email)]
//!     pub email: String,
//! }
//!
//! impl User {
//!     /// Runs once per record state and TTL; later calls are cache hits.
//!     #[cached(ttl = 300)]
//!     pub async fn greeting(&self) -> earnorm::Result<String> {
//!         Ok(format!("Hello, {}!", self.name))
//!     }
//! }
//!
//! # async fn demo() -> earnorm::Result<()> {
//! earnorm::init(Config::default()).await?;
//! let mut user = User { id: None, name: "Ada".into(), email: "ada@example.com".into() };
//! user.save().await?;
//! let hello = user.greeting().await?;
//! # let _ = hello; Ok(()) }
//! ```
//!
//! See the README for environments, scopes and the cache's guarantees.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
#![warn(missing_docs)]

mod config;
mod env;
mod error;
mod model;
pub mod validate;

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;

pub use config::Config;
pub use earnorm_cache::{
    self as cache_layer, bypass as bypass_cache, CacheConfig, CacheManager, CacheStats, ConnectionStatus,
};
pub use earnorm_derive::{cached, Model};
pub use env::{cache, init, Environment};
pub use error::{Error, FieldError, Result, ValidationErrors};
pub use model::{id_key, IndexSpec, Model, ModelId};
pub use mongodb;
pub use mongodb::bson;
pub use mongodb::options::FindOptions;

/// Invalidates every value cached with `#[cached(tags("..."))]` naming `tag`,
/// in the current environment.
pub async fn invalidate_tag(tag: &str) {
    cache().invalidate(&[earnorm_cache::Scope::Tag(tag)]).await;
}

/// The names most programs need: `use earnorm::prelude::*;`.
pub mod prelude {
    pub use crate::{cached, CacheConfig, Config, Environment, Model};
}
