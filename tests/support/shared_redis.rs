//! A plain connection to the shared Redis of [`redis_url`](crate::redis_url),
//! one server or a cluster (`redis+cluster://`), for tests that look at or
//! change keys themselves.

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// A connection to the shared Redis. On a cluster, commands must name keys
/// of one slot (single-key commands always do).
#[allow(missing_debug_implementations)]
pub struct SharedRedis {
    conn: Box<dyn ConnectionLike + Send + Sync>,
    /// The URL of each node a cluster URL names (none for one server).
    nodes: Vec<String>,
}

/// Connects to the shared Redis (`REDIS_URL`).
///
/// # Panics
/// When it cannot connect.
pub async fn shared_redis() -> SharedRedis {
    let url = crate::require_redis();
    let nodes = cluster_nodes(&url);
    let conn: Box<dyn ConnectionLike + Send + Sync> = if nodes.is_empty() {
        let client = redis::Client::open(url).expect("REDIS_URL");
        Box::new(
            client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to Redis"),
        )
    } else {
        let client = redis::cluster::ClusterClient::new(nodes.clone()).expect("REDIS_URL");
        Box::new(
            client
                .get_async_connection()
                .await
                .expect("connect to the Redis Cluster"),
        )
    };
    SharedRedis { conn, nodes }
}

/// The node URLs of a `redis+cluster://` URL (none for one server).
fn cluster_nodes(url: &str) -> Vec<String> {
    let Some(rest) = url.strip_prefix("redis+cluster://") else {
        return Vec::new();
    };
    let (credentials, hosts) = rest.rsplit_once('@').map_or(("", rest), |(c, h)| (c, h));
    let hosts = hosts.split('/').next().unwrap_or(hosts);
    hosts
        .split(',')
        .map(|host| {
            if credentials.is_empty() {
                format!("redis://{host}")
            } else {
                format!("redis://{credentials}@{host}")
            }
        })
        .collect()
}

impl SharedRedis {
    /// Every key matching `pattern` (`SCAN` on the server, or on each node
    /// the cluster URL names: the test cluster's masters).
    ///
    /// # Panics
    /// When Redis fails.
    pub async fn scan_matching(&self, pattern: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let one_server = [crate::redis_url()];
        let nodes = if self.nodes.is_empty() {
            &one_server[..]
        } else {
            &self.nodes[..]
        };
        for node in nodes {
            let client = redis::Client::open(node.as_str()).expect("node URL");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to a node");
            scan(&mut conn, pattern, &mut keys).await;
        }
        keys.sort();
        keys.dedup();
        keys
    }
}

async fn scan(conn: &mut MultiplexedConnection, pattern: &str, keys: &mut Vec<String>) {
    let mut cursor = 0_u64;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(found);
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

impl ConnectionLike for SharedRedis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.conn.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.conn.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.conn.get_db()
    }
}
