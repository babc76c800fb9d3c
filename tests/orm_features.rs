//! The model layer's features beyond CRUD: optimistic concurrency
//! (`#[earnorm(version)]`).

use earnorm::bson::{doc, oid::ObjectId};
use earnorm::prelude::*;
use earnorm::{Environment, Error};
use serde::{Deserialize, Serialize};
use support::test_env;

/// No version field: the last save wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "notes")]
struct Note {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    text: String,
}

/// Versioned, with a record cache (to see what a conflict invalidates).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "accounts", cache(ttl = 300))]
struct Account {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    owner: String,
    balance: i64,
    #[earnorm(version)]
    #[serde(default)]
    version: i64,
}

/// Versioned, with an id the application assigns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "skus")]
struct Sku {
    #[serde(rename = "_id")]
    code: String,
    stock: i32,
    #[earnorm(version)]
    rev: i32,
}

fn record_hits(env: &Environment) -> u64 {
    let namespace = env.model_scope("accounts");
    env.cache()
        .stats_by_name()
        .into_iter()
        .find(|s| s.namespace == namespace && s.name == "record")
        .map_or(0, |s| s.hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_version_the_last_save_wins() {
    let env = test_env("lost_update").await;
    let mut note = Note {
        id: None,
        text: "first".into(),
    };
    note.save_in(&env).await.expect("save");
    let (mut a, mut b) = (note.clone(), note.clone());
    a.text = "a".into();
    b.text = "b".into();
    a.save_in(&env).await.expect("save a");
    b.save_in(&env).await.expect("save b overwrites a's change");
    let stored = Note::find_by_id_in(&env, note.id.expect("id")).await.expect("find");
    assert_eq!(
        stored.expect("stored").text,
        "b",
        "last writer wins: a's change is lost"
    );
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saving_an_outdated_versioned_copy_is_a_conflict_that_writes_and_invalidates_nothing() {
    let env = test_env("versioned").await;
    let mut account = Account {
        id: None,
        owner: "ada".into(),
        balance: 100,
        version: 0,
    };
    account.save_in(&env).await.expect("insert");
    assert_eq!(account.version, 1, "the first save gives version 1");
    let id = account.id.expect("id");

    let (mut a, mut b) = (account.clone(), account.clone());
    a.balance += 50;
    a.save_in(&env).await.expect("save a");
    assert_eq!(a.version, 2);
    // Cache the current state, to see that the conflict invalidates nothing.
    assert_eq!(Account::find_by_id_in(&env, id).await.expect("find"), Some(a.clone()));
    let hits = record_hits(&env);

    b.balance -= 30;
    let err = b.save_in(&env).await.expect_err("b is outdated");
    assert!(
        matches!(
            &err,
            Error::Conflict {
                model: "accounts",
                version: 1,
                ..
            }
        ),
        "{err:?}"
    );
    println!("{err}");
    assert_eq!(
        b.version, 1,
        "the copy keeps its version, so that it can be retried after a re-read"
    );
    assert_eq!(
        Account::find_by_id_in(&env, id).await.expect("find"),
        Some(a.clone()),
        "nothing was written"
    );
    assert_eq!(record_hits(&env), hits + 1, "and nothing was invalidated: still a hit");

    // Read again, apply, save: fine.
    let mut fresh = Account::find_by_id_in(&env, id).await.expect("find").expect("stored");
    fresh.balance -= 30;
    fresh.save_in(&env).await.expect("save the re-read copy");
    assert_eq!(fresh.version, 3);
    let stored = Account::find_by_id_in(&env, id).await.expect("find").expect("stored");
    assert_eq!((stored.balance, stored.version), (120, 3), "both changes kept");

    // A deleted record: its outdated copy does not bring it back.
    fresh.delete_in(&env).await.expect("delete");
    let err = a.save_in(&env).await.expect_err("deleted since");
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert_eq!(Account::find_by_id_in(&env, id).await.expect("find"), None);
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versioned_record_with_an_assigned_id_is_inserted_once() {
    let env = test_env("versioned_sku").await;
    let mut first = Sku {
        code: "SKU-1".into(),
        stock: 5,
        rev: 0,
    };
    first.save_in(&env).await.expect("first save inserts");
    assert_eq!(first.rev, 1);
    let mut second = Sku {
        code: "SKU-1".into(),
        stock: 9,
        rev: 0,
    };
    let err = second.save_in(&env).await.expect_err("another new copy of the same id");
    assert!(matches!(err, Error::Conflict { version: 0, .. }), "{err:?}");
    assert_eq!(second.rev, 0);
    first.stock = 4;
    first.save_in(&env).await.expect("update");
    let stored = Sku::find_one_in(&env, doc! { "_id": "SKU-1" }).await.expect("find");
    assert_eq!(stored.map(|s| (s.stock, s.rev)), Some((4, 2)));
    let _ = env.database().drop().await;
}

/// Validated and cached, for partial updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "members", cache(ttl = 300))]
struct Member {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    #[earnorm(email)]
    email: String,
    #[serde(default)]
    visits: i64,
}

fn member_stats(env: &Environment) -> (u64, u64) {
    let namespace = env.model_scope("members");
    env.cache()
        .stats_by_name()
        .into_iter()
        .find(|s| s.namespace == namespace && s.name == "record")
        .map_or((0, 0), |s| (s.hits, s.misses))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_applies_to_one_record_validates_the_result_and_invalidates_only_it() {
    let env = test_env("partial_update").await;
    let mut ada = Member {
        id: None,
        email: "ada@example.com".into(),
        visits: 0,
    };
    let mut bob = Member {
        id: None,
        email: "bob@example.com".into(),
        visits: 0,
    };
    ada.save_in(&env).await.expect("save");
    bob.save_in(&env).await.expect("save");
    let (a, b) = (ada.id.expect("id"), bob.id.expect("id"));
    for id in [a, b] {
        Member::find_by_id_in(&env, id).await.expect("cache it");
    }

    assert!(ada
        .update_in(
            &env,
            doc! { "$inc": { "visits": 2 }, "$set": { "email": "ada@lovelace.org" } }
        )
        .await
        .expect("update"));
    assert_eq!(
        (ada.visits, ada.email.as_str()),
        (2, "ada@lovelace.org"),
        "refreshed from the result"
    );
    let before = member_stats(&env);
    assert_eq!(Member::find_by_id_in(&env, a).await.expect("find"), Some(ada.clone()));
    assert_eq!(Member::find_by_id_in(&env, b).await.expect("find"), Some(bob.clone()));
    let after = member_stats(&env);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1),
        "the updated record was read again, the other one was still cached"
    );

    // An update whose result fails validation writes nothing.
    let err = ada
        .update_in(&env, doc! { "$set": { "email": "not an address" } })
        .await
        .expect_err("invalid result");
    assert!(matches!(err, Error::Validation(_)), "{err:?}");
    assert_eq!(ada.email, "ada@lovelace.org", "the copy is unchanged");
    let stored = earnorm::bypass_cache(Member::find_by_id_in(&env, a))
        .await
        .expect("find");
    assert_eq!(
        stored.map(|m| m.email),
        Some("ada@lovelace.org".into()),
        "nothing written"
    );

    // By filter: the record found is returned and invalidated.
    let updated = Member::update_one_in(
        &env,
        doc! { "email": "bob@example.com" },
        doc! { "$inc": { "visits": 1 } },
    )
    .await
    .expect("update_one")
    .expect("matched");
    assert_eq!((updated.id, updated.visits), (Some(b), 1));
    assert_eq!(Member::find_by_id_in(&env, b).await.expect("find"), Some(updated));
    assert_eq!(
        Member::update_one_in(
            &env,
            doc! { "email": "nobody@example.com" },
            doc! { "$inc": { "visits": 1 } }
        )
        .await
        .expect("update_one"),
        None,
        "nothing matched"
    );

    // Upsert: inserted when absent, updated when present.
    let carol = Member::upsert_one_in(
        &env,
        doc! { "email": "carol@example.com" },
        doc! { "$inc": { "visits": 1 } },
    )
    .await
    .expect("upsert inserts");
    assert_eq!(carol.visits, 1);
    let again = Member::upsert_one_in(
        &env,
        doc! { "email": "carol@example.com" },
        doc! { "$inc": { "visits": 1 } },
    )
    .await
    .expect("upsert updates");
    assert_eq!((again.id, again.visits), (carol.id, 2));
    assert_eq!(Member::count_in(&env, doc! {}).await.expect("count"), 3);

    // A record that is gone.
    let mut gone = bob.clone();
    bob.delete_in(&env).await.expect("delete");
    assert!(!gone
        .update_in(&env, doc! { "$inc": { "visits": 1 } })
        .await
        .expect("update"));
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versioned_update_moves_the_version_and_refuses_an_outdated_copy() {
    let env = test_env("versioned_update").await;
    let mut account = Account {
        id: None,
        owner: "ada".into(),
        balance: 10,
        version: 0,
    };
    account.save_in(&env).await.expect("insert");
    let mut outdated = account.clone();
    account
        .update_in(&env, doc! { "$inc": { "balance": 5 } })
        .await
        .expect("update");
    assert_eq!((account.balance, account.version), (15, 2));
    let err = outdated
        .update_in(&env, doc! { "$set": { "balance": 0 } })
        .await
        .expect_err("outdated");
    assert!(matches!(err, Error::Conflict { version: 1, .. }), "{err:?}");
    let stored = Account::find_by_id_in(&env, account.id.expect("id"))
        .await
        .expect("find");
    assert_eq!(stored.map(|a| (a.balance, a.version)), Some((15, 2)));
    let _ = env.database().drop().await;
}

/// A model with more fields than a listing needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "profiles")]
struct Profile {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    name: String,
    bio: String,
    age: i32,
}

/// Some of its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NameAndAge {
    name: String,
    #[serde(rename = "age")]
    years: i32,
}

/// Some of its fields, with the id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Listed {
    #[serde(rename = "_id")]
    id: ObjectId,
    name: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_read_some_fields_into_another_type_and_can_be_cached() {
    use futures_util::TryStreamExt;
    use std::time::Duration;

    let env = test_env("projection").await;
    for (name, age) in [("Ada", 36), ("Bob", 41)] {
        let mut profile = Profile {
            id: None,
            name: name.into(),
            bio: "a long text".repeat(50),
            age,
        };
        profile.save_in(&env).await.expect("save");
    }
    let find = || Profile::find_in(&env, doc! {}).sort(doc! { "name": 1 });
    assert_eq!(
        find().project::<NameAndAge>().projection(),
        &doc! { "name": 1, "age": 1, "_id": 0 },
        "derived from the type's fields, renames included, without the id"
    );
    let short: Vec<NameAndAge> = find().project::<NameAndAge>().await.expect("project");
    assert_eq!(
        short,
        [
            NameAndAge {
                name: "Ada".into(),
                years: 36
            },
            NameAndAge {
                name: "Bob".into(),
                years: 41
            }
        ]
    );
    let listed: Vec<Listed> = find().project::<Listed>().stream().try_collect().await.expect("stream");
    assert_eq!(listed.len(), 2);
    assert_eq!(find().project::<Listed>().projection(), &doc! { "_id": 1, "name": 1 });
    let explicit: Vec<NameAndAge> = find()
        .project_with::<NameAndAge>(doc! { "name": 1, "age": { "$add": ["$age", 1] }, "_id": 0 })
        .await
        .expect("explicit projection");
    assert_eq!(explicit[0].years, 37);

    // Cached under the model's scope.
    let minute = Duration::from_secs(60);
    let cached = || find().project::<NameAndAge>().cached(minute);
    assert_eq!(cached().await.expect("project").len(), 2);
    assert_eq!(cached().await.expect("project").len(), 2);
    let namespace = env.model_scope("profiles");
    let stats = env
        .cache()
        .stats_by_name()
        .into_iter()
        .find(|s| s.namespace == namespace && s.name == "find_projected")
        .expect("stats");
    assert_eq!((stats.hits, stats.misses), (1, 1));
    let mut carol = Profile {
        id: None,
        name: "Carol".into(),
        bio: String::new(),
        age: 29,
    };
    carol.save_in(&env).await.expect("save");
    assert_eq!(
        cached().await.expect("project").len(),
        3,
        "a write to the model invalidates it"
    );
    let _ = env.database().drop().await;
}
