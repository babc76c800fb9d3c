//! A private Redis Cluster: three masters (`redis-server --cluster-enabled
//! yes`) on free loopback ports, with replicas where a test needs
//! failovers, joined with `redis-cli --cluster create`, nothing persisted.
//! Killed and cleaned up on drop.

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
        Self::start_with_replicas(0)
    }

    /// Starts three masters with `replicas` replicas each (the nodes after
    /// the first three, as `redis-cli` assigns them).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_with_replicas(replicas: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas))
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
                        // A replica takes over a dead master however long
                        // ago it last heard from it (a fresh replica that
                        // never synced would otherwise refuse).
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(RedisServer::addr).collect();
        let status = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .status()
            .expect("could not run redis-cli (Debian: apt-get install redis-tools)");
        assert!(status.success(), "redis-cli --cluster create failed");
        let cluster = Self { nodes };
        cluster.wait_until_whole(Duration::from_secs(30));
        cluster
    }

    /// Lets the masters that answer serve their slots while another is
    /// down (`cluster-require-full-coverage no`; by default a cluster
    /// refuses every command once it has marked a master failed, after the
    /// node timeout).
    pub fn serve_partial(&self) {
        for node in &self.nodes {
            assert_eq!(
                node.cli(&["CONFIG", "SET", "cluster-require-full-coverage", "no"])
                    .trim(),
                "OK"
            );
        }
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

    /// The node at `index`, to kill, restart or freeze.
    pub fn node(&mut self, index: usize) -> &mut RedisServer {
        &mut self.nodes[index]
    }

    /// The number of nodes, masters and replicas.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The indexes of the nodes that are replicas now (`ROLE`).
    pub fn replicas(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].cli(&["ROLE"]).starts_with("slave"))
            .collect()
    }

    /// Has the replica at `replica` take over its master's slots (`CLUSTER
    /// FAILOVER`; the old master follows it) and waits until the cluster is
    /// whole. A manual failover gives up after a few seconds when the
    /// replica cannot catch up in time (a loaded machine): it is asked
    /// again, for 60 seconds at most.
    ///
    /// # Panics
    /// When the replica is not a master within 60 seconds.
    pub fn fail_over_to(&mut self, replica: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        'ask: loop {
            assert_eq!(self.nodes[replica].cli(&["CLUSTER", "FAILOVER"]), "OK");
            let asked = Instant::now();
            while asked.elapsed() < Duration::from_secs(8) {
                if self.nodes[replica].cli(&["ROLE"]).starts_with("master") {
                    break 'ask;
                }
                assert!(Instant::now() < deadline, "the failover did not happen");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.wait_until_whole(Duration::from_secs(30));
    }

    /// `key`'s value as the cluster serves it (`redis-cli -c` follows the
    /// redirection to its master); empty when absent.
    pub fn get(&self, key: &str) -> String {
        self.nodes[0].cli(&["-c", "GET", key])
    }
}
