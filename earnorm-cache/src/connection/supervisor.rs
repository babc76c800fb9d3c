//! The supervisor: the one task that reconnects, and checks a server
//! before its connection is used.
//!
//! What this module alone owns: reconnection, and what is done on a new
//! connection before it is published.
//!
//! * A single background task (the supervisor) owns reconnection, so a hundred
//!   failing calls cause one reconnect, not a hundred. While down it makes up
//!   to `max_retries` attempts, `retry_delay` apart and doubling (capped at
//!   `max_retry_delay`, spread by `jitter`), then waits
//!   `health_check_interval` and starts another round, for ever. A connection
//!   lost at any moment starts a new round at once. Caching is never switched
//!   off for good. While connected, it beats (`presence.rs`).
//! * Before a new connection is used, the invalidations that could not be
//!   sent while Redis was away are replayed ([`crate::outbox`]), so a value
//!   made stale during an outage is not served after it.
//! * A Redis that restarted (a `run_id` other than the one recorded under the
//!   prefix) may have reloaded old values and old generations from a snapshot
//!   or an append-only file: before using it, the manager deletes every
//!   generation under its prefix. The `run_id` is recorded in Redis, so a
//!   process that starts after the restart checks too.
//! * On connecting, the manager checks that this Redis lets it store values
//!   (version 7.0 or later, permission for the commands it uses) and warns
//!   when it does not; [`CacheManager::can_store`](crate::CacheManager::can_store)
//!   and the `store_errors` statistic report it.
//! * The supervisor stops when the last [`CacheManager`](crate::CacheManager)
//!   handle is dropped, removing its heartbeat.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tracing::{debug, info, warn};

use super::failure::is_connection_error;
use super::presence::RECOVERY_BEAT;
use super::{Connection, Wire};
use crate::backoff::random_unit;
use crate::bounded::bounded;
use crate::scan::unlink_matching;
use crate::stats::{ConnectionStatus, Counters};
use crate::CacheError;

/// How often, at most, a manager that waits for its next reconnection round
/// checks with a TCP probe whether Redis accepts connections again.
const PROBE: Duration = Duration::from_millis(250);

impl Connection {
    /// Opens a connection, checks the server, replays the outbox on it,
    /// publishes it, and beats once (which decides whether hits are served).
    pub(crate) async fn establish(&self) -> Result<(), CacheError> {
        let Some(client) = &self.client else {
            return Err(CacheError::Disabled);
        };
        let limit = self.config.connect_timeout;
        let mut conn = bounded(limit, client.connect(&self.config)).await?;
        let step = self.config.operation_timeout;
        let servers = servers(&conn, step).await?;
        let server = ServerInfo::oldest(&servers);
        self.check_restart(&mut conn, &servers).await?;
        *self.run_ids.lock().unwrap_or_else(PoisonError::into_inner) = ServerInfo::run_ids(&servers);
        self.check_capabilities(&mut conn, &server).await;
        let id = self.link.next_id();
        let after_outage = self.status() != ConnectionStatus::Connecting;
        if after_outage {
            self.note_return();
        }
        self.outbox
            .replay_then_publish(&mut conn.clone(), &self.namespace, step, || self.publish(id, conn))
            .await?;
        self.store_error_reported.store(false, Ordering::Release);
        Counters::bump(&self.counters.reconnects, "earnorm_cache_reconnects_total");
        if after_outage {
            info!(url = %self.url, quarantine = ?self.quarantine(), "reconnected to Redis");
        } else {
            info!(url = %self.url, "connected to Redis");
        }
        self.beat().await;
        Ok(())
    }

    /// When the Redis server is not the one the data under this prefix was
    /// last used with (its `run_id` differs from the one recorded at
    /// `PREFIX meta:run_id`), it may have reloaded old values and old
    /// generations from a snapshot or an append-only file: delete every
    /// generation under the prefix before anyone reads, then record the new
    /// `run_id`. On a cluster the record names every master's `run_id`, so
    /// a master restarted, replaced or added counts as a restart, and the
    /// generations of every master are deleted.
    async fn check_restart(&self, conn: &mut Wire, servers: &[(String, ServerInfo)]) -> Result<(), CacheError> {
        let Some(run_id) = ServerInfo::run_ids(servers) else {
            return Ok(());
        };
        let limit = self.config.operation_timeout;
        let marker = self.keys().run_id();
        let recorded: Option<String> = bounded(limit, redis::cmd("GET").arg(&marker).query_async(conn)).await?;
        if recorded.as_deref() == Some(run_id.as_str()) {
            return Ok(());
        }
        let removed = unlink_matching(conn, limit, &self.keys().generations_glob()).await?;
        if removed > 0 {
            info!(url = %self.url, removed, "Redis restarted: invalidated every generation in case old values were reloaded");
        }
        bounded(
            limit,
            redis::cmd("SET").arg(&marker).arg(run_id).query_async::<()>(conn),
        )
        .await
    }

