//! The consistency monitor catches a deliberately broken build: while
//! `earnorm::__private::WRITE_INVALIDATIONS_SKIPPED` is set, ORM writes
//! skip their invalidation, and the record cache serves what they made
//! stale. The monitor finds the generation the write did not replace,
//! reports it (with the model and the write, never the record's id), and
//! repairs it, after which the fresh record is read. In its own test binary:
//! the switch is process-wide, and the log capture is a global subscriber.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use earnorm::bson::oid::ObjectId;
use earnorm::cache_layer::MonitorConfig;
use earnorm::cache_layer::Scope;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};
use support::{connect, test_config, CapturedLogs};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "monitored_broken", cache(ttl = 300))]
struct Book {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    title: String,
    copies: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_invalidation_is_skipped_is_found_reported_and_repaired() {
    let captured = CapturedLogs::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");

    // In Redis, then in the in-process tier of a manager without Redis (one
    // after the other: the switch is process-wide).
    let hex = broken_write(test_config("monitor_broken"), "redis").await;
    let mut embedded = test_config("monitor_broken_embedded");
    embedded.redis_uri = None;
    let embedded_hex = broken_write(embedded, "in-process tier").await;

    // A naive cache-aside (a plain `get`, a database read, a plain `set`)
    // whose store lands after a write's invalidation.
    let naive_hex = naive_store(test_config("monitor_naive")).await;

    let logs = captured.text();
    let (late, logs): (Vec<&str>, Vec<&str>) = logs
        .lines()
        .filter(|l| l.contains("consistency monitor"))
        .partition(|l| l.contains("read before a write"));
    assert_eq!(late.len(), 1, "the naive store reported once: {late:?}");
    for needed in [
        "monitor_naive",
        "key_name=\"copies\"",
        "source=\"feed\"",
        "read_at=",
        "write_at=",
        "stored_at_ms=",
    ] {
        assert!(late[0].contains(needed), "{needed} in {}", late[0]);
    }
    assert!(!late[0].contains(&naive_hex), "never the record's id: {}", late[0]);
    let logs = logs.join("\n");
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(lines.len(), 2, "each inconsistency reported once: {logs}");
    for (line, place) in lines.iter().zip(["redis", "in-process tier"]) {
        assert!(line.contains("monitored_broken"), "with the model: {line}");
        assert!(line.contains(place), "and where: {line}");
        assert!(
            line.contains("source=\"write\"") || line.contains("source=write"),
            "and the write: {line}"
        );
        assert!(line.contains("written_at_ms="), "{line}");
    }
    assert!(
        !logs.contains(&hex) && !logs.contains(&embedded_hex),
        "never the record's id: {logs}"
    );
}

/// Caches a record, saves it with its invalidation skipped, checks that
/// the stale value is served, then that the monitor finds, repairs and
/// counts it (in `place`). Returns the record's id.
async fn broken_write(mut config: earnorm::Config, place: &str) -> String {
    config.cache_config.monitor = MonitorConfig {
        enabled: true,
        sample_one_in: 1,
        // Long enough to read the stale value first.
        delay: Duration::from_millis(500),
    };
    let env = connect(config).await;
    let mut book = Book {
        id: None,
        title: "Dune".into(),
        copies: 3,
    };
    book.save().in_env(&env).await.expect("insert");
    let id = book.id.expect("id");
    assert_eq!(copies(&env, id).await, 3);

    earnorm::__private::WRITE_INVALIDATIONS_SKIPPED.store(true, Ordering::Relaxed);
    book.copies = 4;
    book.save().in_env(&env).await.expect("save");
    earnorm::__private::WRITE_INVALIDATIONS_SKIPPED.store(false, Ordering::Relaxed);
    assert_eq!(
        copies(&env, id).await,
        3,
        "{place}: the broken build serves the value its write made stale"
    );

    let report = found_and_repaired(&env, place).await;
    assert_eq!(
        report.inconsistent, 1,
        "{place}: the one broken write of two: {report:?}"
    );
    assert_eq!(report.checked, 2);
    assert!(report.windows[0]
        .nines()
        .is_some_and(|n| (n - 2f64.log10()).abs() < 1e-9));
    assert_eq!(copies(&env, id).await, 4, "{place}: healed, the fresh record is read");
    id.to_hex()
}

/// A plain cache-aside caught by the monitor: it reads a record, an
/// outside write (seen by the database feed alone) changes it, and the
/// plain `set` stores what was read after the feed's invalidation, under
/// the generations that followed the write: the stale value is served
/// until the monitor, which compares when the value was read with when
/// the record was written, finds and removes it. Returns the record's id.
async fn naive_store(mut config: earnorm::Config) -> String {
    config.feed = true;
    config.cache_config.monitor = MonitorConfig {
        enabled: true,
        sample_one_in: 1,
        // Long enough to store the stale value, and read it, first.
        delay: Duration::from_millis(1_500),
    };
    let env = connect(config).await;
    let books = env.database().collection::<earnorm::bson::Document>("monitored_broken");
    let id = ObjectId::new();
    books
        .insert_one(earnorm::bson::doc! { "_id": id, "title": "Emma", "copies": 1 })
        .await
        .expect("insert");
    assert!(env.wait_for_feed(Duration::from_secs(10)).await, "the feed follows");
    let cache = env.cache();
    let model = env.model_scope("monitored_broken");
    let hex = id.to_hex();
    let key = cache
        .key(&model, "copies")
        .scope(Scope::Record(&model, &hex))
        .arg(&hex)
        .and_then(earnorm::cache_layer::KeyBuilder::build)
        .expect("key");

    // The naive cache-aside, up to the store.
    assert_eq!(cache.get::<i64>(&key).await.expect("get"), None);
    let read = earnorm::bypass_cache(async { Book::find_by_id(id).in_env(&env).await })
        .await
        .expect("find")
        .expect("found");
    // A write lands meanwhile, and its invalidation.
    books
        .update_one(
            earnorm::bson::doc! { "_id": id },
            earnorm::bson::doc! { "$set": { "copies": 2 } },
        )
        .await
        .expect("update");
    assert!(
        env.wait_for_feed(Duration::from_secs(10)).await,
        "the feed invalidated it"
    );
    cache.set(&key, &read.copies, None).await.expect("the naive store");
    assert_eq!(
        cache.get::<i64>(&key).await.expect("get"),
        Some(1),
        "the naive store serves what the write made stale"
    );

    let report = found_and_repaired(&env, "redis").await;
    assert_eq!(
        report.inconsistent, 1,
        "the write read around, not the insert: {report:?}"
    );
    assert_eq!(cache.get::<i64>(&key).await.expect("get"), None, "healed: removed");
    hex
}

/// The monitor's report once it has found and repaired something (in
/// `place`, for the failure message).
async fn found_and_repaired(env: &earnorm::Environment, place: &str) -> earnorm::cache_layer::MonitorReport {
    let start = Instant::now();
    loop {
        let report = env.cache().monitor_report().expect("on");
        if report.inconsistent > 0 && report.repaired > 0 {
            return report;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{place}: found and repaired: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The copies of record `id`, read through the record cache.
async fn copies(env: &earnorm::Environment, id: ObjectId) -> i64 {
    Book::find_by_id(id)
        .in_env(env)
        .await
        .expect("find")
        .expect("found")
        .copies
}
