//! The Redis connection: what happens when Redis dies, freezes or returns.
//!
//! # Behaviour
//!
//! * One multiplexed connection serves every call, so concurrent calls are
//!   pipelined on one socket.
//! * Every operation is bounded by `operation_timeout`. A timeout, a refused
//!   or reset connection marks the link **down**: the connection is dropped,
//!   the status becomes [`ConnectionStatus::Down`], and from then on calls
//!   skip Redis at once (no waiting) and compute their values instead.
//! * A single background task (the supervisor) owns reconnection, so a hundred
//!   failing calls cause one reconnect, not a hundred. While down it makes up
//!   to `max_retries` attempts, `retry_delay` apart and doubling (capped at
//!   `max_retry_delay`, spread by `jitter`), then waits `health_check_interval`
//!   and starts another round, for ever. While up it pings every
//!   `health_check_interval`. Caching is never switched off for good.
//! * Before a new connection is used, invalidations that could not be sent
//!   while Redis was away are replayed (see [`crate::invalidate`]), so a value
//!   made stale during an outage is not served after it.
//! * After reconnecting following an outage, the manager is
//!   [`Recovering`](ConnectionStatus::Recovering) for a quarantine: it looks
//!   values up and stores them, but serves no hits. Other processes may still
//!   be disconnected, holding invalidations for writes they made meanwhile;
//!   every process retries at least every `max(health_check_interval,
//!   max_retry_delay * (1 + jitter))`, so by the end of the quarantine (that
//!   plus `connect_timeout`) each has reconnected and replayed them, provided
//!   its replay itself is quick (each replay batch is bounded by
//!   `operation_timeout`).
//! * A Redis that restarted (a `run_id` other than the one recorded under the
//!   prefix) may have reloaded old values and old generations from a snapshot
//!   or an append-only file: before using it, the manager replaces every
//!   generation under its prefix. The `run_id` is recorded in Redis, so a
//!   process that starts after the restart checks too.
//! * The supervisor stops when the last [`CacheManager`](crate::CacheManager)
//!   handle is dropped.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, RedisError, RedisResult};
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::backoff::{random_unit, Backoff};
use crate::invalidate::{self, Batch, Pending, Via};
use crate::redact::redact_url;
use crate::stats::{ConnectionStatus, Counters};
use crate::{CacheConfig, CacheError};

/// The live connection and the number that identifies it, so that a failure
/// seen on an old connection never takes down a newer one.
#[derive(Clone)]
struct Live {
    id: u64,
    conn: MultiplexedConnection,
}

