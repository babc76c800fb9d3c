//! The bookkeeping of a manager without Redis (the embedded mode): leases,
//! bookkeeping values and the clock they are read against, kept in memory,
//! so that workers built on them (the database feed) run the same way with
//! or without Redis. What this module alone owns: their in-memory forms.
//! Nothing here is shared with other processes, and there is nothing to
//! share: without Redis, each process caches for itself.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Leases and bookkeeping values in memory.
#[derive(Debug, Default)]
pub(crate) struct Book {
    /// Each lease's holder and the end of its life.
    leases: Mutex<HashMap<String, (String, Instant)>>,
    /// Bookkeeping values by name.
    meta: Mutex<HashMap<String, Vec<u8>>>,
}

impl Book {
    /// Takes the lease `name` for `holder` (free, expired, or already its
    /// own) for `ttl`; says whether `holder` holds it now.
    pub(crate) fn lease(&self, name: &str, holder: &str, ttl: Duration) -> bool {
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let taken = match leases.get(name) {
            Some((current, until)) => current == holder || *until <= now,
            None => true,
        };
        if taken {
            leases.insert(name.to_owned(), (holder.to_owned(), now + ttl));
        }
        taken
    }

    /// Gives the lease `name` up if `holder` holds it.
    pub(crate) fn release(&self, name: &str, holder: &str) {
        let mut leases = self.leases.lock().unwrap_or_else(PoisonError::into_inner);
        if leases.get(name).is_some_and(|(current, _)| current == holder) {
            leases.remove(name);
        }
    }

    /// The bookkeeping value `name`.
    pub(crate) fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.meta
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    /// Writes the bookkeeping value `name`.
    pub(crate) fn set(&self, name: &str, value: &[u8]) {
        self.meta
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), value.to_vec());
    }

    /// Records a caught-up time at `marker`: moves it forward only.
    pub(crate) fn mark(&self, marker: &str, at: i64) {
        let mut meta = self.meta.lock().unwrap_or_else(PoisonError::into_inner);
        let previous = meta
            .get(marker)
            .and_then(|bytes| std::str::from_utf8(bytes).ok()?.parse::<i64>().ok());
        if previous.is_none_or(|previous| at > previous) {
            meta.insert(marker.to_owned(), at.to_string().into_bytes());
        }
    }
}

/// This process's clock in milliseconds since the epoch: the "server time"
/// of the embedded mode, where this process is the only one.
pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_held_by_one_holder_until_it_expires_or_is_given_up() {
        let book = Book::default();
        let long = Duration::from_secs(60);
        assert!(book.lease("feed", "a", long));
        assert!(!book.lease("feed", "b", long));
        assert!(book.lease("feed", "a", long), "renewed by its holder");
        book.release("feed", "b");
        assert!(!book.lease("feed", "b", long), "only the holder gives it up");
        book.release("feed", "a");
        assert!(book.lease("feed", "b", Duration::ZERO));
        assert!(book.lease("feed", "a", long), "expired");
    }

    #[test]
    fn a_marker_only_moves_forward() {
        let book = Book::default();
        book.mark("m", 10);
        book.mark("m", 5);
        assert_eq!(book.get("m").as_deref(), Some(&b"10"[..]));
        book.set("token", b"t");
        assert_eq!(book.get("token").as_deref(), Some(&b"t"[..]));
    }
}
