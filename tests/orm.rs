//! The model layer against a real MongoDB (`MONGODB_URI`) and Redis
//! (`REDIS_URL`): CRUD, validation, indexes, ids, round trips and the
//! invalidation scopes of each write.

#[path = "models.rs"]
mod models;

use std::future::IntoFuture;

use earnorm::bson::{doc, oid::ObjectId};
use earnorm::futures::FutureExt;
use earnorm::{Environment, Error, Model};
use models::{Address, Counter, Profile, Sku, User};
use support::test_env;

#[tokio::test]
async fn save_inserts_then_updates_and_every_read_verb_sees_it() {
    let env = test_env("crud").await;
    env.scope(async {
        let mut ada = User::new("Ada", "ada@example.com");
        ada.save().await.expect("insert");
        let id = ada.id.expect("insert sets the id");
        assert_eq!(User::find_by_id(id).await.expect("find"), Some(ada.clone()));

        ada.age = Some(37);
        ada.save().await.expect("update");
        assert_eq!(
            User::count(doc! {}).await.expect("count"),
            1,
            "an update does not insert"
        );
        assert_eq!(
            User::find_one(doc! { User::FIELDS.name: "Ada" })
                .await
                .expect("find_one")
                .and_then(|u| u.age),
            Some(37)
        );

        let mut more = vec![
            User::new("Bob", "bob@example.com"),
            User::new("Cy", "cy@example.com"),
            User::new("Di", "di@example.com"),
        ];
        more[0].age = Some(20);
        more[1].age = Some(50);
        more[2].age = Some(40);
        User::insert_many(&mut more).await.expect("insert_many");
        assert!(more.iter().all(|u| u.id.is_some()), "insert_many sets ids");
        assert_eq!(User::count(doc! {}).await.expect("count"), 4);

        let page = User::find(doc! {})
            .sort(doc! { "age": -1 })
            .skip(1)
            .limit(2)
            .await
            .expect("find");
        let names: Vec<&str> = page.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            ["Di", "Ada"],
            "ages 50, 40, 37, 20 sorted descending, skip 1, limit 2"
        );
        assert_eq!(User::find(doc! { "age": { "$gte": 40 } }).await.expect("find").len(), 2);

        let modified = User::update_many(doc! { "age": { "$lt": 40 } }, doc! { "$inc": { "age": 1 } })
            .await
            .expect("update_many");
        assert_eq!(modified, 2);
        assert!(ada.delete().await.expect("delete"));
        assert!(
            !ada.delete().await.expect("delete again"),
            "a second delete finds nothing"
        );
        assert_eq!(User::find_by_id(id).await.expect("find"), None);
        assert_eq!(
            User::delete_many(doc! { "age": { "$gte": 40 } })
                .await
                .expect("delete_many"),
            2
        );
        assert_eq!(User::count(doc! {}).await.expect("count"), 1);
    })
    .await;
}

#[tokio::test]
async fn validation_reports_every_failing_field_and_writes_nothing() {
    let env = test_env("validation").await;
    let mut bad = User::new("", "not-an-email");
    bad.age = Some(-1);
    bad.reference = Some("XX-1".into());
    let err = bad.save().in_env(&env).await.expect_err("invalid");
    let Error::Validation(errors) = err else {
        panic!("expected a validation error, got {err}")
    };
    for (field, rule) in [
        ("name", "required"),
        ("name", "min_length"),
        ("email", "email"),
        ("age", "min"),
        ("reference", "pattern"),
    ] {
        assert!(errors.has(field, rule), "{field} {rule}: {errors}");
    }
    assert_eq!(errors.errors.len(), 5, "{errors}");
    assert!(bad.id.is_none());
    assert_eq!(
        User::count(doc! {}).in_env(&env).await.expect("count"),
        0,
        "nothing written"
    );

    let mut long = User::new(&"x".repeat(41), "a@b.co");
    long.age = Some(151);
    let Err(Error::Validation(errors)) = long.save().in_env(&env).await else {
        panic!("invalid")
    };
    assert!(errors.has("name", "max_length") && errors.has("age", "max"));

    let mut batch = vec![User::new("Ok", "ok@example.com"), User::new("B", "b@example.com")];
    assert!(matches!(
        User::insert_many(&mut batch).in_env(&env).await,
        Err(Error::Validation(_))
    ));
    assert_eq!(
        User::count(doc! {}).in_env(&env).await.expect("count"),
        0,
        "a batch with one invalid record writes nothing"
    );

    // Absent optional values pass every rule but `required`.
    let mut minimal = User::new("Mo", "mo@example.com");
    minimal.age = None;
    minimal.save().in_env(&env).await.expect("valid");
}

