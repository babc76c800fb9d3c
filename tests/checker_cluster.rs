//! The checker's cluster mode (see `support::checker`), in a test binary
//! of its own: test binaries run one after another, so its six
//! `redis-server` processes do not slow the other checker runs, whose
//! reconnection bounds are timed.

use std::time::Duration;

use support::CheckerConfig;

/// The checker on a Redis Cluster (three masters, a replica each): a master
/// killed and taken over by its replica, restarted empty, and a manual
/// failover of another master, under the same workload and feed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_no_stale_reads_through_master_kills_and_failovers() {
    let report = support::run_printed(&CheckerConfig {
        cluster: true,
        duration: Duration::from_secs(12),
        ..CheckerConfig::default()
    })
    .await;
    assert!(
        report.faults.iter().any(|f| f.contains("took over"))
            && report.faults.iter().any(|f| f.contains("manual failover")),
        "both failovers happened: {:?}",
        report.faults
    );
    assert_eq!(report.recoveries_ms.len(), 2, "both were recovered from");
    assert_eq!(report.failed_calls, 0, "{}", report.to_json());
    assert_eq!(report.stale_reads, 0, "{}", report.to_json());
    report.assert_monitor_consistent();
    assert!(
        report.outside_window_max_ms <= 2_000,
        "an outside write stayed stale for {} ms: {}",
        report.outside_window_max_ms,
        report.to_json()
    );
}
