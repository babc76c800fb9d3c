//! Generated code compiles cleanly under strict user lints. `.ci/run` runs
//! clippy with `-D warnings` on this file, so pedantic findings in generated
//! code fail the build.
#![deny(unused_qualifications, unused_imports, missing_docs, rust_2018_idioms)]
#![deny(clippy::pedantic)]

use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

/// A model with every attribute.
#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "strict_items")]
pub struct Item {
    /// Id.
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    /// Name.
    #[earnorm(required, min_length = 1, max_length = 10, pattern = "[a-z]+", index)]
    pub name: String,
    /// Contact.
    #[earnorm(email, unique)]
    pub contact: Option<String>,
    /// Quantity.
    #[earnorm(min = 0, max = 1000.5)]
    pub quantity: i64,
}

/// A generic model.
#[derive(Debug, Clone, Serialize, Deserialize, Model)]
pub struct Boxed<T> {
    /// Id.
    #[serde(rename = "_id")]
    pub id: String,
    /// Payload.
    pub value: T,
}

impl Item {
    /// Record scope.
    ///
    /// # Errors
    /// Never, in this example.
    #[cached(ttl = 30)]
    pub async fn label(&self, suffix: &str) -> earnorm::Result<String> {
        Ok(format!("{}{suffix}", self.name))
    }

    /// Model scope.
    #[cached(ttl = 30, version = 2, tags("inventory"))]
    pub async fn total(limit: u32) -> Option<u64> {
        Some(u64::from(limit))
    }
}

impl<T: Clone + Serialize + serde::de::DeserializeOwned + Send + Sync + Unpin + 'static> Boxed<T> {
    /// A cached method on a generic model.
    #[cached(ttl = 30)]
    pub async fn value(&self) -> T {
        self.value.clone()
    }
}

/// A free function.
#[cached(ttl = 30, scope = "strict")]
pub async fn doubled(n: i64) -> i64 {
    n * 2
}

/// The application's result alias.
pub type AppResult<T> = Result<T, String>;

/// A free function returning a result alias: only `Ok` is cached.
///
/// # Errors
/// For negative input.
#[cached(ttl = 30, scope = "strict")]
pub async fn checked(n: i64) -> AppResult<i64> {
    if n < 0 {
        Err("negative".to_owned())
    } else {
        Ok(n)
    }
}

/// A free function with a `mut` argument.
#[cached(ttl = 30, scope = "strict")]
pub async fn incremented(mut n: i64) -> i64 {
    n += 1;
    n
}

#[test]
fn strict_code_compiles_and_runs_without_a_cache() {
    let item = Item {
        id: None,
        name: "ok".into(),
        contact: None,
        quantity: 1,
    };
    assert!(Model::validate(&item).is_ok());
    assert_eq!(Item::FIELDS.id, "_id");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // No environment: cached calls run their bodies.
    assert_eq!(rt.block_on(item.label("!")).expect("label"), "ok!");
    assert_eq!(rt.block_on(Item::total(3)), Some(3));
    assert_eq!(rt.block_on(doubled(4)), 8);
    assert_eq!(rt.block_on(incremented(4)), 5);
    assert_eq!(rt.block_on(checked(-1)), Err("negative".to_owned()));
    let boxed = Boxed {
        id: "b".into(),
        value: 5u8,
    };
    assert_eq!(rt.block_on(boxed.value()), 5);
}
