//! # earnorm-cache
//!
//! A Redis cache manager for async Rust that never takes the application down
//! and does not serve a value older than a write acknowledged (and
//! invalidated through a manager) before the read began; the one exception,
//! a manager cut off from Redis, is described under "Invalidations that
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
//! makes [`CacheManager::get_or_compute`] compute instead. A refused or
//! reset connection is dropped, and later calls skip Redis without waiting
//! until the background supervisor has reconnected; a timeout makes the
//! connection suspect (calls skip it too) until a `PING` on it tells a slow
//! Redis, kept without a reconnect, from a gone one, dropped
//! (`connection/link.rs`, `connection/supervisor.rs`).
//!
//! **Invalidation in O(1) round trips, no scanning.** Each value depends on
//! one or two *generation* keys (its record and its model, or its model's
//! queries, or a tag; see [`Scope`]). A stored value carries the generation
//! tokens it was computed under, and a lookup reads the value and the current
//! tokens in one `MGET`: a value whose tokens differ is never served. A write
//! invalidates by deleting the generation of each scope it touched (one
//! pipelined `DEL` per scope; Redis accepts deletions even when it is out of
//! memory), so its cost does not depend on how many keys Redis holds, and
//! only this manager's prefix is ever touched. The prefix must not be empty,
//! and keys put a `:` after it.
//!
//! **No stale sets.** The classic race: a reader misses, reads the old row, a
//! writer commits and invalidates, then the reader stores the old row. Here
//! the reader notes the generation tokens *before* computing (they come back
//! with the missing lookup; absent ones it creates first, with `SET NX`), and
//! stores with a Lua compare-and-set that writes only if every token is still
//! the one it noted (refused up front when Redis is out of memory). The
//! writer's invalidation happens after its commit and removes a token, so:
//!
//! * if the reader noted tokens before the invalidation, the store happens
//!   after the reader computed, the comparison sees the token gone (or a new
//!   one), and the store is refused;
//! * if the reader noted tokens after the invalidation, its database read
//!   also started after the commit, so its value is not stale.
//!
//! A batch ([`CacheManager::get_many_or_compute`]) stores without the
//! script, in one pipeline of plain `SET`s: each value carries the tokens
//! its computation began under (absent ones are created in the lookup's
//! round trip, before the computation starts), so one that a write made
//! stale meanwhile is stored but never served (every lookup compares the
//! tokens), and expires by its TTL.
//!
//! An absent token (expired, evicted, Redis restarted empty) never matches:
//! neither a stored value (which only carries real tokens) nor a store's
//! expectation. So eviction and restarts can cost misses, never staleness.

