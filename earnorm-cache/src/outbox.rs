//! The outbox: invalidations that could not be sent, kept until a connection
//! can take them.
//!
//! An invalidation deletes the generation keys of the scopes a write touched
//! (one pipelined `DEL` per key, one round trip whatever the number of keys
//! in Redis). Deleting is what Redis accepts even when it is out of memory
//! under `noeviction`, and an absent generation never matches a stored value
//! or a store's expectation (see the crate docs), so a deleted generation
//! invalidates as surely as a new one.
//!
//! The rule this module alone upholds: **queued invalidations exist only
//! while no connection is published**, or, on a Redis Cluster, while the
//! masters that missed them are marked down on the published one. An
//! invalidation is queued only after checking, under the outbox lock, that
//! no connection is published, or after dropping the one that failed to
//! take it, or when only masters marked down failed to take it (nothing is
//! read from those through that connection again, see
//! `connection/cluster.rs`; the other masters took their part). A
//! connection is published only under the same lock, once the queue is
//! empty. So no call ever reads through a connection what an invalidation
//! waiting here should have deleted. While a published connection holds
//! some, the manager does not count as present for the others of its
//! prefix, which then serve no hits (`connection/presence.rs`), as when its
//! connection is down.
//!
//! The queue holds typed scopes (never strings to parse back) and is
//! bounded: past [`MAX_QUEUED`] scopes it forgets them and remembers
//! "everything" instead, replayed by deleting every generation under the
//! prefix. Coarser (the whole cache goes cold), always safe, and O(1) per
//! queued invalidation.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::connection::wire::Wire;
use tracing::info;

use crate::bounded::bounded;
use crate::keyspace::Keyspace;
use crate::scan::unlink_matching;
use crate::scope::{OwnedScope, Scope};
use crate::CacheError;

/// Most scopes remembered before the outbox falls back to invalidating
/// everything under the prefix.
pub(crate) const MAX_QUEUED: usize = 10_000;

/// Scopes replayed per pipeline.
const REPLAY_CHUNK: usize = 500;

/// What is waiting to be sent.
#[derive(Debug, Default)]
struct Queue {
    scopes: HashSet<OwnedScope>,
    /// The queue overflowed: every generation under the prefix is to go.
    everything: bool,
}

impl Queue {
    fn is_empty(&self) -> bool {
        !self.everything && self.scopes.is_empty()
    }

    fn add<'a>(&mut self, scopes: impl IntoIterator<Item = &'a Scope<'a>>) {
        if self.everything {
            return;
        }
        self.scopes.extend(scopes.into_iter().map(OwnedScope::from));
        if self.scopes.len() > MAX_QUEUED {
            self.scopes = HashSet::new();
            self.everything = true;
        }
    }
}

/// Invalidations waiting for a connection.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    queue: Mutex<Queue>,
}

/// Most keys one `DEL` of an invalidation names.
const KEYS_PER_DEL: usize = 256;