    /// On a cluster, checks that its masters are the ones the connection
    /// was checked with (see [`check_restart`](Self::check_restart)): a
    /// failover promotes a replica that may lack the last writes it was
    /// sent (replication is asynchronous), invalidations among them, and a
    /// master may restart from a snapshot without the connection noticing.
    /// Either drops the connection, so that the next one checks again and
    /// deletes every generation. Run after every heartbeat.
    pub(super) async fn check_masters(&self) {
        let Ok((id, wire)) = self.published() else { return };
        if !wire.is_cluster() {
            return;
        }
        let servers = match servers(&wire, self.config.operation_timeout).await {
            Ok(servers) => servers,
            Err(err) => {
                debug!(url = %self.url, error = %err, "could not check the cluster's masters");
                return;
            }
        };
        let now = ServerInfo::run_ids(&servers);
        let seen = self.run_ids.lock().unwrap_or_else(PoisonError::into_inner).clone();
        if now.is_some() && now != seen {
            self.drop_connection(
                id,
                &"the cluster's masters changed (a failover, a restart or a new master)",
            );
        }
    }

    /// Checks that this Redis lets the cache store values: the commands and
    /// options it uses (`SET .. NX GET`, scripts with flags: Redis 7.0) and
    /// the permissions an ACL user needs. Warns when it does not.
    async fn check_capabilities(&self, conn: &mut Wire, server: &ServerInfo) {
        let limit = self.config.operation_timeout;
        let probe = self.keys().probe(self.presence.member());
        let mut checks = redis::pipe();
        checks
            .cmd("SET")
            .arg(&probe)
            .arg("1")
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(5000)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&probe)
            .arg(5000)
            .arg("GT")
            .ignore()
            .cmd("PEXPIREAT")
            .arg(&probe)
            .arg(1)
            .arg("GT")
            .ignore()
            .cmd("EVAL")
            .arg("#!lua\nreturn redis.call('PEXPIRE', KEYS[1], 5000)")
            .arg(1)
            .arg(&probe)
            .ignore()
            .cmd("UNLINK")
            .arg(&probe)
            .ignore();
        let outcome = bounded(limit, checks.query_async::<()>(conn)).await;
        let too_old = server.version.is_some_and(|v| v < (7, 0));
        let refused = match outcome {
            Err(CacheError::Redis(err)) if err.code() == Some("OOM") => {
                warn!(url = %self.url, "Redis is out of memory (maxmemory with noeviction): values are not stored until it has room; reads and invalidations go on");
                None
            }
            Err(CacheError::Redis(err)) if !is_connection_error(&err) => Some(err.to_string()),
            _ if too_old => Some(format!(
                "Redis {}.{} is older than 7.0",
                server.version.map_or(0, |v| v.0),
                server.version.map_or(0, |v| v.1)
            )),
            _ => None,
        };
        self.can_store.store(refused.is_none(), Ordering::Release);
        if let Some(reason) = refused {
            warn!(
                url = %self.url,
                reason = %reason,
                "this Redis does not let the cache store values (it needs Redis 7.0 or later and, for an ACL user, \
                 GET, SET, MGET, DEL, UNLINK, PEXPIRE, PEXPIREAT, PTTL, SCAN, ZADD, ZRANGEBYSCORE, ZREM, TIME, PING, EVAL, EVALSHA and INFO on the prefix); \
                 every call computes its value"
            );
        }
    }

    /// Waits `interval` before the next reconnection attempt, or less: a TCP
    /// probe every `probe` notices a Redis that accepts connections again and
    /// ends the wait at once, so its return costs a fraction of a second,
    /// not a back-off step or a health-check interval. (A probe is one TCP
    /// connection, closed at once.)
    async fn wait_for_next_round(&self, interval: Duration, probe: Duration) {
        let address = self.client.as_ref().and_then(super::Endpoint::probe_address);
        let until = tokio::time::Instant::now() + interval;
        let step = probe.min(interval);
        loop {
            let pause = step.min(until.saturating_duration_since(tokio::time::Instant::now()));
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.wake.notified() => return,
            }
            if tokio::time::Instant::now() >= until || self.is_closed() {
                return;
            }
            if let Some((host, port)) = &address {
                let probe = tokio::net::TcpStream::connect((host.as_str(), *port));
                if matches!(
                    tokio::time::timeout(self.config.connect_timeout, probe).await,
                    Ok(Ok(_))
                ) {
                    debug!(url = %self.url, "Redis accepts connections again: reconnecting now");
                    return;
                }
            }
        }
    }
}

