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
    note.save().in_env(&env).await.expect("save");
    let (mut a, mut b) = (note.clone(), note.clone());
    a.text = "a".into();
    b.text = "b".into();
    a.save().in_env(&env).await.expect("save a");
    b.save().in_env(&env).await.expect("save b overwrites a's change");
    let stored = Note::find_by_id(note.id.expect("id")).in_env(&env).await.expect("find");
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
    account.save().in_env(&env).await.expect("insert");
    assert_eq!(account.version, 1, "the first save gives version 1");
    let id = account.id.expect("id");

    let (mut a, mut b) = (account.clone(), account.clone());
    a.balance += 50;
    a.save().in_env(&env).await.expect("save a");
    assert_eq!(a.version, 2);
    // Cache the current state, to see that the conflict invalidates nothing.
    assert_eq!(
        Account::find_by_id(id).in_env(&env).await.expect("find"),
        Some(a.clone())
    );
    let hits = record_hits(&env);

    b.balance -= 30;
    let err = b.save().in_env(&env).await.expect_err("b is outdated");
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
        Account::find_by_id(id).in_env(&env).await.expect("find"),
        Some(a.clone()),
        "nothing was written"
    );
    assert_eq!(record_hits(&env), hits + 1, "and nothing was invalidated: still a hit");

    // Read again, apply, save: fine.
    let mut fresh = Account::find_by_id(id)
        .in_env(&env)
        .await
        .expect("find")
        .expect("stored");
    fresh.balance -= 30;
    fresh.save().in_env(&env).await.expect("save the re-read copy");
    assert_eq!(fresh.version, 3);
    let stored = Account::find_by_id(id)
        .in_env(&env)
        .await
        .expect("find")
        .expect("stored");
    assert_eq!((stored.balance, stored.version), (120, 3), "both changes kept");

    // A deleted record: its outdated copy does not bring it back.
    fresh.delete().in_env(&env).await.expect("delete");
    let err = a.save().in_env(&env).await.expect_err("deleted since");
    assert!(matches!(err, Error::Conflict { .. }), "{err:?}");
    assert_eq!(Account::find_by_id(id).in_env(&env).await.expect("find"), None);
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
    first.save().in_env(&env).await.expect("first save inserts");
    assert_eq!(first.rev, 1);
    let mut second = Sku {
        code: "SKU-1".into(),
        stock: 9,
        rev: 0,
    };
    let err = second
        .save()
        .in_env(&env)
        .await
        .expect_err("another new copy of the same id");
    assert!(matches!(err, Error::Conflict { version: 0, .. }), "{err:?}");
    assert_eq!(second.rev, 0);
    first.stock = 4;
    first.save().in_env(&env).await.expect("update");
    let stored = Sku::find_one(doc! { "_id": "SKU-1" }).in_env(&env).await.expect("find");
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
    ada.save().in_env(&env).await.expect("save");
    bob.save().in_env(&env).await.expect("save");
    let (a, b) = (ada.id.expect("id"), bob.id.expect("id"));
    for id in [a, b] {
        Member::find_by_id(id).in_env(&env).await.expect("cache it");
    }

    assert!(ada
        .update(doc! { "$inc": { "visits": 2 }, "$set": { "email": "ada@lovelace.org" } })
        .in_env(&env)
        .await
        .expect("update"));
    assert_eq!(
        (ada.visits, ada.email.as_str()),
        (2, "ada@lovelace.org"),
        "refreshed from the result"
    );
    let before = member_stats(&env);
    assert_eq!(
        Member::find_by_id(a).in_env(&env).await.expect("find"),
        Some(ada.clone())
    );
    assert_eq!(
        Member::find_by_id(b).in_env(&env).await.expect("find"),
        Some(bob.clone())
    );
    let after = member_stats(&env);
    assert_eq!(
        (after.0 - before.0, after.1 - before.1),
        (1, 1),
        "the updated record was read again, the other one was still cached"
    );

    // An update whose result fails validation writes nothing.
    let err = ada
        .update(doc! { "$set": { "email": "not an address" } })
        .in_env(&env)
        .await
        .expect_err("invalid result");
    assert!(matches!(err, Error::Validation(_)), "{err:?}");
    assert_eq!(ada.email, "ada@lovelace.org", "the copy is unchanged");
    let stored = earnorm::bypass_cache(Member::find_by_id(a).in_env(&env))
        .await
        .expect("find");
    assert_eq!(
        stored.map(|m| m.email),
        Some("ada@lovelace.org".into()),
        "nothing written"
    );

    // By filter: the record found is returned and invalidated.
    let updated = Member::update_one(doc! { "email": "bob@example.com" }, doc! { "$inc": { "visits": 1 } })
        .in_env(&env)
        .await
        .expect("update_one")
        .expect("matched");
    assert_eq!((updated.id, updated.visits), (Some(b), 1));
    assert_eq!(Member::find_by_id(b).in_env(&env).await.expect("find"), Some(updated));
    assert_eq!(
        Member::update_one(doc! { "email": "nobody@example.com" }, doc! { "$inc": { "visits": 1 } })
            .in_env(&env)
            .await
            .expect("update_one"),
        None,
        "nothing matched"
    );

    // Upsert: inserted when absent, updated when present.
    let carol = Member::upsert_one(doc! { "email": "carol@example.com" }, doc! { "$inc": { "visits": 1 } })
        .in_env(&env)
        .await
        .expect("upsert inserts");
    assert_eq!(carol.visits, 1);
    let again = Member::upsert_one(doc! { "email": "carol@example.com" }, doc! { "$inc": { "visits": 1 } })
        .in_env(&env)
        .await
        .expect("upsert updates");
    assert_eq!((again.id, again.visits), (carol.id, 2));
    assert_eq!(Member::count(doc! {}).in_env(&env).await.expect("count"), 3);

    // A record that is gone.
    let mut gone = bob.clone();
    bob.delete().in_env(&env).await.expect("delete");
    assert!(!gone
        .update(doc! { "$inc": { "visits": 1 } })
        .in_env(&env)
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
    account.save().in_env(&env).await.expect("insert");
    let mut outdated = account.clone();
    account
        .update(doc! { "$inc": { "balance": 5 } })
        .in_env(&env)
        .await
        .expect("update");
    assert_eq!((account.balance, account.version), (15, 2));
    let err = outdated
        .update(doc! { "$set": { "balance": 0 } })
        .in_env(&env)
        .await
        .expect_err("outdated");
    assert!(matches!(err, Error::Conflict { version: 1, .. }), "{err:?}");
    let stored = Account::find_by_id(account.id.expect("id"))
        .in_env(&env)
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
        profile.save().in_env(&env).await.expect("save");
    }
    let find = || Profile::find(doc! {}).in_env(&env).sort(doc! { "name": 1 });
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
    carol.save().in_env(&env).await.expect("save");
    assert_eq!(
        cached().await.expect("project").len(),
        3,
        "a write to the model invalidates it"
    );
    let _ = env.database().drop().await;
}

