//! Counters of what the cache did, and the connection status.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
            status,
        }
    }
}
