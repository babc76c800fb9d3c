//! A write and its invalidation are one unit: a caller that stops waiting
//! (its future dropped, a timeout) cannot leave the write applied and its
//! scope valid, nor have the scope invalidated before the write is done.

use std::time::{Duration, Instant};

use earnorm::bson::{doc, oid::ObjectId};
use earnorm::prelude::*;
use earnorm::Environment;
use serde::{Deserialize, Serialize};
use support::test_env;

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "bulk_items")]
pub struct BulkItem {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub n: i64,
    pub flagged: bool,
}

impl BulkItem {
    /// Model scope: read from MongoDB.
    #[cached(ttl = 300)]
    pub async fn flagged_count() -> earnorm::Result<u64> {
        BulkItem::count(doc! { "flagged": true }).await
    }

    /// Model scope: read from MongoDB.
    #[cached(ttl = 300)]
    pub async fn total() -> earnorm::Result<u64> {
        BulkItem::count(doc! {}).await
    }
}

fn items(count: i64) -> Vec<BulkItem> {
    (0..count)
        .map(|n| BulkItem {
            id: None,
            n,
            flagged: false,
        })
        .collect()
}

/// Waits until the raw count of documents matching `filter` is `expected`
/// and has stayed so for one interval (the write's invalidation runs right
/// after the server acknowledges it), or a minute has passed; returns the
/// last count. A write whose caller stopped waiting runs to its end, so
/// only a lost write leaves the count short; a busy server may take longer
/// than an interval before its first document shows.
async fn settled_count(env: &Environment, filter: earnorm::bson::Document, expected: u64) -> u64 {
    let coll = env
        .database()
        .collection::<earnorm::bson::Document>(BulkItem::COLLECTION);
    let mut last = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = coll.count_documents(filter.clone()).await.expect("count");
        if (now == last && now == expected) || Instant::now() > deadline {
            return now;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_insert_many_still_invalidates_after_it_is_written() {
    let env = test_env("cancel_insert").await;
    env.scope(async {
        assert_eq!(BulkItem::total().await.expect("count"), 0);
        let mut records = items(20_000);
        let write = BulkItem::insert_many(&mut records).in_env(&env);
        let _ = tokio::time::timeout(Duration::from_millis(30), write).await;
        // A reader keeps caching while the server applies the insert.
        let written = tokio::join!(settled_count(&env, doc! {}, 20_000), async {
            for _ in 0..40 {
                let _ = BulkItem::total().await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
        .0;
        assert_eq!(written, 20_000, "the insert ran to its end after its caller left");
        assert_eq!(
            BulkItem::total().await.expect("count"),
            written,
            "the cached count is that of the completed write"
        );
    })
    .await;
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_update_many_invalidates_once_the_update_is_done() {
    let env = test_env("cancel_update").await;
    env.scope(async {
        let mut records = items(20_000);
        BulkItem::insert_many(&mut records).await.expect("insert");
        assert_eq!(BulkItem::flagged_count().await.expect("count"), 0);
        let write = BulkItem::update_many(doc! {}, doc! { "$set": { "flagged": true } }).in_env(&env);
        let _ = tokio::time::timeout(Duration::from_millis(20), write).await;
        let written = tokio::join!(settled_count(&env, doc! { "flagged": true }, 20_000), async {
            for _ in 0..40 {
                let _ = BulkItem::flagged_count().await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
        .0;
        assert_eq!(written, 20_000);
        assert_eq!(
            BulkItem::flagged_count().await.expect("count"),
            20_000,
            "no count cached while the update ran may outlive it"
        );
    })
    .await;
    let _ = env.database().drop().await;
}
