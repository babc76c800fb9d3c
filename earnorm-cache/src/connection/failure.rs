//! What a failed call on Redis means: the connection is lost, or one
//! master of a cluster is down (see `cluster.rs`).
//!
//! What this module alone owns: telling those failures apart, for the link
//! (which drops the connection on the first and not on the second) and for
//! the cluster's routing (which marks a master down on the first).

use redis::RedisError;

/// Whether an error means the connection itself is unusable.
pub(super) fn is_connection_error(err: &RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_timeout() || err.is_unrecoverable_error()
}

/// The code of the error of a call on a slot of a cluster's master that is
/// marked down (see `cluster.rs`): the link counts it as Redis being
/// unavailable for that call, without dropping the connection.
const MASTER_UNREACHABLE: &str = "MASTERUNREACHABLE";

/// The error of a call on a slot of the master at `address`, marked down.
#[cfg(feature = "cluster")]
pub(super) fn master_unreachable(address: &str) -> redis::RedisError {
    redis::make_extension_error(
        MASTER_UNREACHABLE.to_owned(),
        Some(format!("the cluster's master {address} cannot be reached")),
    )
}

/// Whether `err` is that of a call on a slot of a master marked down.
pub(super) fn is_master_unreachable(err: &redis::RedisError) -> bool {
    err.code() == Some(MASTER_UNREACHABLE)
}
