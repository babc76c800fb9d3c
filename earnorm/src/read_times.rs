//! Noting when the ORM read the database, for the cache's consistency
//! monitor: each reply's `operationTime` is passed to
//! [`earnorm_cache::note_read`], so that the values computed from it are
//! stamped with it (see the cache's docs on the monitor).
//!
//! An ORM write of one record notes its reply's `operationTime` too: the
//! write's own time, which the monitor compares with when values of the
//! record were read (see `timed_write`).
//!
//! The driver reports replies through its command monitor. When the
//! monitor is on, [`Environment::connect`](crate::Environment::connect)
//! installs one that notes them, wrapped around the one set in the
//! driver's options, if any. The driver calls it in the task that runs
//! the command, which is what ties a read to the value computed from it.
//!
//! Not on a sharded cluster: there each shard answers with its own
//! `operationTime`, and a shard that was not written to lately answers an
//! older one than a read of another shard after a write, so a value read
//! after a write could look read before it. Nothing is noted there.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mongodb::bson::Timestamp;
use mongodb::event::command::CommandEvent;
use mongodb::event::EventHandler;

/// The commands that read documents a value can be computed from.
const READS: [&str; 5] = ["find", "getMore", "aggregate", "count", "distinct"];
/// The commands that write documents.
const WRITES: [&str; 4] = ["insert", "update", "delete", "findAndModify"];

tokio::task_local! {
    /// The ORM write running in this task: the latest `operationTime` of
    /// its write commands and its commit.
    static WRITTEN: Cell<u64>;
}

/// Notes, for the cache's consistency monitor, when a successful read
/// happened: the reply's `operationTime` (the database's logical time,
/// ordered with change events' `clusterTime`); inside an ORM write, when
/// its writes happened. Other events are ignored.
/// [`Environment::connect`](crate::Environment::connect) calls it, before
/// the command monitor set in the driver's options, when the consistency
/// monitor is on; call it yourself from a command monitor EarnORM cannot
/// wrap.
pub fn note_read_time(event: &CommandEvent) {
    let CommandEvent::Succeeded(done) = event else { return };
    let name = done.command_name.as_str();
    let at = done.reply.get_timestamp("operationTime").map_or(0, logical);
    if READS.contains(&name) {
        earnorm_cache::note_read(at);
    } else if WRITES.contains(&name) || name == "commitTransaction" {
        let _ = WRITTEN.try_with(|written| written.set(written.get().max(at)));
    }
}

/// Runs an ORM `write`, returning with its output the latest time among
/// its replies (`0`: none): when it changed one record, the time that
/// change became visible, or a moment after it (a commit's reply tells
/// the time it answered, not its statements').
pub(crate) async fn timed_write<F: Future>(write: F) -> (F::Output, u64) {
    WRITTEN
        .scope(Cell::new(0), async {
            let output = write.await;
            (output, WRITTEN.with(Cell::get))
        })
        .await
}

/// The command monitor [`Environment::connect`](crate::Environment::connect)
/// installs with the consistency monitor on: [`note_read_time`] while
/// `on` holds, then `theirs` (the one set in the options, if any), which
/// gets every event as before.
pub(crate) fn noting(theirs: Option<EventHandler<CommandEvent>>, on: Arc<AtomicBool>) -> EventHandler<CommandEvent> {
    let note = move |event: &CommandEvent| {
        if on.load(Ordering::Relaxed) {
            note_read_time(event);
        }
    };
    match theirs {
        None => EventHandler::callback(move |event: CommandEvent| note(&event)),
        Some(EventHandler::Callback(theirs)) => EventHandler::callback(move |event: CommandEvent| {
            note(&event);
            theirs(event);
        }),
        Some(EventHandler::AsyncCallback(theirs)) => EventHandler::async_callback(move |event: CommandEvent| {
            note(&event);
            theirs(event)
        }),
        Some(EventHandler::TokioMpsc(sender)) => EventHandler::async_callback(move |event: CommandEvent| {
            note(&event);
            let sender = sender.clone();
            Box::pin(async move {
                let _ = sender.send(event).await;
            })
        }),
        Some(theirs) => {
            tracing::warn!(
                "the command monitor set in the driver's options is of a kind EarnORM cannot wrap: \
                 reads are not timed for the consistency monitor (call earnorm::note_read_time from it)"
            );
            theirs
        }
    }
}

/// A cluster time as the cache's logical time: seconds, then increment.
pub(crate) fn logical(at: Timestamp) -> u64 {
    (u64::from(at.time) << 32) | u64::from(at.increment)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_times_keep_their_order() {
        let earlier = logical(Timestamp { time: 5, increment: 9 });
        let later = logical(Timestamp { time: 6, increment: 1 });
        assert!(earlier < later);
        assert!(logical(Timestamp { time: 6, increment: 2 }) > later);
    }
}
