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
//!
//! A follower's wait is bounded twice: it waits for the leader's
//! computation at most until its deadline (`lease_wait` after the call
//! began: a leader that is slow, or whose future is kept but never polled,
//! holds nobody longer), and for the leader's store, which is waiting on
//! Redis, at most what is left of its own Redis allowance. Either way, past
//! the bound it computes its own value.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

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

/// What a follower does after waiting: use what the leader has (its
/// payload here; the value decoded from it in the cache-aside call), look
/// up again, or compute directly.
#[derive(Debug)]
pub(crate) enum Next<T = Arc<[u8]>> {
    /// Use this.
    Use(T),
    /// Look up again.
    Retry,
    /// Compute directly.
    Compute,
}

/// Where a flight stands.
#[derive(Debug, Clone)]
enum Stage {
    /// The leader is computing.
    Computing,
    /// The leader has its value and is storing it.
    Storing,
    /// The leader is done.
    Done(Outcome),
}

/// One flight: its stage channel and when its leader started.
#[derive(Debug)]
pub(crate) struct Slot {
    tx: watch::Sender<Stage>,
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
    rx: watch::Receiver<Stage>,
    leader_started: Instant,
}

impl Follower {
    /// Waits for the leader's computation until `deadline`, then for its
    /// store within `budget` (reduced by the time spent); says whether this
    /// caller, which began at `began`, may use its payload.
    pub(crate) async fn wait(mut self, began: Instant, deadline: Instant, budget: &mut Duration) -> Next {
        let computed = tokio::time::timeout_at(
            deadline.into(),
            self.rx.wait_for(|stage| !matches!(stage, Stage::Computing)),
        )
        .await
        .map(|waited| waited.map(|stage| Stage::clone(&stage)));
        let stage = match computed {
            Err(_) => return Next::Compute,
            Ok(Err(_)) => return Next::Retry,
            Ok(Ok(stage)) => stage,
        };
        let outcome = match stage {
            Stage::Done(outcome) => outcome,
            Stage::Computing | Stage::Storing => {
                let start = Instant::now();
                let stored = tokio::time::timeout(*budget, self.rx.wait_for(|stage| matches!(stage, Stage::Done(_))))
                    .await
                    .map(|waited| waited.map(|stage| Stage::clone(&stage)));
                *budget = budget.saturating_sub(start.elapsed());
                match stored {
                    Err(_) => return Next::Compute,
                    Ok(Err(_)) => return Next::Retry,
                    Ok(Ok(stage)) => match stage {
                        Stage::Done(outcome) => outcome,
                        Stage::Computing | Stage::Storing => Outcome::Retry,
                    },
                }
            }
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
            tx: watch::Sender::new(Stage::Computing),
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
    /// Tells followers the value is computed and being stored: from now on
    /// they wait on Redis, within their own allowance.
    pub(crate) fn storing(&self) {
        self.slot.tx.send_replace(Stage::Storing);
    }

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
        self.slot.tx.send_replace(Stage::Done(outcome));
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

    /// Waits with generous bounds.
    async fn wait(follower: Follower, began: Instant) -> Next {
        let mut budget = Duration::from_secs(5);
        follower
            .wait(began, Instant::now() + Duration::from_secs(5), &mut budget)
            .await
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
        assert!(matches!(wait(early, began).await, Next::Use(v) if &*v == b"v"));
        assert!(
            matches!(wait(late, after_store).await, Next::Retry),
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
            matches!(wait(a, early).await, Next::Use(_)),
            "began before the leader: fresh enough"
        );
        assert!(
            matches!(wait(b, late).await, Next::Retry),
            "began after the leader started"
        );
    }

    #[tokio::test]
    async fn an_uncacheable_result_sends_followers_to_compute() {
        let flights = Flights::default();
        let leader = lead(&flights);
        let follower = follow(&flights);
        leader.complete(Outcome::Uncacheable);
        assert!(matches!(wait(follower, Instant::now()).await, Next::Compute));
    }

    #[tokio::test]
    async fn a_dropped_leader_means_retry_and_clear_starts_new_flights() {
        let flights = Flights::default();
        let leader = lead(&flights);
        let follower = follow(&flights);
        flights.clear();
        let second = lead(&flights);
        drop(leader);
        assert!(matches!(wait(follower, Instant::now()).await, Next::Retry));
        // The old leader did not remove the new flight.
        assert_eq!(flights.len(), 1);
        drop(second);
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_follower_waits_for_the_computation_until_its_deadline_and_for_the_store_within_its_budget() {
        let flights = Flights::default();
        let leader = lead(&flights);
        let follower = follow(&flights);
        let mut budget = Duration::from_secs(5);
        let deadline = Instant::now() + Duration::from_millis(30);
        assert!(matches!(
            follower.wait(Instant::now(), deadline, &mut budget).await,
            Next::Compute
        ));
        leader.storing();
        let follower = follow(&flights);
        let mut budget = Duration::from_millis(30);
        let far = Instant::now() + Duration::from_secs(5);
        assert!(matches!(
            follower.wait(Instant::now(), far, &mut budget).await,
            Next::Compute
        ));
        assert!(budget.is_zero(), "the wait for the store came out of the budget");
    }
}
