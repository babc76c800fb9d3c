//! [`CacheManager`]: the handle every cached call goes through.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::Script;
use serde::{de::DeserializeOwned, Serialize};
use tokio::sync::watch;
use tracing::{debug, trace, warn};

use crate::codec::{self, Envelope, Output};
use crate::flight::{Flights, Next, Outcome, Role};
use crate::health::{supervise, Link};
use crate::invalidate::{expiry_ms, generation_ttl, generations_pattern, scan, Batch, Via};
use crate::key::{escape_glob, CacheKey, KeyBuilder, Scope};
use crate::stats::{CacheStats, ConnectionStatus, Counters};
use crate::token::new_token;
use crate::{CacheConfig, CacheError};

/// Stores a value only if every generation it depends on is still the one
/// seen before its computation started (see the crate docs, "No stale sets").
///
/// KEYS[1]: value key; KEYS[2..]: generation keys.
/// ARGV[1]: value TTL ms; ARGV[2]: generation TTL ms; ARGV[3]: fresh token;
/// ARGV[4]: envelope header; ARGV[5]: payload; ARGV[5 + i]: expected token
/// of KEYS[1 + i], or '*' to accept the current one (creating it if absent).
/// An absent generation never matches an expected token.
const STORE_SCRIPT: &str = r"
local n = #KEYS - 1
local tokens = {}
for i = 1, n do
  local current = redis.call('GET', KEYS[i + 1])
  local expected = ARGV[5 + i]
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

tokio::task_local! {
    static BYPASS: ();
}

/// Runs `future` with every cached call inside it computing its value
/// directly, neither reading nor writing the cache (invalidations still
/// happen). Useful in tests, and for a caller that must see the source.
pub async fn bypass<F: Future>(future: F) -> F::Output {
    BYPASS.scope((), future).await
}

