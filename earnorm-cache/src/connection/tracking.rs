//! The in-process tier's invalidation channel beside Redis: a connection of
//! its own, in RESP3, on which Redis pushes the name of every generation
//! key another client changes (`CLIENT TRACKING on BCAST PREFIX P g:`), so
//! that the tier drops what another process's write made stale within the
//! push's delivery lag.
//!
//! What this module alone owns: keeping that subscription, and the rule
//! that the tier serves nothing through a gap in it. The tier is dropped
//! when the channel is lost (the connection closes, is killed, or does not
//! answer a `PING` within `operation_timeout`), and serves again only from
//! a subscription made after the loss: values noted before it are refused
//! (see `Local::regain`). The pushes are applied where they are read, in
//! the connection's own reader, so there is no queue that could fall
//! behind; a client Redis cannot keep up with is disconnected by Redis,
//! which is a loss like any other.

use std::sync::Arc;

use redis::{AsyncConnectionConfig, ProtocolVersion, PushKind, Value};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::Connection;
use crate::backoff::random_unit;
use crate::bounded::bounded;
use crate::local::Local;
use crate::CacheError;

/// The name the channel's connection gives itself (`CLIENT LIST` shows it).
pub(crate) const CLIENT_NAME: &str = "earnorm-tracking";

/// Keeps the tier of `conn`'s manager subscribed, for as long as the
/// manager lives; reconnects with the configured back-off.
pub(crate) async fn track(conn: Arc<Connection>, local: Arc<Local>) {
    let backoff = conn.config.backoff();
    let mut attempt = 0u32;
    while !conn.is_closed() {
        let lost = Arc::new(Notify::new());
        match subscribe_all(&conn, &local, &lost).await {
            Ok((mut channels, masters)) => {
                attempt = 0;
                local.regain();
                info!(url = %conn.url, "in-process tier subscribed to invalidations");
                loop {
                    tokio::select! {
                        () = tokio::time::sleep(conn.config.heartbeat_interval) => {}
                        () = lost.notified() => break,
                    }
                    if conn.is_closed() {
                        local.lose();
                        return;
                    }
                    if !answers(&conn, &mut channels).await {
                        break;
                    }
                    if conn.masters().await.is_some_and(|now| now != masters) {
                        debug!("the cluster's masters changed: subscribing again");
                        break;
                    }
                }
                local.lose();
                warn!(url = %conn.url, "invalidation channel lost: in-process tier dropped until it is back");
            }
            Err(err) if attempt == 0 => {
                // Said once per outage: a Redis that refuses RESP3 or
                // CLIENT TRACKING (an ACL, say) leaves the tier off for good.
                warn!(url = %conn.url, error = %err, "invalidation channel not subscribed: the in-process tier serves nothing until it is");
            }
            Err(err) => {
                debug!(url = %conn.url, attempt = attempt + 1, error = %err, "invalidation channel not subscribed");
            }
        }
        let pause = backoff.delay(attempt, random_unit());
        attempt = attempt.saturating_add(1);
        // Not on `conn.wake`: that one wakes the supervisor alone.
        tokio::time::sleep(pause).await;
    }
    local.lose();
}

/// Whether every channel answers a `PING` within `operation_timeout`.
async fn answers(conn: &Connection, channels: &mut [redis::aio::MultiplexedConnection]) -> bool {
    for channel in channels {
        let ping = redis::cmd("PING");
        if let Err(err) = bounded(conn.config.operation_timeout, ping.query_async::<()>(channel)).await {
            debug!(error = %err, "the invalidation channel does not answer");
            return false;
        }
    }
    true
}

/// Subscribes a channel on the server, or on every master of a cluster
/// (tracking is per node: each pushes the changes to the keys it holds).
/// Returns the channels and the masters' addresses they were made for.
async fn subscribe_all(
    conn: &Connection,
    local: &Arc<Local>,
    lost: &Arc<Notify>,
) -> Result<(Vec<redis::aio::MultiplexedConnection>, Vec<String>), CacheError> {
    let endpoint = conn.client.as_ref().ok_or(CacheError::Disabled)?;
    let info = endpoint.info();
    if !endpoint.is_cluster() {
        return Ok((vec![subscribe(conn, info.clone(), local, lost).await?], Vec::new()));
    }
    let masters = conn.masters().await.ok_or(CacheError::Unavailable)?;
    let mut channels = Vec::with_capacity(masters.len());
    for address in &masters {
        let (host, port) = super::address::split_address(address).ok_or(CacheError::Unavailable)?;
        let node = super::address::at_address(info, host, port);
        channels.push(subscribe(conn, node, local, lost).await?);
    }
    Ok((channels, masters))
}

/// Opens a channel's connection to the server of `info` and subscribes it.
/// Pushes are applied to `local` from the moment it opens; `lost` is
/// notified when it closes.
async fn subscribe(
    conn: &Connection,
    info: redis::ConnectionInfo,
    local: &Arc<Local>,
    lost: &Arc<Notify>,
) -> Result<redis::aio::MultiplexedConnection, CacheError> {
    let settings = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
    let client = redis::Client::open(info.set_redis_settings(settings)).map_err(CacheError::Redis)?;
    let prefix = conn.namespace.len();
    let (pushed, lost) = (Arc::clone(local), Arc::clone(lost));
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(conn.config.connect_timeout))
        .set_response_timeout(None)
        .set_push_sender(move |push: redis::PushInfo| {
            match push.kind {
                PushKind::Invalidate => apply(&pushed, &push.data, prefix),
                PushKind::Disconnection => {
                    pushed.lose();
                    lost.notify_one();
                }
                _ => {}
            }
            Ok::<(), redis::aio::SendError>(())
        });
    let mut channel = bounded(
        conn.config.connect_timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await?;
    let step = conn.config.operation_timeout;
    let mut setup = redis::pipe();
    setup
        .cmd("CLIENT")
        .arg("SETNAME")
        .arg(CLIENT_NAME)
        .ignore()
        .cmd("CLIENT")
        .arg("TRACKING")
        .arg("ON")
        .arg("BCAST")
        .arg("PREFIX")
        .arg(conn.keys().generations_prefix())
        .ignore();
    bounded(step, setup.query_async::<()>(&mut channel)).await?;
    Ok(channel)
}

/// Applies one `invalidate` push: the generation keys it names (relative
/// to the prefix) lose their kept values; a flush (no names) drops them all.
fn apply(local: &Local, data: &[Value], prefix: usize) {
    match data.first() {
        Some(Value::Array(keys)) => {
            local.invalidate(keys.iter().filter_map(|key| match key {
                Value::BulkString(name) => Some(name.get(prefix..).unwrap_or(name)),
                _ => None,
            }));
        }
        _ => local.clear(),
    }
}
