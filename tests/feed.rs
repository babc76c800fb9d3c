//! The database feed: writes made outside EarnORM invalidate through
//! MongoDB's change streams; one leader per prefix and database; resumption
//! from the recorded token; an unresumable token invalidates everything.

use std::time::{Duration, Instant};

#[path = "feed_model.rs"]
mod feed_model;

use earnorm::bson::{doc, oid::ObjectId, Document};
use earnorm::prelude::*;
use earnorm::Environment;
use feed_model::Item;
use support::test_config;
use support::{connect, require_mongo, unique_name, RedisServer};

/// A config with the feed on, sharing `base`'s database and prefix when given.
fn feed_config(tag: &str, base: Option<&earnorm::Config>) -> earnorm::Config {
    let mut config = base.cloned().unwrap_or_else(|| test_config(tag));
    config.feed = true;
    config
}

/// Waits until `env` leads its feed (or `limit` passes).
async fn wait_for_leader(envs: &[&Environment], limit: Duration) -> Option<usize> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(i) = envs.iter().position(|env| env.feed_stats().leader) {
            return Some(i);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Polls `read` until it returns `want`; returns how long that took.
async fn until<F, Fut, T>(limit: Duration, want: T, mut read: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
    T: PartialEq,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if read().await == want {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

fn raw(env: &Environment) -> earnorm::mongodb::Collection<Document> {
    env.database().collection(Item::COLLECTION)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_outside_the_orm_invalidate_record_and_model_scopes() {
    let env = connect(feed_config("feed_raw", None)).await;
    assert!(
        wait_for_leader(&[&env], Duration::from_secs(5)).await.is_some(),
        "the feed leads"
    );
    env.scope(async {
        let mut item = Item {
            id: None,
            name: "a".into(),
            qty: 1,
        };
        item.save().await.expect("save");
        let id = item.id.expect("id");
        // Let the event of the save itself pass before caching.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(item.stored_qty().await.expect("read"), Some(1));
        assert_eq!(Item::total().await.expect("count"), 1);

        let bound = Duration::from_secs(2);
        raw(&env)
            .update_one(doc! { "_id": id }, doc! { "$set": { "qty": 2 } })
            .await
            .expect("raw update");
        let took = until(bound, Some(2), || async { item.stored_qty().await.expect("read") }).await;
        assert!(took.is_some(), "a raw update invalidated the record scope");
        println!("raw update seen after {took:?}");

        raw(&env)
            .insert_one(doc! { "name": "b", "qty": 5 })
            .await
            .expect("raw insert");
        let took = until(bound, 2, || async { Item::total().await.expect("count") }).await;
        assert!(took.is_some(), "a raw insert invalidated the model scope");

        raw(&env)
            .update_many(doc! {}, doc! { "$set": { "qty": 7 } })
            .await
            .expect("raw update_many");
        let took = until(bound, Some(7), || async { item.stored_qty().await.expect("read") }).await;
        assert!(took.is_some(), "a raw update_many invalidated each record");

        raw(&env).delete_one(doc! { "_id": id }).await.expect("raw delete");
        let took = until(bound, None, || async { item.stored_qty().await.expect("read") }).await;
        assert!(took.is_some(), "a raw delete invalidated the record");
        let took = until(bound, 1, || async { Item::total().await.expect("count") }).await;
        assert!(took.is_some(), "and the model's queries");
    })
    .await;
    assert!(env.feed_stats().events >= 4, "{:?}", env.feed_stats());
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_among_environments_and_a_new_one_resumes_without_missing_a_write() {
    let base = feed_config("feed_leader", None);
    let mut envs = Vec::new();
    for _ in 0..4 {
        envs.push(connect(base.clone()).await);
    }
    let refs: Vec<&Environment> = envs.iter().collect();
    let leader = wait_for_leader(&refs, Duration::from_secs(5)).await.expect("a leader");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        envs.iter().filter(|env| env.feed_stats().leader).count(),
        1,
        "exactly one leader"
    );

    // One write costs one feed invalidation, whatever the number of environments.
    raw(&envs[0])
        .insert_one(doc! { "name": "x", "qty": 1 })
        .await
        .expect("insert");
    let counted = until(Duration::from_secs(2), 1, || async {
        envs.iter().map(|env| env.feed_stats().events).sum::<u64>()
    })
    .await;
    assert!(counted.is_some(), "the event was applied once");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(envs.iter().map(|env| env.feed_stats().events).sum::<u64>(), 1);

    // Cache a value, drop every environment, write with nobody listening,
    // then a new environment must resume and invalidate that write.
    let reader = envs.remove((leader + 1) % envs.len());
    let id = ObjectId::new();
    raw(&reader)
        .insert_one(doc! { "_id": id, "name": "r", "qty": 1 })
        .await
        .expect("insert");
    let item = Item {
        id: Some(id),
        name: "r".into(),
        qty: 1,
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cached = reader.scope(item.stored_qty()).await.expect("read");
    assert_eq!(cached, Some(1));
    drop(envs);
    drop(reader);
    // Let the lease of the dropped leader lapse or be released.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let checker = connect(earnorm::Config {
        feed: false,
        ..base.clone()
    })
    .await;
    raw(&checker)
        .update_one(doc! { "_id": id }, doc! { "$set": { "qty": 2 } })
        .await
        .expect("update while no feed runs");
    let successor = connect(base.clone()).await;
    let seen = until(Duration::from_secs(8), Some(2), || async {
        checker.scope(item.stored_qty()).await.expect("read")
    })
    .await;
    assert!(
        seen.is_some(),
        "the successor resumed and invalidated the write made meanwhile"
    );
    assert!(successor.feed_stats().resumes >= 1, "{:?}", successor.feed_stats());
    let _ = checker.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresumable_token_invalidates_everything() {
    let base = feed_config("feed_token", None);
    let plain = connect(earnorm::Config {
        feed: false,
        ..base.clone()
    })
    .await;
    let id = ObjectId::new();
    raw(&plain)
        .insert_one(doc! { "_id": id, "name": "t", "qty": 1 })
        .await
        .expect("insert");
    let item = Item {
        id: Some(id),
        name: "t".into(),
        qty: 1,
    };
    assert_eq!(plain.scope(item.stored_qty()).await.expect("read"), Some(1));
    // Change the document without the feed, then record a token no server can resume from.
    raw(&plain)
        .update_one(doc! { "_id": id }, doc! { "$set": { "qty": 3 } })
        .await
        .expect("update");
    let garbage = earnorm::bson::serialize_to_vec(&doc! { "t": { "_data": "00DEADBEEF" } }).expect("bson");
    plain
        .cache()
        .set_meta(&format!("feed:{}:token", plain.database().name()), &garbage)
        .await
        .expect("set token");
    assert_eq!(
        plain.scope(item.stored_qty()).await.expect("read"),
        Some(1),
        "stale until the feed starts"
    );

    let feed = connect(base).await;
    let seen = until(Duration::from_secs(5), Some(3), || async {
        plain.scope(item.stored_qty()).await.expect("read")
    })
    .await;
    assert!(seen.is_some(), "everything was invalidated");
    // The reset is counted once its invalidation of everything has gone
    // through whole; under load a first attempt can time out part-way
    // (already deleting what the read above needed) and be retried.
    let counted = until(Duration::from_secs(5), true, || async { feed.feed_stats().resets >= 1 }).await;
    assert!(counted.is_some(), "{:?}", feed.feed_stats());
    let _ = plain.database().drop().await;
}

/// An environment with the default cache settings (30 s health checks, the
/// 32 s quarantine) and the feed, on a private Redis.
async fn default_settings_env(redis: &RedisServer) -> Environment {
    let name = unique_name("feed_recover");
    connect(earnorm::Config {
        mongo_uri: require_mongo(),
        database: name.clone(),
        redis_uri: Some(redis.url()),
        cache_config: earnorm::CacheConfig {
            prefix: format!("{name}:"),
            ..Default::default()
        },
        connect_timeout: Duration::from_secs(5),
        feed: true,
    })
    .await
}

/// Until a record-scope cached read of a fresh record is a hit.
async fn until_record_hits(env: &Environment, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut n = 0i64;
    while start.elapsed() < limit {
        n += 1;
        let item = Item {
            id: Some(ObjectId::new()),
            name: format!("probe{n}"),
            qty: n,
        };
        let before = env.cache().stats().hits;
        let _ = env.scope(item.stored_qty()).await;
        let _ = env.scope(item.stored_qty()).await;
        if env.cache().stats().hits > before {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Bar: hits back within about a second of Redis's return with the default
/// settings, once the feed has caught up (no fixed quarantine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_come_back_about_a_second_after_redis_returns_with_default_settings() {
    let mut redis = RedisServer::start();
    let env = default_settings_env(&redis).await;
    assert!(wait_for_leader(&[&env], Duration::from_secs(5)).await.is_some());
    assert!(
        until_record_hits(&env, Duration::from_secs(5)).await.is_some(),
        "hits at first"
    );

    redis.kill();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    let after_restart = until_record_hits(&env, Duration::from_secs(20)).await;
    println!("hits back {after_restart:?} after a restart (the quarantine alone is 32.25 s)");
    assert!(
        after_restart.is_some_and(|t| t < Duration::from_secs(3)),
        "{after_restart:?}"
    );

    redis.freeze();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.thaw();
    let after_thaw = until_record_hits(&env, Duration::from_secs(20)).await;
    println!("hits back {after_thaw:?} after a freeze");
    assert!(after_thaw.is_some_and(|t| t < Duration::from_secs(3)), "{after_thaw:?}");
    assert_eq!(
        env.cache().status(),
        earnorm::ConnectionStatus::Recovering,
        "the quarantine still holds for tagged values"
    );
    let _ = env.database().drop().await;
}

/// An EarnORM write invalidates itself, and its own change event
/// invalidates again a few milliseconds later (the feed skips nothing): once
/// `wait_for_feed` says the feed has passed the write, a value computed is
/// stored and served; a later outside write to the same record is still
/// invalidated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_echo_of_an_orm_write_values_are_served_and_outside_writes_still_invalidate() {
    let env = connect(feed_config("feed_echo", None)).await;
    assert!(wait_for_leader(&[&env], Duration::from_secs(5)).await.is_some());
    env.scope(async {
        let mut item = Item::new("echo", 1);
        item.save().await.expect("save");
        assert!(
            env.wait_for_feed(Duration::from_secs(2)).await,
            "the feed passed the save"
        );
        assert_eq!(item.slow_qty().await.expect("read"), Some(1));
        let hits = env.cache().stats().hits;
        assert_eq!(item.slow_qty().await.expect("read"), Some(1));
        assert_eq!(
            env.cache().stats().hits,
            hits + 1,
            "stored, then a hit: {:?}",
            env.feed_stats()
        );

        raw(&env)
            .update_one(doc! { "_id": item.id }, doc! { "$set": { "qty": 2 } })
            .await
            .expect("raw update");
        let took = until(Duration::from_secs(2), Some(2), || async {
            item.slow_qty().await.expect("read")
        })
        .await;
        assert!(took.is_some(), "a later outside write is not skipped");
    })
    .await;
    let _ = env.database().drop().await;
}
