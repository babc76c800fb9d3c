//! [`Keyspace`]: the name of every key this crate reads or writes, and the
//! one place that decides them. What this module alone owns: no other
//! module writes a key's name (a Redis Cluster layout decides its hash tags
//! here; the in-process tier learns here which keys are generations).
//!
//! Every key lives under the manager's prefix `P` (the configured prefix,
//! ending in `:`):
//!
//! | key                     | holds                                             |
//! |-------------------------|---------------------------------------------------|
//! | `P v:NS:NAME:ID:HASH`   | a cached value (an envelope, see [`crate::codec`]) |
//! | `P g:r:MODEL:ID`        | generation of one record                          |
//! | `P g:m:MODEL`           | generation of every record of a model (bulk writes) |
//! | `P g:q:MODEL`           | generation of a model's queries (any write)       |
//! | `P g:t:TAG`             | generation of a free-form tag                     |
//! | `P meta:run_id`         | the Redis server the generations were made on      |
//! | `P meta:members`        | heartbeats of the managers using the prefix        |
//! | `P meta:probe:N`        | a short-lived key written by the checks at connect |
//! | `P meta:NAME`           | bookkeeping values (`CacheManager::set_meta`), such as the feed's resume token |
//! | `P lease:NAME`          | leases (`CacheManager::lease`), such as the feed leader's |
//! | `P lease:v:...`         | the lease of one value's computation across processes |
//! | `P mon:g:...`           | values a plain `set` stored lately under that generation (the consistency monitor's) |
//!
//! Names may contain any character, `:` included: keys are only ever built
//! from scopes, never parsed back.
//!
//! On a Redis Cluster, the `meta:` keys carry a hash tag, `P meta:{P}NAME`,
//! so that they share one slot: the heartbeat reads the members and the
//! feed's marker in one script. Values, generations and leases keep their
//! names and spread over every slot; nothing else reads several keys
//! atomically there (see the crate docs, "Redis Cluster").

use crate::scope::Scope;

/// The names of the keys under one prefix (cheap to make: it borrows the
/// prefix).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Keyspace<'p> {
    prefix: &'p str,
    /// Whether the keys are a cluster's (the `meta:` keys then share a
    /// slot).
    clustered: bool,
}

impl<'p> Keyspace<'p> {
    /// The keys under `prefix` (the configured prefix, ending in `:`).
    pub(crate) fn new(prefix: &'p str) -> Self {
        Self {
            prefix,
            clustered: false,
        }
    }

    /// The same keys, laid out for a cluster when `clustered`.
    pub(crate) fn clustered(self, clustered: bool) -> Self {
        Self { clustered, ..self }
    }

    /// The values a plain `set` stored lately under `generation` (a
    /// generation's key, prefix included), for the consistency monitor:
    /// `P mon:` and the generation's name.
    pub(crate) fn plain_sets(&self, generation: &str) -> String {
        let name = generation.strip_prefix(self.prefix).unwrap_or(generation);
        format!("{}mon:{name}", self.prefix)
    }

