//! The database feed: invalidation from MongoDB's change streams.
//!
//! ORM writes invalidate what they made stale themselves, at once. The feed
//! is the backstop for every other write: another service, a migration, the
//! raw driver, `Transaction::session()`, a writer that crashed between its
//! write and its invalidation. It watches the environment's database and
//! turns each committed change into the scopes the ORM would have
//! invalidated:
//!
//! * insert, update, replace, delete of a document: the record scope of its
//!   `_id` (formatted as the ORM formats ids) in `DATABASE.COLLECTION`, which
//!   also covers the collection's queries;
//! * drop or rename of a collection: the whole collection (both names);
//! * drop of the database, or the end of the stream (`invalidate`):
//!   everything under the prefix.
//!
//! Events of collections no model maps invalidate by collection name all the
//! same, so a model added later is covered.
//!
//! **It skips nothing.** An EarnORM write invalidates its own scopes once
//! MongoDB has acknowledged it, and its event then invalidates them a second
//! time. Skipping that echo would be sound only for an event known to be
//! that very write, invalidated after it became visible; nothing in a
//! change event says so. A reply's `operationTime` is not the write's time
//! (a server may give the latest time it has minted, another client's write
//! included), a statement of a multi-document transaction is stamped when it
//! runs but becomes visible only at its commit, and on a replica set a write
//! acknowledged by the primary alone (`w: 1`) may be followed in the oplog
//! by writes that commit before it. Every rule of the form "skip events up
//! to the time a writer noted" can therefore skip a write that became
//! visible after the writer's invalidation: a reader that cached the old
//! state in between would serve it until its TTL. So every event
//! invalidates, and the redundant invalidation is made cheap instead: the
//! events of one fetch from the server (up to [`BATCH`]) go to Redis in one
//! round trip, while the next ones are already being read. Its cost to readers: a value
//! cached between an EarnORM write's own invalidation and its echo (the
//! feed's lag, a few milliseconds) is computed once more.
//!
//! **One leader.** Of all environments sharing a prefix and a database, one
//! holds a lease in Redis (`PREFIX lease:feed:DATABASE`, renewed every
//! [`RENEW`] by a task of its own, lost after [`LEASE`]) and runs the change
//! stream; the others try to take it every [`FOLLOW`]. So one database write
//! costs one feed invalidation in Redis, whatever the number of processes.
//! The stream is read by a task of its own too, so that neither a slow
//! invalidation nor a slow read holds up the renewal, and a read in flight
//! is never cancelled. A leader steps down when it cannot renew before its
//! lease may have lapsed (Redis cut off: it tries to lead again as soon as
//! Redis answers), or when a read of the stream has not answered within
//! [`IDLE_POLL`] plus [`STALL`] (MongoDB cut off or frozen: it gives its
//! lease up and stays aside for [`STEP_ASIDE`]). Either way, what it has
//! read is invalidated before it leaves (queued while Redis cannot take
//! it). Another environment leads within [`FOLLOW`] of a step-down that gave
//! the lease up, and within [`LEASE`] plus [`FOLLOW`] of a leader's death,
//! then replays from the recorded token what the last leader may not have
//! invalidated.
//!
//! **Resumption.** After invalidating, the leader records the stream's resume
//! token in Redis (`PREFIX meta:feed:DATABASE:token`, at most every
//! [`PERSIST`]), so the next leader resumes where it stopped and replays what
//! the last one may not have invalidated (events are invalidated at least
//! once). A token the server can no longer resume from (history lost, or not
//! a valid token), or no token at all, makes the new leader open the stream
//! first and then invalidate everything under the prefix, so nothing between
//! the old stream and the new one is skipped.
//!
//! **Recovery.** Each time the leader has read the stream to the end, it
//! records the Redis server time before that read (`PREFIX
//! meta:feed:DATABASE:caught_up`; the earliest that clock can have read,
//! from the cache's last heartbeat): every write committed before it is
//! invalidated. This assumes a write acknowledged to its writer is already in
//! the stream, which holds for writes acknowledged by a majority (a one-node
//! replica set, or `w: majority`); a write acknowledged by the primary alone
//! (`w: 1` on several nodes) joins the stream only once a majority has it,
//! and the marker may run ahead of it by that replication lag. The stream
//! is read from the primary. The environment's cache follows that marker
//! (`CacheManager::follow_feed`): while it is fresh and later than the
//! cache's latest return of Redis, values without tags are served even
//! during the quarantine after an outage or while another manager has
//! missed its heartbeats, since whatever those managers could not
//! invalidate, the feed has. So hits come back as soon as the feed has
//! caught up after Redis returns, instead of after the quarantine.
//!
//! **Ready before use.** `Environment::connect` returns once the feed knows
//! its place: following, or leading with its stream open (and the reset of
//! a new stream done), so that a reset never wipes the first values a
//! program caches (at most [`READY_WAIT`], then a `warn`).
//!
//! Without change streams (a standalone server) the feed says so once at
//! `warn` and stays off; the cache then behaves as without it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use earnorm_cache::{CacheManager, InvalidationSource, Scope};
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::change_stream::event::{ChangeNamespace, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::Database;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::naming::{id_key, model_scope};

/// How long a leader's lease lasts without renewal: a leader that dies is
/// replaced within this, plus one [`FOLLOW`].
pub const LEASE: Duration = Duration::from_millis(600);
/// How often the leader renews its lease.
pub const RENEW: Duration = Duration::from_millis(120);
/// How often followers try to take the lease.
pub const FOLLOW: Duration = Duration::from_millis(100);
/// How long past [`IDLE_POLL`] a read of the stream may go unanswered before
/// the leader takes MongoDB for cut off and steps down.
pub const STALL: Duration = Duration::from_millis(300);
/// How long a leader that stepped down for a stalled stream leaves the lease
/// to the others before trying to lead again: a few of their tries, and
/// short, for when there are no others.
pub const STEP_ASIDE: Duration = Duration::from_millis(300);
/// How long `Environment::connect` waits at most for the feed to be ready.
pub const READY_WAIT: Duration = Duration::from_secs(5);
/// How often, at most, the leader records its resume token.
pub const PERSIST: Duration = Duration::from_millis(100);
/// Most events invalidated in one round trip to Redis.
pub const BATCH: usize = 1_000;
/// The pause after events fetched from the server, before the next fetch:
/// it adds at most this to the feed's lag, and divides the number of
/// `getMore`s under sustained writes.
pub const PACE: Duration = Duration::from_millis(2);
/// How long the server holds an idle poll of the stream open: the leader
/// records its caught-up time at least this often.
pub const IDLE_POLL: Duration = Duration::from_millis(100);
/// How often the leader looks for a stalled read.
const WATCHDOG: Duration = Duration::from_millis(25);

/// Server error codes meaning a token cannot be resumed from: history lost
/// (286, and 40576 on older servers), an invalid token (260, and 40647 on
/// older servers and wire-compatible ones), a fatal change-stream error (280).
const UNRESUMABLE: [i32; 5] = [286, 40576, 260, 40647, 280];
/// Server error codes meaning change streams are not available here (a
/// standalone server).
const UNSUPPORTED: [i32; 2] = [40573, 40324];

/// The feed's counters, shared with [`FeedStats`] snapshots.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    enabled: AtomicBool,
    leader: AtomicBool,
    events: AtomicU64,
    resumes: AtomicU64,
    resets: AtomicU64,
    handovers: AtomicU64,
    step_downs: AtomicU64,
    batches: AtomicU64,
    last_event_ms: AtomicU64,
    last_lag_ms: AtomicU64,
    max_lag_ms: AtomicU64,
}

