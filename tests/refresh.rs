//! Refresh ahead: `#[cached(ttl = 2, refresh = 1)]` keeps a hot key served
//! across its TTL boundary (no reader sees a miss), and each refresh runs the
//! body once, across two environments sharing the cache.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use earnorm::Environment;
use serde::{Deserialize, Serialize};
use support::{connect, test_config};

static RUNS: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "dashboards")]
struct Dashboard {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
}

impl Dashboard {
    /// An expensive figure, cached 2 s and refreshed in its last second.
    #[cached(ttl = 2, refresh = 1)]
    async fn headline() -> Result<u64, String> {
        let run = RUNS.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(run)
    }
}

fn named(env: &Environment) -> (u64, u64, u64, u64) {
    let namespace = env.model_scope("dashboards");
    env.cache()
        .stats_by_name()
        .into_iter()
        .find(|s| s.namespace == namespace && s.name == "headline")
        .map_or((0, 0, 0, 0), |s| (s.hits, s.misses, s.refreshes, s.fallbacks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_refreshed_ahead_of_its_expiry_and_never_missed() {
    let config = test_config("refresh");
    let envs = [connect(config.clone()).await, connect(config).await];
    assert_eq!(
        envs[0].scope(Dashboard::headline()).await,
        Ok(1),
        "the first call computes"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..64 {
        let (env, stop) = (envs[r % 2].clone(), Arc::clone(&stop));
        readers.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            let mut calls = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let start = Instant::now();
                let value = env.scope(Dashboard::headline()).await.expect("a value");
                assert!(value >= 1);
                slowest = slowest.max(start.elapsed());
                calls += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (calls, slowest)
        }));
    }
    // Across three TTL boundaries.
    tokio::time::sleep(Duration::from_millis(6500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut calls = 0;
    for reader in readers {
        calls += reader.await.expect("reader").0;
    }
    let (a, b) = (named(&envs[0]), named(&envs[1]));
    let (hits, misses, refreshes, fallbacks) = (a.0 + b.0, a.1 + b.1, a.2 + b.2, a.3 + b.3);
    let runs = RUNS.load(Ordering::SeqCst);
    println!(
        "{calls} calls by 64 readers over 6.5 s: {hits} hits, {misses} misses, {refreshes} refreshes, {fallbacks} fallbacks; the body ran {runs} times"
    );
    assert_eq!(misses, 1, "only the very first call missed");
    assert_eq!(fallbacks, 0);
    assert!(refreshes >= 3, "refreshed at least once per TTL");
    assert_eq!(runs, 1 + refreshes, "each refresh ran the body once");
    // A refresh every second or so (each resets the TTL to 2 s, and the
    // window opens 1 s later): one per window across both environments,
    // not one per reader or per environment.
    assert!(
        refreshes <= 8,
        "one refresh per window across both environments: {refreshes}"
    );
    let _ = envs[0].database().drop().await;
}

static EMBEDDED_RUNS: AtomicU64 = AtomicU64::new(0);

impl Dashboard {
    /// [`Dashboard::headline`], for the environment without Redis.
    #[cached(ttl = 2, refresh = 1)]
    async fn local_headline() -> Result<u64, String> {
        let run = EMBEDDED_RUNS.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(run)
    }
}

/// Without Redis, a value kept in process is refreshed ahead in process:
/// by the caller that takes it, the others served the current value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_a_hot_key_is_refreshed_ahead_in_process() {
    let mut config = test_config("refresh_embedded");
    config.redis_uri = None;
    let env = connect(config).await;
    let calls = read_for(16, &env, |_, env| async move {
        assert!(env.scope(Dashboard::local_headline()).await.expect("a value") >= 1);
    })
    .await;
    let namespace = env.model_scope("dashboards");
    let stats = env
        .cache()
        .stats_by_name()
        .into_iter()
        .find(|s| s.namespace == namespace && s.name == "local_headline")
        .expect("stats");
    let runs = EMBEDDED_RUNS.load(Ordering::SeqCst);
    println!(
        "{calls} calls by 16 readers over 4.5 s without Redis: {} hits, {} misses, {} refreshes; the body ran {runs} times",
        stats.hits, stats.misses, stats.refreshes
    );
    assert_eq!(stats.misses, 1, "only the very first call missed");
    assert!(stats.refreshes >= 2, "refreshed ahead of each expiry");
    assert_eq!(runs, 1 + stats.refreshes, "each refresh ran the body once");
    let _ = env.database().drop().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "hot_records", cache(ttl = 2, refresh = 1))]
struct HotRecord {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    n: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_cache_refreshes_in_the_background_and_every_reader_gets_a_hit() {
    // With the in-process tier on beside Redis too: a value kept in process
    // must not outlive the start of its refresh window, or its expiry is a
    // miss for every reader. And without Redis: refreshed in process.
    for (tier, redis) in [(false, true), (true, true), (true, false)] {
        record_cache_refreshes_in_the_background(tier, redis).await;
    }
}

async fn record_cache_refreshes_in_the_background(tier: bool, redis: bool) {
    let mut config = test_config(match (tier, redis) {
        (_, false) => "refresh_record_embedded",
        (true, true) => "refresh_record_tier",
        (false, true) => "refresh_record",
    });
    if !redis {
        config.redis_uri = None;
    }
    config.cache_config.local = earnorm::LocalConfig {
        capacity: 1_000,
        with_redis: tier,
    };
    let (env, finds) = support::counting_env_with(config, "find").await;
    let mut record = HotRecord { id: None, n: 7 };
    record.save().in_env(&env).await.expect("save");
    let id = record.id.expect("id");
    finds.store(0, Ordering::SeqCst);
    HotRecord::find_by_id(id).in_env(&env).await.expect("the first read");

    let calls = read_for(32, &env, move |reader, env| async move {
        // Half the readers read in batches (of one), which never refresh,
        // and must not hide the window from the others.
        let found = if reader % 2 == 1 {
            HotRecord::find_many_by_ids(&[id])
                .in_env(&env)
                .await
                .expect("read")
                .pop()
        } else {
            HotRecord::find_by_id(id).in_env(&env).await.expect("read")
        }
        .expect("exists");
        assert_eq!(found.n, 7);
    })
    .await;
    // Let a refresh that is under way finish.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let namespace = env.model_scope("hot_records");
    let stats = env
        .cache()
        .stats_by_name()
        .into_iter()
        .find(|s| s.namespace == namespace && s.name == "record")
        .expect("stats");
    let reads = finds.load(Ordering::SeqCst);
    println!(
        "tier {tier}, Redis {redis}: {calls} reads by 32 readers over 4.5 s: {} hits ({} in process), {} misses, {} refreshes in the background; {reads} MongoDB finds",
        stats.hits, stats.local_hits, stats.misses, stats.refreshes
    );
    assert_eq!(stats.misses, 1, "only the first read missed");
    assert_eq!(stats.hits, calls, "every reader's call was a hit");
    assert!(stats.refreshes >= 2, "refreshed ahead of each expiry");
    assert_eq!(
        reads,
        1 + stats.refreshes,
        "MongoDB was read once per refresh, by the background task"
    );
    let _ = env.database().drop().await;
}

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "sparse_records", cache(ttl = 300, missing = 5, refresh = 60))]
struct SparseRecord {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
}

