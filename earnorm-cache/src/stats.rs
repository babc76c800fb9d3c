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
    /// forgotten.
    Recovering,
    /// Known down: calls skip the cache without waiting while it reconnects.
    Down,
}

/// A snapshot of the cache's counters, from [`CacheManager::stats`](crate::CacheManager::stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
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
    /// Connection status at the time of the snapshot.
    pub status: ConnectionStatus,
}

/// The live counters.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) sets: AtomicU64,
    pub(crate) stale_sets_refused: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) invalidations_deferred: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
    pub(crate) decode_errors: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) lease_waits: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self, status: ConnectionStatus) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            coalesced: self.coalesced.load(Relaxed),
            sets: self.sets.load(Relaxed),
            stale_sets_refused: self.stale_sets_refused.load(Relaxed),
            invalidations: self.invalidations.load(Relaxed),
            invalidations_deferred: self.invalidations_deferred.load(Relaxed),
            errors: self.errors.load(Relaxed),
            fallbacks: self.fallbacks.load(Relaxed),
            decode_errors: self.decode_errors.load(Relaxed),
            store_errors: self.store_errors.load(Relaxed),
            reconnects: self.reconnects.load(Relaxed),
            lease_waits: self.lease_waits.load(Relaxed),
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
    /// stored while this one waited on its lease).
    pub hits: u64,
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
}

/// The live counters of one name.
#[derive(Debug, Default)]
pub(crate) struct NamedCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    coalesced: AtomicU64,
    sets: AtomicU64,
    stale_sets_refused: AtomicU64,
    lease_waits: AtomicU64,
    fallbacks: AtomicU64,
}

/// Something a cached call did, counted globally and for its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Hit,
    Miss,
    Coalesced,
    Set,
    StaleSetRefused,
    LeaseWait,
    Fallback,
}

impl Counters {
    /// Counts `event`, and for `named` too when the key has a name.
    pub(crate) fn count(&self, named: Option<&NamedCounters>, event: Event) {
        let (global, own) = match event {
            Event::Hit => (Some(&self.hits), named.map(|n| &n.hits)),
            Event::Miss => (Some(&self.misses), named.map(|n| &n.misses)),
            Event::Coalesced => (Some(&self.coalesced), named.map(|n| &n.coalesced)),
            Event::Set => (Some(&self.sets), named.map(|n| &n.sets)),
            Event::StaleSetRefused => (Some(&self.stale_sets_refused), named.map(|n| &n.stale_sets_refused)),
            Event::LeaseWait => (Some(&self.lease_waits), named.map(|n| &n.lease_waits)),
            Event::Fallback => (Some(&self.fallbacks), named.map(|n| &n.fallbacks)),
        };
        for counter in global.into_iter().chain(own) {
            counter.fetch_add(1, Relaxed);
        }
    }
}

/// The counters of every name, created on first use.
#[derive(Debug, Default)]
pub(crate) struct Names {
    map: std::sync::RwLock<std::collections::HashMap<String, std::collections::HashMap<String, Arc<NamedCounters>>>>,
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
                .or_default(),
        )
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
                    hits: c.hits.load(Relaxed),
                    misses: c.misses.load(Relaxed),
                    coalesced: c.coalesced.load(Relaxed),
                    sets: c.sets.load(Relaxed),
                    stale_sets_refused: c.stale_sets_refused.load(Relaxed),
                    lease_waits: c.lease_waits.load(Relaxed),
                    fallbacks: c.fallbacks.load(Relaxed),
                })
            })
            .collect();
        all.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        all
    }
}
