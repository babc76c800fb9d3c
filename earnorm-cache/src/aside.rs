//! The cache-aside call behind `get_or_compute` and `#[cached]`: try a
//! hit; else lead the computation (single flight in this process, a lease
//! across processes) or follow the one under way; refresh ahead of the
//! expiry. What this module alone owns: the rounds of one call and how long
//! it waits, within one budget, for Redis and for other callers. Reading
//! and storing under the compare-and-set is `generations.rs`; leases are
//! `lease.rs`; single flight is `flight.rs`.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, Instrument};

use crate::codec::{Envelope, Keeper, Kept, Output};
use crate::flight::{Follower, Leader, Next, Outcome, Role};
use crate::generations::{Expected, Generations, Lookup};
use crate::key::CacheKey;
use crate::lease::{Lease, LeaseGuard};
use crate::local::{Local, Noted};
use crate::manager::bypassed;
use crate::stats::{Event, Served};
use crate::token::new_token;
use crate::CacheManager;

/// Most rounds a caller spends looking up and waiting for other callers'
/// computations before computing on its own.
const MAX_ROUNDS: usize = 4;

/// Longest pause between two looks for the value of a key whose lease
/// another process holds (the pauses start at 1 ms and double).
const LEASE_POLL: Duration = Duration::from_millis(16);

/// One cached call's clock: when it began, and what it may still spend
/// waiting on Redis across all its operations.
pub(crate) struct Call {
    began: Instant,
    budget: Duration,
    /// Whether the value the call returns was shown current by Redis (a
    /// hit, or a store the compare-and-set accepted): only such a value is
    /// kept in the in-process tier.
    verified: bool,
    /// With the tier on, a hit's time left to live in Redis: kept in
    /// process no longer than that.
    left: Option<Duration>,
}

impl Call {
    fn new(budget: Duration) -> Self {
        Self {
            began: Instant::now(),
            budget,
            verified: false,
            left: None,
        }
    }
}

/// What waiting on another caller's lease gave.
pub(crate) enum Awaited<R> {
    /// Its value, its payload, and when the lookup that found it was sent.
    Value(R, Arc<[u8]>, Instant),
    /// The lease, taken over from a holder that gave it up or died.
    Took(LeaseGuard),
    /// Nothing in time: compute without the lease.
    GaveUp,
}

impl CacheManager {
    /// The refresh `on_due` started, in a task of its own.
    pub(crate) async fn refresh_in_background<R, O, T, RFut>(
        self,
        key: CacheKey,
        ttl_of: T,
        refresh: Duration,
        seen: Generations,
        compute: RFut,
    ) where
        R: 'static,
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        RFut: Future<Output = R>,
    {
        let Role::Leader(leader) = self.inner.flights.join(key.as_str()) else {
            return;
        };
        if !self.connection().is_enabled() {
            // Without Redis: in process.
            if let Some(local) = self.local_for(&key) {
                let ttl = (&ttl_of, Some(refresh));
                self.lead_in_process::<R, O, T, RFut>(local, &key, ttl, compute, leader, Event::Refresh)
                    .await;
            }
            return;
        }
        let mut call = Call::new(self.connection().config.operation_timeout);
        let _ = self
            .refresh_ahead::<R, O, T, RFut>(&key, refresh, &ttl_of, compute, leader, seen, &mut call)
            .await;
    }

