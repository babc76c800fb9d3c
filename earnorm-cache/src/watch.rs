//! Watching writes for the consistency monitor (`monitor.rs`): the
//! generations a sampled write must replace, read before its invalidation,
//! and the check after the monitor's delay, with its repair and report.
//!
//! What this module alone owns: the check (see `monitor.rs` for what it
//! proves) and what an inconsistency found logs: the model, the scope's
//! kind, the generations' kinds and tokens, where it was found, the write's
//! source and time; never a value, a record's id or a key's arguments.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::warn;

use crate::codec::{self, Envelope};
use crate::generations::{create_generations, created};
use crate::keyspace::Keyspace;
use crate::manager::Inner;
use crate::monitor::{Monitor, MonitorReport};
use crate::recent::StoredValue;
use crate::{CacheManager, InvalidationSource, Scope};

/// One scope of a sampled write, as its check needs it.
struct Watched {
    /// The model (or tag) it belongs to: the metrics' label.
    model: String,
    kind: &'static str,
    /// Its generations' names, with the token each held before the
    /// invalidation (`None`: not read) and its stripe's counter in the
    /// tier then.
    generations: Vec<(String, Option<Vec<u8>>, Option<u64>)>,
}

impl CacheManager {
    /// Tells the consistency monitor (when it is on, see [`MonitorConfig`](crate::MonitorConfig))
    /// of a write to `scopes` that has committed and whose invalidation is
    /// about to be sent: call it right before
    /// [`invalidate_from`](Self::invalidate_from), never after, and drop
    /// what it returns once the invalidation returned. When the write is
    /// sampled, reads the generations it must replace (one round trip);
    /// the returned [`WriteWatch`], dropped, checks them again after the
    /// monitor's delay, in a task of its own. The ORM and the database feed
    /// call it for every write.
    pub async fn watch_write(&self, scopes: &[Scope<'_>], source: InvalidationSource) -> WriteWatch {
        self.watch_write_at(scopes, source, 0).await
    }

    /// [`watch_write`](Self::watch_write) of a write made at `at`: its
    /// logical time in the database (for MongoDB, the change event's
    /// `clusterTime`, as [`note_read`](crate::note_read) takes times);
    /// `0` when unknown. With it, the check also looks at the values this
    /// process stored lately under the write's generations: one that can
    /// be served yet was read before the write is stale too.
    pub async fn watch_write_at(&self, scopes: &[Scope<'_>], source: InvalidationSource, at: u64) -> WriteWatch {
        let Some(monitor) = &self.inner.monitor else {
            return WriteWatch(None);
        };
        if scopes.is_empty() || !monitor.samples() {
            return WriteWatch(None);
        }
        let written_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let conn = self.connection();
        let keys = conn.keys();
        let prefix = conn.namespace.len();
        let local = self.inner.local.as_deref();
        let mut watched: Vec<Watched> = scopes
            .iter()
            .take(MAX_WATCHED_SCOPES)
            .map(|scope| {
                let mut names = Vec::new();
                keys.written_generations(*scope, &mut names);
                let (model, kind) = match scope {
                    Scope::Record(model, _) => (*model, "record"),
                    Scope::Model(model) => (*model, "model"),
                    Scope::Tag(_) => ("tag", "tag"),
                };
                let generations = names
                    .into_iter()
                    .map(|name| {
                        let stripe = local.map(|l| l.stripe_count(relative(&name, prefix)));
                        (name, None, stripe)
                    })
                    .collect();
                Watched {
                    model: model.to_owned(),
                    kind,
                    generations,
                }
            })
            .collect();
        if conn.is_enabled() {
            let mut pipe = redis::pipe();
            let names: Vec<&str> = watched
                .iter()
                .flat_map(|w| w.generations.iter().map(|(name, _, _)| name.as_str()))
                .collect();
            let fresh = create_generations(&mut pipe, names, &conn.config);
            let found = conn
                .call(|mut wire| async move { pipe.query_async::<Vec<Option<Vec<u8>>>>(&mut wire).await })
                .await;
            let Ok(found) = found else {
                // Not checked: nothing is known of the generations before.
                monitor.skip();
                return WriteWatch(None);
            };
            let mut tokens = fresh.into_iter().zip(found).map(|(fresh, found)| created(fresh, found));
            for generation in watched.iter_mut().flat_map(|w| w.generations.iter_mut()) {
                generation.1 = tokens.next();
            }
        }
        WriteWatch(Some(Pending {
            manager: Arc::downgrade(&self.inner),
            watched,
            source,
            written_at,
            at,
            delay: monitor.delay,
        }))
    }

    /// What the consistency monitor has found, when it is on.
    pub fn monitor_report(&self) -> Option<MonitorReport> {
        self.inner.monitor.as_ref().map(Monitor::report)
    }
}

/// Most scopes of one write that are watched (the first ones): a bulk write
/// touching thousands of records must not wait on thousands of reads.
const MAX_WATCHED_SCOPES: usize = 64;

/// A sampled write's check, started when this is dropped: after the
/// write's invalidation returned (or was skipped), so that the delay runs
/// from there. See [`CacheManager::watch_write`].
#[must_use = "dropped at once, the check would start before the invalidation is sent"]
#[derive(Default)]
pub struct WriteWatch(Option<Pending>);

impl std::fmt::Debug for WriteWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteWatch")
            .field("sampled", &self.0.is_some())
            .finish()
    }
}

