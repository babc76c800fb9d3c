//! Partial updates of one record (`record.update`, `Model::update_one`,
//! `Model::upsert_one`): an update document applied by MongoDB, the
//! resulting record validated before it commits, the record's scope
//! invalidated after.
//!
//! How validation works: the update runs in a transaction of its own. The
//! server applies it (`findOneAndUpdate`, returning the new document); the
//! new document is read back into the model and validated; a record that
//! fails is rolled back (the transaction aborted: nothing written, nothing
//! invalidated), one that passes is committed. What it costs: the commit, one
//! more round trip to MongoDB, and a server that supports transactions (a
//! replica set or a sharded cluster, as in production and in
//! `docker-compose.yml`).
//!
//! Concurrent writers of one record: the server refuses all but one of
//! them with a transient transaction error (`WriteConflict`); the whole
//! transaction is then run again (and a commit whose outcome is unknown is
//! committed again), as MongoDB's drivers specify for their transaction
//! API, with a growing pause, for at most [`RETRY_FOR`]. A concurrent
//! upsert that loses the race to insert the same record (a duplicate key)
//! is run again once: it then updates the record the other one inserted.
//!
//! Versions: for a versioned model every update moves the version on
//! (`$inc`, which also stores the first version, 1, when an upsert
//! inserts), and an update that names the version field itself is refused.

use std::time::{Duration, Instant};

use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{TRANSIENT_TRANSACTION_ERROR, UNKNOWN_TRANSACTION_COMMIT_RESULT};
use mongodb::options::ReturnDocument;

use crate::action::{actions, Place};
use crate::document::to_bson;
use crate::transaction::{write_then_invalidate_found, Found, Invalidate, Touched};
use crate::{Environment, Error, Model, Result, Transaction};

/// What an update targets and how.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) filter: Document,
    pub(crate) update: Document,
    pub(crate) upsert: bool,
}

impl Target {
    pub(crate) fn new(filter: Document, update: Document, upsert: bool) -> Self {
        Self { filter, update, upsert }
    }
}

/// How long, at most, a partial update keeps running its transaction again
/// after transient errors (concurrent writers of the same record).
pub const RETRY_FOR: Duration = Duration::from_secs(5);

