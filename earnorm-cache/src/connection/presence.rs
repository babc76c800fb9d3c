//! Presence: which managers sharing a prefix are connected, and whether
//! this one may serve hits.
//!
//! What this module alone owns: the heartbeat, the quarantine after an
//! outage, the serving flags, and following the database feed's caught-up
//! marker.
//!
//! * Every connected manager writes a heartbeat every `heartbeat_interval`
//!   into `PREFIX meta:members` (its health check), and reads how many
//!   managers sharing the prefix have missed theirs for longer than
//!   `2 * heartbeat_interval + operation_timeout`. Such a manager may be cut
//!   off from Redis holding invalidations it could not send, so while one is
//!   missing this manager serves no hits ([`ConnectionStatus::Recovering`]):
//!   it looks values up and stores them under the usual compare-and-set, but
//!   computes every value. A missing manager ends this by coming back (it
//!   replays first, then beats), or is forgotten once it has been silent for
//!   longer than it can take to retry with its own settings (which it
//!   publishes with its heartbeat): `max(health_check_interval, longest
//!   back-off step) + connect_timeout + operation_timeout`. This covers
//!   managers that did not see an outage themselves (they made no call
//!   during it, or started after it).
//! * After its own outage a manager also serves no hits for a quarantine of
//!   that same bound after it reconnected: a Redis that restarted empty (or
//!   was flushed) has lost the heartbeats too, so only time tells that every
//!   manager which lost its connection with it has reconnected and replayed
//!   its outbox. The bound uses the largest back-off step the settings can
//!   produce, not the configured cap.
//! * Values without tags may be served sooner, on the word of a database
//!   feed: when its caught-up marker (read with each heartbeat) is recent
//!   and later than this manager's return (see
//!   [`CacheManager::follow_feed`](crate::CacheManager::follow_feed)).
//! * A manager that holds invalidations it could not send to a cluster's
//!   master down, while its connection serves the other masters (see
//!   `outbox.rs`), reads the others' beats but writes none: for them it is
//!   missing, exactly as if its connection were down.
//! * Leaving (the last handle dropped) removes the heartbeat: a manager that
//!   leaves is not missing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use redis::Script;
use tracing::{debug, info};

use super::Connection;
use crate::stats::ConnectionStatus;
use crate::token::new_token;
use crate::CacheConfig;

/// Writes this manager's heartbeat, forgets managers silent for longer than
/// their own settings allow, and counts those that have missed their
/// heartbeats but are not forgotten yet.
///
/// KEYS[1]: the members set (score: time of the last beat, in ms of the
/// server's clock; member: `FORGET_MS:ID`, so that each member is forgotten
/// after its own bound, whatever the settings of the manager reading it).
/// ARGV[1]: this manager's member; ARGV[2]: missing after (ms); ARGV[3]: the
/// latest server time at which this beat still counts (0: any), so that a
/// beat held up in a frozen server and run after the thaw does not pass for
/// a live manager. ARGV[4]: '1' when this manager has beaten into the set
/// before; ARGV[5]: this manager's time to forget a member (ms). A set gone
/// although this manager beat into it was lost (deleted, or evicted under an
/// `allkeys-*` policy) with whoever it held: a member `ARGV[5]:lost`, silent
/// from the start, then stands for them and counts as missing until it is
/// forgotten.
///
/// The set has no time to live, so that `volatile-*` eviction policies,
/// which evict only keys that have one, never evict it (they did, under
/// memory pressure, and every manager then stopped serving until the lost
/// members were forgotten). It does not outlive its managers: each one
/// leaving removes itself, silent ones are forgotten by the others' beats,
/// and an empty set is no key.
/// ARGV[6]: '1' when this manager holds invalidations it could not send
/// (to a cluster's master down, see `outbox.rs`): it reads the others'
/// beats but does not beat, so that they count it missing.
/// KEYS[2], when given: a database feed's caught-up marker, returned as is.
/// Returns `{missing, now, marker}` (`missing` is -1 for a beat that came
/// too late; `marker` is -1 when absent).
/// Allowed under OOM: the entry is tiny, and a manager that cannot beat
/// would stop every other one from serving.
const HEARTBEAT_SCRIPT: &str = r"#!lua flags=allow-oom
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = tonumber(ARGV[3])
local marker = -1
if #KEYS > 1 then
  marker = tonumber(redis.call('GET', KEYS[2]) or '-1') or -1
