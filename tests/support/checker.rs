//! The consistency and fault checker: a randomized workload of cached reads
//! and ORM writes over two environments (standing in for two processes)
//! sharing one MongoDB database and one private Redis, with Redis killed,
//! restarted, frozen, thawed and flushed during the run. Every read is checked
//! against the history of acknowledged writes.
//!
//! A read that began at `t0` is **stale** when it returns a state older than
//! the last write to that record acknowledged before `t0`:
//! * a version `v` is stale if that write's sequence number is greater than `v`
//!   (versions are the global sequence numbers of the writes that set them);
//! * "absent" is stale if that write was not a delete and no delete of the
//!   record began before the read ended.
//!
//! With `naive = true` the same workload reads through a plain cache-aside
//! (`get`, then compute and `set` with no generation check), which is what the
//! checker must catch.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use earnorm::bson::{doc, oid::ObjectId};
use earnorm::cache_layer::Scope;
use earnorm::prelude::*;
use earnorm::{ConnectionStatus, Environment};
use serde::{Deserialize, Serialize};

use crate::crash_writer::{ChildCommand, CrashWriter, Line, CHILD_SEQ};
use crate::{connect, fast_cache_config, require_mongo, unique_name, RedisCluster, RedisServer};

/// Records the crash writer process saves (slots after the checker's own).
const CHILD_RECORDS: usize = 2;
/// The `env` of the crash writer's writes in the history.
const CRASH_WRITER: usize = 3;

/// One record of the workload. `version` is the sequence number of the last
/// write that set it.
#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "checker_items", cache(ttl = 60))]
pub struct Item {
    /// Id.
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    /// Which record of the workload (0..records).
    pub slot: i64,
    /// Sequence number of the last write.
    pub version: i64,
}

/// A record written concurrently by partial updates (`$inc` of `count`) or
/// by versioned read-modify-save loops; its record cache is on, so reads
/// between the writes go through the cache.
#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "checker_tallies", cache(ttl = 60))]
pub struct Tally {
    /// Id.
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    /// Incremented by every acknowledged write.
    pub count: i64,
    /// The ORM's version.
    #[earnorm(version)]
    #[serde(default)]
    pub revision: i64,
}

/// Widens the race window between reading the database and storing the value,
/// the same way in both modes.
async fn think(seed: u64) {
    tokio::time::sleep(Duration::from_micros(seed % 3000)).await;
}

impl Item {
    /// Record scope: the stored version of this record, read from MongoDB.
    #[cached(ttl = 60)]
    pub async fn stored_version(&self, jitter: Jitter) -> Result<Option<i64>, String> {
        let id = self.id.ok_or("no id")?;
        let found = Item::find_by_id(id).await.map_err(|e| e.to_string())?;
        think(jitter.0).await;
        Ok(found.map(|item| item.version))
    }

    /// Model scope: the stored version of a slot, read from MongoDB.
    #[cached(ttl = 60)]
    pub async fn version_of(slot: i64, jitter: Jitter) -> Result<Option<i64>, String> {
        let found = Item::find_one(doc! { "slot": slot }).await.map_err(|e| e.to_string())?;
        think(jitter.0).await;
        Ok(found.map(|item| item.version))
    }
}

/// A delay that does not enter the cache key (so reads share entries).
#[derive(Debug, Clone, Copy)]
pub struct Jitter(pub u64);

impl Serialize for Jitter {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_unit()
    }
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct CheckerConfig {
    /// Length of the run.
    pub duration: Duration,
    /// Records in the workload.
    pub records: usize,
    /// Concurrent reader tasks.
    pub readers: usize,
    /// Concurrent writer tasks (through EarnORM).
    pub writers: usize,
    /// Concurrent writer tasks using the raw driver (writes EarnORM does not
    /// see: only the database feed can invalidate them).
    pub outside_writers: usize,
    /// Concurrent tasks writing records in MongoDB transactions with the
    /// raw driver (a session of their own, or `Transaction::session()`),
    /// with 1-25 ms of work between the statement and the commit, during
    /// which an EarnORM bulk write to the same collection often runs: the
    /// write becomes visible only at the commit.
    pub outside_transactions: usize,
    /// Records written only by an outside bulk writer: one raw
    /// `update_many` of all of them every 0.5-1.5 s (0: none).
    pub bulk_records: usize,
    /// Another environment that only runs the feed, reaching MongoDB
    /// through a proxy, leads first and is cut off from MongoDB (its
    /// connections stall) at 30% of the run: the others take over.
    pub stalled_leader: bool,
    /// Concurrent tasks writing two records of their own: `$inc`s through
    /// `update_one` of one, and versioned read-modify-save loops (retried on
    /// `Conflict`) of the other; at the end each record's count must equal
    /// the number of its acknowledged writes (no update lost, none refused).
    pub tally_writers: usize,
    /// Inject faults on the private Redis.
    pub faults: bool,
    /// Read through a naive cache-aside instead of `#[cached]`.
    pub naive: bool,
    /// Random seed.
    pub seed: u64,
    /// The cache's health-check interval (recovery is measured against it).
    pub health_check_interval: Duration,
    /// Run the database feed.
    pub feed: bool,
    /// With the feed and faults: how to start the crash writer, a separate
    /// process that leads the feed and saves records through EarnORM until
    /// it is SIGKILLed while Redis is frozen (see `crash_writer_child`).
    /// `None`: no such process, and no leader is killed.
    pub crash_writer: Option<ChildCommand>,
    /// The two-tier mode: both environments keep values in process beside
    /// Redis (`LocalConfig::with_redis`). A read stale against an ORM write
    /// of the *other* environment is then allowed for the invalidation's
    /// delivery lag (counted, and its window measured); one in the writer's
    /// own environment never is.
    pub local: bool,
    /// Whether the EarnORM writers also bulk-update (3 writes in 10, each
    /// invalidating every value of the model). Off: saves and deletes of
    /// single records only, so most reads can be hits (how the two-tier
    /// mode's window is measured).
    pub bulk_writes: bool,
    /// Run on a private Redis Cluster (three masters, a replica each)
    /// instead of one server. Its faults: a master killed (its replica
    /// takes over), restarted empty (it rejoins as a replica), and a
    /// manual failover; both environments connect directly.
    pub cluster: bool,
    /// The consistency monitor on in both environments, checking every
    /// write (`CacheConfig::monitor`); the report counts what it checked
    /// and found.
    pub monitor: bool,
}