/// What `INFO server` says on the server, or on every master of a cluster,
/// with each master's address (empty for one server). A server that hides
/// `INFO` (ACL) is not refused: its version and restarts cannot be checked,
/// which the checks at connect report. A master that cannot be reached is
/// an error: a cluster is checked whole or not used.
async fn servers(conn: &Wire, limit: Duration) -> Result<Vec<(String, ServerInfo)>, CacheError> {
    let infos = bounded(
        limit,
        conn.on_each_master(|mut master| {
            Box::pin(async move {
                redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut master)
                    .await
            })
        }),
    )
    .await;
    match infos {
        Ok(infos) => Ok(infos
            .iter()
            .map(|(address, info)| (address.clone(), ServerInfo::parse(info)))
            .collect()),
        // On one server, restarts then go unchecked (the checks at
        // connect report a server that hides INFO). A cluster is not used
        // without: its failovers are found by `run_id`s.
        Err(CacheError::Redis(err))
            if !conn.is_cluster() && !is_connection_error(&err) && err.kind() != redis::ErrorKind::Client =>
        {
            debug!(error = %err, "INFO server failed");
            Ok(Vec::new())
        }
        Err(err) => Err(err),
    }
}

/// What `INFO server` says that the cache uses.
#[derive(Debug, Default, PartialEq)]
struct ServerInfo {
    run_id: Option<String>,
    version: Option<(u32, u32)>,
}

impl ServerInfo {
    /// What the checks go by on a cluster: the oldest master's version
    /// (and no `run_id`: see [`run_ids`](Self::run_ids)).
    fn oldest(servers: &[(String, ServerInfo)]) -> ServerInfo {
        ServerInfo {
            run_id: None,
            version: servers.iter().filter_map(|(_, server)| server.version).min(),
        }
    }

    /// The record of which servers hold the data: one server's `run_id`,
    /// or every master's as `address=run_id`, sorted and joined by `,`.
    /// `None` when one of them hides it.
    fn run_ids(servers: &[(String, ServerInfo)]) -> Option<String> {
        match servers {
            [] => None,
            [(address, server)] if address.is_empty() => server.run_id.clone(),
            _ => {
                let mut ids = servers
                    .iter()
                    .map(|(address, server)| Some(format!("{address}={}", server.run_id.as_deref()?)))
                    .collect::<Option<Vec<_>>>()?;
                ids.sort();
                Some(ids.join(","))
            }
        }
    }

    fn parse(info: &str) -> Self {
        let field = |name: &str| {
            info.lines()
                .find_map(|line| line.strip_prefix(name))
                .map(|v| v.trim().to_owned())
        };
        let version = field("redis_version:").and_then(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        });
        Self {
            run_id: field("run_id:"),
            version,
        }
    }
}

/// The reconnect-and-heartbeat loop. Runs until [`Connection::close`].
pub(crate) async fn supervise(conn: Arc<Connection>) {
    let backoff = conn.config.backoff();
    let interval = conn.config.health_check_interval;
    while !conn.is_closed() {
        if conn.is_connected() {
            if let Some(id) = conn.link.suspect() {
                conn.check_suspect(id).await;
                if conn.is_connected() {
                    // Decides the status again, at once.
                    conn.beat().await;
                }
                continue;
            }
            // While not serving everything, beat often enough to resume soon.
            let pause = if conn.is_serving() {
                conn.config.heartbeat_interval
            } else {
                conn.config.heartbeat_interval.min(RECOVERY_BEAT)
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {
                    conn.beat().await;
                    conn.check_masters().await;
                    conn.check_returns();
                }
                () = conn.wake.notified() => {}
            }
            continue;
        }
        // One reconnection round.
        let attempts = conn.config.max_retries.max(1);
        let mut unreachable = true;
        for attempt in 0..attempts {
            if conn.is_closed() {
                return;
            }
            match conn.establish().await {
                Ok(()) => break,
                Err(err) => {
                    debug!(url = %conn.url, attempt = attempt + 1, error = %err, cause = ?std::error::Error::source(&err).map(ToString::to_string), "Redis reconnection attempt failed");
                    unreachable = match &err {
                        CacheError::Timeout(_) | CacheError::Unavailable => true,
                        CacheError::Redis(err) => is_connection_error(err),
                        _ => false,
                    };
                    if attempt + 1 < attempts {
                        // The back-off step, cut short by the probe when
                        // Redis could not be reached and answers again.
                        let step = backoff.delay(attempt, random_unit());
                        conn.wait_for_next_round(step, if unreachable { PROBE } else { step })
                            .await;
                    }
                }
            }
        }
        if !conn.is_connected() {
            if conn.status() != ConnectionStatus::Down {
                conn.status.send_replace(ConnectionStatus::Down);
            }
            warn!(url = %conn.url, "Redis unavailable; caching paused, retrying in {interval:?}");
            // Probing helps only when Redis could not be reached at all; one
            // that answers and refuses (a password, a permission) waits.
            let probe = if unreachable { PROBE } else { interval };
            conn.wait_for_next_round(interval, probe).await;
        }
    }
    conn.leave().await;
    debug!("cache supervisor stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_info_gives_the_version_and_run_id() {
        let info = "# Server\r\nredis_version:7.0.15\r\nrun_id:abc\r\n";
        assert_eq!(
            ServerInfo::parse(info),
            ServerInfo {
                run_id: Some("abc".into()),
                version: Some((7, 0)),
            }
        );
        assert_eq!(ServerInfo::parse("redis_version:6.2.1").version, Some((6, 2)));
        assert_eq!(ServerInfo::parse("").version, None);
    }
}
