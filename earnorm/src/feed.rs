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
//! same, so a model added later is covered. An EarnORM write runs in a
//! session of its own, so it knows its cluster time; when its invalidation
//! reaches Redis, it leaves a note there (`PREFIX
//! meta:feed:DATABASE:done:COLLECTION[:ID]`, for a minute) that everything
//! up to that time is invalidated, and the feed skips the write's event
//! instead of invalidating again (which would also refuse to store a value
//! computed just after the write). Events of writes up to that time are
//! covered by the writer's invalidation, which came after them.
//!
//! **One leader.** Of all environments sharing a prefix and a database, one
//! holds a lease in Redis (`PREFIX lease:feed:DATABASE`, renewed every
//! [`RENEW`], lost after [`LEASE`]) and runs the change stream; the others
//! wait to take over. So one database write costs one feed invalidation in
//! Redis, whatever the number of processes, and a leader that dies or is cut
//! off is replaced within [`LEASE`] plus one [`RENEW`].
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
//! Without change streams (a standalone server) the feed says so once at
//! `warn` and stays off; the cache then behaves as without it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use earnorm_cache::{CacheManager, InvalidationSource, Scope};
use mongodb::bson::{doc, Bson, Document};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::change_stream::ChangeStream;
use mongodb::Database;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::env::model_scope;
use crate::model::id_key;

/// How long a leader's lease lasts without renewal: a leader that dies or
/// is cut off from Redis is replaced within this, plus one [`RENEW`].
pub const LEASE: Duration = Duration::from_millis(1500);
/// How often the leader renews its lease, and followers try to take it.
pub const RENEW: Duration = Duration::from_millis(250);
/// How often, at most, the leader records its resume token.
pub const PERSIST: Duration = Duration::from_millis(100);
/// The pause after an event fetched from the server, before the next fetch:
/// it adds at most this to the feed's lag, and divides the number of
/// `getMore`s under sustained writes.
pub const PACE: Duration = Duration::from_millis(2);
/// A poll that took at least this long went to the server.
const FETCHED: Duration = Duration::from_micros(100);
/// How long the server holds an idle poll of the stream open: the leader
/// records its caught-up time at least this often.
pub const IDLE_POLL: Duration = Duration::from_millis(100);

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
    skipped: AtomicU64,
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
    /// `Config::feed` is false, without Redis, or without change streams).
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
    /// Events it did not invalidate again because their writer (EarnORM)
    /// had invalidated them itself and left a note saying so.
    pub skipped: u64,
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
            skipped: self.skipped.load(Relaxed),
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
    holder: String,
}

impl Feed {
    pub(crate) fn new(
        database: Database,
        cache: CacheManager,
        counters: Arc<Counters>,
        stop: watch::Receiver<()>,
    ) -> Self {
        counters.enabled.store(true, Relaxed);
        let holder = format!(
            "{}-{}",
            std::process::id(),
            mongodb::bson::oid::ObjectId::new().to_hex()
        );
        Self {
            database,
            cache,
            counters,
            stop,
            holder,
        }
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

    /// A watch of the database, read from the primary (a secondary could lag
    /// behind writes already acknowledged), polling at most [`IDLE_POLL`].
    fn watch(&self) -> mongodb::action::Watch<'_> {
        self.database.watch().max_await_time(IDLE_POLL).selection_criteria(
            mongodb::options::SelectionCriteria::ReadPreference(mongodb::options::ReadPreference::Primary),
        )
    }

    fn stopped(&self) -> bool {
        self.stop.has_changed().is_err()
    }

    /// Follows, leads when it holds the lease, until the environment goes.
    pub(crate) async fn run(mut self) {
        while !self.stopped() {
            match self.cache.lease(&self.lease_name(), &self.holder, LEASE).await {
                Ok(true) => {
                    self.counters.handovers.fetch_add(1, Relaxed);
                    metrics::counter!("earnorm_feed_handovers_total").increment(1);
                    info!(database = self.database.name(), "database feed: leading");
                    let outcome = self.lead().await;
                    self.counters.leader.store(false, Relaxed);
                    metrics::gauge!("earnorm_feed_leader", "database" => self.database.name().to_owned()).set(0.0);
                    let _ = self.cache.release(&self.lease_name(), &self.holder).await;
                    match outcome {
                        Lead::Unsupported => {
                            self.counters.enabled.store(false, Relaxed);
                            return;
                        }
                        Lead::Stopped => return,
                        Lead::Lost => {}
                    }
                }
                Ok(false) => {}
                Err(err) => debug!(error = %err, "database feed: lease unavailable"),
            }
            // Try again after a while, or as soon as Redis is back.
            let mut status = self.cache.subscribe();
            status.mark_unchanged();
            tokio::select! {
                () = tokio::time::sleep(RENEW) => {}
                _ = status.changed() => {}
                _ = self.stop.changed() => return,
            }
        }
    }

