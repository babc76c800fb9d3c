//! `#[cached]` end to end against a real MongoDB and Redis: executions are
//! counted, scopes checked, and faults injected on a private redis-server.

use std::time::{Duration, Instant};

use earnorm::bson::{doc, oid::ObjectId};
use earnorm::prelude::*;
use earnorm::{ConnectionStatus, Environment};
use serde::{Deserialize, Serialize};
use support::{connect, fast_cache_config, ran, runs, test_config, test_env, unique_name, RedisServer};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "accounts")]
pub struct Account {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
    pub balance: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "orders")]
pub struct Order {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub account: String,
    pub cents: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub balance: i64,
    pub note: String,
}

/// The application's own error type.
#[derive(Debug, PartialEq)]
pub enum AppError {
    Negative,
    Db(String),
}

impl Account {
    fn new(name: &str, balance: i64) -> Self {
        Self {
            id: None,
            name: name.to_owned(),
            balance,
        }
    }

    /// Record scope, `earnorm::Result`.
    #[cached(ttl = 300)]
    pub async fn summary(&self, note: &str) -> earnorm::Result<Summary> {
        ran(&format!("{}/summary", self.name));
        Ok(Summary {
            name: self.name.clone(),
            balance: self.balance,
            note: note.to_owned(),
        })
    }

    /// Record scope with the application's error type: errors are not cached.
    #[cached(ttl = 300)]
    pub async fn checked_balance(&self) -> Result<i64, AppError> {
        ran(&format!("{}/checked", self.name));
        if self.balance < 0 {
            Err(AppError::Negative)
        } else {
            Ok(self.balance)
        }
    }

    /// Reads another collection: invalidated by any write to orders.
    #[cached(ttl = 300, depends_on(Order))]
    pub async fn order_total(&self) -> Result<i64, AppError> {
        ran(&format!("{}/orders", self.name));
        let orders = Order::find(doc! { "account": &self.name })
            .await
            .map_err(|e| AppError::Db(e.to_string()))?;
        Ok(orders.iter().map(|o| o.cents).sum())
    }

    /// Reads the database for the current state of this record (not the
    /// in-memory copy): what a stale cache would get wrong.
    #[cached(ttl = 300)]
    pub async fn stored_balance(&self) -> Option<i64> {
        ran(&format!("{}/stored", self.name));
        Account::find_by_id(self.id?).await.ok().flatten().map(|a| a.balance)
    }

    /// Model scope: invalidated by any write to accounts.
    #[cached(ttl = 300)]
    pub async fn richest(min_balance: i64) -> earnorm::Result<Vec<String>> {
        ran(&format!("richest/{min_balance}"));
        let mut accounts = Account::find(doc! { "balance": { "$gte": min_balance } }).await?;
        accounts.sort_by_key(|a| -a.balance);
        Ok(accounts.into_iter().map(|a| a.name).collect())
    }

    /// Generic argument.
    #[cached(ttl = 60, key = "scaled")]
    pub async fn scaled<T: Serialize + Into<i64> + Copy + Send + Sync>(&self, factor: T) -> i64 {
        ran(&format!("{}/scaled", self.name));
        self.balance * factor.into()
    }
}

/// A free function with an explicit scope.
#[cached(ttl = 120, scope = "exchange-rates")]
async fn rate(currency: String) -> f64 {
    ran(&format!("rate/{currency}"));
    if currency == "EUR" {
        1.1
    } else {
        1.0
    }
}

