//! The connection to Redis: what happens when Redis dies, freezes or returns.
//!
//! # Behaviour
//!
//! * One multiplexed connection serves every call, so concurrent calls are
//!   pipelined on one socket.
//! * Every call waits on Redis at most `operation_timeout` in all. A timeout,
//!   a refused or reset connection **drops** the connection: the status
//!   becomes [`ConnectionStatus::Down`], and from then on calls skip Redis at
//!   once (no waiting) and compute their values instead.
//! * A single background task (the supervisor) owns reconnection, so a hundred
//!   failing calls cause one reconnect, not a hundred. While down it makes up
//!   to `max_retries` attempts, `retry_delay` apart and doubling (capped at
//!   `max_retry_delay`, spread by `jitter`), then waits
//!   `health_check_interval` and starts another round, for ever. A connection
//!   lost at any moment starts a new round at once. Caching is never switched
//!   off for good.
//! * Before a new connection is used, the invalidations that could not be
//!   sent while Redis was away are replayed ([`crate::outbox`]), so a value
//!   made stale during an outage is not served after it.
//! * **Presence.** Every connected manager writes a heartbeat every
//!   `heartbeat_interval` into `PREFIX meta:members` (its health check), and
//!   reads how many managers sharing the prefix have missed theirs for
//!   longer than `2 * heartbeat_interval + operation_timeout`. Such a
//!   manager may be cut off from Redis holding invalidations it could not
//!   send, so while one is missing this manager serves no hits
//!   ([`ConnectionStatus::Recovering`]): it looks values up and stores them
//!   under the usual compare-and-set, but computes every value. A missing
//!   manager ends this by coming back (it replays first, then beats), or is
//!   forgotten once it has been silent for longer than it can take to retry
//!   with its own settings (which it publishes with its heartbeat):
//!   `max(health_check_interval, longest back-off step) + connect_timeout +
//!   operation_timeout`. This covers managers that did not
//!   see an outage themselves (they made no call during it, or started after
//!   it).
//! * After its own outage a manager also serves no hits for a quarantine of
//!   that same bound after it reconnected: a Redis that restarted empty (or
//!   was flushed) has lost the heartbeats too, so only time tells that every
//!   manager which lost its connection with it has reconnected and replayed
//!   its outbox. The bound uses the largest back-off step the settings can
//!   produce, not the configured cap.
//! * A Redis that restarted (a `run_id` other than the one recorded under the
//!   prefix) may have reloaded old values and old generations from a snapshot
//!   or an append-only file: before using it, the manager deletes every
//!   generation under its prefix. The `run_id` is recorded in Redis, so a
//!   process that starts after the restart checks too.
//! * On connecting, the manager checks that this Redis lets it store values
//!   (version 7.0 or later, permission for the commands it uses) and warns
//!   when it does not; [`CacheManager::can_store`](crate::CacheManager::can_store)
//!   and the `store_errors` statistic report it.
//! * The supervisor stops when the last [`CacheManager`](crate::CacheManager)
//!   handle is dropped, removing its heartbeat.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, RedisResult, Script};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::backoff::random_unit;
use crate::key::Scope;
use crate::keyspace::Keyspace;
use crate::outbox::{invalidation, Outbox};
use crate::redact::redact_url;
use crate::scan::{bounded, unlink_matching};
use crate::stats::{ConnectionStatus, Counters};
use crate::token::new_token;
use crate::{CacheConfig, CacheError};

/// Writes this manager's heartbeat, forgets managers silent for longer than
/// their own settings allow, and counts those that have missed their
/// heartbeats but are not forgotten yet.
///
/// KEYS[1]: the members set (score: time of the last beat, in ms of the
/// server's clock; member: `FORGET_MS:ID`, so that each member is forgotten
/// after its own bound, whatever the settings of the manager reading it).
/// ARGV[1]: this manager's member; ARGV[2]: missing after (ms); ARGV[3]: how
/// long the set outlives the last beat (ms); ARGV[4]: the latest server time
/// at which this beat still counts (0: any), so that a beat held up in a
/// frozen server and run after the thaw does not pass for a live manager.
/// ARGV[5]: '1' when this manager has beaten into the set before; ARGV[6]:
/// this manager's time to forget a member (ms). A set gone although this
/// manager beat into it was lost (evicted, deleted) with whoever it held:
/// a member `ARGV[6]:lost`, silent from the start, then stands for them
/// and counts as missing until it is forgotten.
/// KEYS[2], when given: a database feed's caught-up marker, returned as is.
/// Returns `{missing, now, marker}` (`missing` is -1 for a beat that came
/// too late; `marker` is -1 when absent).
/// Allowed under OOM: the entry is tiny, and a manager that cannot beat
/// would stop every other one from serving.
const HEARTBEAT_SCRIPT: &str = r"#!lua flags=allow-oom
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = tonumber(ARGV[4])
local marker = -1
if #KEYS > 1 then
  marker = tonumber(redis.call('GET', KEYS[2]) or '-1') or -1
