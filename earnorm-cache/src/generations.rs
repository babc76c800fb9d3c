//! Generations and the compare-and-set: how a value is looked up with the
//! generations it depends on (one round trip), how the generations a
//! computation needs are created before it starts, and how its value is
//! stored only if none of them changed meanwhile. What this module alone
//! owns: the store script, the generations' lifetime, and what a lookup
//! does with a value that does not decode (counted and removed, for one key
//! and for a batch alike). The argument that no stale value is ever stored
//! is in the crate docs, "No stale sets".

use std::sync::OnceLock;
use std::time::Duration;

use redis::Script;
use tracing::{debug, trace};

use crate::codec::{self, Envelope};
use crate::config::expiry_ms;
use crate::key::CacheKey;
use crate::lease::{lease_ttl, Lease, LeaseGuard};
use crate::stats::{Counters, Event};
use crate::token::new_token;
use crate::{CacheConfig, CacheError, CacheManager};

/// The compare-and-set, for one value or many: each value is stored only if
/// every generation it depends on is still the one seen before its
/// computation started (see the crate docs, "No stale sets"). The single
/// path stores through it; a batch stores plain values that carry their
/// tokens (`PlainStores`).
///
/// Declared with a shebang (no flags), so that Redis refuses it up front when
/// it is out of memory, instead of letting its writes through.
///
/// KEYS: the lease of the key stored, when ARGV[1] is not empty; then, for
/// each value in order, its key and its `n` generation keys.
/// ARGV[1]: the lease's holder, or '' (the lease is given up whether the
/// value is stored or not); ARGV[2]: a fresh token, for generations created
/// here; then, for each value, `n`, its TTL (ms), its generations' TTL (ms),
/// its envelope header, its payload, and the `n` tokens its computation
/// began under, each '*' to accept the current one (creating it if absent).
/// An absent generation never matches an expected token. A generation many
/// values share is read once, and extended once, only when it would expire
/// before one of the values stored: a change to a generation key (its
/// expiry included) is pushed to every in-process tier beside Redis, which
/// then drops every value depending on it (a model's generation, for a
/// record's value). Returns 1 or 0 per value.
const STORE_SCRIPT: &str = r"#!lua
local k, a = 1, 3
if ARGV[1] ~= '' then
  if redis.call('GET', KEYS[1]) == ARGV[1] then
    redis.call('DEL', KEYS[1])
  end
  k = 2