#[tokio::test]
async fn the_second_call_is_a_hit_and_records_and_arguments_never_share() {
    let env = test_env("hits").await;
    env.scope(async {
        let tag = unique_name("acct");
        let mut a = Account::new(&format!("{tag}-a"), 10);
        let mut b = Account::new(&format!("{tag}-b"), 20);
        a.save().await.expect("save");
        b.save().await.expect("save");
        let before = earnorm::cache().stats();
        assert_eq!(a.summary("x").await.expect("summary").balance, 10);
        assert_eq!(a.summary("x").await.expect("summary").balance, 10);
        assert_eq!(runs(&format!("{}/summary", a.name)), 1, "second call is a hit");
        let after = earnorm::cache().stats();
        assert_eq!((after.hits - before.hits, after.misses - before.misses), (1, 1));

        assert_eq!(
            a.summary("y").await.expect("summary").note,
            "y",
            "other arguments, other entry"
        );
        assert_eq!(
            b.summary("x").await.expect("summary").name,
            b.name,
            "other record, other entry"
        );
        assert_eq!(runs(&format!("{}/summary", a.name)), 2);
        assert_eq!(runs(&format!("{}/summary", b.name)), 1);

        assert_eq!(a.scaled(3i32).await, 30);
        assert_eq!(a.scaled(3i32).await, 30);
        assert_eq!(a.scaled(4i64).await, 40);
        assert_eq!(runs(&format!("{}/scaled", a.name)), 2);

        // The uncached body is still there.
        a.summary_uncached("x").await.expect("uncached");
        assert_eq!(runs(&format!("{}/summary", a.name)), 3);
        // And the cache can be bypassed for a whole block.
        earnorm::bypass_cache(a.summary("x")).await.expect("bypassed");
        assert_eq!(runs(&format!("{}/summary", a.name)), 4);
    })
    .await;
}

#[tokio::test]
async fn errors_and_none_are_not_cached() {
    let env = test_env("errors").await;
    env.scope(async {
        let mut neg = Account::new(&unique_name("neg"), -5);
        neg.save().await.expect("save");
        assert_eq!(neg.checked_balance().await, Err(AppError::Negative));
        assert_eq!(neg.checked_balance().await, Err(AppError::Negative));
        assert_eq!(
            runs(&format!("{}/checked", neg.name)),
            2,
            "an Err is computed every time"
        );

        let unsaved = Account::new(&unique_name("unsaved"), 1);
        assert_eq!(unsaved.stored_balance().await, None);
        assert_eq!(unsaved.stored_balance().await, None);
        assert_eq!(
            runs(&format!("{}/stored", unsaved.name)),
            2,
            "a record without id is not cached; None is not cached"
        );
    })
    .await;
}

#[tokio::test]
async fn writes_invalidate_exactly_what_they_made_stale() {
    let env = test_env("scopes").await;
    env.scope(async {
        let tag = unique_name("w");
        let mut a = Account::new(&format!("{tag}-a"), 100);
        let mut b = Account::new(&format!("{tag}-b"), 200);
        a.save().await.expect("save");
        b.save().await.expect("save");
        let (sa, sb) = (format!("{}/stored", a.name), format!("{}/stored", b.name));
        assert_eq!(a.stored_balance().await, Some(100));
        assert_eq!(b.stored_balance().await, Some(200));
        assert_eq!(Account::richest(150).await.expect("richest"), [b.name.clone()]);

        // save(a): a's entries and model queries go; b's stays.
        a.balance = 300;
        a.save().await.expect("save");
        assert_eq!(a.stored_balance().await, Some(300));
        assert_eq!(b.stored_balance().await, Some(200));
        assert_eq!((runs(&sa), runs(&sb)), (2, 1), "only a recomputed");
        assert_eq!(
            Account::richest(150).await.expect("richest"),
            [a.name.clone(), b.name.clone()]
        );
        assert_eq!(runs("richest/150"), 2, "the model-scope query recomputed");

        // A bulk write: everything about accounts.
        Account::update_many(doc! { "name": &b.name }, doc! { "$set": { "balance": 50 } })
            .await
            .expect("update_many");
        assert_eq!(
            b.stored_balance().await,
            Some(50),
            "b's entry is gone after a bulk update"
        );
        assert_eq!(runs(&sb), 2);
        assert_eq!(Account::richest(150).await.expect("richest"), [a.name.clone()]);

        // delete(a): a's entries go.
        assert_eq!(a.stored_balance().await, Some(300));
        let before = runs(&sa);
        a.delete().await.expect("delete");
        assert_eq!(a.stored_balance().await, None);
        assert_eq!(runs(&sa), before + 1);
        Account::delete_many(doc! { "name": &b.name })
            .await
            .expect("delete_many");
        assert_eq!(b.stored_balance().await, None);
    })
    .await;
}

