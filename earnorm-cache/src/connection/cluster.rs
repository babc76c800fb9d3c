//! Routing on a Redis Cluster: which master serves each slot, one
//! multiplexed connection per master, and commands and pipelines sent
//! straight to the masters of their keys.
//!
//! What this module alone owns: the slot table, following redirections,
//! and splitting multi-key commands by slot.
//!
//! * The table comes from `CLUSTER SLOTS`, asked of a seed at connect and
//!   of any master whenever a redirection says it is out of date (and
//!   after every heartbeat, through [`Cluster::masters`]).
//! * A command goes to the master of its key's slot on that master's own
//!   connection: no task in between, so a hit costs what it costs on one
//!   server plus the hashing. (redis-rs's `cluster-async` connection sends
//!   every request through one routing task: through it a `GET` measured
//!   1.26x a `GET` on a plain connection here, and 64 tasks on hits 0.30x
//!   the throughput of one server; see `BENCHMARKS.md`, group 10.)
//! * A pipeline is split by master; each part is one pipeline on that
//!   master's connection, and the parts are sent at once. Commands for one
//!   master run in their order; commands for different masters in no set
//!   order (no caller relies on one, see the crate docs, "Redis Cluster").
//! * `MGET`, `DEL`, `UNLINK` and `EXISTS` of keys in several slots are split
//!   by slot (a cluster refuses a multi-key command across slots, even on
//!   one master), and their answers put back together.
//! * A `MOVED` answer refreshes the table and sends the command again to
//!   the node it names; an `ASK` answer sends it once to the node named,
//!   after `ASKING`; `TRYAGAIN` (a multi-key command on a slot being
//!   moved) sends it again 10 ms later. At most two per command. A refresh
//!   that finds other masters (a failover) spends the connection (see
//!   [`Cluster::refresh`]).
//! * **Fail open per master.** A connection to a master lost (refused,
//!   reset), or a master that leaves a `PING` unanswered while the link
//!   checks a suspected connection, marks that master down: from then on a
//!   command or pipeline part for its slots fails at once with an error
//!   that the link reports as [`CacheError::Unavailable`] (the call
//!   computes its value) without dropping the connection, so the other
//!   masters' slots keep serving hits. A master marked down is never sent
//!   anything again on this connection: when it answers again (the
//!   supervisor asks each heartbeat, see [`Cluster::down_master_answers`]),
//!   the link drops the whole connection and the next one is checked as
//!   after any outage (`run_id`s, so a master restarted from a snapshot
//!   has every generation deleted; the outbox replayed first).
//!   An invalidation that can reach every master but those marked down is
//!   queued for them without dropping the connection; the manager then
//!   stops counting as present, so that the other managers of the prefix
//!   serve no hits until it has sent it (the outbox's rule, `outbox.rs`).
//!   A pipeline reports a master down only when every part that failed
//!   failed so.
//!
//! [`CacheError::Unavailable`]: crate::CacheError::Unavailable

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, ConnectionInfo, ErrorKind, Pipeline, RedisError, RedisResult, Value};
use tracing::warn;

use super::address::{at_address, split_address};
use super::failure::{is_connection_error, is_master_unreachable, master_unreachable};
use super::slots::{redirection, redirection_in, route, Redirection, Route};

/// The number of hash slots of a Redis Cluster.
const SLOTS: usize = 16_384;

/// Redirections followed for one command before its error is returned.
const REDIRECTIONS: usize = 2;

/// A connection to every master of a cluster. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    /// Every node's settings but its address (TLS, credentials).
    seed: ConnectionInfo,
    settings: AsyncConnectionConfig,
    table: RwLock<Arc<Table>>,
    /// Whether a refresh found other masters than the connection began
    /// with (see [`Cluster::refresh`]).
    changed: AtomicBool,
}

/// Which master serves each slot, and a connection to each.
struct Table {
    /// The index in `masters` of each slot's master (`u16::MAX`: none).
    owner: Vec<u16>,
    masters: Vec<Master>,
}

