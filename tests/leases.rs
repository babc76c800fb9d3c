//! Leases across processes: a cold key is computed by one process at a
//! time; the others wait a bounded time (`lease_wait`) for its value, then
//! compute themselves. Each test starts copies of this test binary as the
//! other processes (`lease_child`, ignored on its own), on a private Redis.

use std::io::Write;
use std::time::{Duration, Instant};

use earnorm::cache_layer::{CacheKey, CacheManager, PlainOutput};
use earnorm::CacheConfig;
use support::{fast_cache_config, ChildTest, RedisServer};

/// How long each computation takes.
const BODY: Duration = Duration::from_millis(200);

fn config(prefix: &str) -> CacheConfig {
    CacheConfig {
        lease_wait: Duration::from_secs(1),
        ..fast_cache_config(prefix)
    }
}

async fn manager(url: &str, prefix: &str) -> CacheManager {
    let manager = CacheManager::connect(Some(url), config(prefix)).await.expect("connect");
    assert!(
        manager
            .wait_for_status(earnorm::ConnectionStatus::Connected, Duration::from_secs(5))
            .await,
        "connected to the private Redis"
    );
    manager
}

fn cold_key(manager: &CacheManager) -> CacheKey {
    manager.key("leases", "cold").build().expect("key")
}

/// The computation: counts its runs in Redis (`runs`), takes `hold`.
async fn body(url: &str, hold: Duration) -> u64 {
    let client = redis::Client::open(url).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let _: i64 = redis::cmd("INCR")
        .arg("runs")
        .query_async(&mut conn)
        .await
        .expect("INCR");
    tokio::time::sleep(hold).await;
    42
}

/// `callers` concurrent calls on the cold key; the longest any took.
async fn stampede(manager: &CacheManager, url: &str, callers: usize, hold: Duration) -> Duration {
    let key = cold_key(manager);
    let calls = (0..callers).map(|_| {
        let (manager, key, url) = (manager.clone(), key.clone(), url.to_owned());
        tokio::spawn(async move {
            let start = Instant::now();
            let value = manager
                .get_or_compute::<u64, PlainOutput, _>(&key, Some(Duration::from_secs(60)), body(&url, hold))
                .await;
            assert_eq!(value, 42);
            start.elapsed()
        })
    });
    let mut longest = Duration::ZERO;
    for call in calls.collect::<Vec<_>>() {
        longest = longest.max(call.await.expect("a caller"));
    }
    longest
}

/// The other processes' side, driven through standard input: `go N HOLD_MS`
/// runs N concurrent callers (printing `done LONGEST_MS`). Run only as a
/// child process: it returns at once otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of the lease tests"]
async fn lease_child() {
    let (Ok(url), Ok(prefix)) = (
        std::env::var("EARNORM_LEASE_REDIS"),
        std::env::var("EARNORM_LEASE_PREFIX"),
    ) else {
        return;
    };
    let manager = manager(&url, &prefix).await;
    let mut out = std::io::stdout();
    writeln!(out, "LEASE ready").expect("stdout");
    out.flush().expect("flush");
    for line in std::io::stdin().lines() {
        let line = line.expect("a command");
        let words: Vec<u64> = line.split_whitespace().skip(1).filter_map(|w| w.parse().ok()).collect();
        if let [callers, hold_ms] = words[..] {
            writeln!(out, "LEASE started").expect("stdout");
            out.flush().expect("flush");
            let callers = usize::try_from(callers).expect("callers");
            let longest = stampede(&manager, &url, callers, Duration::from_millis(hold_ms)).await;
            writeln!(out, "LEASE done {}", longest.as_millis()).expect("stdout");
            out.flush().expect("flush");
        }
    }
}

fn process(url: &str, prefix: &str) -> ChildTest {
    let mut child = ChildTest::start(
        "lease_child",
        &[("EARNORM_LEASE_REDIS", url), ("EARNORM_LEASE_PREFIX", prefix)],
    );
    child.answer("LEASE ready");
    child
}