/// An author, with a record cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "authors", cache(ttl = 300))]
struct Author {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    name: String,
}

/// A post referring to its author.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "posts")]
struct Post {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    title: String,
    author: earnorm::Ref<Author>,
}

/// The per-author count an aggregation computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PostsPerAuthor {
    name: String,
    posts: i64,
}

async fn authors_and_posts(env: &Environment) -> (Vec<Author>, Vec<Post>) {
    let mut authors = Vec::new();
    for name in ["Ada", "Bob", "Cy"] {
        let mut author = Author {
            id: None,
            name: name.into(),
        };
        author.save().in_env(env).await.expect("save");
        authors.push(author);
    }
    let mut posts = Vec::new();
    for (i, title) in ["a", "b", "c", "d", "e", "f"].iter().enumerate() {
        let mut post = Post {
            id: None,
            title: (*title).into(),
            author: earnorm::Ref::to(&authors[i % 2]).expect("saved"),
        };
        post.save().in_env(env).await.expect("save");
        posts.push(post);
    }
    (authors, posts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_aggregation_is_invalidated_by_writes_to_every_collection_it_reads() {
    use std::time::Duration;

    let env = test_env("aggregate").await;
    let (mut authors, mut posts) = authors_and_posts(&env).await;
    let stored = Post::find_by_id(posts[0].id.expect("id"))
        .in_env(&env)
        .await
        .expect("find")
        .expect("post");
    assert_eq!(stored.author, posts[0].author, "a reference is stored as the id");
    let raw = env
        .database()
        .collection::<earnorm::bson::Document>("posts")
        .find_one(doc! {})
        .await
        .expect("raw")
        .expect("a post");
    assert!(raw.get_object_id("author").is_ok(), "stored as an ObjectId: {raw}");

    let pipeline = vec![
        doc! { "$group": { "_id": "$author", "posts": { "$sum": 1 } } },
        doc! { "$lookup": { "from": "authors", "localField": "_id", "foreignField": "_id", "as": "who" } },
        doc! { "$unwind": "$who" },
        doc! { "$project": { "_id": 0, "name": "$who.name", "posts": 1 } },
        doc! { "$sort": { "name": 1 } },
    ];
    let report = || {
        Post::aggregate(pipeline.clone())
            .in_env(&env)
            .typed::<PostsPerAuthor>()
            .cached(Duration::from_secs(60))
    };
    assert_eq!(report().collections(), ["posts", "authors"]);
    let first = report().await.expect("aggregate");
    assert_eq!(
        first,
        [
            PostsPerAuthor {
                name: "Ada".into(),
                posts: 3
            },
            PostsPerAuthor {
                name: "Bob".into(),
                posts: 3
            }
        ]
    );
    let stats = |name: &str| {
        let namespace = env.model_scope("posts");
        env.cache()
            .stats_by_name()
            .into_iter()
            .find(|s| s.namespace == namespace && s.name == name)
            .map_or((0, 0), |s| (s.hits, s.misses))
    };
    assert_eq!(report().await.expect("aggregate"), first);
    assert_eq!(stats("aggregate"), (1, 1), "cached");

    // A write to the looked-up collection invalidates it.
    authors[0].name = "Ada L.".into();
    authors[0].save().in_env(&env).await.expect("rename");
    assert_eq!(report().await.expect("aggregate")[0].name, "Ada L.");
    // So does a write to the model's own collection.
    posts[5].author = earnorm::Ref::to(&authors[2]).expect("saved");
    posts[5].save().in_env(&env).await.expect("move a post");
    let moved = report().await.expect("aggregate");
    assert_eq!(moved.iter().map(|r| r.posts).collect::<Vec<_>>(), [3, 2, 1]);
    // A write elsewhere does not.
    let mut note = Note {
        id: None,
        text: "unrelated".into(),
    };
    note.save().in_env(&env).await.expect("save");
    let (hits, _) = stats("aggregate");
    assert_eq!(report().await.expect("aggregate"), moved);
    assert_eq!(stats("aggregate").0, hits + 1, "still cached");

    // Untyped, and a pipeline that writes: never cached, and what it wrote
    // to is invalidated.
    let docs = Post::aggregate(vec![doc! { "$count": "n" }])
        .in_env(&env)
        .await
        .expect("count");
    assert_eq!(
        docs[0].get_i32("n").ok().map(i64::from).or(docs[0].get_i64("n").ok()),
        Some(6)
    );
    let copied = Post::aggregate(vec![doc! { "$match": {} }, doc! { "$out": "posts_copy" }])
        .in_env(&env)
        .cached(Duration::from_secs(60))
        .await
        .expect("$out");
    assert!(copied.is_empty());
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loading_posts_and_their_authors_takes_two_queries_not_one_per_post() {
    use std::sync::atomic::Ordering;

    let (env, finds) = support::counting_env("refs", "find").await;
    let (authors, _) = authors_and_posts(&env).await;

    finds.store(0, Ordering::SeqCst);
    let posts = Post::find(doc! {}).in_env(&env).await.expect("posts");
    let by_author = earnorm::Ref::fetch_all_in(&env, posts.iter().map(|p| &p.author))
        .await
        .expect("authors");
    assert_eq!(
        finds.load(Ordering::SeqCst),
        2,
        "one find for the posts, one `$in` for their authors"
    );
    assert_eq!(by_author.len(), 2);
    for post in &posts {
        let author = by_author.get(&post.author).expect("every post has its author");
        assert_eq!(Some(author.id.expect("id")), Some(*post.author.id()));
    }
    // The authors are now in the record cache: one at a time costs no query.
    finds.store(0, Ordering::SeqCst);
    let ada = posts[0].author.fetch_in(&env).await.expect("fetch").expect("exists");
    assert_eq!(ada, authors[0]);
    assert_eq!(finds.load(Ordering::SeqCst), 0, "served by the record cache");
    let _ = env.database().drop().await;
}

/// Timestamps set by the ORM, and hooks of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "tickets", hooks)]
struct Ticket {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    title: String,
    #[serde(default)]
    hits: i64,
    #[earnorm(created_at)]
    #[serde(default)]
    created: Option<earnorm::bson::DateTime>,
    #[earnorm(updated_at)]
    #[serde(default = "epoch")]
    updated: earnorm::bson::DateTime,
}

fn epoch() -> earnorm::bson::DateTime {
    earnorm::bson::DateTime::from_millis(0)
}

static SAVED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DELETED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl earnorm::Hooks for Ticket {
    fn before_save(&mut self) -> earnorm::Result<()> {
        self.title = self.title.trim().to_owned();
        if self.title.is_empty() {
            return Err(Error::refused("a ticket needs a title"));
        }
        Ok(())
    }
    fn after_save(&self) {
        SAVED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    fn before_delete(&self) -> earnorm::Result<()> {
        if self.title == "keep" {
            return Err(Error::refused("this ticket is kept"));
        }
        Ok(())
    }
    fn after_delete(&self) {
        DELETED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timestamps_are_set_by_the_orm_and_hooks_run_around_writes() {
    use std::sync::atomic::Ordering;

    let env = test_env("hooks").await;
    let mut ticket = Ticket {
        id: None,
        title: "  leak in the roof ".into(),
        hits: 0,
        created: None,
        updated: epoch(),
    };
    let saved = SAVED.load(Ordering::SeqCst);
    ticket.save().in_env(&env).await.expect("save");
    assert_eq!(ticket.title, "leak in the roof", "before_save changed the record");
    assert_eq!(SAVED.load(Ordering::SeqCst), saved + 1, "after_save ran");
    let created = ticket.created.expect("created_at set on insert");
    assert_eq!(ticket.updated, created, "updated_at too");
    let stored = Ticket::find_by_id(ticket.id.expect("id"))
        .in_env(&env)
        .await
        .expect("find")
        .expect("stored");
    assert_eq!(stored, ticket, "as stored");

    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    ticket.hits = 1;
    ticket.save().in_env(&env).await.expect("save again");
    assert_eq!(ticket.created, Some(created), "created_at kept");
    assert!(ticket.updated > created, "updated_at moved");

    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let before = ticket.updated;
    ticket
        .update(doc! { "$inc": { "hits": 1 } })
        .in_env(&env)
        .await
        .expect("update");
    assert!(ticket.updated > before, "update sets updated_at (server time)");
    assert_eq!((ticket.hits, ticket.created), (2, Some(created)));
    let upserted = Ticket::upsert_one(doc! { "title": "new" }, doc! { "$set": { "hits": 0 } })
        .in_env(&env)
        .await
        .expect("upsert");
    assert!(upserted.created.is_some(), "an upsert that inserts sets created_at");

    // A hook refuses: nothing written.
    let mut blank = Ticket {
        title: "   ".into(),
        ..ticket.clone()
    };
    blank.id = None;
    let err = blank.save().in_env(&env).await.expect_err("refused");
    assert_eq!(err.to_string(), "refused by a hook: a ticket needs a title");
    assert_eq!(Ticket::count(doc! {}).in_env(&env).await.expect("count"), 2);
    let mut kept = ticket.clone();
    kept.title = "keep".into();
    assert!(kept.delete().in_env(&env).await.is_err(), "before_delete refused");
    let deleted = DELETED.load(Ordering::SeqCst);
    assert!(ticket.delete().in_env(&env).await.expect("delete"));
    assert_eq!(DELETED.load(Ordering::SeqCst), deleted + 1, "after_delete ran");
    let _ = env.database().drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_gives_typed_change_events_of_the_model() {
    use earnorm::ChangeKind;
    use futures_util::StreamExt;
    use std::time::Duration;

    let env = test_env("watch").await;
    let mut events = Member::watch_in(&env).await.expect("watch");
    let mut member = Member {
        id: None,
        email: "ada@example.com".into(),
        visits: 0,
    };
    member.save().in_env(&env).await.expect("insert");
    member
        .update(doc! { "$inc": { "visits": 1 } })
        .in_env(&env)
        .await
        .expect("update");
    member.visits = 5;
    member.save().in_env(&env).await.expect("replace");
    member.delete().in_env(&env).await.expect("delete");
    async fn next(events: &mut earnorm::ChangeEvents<Member>) -> earnorm::ChangeEvent<Member> {
        tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("a typed event")
    }
    let id = member.id;
    let inserted = next(&mut events).await;
    assert_eq!((inserted.kind, inserted.id), (ChangeKind::Insert, id));
    assert_eq!(inserted.record.map(|m| m.email), Some("ada@example.com".into()));
    let updated = next(&mut events).await;
    assert_eq!((updated.kind, updated.id), (ChangeKind::Update, id));
    assert_eq!(updated.updated_fields, Some(doc! { "visits": 1_i64 }));
    let replaced = next(&mut events).await;
    assert_eq!(replaced.kind, ChangeKind::Replace);
    assert_eq!(replaced.record.map(|m| m.visits), Some(5));
    let deleted = next(&mut events).await;
    assert_eq!(
        (deleted.kind, deleted.id, deleted.record),
        (ChangeKind::Delete, id, None)
    );
    assert!(deleted.at.is_some());
    let _ = env.database().drop().await;
}

/// Bug: `$merge`/`$out` into `{ db: X, coll: Y }` invalidated the collection
/// `Y` of the aggregation's own database, so cached reads of `X.Y` (another
/// environment's, sharing the Redis prefix) stayed stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_writing_into_another_database_invalidates_that_database() {
    let target_config = support::test_config("merge_target");
    let target = support::connect(target_config.clone()).await;
    let source = support::connect(earnorm::Config {
        database: support::unique_name("merge_source"),
        ..target_config
    })
    .await;
    let count = || {
        Note::count(doc! {})
            .in_env(&target)
            .cached(std::time::Duration::from_secs(60))
    };
    assert_eq!(count().await.expect("count"), 0);
    let mut notes = vec![
        Note {
            id: None,
            text: "a".into(),
        },
        Note {
            id: None,
            text: "b".into(),
        },
    ];
    Note::insert_many(&mut notes).in_env(&source).await.expect("insert");
    for stage in ["$merge", "$out"] {
        let into = doc! { "db": target.database().name(), "coll": Note::COLLECTION };
        let spec = if stage == "$merge" {
            doc! { "$merge": { "into": into } }
        } else {
            doc! { "$out": into }
        };
        Note::aggregate(vec![doc! { "$match": {} }, spec])
            .in_env(&source)
            .await
            .expect("write into the other database");
        assert_eq!(
            count().await.expect("count"),
            2,
            "{stage} invalidated the target's queries"
        );
        Note::delete_many(doc! {})
            .in_env(&target)
            .await
            .expect("empty the target");
        assert_eq!(count().await.expect("count"), 0);
    }
    let _ = source.database().drop().await;
    let _ = target.database().drop().await;
}