/// Runs `target` in a transaction, validating the result; returns the
/// record as it is now, or `None` when nothing matched (and nothing was
/// written). Transient transaction errors are retried (see the module docs).
pub(crate) async fn update_validated<M: Model>(env: &Environment, mut target: Target) -> Result<Option<M>> {
    prepare::<M>(&mut target)?;
    let coll = env.documents(M::COLLECTION);
    let client = env.client().clone();
    // Until the record is known, a failure that may have written
    // invalidates the whole model.
    let found = Found::new(vec![Touched::Model(M::COLLECTION)]);
    let narrowed = found.clone();
    let write = async move {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let mut upsert_raced = false;
        loop {
            let outcome = attempt::<M>(&client, &coll, &target, &narrowed).await;
            match outcome {
                Err(Attempt::Transient(_)) if started.elapsed() < RETRY_FOR => {}
                Err(Attempt::Failed(err @ Error::DuplicateKey { .. })) if target.upsert && !upsert_raced => {
                    // Another upsert inserted the record first: this one
                    // now updates it.
                    tracing::debug!(error = %err, "an upsert lost the race to insert; running it again");
                    upsert_raced = true;
                    continue;
                }
                Err(Attempt::Transient(err)) => return Err(Error::from_mongo(M::COLLECTION, err)),
                Err(Attempt::Failed(err)) => return Err(err),
                Ok(record) => return Ok(record),
            }
            tokio::time::sleep(pause.mul_f64(0.5 + jitter())).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    };
    write_then_invalidate_found(env, found, Invalidate::IfWritten, write).await
}

/// Runs `target` inside the caller's transaction `tx`: applied by the
/// server in its session, the result read back and validated; returns the
/// record as it is now in the transaction, or `None` when nothing matched.
/// Its scope is invalidated at the commit. A result that fails validation
/// (or does not decode) cannot be taken back alone, since MongoDB has no
/// partial rollback: the transaction is doomed, and its `commit` aborts it
/// (`Error::TransactionAborted`). Transient errors are not retried here:
/// they are the caller's transaction's to run again.
pub(crate) async fn update_in_transaction<M: Model>(tx: &mut Transaction, mut target: Target) -> Result<Option<M>> {
    prepare::<M>(&mut target)?;
    // Doomed until its result is validated: a caller that stops waiting
    // between the update and the validation leaves an unchecked write in
    // the transaction, which must then not commit.
    let doomed_before = tx.is_doomed();
    tx.doom(format!(
        "{}: a partial update inside it was stopped before its result was validated",
        M::COLLECTION
    ));
    let checked = update_then_validate::<M>(tx, target).await;
    match &checked {
        Ok(_) if !doomed_before => tx.lift_doom(),
        Ok(_) => {}
        Err(err) => {
            if !doomed_before {
                tx.lift_doom();
            }
            tx.doom(format!("{}: a partial update inside it failed: {err}", M::COLLECTION));
        }
    }
    checked
}

/// The update of [`update_in_transaction`], sent and its result checked.
async fn update_then_validate<M: Model>(tx: &mut Transaction, target: Target) -> Result<Option<M>> {
    let (env, session, touched) = tx.parts();
    // Until the record is known, a write cancelled half-way may still
    // commit: the whole model is remembered first.
    touched.push(Touched::Model(M::COLLECTION));
    let updated = env
        .documents(M::COLLECTION)
        .find_one_and_update(target.filter, target.update)
        .upsert(target.upsert)
        .return_document(ReturnDocument::After)
        .session(session)
        .await
        .map_err(|e| Error::from_mongo(M::COLLECTION, e))?;
    let Some(document) = updated else {
        touched.pop();
        return Ok(None);
    };
    let decoded = mongodb::bson::deserialize_from_document::<M>(document.clone())
        .map_err(|e| Error::decode(M::COLLECTION, e).locate::<M>(Some(document)));
    let checked = decoded.and_then(|record| {
        if let Some(id) = record.id_key() {
            touched.pop();
            touched.push(Touched::Record(M::COLLECTION, id));
        }
        record.validate().map(|()| record).map_err(Error::Validation)
    });
    checked.map(Some)
}

/// Applying an update document to one record: `record.update(update)`
/// (see [`Model::update`]).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug)]
pub struct Update<'a, M> {
    record: &'a mut M,
    update: Document,
    env: Option<Environment>,
}

/// Applying an update document to the first record matching a filter:
/// `User::update_one(filter, update)` (see [`Model::update_one`]).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug)]
pub struct UpdateOne<M> {
    target: Target,
    env: Option<Environment>,
    model: std::marker::PhantomData<fn() -> M>,
}

/// [`UpdateOne`], inserting when nothing matches: `User::upsert_one(filter,
/// update)` (see [`Model::upsert_one`]).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug)]
pub struct UpsertOne<M> {
    target: Target,
    env: Option<Environment>,
    model: std::marker::PhantomData<fn() -> M>,
}

actions! {
    Update<'a>: bool = "update";
    UpdateOne: Option<M> = "update_one";
    UpsertOne: M = "upsert_one";
}

/// Runs `target` where `place` says.
async fn run_at<M: Model>(place: Place<'_>, target: Target) -> Result<Option<M>> {
    match place {
        Place::Env(env) => update_validated::<M>(&env, target).await,
        Place::Tx(tx) => update_in_transaction::<M>(tx, target).await,
    }
}

impl<'a, M: Model> Update<'a, M> {
    pub(crate) fn new(record: &'a mut M, update: Document) -> Self {
        Self {
            record,
            update,
            env: None,
        }
    }