/// What a sampled write's check needs.
struct Pending {
    manager: Weak<Inner>,
    watched: Vec<Watched>,
    source: InvalidationSource,
    written_at: u128,
    /// The write's logical time (`0`: unknown).
    at: u64,
    delay: std::time::Duration,
}

impl Drop for WriteWatch {
    fn drop(&mut self) {
        let Some(pending) = self.0.take() else { return };
        // Outside a Tokio runtime there is nothing to run the check on.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            tokio::time::sleep(pending.delay).await;
            check(pending).await;
        });
    }
}

/// `name` without the prefix (what the tier's stripes go by).
fn relative(name: &str, prefix: usize) -> &[u8] {
    name.as_bytes().get(prefix..).unwrap_or(name.as_bytes())
}

/// Most values stored lately that one check reads.
const MAX_CHECKED_VALUES: usize = 256;

/// A value stored lately under a watched generation, found servable though
/// its data was read before the write.
struct Late {
    stored: Arc<StoredValue>,
    read_at: u64,
}

/// The check of a sampled write (see the module docs), its repair and its
/// report.
async fn check(pending: Pending) {
    let Pending {
        manager,
        watched,
        source,
        written_at,
        at,
        ..
    } = pending;
    let Some(inner) = manager.upgrade() else { return };
    let manager = CacheManager { inner };
    let Some(monitor) = &manager.inner.monitor else { return };
    let conn = manager.connection();
    let prefix = conn.namespace.len();
    let local = manager.inner.local.as_deref();
    let mut names: Vec<String> = watched
        .iter()
        .flat_map(|w| w.generations.iter().map(|(name, _, _)| name.clone()))
        .collect();
    let watched_names = names.len();
    // The values stored lately under those generations, when the write's
    // time is known: their headers first, then their generations with the
    // watched ones (a value's tokens still current after its header was
    // read were current when it was: tokens never come back).
    let mut stored = if at != 0 && conn.is_enabled() {
        monitor
            .recent
            .under(names.iter().map(String::as_str), MAX_CHECKED_VALUES)
    } else {
        Vec::new()
    };
    if at != 0 && conn.is_enabled() {
        let mut seen: HashSet<String> = stored.iter().map(|s| s.value.clone()).collect();
        // Redis that cannot answer this cannot answer the rest: no more
        // calls that would wait out their timeout too.
        let Ok(noted) = crate::recent::plain_sets(conn, &names).await else {
            monitor.skip();
            return;
        };
        for value in noted {
            if stored.len() == MAX_CHECKED_VALUES {
                break;
            }
            if seen.insert(value.value.clone()) {
                stored.push(value);
            }
        }
    }
    let headers = if stored.is_empty() {
        Vec::new()
    } else {
        let mut pipe = redis::pipe();
        for value in &stored {
            let end = codec::envelope_head_len(value.generations.len()).saturating_sub(1);
            pipe.cmd("GETRANGE").arg(&value.value).arg(0).arg(end);
        }
        match conn
            .call(|mut wire| async move { pipe.query_async::<Vec<Vec<u8>>>(&mut wire).await })
            .await
        {
            Ok(headers) => headers,
            Err(_) => {
                monitor.skip();
                return;
            }
        }
    };
    for value in &stored {
        names.extend(value.generations.iter().cloned());
    }
    let now: Option<Vec<Option<Vec<u8>>>> = if conn.is_enabled() && !names.is_empty() {
        let mut mget = redis::cmd("MGET");
        mget.arg(&names);
        match conn
            .call(|mut wire| async move { mget.query_async(&mut wire).await })
            .await
        {
            Ok(now) => Some(now),
            // Not checked: Redis cannot tell now.
            Err(_) => {
                monitor.skip();
                return;
            }
        }
    } else {
        None
    };
    // First the generations the write left in place (and the tier's
    // stripes that did not move).
    let mut at_name = 0;
    let mut stale_names = Vec::new();
    let mut found_by_scope = Vec::with_capacity(watched.len());
    for scope in &watched {
        let mut found = Vec::new();
        for (name, before, stripe) in &scope.generations {
            let current = now.as_ref().and_then(|now| now.get(at_name)).cloned().flatten();
            at_name += 1;
            if before.is_some() && current.is_some() && *before == current {
                found.push(("redis", name));
                stale_names.push(name.clone());
            }
            let in_tier =
                local.is_some_and(|l| l.serves_any() && Some(l.stripe_count(relative(name, prefix))) == *stripe);
            if in_tier {
                found.push(("in-process tier", name));
                if let Some(local) = local {
                    local.invalidate([relative(name, prefix)]);
                    monitor.repaired.fetch_add(1, Relaxed);
                    metrics::counter!("earnorm_cache_monitor_repaired_total").increment(1);
                }
            }
        }
        found_by_scope.push(found);
    }
    // Then the values read before the write, but not those under a
    // generation left in place: that is what made them servable, and it
    // is reported (and repaired) already.
    let late: Vec<Late> = now
        .as_deref()
        .map(|now| late_values(&stored, &headers, now.get(watched_names..).unwrap_or_default(), at))
        .unwrap_or_default()
        .into_iter()
        .filter(|late| !late.stored.generations.iter().any(|g| stale_names.contains(g)))
        .collect();
    for (scope, found) in watched.iter().zip(&found_by_scope) {
        let late_here: Vec<&Late> = late
            .iter()
            .filter(|late| {
                late.stored
                    .generations
                    .iter()
                    .any(|g| scope.generations.iter().any(|(name, _, _)| name == g))
            })
            .collect();
        monitor.count(
            &manager.inner.names.labels(&scope.model),
            !found.is_empty() || !late_here.is_empty(),
        );
        report_not_replaced(monitor, scope, found, prefix, source, (at, written_at));
        for late in late_here {
            report_late(monitor, scope, late, (at, written_at), prefix, source);
        }
    }
    let mut repair: Vec<&str> = stale_names.iter().map(String::as_str).collect();
    for late in &late {
        repair.push(&late.stored.value);
        if let (Some(local), Some(id)) = (local, late.stored.local) {
            local.remove_id(id);
        }
    }
    if !repair.is_empty() {
        let mut del = redis::cmd("DEL");
        del.arg(&repair);
        let deleted = conn
            .send(|mut wire| async move { del.query_async::<u64>(&mut wire).await })
            .await
            .unwrap_or(0);
        monitor.repaired.fetch_add(deleted, Relaxed);
        metrics::counter!("earnorm_cache_monitor_repaired_total").increment(deleted);
    }
}

