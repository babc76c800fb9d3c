//! The wire: one connection type for one Redis server and for a Redis
//! Cluster, so that every other module sends commands and pipelines the
//! same way to either.
//!
//! What this module alone owns: how a pipeline reaches a cluster, and the
//! commands that run on every master.
//!
//! * On one server, a pipeline is one round trip on one socket, and its
//!   commands run in order.
//! * On a cluster, a pipeline's commands are grouped by the slot of their
//!   key; each group is one pipeline to the master of its slot, and the
//!   groups are sent at once, so a pipeline still costs one round trip of
//!   the slowest master it touches. Commands on one slot run in order;
//!   commands on different slots run in no set order. No caller relies on
//!   an order across keys: a lookup, a store, an invalidation and the
//!   creation of generations each send commands that are independent of
//!   one another (see the crate docs, "Redis Cluster"). A command whose key
//!   the wire does not know (a multi-key `MGET`, `DEL` or `UNLINK`, `PING`)
//!   goes alone, and redis-rs splits a multi-key one by slot. Redirections
//!   (`MOVED`, `ASK`) and topology changes are followed by redis-rs.

use std::future::Future;
use std::pin::Pin;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// A connection to one Redis server or to a cluster. Cheap to clone: clones
/// share the connection.
#[derive(Clone)]
pub(crate) enum Wire {
    /// One server, multiplexed.
    Node(MultiplexedConnection),
    /// A cluster; each master has one multiplexed connection inside.
    #[cfg(feature = "cluster")]
    Cluster(redis::cluster_async::ClusterConnection),
    /// One master of a cluster: every command goes to its address.
    #[cfg(feature = "cluster")]
    Master(cluster::Master),
}

impl ConnectionLike for Wire {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Self::Cluster(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Self::Master(master) => Box::pin(master.command(cmd)),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(conn) => conn.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Self::Cluster(conn) if !pipeline.is_transaction() => {
                Box::pin(cluster::by_slot(conn.clone(), pipeline, offset, count))
            }
            #[cfg(feature = "cluster")]
            Self::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
            #[cfg(feature = "cluster")]
            Self::Master(master) => Box::pin(master.pipeline(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(conn) => conn.get_db(),
            #[cfg(feature = "cluster")]
            Self::Cluster(conn) => conn.get_db(),
            #[cfg(feature = "cluster")]
            Self::Master(_) => 0,
        }
    }
}

/// A future that owns nothing borrowed, for work run on each master.
type Owned<T> = Pin<Box<dyn Future<Output = RedisResult<T>> + Send>>;

impl Wire {
    /// Whether this is a cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        !matches!(self, Self::Node(_))
    }

    /// One connection per master, each sending to that master alone (on
    /// one server: itself), with the master's address (`host:port`; empty
    /// for one server). What commands that concern a server rather than a
    /// key (`SCAN`, `INFO`) run on.
    pub(crate) async fn masters(&self) -> RedisResult<Vec<(String, Wire)>> {
        match self {
            Self::Node(_) => Ok(vec![(String::new(), self.clone())]),
            #[cfg(feature = "cluster")]
            Self::Cluster(conn) => cluster::masters(conn.clone()).await,
            #[cfg(feature = "cluster")]
            Self::Master(master) => Ok(vec![(master.address(), self.clone())]),
        }
    }

    /// Runs `op` on every master at once (see [`masters`](Self::masters)),
    /// with each one's address; the answers in no set order.
    pub(crate) async fn on_each_master<T, F>(&self, op: F) -> RedisResult<Vec<(String, T)>>
    where
        T: Send + 'static,
        F: Fn(Wire) -> Owned<T>,
    {
        let masters = self.masters().await?;
        let runs = masters.into_iter().map(|(address, wire)| {
            let run = op(wire);
            async move { run.await.map(|answer| (address, answer)) }
        });
        let answers = join_all(runs).await;
        answers.into_iter().collect()
    }
}

/// Runs `futures` at once (one after the other without the `cluster`
/// feature, which brings the combinator).
#[cfg(feature = "cluster")]
pub(crate) async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    futures_util::future::join_all(futures).await
}

/// Runs `futures` one after the other.
#[cfg(not(feature = "cluster"))]
pub(crate) async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut out = Vec::new();
    for future in futures {
        out.push(future.await);
    }
    out
}

#[cfg(feature = "cluster")]
mod cluster {
    use std::collections::HashMap;