    async fn run(self, place: Place<'_>) -> Result<bool> {
        let record = self.record;
        let target = record_target(&*record, self.update)?;
        match run_at::<M>(place, target).await? {
            Some(updated) => {
                *record = updated;
                Ok(true)
            }
            None => match (M::VERSION_FIELD, record.version(), record.id_key()) {
                (Some(_), Some(version), Some(id)) => Err(Error::Conflict {
                    model: M::COLLECTION,
                    id,
                    version,
                }),
                _ => Ok(false),
            },
        }
    }
}

impl<M: Model> UpdateOne<M> {
    pub(crate) fn new(filter: Document, update: Document) -> Self {
        let target = Target::new(filter, update, false);
        let model = std::marker::PhantomData;
        Self {
            target,
            env: None,
            model,
        }
    }

    async fn run(self, place: Place<'_>) -> Result<Option<M>> {
        run_at::<M>(place, self.target).await
    }
}

impl<M: Model> UpsertOne<M> {
    pub(crate) fn new(filter: Document, update: Document) -> Self {
        let target = Target::new(filter, update, true);
        let model = std::marker::PhantomData;
        Self {
            target,
            env: None,
            model,
        }
    }

    async fn run(self, place: Place<'_>) -> Result<M> {
        run_at::<M>(place, self.target)
            .await?
            .ok_or_else(|| Error::Id(format!("{}: the upsert returned no record", M::COLLECTION)))
    }
}

/// How one run of an update's transaction failed.
enum Attempt {
    /// The server says running it again may succeed.
    Transient(mongodb::error::Error),
    /// Anything else.
    Failed(Error),
}

impl From<Error> for Attempt {
    fn from(err: Error) -> Self {
        Attempt::Failed(err)
    }
}

/// Runs the update's transaction once (committing again while the commit's
/// outcome is unknown).
async fn attempt<M: Model>(
    client: &mongodb::Client,
    coll: &mongodb::Collection<Document>,
    target: &Target,
    narrowed: &Found,
) -> std::result::Result<Option<M>, Attempt> {
    let transient = |e: mongodb::error::Error| {
        if e.contains_label(TRANSIENT_TRANSACTION_ERROR) {
            Attempt::Transient(e)
        } else {
            Attempt::Failed(Error::from_mongo(M::COLLECTION, e))
        }
    };
    let mut session = client.start_session().await.map_err(transient)?;
    session.start_transaction().await.map_err(transient)?;
    let updated = coll
        .find_one_and_update(target.filter.clone(), target.update.clone())
        .upsert(target.upsert)
        .return_document(ReturnDocument::After)
        .session(&mut session)
        .await
        .map_err(transient)?;
    let Some(document) = updated else {
        narrowed.set(Vec::new());
        let _ = session.abort_transaction().await;
        return Ok(None);
    };
    let record: M = mongodb::bson::deserialize_from_document(document.clone())
        .map_err(|e| Error::decode(M::COLLECTION, e).locate::<M>(Some(document)))?;
    if let Some(id) = record.id_key() {
        narrowed.set(vec![Touched::Record(M::COLLECTION, id)]);
    }
    if let Err(errors) = record.validate() {
        let _ = session.abort_transaction().await;
        return Err(Attempt::Failed(Error::Validation(errors)));
    }
    let started = Instant::now();
    loop {
        match session.commit_transaction().await {
            Ok(()) => return Ok(Some(record)),
            Err(e) if e.contains_label(UNKNOWN_TRANSACTION_COMMIT_RESULT) && started.elapsed() < RETRY_FOR => {}
            Err(e) => return Err(transient(e)),
        }
    }
}

/// A number in [0, 0.5): the jitter of the pauses between runs, so that
/// writers that clashed do not clash again in step.
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    // A fresh randomly keyed hasher: random enough for a pause, no crate.
    let bits = std::collections::hash_map::RandomState::new().build_hasher().finish();
    #[allow(clippy::cast_precision_loss)]
    let unit = (bits >> 11) as f64 / (1_u64 << 53) as f64;
    unit / 2.0
}