impl Default for CheckerConfig {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(10),
            records: 8,
            readers: 8,
            writers: 2,
            outside_writers: 1,
            outside_transactions: 1,
            bulk_records: 0,
            stalled_leader: false,
            tally_writers: 4,
            faults: true,
            naive: false,
            seed: 0x5EED,
            health_check_interval: Duration::from_millis(500),
            feed: true,
            crash_writer: None,
            local: false,
            bulk_writes: true,
            cluster: false,
            monitor: true,
        }
    }
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Naive mode?
    pub naive: bool,
    /// The two-tier mode?
    pub local: bool,
    /// Seconds the workload ran.
    pub seconds: f64,
    /// Reads + writes.
    pub operations: u64,
    /// Cached reads.
    pub reads: u64,
    /// Acknowledged writes.
    pub writes: u64,
    /// Cache hits, both environments.
    pub hits: u64,
    /// Of `hits`, those served in process (the two-tier mode).
    pub local_hits: u64,
    /// Cache misses, both environments.
    pub misses: u64,
    /// Calls that computed because the cache was unavailable.
    pub fallbacks: u64,
    /// Reads older than a write made through EarnORM, whose invalidation
    /// went out with it, and acknowledged before they began: never allowed
    /// (in the two-tier mode: in the writer's own environment).
    pub stale_reads: u64,
    /// The two-tier mode: reads older than an ORM write of the other
    /// environment acknowledged before they began (allowed for the
    /// invalidation's delivery lag).
    pub cross_stale_reads: u64,
    /// For every ORM write in the two-tier mode: microseconds from its
    /// acknowledgement to the end of the last read of the other environment
    /// that was stale against it (0 when none was): median, 99th percentile
    /// and maximum.
    pub cross_window_p50_us: u64,
    /// 99th percentile.
    pub cross_window_p99_us: u64,
    /// Maximum.
    pub cross_window_max_us: u64,
    /// Reads older than a write only the database feed invalidates (made
    /// with the raw driver, or through EarnORM by a process that could not
    /// reach Redis) acknowledged before they began: allowed within the
    /// feed's lag.
    pub outside_stale_reads: u64,
    /// Writes only the feed invalidates (raw driver, or deferred invalidation).
    pub outside_writes: u64,
    /// Writes of the crash writer process in the history.
    pub crash_writer_writes: u64,
    /// Of those, writes MongoDB applied but the process never saw
    /// acknowledged: it was killed waiting to invalidate them.
    pub crash_writer_unacknowledged: u64,
    /// For those writes: milliseconds from the acknowledgement to the
    /// end of the last read that was stale against it (0 when none was),
    /// median, 99th percentile and maximum.
    pub outside_window_p50_ms: u64,
    /// 99th percentile.
    pub outside_window_p99_ms: u64,
    /// Maximum.
    pub outside_window_max_ms: u64,
    /// Acknowledged `$inc`s of the tally record, and its count at the end.
    pub tally_incs: u64,
    /// The count stored at the end (must equal `tally_incs`).
    pub tally_incs_stored: u64,
    /// Acknowledged versioned saves of the other tally record.
    pub tally_saves: u64,
    /// Its count stored at the end (must equal `tally_saves`).
    pub tally_saves_stored: u64,
    /// `Conflict`s the versioned saves met (and retried).
    pub tally_conflicts: u64,
    /// Reads or writes that returned an error.
    pub failed_calls: u64,
    /// Write scopes the consistency monitor checked (both environments).
    pub monitor_checked: u64,
    /// Those it found inconsistent.
    pub monitor_inconsistent: u64,
    /// Generations it repaired.
    pub monitor_repaired: u64,
    /// Read latency percentiles and maximum, microseconds.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// Maximum.
    pub max_us: u64,
    /// For each time Redis came back: milliseconds until both environments
    /// were serving hits again (reconnection plus the quarantine).
    pub recoveries_ms: Vec<u64>,
    /// For each time Redis came back: milliseconds until both environments
    /// had reconnected (and replayed their queued invalidations).
    pub reconnects_ms: Vec<u64>,
    /// The health-check interval, milliseconds.
    pub health_check_interval_ms: u64,
    /// Faults injected, in order.
    pub faults: Vec<String>,
    /// Some stale reads, for diagnosis.
    pub examples: Vec<String>,
}

impl Report {
    /// The longest recovery (until hits are served again).
    pub fn max_recovery_ms(&self) -> u64 {
        self.recoveries_ms.iter().copied().max().unwrap_or(0)
    }

    /// Checks that the consistency monitor checked writes and found none
    /// inconsistent (with every write sampled).
    ///
    /// # Panics
    /// When it checked nothing or found an inconsistency.
    pub fn assert_monitor_consistent(&self) {
        assert!(
            self.monitor_checked > 0,
            "the monitor checked writes: {}",
            self.to_json()
        );
        assert_eq!(
            self.monitor_inconsistent,
            0,
            "the monitor found no inconsistency: {}",
            self.to_json()
        );
    }

    /// The longest reconnection.
    pub fn max_reconnect_ms(&self) -> u64 {
        self.reconnects_ms.iter().copied().max().unwrap_or(0)
    }

    fn mode(&self) -> &'static str {
        match (self.naive, self.local) {
            (true, _) => "naive",
            (false, true) => "two-tier",
            (false, false) => "earnorm",
        }
    }

    /// The figures, named, in report order (shared by the JSON and the summary).
    fn figures(&self) -> [(&'static str, u64); 35] {
        [
            ("local_hits", self.local_hits),
            ("cross_stale_reads", self.cross_stale_reads),
            ("cross_window_p50_us", self.cross_window_p50_us),
            ("cross_window_p99_us", self.cross_window_p99_us),
            ("cross_window_max_us", self.cross_window_max_us),
            ("tally_incs", self.tally_incs),
            ("tally_incs_stored", self.tally_incs_stored),
            ("tally_saves", self.tally_saves),
            ("tally_saves_stored", self.tally_saves_stored),
            ("tally_conflicts", self.tally_conflicts),
            ("outside_writes", self.outside_writes),
            ("crash_writer_writes", self.crash_writer_writes),
            ("crash_writer_unacknowledged", self.crash_writer_unacknowledged),
            ("outside_stale_reads", self.outside_stale_reads),
            ("outside_window_p50_ms", self.outside_window_p50_ms),
            ("outside_window_p99_ms", self.outside_window_p99_ms),
            ("outside_window_max_ms", self.outside_window_max_ms),
            ("operations", self.operations),
            ("reads", self.reads),
            ("writes", self.writes),
            ("hits", self.hits),
            ("misses", self.misses),
            ("fallbacks", self.fallbacks),
            ("stale_reads", self.stale_reads),
            ("failed_calls", self.failed_calls),
            ("p50_us", self.p50_us),
            ("p99_us", self.p99_us),
            ("max_us", self.max_us),
            ("max_reconnect_ms", self.max_reconnect_ms()),
            ("max_recovery_ms", self.max_recovery_ms()),
            ("health_check_interval_ms", self.health_check_interval_ms),
            ("recoveries", self.recoveries_ms.len() as u64),
            ("monitor_checked", self.monitor_checked),
            ("monitor_inconsistent", self.monitor_inconsistent),
            ("monitor_repaired", self.monitor_repaired),
        ]
    }

    /// A machine-readable form.
    pub fn to_json(&self) -> String {
        let list = |v: &[String]| v.iter().map(|s| format!("{s:?}")).collect::<Vec<_>>().join(",");
        let figures: Vec<String> = self.figures().iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        let recoveries = self
            .recoveries_ms
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "{{\"mode\":\"{}\",\"seconds\":{:.1},{},\"recoveries_ms\":[{}],\"faults\":[{}],\"stale_examples\":[{}]}}",
            self.mode(),
            self.seconds,
            figures.join(","),
            recoveries,
            list(&self.faults),
            list(&self.examples),
        )
    }

    /// One line.
    pub fn summary(&self) -> String {
        let figures: Vec<String> = self.figures().iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("checker[{}] {:.1}s: {}", self.mode(), self.seconds, figures.join(" "))
    }
}

