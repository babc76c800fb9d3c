//! Cached ORM reads: the record cache (`#[earnorm(cache(ttl = ..))]`) behind
//! `find_by_id` and `find_many_by_ids`, negative caching, the query cache
//! (`.cached(ttl)` on `find`, `find_one` and `count`), and the statistics
//! per model and per cached method.

use std::time::{Duration, Instant};

use earnorm::bson::{doc, oid::ObjectId, Document};
use earnorm::prelude::*;
use earnorm::{Environment, NamedStats};
use serde::{Deserialize, Serialize};
use support::{connect, test_config, test_env};

/// A model with a record cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "books", cache(ttl = 300))]
struct Book {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    title: String,
    copies: i64,
}

/// The same collection, with "no such record" cached too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "books", cache(ttl = 300, missing = 30))]
struct KnownBook {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    title: String,
    copies: i64,
}

impl Book {
    fn new(title: &str, copies: i64) -> Self {
        Self {
            id: None,
            title: title.into(),
            copies,
        }
    }

    /// A cached method, to see its statistics next to the record cache's.
    #[cached(ttl = 60)]
    async fn shelf_total() -> earnorm::Result<u64> {
        Book::count(doc! {}).await
    }
}

/// The statistics of `name` in `model`'s namespace (zeros when unused).
fn stats(env: &Environment, model: &str, name: &str) -> (u64, u64) {
    let namespace = env.model_scope(model);
    env.cache()
        .stats_by_name()
        .into_iter()
        .find(|s: &NamedStats| s.namespace == namespace && s.name == name)
        .map_or((0, 0), |s| (s.hits, s.misses))
}

fn raw(env: &Environment) -> earnorm::mongodb::Collection<Document> {
    env.database().collection("books")
}

