//! Cache configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::local::LocalConfig;
use crate::CacheError;

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
    /// At least 1 ms.
    #[serde(with = "seconds")]
    pub ttl: Duration,
    /// Prefix of every key this manager reads or writes. Keys outside it are
    /// never touched, so several applications can share one Redis. It must
    /// not be empty; a `:` is added when it does not end with one, so that
    /// `"app"` never reaches another application's `apple:1`.
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
    /// How often a disconnected cache starts a new reconnection round (it
    /// never gives up), and the longest pause between two health checks of a
    /// connected one. At least 10 ms.
    #[serde(with = "seconds")]
    pub health_check_interval: Duration,
    /// How often a connected cache announces itself in Redis (a heartbeat,
    /// which is also its health check). Managers sharing a prefix serve no
    /// hits while one of them has missed its heartbeats, because it may hold
    /// invalidations it could not send. At least 10 ms.
    #[serde(with = "seconds")]
    pub heartbeat_interval: Duration,
    /// Longest time a call waits for another caller's computation of the same
    /// key before computing its own value: another caller in this process
    /// (single flight), or another process holding the key's lease (a
    /// cold key is computed by one process at a time; the others poll for
    /// its value). A lease lives a quarter of this without renewal (its
    /// holder renews it while computing), so that one whose holder died is
    /// taken over before its waiters give up. Zero: no leases across
    /// processes, and callers in this process do not wait for each other
    /// either.
    #[serde(with = "seconds")]
    pub lease_wait: Duration,
    /// Longest time a call may wait on Redis in all (its lookup, store and
    /// the rest share it) before it falls back to computing its value. A
    /// timeout marks the connection down. At least 1 ms.
    #[serde(with = "seconds")]
    pub operation_timeout: Duration,
    /// Longest time one connection attempt (TCP, TLS, handshake, checks) may
    /// take. At least 1 ms.
    #[serde(with = "seconds")]
    pub connect_timeout: Duration,
    /// Whether caching is on at all. Off: every call computes its value.
    pub enabled: bool,
    /// Whether the per-model metrics carry a `database` label beside
    /// `model` (off by default). Namespaces registered with
    /// [`CacheManager::label_database`](crate::CacheManager::label_database)
    /// are labelled by collection alone, so the number of series is bounded
    /// by the code, whatever the number of databases (tenants); turn this
    /// on to tell databases apart, at one set of series per database.
    pub metrics_database_label: bool,
    /// The in-process tier: values kept in this process's memory and served
    /// with no round trip. On by default without a Redis URL (the embedded
    /// mode: caching with no server at all); beside Redis, turn it on with
    /// `with_redis` (see [`LocalConfig`]).
    pub local: LocalConfig,
    /// The consistency monitor: checks that sampled writes left nothing
    /// stale to serve, repairs what it finds and reports the consistency
    /// in nines (see [`MonitorConfig`]). Off by default.
    pub monitor: MonitorConfig,
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
            heartbeat_interval: Duration::from_millis(500),
            lease_wait: Duration::from_secs(1),
            operation_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(2),
            enabled: true,
            metrics_database_label: false,
            local: LocalConfig::default(),
            monitor: MonitorConfig::default(),
        }
    }
}

/// Settings of the consistency monitor. Off by default.
///
/// ```
/// use std::time::Duration;
/// use earnorm_cache::{CacheConfig, MonitorConfig};
///
/// let config = CacheConfig {
///     monitor: MonitorConfig { enabled: true, sample_one_in: 100, ..Default::default() },
///     ..Default::default()
/// };
/// assert_eq!(config.monitor.delay, Duration::from_millis(50));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MonitorConfig {
    /// Whether writes are checked at all. With it on, this process also
    /// remembers the values it stored lately, by generation (bounded: see
    /// the monitor's docs in the crate docs), and the ORM stamps values
    /// with when their data was read (see [`note_read`](crate::note_read)).
    pub enabled: bool,
    /// One write in this many is checked (1, or 0: every write).
    pub sample_one_in: u32,
    /// How long after a sampled write's invalidation the check runs: the
    /// database feed's lag bar (50 ms) by default. With the in-process tier
    /// beside Redis, `heartbeat_interval + operation_timeout` is added: the
    /// longest the tier takes to find its invalidation channel lost.
    #[serde(with = "seconds")]
    pub delay: Duration,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            sample_one_in: 100,
            delay: Duration::from_millis(50),
        }
    }
}