/// A tiny deterministic generator (xorshift64*).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Present(i64),
    Deleted,
}

#[derive(Debug, Clone, Copy)]
struct Write {
    env: usize,
    seq: i64,
    state: State,
    started: Instant,
    acked: Instant,
    /// Not invalidated when acknowledged: made with the raw driver, through
    /// EarnORM by a process that could not reach Redis (its invalidation was
    /// deferred), or by a caller that stopped waiting (seen applied before
    /// its invalidation could be seen done).
    outside: bool,
}

#[derive(Debug, Clone)]
struct Read {
    env: usize,
    slot: usize,
    started: Instant,
    ended: Instant,
    result: Option<i64>,
    how: &'static str,
}

tokio::task_local! {
    /// Which of the two environments the current task uses (for diagnosis).
    static ENV_INDEX: usize;
}

/// Shared state of the workload.
struct Shared {
    ids: Vec<ObjectId>,
    /// Slots the checker's own writers write (the rest are the crash
    /// writer's and the bulk writer's).
    writable: usize,
    /// The bulk writer's slots.
    bulk: std::ops::Range<usize>,
    locks: Vec<tokio::sync::Mutex<bool>>, // true: the record exists
    seq: AtomicU64,
    writes: Mutex<Vec<Vec<Write>>>,
    reads: Mutex<Vec<Read>>,
    latencies: Mutex<Vec<u64>>,
    failed: AtomicU64,
    stop: AtomicBool,
    /// When the workload (after seeding) started.
    begin: Instant,
    /// When the crash writer was killed.
    killed: Mutex<Option<Instant>>,
}

