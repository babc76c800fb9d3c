//! Deleting keys by pattern: `SCAN` and `UNLINK` in batches, never `KEYS`.
//!
//! Its cost grows with the keyspace, so it serves administration
//! ([`CacheManager::delete_pattern`](crate::CacheManager::delete_pattern),
//! [`CacheManager::invalidate_all`](crate::CacheManager::invalidate_all)) and
//! recovery (a restarted Redis, an overflowing outbox) only.

use std::time::Duration;

use redis::aio::MultiplexedConnection;

use crate::bounded::bounded;
use crate::CacheError;

/// Keys asked for per `SCAN` step.
const SCAN_COUNT: u64 = 1000;

/// Unlinks every key matching `pattern` (a complete glob), one `SCAN` step
/// and one `UNLINK` per batch, each bounded by `limit`. Returns how many keys
/// it removed.
pub(crate) async fn unlink_matching(
    conn: &mut MultiplexedConnection,
    limit: Duration,
    pattern: &str,
) -> Result<u64, CacheError> {
    let (mut cursor, mut count) = (0u64, 0u64);
    loop {
        let mut step = redis::cmd("SCAN");
        step.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(SCAN_COUNT);
        let (next, keys): (u64, Vec<String>) = bounded(limit, step.query_async(conn)).await?;
        if !keys.is_empty() {
            let removed: u64 = bounded(limit, redis::cmd("UNLINK").arg(&keys).query_async(conn)).await?;
            count += removed;
        }
        if next == 0 {
            return Ok(count);
        }
        cursor = next;
    }
}
