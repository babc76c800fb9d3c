//! Hostile data and code: keys that must not collide, values too deep to
//! decode, documents that do not fit their model, secrets in connection
//! strings, names MongoDB refuses. Each test failed before its fix.

use std::error::Error as _;
use std::sync::atomic::{AtomicUsize, Ordering};

use earnorm::bson::{doc, oid::ObjectId, Document};
use earnorm::prelude::*;
use earnorm::{Environment, Error};
use serde::{Deserialize, Serialize};
use support::{test_config, test_env};

static DEEP_RUNS: AtomicUsize = AtomicUsize::new(0);

/// Arrays inside arrays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Nest(Vec<Nest>);

fn nest(depth: usize) -> Nest {
    (0..depth).fold(Nest(Vec::new()), |inner, _| Nest(vec![inner]))
}

#[cached(ttl = 60, scope = "deep")]
async fn deep(depth: usize) -> Nest {
    DEEP_RUNS.fetch_add(1, Ordering::SeqCst);
    nest(depth)
}

#[cached(ttl = 60, scope = "echo")]
async fn echo(value: Option<Option<u8>>) -> String {
    format!("{value:?}")
}

#[cached(ttl = 60, scope = "echo")]
async fn echo_unit(value: Option<()>) -> String {
    format!("{value:?}")
}

/// A unit of temperature.
pub trait Unit: Serialize + Send + Sync {
    /// Degrees at the boiling point of water.
    const BOILING: f64;
}
#[derive(Debug, Serialize)]
pub struct Celsius;
#[derive(Debug, Serialize)]
pub struct Fahrenheit;
impl Unit for Celsius {
    const BOILING: f64 = 100.0;
}
impl Unit for Fahrenheit {
    const BOILING: f64 = 212.0;
}

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "people")]
pub struct Person {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
    #[serde(default)]
    pub bio: String,
}

/// Another model on the same collection.
#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "people")]
pub struct PersonView {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
}

impl Person {
    #[cached(ttl = 60)]
    pub async fn summary() -> String {
        "person".to_owned()
    }

    /// Generic: each unit has its own entry.
    #[cached(ttl = 60)]
    pub async fn boiling<U: Unit>() -> f64 {
        U::BOILING
    }

    /// An associated function with an explicit scope.
    #[cached(ttl = 60, scope = "people-stats")]
    pub async fn tagged_count() -> earnorm::Result<u64> {
        Self::count(doc! {}).await
    }
}

/// A struct named like a `Result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    pub hits: Vec<String>,
}

static SEARCH_RUNS: AtomicUsize = AtomicUsize::new(0);

#[cached(ttl = 60, scope = "search", store = "all")]
async fn search(query: String) -> SearchResult {
    SEARCH_RUNS.fetch_add(1, Ordering::SeqCst);
    SearchResult { hits: vec![query] }
}

/// Names as stored, whatever serde form gives them; bounds compared
/// exactly; `NaN` refused.
#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "readings")]
pub struct Reading {
    #[serde(
        rename(serialize = "_id", deserialize = "_id"),
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub id: Option<ObjectId>,
    #[serde(rename(serialize = "v", deserialize = "value"))]
    #[earnorm(min = 0, max = 9007199254740992)]
    pub value: i64,
    #[earnorm(min = -1.5, max = 1.5)]
    pub ratio: f64,
    #[serde(skip)]
    pub scratch: u8,
}

impl Person {
    /// A typed receiver: the same as `&self`.
    #[allow(clippy::needless_arbitrary_self_type)]
    #[cached(ttl = 60)]
    pub async fn shout(self: &Self) -> String {
        self.name.to_uppercase()
    }
}

impl PersonView {
    #[cached(ttl = 60)]
    pub async fn summary() -> String {
        "view".to_owned()
    }
}

