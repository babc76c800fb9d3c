//! Regression tests for the cache under faults: each test reproduces one way
//! the cache served stale values or stopped caching, on a private
//! `redis-server`, and fails without its fix.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use earnorm_cache::{CacheConfig, CacheError, CacheKey, CacheManager, ConnectionStatus, PlainOutput, Scope};
use support::{fast_cache_config, unique_name, RedisServer};

/// Fast reconnection settings for tests, with a fresh prefix.
fn config() -> CacheConfig {
    fast_cache_config(&unique_name("regr"))
}

async fn manager(redis: &RedisServer, config: CacheConfig) -> CacheManager {
    CacheManager::connect(Some(&redis.url()), config)
        .await
        .expect("connect")
}

fn record_key(cache: &CacheManager, model: &str, id: &str) -> CacheKey {
    cache
        .key(model, "profile")
        .scope(Scope::Record(model, id))
        .build()
        .expect("key")
}

/// The value under `key`, or `v` computed (and stored when the cache can).
async fn get_or(cache: &CacheManager, key: &CacheKey, v: u64) -> u64 {
    cache
        .get_or_compute::<_, PlainOutput, _>(key, None, async move { v })
        .await
}

/// Waits until `cache` serves a hit for a fresh probe key, or `limit` passes;
/// returns the time it took.
async fn until_serving(cache: &CacheManager, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        let key = cache.key("probe", &unique_name("serving")).build().expect("key");
        get_or(cache, &key, 1).await;
        if get_or(cache, &key, 2).await == 1 {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

async fn raw_connection(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

/// Fills Redis with 3 MB of foreign keys (without TTL), then sets
/// `maxmemory` below what it uses, so that it is over its limit from now on.
async fn fill_past_maxmemory(redis: &RedisServer) {
    let mut conn = raw_connection(redis).await;
    let blob = vec![b'x'; 64 * 1024];
    for i in 0..48 {
        let _: () = redis::cmd("SET")
            .arg(format!("foreign:fill:{i}"))
            .arg(&blob)
            .query_async(&mut conn)
            .await
            .expect("fill");
    }
    let limit = used_memory(redis).await - 256 * 1024;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(limit)
        .query_async(&mut conn)
        .await
        .expect("set maxmemory");
}

async fn used_memory(redis: &RedisServer) -> i64 {
    let mut conn = raw_connection(redis).await;
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .expect("info");
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("used_memory")
}

/// Bug: under `maxmemory` with `noeviction`, invalidations (plain `SET`s) were
/// refused, the writer went down for good, and the others served stale
/// values; the store script let writes through past the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_invalidations_still_apply_under_every_policy() {
    for policy in ["noeviction", "allkeys-lru", "volatile-lru"] {
        let redis = RedisServer::start_with(&["--maxmemory-policy", policy]);
        let config = config();
        let (writer, reader) = (manager(&redis, config.clone()).await, manager(&redis, config).await);
        let keys: Vec<CacheKey> = (0..20).map(|i| record_key(&reader, "users", &i.to_string())).collect();
        for key in &keys {
            assert_eq!(get_or(&reader, key, 1).await, 1);
        }
        fill_past_maxmemory(&redis).await;
        for (i, key) in keys.iter().enumerate() {
            writer.invalidate(&[Scope::Record("users", &i.to_string())]).await;
            assert_eq!(
                get_or(&reader, key, 2).await,
                2,
                "{policy}: record {i} was invalidated and must not be served stale"
            );
        }
        // Not dropped: an invalidation refused under OOM would have dropped
        // the connection (`Down`, then `Connecting`). `Recovering` is allowed:
        // under `allkeys-lru` Redis may evict the heartbeats' set itself to
        // make room, which the next beat cannot tell from a flushed Redis,
        // so the managers serve no hits until that quarantine ends (seen in
        // 1 CI run of 6 on a loaded machine).
        assert!(
            matches!(
                writer.status(),
                ConnectionStatus::Connected | ConnectionStatus::Recovering
            ),
            "{policy}: an invalidation under OOM does not take the writer down: {:?}",
            writer.status()
        );
        // Under noeviction, stores are refused up front (the store script
        // used to let its writes through past the limit).
        let sets = reader.stats().sets;
        for i in 0..50 {
            let key = reader.key("bulk", &i.to_string()).build().expect("key");
            reader
                .get_or_compute::<_, PlainOutput, _>(&key, None, async { vec![7u8; 16 * 1024] })
                .await;
        }
        if policy == "noeviction" {
            assert_eq!(reader.stats().sets, sets, "nothing stored past maxmemory");
            assert!(reader.stats().store_errors >= 50, "{:?}", reader.stats());
        }
    }
}

/// Bug: a connection lost during the quarantine made the supervisor sleep a
/// whole `health_check_interval` instead of starting a back-off round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_right_after_reconnecting_is_retried_with_back_off() {
    let mut redis = RedisServer::start();
    let cache = manager(
        &redis,
        CacheConfig {
            health_check_interval: Duration::from_secs(6),
            ..config()
        },
    )
    .await;
    redis.kill();
    assert!(cache.ping().await.is_err());
    redis.restart();
    let mut status = cache.subscribe();
    let back = status.wait_for(|s| matches!(s, ConnectionStatus::Recovering | ConnectionStatus::Connected));
    tokio::time::timeout(Duration::from_secs(3), back)
        .await
        .expect("reconnected after the first restart")
        .expect("status");
    drop(status);
    // A second stall right after the reconnection.
    redis.kill();
    assert!(cache.ping().await.is_err());
    redis.restart();
    let restarted = Instant::now();
    let mut status = cache.subscribe();
    let back = status.wait_for(|s| matches!(s, ConnectionStatus::Recovering | ConnectionStatus::Connected));
    let reconnected = tokio::time::timeout(Duration::from_secs(10), back).await.is_ok();
    let took = restarted.elapsed();
    assert!(
        reconnected && took < Duration::from_secs(2),
        "reconnected {took:?} after the second restart; the health-check interval is 6 s"
    );
}

/// Bug: the quarantine used the configured `max_retry_delay` even when the
/// back-off steps could never reach it (38 s without hits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_does_not_wait_on_a_back_off_step_the_configuration_cannot_reach() {
    let mut redis = RedisServer::start();
    let cache = manager(
        &redis,
        CacheConfig {
            retry_delay: Duration::from_millis(100),
            max_retries: 2,
            max_retry_delay: Duration::from_secs(30),
            ..config()
        },
    )
    .await;
    redis.kill();
    assert!(cache.ping().await.is_err());
    redis.restart();
    let took = until_serving(&cache, Duration::from_secs(15)).await;
    assert!(
        took.is_some_and(|t| t < Duration::from_secs(3)),
        "hits resumed after {took:?}: {:?}",
        cache.stats()
    );
}

