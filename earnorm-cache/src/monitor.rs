//! The consistency monitor: checks, a little after a sampled write, that
//! nothing the write made stale can still be served, repairs what it finds,
//! and reports the cache's consistency in nines.
//!
//! What this module alone owns: sampling writes, the counts, and the
//! windows the nines are computed over. The check and its repair are in
//! `watch.rs`. It never runs on a
//! caller's read path, takes no lease and changes no entry but the ones it
//! repairs; it works from generation tokens and the in-process tier's
//! counters, never from values, so it needs no user type.
//!
//! **The check.** A value is served only while the generations it was
//! computed under are current (see the crate docs). A write to a scope
//! must replace the generations of [`Keyspace::written_generations`]: its
//! invalidation deletes them, so a value computed before the write is never
//! served after it. For a sampled write the monitor
//!
//! 1. right before the write's invalidation is sent (after the write
//!    committed), reads the token of each of those generations, creating the
//!    ones that are absent (`SET NX GET`, as a lookup does: a reader that
//!    starts from here on computes under that token). In this process's
//!    tier it notes the counter of each generation's stripe;
//! 2. after [`MonitorConfig::delay`], counted from when the invalidation
//!    returned (the `WriteWatch` is dropped then), reads the tokens again. A generation
//!    that still holds the same token was not replaced: every value under
//!    it (computed before the write, or from a read that raced it) can be
//!    served. In the tier, a stripe whose counter did not move means that
//!    nothing there was invalidated for it: a kept value noted before the
//!    write can be served.
//!
//! Tokens are random, so a generation deleted and created again never has
//! its old token back: a working invalidation is never reported. A write
//! whose invalidation was lost, skipped, or undone (a Redis restored from
//! a snapshot without the restart wipe) is.
//!
//! **Values read before the write.** A value stored *after* the write's
//! invalidation, under the generations that followed it, passes the first
//! check, yet it is stale if its data was read *before* the write: what a
//! plain `get`, read, `set` stores when a write lands between the read and
//! the `set`, or a value read from a lagging replica. Every value carries
//! when its data was read (`read_at` in its envelope, see `read_time.rs`);
//! a write's invalidation knows when the write happened (the change
//! event's `clusterTime`, or the ORM write's reply; `0` when unknown, and
//! then this part is not run). So the check also reads the values stored
//! lately under the write's generations: those this process stored
//! (`recent.rs`), and those a plain `set` of any process with the monitor
//! on stored (a sorted set per generation in Redis, see
//! `CacheManager::note_plain_set`), at most 256 per check. It reads their
//! envelopes' heads (`GETRANGE`), then their generations with the
//! write's (`MGET`): one whose tokens are all current (it can be served)
//! and whose data was read before the write is reported. A value computed
//! by `get_or_compute` from the primary never is: it can be served after
//! the invalidation only if its generations were read after it, and so its
//! data too. This part sees Redis, not the tiers of other processes.
//!
//! **Repair.** A generation found not replaced is deleted in Redis, and
//! invalidated in the tier, which is what the invalidation should have
//! done. A value read before the write is deleted, in Redis and in this
//! process's tier.
//!
//! A sampled write whose generations cannot be read (Redis unavailable,
//! or a master of a cluster down) is counted as skipped, not checked. Of a
//! write touching many scopes, the first 64 are watched.
//!
//! **Cost.** Nothing on hits. On a sampled write, one pipelined round trip
//! to Redis before its invalidation (a `SET NX GET` per generation), and
//! after the delay, off the writer's path: when the write's time is known,
//! a `ZRANGE` per generation (the plain sets noted) and, for the values
//! found, a `GETRANGE` each, in one pipeline each; then one `MGET` (plus
//! one `DEL` for a repair). On every store, a lock and a few strings copied into the
//! index of recent values; on every plain `set`, one more pipelined round
//! trip, in a task of its own (its note in Redis); on every database reply (with the ORM), its
//! `operationTime` noted (the driver's command monitor).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::MonitorConfig;
use crate::recent::Recent;
use crate::CacheConfig;

