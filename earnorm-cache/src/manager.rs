//! [`CacheManager`]: the handle every cached call goes through.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Script;
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::watch;
use tracing::{debug, trace, warn, Instrument};

use crate::codec::{self, Envelope, Output};
use crate::connection::{supervise, Connection};
use crate::flight::{self, Flights, Follower, Leader, Outcome, Role};
use crate::key::{CacheKey, KeyBuilder};
use crate::lease::{lease_ttl, Lease, LeaseGuard};
use crate::stats::{CacheStats, ConnectionStatus, Counters, Event, NamedStats, Names, Served};
use crate::token::new_token;
use crate::{CacheConfig, CacheError};

/// Stores a value only if every generation it depends on is still the one
/// seen before its computation started (see the crate docs, "No stale sets").
///
/// Declared with a shebang (no flags), so that Redis refuses it up front when
/// it is out of memory, instead of letting its writes through.
///
/// KEYS[1]: value key; KEYS[2..n+1]: generation keys; KEYS[n+2]: the key's
/// lease, when ARGV[6] is not empty.
/// ARGV[1]: value TTL ms; ARGV[2]: generation TTL ms; ARGV[3]: fresh token;
/// ARGV[4]: envelope header; ARGV[5]: payload; ARGV[6]: the lease's holder,
/// or '' (the lease is given up whether the value is stored or not);
/// ARGV[6 + i]: expected token of KEYS[1 + i], or '*' to accept the current
/// one (creating it if absent). An absent generation never matches an
/// expected token.
const STORE_SCRIPT: &str = r"#!lua
local n = #KEYS - 1
if ARGV[6] ~= '' then
  n = n - 1
  if redis.call('GET', KEYS[#KEYS]) == ARGV[6] then
    redis.call('DEL', KEYS[#KEYS])
  end
end
local tokens = {}
for i = 1, n do
  local current = redis.call('GET', KEYS[i + 1])
  local expected = ARGV[6 + i]
  if expected ~= '*' and current ~= expected then
    return 0
  end
  tokens[i] = current
end
for i = 1, n do
  if tokens[i] then
    redis.call('PEXPIRE', KEYS[i + 1], ARGV[2], 'GT')
  else
    tokens[i] = ARGV[3]
    redis.call('SET', KEYS[i + 1], ARGV[3], 'PX', ARGV[2])
  end
end
redis.call('SET', KEYS[1], ARGV[4] .. table.concat(tokens) .. ARGV[5], 'PX', ARGV[1])
return 1
";

/// Most rounds a caller spends looking up and waiting for other callers'
/// computations before computing on its own.
const MAX_ROUNDS: usize = 4;

/// Longest pause between two looks for the value of a key whose lease
/// another process holds (the pauses start at 1 ms and double).
const LEASE_POLL: Duration = Duration::from_millis(16);

tokio::task_local! {
    static BYPASS: ();
}

/// Runs `future` with every cached call inside it computing its value
/// directly, neither reading nor writing the cache (invalidations still
/// happen). Useful in tests, and for a caller that must see the source.
pub async fn bypass<F: Future>(future: F) -> F::Output {
    BYPASS.scope((), future).await
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
/// * **Optional.** A manager built with no URL (or `enabled = false`) is
///   disabled: every call computes, nothing is stored.
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
    names: Names,
    store: Script,
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

/// The generation tokens a lookup saw, in the key's order (`None`: absent).
type Generations = Vec<Option<Vec<u8>>>;

/// One cached call's clock: when it began, and what it may still spend
/// waiting on Redis across all its operations.
struct Call {
    began: Instant,
    budget: Duration,
}

/// What a follower does next.
enum Next<R> {
    Use(R),
    Retry,
    Compute,
}

/// The result of reading a key and its generations in one round trip.
enum Lookup {
    /// A current value, and the generations seen (for replacing it if it
    /// does not decode).
    Hit(Vec<u8>, Vec<Option<Vec<u8>>>),
    /// Nothing current; the generations seen, for the later store.
    Miss(Vec<Option<Vec<u8>>>),
    Unavailable,
}

impl CacheManager {
    /// Connects to Redis at `url` (`redis://[user:password@]host[:port][/db]`,
    /// or `rediss://` for TLS, verified against the system's root certificates
    /// unless the URL ends in `#insecure`), or builds a disabled manager for
    /// `None`.
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
        Ok(Self::from_connection(connection))
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
        Self {
            inner: Arc::new(Inner {
                connection,
                flights: Flights::default(),
                names: Names::default(),
                store: Script::new(STORE_SCRIPT),
            }),
        }
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
        self.connection().counters.snapshot(self.status())
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
    /// (at most `lease_wait`, see [`CacheConfig::lease_wait`]).
    pub async fn get_or_compute<R, O, Fut>(&self, key: &CacheKey, ttl: Option<Duration>, compute: Fut) -> R
    where
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

    /// The refresh `on_due` started, in a task of its own.
    async fn refresh_in_background<R, O, T, RFut>(
        self,
        key: CacheKey,
        ttl_of: T,
        refresh: Duration,
        seen: Generations,
        compute: RFut,
    ) where
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        RFut: Future<Output = R>,
    {
        let Role::Leader(leader) = self.inner.flights.join(key.as_str()) else {
            return;
        };
        let mut call = Call {
            began: Instant::now(),
            budget: self.connection().config.operation_timeout,
        };
        let _ = self
            .refresh_ahead::<R, O, T, RFut>(&key, refresh, &ttl_of, compute, leader, seen, &mut call)
            .await;
    }

    /// A cached call, in its span and timed; `on_due`, when given, takes
    /// a refresh in the background (returning whether it did).
    async fn call<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        ttl_of: T,
        refresh: Option<Duration>,
        on_due: Option<&mut (dyn FnMut(Generations) -> bool + Send)>,
        compute: Fut,
    ) -> R
    where
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        let conn = self.connection();
        if !conn.is_enabled() || bypassed() {
            return compute.await;
        }
        let named = key.named.get();
        let span = tracing::debug_span!(
            "earnorm.cache",
            model = named.map_or("", |n| &*n.namespace),
            method = named.map_or("", |n| &*n.name),
            outcome = tracing::field::Empty,
        );
        let began = Instant::now();
        // On the heap: the call's states (looking up, leading, refreshing,
        // each holding the computation) would otherwise all be part of the
        // caller's future, which nested cached calls multiply.
        let (value, served) = Box::pin(
            self.serve::<R, O, T, Fut>(key, ttl_of, refresh, on_due, compute)
                .instrument(span.clone()),
        )
        .await;
        span.record("outcome", served.as_str());
        if let Some(named) = named {
            named.call(served, began.elapsed());
        }
        value
    }

    /// The cache-aside call itself; says how it was served.
    async fn serve<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        ttl_of: T,
        refresh: Option<Duration>,
        mut on_due: Option<&mut (dyn FnMut(Generations) -> bool + Send)>,
        compute: Fut,
    ) -> (R, Served)
    where
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        let conn = self.connection();
        let mut call = Call {
            began: Instant::now(),
            budget: conn.config.operation_timeout,
        };
        for _ in 0..MAX_ROUNDS {
            let generations = match self.try_hit::<R, O>(key, refresh, &ttl_of, &mut call).await {
                Ok((value, None)) => return (value, Served::Hit),
                Ok((value, Some(seen))) => {
                    // Close to its expiry: refreshed in the background when
                    // it can be, else by one caller in this process (the
                    // others take the hit).
                    if let Some(on_due) = on_due.as_mut() {
                        if on_due(seen.clone()) {
                            return (value, Served::Hit);
                        }
                    }
                    return match (self.inner.flights.join(key.as_str()), refresh) {
                        (Role::Leader(leader), Some(refresh)) => {
                            // `compute` is used at most once: by the refresh
                            // here, or (when it is skipped) not at all.
                            match self
                                .refresh_ahead::<R, O, T, Fut>(key, refresh, &ttl_of, compute, leader, seen, &mut call)
                                .await
                            {
                                Some(fresh) => (fresh, Served::Refresh),
                                None => (value, Served::Hit),
                            }
                        }
                        _ => (value, Served::Hit),
                    };
                }
                Err(generations) => generations,
            };
            match self.inner.flights.join(key.as_str()) {
                Role::Leader(leader) => {
                    return self
                        .lead::<R, O, T, Fut>(key, &ttl_of, compute, leader, generations, &mut call)
                        .await
                }
                Role::Follower(follower) => match self.follow::<R, O>(key, follower, &mut call).await {
                    Next::Use(value) => return (value, Served::Coalesced),
                    Next::Retry => {}
                    Next::Compute => break,
                },
            }
        }
        // Other callers kept invalidating under us, the leader's result was
        // not cacheable, or it took longer than this caller may wait:
        // compute without storing.
        (compute.await, Served::Fallback)
    }

    /// Looks the key up: the decoded value on a hit (with the generations
    /// seen, when it has less than `refresh` left to live); otherwise the
    /// generations seen (for the store after computing), or `None` when the
    /// cache could not be read.
    async fn try_hit<R, O: Output<R>>(
        &self,
        key: &CacheKey,
        refresh: Option<Duration>,
        ttl_of: &impl Fn(&R) -> Option<Duration>,
        call: &mut Call,
    ) -> Result<(R, Option<Generations>), Option<Generations>> {
        let (lookup, _, left) = self.lookup(key, None, refresh.is_some(), &mut call.budget).await;
        match lookup {
            Lookup::Hit(bytes, generations) => match self.open_hit(key, &bytes, O::decode, &mut call.budget).await {
                Some(value) => {
                    let window = refresh.and_then(|refresh| refresh_window(refresh, ttl_of(&value)));
                    let due = matches!((window, left), (Some(window), Some(left)) if left < window);
                    Ok((value, due.then_some(generations)))
                }
                None => Err(Some(generations)),
            },
            Lookup::Miss(generations) => Err(Some(generations)),
            Lookup::Unavailable => Err(None),
        }
    }

    /// Decodes a hit, counting it; a value that does not decode is removed.
    async fn open_hit<R>(
        &self,
        key: &CacheKey,
        bytes: &[u8],
        decode: fn(&[u8]) -> Result<R, CacheError>,
        budget: &mut Duration,
    ) -> Option<R> {
        match Envelope::open(bytes).and_then(|env| decode(env.payload)) {
            Ok(value) => {
                self.connection().counters.count(key.named.get(), Event::Hit);
                trace!(key = key.as_str(), "cache hit");
                Some(value)
            }
            Err(err) => {
                self.discard(key, &err, budget).await;
                None
            }
        }
    }

    /// Waits for the leader of this key's flight (see [`crate::flight`]).
    async fn follow<R, O: Output<R>>(&self, key: &CacheKey, follower: Follower, call: &mut Call) -> Next<R> {
        let deadline = call.began + self.config().lease_wait;
        match follower.wait(call.began, deadline, &mut call.budget).await {
            flight::Next::Use(payload) => match O::decode(&payload) {
                Ok(value) => {
                    self.connection().counters.count(key.named.get(), Event::Coalesced);
                    Next::Use(value)
                }
                Err(_) => Next::Retry,
            },
            flight::Next::Retry => Next::Retry,
            // The leader's result was not cacheable (an `Err`, a `None`), or
            // it took longer than this caller may wait.
            flight::Next::Compute => Next::Compute,
        }
    }

    /// Computes as the leader of this key's flight (unless another process
    /// holds the key's lease and stores its value in time), stores the
    /// value under the compare-and-set, and hands the outcome to the
    /// followers.
    async fn lead<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        ttl_of: &T,
        compute: Fut,
        leader: Leader<'_>,
        generations: Option<Generations>,
        call: &mut Call,
    ) -> (R, Served)
    where
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        let conn = self.connection();
        let named = key.named.get();
        let served = match &generations {
            Some(_) => Served::Miss,
            None => Served::Fallback,
        };
        conn.counters.count(
            named,
            match served {
                Served::Fallback => Event::Fallback,
                _ => Event::Miss,
            },
        );
        // A successful compare-and-set proves no invalidation reached Redis
        // during the computation; it proves nothing about invalidations still
        // queued in other managers, which is why a value stored while this
        // manager serves no hits is not handed to followers as checked.
        let serving_before = conn.serves(key);
        // A computation never starts under an absent generation: create the
        // missing ones first, so that any later invalidation removes a token
        // this computation knows. The key's lease is asked for in the same
        // round trip.
        let wants_lease = generations.is_some() && !conn.config.lease_wait.is_zero();
        let (generations, lease) = self.prepare(key, generations, wants_lease, &mut call.budget).await;
        let mut lease = match lease {
            Lease::Busy => {
                conn.counters.count(named, Event::LeaseWait);
                match self.await_holder::<R, O>(key, call).await {
                    Awaited::Value(value, payload, looked) => {
                        // Current when it was looked up: as good as a store
                        // sent then (see `crate::flight`).
                        leader.complete(Outcome::Stored(payload, looked));
                        return (value, Served::Hit);
                    }
                    Awaited::Took(guard) => Some(guard),
                    Awaited::GaveUp => None,
                }
            }
            Lease::Held(guard) => Some(guard),
            Lease::None => None,
        };
        let value = self
            .compute_and_store::<R, O, T, Fut>(
                key,
                ttl_of,
                compute,
                leader,
                generations,
                lease.as_mut(),
                serving_before,
                call,
            )
            .await;
        (value, served)
    }

    /// Computes as the leader of this key's flight, stores the value under
    /// the compare-and-set (giving `lease` up), and hands the outcome to
    /// the followers. `serving_before`: whether this manager served hits
    /// when the computation began (see `lead`).
    #[allow(clippy::too_many_arguments)]
    async fn compute_and_store<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        ttl_of: &T,
        compute: Fut,
        leader: Leader<'_>,
        generations: Option<Generations>,
        lease: Option<&mut LeaseGuard>,
        serving_before: bool,
        call: &mut Call,
    ) -> R
    where
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        let conn = self.connection();
        let value = compute.await;
        let payload = match ttl_of(&value).and_then(|ttl| O::encode(&value).map(|payload| (ttl, payload))) {
            Some((ttl, Ok(payload))) => (ttl, payload),
            Some((_, Err(err))) => {
                debug!(key = key.as_str(), error = %err, "value not cached: it does not encode");
                leader.complete(Outcome::Uncacheable);
                return value;
            }
            // Not a cacheable result (an `Err`, a `None`): followers compute their own.
            None => {
                leader.complete(Outcome::Uncacheable);
                return value;
            }
        };
        let (ttl, payload) = payload;
        let Some(generations) = generations else {
            leader.complete(Outcome::Computed(payload.into()));
            return value;
        };
        leader.storing();
        let store_sent = Instant::now();
        let outcome = match self
            .store(
                key,
                Expected::Seen(&generations),
                &payload,
                ttl,
                lease,
                &mut call.budget,
            )
            .await
        {
            Ok(true) if serving_before && conn.serves(key) => Outcome::Stored(payload.into(), store_sent),
            Ok(true) => Outcome::Computed(payload.into()),
            // An invalidation happened during the computation: the value
            // may be older than a write some follower already saw.
            Ok(false) => Outcome::Retry,
            Err(_) => Outcome::Computed(payload.into()),
        };
        leader.complete(outcome);
        value
    }

    /// Refreshes a value that is close to its expiry, as the leader of this
    /// key's flight: takes the key's lease (another process refreshing it
    /// already: the current value is returned), computes, stores under the
    /// generations `seen` with the hit, and returns the new value.
    #[allow(clippy::too_many_arguments)]
    async fn refresh_ahead<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        refresh: Duration,
        ttl_of: &T,
        compute: Fut,
        leader: Leader<'_>,
        seen: Generations,
        call: &mut Call,
    ) -> Option<R>
    where
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        let conn = self.connection();
        let wants_lease = !conn.config.lease_wait.is_zero();
        let (generations, lease) = self.prepare(key, Some(seen), wants_lease, &mut call.budget).await;
        let mut lease = match lease {
            Lease::Busy => {
                leader.complete(Outcome::Retry);
                return None;
            }
            Lease::Held(guard) => {
                // Another process may have refreshed it between our lookup
                // and the lease: then there is nothing left to do.
                let (lookup, _, left) = self.lookup(key, None, true, &mut call.budget).await;
                let refreshed = matches!(lookup, Lookup::Hit(..)) && left.is_some_and(|left| left >= refresh);
                if refreshed {
                    leader.complete(Outcome::Retry);
                    return None;
                }
                Some(guard)
            }
            Lease::None => None,
        };
        conn.counters.count(key.named.get(), Event::Refresh);
        let value = self
            .compute_and_store::<R, O, T, Fut>(key, ttl_of, compute, leader, generations, lease.as_mut(), true, call)
            .await;
        Some(value)
    }

    /// Polls for the value of a key whose lease another caller holds,
    /// until `lease_wait` after the call began. When the lease is gone
    /// without a current value (its holder died, or gave it up because its
    /// result was not cacheable or a write invalidated it), takes the lease
    /// over if it can. Gives up when time runs out or the cache cannot be
    /// read: the caller then computes without the lease.
    async fn await_holder<R, O: Output<R>>(&self, key: &CacheKey, call: &mut Call) -> Awaited<R> {
        let deadline = call.began + self.config().lease_wait;
        let lease = self.lease_key(key);
        let mut pause = Duration::from_millis(1);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Awaited::GaveUp;
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(LEASE_POLL);
            let looked = Instant::now();
            match self.lookup(key, Some(&lease), false, &mut call.budget).await {
                (Lookup::Hit(bytes, _), ..) => {
                    // The payload too, for this caller's followers (only
                    // here: a plain hit needs no copy of it).
                    let payload = Envelope::open(&bytes).map(|env| Arc::<[u8]>::from(env.payload));
                    return match (self.open_hit(key, &bytes, O::decode, &mut call.budget).await, payload) {
                        (Some(value), Ok(payload)) => Awaited::Value(value, payload, looked),
                        _ => Awaited::GaveUp,
                    };
                }
                (Lookup::Miss(_), true, _) => {}
                (Lookup::Miss(_), false, _) => {
                    let holder = new_token();
                    match self.take_lease(&lease, &holder, &mut call.budget).await {
                        Ok(true) => return Awaited::Took(self.hold(lease, holder)),
                        Ok(false) => {}
                        Err(_) => return Awaited::GaveUp,
                    }
                }
                (Lookup::Unavailable, ..) => return Awaited::GaveUp,
            }
        }
    }

    /// Before computing: creates the absent generations among
    /// `generations` (`SET NX GET`) and, when `wants_lease`, asks for the
    /// key's lease, in one round trip (none when there is nothing to do).
    /// Returns the generations to store under (`None`: the cache could not
    /// be prepared, compute without storing) and the lease.
    async fn prepare(
        &self,
        key: &CacheKey,
        generations: Option<Generations>,
        wants_lease: bool,
        budget: &mut Duration,
    ) -> (Option<Generations>, Lease) {
        let Some(mut generations) = generations else {
            return (None, Lease::None);
        };
        let absent = generations.iter().any(Option::is_none);
        if !absent && !wants_lease {
            return (Some(generations), Lease::None);
        }
        let conn = self.connection();
        let ttl_ms = expiry_ms(generation_ttl(&conn.config));
        let mut pipe = redis::pipe();
        let mut fresh = Vec::new();
        for (name, token) in key.generations.iter().zip(generations.iter()) {
            if token.is_none() {
                let new = new_token();
                set_if_absent(&mut pipe, name, &new, ttl_ms);
                fresh.push(new);
            }
        }
        let holder = wants_lease.then(new_token);
        let lease_key = holder.as_ref().map(|_| self.lease_key(key));
        if let (Some(holder), Some(lease_key)) = (&holder, &lease_key) {
            set_if_absent(&mut pipe, lease_key, holder, expiry_ms(lease_ttl(&conn.config)));
        }
        let answers: Vec<Option<Vec<u8>>> = match conn
            .call_within(budget, |mut c| async move {
                pipe.query_async::<Vec<Option<Vec<u8>>>>(&mut c).await
            })
            .await
        {
            Ok(answers) if answers.len() == fresh.len() + usize::from(holder.is_some()) => answers,
            Ok(_) => return (None, Lease::None),
            // Out of memory under `noeviction`, for one: nothing could
            // be stored either.
            Err(err) => {
                self.refused(&err);
                return (None, Lease::None);
            }
        };
        let mut answers = answers.into_iter();
        let mut fresh = fresh.into_iter();
        for token in generations.iter_mut().filter(|t| t.is_none()) {
            let (Some(new), Some(previous)) = (fresh.next(), answers.next()) else {
                return (None, Lease::None);
            };
            *token = Some(previous.unwrap_or_else(|| new.into_bytes()));
        }
        let lease = match (holder, lease_key, answers.next()) {
            // Nobody held it: it is ours now.
            (Some(holder), Some(lease_key), Some(None)) => Lease::Held(self.hold(lease_key, holder)),
            (Some(_), Some(_), Some(Some(_))) => Lease::Busy,
            _ => Lease::None,
        };
        (Some(generations), lease)
    }

    /// Reads the value and its generations in one `MGET`, with `extra`
    /// (a lease) when given, and the value's time left to live (`PTTL`, in
    /// the same round trip) when `want_ttl`. Also says whether `extra`
    /// exists.
    async fn lookup(
        &self,
        key: &CacheKey,
        extra: Option<&str>,
        want_ttl: bool,
        budget: &mut Duration,
    ) -> (Lookup, bool, Option<Duration>) {
        let mut mget = redis::cmd("MGET");
        mget.arg(&key.value).arg(&key.generations);
        if let Some(extra) = extra {
            mget.arg(extra);
        }
        let expected = 1 + key.generations.len() + usize::from(extra.is_some());
        let read = self
            .connection()
            .call_within(budget, |mut conn| async move {
                if want_ttl {
                    let mut pipe = redis::pipe();
                    pipe.add_command(mget).cmd("PTTL").arg(&key.value);
                    pipe.query_async::<(Vec<Option<Vec<u8>>>, i64)>(&mut conn)
                        .await
                        .map(|(values, left)| (values, Some(left)))
                } else {
                    // The hot path: one plain command.
                    mget.query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                        .await
                        .map(|values| (values, None))
                }
            })
            .await;
        match read {
            Ok((mut values, left)) if values.len() == expected => {
                let extra = if extra.is_some() {
                    values.pop().flatten().is_some()
                } else {
                    false
                };
                let left = left.and_then(|ms| u64::try_from(ms).ok()).map(Duration::from_millis);
                let value = values.remove(0);
                let lookup = match value {
                    Some(bytes) => match Envelope::open(&bytes) {
                        // During a quarantine, current values are not served.
                        Ok(env) if env.is_current(&values) && self.connection().serves(key) => {
                            Lookup::Hit(bytes, values)
                        }
                        // Superseded by a write: ignored, it expires by its TTL.
                        Ok(_) => Lookup::Miss(values),
                        Err(err) => {
                            self.discard(key, &err, budget).await;
                            Lookup::Miss(values)
                        }
                    },
                    None => Lookup::Miss(values),
                };
                (lookup, extra, left)
            }
            Ok(_) | Err(_) => (Lookup::Unavailable, false, None),
        }
    }

    /// Reports a store that Redis refused with an error (out of memory, no
    /// permission, an unsupported command); timeouts and lost connections
    /// are not refusals. Errors with codes the client does not know, such
    /// as `OOM`, come as `Extension` (inside a pipeline, always).
    pub(crate) fn refused(&self, err: &CacheError) {
        if matches!(err, CacheError::Redis(e) if matches!(e.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) | redis::ErrorKind::Extension) || e.code().is_some())
        {
            self.connection().store_refused(err);
        }
    }

    /// Removes a value that does not decode, counting it.
    async fn discard(&self, key: &CacheKey, err: &CacheError, budget: &mut Duration) {
        self.discard_all(&[(key, err)], budget).await;
    }

    /// Counts the cached values of `undecodable` that did not decode (each
    /// with its error) and removes them, in one round trip: what a lookup,
    /// of one key or of a batch, does with such a value.
    pub(crate) async fn discard_all(&self, undecodable: &[(&CacheKey, &CacheError)], budget: &mut Duration) {
        if undecodable.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("UNLINK");
        for (key, err) in undecodable {
            Counters::bump(
                &self.connection().counters.decode_errors,
                "earnorm_cache_decode_errors_total",
            );
            debug!(key = key.as_str(), error = %err, "removing a cached value that does not decode");
            cmd.arg(&key.value);
        }
        let _ = self
            .connection()
            .call_within(
                budget,
                |mut conn| async move { cmd.query_async::<u64>(&mut conn).await },
            )
            .await;
    }

    /// Stores through the compare-and-set script, giving `lease` up in the
    /// same call.
    async fn store(
        &self,
        key: &CacheKey,
        expected: Expected<'_>,
        payload: &[u8],
        ttl: Duration,
        lease: Option<&mut LeaseGuard>,
        budget: &mut Duration,
    ) -> Result<bool, CacheError> {
        let invocation = self.store_invocation(key, expected, payload, ttl, lease.as_deref());
        let stored: i64 = self
            .connection()
            .call_within(
                budget,
                |mut conn| async move { invocation.invoke_async(&mut conn).await },
            )
            .await
            .inspect_err(|err| self.refused(err))?;
        if let Some(lease) = lease {
            lease.settle();
        }
        self.count_store(key, stored == 1);
        Ok(stored == 1)
    }

    /// The compare-and-set script's call for one value (see `STORE_SCRIPT`).
    fn store_invocation(
        &self,
        key: &CacheKey,
        expected: Expected<'_>,
        payload: &[u8],
        ttl: Duration,
        lease: Option<&LeaseGuard>,
    ) -> redis::ScriptInvocation<'_> {
        let conn = self.connection();
        let generation_ms = expiry_ms(
            generation_ttl(&conn.config)
                .max(ttl)
                .saturating_add(Duration::from_secs(60)),
        );
        let mut invocation = self.inner.store.key(&key.value);
        invocation.key(&key.generations);
        if let Some(lease) = lease {
            invocation.key(&lease.key);
        }
        invocation
            .arg(expiry_ms(ttl))
            .arg(generation_ms)
            .arg(new_token())
            .arg(&codec::header(key.generations.len())[..])
            .arg(payload)
            .arg(lease.map_or("", |lease| lease.holder.as_str()));
        match expected {
            Expected::Seen(tokens) => {
                for token in tokens {
                    invocation.arg(token.as_deref().unwrap_or(b""));
                }
            }
            Expected::Any => {
                for _ in &key.generations {
                    invocation.arg("*");
                }
            }
        }
        invocation
    }

    /// Counts the answer of the compare-and-set for `key`.
    pub(crate) fn count_store(&self, key: &CacheKey, stored: bool) {
        let counters = &self.connection().counters;
        if stored {
            counters.count(key.named.get(), Event::Set);
        } else {
            counters.count(key.named.get(), Event::StaleSetRefused);
            debug!(
                key = key.as_str(),
                "refused to store a value computed before an invalidation"
            );
        }
    }

    /// Reads a current value.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable, or fails. A value that does
    /// not decode is removed and reported as `Ok(None)`.
    pub async fn get<T: DeserializeOwned>(&self, key: &CacheKey) -> Result<Option<T>, CacheError> {
        let mut budget = self.config().operation_timeout;
        match self.lookup(key, None, false, &mut budget).await.0 {
            Lookup::Hit(bytes, _) => Ok(self.open_hit(key, &bytes, codec::decode::<T>, &mut budget).await),
            Lookup::Miss(_) => {
                self.connection().counters.count(key.named.get(), Event::Miss);
                Ok(None)
            }
            Lookup::Unavailable => Err(self.unavailable()),
        }
    }

    /// Stores a value under the current generations of its scopes. Unlike
    /// [`get_or_compute`](Self::get_or_compute), a plain `set` cannot know
    /// when its value was read, so it cannot refuse a stale one: prefer
    /// `get_or_compute` for values derived from a database.
    ///
    /// # Errors
    /// When the value does not encode, or the cache is disabled, unavailable or fails.
    pub async fn set<T: Serialize + ?Sized>(
        &self,
        key: &CacheKey,
        value: &T,
        ttl: Option<Duration>,
    ) -> Result<(), CacheError> {
        let payload = codec::encode(value)?;
        let ttl = ttl.unwrap_or(self.config().ttl);
        let mut budget = self.config().operation_timeout;
        self.store(key, Expected::Any, &payload, ttl, None, &mut budget)
            .await
            .map(|_| ())
    }

    /// Deletes one value. Returns whether it existed.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails.
    pub async fn delete(&self, key: &CacheKey) -> Result<bool, CacheError> {
        let mut budget = self.config().operation_timeout;
        self.delete_within(key, &mut budget).await
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

/// How long a generation created for a computation lives. Values stored
/// later extend it to outlive them (see the store script).
pub(crate) fn generation_ttl(config: &CacheConfig) -> Duration {
    config
        .ttl
        .max(Duration::from_secs(60))
        .saturating_add(Duration::from_secs(60))
}

/// How long before its expiry a hit is refreshed: `refresh`, or, for a
/// value that lives no longer than that (a negative entry with a short
/// `missing`, say), the last fifth of its own `lifetime`; never for a value
/// that would not be stored.
fn refresh_window(refresh: Duration, lifetime: Option<Duration>) -> Option<Duration> {
    let lifetime = lifetime?;
    Some(if refresh < lifetime { refresh } else { lifetime / 5 })
}

/// Longest expiry sent to Redis: ten years, far inside what `PX` accepts.
const MAX_EXPIRY_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// A duration as the milliseconds of a `PX` argument: at least 1, at most
/// [`MAX_EXPIRY_MS`], whatever the configuration says.
pub(crate) fn expiry_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_EXPIRY_MS)
}