/// What the database feed of an environment is doing, from
/// [`Environment::feed_stats`](crate::Environment::feed_stats).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FeedStats {
    /// Whether this environment runs a feed at all (on by default; off when
    /// `Config::feed` is false, when nothing is cached, or without change
    /// streams).
    pub enabled: bool,
    /// Whether this environment is the leader of its prefix and database
    /// and reads the change stream (set once the stream is open, and a reset
    /// that opening needed is done).
    pub leader: bool,
    /// Change events this environment turned into invalidations.
    pub events: u64,
    /// Streams this environment resumed from a recorded token.
    pub resumes: u64,
    /// Times it could not resume (history lost, invalid token, no token) and
    /// invalidated everything instead.
    pub resets: u64,
    /// Times it became the leader.
    pub handovers: u64,
    /// Times it stepped down while leading: its stream stalled (MongoDB cut
    /// off or frozen) or its lease could not be renewed in time.
    pub step_downs: u64,
    /// Round trips to Redis that invalidated events (each carries the
    /// events read together, up to [`BATCH`]).
    pub batches: u64,
    /// When it last processed an event, in milliseconds since the Unix epoch
    /// (0: never).
    pub last_event_ms: u64,
    /// Milliseconds from the last event's commit (its wall time on the
    /// server) to its invalidation.
    pub last_lag_ms: u64,
    /// The largest such lag seen.
    pub max_lag_ms: u64,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> FeedStats {
        FeedStats {
            enabled: self.enabled.load(Relaxed),
            leader: self.leader.load(Relaxed),
            events: self.events.load(Relaxed),
            resumes: self.resumes.load(Relaxed),
            resets: self.resets.load(Relaxed),
            handovers: self.handovers.load(Relaxed),
            step_downs: self.step_downs.load(Relaxed),
            batches: self.batches.load(Relaxed),
            last_event_ms: self.last_event_ms.load(Relaxed),
            last_lag_ms: self.last_lag_ms.load(Relaxed),
            max_lag_ms: self.max_lag_ms.load(Relaxed),
        }
    }
}

