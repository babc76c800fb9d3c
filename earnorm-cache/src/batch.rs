//! Cache-aside for many keys at once: the in-process tier first (when it is
//! on), one round trip to look the rest up in Redis, one computation for
//! all the misses, and one round trip to store them.
//!
//! **The in-process tier beside Redis.** A batch keeps what it computes and
//! what it finds in Redis, fenced like a single call. Creating a record's
//! generation (the lookup of a record whose value is gone does) and
//! extending one are changes Redis pushes to every tier, this process's
//! included, and the push drops what depends on the generation: so the
//! values of records a batch had to read from the database are usually kept
//! only from the next read, which finds them in Redis.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use serde::{de::DeserializeOwned, Serialize};
use tracing::debug;

use crate::aside::{keep_in_process, kept_as, kept_for};
use crate::codec::{self, Envelope, PlainOutput};
use crate::generations::{create_generations, created, Generations};
use crate::key::CacheKey;
use crate::local::Noted;
use crate::manager::bypassed;
use crate::plain::PlainStores;
use crate::stats::Event;
use crate::{CacheError, CacheManager};

/// Most keys one round trip of a batch looks up or stores: a batch of
/// thousands goes in several commands, each answered well within the
/// operation timeout (one command of 12,000 keys was not, which took a
/// healthy server for a dead one).
const CHUNK: usize = 500;

/// One chunk of a batch as its lookup left it.
struct Chunk {
    /// The position (in the whole batch) of each key looked up.
    at: Vec<usize>,
    /// Each key's generation tokens, in its order, as read (or known in
    /// process) before the computation.
    tokens: Vec<Generations>,
    /// Per key and generation: whether the lookup created it.
    fresh: Vec<Vec<bool>>,
    /// Which keys missed: indexes into `at`.
    missed: Vec<usize>,
    /// Whether the misses' computations may be stored (every absent
    /// generation they depend on was created).
    storable: bool,
    /// When the lookup was sent (the generations it created live from then).
    looked_up: Instant,
}

impl CacheManager {
    /// The cache-aside call for many keys at once, with every guarantee of
    /// [`get_or_compute`](Self::get_or_compute) but single flight and
    /// leases. Keys the in-process tier holds are served from it; the
    /// current values of the others are read in one round trip per 500
    /// keys; `compute` gets the positions (in `keys`) of those that missed
    /// and returns their values in that order (a value it leaves out is
    /// `T::default()`); each value for which `ttl_of` gives a time to live
    /// is kept in process (when the tier is on) and stored in Redis with the
    /// generations its computation began under, in one more round trip per
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
        T: Serialize + DeserializeOwned + Default + 'static,
        F: FnOnce(Vec<usize>) -> Fut,
        Fut: Future<Output = Result<Vec<T>, E>>,
    {
        self.get_many_or_compute_refreshed(keys, ttl_of, None, compute).await
    }

