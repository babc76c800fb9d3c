//! `find(..).stream()` reads records one by one from the cursor: 100,000
//! documents with memory bounded by the batch size (alone in its test
//! binary, so that the process's memory is its own).

use earnorm::bson::{doc, oid::ObjectId, Document};
use earnorm::prelude::*;
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use support::test_env;

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "events")]
struct Event {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    n: i64,
    payload: String,
}

/// The process's resident memory, in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_records_stream_in_bounded_memory() {
    const N: i64 = 100_000;
    let env = test_env("stream").await;
    let raw = env.database().collection::<Document>("events");
    let payload = "x".repeat(200);
    for chunk in 0..10 {
        let docs: Vec<Document> = (0..N / 10)
            .map(|i| doc! { "n": chunk * (N / 10) + i, "payload": &payload })
            .collect();
        raw.insert_many(docs).await.expect("insert");
    }

    let before = rss_kib();
    let mut peak = before;
    let mut stream = Event::find(doc! {})
        .in_env(&env)
        .sort(doc! { "n": 1 })
        .batch_size(1000)
        .stream();
    let mut count = 0i64;
    while let Some(event) = stream.try_next().await.expect("a record") {
        assert_eq!(event.n, count, "in order");
        count += 1;
        if count % 5000 == 0 {
            peak = peak.max(rss_kib());
        }
    }
    assert_eq!(count, N);
    let streamed = peak.saturating_sub(before);

    let before = rss_kib();
    let all = Event::find(doc! {}).in_env(&env).await.expect("collect");
    let collected = rss_kib().saturating_sub(before);
    assert_eq!(all.len() as i64, N);
    drop(all);
    println!("memory growth reading {N} records: streamed {streamed} KiB, collected into a Vec {collected} KiB");
    assert!(
        streamed < 8 * 1024,
        "streaming grew the process by {streamed} KiB (collecting: {collected} KiB)"
    );
    assert!(
        collected > 2 * streamed,
        "the comparison measured something: {collected} KiB"
    );
    let _ = env.database().drop().await;
}
