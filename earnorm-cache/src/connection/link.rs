//! The link: the one published connection, and every call on it bounded.
//!
//! What this module alone owns: publishing and unpublishing the connection
//! (a failure seen on an old connection never drops a newer one), the bound
//! on every Redis call, and which failures mean that the connection is lost.
//!
//! * One multiplexed connection serves every call, so concurrent calls are
//!   pipelined on one socket.
//! * Every call waits on Redis at most `operation_timeout` in all. A refused
//!   or reset connection **drops** the connection: the status becomes
//!   [`ConnectionStatus::Down`], and from then on calls skip Redis at once
//!   (no waiting) and compute their values instead, until the supervisor
//!   (`supervisor.rs`) has published a new one.
//! * A call that gets no answer within the whole `operation_timeout` makes
//!   the connection **suspect**, not dead: a slow reply (a large command, a
//!   long script of another client) looks the same as a frozen server for a
//!   while. The status becomes [`ConnectionStatus::Recovering`], and lookups
//!   and stores skip Redis at once while the supervisor asks
//!   the same connection for a `PING`, giving it `connect_timeout` (what a
//!   new connection would be given). An answer clears the suspicion: the
//!   server took every command sent before it, so nothing was lost and no
//!   quarantine follows. No answer drops the connection. Invalidations are
//!   sent even on a suspect connection (they may not be skipped), and one
//!   that fails drops it at once (the outbox's rule).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::RedisResult;
use tracing::{debug, warn};

use super::failure::{is_connection_error, is_master_unreachable};
use super::{Connection, Wire};
use crate::bounded::bounded;
use crate::stats::{ConnectionStatus, Counters};
use crate::CacheError;

/// The live connection and the number that identifies it, so that a failure
/// seen on an old connection never drops a newer one.
#[derive(Clone)]
pub(crate) struct Live {
    id: u64,
    pub(crate) conn: Wire,
}

/// The published connection, if any, and the numbering of connections.
#[derive(Default)]
pub(super) struct Link {
    live: RwLock<Option<Live>>,
    /// The last number given to a connection (the first is 1).
    last_id: AtomicU64,
    /// The id of the connection suspected of being dead (0: none).
    suspect: AtomicU64,
    /// Whether a check for a cluster's master down that answers again is
    /// under way (see [`Connection::check_returns`]).
    checking_returns: std::sync::atomic::AtomicBool,
    /// Whether a master of the published cluster connection is marked
    /// down (cleared when another connection is published).
    master_down: std::sync::atomic::AtomicBool,
}

