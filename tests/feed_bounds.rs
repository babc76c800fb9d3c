//! The database feed within its bounds: outside transactions that commit
//! after an EarnORM write of the same collection, a large outside bulk write,
//! a leader cut off from MongoDB or killed, and the first reads after a new
//! leader starts.

use std::io::Write;
use std::time::{Duration, Instant};

#[path = "feed_model.rs"]
mod feed_model;

use earnorm::bson::{doc, oid::ObjectId, Document};
use earnorm::prelude::*;
use earnorm::Environment;
use feed_model::{until_qty, Item};
use serde::{Deserialize, Serialize};
use support::{connect, fast_cache_config, mongo_port, require_mongo, test_config, unique_name, ChildTest, TcpProxy};

/// The same collection with a record cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "feed_items", cache(ttl = 300))]
struct CachedItem {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    name: String,
    qty: i64,
}

/// Cache settings with heartbeats a second apart: a killed process is taken
/// for missing only after 2.3 s, so that what the feed does within its
/// bounds is not mistaken for the heartbeats' doing.
fn slow_heartbeats(prefix: &str) -> earnorm::CacheConfig {
    earnorm::CacheConfig {
        heartbeat_interval: Duration::from_secs(1),
        ..fast_cache_config(prefix)
    }
}

/// A config with the feed on, on the shared services.
fn feed_config(tag: &str) -> earnorm::Config {
    earnorm::Config {
        feed: true,
        ..test_config(tag)
    }
}

fn raw(env: &Environment) -> earnorm::mongodb::Collection<Document> {
    env.database().collection(Item::COLLECTION)
}

