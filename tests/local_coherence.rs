//! The in-process tier beside Redis, across environments that stand in for
//! processes: another process's write reaches the tier within the push's
//! delivery lag, the writer's own process never reads its old value, and a
//! lost invalidation channel (killed, or Redis restarted) drops the tier
//! until it is subscribed again.

use std::time::{Duration, Instant};

use earnorm::bson::{doc, oid::ObjectId};
use earnorm::prelude::*;
use earnorm::{Config, ConnectionStatus, Environment, LocalConfig};
use serde::{Deserialize, Serialize};
use support::{connect, ran, test_config, RedisServer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "counters")]
pub struct Counter {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
    pub value: i64,
}

impl Counter {
    /// Reads the stored record, not this copy.
    #[cached(ttl = 300)]
    pub async fn stored(&self) -> earnorm::Result<i64> {
        ran(&self.name);
        let id = self.id.ok_or(earnorm::Error::NotInitialized)?;
        Ok(earnorm::bypass_cache(Counter::find_by_id(id))
            .await?
            .map_or(-1, |c| c.value))
    }
}

/// Two environments on one database and prefix, as two processes would
/// be: `reader` keeps values in process, `writer` too unless `writer_tier`
/// is false.
async fn pair(tag: &str, redis: Option<String>, writer_tier: bool) -> (Environment, Environment, Config) {
    let mut config = test_config(tag);
    if let Some(url) = redis {
        config.redis_uri = Some(url);
    }
    config.cache_config.local = LocalConfig {
        capacity: 1_000,
        with_redis: true,
    };
    let reader = connect(config.clone()).await;
    let mut writer_config = config.clone();
    writer_config.cache_config.local.with_redis = writer_tier;
    let writer = connect(writer_config).await;
    (reader, writer, config)
}