/// Longest expiry sent to Redis: ten years, far inside what `PX` accepts.
const MAX_EXPIRY_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// A duration as the milliseconds of a `PX` argument: at least 1, at most
/// [`MAX_EXPIRY_MS`], whatever the configuration says.
pub(crate) fn expiry_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_EXPIRY_MS)
}

/// Shortest operation, connection and TTL settings accepted.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);
/// Shortest health-check and heartbeat intervals accepted: shorter ones
/// would flood Redis with checks and a dead Redis with reconnections.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

impl CacheConfig {
    /// Checks that the settings can work; [`CacheManager::connect`] refuses
    /// those that cannot.
    ///
    /// # Errors
    /// [`CacheError::InvalidConfig`] naming the first setting at fault.
    ///
    /// [`CacheManager::connect`]: crate::CacheManager::connect
    pub fn validate(&self) -> Result<(), CacheError> {
        let invalid = |field: &'static str, reason: String| Err(CacheError::InvalidConfig { field, reason });
        if self.prefix.is_empty() {
            return invalid(
                "prefix",
                "must not be empty: it keeps other applications' keys out of reach".into(),
            );
        }
        for (field, value, min) in [
            ("ttl", self.ttl, MIN_TIMEOUT),
            ("operation_timeout", self.operation_timeout, MIN_TIMEOUT),
            ("connect_timeout", self.connect_timeout, MIN_TIMEOUT),
            ("health_check_interval", self.health_check_interval, MIN_INTERVAL),
            ("heartbeat_interval", self.heartbeat_interval, MIN_INTERVAL),
        ] {
            if value < min {
                return invalid(field, format!("{value:?} is below the minimum of {min:?}"));
            }
        }
        if self.max_retry_delay < self.retry_delay {
            return invalid(
                "max_retry_delay",
                format!(
                    "{:?} is below retry_delay ({:?})",
                    self.max_retry_delay, self.retry_delay
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return invalid(
                "jitter",
                format!("{} is not a fraction between 0.0 and 1.0", self.jitter),
            );
        }
        Ok(())
    }

    /// The prefix as used in keys: the configured one, ending in `:`.
    pub(crate) fn namespace(&self) -> String {
        if self.prefix.ends_with(':') {
            self.prefix.clone()
        } else {
            format!("{}:", self.prefix)
        }
    }

    /// The back-off schedule of reconnection attempts.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            base: self.retry_delay,
            max_delay: self.max_retry_delay,
            jitter: self.jitter,
        }
    }
}

/// Serde adapter: a [`Duration`] as a number of seconds (fractions allowed).
pub(crate) mod seconds {
    use std::time::Duration;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(value.as_secs_f64())
    }

    /// Negative or not-a-number values are refused; values too large for a
    /// `Duration` (as `Duration::MAX` becomes once written as a float) are
    /// `Duration::MAX`.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(deserializer)?;
        if secs.is_finite() && secs >= Duration::MAX.as_secs_f64() {
            return Ok(Duration::MAX);
        }
        Duration::try_from_secs_f64(secs).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_durations_survive_a_serde_round_trip() {
        let config = CacheConfig {
            ttl: Duration::MAX,
            max_retry_delay: Duration::MAX,
            ..CacheConfig::default()
        };
        let value = serde_json_like(&config);
        let back: CacheConfig = rmp_serde::from_slice(&value).expect("decodes");
        assert_eq!(back.ttl, Duration::MAX);
        assert_eq!(back, config);
    }

    fn serde_json_like(config: &CacheConfig) -> Vec<u8> {
        rmp_serde::to_vec_named(config).expect("encodes")
    }

    #[test]
    fn unworkable_settings_are_refused() {
        assert!(CacheConfig::default().validate().is_ok());
        let bad = CacheConfig {
            prefix: String::new(),
            ..CacheConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(CacheError::InvalidConfig { field: "prefix", .. })
        ));
        let app = CacheConfig {
            prefix: "app".into(),
            ..CacheConfig::default()
        };
        assert_eq!(app.namespace(), "app:");
        assert_eq!(CacheConfig::default().namespace(), "earnorm:");
    }
}