#[tokio::test]
async fn a_write_to_another_collection_invalidates_declared_dependencies() {
    let env = test_env("deps").await;
    env.scope(async {
        let mut acct = Account::new(&unique_name("buyer"), 0);
        acct.save().await.expect("save");
        let key = format!("{}/orders", acct.name);
        assert_eq!(acct.order_total().await, Ok(0));
        assert_eq!(acct.order_total().await, Ok(0));
        assert_eq!(runs(&key), 1);
        Order {
            id: None,
            account: acct.name.clone(),
            cents: 250,
        }
        .save()
        .await
        .expect("order");
        assert_eq!(acct.order_total().await, Ok(250), "a new order invalidates the total");
        Order::insert_many(&mut [Order {
            id: None,
            account: acct.name.clone(),
            cents: 50,
        }])
        .await
        .expect("orders");
        assert_eq!(acct.order_total().await, Ok(300));
        assert_eq!(runs(&key), 3);
    })
    .await;
}

#[tokio::test]
async fn free_functions_are_invalidated_by_their_tag() {
    let env = test_env("free").await;
    env.scope(async {
        let currency = unique_name("cur");
        let key = format!("rate/{currency}");
        rate(currency.clone()).await;
        rate(currency.clone()).await;
        assert_eq!(runs(&key), 1);
        earnorm::invalidate_tag("exchange-rates").await;
        rate(currency.clone()).await;
        assert_eq!(runs(&key), 2);
    })
    .await;
}

#[tokio::test]
async fn an_outdated_copy_does_not_change_what_a_fresh_copy_gets() {
    let env = test_env("outdated").await;
    env.scope(async {
        let mut fresh = Account::new(&unique_name("copy"), 1);
        fresh.save().await.expect("save");
        let outdated = fresh.clone();
        fresh.balance = 2;
        fresh.save().await.expect("save");
        // The outdated copy computes from its own (old) content...
        assert_eq!(outdated.summary("n").await.expect("summary").balance, 1);
        // ...and the current copy is not served that value.
        assert_eq!(fresh.summary("n").await.expect("summary").balance, 2);
        assert_eq!(outdated.summary("n").await.expect("summary").balance, 1);
        assert_eq!(fresh.summary("n").await.expect("summary").balance, 2);
    })
    .await;
}

