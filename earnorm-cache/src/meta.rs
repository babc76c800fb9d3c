//! What the cache keeps for the database feed and other workers beside
//! cached values: bookkeeping values (`meta`, such as the feed's resume
//! token), the feed's caught-up marker and the server clock it is read
//! against. What this module alone owns: the marker's script, which never
//! records a time later than the server's now and only moves forward.
//! (How a manager uses the marker to decide whether it serves is presence,
//! in `connection.rs`.) Without Redis, all of these live in memory
//! (`crate::book`), against this process's clock.

use std::sync::OnceLock;

use redis::Script;

use crate::{CacheError, CacheManager};

/// Records a caught-up time: KEYS[1] the marker; ARGV[1] the server time
/// (ms) to record; ARGV[2] the latest server time at which this call still
/// counts (a call held up, in a frozen server for one, proves nothing about
/// the time it finally runs at). Never records a time later than now; moves
/// the marker forward only, unless the one stored is later than now (a
/// clock stepped back).
const MARK_SCRIPT: &str = r"#!lua flags=allow-oom
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > tonumber(ARGV[2]) then
  return -1
end
local at = math.min(tonumber(ARGV[1]), now)
local previous = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if at > previous or previous > now then
  redis.call('SET', KEYS[1], at)
end
return at
";

fn mark_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(MARK_SCRIPT))
}

impl CacheManager {
    /// Declares that a database feed invalidates every write to the record
    /// and model scopes whose names start with `scopes` (EarnORM names them
    /// `DATABASE.COLLECTION`, so `"DATABASE."`), and records at
    /// `PREFIX meta:MARKER` the Redis server time (milliseconds) up to which
    /// it has (see [`mark_caught_up`]). While that record is fresh (under a
    /// second old) and covers this manager's latest return to Redis, values
    /// that depend on such scopes only (no tag, no other name) are served
    /// even when the heartbeats alone would not allow it (another manager
    /// missing, or this one just reconnected): the feed has invalidated
    /// whatever those managers could not.
    ///
    /// [`mark_caught_up`]: Self::mark_caught_up
    pub fn follow_feed(&self, marker: &str, scopes: &str) {
        self.connection().follow_feed(marker, scopes);
    }

    /// The earliest the Redis server's clock (milliseconds) can read now,
    /// from the last heartbeat's reading; `None` before the first. What a
    /// feed passes to [`mark_caught_up`](Self::mark_caught_up) for the moment
    /// it starts reading its stream.
    pub fn server_time_at_least(&self) -> Option<i64> {
        if self.inner.book.is_some() {
            return Some(crate::book::now_ms());
        }
        self.connection().server_time_at_least()
    }

    /// The latest the Redis server's clock (milliseconds) can read now,
    /// from the last heartbeat's reading; `None` before the first. What to
    /// compare with a caught-up marker to learn whether everything written
    /// until now is invalidated.
    pub fn server_time_at_most(&self) -> Option<i64> {
        if self.inner.book.is_some() {
            return Some(crate::book::now_ms());
        }
        self.connection().server_time_at_most()
    }

    /// Records at `PREFIX meta:MARKER` that every write committed up to the
    /// server time `at` (milliseconds) is invalidated: what a feed does each
    /// time it has read its stream to the end, with `at` the
    /// [`server_time_at_least`](Self::server_time_at_least) of when it began
    /// that read. A call that reaches Redis more than `operation_timeout`
    /// late records nothing.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails.
    pub async fn mark_caught_up(&self, marker: &str, at: i64) -> Result<(), CacheError> {
        if let Some(book) = &self.inner.book {
            book.mark(marker, at);
            return Ok(());
        }
        let conn = self.connection();
        let deadline = conn
            .server_time_at_least()
            .unwrap_or(at)
            .saturating_add(i64::try_from(conn.config.operation_timeout.as_millis()).unwrap_or(i64::MAX));
        let mut invocation = mark_script().key(conn.keys().meta(marker));
        invocation.arg(at).arg(deadline);
        conn.call(|mut c| async move { invocation.invoke_async::<i64>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// Reads the bookkeeping value `name` (at `PREFIX meta:NAME`), such as a
    /// resume token.
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails.
    pub async fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, CacheError> {
        if let Some(book) = &self.inner.book {
            return Ok(book.get(name));
        }
        let key = self.connection().keys().meta(name);
        self.connection()
            .call(|mut conn| async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
            .await
    }

    /// Writes the bookkeeping value `name` (no expiry).
    ///
    /// # Errors
    /// When the cache is disabled, unavailable or fails (Redis out of memory
    /// under `noeviction` refuses it).
    pub async fn set_meta(&self, name: &str, value: &[u8]) -> Result<(), CacheError> {
        if let Some(book) = &self.inner.book {
            book.set(name, value);
            return Ok(());
        }
        let key = self.connection().keys().meta(name);
        let value = value.to_vec();
        self.connection()
            .call(|mut conn| async move { redis::cmd("SET").arg(key).arg(value).query_async(&mut conn).await })
            .await
    }
}