/// Connection state shared by every handle and the supervisor.
pub(crate) struct Link {
    pub(crate) config: CacheConfig,
    client: Option<redis::Client>,
    /// The Redis URL with its password redacted: safe to log.
    pub(crate) url: String,
    conn: RwLock<Option<Live>>,
    status: watch::Sender<ConnectionStatus>,
    wake: Notify,
    closed: AtomicBool,
    next_id: AtomicU64,
    /// Whether lookups may return values (false during a quarantine).
    serving: AtomicBool,
    pub(crate) counters: Counters,
    pub(crate) pending: Mutex<Pending>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("url", &self.url)
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link to `url`, or a disabled one for `None`. Does not connect.
    pub(crate) fn new(url: Option<&str>, config: CacheConfig) -> Result<Self, CacheError> {
        match url {
            Some(url) if config.enabled => {
                let redacted = redact_url(url);
                let client = redis::Client::open(url).map_err(|err| CacheError::InvalidUrl {
                    url: redacted.clone(),
                    reason: format!("{:?} (expected redis://[user:password@]host[:port][/db])", err.kind()),
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
        Self {
            config,
            client,
            url: redacted,
            conn: RwLock::new(None),
            status: watch::Sender::new(status),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            serving: AtomicBool::new(true),
            counters: Counters::default(),
            pending: Mutex::new(Pending::default()),
        }
    }

    /// A link that never connects: caching is off.
    pub(crate) fn disabled(config: CacheConfig) -> Self {
        Self::with_client(None, String::new(), config)
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

    /// The live connection, or [`CacheError::Unavailable`] at once when down.
    fn live(&self) -> Result<Live, CacheError> {
        if self.client.is_none() {
            return Err(CacheError::Disabled);
        }
        self.conn
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(CacheError::Unavailable)
    }

    /// Whether lookups may serve stored values now.
    pub(crate) fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// How long a manager serves no hits after reconnecting following an
    /// outage (see the module docs).
    pub(crate) fn quarantine(&self) -> Duration {
        let jitter = if self.config.jitter.is_finite() {
            self.config.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let longest_step = Duration::try_from_secs_f64(self.config.max_retry_delay.as_secs_f64() * (1.0 + jitter))
            .unwrap_or(Duration::MAX);
        self.config
            .health_check_interval
            .max(longest_step)
            .saturating_add(self.config.connect_timeout)
    }

    /// Whether a connection is live right now.
    pub(crate) fn is_connected(&self) -> bool {
        self.conn.read().unwrap_or_else(PoisonError::into_inner).is_some()
    }

    /// Runs one Redis operation on the live connection, bounded by the
    /// operation timeout. Connection failures and timeouts mark the link down.
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
    /// which it reduces by the time spent. A timeout marks the link down only
    /// when the operation had the full operation timeout.
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
                Counters::bump(&self.counters.errors);
                if is_connection_error(&err) {
                    self.mark_down(live.id, &err);
                } else {
                    debug!(error = %err, "Redis command failed");
                }
                Err(CacheError::Redis(err))
            }
            Err(_) => {
                Counters::bump(&self.counters.errors);
                if limit == full {
                    self.mark_down(live.id, &format!("no answer within {limit:?}"));
                }
                Err(CacheError::Timeout(limit))
            }
        }
    }

    /// Drops connection `id` (if it is still the live one) and wakes the supervisor.
    fn mark_down(&self, id: u64, reason: &dyn std::fmt::Display) {
        {
            let mut conn = self.conn.write().unwrap_or_else(PoisonError::into_inner);
            if conn.as_ref().is_none_or(|live| live.id != id) {
                return;
            }
            *conn = None;
        }
        self.status.send_replace(ConnectionStatus::Down);
        warn!(url = %self.url, reason = %reason, "Redis connection lost; caching paused, reconnecting in the background");
        self.wake.notify_one();
    }

    /// Records that the first connection attempt failed.
    pub(crate) fn set_down(&self) {
        self.status.send_replace(ConnectionStatus::Down);
    }

    /// Drops whatever connection is live (see [`Link::mark_down`]).
    pub(crate) fn force_down(&self, reason: &str) {
        let id = self
            .conn
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|live| live.id);
        if let Some(id) = id {
            self.mark_down(id, &reason);
        }
    }

    /// Opens a connection, replays deferred invalidations on it, and makes it
    /// the live one. After an outage, hits stay off until the supervisor ends
    /// the quarantine.
    pub(crate) async fn establish(&self, after_outage: bool) -> Result<(), CacheError> {
        let Some(client) = &self.client else {
            return Err(CacheError::Disabled);
        };
        let limit = self.config.connect_timeout;
        let settings = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(limit))
            .set_response_timeout(None);
        let attempt = async {
            let mut conn = client.get_multiplexed_async_connection_with_config(&settings).await?;
            let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await?;
            Ok::<_, RedisError>((conn, run_id(&info)))
        };
        let (conn, run_id) = tokio::time::timeout(limit, attempt)
            .await
            .map_err(|_| CacheError::Timeout(limit))??;
        self.check_restart(&conn, run_id).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if after_outage {
            self.serving.store(false, Ordering::Release);
        }
        self.publish_after_replay(Live { id, conn }).await?;
        Counters::bump(&self.counters.reconnects);
        if after_outage {
            self.status.send_replace(ConnectionStatus::Recovering);
            info!(url = %self.url, quarantine = ?self.quarantine(), "reconnected to Redis; serving cached values again after the quarantine");
        } else {
            self.status.send_replace(ConnectionStatus::Connected);
            info!(url = %self.url, "connected to Redis; caching active");
        }
        Ok(())
    }

    /// When the Redis server is not the one the data under this prefix was
    /// last used with (its `run_id` differs from the one recorded in Redis at
    /// `PREFIX meta:run_id`), it may have reloaded old values and old
    /// generations from a snapshot or an append-only file: replace every
    /// generation under the prefix before anyone reads, then record the new
    /// `run_id`. Recorded in Redis, not in memory, so a process that starts
    /// after the restart does the check too.
    async fn check_restart(&self, conn: &MultiplexedConnection, run_id: Option<String>) -> Result<(), CacheError> {
        let Some(run_id) = run_id else { return Ok(()) };
        let limit = self.config.operation_timeout;
        let marker = format!("{}meta:run_id", self.config.prefix);
        let mut c = conn.clone();
        let recorded: Option<String> = tokio::time::timeout(limit, redis::cmd("GET").arg(&marker).query_async(&mut c))
            .await
            .map_err(|_| CacheError::Timeout(limit))??;
        if recorded.as_deref() == Some(run_id.as_str()) {
            return Ok(());
        }
        let pattern = invalidate::generations_pattern(&self.config.prefix);
        let replaced = invalidate::scan(Via::Connection(conn.clone()), &self.config, &pattern, Batch::Replace).await?;
        if replaced > 0 {
            info!(url = %self.url, replaced, "Redis restarted: replaced every generation in case old values were reloaded");
        }
        tokio::time::timeout(
            limit,
            redis::cmd("SET").arg(&marker).arg(&run_id).query_async::<()>(&mut c),
        )
        .await
        .map_err(|_| CacheError::Timeout(limit))??;
        Ok(())
    }

    /// Replays deferred invalidations on `live`, then publishes it. The
    /// publication happens under the pending lock, so no invalidation can be
    /// deferred between the last replay and the moment calls see the connection.
    async fn publish_after_replay(&self, live: Live) -> Result<(), CacheError> {
        loop {
            let batch = {
                let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
                if pending.is_empty() {
                    *self.conn.write().unwrap_or_else(PoisonError::into_inner) = Some(live);
                    return Ok(());
                }
                pending.take()
            };
            let limit = self.config.operation_timeout;
            let mut conn = live.conn.clone();
            let pipe = crate::invalidate::generation_pipeline(&self.config, &batch);
            let sent = tokio::time::timeout(limit, pipe.query_async::<()>(&mut conn)).await;
            if !matches!(sent, Ok(Ok(()))) {
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .add(&self.config.prefix, batch);
                return Err(match sent {
                    Ok(Err(err)) => CacheError::Redis(err),
                    _ => CacheError::Timeout(limit),
                });
            }
            info!(
                scopes = batch.len(),
                "replayed invalidations deferred while Redis was unavailable"
            );
        }
    }

    /// Pings the live connection; returns the round-trip time.
    pub(crate) async fn ping(&self) -> Result<Duration, CacheError> {
        let start = Instant::now();
        self.call(|mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await })
            .await?;
        Ok(start.elapsed())
    }

