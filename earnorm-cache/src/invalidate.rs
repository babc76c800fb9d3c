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
use crate::{CacheConfig, CacheError};

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

/// What a scan does with each batch of keys it finds.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Batch {
    /// `UNLINK` them.
    Unlink,
    /// Give each (a generation) a fresh token.
    Replace,
}

/// Where a scan sends its commands, each bounded by the operation timeout.
pub(crate) enum Via<'a> {
    /// The live connection; failures mark it down.
    Link(&'a Link),
    /// A connection not yet published (while reconnecting).
    Connection(redis::aio::MultiplexedConnection),
}

impl Via<'_> {
    async fn run<T: redis::FromRedisValue>(
        &mut self,
        config: &CacheConfig,
        pipe: redis::Pipeline,
    ) -> Result<T, CacheError> {
        match self {
            Via::Link(link) => {
                link.call(|mut conn| async move { pipe.query_async(&mut conn).await })
                    .await
            }
            Via::Connection(conn) => {
                let limit = config.operation_timeout;
                match tokio::time::timeout(limit, pipe.query_async(conn)).await {
                    Ok(result) => result.map_err(CacheError::Redis),
                    Err(_) => Err(CacheError::Timeout(limit)),
                }
            }
        }
    }
}

/// The glob matching every generation under `prefix`.
pub(crate) fn generations_pattern(prefix: &str) -> String {
    format!("{}g:*", crate::escape_glob(prefix))
}

/// `SCAN`s for `pattern` (a complete glob) in batches and applies `action`
/// to each; returns how many keys it acted on. Never `KEYS`; its cost grows
/// with the keyspace, so it serves administration and recovery only.
pub(crate) async fn scan(
    mut via: Via<'_>,
    config: &CacheConfig,
    pattern: &str,
    action: Batch,
) -> Result<u64, CacheError> {
    let (mut cursor, mut count) = (0u64, 0u64);
    loop {
        let mut pipe = redis::pipe();
        pipe.cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        let ((next, keys),): ((u64, Vec<String>),) = via.run(config, pipe).await?;
        if !keys.is_empty() {
            count += match action {
                Batch::Unlink => {
                    let mut pipe = redis::pipe();
                    pipe.cmd("UNLINK").arg(&keys);
                    let (unlinked,): (u64,) = via.run(config, pipe).await?;
                    unlinked
                }
                Batch::Replace => {
                    via.run::<()>(config, generation_pipeline(config, &keys)).await?;
                    keys.len() as u64
                }
            };
        }
        if next == 0 {
            return Ok(count);
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