/// A master and the connection to it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Master {
    /// `host:port`.
    pub(crate) address: Arc<str>,
    conn: MultiplexedConnection,
    /// Whether this master is marked down (see the module docs), shared by
    /// every table that names it on this connection.
    down: Arc<AtomicBool>,
}

impl Master {
    fn new(address: String, conn: MultiplexedConnection) -> Self {
        Self {
            address: Arc::from(address),
            conn,
            down: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The connection, unless this master is marked down.
    fn usable(&self) -> RedisResult<MultiplexedConnection> {
        if self.is_down() {
            return Err(master_unreachable(&self.address));
        }
        Ok(self.conn.clone())
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Marks this master down (see the module docs).
    fn mark_down(&self, reason: &dyn std::fmt::Display) {
        if !self.down.swap(true, Ordering::AcqRel) {
            warn!(master = %self.address, reason = %reason, "a master of the cluster cannot be reached: calls on its slots compute their values, the other masters keep serving");
        }
    }

    /// `answer` as this master gave it; a lost connection marks the master
    /// down and becomes the error of a master down.
    fn judge<T>(&self, answer: RedisResult<T>) -> RedisResult<T> {
        match answer {
            Err(err) if is_connection_error(&err) => {
                self.mark_down(&err);
                Err(master_unreachable(&self.address))
            }
            answer => answer,
        }
    }

    /// Sends `cmd` to this master alone.
    pub(crate) async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        let mut conn = self.usable()?;
        self.judge(conn.req_packed_command(cmd).await)
    }

    /// Sends `pipeline` to this master alone.
    pub(crate) async fn pipeline(&self, pipeline: &Pipeline, offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        let mut conn = self.usable()?;
        self.judge(conn.req_packed_commands(pipeline, offset, count).await)
    }
}

impl Cluster {
    /// Connects to the cluster of `seeds` (the first that answers gives
    /// the table) and to each of its masters.
    pub(crate) async fn connect(seeds: &[ConnectionInfo], settings: AsyncConnectionConfig) -> RedisResult<Self> {
        let mut last = None;
        for seed in seeds {
            let opened = open(seed, &settings).await;
            let table = match opened {
                Ok(mut conn) => Table::build(&mut conn, seed, &settings, &HashMap::new()).await,
                Err(err) => Err(err),
            };
            match table {
                Ok(table) => {
                    let inner = Inner {
                        seed: seed.clone(),
                        settings,
                        table: RwLock::new(Arc::new(table)),
                        changed: AtomicBool::new(false),
                    };
                    return Ok(Self { inner: Arc::new(inner) });
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| client_error("a cluster URL names no node")))
    }

    fn table(&self) -> Arc<Table> {
        Arc::clone(&self.inner.table.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Asks a master for the table again and keeps it; connections to
    /// masters that stay are kept. When the masters are not the ones the
    /// table had (a failover, a master added or gone), the connection is
    /// spent: every call on it fails from then on as if it were lost, so
    /// that the link drops it and the next connection checks the masters'
    /// `run_id`s (and deletes every generation) before anything is served.
    /// A replica promoted may lack the last invalidations its master took;
    /// no read reaches it through this connection.
    async fn refresh(&self) -> RedisResult<Arc<Table>> {
        let current = self.table();
        let known: HashMap<Arc<str>, Master> = current
            .masters
            .iter()
            .map(|m| (Arc::clone(&m.address), m.clone()))
            .collect();
        let mut last = None;
        for master in &current.masters {
            let Ok(mut conn) = master.usable() else { continue };
            match Table::build(&mut conn, &self.inner.seed, &self.inner.settings, &known).await {
                Ok(table) => {
                    let table = Arc::new(table);
                    let addresses = |t: &Table| {
                        let mut all: Vec<Arc<str>> = t.masters.iter().map(|m| Arc::clone(&m.address)).collect();
                        all.sort();
                        all
                    };
                    // A slot of a master down that another master serves
                    // now spends it too: what that master missed (queued
                    // here) must not be read from the other.
                    let moved_from_down = current.owner.iter().zip(&table.owner).any(|(&was, &now)| {
                        let was = current.masters.get(usize::from(was));
                        let now = table.masters.get(usize::from(now));
                        was.is_some_and(|was| was.is_down() && now.is_none_or(|now| now.address != was.address))
                    });
                    if addresses(&table) != addresses(&current) || moved_from_down {
                        self.inner.changed.store(true, Ordering::SeqCst);
                    }
                    *self.inner.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&table);
                    return Ok(table);
                }
                Err(err) => last = Some(err),
            }
        }
        Err(last.unwrap_or_else(|| client_error("no master of the cluster answers")))
    }

    /// Every master, as the cluster names it now (the table is asked for
    /// again first, so a failover shows at once).
    pub(crate) async fn masters(&self) -> RedisResult<Vec<Master>> {
        let mut masters = self.refresh().await?.masters.clone();
        masters.sort_by(|a, b| a.address.cmp(&b.address));
        Ok(masters)
    }

    /// The master of `slot`, or for a command without a key any master
    /// not marked down.
    fn master(&self, slot: Option<u16>) -> RedisResult<Master> {
        let table = self.table();
        let master = match slot {
            Some(slot) => table.masters.get(usize::from(
                table.owner.get(usize::from(slot)).copied().unwrap_or(u16::MAX),
            )),
            None => table.masters.iter().find(|m| !m.is_down()).or(table.masters.first()),
        };
        master
            .cloned()
            .ok_or_else(|| client_error("no master serves this slot"))
    }

    /// Checks every master not marked down with a `PING` given `limit`
    /// (the link suspects the connection: some master left a call
    /// unanswered), and marks down those that do not answer. An error
    /// when none answers.
    pub(crate) async fn ping_masters(&self, limit: Duration) -> RedisResult<()> {
        let masters = self.table().masters.clone();
        let pings = masters.iter().filter(|m| !m.is_down()).map(|master| async move {
            let ping = redis::cmd("PING");
            match tokio::time::timeout(limit, master.command(&ping)).await {
                Ok(Ok(_)) => true,
                // An error answer is an answer.
                Ok(Err(err)) => !is_connection_error(&err) && !is_master_unreachable(&err),
                Err(_) => {
                    master.mark_down(&format!("no answer to PING within {limit:?}"));
                    false
                }
            }
        });
        let answered = futures_util::future::join_all(pings).await;
        if answered.contains(&true) {
            Ok(())
        } else {
            Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no master of the cluster answered",
            )))
        }
    }

    /// Whether a master is marked down.
    pub(crate) fn has_master_down(&self) -> bool {
        self.table().masters.iter().any(Master::is_down)
    }

    /// Whether a master marked down answers again on a new connection
    /// within `limit` (the connection is then to be replaced, see the
    /// module docs); its address if one does.
    pub(crate) async fn down_master_answers(&self, limit: Duration) -> Option<Arc<str>> {
        let down: Vec<Master> = self.table().masters.iter().filter(|m| m.is_down()).cloned().collect();
        for master in down {
            let Some((host, port)) = split_address(&master.address) else {
                continue;
            };
            let info = at_address(&self.inner.seed, host, port);
            let answered = tokio::time::timeout(limit, async {
                let mut conn = open(&info, &self.inner.settings).await?;
                redis::cmd("PING").query_async::<()>(&mut conn).await
            })
            .await;
            if matches!(answered, Ok(Ok(()))) {
                return Some(master.address);
            }
        }
        None
    }

    /// Sends one command: split by slot when it names keys of several,
    /// else to its master, following redirections.
    pub(crate) async fn command(&self, cmd: &Cmd) -> RedisResult<Value> {
        self.unspent()?;
        match route(cmd) {
            Route::Split(name, keys) => self.split(&name, keys).await,
            Route::Slot(slot) => self.send_one(Some(slot), cmd).await,
            Route::Any => self.send_one(None, cmd).await,
            Route::Every => {
                let masters = self.table().masters.clone();
                let sent = masters.into_iter().map(|master| async move {
                    match master.command(cmd).await? {
                        Value::ServerError(err) => Err(RedisError::from(err)),
                        answer => Ok(answer),
                    }
                });
                let mut answers = futures_util::future::join_all(sent).await.into_iter();
                let first = answers
                    .next()
                    .unwrap_or_else(|| Err(client_error("the cluster has no master")));
                answers.try_fold(first?, |first, answer| answer.map(|_| first))
            }
        }
    }

    /// An error that drops the connection, once the masters changed (see
    /// [`refresh`](Self::refresh)).
    fn unspent(&self) -> RedisResult<()> {
        if self.inner.changed.load(Ordering::SeqCst) {
            return Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "the cluster's masters changed",
            )));
        }
        Ok(())
    }

    /// [`command`](Self::command) for a command of one slot (or none).
    async fn send_one(&self, slot: Option<u16>, cmd: &Cmd) -> RedisResult<Value> {
        let mut master = self.master(slot)?;
        let mut asking = false;
        for _ in 0..=REDIRECTIONS {
            let answer = if asking {
                let mut pipe = redis::pipe();
                pipe.cmd("ASKING").ignore().add_command(cmd.clone());
                master
                    .pipeline(&pipe, 1, 1)
                    .await
                    .and_then(|mut values| values.pop().ok_or_else(|| client_error("no answer after ASKING")))
            } else {
                master.command(cmd).await
            };
            match redirection(&answer) {
                None => return answer,
                Some(Redirection::Moved(address)) => {
                    // The table is out of date: read again (which spends
                    // the connection if the masters changed), and send to
                    // the node the answer names even if the node asked
                    // for the table does not know yet.
                    let _ = self.refresh().await?;
                    self.unspent()?;
                    master = self.node_at(&address).await?;
                    asking = false;
                }
                Some(Redirection::TryAgain) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Some(Redirection::Ask(address)) => {
                    master = self.node_at(&address).await?;
                    asking = true;
                }
            }
        }
        Err(client_error("too many redirections"))
    }

    /// The node at `address` (`host:port`): the table's master when it is
    /// one, else a new connection to it.
    async fn node_at(&self, address: &str) -> RedisResult<Master> {
        if let Some(master) = self.table().masters.iter().find(|m| &*m.address == address) {
            return Ok(master.clone());
        }
        let (host, port) = split_address(address).ok_or_else(|| client_error("a node address has no port"))?;
        let conn = open(&at_address(&self.inner.seed, host, port), &self.inner.settings).await?;
        Ok(Master::new(address.to_owned(), conn))
    }

    /// A multi-key command (`name`) of keys in several slots: one command
    /// per slot, at once; `MGET`'s answers put back in the keys' order,
    /// the others' counts added up.
    async fn split(&self, name: &str, keys: Vec<(u16, Vec<u8>)>) -> RedisResult<Value> {
        let mut by_slot: HashMap<u16, Vec<usize>> = HashMap::new();
        for (at, (slot, _)) in keys.iter().enumerate() {
            by_slot.entry(*slot).or_default().push(at);
        }
        let parts = by_slot.into_iter().map(|(slot, positions)| {
            let mut cmd = redis::cmd(name);
            for &at in &positions {
                cmd.arg(&keys[at].1[..]);
            }
            async move { self.send_one(Some(slot), &cmd).await.map(|answer| (positions, answer)) }
        });
        let answers = futures_util::future::join_all(parts).await;
        let failures: Vec<&RedisError> = answers.iter().filter_map(|answer| answer.as_ref().err()).collect();
        if let Some(&first) = failures.first() {
            let worst = failures
                .iter()
                .find(|err| !is_master_unreachable(err))
                .copied()
                .unwrap_or(first);
            let clean = !answers
                .iter()
                .any(|answer| matches!(answer, Ok((_, Value::ServerError(_)))));
            return Err(reported(worst.clone(), clean));
        }
        if name == "MGET" {
            let mut values = vec![Value::Nil; keys.len()];
            for answer in answers {
                let (positions, answer) = answer?;
                let Value::Array(found) = answer.extract_error()? else {
                    return Err(client_error("MGET did not answer an array"));
                };
                if found.len() != positions.len() {
                    return Err(client_error("MGET answered another number of values"));
                }
                for (at, value) in positions.into_iter().zip(found) {
                    values[at] = value;
                }
            }
            Ok(Value::Array(values))
        } else {
            let mut total = 0;
            for answer in answers {
                let (_, answer) = answer?;
                total += redis::from_redis_value::<i64>(answer)?;
            }
            Ok(Value::Int(total))
        }
    }

    /// Sends a pipeline split by master (see the module docs); the answers
    /// of commands `offset..offset + count`, in the pipeline's order.
    pub(crate) async fn pipeline(&self, pipeline: &Pipeline, offset: usize, count: usize) -> RedisResult<Vec<Value>> {
        self.unspent()?;
        let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
        let table = self.table();
        let mut parts: HashMap<u16, (Pipeline, Vec<usize>)> = HashMap::new();
        let mut alone = Vec::new();
        for (at, cmd) in commands.iter().enumerate() {
            match route(cmd) {
                Route::Slot(slot) => {
                    let master = table.owner.get(usize::from(slot)).copied().unwrap_or(u16::MAX);
                    let (part, positions) = parts.entry(master).or_insert_with(|| (redis::pipe(), Vec::new()));
                    part.add_command((*cmd).clone());
                    positions.push(at);
                }
                Route::Split(..) | Route::Any | Route::Every => alone.push(at),
            }
        }
        let sent = parts.into_iter().map(|(master, (part, positions))| {
            let master = table.masters.get(usize::from(master)).cloned();
            async move {
                let master = master.ok_or_else(|| client_error("no master serves this slot"))?;
                let answers = master.pipeline(&part, 0, positions.len()).await?;
                Ok::<_, RedisError>((positions, answers))
            }
        });
        let lone = alone.into_iter().map(|at| {
            let cmd = commands[at];
            async move { self.command(cmd).await.map(|answer| (vec![at], vec![answer])) }
        });
        let (sent, lone) = futures_util::future::join(
            futures_util::future::join_all(sent),
            futures_util::future::join_all(lone),
        )
        .await;
        let mut answers: Vec<Option<Value>> = vec![None; commands.len()];
        let mut failed: Option<RedisError> = None;
        for outcome in sent.into_iter().chain(lone) {
            match outcome {
                Ok((positions, values)) => {
                    for (at, value) in positions.into_iter().zip(values) {
                        answers[at] = Some(value);
                    }
                }
                // The error of a master down only when every part that
                // failed failed so: the caller may then rely on the other
                // masters having taken theirs (see `outbox.rs`).
                Err(err) if failed.as_ref().is_none_or(is_master_unreachable) => failed = Some(err),
                Err(_) => {}
            }
        }
        if let Some(err) = failed {
            let clean = answers
                .iter()
                .flatten()
                .all(|answer| !matches!(answer, Value::ServerError(_)));
            return Err(reported(err, clean));
        }
        // Commands redirected (a slot moved meanwhile): sent again alone.
        for (at, answer) in answers.iter_mut().enumerate() {
            if answer.as_ref().and_then(redirection_in).is_some() {
                *answer = Some(self.command(commands[at]).await?);
            }
        }
        answers
            .into_iter()
            .skip(offset)
            .take(count)
            .map(|answer| answer.ok_or_else(|| client_error("a pipeline's answer is missing")))
            .collect()
    }
}

