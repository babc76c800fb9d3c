//! Stores without the compare-and-set script: a value is written with the
//! generation tokens its computation began under (in its envelope), so one
//! that a write made stale meanwhile is stored but never served (every
//! lookup compares those tokens with the current generations). What a
//! batch stores (`PlainStores`, one pipeline of plain `SET`s), and what a
//! single store does on a Redis Cluster, where a value and its generations
//! are out of one script's reach (`store_apart`). What this module alone
//! owns: how long the generations of such values are extended to live
//! (`extended_until`). The argument is in the crate docs, "No stale sets"
//! and "Redis Cluster".

use std::time::Duration;

use crate::codec;
use crate::config::expiry_ms;
use crate::generations::{create_generations, created, generation_ttl, Expected, Generations};
use crate::key::CacheKey;
use crate::lease::LeaseGuard;
use crate::stats::Event;
use crate::{CacheConfig, CacheError, CacheManager};

impl CacheManager {
    /// [`store`](Self::store) on a cluster, where a value and the
    /// generations it depends on are on different slots, out of one
    /// script's reach: the value is stored with the tokens it was computed
    /// under (as a batch stores, see [`PlainStores`]), so a value a write
    /// made stale meanwhile is stored but never served; then, once Redis
    /// has it, the generations are read again. The store counts as made
    /// (`true`) only if they are still those tokens: a token, once
    /// replaced, never comes back, so they were unchanged from before the
    /// computation until after the value was stored, as the script would
    /// have found them. That answer is what lets concurrent callers share
    /// the value (the `flight` module). Two round trips where the script
    /// takes one; the lease is given up beside the first.
    pub(crate) async fn store_apart(
        &self,
        key: &CacheKey,
        expected: Expected<'_>,
        stamped: (&[u8], u64),
        ttl: Duration,
        lease: Option<&mut LeaseGuard>,
        budget: &mut Duration,
    ) -> Result<bool, CacheError> {
        let tokens = match expected {
            Expected::Seen(tokens) => tokens.to_vec(),
            Expected::Any => self.current_generations(key, budget).await?,
        };
        let storable = tokens.len() == key.generations.len() && tokens.iter().all(Option::is_some);
        let give_up = async {
            if let Some(lease) = lease {
                lease.give_up().await;
            }
        };
        if !storable {
            give_up.await;
            self.count_store(key, false);
            return Ok(false);
        }
        let mut stores = PlainStores::new();
        let fresh = vec![false; tokens.len()];
        stores.add(self.config(), key, &tokens, &fresh, Duration::ZERO, stamped, ttl);
        let (sent, ()) = tokio::join!(stores.send(self, budget), give_up);
        sent?;
        let mut mget = redis::cmd("MGET");
        mget.arg(&key.generations);
        let now: Generations = self
            .connection()
            .call_within(budget, |mut conn| async move { mget.query_async(&mut conn).await })
            .await?;
        let current = now == tokens;
        self.count_store(key, current);
        Ok(current)
    }

    /// The tokens of `key`'s generations now, creating the absent ones.
    async fn current_generations(&self, key: &CacheKey, budget: &mut Duration) -> Result<Generations, CacheError> {
        let mut pipe = redis::pipe();
        let fresh = create_generations(&mut pipe, key.generations.iter().map(String::as_str), self.config());
        let found: Generations = self
            .connection()
            .call_within(budget, |mut conn| async move { pipe.query_async(&mut conn).await })
            .await
            .inspect_err(|err| self.refused(err))?;
        Ok(fresh
            .into_iter()
            .zip(found)
            .map(|(fresh, previous)| Some(created(fresh, previous)))
            .collect())
    }
}

/// Stores for a batch, without the compare-and-set: each value is written
/// with the tokens its computation began under (in its envelope), so that a
/// value a write made stale meanwhile is stored but never served (every
/// lookup compares those tokens with the current generations, and an
/// invalidation has replaced or removed one of them); it expires by its
/// TTL. One pipeline of plain `SET`s, and a `PEXPIREAT .. GT` for each
/// generation that might expire before a value depending on it (see
/// [`extended_until`]): for a hundred values, a small part of what the
/// script's hundreds of commands cost in Lua. Owns what it sends, so that
/// it can be sent after the caller has its values.
pub(crate) struct PlainStores {
    pipe: redis::Pipeline,
    /// Each generation to extend once, with the latest expiry (ms since
    /// the epoch) its values need.
    extend: std::collections::HashMap<String, u64>,
    /// The counters of each value's key, in order.
    named: Vec<crate::key::Named>,
}

impl PlainStores {
    pub(crate) fn new() -> Self {
        Self {
            pipe: redis::pipe(),
            extend: std::collections::HashMap::new(),
            named: Vec::new(),
        }
    }

