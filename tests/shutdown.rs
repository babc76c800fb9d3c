//! Leaving cleanly: a process that calls `earnorm::shutdown()` before it
//! exits leaves the other processes serving hits and hands the database
//! feed over at once. Found with the demo: run twice in a row, its second
//! run's second call missed, because the first run's process (whose
//! default environment is never dropped) was taken for one cut off from
//! Redis, and its feed lease had to expire.

use std::io::Write;
use std::time::{Duration, Instant};

use earnorm::{ConnectionStatus, Environment};
use support::{connect, fast_cache_config, require_mongo, unique_name, ChildTest, RedisServer};

fn config(database: &str, prefix: &str, redis: String) -> earnorm::Config {
    earnorm::Config {
        mongo_uri: require_mongo(),
        database: database.to_owned(),
        redis_uri: Some(redis),
        cache_config: earnorm::CacheConfig {
            // Long enough that a missing member would be remembered for the
            // whole observation below.
            health_check_interval: Duration::from_secs(5),
            ..fast_cache_config(prefix)
        },
        connect_timeout: Duration::from_secs(5),
        feed: true,
    }
}

/// The other process: `init`s, leads the feed, and on `exit` (after
/// `earnorm::shutdown()` when `EARNORM_CHILD_SHUTDOWN` is set) returns
/// from the process. Run only as a child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of a_process_that_shuts_down_..."]
async fn shutdown_child() {
    let (Ok(database), Ok(prefix), Ok(redis)) = (
        std::env::var("EARNORM_CHILD_DB"),
        std::env::var("EARNORM_CHILD_PREFIX"),
        std::env::var("EARNORM_CHILD_REDIS"),
    ) else {
        return;
    };
    let env = earnorm::init(config(&database, &prefix, redis)).await.expect("init");
    while !env.feed_stats().leader {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut out = std::io::stdout();
    writeln!(out, "CHILD leading").expect("stdout");
    out.flush().expect("flush");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    if std::env::var("EARNORM_CHILD_SHUTDOWN").is_ok() {
        earnorm::shutdown().await;
    }
    // The process ends with the default environment still installed.
    std::process::exit(0);
}

/// Runs the child to its exit (with or without `shutdown`) beside an
/// environment of this process; returns whether this one went
/// `Recovering` within a second after, and how long it took to lead the feed.
async fn child_exits(shutdown: bool) -> (bool, Option<Duration>) {
    let redis = RedisServer::start();
    let (database, prefix) = (unique_name("shutdown"), unique_name("shutdown"));
    let url = redis.url();
    let mut vars = vec![
        ("EARNORM_CHILD_DB", database.as_str()),
        ("EARNORM_CHILD_PREFIX", prefix.as_str()),
        ("EARNORM_CHILD_REDIS", url.as_str()),
    ];
    if shutdown {
        vars.push(("EARNORM_CHILD_SHUTDOWN", "1"));
    }
    let mut child = ChildTest::start("shutdown_child", &vars);
    child.answer("CHILD leading");
    let env: Environment = connect(config(&database, &prefix, redis.url())).await;
    assert!(
        env.cache()
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
            .await
    );
    // Let the child's heartbeats be seen.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!env.feed_stats().leader, "the child leads");
    child.send("exit");
    child.wait();
    let exited = Instant::now();
    let mut recovering = false;
    let mut led = None;
    while exited.elapsed() < Duration::from_secs(2) {
        recovering |= env.cache().status() == ConnectionStatus::Recovering;
        if led.is_none() && env.feed_stats().leader {
            led = Some(exited.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let _ = env.database().drop().await;
    (recovering, led)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_shuts_down_leaves_the_others_serving_and_hands_the_feed_over() {
    let (recovering, led) = child_exits(true).await;
    println!("after a clean exit: recovering {recovering}, led the feed after {led:?}");
    assert!(!recovering, "the others kept serving hits");
    let led = led.expect("took the feed over");
    assert!(
        led < Duration::from_millis(1000),
        "took the feed over at once ({led:?}), not after the lease expired"
    );

    // The same exit without `shutdown`: taken for a process cut off from
    // Redis, and its lease must expire.
    let (recovering, led) = child_exits(false).await;
    println!("after an exit without shutdown: recovering {recovering}, led the feed after {led:?}");
    assert!(recovering, "without shutdown, the others stop serving hits for a while");
}
