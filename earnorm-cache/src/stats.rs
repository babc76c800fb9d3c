//! Counters of what the cache did, and the connection status.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use serde::Serialize;

/// Where the connection to Redis stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[non_exhaustive]
pub enum ConnectionStatus {
    /// No Redis configured, or caching switched off: every call computes.
    Disabled,
    /// The first connection attempt has not finished yet.
    Connecting,
    /// Connected and serving hits.
    Connected,
    /// Connected, but serving no hits: values are looked up and stored, but
    /// every call computes. Either this manager reconnected after an outage
    /// less than `max(health_check_interval, longest back-off step) +
    /// connect_timeout + operation_timeout` ago (others may still be
    /// reconnecting with invalidations to replay), or another manager
    /// sharing the prefix has missed its heartbeats and may hold
    /// invalidations it could not send; it ends when that one is back or
    /// forgotten. Or a call got no answer within `operation_timeout`, and
    /// a `PING` is telling whether Redis is only slow (back to `Connected`)
    /// or gone (`Down`).
    Recovering,
    /// Known down: calls skip the cache without waiting while it reconnects.
    Down,
}

/// A snapshot of the cache's counters, from [`CacheManager::stats`](crate::CacheManager::stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered from the cache (from Redis or from the in-process tier).
    pub hits: u64,
    /// Of `hits`, those answered from the in-process tier, with no round trip.
    pub local_hits: u64,
    /// Times the in-process tier was dropped because its invalidation
    /// channel beside Redis was lost (it serves again once subscribed anew).
    pub local_resets: u64,
    /// Lookups that found nothing current and computed the value.
    pub misses: u64,
    /// Callers that waited for another caller's computation of the same key.
    pub coalesced: u64,
    /// Values stored.
    pub sets: u64,
    /// Stores refused because a write invalidated the value's scope meanwhile.
    pub stale_sets_refused: u64,
    /// Invalidations performed (one per write, however many scopes).
    pub invalidations: u64,
    /// Invalidations that could not reach Redis and were queued for replay.
    pub invalidations_deferred: u64,
    /// Cache operations that failed (error or timeout).
    pub errors: u64,
    /// Calls that computed their value because the cache was unavailable or failed.
    pub fallbacks: u64,
    /// Stored values that did not decode and were removed.
    pub decode_errors: u64,
    /// Stores that Redis refused with an error (out of memory, no
    /// permission, a command it does not know): values it did not keep.
    pub store_errors: u64,
    /// Successful (re)connections.
    pub reconnects: u64,
    /// Misses that waited for another process computing the same key (its
    /// lease, see [`CacheConfig::lease_wait`](crate::CacheConfig::lease_wait))
    /// instead of computing at once.
    pub lease_waits: u64,
    /// Hits close to their expiry that recomputed the value ahead of it
    /// (refresh-ahead).
    pub refreshes: u64,
    /// Connection status at the time of the snapshot.
    pub status: ConnectionStatus,
}

/// The live counters: one per [`Event`] of the cached calls, and those of
/// the connection.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    events: EventCounts,
    pub(crate) invalidations: AtomicU64,
    pub(crate) invalidations_deferred: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) reconnects: AtomicU64,
}

/// One count per [`Event`].
#[derive(Debug, Default)]
struct EventCounts([AtomicU64; Event::ALL.len()]);

impl EventCounts {
    fn add(&self, event: Event) {
        self.0[event as usize].fetch_add(1, Relaxed);
    }

    fn get(&self, event: Event) -> u64 {
        self.0[event as usize].load(Relaxed)
    }
}

impl Counters {
    /// Counts an invalidation, and exports it by source.
    pub(crate) fn invalidated(&self, source: crate::InvalidationSource) {
        self.invalidations.fetch_add(1, Relaxed);
        metrics::counter!("earnorm_cache_invalidations_total", "source" => source.as_str()).increment(1);
    }

    /// Counts one, here and as the `metrics` counter `metric`.
    pub(crate) fn bump(counter: &AtomicU64, metric: &'static str) {
        counter.fetch_add(1, Relaxed);
        metrics::counter!(metric).increment(1);
    }

