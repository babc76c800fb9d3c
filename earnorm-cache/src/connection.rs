//! The connection to Redis: what happens when Redis dies, freezes or returns.
//!
//! What this module alone owns: the state a manager's handles share with
//! its supervisor, and sending an invalidation (or queueing it in the
//! outbox when no connection can take it). The rest has rooms of its own:
//!
//! * `link.rs`: the one published connection, and every call on it bounded
//!   by `operation_timeout`; a refused or reset connection drops it (calls
//!   then skip Redis at once until a new one is published), a timeout makes
//!   it suspect until a `PING` on it says whether Redis is slow or gone.
//! * `supervisor.rs`: the one task that reconnects (back-off, health checks,
//!   for ever), replays the outbox and checks a server before its connection
//!   is published.
//! * `presence.rs`: heartbeats among the managers of a prefix, the
//!   quarantine after an outage, and whether hits are served.
//! * `failure.rs`: which failures lose the connection, and which only a
//!   master of a cluster.
//! * `tracking.rs`: the in-process tier's invalidation channel beside
//!   Redis, and the rule that the tier serves nothing through a gap in it.
//! * `crate::outbox`: invalidations that could not be sent, and the rule
//!   that none waits while a connection is published.

mod address;
#[cfg(feature = "cluster")]
mod cluster;
mod endpoint;
mod failure;
mod link;
mod presence;
#[cfg(feature = "cluster")]
mod slots;
mod supervisor;
mod tracking;
pub(crate) mod wire;

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::{watch, Notify};
use tracing::warn;

use crate::keyspace::Keyspace;
use crate::outbox::{invalidation, Outbox};
use crate::redact::redact_url;
use crate::scope::Scope;
use crate::stats::{ConnectionStatus, Counters};
use crate::{CacheConfig, CacheError};
use link::Link;
use presence::Presence;

use endpoint::Endpoint;
pub(crate) use supervisor::supervise;
pub(crate) use tracking::track;
use wire::Wire;

/// Connection state shared by every handle and the supervisor.
pub(crate) struct Connection {
    pub(crate) config: CacheConfig,
    /// The prefix as used in keys (ending in `:`).
    pub(crate) namespace: String,
    client: Option<Endpoint>,
    /// The Redis URL with its password redacted: safe to log.
    pub(crate) url: String,
    link: Link,
    status: watch::Sender<ConnectionStatus>,
    /// Wakes the supervisor (a connection lost, a feed to follow, closing).
    wake: Notify,
    closed: AtomicBool,
    presence: Presence,
    /// Whether the checks at connect found that values can be stored.
    can_store: AtomicBool,
    /// Whether a refused store was already reported for this connection.
    store_error_reported: AtomicBool,
    pub(crate) counters: Counters,
    outbox: Outbox,
    /// The `run_id`s the published connection was checked with (see
    /// `supervisor.rs`).
    run_ids: std::sync::Mutex<Option<String>>,
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
                let client = Endpoint::open(url, &config).map_err(|source| CacheError::InvalidUrl {
                    url: redacted.clone(),
                    source,
                })?;
                if client.is_cluster() && config.prefix.contains(['{', '}']) {
                    // A hash tag in the prefix would put every key on one
                    // slot, or the heartbeat's keys on different ones.
                    return Err(CacheError::InvalidConfig {
                        field: "prefix",
                        reason: "on a Redis Cluster the prefix may not contain `{` or `}`".into(),
                    });
                }
                Ok(Self::with_client(Some(client), redacted, config))
            }
            _ => Ok(Self::disabled(config)),
        }
    }

    fn with_client(client: Option<Endpoint>, redacted: String, config: CacheConfig) -> Self {
        let status = if client.is_some() {
            ConnectionStatus::Connecting
        } else {
            ConnectionStatus::Disabled
        };
        Self {
            presence: Presence::new(&config),
            namespace: config.namespace(),
            config,
            client,
            url: redacted,
            link: Link::default(),
            status: watch::Sender::new(status),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            can_store: AtomicBool::new(true),
            store_error_reported: AtomicBool::new(false),
            counters: Counters::default(),
            outbox: Outbox::default(),
            run_ids: std::sync::Mutex::new(None),
        }
    }

    /// A connection that never connects: caching is off.
    pub(crate) fn disabled(config: CacheConfig) -> Self {
        Self::with_client(None, String::new(), config)
    }

    /// The names of the keys under this manager's prefix.
    pub(crate) fn keys(&self) -> Keyspace<'_> {
        Keyspace::new(&self.namespace).clustered(self.is_cluster())
    }

    /// Whether Redis is a cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.client.as_ref().is_some_and(Endpoint::is_cluster)
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

    /// The addresses of a cluster's masters, sorted, as the published
    /// connection sees them (`None`: not connected, or not a cluster).
    pub(crate) async fn masters(&self) -> Option<Vec<String>> {
        let (_, wire) = self.published().ok()?;
        if !wire.is_cluster() {
            return None;
        }
        let masters = crate::bounded::bounded(self.config.operation_timeout, wire.masters())
            .await
            .ok()?;
        Some(masters.into_iter().map(|(address, _)| address).collect())
    }

    /// Whether the checks at connect found that this Redis takes stores.
    pub(crate) fn can_store(&self) -> bool {
        self.can_store.load(Ordering::Acquire)
    }

    /// Invalidates `scopes` (deletes their generations), or queues them in
    /// the outbox when no connection can take them. Never fails.
    pub(crate) async fn invalidate(&self, scopes: &[Scope<'_>], source: crate::InvalidationSource) {
        self.counters.invalidated(source);
        if !self.is_enabled() || scopes.is_empty() {
            return;
        }
        if self.outbox.defer_unless_published(|| self.is_connected(), scopes) {
            self.count_deferred();
            return;
        }
        let pipe = invalidation(&self.namespace, scopes.iter().copied());
        let sent_on = self.link.published_id();
        let master_down = AtomicBool::new(false);
        let master_down_seen = &master_down;
        let sent = self
            .send(|mut conn| async move {
                let sent = pipe.query_async::<()>(&mut conn).await;
                if sent.as_ref().is_err_and(failure::is_master_unreachable) {
                    master_down_seen.store(true, Ordering::Relaxed);
                }
                sent
            })
            .await;
        if sent.is_err() {
            self.count_deferred();
            // Only masters marked down missed it (their slots are read by
            // nobody here until the connection is replaced); the other
            // masters took it. Held for them, under the outbox lock, only
            // while the connection it was sent on is still the published
            // one: a connection published since was checked without it.
            // This manager then stops counting as present, so that the
            // others serve no hits meanwhile (see `presence.rs`).
            let held = master_down.load(Ordering::Relaxed)
                && sent_on.is_some()
                && self.outbox.defer_while(|| self.link.published_id() == sent_on, scopes);
            if held {
                tracing::debug!("an invalidation waits for a master down; the other masters took it");
            } else {
                // Queued, and the connection dropped, so that the rule of
                // the outbox holds: the replay happens before any further
                // read.
                self.outbox.defer(scopes);
                self.drop_published("an invalidation could not be sent");
            }
        }
    }

    /// Whether invalidations wait in the outbox while a connection is
    /// published (for masters of a cluster marked down).
    pub(crate) fn holds_invalidations(&self) -> bool {
        self.outbox.holds_any()
    }

    fn count_deferred(&self) {
        Counters::bump(
            &self.counters.invalidations_deferred,
            "earnorm_cache_invalidations_deferred_total",
        );
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