    /// Reads the change stream while this environment holds the lease.
    /// Each time it has read to the end, it records in Redis the server
    /// time up to which every write is invalidated (the caught-up marker,
    /// see `CacheManager::follow_feed`).
    async fn lead(&self) -> Lead {
        let mut stream = match self.open().await {
            Ok(stream) => stream,
            Err(lead) => return lead,
        };
        // Leading from here: the stream is open, and a reset is done.
        self.counters.leader.store(true, Relaxed);
        metrics::gauge!("earnorm_feed_leader", "database" => self.database.name().to_owned()).set(1.0);
        let mut stop = self.stop.clone();
        let mut renewed = Instant::now();
        let mut persisted = Instant::now();
        let mut tokens = Tokens::default();
        loop {
            if renewed.elapsed() >= RENEW {
                if !matches!(
                    self.cache.lease(&self.lease_name(), &self.holder, LEASE).await,
                    Ok(true)
                ) {
                    warn!(database = self.database.name(), "database feed: lease lost; following");
                    return Lead::Lost;
                }
                renewed = Instant::now();
            }
            // The earliest the server's clock can read as this poll begins:
            // if it finds the stream empty, every write committed before
            // that is invalidated.
            let polled = self.cache.server_time_at_least();
            let asked = Instant::now();
            let next = tokio::select! {
                _ = stop.changed() => {
                    self.record(&mut tokens).await;
                    return Lead::Stopped;
                }
                next = stream.next_if_any() => next,
            };
            // An event that took a round trip to the server (not one the
            // driver had buffered): before the next round trip, let a few
            // milliseconds of writes gather, so that under sustained writes
            // one `getMore` brings many events instead of one each.
            let fetched = asked.elapsed() >= FETCHED;
            match next {
                Ok(Some(event)) => {
                    let ended = self.apply(&event).await;
                    tokens.unrecorded = stream.resume_token();
                    if ended {
                        // The stream ended (`invalidate`): start anew.
                        let _ = self.cache.set_meta(&self.token_name(), b"").await;
                        return Lead::Lost;
                    }
                    if fetched {
                        tokio::time::sleep(PACE).await;
                    }
                }
                Ok(None) => {
                    // Read to the end: every write committed before the poll
                    // began is invalidated.
                    tokens.unrecorded = stream.resume_token().or(tokens.unrecorded.take());
                    self.record(&mut tokens).await;
                    persisted = Instant::now();
                    if let Some(at) = polled {
                        if let Err(err) = self.cache.mark_caught_up(&self.marker_name(), at).await {
                            debug!(error = %err, "database feed: could not record the caught-up time");
                        }
                    }
                }
                Err(err) if error_code(&err).is_some_and(|code| UNRESUMABLE.contains(&code)) => {
                    // Its history is gone: the next leader must start anew
                    // and invalidate everything, not resume into this error.
                    warn!(database = self.database.name(), error = %err, "database feed: the change stream cannot go on; starting anew");
                    let _ = self.cache.set_meta(&self.token_name(), b"").await;
                    return Lead::Lost;
                }
                Err(err) => {
                    warn!(database = self.database.name(), error = %err, "database feed: the change stream failed; resuming");
                    self.record(&mut tokens).await;
                    return Lead::Lost;
                }
            }
            if persisted.elapsed() >= PERSIST {
                self.record(&mut tokens).await;
                persisted = Instant::now();
            }
        }
    }

