//! Versions and partial updates under concurrency: every write path of a
//! versioned model moves its version, records created by an upsert (or
//! stored without a version) can be saved, and concurrent partial updates
//! of one record all apply, or fail with `Conflict` for a version clash.

use std::sync::Arc;

use earnorm::bson::{doc, oid::ObjectId, Document};
use earnorm::prelude::*;
use earnorm::{Environment, Error};
use serde::{Deserialize, Serialize};
use support::test_env;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "accounts")]
struct Account {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    balance: i64,
    #[earnorm(version)]
    #[serde(default)]
    version: i64,
}

/// The same collection, without a version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "accounts")]
struct Counter {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    balance: i64,
}

fn raw(env: &Environment) -> earnorm::mongodb::Collection<Document> {
    env.database().collection("accounts")
}

async fn stored(env: &Environment, id: ObjectId) -> Account {
    Account::find_by_id(id)
        .in_env(env)
        .await
        .expect("find")
        .expect("stored")
}

/// Bug: `upsert_one` stored no version, and the record it created could
/// never be saved or updated (every attempt was a `Conflict`); a document
/// stored without a version field neither.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_created_by_an_upsert_or_stored_without_a_version_can_be_saved() {
    let env = test_env("versions_upsert").await;
    let id = ObjectId::new();
    let created = Account::upsert_one(doc! { "_id": id }, doc! { "$set": { "balance": 100 } })
        .in_env(&env)
        .await
        .expect("upsert");
    assert_eq!(created.version, 1, "an upsert that inserts stores the first version");
    let mut copy = stored(&env, id).await;
    copy.balance = 90;
    copy.save().in_env(&env).await.expect("a save of the upserted record");
    assert_eq!(copy.version, 2);
    copy.update(doc! { "$inc": { "balance": 1 } })
        .in_env(&env)
        .await
        .expect("an update of it");
    assert_eq!((copy.balance, copy.version), (91, 3));

    // Stored by someone else, without a version field: version 0.
    let bare = ObjectId::new();
    raw(&env)
        .insert_one(doc! { "_id": bare, "balance": 5 })
        .await
        .expect("insert");
    let mut copy = stored(&env, bare).await;
    assert_eq!(copy.version, 0);
    copy.balance = 6;
    copy.save()
        .in_env(&env)
        .await
        .expect("a save of a record stored without a version");
    assert_eq!(
        stored(&env, bare).await,
        Account {
            id: Some(bare),
            balance: 6,
            version: 1
        }
    );
    raw(&env)
        .insert_one(doc! { "_id": ObjectId::new(), "balance": 5 })
        .await
        .expect("insert");
    let mut copy = Account::find_one(doc! { "balance": 5 })
        .in_env(&env)
        .await
        .expect("find")
        .expect("found");
    assert!(copy
        .update(doc! { "$inc": { "balance": 1 } })
        .in_env(&env)
        .await
        .expect("an update of a record stored without a version"));
    assert_eq!((copy.balance, copy.version), (6, 1));
    let _ = env.database().drop().await;
}

/// Bug: `update_one`, `update_many` and `upsert_one` left the version as it
/// was, so a later save of a copy read before them silently undid them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_path_moves_the_version_so_an_older_copy_conflicts() {
    let env = test_env("versions_paths").await;
    for path in ["update_one", "update_many", "upsert_one"] {
        let mut account = Account {
            id: None,
            balance: 100,
            version: 0,
        };
        account.save().in_env(&env).await.expect("save");
        let id = account.id.expect("id");
        let mut old = stored(&env, id).await;
        let filter = doc! { "_id": id };
        let update = doc! { "$inc": { "balance": 1000 } };
        match path {
            "update_one" => {
                Account::update_one(filter, update).in_env(&env).await.expect(path);
            }
            "update_many" => {
                Account::update_many(filter, update).in_env(&env).await.expect(path);
            }
            _ => {
                Account::upsert_one(filter, update).in_env(&env).await.expect(path);
            }
        }
        assert_eq!(
            stored(&env, id).await.version,
            old.version + 1,
            "{path} moved the version"
        );
        old.balance -= 10;
        let saved = old.save().in_env(&env).await;
        assert!(
            matches!(saved, Err(Error::Conflict { .. })),
            "a save of a copy read before {path}: {saved:?}"
        );
        assert_eq!(stored(&env, id).await.balance, 1100, "{path} is kept");
    }
    // The version is the ORM's: an update may not touch it.
    let mut account = Account {
        id: None,
        balance: 1,
        version: 0,
    };
    account.save().in_env(&env).await.expect("save");
    let refused = Account::update_one(doc! { "_id": account.id }, doc! { "$inc": { "version": 5 } })
        .in_env(&env)
        .await;
    assert!(matches!(refused, Err(Error::InvalidUpdate { .. })), "{refused:?}");
    let _ = env.database().drop().await;
}

