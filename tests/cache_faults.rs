//! The cache under failure: Redis killed, absent, frozen, restarted; bad
//! values; password redaction. Each test runs its own redis-server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use earnorm_cache::{CacheConfig, CacheKey, CacheManager, ConnectionStatus, PlainOutput, Scope};
use support::{fast_cache_config, free_port, unique_name, RedisServer};

/// Fast reconnection settings for tests, with a fresh prefix.
fn config(operation_timeout: Duration) -> CacheConfig {
    CacheConfig {
        operation_timeout,
        ..fast_cache_config(&unique_name("faults"))
    }
}

/// One cached call on `name`, returning (value, whether it computed, elapsed).
async fn call(cache: &CacheManager, name: &str, value: u64) -> (u64, bool, Duration) {
    let key = cache.key("faults", name).build().expect("key");
    let computed = AtomicUsize::new(0);
    let start = Instant::now();
    let got = cache
        .get_or_compute::<_, PlainOutput, _>(&key, None, async {
            computed.fetch_add(1, Ordering::SeqCst);
            value
        })
        .await;
    (got, computed.load(Ordering::SeqCst) == 1, start.elapsed())
}

/// A private Redis, a manager on it, and the key of user `id`'s profile.
async fn private_cache(id: &str, timeout: Duration) -> (RedisServer, CacheManager, CacheKey) {
    let redis = RedisServer::start();
    let cache = CacheManager::connect(Some(&redis.url()), config(timeout))
        .await
        .expect("connect");
    let key = cache
        .key("users", "profile")
        .scope(Scope::Record("users", id))
        .build()
        .expect("key");
    (redis, cache, key)
}