    /// The start of the key of a value named `name` in `namespace`, to
    /// which the value's id and hash are appended: `P v:NS:NAME:`.
    pub(crate) fn value_start(&self, namespace: &str, name: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + namespace.len() + name.len() + 64);
        key.push_str(self.prefix);
        key.push_str("v:");
        key.push_str(namespace);
        key.push(':');
        key.push_str(name);
        key.push(':');
        key
    }

    /// The generation keys a value built with `scope` is checked against.
    pub(crate) fn read_generations(&self, scope: Scope<'_>, out: &mut Vec<String>) {
        let p = self.prefix;
        match scope {
            Scope::Record(model, id) => {
                out.push(format!("{p}g:m:{model}"));
                out.push(format!("{p}g:r:{model}:{id}"));
            }
            Scope::Model(model) => out.push(format!("{p}g:q:{model}")),
            Scope::Tag(tag) => out.push(format!("{p}g:t:{tag}")),
        }
    }

    /// The generation keys a write to `scope` replaces.
    pub(crate) fn written_generations(&self, scope: Scope<'_>, out: &mut Vec<String>) {
        let p = self.prefix;
        match scope {
            Scope::Record(model, id) => {
                out.push(format!("{p}g:r:{model}:{id}"));
                out.push(format!("{p}g:q:{model}"));
            }
            Scope::Model(model) => {
                out.push(format!("{p}g:m:{model}"));
                out.push(format!("{p}g:q:{model}"));
            }
            Scope::Tag(tag) => out.push(format!("{p}g:t:{tag}")),
        }
    }

    /// What a generation (named relative to the prefix) belongs to:
    /// `record`, `model` (bulk writes), `query`, `tag`; `other` for any
    /// other name. Safe to log: it names no user data.
    pub(crate) fn generation_kind(relative: &[u8]) -> &'static str {
        match relative.get(..4) {
            Some(b"g:r:") => "record",
            Some(b"g:m:") => "model",
            Some(b"g:q:") => "query",
            Some(b"g:t:") => "tag",
            _ => "other",
        }
    }

    /// The start of every generation key (`P g:`): what the in-process
    /// tier's invalidation channel subscribes to.
    pub(crate) fn generations_prefix(&self) -> String {
        format!("{}g:", self.prefix)
    }

    /// The glob matching every generation under the prefix.
    pub(crate) fn generations_glob(&self) -> String {
        self.glob("g:*")
    }

    /// `pattern` (a glob relative to the prefix) under the prefix, the
    /// prefix's own glob characters escaped.
    pub(crate) fn glob(&self, pattern: &str) -> String {
        format!("{}{pattern}", escape_glob(self.prefix))
    }

    /// The lease `name` (see `CacheManager::lease`).
    pub(crate) fn lease(&self, name: &str) -> String {
        format!("{}lease:{name}", self.prefix)
    }

    /// The lease of the computation of the value at `value_key`.
    pub(crate) fn value_lease(&self, value_key: &str) -> String {
        self.lease(value_key.strip_prefix(self.prefix).unwrap_or(value_key))
    }

    /// The bookkeeping value `name` (see `CacheManager::set_meta`).
    pub(crate) fn meta(&self, name: &str) -> String {
        let p = self.prefix;
        if self.clustered {
            format!("{p}meta:{{{p}}}{name}")
        } else {
            format!("{p}meta:{name}")
        }
    }

    /// The heartbeats of the managers sharing the prefix.
    pub(crate) fn members(&self) -> String {
        self.meta("members")
    }

    /// The id of the Redis server the generations were made on.
    pub(crate) fn run_id(&self) -> String {
        self.meta("run_id")
    }

    /// The key the checks at connect write and remove, for `member`.
    pub(crate) fn probe(&self, member: &str) -> String {
        self.meta(&format!("probe:{member}"))
    }
}

/// Escapes the Redis glob metacharacters `* ? [ ] \` in `text`, so that user
/// data can be placed into a [`CacheManager::delete_pattern`](crate::CacheManager::delete_pattern)
/// pattern and match only itself.
pub fn escape_glob(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_under_the_prefix_and_generations_match_their_glob() {
        let keys = Keyspace::new("app*:");
        let mut generations = Vec::new();
        keys.read_generations(Scope::Record("users", "7"), &mut generations);
        keys.written_generations(Scope::Model("users"), &mut generations);
        keys.read_generations(Scope::Tag("t"), &mut generations);
        assert_eq!(
            generations,
            [
                "app*:g:m:users",
                "app*:g:r:users:7",
                "app*:g:m:users",
                "app*:g:q:users",
                "app*:g:t:t"
            ]
        );
        assert_eq!(keys.generations_glob(), "app\\*:g:*");
        assert_eq!(keys.value_start("ns", "get"), "app*:v:ns:get:");
        assert_eq!(keys.value_lease("app*:v:ns:get:1"), "app*:lease:v:ns:get:1");
        assert_eq!(keys.lease("feed:db"), "app*:lease:feed:db");
        assert_eq!(keys.members(), "app*:meta:members");
        assert_eq!(keys.run_id(), "app*:meta:run_id");
        assert_eq!(keys.probe("m"), "app*:meta:probe:m");
    }

    #[test]
    fn a_clusters_meta_keys_share_one_hash_tag() {
        let keys = Keyspace::new("app:").clustered(true);
        assert_eq!(keys.members(), "app:meta:{app:}members");
        assert_eq!(keys.meta("feed"), "app:meta:{app:}feed");
        assert_eq!(keys.lease("feed:db"), "app:lease:feed:db", "leases spread over slots");
        let mut generations = Vec::new();
        keys.read_generations(Scope::Record("users", "7"), &mut generations);
        assert_eq!(generations, ["app:g:m:users", "app:g:r:users:7"]);
    }

    #[test]
    fn escapes_every_glob_metacharacter() {
        assert_eq!(escape_glob(r"a*b?c[d]e\f"), r"a\*b\?c\[d\]e\\f");
        assert_eq!(escape_glob("plain"), "plain");
    }
}
