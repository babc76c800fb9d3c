//! Node addresses: a cluster master's `host:port`, and the settings to
//! reach it (the seed's TLS and credentials, with its own address).

use redis::{ConnectionAddr, ConnectionInfo};

/// The settings of `info` for the node at `host:port` (a cluster's master).
pub(crate) fn at_address(info: &ConnectionInfo, host: &str, port: u16) -> ConnectionInfo {
    let addr = match info.addr() {
        ConnectionAddr::TcpTls {
            insecure, tls_params, ..
        } => ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => ConnectionAddr::Tcp(host.to_owned(), port),
    };
    info.clone().set_addr(addr)
}

/// The host and port of `host:port` (`None` without a port).
pub(crate) fn split_address(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}
