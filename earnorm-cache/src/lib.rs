//! # earnorm-cache
//!
//! A Redis cache manager for async Rust that never takes the application down
//! and does not serve a value older than a write acknowledged (and
//! invalidated through a manager) before the read began; the one exception,
//! a process that alone loses Redis, is described under "Invalidations that
//! cannot be sent". It is the cache behind EarnORM's `#[cached]`, and works on
//! its own with any data source.
//!
//! ```no_run
//! use std::time::Duration;
//! use earnorm_cache::{CacheConfig, CacheManager, ResultOutput, Scope};
//!
//! # async fn load_profile(id: &str) -> Result<String, std::io::Error> { Ok(id.to_owned()) }
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let cache = CacheManager::connect(Some("redis://localhost:6379/0"), CacheConfig::default()).await?;
//!
//! // Cache-aside: a hit returns the stored value, a miss computes and stores it.
//! let key = cache.key("users", "profile").scope(Scope::Record("users", "42")).build()?;
//! let profile: Result<String, std::io::Error> = cache
//!     .get_or_compute::<_, ResultOutput, _>(&key, Some(Duration::from_secs(300)), load_profile("42"))
//!     .await;
//!
//! // After writing user 42 to the database:
//! cache.invalidate(&[Scope::Record("users", "42")]).await;
//! # let _ = profile; Ok(()) }
//! ```
//!
//! ## Guarantees and how they are met
//!
//! **Fail open, bounded.** Every Redis operation runs under
//! `operation_timeout`; any failure (refused, reset, timeout, corrupt value)
//! makes [`CacheManager::get_or_compute`] compute instead. A failure marks the
//! connection down and later calls skip Redis without waiting until the
//! background supervisor has reconnected ([`health`]).
//!
//! **Invalidation in O(1) round trips, no scanning.** Each value depends on
//! one or two *generation* keys (its record and its model, or its model's
//! queries, or a tag; see [`Scope`]). A stored value carries the generation
//! tokens it was computed under, and a lookup reads the value and the current
//! tokens in one `MGET`: a value whose tokens differ is never served. A write
//! invalidates by giving each scope it touched a fresh random token (one
//! pipelined `SET` per scope), so its cost does not depend on how many keys
//! Redis holds, and only this manager's prefix is ever touched.
//!
//! **No stale sets.** The classic race: a reader misses, reads the old row, a
//! writer commits and invalidates, then the reader stores the old row. Here
//! the reader notes the generation tokens *before* computing (they come back
//! with the missing lookup; absent ones it creates first, with `SET NX`), and
//! stores with a Lua compare-and-set that writes only if every token is still
//! the one it noted. The writer's invalidation happens after its commit and
//! replaces a token, so:
//!
//! * if the reader noted tokens before the invalidation, the store happens
//!   after the reader computed, the comparison sees the new token, and the
//!   store is refused;
//! * if the reader noted tokens after the invalidation, its database read
//!   also started after the commit, so its value is not stale.
//!
//! An absent token (expired, evicted, Redis restarted empty) never matches:
//! neither a stored value (which only carries real tokens) nor a store's
//! expectation. So eviction and restarts can cost misses, never staleness.

//! Values shared between concurrent callers follow the same rule: a leader's
//! value is handed to a waiting caller only when its store succeeded, or when
//! the leader started after that caller began ([`flight`]).
//!
//! **Invalidations that cannot be sent** (Redis down or frozen) are queued and
//! replayed before a new connection is used, so a value made stale during an
//! outage is not served after it; and after an outage a manager serves no
//! hits for a quarantine, until other processes have replayed theirs
//! ([`health`]). The queue is bounded: on overflow, record invalidations fold
//! into their models'. The exception: while one process alone cannot reach
//! Redis (a one-sided partition, a local timeout) and others can, those
//! others keep serving entries its writes made stale until it reconnects and
//! replays them; only invalidation from the database itself (change streams)
//! can close that.
//!
//! **Outdated in-memory copies.** Callers that put the record's own content
//! into the key (as `#[cached]` does for record methods, with
//! [`KeyBuilder::arg`]) make a caller holding an old copy of a record read and
//! write a different entry than a caller holding the current one.
//!
//! **Stampedes.** Concurrent misses on one key share one computation per
//! process ([`flight`]): callers that arrive while it runs wait for it, and
//! use its value when it is provably fresh for them; otherwise they join the
//! next computation. Exceptions: a result that is not cached (an `Err`, a
//! `None`) sends waiting callers to compute their own, and a local
//! invalidation starts new computations for callers arriving after it.
//!
//! **Safe values.** Values are MessagePack in a versioned envelope
//! ([`codec`]); anything that does not decode is a miss and is removed.
//!
//! **Observable.** [`CacheManager::stats`], [`CacheManager::subscribe`], and
//! `tracing` events: connection changes at `info`/`warn`, operations at
//! `debug`/`trace`. URLs are logged with passwords redacted.
//!
//! **Without Redis.** A manager built with no URL caches nothing: every call
//! computes. (There is no in-process tier: it could not be kept coherent
//! across processes.)
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
#![warn(missing_docs)]

mod backoff;
pub mod codec;
mod config;
mod error;
pub mod flight;
pub mod health;
pub mod invalidate;
mod key;
mod manager;
mod redact;
mod stats;
mod token;

pub use codec::{OptionOutput, Output, PlainOutput, ResultOutput};
pub use config::CacheConfig;
pub use error::CacheError;
pub use key::{escape_glob, CacheKey, KeyBuilder, Scope, MAX_DEPENDENCIES};
pub use manager::{bypass, CacheManager};
pub use redact::redact_url;
pub use stats::{CacheStats, ConnectionStatus};