/// Everything a feed task needs.
pub(crate) struct Feed {
    pub(crate) database: Database,
    pub(crate) cache: CacheManager,
    pub(crate) counters: Arc<Counters>,
    /// Closed when the environment is dropped: the task ends.
    pub(crate) stop: watch::Receiver<()>,
    /// Set once the feed knows its place (see the module docs, "Ready
    /// before use").
    ready: watch::Sender<bool>,
    holder: String,
}

impl Feed {
    /// A feed, and what tells when it is ready.
    pub(crate) fn new(
        database: Database,
        cache: CacheManager,
        counters: Arc<Counters>,
        stop: watch::Receiver<()>,
    ) -> (Self, watch::Receiver<bool>) {
        counters.enabled.store(true, Relaxed);
        let holder = format!(
            "{}-{}",
            std::process::id(),
            mongodb::bson::oid::ObjectId::new().to_hex()
        );
        let (ready, is_ready) = watch::channel(false);
        let feed = Self {
            database,
            cache,
            counters,
            stop,
            ready,
            holder,
        };
        (feed, is_ready)
    }

    fn lease_name(&self) -> String {
        format!("feed:{}", self.database.name())
    }

    fn token_name(&self) -> String {
        format!("feed:{}:token", self.database.name())
    }

    fn marker_name(&self) -> String {
        marker_name(self.database.name())
    }

    fn stopped(&self) -> bool {
        self.stop.has_changed().is_err()
    }

    fn set_leader(&self, leading: bool) {
        self.counters.leader.store(leading, Relaxed);
        metrics::gauge!("earnorm_feed_leader", "database" => self.database.name().to_owned()).set(if leading {
            1.0
        } else {
            0.0
        });
    }