/// Checks an update document and adds what the ORM writes with it: the
/// timestamps, and for a versioned model the move to the next version.
fn prepare<M: Model>(target: &mut Target) -> Result<()> {
    target.update = bulk::<M>(std::mem::take(&mut target.update))?;
    stamp::<M>(target);
    Ok(())
}

/// The update document of a bulk update (`update_many`): checked, and for
/// a versioned model moving every record it matches to its next version.
pub(crate) fn bulk<M: Model>(mut update: Document) -> Result<Document> {
    check_update::<M>(&update)?;
    if let Some(field) = M::VERSION_FIELD {
        if let Some(inc) = operator(&mut update, "$inc") {
            inc.insert(field, 1);
        }
    }
    Ok(update)
}

/// Refuses an update document whose operators are not documents
/// (`{"$inc": 5}`), or, for a versioned model, that touches the version
/// field (the ORM moves it).
pub(crate) fn check_update<M: Model>(update: &Document) -> Result<()> {
    let invalid = |reason: String| Error::InvalidUpdate {
        model: M::COLLECTION,
        reason,
    };
    for (name, fields) in update {
        if !name.starts_with('$') {
            // A replacement document: the server refuses it with its own message.
            continue;
        }
        let Bson::Document(fields) = fields else {
            return Err(invalid(format!("the value of `{name}` is not a document")));
        };
        if let Some(version) = M::VERSION_FIELD {
            let touches =
                |path: &str| path == version || path.strip_prefix(version).is_some_and(|rest| rest.starts_with('.'));
            if fields.keys().any(|path| touches(path)) {
                return Err(invalid(format!(
                    "`{name}` touches the version field `{version}`, which the ORM moves itself"
                )));
            }
        }
    }
    Ok(())
}

/// Adds the timestamps to an update: `updated_at` to the time of the
/// update (`$currentDate`, the server's clock), `created_at` to now when an
/// upsert inserts (`$setOnInsert`).
fn stamp<M: Model>(target: &mut Target) {
    if let Some(field) = M::UPDATED_AT_FIELD {
        if let Some(dates) = operator(&mut target.update, "$currentDate") {
            dates.insert(field, true);
        }
    }
    if let (Some(field), true) = (M::CREATED_AT_FIELD, target.upsert) {
        if let Some(on_insert) = operator(&mut target.update, "$setOnInsert") {
            on_insert.insert(field, mongodb::bson::DateTime::now());
        }
    }
}

/// The operator document `name` of `update`, created empty if absent (or
/// replacing a value that is not a document, which the server would refuse).
fn operator<'a>(update: &'a mut Document, name: &str) -> Option<&'a mut Document> {
    if !matches!(update.get(name), Some(mongodb::bson::Bson::Document(_))) {
        update.insert(name, Document::new());
    }
    update.get_document_mut(name).ok()
}

/// `record.update(update)`: the record's own filter (and version, for a
/// versioned model, whose update also moves it to the next version).
pub(crate) fn record_target<M: Model>(record: &M, update: Document) -> Result<Target> {
    let id = record
        .id()
        .ok_or_else(|| Error::Id(format!("{}: cannot update a record without an id", M::COLLECTION)))?;
    let mut filter = doc! { "_id": to_bson(id)? };
    if let (Some(field), Some(version)) = (M::VERSION_FIELD, record.version()) {
        filter.insert(field, version_filter(version));
    }
    Ok(Target {
        filter,
        update,
        upsert: false,
    })
}

/// What a filter matches for a record at `version`: a stored document
/// without a version field reads as version 0, so version 0 matches one.
pub(crate) fn version_filter(version: i64) -> Bson {
    if version == 0 {
        Bson::Document(doc! { "$in": [0_i64, Bson::Null] })
    } else {
        Bson::Int64(version)
    }
}