end
if deadline > 0 and now > deadline then
  return {-1, now, marker}
end
if ARGV[5] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZADD', KEYS[1], now - tonumber(ARGV[2]) - 1, ARGV[6] .. ':lost')
end
local silent = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'WITHSCORES')
local missing = 0
for i = 1, #silent, 2 do
  local forget = tonumber(string.match(silent[i], '^(%d+):')) or 0
  if silent[i] ~= ARGV[1] then
    if now - tonumber(silent[i + 1]) > forget then
      redis.call('ZREM', KEYS[1], silent[i])
    else
      missing = missing + 1
    end
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {missing, now, marker}
";

/// How often, at most, a manager that waits for its next reconnection round
/// checks with a TCP probe whether Redis accepts connections again.
const PROBE: Duration = Duration::from_millis(250);

/// The pause between heartbeats while a manager does not serve every value.
const RECOVERY_BEAT: Duration = Duration::from_millis(100);

/// How recent a feed's caught-up marker must be for values to be served on
/// its word.
const FEED_FRESH_MS: i64 = 1000;

/// The live connection and the number that identifies it, so that a failure
/// seen on an old connection never drops a newer one.
#[derive(Clone)]
pub(crate) struct Live {
    id: u64,
    pub(crate) conn: MultiplexedConnection,
}

/// Connection state shared by every handle and the supervisor.
pub(crate) struct Connection {
    pub(crate) config: CacheConfig,
    /// The prefix as used in keys (ending in `:`).
    pub(crate) namespace: String,
    client: Option<redis::Client>,
    /// The Redis URL with its password redacted: safe to log.
    pub(crate) url: String,
    live: RwLock<Option<Live>>,
    status: watch::Sender<ConnectionStatus>,
    wake: Notify,
    closed: AtomicBool,
    next_id: AtomicU64,
    /// This manager's name among the members of its prefix.
    member: String,
    heartbeat: Script,
    /// Whether a heartbeat of this manager has reached the members set.
    beaten: AtomicBool,
    /// Whether lookups may return values.
    serving: AtomicBool,
    /// When a connection was last published after an outage (for the
    /// quarantine that follows).
    reconnected_at: Mutex<Option<Instant>>,
    /// The server's clock (ms) as last read by a heartbeat, with when that
    /// heartbeat was sent and when its answer came back.
    server_clock: Mutex<Option<ServerClock>>,
    /// The key of the database feed's caught-up marker, when one is followed.
    feed_marker: Mutex<Option<String>>,
    /// The start of the scope names the followed feed covers.
    feed_scopes: RwLock<Option<Arc<str>>>,
    /// The server's time (ms) at this manager's latest return after an
    /// outage, once known; `Some(None)`: reconnected, not yet known.
    back_at: Mutex<Option<Option<i64>>>,
    /// Whether values without tags may be served on the feed's word.
    feed_serving: AtomicBool,
    /// Whether the checks at connect found that values can be stored.
    can_store: AtomicBool,
    /// Whether a refused store was already reported for this connection.
    store_error_reported: AtomicBool,
    pub(crate) counters: Counters,
    outbox: Outbox,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("url", &self.url)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection to `url`, or a disabled one for `None`. Does not connect.
    pub(crate) fn new(url: Option<&str>, config: CacheConfig) -> Result<Self, CacheError> {
        match url {
            Some(url) if config.enabled => {
                config.validate()?;
                let redacted = redact_url(url);
                let client = redis::Client::open(url).map_err(|source| CacheError::InvalidUrl {
                    url: redacted.clone(),
                    source,
                })?;
                Ok(Self::with_client(Some(client), redacted, config))
            }
            _ => Ok(Self::disabled(config)),
        }
    }