/// One pipeline deleting the generations a write to `scopes` replaces, each
/// once (scopes of one model share its query generation), a few hundred
/// keys to a `DEL`.
pub(crate) fn invalidation<'a>(namespace: &str, scopes: impl IntoIterator<Item = Scope<'a>>) -> redis::Pipeline {
    let mut keys = Vec::new();
    for scope in scopes {
        Keyspace::new(namespace).written_generations(scope, &mut keys);
    }
    let mut seen = HashSet::with_capacity(keys.len());
    keys.retain(|key| seen.insert(key.clone()));
    let mut pipe = redis::pipe();
    for chunk in keys.chunks(KEYS_PER_DEL) {
        pipe.cmd("DEL").arg(chunk).ignore();
    }
    pipe
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `scopes` if `published()` says no connection is published,
    /// checked under the outbox lock. Returns whether they were queued.
    pub(crate) fn defer_unless_published(&self, published: impl FnOnce() -> bool, scopes: &[Scope<'_>]) -> bool {
        let mut queue = self.lock();
        if published() {
            return false;
        }
        queue.add(scopes);
        true
    }

    /// Queues `scopes` that a published connection failed to take; the
    /// caller then drops that connection, unless only masters marked down
    /// missed them (see the module docs).
    pub(crate) fn defer(&self, scopes: &[Scope<'_>]) {
        self.lock().add(scopes);
    }

    /// Queues `scopes` if `still()` holds, checked under the outbox lock
    /// (under which connections are published). Returns whether they were
    /// queued.
    pub(crate) fn defer_while(&self, still: impl FnOnce() -> bool, scopes: &[Scope<'_>]) -> bool {
        let mut queue = self.lock();
        if !still() {
            return false;
        }
        queue.add(scopes);
        true
    }

    /// Whether anything is queued.
    pub(crate) fn holds_any(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Sends everything queued on `conn` (each command bounded by `limit`),
    /// then calls `publish` under the outbox lock once the queue is empty,
    /// so that nothing can be queued between the last replay and the
    /// publication. On failure, what was not sent stays queued.
    pub(crate) async fn replay_then_publish(
        &self,
        conn: &mut Wire,
        namespace: &str,
        limit: Duration,
        publish: impl FnOnce(),
    ) -> Result<(), CacheError> {
        loop {
            let batch = {
                let mut queue = self.lock();
                if queue.is_empty() {
                    publish();
                    return Ok(());
                }
                std::mem::take(&mut *queue)
            };
            let sent = if batch.everything {
                unlink_matching(conn, limit, &Keyspace::new(namespace).generations_glob())
                    .await
                    .map(|_| ())
            } else {
                // In chunks, each within the limit: a long queue on a slow
                // link must not time out as one pipeline every time.
                let scopes: Vec<Scope<'_>> = batch.scopes.iter().map(OwnedScope::as_scope).collect();
                let mut sent = Ok(());
                for chunk in scopes.chunks(REPLAY_CHUNK) {
                    let pipe = invalidation(namespace, chunk.iter().copied());
                    sent = bounded(limit, pipe.query_async::<()>(conn)).await;
                    if sent.is_err() {
                        break;
                    }
                }
                sent
            };
            if let Err(err) = sent {
                let mut queue = self.lock();
                if batch.everything {
                    queue.everything = true;
                    queue.scopes.clear();
                } else {
                    queue.add(&batch.scopes.iter().map(OwnedScope::as_scope).collect::<Vec<_>>());
                }
                return Err(err);
            }
            if batch.everything {
                info!("replayed an overflowing queue of invalidations by invalidating everything under the prefix");
            } else {
                info!(
                    scopes = batch.scopes.len(),
                    "replayed invalidations deferred while Redis was unavailable"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_overflowing_queue_becomes_everything_and_stays_bounded() {
        let mut queue = Queue::default();
        let ids: Vec<String> = (0..=MAX_QUEUED).map(|i| i.to_string()).collect();
        let scopes: Vec<Scope<'_>> = ids.iter().map(|id| Scope::Record("db:x.users", id)).collect();
        queue.add(&scopes[..MAX_QUEUED]);
        assert!(!queue.everything);
        assert_eq!(queue.scopes.len(), MAX_QUEUED);
        queue.add(&scopes[MAX_QUEUED..]);
        assert!(queue.everything && queue.scopes.is_empty());
        queue.add(&[Scope::Tag("later")]);
        assert!(
            queue.scopes.is_empty(),
            "nothing more is remembered once everything goes"
        );
    }

    #[test]
    fn names_with_colons_stay_whole() {
        let mut queue = Queue::default();
        queue.add(&[Scope::Record("rt:colon_1.items", "7")]);
        let scope = queue.scopes.iter().next().map(OwnedScope::as_scope);
        assert_eq!(scope, Some(Scope::Record("rt:colon_1.items", "7")));
    }
}
