//! The in-process tier: values kept in this process's memory, served with
//! no round trip, and never served after a write this process knows of.
//!
//! What this module alone owns: the bounded map of kept values (`moka`'s
//! synchronous cache, bounded by [`LocalConfig::capacity`] entries), the
//! generations it checks them against, and the fence that keeps a value
//! computed before an invalidation out of it.
//!
//! **Generations in process.** Every generation key a value depends on (see
//! [`Keyspace`](crate::keyspace::Keyspace)) falls into one of 65,536
//! *stripes*, each a counter in memory. An invalidation bumps the stripe of
//! every generation it replaces, before it returns to the writer. A kept
//! value carries the stripes it depends on with their counts as they were
//! *before its computation started*, and is served only while every one of
//! them is unchanged. Two generations sharing a stripe cost a miss, never a
//! stale value: a bump only ever drops values.
//!
//! **The fence.** A computation notes its stripes before it starts (as a
//! Redis computation notes its generation tokens) and its value is kept with
//! those counts. An invalidation that lands while the value is being computed
//! bumps a stripe, so the value, whether it is inserted before or after the
//! bump, is never served: the check is made on every read, not only when the
//! value is inserted. (A cache whose loader and invalidation do not order,
//! as `moka`'s `get_with` and `invalidate` do not, would keep it.)
//!
//! **Everything at once.** [`Local::clear`] bumps an epoch that every kept
//! value also carries: what `invalidate_all`, `delete_pattern` and the loss
//! of the invalidation channel do.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::codec::Kept;
use crate::key::{seed, stripe, CacheKey, Named, STRIPES};

/// The in-process tier's settings.
///
/// ```
/// use earnorm_cache::{CacheConfig, LocalConfig};
///
/// // Beside Redis: opt in (see the README on what it costs).
/// let config = CacheConfig {
///     local: LocalConfig { capacity: 10_000, with_redis: true },
///     ..Default::default()
/// };
/// assert!(config.local.with_redis);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalConfig {
    /// Most values kept in process; 0 turns the tier off.
    pub capacity: u64,
    /// Whether the tier is also on when the manager has a Redis URL. Off by
    /// default: beside Redis, a value another process's write made stale can
    /// still be served here until that invalidation reaches this process.
    /// Without a Redis URL the tier is on whenever `capacity` is not 0.
    pub with_redis: bool,
}

impl Default for LocalConfig {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            with_redis: false,
        }
    }
}

/// One kept value, with what it was computed under.
struct Entry {
    kept: Kept,
    /// The counters of the key's name, and whether a database feed covers
    /// every scope it depends on (what serving it checks, without the key).
    named: Named,
    feed_covered: bool,
    /// The counts of the stripes it depends on, and the epoch, as they
    /// were before its computation started.
    noted: Noted,
    /// When the value's time to live ends.
    expires: Instant,
    /// When a refresh ahead of that is due (without Redis, for a value
    /// refreshed ahead: see `crate::aside`).
    due: Option<Instant>,
}

/// A current value the tier holds, with what counting and serving it need.
pub(crate) struct Held {
    pub(crate) kept: Kept,
    pub(crate) named: Named,
    pub(crate) feed_covered: bool,
    /// Whether a refresh ahead of its expiry is due.
    pub(crate) due: bool,
}

/// What a computation noted before it started: the counts to keep its
/// value under.
pub(crate) struct Noted {
    seen: Box<[(u32, u64)]>,
    epoch: u64,
}

/// The tier of one manager.
pub(crate) struct Local {
    entries: moka::sync::Cache<u128, Arc<Entry>>,
    stripes: Box<[AtomicU64]>,
    epoch: AtomicU64,
    /// Whether the tier may serve and keep values: always without Redis;
    /// beside Redis, only while its invalidation channel is subscribed
    /// (see `connection/tracking.rs`).
    serving: AtomicBool,
    /// Times the tier was dropped because its invalidation channel was lost.
    pub(crate) resets: AtomicU64,
    /// Whether the tier is beside Redis (kept coherent by its channel).
    tracked: bool,
    /// Generation tokens learned from Redis (beside it), by a seeded hash of
    /// the generation's name: what lets a lookup read one key. Each is
    /// current while its stripe and the epoch are unchanged.
    known: moka::sync::Cache<u128, Arc<Known>>,
}