    /// [`get_many_or_compute`](Self::get_many_or_compute) of keys that
    /// single calls refresh ahead in their last `refresh` (see
    /// [`get_or_compute_refreshed`](Self::get_or_compute_refreshed)): the
    /// batch itself refreshes nothing, but keeps its values in process only
    /// until their refresh window opens, so that it never hides the window
    /// from those calls.
    ///
    /// # Errors
    /// Those of `compute`.
    pub async fn get_many_or_compute_refreshed<T, E, F, Fut>(
        &self,
        keys: &[CacheKey],
        ttl_of: impl Fn(&T) -> Option<Duration>,
        refresh: Option<Duration>,
        compute: F,
    ) -> Result<Vec<T>, E>
    where
        T: Serialize + DeserializeOwned + Default + 'static,
        F: FnOnce(Vec<usize>) -> Fut,
        Fut: Future<Output = Result<Vec<T>, E>>,
    {
        let conn = self.connection();
        if !self.caches() || bypassed() || keys.is_empty() {
            return fill(compute((0..keys.len()).collect()).await?, keys.len());
        }
        let mut values: Vec<Option<T>> = Vec::with_capacity(keys.len());
        // In process first; every other key notes its stripes before it is
        // looked up (the fence of `crate::local`).
        let mut noted: Vec<Option<Noted>> = Vec::with_capacity(keys.len());
        let mut pending = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let local = self.local_for(key);
            let hit = local
                .and_then(|local| self.local_hit_by::<T, PlainOutput>(local, key.local, key.keeper.0, true))
                .map(|(value, _)| value);
            if hit.is_none() {
                pending.push(i);
            }
            noted.push(local.filter(|_| hit.is_none()).map(|local| local.note(key)));
            values.push(hit);
        }
        if pending.is_empty() {
            return Ok(values.into_iter().map(Option::unwrap_or_default).collect());
        }
        if !conn.is_enabled() {
            // The embedded mode: the tier alone.
            for &i in &pending {
                conn.counters.count(keys[i].named.get(), Event::Miss);
            }
            let computed = fill(compute(pending.clone()).await?, pending.len())?;
            for (&i, value) in pending.iter().zip(computed) {
                if let (Some(local), Some(noted)) = (self.local_for(&keys[i]), noted[i].take()) {
                    keep_in_process::<T, PlainOutput>(local, &keys[i], noted, &value, &ttl_of, refresh);
                }
                values[i] = Some(value);
            }
            return Ok(values.into_iter().map(Option::unwrap_or_default).collect());
        }
        let mut chunks = Vec::new();
        let mut missed = Vec::new();
        for at in pending.chunks(CHUNK) {
            let mut budget = conn.config.operation_timeout;
            let chunk = self
                .look_up(
                    keys,
                    at.to_vec(),
                    &mut noted,
                    &mut values,
                    (&ttl_of, refresh),
                    &mut budget,
                )
                .await;
            missed.extend(chunk.missed.iter().map(|&m| chunk.at[m]));
            chunks.push((chunk, budget));
        }
        if missed.is_empty() {
            return Ok(values.into_iter().map(Option::unwrap_or_default).collect());
        }
        let (computed, read_at) = crate::read_time::timed(compute(missed)).await;
        let mut computed = fill(computed?, chunks.iter().map(|(c, _)| c.missed.len()).sum())?.into_iter();
        for (chunk, mut budget) in chunks {
            let mut stores = PlainStores::new();
            for (&m, value) in chunk.missed.iter().zip(computed.by_ref()) {
                let i = chunk.at[m];
                if chunk.storable {
                    let noted = noted[i].take();
                    let stamped = (&value, read_at);
                    self.add_store(&mut stores, &keys[i], &chunk, m, noted, stamped, (&ttl_of, refresh));
                }
                values[i] = Some(value);
            }
            if !stores.is_empty() {
                // A refusal is counted by `run`; the values are returned all the same.
                let _ = stores.run(self, &mut budget).await;
            }
        }
        Ok(values.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Adds the value computed for the `m`-th key of `chunk` (`key`) to
    /// `stores`, and keeps it in process under `noted` when the tier is on
    /// (see [`kept_for`] on how long, with `refresh`).
    #[allow(clippy::too_many_arguments)]
    fn add_store<T: Serialize + DeserializeOwned + 'static>(
        &self,
        stores: &mut PlainStores,
        key: &CacheKey,
        chunk: &Chunk,
        m: usize,
        noted: Option<Noted>,
        (value, read_at): (&T, u64),
        (ttl_of, refresh): (&impl Fn(&T) -> Option<Duration>, Option<Duration>),
    ) {
        let Some(ttl) = ttl_of(value) else { return };
        let payload = match codec::encode(value) {
            Ok(payload) => payload,
            Err(err) => {
                debug!(key = key.as_str(), error = %err, "value not cached: it does not encode");
                return;
            }
        };
        let (tokens, fresh) = (&chunk.tokens[m], &chunk.fresh[m]);
        stores.add(
            self.config(),
            key,
            tokens,
            fresh,
            chunk.looked_up.elapsed(),
            (&payload, read_at),
            ttl,
        );
        if let Some(monitor) = &self.inner.monitor {
            monitor.stored(key);
        }
        let kept_ttl = kept_for(Some(ttl), None, refresh);
        if let (Some(local), Some(noted), Some(kept_ttl)) = (self.local_for(key), noted, kept_ttl) {
            if let Some(kept) = kept_as::<T, PlainOutput>(key, value, Some(&payload)) {
                local.keep(key, noted, kept, kept_ttl);
            }
        }
    }