async fn wait_for_leader(env: &Environment, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if env.feed_stats().leader {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

/// A record saved and cached by `survivor`, which must not lead the feed.
async fn cached_while_following(survivor: &Environment) -> Item {
    let item = Item::new("gap", 1);
    item.clone().save().in_env(survivor).await.expect("save");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(survivor.scope(item.stored_qty()).await.expect("read"), Some(1));
    assert!(!survivor.feed_stats().leader, "another environment leads");
    item
}

/// Writes `item` outside EarnORM while its leader is gone, and polls until
/// `survivor` reads it fresh: how long after `gone` that was.
async fn written_in_the_gap(survivor: &Environment, item: &Item, gone: Instant) -> Option<Duration> {
    raw(survivor)
        .update_one(doc! { "_id": item.id }, doc! { "$set": { "qty": 2 } })
        .await
        .expect("outside write during the gap");
    until_qty(survivor, item, 2, Duration::from_secs(5))
        .await
        .map(|_| gone.elapsed())
}

/// An EarnORM bulk write to the collection that does not touch `id`.
async fn bulk_write(env: &Environment, kind: usize, id: ObjectId) {
    match kind {
        0 => Item::insert_many(&mut [Item::new("other", 9)])
            .in_env(env)
            .await
            .expect("insert_many"),
        1 => {
            let matched = Item::update_many(doc! { "name": "nobody" }, doc! { "$set": { "qty": 0 } })
                .in_env(env)
                .await
                .expect("update_many");
            assert_eq!(matched, 0);
        }
        _ => {
            let deleted = Item::delete_many(doc! { "_id": { "$ne": id }, "name": "other" })
                .in_env(env)
                .await
                .expect("delete_many");
            let _ = deleted;
        }
    }
}

/// Bug: an outside transaction that wrote record X, then an EarnORM bulk
/// write to the same collection (which does not touch X) and a reader that
/// cached X's old state before the commit: the feed skipped the commit's
/// event (the bulk write's note was later than the transaction's statement),
/// and X stayed stale until its TTL. Through a raw-driver transaction and
/// `Transaction::session()`, with each of the three bulk writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_transaction_committed_after_an_orm_bulk_write_is_invalidated() {
    let env = connect(feed_config("feed_tx")).await;
    assert!(wait_for_leader(&env, Duration::from_secs(5)).await, "the feed leads");
    let mut failures = Vec::new();
    for variant in 0..6 {
        let (through_orm, kind) = (variant >= 3, variant % 3);
        let mut item = Item::new("x", 1);
        item.save().in_env(&env).await.expect("save");
        let id = item.id.expect("id");
        // Let the save's own event pass.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut cached = item.clone();
        cached.qty = 1;

        // The outside write, not committed yet.
        let mut session = env.client().start_session().await.expect("session");
        let mut tx = None;
        if through_orm {
            let mut t = env.start_transaction().await.expect("transaction");
            raw(&env)
                .update_one(doc! { "_id": id }, doc! { "$set": { "qty": 2 } })
                .session(t.session())
                .await
                .expect("update in the transaction");
            tx = Some(t);
        } else {
            session.start_transaction().await.expect("start");
            raw(&env)
                .update_one(doc! { "_id": id }, doc! { "$set": { "qty": 2 } })
                .session(&mut session)
                .await
                .expect("update in the transaction");
        }
        bulk_write(&env, kind, id).await;
        // A reader caches the state before the commit.
        assert_eq!(env.scope(cached.stored_qty()).await.expect("read"), Some(1));
        assert_eq!(
            CachedItem::find_by_id(id)
                .in_env(&env)
                .await
                .expect("find")
                .map(|i| i.qty),
            Some(1)
        );
        match tx {
            Some(t) => t.commit().await.expect("commit"),
            None => session.commit_transaction().await.expect("commit"),
        }
        let took = until_qty(&env, &cached, 2, Duration::from_secs(3)).await;
        let record = {
            let start = Instant::now();
            loop {
                let qty = CachedItem::find_by_id(id)
                    .in_env(&env)
                    .await
                    .expect("find")
                    .map(|i| i.qty);
                if qty == Some(2) || start.elapsed() > Duration::from_secs(3) {
                    break (qty == Some(2)).then(|| start.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        };
        println!("variant {variant}: #[cached] fresh after {took:?}, record cache after {record:?}");
        if took.is_none() || record.is_none() {
            failures.push(variant);
        }
    }
    assert!(failures.is_empty(), "stale after the commit in variants {failures:?}");
    let _ = env.database().drop().await;
}

/// Bug: the feed invalidated one event per Redis round trip, in series:
/// an outside `update_many` of thousands of cached records stayed stale
/// for seconds. The events of one server batch go in one round trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_update_many_of_thousands_is_invalidated_in_few_round_trips() {
    const RECORDS: usize = 3_000;
    let env = connect(feed_config("feed_bulk")).await;
    assert!(wait_for_leader(&env, Duration::from_secs(5)).await, "the feed leads");
    let items: Vec<Item> = (0..RECORDS)
        .map(|i| Item::new("bulk", i64::try_from(i).unwrap_or(0)))
        .collect();
    let documents: Vec<Document> = items
        .iter()
        .map(|item| doc! { "_id": item.id, "name": &item.name, "qty": 0 })
        .collect();
    raw(&env).insert_many(documents).await.expect("insert");
    let ids: Vec<ObjectId> = items.iter().filter_map(|item| item.id).collect();
    // Let the inserts' events pass, then cache every record.
    let start = Instant::now();
    while env.feed_stats().events < u64::try_from(RECORDS).unwrap_or(0) {
        assert!(start.elapsed() < Duration::from_secs(20), "{:?}", env.feed_stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cached = CachedItem::find_many_by_ids(&ids).in_env(&env).await.expect("fill");
    assert_eq!(cached.len(), RECORDS);
    let hits = env.cache().stats().hits;
    let again = CachedItem::find_many_by_ids(&ids).in_env(&env).await.expect("hits");
    assert_eq!(again.len(), RECORDS);
    assert_eq!(
        env.cache().stats().hits - hits,
        u64::try_from(RECORDS).unwrap_or(0),
        "all cached"
    );

    let before = env.feed_stats();
    raw(&env)
        .update_many(doc! { "name": "bulk" }, doc! { "$set": { "qty": 1 } })
        .await
        .expect("raw update_many");
    let acked = Instant::now();
    let last = *ids.last().expect("ids");
    let mut fresh_after = None;
    while acked.elapsed() < Duration::from_secs(10) {
        if CachedItem::find_by_id(last)
            .in_env(&env)
            .await
            .expect("find")
            .map(|i| i.qty)
            == Some(1)
        {
            fresh_after = Some(acked.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let start = Instant::now();
    while env.feed_stats().events - before.events < u64::try_from(RECORDS).unwrap_or(0) {
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", env.feed_stats());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = env.feed_stats();
    let round_trips = after.batches - before.batches;
    println!(
        "{RECORDS} records: the last one fresh {fresh_after:?} after the acknowledgement, in {round_trips} round trips"
    );
    assert!(fresh_after.is_some(), "invalidated");
    let all = CachedItem::find_many_by_ids(&ids).in_env(&env).await.expect("read");
    assert!(all.iter().all(|item| item.qty == 1), "every record is fresh");
    assert!(
        round_trips * 10 <= u64::try_from(RECORDS).unwrap_or(0),
        "{round_trips} round trips for {RECORDS} events"
    );
    let _ = env.database().drop().await;
}

/// Bug: a leader cut off from MongoDB (its connection stalls: no error, no
/// answer) kept renewing nothing, claimed to lead for the whole stall, and
/// was replaced only when its lease ran out, 1.5 s later. It now steps down
/// when its stream has not answered within a bound, and another environment
/// takes over and invalidates the writes of the gap within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_mongodb_steps_down_and_is_replaced_within_a_second() {
    let proxy = TcpProxy::start(mongo_port()).await;
    let base = feed_config("feed_stall");
    let cut_off = connect(earnorm::Config {
        mongo_uri: format!("mongodb://127.0.0.1:{}/?directConnection=true", proxy.port()),
        ..base.clone()
    })
    .await;
    assert!(wait_for_leader(&cut_off, Duration::from_secs(5)).await, "leads first");
    let survivor = connect(base).await;
    let item = cached_while_following(&survivor).await;

    proxy.stall();
    let stalled = Instant::now();
    let fresh = written_in_the_gap(&survivor, &item, stalled).await;
    let start = Instant::now();
    while cut_off.feed_stats().leader && start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stepped_down = (!cut_off.feed_stats().leader).then(|| stalled.elapsed());
    println!("stalled: the gap's write fresh after {fresh:?}; the cut-off leader stepped down after {stepped_down:?}");
    assert!(stepped_down.is_some(), "the cut-off leader stops claiming to lead");
    assert!(survivor.feed_stats().leader, "the survivor leads");
    assert!(
        fresh.is_some_and(|t| t < Duration::from_millis(1200)),
        "the gap's write invalidated within the takeover bound: {fresh:?}"
    );
    proxy.cut();
    let _ = survivor.database().drop().await;
}

/// The leader process of `a_killed_leader_is_replaced_within_a_second`:
/// connects with the feed on, prints `leading` once it leads, then waits to
/// be killed. Run only as a child process (it returns at once otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the leader child process of a_killed_leader_is_replaced_within_a_second"]
async fn child_leader() {
    let (Ok(database), Ok(prefix)) = (std::env::var("EARNORM_CHILD_DB"), std::env::var("EARNORM_CHILD_PREFIX")) else {
        return;
    };
    let env = connect(earnorm::Config {
        mongo_uri: require_mongo(),
        database,
        redis_uri: Some(support::require_redis()),
        cache_config: slow_heartbeats(&prefix),
        connect_timeout: Duration::from_secs(5),
        feed: true,
    })
    .await;
    assert!(wait_for_leader(&env, Duration::from_secs(10)).await, "leads");
    let mut out = std::io::stdout();
    writeln!(out, "leading").expect("stdout");
    out.flush().expect("flush");
    tokio::time::sleep(Duration::from_secs(60)).await;
}

/// Bug: a killed leader was replaced 1.4 s later (its lease lasted 1.5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_a_second() {
    let (database, prefix) = (unique_name("feed_kill"), unique_name("feed_kill"));
    let mut child = ChildTest::start(
        "child_leader",
        &[
            ("EARNORM_CHILD_DB", database.as_str()),
            ("EARNORM_CHILD_PREFIX", prefix.as_str()),
        ],
    );
    child.answer("leading");
    let survivor = connect(earnorm::Config {
        mongo_uri: require_mongo(),
        database: database.clone(),
        redis_uri: Some(support::require_redis()),
        cache_config: slow_heartbeats(&prefix),
        connect_timeout: Duration::from_secs(5),
        feed: true,
    })
    .await;
    let item = cached_while_following(&survivor).await;

    child.kill();
    let killed = Instant::now();
    let fresh = written_in_the_gap(&survivor, &item, killed).await;
    println!("killed: the gap's write fresh after {fresh:?}");
    assert!(survivor.feed_stats().leader, "the survivor leads");
    assert!(
        fresh.is_some_and(|t| t < Duration::from_millis(1200)),
        "the gap's write invalidated within the takeover bound: {fresh:?}"
    );
    let _ = survivor.database().drop().await;
}

/// Bug: a new leader with no resume token invalidated everything after
/// `connect` had returned, wiping the first values a program cached.
/// `connect` now returns once the feed is ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_reads_after_connect_are_not_wiped_by_the_feed_starting() {
    let config = feed_config("feed_first");
    let plain = connect(earnorm::Config {
        feed: false,
        ..config.clone()
    })
    .await;
    let id = ObjectId::new();
    raw(&plain)
        .insert_one(doc! { "_id": id, "name": "first", "qty": 1 })
        .await
        .expect("insert");
    drop(plain);

    let env = connect(config).await;
    let start = Instant::now();
    assert!(CachedItem::find_by_id(id).in_env(&env).await.expect("find").is_some());
    let misses = env.cache().stats().misses;
    let mut reads = 0;
    while start.elapsed() < Duration::from_millis(800) {
        assert!(CachedItem::find_by_id(id).in_env(&env).await.expect("find").is_some());
        reads += 1;
        assert_eq!(
            env.cache().stats().misses,
            misses,
            "read {reads} missed: the feed's start wiped the first value ({:?})",
            env.feed_stats()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(env.feed_stats().leader, "{:?}", env.feed_stats());
    let _ = env.database().drop().await;
}
