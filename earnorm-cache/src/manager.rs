//! [`CacheManager`]: the handle every cached call goes through.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::watch;
use tracing::warn;

use crate::book::Book;
use crate::codec::{self, Output};
use crate::connection::{supervise, track, Connection};
use crate::flight::Flights;
use crate::generations::{Expected, Generations, Lookup};
use crate::key::{CacheKey, KeyBuilder};
use crate::local::Local;
use crate::stats::{CacheStats, ConnectionStatus, Event, NamedStats, Names};
use crate::{CacheConfig, CacheError};

tokio::task_local! {
    static BYPASS: ();
}

/// Runs `future` with every cached call inside it computing its value
/// directly, neither reading nor writing the cache (invalidations still
/// happen). Useful in tests, and for a caller that must see the source.
/// Takes any future, or anything awaitable (an ORM action).
pub async fn bypass<F: std::future::IntoFuture>(future: F) -> F::Output {
    BYPASS.scope((), future.into_future()).await
}

pub(crate) fn bypassed() -> bool {
    BYPASS.try_with(|()| ()).is_ok()
}

/// A cheap, cloneable handle to a Redis-backed cache.
///
/// # Behavior
///
/// * **Fail open.** [`get_or_compute`](Self::get_or_compute) always returns
///   the computed value when the cache fails: refused, reset, timed out,
///   frozen, or holding a value that does not decode. No call waits on Redis
///   longer than `operation_timeout` in all (its lookup, store and the rest
///   share one allowance); while Redis is known down, calls do not wait at
///   all. (Waiting for another caller's computation of the same key is not
///   waiting on Redis; it is bounded by `lease_wait`.) Reconnection happens
///   in the background (see the crate docs).
/// * **No stale sets.** A value is stored only if no write invalidated its
///   scopes since its computation began.
/// * **Single flight.** Concurrent misses on one key compute once per process.
/// * **Optional.** A manager built with no URL caches in this process only
///   (the in-process tier, see [`LocalConfig`](crate::LocalConfig)); with
///   `enabled = false`, or no URL and the tier off, it is disabled: every
///   call computes, nothing is stored.
///
/// Dropping the last handle stops the background reconnection task.
#[derive(Clone, Debug)]
pub struct CacheManager {
    pub(crate) inner: Arc<Inner>,
}

/// What every handle of one manager shares.
pub(crate) struct Inner {
    connection: Arc<Connection>,
    /// The computations in flight in this process (see `crate::flight`);
    /// forgotten by `invalidate.rs` alone.
    pub(crate) flights: Flights,
    pub(crate) names: Names,
    /// The in-process tier, when it is on (see `crate::local`).
    pub(crate) local: Option<Arc<Local>>,
    /// Leases and bookkeeping values when there is no Redis to keep them
    /// (the embedded mode; see `crate::book`).
    pub(crate) book: Option<Book>,
    /// The consistency monitor, when it is on (see `crate::monitor`).
    pub(crate) monitor: Option<crate::monitor::Monitor>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheManager")
            .field("url", &self.connection.url)
            .field("status", &self.connection.status())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.connection.close();
    }
}

