//! The checker's two-tier mode (see `support::checker`), in a test binary
//! of its own: its runs would slow the fault checker's reconnections if
//! they ran beside it (test binaries run one at a time).

use std::time::Duration;

use support::{run_checker, CheckerConfig};

/// The two-tier mode: both environments keep values in process beside
/// Redis, with Redis killed, restarted, frozen and flushed under them (each
/// a loss of the invalidation channel). A read is never older than a write
/// its own environment made; the other environment may read the old value
/// for the invalidation's delivery lag only, never through a lost channel
/// (which would last until the TTL of 60 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_two_tier_mode_never_serves_a_writer_its_old_value_and_bounds_the_others() {
    let report = support::run_printed(&CheckerConfig {
        duration: Duration::from_secs(8),
        local: true,
        ..CheckerConfig::default()
    })
    .await;
    assert_eq!(report.failed_calls, 0, "{}", report.to_json());
    assert_eq!(
        report.stale_reads,
        0,
        "in the writer's own process: {}",
        report.to_json()
    );
    report.assert_monitor_consistent();
    assert!(
        report.cross_window_max_us <= 1_000_000,
        "another process served an old value for {} us: {}",
        report.cross_window_max_us,
        report.to_json()
    );

    // Reads mostly hits (no faults, no bulk writes, no outside writers,
    // records mostly read): the window of the other environment, measured.
    let calm = run_checker(&CheckerConfig {
        duration: Duration::from_secs(6),
        local: true,
        faults: false,
        bulk_writes: false,
        records: 64,
        writers: 2,
        readers: 16,
        outside_writers: 0,
        outside_transactions: 0,
        tally_writers: 0,
        ..CheckerConfig::default()
    })
    .await;
    println!("{}", calm.summary());
    assert!(calm.local_hits > 500, "served in process: {}", calm.summary());
    assert_eq!(calm.failed_calls, 0, "{}", calm.to_json());
    assert_eq!(calm.stale_reads, 0, "in the writer's own process: {}", calm.to_json());
    calm.assert_monitor_consistent();
    assert!(
        calm.cross_window_max_us <= 1_000_000,
        "another process served an old value for {} us: {}",
        calm.cross_window_max_us,
        calm.to_json()
    );
}