async fn seeded(env: &Environment, books: &mut [Book]) {
    for book in books.iter_mut() {
        book.save().in_env(env).await.expect("save");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_by_id_reads_through_the_record_cache_and_writes_invalidate_only_their_record() {
    let env = test_env("record_cache").await;
    let mut books = [Book::new("Dune", 3), Book::new("Emma", 5)];
    seeded(&env, &mut books).await;
    let (a, b) = (books[0].id.expect("id"), books[1].id.expect("id"));

    assert_eq!(
        Book::find_by_id(a).in_env(&env).await.expect("find"),
        Some(books[0].clone())
    );
    assert_eq!(stats(&env, "books", "record"), (0, 1), "a miss first");
    assert_eq!(
        Book::find_by_id(a).in_env(&env).await.expect("find"),
        Some(books[0].clone())
    );
    assert_eq!(stats(&env, "books", "record"), (1, 1), "then a hit");
    assert_eq!(
        Book::find_by_id(b).in_env(&env).await.expect("find"),
        Some(books[1].clone())
    );

    // A save of one record: that record is read again, the other is still a hit.
    books[0].copies = 2;
    books[0].save().in_env(&env).await.expect("save");
    assert_eq!(
        Book::find_by_id(a).in_env(&env).await.expect("find").expect("a").copies,
        2
    );
    assert_eq!(stats(&env, "books", "record"), (1, 3), "the saved record missed");
    assert_eq!(
        Book::find_by_id(b).in_env(&env).await.expect("find").expect("b").copies,
        5
    );
    assert_eq!(stats(&env, "books", "record"), (2, 3), "the other one is still cached");

    // A bulk write invalidates every record of the model.
    Book::update_many(doc! {}, doc! { "$inc": { "copies": 10 } })
        .in_env(&env)
        .await
        .expect("update_many");
    assert_eq!(
        Book::find_by_id(a).in_env(&env).await.expect("find").expect("a").copies,
        12
    );
    assert_eq!(
        Book::find_by_id(b).in_env(&env).await.expect("find").expect("b").copies,
        15
    );
    assert_eq!(stats(&env, "books", "record"), (2, 5));

    // A transaction invalidates at commit.
    let mut tx = env.start_transaction().await.expect("transaction");
    let mut changed = books[1].clone();
    changed.copies = 1;
    changed.save().session(&mut tx).await.expect("save in the transaction");
    assert_eq!(
        Book::find_by_id(b).in_env(&env).await.expect("find").expect("b").copies,
        15,
        "not committed yet"
    );
    tx.commit().await.expect("commit");
    assert_eq!(
        Book::find_by_id(b).in_env(&env).await.expect("find").expect("b").copies,
        1
    );

    // A delete: the record is gone from the cache too.
    books[0].delete().in_env(&env).await.expect("delete");
    assert_eq!(Book::find_by_id(a).in_env(&env).await.expect("find"), None);
    assert_eq!(Book::find_by_id(a).in_env(&env).await.expect("find"), None);
    assert_eq!(
        stats(&env, "books", "record"),
        (3, 8),
        "the uncommitted read was a hit; the one after the commit and both \
         reads after the delete were misses: without `missing`, an absent \
         record is read every time"
    );
    let _ = env.database().drop().await;
}

/// Every action takes `.session(&mut tx)`: writes are applied, and
/// invalidated, at the commit; reads inside the transaction see its writes
/// and never the cache, while reads outside see the committed state only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_read_and_write_runs_inside_a_transaction() {
    let env = test_env("every_tx").await;
    let mut kept = Book::new("kept", 1);
    kept.save().in_env(&env).await.expect("save");
    let kept_id = kept.id.expect("id");
    // Cached before the transaction: a stale hit after the commit would show.
    assert_eq!(
        Book::find_by_id(kept_id).in_env(&env).await.expect("find"),
        Some(kept.clone())
    );

    let mut tx = env.start_transaction().await.expect("transaction");
    let mut books = vec![Book::new("a", 1), Book::new("b", 2)];
    Book::insert_many(&mut books)
        .session(&mut tx)
        .await
        .expect("insert_many");
    let mut third = Book::new("c", 3);
    third.save().session(&mut tx).await.expect("save");
    let ids: Vec<ObjectId> = books.iter().chain([&third]).map(|b| b.id.expect("id")).collect();

    assert_eq!(
        Book::find_by_id(ids[0]).session(&mut tx).await.expect("find in tx"),
        Some(books[0].clone()),
        "the transaction sees its own insert"
    );
    assert_eq!(
        Book::find_by_id(ids[0]).in_env(&env).await.expect("find outside"),
        None,
        "nothing is visible outside before the commit"
    );
    let found = Book::find_many_by_ids(&ids).session(&mut tx).await.expect("many in tx");
    assert_eq!(found.len(), 3);
    assert_eq!(Book::count(doc! {}).session(&mut tx).await.expect("count in tx"), 4);
    let counted = Book::aggregate(vec![doc! { "$count": "n" }])
        .session(&mut tx)
        .await
        .expect("aggregate in tx");
    assert_eq!(counted[0].get_i32("n").expect("n"), 4, "{counted:?}");
    let err = Book::aggregate(vec![doc! { "$out": "elsewhere" }])
        .session(&mut tx)
        .await
        .expect_err("a writing pipeline is refused in a transaction");
    assert!(matches!(err, earnorm::Error::InvalidQuery { .. }), "{err:?}");
    assert_eq!(Book::count(doc! {}).in_env(&env).await.expect("count outside"), 1);
    let changed = Book::update_many(doc! {}, doc! { "$inc": { "copies": 10 } })
        .session(&mut tx)
        .await
        .expect("update_many");
    assert_eq!(changed, 4);
    assert_eq!(
        Book::find_one(doc! { "title": "kept" })
            .session(&mut tx)
            .await
            .expect("find_one in tx")
            .map(|b| b.copies),
        Some(11)
    );
    assert_eq!(
        Book::find_by_id(kept_id)
            .in_env(&env)
            .await
            .expect("find outside")
            .map(|b| b.copies),
        Some(1),
        "outside, the cached committed state"
    );
    let gone = Book::delete_many(doc! { "title": "a" })
        .session(&mut tx)
        .await
        .expect("delete_many");
    assert_eq!(gone, 1);
    let stored_b = Book::find_by_id(ids[1])
        .session(&mut tx)
        .await
        .expect("find")
        .expect("b");
    assert!(stored_b.delete().session(&mut tx).await.expect("delete"));
    let left: Vec<String> = Book::find(doc! {})
        .sort(doc! { "title": 1 })
        .session(&mut tx)
        .await
        .expect("find in tx")
        .into_iter()
        .map(|b| b.title)
        .collect();
    assert_eq!(left, ["c", "kept"]);
    tx.commit().await.expect("commit");

    assert_eq!(
        Book::find_by_id(kept_id)
            .in_env(&env)
            .await
            .expect("find")
            .map(|b| b.copies),
        Some(11),
        "the commit invalidated the cached record"
    );
    let after = Book::find_many_by_ids(&ids).in_env(&env).await.expect("many");
    assert_eq!(after.iter().map(|b| b.title.as_str()).collect::<Vec<_>>(), ["c"]);

    // An aborted transaction writes nothing.
    let mut tx = env.start_transaction().await.expect("transaction");
    let mut never = Book::new("never", 1);
    never.save().session(&mut tx).await.expect("save");
    tx.abort().await.expect("abort");
    assert_eq!(Book::count(doc! {}).in_env(&env).await.expect("count"), 2);
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_driver_write_invalidates_the_record_cache_through_the_feed() {
    let mut config = test_config("record_feed");
    config.feed = true;
    let env = connect(config).await;
    let start = Instant::now();
    while !env.feed_stats().leader {
        assert!(start.elapsed() < Duration::from_secs(5), "the feed leads");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut books = [Book::new("Dune", 3), Book::new("Emma", 5)];
    seeded(&env, &mut books).await;
    let (a, b) = (books[0].id.expect("id"), books[1].id.expect("id"));
    // Let the feed's echo of the seeding pass, then fill the cache.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in [a, b, a, b] {
        Book::find_by_id(id).in_env(&env).await.expect("find");
    }
    let (hits, _) = stats(&env, "books", "record");
    assert_eq!(hits, 2, "both records cached");

    raw(&env)
        .update_one(doc! { "_id": a }, doc! { "$set": { "copies": 99 } })
        .await
        .expect("raw update");
    let written = Instant::now();
    loop {
        let copies = Book::find_by_id(a).in_env(&env).await.expect("find").expect("a").copies;
        if copies == 99 {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "the raw write was not invalidated: {:?}",
            env.feed_stats()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!(
        "a raw update was read through the record cache {:?} after it",
        written.elapsed()
    );
    let (hits_before, _) = stats(&env, "books", "record");
    assert_eq!(
        Book::find_by_id(b).in_env(&env).await.expect("find").expect("b").copies,
        5
    );
    assert_eq!(
        stats(&env, "books", "record").0,
        hits_before + 1,
        "the other record stayed cached"
    );
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_records_are_cached_only_when_asked_and_an_insert_invalidates_them() {
    let env = test_env("record_missing").await;
    let id = ObjectId::new();
    assert_eq!(KnownBook::find_by_id(id).in_env(&env).await.expect("find"), None);
    assert_eq!(KnownBook::find_by_id(id).in_env(&env).await.expect("find"), None);
    assert_eq!(stats(&env, "books", "record"), (1, 1), "\"no such record\" was cached");

    let mut book = KnownBook {
        id: Some(id),
        title: "Ulysses".into(),
        copies: 1,
    };
    book.save().in_env(&env).await.expect("insert with that id");
    assert_eq!(
        KnownBook::find_by_id(id).in_env(&env).await.expect("find"),
        Some(book),
        "the insert invalidated the cached absence"
    );
    // The two types keep separate entries for the same record.
    let plain = Book::find_by_id(id).in_env(&env).await.expect("find").expect("found");
    assert_eq!(plain.title, "Ulysses");
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_many_by_ids_keeps_order_drops_duplicates_and_missing_and_mixes_hits_and_misses() {
    let env = test_env("record_many").await;
    let mut books = [Book::new("A", 1), Book::new("B", 2), Book::new("C", 3)];
    seeded(&env, &mut books).await;
    let [a, b, c] = [0, 1, 2].map(|i| books[i].id.expect("id"));
    let nobody = ObjectId::new();

    assert!(Book::find_many_by_ids(&[]).in_env(&env).await.expect("none").is_empty());
    // Cache two of the three.
    Book::find_by_id(a).in_env(&env).await.expect("find");
    Book::find_by_id(b).in_env(&env).await.expect("find");
    let before = stats(&env, "books", "record");

    let found = Book::find_many_by_ids(&[c, nobody, a, b, c, a])
        .in_env(&env)
        .await
        .expect("find many");
    let titles: Vec<&str> = found.iter().map(|b| b.title.as_str()).collect();
    assert_eq!(
        titles,
        ["C", "A", "B"],
        "order of first appearance, each once, none for the missing id"
    );
    let after = stats(&env, "books", "record");
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (2, 2),
        "a and b were hits; c and the missing id were misses"
    );

    // Now c is cached too; the missing id is not (no `missing` TTL).
    let again = Book::find_many_by_ids(&[a, b, c, nobody])
        .in_env(&env)
        .await
        .expect("again");
    assert_eq!(again.len(), 3);
    let last = stats(&env, "books", "record");
    assert_eq!((last.0 - after.0, last.1 - after.1), (3, 1));

    // A write to one of them is seen.
    books[1].title = "B2".into();
    books[1].save().in_env(&env).await.expect("save");
    let fresh = Book::find_many_by_ids(&[a, b, c]).in_env(&env).await.expect("fresh");
    assert_eq!(fresh[1].title, "B2");

    // Without Redis at all, the same answers.
    let plain = Environment::connect(earnorm::Config {
        redis_uri: None,
        ..test_config("record_many_plain")
    })
    .await
    .expect("connect");
    let mut more = [Book::new("X", 1), Book::new("Y", 2)];
    seeded(&plain, &mut more).await;
    let [x, y] = [0, 1].map(|i| more[i].id.expect("id"));
    let listed = Book::find_many_by_ids(&[y, nobody, x, y])
        .in_env(&plain)
        .await
        .expect("plain");
    let titles: Vec<&str> = listed.iter().map(|b| b.title.as_str()).collect();
    assert_eq!(titles, ["Y", "X"]);
    let _ = plain.database().drop().await;
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_cache_serves_find_find_one_and_count_until_any_write_to_the_collection() {
    let env = test_env("query_cache").await;
    let mut books = [Book::new("A", 1), Book::new("B", 2), Book::new("C", 3)];
    seeded(&env, &mut books).await;
    let minute = Duration::from_secs(60);
    let query = || {
        Book::find(doc! { "copies": { "$gte": 2 } })
            .in_env(&env)
            .sort(doc! { "copies": -1 })
            .limit(5)
            .cached(minute)
    };
    let titles = |found: Vec<Book>| found.into_iter().map(|b| b.title).collect::<Vec<_>>();
    assert_eq!(titles(query().await.expect("find")), ["C", "B"]);
    assert_eq!(titles(query().await.expect("find")), ["C", "B"]);
    assert_eq!(stats(&env, "books", "find"), (1, 1), "the second was a hit");

    // Options are part of the entry: another limit is another query.
    let one = Book::find(doc! { "copies": { "$gte": 2 } })
        .in_env(&env)
        .sort(doc! { "copies": -1 })
        .limit(1)
        .cached(minute)
        .await
        .expect("find");
    assert_eq!(titles(one), ["C"]);
    assert_eq!(stats(&env, "books", "find"), (1, 2));

    // Key order: the same filter with its keys in another order is another
    // entry (MongoDB compares documents with their key order too).
    let ordered = |filter: Document| Book::count(filter).in_env(&env).cached(minute);
    assert_eq!(ordered(doc! { "copies": 2, "title": "B" }).await.expect("count"), 1);
    assert_eq!(ordered(doc! { "title": "B", "copies": 2 }).await.expect("count"), 1);
    assert_eq!(stats(&env, "books", "count"), (0, 2), "two entries");
    assert_eq!(ordered(doc! { "title": "B", "copies": 2 }).await.expect("count"), 1);
    assert_eq!(stats(&env, "books", "count"), (1, 2));

    let first = || Book::find_one(doc! { "title": "Z" }).in_env(&env).cached(minute);
    assert_eq!(first().await.expect("find_one"), None);
    assert_eq!(first().await.expect("find_one"), None);
    assert_eq!(
        stats(&env, "books", "find_one"),
        (1, 1),
        "\"none matched\" is cached too"
    );

    // Uncached reads never touch the cache.
    Book::find(doc! {}).in_env(&env).await.expect("find");
    assert_eq!(stats(&env, "books", "find"), (1, 2));

    // Any write to the collection invalidates every cached query over it.
    let mut z = Book::new("Z", 7);
    z.save().in_env(&env).await.expect("save");
    assert_eq!(first().await.expect("find_one").map(|b| b.title), Some("Z".into()));
    assert_eq!(titles(query().await.expect("find")), ["Z", "C", "B"]);
    assert_eq!(ordered(doc! { "title": "B", "copies": 2 }).await.expect("count"), 1);
    assert_eq!(stats(&env, "books", "find"), (1, 3));

    // And the cached method sits in the same table under its own name.
    env.scope(async {
        Book::shelf_total().await.expect("total");
        Book::shelf_total().await.expect("total");
    })
    .await;
    assert_eq!(stats(&env, "books", "shelf_total"), (1, 1));
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_fills_the_record_cache_so_that_reads_are_hits() {
    let env = test_env("warm").await;
    let docs: Vec<Document> = (0..1200)
        .map(|i| doc! { "title": format!("book {i}"), "copies": i64::from(i % 3) })
        .collect();
    raw(&env).insert_many(docs).await.expect("insert");
    let warmed = Book::warm_in(&env, doc! { "copies": { "$gt": 0 } })
        .await
        .expect("warm");
    assert_eq!(warmed, 800, "the matching records");
    let (hits, misses) = stats(&env, "books", "record");
    let matching: Vec<Book> = Book::find(doc! { "copies": { "$gt": 0 } })
        .in_env(&env)
        .await
        .expect("find");
    for book in &matching {
        Book::find_by_id(book.id.expect("id")).in_env(&env).await.expect("read");
    }
    let after = stats(&env, "books", "record");
    assert_eq!(
        (after.0 - hits, after.1 - misses),
        (800, 0),
        "every warmed record is a hit"
    );

    let ids: Vec<ObjectId> = Book::find(doc! { "copies": 0 })
        .in_env(&env)
        .limit(3)
        .await
        .expect("find")
        .into_iter()
        .map(|b| b.id.expect("id"))
        .collect();
    assert_eq!(Book::warm_ids_in(&env, &ids).await.expect("warm ids"), 3);
    assert!(
        matches!(Note::warm_in(&env, doc! {}).await, Err(earnorm::Error::Config(_))),
        "a model without a record cache cannot be warmed"
    );
    let _ = env.database().drop().await;
}

/// No record cache.
#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "notes")]
struct Note {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
}

/// Bug: one `find_many_by_ids` of thousands of ids looked them all up in
/// one command, whose answer outlived the operation timeout: nothing was
/// ever served from the cache or stored (and the connection was taken for
/// dead). Batches go in chunks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn find_many_by_ids_of_25_000_ids_is_served_from_the_cache() {
    const RECORDS: usize = 25_000;
    let env = test_env("record_cache_big").await;
    let ids: Vec<ObjectId> = (0..RECORDS).map(|_| ObjectId::new()).collect();
    let documents: Vec<Document> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| doc! { "_id": id, "title": format!("t{i}"), "copies": 1_i64 })
        .collect();
    raw(&env).insert_many(documents).await.expect("insert");
    let first = Book::find_many_by_ids(&ids).in_env(&env).await.expect("first");
    assert_eq!(first.len(), RECORDS);
    let hits = env.cache().stats().hits;
    let second = Book::find_many_by_ids(&ids).in_env(&env).await.expect("second");
    assert_eq!(second, first);
    assert_eq!(
        env.cache().stats().hits - hits,
        u64::try_from(RECORDS).unwrap_or(0),
        "every record served from the cache: {:?}",
        env.cache().stats()
    );
    assert_eq!(env.cache().status(), earnorm::ConnectionStatus::Connected);
    let _ = env.database().drop().await;
}

/// Bug: a batch lookup (`find_many_by_ids`) decoded its hits inline, and a
/// stored value that did not decode was neither counted nor removed (a
/// lookup of one key does both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_lookup_counts_and_removes_values_that_do_not_decode() {
    let env = test_env("record_cache_corrupt").await;
    let mut books = [Book::new("Dune", 3), Book::new("Emma", 5), Book::new("Ulysses", 7)];
    seeded(&env, &mut books).await;
    let ids: Vec<ObjectId> = books.iter().filter_map(|b| b.id).collect();
    Book::find_many_by_ids(&ids).in_env(&env).await.expect("fill");

    // Every cached value of the prefix replaced by bytes no envelope has.
    let mut conn = support::shared_redis().await;
    let pattern = format!("{}v:*", earnorm::cache_layer::escape_glob(&env.cache().config().prefix));
    let keys = conn.scan_matching(&pattern).await;
    assert_eq!(keys.len(), 3, "{keys:?}");
    for key in &keys {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg("not an envelope")
            .arg("KEEPTTL")
            .query_async(&mut conn)
            .await
            .expect("set");
    }
    let before = env.cache().stats().decode_errors;
    let found = Book::find_many_by_ids(&ids).in_env(&env).await.expect("read");
    assert_eq!(found.len(), 3, "read from MongoDB instead");
    assert_eq!(env.cache().stats().decode_errors - before, 3, "counted");
    let hits = env.cache().stats().hits;
    Book::find_many_by_ids(&ids).in_env(&env).await.expect("read again");
    assert_eq!(env.cache().stats().hits - hits, 3, "stored again, then hits");
    let _ = env.database().drop().await;
}

/// A batch stores its values without the compare-and-set (each carries the
/// generations its computation began under): one that a write made stale
/// while it was computed is stored, but never served. Without Redis, the
/// same for the in-process tier: it is not kept (the fence of the tier).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_value_computed_across_a_write_is_never_served() {
    use earnorm::cache_layer::Scope;
    for embedded in [false, true] {
        let env = if embedded {
            connect(earnorm::Config {
                redis_uri: None,
                ..test_config("batch_across_write_embedded")
            })
            .await
        } else {
            test_env("batch_across_write").await
        };
        let cache = env.cache().clone();
        let keys: Vec<_> = ["1", "2"]
            .iter()
            .map(|id| {
                cache
                    .key("batch", "value")
                    .scope(Scope::Record("batch", id))
                    .build()
                    .expect("key")
            })
            .collect();
        let minute = |_: &u32| Some(Duration::from_secs(60));
        // The computation reads "old" values, then a write to record 1 lands
        // and invalidates before the batch stores.
        let first: Result<Vec<u32>, ()> = cache
            .get_many_or_compute(&keys, minute, |missed| {
                let cache = cache.clone();
                async move {
                    cache.invalidate(&[Scope::Record("batch", "1")]).await;
                    Ok(missed.iter().map(|_| 1).collect())
                }
            })
            .await;
        assert_eq!(first, Ok(vec![1, 1]));
        // Record 2's value is served; record 1's is computed again.
        let again: Result<Vec<u32>, ()> = cache
            .get_many_or_compute(&keys, minute, |missed| async move {
                assert_eq!(missed, [0], "only the value computed across the write");
                Ok(vec![2])
            })
            .await;
        assert_eq!(again, Ok(vec![2, 1]), "embedded: {embedded}");
        assert_eq!(cache.stats().local_hits, u64::from(embedded));
        let _ = env.database().drop().await;
    }
}

/// A batch's store extends a generation its value depends on that would
/// expire first (else the value would miss once the generation is gone,
/// long before its TTL): one that existed before the batch, its life cut
/// short here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_store_extends_a_generation_that_would_expire_before_its_value() {
    use earnorm::cache_layer::Scope;
    let env = test_env("batch_extends").await;
    let cache = env.cache().clone();
    let key = cache
        .key("batch", "extended")
        .scope(Scope::Record("batch", "1"))
        .build()
        .expect("key");
    let keys = [key.clone()];
    let ten_minutes = |_: &u32| Some(Duration::from_secs(600));
    let computed =
        |value: u32| move |missed: Vec<usize>| async move { Ok::<_, ()>(missed.iter().map(|_| value).collect()) };
    assert_eq!(
        cache.get_many_or_compute(&keys, ten_minutes, computed(1)).await,
        Ok(vec![1])
    );

    let mut conn = support::shared_redis().await;
    for generation in key.generations() {
        let _: () = redis::cmd("PEXPIRE")
            .arg(generation)
            .arg(5_000)
            .query_async(&mut conn)
            .await
            .expect("pexpire");
    }
    let _: () = redis::cmd("DEL")
        .arg(key.as_str())
        .query_async(&mut conn)
        .await
        .expect("del");
    assert_eq!(
        cache.get_many_or_compute(&keys, ten_minutes, computed(2)).await,
        Ok(vec![2])
    );
    for generation in key.generations() {
        let left: i64 = redis::cmd("PTTL")
            .arg(generation)
            .query_async(&mut conn)
            .await
            .expect("pttl");
        assert!(left >= 599_000, "{generation} lives {left} ms, the value 600 s");
    }
    assert_eq!(
        cache.get_many_or_compute(&keys, ten_minutes, computed(3)).await,
        Ok(vec![2]),
        "served under the extended generation"
    );
    let _ = env.database().drop().await;
}