end
local seen = {}
local extend = {}
local need = {}
local stored = {}
while a <= #ARGV do
  local n = tonumber(ARGV[a])
  local ttl = tonumber(ARGV[a + 2])
  local current = true
  for i = 1, n do
    local name = KEYS[k + i]
    if seen[name] == nil then
      seen[name] = redis.call('GET', name)
    end
    local expected = ARGV[a + 4 + i]
    if expected ~= '*' and seen[name] ~= expected then
      current = false
      break
    end
  end
  if current then
    local tokens = {}
    for i = 1, n do
      local name = KEYS[k + i]
      if not seen[name] then
        seen[name] = ARGV[2]
        redis.call('SET', name, ARGV[2], 'PX', ttl)
      end
      tokens[i] = seen[name]
      if (extend[name] or 0) < ttl then
        extend[name] = ttl
      end
      if (need[name] or 0) < tonumber(ARGV[a + 1]) then
        need[name] = tonumber(ARGV[a + 1])
      end
    end
    redis.call('SET', KEYS[k], ARGV[a + 3] .. table.concat(tokens) .. ARGV[a + 4], 'PX', ARGV[a + 1])
    stored[#stored + 1] = 1
  else
    stored[#stored + 1] = 0
  end
  k = k + 1 + n
  a = a + 5 + n
end
for name, ttl in pairs(extend) do
  local left = redis.call('PTTL', name)
  if left >= 0 and left < need[name] then
    redis.call('PEXPIRE', name, ttl, 'GT')
  end
end
return stored
";

fn store_script() -> &'static Script {
    static SCRIPT: OnceLock<Script> = OnceLock::new();
    SCRIPT.get_or_init(|| Script::new(STORE_SCRIPT))
}

/// The generation tokens a lookup saw, in the key's order (`None`: absent).
pub(crate) type Generations = Vec<Option<Vec<u8>>>;

/// The result of reading a key and its generations in one round trip.
pub(crate) enum Lookup {
    /// A current value, and the generations seen (for replacing it if it
    /// does not decode).
    Hit(Vec<u8>, Vec<Option<Vec<u8>>>),
    /// Nothing current; the generations seen, for the later store.
    Miss(Vec<Option<Vec<u8>>>),
    Unavailable,
}

/// The generations a store expects to find.
pub(crate) enum Expected<'a> {
    /// Exactly these (`None`: absent), as seen before the computation.
    Seen(&'a [Option<Vec<u8>>]),
    /// Whatever is there now.
    Any,
}

impl CacheManager {
    /// Decodes a hit, counting it; a value that does not decode is removed.
    pub(crate) async fn open_hit<R>(
        &self,
        key: &CacheKey,
        bytes: &[u8],
        decode: fn(&[u8]) -> Result<R, CacheError>,
        budget: &mut Duration,
    ) -> Option<R> {
        match Envelope::open(bytes).and_then(|env| decode(env.payload)) {
            Ok(value) => {
                self.connection().counters.count(key.named.get(), Event::Hit);
                trace!(key = key.as_str(), "cache hit");
                Some(value)
            }
            Err(err) => {
                self.discard(key, &err, budget).await;
                None
            }
        }
    }

    /// Before computing: creates the absent generations among
    /// `generations` (`SET NX GET`) and, when `wants_lease`, asks for the
    /// key's lease, in one round trip (none when there is nothing to do).
    /// Returns the generations to store under (`None`: the cache could not
    /// be prepared, compute without storing) and the lease.
    pub(crate) async fn prepare(
        &self,
        key: &CacheKey,
        generations: Option<Generations>,
        wants_lease: bool,
        budget: &mut Duration,
    ) -> (Option<Generations>, Lease) {
        let Some(mut generations) = generations else {
            return (None, Lease::None);
        };
        let absent = generations.iter().any(Option::is_none);
        if !absent && !wants_lease {
            return (Some(generations), Lease::None);
        }
        let conn = self.connection();
        let mut pipe = redis::pipe();
        let absent = key.generations.iter().zip(generations.iter());
        let fresh = create_generations(
            &mut pipe,
            absent
                .filter(|(_, token)| token.is_none())
                .map(|(name, _)| name.as_str()),
            &conn.config,
        );
        let holder = wants_lease.then(new_token);
        let lease_key = holder.as_ref().map(|_| self.lease_key(key));
        if let (Some(holder), Some(lease_key)) = (&holder, &lease_key) {
            set_if_absent(&mut pipe, lease_key, holder, expiry_ms(lease_ttl(&conn.config)));
        }
        let answers: Vec<Option<Vec<u8>>> = match conn
            .call_within(budget, |mut c| async move {
                pipe.query_async::<Vec<Option<Vec<u8>>>>(&mut c).await
            })
            .await
        {
            Ok(answers) if answers.len() == fresh.len() + usize::from(holder.is_some()) => answers,
            Ok(_) => return (None, Lease::None),
            // Out of memory under `noeviction`, for one: nothing could
            // be stored either.
            Err(err) => {
                self.refused(&err);
                return (None, Lease::None);
            }
        };
        let mut answers = answers.into_iter();
        let mut fresh = fresh.into_iter();
        for token in generations.iter_mut().filter(|t| t.is_none()) {
            let (Some(new), Some(previous)) = (fresh.next(), answers.next()) else {
                return (None, Lease::None);
            };
            *token = Some(created(new, previous));
        }
        let lease = match (holder, lease_key, answers.next()) {
            // Nobody held it: it is ours now.
            (Some(holder), Some(lease_key), Some(None)) => Lease::Held(self.hold(lease_key, holder)),
            (Some(_), Some(_), Some(Some(_))) => Lease::Busy,
            _ => Lease::None,
        };
        (Some(generations), lease)
    }

    /// Reads the value and its generations in one `MGET`, with `extra`
    /// (a lease) when given, and the value's time left to live (`PTTL`, in
    /// the same round trip) when `want_ttl`. Also says whether `extra`
    /// exists. Beside Redis with the in-process tier subscribed, when every
    /// generation's token is known in process, reads the value alone and
    /// checks it against them (see `lookup_known`); the tokens it reads
    /// are learned.
    pub(crate) async fn lookup(
        &self,
        key: &CacheKey,
        extra: Option<&str>,
        want_ttl: bool,
        budget: &mut Duration,
    ) -> (Lookup, bool, Option<Duration>) {
        let local = self.local_for(key);
        // With a master of a cluster down, the generations are read: a read
        // that needs that master must fail, not be served on known tokens.
        if let (Some(local), None, false) = (local, extra, self.connection().has_master_down()) {
            if let Some(known) = local.known(key) {
                let (lookup, left) = self.lookup_known(key, known, want_ttl, budget).await;
                return (lookup, false, left);
            }
        }
        let noted = local.map(|local| local.note(key));
        let (lookup, extra, left) = self.lookup_all(key, extra, want_ttl, budget).await;
        if let (Some(local), Some(noted), Lookup::Hit(_, tokens) | Lookup::Miss(tokens)) = (local, &noted, &lookup) {
            local.learn(key, noted, tokens);
        }
        (lookup, extra, left)
    }

    /// A lookup of the value alone (`GET`, and `PTTL` when `want_ttl`), its
    /// envelope checked against the generation tokens `known` in process.
    /// Those are current but for invalidations whose pushes are still on
    /// their way: the in-process tier's own window, and only where it is on.
    async fn lookup_known(
        &self,
        key: &CacheKey,
        known: Generations,
        want_ttl: bool,
        budget: &mut Duration,
    ) -> (Lookup, Option<Duration>) {
        let read = self
            .connection()
            .call_within(budget, |mut conn| async move {
                if want_ttl {
                    let mut pipe = redis::pipe();
                    pipe.cmd("GET").arg(&key.value).cmd("PTTL").arg(&key.value);
                    pipe.query_async::<(Option<Vec<u8>>, i64)>(&mut conn)
                        .await
                        .map(|(value, left)| (value, Some(left)))
                } else {
                    redis::cmd("GET")
                        .arg(&key.value)
                        .query_async::<Option<Vec<u8>>>(&mut conn)
                        .await
                        .map(|value| (value, None))
                }
            })
            .await;
        let Ok((value, left)) = read else {
            return (Lookup::Unavailable, None);
        };
        (self.judge(key, value, known, budget).await, time_left(left))
    }

    /// What a stored value read with the generation `tokens` it must match
    /// gives: a hit when it is current and this manager serves, else a miss
    /// (a value that does not decode is removed).
    async fn judge(
        &self,
        key: &CacheKey,
        value: Option<Vec<u8>>,
        tokens: Generations,
        budget: &mut Duration,
    ) -> Lookup {
        let Some(bytes) = value else {
            return Lookup::Miss(tokens);
        };
        match Envelope::open(&bytes) {
            // During a quarantine, current values are not served.
            Ok(env) if env.is_current(&tokens) && self.connection().serves(key) => Lookup::Hit(bytes, tokens),
            // Superseded by a write: ignored, it expires by its TTL.
            Ok(_) => Lookup::Miss(tokens),
            Err(err) => {
                self.discard(key, &err, budget).await;
                Lookup::Miss(tokens)
            }
        }
    }

    /// [`lookup`](Self::lookup) of the value and every generation (`MGET`).
    async fn lookup_all(
        &self,
        key: &CacheKey,
        extra: Option<&str>,
        want_ttl: bool,
        budget: &mut Duration,
    ) -> (Lookup, bool, Option<Duration>) {
        let mut mget = redis::cmd("MGET");
        mget.arg(&key.value).arg(&key.generations);
        if let Some(extra) = extra {
            mget.arg(extra);
        }
        let expected = 1 + key.generations.len() + usize::from(extra.is_some());
        let read = self
            .connection()
            .call_within(budget, |mut conn| async move {
                if want_ttl {
                    let mut pipe = redis::pipe();
                    pipe.add_command(mget).cmd("PTTL").arg(&key.value);
                    pipe.query_async::<(Vec<Option<Vec<u8>>>, i64)>(&mut conn)
                        .await
                        .map(|(values, left)| (values, Some(left)))
                } else {
                    // The hot path: one plain command.
                    mget.query_async::<Vec<Option<Vec<u8>>>>(&mut conn)
                        .await
                        .map(|values| (values, None))
                }
            })
            .await;
        match read {
            Ok((mut values, left)) if values.len() == expected => {
                let extra = if extra.is_some() {
                    values.pop().flatten().is_some()
                } else {
                    false
                };
                let value = values.remove(0);
                (self.judge(key, value, values, budget).await, extra, time_left(left))
            }
            Ok(_) | Err(_) => (Lookup::Unavailable, false, None),
        }
    }

    /// Reports a store that Redis refused with an error (out of memory, no
    /// permission, an unsupported command); timeouts and lost connections
    /// are not refusals. Errors with codes the client does not know, such
    /// as `OOM`, come as `Extension` (inside a pipeline, always).
    pub(crate) fn refused(&self, err: &CacheError) {
        if matches!(err, CacheError::Redis(e) if matches!(e.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) | redis::ErrorKind::Extension) || e.code().is_some())
        {
            self.connection().store_refused(err);
        }
    }

    /// Removes a value that does not decode, counting it.
    pub(crate) async fn discard(&self, key: &CacheKey, err: &CacheError, budget: &mut Duration) {
        self.discard_all(&[(key, err)], budget).await;
    }

    /// Counts the cached values of `undecodable` that did not decode (each
    /// with its error) and removes them, in one round trip: what a lookup,
    /// of one key or of a batch, does with such a value.
    pub(crate) async fn discard_all(&self, undecodable: &[(&CacheKey, &CacheError)], budget: &mut Duration) {
        if undecodable.is_empty() {
            return;
        }
        let mut cmd = redis::cmd("UNLINK");
        for (key, err) in undecodable {
            Counters::bump(
                &self.connection().counters.decode_errors,
                "earnorm_cache_decode_errors_total",
            );
            debug!(key = key.as_str(), error = %err, "removing a cached value that does not decode");
            cmd.arg(&key.value);
        }
        let _ = self
            .connection()
            .call_within(
                budget,
                |mut conn| async move { cmd.query_async::<u64>(&mut conn).await },
            )
            .await;
    }

    /// Stores through the compare-and-set script, giving `lease` up in the
    /// same call. `payload` was read at `read_at` (see `read_time.rs`).
    pub(crate) async fn store(
        &self,
        key: &CacheKey,
        expected: Expected<'_>,
        (payload, read_at): (&[u8], u64),
        ttl: Duration,
        lease: Option<&mut LeaseGuard>,
        budget: &mut Duration,
    ) -> Result<bool, CacheError> {
        if self.connection().is_cluster() {
            return self
                .store_apart(key, expected, (payload, read_at), ttl, lease, budget)
                .await;
        }
        let mut call = StoreCall::new(lease.as_deref());
        call.add(self.config(), key, expected, (payload, read_at), ttl);
        let stored = self.run_store(call, budget).await?;
        if let Some(lease) = lease {
            lease.settle();
        }
        Ok(stored.first() == Some(&true))
    }

    /// Runs the compare-and-set of `call`, counting each value's answer;
    /// says, in the order values were added, which were stored.
    pub(crate) async fn run_store(&self, call: StoreCall<'_>, budget: &mut Duration) -> Result<Vec<bool>, CacheError> {
        let StoreCall { invocation, keys } = call;
        let answers: Vec<i64> = self
            .connection()
            .call_within(
                budget,
                |mut conn| async move { invocation.invoke_async(&mut conn).await },
            )
            .await
            .inspect_err(|err| self.refused(err))?;
        Ok(keys
            .into_iter()
            .zip(answers)
            .map(|(key, answer)| {
                self.count_store(key, answer == 1);
                answer == 1
            })
            .collect())
    }

    /// Counts the answer of the compare-and-set for `key`.
    pub(crate) fn count_store(&self, key: &CacheKey, stored: bool) {
        let counters = &self.connection().counters;
        if stored {
            if let Some(monitor) = &self.inner.monitor {
                monitor.stored(key);
            }
            counters.count(key.named.get(), Event::Set);
        } else {
            counters.count(key.named.get(), Event::StaleSetRefused);
            debug!(
                key = key.as_str(),
                "refused to store a value computed before an invalidation"
            );
        }
    }
}