fn bypassed() -> bool {
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
///   waiting on Redis.) See [`crate::health`] for reconnection.
/// * **No stale sets.** A value is stored only if no write invalidated its
///   scopes since its computation began.
/// * **Single flight.** Concurrent misses on one key compute once per process.
/// * **Optional.** A manager built with no URL (or `enabled = false`) is
///   disabled: every call computes, nothing is stored.
///
/// Dropping the last handle stops the background reconnection task.
#[derive(Clone, Debug)]
pub struct CacheManager {
    inner: Arc<Inner>,
}

struct Inner {
    link: Arc<Link>,
    flights: Flights,
    store: Script,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheManager")
            .field("url", &self.link.url)
            .field("status", &self.link.status())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.link.close();
    }
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
    /// [`CacheError::InvalidUrl`], or [`CacheError::NoRuntime`] outside a
    /// Tokio runtime; an unreachable Redis is not an error.
    pub async fn connect(url: Option<&str>, config: CacheConfig) -> Result<Self, CacheError> {
        let link = Arc::new(Link::new(url, config)?);
        if link.is_enabled() {
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(CacheError::NoRuntime);
            }
            if let Err(err) = link.establish(false).await {
                link.set_down();
                warn!(url = %link.url, error = %err, "Redis unavailable at start; caching paused, connecting in the background");
            }
            tokio::spawn(supervise(Arc::clone(&link)));
        }
        Ok(Self::from_link(link))
    }

    /// A manager that caches nothing: every call computes its value.
    pub fn disabled(config: CacheConfig) -> Self {
        let config = CacheConfig {
            enabled: false,
            ..config
        };
        Self::from_link(Arc::new(Link::disabled(config)))
    }

    fn from_link(link: Arc<Link>) -> Self {
        Self {
            inner: Arc::new(Inner {
                link,
                flights: Flights::default(),
                store: Script::new(STORE_SCRIPT),
            }),
        }
    }

    fn link(&self) -> &Link {
        &self.inner.link
    }

    /// The configuration this manager was built with.
    pub fn config(&self) -> &CacheConfig {
        &self.link().config
    }

    /// The Redis URL with its password redacted (empty when disabled).
    pub fn url(&self) -> &str {
        &self.link().url
    }

    /// Current connection status.
    pub fn status(&self) -> ConnectionStatus {
        self.link().status()
    }

    /// A receiver that sees every connection status change.
    pub fn subscribe(&self) -> watch::Receiver<ConnectionStatus> {
        self.link().subscribe()
    }

    /// A snapshot of the counters and the status.
    pub fn stats(&self) -> CacheStats {
        self.link().counters.snapshot(self.status())
    }

    /// Starts a key for a value named `name` in `namespace` (a model's
    /// collection, or any label).
    pub fn key(&self, namespace: &str, name: &str) -> KeyBuilder {
        KeyBuilder::new(&self.config().prefix, namespace, name)
    }

    /// Pings Redis and returns the round-trip time.
    ///
    /// # Errors
    /// When Redis is disabled, down, or does not answer in time.
    pub async fn ping(&self) -> Result<Duration, CacheError> {
        self.link().ping().await
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
    /// compute. Concurrent calls for one key in this process compute once.
    pub async fn get_or_compute<R, O, Fut>(&self, key: &CacheKey, ttl: Option<Duration>, compute: Fut) -> R
    where
        O: Output<R>,
        Fut: Future<Output = R>,
    {
        let link = self.link();
        if !link.is_enabled() || bypassed() {
            return compute.await;
        }
        let ttl = ttl.unwrap_or(link.config.ttl);
        let began = Instant::now();
        // What this call may spend waiting on Redis, across all its operations.
        let mut budget = link.config.operation_timeout;
        let mut lead = None;
        for _ in 0..MAX_ROUNDS {
            let generations = match self.lookup(key, &mut budget).await {
                Lookup::Hit(bytes, generations) => {
                    match Envelope::open(&bytes).and_then(|env| O::decode(env.payload)) {
                        Ok(value) => {
                            Counters::bump(&link.counters.hits);
                            trace!(key = key.as_str(), "cache hit");
                            return value;
                        }
                        Err(err) => {
                            self.discard(key, &err, &mut budget).await;
                            Some(generations)
                        }
                    }
                }
                Lookup::Miss(generations) => Some(generations),
                Lookup::Unavailable => None,
            };
            match self.inner.flights.join(key.as_str()) {
                Role::Leader(leader) => {
                    lead = Some((leader, generations));
                    break;
                }
                Role::Follower(follower) => match follower.wait(began).await {
                    Next::Use(payload) => {
                        if let Ok(value) = O::decode(&payload) {
                            Counters::bump(&link.counters.coalesced);
                            return value;
                        }
                    }
                    Next::Retry => {}
                    // The leader's result was not cacheable (an `Err`, a
                    // `None`): waiting for another leader would only queue.
                    Next::Compute => return compute.await,
                },
            }
        }
        let Some((leader, generations)) = lead else {
            // Other callers kept invalidating under us: compute without storing.
            return compute.await;
        };
        match &generations {
            Some(_) => Counters::bump(&link.counters.misses),
            None => Counters::bump(&link.counters.fallbacks),
        }
        // A successful compare-and-set proves no invalidation reached Redis
        // during the computation; it proves nothing about invalidations still
        // queued in other processes, which is possible only around a
        // quarantine (see `health`).
        let serving_before = link.is_serving();
        // A computation never starts under an absent generation: create the
        // missing ones first, so that any later invalidation replaces a token
        // this computation knows.
        let generations = match generations {
            Some(mut generations) if generations.iter().any(Option::is_none) => {
                match self.create_generations(key, &mut generations, &mut budget).await {
                    Ok(()) => Some(generations),
                    Err(_) => None,
                }
            }
            other => other,
        };
        let value = compute.await;
        let payload = match O::encode(&value) {
            Some(Ok(payload)) => payload,
            Some(Err(err)) => {
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
        let store_sent = Instant::now();
        let outcome = match generations {
            Some(generations) => match self
                .store(key, Expected::Seen(&generations), &payload, ttl, &mut budget)
                .await
            {
                Ok(true) if serving_before && link.is_serving() => Outcome::Stored(payload.into(), store_sent),
                Ok(true) => Outcome::Computed(payload.into()),
                // An invalidation happened during the computation: the value
                // may be older than a write some follower already saw.
                Ok(false) => Outcome::Retry,
                Err(_) => Outcome::Computed(payload.into()),
            },
            None => Outcome::Computed(payload.into()),
        };
        leader.complete(outcome);
        value
    }

    /// Reads the value and its generations in one `MGET`.
    async fn lookup(&self, key: &CacheKey, budget: &mut Duration) -> Lookup {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(&key.value).arg(&key.generations);
        let expected = 1 + key.generations.len();
        match self
            .link()
            .call_within(budget, |mut conn| async move {
                cmd.query_async::<Vec<Option<Vec<u8>>>>(&mut conn).await
            })
            .await
        {
            Ok(mut values) if values.len() == expected => {
                let value = values.remove(0);
                match value {
                    Some(bytes) => match Envelope::open(&bytes) {
                        // During a quarantine, current values are not served.
                        Ok(env) if env.is_current(&values) && self.link().is_serving() => Lookup::Hit(bytes, values),
                        // Superseded by a write: ignored, it expires by its TTL.
                        Ok(_) => Lookup::Miss(values),
                        Err(err) => {
                            self.discard(key, &err, budget).await;
                            Lookup::Miss(values)
                        }
                    },
                    None => Lookup::Miss(values),
                }
            }
            Ok(_) | Err(_) => Lookup::Unavailable,
        }
    }

    /// Creates the absent generations among `generations` (`SET NX GET`, one
    /// round trip) and fills in their tokens: ours, or the one another caller
    /// created first.
    async fn create_generations(
        &self,
        key: &CacheKey,
        generations: &mut [Option<Vec<u8>>],
        budget: &mut Duration,
    ) -> Result<(), CacheError> {
        let ttl_ms = expiry_ms(generation_ttl(self.config()));
        let mut pipe = redis::pipe();
        let mut fresh = Vec::new();
        for (name, token) in key.generations.iter().zip(generations.iter()) {
            if token.is_none() {
                let new = new_token();
                pipe.cmd("SET")
                    .arg(name)
                    .arg(&new)
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(ttl_ms);
                fresh.push(new);
            }
        }
        let previous: Vec<Option<Vec<u8>>> = self
            .link()
            .call_within(budget, |mut conn| async move { pipe.query_async(&mut conn).await })
            .await?;
        let mut answers = fresh.into_iter().zip(previous);
        for token in generations.iter_mut().filter(|t| t.is_none()) {
            let (new, previous) = answers.next().ok_or(CacheError::Unavailable)?;
            *token = Some(previous.unwrap_or_else(|| new.into_bytes()));
        }
        Ok(())
    }

    /// Removes a value that does not decode, counting it.
    async fn discard(&self, key: &CacheKey, err: &CacheError, budget: &mut Duration) {
        Counters::bump(&self.link().counters.decode_errors);
        debug!(key = key.as_str(), error = %err, "removing a cached value that does not decode");
        let _ = self.delete_within(key, budget).await;
    }

    /// Stores through the compare-and-set script.
    async fn store(
        &self,
        key: &CacheKey,
        expected: Expected<'_>,
        payload: &[u8],
        ttl: Duration,
        budget: &mut Duration,
    ) -> Result<bool, CacheError> {
        let link = self.link();
        let ttl_ms = expiry_ms(ttl);
        let generation_ms = expiry_ms(
            generation_ttl(&link.config)
                .max(ttl)
                .saturating_add(Duration::from_secs(60)),
        );
        let mut invocation = self.inner.store.key(&key.value);
        invocation
            .key(&key.generations)
            .arg(ttl_ms)
            .arg(generation_ms)
            .arg(new_token())
            .arg(&codec::header(key.generations.len())[..])
            .arg(payload);
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
        let stored: i64 = link
            .call_within(
                budget,
                |mut conn| async move { invocation.invoke_async(&mut conn).await },
            )
            .await?;
        if stored == 1 {
            Counters::bump(&link.counters.sets);
        } else {
            Counters::bump(&link.counters.stale_sets_refused);
            debug!(
                key = key.as_str(),
                "refused to store a value computed before an invalidation"
            );
        }
        Ok(stored == 1)
    }

    /// Reads a current value.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable, or fails. A value that does
    /// not decode is removed and reported as `Ok(None)`.
    pub async fn get<T: DeserializeOwned>(&self, key: &CacheKey) -> Result<Option<T>, CacheError> {
        let mut budget = self.config().operation_timeout;
        match self.lookup(key, &mut budget).await {
            Lookup::Hit(bytes, _) => match Envelope::open(&bytes).and_then(|env| codec::decode(env.payload)) {
                Ok(value) => {
                    Counters::bump(&self.link().counters.hits);
                    Ok(Some(value))
                }
                Err(err) => {
                    self.discard(key, &err, &mut budget).await;
                    Ok(None)
                }
            },
            Lookup::Miss(_) => {
                Counters::bump(&self.link().counters.misses);
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
        self.store(key, Expected::Any, &payload, ttl, &mut budget)
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
            .link()
            .call_within(budget, |mut conn| async move { cmd.query_async(&mut conn).await })
            .await?;
        Ok(removed > 0)
    }

    /// Invalidates everything cached under `scopes` (see [`Scope`] for what
    /// each one covers), in one round trip, without scanning. Call it after
    /// the write that made those values stale has committed.
    ///
    /// Never fails: when Redis is unavailable the invalidation is queued and
    /// replayed before caching resumes.
    pub async fn invalidate(&self, scopes: &[Scope<'_>]) {
        // Callers arriving after this write must not join a computation that
        // began before it.
        self.inner.flights.clear();
        let prefix = &self.config().prefix;
        let mut keys = Vec::with_capacity(scopes.len() * 2);
        for scope in scopes {
            scope.write_generations(prefix, &mut keys);
        }
        debug!(scopes = ?scopes, "invalidating");
        self.link().replace_generations(keys).await;
    }

    /// Invalidates everything this manager has cached: replaces every
    /// generation under its prefix (found with `SCAN`, in batches). Unlike
    /// [`invalidate`](Self::invalidate), its cost grows with the keyspace:
    /// it is for administration, not for ordinary writes. Returns the number
    /// of generations replaced.
    ///
    /// Correct against computations in flight: a computation only starts under
    /// generations that exist, so every one of them is found and replaced.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails part-way.
    pub async fn invalidate_all(&self) -> Result<u64, CacheError> {
        self.inner.flights.clear();
        Counters::bump(&self.link().counters.invalidations);
        let pattern = generations_pattern(&self.config().prefix);
        scan(Via::Link(self.link()), self.config(), &pattern, Batch::Replace).await
    }

    /// Deletes every key under this manager's prefix that matches `pattern`
    /// (a Redis glob, relative to the prefix), with `SCAN` and `UNLINK` in
    /// batches; never `KEYS`. Escape user data placed in the pattern with
    /// [`escape_glob`]. Returns the number of keys deleted.
    ///
    /// Its cost grows with the size of the keyspace: use [`invalidate`](Self::invalidate)
    /// for ordinary writes.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails part-way (keys deleted
    /// before the failure stay deleted).
    pub async fn delete_pattern(&self, pattern: &str) -> Result<u64, CacheError> {
        let full = format!("{}{}", escape_glob(&self.config().prefix), pattern);
        let deleted = scan(Via::Link(self.link()), self.config(), &full, Batch::Unlink).await?;
        debug!(pattern = %full, deleted, "pattern deletion");
        Ok(deleted)
    }

    fn unavailable(&self) -> CacheError {
        if self.link().is_enabled() {
            CacheError::Unavailable
        } else {
            CacheError::Disabled
        }
    }
}

/// The generations a store expects to find.
enum Expected<'a> {
    /// Exactly these (`None`: absent), as seen before the computation.
    Seen(&'a [Option<Vec<u8>>]),
    /// Whatever is there now.
    Any,
}
