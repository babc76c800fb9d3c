//! The Prometheus example (`examples/prometheus.rs`), scraped over HTTP:
//! the counters move with cached calls and writes. Alone in its test binary,
//! since a process has one `metrics` recorder.

#[path = "../examples/prometheus.rs"]
#[allow(dead_code)]
mod prometheus;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// GET /metrics over a plain TCP connection.
async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut socket = TcpStream::connect(addr).await.expect("connect to the exporter");
    socket
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("request");
    let mut response = String::new();
    socket.read_to_string(&mut response).await.expect("response");
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    response
}

/// The value of the sample whose name and labels contain all of `parts`.
fn sample(text: &str, parts: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| parts.iter().all(|part| line.contains(part)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0.0)
}

/// A test environment with the consistency monitor as the example runs it.
async fn monitored_env(tag: &str) -> earnorm::Environment {
    let mut config = support::test_config(tag);
    config.cache_config.monitor = prometheus::monitor();
    support::connect(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prometheus_example_shows_the_counters_moving() {
    let handle = prometheus::install_recorder();
    let env = monitored_env("metrics").await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(prometheus::serve(listener, handle));
    let model = "model=\"users\"".to_owned();

    prometheus::workload(&env).await.expect("workload");
    let first = scrape(addr).await;
    let hits = |text: &str| sample(text, &["earnorm_cache_hits_total{", &model, "method=\"record\""]);
    let misses = |text: &str| sample(text, &["earnorm_cache_misses_total{", &model, "method=\"record\""]);
    let writes = |text: &str| sample(text, &["earnorm_cache_invalidations_total{", "source=\"write\""]);
    let counted = |text: &str| sample(text, &["earnorm_cache_hits_total{", &model, "method=\"count\""]);
    assert_eq!((hits(&first), misses(&first)), (1.0, 1.0), "{first}");
    assert_eq!(counted(&first), 1.0, "the cached count hit once: {first}");
    assert!(
        writes(&first) >= 2.0,
        "the save and the bulk update invalidated: {first}"
    );
    assert!(
        first.contains("earnorm_cache_call_seconds") && first.contains("outcome=\"hit\""),
        "call durations by outcome: {first}"
    );
    assert!(
        first
            .lines()
            .any(|l| l.starts_with("earnorm_cache_status{") && l.contains("status=\"connected\"") && l.ends_with(" 1")),
        "the connection status gauge: {first}"
    );
    for line in first.lines().filter(|l| l.starts_with("earnorm_")) {
        assert!(
            !line.contains("redis://") && !line.contains("mongodb://"),
            "no address in a label: {line}"
        );
    }

    prometheus::workload(&env).await.expect("workload");
    // The consistency monitor's checks run a delay after each write.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let second = scrape(addr).await;
    assert_eq!((hits(&second), misses(&second)), (2.0, 2.0), "{second}");
    assert!(writes(&second) >= writes(&first) + 2.0);
    let checked = sample(&second, &["earnorm_cache_monitor_checked_total{", &model]);
    assert!(checked >= 4.0, "both rounds' writes checked: {second}");
    assert_eq!(
        sample(&second, &["earnorm_cache_monitor_inconsistent_total{"]),
        0.0,
        "none inconsistent: {second}"
    );
    let nines = sample(&second, &["earnorm_cache_monitor_nines{", "window=\"1m\""]);
    assert!(
        (nines - (checked + 1.0).log10()).abs() < 1e-9,
        "the nines of the last minute, none inconsistent: log10(checked + 1): {second}"
    );

    // Bug: the `model` label was `DATABASE.COLLECTION`, so every database
    // (tenant) added its own series. Another database's environment adds
    // to the same ones.
    let series = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("earnorm_cache_") && l.contains("model="))
            .map(|l| l.rsplit_once(' ').map_or(l, |(series, _)| series).to_owned())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let tenant = monitored_env("metrics_tenant").await;
    prometheus::workload(&tenant).await.expect("workload");
    let third = scrape(addr).await;
    assert_eq!(series(&third), series(&second), "no new series for another database");
    assert!(
        !third
            .lines()
            .any(|l| l.contains("model=") && l.contains(tenant.database().name())),
        "no database name in a model's labels"
    );
    assert_eq!(hits(&third), 3.0, "the two databases add up: {third}");
    let _ = tenant.database().drop().await;
    let _ = env.database().drop().await;
}
