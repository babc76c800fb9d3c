//! EarnORM in one page: derive a model (with a record cache), save it, call
//! a cached method twice (a miss, then a hit), update the record (which
//! invalidates), read it through the record cache and a cached query, and
//! print the cache statistics.
//!
//! Run with `scripts/demo.sh` (starts MongoDB and Redis if needed, and runs
//! it with Redis, then without), or `cargo run --example quickstart` against
//! servers at `MONGODB_URI` and `REDIS_URL`. With `-- --no-redis` it runs
//! with `redis_uri: None`: the embedded mode, where the in-process tier
//! caches with no server at all.

use std::time::{Duration, Instant};

use earnorm::bson::{doc, oid::ObjectId};
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "users", cache(ttl = 300))]
pub struct User {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    #[earnorm(required)]
    pub name: String,
    #[earnorm(email)]
    pub email: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub display_name: String,
    pub domain: String,
}

impl User {
    /// An "expensive" computation, cached per user for five minutes.
    #[cached(ttl = 300)]
    pub async fn get_profile(&self) -> earnorm::Result<Profile> {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let domain = self.email.split('@').nth(1).unwrap_or_default().to_owned();
        Ok(Profile {
            display_name: self.name.to_uppercase(),
            domain,
        })
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> earnorm::Result<()> {
    let embedded = std::env::args().any(|arg| arg == "--no-redis");
    let redis_uri =
        (!embedded).then(|| std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://localhost:6379/0".into()));
    let config = Config {
        mongo_uri: std::env::var("MONGODB_URI").unwrap_or_else(|_| "mongodb://localhost:27017".into()),
        database: "earnorm_quickstart".into(),
        redis_uri, // None: the in-process tier alone

        cache_config: CacheConfig {
            ttl: Duration::from_secs(3600),
            prefix: "earnorm-quickstart:".into(),
            max_retries: 3,
            retry_delay: Duration::from_secs(1),
            health_check_interval: Duration::from_secs(30),
            ..Default::default()
        },
        ..Default::default()
    };
    let env = earnorm::init(config).await?;
    if embedded {
        println!("cache: in process only (no Redis)");
    } else {
        println!("cache: Redis, {:?}", earnorm::cache().status());
    }

    User::delete_many(doc! {}).await?;
    let mut user = User {
        id: None,
        name: "Ada".into(),
        email: "ada@example.com".into(),
    };
    user.save().await?;
    println!("saved user {}", user.id.map(|id| id.to_hex()).unwrap_or_default());
    // The save invalidated this user's entries; the database feed sees it
    // too and invalidates them again a few milliseconds later. Let that
    // pass, so that the value computed next is stored.
    env.wait_for_feed(Duration::from_secs(1)).await;

    for call in ["first call", "second call"] {
        let hits = earnorm::cache().stats().hits;
        let start = Instant::now();
        let profile = user.get_profile().await?;
        let how = if earnorm::cache().stats().hits > hits {
            "hit"
        } else {
            "miss, ran the body"
        };
        println!("{call} ({how}): {profile:?} in {:?}", start.elapsed());
    }

    user.email = "ada@lovelace.org".into();
    user.save().await?; // invalidates this user's cached entries
    env.wait_for_feed(Duration::from_secs(1)).await;
    let profile = user.get_profile().await?;
    println!("after the update: {profile:?}");

    let id = user.id.unwrap_or_default();
    for call in ["first find_by_id", "second find_by_id"] {
        let hits = earnorm::cache().stats().hits;
        let found = User::find_by_id(id).await?;
        let how = if earnorm::cache().stats().hits > hits {
            "record cache hit"
        } else {
            "read MongoDB"
        };
        println!("{call} ({how}): {found:?}");
    }
    let users = User::count(doc! {}).cached(Duration::from_secs(60)).await?;
    println!("users: {users} (a cached query, until the next write to users)");
    for named in earnorm::cache().stats_by_name() {
        println!(
            "  {} {}: hits={} misses={}",
            named.namespace, named.name, named.hits, named.misses
        );
    }

    let stats = earnorm::cache().stats();
    println!(
        "stats: hits={} (in process: {}) misses={} sets={} invalidations={} errors={} fallbacks={} status={:?}",
        stats.hits,
        stats.local_hits,
        stats.misses,
        stats.sets,
        stats.invalidations,
        stats.errors,
        stats.fallbacks,
        stats.status
    );
    // Leave cleanly: other processes on this Redis keep serving hits, and
    // one of them takes the database feed over at once.
    earnorm::shutdown().await;
    Ok(())
}