end
if deadline > 0 and now > deadline then
  return {-1, now, marker}
end
if ARGV[4] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZADD', KEYS[1], now - tonumber(ARGV[2]) - 1, ARGV[5] .. ':lost')
end
local silent = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]), 'WITHSCORES')
local missing = 0
for i = 1, #silent, 2 do
  local forget = tonumber(string.match(silent[i], '^(%d+):')) or 0
  if silent[i] ~= ARGV[1] then
    if now - tonumber(silent[i + 1]) > forget then
      redis.call('ZREM', KEYS[1], silent[i])
    else
      missing = missing + 1
    end
  end
end
if ARGV[6] ~= '1' then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
end
return {missing, now, marker}
";

/// The pause between heartbeats while a manager does not serve every value.
pub(super) const RECOVERY_BEAT: Duration = Duration::from_millis(100);

/// How recent a feed's caught-up marker must be for values to be served on
/// its word.
const FEED_FRESH_MS: i64 = 1000;

/// What a manager knows of its standing among the managers of its prefix.
pub(super) struct Presence {
    /// This manager's name among the members of its prefix.
    member: String,
    heartbeat: Script,
    /// Whether a heartbeat of this manager has reached the members set.
    beaten: AtomicBool,
    /// Whether lookups may return values.
    serving: AtomicBool,
    /// Whether values without tags may be served on the feed's word.
    feed_serving: AtomicBool,
    /// When a connection was last published after an outage (for the
    /// quarantine that follows).
    reconnected_at: Mutex<Option<Instant>>,
    /// The server's time (ms) at this manager's latest return after an
    /// outage, once known; `Some(None)`: reconnected, not yet known.
    back_at: Mutex<Option<Option<i64>>>,
    /// The server's clock (ms) as last read by a heartbeat, with when that
    /// heartbeat was sent and when its answer came back.
    server_clock: Mutex<Option<ServerClock>>,
    /// The key of the database feed's caught-up marker, when one is followed.
    feed_marker: Mutex<Option<String>>,
    /// The start of the scope names the followed feed covers.
    feed_scopes: RwLock<Option<Arc<str>>>,
}

/// A manager whose heartbeat is older than this is missing.
fn missing_after(config: &CacheConfig) -> Duration {
    config
        .heartbeat_interval
        .saturating_mul(2)
        .saturating_add(config.operation_timeout)
}

/// How long a live manager can take to reconnect (and replay) once Redis
/// answers again: the quarantine after an outage.
fn quarantine(config: &CacheConfig) -> Duration {
    let attempts = config.max_retries.max(1);
    config
        .health_check_interval
        .max(config.backoff().longest_step(attempts))
        .saturating_add(config.connect_timeout)
        .saturating_add(config.operation_timeout)
}

/// A manager silent for longer than this is forgotten: it was missing for
/// longer than any live manager takes to come back.
fn forget_after(config: &CacheConfig) -> Duration {
    missing_after(config).saturating_add(quarantine(config))
}

impl Presence {
    /// The presence of a manager with these settings: its name carries its
    /// bound for being forgotten to the others.
    pub(super) fn new(config: &CacheConfig) -> Self {
        Self {
            member: format!("{}:{}", millis(forget_after(config)), new_token()),
            heartbeat: Script::new(HEARTBEAT_SCRIPT),
            beaten: AtomicBool::new(false),
            serving: AtomicBool::new(false),
            feed_serving: AtomicBool::new(false),
            reconnected_at: Mutex::new(None),
            back_at: Mutex::new(None),
            server_clock: Mutex::new(None),
            feed_marker: Mutex::new(None),
            feed_scopes: RwLock::new(None),
        }
    }

    /// This manager's name among the members of its prefix.
    pub(super) fn member(&self) -> &str {
        &self.member
    }
}

impl Connection {
    /// Whether lookups may serve stored values now.
    pub(crate) fn is_serving(&self) -> bool {
        self.presence.serving.load(Ordering::Acquire)
    }

    /// Whether a lookup of `key` may serve its stored value now: when every
    /// value may be, or when the database feed vouches for values without
    /// tags.
    pub(crate) fn serves(&self, key: &crate::CacheKey) -> bool {
        self.serves_covered(key.feed_covered)
    }

