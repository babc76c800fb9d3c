//! Single-flight: one computation per key inside a process.
//!
//! The first caller to miss on a key becomes its leader and computes; callers
//! arriving meanwhile wait for the leader's outcome instead of computing too.
//! A leader shares its value only when the value is known to be current (it was
//! stored under unchanged generations, or the cache is unavailable and the
//! process's own writes cleared the flights); otherwise its followers start
//! over, so a follower that began after a write never receives a value
//! computed before it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// What a leader hands to its followers.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// The encoded payload of a current value.
    Value(Arc<[u8]>),
    /// No shareable value: look up again (and perhaps lead).
    Retry,
}

type Slot = watch::Sender<Option<Outcome>>;

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
    /// Wait with [`wait`].
    Follower(watch::Receiver<Option<Outcome>>),
}

impl Flights {
    /// Joins the flight for `key`, leading it when there is none.
    pub(crate) fn join(&self, key: &str) -> Role<'_> {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = map.get(key) {
            return Role::Follower(slot.subscribe());
        }
        let slot = Arc::new(watch::Sender::new(None));
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

/// Waits for the leader's outcome; a vanished leader means [`Outcome::Retry`].
pub(crate) async fn wait(mut rx: watch::Receiver<Option<Outcome>>) -> Outcome {
    match rx.wait_for(Option::is_some).await {
        Ok(outcome) => outcome.clone().unwrap_or(Outcome::Retry),
        Err(_) => Outcome::Retry,
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
        self.slot.send_replace(Some(outcome));
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

    #[tokio::test]
    async fn followers_get_the_leaders_value() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join("k") else {
            panic!("first caller leads")
        };
        let Role::Follower(rx) = flights.join("k") else {
            panic!("second caller follows")
        };
        leader.complete(Outcome::Value(Arc::from(&b"v"[..])));
        assert!(matches!(wait(rx).await, Outcome::Value(v) if &*v == b"v"));
        assert_eq!(flights.len(), 0);
    }

    #[tokio::test]
    async fn a_dropped_leader_means_retry_and_clear_starts_new_flights() {
        let flights = Flights::default();
        let Role::Leader(leader) = flights.join("k") else {
            panic!("leads")
        };
        let Role::Follower(rx) = flights.join("k") else {
            panic!("follows")
        };
        flights.clear();
        let Role::Leader(second) = flights.join("k") else {
            panic!("after clear a new flight starts")
        };
        drop(leader);
        assert!(matches!(wait(rx).await, Outcome::Retry));
        // The old leader did not remove the new flight.
        assert_eq!(flights.len(), 1);
        drop(second);
        assert_eq!(flights.len(), 0);
    }
}
