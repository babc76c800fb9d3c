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
//! queue overflows, the whole prefix's epoch is replaced instead: everything
//! this manager cached becomes a miss, which is always safe.

use std::collections::HashSet;
use std::time::Duration;

use crate::health::Link;
use crate::key::epoch_key;
use crate::stats::Counters;
use crate::token::new_token;
use crate::CacheConfig;

/// Most generation keys remembered while Redis is unavailable before falling
/// back to replacing the epoch.
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

    /// Puts back keys whose replay failed.
    pub(crate) fn restore(&mut self, keys: Vec<String>) {
        self.add(keys);
    }

    fn add(&mut self, keys: impl IntoIterator<Item = String>) {
        self.keys.extend(keys);
        if self.keys.len() > MAX_PENDING {
            // Too many to remember: replacing the epoch covers them all.
            self.keys.clear();
            self.keys.insert(String::new());
        }
    }
}

/// How long a generation token lives once written by an invalidation. Values
/// stored later extend it to outlive them (see the store script).
pub(crate) fn generation_ttl(config: &CacheConfig) -> Duration {
    config.ttl.max(Duration::from_secs(60)) + Duration::from_secs(60)
}

/// One pipeline that gives every key in `keys` a fresh token. The empty key
/// stands for the epoch.
pub(crate) fn generation_pipeline(config: &CacheConfig, keys: &[String]) -> redis::Pipeline {
    let ttl_ms = u64::try_from(generation_ttl(config).as_millis()).unwrap_or(u64::MAX);
    let mut pipe = redis::pipe();
    for key in keys {
        let key = if key.is_empty() {
            epoch_key(&config.prefix)
        } else {
            key.clone()
        };
        pipe.cmd("SET").arg(key).arg(new_token()).arg("PX").arg(ttl_ms).ignore();
    }
    pipe
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
                pending.add(keys);
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
            pending.add(keys);
            Counters::bump(&self.counters.invalidations_deferred);
            self.force_down("an invalidation could not be sent");
        }
    }
}