/// A generation's token as Redis gave it, with the count of its stripe and
/// the epoch noted before it was read.
struct Known {
    token: Vec<u8>,
    stripe: u32,
    count: u64,
    epoch: u64,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("entries", &self.entries.entry_count())
            .finish_non_exhaustive()
    }
}

impl Local {
    /// A tier of at most `capacity` values; `tracked`: it serves only once
    /// its invalidation channel is subscribed (beside Redis).
    pub(crate) fn new(capacity: u64, tracked: bool) -> Self {
        Self {
            entries: moka::sync::Cache::new(capacity),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            epoch: AtomicU64::new(0),
            serving: AtomicBool::new(!tracked),
            resets: AtomicU64::new(0),
            tracked,
            known: moka::sync::Cache::new(if tracked {
                capacity.saturating_mul(4).max(1_024)
            } else {
                0
            }),
        }
    }

    /// Learns the generation tokens a lookup of `key` read, under what was
    /// `noted` before it was sent (a push that arrived since makes them
    /// unknown again).
    pub(crate) fn learn(&self, key: &CacheKey, noted: &Noted, tokens: &[Option<Vec<u8>>]) {
        if !self.tracked || !self.serving.load(Ordering::SeqCst) || tokens.len() != key.generations.len() {
            return;
        }
        for ((name, &(stripe, count)), token) in key.generations.iter().zip(noted.seen.iter()).zip(tokens) {
            if let Some(token) = token {
                let known = Known {
                    token: token.clone(),
                    stripe,
                    count,
                    epoch: noted.epoch,
                };
                self.known.insert(name_id(name), Arc::new(known));
            }
        }
    }