    /// Follows, leads when it holds the lease, until the environment goes.
    pub(crate) async fn run(mut self) {
        while !self.stopped() {
            let mut pause = FOLLOW;
            match self.cache.lease(&self.lease_name(), &self.holder, LEASE).await {
                Ok(true) => {
                    self.counters.handovers.fetch_add(1, Relaxed);
                    metrics::counter!("earnorm_feed_handovers_total").increment(1);
                    info!(database = self.database.name(), "database feed: leading");
                    let outcome = self.lead().await;
                    self.set_leader(false);
                    let _ = self.cache.release(&self.lease_name(), &self.holder).await;
                    match outcome {
                        Lead::Unsupported => {
                            self.counters.enabled.store(false, Relaxed);
                            self.ready.send_replace(true);
                            return;
                        }
                        Lead::Stopped => return,
                        Lead::Stalled | Lead::Unrenewed => {
                            self.counters.step_downs.fetch_add(1, Relaxed);
                            metrics::counter!("earnorm_feed_step_downs_total").increment(1);
                            if matches!(outcome, Lead::Stalled) {
                                pause = STEP_ASIDE;
                            }
                        }
                        Lead::Lost => {}
                    }
                }
                Ok(false) => {}
                Err(err) => debug!(error = %err, "database feed: lease unavailable"),
            }
            // Whatever happened, the feed knows its place now: following,
            // or done leading once (its stream was open, or could not be).
            self.ready.send_replace(true);
            // Try again after a while, or as soon as Redis is back.
            let mut status = self.cache.subscribe();
            status.mark_unchanged();
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                _ = status.changed(), if pause == FOLLOW => {}
                _ = self.stop.changed() => return,
            }
        }
    }

    /// Reads the change stream while this environment holds the lease: a
    /// task renews the lease, another reads the stream, and this one
    /// invalidates what they read, batch by batch, and watches both.
    async fn lead(&self) -> Lead {
        let (lost, mut renewal) = watch::channel(false);
        let _renewer = Abort(tokio::spawn(renew(
            self.cache.clone(),
            self.lease_name(),
            self.holder.clone(),
            lost,
        )));
        let opened = tokio::select! {
            opened = self.open() => opened,
            _ = renewal.changed() => Err(Lead::Unrenewed),
        };
        let stream = match opened {
            Ok(stream) => stream,
            Err(lead) => return lead,
        };
        // Leading from here: the stream is open, and a reset is done.
        self.set_leader(true);
        self.ready.send_replace(true);
        let (sender, mut reads) = mpsc::channel(16);
        let polling = Arc::new(Polling::default());
        let _reader = Abort(tokio::spawn(read(
            stream,
            self.cache.clone(),
            sender,
            Arc::clone(&polling),
        )));
        let mut stop = self.stop.clone();
        let mut watchdog = tokio::time::interval(WATCHDOG);
        let mut tokens = Tokens::default();
        let mut batch = Vec::with_capacity(BATCH);
        let outcome = loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break Lead::Stopped,
                _ = renewal.changed() => {
                    warn!(database = self.database.name(), "database feed: the lease could not be renewed in time; following");
                    break Lead::Unrenewed;
                }
                _ = watchdog.tick() => {
                    if let Some(waited) = polling.stalled(IDLE_POLL + STALL) {
                        warn!(database = self.database.name(), waited_ms = waited.as_millis(), "database feed: the change stream does not answer; stepping down");
                        break Lead::Stalled;
                    }
                }
                read = reads.recv_many(&mut batch, 8) => {
                    if read == 0 {
                        break Lead::Lost;
                    }
                    if let Some(lead) = self.apply(&mut batch, &mut tokens).await {
                        return lead;
                    }
                }
            }
        };
        // What was read is invalidated before leaving (queued while Redis
        // cannot take it, and replayed before any value is served again):
        // a successor would replay it from the recorded token too, but only
        // once it leads.
        self.set_leader(false);
        reads.close();
        while let Ok(read) = reads.try_recv() {
            batch.push(read);
        }
        if let Some(lead) = self.apply(&mut batch, &mut tokens).await {
            return lead;
        }
        self.record(&mut tokens).await;
        outcome
    }

    /// Opens the stream where the recorded token says, or anew after
    /// invalidating everything when it cannot resume. Waits on MongoDB at
    /// most [`IDLE_POLL`] plus [`STALL`] for each attempt.
    async fn open(&self) -> Result<ChangeStream<Change>, Lead> {
        let recorded = match self.cache.get_meta(&self.token_name()).await {
            Ok(bytes) => bytes.and_then(|bytes| decode_token(&bytes)),
            Err(err) => {
                debug!(error = %err, "database feed: cannot read the resume token");
                return Err(Lead::Lost);
            }
        };
        let limit = IDLE_POLL + STALL;
        if let Some(token) = recorded {
            match tokio::time::timeout(limit, self.watch().resume_after(token)).await {
                Err(_) => return Err(self.open_stalled()),
                Ok(Ok(stream)) => {
                    let stream = stream.with_type::<Change>();
                    self.counters.resumes.fetch_add(1, Relaxed);
                    metrics::counter!("earnorm_feed_resumes_total").increment(1);
                    return Ok(stream);
                }
                Ok(Err(err)) if error_code(&err).is_some_and(|code| UNRESUMABLE.contains(&code)) => {
                    warn!(database = self.database.name(), error = %err, "database feed: cannot resume (history lost or invalid token); invalidating everything");
                }
                Ok(Err(err)) => return Err(self.open_failed(&err)),
            }
        }
        let stream = match tokio::time::timeout(limit, self.watch()).await {
            Err(_) => return Err(self.open_stalled()),
            Ok(Ok(stream)) => stream.with_type::<Change>(),
            Ok(Err(err)) => return Err(self.open_failed(&err)),
        };
        // Opened first, then everything invalidated: no write falls between.
        if let Err(err) = self.cache.invalidate_all_from(InvalidationSource::Feed).await {
            debug!(error = %err, "database feed: could not invalidate everything; retrying");
            return Err(Lead::Lost);
        }
        self.counters.resets.fetch_add(1, Relaxed);
        metrics::counter!("earnorm_feed_resets_total").increment(1);
        if let Some(token) = stream.resume_token() {
            let _ = self.cache.set_meta(&self.token_name(), &encode_token(&token)).await;
        }
        Ok(stream)
    }

    /// A watch of the database, read from the primary (a secondary could lag
    /// behind writes already acknowledged), polling at most [`IDLE_POLL`],
    /// without the documents and update descriptions the feed does not read.
    fn watch(&self) -> mongodb::action::Watch<'_> {
        self.database
            .watch()
            .pipeline([doc! { "$project": { "fullDocument": 0, "updateDescription": 0 } }])
            .max_await_time(IDLE_POLL)
            .selection_criteria(mongodb::options::SelectionCriteria::ReadPreference(
                mongodb::options::ReadPreference::Primary,
            ))
    }

    fn open_stalled(&self) -> Lead {
        warn!(
            database = self.database.name(),
            "database feed: MongoDB does not answer the opening of the change stream; stepping down"
        );
        Lead::Stalled
    }

    fn open_failed(&self, err: &mongodb::error::Error) -> Lead {
        if error_code(err).is_some_and(|code| UNSUPPORTED.contains(&code)) {
            warn!(database = self.database.name(), "this MongoDB has no change streams (a standalone server): the database feed is off; writes outside EarnORM are not invalidated");
            Lead::Unsupported
        } else {
            warn!(database = self.database.name(), error = %err, "database feed: cannot open the change stream; retrying");
            Lead::Lost
        }
    }

    /// Invalidates what the reads of `batch` made stale, in as few round
    /// trips as it can (one, unless the batch holds the end of the stream or
    /// a dropped database), recording tokens and the caught-up time as it
    /// goes. `Some` when leading must end.
    async fn apply(&self, batch: &mut Vec<Read>, tokens: &mut Tokens) -> Option<Lead> {
        let mut pending = Pending::default();
        for read in batch.drain(..) {
            match read {
                Read::Events(events) => {
                    for event in events {
                        match effect(&event) {
                            Effect::Targets(targets) => pending.add(self.database.name(), targets, event),
                            Effect::Nothing => pending.pass(event),
                            Effect::Everything { ended } => {
                                self.flush(&mut pending, tokens).await;
                                if let Err(err) = self.cache.invalidate_all_from(InvalidationSource::Feed).await {
                                    debug!(error = %err, "database feed: could not invalidate everything");
                                }
                                pending.pass(event);
                                self.flush(&mut pending, tokens).await;
                                if ended {
                                    // The stream ended (`invalidate`): start anew.
                                    let _ = self.cache.set_meta(&self.token_name(), b"").await;
                                    return Some(Lead::Lost);
                                }
                            }
                        }
                    }
                }
                Read::CaughtUp { polled, token } => {
                    // Read to the end: every write committed before that
                    // poll began is invalidated once the events before it are.
                    self.flush(&mut pending, tokens).await;
                    tokens.unrecorded = token.or(tokens.unrecorded.take());
                    self.record(tokens).await;
                    if let Some(at) = polled {
                        if let Err(err) = self.cache.mark_caught_up(&self.marker_name(), at).await {
                            debug!(error = %err, "database feed: could not record the caught-up time");
                        }
                    }
                }
                Read::Failed(err) => {
                    self.flush(&mut pending, tokens).await;
                    self.record(tokens).await;
                    if error_code(&err).is_some_and(|code| UNRESUMABLE.contains(&code)) {
                        // Its history is gone: the next leader must start
                        // anew and invalidate everything, not resume into
                        // this error.
                        warn!(database = self.database.name(), error = %err, "database feed: the change stream cannot go on; starting anew");
                        let _ = self.cache.set_meta(&self.token_name(), b"").await;
                    } else {
                        warn!(database = self.database.name(), error = %err, "database feed: the change stream failed; resuming");
                    }
                    return Some(Lead::Lost);
                }
            }
        }
        self.flush(&mut pending, tokens).await;
        if tokens.persisted.elapsed() >= PERSIST {
            self.record(tokens).await;
        }
        None
    }

    /// Invalidates the scopes of the events gathered in `pending`, in one
    /// round trip, then counts those events and notes the last one's token.
    async fn flush(&self, pending: &mut Pending, tokens: &mut Tokens) {
        if pending.events.is_empty() {
            return;
        }
        if !pending.scopes.is_empty() {
            let scopes: Vec<Scope<'_>> = pending
                .scopes
                .iter()
                .map(|(model, id)| match id {
                    Some(id) => Scope::Record(model, id),
                    None => Scope::Model(model),
                })
                .collect();
            debug!(
                events = pending.events.len(),
                scopes = scopes.len(),
                "database feed: invalidating"
            );
            // Never fails: what cannot reach Redis now is queued, and
            // replayed before any value is served again.
            // The earliest write of the batch: a time before each of them.
            let at = pending
                .events
                .iter()
                .map(|event| event.cluster_time.map_or(0, crate::read_times::logical))
                .min()
                .unwrap_or(0);
            let watch = self.cache.watch_write_at(&scopes, InvalidationSource::Feed, at).await;
            self.cache.invalidate_from(&scopes, InvalidationSource::Feed).await;
            drop(watch);
            self.counters.batches.fetch_add(1, Relaxed);
        }
        let now = now_ms();
        let count = u64::try_from(pending.events.len()).unwrap_or(u64::MAX);
        self.counters.events.fetch_add(count, Relaxed);
        metrics::counter!("earnorm_feed_events_total").increment(count);
        self.counters.last_event_ms.store(now, Relaxed);
        for event in &pending.events {
            if let Some(wall) = event.wall_time {
                let lag = now.saturating_sub(u64::try_from(wall.timestamp_millis()).unwrap_or(0));
                self.counters.last_lag_ms.store(lag, Relaxed);
                #[allow(clippy::cast_precision_loss)]
                metrics::histogram!("earnorm_feed_lag_seconds").record(lag as f64 / 1000.0);
                self.counters.max_lag_ms.fetch_max(lag, Relaxed);
            }
        }
        if let Some(last) = pending.events.last() {
            tokens.unrecorded = Some(last.id.clone());
        }
        pending.scopes.clear();
        pending.events.clear();
    }

    /// Records the token of the last invalidated event, if not yet done.
    async fn record(&self, tokens: &mut Tokens) {
        tokens.persisted = Instant::now();
        if let Some(token) = tokens.unrecorded.take() {
            // The same token again: written at most once a second (Redis
            // may have lost it meanwhile, restarted empty).
            if tokens
                .recorded
                .as_ref()
                .is_some_and(|(recorded, at)| *recorded == token && at.elapsed() < Duration::from_secs(1))
            {
                return;
            }
            match self.cache.set_meta(&self.token_name(), &encode_token(&token)).await {
                Ok(()) => tokens.recorded = Some((token, Instant::now())),
                Err(err) => {
                    debug!(error = %err, "database feed: could not record the resume token");
                    tokens.unrecorded = Some(token);
                }
            }
        }
    }
}

