//! Connection settings.

use std::fmt;
use std::time::Duration;

use earnorm_cache::{redact_url, CacheConfig};

/// Where EarnORM connects, and how its cache behaves.
///
/// ```
/// use earnorm::{CacheConfig, Config};
///
/// let config = Config {
///     mongo_uri: "mongodb://localhost:27017".into(),
///     database: "shop".into(),
///     redis_uri: None, // cached in this process only (the in-process tier)
///     cache_config: CacheConfig { prefix: "shop:".into(), ..Default::default() },
///     ..Default::default()
/// };
/// assert_eq!(config.database, "shop");
/// ```
#[derive(Clone, PartialEq)]
pub struct Config {
    /// MongoDB connection string.
    pub mongo_uri: String,
    /// Database name.
    pub database: String,
    /// Redis URL; `None` runs without Redis: values are then cached in this
    /// process only (the in-process tier, see [`CacheConfig::local`]).
    pub redis_uri: Option<String>,
    /// Cache behaviour.
    pub cache_config: CacheConfig,
    /// How long `init`/`connect` waits for MongoDB before failing.
    pub connect_timeout: Duration,
    /// Whether to invalidate from MongoDB's change streams (the database
    /// feed, see the crate docs), so that writes made outside EarnORM are
    /// invalidated too. On by default; it stays off by itself when nothing
    /// is cached (no Redis and the in-process tier off) or on a server
    /// without change streams (a standalone `mongod`). Without Redis, each
    /// process follows the feed for its own in-process tier.
    pub feed: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            mongo_uri: "mongodb://localhost:27017".to_owned(),
            database: "earnbase".to_owned(),
            redis_uri: Some("redis://localhost:6379/0".to_owned()),
            cache_config: CacheConfig::default(),
            connect_timeout: Duration::from_secs(10),
            feed: true,
        }
    }
}

/// Passwords are redacted.
impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("mongo_uri", &redact_url(&self.mongo_uri))
            .field("database", &self.database)
            .field("redis_uri", &self.redis_uri.as_deref().map(redact_url))
            .field("cache_config", &self.cache_config)
            .field("connect_timeout", &self.connect_timeout)
            .field("feed", &self.feed)
            .finish()
    }
}
