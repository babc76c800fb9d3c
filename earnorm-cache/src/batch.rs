//! Cache-aside for many keys at once: one round trip to look them all up,
//! one computation for all the misses, one round trip to store them.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use serde::{de::DeserializeOwned, Serialize};
use tracing::debug;

use crate::codec::{self, Envelope};
use crate::generations::{create_generations, created, Generations, PlainStores};
use crate::key::CacheKey;
use crate::manager::bypassed;
use crate::stats::Event;
use crate::{CacheError, CacheManager};

/// Most keys one round trip of a batch looks up or stores: a batch of
/// thousands goes in several commands, each answered well within the
/// operation timeout (one command of 12,000 keys was not, which took a
/// healthy server for a dead one).
const CHUNK: usize = 500;

/// One chunk of a batch as its lookup left it: where each key's
/// generations are (in the chunk's list of generation keys, each once),
/// their tokens, which of its keys missed (positions in the chunk), and
/// whether their computations may be stored (their absent generations were
/// created).
struct Chunk {
    /// The position (in the whole batch) of the chunk's first key.
    base: usize,
    positions: Vec<Vec<usize>>,
    generations: Vec<Option<Vec<u8>>>,
    /// Each generation's time left to live (ms, `PTTL`), when read.
    lefts: Vec<i64>,
    missed: Vec<usize>,
    storable: bool,
}