/// Renews the lease `name` of `holder` every [`RENEW`] until it is lost, or
/// may have lapsed for want of an answer: then says so through `lost`.
async fn renew(cache: CacheManager, name: String, holder: String, lost: watch::Sender<bool>) {
    // The lease was taken just before this task started: it lasts at least
    // LEASE from then.
    let mut held_from = Instant::now();
    loop {
        tokio::time::sleep(RENEW).await;
        // Redis runs the renewal after it is sent: the lease lasts at least
        // LEASE from here once the answer says it is held.
        let sent = Instant::now();
        match cache.lease(&name, &holder, LEASE).await {
            Ok(true) => held_from = sent,
            Ok(false) => break,
            Err(err) => {
                debug!(error = %err, "database feed: could not renew the lease");
                // Another try would come after RENEW: step down unless the
                // lease surely outlives it.
                if held_from.elapsed() + RENEW * 2 >= LEASE {
                    break;
                }
            }
        }
    }
    lost.send_replace(true);
}

/// When the reader's current read of the stream began, if one is in flight.
#[derive(Debug)]
struct Polling {
    epoch: Instant,
    /// Microseconds from `epoch` to the start of the read in flight, plus
    /// one; 0 when none is.
    since: AtomicU64,
}

impl Default for Polling {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            since: AtomicU64::new(0),
        }
    }
}