/// What the monitor has found since the manager started (see
/// [`CacheManager::monitor_report`](crate::CacheManager::monitor_report)).
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorReport {
    /// Scopes of sampled writes checked.
    pub checked: u64,
    /// Those found inconsistent: something the write made stale could
    /// still be served when the check ran.
    pub inconsistent: u64,
    /// Generations the monitor deleted in Redis, or invalidated in this
    /// process's tier, to repair what it found.
    pub repaired: u64,
    /// Sampled writes that could not be checked (Redis unavailable when
    /// the generations were to be read): the windows' nines say nothing of
    /// those.
    pub skipped: u64,
    /// The last 1, 5 and 10 minutes.
    pub windows: Vec<MonitorWindow>,
}

/// The checks of one sliding window.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorWindow {
    /// How far back the window reaches.
    pub span: Duration,
    /// Scopes checked in it.
    pub checked: u64,
    /// Those found inconsistent.
    pub inconsistent: u64,
}

impl MonitorWindow {
    /// The consistency as nines: `-log10(inconsistent / checked)` (3.0 is
    /// 99.9%). When nothing was inconsistent, the rate is only known to be
    /// below one in `checked`: this gives `log10(checked + 1)`, just above
    /// what one inconsistency would give, so that fewer inconsistencies
    /// always show more nines. `None` when nothing was checked.
    pub fn nines(&self) -> Option<f64> {
        if self.checked == 0 {
            return None;
        }
        #[allow(clippy::cast_precision_loss)]
        let (checked, inconsistent) = (self.checked as f64, self.inconsistent as f64);
        Some(if self.inconsistent == 0 {
            (checked + 1.0).log10()
        } else {
            -(inconsistent / checked).log10()
        })
    }
}

/// The windows reported, shortest first.
const WINDOWS: [Duration; 3] = [
    Duration::from_secs(60),
    Duration::from_secs(300),
    Duration::from_secs(600),
];

/// One second of checks.
#[derive(Debug, Clone, Copy)]
struct Second {
    at: u64,
    checked: u64,
    inconsistent: u64,
}

/// The monitor of one manager.
pub(crate) struct Monitor {
    config: MonitorConfig,
    /// The manager's prefix: the nines gauge's label (as the status
    /// gauge's), so that managers of one process keep theirs apart.
    prefix: String,
    /// The delay actually waited (see [`MonitorConfig::delay`]).
    pub(crate) delay: Duration,
    writes: AtomicU64,
    checked: AtomicU64,
    inconsistent: AtomicU64,
    pub(crate) repaired: AtomicU64,
    skipped: AtomicU64,
    started: Instant,
    /// Checks by second, the last ten minutes.
    seconds: Mutex<VecDeque<Second>>,
    /// The values this process stored lately (see `recent.rs`).
    pub(crate) recent: Recent,
    /// The warnings logged in the current second.
    warnings: Mutex<Warnings>,
}

/// Most inconsistencies logged in one second by one manager: a lost
/// stream of invalidations (a Redis restored from a backup) must not flood
/// the logs. The others are counted, and the next one logged says how many
/// were left out.
pub(crate) const MAX_WARNINGS_PER_SECOND: u64 = 10;

/// The warnings of one second.
#[derive(Debug, Default)]
struct Warnings {
    second: u64,
    logged: u64,
    left_out: u64,
}

impl Monitor {
    /// The monitor `config` asks for, if any; `tier_beside_redis`: the
    /// in-process tier is on beside Redis.
    pub(crate) fn new(config: &CacheConfig, tier_beside_redis: bool) -> Option<Self> {
        let settings = config.monitor.clone();
        if !settings.enabled {
            return None;
        }
        crate::read_time::follow();
        let mut delay = settings.delay;
        if tier_beside_redis {
            delay = delay
                .saturating_add(config.heartbeat_interval)
                .saturating_add(config.operation_timeout);
        }
        Some(Self {
            config: settings,
            prefix: config.namespace(),
            delay,
            writes: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            inconsistent: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            started: Instant::now(),
            seconds: Mutex::new(VecDeque::new()),
            recent: Recent::default(),
            warnings: Mutex::new(Warnings::default()),
        })
    }

    /// Whether the next write is sampled.
    pub(crate) fn samples(&self) -> bool {
        let n = u64::from(self.config.sample_one_in.max(1));
        self.writes.fetch_add(1, Relaxed).is_multiple_of(n)
    }