    /// The current token of every generation of `key`, when all are known
    /// and no invalidation, push or loss happened since they were read.
    pub(crate) fn known(&self, key: &CacheKey) -> Option<Vec<Option<Vec<u8>>>> {
        if !self.tracked || !self.serving.load(Ordering::SeqCst) {
            return None;
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        key.generations
            .iter()
            .map(|name| {
                let known = self.known.get(&name_id(name))?;
                (known.epoch == epoch && self.count(known.stripe) == known.count).then(|| Some(known.token.clone()))
            })
            .collect()
    }

    /// The invalidation channel is lost: drops every kept value, and serves
    /// nothing until [`regain`](Self::regain).
    pub(crate) fn lose(&self) {
        if self.serving.swap(false, Ordering::SeqCst) {
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        self.clear();
    }

    /// The invalidation channel is subscribed again: serves from now on,
    /// refusing every value whose computation was noted before (a write
    /// made during the gap may have made it stale unseen).
    pub(crate) fn regain(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.serving.store(true, Ordering::SeqCst);
    }

    fn count(&self, stripe: u32) -> u64 {
        self.stripes[stripe as usize].load(Ordering::SeqCst)
    }

    /// The value kept under `id` (a key's [`CacheKey::local`]), when it is
    /// current and alive.
    pub(crate) fn get(&self, id: u128) -> Option<Held> {
        if !self.serving.load(Ordering::SeqCst) {
            return None;
        }
        let entry = self.entries.get(&id)?;
        let now = Instant::now();
        let current = self.is_current(&entry.noted) && now < entry.expires;
        if current {
            Some(Held {
                kept: entry.kept.clone(),
                named: entry.named.clone(),
                feed_covered: entry.feed_covered,
                due: entry.due.is_some_and(|due| now >= due),
            })
        } else {
            self.entries.invalidate(&id);
            None
        }
    }

    /// The counts a computation of `key` starts under: note them before it
    /// starts.
    pub(crate) fn note(&self, key: &CacheKey) -> Noted {
        let epoch = self.epoch.load(Ordering::SeqCst);
        Noted {
            seen: key.stripes.iter().map(|&stripe| (stripe, self.count(stripe))).collect(),
            epoch,
        }
    }

    /// Keeps `kept` for `key` for `ttl`, unless an invalidation happened
    /// since `noted` (then it would never be served anyway). Returns whether
    /// it was kept.
    pub(crate) fn keep(&self, key: &CacheKey, noted: Noted, kept: Kept, ttl: Duration) -> bool {
        self.keep_due(key, noted, kept, ttl, None)
    }

    /// [`keep`](Self::keep), with a refresh ahead due `due_in` from now.
    pub(crate) fn keep_due(
        &self,
        key: &CacheKey,
        noted: Noted,
        kept: Kept,
        ttl: Duration,
        due_in: Option<Duration>,
    ) -> bool {
        if !self.serving.load(Ordering::SeqCst) || !self.is_current(&noted) {
            return false;
        }
        let now = Instant::now();
        let Some(expires) = now.checked_add(ttl) else {
            return false;
        };
        let entry = Entry {
            kept,
            named: key.named.clone(),
            feed_covered: key.feed_covered,
            noted,
            expires,
            due: due_in.and_then(|due_in| now.checked_add(due_in)),
        };
        self.entries.insert(key.local, Arc::new(entry));
        true
    }

    /// Whether no invalidation happened since `noted`.
    pub(crate) fn is_current(&self, noted: &Noted) -> bool {
        noted.epoch == self.epoch.load(Ordering::SeqCst)
            && noted.seen.iter().all(|&(stripe, count)| self.count(stripe) == count)
    }

    /// Drops every kept value that depends on one of `generations` (generation
    /// key names relative to the prefix).
    pub(crate) fn invalidate<'a>(&self, generations: impl IntoIterator<Item = &'a [u8]>) {
        for name in generations {
            self.stripes[stripe(name) as usize].fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The counter of the stripe of generation `name` (relative to the
    /// prefix): it moves with every invalidation of that generation here.
    pub(crate) fn stripe_count(&self, name: &[u8]) -> u64 {
        self.count(crate::key::stripe(name))
    }

    /// Whether the tier serves values now.
    pub(crate) fn serves_any(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    /// Drops one kept value.
    pub(crate) fn remove(&self, key: &CacheKey) {
        self.remove_id(key.local);
    }

    /// Drops the value kept under `id` (a key's `local`).
    pub(crate) fn remove_id(&self, id: u128) {
        self.entries.invalidate(&id);
    }

    /// Drops every kept value (and every known token).
    pub(crate) fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.entries.invalidate_all();
        self.known.invalidate_all();
    }

    /// The number of values kept now (expired and superseded ones included
    /// until they are read or evicted).
    pub(crate) fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

/// A generation's id among the known tokens: its name hashed with this
/// process's seed.
fn name_id(name: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(name.as_bytes(), seed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Keeper;
    use crate::key::KeyBuilder;
    use crate::scope::Scope;

    fn key(id: &str) -> CacheKey {
        KeyBuilder::new("p:", "users", "profile", None, None)
            .scope(Scope::Record("users", id))
            .build()
            .expect("key")
    }

    fn payload(text: &str) -> Kept {
        Kept::Payload(Arc::from(text.as_bytes()))
    }

    fn held(held: Option<Held>) -> Option<Vec<u8>> {
        match held?.kept {
            Kept::Payload(bytes) => Some(bytes.to_vec()),
            Kept::Value(_) => None,
        }
    }

    #[test]
    fn an_invalidation_during_the_computation_keeps_its_value_out() {
        let local = Local::new(100, false);
        let (one, two) = (key("1"), key("2"));
        let noted = local.note(&one);
        let noted_two = local.note(&two);
        // A write to record 1 lands while both are computed.
        local.invalidate([&b"g:r:users:1"[..]]);
        assert!(!local.keep(&one, noted, payload("old"), Duration::from_secs(60)));
        assert!(local.keep(&two, noted_two, payload("two"), Duration::from_secs(60)));
        assert_eq!(held(local.get(one.local)), None);
        assert_eq!(held(local.get(two.local)).as_deref(), Some(&b"two"[..]));
    }

    #[test]
    fn a_value_kept_before_an_invalidation_lands_is_not_served_after_it() {
        let local = Local::new(100, false);
        let one = key("1");
        let noted = local.note(&one);
        assert!(local.keep(&one, noted, payload("v1"), Duration::from_secs(60)));
        assert!(local.get(one.local).is_some());
        local.invalidate([&b"g:r:users:1"[..]]);
        assert!(local.get(one.local).is_none(), "the record's write drops it");
        let noted = local.note(&one);
        assert!(local.keep(&one, noted, payload("v2"), Duration::from_secs(60)));
        local.invalidate([&b"g:m:users"[..]]);
        assert!(local.get(one.local).is_none(), "a bulk write to the model drops it");
        let noted = local.note(&one);
        assert!(local.keep(&one, noted, payload("v3"), Duration::from_secs(60)));
        local.clear();
        assert!(local.get(one.local).is_none(), "so does clearing everything");
    }

    #[test]
    fn a_lost_channel_drops_the_tier_and_what_was_noted_before_it_is_back() {
        let local = Local::new(100, true);
        let one = key("1");
        let noted = local.note(&one);
        assert!(
            !local.keep(&one, noted, payload("v"), Duration::from_secs(60)),
            "not subscribed yet"
        );
        local.regain();
        let noted = local.note(&one);
        assert!(local.keep(&one, noted, payload("v"), Duration::from_secs(60)));
        assert!(local.get(one.local).is_some());
        let noted_before = local.note(&one);
        local.lose();
        assert!(local.get(one.local).is_none(), "nothing is served through the gap");
        local.regain();
        assert!(local.get(one.local).is_none(), "what was kept before the loss is gone");
        assert!(
            !local.keep(&one, noted_before, payload("v"), Duration::from_secs(60)),
            "a computation noted before the gap may have missed a write in it"
        );
        assert_eq!(local.resets.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn values_expire_with_their_time_to_live() {
        let local = Local::new(100, false);
        let one = key("1");
        let noted = local.note(&one);
        assert!(local.keep(&one, noted, payload("v"), Duration::from_millis(20)));
        assert!(local.get(one.local).is_some());
        std::thread::sleep(Duration::from_millis(30));
        assert!(local.get(one.local).is_none());
    }

    #[test]
    fn the_tier_holds_at_most_its_capacity() {
        let local = Local::new(1_000, false);
        for id in 0..20_000 {
            let key = key(&id.to_string());
            let noted = local.note(&key);
            local.keep(&key, noted, payload("v"), Duration::from_secs(60));
        }
        assert!(local.len() <= 1_000, "{} kept", local.len());
    }

    #[test]
    fn a_keeper_restores_only_the_type_it_was_made_for() {
        use crate::codec::ResultOutput;
        let keeper = Keeper::cloned::<Result<String, std::io::Error>, ResultOutput>();
        let ok: Result<String, std::io::Error> = Ok("v".into());
        let kept = keeper.keep(&ok).expect("kept");
        let back: Option<Result<String, std::io::Error>> = keeper.restore(&kept);
        assert_eq!(back.and_then(Result::ok).as_deref(), Some("v"));
        let err: Result<String, std::io::Error> = Err(std::io::Error::other("no"));
        assert!(keeper.keep(&err).is_none(), "an error is not cached");
        assert!(keeper.keep(&7u32).is_none(), "another type");
        assert!(keeper.restore::<Result<u32, std::io::Error>>(&kept).is_none());
    }
}