#[tokio::test]
async fn unique_indexes_refuse_duplicates_with_a_typed_error() {
    let env = test_env("unique").await;
    User::ensure_indexes_in(&env).await.expect("indexes");
    User::ensure_indexes_in(&env).await.expect("idempotent");
    User::new("One", "same@example.com")
        .save()
        .in_env(&env)
        .await
        .expect("first");
    let mut second = User::new("Two", "same@example.com");
    match second.save().in_env(&env).await {
        Err(Error::DuplicateKey { model, .. }) => assert_eq!(model, "users"),
        other => panic!("expected a duplicate key error, got {other:?}"),
    }
    assert!(second.id.is_none(), "a failed insert leaves the record without an id");
    assert_eq!(User::count(doc! {}).in_env(&env).await.expect("count"), 1);
}

#[tokio::test]
async fn string_and_integer_ids_work_and_must_be_assigned() {
    let env = test_env("ids").await;
    let mut sku = Sku {
        code: "SKU-1".into(),
        price_cents: 999,
    };
    sku.save().in_env(&env).await.expect("save");
    sku.price_cents = 1099;
    sku.save().in_env(&env).await.expect("update");
    assert_eq!(
        Sku::find_by_id("SKU-1").in_env(&env).await.expect("find"),
        Some(sku.clone())
    );
    assert_eq!(Sku::count(doc! {}).in_env(&env).await.expect("count"), 1);

    let mut counter = Counter { number: None, value: 1 };
    assert!(
        matches!(counter.save().in_env(&env).await, Err(Error::Id(_))),
        "integer ids are not generated"
    );
    counter.number = Some(42);
    counter.save().in_env(&env).await.expect("save");
    assert_eq!(Counter::find_by_id(42).in_env(&env).await.expect("find"), Some(counter));
    assert_eq!(Counter::COLLECTION, "counters");
    assert_eq!(Sku::COLLECTION, "skus", "default collection name");
}

#[tokio::test]
async fn unicode_empty_long_nested_and_optional_values_round_trip() {
    let env = test_env("roundtrip").await;
    let mut user = User::new("Zoë 漢字 🚀", "zoë@例え.jp");
    user.profile = Profile {
        bio: "x".repeat(100_000),
        tags: vec![String::new(), "ünïcødé".into(), "\u{0}nul".into()],
        address: Some(Address {
            city: "Zürich".into(),
            zip: None,
        }),
    };
    user.age = None;
    user.reference = Some("ab-12".into());
    user.save().in_env(&env).await.expect("save");
    let back = User::find_by_id(user.id.expect("id"))
        .in_env(&env)
        .await
        .expect("find")
        .expect("stored");
    assert_eq!(back, user);
    let raw = env
        .database()
        .collection::<earnorm::bson::Document>("users")
        .find_one(doc! {})
        .await
        .expect("raw")
        .expect("doc");
    assert_eq!(
        raw.get_str("ref").expect("renamed field"),
        "ab-12",
        "serde renames are the stored names"
    );
    assert_eq!(User::FIELDS.reference, "ref");
    assert_eq!(User::FIELDS.id, "_id");
}

#[tokio::test]
async fn without_an_environment_calls_fail_clearly() {
    // Not inside a scope and (in this test binary) no `init`: a typed error.
    let outcome = tokio::spawn(async { User::count(doc! {}).await }).await.expect("task");
    assert!(matches!(outcome, Err(Error::NotInitialized)), "{outcome:?}");
}

#[tokio::test]
async fn connecting_to_a_missing_mongodb_fails_with_a_connection_error() {
    let config = earnorm::Config {
        // Port 1: nothing listens there.
        mongo_uri: "mongodb://user:pa55word@127.0.0.1:1/?directConnection=true".to_owned(),
        connect_timeout: std::time::Duration::from_millis(500),
        redis_uri: None,
        ..Default::default()
    };
    let err = Environment::connect(config.clone())
        .await
        .expect_err("nothing listens there");
    assert!(matches!(err, Error::Connection { .. }), "{err}");
    let shown = format!("{err} {err:?} {config:?}");
    assert!(!shown.contains("pa55word"), "credentials leaked: {shown}");
}