    /// A cached call, in its span and timed; `on_due`, when given, takes
    /// a refresh in the background (returning whether it did). Served from
    /// the in-process tier when it holds a current value; a value Redis
    /// showed current (a hit, or a store the compare-and-set accepted) is
    /// kept there.
    pub(crate) async fn call<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        ttl_of: T,
        refresh: Option<Duration>,
        mut on_due: Option<&mut (dyn FnMut(Generations) -> bool + Send)>,
        compute: Fut,
    ) -> R
    where
        R: 'static,
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        if bypassed() {
            return compute.await;
        }
        let local = self.local_for(key);
        if let Some(local) = local {
            if let Some((value, due)) = self.local_hit_of::<R, O>(local, key) {
                if !due {
                    return value;
                }
                // Due for a refresh ahead (without Redis only: beside it a
                // kept value ends where its window begins).
                if let Some(on_due) = on_due.as_mut() {
                    if on_due(Vec::new()) {
                        return value;
                    }
                }
                let Role::Leader(leader) = self.inner.flights.join(key.as_str()) else {
                    return value;
                };
                return self
                    .lead_in_process::<R, O, _, Fut>(local, key, (&ttl_of, refresh), compute, leader, Event::Refresh)
                    .await;
            }
        }
        let conn = self.connection();
        if !conn.is_enabled() && local.is_none() {
            return compute.await;
        }
        let named = key.named.get();
        let span = tracing::debug_span!(
            "earnorm.cache",
            model = named.map_or("", |n| &*n.namespace),
            method = named.map_or("", |n| &*n.name),
            outcome = tracing::field::Empty,
        );
        let began = Instant::now();
        // On the heap: the call's states (looking up, leading, refreshing,
        // each holding the computation) would otherwise all be part of the
        // caller's future, which nested cached calls multiply.
        let (value, served) = match local {
            Some(local) if !conn.is_enabled() => {
                Box::pin(
                    self.serve_in_process::<R, O, T, Fut>(local, key, &ttl_of, refresh, compute)
                        .instrument(span.clone()),
                )
                .await
            }
            _ => {
                let noted = local.map(|local| local.note(key));
                let mut call = Call::new(conn.config.operation_timeout);
                let (value, served) = Box::pin(
                    self.serve::<R, O, &T, Fut>(key, &ttl_of, refresh, on_due, compute, &mut call)
                        .instrument(span.clone()),
                )
                .await;
                if let (Some(local), Some(noted), true) = (local, noted, call.verified) {
                    let kept_for = |value: &R| kept_for(ttl_of(value), call.left, refresh);
                    keep_in_process::<R, O>(local, key, noted, &value, &kept_for, None);
                }
                (value, served)
            }
        };
        span.record("outcome", served.as_str());
        if let Some(named) = named {
            named.call(served, began.elapsed());
        }
        value
    }

    /// The value the in-process tier holds under `id`, restored with
    /// `keeper` (or decoded as `O`), counted as a hit, and whether a
    /// refresh ahead of it is due (`None` for such a value unless
    /// `take_due`). Beside Redis, only while this manager serves hits from
    /// Redis too (not while another manager may hold invalidations it could
    /// not send).
    pub(crate) fn local_hit_by<R: 'static, O: Output<R>>(
        &self,
        local: &Local,
        id: u128,
        keeper: Option<Keeper>,
        take_due: bool,
    ) -> Option<(R, bool)> {
        let held = local.get(id)?;
        if held.due && !take_due {
            return None;
        }
        let conn = self.connection();
        // A master of a cluster down may be cut off from this process alone,
        // its invalidation pushes with it: nothing is served in process
        // until the connection is replaced (see `connection/cluster.rs`).
        if conn.is_enabled() && (!conn.serves_covered(held.feed_covered) || conn.has_master_down()) {
            return None;
        }
        let value = match &held.kept {
            Kept::Value(_) => keeper.and_then(|keeper| keeper.restore::<R>(&held.kept)),
            Kept::Payload(payload) => O::decode(payload).ok(),
        }?;
        let counters = &conn.counters;
        counters.count(held.named.get(), Event::Hit);
        counters.count(held.named.get(), Event::LocalHit);
        Some((value, held.due))
    }

    fn local_hit_of<R: 'static, O: Output<R>>(&self, local: &Local, key: &CacheKey) -> Option<(R, bool)> {
        self.local_hit_by::<R, O>(local, key.local, key.keeper.0, true)
    }

    /// Without Redis, as the leader of the key's flight: computes the
    /// value (a miss, or a refresh ahead: `event`), and keeps it under the
    /// counts noted before (a write meanwhile keeps it out), refreshed
    /// ahead in its last `refresh`; returns it. Followers look the tier up
    /// again: they find the value when it was kept and is still current.
    async fn lead_in_process<R, O, T, Fut>(
        &self,
        local: &Local,
        key: &CacheKey,
        (ttl_of, refresh): (&T, Option<Duration>),
        compute: Fut,
        leader: Leader<'_>,
        event: Event,
    ) -> R
    where
        R: 'static,
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        self.connection().counters.count(key.named.get(), event);
        let noted = local.note(key);
        let value = compute.await;
        let kept = keep_in_process::<R, O>(local, key, noted, &value, ttl_of, refresh);
        leader.complete(match kept {
            Some(_) => Outcome::Retry,
            None => Outcome::Uncacheable,
        });
        value
    }

    /// A cached call without Redis (the embedded mode): single flight in
    /// this process, and the in-process tier. The leader notes the tier's
    /// generations before computing and keeps its value under them; its
    /// followers then look the tier up again, so that none is served a
    /// value an invalidation made stale while it was computed.
    async fn serve_in_process<R, O, T, Fut>(
        &self,
        local: &Local,
        key: &CacheKey,
        ttl_of: &T,
        refresh: Option<Duration>,
        compute: Fut,
    ) -> (R, Served)
    where
        R: 'static,
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        let began = Instant::now();
        let deadline = wait_until(began, self.config().lease_wait);
        let mut budget = self.config().operation_timeout;
        for round in 0..MAX_ROUNDS {
            if round > 0 {
                if let Some((value, _)) = self.local_hit_of::<R, O>(local, key) {
                    return (value, Served::Coalesced);
                }
            }
            match self.inner.flights.join(key.as_str()) {
                Role::Leader(leader) => {
                    let value = self
                        .lead_in_process::<R, O, T, Fut>(local, key, (ttl_of, refresh), compute, leader, Event::Miss)
                        .await;
                    return (value, Served::Miss);
                }
                Role::Follower(follower) => match follower.wait(began, deadline, &mut budget).await {
                    Next::Use(_) | Next::Retry => {}
                    Next::Compute => break,
                },
            }
        }
        (compute.await, Served::Fallback)
    }

    /// The cache-aside call itself; says how it was served (and, in
    /// `call`, whether Redis showed the value current).
    async fn serve<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        ttl_of: T,
        refresh: Option<Duration>,
        mut on_due: Option<&mut (dyn FnMut(Generations) -> bool + Send)>,
        compute: Fut,
        call: &mut Call,
    ) -> (R, Served)
    where
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        for _ in 0..MAX_ROUNDS {
            let generations = match self.try_hit::<R, O>(key, refresh, &ttl_of, call).await {
                Ok((value, None)) => return (value, Served::Hit),
                Ok((value, Some(seen))) => {
                    // Close to its expiry: refreshed in the background when
                    // it can be, else by one caller in this process (the
                    // others take the hit).
                    if let Some(on_due) = on_due.as_mut() {
                        if on_due(seen.clone()) {
                            return (value, Served::Hit);
                        }
                    }
                    return match (self.inner.flights.join(key.as_str()), refresh) {
                        (Role::Leader(leader), Some(refresh)) => {
                            // `compute` is used at most once: by the refresh
                            // here, or (when it is skipped) not at all.
                            match self
                                .refresh_ahead::<R, O, T, Fut>(key, refresh, &ttl_of, compute, leader, seen, call)
                                .await
                            {
                                Some(fresh) => (fresh, Served::Refresh),
                                None => (value, Served::Hit),
                            }
                        }
                        _ => (value, Served::Hit),
                    };
                }
                Err(generations) => generations,
            };
            match self.inner.flights.join(key.as_str()) {
                Role::Leader(leader) => {
                    return self
                        .lead::<R, O, T, Fut>(key, &ttl_of, compute, leader, generations, call)
                        .await
                }
                Role::Follower(follower) => match self.follow::<R, O>(key, follower, call).await {
                    Next::Use(value) => return (value, Served::Coalesced),
                    Next::Retry => {}
                    Next::Compute => break,
                },
            }
        }
        // Other callers kept invalidating under us, the leader's result was
        // not cacheable, or it took longer than this caller may wait:
        // compute without storing.
        (compute.await, Served::Fallback)
    }

    /// Looks the key up: the decoded value on a hit (with the generations
    /// seen, when it has less than `refresh` left to live); otherwise the
    /// generations seen (for the store after computing), or `None` when the
    /// cache could not be read.
    async fn try_hit<R, O: Output<R>>(
        &self,
        key: &CacheKey,
        refresh: Option<Duration>,
        ttl_of: &impl Fn(&R) -> Option<Duration>,
        call: &mut Call,
    ) -> Result<(R, Option<Generations>), Option<Generations>> {
        // With the tier on, the time left too: a value kept in process
        // lives no longer than in Redis.
        let want_ttl = refresh.is_some() || self.local_for(key).is_some();
        let (lookup, _, left) = self.lookup(key, None, want_ttl, &mut call.budget).await;
        match lookup {
            Lookup::Hit(bytes, generations) => match self.open_hit(key, &bytes, O::decode, &mut call.budget).await {
                Some(value) => {
                    call.verified = true;
                    call.left = left;
                    let window = refresh.and_then(|refresh| refresh_window(refresh, ttl_of(&value)));
                    let due = matches!((window, left), (Some(window), Some(left)) if left < window);
                    Ok((value, due.then_some(generations)))
                }
                None => Err(Some(generations)),
            },
            Lookup::Miss(generations) => Err(Some(generations)),
            Lookup::Unavailable => Err(None),
        }
    }

    /// Waits for the leader of this key's flight (see [`crate::flight`]).
    async fn follow<R, O: Output<R>>(&self, key: &CacheKey, follower: Follower, call: &mut Call) -> Next<R> {
        let deadline = wait_until(call.began, self.config().lease_wait);
        match follower.wait(call.began, deadline, &mut call.budget).await {
            Next::Use(payload) => match O::decode(&payload) {
                Ok(value) => {
                    self.connection().counters.count(key.named.get(), Event::Coalesced);
                    Next::Use(value)
                }
                Err(_) => Next::Retry,
            },
            Next::Retry => Next::Retry,
            // The leader's result was not cacheable (an `Err`, a `None`), or
            // it took longer than this caller may wait.
            Next::Compute => Next::Compute,
        }
    }

    /// Computes as the leader of this key's flight (unless another process
    /// holds the key's lease and stores its value in time), stores the
    /// value under the compare-and-set, and hands the outcome to the
    /// followers.
    async fn lead<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        ttl_of: &T,
        compute: Fut,
        leader: Leader<'_>,
        generations: Option<Generations>,
        call: &mut Call,
    ) -> (R, Served)
    where
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        let conn = self.connection();
        let named = key.named.get();
        let served = match &generations {
            Some(_) => Served::Miss,
            None => Served::Fallback,
        };
        conn.counters.count(
            named,
            match served {
                Served::Fallback => Event::Fallback,
                _ => Event::Miss,
            },
        );
        // A successful compare-and-set proves no invalidation reached Redis
        // during the computation; it proves nothing about invalidations still
        // queued in other managers, which is why a value stored while this
        // manager serves no hits is not handed to followers as checked.
        let serving_before = conn.serves(key);
        // A computation never starts under an absent generation: create the
        // missing ones first, so that any later invalidation removes a token
        // this computation knows. The key's lease is asked for in the same
        // round trip.
        let wants_lease = generations.is_some() && !conn.config.lease_wait.is_zero();
        let (generations, lease) = self.prepare(key, generations, wants_lease, &mut call.budget).await;
        let mut lease = match lease {
            Lease::Busy => {
                conn.counters.count(named, Event::LeaseWait);
                match self.await_holder::<R, O>(key, call).await {
                    Awaited::Value(value, payload, looked) => {
                        call.verified = true;
                        // Current when it was looked up: as good as a store
                        // sent then (see `crate::flight`).
                        leader.complete(Outcome::Stored(payload, looked));
                        return (value, Served::Hit);
                    }
                    Awaited::Took(guard) => Some(guard),
                    Awaited::GaveUp => None,
                }
            }
            Lease::Held(guard) => Some(guard),
            Lease::None => None,
        };
        let value = self
            .compute_and_store::<R, O, T, Fut>(
                key,
                ttl_of,
                compute,
                leader,
                generations,
                lease.as_mut(),
                serving_before,
                call,
            )
            .await;
        (value, served)
    }

    /// Computes as the leader of this key's flight, stores the value under
    /// the compare-and-set (giving `lease` up), and hands the outcome to
    /// the followers. `serving_before`: whether this manager served hits
    /// when the computation began (see `lead`).
    #[allow(clippy::too_many_arguments)]
    async fn compute_and_store<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        ttl_of: &T,
        compute: Fut,
        leader: Leader<'_>,
        generations: Option<Generations>,
        lease: Option<&mut LeaseGuard>,
        serving_before: bool,
        call: &mut Call,
    ) -> R
    where
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        let conn = self.connection();
        call.verified = false;
        call.left = None;
        let (value, read_at) = crate::read_time::timed(compute).await;
        let payload = match ttl_of(&value).and_then(|ttl| O::encode(&value).map(|payload| (ttl, payload))) {
            Some((ttl, Ok(payload))) => (ttl, payload),
            Some((_, Err(err))) => {
                debug!(key = key.as_str(), error = %err, "value not cached: it does not encode");
                leader.complete(Outcome::Uncacheable);
                return value;
            }
            // Not a cacheable result (an `Err`, a `None`): followers compute their own.
            None => {
                leader.complete(Outcome::Uncacheable);
                return value;
            }
        };
        let (ttl, payload) = payload;
        let Some(generations) = generations else {
            leader.complete(Outcome::Computed(payload.into()));
            return value;
        };
        leader.storing();
        let store_sent = Instant::now();
        let stored = self
            .store(
                key,
                Expected::Seen(&generations),
                (&payload, read_at),
                ttl,
                lease,
                &mut call.budget,
            )
            .await;
        // Kept in process only when it could be served from Redis too.
        call.verified = matches!(stored, Ok(true)) && serving_before && conn.serves(key);
        let outcome = match stored {
            Ok(true) if serving_before && conn.serves(key) => Outcome::Stored(payload.into(), store_sent),
            Ok(true) => Outcome::Computed(payload.into()),
            // An invalidation happened during the computation: the value
            // may be older than a write some follower already saw.
            Ok(false) => Outcome::Retry,
            Err(_) => Outcome::Computed(payload.into()),
        };
        leader.complete(outcome);
        value
    }

    /// Refreshes a value that is close to its expiry, as the leader of this
    /// key's flight: takes the key's lease (another process refreshing it
    /// already: the current value is returned), computes, stores under the
    /// generations `seen` with the hit, and returns the new value.
    #[allow(clippy::too_many_arguments)]
    async fn refresh_ahead<R, O, T, Fut>(
        &self,
        key: &CacheKey,
        refresh: Duration,
        ttl_of: &T,
        compute: Fut,
        leader: Leader<'_>,
        seen: Generations,
        call: &mut Call,
    ) -> Option<R>
    where
        O: Output<R>,
        T: Fn(&R) -> Option<Duration>,
        Fut: Future<Output = R>,
    {
        let conn = self.connection();
        let wants_lease = !conn.config.lease_wait.is_zero();
        let (generations, lease) = self.prepare(key, Some(seen), wants_lease, &mut call.budget).await;
        let mut lease = match lease {
            Lease::Busy => {
                leader.complete(Outcome::Retry);
                return None;
            }
            Lease::Held(guard) => {
                // Another process may have refreshed it between our lookup
                // and the lease: then there is nothing left to do.
                let (lookup, _, left) = self.lookup(key, None, true, &mut call.budget).await;
                let refreshed = matches!(lookup, Lookup::Hit(..)) && left.is_some_and(|left| left >= refresh);
                if refreshed {
                    leader.complete(Outcome::Retry);
                    return None;
                }
                Some(guard)
            }
            Lease::None => None,
        };
        conn.counters.count(key.named.get(), Event::Refresh);
        let value = self
            .compute_and_store::<R, O, T, Fut>(key, ttl_of, compute, leader, generations, lease.as_mut(), true, call)
            .await;
        Some(value)
    }

    /// Polls for the value of a key whose lease another caller holds,
    /// until `lease_wait` after the call began. When the lease is gone
    /// without a current value (its holder died, or gave it up because its
    /// result was not cacheable or a write invalidated it), takes the lease
    /// over if it can. Gives up when time runs out or the cache cannot be
    /// read: the caller then computes without the lease.
    async fn await_holder<R, O: Output<R>>(&self, key: &CacheKey, call: &mut Call) -> Awaited<R> {
        let deadline = wait_until(call.began, self.config().lease_wait);
        let lease = self.lease_key(key);
        let mut pause = Duration::from_millis(1);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Awaited::GaveUp;
            }
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(LEASE_POLL);
            let looked = Instant::now();
            match self.lookup(key, Some(&lease), false, &mut call.budget).await {
                (Lookup::Hit(bytes, _), ..) => {
                    // The payload too, for this caller's followers (only
                    // here: a plain hit needs no copy of it).
                    let payload = Envelope::open(&bytes).map(|env| Arc::<[u8]>::from(env.payload));
                    return match (self.open_hit(key, &bytes, O::decode, &mut call.budget).await, payload) {
                        (Some(value), Ok(payload)) => Awaited::Value(value, payload, looked),
                        _ => Awaited::GaveUp,
                    };
                }
                (Lookup::Miss(_), true, _) => {}
                (Lookup::Miss(_), false, _) => {
                    let holder = new_token();
                    match self.take_lease(&lease, &holder, &mut call.budget).await {
                        Ok(true) => return Awaited::Took(self.hold(lease, holder)),
                        Ok(false) => {}
                        Err(_) => return Awaited::GaveUp,
                    }
                }
                (Lookup::Unavailable, ..) => return Awaited::GaveUp,
            }
        }
    }
}

