//! Where a command goes on a Redis Cluster: the hash slot of a key, the
//! slot (or slots) of a command, and the redirections a master answers.
//!
//! What this module alone owns: reading commands and answers, never a
//! connection (`cluster.rs` sends).

use redis::{Cmd, RedisResult, Value};

/// Where a command goes.
pub(super) enum Route {
    /// To the master of this slot.
    Slot(u16),
    /// Split by slot: a multi-key command (its name) and its keys' slots.
    Split(String, Vec<(u16, Vec<u8>)>),
    /// Anywhere (no key).
    Any,
    /// To every master (`SCRIPT LOAD`: a script runs where its keys are).
    Every,
}

/// Where `cmd` goes: by the slot of its key (the commands this crate sends
/// name it first, but scripts, after the script and the number of keys),
/// split when a multi-key command names several slots, anywhere when it
/// names none.
pub(super) fn route(cmd: &Cmd) -> Route {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|arg| match arg {
            redis::Arg::Simple(bytes) => Some(bytes),
            _ => None,
        })
        .collect();
    let Some(name) = args.first().map(|name| name.to_ascii_uppercase()) else {
        return Route::Any;
    };
    match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" => match args.get(3) {
            Some(key) if args.get(2).is_some_and(|n| *n != b"0") => Route::Slot(slot(key)),
            _ => Route::Any,
        },
        b"MGET" | b"DEL" | b"UNLINK" | b"EXISTS" => {
            let keys: Vec<(u16, Vec<u8>)> = args[1..].iter().map(|key| (slot(key), key.to_vec())).collect();
            match keys.first() {
                None => Route::Any,
                Some((first, _)) if keys.iter().all(|(s, _)| s == first) => Route::Slot(*first),
                Some(_) => Route::Split(String::from_utf8_lossy(&name).into_owned(), keys),
            }
        }
        b"SCRIPT" => Route::Every,
        b"PING" | b"INFO" | b"SCAN" | b"TIME" | b"CLIENT" | b"CLUSTER" | b"ECHO" | b"DBSIZE" | b"HELLO" | b"AUTH"
        | b"ACL" | b"CONFIG" => Route::Any,
        _ => args.get(1).map_or(Route::Any, |key| Route::Slot(slot(key))),
    }
}

/// A redirection in an answer.
pub(super) enum Redirection {
    /// The slot's master is now the node at this address.
    Moved(String),
    /// To the node at this address, for this command only.
    Ask(String),
    /// The slot is moving and the keys are split between two nodes for
    /// now (a multi-key command): again, a little later.
    TryAgain,
}

pub(super) fn redirection(answer: &RedisResult<Value>) -> Option<Redirection> {
    match answer {
        Ok(value) => redirection_in(value),
        Err(err) => redirection_of(err.code()?, err.detail().unwrap_or("")),
    }
}

/// [`redirection`] for an answer inside a pipeline's.
pub(super) fn redirection_in(value: &Value) -> Option<Redirection> {
    match value {
        Value::ServerError(err) => redirection_of(err.code(), err.details().unwrap_or("")),
        _ => None,
    }
}

/// A redirection from an error's code and details (`SLOT HOST:PORT`).
fn redirection_of(code: &str, details: &str) -> Option<Redirection> {
    let address = || details.split_whitespace().nth(1).map(str::to_owned);
    match code {
        "MOVED" => address().map(Redirection::Moved),
        "ASK" => address().map(Redirection::Ask),
        "TRYAGAIN" => Some(Redirection::TryAgain),
        _ => None,
    }
}

/// The hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part
/// between the first `{` and the next `}`, when not empty) or of the whole
/// key, modulo 16,384.
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % 16_384
}

fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_of_redis_cluster() {
        // The check value of CRC16/XMODEM, and slots `CLUSTER KEYSLOT` gives.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot(b"foo"), 12_182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(
            slot(b"foo{}{bar}"),
            slot(b"foo{}{bar}"),
            "an empty tag hashes the whole key"
        );
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
    }

    #[test]
    fn commands_go_by_their_key_and_multi_key_ones_split_by_slot() {
        assert!(matches!(route(redis::cmd("GET").arg("foo")), Route::Slot(12_182)));
        assert!(matches!(route(&redis::cmd("PING")), Route::Any));
        assert!(matches!(
            route(redis::cmd("EVALSHA").arg("abc").arg(1).arg("foo").arg("x")),
            Route::Slot(12_182)
        ));
        assert!(matches!(
            route(redis::cmd("MGET").arg("{a}1").arg("{a}2")),
            Route::Slot(_)
        ));
        assert!(
            matches!(route(redis::cmd("MGET").arg("a").arg("b")), Route::Split(name, keys) if name == "MGET" && keys.len() == 2)
        );
    }
}
