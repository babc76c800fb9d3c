//! The wire: one connection type for one Redis server and for a Redis
//! Cluster, so that every other module sends commands and pipelines the
//! same way to either.
//!
//! What this module alone owns: which connection a call goes through, and
//! the commands that run on every master. On one server, a pipeline is one
//! round trip on one socket, and its commands run in order; on a cluster,
//! `cluster.rs` routes each command to its master (a pipeline costs one
//! round trip of the slowest master it touches).

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
    /// A cluster: a connection to each master, commands routed by slot.
    #[cfg(feature = "cluster")]
    Cluster(super::cluster::Cluster),
    /// One master of a cluster, alone (what runs on every master, such as
    /// `SCAN`, runs on these): multi-key commands must stay in one slot.
    #[cfg(feature = "cluster")]
    Master(super::cluster::Master),
}

impl ConnectionLike for Wire {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(conn) => conn.req_packed_command(cmd),
            #[cfg(feature = "cluster")]
            Self::Cluster(cluster) => Box::pin(cluster.command(cmd)),
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
            Self::Cluster(cluster) => Box::pin(cluster.pipeline(pipeline, offset, count)),
            #[cfg(feature = "cluster")]
            Self::Master(master) => Box::pin(master.pipeline(pipeline, offset, count)),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(conn) => conn.get_db(),
            #[cfg(feature = "cluster")]
            Self::Cluster(_) | Self::Master(_) => 0,
        }
    }
}

/// A future that owns nothing borrowed, for work run on each master.
type Owned<T> = Pin<Box<dyn Future<Output = RedisResult<T>> + Send>>;

impl Wire {
    /// Whether this is a cluster (or one of its masters).
    pub(crate) fn is_cluster(&self) -> bool {
        !matches!(self, Self::Node(_))
    }

    /// One connection per master, each sending to that master alone (on
    /// one server: itself), with the master's address (`host:port`; empty
    /// for one server). What commands that concern a server rather than a
    /// key (`SCAN`, `INFO`) run on. A cluster's masters are those it names
    /// now, so a failover shows at once.
    pub(crate) async fn masters(&self) -> RedisResult<Vec<(String, Wire)>> {
        match self {
            Self::Node(_) => Ok(vec![(String::new(), self.clone())]),
            #[cfg(feature = "cluster")]
            Self::Cluster(cluster) => Ok(cluster
                .masters()
                .await?
                .into_iter()
                .map(|master| (master.address.to_string(), Wire::Master(master)))
                .collect()),
            #[cfg(feature = "cluster")]
            Self::Master(_) => Ok(vec![(String::new(), self.clone())]),
        }
    }

    /// Asks every master for a `PING`, each given `limit`: on a cluster,
    /// those that do not answer are marked down (their slots compute) and
    /// the others keep serving; an error when none answers (see
    /// `cluster.rs`).
    pub(crate) async fn ping_masters(&self, limit: std::time::Duration) -> RedisResult<()> {
        match self {
            #[cfg(feature = "cluster")]
            Self::Cluster(cluster) => cluster.ping_masters(limit).await,
            _ => {
                let mut conn = self.clone();
                match tokio::time::timeout(limit, redis::cmd("PING").query_async::<()>(&mut conn)).await {
                    Ok(answer) => answer,
                    Err(_) => Err(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer to PING",
                    ))),
                }
            }
        }
    }

    /// Whether a master of this cluster is marked down.
    pub(crate) fn has_master_down(&self) -> bool {
        match self {
            #[cfg(feature = "cluster")]
            Self::Cluster(cluster) => cluster.has_master_down(),
            _ => false,
        }
    }

    /// On a cluster, the address of a master marked down that answers
    /// again on a new connection within `limit`.
    pub(crate) async fn returned_master(&self, limit: std::time::Duration) -> Option<String> {
        match self {
            #[cfg(feature = "cluster")]
            Self::Cluster(cluster) => cluster.down_master_answers(limit).await.map(|a| a.to_string()),
            _ => {
                let _ = limit;
                None
            }
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