/// Bug: a 700-deep value stored by a body made the next call, a hit,
/// overflow the stack and abort the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_too_deep_to_decode_is_not_stored_and_never_crashes_a_hit() {
    let env = test_env("deep").await;
    env.scope(async {
        let first = deep(700).await;
        let second = deep(700).await;
        assert_eq!(first, second);
        assert_eq!(DEEP_RUNS.load(Ordering::SeqCst), 2, "not stored: computed each time");
        assert_eq!(deep(3).await, deep(3).await);
        assert_eq!(DEEP_RUNS.load(Ordering::SeqCst), 3, "shallow values are cached");
    })
    .await;
}

/// Bug: `None` and `Some(None)`, `None` and `Some(())` gave one key; two
/// models on one collection shared entries; a generic function's type
/// parameters were not in the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_functions_and_arguments_never_share_an_entry() {
    let env = test_env("collide").await;
    env.scope(async {
        assert_eq!(echo(None).await, "None");
        assert_eq!(echo(Some(None)).await, "Some(None)");
        assert_eq!(echo_unit(None).await, "None");
        assert_eq!(echo_unit(Some(())).await, "Some(())");
        assert_eq!(Person::summary().await, "person");
        assert_eq!(PersonView::summary().await, "view");
        assert_eq!(Person::boiling::<Celsius>().await, 100.0);
        assert_eq!(Person::boiling::<Fahrenheit>().await, 212.0);
        assert!(env.cache().stats().hits == 0, "every call above was a miss");
        assert_eq!(Person::boiling::<Fahrenheit>().await, 212.0);
        assert_eq!(
            env.cache().stats().hits,
            1,
            "and entries are still shared by equal calls"
        );
    })
    .await;
}

/// Bug: `#[cached(scope = "..")]` on an associated function did not compile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_associated_function_can_have_an_explicit_scope() {
    let env = test_env("assoc_scope").await;
    env.scope(async {
        assert_eq!(Person::tagged_count().await.expect("count"), 0);
        let mut ada = Person {
            id: None,
            name: "Ada".into(),
            bio: String::new(),
        };
        ada.save().await.expect("save");
        assert_eq!(Person::tagged_count().await.expect("count"), 0, "cached under its tag");
        earnorm::invalidate_tag("people-stats").await;
        assert_eq!(Person::tagged_count().await.expect("count"), 1);
    })
    .await;
}

/// Bug: a stored document that does not fit its model surfaced as
/// `Error::Mongo`; causes were kept as strings or printed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_that_does_not_fit_its_model_is_a_decode_error_with_its_cause() {
    let env = test_env("misfit").await;
    let id = ObjectId::new();
    env.database()
        .collection::<Document>("people")
        .insert_one(doc! { "_id": id, "name": 5 })
        .await
        .expect("raw insert");
    let err = Person::find_by_id(id)
        .in_env(&env)
        .await
        .expect_err("name is not a string");
    assert!(
        matches!(&err, Error::Decode { model: "people", field: Some(field), .. } if field == "name"),
        "{err:?}"
    );
    let cause = err.source().expect("the cause is kept");
    assert!(
        !err.to_string().contains(&cause.to_string()),
        "the cause is not printed twice: {err}"
    );
}

/// Bug: an insert the driver refused before sending (a document over
/// 16 MiB) kept the id generated for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_refused_before_sending_gives_the_id_back() {
    let env = test_env("huge").await;
    let mut huge = Person {
        id: None,
        name: "Huge".into(),
        bio: "x".repeat(17 * 1024 * 1024),
    };
    let err = huge.save().in_env(&env).await.expect_err("over 16 MiB");
    assert!(huge.id.is_none(), "the generated id was taken back ({err})");
}

/// Bug: `Error::Config` was never used; MongoDB database names it refuses
/// failed later and less clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_database_name_is_a_config_error() {
    for name in ["", "a.b", "with space", "a/b", "dollar$"] {
        let config = earnorm::Config {
            database: name.to_owned(),
            ..test_config("dbname")
        };
        let result = Environment::connect(config).await;
        assert!(matches!(result, Err(Error::Config(_))), "{name:?}: {result:?}");
    }
}

