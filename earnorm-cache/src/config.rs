//! Cache configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the cache behaves: key prefix, default TTL, reconnection and time limits.
///
/// Constructible as a struct literal with `..Default::default()`, and
/// deserializable (for example from a config file); durations are written as
/// seconds, fractions allowed (`operation_timeout = 0.25`).
///
/// ```
/// use std::time::Duration;
/// use earnorm_cache::CacheConfig;
///
/// let config = CacheConfig {
///     ttl: Duration::from_secs(300),
///     prefix: "shop:".into(),
///     ..Default::default()
/// };
/// assert_eq!(config.max_retries, 3);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Default time to live of a cached value when a call does not give one.
    #[serde(with = "seconds")]
    pub ttl: Duration,
    /// Prefix of every key this manager reads or writes. Keys outside it are
    /// never touched, so several applications can share one Redis.
    pub prefix: String,
    /// Connection attempts per reconnection round before waiting for the next
    /// health check.
    pub max_retries: u32,
    /// First back-off step between connection attempts; it doubles each attempt.
    #[serde(with = "seconds")]
    pub retry_delay: Duration,
    /// Upper bound of one back-off step.
    #[serde(with = "seconds")]
    pub max_retry_delay: Duration,
    /// Random spread applied to each back-off step, as a fraction (0.0 to 1.0):
    /// 0.2 means each step lasts between 80% and 120% of its nominal length.
    pub jitter: f64,
    /// How often a connected cache is pinged, and how often a disconnected one
    /// starts a new reconnection round. It never gives up.
    #[serde(with = "seconds")]
    pub health_check_interval: Duration,
    /// Longest time any single cache operation may take before the call falls
    /// back to computing its value. A timeout marks the connection down.
    #[serde(with = "seconds")]
    pub operation_timeout: Duration,
    /// Longest time one connection attempt (TCP, TLS, handshake) may take.
    #[serde(with = "seconds")]
    pub connect_timeout: Duration,
    /// Whether caching is on at all. Off: every call computes its value.
    pub enabled: bool,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(3600),
            prefix: "earnorm:".to_owned(),
            max_retries: 3,
            retry_delay: Duration::from_secs(1),
            max_retry_delay: Duration::from_secs(30),
            jitter: 0.2,
            health_check_interval: Duration::from_secs(30),
            operation_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(2),
            enabled: true,
        }
    }
}

/// Serde adapter: a [`Duration`] as a number of seconds (fractions allowed).
mod seconds {
    use std::time::Duration;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(value.as_secs_f64())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(deserializer)?;
        Duration::try_from_secs_f64(secs).map_err(D::Error::custom)
    }
}