/// Bug: a manager that made no Redis call during an outage, or that started
/// after it, served hits at once while another process's invalidations were
/// still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_that_did_not_see_an_outage_do_not_serve_through_it() {
    let mut redis = RedisServer::start();
    // Makes no Redis call during the outage (no health check falls in it).
    let quiet = manager(
        &redis,
        CacheConfig {
            health_check_interval: Duration::from_secs(10),
            ..config()
        },
    )
    .await;
    let prefix = quiet.config().prefix.clone();
    // The writer retries late, so its queued invalidation waits.
    let writer = manager(
        &redis,
        CacheConfig {
            prefix: prefix.clone(),
            retry_delay: Duration::from_secs(3),
            max_retry_delay: Duration::from_secs(3),
            max_retries: 1,
            health_check_interval: Duration::from_secs(3),
            ..config()
        },
    )
    .await;
    let key = record_key(&quiet, "users", "1");
    assert_eq!(get_or(&quiet, &key, 1).await, 1);
    assert_eq!(get_or(&quiet, &key, 2).await, 1);

    redis.freeze();
    // The writer notices, so its invalidation is queued, never sent.
    assert!(writer.ping().await.is_err());
    writer.invalidate(&[Scope::Record("users", "1")]).await;
    assert!(writer.stats().invalidations_deferred >= 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.thaw();
    let late = manager(&redis, CacheConfig { prefix, ..config() }).await;
    let late_key = record_key(&late, "users", "1");
    // Until the writer has replayed, neither may serve the old value.
    while writer.status() != ConnectionStatus::Connected && writer.status() != ConnectionStatus::Recovering {
        assert_eq!(
            get_or(&quiet, &key, 3).await,
            3,
            "the quiet manager served a stale value"
        );
        assert_eq!(
            get_or(&late, &late_key, 3).await,
            3,
            "the late manager served a stale value"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(get_or(&quiet, &key, 4).await, 1);
}

/// Bug: a follower waited for its leader with no deadline; a leader future
/// kept but never polled blocked its followers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_does_not_wait_for_a_leader_that_is_never_polled() {
    let redis = RedisServer::start();
    let cache = manager(&redis, config()).await;
    let key = cache.key("stuck", "leader").build().expect("key");
    let started = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&started);
    let leader = cache.get_or_compute::<_, PlainOutput, _>(&key, None, async move {
        flag.store(true, Ordering::SeqCst);
        std::future::pending::<()>().await;
        1u64
    });
    let mut leader = pin!(leader);
    // Poll the leader until its computation has begun, then stop polling it.
    while !started.load(Ordering::SeqCst) {
        std::future::poll_fn(|cx| {
            let _ = leader.as_mut().poll(cx);
            Poll::Ready(())
        })
        .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let begin = Instant::now();
    let follower = tokio::time::timeout(Duration::from_secs(4), get_or(&cache, &key, 2)).await;
    assert_eq!(follower, Ok(2), "the follower computed on its own");
    assert!(begin.elapsed() < Duration::from_secs(3), "waited {:?}", begin.elapsed());
}

/// Bug: past 10,000 queued invalidations, record scopes were folded into a
/// model found by splitting the key at its first `:`, so a model named with
/// a colon kept stale values after a long outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_leaves_nothing_stale_for_models_with_a_colon() {
    let mut redis = RedisServer::start();
    let cache = manager(&redis, config()).await;
    let model = "rt:colon_db.items";
    let keys: Vec<CacheKey> = (0..200).map(|i| record_key(&cache, model, &i.to_string())).collect();
    for key in &keys {
        assert_eq!(get_or(&cache, key, 1).await, 1);
    }
    redis.freeze();
    assert!(
        cache.ping().await.is_err(),
        "the manager notices: what follows is queued"
    );
    let ids: Vec<String> = (0..10_500).map(|i| i.to_string()).collect();
    let scopes: Vec<Scope<'_>> = ids.iter().map(|id| Scope::Record(model, id)).collect();
    cache.invalidate(&scopes).await;
    redis.thaw();
    until_serving(&cache, Duration::from_secs(10))
        .await
        .expect("serving again");
    let mut stale = 0;
    for key in &keys {
        if get_or(&cache, key, 2).await == 1 {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "{stale} of 200 values stale after the outage");
}

/// Bug: tags never folded, and past the threshold every queued invalidation
/// rebuilt the whole queue under a mutex (quadratic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_invalidations_are_bounded_and_cheap_and_still_invalidate() {
    let mut redis = RedisServer::start();
    let cache = manager(&redis, config()).await;
    let tagged = cache
        .key("tags", "value")
        .scope(Scope::Tag("tag-7"))
        .build()
        .expect("key");
    assert_eq!(get_or(&cache, &tagged, 1).await, 1);
    redis.freeze();
    assert!(
        cache.ping().await.is_err(),
        "the manager notices: what follows is queued"
    );
    let start = Instant::now();
    for i in 0..30_000 {
        cache.invalidate(&[Scope::Tag(&format!("tag-{i}"))]).await;
    }
    let took = start.elapsed();
    redis.thaw();
    // Generous: the quadratic queue took minutes here.
    assert!(
        took < Duration::from_secs(10),
        "30,000 queued invalidations took {took:?}"
    );
    until_serving(&cache, Duration::from_secs(10))
        .await
        .expect("serving again");
    assert_eq!(get_or(&cache, &tagged, 2).await, 2, "the tagged value was invalidated");
}