    fn with_client(client: Option<redis::Client>, redacted: String, config: CacheConfig) -> Self {
        let status = if client.is_some() {
            ConnectionStatus::Connecting
        } else {
            ConnectionStatus::Disabled
        };
        let mut connection = Self {
            namespace: config.namespace(),
            config,
            client,
            url: redacted,
            live: RwLock::new(None),
            status: watch::Sender::new(status),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            member: String::new(),
            heartbeat: Script::new(HEARTBEAT_SCRIPT),
            beaten: AtomicBool::new(false),
            serving: AtomicBool::new(false),
            reconnected_at: Mutex::new(None),
            server_clock: Mutex::new(None),
            feed_marker: Mutex::new(None),
            feed_scopes: RwLock::new(None),
            back_at: Mutex::new(None),
            feed_serving: AtomicBool::new(false),
            can_store: AtomicBool::new(true),
            store_error_reported: AtomicBool::new(false),
            counters: Counters::default(),
            outbox: Outbox::default(),
        };
        connection.member = format!("{}:{}", millis(connection.forget_after()), new_token());
        connection
    }

    /// A connection that never connects: caching is off.
    pub(crate) fn disabled(config: CacheConfig) -> Self {
        Self::with_client(None, String::new(), config)
    }

    /// The names of the keys under this manager's prefix.
    pub(crate) fn keys(&self) -> Keyspace<'_> {
        Keyspace::new(&self.namespace)
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.client.is_some()
    }

    pub(crate) fn status(&self) -> ConnectionStatus {
        *self.status.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<ConnectionStatus> {
        self.status.subscribe()
    }

    /// Whether lookups may serve stored values now.
    pub(crate) fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// Whether a lookup of `key` may serve its stored value now: when every
    /// value may be, or when the database feed vouches for values without
    /// tags.
    pub(crate) fn serves(&self, key: &crate::CacheKey) -> bool {
        self.is_serving() || (key.feed_covered && self.feed_serving.load(Ordering::Acquire))
    }

    /// Follows a database feed's caught-up marker (see `CacheManager::follow_feed`).
    pub(crate) fn follow_feed(&self, marker: &str, scopes: &str) {
        *self.feed_scopes.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::from(scopes));
        *self.feed_marker.lock().unwrap_or_else(PoisonError::into_inner) = Some(self.keys().meta(marker));
        self.wake.notify_one();
    }

    /// The start of the scope names the followed feed covers, if any.
    pub(crate) fn feed_scopes(&self) -> Option<Arc<str>> {
        self.feed_scopes.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether the checks at connect found that this Redis takes stores.
    pub(crate) fn can_store(&self) -> bool {
        self.can_store.load(Ordering::Acquire)
    }

    /// Whether a connection is published right now.
    pub(crate) fn is_connected(&self) -> bool {
        self.live.read().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// The published connection, or [`CacheError::Unavailable`] at once.
    fn live(&self) -> Result<Live, CacheError> {
        if self.client.is_none() {
            return Err(CacheError::Disabled);
        }
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(CacheError::Unavailable)
    }

    /// A manager whose heartbeat is older than this is missing.
    fn missing_after(&self) -> Duration {
        self.config
            .heartbeat_interval
            .saturating_mul(2)
            .saturating_add(self.config.operation_timeout)
    }

    /// How long a live manager can take to reconnect (and replay) once
    /// Redis answers again: the quarantine after an outage.
    pub(crate) fn quarantine(&self) -> Duration {
        let attempts = self.config.max_retries.max(1);
        self.config
            .health_check_interval
            .max(self.config.backoff().longest_step(attempts))
            .saturating_add(self.config.connect_timeout)
            .saturating_add(self.config.operation_timeout)
    }

    /// A manager silent for longer than this is forgotten: it was missing
    /// for longer than any live manager takes to come back.
    pub(crate) fn forget_after(&self) -> Duration {
        self.missing_after().saturating_add(self.quarantine())
    }

    /// Runs one Redis operation on the published connection, bounded by the
    /// operation timeout.
    pub(crate) async fn call<T, F, Fut>(&self, op: F) -> Result<T, CacheError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut budget = self.config.operation_timeout;
        self.call_within(&mut budget, op).await
    }

    /// Like [`call`](Self::call), but bounded by what is left of `budget`
    /// (one call's allowance for waiting on Redis across several operations),
    /// which it reduces by the time spent. Connection failures drop the
    /// connection; a timeout does when the operation had the full operation
    /// timeout.
    pub(crate) async fn call_within<T, F, Fut>(&self, budget: &mut Duration, op: F) -> Result<T, CacheError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let full = self.config.operation_timeout;
        if budget.is_zero() {
            return Err(CacheError::Timeout(full));
        }
        let live = self.live()?;
        let limit = (*budget).min(full);
        let start = Instant::now();
        let outcome = tokio::time::timeout(limit, op(live.conn)).await;
        *budget = budget.saturating_sub(start.elapsed());
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => {
                Counters::bump(&self.counters.errors, "earnorm_cache_errors_total");
                if is_connection_error(&err) {
                    self.drop_connection(live.id, &err);
                } else {
                    debug!(error = %err, "Redis command failed");
                }
                Err(CacheError::Redis(err))
            }
            Err(_) => {
                Counters::bump(&self.counters.errors, "earnorm_cache_errors_total");
                if limit == full {
                    self.drop_connection(live.id, &format!("no answer within {limit:?}"));
                }
                Err(CacheError::Timeout(limit))
            }
        }
    }

    /// Unpublishes connection `id` (if it is still the published one), stops
    /// serving, and wakes the supervisor to reconnect.
    fn drop_connection(&self, id: u64, reason: &dyn std::fmt::Display) {
        {
            let mut live = self.live.write().unwrap_or_else(PoisonError::into_inner);
            if live.as_ref().is_none_or(|live| live.id != id) {
                return;
            }
            *live = None;
            self.serving.store(false, Ordering::Release);
            self.feed_serving.store(false, Ordering::Release);
        }
        self.status.send_replace(ConnectionStatus::Down);
        warn!(url = %self.url, reason = %reason, "Redis connection lost; caching paused, reconnecting in the background");
        self.wake.notify_one();
    }

    /// Unpublishes whatever connection is published.
    fn drop_published(&self, reason: &str) {
        let id = self
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|live| live.id);
        if let Some(id) = id {
            self.drop_connection(id, &reason);
        }
    }

    /// Invalidates `scopes` (deletes their generations), or queues them in
    /// the outbox when no connection can take them. Never fails. `notes`
    /// (name, value, time to live) are written after the deletions, at
    /// `PREFIX meta:NAME`, when they go out at once; they are dropped with a
    /// queued invalidation.
    pub(crate) async fn invalidate(&self, scopes: &[Scope<'_>], source: crate::InvalidationSource) {
        self.counters.invalidated(source);
        if !self.is_enabled() || scopes.is_empty() {
            return;
        }
        if self.outbox.defer_unless_published(|| self.is_connected(), scopes) {
            Counters::bump(
                &self.counters.invalidations_deferred,
                "earnorm_cache_invalidations_deferred_total",
            );
            return;
        }
        let pipe = invalidation(&self.namespace, scopes.iter().copied());
        let sent = self
            .call(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await;
        if sent.is_err() {
            // Queued, and the connection dropped, so that the rule of the
            // outbox holds: the replay happens before any further read.
            self.outbox.defer(scopes);
            Counters::bump(
                &self.counters.invalidations_deferred,
                "earnorm_cache_invalidations_deferred_total",
            );
            self.drop_published("an invalidation could not be sent");
        }
    }

    /// Counts a store or generation creation that Redis refused, and warns
    /// the first time on each connection.
    pub(crate) fn store_refused(&self, err: &CacheError) {
        Counters::bump(&self.counters.store_errors, "earnorm_cache_store_errors_total");
        if let CacheError::Redis(err) = err {
            if !self.store_error_reported.swap(true, Ordering::AcqRel) {
                warn!(url = %self.url, error = %err, "Redis refused to store a cached value; calls compute their values until it accepts");
            }
        }
    }

    /// Opens a connection, checks the server, replays the outbox on it,
    /// publishes it, and beats once (which decides whether hits are served).
    pub(crate) async fn establish(&self) -> Result<(), CacheError> {
        let Some(client) = &self.client else {
            return Err(CacheError::Disabled);
        };
        let limit = self.config.connect_timeout;
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(limit))
            .set_response_timeout(None);
        let mut conn = bounded(limit, client.get_multiplexed_async_connection_with_config(&settings)).await?;
        let step = self.config.operation_timeout;
        // A server that hides INFO (ACL) is not refused: its version and
        // restarts cannot be checked, which the checks below report.
        let info: Option<String> = bounded(step, redis::cmd("INFO").arg("server").query_async(&mut conn))
            .await
            .map_err(|err| debug!(error = %err, "INFO server failed"))
            .ok();
        let server = ServerInfo::parse(info.as_deref().unwrap_or(""));
        self.check_restart(&mut conn, server.run_id.as_deref()).await?;
        self.check_capabilities(&mut conn, &server).await;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let after_outage = self.status() != ConnectionStatus::Connecting;
        if after_outage {
            *self.reconnected_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
            *self.back_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(None);
        }
        self.outbox
            .replay_then_publish(&mut conn.clone(), &self.namespace, step, || {
                let mut live = self.live.write().unwrap_or_else(PoisonError::into_inner);
                // Nothing decided for an earlier connection carries over.
                self.serving.store(false, Ordering::Release);
                self.feed_serving.store(false, Ordering::Release);
                *live = Some(Live { id, conn });
            })
            .await?;
        self.store_error_reported.store(false, Ordering::Release);
        Counters::bump(&self.counters.reconnects, "earnorm_cache_reconnects_total");
        if after_outage {
            info!(url = %self.url, quarantine = ?self.quarantine(), "reconnected to Redis");
        } else {
            info!(url = %self.url, "connected to Redis");
        }
        self.beat().await;
        Ok(())
    }

    /// Writes the heartbeat and decides whether hits are served: only when
    /// no manager of the prefix is missing and this one's quarantine after
    /// its own outage is over.
    pub(crate) async fn beat(&self) {
        let missing_after = self.missing_after();
        let mut invocation = self.heartbeat.key(self.keys().members());
        let marker_key = self.feed_marker.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if let Some(marker_key) = &marker_key {
            invocation.key(marker_key);
        }
        let outlives = self.forget_after().saturating_mul(10).max(Duration::from_secs(3600));
        let sent = Instant::now();
        let deadline = self
            .server_clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map_or(0, |clock| {
                clock
                    .at_most(sent)
                    .saturating_add(millis_i64(self.config.operation_timeout))
                    .max(1)
            });
        invocation
            .arg(&self.member)
            .arg(millis(missing_after))
            .arg(millis(outlives))
            .arg(deadline)
            .arg(if self.beaten.load(Ordering::Acquire) { "1" } else { "0" })
            .arg(millis(self.forget_after()));
        let Ok(beat_on) = self.live().map(|live| live.id) else {
            return;
        };
        let answer = self
            .call(|mut conn| async move { invocation.invoke_async::<(i64, i64, i64)>(&mut conn).await })
            .await;
        if let Ok((missing, _, _)) = &answer {
            if *missing >= 0 {
                self.beaten.store(true, Ordering::Release);
            }
        }
        if let Ok((_, server_ms, _)) = &answer {
            *self.server_clock.lock().unwrap_or_else(PoisonError::into_inner) = Some(ServerClock {
                sent,
                received: Instant::now(),
                server_ms: *server_ms,
            });
        }
        let feed_current = match &answer {
            Ok((missing, server_ms, marker)) if *missing >= 0 && marker_key.is_some() => {
                let mut back_at = self.back_at.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(pending @ None) = back_at.as_mut() {
                    *pending = Some(*server_ms);
                }
                let since = back_at.flatten().unwrap_or(0);
                // A marker from the future (a clock stepped back) is no proof.
                *marker >= since && (0..=FEED_FRESH_MS).contains(&server_ms.saturating_sub(*marker))
            }
            _ => false,
        };
        let missing = answer.map(|(missing, _, _)| missing);
        let reconnected_at = *self.reconnected_at.lock().unwrap_or_else(PoisonError::into_inner);
        let own_outage_settled = reconnected_at.is_none_or(|at| at.elapsed() >= self.quarantine());
        match &missing {
            Ok(-1) => debug!("a heartbeat reached Redis too late to count"),
            Ok(n) if *n > 0 => debug!(missing = n, "managers sharing the prefix missed their heartbeats"),
            Err(err) => debug!(error = %err, "heartbeat failed"),
            Ok(_) => {}
        }
        let serve = matches!(missing, Ok(0)) && own_outage_settled;
        // Decided for the connection the beat ran on: stored only while it
        // is still the published one (under the lock that unpublishes it).
        let (was, was_feed) = {
            let live = self.live.read().unwrap_or_else(PoisonError::into_inner);
            if live.as_ref().map(|live| live.id) != Some(beat_on) {
                return;
            }
            (
                self.serving.swap(serve, Ordering::AcqRel),
                self.feed_serving.swap(feed_current, Ordering::AcqRel),
            )
        };
        if was_feed != feed_current {
            info!(url = %self.url, serving = feed_current, "values without tags served on the database feed's word");
        }
        let status = if serve {
            ConnectionStatus::Connected
        } else {
            ConnectionStatus::Recovering
        };
        let previous = self.status.send_replace(status);
        if serve && !was {
            info!(url = %self.url, "serving cached values");
        } else if !serve && previous != ConnectionStatus::Recovering {
            info!(url = %self.url, "serving no cached values until every manager sharing the prefix is back (or forgotten)");
        }
    }

    /// The earliest the Redis server's clock (ms) can read now, from the
    /// last heartbeat; `None` before the first.
    pub(crate) fn server_time_at_least(&self) -> Option<i64> {
        self.server_clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|clock| clock.at_least(Instant::now()))
    }

    /// The latest the Redis server's clock (ms) can read now, from the last
    /// heartbeat; `None` before the first.
    pub(crate) fn server_time_at_most(&self) -> Option<i64> {
        self.server_clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|clock| clock.at_most(Instant::now()))
    }

    /// When the Redis server is not the one the data under this prefix was
    /// last used with (its `run_id` differs from the one recorded at
    /// `PREFIX meta:run_id`), it may have reloaded old values and old
    /// generations from a snapshot or an append-only file: delete every
    /// generation under the prefix before anyone reads, then record the new
    /// `run_id`.
    async fn check_restart(&self, conn: &mut MultiplexedConnection, run_id: Option<&str>) -> Result<(), CacheError> {
        let Some(run_id) = run_id else { return Ok(()) };
        let limit = self.config.operation_timeout;
        let marker = self.keys().run_id();
        let recorded: Option<String> = bounded(limit, redis::cmd("GET").arg(&marker).query_async(conn)).await?;
        if recorded.as_deref() == Some(run_id) {
            return Ok(());
        }
        let removed = unlink_matching(conn, limit, &self.keys().generations_glob()).await?;
        if removed > 0 {
            info!(url = %self.url, removed, "Redis restarted: invalidated every generation in case old values were reloaded");
        }
        bounded(
            limit,
            redis::cmd("SET").arg(&marker).arg(run_id).query_async::<()>(conn),
        )
        .await
    }

    /// Checks that this Redis lets the cache store values: the commands and
    /// options it uses (`SET .. NX GET`, scripts with flags: Redis 7.0) and
    /// the permissions an ACL user needs. Warns when it does not.
    async fn check_capabilities(&self, conn: &mut MultiplexedConnection, server: &ServerInfo) {
        let limit = self.config.operation_timeout;
        let probe = self.keys().probe(&self.member);
        let mut checks = redis::pipe();
        checks
            .cmd("SET")
            .arg(&probe)
            .arg("1")
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(5000)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&probe)
            .arg(5000)
            .arg("GT")
            .ignore()
            .cmd("EVAL")
            .arg("#!lua\nreturn redis.call('PEXPIRE', KEYS[1], 5000)")
            .arg(1)
            .arg(&probe)
            .ignore()
            .cmd("UNLINK")
            .arg(&probe)
            .ignore();
        let outcome = bounded(limit, checks.query_async::<()>(conn)).await;
        let too_old = server.version.is_some_and(|v| v < (7, 0));
        let refused = match outcome {
            Err(CacheError::Redis(err)) if err.code() == Some("OOM") => {
                warn!(url = %self.url, "Redis is out of memory (maxmemory with noeviction): values are not stored until it has room; reads and invalidations go on");
                None
            }
            Err(CacheError::Redis(err)) if !is_connection_error(&err) => Some(err.to_string()),
            _ if too_old => Some(format!(
                "Redis {}.{} is older than 7.0",
                server.version.map_or(0, |v| v.0),
                server.version.map_or(0, |v| v.1)
            )),
            _ => None,
        };
        self.can_store.store(refused.is_none(), Ordering::Release);
        if let Some(reason) = refused {
            warn!(
                url = %self.url,
                reason = %reason,
                "this Redis does not let the cache store values (it needs Redis 7.0 or later and, for an ACL user, \
                 GET, SET, MGET, DEL, UNLINK, PEXPIRE, PTTL, SCAN, ZADD, ZRANGEBYSCORE, ZREM, TIME, PING, EVAL, EVALSHA and INFO on the prefix); \
                 every call computes its value"
            );
        }
    }

    /// Waits `interval` before the next reconnection attempt, or less: a TCP
    /// probe every `probe` notices a Redis that accepts connections again and
    /// ends the wait at once, so its return costs a fraction of a second,
    /// not a back-off step or a health-check interval. (A probe is one TCP
    /// connection, closed at once.)
    async fn wait_for_next_round(&self, interval: Duration, probe: Duration) {
        let address = self
            .client
            .as_ref()
            .and_then(|client| match &client.get_connection_info().addr() {
                redis::ConnectionAddr::Tcp(host, port) | redis::ConnectionAddr::TcpTls { host, port, .. } => {
                    Some((host.clone(), *port))
                }
                _ => None,
            });
        let until = tokio::time::Instant::now() + interval;
        let step = probe.min(interval);
        loop {
            let pause = step.min(until.saturating_duration_since(tokio::time::Instant::now()));
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.wake.notified() => return,
            }
            if tokio::time::Instant::now() >= until || self.is_closed() {
                return;
            }
            if let Some((host, port)) = &address {
                let probe = tokio::net::TcpStream::connect((host.as_str(), *port));
                if matches!(
                    tokio::time::timeout(self.config.connect_timeout, probe).await,
                    Ok(Ok(_))
                ) {
                    debug!(url = %self.url, "Redis accepts connections again: reconnecting now");
                    return;
                }
            }
        }
    }

    /// Removes this manager's heartbeat (it is leaving, not missing).
    pub(crate) async fn leave(&self) {
        let key = self.keys().members();
        let member = self.member.clone();
        let _ = self
            .call(|mut conn| async move {
                redis::cmd("ZREM")
                    .arg(key)
                    .arg(member)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await;
    }

    /// Pings the published connection; returns the round-trip time.
    pub(crate) async fn ping(&self) -> Result<Duration, CacheError> {
        let start = Instant::now();
        self.call(|mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await })
            .await?;
        Ok(start.elapsed())
    }

    /// The published connection, for operations that run several commands
    /// (pattern deletion); failures there are passed to [`Self::failed`].
    pub(crate) fn published(&self) -> Result<(u64, MultiplexedConnection), CacheError> {
        self.live().map(|live| (live.id, live.conn))
    }

    /// Reports a failure of an operation run on [`Self::published`].
    pub(crate) fn failed(&self, id: u64, err: &CacheError) {
        Counters::bump(&self.counters.errors, "earnorm_cache_errors_total");
        match err {
            CacheError::Redis(e) if is_connection_error(e) => self.drop_connection(id, e),
            CacheError::Timeout(limit) => self.drop_connection(id, &format!("no answer within {limit:?}")),
            _ => {}
        }
    }

    /// Records that the first connection attempt failed.
    pub(crate) fn first_attempt_failed(&self) {
        self.status.send_replace(ConnectionStatus::Down);
    }

    /// Asks the supervisor to stop.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// A reading of the server's clock.
#[derive(Debug, Clone, Copy)]
struct ServerClock {
    sent: Instant,
    received: Instant,
    server_ms: i64,
}

impl ServerClock {
    /// The latest the server's time can be at `at` (the reading was taken
    /// no earlier than `sent`).
    fn at_most(&self, at: Instant) -> i64 {
        self.server_ms
            .saturating_add(millis_i64(at.saturating_duration_since(self.sent)))
    }

    /// The earliest the server's time can be at `at` (the reading was taken
    /// no later than `received`).
    fn at_least(&self, at: Instant) -> i64 {
        self.server_ms
            .saturating_add(millis_i64(at.saturating_duration_since(self.received)))
    }
}

fn millis_i64(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// What `INFO server` says that the cache uses.
#[derive(Debug, Default, PartialEq)]
struct ServerInfo {
    run_id: Option<String>,
    version: Option<(u32, u32)>,
}

impl ServerInfo {
    fn parse(info: &str) -> Self {
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let version = field("redis_version:").and_then(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        });
        Self {
            run_id: field("run_id:"),
            version,
        }
    }
}

/// A duration in whole milliseconds, at least 1.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Whether an error means the connection itself is unusable.
fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_timeout() || err.is_unrecoverable_error()
}