impl Polling {
    fn begin(&self) {
        let micros = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.since.store(micros + 1, Relaxed);
    }

    fn end(&self) {
        self.since.store(0, Relaxed);
    }

    /// How long the read in flight has waited, if longer than `limit`.
    fn stalled(&self, limit: Duration) -> Option<Duration> {
        let since = self.since.load(Relaxed);
        if since == 0 {
            return None;
        }
        let began = self.epoch + Duration::from_micros(since - 1);
        let waited = began.elapsed();
        (waited > limit).then_some(waited)
    }
}

/// The parts of a change event the feed reads (the stream sends no more:
/// see [`Feed::watch`]).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Change {
    /// Resumes the stream after this event.
    #[serde(rename = "_id")]
    id: ResumeToken,
    /// `insert`, `update`, `drop`...: kept as written, so that a kind this
    /// code does not know is ignored instead of failing the stream.
    operation_type: String,
    /// The collection written, dropped or renamed.
    ns: Option<ChangeNamespace>,
    /// A renamed collection's new name.
    to: Option<ChangeNamespace>,
    /// The `_id` of the document written.
    document_key: Option<Document>,
    /// When the write committed, on the server's clock.
    wall_time: Option<DateTime>,
    /// The write's logical time (what the cache's consistency monitor
    /// compares with when values were read).
    cluster_time: Option<mongodb::bson::Timestamp>,
}

/// What the reader passes on.
enum Read {
    /// Events read together: those of one fetch from the server (the
    /// driver's buffer, drained), at most [`BATCH`].
    Events(Vec<Change>),
    /// The stream was read to its end by a poll that began when the Redis
    /// server's clock read at least `polled`; `token` resumes after it.
    CaughtUp {
        polled: Option<i64>,
        token: Option<ResumeToken>,
    },
    /// The stream failed; the reader has stopped.
    Failed(mongodb::error::Error),
}

/// Reads `stream` into `reads` until it fails or `reads` closes, telling
/// `polling` when each read that waits on the server begins and ends. The
/// events one fetch brought (the driver's buffer) are passed on together:
/// a read that the buffer answers completes when first polled, and the
/// first one that does not (a fetch from the server has begun) is when the
/// gathered events go, before it is awaited (never cancelled). After events
/// fetched from the server, it pauses [`PACE`] before awaiting the next
/// fetch, so that under sustained writes one `getMore` brings many.
async fn read(mut stream: ChangeStream<Change>, cache: CacheManager, reads: mpsc::Sender<Read>, polling: Arc<Polling>) {
    let mut gathered: Vec<Change> = Vec::new();
    loop {
        // The earliest the server's clock can read as this poll begins: if
        // it finds the stream empty, every write committed before that is
        // invalidated once what came before is.
        let polled = cache.server_time_at_least();
        let next = {
            let mut next = std::pin::pin!(stream.next_if_any());
            match futures_util::poll!(next.as_mut()) {
                std::task::Poll::Ready(next) => next,
                std::task::Poll::Pending => {
                    if !gathered.is_empty() {
                        if reads.send(Read::Events(std::mem::take(&mut gathered))).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(PACE).await;
                    }
                    polling.begin();
                    let next = next.await;
                    polling.end();
                    next
                }
            }
        };
        let read = match next {
            Ok(Some(event)) => {
                gathered.push(event);
                if gathered.len() < BATCH {
                    continue;
                }
                Read::Events(std::mem::take(&mut gathered))
            }
            Ok(None) => {
                if !gathered.is_empty() && reads.send(Read::Events(std::mem::take(&mut gathered))).await.is_err() {
                    return;
                }
                Read::CaughtUp {
                    polled,
                    token: stream.resume_token(),
                }
            }
            Err(err) => {
                if !gathered.is_empty() {
                    let _ = reads.send(Read::Events(std::mem::take(&mut gathered))).await;
                }
                let _ = reads.send(Read::Failed(err)).await;
                return;
            }
        };
        if reads.send(read).await.is_err() {
            return;
        }
    }
}