    pub(crate) fn snapshot(&self, status: ConnectionStatus) -> CacheStats {
        let events = &self.events;
        CacheStats {
            hits: events.get(Event::Hit),
            local_hits: events.get(Event::LocalHit),
            local_resets: 0,
            misses: events.get(Event::Miss),
            coalesced: events.get(Event::Coalesced),
            sets: events.get(Event::Set),
            stale_sets_refused: events.get(Event::StaleSetRefused),
            invalidations: self.invalidations.load(Relaxed),
            invalidations_deferred: self.invalidations_deferred.load(Relaxed),
            errors: self.errors.load(Relaxed),
            fallbacks: events.get(Event::Fallback),
            decode_errors: self.decode_errors.load(Relaxed),
            store_errors: self.store_errors.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            lease_waits: events.get(Event::LeaseWait),
            refreshes: events.get(Event::Refresh),
            status,
        }
    }
}

/// What one kind of cached value did: the counters of the values built
/// with one [`CacheManager::key`](crate::CacheManager::key)`(namespace,
/// name)`, from [`CacheManager::stats_by_name`](crate::CacheManager::stats_by_name).
///
/// For EarnORM's models, `namespace` is `DATABASE.COLLECTION` and `name` is
/// the cached method's name, `record` for the record cache, or `find`,
/// `find_one` and `count` for the query cache. Neither ever holds a key, an
/// id or an argument, so there are as many of these as places in the code
/// that cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct NamedStats {
    /// The namespace given to `key`.
    pub namespace: String,
    /// The name given to `key`.
    pub name: String,
    /// Lookups answered from the cache (including values another process
    /// stored while this one waited on its lease, and the in-process tier's).
    pub hits: u64,
    /// Of `hits`, those answered from the in-process tier.
    pub local_hits: u64,
    /// Lookups that found nothing current and computed the value.
    pub misses: u64,
    /// Callers that waited for another caller's computation in this process.
    pub coalesced: u64,
    /// Values stored.
    pub sets: u64,
    /// Stores refused because a write invalidated the value's scope meanwhile.
    pub stale_sets_refused: u64,
    /// Misses that waited for another process computing the same key (its
    /// lease), instead of computing at once.
    pub lease_waits: u64,
    /// Calls that computed because the cache was unavailable.
    pub fallbacks: u64,
    /// Hits close to their expiry that recomputed the value ahead of it.
    pub refreshes: u64,
}

/// The live counters of one name.
#[derive(Debug)]
pub(crate) struct NamedCounters {
    events: EventCounts,
    /// The namespace and name, for traces.
    pub(crate) namespace: Arc<str>,
    pub(crate) name: Arc<str>,
    /// The same counts, through the `metrics` facade: handles registered
    /// when the name is first used (so with the recorder installed then:
    /// install it before connecting).
    exported: [metrics::Counter; Event::ALL.len()],
    /// Call durations, by how the call was served (see [`Served`]).
    durations: [metrics::Histogram; Served::ALL.len()],
}

/// How a cached call was served, for its duration's label and its span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    /// From the cache (including a value another process stored while this
    /// one waited on its lease).
    Hit,
    /// Computed here, and offered to the cache.
    Miss,
    /// Another caller's computation in this process.
    Coalesced,
    /// Computed without the cache (unavailable, or not caching).
    Fallback,
    /// A hit close to its expiry that this caller refreshed.
    Refresh,
}

impl Served {
    const ALL: [Served; 5] = [
        Served::Hit,
        Served::Miss,
        Served::Coalesced,
        Served::Fallback,
        Served::Refresh,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Served::Hit => "hit",
            Served::Miss => "miss",
            Served::Coalesced => "coalesced",
            Served::Fallback => "fallback",
            Served::Refresh => "refresh",
        }
    }
}