impl Shared {
    fn killed_at(&self) -> Option<Instant> {
        *self.killed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn next_seq(&self) -> i64 {
        i64::try_from(self.seq.fetch_add(1, Ordering::SeqCst) + 1).unwrap_or(i64::MAX)
    }
    fn record_write(&self, slot: usize, seq: i64, state: State, started: Instant, acked: Instant) {
        self.record(slot, seq, state, started, acked, false);
    }

    fn record(&self, slot: usize, seq: i64, state: State, started: Instant, acked: Instant, outside: bool) {
        let env = ENV_INDEX.try_with(|e| *e).unwrap_or(0);
        self.record_as(env, slot, seq, state, started, acked, outside);
    }

    /// Records a write made by environment (or process) `env`.
    #[allow(clippy::too_many_arguments)]
    fn record_as(
        &self,
        env: usize,
        slot: usize,
        seq: i64,
        state: State,
        started: Instant,
        acked: Instant,
        outside: bool,
    ) {
        let write = Write {
            env,
            seq,
            state,
            started,
            acked,
            outside,
        };
        self.writes.lock().unwrap_or_else(PoisonError::into_inner)[slot].push(write);
    }

    /// The record in `slot` as a writer sets it.
    /// Up to three distinct slots, locked in ascending order (so writers
    /// never deadlock), with their guards.
    async fn lock_some(&self, rng: &mut Rng) -> (Vec<usize>, Vec<tokio::sync::MutexGuard<'_, bool>>) {
        let mut slots: Vec<usize> = (0..3).map(|_| rng.below(self.writable)).collect();
        slots.sort_unstable();
        slots.dedup();
        let mut guards = Vec::new();
        for &slot in &slots {
            guards.push(self.locks[slot].lock().await);
        }
        (slots, guards)
    }

    fn item(&self, slot: usize, version: i64) -> Item {
        Item {
            id: Some(self.ids[slot]),
            slot: slot as i64,
            version,
        }
    }
}

/// Runs the workload and checks it.
///
/// # Panics
/// When the services cannot be reached (with instructions).
/// [`run`], with the report's summary and JSON printed, checking that the
/// workload ran: more than 1,000 reads, 100 writes, and some hits.
///
/// # Panics
/// When the workload did not run.
pub async fn run_printed(config: &CheckerConfig) -> Report {
    let report = run(config).await;
    println!("{}", report.summary());
    println!("{}", report.to_json());
    assert!(
        report.reads > 1000 && report.writes > 100 && report.hits > 0,
        "the workload ran and hit: {}",
        report.summary()
    );
    report
}

pub async fn run(config: &CheckerConfig) -> Report {
    let mut redis = RedisServer::start();
    let mut cluster = config.cluster.then(|| RedisCluster::start_with_replicas(1));
    let name = unique_name("checker");
    let mut cache_config = fast_cache_config(&name);
    cache_config.health_check_interval = config.health_check_interval;
    cache_config.connect_timeout = Duration::from_millis(100);
    cache_config.local.with_redis = config.local;
    cache_config.monitor = earnorm::cache_layer::MonitorConfig {
        enabled: config.monitor,
        sample_one_in: 1,
        ..Default::default()
    };
    let env_config = earnorm::Config {
        mongo_uri: require_mongo(),
        database: name.clone(),
        redis_uri: Some(cluster.as_ref().map_or_else(|| redis.url(), RedisCluster::url)),
        cache_config,
        connect_timeout: Duration::from_secs(5),
        feed: config.feed,
    };
    let child_records = if config.feed && config.faults && config.crash_writer.is_some() {
        CHILD_RECORDS
    } else {
        0
    };
    let bulk_start = config.records + child_records;
    let ids: Vec<ObjectId> = (0..bulk_start + config.bulk_records).map(|_| ObjectId::new()).collect();
    // With the feed and faults, a separate process leads the feed first and
    // writes records of its own, until it is killed during the run: another
    // environment takes over from its token, and its last writes are
    // invalidated by the feed alone.
    let mut crash_writer = match (&config.crash_writer, child_records) {
        (Some(command), 1..) => Some(CrashWriter::spawn(
            command,
            &env_config,
            &ids[config.records..],
            config.records,
        )),
        _ => None,
    };
    // The second environment reaches Redis through a proxy that the faults
    // cut for it alone (a one-sided partition).
    let proxy = crate::TcpProxy::start(redis.port()).await;
    let proxied = earnorm::Config {
        redis_uri: if cluster.is_some() {
            env_config.redis_uri.clone()
        } else {
            Some(proxy.url())
        },
        ..env_config.clone()
    };
    // The feed's leader to be cut off from MongoDB: connected first, and
    // given time to lead, before the others.
    let mongo_proxy = crate::TcpProxy::start(crate::mongo_port()).await;
    let stalled = if config.stalled_leader && config.feed {
        let env = connect(earnorm::Config {
            mongo_uri: format!("mongodb://127.0.0.1:{}/?directConnection=true", mongo_proxy.port()),
            ..env_config.clone()
        })
        .await;
        let start = Instant::now();
        while !env.feed_stats().leader && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(env.feed_stats().leader, "the environment to cut off leads");
        Some(env)
    } else {
        None
    };
    let envs = [connect(env_config).await, connect(proxied).await];

    // Seed the records.
    let shared = Arc::new(Shared {
        locks: ids.iter().map(|_| tokio::sync::Mutex::new(true)).collect(),
        seq: AtomicU64::new(0),
        writes: Mutex::new(vec![Vec::new(); ids.len()]),
        writable: config.records,
        bulk: bulk_start..bulk_start + config.bulk_records,
        ids,
        reads: Mutex::new(Vec::new()),
        latencies: Mutex::new(Vec::new()),
        failed: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        begin: Instant::now(),
        killed: Mutex::new(None),
    });
    seed_bulk(&shared, &envs[0]).await;
    for slot in 0..shared.bulk.start {
        let seq = shared.next_seq();
        let started = Instant::now();
        let mut item = shared.item(slot, seq);
        item.save().in_env(&envs[0]).await.expect("seed a record");
        shared.record_write(slot, seq, State::Present(seq), started, Instant::now());
    }

    let begin = shared.begin;
    if let Some(child) = &mut crash_writer {
        child.go();
    }
    let mut tasks = Vec::new();
    for w in 0..config.writers {
        let (shared, env) = (Arc::clone(&shared), envs[w % 2].clone());
        let mut rng = Rng(config.seed ^ (0x1000 + w as u64));
        let bulk_writes = config.bulk_writes;
        tasks.push(tokio::spawn(ENV_INDEX.scope(w % 2, async move {
            writer(&shared, &env, &mut rng, bulk_writes).await;
        })));
    }
    for o in 0..config.outside_writers {
        let (shared, env) = (Arc::clone(&shared), envs[0].clone());
        let mut rng = Rng(config.seed ^ (0x3000 + o as u64));
        tasks.push(tokio::spawn(ENV_INDEX.scope(2, async move {
            outside_writer(&shared, &env, &mut rng, false).await;
        })));
    }
    for t in 0..config.outside_transactions {
        let (shared, env) = (Arc::clone(&shared), envs[0].clone());
        let mut rng = Rng(config.seed ^ (0x4000 + t as u64));
        tasks.push(tokio::spawn(ENV_INDEX.scope(2, async move {
            outside_writer(&shared, &env, &mut rng, true).await;
        })));
    }
    if !shared.bulk.is_empty() {
        let (shared, env) = (Arc::clone(&shared), envs[0].clone());
        let mut rng = Rng(config.seed ^ 0x5000);
        tasks.push(tokio::spawn(ENV_INDEX.scope(2, async move {
            outside_bulk_writer(&shared, &env, &mut rng).await;
        })));
    }
    let tallies = Arc::new(Tallies::seed(&envs[0]).await);
    for t in 0..config.tally_writers {
        let (shared, tallies, env) = (Arc::clone(&shared), Arc::clone(&tallies), envs[t % 2].clone());
        tasks.push(tokio::spawn(async move { tallies.write(&shared, &env, t).await }));
    }
    for r in 0..config.readers {
        let (shared, env) = (Arc::clone(&shared), envs[r % 2].clone());
        let mut rng = Rng(config.seed ^ (0x2000 + r as u64));
        let naive = config.naive;
        tasks.push(tokio::spawn(ENV_INDEX.scope(r % 2, async move {
            env.clone().scope(reader(&shared, &env, &mut rng, naive)).await
        })));
    }

    // Faults, spread over the run.
    let mut faults = Vec::new();
    let mut recoveries = Vec::new();
    let mut reconnects = Vec::new();
    if let Some(leader) = &stalled {
        tokio::time::sleep_until((begin + config.duration * 3 / 10).into()).await;
        mongo_proxy.stall();
        faults.push(format!(
            "the feed's leader cut off from MongoDB (leading: {})",
            leader.feed_stats().leader
        ));
    }
    if let (true, Some(cluster)) = (config.faults, cluster.as_mut()) {
        let step = config.duration / 10;
        let at = |n: u32| begin + step * n;
        cluster_faults(cluster, &envs, at, &mut faults, &mut reconnects, &mut recoveries).await;
    } else if config.faults {
        let step = config.duration / 10;
        let at = |n: u32| begin + step * n;
        tokio::time::sleep_until(at(2).into()).await;
        redis.kill();
        faults.push("kill".to_owned());
        tokio::time::sleep_until(at(3).into()).await;
        redis.restart();
        faults.push("restart (empty)".to_owned());
        let (reconnect, recovered) = recovery(&envs).await;
        reconnects.push(reconnect);
        recoveries.push(recovered);
        tokio::time::sleep_until(at(4).into()).await;
        redis.freeze();
        faults.push("freeze".to_owned());
        if let Some(child) = crash_writer.take() {
            // Soon enough after the freeze that the child still holds the
            // feed's lease, late enough that a save of its has reached
            // MongoDB and is waiting on Redis.
            tokio::time::sleep(step / 5).await;
            let killed = Instant::now();
            let lines = child.kill();
            faults.push("feed leader and writer process SIGKILLed".to_owned());
            record_child_writes(&shared, &envs[0], &lines, killed).await;
        }
        tokio::time::sleep_until(at(5).into()).await;
        redis.thaw();
        faults.push("thaw".to_owned());
        let (reconnect, recovered) = recovery(&envs).await;
        reconnects.push(reconnect);
        recoveries.push(recovered);
        tokio::time::sleep_until(at(6).into()).await;
        out_of_memory(&redis);
        faults.push("maxmemory reached under noeviction".to_owned());
        tokio::time::sleep_until((at(6) + step / 2).into()).await;
        redis.cli(&["CONFIG", "SET", "maxmemory", "0"]);
        faults.push("maxmemory lifted".to_owned());
        tokio::time::sleep_until(at(7).into()).await;
        redis.cli(&["FLUSHALL"]);
        faults.push("flushall".to_owned());
        tokio::time::sleep_until(at(8).into()).await;
        redis.freeze();
        faults.push("freeze".to_owned());
        tokio::time::sleep(step / 2).await;
        redis.kill();
        redis.restart();
        faults.push("kill while frozen, restart".to_owned());
        let (reconnect, recovered) = recovery(&envs).await;
        reconnects.push(reconnect);
        recoveries.push(recovered);
        tokio::time::sleep_until((at(9) + step / 4).into()).await;
        proxy.cut();
        faults.push("one-sided partition of the second environment".to_owned());
        tokio::time::sleep_until((at(9) + step * 3 / 4).into()).await;
        proxy.heal();
        faults.push("partition healed".to_owned());
    }
    tokio::time::sleep_until((begin + config.duration).into()).await;
    shared.stop.store(true, Ordering::SeqCst);
    for task in tasks {
        let _ = task.await;
    }
    let seconds = begin.elapsed().as_secs_f64();
    if let Some(leader) = stalled {
        faults.push(format!(
            "the cut-off leader stepped down: {} (step-downs: {})",
            !leader.feed_stats().leader,
            leader.feed_stats().step_downs
        ));
        mongo_proxy.cut();
    }

    let mut report = check(&shared, config.local);
    report.local = config.local;
    tallies.check(&envs[0], &mut report).await;
    report.naive = config.naive;
    report.seconds = seconds;
    report.faults = faults;
    report.recoveries_ms = recoveries;
    report.reconnects_ms = reconnects;
    report.health_check_interval_ms = u64::try_from(config.health_check_interval.as_millis()).unwrap_or(u64::MAX);
    for env in &envs {
        let stats = env.cache().stats();
        report.hits += stats.hits + stats.coalesced;
        report.local_hits += stats.local_hits;
        report.misses += stats.misses;
        report.fallbacks += stats.fallbacks;
    }
    if config.monitor {
        // The checks of the last writes run a delay after them.
        tokio::time::sleep(Duration::from_secs(1)).await;
        for env in &envs {
            if let Some(monitor) = env.cache().monitor_report() {
                report.monitor_checked += monitor.checked;
                report.monitor_inconsistent += monitor.inconsistent;
                report.monitor_repaired += monitor.repaired;
            }
        }
    }
    let _ = envs[0].database().drop().await;
    report
}

/// The cluster mode's faults, at steps 2 to 7 of the run (`at`): a master
/// killed (its replica takes over after the node timeout), restarted
/// empty (it rejoins as a replica), and a manual failover of another
/// master; the environments' recovery measured after each.
async fn cluster_faults(
    cluster: &mut RedisCluster,
    envs: &[Environment; 2],
    at: impl Fn(u32) -> Instant,
    faults: &mut Vec<String>,
    reconnects: &mut Vec<u64>,
    recoveries: &mut Vec<u64>,
) {
    let masters = |cluster: &mut RedisCluster| -> Vec<usize> {
        let replicas = cluster.replicas();
        (0..cluster.len())
            .filter(|&i| !replicas.contains(&i) && cluster.node(i).answers())
            .collect()
    };
    tokio::time::sleep_until(at(2).into()).await;
    let killed = masters(cluster)[0];
    cluster.node(killed).kill();
    faults.push("a master killed".to_owned());
    let limit = Duration::from_secs(30);
    let start = Instant::now();
    while masters(cluster).len() < 3 {
        assert!(start.elapsed() < limit, "no replica took over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    faults.push(format!(
        "its replica took over after {} ms",
        start.elapsed().as_millis()
    ));
    let (reconnect, recovered) = recovery(envs).await;
    reconnects.push(reconnect);
    recoveries.push(recovered);
    tokio::time::sleep_until(at(4).into()).await;
    cluster.node(killed).restart();
    faults.push("the killed master restarted empty (a replica now)".to_owned());
    tokio::time::sleep_until(at(5).into()).await;
    let replica = *cluster.replicas().iter().find(|&&r| r != killed).expect("a replica");
    // Waits with the thread's own sleep: let the runtime move the work.
    tokio::task::block_in_place(|| cluster.fail_over_to(replica));
    faults.push("manual failover of another master".to_owned());
    let (reconnect, recovered) = recovery(envs).await;
    reconnects.push(reconnect);
    recoveries.push(recovered);
}

/// Puts Redis over its memory limit with `noeviction` (its default policy):
/// it refuses every write that could grow memory.
fn out_of_memory(redis: &RedisServer) {
    redis.cli(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let info = redis.cli(&["INFO", "memory"]);
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1024 * 1024);
    redis.cli(&["CONFIG", "SET", "maxmemory", &(used / 2).max(1).to_string()]);
}

/// Milliseconds until both environments have reconnected, and until both
/// serve hits again.
async fn recovery(envs: &[Environment; 2]) -> (u64, u64) {
    let start = Instant::now();
    let limit = Duration::from_secs(30);
    let ms = |start: Instant| u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    for env in envs {
        let mut status = env.cache().subscribe();
        let back = status.wait_for(|s| matches!(s, ConnectionStatus::Recovering | ConnectionStatus::Connected));
        let _ = tokio::time::timeout(limit, back).await;
    }
    let reconnected = ms(start);
    for env in envs {
        env.cache().wait_for_status(ConnectionStatus::Connected, limit).await;
    }
    (reconnected, ms(start))
}

/// Adds the crash writer's writes to the history: each save it saw return,
/// and, for a save it sent but did not see return (it was killed waiting
/// on Redis), whatever MongoDB holds, as a write only the feed
/// invalidates, acknowledged at the latest when the process died.
async fn record_child_writes(shared: &Shared, env: &Environment, lines: &[Line], killed: Instant) {
    *shared.killed.lock().unwrap_or_else(PoisonError::into_inner) = Some(killed);
    let mut sent = std::collections::HashMap::new();
    for line in lines {
        match *line {
            Line::Sending { slot, seq, at } => {
                sent.insert(seq, (slot, at));
            }
            Line::Acked { slot, seq, at, lagged } => {
                if let Some((_, started)) = sent.remove(&seq) {
                    shared.record_as(CRASH_WRITER, slot, seq, State::Present(seq), started, at, lagged);
                }
            }
        }
    }
    for (seq, (slot, started)) in sent {
        let Some(&id) = shared.ids.get(slot) else { continue };
        let stored = Item::find_by_id(id).in_env(env).await.ok().flatten();
        if stored.is_some_and(|item| item.version == seq) {
            shared.record_as(CRASH_WRITER, slot, seq, State::Present(seq), started, killed, true);
        }
    }
    debug_assert!(shared.seq.load(Ordering::SeqCst) < CHILD_SEQ.unsigned_abs());
}

async fn writer(shared: &Shared, env: &Environment, rng: &mut Rng, bulk_writes: bool) {
    let n = shared.writable;
    while !shared.stop.load(Ordering::SeqCst) {
        let mut roll = rng.below(10);
        if !bulk_writes && (6..9).contains(&roll) {
            roll = 0;
        }
        // A write whose invalidation this process had to defer (it could
        // not reach Redis) is, for the cache, like a write made outside
        // EarnORM: only the database feed invalidates it in time.
        let deferred = env.cache().stats().invalidations_deferred;
        let lagged = || env.cache().stats().invalidations_deferred > deferred;
        if roll < 6 {
            // save one record (re-creates it if deleted)
            let slot = rng.below(n);
            let mut exists = shared.locks[slot].lock().await;
            let seq = shared.next_seq();
            let started = Instant::now();
            let mut item = shared.item(slot, seq);
            match item.save().in_env(env).await {
                Ok(()) => {
                    *exists = true;
                    shared.record(slot, seq, State::Present(seq), started, Instant::now(), lagged());
                }
                Err(_) => {
                    shared.failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        } else if roll == 8 {
            // a bulk update whose caller stops waiting part-way
            cancelled_bulk_update(shared, env, rng).await;
        } else if roll < 9 {
            // bulk update of a few records
            let (slots, guards) = shared.lock_some(rng).await;
            let seq = shared.next_seq();
            let started = Instant::now();
            let filter = doc! { "slot": { "$in": slots.iter().map(|s| *s as i64).collect::<Vec<_>>() } };
            match Item::update_many(filter, doc! { "$set": { "version": seq } })
                .in_env(env)
                .await
            {
                Ok(_) => {
                    let acked = Instant::now();
                    let lagged = lagged();
                    for (slot, exists) in slots.iter().zip(&guards) {
                        if **exists {
                            shared.record(*slot, seq, State::Present(seq), started, acked, lagged);
                        }
                    }
                }
                Err(_) => {
                    shared.failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        } else {
            // delete one record
            let slot = rng.below(n);
            let mut exists = shared.locks[slot].lock().await;
            let seq = shared.next_seq();
            let started = Instant::now();
            let item = shared.item(slot, 0);
            match item.delete().in_env(env).await {
                Ok(_) => {
                    *exists = false;
                    shared.record(slot, seq, State::Deleted, started, Instant::now(), lagged());
                }
                Err(_) => {
                    shared.failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2 + rng.below(6) as u64)).await;
    }
}

/// Updates records with the raw driver, as another service would: one
/// `update_one` each, or (`in_transactions`) in MongoDB transactions, in a
/// session of its own or through `Transaction::session()` in turn, with
/// 1-25 ms of work between the statement and the commit; in one of four,
/// an EarnORM bulk write to the same collection runs meanwhile (inserting
/// or deleting a record no reader reads, or updating nothing), which
/// invalidates the whole model before the transaction's write is visible.
async fn outside_writer(shared: &Shared, env: &Environment, rng: &mut Rng, in_transactions: bool) {
    let raw = env.database().collection::<earnorm::bson::Document>(Item::COLLECTION);
    let mut round = 0_usize;
    while !shared.stop.load(Ordering::SeqCst) {
        round += 1;
        let slot = rng.below(shared.writable);
        let exists = shared.locks[slot].lock().await;
        if *exists {
            let seq = shared.next_seq();
            let started = Instant::now();
            let filter = doc! { "_id": shared.ids[slot] };
            let update = doc! { "$set": { "version": seq } };
            let written = if in_transactions {
                let work = Duration::from_millis(1 + rng.below(25) as u64);
                let through_orm = round.is_multiple_of(2);
                update_in_transaction(env, &raw, (filter, update), through_orm, rng.below(12), work).await
            } else {
                raw.update_one(filter, update)
                    .await
                    .map(|result| result.matched_count == 1)
                    .map_err(|e| e.to_string())
            };
            match written {
                Ok(true) => shared.record(slot, seq, State::Present(seq), started, Instant::now(), true),
                Ok(false) => {}
                Err(_) => {
                    shared.failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        drop(exists);
        tokio::time::sleep(Duration::from_millis(5 + rng.below(10) as u64)).await;
    }
}

/// One raw `update_one` in a transaction (through `Transaction::session()`
/// when `through_orm`), with `work` (and the bulk write `kind` of
/// [`unrelated_bulk_write`]) before the commit; whether it matched.
async fn update_in_transaction(
    env: &Environment,
    raw: &earnorm::mongodb::Collection<earnorm::bson::Document>,
    (filter, update): (earnorm::bson::Document, earnorm::bson::Document),
    through_orm: bool,
    kind: usize,
    work: Duration,
) -> Result<bool, String> {
    let text = |e: &dyn std::fmt::Display| e.to_string();
    if through_orm {
        let mut tx = env.start_transaction().await.map_err(|e| text(&e))?;
        let matched = raw
            .update_one(filter, update)
            .session(tx.session())
            .await
            .map_err(|e| text(&e))?
            .matched_count;
        unrelated_bulk_write(env, kind, work).await;
        tx.commit().await.map_err(|e| text(&e))?;
        Ok(matched == 1)
    } else {
        let mut session = env.client().start_session().await.map_err(|e| text(&e))?;
        session.start_transaction().await.map_err(|e| text(&e))?;
        let matched = raw
            .update_one(filter, update)
            .session(&mut session)
            .await
            .map_err(|e| text(&e))?
            .matched_count;
        unrelated_bulk_write(env, kind, work).await;
        session.commit_transaction().await.map_err(|e| text(&e))?;
        Ok(matched == 1)
    }
}

/// The two tally records and what was acknowledged of their writes.
struct Tallies {
    incremented: ObjectId,
    saved: ObjectId,
    incs: AtomicU64,
    saves: AtomicU64,
    conflicts: AtomicU64,
}

impl Tallies {
    async fn seed(env: &Environment) -> Self {
        let mut ids = [ObjectId::new(), ObjectId::new()];
        for id in &mut ids {
            let mut tally = Tally {
                id: Some(*id),
                count: 0,
                revision: 0,
            };
            tally.save().in_env(env).await.expect("seed a tally");
        }
        Self {
            incremented: ids[0],
            saved: ids[1],
            incs: AtomicU64::new(0),
            saves: AtomicU64::new(0),
            conflicts: AtomicU64::new(0),
        }
    }

    /// Writes until the run stops: `$inc`s (even tasks) or versioned
    /// read-modify-save loops (odd tasks).
    async fn write(&self, shared: &Shared, env: &Environment, task: usize) {
        while !shared.stop.load(Ordering::SeqCst) {
            let written = if task.is_multiple_of(2) {
                Tally::update_one(doc! { "_id": self.incremented }, doc! { "$inc": { "count": 1 } })
                    .in_env(env)
                    .await
                    .map(|found| found.is_some())
            } else {
                self.save_one_more(env).await
            };
            match written {
                Ok(true) if task.is_multiple_of(2) => {
                    self.incs.fetch_add(1, Ordering::SeqCst);
                }
                Ok(true) => {
                    self.saves.fetch_add(1, Ordering::SeqCst);
                }
                Ok(false) | Err(_) => {
                    shared.failed.fetch_add(1, Ordering::SeqCst);
                }
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    }

    /// Reads the saved tally (through its record cache), adds one, saves;
    /// again on `Conflict`. Whether a save was acknowledged.
    async fn save_one_more(&self, env: &Environment) -> earnorm::Result<bool> {
        loop {
            let Some(mut tally) = Tally::find_by_id(self.saved).in_env(env).await? else {
                return Ok(false);
            };
            tally.count += 1;
            match tally.save().in_env(env).await {
                Ok(()) => return Ok(true),
                Err(earnorm::Error::Conflict { .. }) => {
                    self.conflicts.fetch_add(1, Ordering::SeqCst);
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// The counts stored at the end, beside the acknowledged writes.
    async fn check(&self, env: &Environment, report: &mut Report) {
        let stored = |id: ObjectId| async move {
            earnorm::bypass_cache(Tally::find_by_id(id).in_env(env))
                .await
                .ok()
                .flatten()
                .map_or(0, |tally| u64::try_from(tally.count).unwrap_or(0))
        };
        report.tally_incs = self.incs.load(Ordering::SeqCst);
        report.tally_incs_stored = stored(self.incremented).await;
        report.tally_saves = self.saves.load(Ordering::SeqCst);
        report.tally_saves_stored = stored(self.saved).await;
        report.tally_conflicts = self.conflicts.load(Ordering::SeqCst);
    }
}

/// Seeds the bulk writer's records in one raw insert.
async fn seed_bulk(shared: &Shared, env: &Environment) {
    if shared.bulk.is_empty() {
        return;
    }
    let seq = shared.next_seq();
    let documents: Vec<earnorm::bson::Document> = shared
        .bulk
        .clone()
        .map(|slot| doc! { "_id": shared.ids[slot], "slot": slot as i64, "version": seq })
        .collect();
    let started = Instant::now();
    env.database()
        .collection::<earnorm::bson::Document>(Item::COLLECTION)
        .insert_many(documents)
        .await
        .expect("seed the bulk records");
    let acked = Instant::now();
    for slot in shared.bulk.clone() {
        shared.record_write(slot, seq, State::Present(seq), started, acked);
    }
}

/// Updates all the bulk records with one raw `update_many`, every 0.5-1.5 s.
async fn outside_bulk_writer(shared: &Shared, env: &Environment, rng: &mut Rng) {
    let raw = env.database().collection::<earnorm::bson::Document>(Item::COLLECTION);
    let from = shared.bulk.start as i64;
    while !shared.stop.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(500 + rng.below(1000) as u64)).await;
        let seq = shared.next_seq();
        let started = Instant::now();
        match raw
            .update_many(doc! { "slot": { "$gte": from } }, doc! { "$set": { "version": seq } })
            .await
        {
            Ok(_) => {
                let acked = Instant::now();
                for slot in shared.bulk.clone() {
                    shared.record(slot, seq, State::Present(seq), started, acked, true);
                }
            }
            Err(_) => {
                shared.failed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// `work` of waiting, with an EarnORM bulk write to the checker's
/// collection that touches no record a reader reads (`kind` 0: an insert,
/// 1: a delete, 2: an update that matches nothing) in its middle; no
/// write at all for other kinds.
async fn unrelated_bulk_write(env: &Environment, kind: usize, work: Duration) {
    tokio::time::sleep(work / 2).await;
    // Failures of these are not the checker's business: they write nothing
    // a reader reads.
    match kind {
        0 => {
            let mut junk = [Item {
                id: None,
                slot: -1,
                version: 0,
            }];
            let _ = Item::insert_many(&mut junk).in_env(env).await;
        }
        1 => {
            let _ = Item::delete_many(doc! { "slot": -1 }).in_env(env).await;
        }
        2 => {
            let _ = Item::update_many(doc! { "slot": -2 }, doc! { "$set": { "version": 0 } })
                .in_env(env)
                .await;
        }
        _ => {}
    }
    tokio::time::sleep(work / 2).await;
}

/// A bulk update under a random short timeout, so that its caller often
/// stops waiting after sending it. Once the records show it (or it proves
/// not to have happened), it counts as acknowledged: from then on no read
/// may return what it replaced.
async fn cancelled_bulk_update(shared: &Shared, env: &Environment, rng: &mut Rng) {
    let (slots, guards) = shared.lock_some(rng).await;
    let seq = shared.next_seq();
    let started = Instant::now();
    let deferred = env.cache().stats().invalidations_deferred;
    let in_slots = slots.iter().map(|s| *s as i64).collect::<Vec<_>>();
    let update = Item::update_many(
        doc! { "slot": { "$in": &in_slots } },
        doc! { "$set": { "version": seq } },
    )
    .in_env(env);
    let patience = Duration::from_micros(rng.below(3000) as u64);
    let cancelled = match tokio::time::timeout(patience, update).await {
        Ok(Ok(_)) => false,
        Ok(Err(_)) => {
            shared.failed.fetch_add(1, Ordering::SeqCst);
            return;
        }
        Err(_) => true,
    };
    let existing = guards.iter().filter(|exists| ***exists).count() as u64;
    let deadline = Instant::now() + Duration::from_secs(2);
    let applied = loop {
        let filter = doc! { "slot": { "$in": &in_slots }, "version": seq };
        match Item::count(filter).in_env(env).await {
            Ok(count) if count >= existing => break true,
            _ if Instant::now() > deadline => break false,
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    };
    if applied {
        let acked = Instant::now();
        // Seen applied is not acknowledged: the unit that wrote it invalidates
        // a moment after the server applied it, and the checker cannot see
        // when. Such a write is measured with those only the feed bounds.
        let lagged = cancelled || env.cache().stats().invalidations_deferred > deferred;
        for (slot, exists) in slots.iter().zip(&guards) {
            if **exists {
                shared.record(*slot, seq, State::Present(seq), started, acked, lagged);
            }
        }
    }
}

async fn reader(shared: &Shared, env: &Environment, rng: &mut Rng, naive: bool) {
    let n = shared.ids.len();
    // Each reader keeps its own copies of the records, which go out of date.
    let copies: Vec<Item> = (0..n).map(|slot| shared.item(slot, 0)).collect();
    while !shared.stop.load(Ordering::SeqCst) {
        // Half the reads on the bulk writer's records, when there are any.
        let slot = if !shared.bulk.is_empty() && rng.below(2) == 0 {
            shared.bulk.start + rng.below(shared.bulk.len())
        } else {
            rng.below(shared.bulk.start)
        };
        let jitter = Jitter(rng.next());
        // A record method, a model method, the record cache (`find_by_id`)
        // or the query cache (`find_one(..).cached(..)`).
        let kind = rng.below(4);
        let record_scope = kind.is_multiple_of(2);
        let started = Instant::now();
        let result = match (naive, kind) {
            (false, 0) => copies[slot].stored_version(jitter).await,
            (false, 1) => Item::version_of(slot as i64, jitter).await,
            (false, 2) => Item::find_by_id(shared.ids[slot])
                .in_env(env)
                .await
                .map(|found| found.map(|item| item.version))
                .map_err(|e| e.to_string()),
            (false, _) => Item::find_one(doc! { "slot": slot as i64 })
                .in_env(env)
                .cached(Duration::from_secs(60))
                .await
                .map(|found| found.map(|item| item.version))
                .map_err(|e| e.to_string()),
            (true, _) => naive_read(env, &copies[slot], record_scope, jitter).await,
        };
        let ended = Instant::now();
        match result {
            Ok(result) => {
                let how = ["record method", "model method", "record cache", "query cache"][kind];
                shared.reads.lock().unwrap_or_else(PoisonError::into_inner).push(Read {
                    env: ENV_INDEX.try_with(|e| *e).unwrap_or(9),
                    slot,
                    started,
                    ended,
                    result,
                    how,
                });
                shared
                    .latencies
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(u64::try_from((ended - started).as_micros()).unwrap_or(u64::MAX));
            }
            Err(_) => {
                shared.failed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Plain cache-aside: `get`; on a miss compute and `set`, with no check
/// that the value is still current when it is stored.
async fn naive_read(env: &Environment, item: &Item, record_scope: bool, jitter: Jitter) -> Result<Option<i64>, String> {
    let cache = env.cache();
    let id = item.id.map(|id| id.to_hex()).unwrap_or_default();
    // The same scopes the ORM's writes invalidate.
    let model = env.model_scope("checker_items");
    let builder = if record_scope {
        cache.key(&model, "naive_record").scope(Scope::Record(&model, &id))
    } else {
        cache.key(&model, "naive_model").scope(Scope::Model(&model))
    };
    let key = builder
        .arg(&item.slot)
        .and_then(earnorm::cache_layer::KeyBuilder::build)
        .map_err(|e| e.to_string())?;
    if let Ok(Some(value)) = cache.get::<Option<i64>>(&key).await {
        return Ok(value);
    }
    // Straight from MongoDB (the record cache inside is bypassed too).
    let value = earnorm::bypass_cache(async {
        if record_scope {
            item.stored_version_uncached(jitter).await
        } else {
            Item::version_of_uncached(item.slot, jitter).await
        }
    })
    .await?;
    let _ = cache.set(&key, &value, Some(Duration::from_secs(60))).await;
    Ok(value)
}

/// Checks every read against the write history.
fn check(shared: &Shared, local: bool) -> Report {
    let writes = shared.writes.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let reads = shared.reads.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let mut latencies = shared.latencies.lock().unwrap_or_else(PoisonError::into_inner).clone();
    latencies.sort_unstable();
    let pct = |p: f64| {
        if latencies.is_empty() {
            0
        } else {
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            let i = ((latencies.len() - 1) as f64 * p).round() as usize;
            latencies[i]
        }
    };
    let mut report = Report {
        reads: reads.len() as u64,
        writes: writes.iter().map(|w| w.len() as u64).sum(),
        failed_calls: shared.failed.load(Ordering::SeqCst),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: latencies.last().copied().unwrap_or(0),
        ..Report::default()
    };
    report.operations = report.reads + report.writes;
    report.outside_writes = writes.iter().flatten().filter(|w| w.outside).count() as u64;
    let crashed = || writes.iter().flatten().filter(|w| w.env == CRASH_WRITER);
    report.crash_writer_writes = crashed().count() as u64;
    report.crash_writer_unacknowledged = crashed().filter(|w| Some(w.acked) == shared.killed_at()).count() as u64;
    // Whether `read` returned a state older than `write`'s.
    let stale_against = |read: &Read, write: &Write, history: &[Write]| match read.result {
        Some(version) => version < write.seq,
        None => {
            write.state != State::Deleted
                && !history
                    .iter()
                    .any(|w| w.state == State::Deleted && w.seq > write.seq && w.started < read.ended)
        }
    };
    // Per outside write (slot, seq): when its last stale read ended.
    let mut windows: std::collections::HashMap<(usize, i64), Duration> = std::collections::HashMap::new();
    // The same for ORM writes read stale by the other environment, in the
    // two-tier mode.
    let mut cross: std::collections::HashMap<(usize, i64), Duration> = std::collections::HashMap::new();
    for read in &reads {
        let history = &writes[read.slot];
        let acked_before = || history.iter().filter(|w| w.acked < read.started);
        let Some(last) = acked_before().max_by_key(|w| w.seq) else {
            continue;
        };
        let last_orm = acked_before().filter(|w| !w.outside).max_by_key(|w| w.seq);
        // In the two-tier mode, a read is stale in its own environment only
        // against that environment's own latest ORM write.
        let own_orm = acked_before()
            .filter(|w| !w.outside && w.env == read.env)
            .max_by_key(|w| w.seq);
        let stale_orm = if local { own_orm } else { last_orm };
        if local {
            for write in acked_before().filter(|w| !w.outside && w.env != read.env && stale_against(read, w, history)) {
                report.cross_stale_reads += 1;
                let window = read.ended.saturating_duration_since(write.acked);
                let entry = cross.entry((read.slot, write.seq)).or_default();
                *entry = (*entry).max(window);
            }
        }
        if let Some(orm) = stale_orm.filter(|orm| stale_against(read, orm, history)) {
            report.stale_reads += 1;
            if report.examples.len() < 5 {
                report.examples.push(format!(
                    "{} read of slot {} in env {} at {:?} returned {:?}, but write {} ({:?}) by env {} was acknowledged at {:?}",
                    read.how, read.slot, read.env, read.started.duration_since(shared.begin), read.result, orm.seq, orm.state, orm.env, orm.acked.duration_since(shared.begin)
                ));
            }
        } else if last.outside && stale_against(read, last, history) {
            report.outside_stale_reads += 1;
            // Every outside write this read was stale against.
            for write in acked_before().filter(|w| w.outside && stale_against(read, w, history)) {
                let window = read.ended.saturating_duration_since(write.acked);
                let entry = windows.entry((read.slot, write.seq)).or_default();
                *entry = (*entry).max(window);
            }
        }
    }
    let mut all: Vec<u64> = writes
        .iter()
        .enumerate()
        .flat_map(|(slot, history)| history.iter().filter(|w| w.outside).map(move |w| (slot, w.seq)))
        .map(|key| {
            windows
                .get(&key)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        })
        .collect();
    all.sort_unstable();
    let at = |p: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((all.len().max(1) - 1) as f64 * p).round() as usize;
        all.get(i).copied().unwrap_or(0)
    };
    report.outside_window_p50_ms = at(0.50);
    report.outside_window_p99_ms = at(0.99);
    report.outside_window_max_ms = all.last().copied().unwrap_or(0);
    if local {
        let mut all: Vec<u64> = writes
            .iter()
            .enumerate()
            .flat_map(|(slot, history)| history.iter().filter(|w| !w.outside).map(move |w| (slot, w.seq)))
            .map(|key| {
                cross
                    .get(&key)
                    .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            })
            .collect();
        all.sort_unstable();
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let at = |p: f64| {
            all.get(((all.len().max(1) - 1) as f64 * p).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        report.cross_window_p50_us = at(0.50);
        report.cross_window_p99_us = at(0.99);
        report.cross_window_max_us = all.last().copied().unwrap_or(0);
    }
    report
}