/// The value under `key`, or `v` computed and stored.
async fn get_or(cache: &CacheManager, key: &CacheKey, v: u64) -> u64 {
    cache
        .get_or_compute::<_, PlainOutput, _>(key, None, async move { v })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_redis_costs_a_bounded_delay_and_caching_resumes_after_restart() {
    let mut redis = RedisServer::start();
    let timeout = Duration::from_millis(500);
    let cache = CacheManager::connect(Some(&redis.url()), config(timeout))
        .await
        .expect("connect");
    assert_eq!(cache.status(), ConnectionStatus::Connected);

    assert_eq!(call(&cache, "a", 1).await.0, 1);
    let (v, computed, _) = call(&cache, "a", 99).await;
    assert_eq!((v, computed), (1, false), "second call is a hit");

    redis.kill();
    // Every call still returns the right value, none waits past the timeout.
    for i in 0..20 {
        let (v, computed, elapsed) = call(&cache, "a", 7).await;
        assert_eq!((v, computed), (7, true), "call {i} computes while Redis is dead");
        assert!(
            elapsed < timeout + Duration::from_millis(500),
            "call {i} took {elapsed:?}"
        );
    }
    assert_eq!(cache.status(), ConnectionStatus::Down);
    // Known down: calls skip Redis without waiting for a timeout.
    for _ in 0..20 {
        let (_, _, elapsed) = call(&cache, "a", 7).await;
        assert!(
            elapsed < timeout / 2,
            "a call while Redis is known down took {elapsed:?}"
        );
    }
    assert!(cache.stats().fallbacks >= 20);

    redis.restart();
    let restarted = Instant::now();
    // No user call needed: the supervisor reattaches on its own.
    assert!(
        cache
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
            .await,
        "reconnected"
    );
    let took = restarted.elapsed();
    // Reconnection within an interval, then the quarantine: the interval
    // (larger than any back-off step here), the connect and operation
    // timeouts.
    let config = cache.config();
    let bound = 2 * config.health_check_interval + config.connect_timeout + config.operation_timeout;
    assert!(took < bound + Duration::from_millis(700), "recovery took {took:?}");
    let (v, computed, _) = call(&cache, "b", 3).await;
    assert_eq!((v, computed), (3, true));
    let (v, computed, _) = call(&cache, "b", 4).await;
    assert_eq!((v, computed), (3, false), "caching resumed");
    assert!(cache.stats().reconnects >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absent_redis_at_start_is_not_an_error_and_is_attached_later() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let cache = CacheManager::connect(Some(&url), config(Duration::from_millis(300)))
        .await
        .expect("construction succeeds");
    assert_eq!(cache.status(), ConnectionStatus::Down);
    let (v, computed, _) = call(&cache, "x", 5).await;
    assert_eq!((v, computed), (5, true));

    let _redis = RedisServer::start_on(port, &[]);
    assert!(
        cache
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
            .await,
        "attached when Redis appeared"
    );
    call(&cache, "x", 6).await;
    let (v, computed, _) = call(&cache, "x", 7).await;
    assert_eq!((v, computed), (6, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_bounds_every_call_and_recovers_after_thaw() {
    let mut redis = RedisServer::start();
    let timeout = Duration::from_millis(300);
    let cache = CacheManager::connect(Some(&redis.url()), config(timeout))
        .await
        .expect("connect");
    call(&cache, "f", 1).await;

    redis.freeze();
    for i in 0..10 {
        let (v, computed, elapsed) = call(&cache, "f", 2).await;
        assert_eq!((v, computed), (2, true), "call {i} returns the computed value");
        assert!(
            elapsed < timeout + Duration::from_millis(500),
            "call {i} took {elapsed:?}"
        );
    }
    assert_ne!(cache.status(), ConnectionStatus::Connected);
    redis.thaw();
    assert!(
        cache
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
            .await,
        "recovered after thaw"
    );
    let (v, computed, _) = call(&cache, "f", 3).await;
    assert_eq!(
        (v, computed),
        (1, false),
        "the value stored before the freeze is still current"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_sent_while_frozen_is_replayed_before_caching_resumes() {
    let (mut redis, cache, key) = private_cache("1", Duration::from_millis(300)).await;
    assert_eq!(get_or(&cache, &key, 1).await, 1);
    assert_eq!(get_or(&cache, &key, 2).await, 1);

    redis.freeze();
    cache.invalidate(&[Scope::Record("users", "1")]).await;
    // A second connection (another process) must not see a stale value either
    // once Redis is back, because the replay happens before anyone reads.
    assert!(cache.stats().invalidations_deferred >= 1);
    redis.thaw();
    assert!(
        cache
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
            .await
    );
    assert_eq!(
        get_or(&cache, &key, 3).await,
        3,
        "the value made stale during the outage is not served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_truncated_and_foreign_values_are_misses_and_are_replaced() {
    let redis = RedisServer::start();
    let cache = CacheManager::connect(Some(&redis.url()), config(Duration::from_millis(500)))
        .await
        .expect("connect");
    let key = cache.key("bad", "value").build().expect("key");
    let compute = |v: String| {
        let cache = cache.clone();
        let key = key.clone();
        async move {
            cache
                .get_or_compute::<_, PlainOutput, _>(&key, None, async move { v })
                .await
        }
    };
    assert_eq!(compute("good".into()).await, "good");
    let stored = redis.cli(&["GET", key.as_str()]);
    assert!(!stored.is_empty());

    let bad_values: [&[u8]; 4] = [b"\x80\x04\x95pickle", b"{\"json\": true}", b"\xEEO\x01", b""];
    for (i, bad) in bad_values.iter().enumerate() {
        let mut conn = redis::Client::open(redis.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        redis::cmd("SET")
            .arg(key.as_str())
            .arg(*bad)
            .query_async::<()>(&mut conn)
            .await
            .expect("write garbage");
        let before = cache.stats().decode_errors;
        let fresh = format!("fresh{i}");
        assert_eq!(compute(fresh.clone()).await, fresh, "garbage {i} is a miss");
        assert_eq!(cache.stats().decode_errors, before + 1, "garbage {i} is counted");
        assert_eq!(
            compute("other".into()).await,
            fresh,
            "garbage {i} was replaced by the fresh value"
        );
    }
    // A value of another type under the key: decodes as a miss too.
    let typed = cache.key("bad", "value").build().expect("key");
    let n: u64 = cache
        .get_or_compute::<_, PlainOutput, _>(&typed, None, async { 11 })
        .await;
    assert_eq!(n, 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_compute_once() {
    let redis = RedisServer::start();
    let cache = CacheManager::connect(Some(&redis.url()), config(Duration::from_secs(2)))
        .await
        .expect("connect");
    let key = cache.key("stampede", "cold").build().expect("key");
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let (cache, key, runs) = (cache.clone(), key.clone(), Arc::clone(&runs));
        tasks.push(tokio::spawn(async move {
            cache
                .get_or_compute::<_, PlainOutput, _>(&key, None, async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    42u32
                })
                .await
        }));
    }
    for task in tasks {
        assert_eq!(task.await.expect("task"), 42);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one computation for 1000 callers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_restarts_from_an_old_snapshot_serves_nothing_stale() {
    let (mut redis, cache, key) = private_cache("9", Duration::from_millis(500)).await;
    assert_eq!(get_or(&cache, &key, 1).await, 1);
    assert_eq!(
        redis.cli(&["SAVE"]),
        "OK",
        "snapshot holding the value and its generations"
    );
    cache.invalidate(&[Scope::Record("users", "9")]).await; // acknowledged, not in the snapshot
    assert_eq!(get_or(&cache, &key, 2).await, 2);

    redis.kill();
    assert!(cache.ping().await.is_err(), "the manager notices the crash");
    assert_eq!(cache.status(), ConnectionStatus::Down);
    redis.restart(); // reloads the old snapshot
    assert_ne!(redis.cli(&["DBSIZE"]), "0", "the snapshot was reloaded");
    assert!(
        cache
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
            .await
    );
    assert_eq!(
        get_or(&cache, &key, 3).await,
        3,
        "the value from the old snapshot is not served"
    );
}