/// Bug: an empty prefix let the manager rewrite other applications' keys, and
/// a prefix without a separator matched other applications' keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prefix_never_reaches_other_applications_keys() {
    let redis = RedisServer::start();
    let empty = CacheManager::connect(
        Some(&redis.url()),
        CacheConfig {
            prefix: String::new(),
            ..config()
        },
    )
    .await;
    assert!(empty.is_err(), "an empty prefix is refused");

    let mut conn = raw_connection(&redis).await;
    let _: () = redis::cmd("SET")
        .arg("apple:1")
        .arg("foreign")
        .query_async(&mut conn)
        .await
        .expect("set");
    let _: () = redis::cmd("SET")
        .arg("app")
        .arg("foreign")
        .query_async(&mut conn)
        .await
        .expect("set");
    let cache = manager(
        &redis,
        CacheConfig {
            prefix: "app".into(),
            ..config()
        },
    )
    .await;
    let key = cache.key("users", "x").build().expect("key");
    get_or(&cache, &key, 1).await;
    cache.delete_pattern("*").await.expect("pattern deletion");
    cache.invalidate_all().await.expect("invalidate all");
    assert_eq!(redis.cli(&["GET", "apple:1"]), "foreign");
    assert_eq!(redis.cli(&["GET", "app"]), "foreign");
}

