//! What the cache guarantees about freshness, against the shared Redis
//! (`REDIS_URL`), each test under its own key prefix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use earnorm_cache::{escape_glob, CacheConfig, CacheKey, CacheManager, PlainOutput, Scope};
use support::{require_redis, unique_name};
use tokio::sync::oneshot;

async fn cache(tag: &str) -> CacheManager {
    let url = require_redis();
    let config = CacheConfig {
        prefix: format!("{}:", unique_name(tag)),
        ..Default::default()
    };
    let cache = CacheManager::connect(Some(&url), config).await.expect("connect");
    assert!(cache.ping().await.is_ok(), "Redis at {url} answers");
    cache
}

fn profile_key(cache: &CacheManager, id: &str) -> CacheKey {
    cache
        .key("users", "profile")
        .scope(Scope::Record("users", id))
        .build()
        .expect("key")
}

/// The classic race, step by step: a reader misses and reads the old row; a
/// writer commits and invalidates; the reader then tries to store the old row.
#[tokio::test]
async fn a_reader_cannot_store_a_value_read_before_a_write() {
    let cache = cache("race").await;
    let db = Arc::new(AtomicU64::new(1)); // the "database row"
    let key = profile_key(&cache, "7");

    let (read_done_tx, read_done_rx) = oneshot::channel();
    let (write_done_tx, write_done_rx) = oneshot::channel::<()>();
    let reader = {
        let (cache, key, db) = (cache.clone(), key.clone(), Arc::clone(&db));
        tokio::spawn(async move {
            cache
                .get_or_compute::<_, PlainOutput, _>(&key, None, async move {
                    let old = db.load(Ordering::SeqCst); // reads version 1
                    read_done_tx.send(()).expect("signal");
                    write_done_rx.await.expect("writer finished"); // writer commits + invalidates meanwhile
                    old
                })
                .await
        })
    };
    read_done_rx.await.expect("reader read");
    db.store(2, Ordering::SeqCst); // commit
    cache.invalidate(&[Scope::Record("users", "7")]).await; // then invalidate
    write_done_tx.send(()).expect("signal");
    assert_eq!(
        reader.await.expect("reader"),
        1,
        "the reader itself began before the write"
    );
    assert_eq!(cache.stats().stale_sets_refused, 1, "its store was refused");

    let fresh = cache
        .get_or_compute::<_, PlainOutput, _>(&key, None, async { db.load(Ordering::SeqCst) })
        .await;
    assert_eq!(fresh, 2, "after the write, the old value is not served");
    let again: Option<u64> = cache.get(&key).await.expect("get");
    assert_eq!(again, Some(2));
}

/// The same interleaving with a naive cache-aside store (plain `set` after the
/// read): the stale value lands in the cache. This is what the test above
/// would catch if the compare-and-set were missing.
#[tokio::test]
async fn the_naive_interleaving_does_leave_a_stale_value() {
    let cache = cache("naive").await;
    let key = profile_key(&cache, "7");
    let old: u64 = 1; // reader read version 1
    cache.invalidate(&[Scope::Record("users", "7")]).await; // writer commits 2 and invalidates
    cache.set(&key, &old, None).await.expect("naive store");
    let served: Option<u64> = cache.get(&key).await.expect("get");
    assert_eq!(served, Some(1), "a naive set serves the stale value");
}