    /// Adds the value of `key` (encoded: `payload`), computed under
    /// `tokens` (one per generation of the key, in order), to live `ttl`.
    /// `fresh` says, per generation, whether the lookup before the
    /// computation created it, `created_ago` ago (it then lives
    /// [`generation_ttl`] from then: it is left alone while that outlives
    /// the value by a minute); the others are extended to outlive the
    /// value. A value with an absent token is not added: it could never be
    /// served. `read_at`: when the payload's data was read (see
    /// `read_time.rs`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add(
        &mut self,
        config: &CacheConfig,
        key: &CacheKey,
        tokens: &[Option<Vec<u8>>],
        fresh: &[bool],
        created_ago: Duration,
        (payload, read_at): (&[u8], u64),
        ttl: Duration,
    ) {
        if tokens.len() != key.generations.len() || tokens.iter().any(Option::is_none) {
            return;
        }
        let header = codec::header(tokens.len(), read_at);
        let mut envelope = Vec::with_capacity(header.len() + tokens.len() * crate::token::TOKEN_LEN + payload.len());
        envelope.extend_from_slice(&header);
        for token in tokens.iter().flatten() {
            envelope.extend_from_slice(token);
        }
        envelope.extend_from_slice(payload);
        self.pipe
            .cmd("SET")
            .arg(&key.value)
            .arg(envelope)
            .arg("PX")
            .arg(expiry_ms(ttl))
            .ignore();
        let needed = expiry_ms(ttl);
        // A generation the lookup created lives `generation_ttl` from then:
        // a minute more than a value of the configured TTL stored at once.
        let created_outlives =
            expiry_ms(created_ago).saturating_add(needed).saturating_add(60_000) <= expiry_ms(generation_ttl(config));
        let until = extended_until(crate::book::now_ms(), needed);
        for (name, &fresh) in key.generations.iter().zip(fresh) {
            if fresh && created_outlives {
                continue;
            }
            let latest = self.extend.entry(name.clone()).or_default();
            *latest = (*latest).max(until);
        }
        self.named.push(key.named.clone());
    }

    /// Whether no value was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.named.is_empty()
    }

    /// Sends them all in one round trip, counting each value stored.
    pub(crate) async fn run(self, manager: &CacheManager, budget: &mut Duration) -> Result<(), CacheError> {
        for named in self.send(manager, budget).await? {
            manager.connection().counters.count(named.get(), Event::Set);
        }
        Ok(())
    }

    /// Sends them all in one round trip; returns the counters of each
    /// value's key, for the caller to count.
    async fn send(self, manager: &CacheManager, budget: &mut Duration) -> Result<Vec<crate::key::Named>, CacheError> {
        let Self {
            mut pipe,
            extend,
            named,
        } = self;
        for (name, until) in extend {
            pipe.cmd("PEXPIREAT").arg(name).arg(until).arg("GT").ignore();
        }
        manager
            .connection()
            .call_within(
                budget,
                |mut conn| async move { pipe.query_async::<()>(&mut conn).await },
            )
            .await
            .inspect_err(|err| manager.refused(err))?;
        Ok(named)
    }
}

/// The grid step of [`extended_until`].
const EXTENSION_STEP_MS: u64 = 120_000;

/// When a generation must expire at the earliest for a value stored `now_ms`
/// (ms since the epoch) to live `needed_ms`, rounded up to the next whole
/// step of a fixed grid and one step more: stores made within the same
/// two minutes ask for the same time, so `PEXPIREAT .. GT` changes a
/// generation at most once per step however often values depending on it
/// are stored. That matters beside in-process tiers: every change to a
/// generation key, its expiry included, is pushed to them, and drops every
/// value depending on it (a model's generation, for all its records). A
/// clock behind Redis's only shortens a generation's life: its values then
/// miss, they are never served stale (see the crate docs, "No stale sets").
fn extended_until(now_ms: i64, needed_ms: u64) -> u64 {
    let end = u64::try_from(now_ms).unwrap_or(0).saturating_add(needed_ms);
    (end / EXTENSION_STEP_MS)
        .saturating_add(2)
        .saturating_mul(EXTENSION_STEP_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_within_one_step_ask_for_one_expiry_that_outlives_each_value() {
        let minute = 60_000;
        let now = 1_800_000_000_000_i64;
        let first = extended_until(now, 5 * minute);
        for later in [1, 1_000, 30_000] {
            let at = now + later;
            let until = extended_until(at, 5 * minute);
            assert!(until >= u64::try_from(at).unwrap() + 5 * minute);
            // Same step of the grid: `GT` leaves the generation alone.
            if (u64::try_from(at).unwrap() + 5 * minute) / EXTENSION_STEP_MS
                == (u64::try_from(now).unwrap() + 5 * minute) / EXTENSION_STEP_MS
            {
                assert_eq!(until, first);
            }
        }
        assert!(first <= u64::try_from(now).unwrap() + 5 * minute + 2 * EXTENSION_STEP_MS);
        assert_eq!(
            extended_until(-5, 10),
            2 * EXTENSION_STEP_MS,
            "a clock before the epoch"
        );
    }
}