impl NamedCounters {
    fn new(namespace: &str, name: &str, rule: &LabelRule) -> Self {
        let mut labels = rule.labels(namespace);
        labels.push(("method", name.to_owned()));
        let counter = |metric: &'static str| metrics::counter!(metric, &labels);
        let duration = |served: Served| {
            let mut labels = labels.clone();
            labels.push(("outcome", served.as_str().to_owned()));
            metrics::histogram!("earnorm_cache_call_seconds", &labels)
        };
        Self {
            events: EventCounts::default(),
            namespace: namespace.into(),
            name: name.into(),
            exported: Event::ALL.map(|event| counter(event.metric())),
            durations: Served::ALL.map(duration),
        }
    }

    /// Records how long a call took and how it was served.
    pub(crate) fn call(&self, served: Served, took: std::time::Duration) {
        self.durations[served as usize].record(took.as_secs_f64());
    }
}

/// Something a cached call did, counted globally and for its name. The
/// one list of these counts: the live counters are indexed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Hit,
    LocalHit,
    Miss,
    Coalesced,
    Set,
    StaleSetRefused,
    LeaseWait,
    Fallback,
    Refresh,
}

impl Event {
    const ALL: [Event; 9] = [
        Event::Hit,
        Event::LocalHit,
        Event::Miss,
        Event::Coalesced,
        Event::Set,
        Event::StaleSetRefused,
        Event::LeaseWait,
        Event::Fallback,
        Event::Refresh,
    ];

    /// The `metrics` counter of this event, per name.
    fn metric(self) -> &'static str {
        match self {
            Event::Hit => "earnorm_cache_hits_total",
            Event::LocalHit => "earnorm_cache_local_hits_total",
            Event::Miss => "earnorm_cache_misses_total",
            Event::Coalesced => "earnorm_cache_coalesced_total",
            Event::Set => "earnorm_cache_stores_total",
            Event::StaleSetRefused => "earnorm_cache_stores_refused_total",
            Event::LeaseWait => "earnorm_cache_lease_waits_total",
            Event::Fallback => "earnorm_cache_fallbacks_total",
            Event::Refresh => "earnorm_cache_refreshes_total",
        }
    }
}

impl Counters {
    /// Counts `event`, and for `named` too when the key has a name.
    pub(crate) fn count(&self, named: Option<&NamedCounters>, event: Event) {
        self.events.add(event);
        if let Some(named) = named {
            named.events.add(event);
            named.exported[event as usize].increment(1);
        }
    }
}

/// How a namespace becomes metric labels: namespaces that start with a
/// database's name and a dot (EarnORM's `DATABASE.COLLECTION`) are
/// labelled `model = COLLECTION`, plus `database = DATABASE` when asked;
/// others `model = NAMESPACE`.
#[derive(Debug, Default, Clone)]
pub(crate) struct LabelRule {
    databases: Vec<String>,
    database_label: bool,
}

impl LabelRule {
    fn labels(&self, namespace: &str) -> Vec<(&'static str, String)> {
        let split = self.databases.iter().find_map(|database| {
            let collection = namespace.strip_prefix(database.as_str())?.strip_prefix('.')?;
            Some((database.as_str(), collection))
        });
        match split {
            Some((database, collection)) if self.database_label => {
                vec![("model", collection.to_owned()), ("database", database.to_owned())]
            }
            Some((_, collection)) => vec![("model", collection.to_owned())],
            None => vec![("model", namespace.to_owned())],
        }
    }
}

/// The counters of every name, created on first use.
#[derive(Debug, Default)]
pub(crate) struct Names {
    map: std::sync::RwLock<std::collections::HashMap<String, std::collections::HashMap<String, Arc<NamedCounters>>>>,
    rule: std::sync::RwLock<LabelRule>,
}

impl Names {
    /// The counters of `(namespace, name)`.
    pub(crate) fn get(&self, namespace: &str, name: &str) -> Arc<NamedCounters> {
        let read = self.map.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(counters) = read.get(namespace).and_then(|names| names.get(name)) {
            return Arc::clone(counters);
        }
        drop(read);
        let mut write = self.map.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        Arc::clone(
            write
                .entry(namespace.to_owned())
                .or_default()
                .entry(name.to_owned())
                .or_insert_with(|| {
                    let rule = self.rule.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                    Arc::new(NamedCounters::new(namespace, name, &rule))
                }),
        )
    }

