//! Deleting keys by pattern: `SCAN` and `UNLINK` in batches, never `KEYS`.
//!
//! Its cost grows with the keyspace, so it serves administration
//! ([`CacheManager::delete_pattern`](crate::CacheManager::delete_pattern),
//! [`CacheManager::invalidate_all`](crate::CacheManager::invalidate_all)) and
//! recovery (a restarted Redis, an overflowing outbox) only. On a cluster it
//! scans every master at once, each with its own cursor.

use std::time::Duration;

use crate::bounded::bounded;
use crate::connection::wire::{join_all, Wire};
use crate::CacheError;

/// Keys asked for per `SCAN` step.
const SCAN_COUNT: u64 = 1000;

/// Unlinks every key matching `pattern` (a complete glob), one `SCAN` step
/// and one `UNLINK` round trip per batch, each bounded by `limit`, on every
/// master. Returns how many keys it removed.
pub(crate) async fn unlink_matching(conn: &mut Wire, limit: Duration, pattern: &str) -> Result<u64, CacheError> {
    let masters = bounded(limit, conn.masters()).await?;
    let mut count = 0;
    let scans = masters
        .into_iter()
        .map(|(_, master)| unlink_on(master, conn.clone(), limit, pattern));
    for removed in join_all(scans).await {
        count += removed?;
    }
    Ok(count)
}

/// [`unlink_matching`] on one server (a cluster's master, scanned there;
/// the keys it finds are unlinked through `router`, which follows them if
/// their slot has just moved). A key that moves from a master not yet
/// scanned to one already scanned while the scan runs (resharding) is
/// missed: run it again after a resharding.
async fn unlink_on(mut conn: Wire, mut router: Wire, limit: Duration, pattern: &str) -> Result<u64, CacheError> {
    let (mut cursor, mut count) = (0u64, 0u64);
    loop {
        let mut step = redis::cmd("SCAN");
        step.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(SCAN_COUNT);
        let (next, keys): (u64, Vec<String>) = bounded(limit, step.query_async(&mut conn)).await?;
        if !keys.is_empty() {
            // A cluster takes a multi-key command on one slot only: one
            // `UNLINK` per key there, in one pipeline.
            let removed: u64 = if conn.is_cluster() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("UNLINK").arg(key);
                }
                let each: Vec<u64> = bounded(limit, pipe.query_async(&mut router)).await?;
                each.into_iter().sum()
            } else {
                bounded(limit, redis::cmd("UNLINK").arg(&keys).query_async(&mut conn)).await?
            };
            count += removed;
        }
        if next == 0 {
            return Ok(count);
        }
        cursor = next;
    }
}