/// Keeps `value` in the in-process tier under `noted` (by value when the
/// key has a keeper for its type, else as its payload), for as long as
/// `ttl_of` says, with a refresh ahead due where its `refresh` window
/// begins. Returns whether the value is one to cache at all (`None`: not
/// cached, like an `Err`), and if so whether it was kept.
pub(crate) fn keep_in_process<R: 'static, O: Output<R>>(
    local: &Local,
    key: &CacheKey,
    noted: Noted,
    value: &R,
    ttl_of: &impl Fn(&R) -> Option<Duration>,
    refresh: Option<Duration>,
) -> Option<bool> {
    let ttl = ttl_of(value)?;
    let kept = kept_as::<R, O>(key, value, None)?;
    let due_in = refresh
        .and_then(|refresh| refresh_window(refresh, Some(ttl)))
        .map(|window| ttl.saturating_sub(window));
    Some(local.keep_due(key, noted, kept, ttl, due_in))
}

/// `value` as the in-process tier keeps it for `key`: by value when the
/// key's keeper is for its type, else as its payload (`payload` when the
/// caller has already encoded it as `O`). `None` when `O` does not cache
/// it, or it does not encode.
pub(crate) fn kept_as<R: 'static, O: Output<R>>(key: &CacheKey, value: &R, payload: Option<&[u8]>) -> Option<Kept> {
    if let Some(kept) = key.keeper.0.and_then(|keeper| keeper.keep(value)) {
        return Some(kept);
    }
    Some(Kept::Payload(match payload {
        Some(payload) => payload.into(),
        None => O::encode(value)?.ok()?.into(),
    }))
}