impl CacheManager {
    /// Connects to Redis at `url` (`redis://[user:password@]host[:port][/db]`,
    /// or `rediss://` for TLS, verified against the system's root certificates
    /// unless the URL ends in `#insecure`), or, for `None`, builds a manager
    /// without Redis: it caches in the in-process tier (on by default,
    /// [`LocalConfig`](crate::LocalConfig)), or not at all when that is off.
    ///
    /// Makes one connection attempt (bounded by `connect_timeout`) before
    /// returning; if Redis is not there, the manager starts
    /// [`Down`](ConnectionStatus::Down) and attaches in the background when
    /// Redis appears. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`CacheError::InvalidUrl`], [`CacheError::InvalidConfig`] for settings
    /// that cannot work (see [`CacheConfig::validate`]), or
    /// [`CacheError::NoRuntime`] outside a Tokio runtime; an unreachable
    /// Redis is not an error.
    pub async fn connect(url: Option<&str>, config: CacheConfig) -> Result<Self, CacheError> {
        if url.is_none() && config.enabled && config.local.capacity > 0 {
            // The embedded mode uses the settings too (`lease_wait`, `ttl`).
            config.validate()?;
        }
        let connection = Arc::new(Connection::new(url, config)?);
        if connection.is_enabled() {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(CacheError::NoRuntime);
            }
            if let Err(err) = connection.establish().await {
                connection.first_attempt_failed();
                warn!(url = %connection.url, error = %err, "Redis unavailable at start; caching paused, connecting in the background");
            }
            tokio::spawn(supervise(Arc::clone(&connection)));
            tokio::spawn(crate::stats::export_status(
                connection.subscribe(),
                connection.namespace.clone(),
            ));
        }
        let manager = Self::from_connection(Arc::clone(&connection));
        if let (true, Some(local)) = (connection.is_enabled(), &manager.inner.local) {
            tokio::spawn(track(connection, Arc::clone(local)));
        }
        Ok(manager)
    }

    /// A manager that caches nothing: every call computes its value.
    pub fn disabled(config: CacheConfig) -> Self {
        let config = CacheConfig {
            enabled: false,
            ..config
        };
        Self::from_connection(Arc::new(Connection::disabled(config)))
    }

    fn from_connection(connection: Arc<Connection>) -> Self {
        let config = &connection.config;
        let tier = config.enabled && config.local.capacity > 0 && (!connection.is_enabled() || config.local.with_redis);
        let local = tier.then(|| Arc::new(Local::new(config.local.capacity, connection.is_enabled())));
        let book = (local.is_some() && !connection.is_enabled()).then(Book::default);
        let monitor = crate::monitor::Monitor::new(config, local.is_some() && connection.is_enabled());
        Self {
            inner: Arc::new(Inner {
                connection,
                flights: Flights::default(),
                names: Names::default(),
                book,
                local,
                monitor,
            }),
        }
    }

    /// The in-process tier, when it is on and `key` may be kept there.
    pub(crate) fn local_for(&self, key: &CacheKey) -> Option<&Local> {
        self.inner.local.as_deref().filter(|_| key.in_process)
    }

    /// The number of values held in the in-process tier now (0 when it is
    /// off). Bounded by [`LocalConfig::capacity`](crate::LocalConfig::capacity)
    /// whatever the number of distinct keys.
    pub fn local_entries(&self) -> u64 {
        self.inner.local.as_deref().map_or(0, Local::len)
    }

    /// Whether this manager has an in-process tier (see
    /// [`LocalConfig`](crate::LocalConfig)).
    pub fn has_local(&self) -> bool {
        self.inner.local.is_some()
    }

    /// The value the in-process tier holds under `id`, when it is current:
    /// a hit with no round trip and no key built. `id` is the
    /// [`Fingerprint`](crate::Fingerprint) the key was built with (see
    /// [`KeyBuilder::local_id`]); `keeper` restores a value kept by value
    /// (see [`Keeper`](crate::Keeper)), values kept as payloads decode as
    /// `O`. `None` when the tier is off or does not hold a current value,
    /// and inside [`bypass`]. Counted as a hit (and a local hit).
    pub fn local_hit<R: 'static, O: Output<R>>(&self, id: u128, keeper: Option<crate::Keeper>) -> Option<R> {
        let local = self.inner.local.as_deref()?;
        if bypassed() {
            return None;
        }
        // A value due for a refresh ahead is left to the full call, which
        // takes the refresh.
        self.local_hit_by::<R, O>(local, id, keeper, false)
            .map(|(value, _)| value)
    }

    /// Whether calls can be served from a cache at all: Redis, or the
    /// in-process tier (without Redis, the embedded mode).
    pub fn caches(&self) -> bool {
        self.connection().is_enabled() || self.inner.local.is_some()
    }

    pub(crate) fn connection(&self) -> &Connection {
        &self.inner.connection
    }

    /// The configuration this manager was built with.
    pub fn config(&self) -> &CacheConfig {
        &self.connection().config
    }

    /// The Redis URL with its password redacted (empty when disabled).
    pub fn url(&self) -> &str {
        &self.connection().url
    }

    /// Current connection status.
    pub fn status(&self) -> ConnectionStatus {
        self.connection().status()
    }

    /// A receiver that sees every connection status change.
    pub fn subscribe(&self) -> watch::Receiver<ConnectionStatus> {
        self.connection().subscribe()
    }

    /// A snapshot of the counters and the status.
    pub fn stats(&self) -> CacheStats {
        let mut stats = self.connection().counters.snapshot(self.status());
        if let Some(local) = &self.inner.local {
            stats.local_resets = local.resets.load(std::sync::atomic::Ordering::Relaxed);
        }
        stats
    }

    /// The counters of each kind of cached value (each namespace and name
    /// given to [`key`](Self::key)), sorted: which reads are worth caching.
    pub fn stats_by_name(&self) -> Vec<NamedStats> {
        self.inner.names.snapshot()
    }

    /// Whether the checks made when connecting found that this Redis lets
    /// the cache store values (Redis 7.0 or later, and the permissions the
    /// cache needs). When it does not, every call computes its value; a
    /// `warn` event says why.
    pub fn can_store(&self) -> bool {
        self.connection().can_store()
    }

    /// Starts a key for a value named `name` in `namespace` (a model's
    /// collection, or any label).
    pub fn key(&self, namespace: &str, name: &str) -> KeyBuilder {
        let conn = self.connection();
        KeyBuilder::new(
            &conn.namespace,
            namespace,
            name,
            conn.feed_scopes(),
            Some(self.inner.names.get(namespace, name)),
        )
    }

    /// Labels the per-name metrics of namespaces `DATABASE.NAME` by `NAME`
    /// (`model`), and by `database` too when
    /// [`CacheConfig::metrics_database_label`] is on: what EarnORM does for
    /// its environment's database, so that the number of metric series does
    /// not grow with the number of databases. Call it before the names are
    /// first used.
    pub fn label_database(&self, database: &str) {
        self.inner
            .names
            .label_database(database, self.connection().config.metrics_database_label);
    }

    /// Leaves cleanly, for a process about to exit: stops reconnecting and
    /// removes this manager's heartbeat, so that the other managers sharing
    /// the prefix do not take it for one cut off from Redis (which would
    /// stop their hits until it is forgotten, see
    /// [`ConnectionStatus::Recovering`]). The manager keeps answering on its
    /// current connection while it lasts; call this last.
    pub async fn shutdown(&self) {
        self.connection().close();
        self.connection().leave().await;
    }

    /// Pings Redis and returns the round-trip time.
    ///
    /// # Errors
    /// When Redis is disabled, down, or does not answer in time.
    pub async fn ping(&self) -> Result<Duration, CacheError> {
        self.connection().ping().await
    }

    /// Waits until the status is `status`, or `limit` passes. Returns whether
    /// the status was reached.
    pub async fn wait_for_status(&self, status: ConnectionStatus, limit: Duration) -> bool {
        let mut rx = self.subscribe();
        tokio::time::timeout(limit, rx.wait_for(|s| *s == status))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The cache-aside call: returns the cached value for `key` if it is
    /// current, or runs `compute`, returns its result and stores it (as `O`
    /// says: only `Ok` values of a `Result`, for example) with `ttl` (the
    /// configured default for `None`).
    ///
    /// Never fails because of the cache: every cache problem makes the call
    /// compute. Concurrent calls for one key in this process compute once;
    /// across processes, one computes while the others wait for its value
    /// (at most `lease_wait`, see [`CacheConfig::lease_wait`](crate::CacheConfig::lease_wait)).
    pub async fn get_or_compute<R, O, Fut>(&self, key: &CacheKey, ttl: Option<Duration>, compute: Fut) -> R
    where
        R: 'static,
        O: Output<R>,
        Fut: Future<Output = R>,
    {
        let ttl = ttl.unwrap_or(self.config().ttl);
        self.get_or_compute_by::<R, O, _, Fut>(key, |_| Some(ttl), None, compute)
            .await
    }

    /// [`get_or_compute`](Self::get_or_compute) with a time to live that
    /// depends on the result: `ttl_of` gives it, or `None` for a result
    /// not to store (as when `O` declines it). How a record cache keeps
    /// "no such record" for less time than a record, for one.
    ///
    /// With `refresh`, a hit on a value with less than `refresh` left to
    /// live refreshes it ahead of its expiry: one caller (one per process,
    /// and across processes the one holding the key's lease) computes the
    /// value again and stores it under the compare-and-set, returning the
    /// new value; every other caller keeps being served the current one.
    /// A hot key then never expires into a stampede.
    pub async fn get_or_compute_by<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        ttl_of: T,
        refresh: Option<Duration>,
        compute: Fut,
    ) -> R
    where
        R: 'static,
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        self.call::<R, O, T, Fut>(key, ttl_of, refresh, None, compute).await
    }

    /// [`get_or_compute_by`](Self::get_or_compute_by) with refresh ahead
    /// in the background: for a value whose computation can run on its own
    /// (`refresher` builds it, owning what it needs), a hit with less than
    /// `refresh` left to live is returned at once, and the value is
    /// computed again and stored in a task of its own (one per key and
    /// process, and across processes the one holding the key's lease), under
    /// the compare-and-set. How the record cache refreshes.
    pub async fn get_or_compute_refreshed<R, O, T, Fut, F, RFut>(
        &self,
        key: &CacheKey,
        ttl_of: T,
        refresh: Duration,
        compute: Fut,
        refresher: F,
    ) -> R
    where
        R: Send + 'static,
        O: Output<R> + 'static,
        T: Fn(&R) -> Option<Duration> + Clone + Send + Sync + 'static,
        Fut: Future<Output = R>,
        F: FnOnce() -> RFut + Send + 'static,
        RFut: Future<Output = R> + Send + 'static,
    {
        let mut refresher = Some(refresher);
        let (manager, owned_key, owned_ttl) = (self.clone(), key.clone(), ttl_of.clone());
        let mut on_due = move |seen: Generations| {
            let (Some(refresher), Ok(runtime)) = (refresher.take(), tokio::runtime::Handle::try_current()) else {
                return false;
            };
            runtime.spawn(manager.clone().refresh_in_background::<R, O, T, RFut>(
                owned_key.clone(),
                owned_ttl.clone(),
                refresh,
                seen,
                refresher(),
            ));
            true
        };
        self.call::<R, O, T, Fut>(key, ttl_of, Some(refresh), Some(&mut on_due), compute)
            .await
    }

    /// Reads a current value.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable, or fails. A value that does
    /// not decode is removed and reported as `Ok(None)`.
    pub async fn get<T: DeserializeOwned>(&self, key: &CacheKey) -> Result<Option<T>, CacheError> {
        let mut budget = self.config().operation_timeout;
        let found = match self.lookup(key, None, false, &mut budget).await.0 {
            Lookup::Hit(bytes, _) => Ok(self.open_hit(key, &bytes, codec::decode::<T>, &mut budget).await),
            Lookup::Miss(_) => {
                self.connection().counters.count(key.named.get(), Event::Miss);
                Ok(None)
            }
            Lookup::Unavailable => Err(self.unavailable()),
        };
        // A miss begins a plain cache-aside: the `set` that ends it is
        // stamped with the reads made meanwhile (see `read_time.rs`).
        if matches!(found, Ok(None)) {
            crate::read_time::begin_plain();
        } else {
            crate::read_time::take_plain();
        }
        found
    }

    /// Stores a value under the current generations of its scopes. Unlike
    /// [`get_or_compute`](Self::get_or_compute), a plain `set` cannot know
    /// whether a write happened since its value was read, so it cannot
    /// refuse a stale one: prefer `get_or_compute` for values derived from
    /// a database. (It stamps the value with the earliest read this task
    /// noted since its last plain `get` missed, see [`note_read`](crate::note_read),
    /// by which the consistency monitor finds a stale one later; with the
    /// monitor on and a read time, the value is also noted in Redis for the
    /// checks of every process, in a task of its own, best effort.) It works on
    /// Redis alone: it drops this process's in-process copy of the value,
    /// not other processes' (invalidate a scope to reach those).
    ///
    /// # Errors
    /// When the value does not encode, or the cache is disabled, unavailable or fails.
    pub async fn set<T: Serialize + ?Sized>(
        &self,
        key: &CacheKey,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        if let Some(local) = &self.inner.local {
            local.remove(key);
        }
        let read_at = crate::read_time::take_plain();
        let payload = codec::encode(value)?;
        let ttl = ttl.unwrap_or(self.config().ttl);
        let mut budget = self.config().operation_timeout;
        let stored = self
            .store(key, Expected::Any, (&payload, read_at), ttl, None, &mut budget)
            .await;
        // Again: a lookup during the store may have kept the old value.
        if let Some(local) = &self.inner.local {
            local.remove(key);
        }
        // Noted only with a read time: without one it is never judged.
        if matches!(stored, Ok(true)) && read_at != 0 && self.inner.monitor.is_some() {
            // Off the caller's path: the checks that read it run a delay
            // after a write.
            let (manager, key) = (self.clone(), key.clone());
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(async move { manager.note_plain_set(&key).await })),
                Err(_) => manager.note_plain_set(&key).await,
            }
        }
        stored.map(|_| ())
    }

    /// Deletes one value from Redis, and this process's in-process copy of
    /// it (not other processes': invalidate a scope to reach those).
    /// Returns whether it existed in Redis.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails.
    pub async fn delete(&self, key: &CacheKey) -> Result<bool, CacheError> {
        if let Some(local) = &self.inner.local {
            local.remove(key);
        }
        let mut budget = self.config().operation_timeout;
        let deleted = self.delete_within(key, &mut budget).await;
        // Again: a lookup during the deletion may have kept the old value.
        if let Some(local) = &self.inner.local {
            local.remove(key);
        }
        deleted
    }

    async fn delete_within(&self, key: &CacheKey, budget: &mut Duration) -> Result<bool, CacheError> {
        let mut cmd = redis::cmd("UNLINK");
        cmd.arg(&key.value);
        let removed: u64 = self
            .connection()
            .call_within(budget, |mut conn| async move { cmd.query_async(&mut conn).await })
            .await?;
        Ok(removed > 0)
    }

    fn unavailable(&self) -> CacheError {
        if self.connection().is_enabled() {
            CacheError::Unavailable
        } else {
            CacheError::Disabled
        }
    }
}