/// The reconnect-and-heartbeat loop. Runs until [`Connection::close`].
pub(crate) async fn supervise(conn: Arc<Connection>) {
    let backoff = conn.config.backoff();
    let interval = conn.config.health_check_interval;
    while !conn.is_closed() {
        if conn.is_connected() {
            // While not serving everything, beat often enough to resume soon.
            let pause = if conn.is_serving() {
                conn.config.heartbeat_interval
            } else {
                conn.config.heartbeat_interval.min(RECOVERY_BEAT)
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => conn.beat().await,
                () = conn.wake.notified() => {}
            }
            continue;
        }
        // One reconnection round.
        let attempts = conn.config.max_retries.max(1);
        let mut unreachable = true;
        for attempt in 0..attempts {
            if conn.is_closed() {
                return;
            }
            match conn.establish().await {
                Ok(()) => break,
                Err(err) => {
                    debug!(url = %conn.url, attempt = attempt + 1, error = %err, "Redis reconnection attempt failed");
                    unreachable = match &err {
                        CacheError::Timeout(_) | CacheError::Unavailable => true,
                        CacheError::Redis(err) => is_connection_error(err),
                        _ => false,
                    };
                    if attempt + 1 < attempts {
                        // The back-off step, cut short by the probe when
                        // Redis could not be reached and answers again.
                        let step = backoff.delay(attempt, random_unit());
                        conn.wait_for_next_round(step, if unreachable { PROBE } else { step })
                            .await;
                    }
                }
            }
        }
        if !conn.is_connected() {
            if conn.status() != ConnectionStatus::Down {
                conn.status.send_replace(ConnectionStatus::Down);
            }
            warn!(url = %conn.url, "Redis unavailable; caching paused, retrying in {interval:?}");
            // Probing helps only when Redis could not be reached at all; one
            // that answers and refuses (a password, a permission) waits.
            let probe = if unreachable { PROBE } else { interval };
            conn.wait_for_next_round(interval, probe).await;
        }
    }
    conn.leave().await;
    debug!("cache supervisor stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_info_gives_the_version_and_run_id() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc\r\n";
        assert_eq!(
            ServerInfo::parse(info),
            ServerInfo {
                run_id: Some("abc".into()),
                version: Some((7, 0)),
            }
        );
        assert_eq!(ServerInfo::parse("redis_version:6.2.1").version, Some((6, 2)));
        assert_eq!(ServerInfo::parse("").version, None);
    }

    #[test]
    fn silent_managers_are_forgotten_after_the_longest_retry_the_settings_allow() {
        let conn = Connection::disabled(CacheConfig {
            health_check_interval: Duration::from_millis(300),
            retry_delay: Duration::from_millis(100),
            max_retries: 2,
            max_retry_delay: Duration::from_secs(30),
            connect_timeout: Duration::from_millis(300),
            operation_timeout: Duration::from_millis(250),
            heartbeat_interval: Duration::from_millis(100),
            ..CacheConfig::default()
        });
        assert_eq!(conn.quarantine(), Duration::from_millis(850));
        assert_eq!(
            conn.forget_after(),
            Duration::from_millis(850 + 450),
            "missing first, then forgotten"
        );
    }
}
