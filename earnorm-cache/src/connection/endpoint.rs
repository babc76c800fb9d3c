//! Where Redis is: one server (`redis://`, `rediss://`, `unix://`) or the
//! seed nodes of a cluster (`redis+cluster://h1:7000,h2:7000`,
//! `rediss+cluster://` for TLS; `user:password@` as for one server; the
//! other nodes are discovered). What this module alone owns: reading a
//! cluster URL, and opening a [`Wire`] to either.

use redis::{ConnectionAddr, ConnectionInfo, ErrorKind, RedisError, RedisResult};

use super::wire::Wire;
use crate::CacheConfig;

/// A Redis server or cluster to connect to.
#[allow(clippy::large_enum_variant)] // one per manager
pub(crate) enum Endpoint {
    /// One server.
    Node(redis::Client),
    /// A cluster, from its seed nodes (the first one's settings, TLS and
    /// credentials, are every node's).
    #[cfg(feature = "cluster")]
    Cluster {
        /// Each seed node's settings (the first one's TLS and credentials
        /// are every node's).
        seeds: Vec<ConnectionInfo>,
    },
}

impl Endpoint {
    /// Reads `url`: a cluster URL (see the module docs) or anything
    /// `redis::Client::open` takes.
    pub(crate) fn open(url: &str, config: &CacheConfig) -> RedisResult<Self> {
        match cluster_seeds(url) {
            None => redis::Client::open(url).map(Self::Node),
            Some(seeds) => Self::cluster(seeds?, config),
        }
    }

    #[cfg(feature = "cluster")]
    fn cluster(seeds: Vec<String>, _: &CacheConfig) -> RedisResult<Self> {
        let seeds = seeds
            .iter()
            .map(|seed| redis::IntoConnectionInfo::into_connection_info(seed.as_str()))
            .collect::<RedisResult<Vec<_>>>()?;
        if seeds.is_empty() {
            return Err(RedisError::from((
                ErrorKind::InvalidClientConfig,
                "a cluster URL names no node",
            )));
        }
        Ok(Self::Cluster { seeds })
    }

    #[cfg(not(feature = "cluster"))]
    fn cluster(_: Vec<String>, _: &CacheConfig) -> RedisResult<Self> {
        Err(RedisError::from((
            ErrorKind::InvalidClientConfig,
            "a cluster URL needs earnorm-cache's `cluster` feature",
        )))
    }

    /// Opens a connection (to every master, for a cluster).
    pub(crate) async fn connect(&self, config: &CacheConfig) -> RedisResult<Wire> {
        let settings = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(None);
        match self {
            Self::Node(client) => client
                .get_multiplexed_async_connection_with_config(&settings)
                .await
                .map(Wire::Node),
            #[cfg(feature = "cluster")]
            Self::Cluster { seeds } => super::cluster::Cluster::connect(seeds, settings)
                .await
                .map(Wire::Cluster),
        }
    }

    /// Whether this is a cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        !matches!(self, Self::Node(_))
    }

    /// The settings of the server (one server's, a cluster's first seed's).
    pub(crate) fn info(&self) -> &ConnectionInfo {
        match self {
            Self::Node(client) => client.get_connection_info(),
            #[cfg(feature = "cluster")]
            Self::Cluster { seeds } => &seeds[0],
        }
    }

    /// The host and port a TCP probe checks for the server's return.
    pub(crate) fn probe_address(&self) -> Option<(String, u16)> {
        match self.info().addr() {
            ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => Some((host.clone(), *port)),
            _ => None,
        }
    }
}

/// The seed URLs of a cluster URL (`None`: not one). Each seed is
/// `redis://` (or `rediss://`) with the URL's credentials and fragment.
fn cluster_seeds(url: &str) -> Option<RedisResult<Vec<String>>> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return None;
    };
    let invalid = |reason: &'static str| Some(Err(RedisError::from((ErrorKind::InvalidClientConfig, reason))));
    let (rest, fragment) = match rest.split_once('#') {
        Some((rest, fragment)) => (rest, format!("#{fragment}")),
        None => (rest, String::new()),
    };
    let (credentials, rest) = match rest.rsplit_once('@') {
        Some((credentials, rest)) => (format!("{credentials}@"), rest),
        None => (String::new(), rest),
    };
    let (hosts, database) = rest.split_once('/').unwrap_or((rest, ""));
    if !matches!(database, "" | "0") {
        return invalid("a cluster has database 0 only");
    }
    let seeds: Vec<String> = hosts
        .split(',')
        .filter(|host| !host.is_empty())
        .map(|host| format!("{scheme}://{credentials}{host}{fragment}"))
        .collect();
    if seeds.is_empty() {
        return invalid("a cluster URL names no node");
    }
    Some(Ok(seeds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_url_gives_each_seed_the_credentials_and_scheme() {
        assert!(cluster_seeds("redis://localhost:6379/0").is_none());
        let seeds = cluster_seeds("rediss+cluster://app:s3cret@10.0.0.1:7000,10.0.0.2:7001#insecure")
            .unwrap()
            .unwrap();
        assert_eq!(
            seeds,
            [
                "rediss://app:s3cret@10.0.0.1:7000#insecure",
                "rediss://app:s3cret@10.0.0.2:7001#insecure"
            ]
        );
        assert_eq!(
            cluster_seeds("redis+cluster://h:1/0").unwrap().unwrap(),
            ["redis://h:1"]
        );
        assert!(cluster_seeds("redis+cluster://h:1/3").unwrap().is_err());
        assert!(cluster_seeds("redis+cluster://").unwrap().is_err());
    }
}