/// Bug: MongoDB secret options showed in `Config`'s `Debug` and in
/// `Error::Connection`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongodb_secrets_never_show_in_debug_or_errors() {
    const SECRET: &str = "s3cret-Value";
    let uri = format!(
        "mongodb://127.0.0.1:1/?proxyPassword={SECRET}&tlsCertificateKeyFilePassword={SECRET}\
         &authMechanismProperties=AWS_SESSION_TOKEN:{SECRET}&serverSelectionTimeoutMS=200"
    );
    let config = earnorm::Config {
        mongo_uri: uri,
        redis_uri: Some(format!("redis+unix:///nonexistent.sock?pa%73s={SECRET}")),
        ..test_config("secrets")
    };
    let shown = format!("{config:?}");
    assert!(!shown.contains(SECRET), "{shown}");
    let err = Environment::connect(config)
        .await
        .expect_err("nothing listens on port 1");
    let mut shown = format!("{err} {err:?}");
    let mut source = err.source();
    while let Some(cause) = source {
        shown.push_str(&cause.to_string());
        source = cause.source();
    }
    assert!(!shown.contains(SECRET), "{shown}");
}

/// Bug: `rename(serialize = .., deserialize = ..)` was ignored (a false
/// "missing id field" on `_id`), and `skip` fields were listed as stored.
#[test]
fn fields_are_the_stored_names() {
    assert_eq!(Reading::FIELDS.id, "_id");
    assert_eq!(Reading::FIELDS.value, "v");
    assert_eq!(Reading::FIELDS.ratio, "ratio");
    // `scratch` is not stored: `Reading::FIELDS.scratch` does not exist
    // (tests/ui would show the error); the struct has exactly these fields.
    let ReadingFields {
        id: _,
        value: _,
        ratio: _,
    } = Reading::FIELDS;
}

/// Bug: `NaN` passed `min`/`max`, and integers were compared as `f64`, so
/// 2^53 + 1 passed `max = 2^53`.
#[test]
fn bounds_refuse_nan_and_compare_integers_exactly() {
    let ok = Reading {
        id: None,
        value: 1 << 53,
        ratio: 1.5,
        scratch: 0,
    };
    assert!(ok.validate().is_ok());
    let above = Reading {
        value: (1 << 53) + 1,
        ..ok.clone()
    };
    assert!(above.validate().expect_err("above max").has("value", "max"));
    let nan = Reading { ratio: f64::NAN, ..ok };
    let errors = nan.validate().expect_err("NaN");
    assert!(errors.has("ratio", "min") && errors.has("ratio", "max"), "{errors}");
}

/// `store = "all"` caches a struct whose name ends in `Result`; `self: &Self`
/// is a record method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_overrides_the_return_type_and_typed_receivers_work() {
    let env = test_env("store").await;
    env.scope(async {
        let first = search("rust".into()).await;
        assert_eq!(search("rust".into()).await, first);
        assert_eq!(SEARCH_RUNS.load(Ordering::SeqCst), 1, "cached");
        let mut ada = Person {
            id: None,
            name: "Ada".into(),
            bio: String::new(),
        };
        ada.save().await.expect("save");
        assert_eq!(ada.shout().await, "ADA");
    })
    .await;
}

/// Bug: `limit(i64::MIN)` panicked in the driver ("attempt to negate with
/// overflow"). Limits and skips MongoDB cannot take are an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_skips_out_of_range_are_errors_not_panics() {
    let env = test_env("hostile_limit").await;
    let found = Person::find(doc! {}).in_env(&env).limit(i64::MIN).await;
    assert!(matches!(found, Err(Error::InvalidQuery { .. })), "{found:?}");
    let found = Person::find(doc! {}).in_env(&env).skip(u64::MAX).await;
    assert!(matches!(found, Err(Error::InvalidQuery { .. })), "{found:?}");
    let streamed =
        earnorm::futures::TryStreamExt::try_next(&mut Person::find(doc! {}).in_env(&env).limit(i64::MIN).stream())
            .await;
    assert!(matches!(streamed, Err(Error::InvalidQuery { .. })), "{streamed:?}");
    let fine = Person::find(doc! {}).in_env(&env).limit(i64::MIN + 1).skip(0).await;
    assert!(fine.is_ok(), "{fine:?}");
    let _ = env.database().drop().await;
}
