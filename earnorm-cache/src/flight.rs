//! Single-flight: one computation per key inside a process.
//!
//! The first caller to miss on a key becomes its leader and computes; callers
//! arriving meanwhile wait for the leader's outcome instead of computing too.
//!
//! A follower must never receive a value older than a write acknowledged
//! before the follower began, even a write made by another process. So it
//! takes the leader's value only when
//! * the value was `Stored` by the compare-and-set, which
//!   proves no invalidation happened between the start of the computation and
//!   the store, and the follower began before the store was sent (a write
//!   acknowledged before the follower began was invalidated before the store,
//!   so the store would have failed); or
//! * the value was merely `Computed` (the cache was
//!   unavailable), and the leader started after the follower began.
//!
//! Otherwise the follower looks up again and joins the next flight, which
//! starts after it. A result that is not cached at all (an `Err`, a `None`)
//! is `Uncacheable`: followers then compute their
//! own at once rather than queue behind one another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::sync::watch;

/// What a leader hands to its followers.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// A payload stored under unchanged generations by a store sent at the
    /// given instant: current for followers that began before it.
    Stored(Arc<[u8]>, Instant),
    /// A payload computed without the cache's check: current only for
    /// followers that began before the leader.
    Computed(Arc<[u8]>),
    /// No shareable value: look up again (and perhaps lead).
    Retry,
    /// The leader's result is not cached: compute without waiting again.
    Uncacheable,
}

/// What a follower does after waiting.
#[derive(Debug)]
pub(crate) enum Next {
    /// Use this payload.
    Use(Arc<[u8]>),
    /// Look up again.
    Retry,
    /// Compute directly.
    Compute,
}

/// One flight: its outcome channel and when its leader started.
#[derive(Debug)]
pub(crate) struct Slot {
    tx: watch::Sender<Option<Outcome>>,
    started: Instant,
}

/// The flights in progress, by key.
#[derive(Debug, Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, Arc<Slot>>>,
}

/// A caller's part in a flight.
#[derive(Debug)]
pub(crate) enum Role<'a> {
    /// Compute, then [`Leader::complete`].
    Leader(Leader<'a>),
    /// Wait with [`Follower::wait`].
    Follower(Follower),
}

/// A caller waiting for a leader.
#[derive(Debug)]
pub(crate) struct Follower {
    rx: watch::Receiver<Option<Outcome>>,
    leader_started: Instant,
}

impl Follower {
    /// Waits for the leader; says whether this caller, which began at
    /// `began`, may use its payload.
    pub(crate) async fn wait(mut self, began: Instant) -> Next {
        let outcome = match self.rx.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().unwrap_or(Outcome::Retry),
            Err(_) => Outcome::Retry,
        };
        match outcome {
            Outcome::Stored(payload, sent) if began < sent => Next::Use(payload),
            Outcome::Computed(payload) if self.leader_started >= began => Next::Use(payload),
            Outcome::Uncacheable => Next::Compute,
            Outcome::Stored(..) | Outcome::Computed(_) | Outcome::Retry => Next::Retry,
        }
    }
}

impl Flights {
    /// Joins the flight for `key`, leading it when there is none.
    pub(crate) fn join(&self, key: &str) -> Role<'_> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.get(key) {
            return Role::Follower(Follower {
                rx: slot.tx.subscribe(),
                leader_started: slot.started,
            });
        }
        let slot = Arc::new(Slot {
            tx: watch::Sender::new(None),
            started: Instant::now(),
        });
        map.insert(key.to_owned(), Arc::clone(&slot));
        Role::Leader(Leader {
            flights: self,
            key: key.to_owned(),
            slot,
            done: false,
        })
    }

    /// Forgets every flight in progress: callers arriving from now on start
    /// new ones. Called on every local invalidation.
    pub(crate) fn clear(&self) {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Number of flights in progress.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// The leader's side of a flight. Dropping it without completing (the
/// leader's future was cancelled, or it panicked) tells followers to retry.
#[derive(Debug)]
pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    slot: Arc<Slot>,
    done: bool,
}

impl Leader<'_> {
    /// Hands the outcome to every follower and ends the flight.
    pub(crate) fn complete(mut self, outcome: Outcome) {
        self.finish(outcome);
    }

    fn finish(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        {
            let mut map = self.flights.map.lock().unwrap_or_else(PoisonError::into_inner);
            // Remove only our own entry: a newer flight may have replaced it
            // after a `clear`.
            if map.get(&self.key).is_some_and(|slot| Arc::ptr_eq(slot, &self.slot)) {
                map.remove(&self.key);
            }
        }
        self.slot.tx.send_replace(Some(outcome));
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.finish(Outcome::Retry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> Arc<[u8]> {
        Arc::from(&b"v"[..])
    }

    fn lead(flights: &Flights) -> Leader<'_> {
        match flights.join("k") {
            Role::Leader(leader) => leader,
            Role::Follower(_) => panic!("expected to lead"),
        }
    }

    fn follow(flights: &Flights) -> Follower {
        match flights.join("k") {
            Role::Follower(follower) => follower,
            Role::Leader(_) => panic!("expected to follow"),
        }
    }

    #[tokio::test]
    async fn a_stored_value_serves_followers_that_began_before_the_store() {
        let flights = Flights::default();
        let leader = lead(&flights);
        let began = Instant::now();
        let (early, late) = (follow(&flights), follow(&flights));
        let sent = Instant::now();
        let after_store = Instant::now();
        leader.complete(Outcome::Stored(payload(), sent));
        assert!(matches!(early.wait(began).await, Next::Use(v) if &*v == b"v"));
        assert!(
            matches!(late.wait(after_store).await, Next::Retry),
            "began after the store was sent"
        );
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn an_unchecked_value_only_serves_followers_that_began_before_the_leader() {
        let flights = Flights::default();
        let early = Instant::now();
        let leader = lead(&flights);
        let late = Instant::now();
        let (a, b) = (follow(&flights), follow(&flights));
        leader.complete(Outcome::Computed(payload()));
        assert!(
            matches!(a.wait(early).await, Next::Use(_)),
            "began before the leader: fresh enough"
        );
        assert!(
            matches!(b.wait(late).await, Next::Retry),
            "began after the leader started"
        );
    }

    #[tokio::test]
    async fn an_uncacheable_result_sends_followers_to_compute() {
        let flights = Flights::default();
        let leader = lead(&flights);
        let follower = follow(&flights);
        leader.complete(Outcome::Uncacheable);
        assert!(matches!(follower.wait(Instant::now()).await, Next::Compute));
    }

    #[tokio::test]
    async fn a_dropped_leader_means_retry_and_clear_starts_new_flights() {
        let flights = Flights::default();
        let leader = lead(&flights);
        let follower = follow(&flights);
        flights.clear();
        let second = lead(&flights);
        drop(leader);
        assert!(matches!(follower.wait(Instant::now()).await, Next::Retry));
        // The old leader did not remove the new flight.
        assert_eq!(flights.len(), 1);
        drop(second);
        assert_eq!(flights.len(), 0);
    }
}