impl Table {
    /// Reads `CLUSTER SLOTS` on `conn` (a node of `seed`'s cluster) and
    /// connects to each master, reusing `known` connections.
    async fn build(
        conn: &mut MultiplexedConnection,
        seed: &ConnectionInfo,
        settings: &AsyncConnectionConfig,
        known: &HashMap<Arc<str>, Master>,
    ) -> RedisResult<Table> {
        let answer: Value = redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await?;
        let ranges = ranges(answer)?;
        let mut owner = vec![u16::MAX; SLOTS];
        let mut masters: Vec<Master> = Vec::new();
        for (start, end, host, port) in ranges {
            let host = if host.is_empty() { seed_host(seed) } else { host };
            let address = format!("{host}:{port}");
            let index = match masters.iter().position(|m| *m.address == *address) {
                Some(index) => index,
                None => {
                    let master = match known.get(address.as_str()) {
                        Some(master) => master.clone(),
                        None => Master::new(address, open(&at_address(seed, &host, port), settings).await?),
                    };
                    masters.push(master);
                    masters.len() - 1
                }
            };
            let index = u16::try_from(index).map_err(|_| client_error("too many masters"))?;
            if let Some(range) = owner.get_mut(start..=end.min(SLOTS - 1)) {
                range.fill(index);
            }
        }
        if masters.is_empty() {
            return Err(client_error("the cluster serves no slot"));
        }
        Ok(Table { owner, masters })
    }
}

