//! A private Redis Cluster: three masters (`redis-server --cluster-enabled
//! yes`) on free loopback ports, joined with `redis-cli --cluster create`,
//! nothing persisted. Killed and cleaned up on drop.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::{free_port, RedisServer};

/// A running local cluster.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three masters and joins them; waits until the cluster is
    /// whole (`cluster_state:ok` on every node).
    ///
    /// # Panics
    /// When redis-server or redis-cli cannot be run, or the cluster does
    /// not come up within 30 seconds.
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_on(
                    free_port(),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(RedisServer::addr).collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("could not run redis-cli (Debian: apt-get install redis-tools)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = Self { nodes };
        cluster.wait_until_whole(Duration::from_secs(30));
        cluster
    }

    /// Waits until every node says `cluster_state:ok`.
    ///
    /// # Panics
    /// When that takes longer than `limit`.
    pub fn wait_until_whole(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self
            .nodes
            .iter()
            .all(|node| node.answers() && node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(
                Instant::now() < deadline,
                "the cluster did not become whole within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The cluster's URL (`redis+cluster://` with every node).
    pub fn url(&self) -> String {
        let addresses: Vec<String> = self.nodes.iter().map(RedisServer::addr).collect();
        format!("redis+cluster://{}", addresses.join(","))
    }

    /// The node at `index` (0 to 2), to kill, restart or freeze.
    pub fn node(&mut self, index: usize) -> &mut RedisServer {
        &mut self.nodes[index]
    }
}