    /// [`serves`](Self::serves) for a value the feed covers or not.
    pub(crate) fn serves_covered(&self, feed_covered: bool) -> bool {
        self.is_serving() || (feed_covered && self.presence.feed_serving.load(Ordering::Acquire))
    }

    /// Serves nothing until the next heartbeat decides otherwise.
    pub(super) fn stop_serving(&self) {
        self.presence.serving.store(false, Ordering::Release);
        self.presence.feed_serving.store(false, Ordering::Release);
    }

    /// Notes a return after an outage: the quarantine starts now.
    pub(super) fn note_return(&self) {
        *self
            .presence
            .reconnected_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        *self.presence.back_at.lock().unwrap_or_else(PoisonError::into_inner) = Some(None);
    }

    /// Follows a database feed's caught-up marker (see `CacheManager::follow_feed`).
    pub(crate) fn follow_feed(&self, marker: &str, scopes: &str) {
        *self
            .presence
            .feed_scopes
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::from(scopes));
        *self.presence.feed_marker.lock().unwrap_or_else(PoisonError::into_inner) = Some(self.keys().meta(marker));
        self.wake.notify_one();
    }

    /// The start of the scope names the followed feed covers, if any.
    pub(crate) fn feed_scopes(&self) -> Option<Arc<str>> {
        self.presence
            .feed_scopes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A manager whose heartbeat is older than this is missing.
    fn missing_after(&self) -> Duration {
        missing_after(&self.config)
    }

    /// How long a live manager can take to reconnect (and replay) once
    /// Redis answers again: the quarantine after an outage.
    pub(crate) fn quarantine(&self) -> Duration {
        quarantine(&self.config)
    }

    /// A manager silent for longer than this is forgotten: it was missing
    /// for longer than any live manager takes to come back.
    pub(crate) fn forget_after(&self) -> Duration {
        forget_after(&self.config)
    }

    /// Writes the heartbeat and decides whether hits are served: only when
    /// no manager of the prefix is missing and this one's quarantine after
    /// its own outage is over.
    pub(crate) async fn beat(&self) {
        let missing_after = self.missing_after();
        let mut invocation = self.presence.heartbeat.key(self.keys().members());
        let marker_key = self
            .presence
            .feed_marker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(marker_key) = &marker_key {
            invocation.key(marker_key);
        }
        let sent = Instant::now();
        let deadline = self
            .presence
            .server_clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map_or(0, |clock| {
                clock
                    .at_most(sent)
                    .saturating_add(millis_i64(self.config.operation_timeout))
                    .max(1)
            });
        invocation
            .arg(&self.presence.member)
            .arg(millis(missing_after))
            .arg(deadline)
            .arg(if self.presence.beaten.load(Ordering::Acquire) {
                "1"
            } else {
                "0"
            })
            .arg(millis(self.forget_after()))
            .arg(if self.holds_invalidations() { "1" } else { "0" });
        let Some(beat_on) = self.link.published_id() else {
            return;
        };
        let answer = self
            .call(|mut conn| async move { invocation.invoke_async::<(i64, i64, i64)>(&mut conn).await })
            .await;
        if let Ok((missing, _, _)) = &answer {
            if *missing >= 0 {
                self.presence.beaten.store(true, Ordering::Release);
            }
        }
        if let Ok((_, server_ms, _)) = &answer {
            *self
                .presence
                .server_clock
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(ServerClock {
                sent,
                received: Instant::now(),
                server_ms: *server_ms,
            });
        }
        let feed_current = match &answer {
            Ok((missing, server_ms, marker)) if *missing >= 0 && marker_key.is_some() => {
                let mut back_at = self.presence.back_at.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(pending @ None) = back_at.as_mut() {
                    *pending = Some(*server_ms);
                }
                let since = back_at.flatten().unwrap_or(0);
                // A marker from the future (a clock stepped back) is no proof.
                *marker >= since && (0..=FEED_FRESH_MS).contains(&server_ms.saturating_sub(*marker))
            }
            _ => false,
        };
        let missing = answer.map(|(missing, _, _)| missing);
        let reconnected_at = *self
            .presence
            .reconnected_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let own_outage_settled = reconnected_at.is_none_or(|at| at.elapsed() >= self.quarantine());
        match &missing {
            Ok(-1) => debug!("a heartbeat reached Redis too late to count"),
            Ok(n) if *n > 0 => debug!(missing = n, "managers sharing the prefix missed their heartbeats"),
            Err(err) => debug!(error = %err, "heartbeat failed"),
            Ok(_) => {}
        }
        // A connection suspected meanwhile serves nothing until the
        // supervisor's check clears it (then it beats again at once).
        let suspect = self.link.suspect() == Some(beat_on);
        let serve = matches!(missing, Ok(0)) && own_outage_settled && !suspect;
        // Decided for the connection the beat ran on: stored only while it
        // is still the published one (under the lock that unpublishes it).
        let Some((was, was_feed)) = self.while_published(beat_on, || {
            (
                self.presence.serving.swap(serve, Ordering::AcqRel),
                self.presence.feed_serving.swap(feed_current, Ordering::AcqRel),
            )
        }) else {
            return;
        };
        if was_feed != feed_current {
            info!(url = %self.url, serving = feed_current, "values without tags served on the database feed's word");
        }
        let status = if serve {
            ConnectionStatus::Connected
        } else {
            ConnectionStatus::Recovering
        };
        let previous = self.status.send_replace(status);
        if serve && !was {
            info!(url = %self.url, "serving cached values");
        } else if !serve && previous != ConnectionStatus::Recovering {
            info!(url = %self.url, "serving no cached values until every manager sharing the prefix is back (or forgotten)");
        }
    }

    /// The earliest the Redis server's clock (ms) can read now, from the
    /// last heartbeat; `None` before the first.
    pub(crate) fn server_time_at_least(&self) -> Option<i64> {
        self.presence
            .server_clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|clock| clock.at_least(Instant::now()))
    }

    /// The latest the Redis server's clock (ms) can read now, from the last
    /// heartbeat; `None` before the first.
    pub(crate) fn server_time_at_most(&self) -> Option<i64> {
        self.presence
            .server_clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map(|clock| clock.at_most(Instant::now()))
    }

    /// Removes this manager's heartbeat (it is leaving, not missing).
    pub(crate) async fn leave(&self) {
        if self.holds_invalidations() {
            // Its queued invalidations leave with it: the others must go
            // on counting it missing until it is forgotten.
            return;
        }
        let key = self.keys().members();
        let member = self.presence.member.clone();
        // Sent even on a suspect connection: a heartbeat left behind would
        // stop the other managers' hits until it is forgotten.
        let _ = self
            .send(|mut conn| async move {
                redis::cmd("ZREM")
                    .arg(key)
                    .arg(member)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await;
    }
}

/// A reading of the server's clock.
#[derive(Debug, Clone, Copy)]
struct ServerClock {
    sent: Instant,
    received: Instant,
    server_ms: i64,
}

impl ServerClock {
    /// The latest the server's time can be at `at` (the reading was taken
    /// no earlier than `sent`).
    fn at_most(&self, at: Instant) -> i64 {
        self.server_ms
            .saturating_add(millis_i64(at.saturating_duration_since(self.sent)))
    }

    /// The earliest the server's time can be at `at` (the reading was taken
    /// no later than `received`).
    fn at_least(&self, at: Instant) -> i64 {
        self.server_ms
            .saturating_add(millis_i64(at.saturating_duration_since(self.received)))
    }
}

fn millis_i64(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// A duration in whole milliseconds, at least 1.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::Connection;
    use crate::CacheConfig;

    #[test]
    fn silent_managers_are_forgotten_after_the_longest_retry_the_settings_allow() {
        let conn = Connection::disabled(CacheConfig {
            health_check_interval: Duration::from_millis(300),
            retry_delay: Duration::from_millis(100),
            max_retries: 2,
            max_retry_delay: Duration::from_secs(30),
            connect_timeout: Duration::from_millis(300),
            operation_timeout: Duration::from_millis(250),
            heartbeat_interval: Duration::from_millis(100),
            ..CacheConfig::default()
        });
        assert_eq!(conn.quarantine(), Duration::from_millis(850));
        assert_eq!(
            conn.forget_after(),
            Duration::from_millis(850 + 450),
            "missing first, then forgotten"
        );
    }
}