/// Bug: with `missing` shorter than `refresh`, a negative entry was always
/// within its refresh window, so every hit on an absent id read MongoDB
/// again (465 refreshes in 466 lookups). An entry that lives no longer than
/// `refresh` is refreshed in the last fifth of its own lifetime.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_entry_shorter_than_the_refresh_window_is_not_refreshed_at_every_hit() {
    let (env, finds) = support::counting_env("refresh_missing", "find").await;
    let absent = ObjectId::new();
    for _ in 0..100 {
        assert!(SparseRecord::find_by_id(absent)
            .in_env(&env)
            .await
            .expect("read")
            .is_none());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let reads = finds.load(Ordering::SeqCst);
    assert!(reads <= 2, "{reads} MongoDB reads for 100 lookups of an absent id");
    let _ = env.database().drop().await;
}

/// Runs `readers` tasks, each calling `read` (with its number and `env`)
/// every 5 ms for 4.5 s; returns how many calls they made.
async fn read_for<F, Fut>(readers: usize, env: &Environment, read: F) -> u64
where
    F: Fn(usize, Environment) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for reader in 0..readers {
        let (env, stop, read) = (env.clone(), Arc::clone(&stop), read.clone());
        tasks.push(tokio::spawn(async move {
            let mut calls = 0u64;
            while !stop.load(Ordering::SeqCst) {
                read(reader, env.clone()).await;
                calls += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            calls
        }));
    }
    tokio::time::sleep(Duration::from_millis(4500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut calls = 0;
    for task in tasks {
        calls += task.await.expect("reader");
    }
    calls
}