impl Link {
    /// A number for the next connection.
    pub(super) fn next_id(&self) -> u64 {
        self.last_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The suspect connection's id, if one is suspected.
    pub(super) fn suspect(&self) -> Option<u64> {
        Some(self.suspect.load(Ordering::Acquire)).filter(|&id| id != 0)
    }

    /// Suspects connection `id`, unless a connection is suspected already;
    /// says whether it did.
    fn suspect_first(&self, id: u64) -> bool {
        self.suspect
            .compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Clears the suspicion of connection `id`.
    pub(super) fn clear_suspicion(&self, id: u64) {
        let _ = self
            .suspect
            .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The id of the published connection, if any.
    pub(super) fn published_id(&self) -> Option<u64> {
        self.live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|live| live.id)
    }
}

impl Connection {
    /// Whether a connection is published right now.
    pub(crate) fn is_connected(&self) -> bool {
        self.link.published_id().is_some()
    }

    /// The published connection, or [`CacheError::Unavailable`] at once.
    fn live(&self) -> Result<Live, CacheError> {
        if self.client.is_none() {
            return Err(CacheError::Disabled);
        }
        self.link
            .live
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(CacheError::Unavailable)
    }

    /// Publishes `conn` as connection `id`; nothing decided about serving
    /// for an earlier connection carries over. Called under the outbox's
    /// lock, once its queue is empty (see `outbox.rs`).
    pub(super) fn publish(&self, id: u64, conn: Wire) {
        let mut live = self.link.live.write().unwrap_or_else(PoisonError::into_inner);
        self.stop_serving();
        // A suspicion of an earlier connection does not carry over either.
        self.link.suspect.store(0, Ordering::Release);
        self.link.master_down.store(false, Ordering::Release);
        *live = Some(Live { id, conn });
    }

    /// Whether a master of the published cluster connection is marked
    /// down: reads that would skip the generations (the in-process tier's
    /// known tokens) must then read them, so that a read touching that
    /// master fails instead (see `cluster.rs`).
    pub(crate) fn has_master_down(&self) -> bool {
        self.link.master_down.load(Ordering::Acquire)
    }

    /// Runs `decide` while connection `id` stays published (under the lock
    /// that unpublishes it), or returns `None` when it no longer is.
    pub(super) fn while_published<T>(&self, id: u64, decide: impl FnOnce() -> T) -> Option<T> {
        let live = self.link.live.read().unwrap_or_else(PoisonError::into_inner);
        (live.as_ref().map(|live| live.id) == Some(id)).then(decide)
    }

    /// Runs one Redis operation on the published connection, bounded by the
    /// operation timeout.
    pub(crate) async fn call<T, F, Fut>(&self, op: F) -> Result<T, CacheError>
    where
        F: FnOnce(Wire) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut budget = self.config.operation_timeout;
        self.call_within(&mut budget, op).await
    }

    /// Like [`call`](Self::call), but bounded by what is left of `budget`
    /// (one call's allowance for waiting on Redis across several operations),
    /// which it reduces by the time spent. Failures are handled as
    /// [`failed`](Self::failed) says.
    /// While the connection is suspect, returns [`CacheError::Unavailable`]
    /// at once.
    pub(crate) async fn call_within<T, F, Fut>(&self, budget: &mut Duration, op: F) -> Result<T, CacheError>
    where
        F: FnOnce(Wire) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let live = self.live()?;
        if self.link.suspect() == Some(live.id) {
            return Err(CacheError::Unavailable);
        }
        self.run(live, budget, op).await
    }