    /// Counts one check of a model's scope; `labels`: the model's metric
    /// labels (as every per-model metric has them).
    pub(crate) fn count(&self, labels: &[(&'static str, String)], inconsistent: bool) {
        self.checked.fetch_add(1, Relaxed);
        metrics::counter!("earnorm_cache_monitor_checked_total", labels).increment(1);
        if inconsistent {
            self.inconsistent.fetch_add(1, Relaxed);
            metrics::counter!("earnorm_cache_monitor_inconsistent_total", labels).increment(1);
        }
        let at = self.started.elapsed().as_secs();
        let mut seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        match seconds.back_mut() {
            Some(last) if last.at == at => {
                last.checked += 1;
                last.inconsistent += u64::from(inconsistent);
            }
            _ => seconds.push_back(Second {
                at,
                checked: 1,
                inconsistent: u64::from(inconsistent),
            }),
        }
        let longest = WINDOWS[WINDOWS.len() - 1].as_secs();
        while seconds.front().is_some_and(|s| at.saturating_sub(s.at) >= longest) {
            seconds.pop_front();
        }
        let windows = windows(&seconds, at);
        drop(seconds);
        for window in &windows {
            if let Some(nines) = window.nines() {
                let label = format!("{}m", window.span.as_secs() / 60);
                metrics::gauge!("earnorm_cache_monitor_nines", "prefix" => self.prefix.clone(), "window" => label)
                    .set(nines);
            }
        }
    }

    /// Remembers that the value of `key` was stored (see `recent.rs`): kept
    /// at least a check's delay and ten seconds more.
    pub(crate) fn stored(&self, key: &crate::CacheKey) {
        let keep = self.delay.saturating_add(Duration::from_secs(10));
        self.recent
            .stored(key, i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    }

    /// Whether an inconsistency found now may be logged: `Some` with the
    /// number left out since the last one logged, `None` past
    /// [`MAX_WARNINGS_PER_SECOND`] (it is then counted as left out).
    pub(crate) fn may_warn(&self) -> Option<u64> {
        self.may_warn_at(self.started.elapsed().as_secs())
    }

    fn may_warn_at(&self, second: u64) -> Option<u64> {
        let mut warnings = self.warnings.lock().unwrap_or_else(PoisonError::into_inner);
        if warnings.second != second {
            warnings.second = second;
            warnings.logged = 0;
        }
        if warnings.logged == MAX_WARNINGS_PER_SECOND {
            warnings.left_out += 1;
            return None;
        }
        warnings.logged += 1;
        Some(std::mem::take(&mut warnings.left_out))
    }

    /// Counts a sampled write that could not be checked.
    pub(crate) fn skip(&self) {
        self.skipped.fetch_add(1, Relaxed);
        metrics::counter!("earnorm_cache_monitor_skipped_total").increment(1);
    }

    pub(crate) fn report(&self) -> MonitorReport {
        let at = self.started.elapsed().as_secs();
        let seconds = self.seconds.lock().unwrap_or_else(PoisonError::into_inner);
        MonitorReport {
            checked: self.checked.load(Relaxed),
            inconsistent: self.inconsistent.load(Relaxed),
            repaired: self.repaired.load(Relaxed),
            skipped: self.skipped.load(Relaxed),
            windows: windows(&seconds, at),
        }
    }
}

/// The reported windows at second `at`.
fn windows(seconds: &VecDeque<Second>, at: u64) -> Vec<MonitorWindow> {
    WINDOWS
        .iter()
        .map(|&span| {
            let inside = seconds.iter().filter(|s| at.saturating_sub(s.at) < span.as_secs());
            let (checked, inconsistent) = inside.fold((0, 0), |(c, i), s| (c + s.checked, i + s.inconsistent));
            MonitorWindow {
                span,
                checked,
                inconsistent,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_limited_per_second_and_the_next_one_says_how_many_were_left_out() {
        let config = CacheConfig {
            monitor: MonitorConfig {
                enabled: true,
                ..MonitorConfig::default()
            },
            ..CacheConfig::default()
        };
        let monitor = Monitor::new(&config, false).expect("on");
        let logged: Vec<Option<u64>> = (0..MAX_WARNINGS_PER_SECOND + 5)
            .map(|_| monitor.may_warn_at(7))
            .collect();
        assert!(logged[..10].iter().all(|w| *w == Some(0)), "{logged:?}");
        assert!(logged[10..].iter().all(Option::is_none), "{logged:?}");
        assert_eq!(monitor.may_warn_at(8), Some(5), "the next second says so");
        assert_eq!(monitor.may_warn_at(8), Some(0));
    }
}