/// How long a value Redis showed current is kept in process beside it: no
/// longer than Redis keeps it (`left`, when read), and, when it is
/// refreshed ahead, only until its refresh window opens: from then on the
/// calls go to Redis, whose hits in the window take the refresh (kept to
/// its expiry, the copy would hide the window, and its expiry would be a
/// miss for every caller). `None`: not kept.
pub(crate) fn kept_for(ttl: Option<Duration>, left: Option<Duration>, refresh: Option<Duration>) -> Option<Duration> {
    let ttl = ttl?;
    let lives = left.map_or(ttl, |left| ttl.min(left));
    let window = refresh.and_then(|refresh| refresh_window(refresh, Some(ttl)));
    let kept = window.map_or(Some(lives), |window| lives.checked_sub(window))?;
    (!kept.is_zero()).then_some(kept)
}

/// `began` plus `wait`, for a wait the settings may make too long to add
/// (a deserialized `lease_wait` of `Duration::MAX`): then a year.
fn wait_until(began: Instant, wait: Duration) -> Instant {
    began
        .checked_add(wait)
        .or_else(|| began.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(began)
}

/// How long before its expiry a hit is refreshed: `refresh`, or, for a
/// value that lives no longer than that (a negative entry with a short
/// `missing`, say), the last fifth of its own `lifetime`; never for a value
/// that would not be stored.
fn refresh_window(refresh: Duration, lifetime: Option<Duration>) -> Option<Duration> {
    let lifetime = lifetime?;
    Some(if refresh < lifetime { refresh } else { lifetime / 5 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_refreshed_ahead_is_kept_in_process_until_its_window_opens() {
        let s = Duration::from_secs;
        assert_eq!(
            kept_for(Some(s(300)), Some(s(200)), None),
            Some(s(200)),
            "no longer than Redis"
        );
        assert_eq!(kept_for(Some(s(300)), None, None), Some(s(300)));
        assert_eq!(kept_for(Some(s(300)), Some(s(300)), Some(s(60))), Some(s(240)));
        assert_eq!(
            kept_for(Some(s(300)), Some(s(50)), Some(s(60))),
            None,
            "in its window: not kept"
        );
        assert_eq!(
            kept_for(Some(s(5)), Some(s(5)), Some(s(60))),
            Some(s(4)),
            "the last fifth"
        );
        assert_eq!(kept_for(None, Some(s(5)), None), None, "not cached");
    }

    #[test]
    fn a_value_shorter_lived_than_the_refresh_window_is_refreshed_in_its_last_fifth() {
        let s = Duration::from_secs;
        assert_eq!(refresh_window(s(60), Some(s(300))), Some(s(60)));
        assert_eq!(refresh_window(s(60), Some(s(5))), Some(s(1)));
        assert_eq!(refresh_window(s(60), Some(s(60))), Some(s(12)));
        assert_eq!(refresh_window(s(60), None), None, "not stored: nothing to refresh");
    }
}