#[tokio::test]
async fn writes_invalidate_their_scope_and_nothing_else() {
    let cache = cache("scopes").await;
    let get = |key: CacheKey, v: u64| {
        let cache = cache.clone();
        async move {
            cache
                .get_or_compute::<_, PlainOutput, _>(&key, None, async move { v })
                .await
        }
    };
    let user1 = profile_key(&cache, "1");
    let user2 = profile_key(&cache, "2");
    let count = cache
        .key("users", "count")
        .scope(Scope::Model("users"))
        .build()
        .expect("key");
    let order = cache
        .key("orders", "total")
        .scope(Scope::Record("orders", "1"))
        .build()
        .expect("key");
    let report = cache
        .key("reports", "daily")
        .scope(Scope::Tag("reports"))
        .build()
        .expect("key");
    for (key, v) in [(&user1, 1), (&user2, 2), (&count, 3), (&order, 4), (&report, 5)] {
        assert_eq!(get(key.clone(), v).await, v);
    }
    let cached = |key: CacheKey| {
        let cache = cache.clone();
        async move { cache.get::<u64>(&key).await.expect("get").is_some() }
    };

    // Saving user 1: user 1's entries and queries over users; not user 2, not orders.
    cache.invalidate(&[Scope::Record("users", "1")]).await;
    assert!(!cached(user1.clone()).await);
    assert!(!cached(count.clone()).await);
    assert!(cached(user2.clone()).await);
    assert!(cached(order.clone()).await);
    assert!(cached(report.clone()).await);

    // A bulk write to users: every user entry.
    get(user1.clone(), 1).await;
    get(count.clone(), 3).await;
    cache.invalidate(&[Scope::Model("users")]).await;
    assert!(!cached(user1.clone()).await);
    assert!(!cached(user2.clone()).await);
    assert!(!cached(count.clone()).await);
    assert!(cached(order.clone()).await);

    cache.invalidate(&[Scope::Tag("reports")]).await;
    assert!(!cached(report.clone()).await);
    assert!(cached(order.clone()).await);

    assert!(cache.invalidate_all().await.expect("invalidate_all") >= 1);
    assert!(!cached(order).await);
}

#[tokio::test]
async fn pattern_deletion_escapes_glob_characters_and_keeps_other_prefixes() {
    let cache = cache("pattern").await;
    let other = cache_with_prefix(&cache, "other").await;
    let ids = ["a*b", "a?b", "a[b]", r"a\b", "axb", "a[x]b", "ab"];
    for id in ids {
        cache.set(&profile_key(&cache, id), &1u8, None).await.expect("set");
        other.set(&profile_key(&other, id), &1u8, None).await.expect("set");
    }
    for target in ["a*b", "a?b", "a[b]", r"a\b"] {
        let deleted = cache
            .delete_pattern(&format!("v:users:*:{}:*", escape_glob(target)))
            .await
            .expect("delete");
        assert_eq!(deleted, 1, "exactly the key of {target:?}");
        assert!(cache
            .get::<u8>(&profile_key(&cache, target))
            .await
            .expect("get")
            .is_none());
    }
    for survivor in ["axb", "a[x]b", "ab"] {
        assert!(
            cache
                .get::<u8>(&profile_key(&cache, survivor))
                .await
                .expect("get")
                .is_some(),
            "{survivor:?} kept"
        );
    }
    for id in ids {
        assert!(
            other.get::<u8>(&profile_key(&other, id)).await.expect("get").is_some(),
            "other prefix untouched"
        );
    }
}

async fn cache_with_prefix(base: &CacheManager, tag: &str) -> CacheManager {
    let config = CacheConfig {
        prefix: format!("{}{tag}:", base.config().prefix),
        ..base.config().clone()
    };
    // `base`'s prefix is a prefix of this one; pattern deletion in `base` must
    // still leave it alone because the pattern starts with `v:`.
    CacheManager::connect(Some(&require_redis()), config)
        .await
        .expect("connect")
}

#[tokio::test]
async fn bypass_and_disabled_managers_always_compute() {
    let cache = cache("bypass").await;
    let key = profile_key(&cache, "1");
    let runs = AtomicU64::new(0);
    let compute = || async {
        runs.fetch_add(1, Ordering::SeqCst);
        5u64
    };
    cache.get_or_compute::<_, PlainOutput, _>(&key, None, compute()).await;
    earnorm_cache::bypass(cache.get_or_compute::<_, PlainOutput, _>(&key, None, compute())).await;
    assert_eq!(runs.load(Ordering::SeqCst), 2, "bypass computes");
    let off = CacheManager::disabled(CacheConfig::default());
    off.get_or_compute::<_, PlainOutput, _>(&key, None, compute()).await;
    off.get_or_compute::<_, PlainOutput, _>(&key, None, compute()).await;
    assert_eq!(runs.load(Ordering::SeqCst), 4, "a disabled manager computes every time");
    assert_eq!(off.status(), earnorm_cache::ConnectionStatus::Disabled);
}