/// Bug: settings that made the cache useless were accepted silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_disable_caching_are_refused_at_connect() {
    let redis = RedisServer::start();
    let refused = [
        CacheConfig {
            operation_timeout: Duration::ZERO,
            ..config()
        },
        CacheConfig {
            health_check_interval: Duration::ZERO,
            ..config()
        },
        CacheConfig {
            connect_timeout: Duration::ZERO,
            ..config()
        },
        CacheConfig {
            ttl: Duration::ZERO,
            ..config()
        },
        CacheConfig {
            jitter: f64::NAN,
            ..config()
        },
    ];
    for bad in refused {
        let result = CacheManager::connect(Some(&redis.url()), bad.clone()).await;
        assert!(
            matches!(result, Err(CacheError::InvalidConfig { .. })),
            "{bad:?} was accepted"
        );
    }
}

/// Bug: a Redis user without `EVAL` permission gave "caching active", then
/// nothing was ever stored, with no sign of it above `debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_refuses_stores_is_reported() {
    let redis = RedisServer::start();
    assert_eq!(
        redis.cli(&["ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "-eval", "-evalsha"]),
        "OK"
    );
    let url = format!("redis://limited:pw@127.0.0.1:{}/0", redis.port());
    let cache = CacheManager::connect(Some(&url), config()).await.expect("connect");
    assert!(!cache.can_store(), "the permission check at connect found it");
    let key = cache.key("acl", "value").build().expect("key");
    let runs = AtomicUsize::new(0);
    for _ in 0..3 {
        cache
            .get_or_compute::<_, PlainOutput, _>(&key, None, async {
                runs.fetch_add(1, Ordering::SeqCst);
                1u8
            })
            .await;
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        3,
        "nothing could be stored: every call computes"
    );
    assert!(cache.stats().store_errors >= 1, "{:?}", cache.stats());

    // Batches extend generations with `PEXPIREAT`: a user without it
    // could not store them either.
    assert_eq!(
        redis.cli(&[
            "ACL",
            "SETUSER",
            "no_expireat",
            "on",
            ">pw",
            "~*",
            "+@all",
            "-pexpireat"
        ]),
        "OK"
    );
    let url = format!("redis://no_expireat:pw@127.0.0.1:{}/0", redis.port());
    let cache = CacheManager::connect(Some(&url), config()).await.expect("connect");
    assert!(!cache.can_store(), "the permission check at connect found it");
}

/// Bug: the set of managers' heartbeats is an ordinary key; evicted (an
/// `allkeys-lru` Redis under memory pressure) or deleted, it forgot a
/// manager cut off from Redis, and the others served hits again at once
/// while that manager's invalidations were still queued. A manager that
/// finds the set gone after having beaten into it now takes every manager
/// for missing until it would have forgotten one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_heartbeat_set_does_not_hide_a_manager_cut_off() {
    let redis = RedisServer::start();
    let proxy = support::TcpProxy::start(redis.port()).await;
    let reader = manager(&redis, config()).await;
    let prefix = reader.config().prefix.clone();
    let cut_off = CacheManager::connect(
        Some(&proxy.url()),
        CacheConfig {
            prefix: prefix.clone(),
            ..config()
        },
    )
    .await
    .expect("connect");
    assert!(
        reader
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
            .await
    );
    assert!(
        cut_off
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
            .await
    );

    proxy.cut();
    assert!(
        reader
            .wait_for_status(ConnectionStatus::Recovering, Duration::from_secs(5))
            .await,
        "the reader sees the other manager missing"
    );
    redis.cli(&["DEL", &format!("{prefix}meta:members")]);
    // Several heartbeats later, well within the time to forget a manager.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        reader.status(),
        ConnectionStatus::Recovering,
        "the manager cut off is still taken for missing"
    );
    // Forgotten in the end: hits come back.
    assert!(
        reader
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(10))
            .await,
        "serving again once the lost set's managers are forgotten"
    );
    drop(cut_off);
}