#[tokio::test]
async fn ids_are_generated_only_for_object_ids() {
    let id = ObjectId::new();
    let user = User {
        id: Some(id),
        ..User::new("Al", "al@example.com")
    };
    assert_eq!(user.id_key(), Some(id.to_hex()));
}

/// Partial updates take `.session(&mut tx)` like every other write: applied
/// in the transaction (visible inside it, not outside, until the commit).
/// One whose result fails validation cannot be taken back alone, so it
/// dooms the transaction: its commit aborts, and nothing is applied.
#[tokio::test]
async fn partial_updates_run_inside_a_transaction_and_a_failed_one_aborts_it() {
    let env = test_env("partial_tx").await;
    let mut ada = User::new("Ada", "ada@example.com");
    ada.age = Some(36);
    ada.save().in_env(&env).await.expect("save");
    let id = ada.id.expect("id");

    let mut tx = env.start_transaction().await.expect("transaction");
    assert!(ada
        .update(doc! { "$inc": { "age": 1 } })
        .session(&mut tx)
        .await
        .expect("update in tx"));
    assert_eq!(ada.age, Some(37), "the record is refreshed from the transaction");
    let bob = User::upsert_one(
        doc! { "email": "bob@example.com" },
        doc! { "$set": { "name": "Bob", "age": 20 } },
    )
    .session(&mut tx)
    .await
    .expect("upsert in tx");
    let renamed = User::update_one(doc! { "_id": id }, doc! { "$set": { "name": "Ada L." } })
        .session(&mut tx)
        .await
        .expect("update_one in tx")
        .expect("matched");
    assert_eq!((renamed.name.as_str(), renamed.age), ("Ada L.", Some(37)));
    let outside = User::find_by_id(id).in_env(&env).await.expect("find").expect("ada");
    assert_eq!(
        (outside.name.as_str(), outside.age),
        ("Ada", Some(36)),
        "not committed yet"
    );
    tx.commit().await.expect("commit");
    let stored = User::find_by_id(id).in_env(&env).await.expect("find").expect("ada");
    assert_eq!((stored.name.as_str(), stored.age), ("Ada L.", Some(37)));
    assert!(User::find_by_id(bob.id.expect("id"))
        .in_env(&env)
        .await
        .expect("find")
        .is_some());

    // A result that fails validation (age over 150): refused, and the
    // transaction with it.
    let mut tx = env.start_transaction().await.expect("transaction");
    User::update_one(doc! { "_id": id }, doc! { "$set": { "name": "Ada Lovelace" } })
        .session(&mut tx)
        .await
        .expect("a valid update first");
    let err = User::update_one(doc! { "_id": id }, doc! { "$set": { "age": 200 } })
        .session(&mut tx)
        .await
        .expect_err("age 200 fails validation");
    assert!(matches!(err, Error::Validation(_)), "{err:?}");
    let err = tx.commit().await.expect_err("a doomed transaction does not commit");
    assert!(matches!(err, Error::TransactionAborted { .. }), "{err:?}");
    let stored = User::find_by_id(id).in_env(&env).await.expect("find").expect("ada");
    assert_eq!(
        (stored.name.as_str(), stored.age),
        ("Ada L.", Some(37)),
        "nothing of the aborted transaction was applied"
    );

    // A partial update dropped before it finished (a timeout, say) may
    // have been applied in the transaction without its result being
    // validated: the transaction may not commit.
    let mut tx = env.start_transaction().await.expect("transaction");
    let update = User::update_one(doc! { "_id": id }, doc! { "$set": { "name": "Ada B." } }).session(&mut tx);
    assert!(
        update.into_future().now_or_never().is_none(),
        "still running after one poll"
    );
    let err = tx
        .commit()
        .await
        .expect_err("a transaction with an unchecked write does not commit");
    assert!(matches!(err, Error::TransactionAborted { .. }), "{err:?}");
    let stored = User::find_by_id(id).in_env(&env).await.expect("find").expect("ada");
    assert_eq!(stored.name, "Ada L.");
    let _ = env.database().drop().await;
}