    use redis::cluster_async::ClusterConnection;
    use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};
    use redis::{Arg, Cmd, ErrorKind, Pipeline, RedisError, RedisResult, Value};

    use super::Wire;

    /// Sends `pipeline` grouped by slot (see the module docs); the answers
    /// of commands `offset..offset + count`, in the pipeline's order.
    pub(super) async fn by_slot(
        conn: ClusterConnection,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisResult<Vec<Value>> {
        let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
        let mut groups: HashMap<Slot, (Pipeline, Vec<usize>)> = HashMap::new();
        let mut alone = Vec::new();
        for (at, cmd) in commands.iter().enumerate() {
            match slot_of(cmd) {
                Some(slot) => {
                    let (group, positions) = groups.entry(slot).or_insert_with(|| (redis::pipe(), Vec::new()));
                    group.add_command((*cmd).clone());
                    positions.push(at);
                }
                None => alone.push(at),
            }
        }
        let grouped = groups.into_iter().map(|(slot, (group, positions))| {
            let mut conn = conn.clone();
            async move {
                let n = positions.len();
                let route = SingleNodeRoutingInfo::SpecificNode(Route::with_slot(slot, SlotAddr::Master));
                conn.route_pipeline(group, 0, n, route)
                    .await
                    .map(|answers| (positions, answers))
            }
        });
        let lone = alone.into_iter().map(|at| {
            let (mut conn, cmd) = (conn.clone(), commands[at].clone());
            async move {
                redis::aio::ConnectionLike::req_packed_command(&mut conn, &cmd)
                    .await
                    .map(|answer| (vec![at], vec![answer]))
            }
        });
        let (grouped, lone) = futures_util::future::join(
            futures_util::future::join_all(grouped),
            futures_util::future::join_all(lone),
        )
        .await;
        let mut answers: Vec<Option<Value>> = vec![None; commands.len()];
        for outcome in grouped.into_iter().chain(lone) {
            let (positions, values) = outcome?;
            for (at, value) in positions.into_iter().zip(values) {
                answers[at] = Some(value);
            }
        }
        answers
            .into_iter()
            .skip(offset)
            .take(count)
            .map(|answer| answer.ok_or_else(|| RedisError::from((ErrorKind::Client, "a pipeline's answer is missing"))))
            .collect()
    }

    /// The slot of the one key `cmd` names, when the wire knows it: the
    /// commands this crate sends name their key first, but for scripts
    /// (after the script and the number of keys) and for commands with no
    /// key or several keys (sent alone).
    fn slot_of(cmd: &Cmd) -> Option<Slot> {
        let mut args = cmd.args_iter().map(|arg| match arg {
            Arg::Simple(bytes) => Some(bytes),
            _ => None,
        });
        let count = args.len();
        let name = args.next()??.to_ascii_uppercase();
        let key = match name.as_slice() {
            b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" => {
                let _script = args.next()?;
                let keys: usize = std::str::from_utf8(args.next()??).ok()?.parse().ok()?;
                if keys != 1 {
                    return None;
                }
                args.next()??
            }
            b"MGET" | b"DEL" | b"UNLINK" | b"EXISTS" | b"TOUCH" if count != 2 => return None,
            b"PING" | b"INFO" | b"SCAN" | b"TIME" | b"CLIENT" | b"CLUSTER" | b"ECHO" | b"SCRIPT" | b"DBSIZE"
            | b"FLUSHALL" | b"FLUSHDB" | b"HELLO" | b"AUTH" | b"SELECT" | b"ACL" | b"CONFIG" => return None,
            _ => args.next()??,
        };
        Some(Slot::for_key(key))
    }

    /// One wire per master: a cluster connection clone whose commands are
    /// all sent to that master's address. The masters are those the
    /// cluster itself names (`CLUSTER NODES`, asked of any node), not the
    /// ones redis-rs last routed to: after a failover, redis-rs learns of
    /// the new master only when a command is redirected to it.
    pub(super) async fn masters(mut conn: ClusterConnection) -> RedisResult<Vec<(String, Wire)>> {
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random);
        let nodes: String = redis::from_redis_value(
            conn.route_command(redis::cmd("CLUSTER").arg("NODES").clone(), routing)
                .await?,
        )?;
        let mut masters = Vec::new();
        for (host, port) in masters_of(&nodes) {
            let address = format!("{host}:{port}");
            masters.push((address, Wire::Cluster(conn.clone()).at(host, port)));
        }
        if masters.is_empty() {
            return Err(RedisError::from((
                ErrorKind::Client,
                "the cluster names no master with slots",
            )));
        }
        masters.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(masters)
    }

    /// The host and port of every master that serves slots, from a
    /// `CLUSTER NODES` answer (`ID HOST:PORT@BUS[,NAME] FLAGS MASTER PING
    /// PONG EPOCH STATE SLOT...`).
    fn masters_of(nodes: &str) -> Vec<(String, u16)> {
        nodes
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (address, flags) = (fields.get(1)?, fields.get(2)?);
                if !flags.split(',').any(|flag| flag == "master") || fields.len() < 9 {
                    return None;
                }
                let address = address.split(['@', ',']).next()?;
                let (host, port) = address.rsplit_once(':')?;
                Some((host.to_owned(), port.parse().ok()?))
            })
            .collect()
    }

    #[cfg(test)]
    #[test]
    fn masters_are_the_nodes_flagged_master_with_slots() {
        let nodes = "\
a1 127.0.0.1:7100@17100 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7101@17101,h2 master - 0 1 2 connected 5461-10922
c3 127.0.0.1:7102@17102 slave b2 0 1 2 connected
d4 127.0.0.1:7103@17103 master - 0 1 0 connected
";
        assert_eq!(
            masters_of(nodes),
            [("127.0.0.1".to_owned(), 7100), ("127.0.0.1".to_owned(), 7101)]
        );
    }

    impl Wire {
        /// This cluster connection, sending every command to `host:port`.
        fn at(self, host: String, port: u16) -> Wire {
            match self {
                Wire::Cluster(conn) => Wire::Master(Master { conn, host, port }),
                other => other,
            }
        }
    }

    /// A cluster connection that sends to one master.
    #[derive(Clone)]
    pub(crate) struct Master {
        conn: ClusterConnection,
        host: String,
        port: u16,
    }

    impl Master {
        pub(super) fn address(&self) -> String {
            format!("{}:{}", self.host, self.port)
        }

        fn route(&self) -> SingleNodeRoutingInfo {
            SingleNodeRoutingInfo::ByAddress {
                host: self.host.clone(),
                port: self.port,
            }
        }

        pub(super) async fn command(&mut self, cmd: &Cmd) -> RedisResult<Value> {
            let route = RoutingInfo::SingleNode(self.route());
            self.conn.route_command(cmd.clone(), route).await
        }

        pub(super) async fn pipeline(
            &mut self,
            pipeline: &Pipeline,
            offset: usize,
            count: usize,
        ) -> RedisResult<Vec<Value>> {
            let route = self.route();
            self.conn.route_pipeline(pipeline.clone(), offset, count, route).await
        }
    }
}