//! Values shared between concurrent callers follow the same rule: a leader's
//! value is handed to a waiting caller only when its store succeeded, or when
//! the leader started after that caller began (the `flight` module).
//!
//! **Invalidations that cannot be sent** (Redis down or frozen) are queued
//! in an outbox and replayed before a new connection is used, so a value
//! made stale during an outage is not served after it by the manager that
//! queued it (the `outbox` module). The outbox is bounded: past 10,000
//! scopes it invalidates everything under the prefix on replay. Other
//! managers learn that one is cut off through heartbeats in Redis: every
//! connected manager beats every `heartbeat_interval`, and while one sharing
//! the prefix has been silent for `2 * heartbeat_interval +
//! operation_timeout` (1.25 s with the defaults), the others serve no hits
//! until it is back (having replayed) or is forgotten as gone
//! (`connection/presence.rs`). The exception: in the first
//! `2 * heartbeat_interval + operation_timeout` after a manager is cut off,
//! before its silence shows, the others can serve entries its writes made
//! stale; and a manager missing for longer than its quarantine
//! (`max(health_check_interval, longest back-off step) + connect_timeout +
//! operation_timeout`: 32.25 s with the defaults) is treated as gone. Only
//! invalidation from the database itself (change streams, see
//! [`CacheManager::follow_feed`]) closes those.
//!
//! **Outdated in-memory copies.** Callers that put the record's own content
//! into the key (as `#[cached]` does for record methods, with
//! [`KeyBuilder::arg`]) make a caller holding an old copy of a record read and
//! write a different entry than a caller holding the current one.
//!
//! **Stampedes.** Concurrent misses on one key share one computation per
//! process: callers that arrive while it runs wait for it (at most
//! `lease_wait`, then for its store at most what is left of their
//! `operation_timeout`), and use its value when it is provably fresh for
//! them; otherwise they join the next computation. Exceptions: a result that
//! is not cached (an `Err`, a `None`) sends waiting callers to compute their
//! own, a leader slower than `lease_wait` too, and a local invalidation
//! starts new computations for callers arriving after it.
//!
//! **Safe values.** Values are MessagePack in a versioned envelope
//! ([`codec`]); anything that does not decode is a miss and is removed.
//!
//! **Observable.** [`CacheManager::stats`], [`CacheManager::subscribe`], and
//! `tracing` events: connection changes at `info`/`warn`, operations at
//! `debug`/`trace`. URLs are logged with passwords redacted. A Redis that
//! does not let the cache store values (older than 7.0, an ACL user without
//! the permissions, out of memory) is reported at `warn`, by
//! [`CacheManager::can_store`] and by the `store_errors` statistic.
//!
//! **Settings that cannot work are refused** by [`CacheManager::connect`]
//! (see [`CacheConfig::validate`]): an empty prefix, zero timeouts or
//! intervals, a jitter outside 0..=1.
//!
//! **The in-process tier** ([`LocalConfig`]) keeps values in this process's
//! memory and serves them with no round trip. Without a Redis URL it is on
//! by default (the embedded mode: single flight and invalidation work in
//! process). Beside Redis it is opt-in (`with_redis`): its invalidation
//! channel (`CLIENT TRACKING` pushes over RESP3) reaches other processes
//! after a delivery lag, during which they may serve a value another
//! process's write made stale; the writer's own process never does. A lost
//! channel drops the tier until it is subscribed again. The argument is in
//! the `local` module (fenced loads, the striped generation counters) and
//! in `connection/tracking.rs` (no serving through a gap). A manager with
//! no URL and the tier off (`capacity: 0`), or `enabled: false`, caches
//! nothing: every call computes.
//!
//! **Proved in production, by sampling.** The consistency monitor
//! ([`MonitorConfig`], off by default) checks, a delay after a sampled
//! write's invalidation, that the generations the write had to replace are
//! gone (in Redis) and were invalidated (in the in-process tier); what was
//! not, it repairs and reports, with the consistency as nines over 1, 5 and
//! 10 minutes ([`CacheManager::monitor_report`], metrics
//! `earnorm_cache_monitor_*`). Writers call [`CacheManager::watch_write`]
//! right before [`CacheManager::invalidate_from`], and drop the
//! [`WriteWatch`] it returns once that returned; EarnORM's writes and
//! database feed do. The argument is in the `monitor` module: it sees
//! invalidations lost, skipped or undone, and, when the write's time is
//! known (the feed's events, ORM writes of one record), a value stored
//! under the generations that followed the write (by this process, or by a
//! plain `set` of any process with the monitor on) though its data was read
//! before it (a plain `get`, read, `set` racing the write):
//! every stored value carries when its data was read, which whoever reads
//! the database notes with [`note_read`] (EarnORM does, from MongoDB's
//! `operationTime`, while the monitor is on).
//!
//! ## Redis Cluster
//!
//! With the `cluster` feature (on by default), a URL
//! `redis+cluster://HOST:PORT,HOST:PORT` (`rediss+cluster://` for TLS,
//! `user:password@` as for one server) names a cluster's seed nodes; the
//! others are discovered, and each command goes straight to the master of
//! its key's slot, redirections (`MOVED`, `ASK`) followed
//! (`connection/cluster.rs`). The guarantees above hold there too, with
//! these differences:
//!
//! * **No multi-key atomicity is needed.** A value's key and the
//!   generations it depends on hash to different slots, so nothing reads or
//!   writes them in one script. A lookup is one `MGET`, split by slot and
//!   sent to each master at once: the value and its generations are
//!   read in no set order, which is safe because a value is served only
//!   when the tokens it carries equal the generations read, and a write's
//!   invalidation replaces a generation before the write is acknowledged
//!   (a read that starts after it reads the new generation, whatever order
//!   the two keys are read in).
//! * **No stale sets without the script.** A single store writes the value
//!   with the tokens its computation began under (as a batch does, above),
//!   so the race of "No stale sets" leaves a value that is never served;
//!   then it reads the generations again, and counts the store as made only
//!   if they are unchanged, which is what lets waiting callers share the
//!   value. An outdated in-memory copy reads and writes its own key, as on
//!   one server.
//! * **Costs.** A lookup is one round trip on both (on a cluster, to each
//!   master it touches, at once). A miss's store is one round trip on one
//!   server (the script) and two on a cluster (the `SET`, then the check).
//!   An invalidation is one round trip on both. A pipeline's commands are
//!   grouped by slot and each group sent to its master at once.
//! * **Every master.** Pattern deletion, `invalidate_all` and restart
//!   detection scan every master. The `run_id` of every master is recorded;
//!   one restarted, replaced by a failover (a promoted replica may lack the
//!   last invalidations it was sent) or added makes the manager reconnect
//!   and delete every generation, as a restart of one server does. A
//!   failover is found by the first command redirected to a new master
//!   (the connection is then spent: that command and every later one fail
//!   as if it were lost, see `connection/cluster.rs`), and by a check after
//!   every heartbeat; a restart by the connection it breaks.
//! * **Bookkeeping** (`meta:` keys: heartbeats, the feed's marker) share one
//!   slot through a hash tag; leases and values spread over every slot.
//!   The prefix may therefore not contain `{` or `}` on a cluster (refused
//!   at connect), and a cluster whose masters hide `INFO` is not used.
//! * **The in-process tier** subscribes its invalidation channel on every
//!   master (tracking is per node), and drops what it holds when one of
//!   them is lost or the masters change.
//! * **Failing open is per master.** A master whose connection is lost, or
//!   that leaves a `PING` unanswered when a call timed out, is marked down:
//!   calls that touch its slots compute at once, and the other masters'
//!   slots keep serving. A value on the other masters stays safe to serve
//!   because its lookup reads its generations: it touches every master
//!   whose invalidation it would need. Nothing is read from the master
//!   down again through that connection: when it answers again, the
//!   connection is replaced and checked as after any outage (restart
//!   detection, the outbox replayed), so a master back from a snapshot has
//!   every generation deleted first. An invalidation that only the masters
//!   down missed is queued for them (the others took their part), and
//!   until it is sent this manager writes no heartbeat: the other managers
//!   of the prefix count it missing and serve no hits, as when a manager's
//!   connection is down (a manager cut off from one master alone could
//!   otherwise leave them serving what its write made stale). An
//!   invalidation that failed otherwise drops the connection, as on one
//!   server. When the master holding the `meta:` keys is down, no manager
//!   can read whether another is missing, so none serves hits.
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used, clippy::panic))]
#![warn(missing_docs)]

