//! Invalidation: every way a write (or an administrator) tells the cache
//! that values are stale. What this module alone owns: the entry points
//! (by scope, everything, by pattern), and forgetting the computations in
//! flight when a write lands, so that a caller arriving after the write
//! never joins a computation that began before it (`forget_flights`, the
//! one place that does). How an invalidation reaches Redis, or waits for it,
//! is the connection's and the outbox's (`connection.rs`, `outbox.rs`).

use tracing::debug;

use crate::scan::unlink_matching;
use crate::scope::Scope;
use crate::{CacheError, CacheManager, InvalidationSource};

impl CacheManager {
    /// Invalidates everything cached under `scopes` (see [`Scope`] for what
    /// each one covers), in one round trip, without scanning. Call it after
    /// the write that made those values stale has committed.
    ///
    /// Never fails: when Redis is unavailable the invalidation is queued and
    /// replayed before caching resumes. Counted as a
    /// [`Manual`](InvalidationSource::Manual) invalidation.
    pub async fn invalidate(&self, scopes: &[Scope<'_>]) {
        self.invalidate_from(scopes, InvalidationSource::Manual).await;
    }

    /// [`invalidate`](Self::invalidate), counted (in the exported metrics)
    /// as coming from `source`.
    pub async fn invalidate_from(&self, scopes: &[Scope<'_>], source: InvalidationSource) {
        // In process before and after Redis: a call that noted the tier's
        // counters between the first bump and the generations' deletion
        // could still read the old value from Redis and keep it; the second
        // bump (made even if this call is cancelled) drops it before the
        // writer goes on.
        self.invalidate_in_process(scopes);
        let _after = OnDrop(|| self.invalidate_in_process(scopes));
        self.forget_flights();
        debug!(scopes = scopes.len(), source = source.as_str(), "invalidating");
        self.connection().invalidate(scopes, source).await;
    }

    /// Invalidates everything this manager has cached: deletes every
    /// generation under its prefix (found with `SCAN`, in batches). Unlike
    /// [`invalidate`](Self::invalidate), its cost grows with the keyspace:
    /// it is for administration, not for ordinary writes. Returns the number
    /// of generations deleted. Drops every value of the in-process tier too
    /// (without Redis, that is all it does, and it returns 0).
    ///
    /// Correct against computations in flight: a computation only starts under
    /// generations that exist, so every one of them is found and deleted.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails part-way.
    pub async fn invalidate_all(&self) -> Result<u64, CacheError> {
        self.invalidate_all_from(InvalidationSource::Manual).await
    }

    /// [`invalidate_all`](Self::invalidate_all), counted as coming from `source`.
    ///
    /// # Errors
    /// As [`invalidate_all`](Self::invalidate_all).
    pub async fn invalidate_all_from(&self, source: InvalidationSource) -> Result<u64, CacheError> {
        // Before and after Redis, as in `invalidate_from`.
        self.clear_in_process();
        let _after = OnDrop(|| self.clear_in_process());
        self.forget_flights();
        self.connection().counters.invalidated(source);
        if !self.connection().is_enabled() && self.inner.local.is_some() {
            // The embedded mode: there is nothing in Redis to delete.
            return Ok(0);
        }
        self.unlink_matching(&self.connection().keys().generations_glob()).await
    }

    /// Unlinks every key matching `pattern` on the published connection.
    async fn unlink_matching(&self, pattern: &str) -> Result<u64, CacheError> {
        let conn = self.connection();
        let (id, mut live) = conn.published()?;
        unlink_matching(&mut live, conn.config.operation_timeout, pattern)
            .await
            .inspect_err(|err| conn.failed(id, err))
    }

    /// Deletes every key under this manager's prefix that matches `pattern`
    /// (a Redis glob, relative to the prefix), with `SCAN` and `UNLINK` in
    /// batches; never `KEYS`. Escape user data placed in the pattern with
    /// [`escape_glob`](crate::escape_glob). Returns the number of keys deleted.
    ///
    /// Its cost grows with the size of the keyspace: use [`invalidate`](Self::invalidate)
    /// for ordinary writes.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails part-way (keys deleted
    /// before the failure stay deleted).
    pub async fn delete_pattern(&self, pattern: &str) -> Result<u64, CacheError> {
        // Which kept values a pattern matches is not known in process:
        // all go, before and after Redis (as in `invalidate_from`).
        self.clear_in_process();
        let _after = OnDrop(|| self.clear_in_process());
        let full = self.connection().keys().glob(pattern);
        let deleted = self.unlink_matching(&full).await?;
        debug!(pattern = %full, deleted, "pattern deletion");
        Ok(deleted)
    }

    /// Drops from the in-process tier every value that depends on a
    /// generation a write to `scopes` replaces, before the write's caller
    /// goes on: this process never reads what it just made stale.
    fn invalidate_in_process(&self, scopes: &[Scope<'_>]) {
        let Some(local) = &self.inner.local else {
            return;
        };
        let keys = self.connection().keys();
        let mut names = Vec::with_capacity(2 * scopes.len());
        for scope in scopes {
            keys.written_generations(*scope, &mut names);
        }
        let prefix = self.connection().namespace.len();
        local.invalidate(
            names
                .iter()
                .map(|name| name.as_bytes().get(prefix..).unwrap_or(name.as_bytes())),
        );
    }

    /// Drops every value of the in-process tier.
    pub(crate) fn clear_in_process(&self) {
        if let Some(local) = &self.inner.local {
            local.clear();
        }
    }

    /// Forgets the computations in flight: callers arriving after a write
    /// must not join a computation that began before it.
    pub(crate) fn forget_flights(&self) {
        self.inner.flights.clear();
    }
}

/// Runs its closure when dropped: at the end of the scope, or when the
/// future holding it is cancelled.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}