    /// Opens the stream where the recorded token says, or anew after
    /// invalidating everything when it cannot resume.
    async fn open(&self) -> Result<ChangeStream<ChangeStreamEvent<Document>>, Lead> {
        let recorded = match self.cache.get_meta(&self.token_name()).await {
            Ok(bytes) => bytes.and_then(|bytes| decode_token(&bytes)),
            Err(err) => {
                debug!(error = %err, "database feed: cannot read the resume token");
                return Err(Lead::Lost);
            }
        };
        if let Some(token) = recorded {
            match self
                .database
                .watch()
                .resume_after(token)
                .max_await_time(IDLE_POLL)
                .await
            {
                Ok(stream) => {
                    self.counters.resumes.fetch_add(1, Relaxed);
                    metrics::counter!("earnorm_feed_resumes_total").increment(1);
                    return Ok(stream);
                }
                Err(err) if error_code(&err).is_some_and(|code| UNRESUMABLE.contains(&code)) => {
                    warn!(database = self.database.name(), error = %err, "database feed: cannot resume (history lost or invalid token); invalidating everything");
                }
                Err(err) => return Err(self.open_failed(&err)),
            }
        }
        let stream = match self.watch().await {
            Ok(stream) => stream,
            Err(err) => return Err(self.open_failed(&err)),
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

    fn open_failed(&self, err: &mongodb::error::Error) -> Lead {
        if error_code(err).is_some_and(|code| UNSUPPORTED.contains(&code)) {
            warn!(database = self.database.name(), "this MongoDB has no change streams (a standalone server): the database feed is off; writes outside EarnORM are not invalidated");
            Lead::Unsupported
        } else {
            warn!(database = self.database.name(), error = %err, "database feed: cannot open the change stream; retrying");
            Lead::Lost
        }
    }

    /// Invalidates what `event` made stale; returns whether the stream ended.
    async fn apply(&self, event: &ChangeStreamEvent<Document>) -> bool {
        let database = self.database.name();
        let collection = event.ns.as_ref().and_then(|ns| ns.coll.clone());
        let ended = match &event.operation_type {
            OperationType::Insert | OperationType::Update | OperationType::Replace | OperationType::Delete => {
                if let Some(collection) = collection {
                    let model = model_scope(database, &collection);
                    let id = event
                        .document_key
                        .as_ref()
                        .and_then(|key| key.get("_id"))
                        .and_then(|id| id_key(id).ok());
                    match (id, event.cluster_time) {
                        (Some(id), Some(at)) => {
                            // Skipped when its writer left a note that it
                            // invalidated this write (or a later one) itself.
                            let notes = [
                                done_note(database, &collection, Some(&id)),
                                done_note(database, &collection, None),
                            ];
                            let scopes = [Scope::Record(&model, &id)];
                            let outcome = self
                                .cache
                                .invalidate_unless_noted(&scopes, &notes, &cluster_time(at))
                                .await;
                            debug!(collection = %collection, id = %id, at = %cluster_time(at), ?outcome, "database feed: an event");
                            match outcome {
                                Ok(true) => {}
                                Ok(false) => {
                                    self.counters.skipped.fetch_add(1, Relaxed);
                                    metrics::counter!("earnorm_feed_skipped_total").increment(1);
                                }
                                Err(_) => self.cache.invalidate_from(&scopes, InvalidationSource::Feed).await,
                            }
                        }
                        (Some(id), None) => {
                            self.cache
                                .invalidate_from(&[Scope::Record(&model, &id)], InvalidationSource::Feed)
                                .await
                        }
                        (None, _) => {
                            self.cache
                                .invalidate_from(&[Scope::Model(&model)], InvalidationSource::Feed)
                                .await
                        }
                    }
                }
                false
            }
            OperationType::Drop | OperationType::Rename => {
                let renamed = event.to.as_ref().and_then(|to| to.coll.clone());
                let models: Vec<String> = collection
                    .iter()
                    .chain(renamed.iter())
                    .map(|coll| model_scope(database, coll))
                    .collect();
                let scopes: Vec<Scope<'_>> = models.iter().map(|m| Scope::Model(m)).collect();
                self.cache.invalidate_from(&scopes, InvalidationSource::Feed).await;
                false
            }
            OperationType::DropDatabase | OperationType::Invalidate => {
                if let Err(err) = self.cache.invalidate_all_from(InvalidationSource::Feed).await {
                    debug!(error = %err, "database feed: could not invalidate everything");
                }
                matches!(event.operation_type, OperationType::Invalidate)
            }
            _ => false,
        };
        self.counters.events.fetch_add(1, Relaxed);
        metrics::counter!("earnorm_feed_events_total").increment(1);
        let now = now_ms();
        self.counters.last_event_ms.store(now, Relaxed);
        if let Some(wall) = event.wall_time {
            let lag = now.saturating_sub(u64::try_from(wall.timestamp_millis()).unwrap_or(0));
            self.counters.last_lag_ms.store(lag, Relaxed);
            #[allow(clippy::cast_precision_loss)]
            metrics::histogram!("earnorm_feed_lag_seconds").record(lag as f64 / 1000.0);
            self.counters.max_lag_ms.fetch_max(lag, Relaxed);
        }
        ended
    }

    /// Records the token of the last invalidated event, if not yet done.
    async fn record(&self, tokens: &mut Tokens) {
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

/// The leader's resume tokens: the latest not yet recorded in Redis, and
/// the one last recorded, with when (an idle stream's token does not
/// change, and is not written again at every poll).
#[derive(Default)]
struct Tokens {
    unrecorded: Option<ResumeToken>,
    recorded: Option<(ResumeToken, Instant)>,
}

/// How a leadership ended.
enum Lead {
    /// The lease was lost, or the stream failed: follow, then try again.
    Lost,
    /// The environment is gone.
    Stopped,
    /// The server has no change streams.
    Unsupported,
}

/// The note a writer leaves for the feed once it has invalidated its own
/// write to `collection` (one record, or the whole collection for a bulk
/// write): the write's cluster time (see [`cluster_time`]). The feed skips
/// events of that record (or collection) up to that time.
pub(crate) fn done_note(database: &str, collection: &str, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("feed:{database}:done:{collection}:{id}"),
        None => format!("feed:{database}:done:{collection}"),
    }
}

/// A cluster time as a string that sorts as the time does.
pub(crate) fn cluster_time(at: mongodb::bson::Timestamp) -> String {
    format!("{:010}{:010}", at.time, at.increment)
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
    }
}