    /// Looks the keys at positions `at` up in one round trip, setting the
    /// hits in `values`; creates, in the same round trip, the absent
    /// generations their misses depend on. A key whose generations are all
    /// known in process (beside Redis, with the tier subscribed) reads its
    /// value alone; the tokens read for the others are learned. A hit that
    /// may be kept in process is kept there under what was `noted` for it,
    /// no longer than Redis keeps it (its `PTTL`, read in the same round
    /// trip).
    async fn look_up<T: Serialize + DeserializeOwned + 'static>(
        &self,
        keys: &[CacheKey],
        at: Vec<usize>,
        noted: &mut [Option<Noted>],
        values: &mut [Option<T>],
        (ttl_of, refresh): (&impl Fn(&T) -> Option<Duration>, Option<Duration>),
        budget: &mut Duration,
    ) -> Chunk {
        let looked_up = Instant::now();
        let conn = self.connection();
        // Each key's tokens when known; the other generation keys, each
        // once, and where each key's are.
        let mut names: Vec<&str> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut known: Vec<Option<Generations>> = Vec::with_capacity(at.len());
        let mut positions: Vec<Vec<usize>> = Vec::with_capacity(at.len());
        for &i in &at {
            let key = &keys[i];
            let tokens = self.local_for(key).and_then(|local| local.known(key));
            positions.push(if tokens.is_some() {
                Vec::new()
            } else {
                key.generations
                    .iter()
                    .map(|name| {
                        *index.entry(name.as_str()).or_insert_with(|| {
                            names.push(name.as_str());
                            names.len() - 1
                        })
                    })
                    .collect()
            });
            known.push(tokens);
        }
        // Where creating is refused (Redis out of memory, say), the values
        // and generations are read alone, and nothing is stored.
        let value_keys: Vec<&str> = at.iter().map(|&i| keys[i].value.as_str()).collect();
        let kept_here: Vec<bool> = at.iter().map(|&i| noted[i].is_some()).collect();
        let (read, storable) = match self.read_creating(&value_keys, &kept_here, &names, budget).await {
            Ok(read) => (Ok(read), true),
            Err(err)
                if *budget > Duration::ZERO && !matches!(err, CacheError::Timeout(_) | CacheError::Unavailable) =>
            {
                (self.read_only(&value_keys, &names, budget).await, false)
            }
            Err(err) => (Err(err), false),
        };
        let Ok(Read {
            values: stored,
            generations,
            created: created_here,
            lefts,
        }) = read
        else {
            for &i in &at {
                conn.counters.count(keys[i].named.get(), Event::Fallback);
            }
            return Chunk {
                missed: (0..at.len()).collect(),
                tokens: vec![Vec::new(); at.len()],
                fresh: vec![Vec::new(); at.len()],
                at,
                storable: false,
                looked_up,
            };
        };
        let mut chunk = Chunk {
            at: Vec::new(),
            tokens: Vec::with_capacity(at.len()),
            fresh: Vec::with_capacity(at.len()),
            missed: Vec::new(),
            storable,
            looked_up,
        };
        let mut undecodable = Vec::new();
        for (m, ((&i, stored), (known, positions))) in
            at.iter().zip(stored).zip(known.into_iter().zip(positions)).enumerate()
        {
            let key = &keys[i];
            let (tokens, fresh) = match known {
                Some(tokens) => {
                    let fresh = vec![false; tokens.len()];
                    (tokens, fresh)
                }
                None => {
                    let tokens: Generations = positions.iter().map(|&g| generations[g].clone()).collect();
                    if let (Some(local), Some(noted)) = (self.local_for(key), &noted[i]) {
                        local.learn(key, noted, &tokens);
                    }
                    (tokens, positions.iter().map(|&g| created_here[g]).collect())
                }
            };
            let left = lefts.get(m).copied().flatten();
            let hit = stored.and_then(|bytes| {
                let opened = Envelope::open(&bytes).and_then(|envelope| {
                    if !(envelope.is_current(&tokens) && conn.serves(key)) {
                        return Ok(None);
                    }
                    let value = codec::decode::<T>(envelope.payload)?;
                    let kept_ttl = left.and_then(|left| kept_for(ttl_of(&value), Some(left), refresh));
                    if let (Some(local), Some(kept_ttl)) = (self.local_for(key), kept_ttl) {
                        if let (Some(noted), Some(kept)) = (
                            noted[i].take(),
                            kept_as::<T, PlainOutput>(key, &value, Some(envelope.payload)),
                        ) {
                            local.keep(key, noted, kept, kept_ttl);
                        }
                    }
                    Ok(Some(value))
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
                chunk.missed.push(m);
            }
            values[i] = hit;
            chunk.tokens.push(tokens);
            chunk.fresh.push(fresh);
        }
        chunk.at = at;
        let undecodable: Vec<(&CacheKey, &CacheError)> = undecodable.iter().map(|(key, err)| (*key, err)).collect();
        self.discard_all(&undecodable, budget).await;
        chunk
    }

    /// Reads the values at `value_keys` and the generations `names`,
    /// creating each absent generation with a fresh token (`SET NX GET`),
    /// and the time left to live of each value that `left_of` asks for
    /// (`PTTL`), in one pipeline.
    async fn read_creating(
        &self,
        value_keys: &[&str],
        left_of: &[bool],
        names: &[&str],
        budget: &mut Duration,
    ) -> Result<Read, CacheError> {
        let mut pipe = redis::pipe();
        pipe.cmd("MGET").arg(value_keys);
        let fresh = create_generations(&mut pipe, names.iter().copied(), self.config());
        let asked: Vec<usize> = (0..value_keys.len())
            .filter(|&m| left_of.get(m) == Some(&true))
            .collect();
        for &m in &asked {
            pipe.cmd("PTTL").arg(value_keys[m]);
        }
        let replies: Vec<redis::Value> = self
            .connection()
            .call_within(budget, |mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        if replies.len() != 1 + fresh.len() + asked.len() {
            return Err(CacheError::Unavailable);
        }
        let redis_err = |err: redis::ParsingError| CacheError::Redis(err.into());
        let mut replies = replies.into_iter();
        let values = replies
            .next()
            .map(redis::from_redis_value::<Vec<Option<Vec<u8>>>>)
            .ok_or(CacheError::Unavailable)?
            .map_err(redis_err)?;
        if values.len() != value_keys.len() {
            return Err(CacheError::Unavailable);
        }
        let mut generations = Vec::with_capacity(names.len());
        let mut created_here = Vec::with_capacity(names.len());
        for (token, previous) in fresh.into_iter().zip(replies.by_ref()) {
            let previous = redis::from_redis_value::<Option<Vec<u8>>>(previous).map_err(redis_err)?;
            created_here.push(previous.is_none());
            generations.push(Some(created(token, previous)));
        }
        let mut lefts = vec![None; value_keys.len()];
        for (m, left) in asked.into_iter().zip(replies) {
            lefts[m] = redis::from_redis_value::<i64>(left)
                .ok()
                .and_then(|ms| u64::try_from(ms).ok())
                .map(Duration::from_millis);
        }
        Ok(Read {
            values,
            generations,
            created: created_here,
            lefts,
        })
    }

    /// Reads the values at `value_keys` and the generations `names` alone
    /// (one `MGET`); nothing is created.
    async fn read_only(&self, value_keys: &[&str], names: &[&str], budget: &mut Duration) -> Result<Read, CacheError> {
        let mut cmd = redis::cmd("MGET");
        cmd.arg(value_keys).arg(names);
        let mut values = self
            .connection()
            .call_within(budget, |mut c| async move {
                cmd.query_async::<Vec<Option<Vec<u8>>>>(&mut c).await
            })
            .await?;
        if values.len() != value_keys.len() + names.len() {
            return Err(CacheError::Unavailable);
        }
        let generations = values.split_off(value_keys.len());
        Ok(Read {
            values,
            generations,
            created: vec![false; names.len()],
            lefts: Vec::new(),
        })
    }
}

/// What a batch lookup read.
struct Read {
    /// The value of each key (`None`: absent).
    values: Vec<Option<Vec<u8>>>,
    /// Each generation's token.
    generations: Generations,
    /// Per generation: whether the lookup created it.
    created: Vec<bool>,
    /// Per key, when asked: the value's time left to live.
    lefts: Vec<Option<Duration>>,
}

/// `values`, as exactly `n` of them (the missing ones by default).
fn fill<T: Default, E>(mut values: Vec<T>, n: usize) -> Result<Vec<T>, E> {
    values.truncate(n);
    values.resize_with(n, T::default);
    Ok(values)
}
