//! The consistency monitor (`CacheConfig::monitor`): with every write
//! sampled, each write's scopes are checked a little after its
//! invalidation, and none is found inconsistent when invalidations work;
//! the report's windows and nines follow. (A build whose writes skip their
//! invalidation is caught in `tests/monitor_broken.rs`.)

use std::time::{Duration, Instant};

use earnorm::bson::oid::ObjectId;
use earnorm::cache_layer::{MonitorConfig, MonitorReport};
use earnorm::prelude::*;
use earnorm::{Config, Environment};
use serde::{Deserialize, Serialize};
use support::{connect, test_config};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "monitored_books", cache(ttl = 300))]
struct Book {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    title: String,
    copies: i64,
}

/// A config with the monitor checking every write.
fn monitored(tag: &str) -> Config {
    let mut config = test_config(tag);
    config.cache_config.monitor = MonitorConfig {
        enabled: true,
        sample_one_in: 1,
        ..MonitorConfig::default()
    };
    config
}

/// The monitor's report once `checks` checks are done.
async fn after_checks(env: &Environment, checks: u64) -> MonitorReport {
    let start = Instant::now();
    loop {
        let report = env.cache().monitor_report().expect("the monitor is on");
        if report.checked >= checks {
            return report;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{checks} checks done: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_is_checked_and_none_is_inconsistent_when_invalidations_work() {
    writes_checked(monitored("monitor")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_in_process_tier_beside_redis_none_is_inconsistent_either() {
    let mut config = monitored("monitor_tier");
    config.cache_config.local.with_redis = true;
    writes_checked(config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_in_process_tier_is_checked() {
    let mut config = monitored("monitor_embedded");
    config.redis_uri = None;
    writes_checked(config).await;
}

/// Saves and reads records through `config`'s environment, then checks
/// that every write was checked and none found inconsistent.
async fn writes_checked(config: Config) {
    let env = connect(config).await;
    let mut books: Vec<Book> = (0..5)
        .map(|n| Book {
            id: None,
            title: format!("book {n}"),
            copies: n,
        })
        .collect();
    let mut writes = 0;
    for book in &mut books {
        book.save().in_env(&env).await.expect("insert");
        writes += 1;
    }
    for round in 0..3 {
        for book in &mut books {
            let id = book.id.expect("id");
            let read = Book::find_by_id(id).in_env(&env).await.expect("find").expect("found");
            assert_eq!(read.copies, book.copies, "round {round}: fresh");
            book.copies += 10;
            book.save().in_env(&env).await.expect("save");
            writes += 1;
        }
    }
    let report = after_checks(&env, writes).await;
    assert_eq!(report.inconsistent, 0, "{report:?}");
    assert_eq!(report.repaired, 0);
    assert_eq!(report.skipped, 0, "Redis answered every check");
    assert_eq!(report.windows.len(), 3);
    for window in &report.windows {
        assert_eq!(window.checked, report.checked, "every check is recent: {window:?}");
        let nines = window.nines().expect("checks");
        #[allow(clippy::cast_precision_loss)]
        let none_found = (report.checked as f64 + 1.0).log10();
        assert!((nines - none_found).abs() < 1e-9, "log10(checked + 1) nines: {nines}");
    }
    // The monitor repaired nothing, and the reads are still served.
    let id = books[0].id.expect("id");
    let before = env.cache().stats().hits;
    Book::find_by_id(id).in_env(&env).await.expect("find");
    Book::find_by_id(id).in_env(&env).await.expect("find");
    assert!(env.cache().stats().hits > before, "cached as usual");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_monitor_is_off_by_default_and_samples_one_write_in_n() {
    let env = connect(test_config("monitor_off")).await;
    assert!(env.cache().monitor_report().is_none(), "off by default");

    let mut config = monitored("monitor_sampled");
    config.cache_config.monitor.sample_one_in = 4;
    let env = connect(config).await;
    let mut book = Book {
        id: None,
        title: "sampled".into(),
        copies: 0,
    };
    for copies in 0..8 {
        book.copies = copies;
        book.save().in_env(&env).await.expect("save");
    }
    let report = after_checks(&env, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report_later = env.cache().monitor_report().expect("on");
    assert_eq!(report_later.checked, 2, "one write in four: {report:?}");
    assert_eq!(report_later.inconsistent, 0);
}

/// The key of a plain cache-aside of `id`'s copies, in the record's scope.
fn copies_key(env: &Environment, id: ObjectId) -> earnorm::cache_layer::CacheKey {
    let model = env.model_scope("monitored_books");
    let hex = id.to_hex();
    env.cache()
        .key(&model, "copies")
        .scope(earnorm::cache_layer::Scope::Record(&model, &hex))
        .arg(&hex)
        .and_then(earnorm::cache_layer::KeyBuilder::build)
        .expect("key")
}

/// A plain `get` that misses, a read of the record's copies bypassing the
/// cache, then `between`, then a plain `set` of what `between` returns:
/// all in one task. Returns the monitor's report once the writes made
/// (`checks` of them) are checked.
async fn plain_cache_aside<F>(env: &Environment, id: ObjectId, checks: u64, between: F) -> MonitorReport
where
    F: std::future::Future<Output = i64> + Send + 'static,
{
    let (task_env, key) = (env.clone(), copies_key(env, id));
    tokio::spawn(async move {
        let cache = task_env.cache();
        assert_eq!(cache.get::<i64>(&key).await.expect("get"), None);
        let read = earnorm::bypass_cache(Book::find_by_id(id).in_env(&task_env))
            .await
            .expect("find")
            .expect("found");
        assert!(read.copies >= 0);
        let stored = between.await;
        cache.set(&key, &stored, None).await.expect("set");
    })
    .await
    .expect("the cache-aside");
    after_checks(env, checks).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_set_of_what_the_task_itself_wrote_is_not_reported() {
    let env = connect(monitored("monitor_write_through")).await;
    let mut book = Book {
        id: None,
        title: "Persuasion".into(),
        copies: 1,
    };
    book.save().in_env(&env).await.expect("insert");
    let id = book.id.expect("id");
    let writer = env.clone();
    // Write-through: the task writes, then stores what it wrote. Its read
    // before the write must not judge that value.
    let report = plain_cache_aside(&env, id, 2, async move {
        book.copies = 2;
        book.save().in_env(&writer).await.expect("save");
        book.copies
    })
    .await;
    // The check of the save runs after the store: wait it out.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = env.cache().monitor_report().unwrap_or(report);
    assert_eq!(report.inconsistent, 0, "{report:?}");
    assert_eq!(
        env.cache().get::<i64>(&copies_key(&env, id)).await.expect("get"),
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_monitor_of_the_users_is_kept_and_reads_are_still_timed() {
    let events = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = std::sync::Arc::clone(&events);
    let env = match Environment::connect_with(monitored("monitor_theirs"), move |options| {
        options.command_event_handler = Some(earnorm::mongodb::event::EventHandler::callback(move |_| {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }));
    })
    .await
    {
        Ok(env) => env,
        Err(err) => panic!("{err}: {}", support::HOW_TO_START),
    };
    let mut book = Book {
        id: None,
        title: "Emma".into(),
        copies: 1,
    };
    book.save().in_env(&env).await.expect("insert");
    let id = book.id.expect("id");
    // Another task writes between the read and the store: the plain `set`
    // stores the stale copies under the generations that followed.
    let writer = env.clone();
    let report = plain_cache_aside(&env, id, 2, async move {
        let mut newer = book.clone();
        newer.copies = 2;
        tokio::spawn(async move { newer.save().in_env(&writer).await.expect("save") })
            .await
            .expect("the writer");
        book.copies
    })
    .await;
    let start = Instant::now();
    let mut report = report;
    while report.inconsistent == 0 && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        report = env.cache().monitor_report().expect("on");
    }
    assert_eq!(report.inconsistent, 1, "the stale store found: {report:?}");
    assert_eq!(
        env.cache().get::<i64>(&copies_key(&env, id)).await.expect("get"),
        None,
        "and removed"
    );
    assert!(
        events.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "the user's command monitor still gets the driver's events"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_set_in_another_process_is_found_by_the_writers_check() {
    // Two environments of one prefix, as two processes: the writer's
    // monitor checks its write; the stale value is the reader's.
    let mut config = monitored("monitor_two_processes");
    config.cache_config.monitor.delay = Duration::from_millis(500);
    let (writer, reader) = (connect(config.clone()).await, connect(config).await);
    let mut book = Book {
        id: None,
        title: "Mansfield Park".into(),
        copies: 1,
    };
    book.save().in_env(&writer).await.expect("insert");
    let id = book.id.expect("id");
    let writing = writer.clone();
    plain_cache_aside(&reader, id, 0, async move {
        let mut newer = book.clone();
        newer.copies = 2;
        tokio::spawn(async move { newer.save().in_env(&writing).await.expect("save") })
            .await
            .expect("the writer");
        book.copies
    })
    .await;
    let key = copies_key(&reader, id);
    assert_eq!(
        reader.cache().get::<i64>(&key).await.expect("get"),
        Some(1),
        "the reader's plain set serves what the write made stale"
    );
    let start = Instant::now();
    let report = loop {
        let report = writer.cache().monitor_report().expect("on");
        if report.inconsistent > 0 {
            break report;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the writer's check finds the reader's value: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(report.inconsistent, 1, "{report:?}");
    assert_eq!(reader.cache().get::<i64>(&key).await.expect("get"), None, "removed");
}