/// The slot ranges of a `CLUSTER SLOTS` answer, each with its master's
/// host and port.
fn ranges(answer: Value) -> RedisResult<Vec<(usize, usize, String, u16)>> {
    let Value::Array(entries) = answer else {
        return Err(client_error("CLUSTER SLOTS did not answer an array"));
    };
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(fields) = entry else {
            return Err(client_error("a CLUSTER SLOTS entry is not an array"));
        };
        let mut fields = fields.into_iter();
        let (Some(start), Some(end), Some(Value::Array(master))) = (fields.next(), fields.next(), fields.next()) else {
            return Err(client_error("a CLUSTER SLOTS entry lacks its master"));
        };
        let mut master = master.into_iter();
        let (Some(host), Some(port)) = (master.next(), master.next()) else {
            return Err(client_error("a CLUSTER SLOTS master lacks its address"));
        };
        ranges.push((
            redis::from_redis_value(start)?,
            redis::from_redis_value(end)?,
            redis::from_redis_value(host)?,
            redis::from_redis_value(port)?,
        ));
    }
    Ok(ranges)
}

/// The host of `seed` (what an empty host in `CLUSTER SLOTS` means).
fn seed_host(seed: &ConnectionInfo) -> String {
    match seed.addr() {
        redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => host.clone(),
        _ => String::new(),
    }
}