/// Of the values `stored`, those that can be served (their tokens are the
/// current generations) though read before `at`. `headers`: the start of
/// each value's envelope, as Redis holds it (empty: gone); `now`: the
/// tokens of their generations, all the values' in order.
fn late_values(stored: &[Arc<StoredValue>], headers: &[Vec<u8>], now: &[Option<Vec<u8>>], at: u64) -> Vec<Late> {
    let mut late = Vec::new();
    let mut next = 0;
    for (value, header) in stored.iter().zip(headers) {
        let current = now.get(next..next + value.generations.len()).unwrap_or_default();
        next += value.generations.len();
        let Ok(envelope) = Envelope::open(header) else { continue };
        if envelope.read_at != 0 && envelope.read_at < at && envelope.is_current(current) {
            late.push(Late {
                stored: Arc::clone(value),
                read_at: envelope.read_at,
            });
        }
    }
    late
}

/// Reports a value read before the write, at `at` (and `written_at`,
/// milliseconds since the epoch), that could be served after it.
fn report_late(
    monitor: &Monitor,
    scope: &Watched,
    late: &Late,
    (at, written_at): (u64, u128),
    prefix: usize,
    source: InvalidationSource,
) {
    let Some(left_out) = monitor.may_warn() else { return };
    let generations: Vec<&str> = late
        .stored
        .generations
        .iter()
        .map(|name| Keyspace::generation_kind(relative(name, prefix)))
        .collect();
    warn!(
        model = %scope.model,
        scope = scope.kind,
        key_name = late.stored.name.as_deref().unwrap_or("?"),
        generations = ?generations,
        place = "redis",
        read_at = %logical(late.read_at),
        write_at = %logical(at),
        stored_by = if late.stored.local.is_some() { "this process" } else { "a plain set, of any process" },
        stored_at_ms = late.stored.stored_at_ms,
        source = source.as_str(),
        written_at_ms = written_at,
        left_out,
        "consistency monitor: a value read before a write was stored after it, under the generations that followed the write; it could be served (repaired)"
    );
}