/// The events of a batch not yet invalidated, and the scopes they touch:
/// `(model, Some(id))` for a record, `(model, None)` for a whole model.
#[derive(Default)]
struct Pending {
    scopes: std::collections::HashSet<(String, Option<String>)>,
    events: Vec<Change>,
}

impl Pending {
    fn add(&mut self, database: &str, targets: Vec<Target>, event: Change) {
        for target in targets {
            let scope = match target {
                Target::Record { collection, id } => (model_scope(database, &collection), Some(id)),
                Target::Collection(collection) => (model_scope(database, &collection), None),
            };
            self.scopes.insert(scope);
        }
        self.events.push(event);
    }

    /// An event that touches no scope (counted with the others).
    fn pass(&mut self, event: Change) {
        self.events.push(event);
    }
}

/// What a change event made stale.
#[derive(Debug, PartialEq, Eq)]
enum Effect {
    /// These records and collections.
    Targets(Vec<Target>),
    /// Everything under the prefix; `ended`: the stream ends here.
    Everything { ended: bool },
    /// Nothing cached.
    Nothing,
}

/// A record or a collection a change event touched.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// The record whose `_id` has this key form (see `id_key`).
    Record { collection: String, id: String },
    /// A whole collection.
    Collection(String),
}

/// What `event` made stale: a document written, its record (or its whole
/// collection when its id has no key form); a collection dropped or
/// renamed, that collection (both names); the database dropped or the
/// stream ended, everything.
fn effect(event: &Change) -> Effect {
    let collection = event.ns.as_ref().and_then(|ns| ns.coll.clone());
    match event.operation_type.as_str() {
        "insert" | "update" | "replace" | "delete" => {
            let Some(collection) = collection else {
                return Effect::Nothing;
            };
            let id = event
                .document_key
                .as_ref()
                .and_then(|key| key.get("_id"))
                .and_then(|id| id_key(id).ok());
            Effect::Targets(vec![match id {
                Some(id) => Target::Record { collection, id },
                None => Target::Collection(collection),
            }])
        }
        "drop" | "rename" => {
            let renamed = event.to.as_ref().and_then(|to| to.coll.clone());
            Effect::Targets(collection.into_iter().chain(renamed).map(Target::Collection).collect())
        }
        "dropDatabase" => Effect::Everything { ended: false },
        "invalidate" => Effect::Everything { ended: true },
        _ => Effect::Nothing,
    }
}

/// Aborts a task when dropped: the helpers of a leadership end with it.
struct Abort(tokio::task::JoinHandle<()>);

impl Drop for Abort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The leader's resume tokens: the latest not yet recorded in Redis, and
/// the one last recorded, with when (an idle stream's token does not
/// change, and is not written again at every poll).
struct Tokens {
    unrecorded: Option<ResumeToken>,
    recorded: Option<(ResumeToken, Instant)>,
    /// When tokens were last recorded (or found already recorded).
    persisted: Instant,
}

impl Default for Tokens {
    fn default() -> Self {
        Self {
            unrecorded: None,
            recorded: None,
            persisted: Instant::now(),
        }
    }
}

/// How a leadership ended.
enum Lead {
    /// The lease was lost, or the stream failed: follow, then try again.
    Lost,
    /// The lease could not be renewed before it may have lapsed (Redis cut
    /// off): follow, and lead again as soon as the lease is free.
    Unrenewed,
    /// MongoDB did not answer: follow, and leave the lease to the others
    /// for [`STEP_ASIDE`].
    Stalled,
    /// The environment is gone.
    Stopped,
    /// The server has no change streams.
    Unsupported,
}