async fn open(info: &ConnectionInfo, settings: &AsyncConnectionConfig) -> RedisResult<MultiplexedConnection> {
    redis::Client::open(info.clone())?
        .get_multiplexed_async_connection_with_config(settings)
        .await
}

/// The error a command split over masters (or a pipeline) reports, given
/// its worst part's `err` (one other than a master down when there is one)
/// and whether every part that answered answered `clean`ly (no error, no
/// redirection): a master down only when nothing else is in doubt, since
/// the caller then relies on the other masters having taken their part
/// (see `outbox.rs`).
fn reported(err: RedisError, clean: bool) -> RedisError {
    if is_master_unreachable(&err) && !clean {
        client_error("a command failed on a master down and on another")
    } else {
        err
    }
}

fn client_error(what: &'static str) -> RedisError {
    RedisError::from((ErrorKind::Client, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_master_down_is_reported_only_when_nothing_else_is_in_doubt() {
        let down = || master_unreachable("127.0.0.1:7101");
        // Every other part answered cleanly: the caller may hold the
        // invalidation for the master down alone.
        assert!(is_master_unreachable(&reported(down(), true)));
        // Another part answered an error or a redirection: what it did is
        // unknown, so the whole call failed.
        let doubtful = reported(down(), false);
        assert!(!is_master_unreachable(&doubtful));
        assert_eq!(doubtful.kind(), ErrorKind::Client);
        // Any other failure is reported as it is.
        let refused = RedisError::from((ErrorKind::Io, "refused"));
        assert_eq!(reported(refused, true).kind(), ErrorKind::Io);
    }
}
