//! The in-process tier against a real MongoDB: the embedded default (no
//! Redis at all), its invalidation by ORM writes, single flight, the fence
//! against loads an invalidation overtakes, its bound, and that beside Redis
//! it stays off unless asked for.

use std::sync::Arc;
use std::time::Duration;

use earnorm::bson::{doc, oid::ObjectId};
use earnorm::prelude::*;
use earnorm::{CacheConfig, Config, Environment, LocalConfig};
use serde::{Deserialize, Serialize};
use support::{connect, ran, runs, test_config};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "wallets", cache(ttl = 300))]
pub struct Wallet {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub owner: String,
    pub cents: i64,
}

/// A cached value that is not `Clone`: kept as its payload.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    pub lines: Vec<String>,
}

impl Wallet {
    fn new(owner: &str, cents: i64) -> Self {
        Self {
            id: None,
            owner: owner.to_owned(),
            cents,
        }
    }

    /// Reads the stored record, not this copy: what a stale cache gets wrong.
    #[cached(ttl = 300)]
    pub async fn stored_cents(&self) -> earnorm::Result<i64> {
        ran(&format!("{}/stored", self.owner));
        let id = self.id.ok_or(earnorm::Error::NotInitialized)?;
        Ok(earnorm::bypass_cache(Wallet::find_by_id(id))
            .await?
            .map_or(-1, |w| w.cents))
    }

    /// The same, slowly: the write of a test lands while it computes.
    #[cached(ttl = 300)]
    pub async fn slow_stored_cents(&self) -> earnorm::Result<i64> {
        ran(&format!("{}/slow", self.owner));
        let id = self.id.ok_or(earnorm::Error::NotInitialized)?;
        let cents = earnorm::bypass_cache(Wallet::find_by_id(id))
            .await?
            .map_or(-1, |w| w.cents);
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(cents)
    }

    /// Not `Clone`.
    #[cached(ttl = 300)]
    pub async fn statement(&self) -> earnorm::Result<Statement> {
        ran(&format!("{}/statement", self.owner));
        Ok(Statement {
            lines: vec![format!("{}: {}", self.owner, self.cents)],
        })
    }

    /// Strict: never kept in process.
    #[cached(ttl = 300, local = false)]
    pub async fn strict_cents(&self) -> earnorm::Result<i64> {
        ran(&format!("{}/strict", self.owner));
        Ok(self.cents)
    }

    /// Every wallet's total: the model scope.
    #[cached(ttl = 300)]
    pub async fn total() -> earnorm::Result<i64> {
        ran("total");
        Ok(Wallet::find(doc! {}).await?.iter().map(|w| w.cents).sum())
    }
}

/// A fresh database with no Redis at all: the embedded default.
fn embedded_config(tag: &str) -> Config {
    Config {
        redis_uri: None,
        ..test_config(tag)
    }
}

async fn saved(env: &Environment, owner: &str, cents: i64) -> Wallet {
    let mut wallet = Wallet::new(owner, cents);
    wallet.save().in_env(env).await.expect("save");
    wallet
}

