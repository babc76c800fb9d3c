//! When a value's data was read: the database's logical time of the reads
//! a value was computed from. It is stamped on the value when it is stored
//! (see `codec.rs`), so that the consistency monitor can find a value read
//! before a write yet stored after it (see `monitor.rs`).
//!
//! Whoever reads the database notes each read's time with [`note_read`]
//! (the ORM notes the `operationTime` of each of MongoDB's replies, when
//! the monitor is on). A note goes to the innermost of:
//!
//! - the computation running in this task (`get_or_compute`, `#[cached]`,
//!   a batch's computation): its value is stamped with the earliest read
//!   noted while it ran, and when it ends that time is noted in turn in
//!   the computation that encloses it, if any (a value computed from
//!   another value read at `t` depends on data of `t`);
//! - otherwise the plain cache-aside this task (or thread, for a future
//!   run by `block_on` outside any task) is in: one begins at a plain
//!   [`CacheManager::get`] that misses, and the [`CacheManager::set`] that
//!   ends it is stamped with the earliest read noted since. A hit, a `set`,
//!   or a write through the ORM ([`note_write`]) ends it. At most
//!   4,096 are followed at once; past that, all are forgotten (their
//!   values are then stored with no time, which the monitor does not
//!   judge). Futures run side by side in one task (`join!`) share one:
//!   one's `set` may be stamped with the other's read.
//!
//! The earliest read is the one that may be stalest: a value is judged by
//! it. `0` means unknown (nothing was noted). Nothing is followed until a
//! manager with the monitor on exists.
//!
//! [`CacheManager::set`]: crate::CacheManager::set
//! [`CacheManager::get`]: crate::CacheManager::get

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

tokio::task_local! {
    /// The earliest read noted by the computation running in this task.
    static COMPUTING: Cell<u64>;
}

/// Most plain cache-asides followed at once.
const MAX_PLAIN: usize = 4096;

/// Tells the cache that the current task read data from the database as
/// of `at`: a logical time of the database that orders reads and writes
/// (for MongoDB, a reply's `operationTime` as `seconds << 32 | increment`,
/// the same clock as a change event's `clusterTime`). `0` is ignored.
///
/// The value of the computation running in this task, or of the plain
/// `set` that ends this task's plain cache-aside, is stamped with the
/// earliest such time, which lets the consistency monitor find a value
/// read before a write but stored after it (see
/// [`MonitorConfig`](crate::MonitorConfig)).
pub fn note_read(at: u64) {
    if at == 0 {
        return;
    }
    if COMPUTING.try_with(|noted| noted.set(earliest(noted.get(), at))).is_ok() {
        return;
    }
    if let Some(mut plain) = plain() {
        if let Some(noted) = plain.get_mut(&Runner::current()) {
            *noted = earliest(*noted, at);
        }
    }
}

/// Tells the cache that the current task wrote to the database: its plain
/// cache-aside, if any, ends (a `set` after it may store what was written,
/// which reads before the write would misjudge).
pub fn note_write() {
    take_plain();
}

/// The earlier of two times, `0` being unknown.
fn earliest(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, t) | (t, 0) => t,
        (a, b) => a.min(b),
    }
}

/// Runs `computation`, noting the reads it makes apart: returns its output
/// and the earliest of them (`0`: none), which is noted in the computation
/// that encloses it too.
pub(crate) async fn timed<F: Future>(computation: F) -> (F::Output, u64) {
    let (output, at) = COMPUTING
        .scope(Cell::new(0), async {
            let output = computation.await;
            (output, COMPUTING.with(Cell::get))
        })
        .await;
    if at != 0 {
        let _ = COMPUTING.try_with(|noted| noted.set(earliest(noted.get(), at)));
    }
    (output, at)
}

/// Begins a plain cache-aside in this task (a plain `get` missed).
pub(crate) fn begin_plain() {
    if COMPUTING.try_with(|_| ()).is_ok() {
        return;
    }
    if let Some(mut plain) = plain() {
        let runner = Runner::current();
        if plain.len() >= MAX_PLAIN && !plain.contains_key(&runner) {
            plain.clear();
        }
        plain.insert(runner, 0);
    }
}

/// Ends this task's plain cache-aside: the earliest read noted since it
/// began (`0`: none, none begun, or inside a computation).
pub(crate) fn take_plain() -> u64 {
    if COMPUTING.try_with(|_| ()).is_ok() {
        return 0;
    }
    plain()
        .and_then(|mut plain| plain.remove(&Runner::current()))
        .unwrap_or(0)
}

/// Starts following plain cache-asides (a manager with the monitor on
/// exists).
pub(crate) fn follow() {
    ambient().on.store(true, Ordering::Relaxed);
}

/// The plain cache-asides followed, when any are.
fn plain() -> Option<MutexGuard<'static, HashMap<Runner, u64>>> {
    let ambient = ambient();
    ambient
        .on
        .load(Ordering::Relaxed)
        .then(|| ambient.plain.lock().unwrap_or_else(PoisonError::into_inner))
}

/// What runs a future: a Tokio task, or a thread (`block_on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Runner {
    Task(tokio::task::Id),
    Thread(std::thread::ThreadId),
}

impl Runner {
    fn current() -> Self {
        tokio::task::try_id().map_or_else(|| Runner::Thread(std::thread::current().id()), Runner::Task)
    }
}

/// The plain cache-asides of tasks, by what runs them.
struct Ambient {
    /// Whether they are followed at all.
    on: AtomicBool,
    plain: Mutex<HashMap<Runner, u64>>,
}

fn ambient() -> &'static Ambient {
    static AMBIENT: OnceLock<Ambient> = OnceLock::new();
    AMBIENT.get_or_init(|| Ambient {
        on: AtomicBool::new(false),
        plain: Mutex::new(HashMap::new()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_computation_is_stamped_with_its_earliest_read_and_passes_it_out() {
        let ((), outer) = timed(async {
            note_read(50);
            let ((), inner) = timed(async {
                note_read(30);
                note_read(40);
            })
            .await;
            assert_eq!(inner, 30);
        })
        .await;
        assert_eq!(outer, 30);
        let ((), none) = timed(async {}).await;
        assert_eq!(none, 0);
    }

    fn plain_cache_aside() {
        follow();
        note_read(5);
        assert_eq!(take_plain(), 0, "no cache-aside begun: nothing noted");
        begin_plain();
        note_read(20);
        note_read(25);
        assert_eq!(take_plain(), 20);
        assert_eq!(take_plain(), 0, "taken once");
        begin_plain();
        note_read(30);
        note_write();
        assert_eq!(take_plain(), 0, "a write ends it");
    }

    #[tokio::test]
    async fn a_plain_set_is_stamped_with_the_reads_since_the_get_that_missed() {
        // In a task, and in the future `block_on` runs.
        tokio::spawn(async { plain_cache_aside() }).await.expect("the task");
        plain_cache_aside();
    }

    #[tokio::test]
    async fn a_set_inside_a_computation_is_not_stamped() {
        follow();
        let ((), _) = timed(async {
            begin_plain();
            note_read(7);
            assert_eq!(take_plain(), 0);
        })
        .await;
    }
}