    /// Asks the supervisor to stop.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// The `run_id` line of `INFO server`.
fn run_id(info: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
}

/// Whether an error means the connection itself is unusable.
fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_timeout() || err.is_unrecoverable_error()
}

/// Waits out the quarantine after a reconnect, then serves hits again if the
/// connection survived it.
async fn end_quarantine(link: &Link) {
    let quarantine = tokio::time::sleep(link.quarantine());
    tokio::pin!(quarantine);
    loop {
        tokio::select! {
            () = &mut quarantine => break,
            // A wake-up may be an old one: only a lost connection or a close
            // ends the quarantine early (without serving).
            () = link.wake.notified() => {
                if !link.is_connected() || link.closed.load(Ordering::Acquire) {
                    return;
                }
            }
        }
    }
    if link.is_connected() && !link.closed.load(Ordering::Acquire) {
        link.serving.store(true, Ordering::Release);
        link.status.send_replace(ConnectionStatus::Connected);
        info!(url = %link.url, "caching resumed");
    }
}

/// The reconnect-and-health-check loop. Runs until [`Link::close`].
pub(crate) async fn supervise(link: Arc<Link>) {
    let backoff = Backoff {
        base: link.config.retry_delay,
        max_delay: link.config.max_retry_delay,
        jitter: link.config.jitter,
    };
    let interval = link.config.health_check_interval;
    while !link.closed.load(Ordering::Acquire) {
        if link.is_connected() {
            tokio::select! {
                () = tokio::time::sleep(interval) => {
                    if let Err(err) = link.ping().await {
                        debug!(error = %err, "health check failed");
                    }
                }
                () = link.wake.notified() => {}
            }
            continue;
        }
        // One reconnection round.
        let attempts = link.config.max_retries.max(1);
        for attempt in 0..attempts {
            if link.closed.load(Ordering::Acquire) {
                return;
            }
            match link.establish(true).await {
                Ok(()) => {
                    end_quarantine(&link).await;
                    break;
                }
                Err(err) => {
                    debug!(url = %link.url, attempt = attempt + 1, error = %err, "Redis reconnection attempt failed");
                    if attempt + 1 < attempts {
                        tokio::time::sleep(backoff.delay(attempt, random_unit())).await;
                    }
                }
            }
        }
        if !link.is_connected() {
            if link.status() != ConnectionStatus::Down {
                link.status.send_replace(ConnectionStatus::Down);
                warn!(url = %link.url, "Redis unavailable; caching paused, retrying every {interval:?}");
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = link.wake.notified() => {}
            }
        }
    }
    debug!("cache supervisor stopped");
}