#[tokio::test]
async fn without_redis_the_tier_caches_and_every_orm_write_invalidates_it() {
    let env = connect(embedded_config("local_embedded")).await;
    assert_eq!(env.cache().config().local, LocalConfig::default());
    env.scope(async {
        let mut wallet = saved(&env, "ann", 100).await;
        assert_eq!(wallet.stored_cents().await.expect("first"), 100);
        assert_eq!(wallet.stored_cents().await.expect("second"), 100);
        assert_eq!(runs("ann/stored"), 1, "the second call is a hit");
        let stats = env.cache().stats();
        assert_eq!((stats.hits, stats.local_hits), (1, 1), "{stats:?}");
        assert!(env.cache().local_entries() >= 1);

        // The writer's own process never reads its old value. (The key
        // holds the record's content, so the stored value is read through
        // an unchanged copy.)
        let copy = wallet.clone();
        wallet.cents = 150;
        wallet.save().await.expect("save");
        assert_eq!(copy.stored_cents().await.expect("after save"), 150);
        assert_eq!(runs("ann/stored"), 2);

        // A bulk write drops the model's values too.
        assert_eq!(Wallet::total().await.expect("total"), 150);
        assert_eq!(Wallet::total().await.expect("total"), 150);
        assert_eq!(runs("total"), 1);
        Wallet::update_many(doc! {}, doc! { "$inc": { "cents": 1 } })
            .await
            .expect("update_many");
        assert_eq!(Wallet::total().await.expect("total"), 151);
        assert_eq!(runs("total"), 2);
        let now = Wallet::find_by_id(wallet.id.expect("id"))
            .await
            .expect("find")
            .expect("there");
        assert_eq!(now.cents, 151, "the record cache too");

        // A value that is not `Clone` is kept as its payload.
        let _ = wallet.statement().await.expect("statement");
        let again = wallet.statement().await.expect("statement");
        assert_eq!(again.lines, ["ann: 150"]);
        assert_eq!(runs("ann/statement"), 1);

        // `local = false` without Redis: nothing to cache it in.
        let _ = wallet.strict_cents().await;
        let _ = wallet.strict_cents().await;
        assert_eq!(runs("ann/strict"), 2);
    })
    .await;
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_concurrent_misses_compute_once() {
    let env = connect(embedded_config("local_flight")).await;
    env.scope(async {
        let wallet = Arc::new(saved(&env, "bo", 5).await);
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (wallet, env) = (Arc::clone(&wallet), env.clone());
                tokio::spawn(async move { env.scope(wallet.slow_stored_cents()).await })
            })
            .collect();
        for task in tasks {
            assert_eq!(task.await.expect("task").expect("cents"), 5);
        }
        assert_eq!(runs("bo/slow"), 1, "one computation for 16 callers");
    })
    .await;
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_computed_across_a_write_is_never_served_after_it() {
    let env = connect(embedded_config("local_fence")).await;
    env.scope(async {
        let wallet = saved(&env, "cy", 10).await;
        // The load reads 10, then the write lands while it sleeps.
        let loading = {
            let (wallet, env) = (wallet.clone(), env.clone());
            tokio::spawn(async move { env.scope(wallet.slow_stored_cents()).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        Wallet::update_many(doc! { "_id": wallet.id }, doc! { "$set": { "cents": 20 } })
            .await
            .expect("write");
        assert_eq!(
            loading.await.expect("task").expect("old"),
            10,
            "it read before the write"
        );
        // Had the load's value been kept, this would be 10.
        assert_eq!(wallet.slow_stored_cents().await.expect("after"), 20);
        assert_eq!(runs("cy/slow"), 2);
    })
    .await;
    let _ = env.database().drop().await;
}

#[tokio::test]
async fn the_tier_holds_at_most_its_capacity() {
    let mut config = embedded_config("local_capacity");
    config.cache_config.local = LocalConfig {
        capacity: 100,
        with_redis: false,
    };
    let env = connect(config).await;
    env.scope(async {
        for i in 0..2_000 {
            let wallet = Wallet {
                id: Some(ObjectId::new()),
                owner: format!("w{i}"),
                cents: i,
            };
            let _ = wallet.strict_cents_uncached().await;
            let _ = wallet.statement().await;
        }
        let held = env.cache().local_entries();
        assert!(held <= 100, "{held} values held");
        assert!(held > 0);
    })
    .await;
    let _ = env.database().drop().await;
}

#[tokio::test]
async fn beside_redis_the_tier_is_off_unless_asked_for() {
    let env = connect(test_config("local_off")).await;
    env.scope(async {
        let wallet = saved(&env, "di", 1).await;
        for _ in 0..3 {
            let _ = wallet.stored_cents().await;
        }
        let stats = env.cache().stats();
        assert_eq!((stats.hits, stats.local_hits), (2, 0), "{stats:?}");
        assert_eq!(env.cache().local_entries(), 0);
    })
    .await;
    let _ = env.database().drop().await;

    // Capacity 0 turns it off without Redis too: nothing is cached.
    let mut config = embedded_config("local_zero");
    config.cache_config = CacheConfig {
        local: LocalConfig {
            capacity: 0,
            with_redis: false,
        },
        ..config.cache_config
    };
    let env = connect(config).await;
    env.scope(async {
        let wallet = saved(&env, "ed", 1).await;
        let _ = wallet.stored_cents().await;
        let _ = wallet.stored_cents().await;
        assert_eq!(runs("ed/stored"), 2);
    })
    .await;
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_database_feed_invalidates_writes_made_outside_the_orm() {
    let mut config = embedded_config("local_feed");
    config.feed = true;
    let env = connect(config).await;
    assert!(env.feed_stats().enabled, "the feed runs without Redis");
    env.scope(async {
        let wallet = saved(&env, "fi", 1).await;
        // Let the feed pass the save's own event, so that the value below
        // is kept.
        assert!(env.wait_for_feed(Duration::from_secs(5)).await);
        assert_eq!(wallet.stored_cents().await.expect("read"), 1);
        assert_eq!(wallet.stored_cents().await.expect("hit"), 1);
        assert_eq!(runs("fi/stored"), 1);

        // Another service writes with the driver: no ORM invalidation.
        env.database()
            .collection::<earnorm::bson::Document>("wallets")
            .update_one(doc! { "_id": wallet.id }, doc! { "$set": { "cents": 2 } })
            .await
            .expect("raw write");
        let written = std::time::Instant::now();
        loop {
            if wallet.stored_cents().await.expect("read") == 2 {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_secs(5),
                "the feed never invalidated the raw write"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        eprintln!("raw write invalidated in process after {:?}", written.elapsed());
    })
    .await;
    let _ = env.database().drop().await;
}

/// Waits until `env`'s tier serves (beside Redis, once its invalidation
/// channel is subscribed), by reading `wallet` until a read is a local hit.
async fn until_the_tier_serves(env: &Environment, wallet: &Wallet) {
    let limit = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = env.cache().stats().local_hits;
        let _ = env.scope(wallet.stored_cents()).await;
        if env.cache().stats().local_hits > before {
            return;
        }
        assert!(
            std::time::Instant::now() < limit,
            "the tier never served: {:?}",
            env.cache().stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `find_many_by_ids` of `ids` in `env`: the cents in order, and how many
/// of the reads were served in process and how many missed.
async fn batch(env: &Environment, ids: &[ObjectId]) -> (Vec<i64>, u64, u64) {
    let before = env.cache().stats();
    let found = Wallet::find_many_by_ids(ids).in_env(env).await.expect("batch");
    let after = env.cache().stats();
    (
        found.iter().map(|w| w.cents).collect(),
        after.local_hits - before.local_hits,
        after.misses - before.misses,
    )
}

/// Batches read the tier and fill it, without Redis and beside it (where
/// what a batch computes and what it finds in Redis are both kept), and
/// `find_by_id` reads what a batch kept; a write drops its record only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_read_the_tier_and_fill_it() {
    for beside_redis in [false, true] {
        let mut config = if beside_redis {
            test_config("local_batch_redis")
        } else {
            embedded_config("local_batch")
        };
        config.cache_config.local = LocalConfig {
            capacity: 1_000,
            with_redis: true,
        };
        let env = connect(config.clone()).await;
        let mut wallets = [
            saved(&env, "ba", 1).await,
            saved(&env, "bb", 2).await,
            saved(&env, "bc", 3).await,
        ];
        until_the_tier_serves(&env, &wallets[0]).await;
        let ids: Vec<ObjectId> = wallets.iter().filter_map(|w| w.id).collect();

        assert_eq!(
            batch(&env, &ids).await,
            (vec![1, 2, 3], 0, 3),
            "beside Redis: {beside_redis}"
        );
        if beside_redis {
            // Creating the records' generations was a change to them,
            // pushed to every tier (this one too): what the first batch
            // kept is dropped, and what the second finds in Redis kept.
            // (A push still on its way may drop one again: then the next.)
            let limit = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let (cents, local, missed) = batch(&env, &ids).await;
                assert_eq!((cents, missed), (vec![1, 2, 3], 0), "Redis hits");
                if local == 3 {
                    break;
                }
                assert!(std::time::Instant::now() < limit, "never all kept");
            }
        }
        assert_eq!(batch(&env, &ids).await, (vec![1, 2, 3], 3, 0), "served in process");
        let before = env.cache().stats().local_hits;
        Wallet::find_by_id(ids[0])
            .in_env(&env)
            .await
            .expect("find")
            .expect("found");
        assert_eq!(
            env.cache().stats().local_hits,
            before + 1,
            "a batch's value, read by one"
        );

        wallets[1].cents = 20;
        wallets[1].save().in_env(&env).await.expect("save");
        assert_eq!(
            batch(&env, &ids).await,
            (vec![1, 20, 3], 2, 1),
            "the written record alone"
        );

        if beside_redis {
            // Another process finds them in Redis, and keeps them.
            let other = connect(config).await;
            until_the_tier_serves(&other, &wallets[2]).await;
            assert_eq!(batch(&other, &ids).await, (vec![1, 20, 3], 0, 0), "Redis hits");
            assert_eq!(batch(&other, &ids).await, (vec![1, 20, 3], 3, 0), "kept in process");
        }
        let _ = env.database().drop().await;
    }
}