/// One call of the compare-and-set script (see `STORE_SCRIPT`): the values
/// added, stored or refused together in one round trip.
pub(crate) struct StoreCall<'k> {
    invocation: redis::ScriptInvocation<'static>,
    /// The key of each value added, in order.
    keys: Vec<&'k CacheKey>,
}

impl<'k> StoreCall<'k> {
    /// A call that gives `lease` up, whatever it stores.
    pub(crate) fn new(lease: Option<&LeaseGuard>) -> Self {
        let mut invocation = store_script().prepare_invoke();
        if let Some(lease) = lease {
            invocation.key(&lease.key);
        }
        invocation
            .arg(lease.map_or("", |lease| lease.holder.as_str()))
            .arg(new_token());
        Self {
            invocation,
            keys: Vec::new(),
        }
    }

    /// Adds the value of `key` (encoded: `payload`, read at `read_at`), to
    /// live `ttl`, stored only if its generations are still `expected`.
    pub(crate) fn add(
        &mut self,
        config: &CacheConfig,
        key: &'k CacheKey,
        expected: Expected<'_>,
        (payload, read_at): (&[u8], u64),
        ttl: Duration,
    ) {
        let generations_live = generation_ttl(config).max(ttl).saturating_add(Duration::from_secs(60));
        self.invocation
            .key(&key.value)
            .key(&key.generations)
            .arg(key.generations.len())
            .arg(expiry_ms(ttl))
            .arg(expiry_ms(generations_live))
            .arg(&codec::header(key.generations.len(), read_at)[..])
            .arg(payload);
        match expected {
            Expected::Seen(tokens) => {
                for token in tokens {
                    self.invocation.arg(token.as_deref().unwrap_or(b""));
                }
            }
            Expected::Any => {
                for _ in &key.generations {
                    self.invocation.arg("*");
                }
            }
        }
        self.keys.push(key);
    }
}