/// Runs a script on a connection of its own that keeps Redis busy for
/// `busy` (a long script of another client: the server is alive, only slow).
async fn keep_redis_busy(url: String, busy: Duration) {
    let settings = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection_with_config(&settings)
        .await
        .expect("connect");
    let micros = u64::try_from(busy.as_micros()).expect("a short time");
    let _: i64 = redis::cmd("EVAL")
        .arg(
            "local t = redis.call('TIME') \
             local start = tonumber(t[1]) * 1000000 + tonumber(t[2]) \
             repeat \
               local n = redis.call('TIME') \
               t = tonumber(n[1]) * 1000000 + tonumber(n[2]) \
             until t - start >= tonumber(ARGV[1]) \
             return 1",
        )
        .arg(0)
        .arg(micros)
        .query_async(&mut conn)
        .await
        .expect("busy script");
}

/// Bug (issue 20, 4): a reply slower than the operation timeout (a large
/// command, another client's long script) was taken for a dead server: the
/// connection was dropped, and after reconnecting the manager served no hits
/// for its quarantine (about 32 s with the default settings), with Redis
/// healthy. Now the connection is only suspect, a `PING` on it settles
/// that Redis is alive, and hits resume as soon as it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reply_is_not_taken_for_a_dead_server() {
    let redis = RedisServer::start();
    let cache = manager(
        &redis,
        CacheConfig {
            operation_timeout: Duration::from_millis(150),
            connect_timeout: Duration::from_secs(2),
            ..config()
        },
    )
    .await;
    assert!(
        until_serving(&cache, Duration::from_secs(5)).await.is_some(),
        "serving at first"
    );
    let reconnects = cache.stats().reconnects;
    let mut status = cache.subscribe();
    let went_down = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let went_down = Arc::clone(&went_down);
        async move {
            while status.changed().await.is_ok() {
                if *status.borrow_and_update() == ConnectionStatus::Down {
                    went_down.store(true, Ordering::Release);
                }
            }
        }
    });

    let key = record_key(&cache, "users", "slow");
    assert_eq!(get_or(&cache, &key, 1).await, 1);
    let busy = tokio::spawn(keep_redis_busy(redis.url(), Duration::from_millis(700)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Times out: Redis is running the script.
    let start = Instant::now();
    assert_eq!(get_or(&cache, &key, 2).await, 2, "computed while Redis is busy");
    assert!(
        start.elapsed() < Duration::from_millis(400),
        "bounded by the operation timeout"
    );
    busy.await.expect("busy task");

    let back = until_serving(&cache, Duration::from_millis(1200)).await;
    assert!(
        back.is_some(),
        "hits resume once Redis answers, with no quarantine (status {:?})",
        cache.status()
    );
    assert_eq!(
        get_or(&cache, &key, 3).await,
        1,
        "the value stored before is served again"
    );
    assert!(
        !went_down.load(Ordering::Acquire),
        "a slow Redis was taken for a dead one"
    );
    assert_eq!(cache.stats().reconnects, reconnects, "no reconnection");
    watcher.abort();
}