/// The name of the caught-up marker of `database`'s feed.
pub(crate) fn marker_name(database: &str) -> String {
    format!("feed:{database}:caught_up")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The server's error code, if the error carries one.
fn error_code(err: &mongodb::error::Error) -> Option<i32> {
    match err.kind.as_ref() {
        mongodb::error::ErrorKind::Command(command) => Some(command.code),
        _ => None,
    }
}

/// A resume token as stored in Redis: the BSON document `{ t: token }`.
fn encode_token(token: &ResumeToken) -> Vec<u8> {
    mongodb::bson::serialize_to_bson(token)
        .ok()
        .and_then(|t| mongodb::bson::serialize_to_vec(&doc! { "t": t }).ok())
        .unwrap_or_default()
}

fn decode_token(bytes: &[u8]) -> Option<ResumeToken> {
    let document: Document = mongodb::bson::deserialize_from_slice(bytes).ok()?;
    let token: &Bson = document.get("t")?;
    mongodb::bson::deserialize_from_bson(token.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_garbage_is_no_token() {
        assert!(decode_token(b"").is_none());
        assert!(decode_token(b"not bson").is_none());
        let token: ResumeToken =
            mongodb::bson::deserialize_from_bson(Bson::Document(doc! { "_data": "8263A1" })).expect("token");
        assert_eq!(decode_token(&encode_token(&token)), Some(token));
    }

    /// A change event as the server sends it (with the fields the feed's
    /// projection leaves).
    fn change(event: Document) -> Change {
        let mut event = event;
        event.insert("_id", doc! { "_data": "8263A1" });
        let bytes = mongodb::bson::serialize_to_vec(&event).expect("bson");
        mongodb::bson::deserialize_from_slice(&bytes).expect("a change event")
    }

    fn record(collection: &str, id: &str) -> Target {
        Target::Record {
            collection: collection.to_owned(),
            id: id.to_owned(),
        }
    }

    #[test]
    fn a_written_document_touches_its_record() {
        let id = mongodb::bson::oid::ObjectId::new();
        for op in ["insert", "update", "replace", "delete"] {
            let event = change(doc! {
                "operationType": op,
                "ns": { "db": "shop", "coll": "users" },
                "documentKey": { "_id": id },
            });
            assert_eq!(
                effect(&event),
                Effect::Targets(vec![record("users", &id.to_hex())]),
                "{op}"
            );
        }
        // Ids are keyed as the ORM keys them: a string id, an integer id.
        let event = change(
            doc! { "operationType": "update", "ns": { "db": "d", "coll": "c" }, "documentKey": { "_id": 42_i64 } },
        );
        assert_eq!(effect(&event), Effect::Targets(vec![record("c", "42")]));
        let event = change(
            doc! { "operationType": "delete", "ns": { "db": "d", "coll": "c" }, "documentKey": { "_id": "ab" } },
        );
        assert_eq!(effect(&event), Effect::Targets(vec![record("c", "ab")]));
    }

    #[test]
    fn a_document_without_an_id_touches_its_whole_collection() {
        let event = change(doc! { "operationType": "update", "ns": { "db": "d", "coll": "c" }, "documentKey": {} });
        assert_eq!(effect(&event), Effect::Targets(vec![Target::Collection("c".into())]));
    }

    #[test]
    fn collections_dropped_or_renamed_and_the_database_dropped() {
        let event = change(doc! { "operationType": "drop", "ns": { "db": "d", "coll": "c" } });
        assert_eq!(effect(&event), Effect::Targets(vec![Target::Collection("c".into())]));
        let event = change(doc! {
            "operationType": "rename",
            "ns": { "db": "d", "coll": "old" },
            "to": { "db": "d", "coll": "new" },
        });
        assert_eq!(
            effect(&event),
            Effect::Targets(vec![Target::Collection("old".into()), Target::Collection("new".into())])
        );
        let event = change(doc! { "operationType": "dropDatabase", "ns": { "db": "d" } });
        assert_eq!(effect(&event), Effect::Everything { ended: false });
        let event = change(doc! { "operationType": "invalidate" });
        assert_eq!(effect(&event), Effect::Everything { ended: true });
        let event = change(doc! { "operationType": "createIndexes", "ns": { "db": "d", "coll": "c" } });
        assert_eq!(effect(&event), Effect::Nothing);
        let event = change(doc! { "operationType": "insert", "documentKey": { "_id": 1 } });
        assert_eq!(effect(&event), Effect::Nothing, "no collection named");
    }

    #[test]
    fn a_batch_gathers_each_scope_once() {
        let mut pending = Pending::default();
        for id in ["1", "2", "1"] {
            let event = change(
                doc! { "operationType": "update", "ns": { "db": "d", "coll": "c" }, "documentKey": { "_id": id } },
            );
            let Effect::Targets(targets) = effect(&event) else {
                panic!("targets");
            };
            pending.add("d", targets, event);
        }
        assert_eq!(pending.events.len(), 3);
        assert_eq!(pending.scopes.len(), 2);
        assert!(pending.scopes.contains(&("d.c".to_owned(), Some("1".to_owned()))));
    }

    #[test]
    fn a_read_in_flight_is_stalled_only_past_its_limit() {
        let polling = Polling::default();
        assert_eq!(polling.stalled(Duration::ZERO), None, "no read in flight");
        polling.begin();
        assert_eq!(polling.stalled(Duration::from_secs(60)), None);
        std::thread::sleep(Duration::from_millis(2));
        assert!(polling.stalled(Duration::from_millis(1)).is_some());
        polling.end();
        assert_eq!(polling.stalled(Duration::ZERO), None);
    }
}
