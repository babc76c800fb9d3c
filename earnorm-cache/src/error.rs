//! The cache's error type.

use thiserror::Error;

/// What went wrong in a cache operation.
///
/// Cached calls never return these: they fall back to computing the value.
/// Lower-level operations ([`CacheManager::get`](crate::CacheManager::get),
/// [`CacheManager::set`](crate::CacheManager::set), ...) do, so that callers
/// who want to know can. No variant ever carries a password.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The Redis URL could not be parsed or names an unsupported scheme.
    #[error("invalid Redis URL `{url}`")]
    InvalidUrl {
        /// The URL with anything that could be a credential replaced by
        /// `***` (only the scheme is kept of a URL that does not parse).
        url: String,
        /// Why the client refused it.
        #[source]
        source: redis::RedisError,
    },
    /// A [`CacheConfig`](crate::CacheConfig) setting cannot work.
    #[error("invalid cache setting `{field}`: {reason}")]
    InvalidConfig {
        /// The setting at fault.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// `CacheManager::connect` was called outside a Tokio runtime (with its
    /// time driver enabled), which the background reconnection needs.
    #[error("the cache needs a Tokio runtime with timers enabled (tokio::main, or Builder::enable_all)")]
    NoRuntime,
    /// Caching is off (no Redis configured, or `enabled = false`).
    #[error("caching is disabled")]
    Disabled,
    /// Redis is known to be down; the call did not wait for it.
    #[error("Redis is unavailable (reconnecting in the background)")]
    Unavailable,
    /// The operation did not finish within the operation timeout.
    #[error("Redis did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// Redis answered with an error or the connection failed.
    #[error("Redis command failed")]
    Redis(#[source] redis::RedisError),
    /// A value could not be encoded.
    #[error("could not encode the value")]
    Encode(#[source] rmp_serde::encode::Error),
    /// A value is nested deeper than the codec decodes (arrays and maps
    /// inside each other); it is not stored.
    #[error("the value is nested deeper than {0} levels")]
    TooDeep(usize),
    /// A key argument could not be encoded.
    #[error("could not encode a key argument")]
    KeyArgument(#[source] crate::KeyArgumentError),
    /// A key could not be built.
    #[error("invalid cache key: {0}")]
    InvalidKey(String),
    /// A stored value is not an envelope this version reads (it is treated
    /// as a miss).
    #[error("stored value: {0}")]
    Envelope(&'static str),
    /// A stored payload could not be decoded (it is treated as a miss).
    #[error("could not decode the cached value")]
    Decode(#[source] rmp_serde::decode::Error),
}

impl From<redis::RedisError> for CacheError {
    fn from(err: redis::RedisError) -> Self {
        CacheError::Redis(err)
    }
}