fn runs(redis: &RedisServer) -> u64 {
    redis.cli(&["GET", "runs"]).trim().parse().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_processes_of_a_hundred_callers_on_a_cold_key_compute_it_at_most_twice() {
    let redis = RedisServer::start();
    let prefix = support::unique_name("lease");
    let mut processes: Vec<ChildTest> = (0..4).map(|_| process(&redis.url(), &prefix)).collect();
    for process in &mut processes {
        process.send(&format!("go 100 {}", BODY.as_millis()));
    }
    let mut longest = Duration::ZERO;
    for process in &mut processes {
        let ms: u64 = process.answer("LEASE done").parse().expect("milliseconds");
        longest = longest.max(Duration::from_millis(ms));
    }
    let runs = runs(&redis);
    println!("4 processes x 100 callers: the body ran {runs} time(s); the longest call took {longest:?}");
    assert!((1..=2).contains(&runs), "the body ran {runs} times");
    // Nobody waits past the lease wait (then computes for BODY itself);
    // here everyone got the value long before.
    let bound = config(&prefix).lease_wait + BODY;
    assert!(longest < bound, "a call took {longest:?} (bound {bound:?})");

    // The value is now cached: a second stampede runs nothing.
    for process in &mut processes {
        process.send(&format!("go 100 {}", BODY.as_millis()));
    }
    for process in &mut processes {
        process.answer("LEASE done");
    }
    assert_eq!(self::runs(&redis), runs, "hits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_lease_holder_holds_the_others_up_at_most_the_lease_wait() {
    let redis = RedisServer::start();
    let prefix = support::unique_name("lease_kill");
    // The holder takes the lease and computes for a minute, then is killed.
    let mut holder = process(&redis.url(), &prefix);
    holder.send("go 1 60000");
    holder.answer("LEASE started");
    let start = Instant::now();
    while runs(&redis) == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "the holder started computing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(holder);
    let killed = Instant::now();

    let manager = manager(&redis.url(), &prefix).await;
    let waited = stampede(&manager, &redis.url(), 10, BODY).await;
    let lease_wait = config(&prefix).lease_wait;
    println!(
        "after the holder was killed, the callers took {waited:?} ({:?} after the kill)",
        killed.elapsed()
    );
    // The dead holder's lease expires a quarter of `lease_wait` after its
    // last renewal; the flight here takes it over and computes once, in
    // time for every caller waiting on it.
    let runs = runs(&redis);
    println!("the body ran {runs} time(s) (the killed holder's included)");
    assert_eq!(runs, 2, "the holder's run, then one here");
    assert!(
        waited < lease_wait + BODY + Duration::from_millis(500),
        "a caller waited {waited:?}"
    );
    // The killed process stopped sending heartbeats: hits resume once it
    // is forgotten (see `ConnectionStatus::Recovering`).
    assert!(
        manager
            .wait_for_status(earnorm::ConnectionStatus::Connected, Duration::from_secs(10))
            .await
    );
    assert_eq!(
        manager
            .get_or_compute::<u64, PlainOutput, _>(&cold_key(&manager), None, async { 0 })
            .await,
        42,
        "the value computed here was stored: {:?}",
        manager.stats()
    );
    assert!(manager.stats().lease_waits >= 1, "{:?}", manager.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_never_lets_a_stale_value_in() {
    // A holder whose computation is invalidated by a write gives its lease
    // up without storing; the waiter then computes the current value.
    let redis = RedisServer::start();
    let prefix = support::unique_name("lease_stale");
    let (one, two) = (
        manager(&redis.url(), &prefix).await,
        manager(&redis.url(), &prefix).await,
    );
    let key = |m: &CacheManager| {
        m.key("leases", "scoped")
            .scope(earnorm::cache_layer::Scope::Record("m", "1"))
            .build()
            .expect("key")
    };
    let (k1, k2) = (key(&one), key(&two));
    let old = {
        let one = one.clone();
        let k1 = k1.clone();
        tokio::spawn(async move {
            one.get_or_compute::<u64, PlainOutput, _>(&k1, None, async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                1 // read before the write below
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    one.invalidate(&[earnorm::cache_layer::Scope::Record("m", "1")]).await;
    let current = two.get_or_compute::<u64, PlainOutput, _>(&k2, None, async { 2 }).await;
    assert_eq!(old.await.expect("holder"), 1, "the holder returns what it computed");
    assert_eq!(current, 2, "the waiter did not take the stale value");
    assert_eq!(
        two.get_or_compute::<u64, PlainOutput, _>(&k2, None, async { 3 }).await,
        2,
        "the stored value is the current one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_holder_gives_its_lease_up_at_once() {
    let redis = RedisServer::start();
    let prefix = support::unique_name("lease_cancel");
    let (one, two) = (
        manager(&redis.url(), &prefix).await,
        manager(&redis.url(), &prefix).await,
    );
    let (k1, k2) = (cold_key(&one), cold_key(&two));
    // The holder's caller stops waiting in the middle of its computation.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(100),
        one.get_or_compute::<u64, PlainOutput, _>(&k1, None, body(&redis.url(), Duration::from_secs(60))),
    )
    .await;
    assert!(cancelled.is_err(), "the call was cancelled");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let start = Instant::now();
    let value = two.get_or_compute::<u64, PlainOutput, _>(&k2, None, async { 7 }).await;
    let waited = start.elapsed();
    println!("after the holder was cancelled, the next caller took {waited:?}");
    assert_eq!(value, 7);
    assert!(
        waited < Duration::from_millis(100),
        "the lease was given up, not left to expire ({waited:?})"
    );
    assert_eq!(two.stats().lease_waits, 0, "nobody held it any more");
}