    /// The metric labels of `namespace` (see [`LabelRule`]).
    pub(crate) fn labels(&self, namespace: &str) -> Vec<(&'static str, String)> {
        self.rule
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .labels(namespace)
    }

    /// Labels the namespaces of `database` (`DATABASE.NAME`) by `NAME`
    /// alone, and by `database` too when `database_label` (see
    /// `CacheConfig::metrics_database_label`). Applies to names first used
    /// afterwards.
    pub(crate) fn label_database(&self, database: &str, database_label: bool) {
        let mut rule = self.rule.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !rule.databases.iter().any(|known| known == database) {
            rule.databases.push(database.to_owned());
        }
        rule.database_label = database_label;
    }

    /// A snapshot, sorted by namespace and name.
    pub(crate) fn snapshot(&self) -> Vec<NamedStats> {
        let read = self.map.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut all: Vec<NamedStats> = read
            .iter()
            .flat_map(|(namespace, names)| {
                names.iter().map(move |(name, c)| NamedStats {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    hits: c.events.get(Event::Hit),
                    local_hits: c.events.get(Event::LocalHit),
                    misses: c.events.get(Event::Miss),
                    coalesced: c.events.get(Event::Coalesced),
                    sets: c.events.get(Event::Set),
                    stale_sets_refused: c.events.get(Event::StaleSetRefused),
                    lease_waits: c.events.get(Event::LeaseWait),
                    fallbacks: c.events.get(Event::Fallback),
                    refreshes: c.events.get(Event::Refresh),
                })
            })
            .collect();
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        all
    }
}

/// Where an invalidation came from, in the exported metrics
/// (`earnorm_cache_invalidations_total{source=..}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InvalidationSource {
    /// A write through the ORM, after it committed.
    Write,
    /// The database feed (a change event, or a reset of everything).
    Feed,
    /// A call of the application ([`CacheManager::invalidate`](crate::CacheManager::invalidate), a tag).
    Manual,
}

impl InvalidationSource {
    /// The label value: `write`, `feed` or `manual`.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidationSource::Write => "write",
            InvalidationSource::Feed => "feed",
            InvalidationSource::Manual => "manual",
        }
    }
}

/// Keeps the gauge `earnorm_cache_status{prefix, status}` at 1 for the
/// current status of the manager on `prefix` and 0 for the others, until
/// the manager goes.
pub(crate) async fn export_status(mut status: tokio::sync::watch::Receiver<ConnectionStatus>, prefix: String) {
    const ALL: [(ConnectionStatus, &str); 5] = [
        (ConnectionStatus::Disabled, "disabled"),
        (ConnectionStatus::Connecting, "connecting"),
        (ConnectionStatus::Connected, "connected"),
        (ConnectionStatus::Recovering, "recovering"),
        (ConnectionStatus::Down, "down"),
    ];
    loop {
        let now = *status.borrow_and_update();
        for (each, label) in ALL {
            let value = if each == now { 1.0 } else { 0.0 };
            metrics::gauge!("earnorm_cache_status", "prefix" => prefix.clone(), "status" => label).set(value);
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn the_lists_of_events_and_of_ways_served_are_in_index_order() {
        for (i, event) in Event::ALL.into_iter().enumerate() {
            assert_eq!(event as usize, i, "{event:?}");
        }
        for (i, served) in Served::ALL.into_iter().enumerate() {
            assert_eq!(served as usize, i, "{served:?}");
        }
    }

    #[test]
    fn namespaces_of_a_database_are_labelled_by_collection() {
        let mut rule = LabelRule::default();
        assert_eq!(rule.labels("shop.users"), [("model", "shop.users".to_owned())]);
        rule.databases.push("shop".into());
        assert_eq!(rule.labels("shop.users"), [("model", "users".to_owned())]);
        assert_eq!(rule.labels("shopping.users"), [("model", "shopping.users".to_owned())]);
        rule.database_label = true;
        assert_eq!(
            rule.labels("shop.users"),
            [("model", "users".to_owned()), ("database", "shop".to_owned())]
        );
    }
}
