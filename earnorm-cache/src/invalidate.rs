//! Invalidation: replacing generations, deferring what Redis could not take,
//! and pattern deletion.
//!
//! A write invalidates by giving each scope it touched a fresh random
//! generation token: one pipelined `SET` per scope, one round trip, whatever
//! the number of keys in Redis. Values stored under the old token are never
//! served again (their envelope no longer matches) and expire by their TTL.
//!
//! When Redis cannot be reached, the generation keys are queued in memory and
//! replayed before the next connection is used (see [`crate::health`]). If the
//! queue overflows, record generations are folded into their models' (a bulk
//! invalidation of each model concerned): coarser, always safe, and bounded by
//! the number of models and tags.

use std::collections::HashSet;
use std::time::Duration;

use crate::health::Link;
use crate::stats::Counters;
use crate::token::new_token;
use crate::CacheConfig;

/// Most generation keys remembered while Redis is unavailable before record
/// generations are folded into their models'.
const MAX_PENDING: usize = 10_000;

/// Generation keys whose replacement could not be sent yet.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    keys: HashSet<String>,
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub(crate) fn take(&mut self) -> Vec<String> {
        self.keys.drain().collect()
    }

    /// Queues generation keys (all under `prefix`).
    pub(crate) fn add(&mut self, prefix: &str, keys: impl IntoIterator<Item = String>) {
        self.keys.extend(keys);
        if self.keys.len() > MAX_PENDING {
            self.fold_records(prefix);
        }
    }

    /// Replaces every record generation `P g:r:MODEL:ID` by its model's bulk
    /// and query generations, which cover it.
    fn fold_records(&mut self, prefix: &str) {
        let mut folded = HashSet::new();
        for key in self.keys.drain() {
            let record_model = key
                .strip_prefix(prefix)
                .and_then(|k| k.strip_prefix("g:r:"))
                .and_then(|k| k.split(':').next());
            match record_model {
                Some(model) => {
                    folded.insert(format!("{prefix}g:m:{model}"));
                    folded.insert(format!("{prefix}g:q:{model}"));
                }
                None => {
                    folded.insert(key);
                }
            }
        }
        self.keys = folded;
    }
}

/// How long a generation token lives once written by an invalidation. Values
/// stored later extend it to outlive them (see the store script).
pub(crate) fn generation_ttl(config: &CacheConfig) -> Duration {
    config
        .ttl
        .max(Duration::from_secs(60))
        .saturating_add(Duration::from_secs(60))
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

/// One pipeline that gives every key in `keys` a fresh token.
pub(crate) fn generation_pipeline(config: &CacheConfig, keys: &[String]) -> redis::Pipeline {
    let ttl_ms = expiry_ms(generation_ttl(config));
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("SET").arg(key).arg(new_token()).arg("PX").arg(ttl_ms).ignore();
    }
    pipe
}

/// Gives every generation under the prefix a fresh token, finding them with
/// `SCAN` (each command bounded by the operation timeout). Used when Redis
/// may have reloaded old data; its cost grows with the keyspace.
pub(crate) async fn replace_all_generations(
    mut conn: redis::aio::MultiplexedConnection,
    config: &CacheConfig,
) -> Result<u64, crate::CacheError> {
    let pattern = format!("{}g:*", crate::escape_glob(&config.prefix));
    let limit = config.operation_timeout;
    fn bounded<T>(
        result: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
        limit: Duration,
    ) -> Result<T, crate::CacheError> {
        match result {
            Ok(inner) => inner.map_err(crate::CacheError::Redis),
            Err(_) => Err(crate::CacheError::Timeout(limit)),
        }
    }
    let (mut cursor, mut replaced) = (0u64, 0u64);
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000);
        let (next, keys): (u64, Vec<String>) =
            bounded(tokio::time::timeout(limit, scan.query_async(&mut conn)).await, limit)?;
        if !keys.is_empty() {
            let pipe = generation_pipeline(config, &keys);
            bounded(
                tokio::time::timeout(limit, pipe.query_async::<()>(&mut conn)).await,
                limit,
            )?;
            replaced += keys.len() as u64;
        }
        if next == 0 {
            return Ok(replaced);
        }
        cursor = next;
    }
}

impl Link {
    /// Replaces the generations `keys`, or defers them when Redis is away.
    /// Never fails: an invalidation that cannot be sent is replayed later.
    pub(crate) async fn replace_generations(&self, keys: Vec<String>) {
        Counters::bump(&self.counters.invalidations);
        if !self.is_enabled() || keys.is_empty() {
            return;
        }
        {
            // Checked under the pending lock: a connection published after
            // this check finds our keys in the queue (see `publish_after_replay`).
            let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !self.is_connected() {
                pending.add(&self.config.prefix, keys);
                Counters::bump(&self.counters.invalidations_deferred);
                return;
            }
        }
        let pipe = generation_pipeline(&self.config, &keys);
        let sent = self
            .call(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await;
        if sent.is_err() {
            // Keep the invariant "queued invalidations exist only while the
            // link is down": queue them and drop whatever connection is live,
            // so that the supervisor replays them before caching resumes.
            let mut pending = self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            pending.add(&self.config.prefix, keys);
            Counters::bump(&self.counters.invalidations_deferred);
            self.force_down("an invalidation could not be sent");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Pending;

    #[test]
    fn an_overflowing_queue_folds_records_into_their_models() {
        let mut pending = Pending::default();
        pending.add("p:", (0..=super::MAX_PENDING).map(|i| format!("p:g:r:users:{i}")));
        pending.add("p:", ["p:g:t:reports".to_owned()]);
        let mut keys = pending.take();
        keys.sort();
        assert_eq!(keys, ["p:g:m:users", "p:g:q:users", "p:g:t:reports"]);
    }
}