/// What waiting on another caller's lease gave.
enum Awaited<R> {
    /// Its value, its payload, and when the lookup that found it was sent.
    Value(R, Arc<[u8]>, Instant),
    /// The lease, taken over from a holder that gave it up or died.
    Took(LeaseGuard),
    /// Nothing in time: compute without the lease.
    GaveUp,
}

/// Adds to `pipe` a `SET NX GET` of `value` at `key` for `ttl_ms`: the
/// answer is the value that was there, or nil when `value` was set. How
/// generations are created and leases taken.
pub(crate) fn set_if_absent(pipe: &mut redis::Pipeline, key: &str, value: &str, ttl_ms: u64) {
    pipe.cmd("SET")
        .arg(key)
        .arg(value)
        .arg("NX")
        .arg("GET")
        .arg("PX")
        .arg(ttl_ms);
}

/// The generations a store expects to find.
enum Expected<'a> {
    /// Exactly these (`None`: absent), as seen before the computation.
    Seen(&'a [Option<Vec<u8>>]),
    /// Whatever is there now.
    Any,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_shorter_lived_than_the_refresh_window_is_refreshed_in_its_last_fifth() {
        let s = Duration::from_secs;
        assert_eq!(refresh_window(s(60), Some(s(300))), Some(s(60)));
        assert_eq!(refresh_window(s(60), Some(s(5))), Some(s(1)));
        assert_eq!(refresh_window(s(60), Some(s(60))), Some(s(12)));
        assert_eq!(refresh_window(s(60), None), None, "not stored: nothing to refresh");
    }
}