/// Bug: each partial update ran in a transaction of its own, and a
/// concurrent writer of the same record got the server's `WriteConflict`
/// (a transient transaction error) back as a bare MongoDB error: 6 of 200
/// concurrent `$inc`s applied. Transient errors are retried; a version clash
/// is a `Conflict`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_partial_updates_of_one_record_all_apply() {
    const TASKS: usize = 20;
    const EACH: usize = 3;
    let env = Arc::new(test_env("versions_concurrent").await);
    let mut counter = Counter { id: None, balance: 0 };
    counter.save().in_env(&env).await.expect("save");
    let id = counter.id.expect("id");
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let env = Arc::clone(&env);
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..EACH {
                results.push(
                    Counter::update_one(doc! { "_id": id }, doc! { "$inc": { "balance": 1 } })
                        .in_env(&env)
                        .await
                        .map(|_| ()),
                );
            }
            results
        }));
    }
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.expect("task").into_iter().filter_map(Result::err));
    }
    assert!(failures.is_empty(), "{} failed: {:?}", failures.len(), failures.first());
    let balance = Counter::find_by_id(id)
        .in_env(&env)
        .await
        .expect("find")
        .expect("stored")
        .balance;
    assert_eq!(balance, i64::try_from(TASKS * EACH).unwrap_or(0), "every $inc applied");

    // Simultaneous updates of one versioned copy: one wins, the others
    // clash on the version.
    let mut account = Account {
        id: None,
        balance: 0,
        version: 0,
    };
    account.save().in_env(&env).await.expect("save");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (env, mut copy) = (Arc::clone(&env), account.clone());
        tasks.push(tokio::spawn(async move {
            copy.update(doc! { "$inc": { "balance": 1 } }).in_env(&env).await
        }));
    }
    let (mut ok, mut conflicts) = (0, 0);
    for task in tasks {
        match task.await.expect("task") {
            Ok(true) => ok += 1,
            Err(Error::Conflict { .. }) => conflicts += 1,
            other => panic!("neither applied nor a conflict: {other:?}"),
        }
    }
    assert_eq!((ok, conflicts), (1, 7));

    // Get-or-create by many at once: all succeed, one record.
    let key = ObjectId::new();
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let env = Arc::clone(&env);
        tasks.push(tokio::spawn(async move {
            Account::upsert_one(doc! { "_id": key }, doc! { "$inc": { "balance": 1 } })
                .in_env(&env)
                .await
        }));
    }
    for task in tasks {
        task.await.expect("task").expect("get-or-create");
    }
    let created = stored(&env, key).await;
    assert_eq!(created.balance, i64::try_from(TASKS).unwrap_or(0));
    assert_eq!(created.version, i64::try_from(TASKS).unwrap_or(0));
    let _ = env.database().drop().await;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "ledgers")]
struct Ledger {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    #[earnorm(required)]
    name: String,
    #[earnorm(version)]
    #[serde(default)]
    version: i64,
}

/// Bug: `insert_many` moved the versions (and set the timestamps) of the
/// records before a later one failed validation, so a retry stored
/// versions `[2, 2, 1]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_part_way_changes_no_record() {
    let env = test_env("versions_batch").await;
    let ledger = |name: &str| Ledger {
        id: None,
        name: name.to_owned(),
        version: 0,
    };
    let mut batch = vec![ledger("a"), ledger("b"), ledger("")];
    let refused = Ledger::insert_many(&mut batch).in_env(&env).await;
    assert!(matches!(refused, Err(Error::Validation(_))), "{refused:?}");
    assert!(
        batch.iter().all(|l| l.version == 0 && l.id.is_none()),
        "nothing changed: {batch:?}"
    );
    batch[2].name = "c".into();
    Ledger::insert_many(&mut batch).in_env(&env).await.expect("retry");
    assert_eq!(batch.iter().map(|l| l.version).collect::<Vec<_>>(), [1, 1, 1]);
    let _ = env.database().drop().await;
}

/// Bug: `delete` ignored the version, so deleting an outdated copy deleted
/// the newer record. It is a `Conflict`, as saving that copy would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_outdated_copy_is_a_conflict() {
    let env = test_env("versions_delete").await;
    let mut account = Account {
        id: None,
        balance: 1,
        version: 0,
    };
    account.save().in_env(&env).await.expect("save");
    let outdated = account.clone();
    account.balance = 2;
    account.save().in_env(&env).await.expect("save again");
    let refused = outdated.delete().in_env(&env).await;
    assert!(matches!(refused, Err(Error::Conflict { .. })), "{refused:?}");
    assert_eq!(stored(&env, account.id.expect("id")).await.balance, 2, "still there");
    assert!(account.delete().in_env(&env).await.expect("delete the current copy"));
    assert!(
        !account.delete().in_env(&env).await.expect("gone"),
        "already deleted: false"
    );
    let _ = env.database().drop().await;
}

/// Bug: a stored document that did not decode said only "could not
/// convert between a value and BSON", naming neither the model nor the
/// field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_that_does_not_decode_names_its_model_and_field() {
    let env = test_env("versions_decode").await;
    let id = ObjectId::new();
    raw(&env)
        .insert_one(doc! { "_id": id, "balance": "not a number" })
        .await
        .expect("insert");
    let found = Account::find_by_id(id).in_env(&env).await;
    let Err(err @ Error::Decode { .. }) = found else {
        panic!("a decode error: {found:?}");
    };
    let message = err.to_string();
    assert!(message.contains("accounts") && message.contains("balance"), "{message}");
    let missing = ObjectId::new();
    raw(&env).insert_one(doc! { "_id": missing }).await.expect("insert");
    let found = Account::find_one(doc! { "_id": missing }).in_env(&env).await;
    let message = found.expect_err("a decode error").to_string();
    assert!(message.contains("accounts") && message.contains("balance"), "{message}");
    let _ = env.database().drop().await;
}