impl CacheManager {
    /// The cache-aside call for many keys at once, with every guarantee of
    /// [`get_or_compute`](Self::get_or_compute) but single flight and
    /// leases: the current values of all `keys` are read in one round trip
    /// per 500 keys; `compute` gets the positions (in `keys`) of those that
    /// missed and returns their values in that order (a value it leaves out
    /// is `T::default()`); each value for which `ttl_of` gives a time to
    /// live is stored under the compare-and-set, in one more round trip per
    /// 500 keys. Returns one value per key, in the order of `keys`. Each
    /// chunk of 500 keys waits on Redis at most `operation_timeout` in all.
    ///
    /// Never fails because of the cache (a chunk whose lookup fails
    /// computes each of its keys); an error of `compute` is returned as it
    /// is, and nothing is stored.
    ///
    /// # Errors
    /// Those of `compute`.
    pub async fn get_many_or_compute<T, E, F, Fut>(
        &self,
        keys: &[CacheKey],
        ttl_of: impl Fn(&T) -> Option<Duration>,
        compute: F,
    ) -> Result<Vec<T>, E>
    where
        T: Serialize + DeserializeOwned + Default,
        F: FnOnce(Vec<usize>) -> Fut,
        Fut: Future<Output = Result<Vec<T>, E>>,
    {
        let conn = self.connection();
        if !conn.is_enabled() || bypassed() || keys.is_empty() {
            return fill(compute((0..keys.len()).collect()).await?, keys.len());
        }
        let mut values: Vec<Option<T>> = Vec::with_capacity(keys.len());
        let mut chunks = Vec::new();
        let mut missed = Vec::new();
        for (n, chunk_keys) in keys.chunks(CHUNK).enumerate() {
            let mut budget = conn.config.operation_timeout;
            let chunk = self.look_up(chunk_keys, &mut values, &mut budget).await;
            missed.extend(chunk.missed.iter().map(|&i| n * CHUNK + i));
            chunks.push((chunk, budget));
        }
        if missed.is_empty() {
            return Ok(values.into_iter().map(Option::unwrap_or_default).collect());
        }
        let mut computed = fill(compute(missed.clone()).await?, missed.len())?.into_iter();
        for ((chunk, mut budget), chunk_keys) in chunks.into_iter().zip(keys.chunks(CHUNK)) {
            let mine: Vec<T> = computed.by_ref().take(chunk.missed.len()).collect();
            if chunk.storable {
                self.store_many(chunk_keys, &chunk, &mine, &ttl_of, &mut budget).await;
            }
            for (&i, value) in chunk.missed.iter().zip(mine) {
                let at = chunk.base + i;
                values[at] = Some(value);
            }
        }
        Ok(values.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Looks `keys` up in one round trip, pushing onto `values` the hits
    /// (and `None` for each miss); then creates the absent generations
    /// their misses depend on.
    async fn look_up<T: DeserializeOwned>(
        &self,
        keys: &[CacheKey],
        values: &mut Vec<Option<T>>,
        budget: &mut Duration,
    ) -> Chunk {
        let conn = self.connection();
        let base = values.len();
        // The generation keys, each once, and where each key's are.
        let mut names: Vec<&str> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let positions: Vec<Vec<usize>> = keys
            .iter()
            .map(|key| {
                key.generations
                    .iter()
                    .map(|name| {
                        *index.entry(name.as_str()).or_insert_with(|| {
                            names.push(name.as_str());
                            names.len() - 1
                        })
                    })
                    .collect()
            })
            .collect();
        // One round trip: the values, and each generation read and, when
        // absent, created (`SET NX GET`), so that the misses can be computed
        // and stored at once. Where creating is refused (Redis out of memory,
        // say), the values and generations are read alone, and nothing is
        // stored.
        let mut lefts = Vec::new();
        let (read, storable) = match self.read_creating(keys, &names, budget).await {
            Ok((replies, read_lefts)) => {
                lefts = read_lefts;
                (Ok(replies), true)
            }
            Err(err)
                if *budget > Duration::ZERO && !matches!(err, CacheError::Timeout(_) | CacheError::Unavailable) =>
            {
                (self.read_only(keys, &names, budget).await, false)
            }
            Err(err) => (Err(err), false),
        };
        let mut replies = match read {
            Ok(replies) if replies.len() == keys.len() + names.len() => replies,
            _ => {
                for key in keys {
                    conn.counters.count(key.named.get(), Event::Fallback);
                }
                values.extend(keys.iter().map(|_| None));
                return Chunk {
                    base,
                    positions,
                    generations: Vec::new(),
                    lefts: Vec::new(),
                    missed: (0..keys.len()).collect(),
                    storable: false,
                };
            }
        };
        let generations: Vec<Option<Vec<u8>>> = replies.split_off(keys.len());
        let mut missed = Vec::new();
        let mut undecodable = Vec::new();
        for (i, (key, stored)) in keys.iter().zip(replies).enumerate() {
            let seen: Vec<Option<Vec<u8>>> = positions[i].iter().map(|&g| generations[g].clone()).collect();
            let hit = stored.and_then(|bytes| {
                let opened = Envelope::open(&bytes).and_then(|envelope| {
                    let current = envelope.is_current(&seen) && conn.serves(key);
                    Ok(if current {
                        Some(codec::decode::<T>(envelope.payload)?)
                    } else {
                        None
                    })
                });
                // As a lookup of one key does: a value that does not decode
                // is counted and removed.
                opened.unwrap_or_else(|err| {
                    undecodable.push((key, err));
                    None
                })
            });
            if hit.is_some() {
                conn.counters.count(key.named.get(), Event::Hit);
            } else {
                conn.counters.count(key.named.get(), Event::Miss);
                missed.push(i);
            }
            values.push(hit);
        }
        let undecodable: Vec<(&CacheKey, &CacheError)> = undecodable.iter().map(|(key, err)| (*key, err)).collect();
        self.discard_all(&undecodable, budget).await;
        Chunk {
            base,
            positions,
            generations,
            lefts,
            missed,
            storable,
        }
    }

    /// Reads the values of `keys` and the generations `names`, creating
    /// each absent generation with a fresh token (`SET NX GET`), and each
    /// generation's time left to live (`PTTL`), in one pipeline. Returns the
    /// values, then each generation's token; and the times left.
    async fn read_creating(
        &self,
        keys: &[CacheKey],
        names: &[&str],
        budget: &mut Duration,
    ) -> Result<(Vec<Option<Vec<u8>>>, Vec<i64>), CacheError> {
        let mut pipe = redis::pipe();
        let mut mget = redis::cmd("MGET");
        for key in keys {
            mget.arg(&key.value);
        }
        pipe.add_command(mget);
        let fresh = create_generations(&mut pipe, names.iter().copied(), self.config());
        for name in names {
            pipe.cmd("PTTL").arg(*name);
        }
        let replies: Vec<redis::Value> = self
            .connection()
            .call_within(budget, |mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let mut replies = replies.into_iter();
        let values = replies
            .next()
            .map(redis::from_redis_value::<Vec<Option<Vec<u8>>>>)
            .ok_or(CacheError::Unavailable)?
            .map_err(|err| CacheError::Redis(err.into()))?;
        let mut out = values;
        for (token, previous) in fresh.into_iter().zip(replies.by_ref()) {
            let previous =
                redis::from_redis_value::<Option<Vec<u8>>>(previous).map_err(|err| CacheError::Redis(err.into()))?;
            out.push(Some(created(token, previous)));
        }
        let lefts = replies
            .map(|left| redis::from_redis_value::<i64>(left).unwrap_or(-2))
            .collect();
        Ok((out, lefts))
    }

    /// Reads the values of `keys` and the generations `names` alone (one
    /// `MGET`).
    async fn read_only(
        &self,
        keys: &[CacheKey],
        names: &[&str],
        budget: &mut Duration,
    ) -> Result<Vec<Option<Vec<u8>>>, CacheError> {
        let mut cmd = redis::cmd("MGET");
        for key in keys {
            cmd.arg(&key.value);
        }
        cmd.arg(names);
        self.connection()
            .call_within(budget, |mut c| async move {
                cmd.query_async::<Vec<Option<Vec<u8>>>>(&mut c).await
            })
            .await
    }

    /// Stores the computed values of a chunk's misses, each with the tokens
    /// its computation began under, all in one pipeline (see
    /// `PlainStores`: a value a write made stale meanwhile is never served).
    async fn store_many<T: Serialize>(
        &self,
        keys: &[CacheKey],
        chunk: &Chunk,
        computed: &[T],
        ttl_of: &impl Fn(&T) -> Option<Duration>,
        budget: &mut Duration,
    ) {
        let Chunk {
            positions,
            generations,
            lefts,
            missed,
            ..
        } = chunk;
        let mut stores = PlainStores::new();
        for (&i, value) in missed.iter().zip(computed) {
            let Some(ttl) = ttl_of(value) else { continue };
            let payload = match codec::encode(value) {
                Ok(payload) => payload,
                Err(err) => {
                    debug!(key = keys[i].as_str(), error = %err, "value not cached: it does not encode");
                    continue;
                }
            };
            let seen: Generations = positions[i].iter().map(|&g| generations[g].clone()).collect();
            let lefts: Vec<i64> = positions[i]
                .iter()
                .map(|&g| lefts.get(g).copied().unwrap_or(-2))
                .collect();
            stores.add(self.config(), &keys[i], &seen, &lefts, &payload, ttl);
        }
        if !stores.is_empty() {
            // A refusal is counted by `run`; the values are returned all the same.
            let _ = stores.run(self, budget).await;
        }
    }
}

/// `values`, as exactly `n` of them (the missing ones by default).
fn fill<T: Default, E>(mut values: Vec<T>, n: usize) -> Result<Vec<T>, E> {
    values.truncate(n);
    values.resize_with(n, T::default);
    Ok(values)
}
