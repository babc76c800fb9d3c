//! The model of the database feed's tests (included with `#[path]`).

use std::time::{Duration, Instant};

use earnorm::bson::{doc, oid::ObjectId};
use earnorm::prelude::*;
use earnorm::Environment;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "feed_items")]
pub struct Item {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
    pub qty: i64,
}

impl Item {
    /// A record with a fresh id.
    #[allow(dead_code)] // used by one of the two test files that include this one
    pub fn new(name: &str, qty: i64) -> Self {
        Self {
            id: Some(ObjectId::new()),
            name: name.to_owned(),
            qty,
        }
    }

    /// Record scope, reading MongoDB.
    #[cached(ttl = 300)]
    pub async fn stored_qty(&self) -> earnorm::Result<Option<i64>> {
        let id = self.id.ok_or_else(|| earnorm::Error::Id("no id".into()))?;
        Ok(Item::find_by_id(id).await?.map(|item| item.qty))
    }

    /// Record scope, reading MongoDB slowly (a computation that spans the
    /// change event of a write made just before it).
    #[allow(dead_code)] // used by one of the two test files that include this one
    #[cached(ttl = 300)]
    pub async fn slow_qty(&self) -> earnorm::Result<Option<i64>> {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let id = self.id.ok_or_else(|| earnorm::Error::Id("no id".into()))?;
        Ok(Item::find_by_id(id).await?.map(|item| item.qty))
    }

    /// Model scope, reading MongoDB.
    #[cached(ttl = 300)]
    pub async fn total() -> earnorm::Result<u64> {
        Item::count(doc! {}).await
    }
}

/// Polls the record-scope cached read of `item` in `env` until it returns
/// `want`; how long that took.
#[allow(dead_code)] // used by some of the test files that include this one
pub async fn until_qty(env: &Environment, item: &Item, want: i64, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if env.scope(item.stored_qty()).await.ok().flatten() == Some(want) {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}