/// A logical time as MongoDB shows a cluster time: seconds, increment
/// (`unknown` for `0`).
fn logical(at: u64) -> String {
    if at == 0 {
        return "unknown".to_owned();
    }
    format!("{}.{}", at >> 32, at & u64::from(u32::MAX))
}

/// Reports the generations of `scope` a write (made at `at`, `0` if not
/// known, and invalidated at `written_at`, milliseconds since the epoch)
/// left in place (`found`).
fn report_not_replaced(
    monitor: &Monitor,
    scope: &Watched,
    found: &[(&'static str, &String)],
    prefix: usize,
    source: InvalidationSource,
    (at, written_at): (u64, u128),
) {
    for place in ["redis", "in-process tier"] {
        let here: Vec<&String> = found.iter().filter(|(p, _)| *p == place).map(|(_, n)| *n).collect();
        if here.is_empty() {
            continue;
        }
        let Some(left_out) = monitor.may_warn() else { continue };
        let generations: Vec<&str> = here
            .iter()
            .map(|name| Keyspace::generation_kind(relative(name, prefix)))
            .collect();
        // The tokens the write left in place: what values stored under
        // them carry (random, no user data).
        let tokens: Vec<String> = here
            .iter()
            .filter_map(|name| {
                scope
                    .generations
                    .iter()
                    .find(|(n, _, _)| n == *name)
                    .and_then(|(_, before, _)| before.as_deref())
                    .map(|t| String::from_utf8_lossy(t).into_owned())
            })
            .collect();
        warn!(
            model = %scope.model,
            scope = scope.kind,
            generations = ?generations,
            place,
            tokens = ?tokens,
            source = source.as_str(),
            write_at = %logical(at),
            written_at_ms = written_at,
            left_out,
            "consistency monitor: a write's generations were not replaced; what it made stale could be served (repaired)"
        );
    }
}
