//! The consistency and fault checker (tests/support/checker.rs), about ten
//! seconds of it: EarnORM's `#[cached]` must show no stale read and no failed
//! call while Redis is killed, restarted, frozen, thawed and flushed under two
//! environments; the naive cache-aside on the same workload must be caught.

use std::time::Duration;

use support::{run_checker, CheckerConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_reads_or_failed_calls_under_faults_and_the_naive_cache_is_caught() {
    let config = CheckerConfig {
        duration: Duration::from_secs(8),
        ..CheckerConfig::default()
    };
    let report = run_checker(&config).await;
    println!("{}", report.summary());
    println!("{}", report.to_json());
    assert!(
        report.reads > 1000 && report.writes > 100,
        "the workload ran: {}",
        report.summary()
    );
    assert!(
        report.hits > 0 && report.fallbacks > 0,
        "both hits and fallbacks happened: {}",
        report.summary()
    );
    assert_eq!(report.failed_calls, 0, "{}", report.to_json());
    assert_eq!(report.stale_reads, 0, "{}", report.to_json());
    assert_eq!(report.recoveries_ms.len(), 3, "every return of Redis was observed");
    // Reconnection within one interval (two with slack for a loaded machine);
    // hits again after the quarantine (one more interval plus the connect
    // timeout of 100 ms and the operation timeout of 300 ms).
    let interval = report.health_check_interval_ms;
    assert!(
        report.max_reconnect_ms() <= 2 * interval,
        "reconnection took {} ms",
        report.max_reconnect_ms()
    );
    let bound = 2 * interval + 100 + 300 + 500;
    assert!(
        report.max_recovery_ms() <= bound,
        "recovery took {} ms (bound {bound})",
        report.max_recovery_ms()
    );
    // No call waits much longer than the operation timeout (300 ms).
    assert!(report.max_us < 1_500_000, "a call took {} us", report.max_us);

    let naive = run_checker(&CheckerConfig {
        naive: true,
        duration: Duration::from_secs(4),
        ..config
    })
    .await;
    println!("{}", naive.summary());
    assert!(
        naive.stale_reads > 0,
        "the checker must catch the naive cache: {}",
        naive.to_json()
    );
}