/// A `PTTL` answer as a time left to live (none for a key without an
/// expiry, or gone).
fn time_left(ms: Option<i64>) -> Option<Duration> {
    ms.and_then(|ms| u64::try_from(ms).ok()).map(Duration::from_millis)
}

/// How long a generation created for a computation lives. Values stored
/// later extend it to outlive them (see the store script).
pub(crate) fn generation_ttl(config: &CacheConfig) -> Duration {
    config
        .ttl
        .max(Duration::from_secs(60))
        .saturating_add(Duration::from_secs(60))
}

/// Adds to `pipe` the creation of each generation of `names` (a `SET NX
/// GET` of a fresh token, to live [`generation_ttl`]); returns the fresh
/// token of each in order. With the answers, [`created`] gives each
/// generation's token. How a single lookup and a batch both create the
/// generations a computation needs before it starts. The generations
/// created by one call share one token (as those of one store script do):
/// a token names one version of one generation, and is compared only with
/// that generation's, so what must never repeat is a token for the same
/// generation, which a fresh random one does not.
pub(crate) fn create_generations<'a>(
    pipe: &mut redis::Pipeline,
    names: impl IntoIterator<Item = &'a str>,
    config: &CacheConfig,
) -> Vec<String> {
    let ttl_ms = expiry_ms(generation_ttl(config));
    let token = new_token();
    names
        .into_iter()
        .map(|name| {
            set_if_absent(pipe, name, &token, ttl_ms);
            token.clone()
        })
        .collect()
}

/// A generation's token once [`create_generations`] has run: the one it
/// found (`previous`), or the `fresh` one it created.
pub(crate) fn created(fresh: String, previous: Option<Vec<u8>>) -> Vec<u8> {
    previous.unwrap_or_else(|| fresh.into_bytes())
}

/// Adds to `pipe` a `SET NX GET` of `value` at `key` for `ttl_ms`: the
/// answer is the value that was there, or nil when `value` was set. How
/// generations are created and leases taken.
fn set_if_absent(pipe: &mut redis::Pipeline, key: &str, value: &str, ttl_ms: u64) {
    pipe.cmd("SET")
        .arg(key)
        .arg(value)
        .arg("NX")
        .arg("GET")
        .arg("PX")
        .arg(ttl_ms);
}