#[tokio::test]
async fn two_environments_on_the_same_services_stay_consistent() {
    // Two environments with their own connections: stand-ins for two processes.
    let config = test_config("twoenv");
    let first = connect(config.clone()).await;
    let second = connect(config).await;
    let mut acct = Account::new(&unique_name("shared"), 10);
    acct.save().in_env(&first).await.expect("save");
    let probe = acct.clone();
    let read = |env: &Environment| {
        let (env, acct) = (env.clone(), probe.clone());
        async move { env.scope(acct.stored_balance()).await }
    };
    assert_eq!(read(&second).await, Some(10));
    assert_eq!(read(&second).await, Some(10));
    Account::update_many(doc! { "name": &acct.name }, doc! { "$set": { "balance": 11 } })
        .in_env(&first)
        .await
        .expect("update");
    assert_eq!(
        read(&second).await,
        Some(11),
        "a write through one environment is seen by a cached call in the other"
    );
    acct.balance = 12;
    acct.save().in_env(&second).await.expect("save");
    assert_eq!(read(&first).await, Some(12));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_frozen_redis_costs_a_bounded_delay_never_a_wrong_answer() {
    let mut redis = RedisServer::start();
    let mut config = test_config("faults");
    config.redis_uri = Some(redis.url());
    config.cache_config = fast_cache_config(&config.database);
    let limit = config.cache_config.operation_timeout + Duration::from_millis(700);
    let env = connect(config).await;
    env.scope(async {
        let mut acct = Account::new(&unique_name("fault"), 1);
        acct.save().await.expect("save");
        assert_eq!(acct.stored_balance().await, Some(1));

        redis.kill();
        for balance in 2..6 {
            acct.balance = balance;
            acct.save().await.expect("writes succeed while Redis is dead");
            let start = Instant::now();
            assert_eq!(acct.stored_balance().await, Some(balance));
            assert!(start.elapsed() < limit, "took {:?}", start.elapsed());
        }
        redis.restart();
        assert!(
            earnorm::cache()
                .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
                .await
        );
        assert_eq!(acct.stored_balance().await, Some(5));

        redis.freeze();
        acct.balance = 6;
        acct.save().await.expect("writes succeed while Redis is frozen");
        for _ in 0..3 {
            let start = Instant::now();
            assert_eq!(acct.stored_balance().await, Some(6));
            assert!(start.elapsed() < limit, "took {:?}", start.elapsed());
        }
        redis.thaw();
        assert!(
            earnorm::cache()
                .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
                .await
        );
        assert_eq!(
            acct.stored_balance().await,
            Some(6),
            "the invalidation made during the freeze was replayed"
        );
        assert_eq!(acct.stored_balance().await, Some(6));
    })
    .await;
}

#[tokio::test]
async fn a_transaction_applies_and_invalidates_at_commit_and_abort_discards() {
    let env = test_env("tx").await;
    env.scope(async {
        let mut a = Account::new(&unique_name("tx-a"), 1);
        let mut b = Account::new(&unique_name("tx-b"), 2);
        a.save().await.expect("save");
        b.save().await.expect("save");
        assert_eq!(a.stored_balance().await, Some(1));
        assert_eq!(b.stored_balance().await, Some(2));

        let mut tx = env.start_transaction().await.expect("transactions are supported");
        a.balance = 10;
        a.save().session(&mut tx).await.expect("save in tx");
        Account::update_many(doc! { "name": &b.name }, doc! { "$set": { "balance": 20 } })
            .session(&mut tx)
            .await
            .expect("update in tx");
        let mut c = Account::new(&unique_name("tx-c"), 3);
        c.save().session(&mut tx).await.expect("insert in tx");
        assert_eq!(
            Account::find_one(doc! { "name": &c.name })
                .session(&mut tx)
                .await
                .expect("read in tx")
                .map(|x| x.balance),
            Some(3),
            "the transaction sees its own writes"
        );
        assert_eq!(
            Account::find_one(doc! { "name": &c.name }).await.expect("read"),
            None,
            "others do not, yet"
        );
        assert_eq!(
            a.stored_balance().await,
            Some(1),
            "the cache still serves the committed state"
        );
        tx.commit().await.expect("commit");
        assert_eq!(a.stored_balance().await, Some(10), "invalidated at commit");
        assert_eq!(
            b.stored_balance().await,
            Some(20),
            "the bulk write invalidated the model"
        );
        assert_eq!(
            Account::find_one(doc! { "name": &c.name })
                .await
                .expect("read")
                .map(|x| x.balance),
            Some(3)
        );

        let committed = a.clone();
        let mut tx = env.start_transaction().await.expect("transaction");
        a.balance = 99;
        a.save().session(&mut tx).await.expect("save in tx");
        a.delete().session(&mut tx).await.expect("delete in tx");
        let before = runs(&format!("{}/stored", a.name));
        tx.abort().await.expect("abort");
        assert_eq!(committed.stored_balance().await, Some(10), "nothing applied");
        assert_eq!(
            runs(&format!("{}/stored", a.name)),
            before,
            "nothing invalidated: still a hit"
        );
        assert_eq!(
            a.stored_balance().await,
            Some(10),
            "the aborted in-memory change reads the stored state"
        );
    })
    .await;
}
