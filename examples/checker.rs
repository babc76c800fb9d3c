//! The consistency and fault checker as a command:
//!
//! ```sh
//! scripts/services.sh up
//! cargo run --release --example checker -- --seconds 30            # EarnORM's #[cached]
//! cargo run --release --example checker -- --seconds 30 --naive    # plain cache-aside
//! ```
//!
//! Options: `--seconds N` (default 10), `--records N` (8), `--readers N` (8),
//! `--writers N` (2, through EarnORM), `--outside-writers N` (1, raw driver),
//! `--no-feed` (no database feed, and no crash writer process), `--no-faults`, `--naive`,
//! `--two-tier` (both environments keep values in process beside Redis), `--no-bulk` (the
//! EarnORM writers save and delete single records only), `--cluster` (a private Redis
//! Cluster of three masters with a replica each, instead of one server: a master killed
//! and taken over by its replica, restarted, and a manual failover), `--seed N`,
//! `--health-check-ms N` (500), `--json PATH` (also write the report there).
//! Prints a one-line summary and the JSON report; exits 1 when it finds a
//! stale read of an EarnORM write or a failed call (reads stale against
//! writes only the feed invalidates are reported as a window, not failed).

use std::time::Duration;

use support::{crash_writer_child, run_checker, CheckerConfig, ChildCommand};

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&e.to_string()));
    // Started again by itself as the crash writer process.
    if runtime.block_on(crash_writer_child()) {
        return;
    }
    let mut config = CheckerConfig {
        crash_writer: std::env::current_exe().ok().map(|program| ChildCommand {
            program,
            args: Vec::new(),
        }),
        ..CheckerConfig::default()
    };
    let mut json_path = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| fail(&format!("{name} needs a whole number")))
        };
        match arg.as_str() {
            "--seconds" => config.duration = Duration::from_secs(number("--seconds")),
            "--records" => config.records = usize::try_from(number("--records")).unwrap_or(8).max(1),
            "--readers" => config.readers = usize::try_from(number("--readers")).unwrap_or(8),
            "--writers" => config.writers = usize::try_from(number("--writers")).unwrap_or(2),
            "--outside-writers" => {
                config.outside_writers = usize::try_from(number("--outside-writers")).unwrap_or(1);
            }
            "--no-feed" => config.feed = false,
            "--seed" => config.seed = number("--seed"),
            "--health-check-ms" => config.health_check_interval = Duration::from_millis(number("--health-check-ms")),
            "--no-faults" => config.faults = false,
            "--naive" => config.naive = true,
            "--two-tier" => config.local = true,
            "--no-bulk" => config.bulk_writes = false,
            "--cluster" => config.cluster = true,
            "--json" => json_path = Some(args.next().unwrap_or_else(|| fail("--json needs a path"))),
            other => fail(&format!("unknown option {other}")),
        }
    }
    let report = runtime.block_on(run_checker(&config));
    println!("{}", report.summary());
    println!("{}", report.to_json());
    if let Some(path) = json_path {
        std::fs::write(&path, report.to_json()).unwrap_or_else(|e| fail(&format!("cannot write {path}: {e}")));
    }
    if report.stale_reads > 0 || report.failed_calls > 0 {
        std::process::exit(1);
    }
}

fn fail(message: &str) -> ! {
    eprintln!("checker: {message}");
    std::process::exit(2)
}