/// Waits until `env`'s tier serves (its channel is subscribed and Redis
/// serves hits), by reading `counter` until a read is a local hit.
async fn until_local_hits(env: &Environment, counter: &Counter) {
    let limit = Instant::now() + Duration::from_secs(10);
    loop {
        let before = env.cache().stats().local_hits;
        let _ = env.scope(counter.stored()).await;
        if env.cache().stats().local_hits > before {
            return;
        }
        assert!(
            Instant::now() < limit,
            "the tier never served: {:?}",
            env.cache().stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn saved(env: &Environment, name: &str, value: i64) -> Counter {
    let mut counter = Counter {
        id: None,
        name: name.to_owned(),
        value,
    };
    counter.save().in_env(env).await.expect("save");
    counter
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_s_write_reaches_the_tier_within_the_push_lag() {
    let (reader, writer, _) = pair("coherent", None, true).await;
    let copy = saved(&writer, "c1", 1).await;
    until_local_hits(&reader, &copy).await;
    until_local_hits(&writer, &copy).await;

    let mut changed = copy.clone();
    changed.value = 2;
    changed.save().in_env(&writer).await.expect("save");
    let acknowledged = Instant::now();
    // The writer's own process never reads its old value.
    assert_eq!(writer.scope(copy.stored()).await.expect("writer"), 2);
    // The other one reads it for the push's delivery lag at most.
    let mut stale = 0u32;
    loop {
        match reader.scope(copy.stored()).await.expect("reader") {
            2 => break,
            1 => stale += 1,
            other => panic!("read {other}"),
        }
        assert!(
            acknowledged.elapsed() < Duration::from_secs(2),
            "the reader still serves the old value {:?} after the write ({stale} stale reads)",
            acknowledged.elapsed()
        );
        tokio::task::yield_now().await;
    }
    // The window: from the write's acknowledgement to the reader's first
    // read of the new value.
    eprintln!(
        "cross-process window: {:?}, {stale} stale reads in it",
        acknowledged.elapsed()
    );
    // Kept again, and served in process.
    until_local_hits(&reader, &copy).await;
    assert_eq!(reader.scope(copy.stored()).await.expect("reader"), 2);
    let _ = writer.database().drop().await;
}

/// The generation key of `counter`'s record scope, as the keyspace names it.
fn record_generation(config: &Config, counter: &Counter) -> String {
    let prefix = &config.cache_config.prefix;
    let id = counter.id.expect("id").to_hex();
    format!("{prefix}g:r:{}.counters:{id}", config.database)
}

/// The ids of the clients named `name` on `server`.
fn clients_named(server: &RedisServer, name: &str) -> Vec<String> {
    server
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|line| line.split(' ').any(|field| field == format!("name={name}")))
        .filter_map(|line| {
            line.split(' ')
                .find_map(|field| field.strip_prefix("id="))
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_channel_drops_the_tier_so_a_write_in_the_gap_is_not_missed() {
    let server = RedisServer::start();
    let (reader, writer, config) = pair("channel_kill", Some(server.url()), false).await;
    let counter = saved(&writer, "k1", 1).await;
    until_local_hits(&reader, &counter).await;
    let channels = clients_named(&server, "earnorm-tracking");
    assert_eq!(channels.len(), 1, "the reader's channel alone");

    // Another process's write lands in the database, and its invalidation
    // reaches Redis right after the reader's channel is killed: no push
    // will ever tell the reader.
    writer
        .database()
        .collection::<earnorm::bson::Document>("counters")
        .update_one(doc! { "_id": counter.id }, doc! { "$set": { "value": 2 } })
        .await
        .expect("raw write");
    let generation = record_generation(&config, &counter);
    let mut redis = redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let (): () = redis::pipe()
        .cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&channels[0])
        .ignore()
        .cmd("DEL")
        .arg(&generation)
        .ignore()
        .query_async(&mut redis)
        .await
        .expect("kill and invalidate");

    // Once the reader knows its channel is lost, it serves nothing it kept.
    let limit = Instant::now() + Duration::from_secs(5);
    while reader.cache().stats().local_resets == 0 {
        assert!(Instant::now() < limit, "the loss was never noticed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(reader.scope(counter.stored()).await.expect("read"), 2);
    // And it subscribes again: hits in process resume.
    until_local_hits(&reader, &counter).await;
    assert_eq!(reader.scope(counter.stored()).await.expect("read"), 2);
    let _ = writer.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_redis_drops_the_tier() {
    let mut server = RedisServer::start();
    let (reader, writer, _) = pair("channel_restart", Some(server.url()), false).await;
    let counter = saved(&writer, "r1", 1).await;
    until_local_hits(&reader, &counter).await;

    server.kill();
    // Written while Redis is down: the writer queues its invalidation, and
    // Redis comes back empty.
    let mut changed = counter.clone();
    changed.value = 2;
    changed.save().in_env(&writer).await.expect("save");
    server.restart();
    assert!(
        reader
            .cache()
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(20))
            .await,
        "the reader reconnects"
    );
    assert!(reader.cache().stats().local_resets >= 1);
    assert_eq!(reader.scope(counter.stored()).await.expect("read"), 2);
    let _ = writer.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_lives_in_process_no_longer_than_in_redis() {
    use earnorm::cache_layer::{CacheManager, PlainOutput, Scope};
    let config = test_config("local_ttl");
    let url = config.redis_uri.clone().expect("redis");
    let strict = CacheManager::connect(Some(&url), config.cache_config.clone())
        .await
        .expect("connect");
    let mut tiered_config = config.cache_config.clone();
    tiered_config.local.with_redis = true;
    let tiered = CacheManager::connect(Some(&url), tiered_config).await.expect("connect");
    let key = |cache: &CacheManager| cache.key("ttl", "value").scope(Scope::Tag("ttl")).build().expect("key");
    let runs = std::sync::atomic::AtomicU32::new(0);
    let compute = || async {
        runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        7u32
    };
    // Stored for one second by a process without the tier.
    let stored = Instant::now();
    let _: u32 = strict
        .get_or_compute::<_, PlainOutput, _>(&key(&strict), Some(Duration::from_secs(1)), compute())
        .await;
    // Read from Redis late in its life, and kept in process.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let limit = Instant::now() + Duration::from_secs(5);
    while tiered.stats().local_hits == 0 {
        let _: u32 = tiered
            .get_or_compute::<_, PlainOutput, _>(&key(&tiered), Some(Duration::from_secs(60)), compute())
            .await;
        assert!(
            Instant::now() < limit && stored.elapsed() < Duration::from_millis(900),
            "never served in process"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Once Redis has let it expire, this process has too.
    tokio::time::sleep(Duration::from_secs(1).saturating_sub(stored.elapsed()) + Duration::from_millis(100)).await;
    let _: u32 = tiered
        .get_or_compute::<_, PlainOutput, _>(&key(&tiered), Some(Duration::from_secs(60)), compute())
        .await;
    assert_eq!(
        runs.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "kept in process past its expiry in Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_drops_the_tier_until_it_thaws() {
    let mut server = RedisServer::start();
    let (reader, writer, _) = pair("channel_freeze", Some(server.url()), false).await;
    let counter = saved(&writer, "z1", 1).await;
    until_local_hits(&reader, &counter).await;

    server.freeze();
    // The channel's PING goes unanswered: the tier is dropped.
    let limit = Instant::now() + Duration::from_secs(5);
    while reader.cache().stats().local_resets == 0 {
        assert!(Instant::now() < limit, "a frozen Redis was never noticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Written meanwhile: the writer's invalidation waits in its outbox.
    let mut changed = counter.clone();
    changed.value = 2;
    changed.save().in_env(&writer).await.expect("save");
    assert_eq!(reader.scope(counter.stored()).await.expect("read"), 2);

    server.thaw();
    assert!(
        reader
            .cache()
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(20))
            .await,
        "the reader is back"
    );
    until_local_hits(&reader, &counter).await;
    assert_eq!(reader.scope(counter.stored()).await.expect("read"), 2);
    let _ = writer.database().drop().await;
}

/// What the writer process of the test below is told: where to connect and
/// which counter to set to what.
const WRITER_VAR: &str = "EARNORM_LOCAL_WRITER";

/// The writer of `another_os_process_s_write_reaches_the_tier`, an OS
/// process of its own: saves one counter through EarnORM (the tier off) and
/// exits. Run only as that child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the writer child process of another_os_process_s_write_reaches_the_tier"]
async fn local_writer_child() {
    let spec = std::env::var(WRITER_VAR).expect("run as the writer child process");
    let fields: Vec<&str> = spec.split('\n').collect();
    let [mongo_uri, database, redis, prefix, id, value] = fields[..] else {
        panic!("{WRITER_VAR} is malformed");
    };
    let mut config = test_config("unused");
    config.mongo_uri = mongo_uri.to_owned();
    config.database = database.to_owned();
    config.redis_uri = Some(redis.to_owned());
    config.cache_config.prefix = prefix.to_owned();
    let env = connect(config).await;
    let id = ObjectId::parse_str(id).expect("id");
    let mut counter = Counter::find_by_id(id)
        .in_env(&env)
        .await
        .expect("find")
        .expect("there");
    counter.value = value.parse().expect("value");
    counter.save().in_env(&env).await.expect("save");
    env.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_os_process_s_write_reaches_the_tier() {
    let (reader, _, config) = pair("os_process", None, false).await;
    let counter = saved(&reader, "p1", 1).await;
    until_local_hits(&reader, &counter).await;

    let spec = [
        config.mongo_uri.clone(),
        config.database.clone(),
        config.redis_uri.clone().expect("redis"),
        config.cache_config.prefix.clone(),
        counter.id.expect("id").to_hex(),
        "2".to_owned(),
    ]
    .join("\n");
    let status = tokio::task::spawn_blocking(move || {
        std::process::Command::new(std::env::current_exe().expect("the test binary"))
            .args(["--ignored", "--exact", "local_writer_child", "--quiet"])
            .env(WRITER_VAR, spec)
            .stdout(std::process::Stdio::null())
            .status()
    })
    .await
    .expect("the writer task")
    .expect("the writer process");
    assert!(status.success(), "the writer failed: {status}");
    // Its save is acknowledged: the other process may serve the old value
    // for the push's delivery lag only.
    let acknowledged = Instant::now();
    let mut stale = 0u32;
    while reader.scope(counter.stored()).await.expect("read") != 2 {
        stale += 1;
        assert!(
            acknowledged.elapsed() < Duration::from_secs(2),
            "still the old value {:?} after the other process's write ({stale} stale reads)",
            acknowledged.elapsed()
        );
        tokio::task::yield_now().await;
    }
    eprintln!("another OS process: {stale} stale reads after its write was acknowledged");
    let _ = reader.database().drop().await;
}

/// How many times `command` ran on `server` (`INFO commandstats`).
fn calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_hit_with_known_generations_reads_one_key() {
    use earnorm::cache_layer::{CacheManager, PlainOutput, Scope};
    let server = RedisServer::start();
    let mut config = test_config("known_generations").cache_config;
    let strict = CacheManager::connect(Some(&server.url()), config.clone())
        .await
        .expect("connect");
    config.local.with_redis = true;
    let tiered = CacheManager::connect(Some(&server.url()), config)
        .await
        .expect("connect");
    let key = |cache: &CacheManager, n: u32| {
        cache
            .key("known", "value")
            .scope(Scope::Tag("rates"))
            .arg(&n)
            .and_then(earnorm::cache_layer::KeyBuilder::build)
            .expect("key")
    };
    let minute = Some(Duration::from_secs(60));
    let read = |cache: CacheManager, n: u32, value: u32| async move {
        cache
            .get_or_compute::<u32, PlainOutput, _>(&key(&cache, n), minute, async move { value })
            .await
    };
    // Stored by the strict process; the tiered one reads the first value
    // (learning the tag's generation) until it serves it in process.
    for n in [1, 2] {
        assert_eq!(read(strict.clone(), n, 10 + n).await, 10 + n);
    }
    let limit = Instant::now() + Duration::from_secs(5);
    while tiered.stats().local_hits == 0 {
        assert_eq!(read(tiered.clone(), 1, 0).await, 11);
        assert!(Instant::now() < limit, "the tier never served");
    }
    // The second value is in Redis, not in process; its generation is
    // known: one GET (with its PTTL), no MGET.
    let (mget, get) = (calls(&server, "mget"), calls(&server, "get"));
    let before = tiered.stats();
    assert_eq!(read(tiered.clone(), 2, 0).await, 12);
    let after = tiered.stats();
    assert_eq!((after.hits - before.hits, after.local_hits - before.local_hits), (1, 0));
    assert_eq!(calls(&server, "mget"), mget, "no MGET");
    assert_eq!(calls(&server, "get"), get + 1, "one GET");

    // Another process's write replaces the generation: the pushed
    // invalidation makes it unknown again, and the new value is read.
    strict.invalidate(&[Scope::Tag("rates")]).await;
    assert_eq!(read(strict.clone(), 3, 13).await, 13);
    // (Generous: on a starved machine a late heartbeat of either manager
    // can make the other serve no hits for a while.)
    let limit = Instant::now() + Duration::from_secs(10);
    loop {
        let mget = calls(&server, "mget");
        if read(tiered.clone(), 3, 99).await == 13 && calls(&server, "mget") == mget + 1 {
            break;
        }
        assert!(
            Instant::now() < limit,
            "the invalidated generation is still taken as known"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_processes_stores_do_not_drop_values_they_do_not_change() {
    let (reader, writer, _) = pair("stores_keep_tier", None, false).await;
    let kept = saved(&writer, "s0", 1).await;
    let mut others = Vec::new();
    for n in 1..=5 {
        others.push(saved(&writer, &format!("s{n}"), n).await);
    }
    until_local_hits(&reader, &kept).await;
    // The other process caches values of the same model: its stores (with
    // the generations they depend on, the model's among them) change
    // nothing the reader's value depends on.
    for other in &others {
        let _ = writer.scope(other.stored()).await.expect("store");
        let _ = writer.scope(other.stored()).await.expect("hit");
    }
    let limit = Instant::now() + Duration::from_millis(200);
    while Instant::now() < limit {
        let before = reader.cache().stats().local_hits;
        assert_eq!(reader.scope(kept.stored()).await.expect("read"), 1);
        assert_eq!(
            reader.cache().stats().local_hits,
            before + 1,
            "the reader's value was dropped by another process's stores"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = writer.database().drop().await;
}
