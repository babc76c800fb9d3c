//! Random generation tokens.
//!
//! A generation token names one version of a scope (see the crate docs). It
//! must be unpredictable enough that two independent processes never pick the
//! same one; it need not be secret.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Length in bytes of an encoded token (16 lowercase hex digits).
pub(crate) const TOKEN_LEN: usize = 16;

/// A random 64-bit number: a randomly keyed SipHash over a process counter
/// and the clock.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// A fresh token, as stored in Redis and in value envelopes.
pub(crate) fn new_token() -> String {
    format!("{:016x}", random_u64())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_fixed_length_and_distinct() {
        let a = super::new_token();
        let b = super::new_token();
        assert_eq!(a.len(), super::TOKEN_LEN);
        assert_ne!(a, b);
    }
}
