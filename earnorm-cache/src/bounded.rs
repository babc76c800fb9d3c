//! The bound on every call to Redis: what this module alone owns is turning
//! a command that does not answer in time into [`CacheError::Timeout`]. The
//! published connection's calls (`connection/link.rs`), the checks of a new
//! connection, pattern deletion and the outbox's replay all wait through it.

use std::future::Future;
use std::time::Duration;

use redis::RedisResult;

use crate::CacheError;

/// Runs one Redis command future within `limit`.
pub(crate) async fn bounded<T>(limit: Duration, op: impl Future<Output = RedisResult<T>>) -> Result<T, CacheError> {
    match tokio::time::timeout(limit, op).await {
        Ok(result) => result.map_err(CacheError::Redis),
        Err(_) => Err(CacheError::Timeout(limit)),
    }
}