// The handle, its public calls, and the direct get/set/delete.
mod manager;
// The cache-aside call: hit, lead, follow, await a holder, refresh ahead.
mod aside;
// Single flight within a process.
mod flight;
// Lookups with their generations, creating generations, the compare-and-set.
mod generations;
// Stores without the compare-and-set: batches, and single values on a cluster.
mod plain;
// Cache-aside for many keys at once, in chunks.
mod batch;
// Who computes a cold key across processes; which worker leads.
mod lease;
// Every invalidation entry point.
mod invalidate;
// Invalidations waiting for a connection.
mod outbox;
// The connection to Redis: its shared state and sending invalidations; in
// rooms of its own, the published link, the supervisor, presence.
mod connection;
// The bound on every call to Redis.
mod bounded;
// Reconnection back-off.
mod backoff;
// Bookkeeping values and the database feed's caught-up marker.
mod meta;
// The same bookkeeping in memory, without Redis.
mod book;
// Every key's name, and glob escaping.
mod keyspace;
// Keys of cached values.
mod key;
// The in-process tier and its generations.
mod local;
// The consistency monitor: sampled writes checked, repaired, reported in nines.
mod monitor;
// Watching writes for the monitor: the check and its repair.
mod watch;
// When values' data was read: noted reads, stamped on stored values.
mod read_time;
// The values this process stored lately, by generation, for the monitor.
mod recent;
// What a value depends on and what a write invalidates.
mod scope;
// The canonical encoding of key arguments.
mod key_encoding;
// Values as stored: the envelope and its payload.
pub mod codec;
// Settings.
mod config;
// The error type.
mod error;
// Credentials out of URLs.
mod redact;
// SCAN and UNLINK in batches.
mod scan;
// Counters and metrics.
mod stats;
// Fresh random tokens.
mod token;

pub use codec::{Keeper, OptionOutput, Output, PlainOutput, ResultOutput, Stored};
pub use config::{CacheConfig, MonitorConfig};
pub use error::CacheError;
pub use key::{CacheKey, Fingerprint, KeyBuilder, MAX_DEPENDENCIES};
pub use key_encoding::KeyArgumentError;
pub use keyspace::escape_glob;
pub use local::LocalConfig;
pub use manager::{bypass, CacheManager};
pub use monitor::{MonitorReport, MonitorWindow};
pub use read_time::{note_read, note_write};
pub use redact::redact_url;
pub use scope::Scope;
pub use stats::{CacheStats, ConnectionStatus, InvalidationSource, NamedStats};
pub use watch::WriteWatch;