    /// Sends an operation that may not be skipped (an invalidation), even
    /// on a suspect connection, bounded by the operation timeout.
    pub(crate) async fn send<T, F, Fut>(&self, op: F) -> Result<T, CacheError>
    where
        F: FnOnce(Wire) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let mut budget = self.config.operation_timeout;
        self.run(self.live()?, &mut budget, op).await
    }

    async fn run<T, F, Fut>(&self, live: Live, budget: &mut Duration, op: F) -> Result<T, CacheError>
    where
        F: FnOnce(Wire) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        if budget.is_zero() {
            return Err(CacheError::Timeout(self.config.operation_timeout));
        }
        let limit = (*budget).min(self.config.operation_timeout);
        let start = Instant::now();
        let outcome = bounded(limit, op(live.conn)).await;
        *budget = budget.saturating_sub(start.elapsed());
        outcome
            .map_err(|err| match err {
                // A master of a cluster marked down: this call skips Redis,
                // the connection stays (see `cluster.rs`).
                CacheError::Redis(err) if is_master_unreachable(&err) => {
                    self.link.master_down.store(true, Ordering::Release);
                    CacheError::Unavailable
                }
                err => err,
            })
            .inspect_err(|err| self.failed(live.id, err))
    }

    /// The published connection, for operations that run several commands
    /// (pattern deletion); failures there are passed to [`Self::failed`].
    pub(crate) fn published(&self) -> Result<(u64, Wire), CacheError> {
        self.live().map(|live| (live.id, live.conn))
    }

    /// Counts a failed call on connection `id`. A refused or reset
    /// connection drops it; no answer within the whole operation timeout
    /// makes it suspect (a call left with less of its budget proves nothing
    /// about the server).
    pub(crate) fn failed(&self, id: u64, err: &CacheError) {
        Counters::bump(&self.counters.errors, "earnorm_cache_errors_total");
        match err {
            CacheError::Redis(e) if is_connection_error(e) => self.drop_connection(id, e),
            CacheError::Redis(e) => debug!(error = %e, "Redis command failed"),
            CacheError::Timeout(limit)
                if *limit >= self.config.operation_timeout
                    && self.while_published(id, || self.link.suspect_first(id)) == Some(true) =>
            {
                debug!(url = %self.url, "no answer within {limit:?}: checking whether Redis is slow or gone");
                // Connected, but serving nothing until the check is over.
                self.status.send_if_modified(|status| {
                    let serving = *status == ConnectionStatus::Connected;
                    if serving {
                        *status = ConnectionStatus::Recovering;
                    }
                    serving
                });
                self.wake.notify_one();
            }
            _ => {}
        }
    }

    /// Settles the suspicion of connection `id` (see the module docs): a
    /// `PING` on it answered within `connect_timeout` (an error reply is an
    /// answer too) clears it; anything else drops the connection. On a
    /// cluster every master is asked, as any one of them may be the one
    /// that hangs: those that do not answer are marked down, and the
    /// connection is dropped only when none answers. Run by the supervisor.
    pub(super) async fn check_suspect(&self, id: u64) {
        let limit = self.config.connect_timeout;
        if let Some(live) = self.live().ok().filter(|live| live.id == id) {
            let pinged = live.conn.ping_masters(limit).await;
            if live.conn.has_master_down() {
                self.link.master_down.store(true, Ordering::Release);
            }
            match pinged {
                Ok(()) => debug!(url = %self.url, "Redis answered: it was slow, not gone"),
                Err(err) if !is_connection_error(&err) => {
                    debug!(url = %self.url, error = %err, "Redis answered with an error: it was slow, not gone");
                }
                Err(err) => self.drop_connection(id, &format!("no answer within the operation timeout, then {err}")),
            }
        }
        self.link.clear_suspicion(id);
    }

    /// On a cluster, drops the published connection when a master marked
    /// down answers again, so that the next one is checked as after any
    /// outage before that master's slots are served (see `cluster.rs`).
    /// Started by the supervisor after each heartbeat, in a task of its
    /// own (one at a time): a frozen master may keep the check waiting for
    /// `connect_timeout`, which must not delay the heartbeats.
    pub(super) fn check_returns(self: &std::sync::Arc<Self>) {
        if self.link.checking_returns.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = std::sync::Arc::clone(self);
        tokio::spawn(async move {
            if let Ok(live) = this.live() {
                if let Some(address) = live.conn.returned_master(this.config.connect_timeout).await {
                    this.drop_connection(live.id, &format!("the cluster's master {address} answers again"));
                }
            }
            this.link.checking_returns.store(false, Ordering::Release);
        });
    }

    /// Unpublishes connection `id` (if it is still the published one), stops
    /// serving, and wakes the supervisor to reconnect.
    pub(super) fn drop_connection(&self, id: u64, reason: &dyn std::fmt::Display) {
        {
            let mut live = self.link.live.write().unwrap_or_else(PoisonError::into_inner);
            if live.as_ref().is_none_or(|live| live.id != id) {
                return;
            }
            *live = None;
            self.stop_serving();
        }
        self.status.send_replace(ConnectionStatus::Down);
        warn!(url = %self.url, reason = %reason, "Redis connection lost; caching paused, reconnecting in the background");
        self.wake.notify_one();
    }

    /// Unpublishes whatever connection is published.
    pub(super) fn drop_published(&self, reason: &str) {
        if let Some(id) = self.link.published_id() {
            self.drop_connection(id, &reason);
        }
    }

    /// Pings the published connection; returns the round-trip time.
    pub(crate) async fn ping(&self) -> Result<Duration, CacheError> {
        let start = Instant::now();
        self.call(|mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await })
            .await?;
        Ok(start.elapsed())
    }
}
