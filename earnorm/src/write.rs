//! Writes, as actions like reads: `user.save()`, `user.delete()`,
//! `User::update_many(filter, update)`, ... are awaited as they are (in the
//! current environment) or configured first: `.in_env(&env)` runs one in
//! another environment, `.session(&mut tx)` inside a transaction, where its
//! writes are applied, and what they made stale invalidated, at the commit.
//!
//! What this module alone owns: how a write is prepared (ids, timestamps,
//! the version a versioned write expects and moves to) and sent, with one
//! code path for both places a write runs. Outside a transaction every write
//! goes through the write unit (`transaction::write_then_invalidate`), which
//! a caller cannot split from its invalidation by dropping the future;
//! inside one, the scopes it touches are remembered before it is sent, for
//! the commit. Partial updates (`update`, `update_one`, `upsert_one`) have
//! their own room, `update.rs`: they validate the record the server made.

use std::future::Future;

use mongodb::bson::{doc, Bson, Document};
use mongodb::{ClientSession, Collection};

use crate::action::{actions, Place};
use crate::document::{to_bson, to_document};
use crate::naming::record_id;
use crate::transaction::{write_then_invalidate, Invalidate, Touched};
use crate::update;
use crate::{Environment, Error, Model, ModelId, Result, ValidationErrors};

/// Awaits a driver action, inside `session` when there is one (the driver's
/// actions share no trait for it).
macro_rules! in_session {
    ($action:expr, $session:expr) => {{
        let action = $action;
        match $session {
            Some(session) => action.session(session).await,
            None => action.await,
        }
    }};
}

/// A write as it goes to MongoDB: owning all it needs, so that outside a
/// transaction it can run in a task of its own.
trait Op: Send + 'static {
    type Output: Send + 'static;

    /// Sends the write to `coll` (the collection of `M`), in `session` when
    /// there is one.
    fn send<M: Model>(
        self,
        coll: Collection<Document>,
        session: Option<&mut ClientSession>,
    ) -> impl Future<Output = Result<Self::Output>> + Send;
}

/// Sends `op` to the collection of `M` where `place` says, touching
/// `touched`: outside a transaction as one unit with its invalidation (as
/// `when` says); inside one in its session, `touched` remembered first (a
/// write cancelled half-way may still commit with the transaction).
async fn run_op<M: Model, O: Op>(
    place: Place<'_>,
    touched: Vec<Touched>,
    when: Invalidate,
    op: O,
) -> Result<O::Output> {
    match place {
        Place::Env(env) => {
            let send = op.send::<M>(env.documents(M::COLLECTION), None);
            write_then_invalidate(&env, touched, when, send).await
        }
        Place::Tx(tx) => {
            let (env, session, remembered) = tx.parts();
            remembered.extend(touched);
            op.send::<M>(env.documents(M::COLLECTION), Some(session)).await
        }
    }
}

actions! {
    Save<'a>: () = "save";
    Delete<'a>: bool = "delete";
    InsertMany<'a>: () = "insert_many";
    UpdateMany: u64 = "update_many";
    DeleteMany: u64 = "delete_many";
}

/// Saving a record: `user.save()` (see [`Model::save`]).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug)]
pub struct Save<'a, M> {
    record: &'a mut M,
    env: Option<Environment>,
}

impl<'a, M: Model> Save<'a, M> {
    pub(crate) fn new(record: &'a mut M) -> Self {
        Self { record, env: None }
    }

    async fn run(self, place: Place<'_>) -> Result<()> {
        let record = self.record;
        record.before_save()?;
        let Prepared {
            op,
            touched,
            generated,
            previous_version,
        } = Prepared::save(record)?;
        let result = run_op::<M, _>(place, vec![touched], Invalidate::IfWritten, op).await;
        settle(generated, previous_version, record, result)?;
        record.after_save();
        Ok(())
    }
}

/// Deleting a record: `user.delete()` (see [`Model::delete`]).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug)]
pub struct Delete<'a, M> {
    record: &'a M,
    env: Option<Environment>,
}

impl<'a, M: Model> Delete<'a, M> {
    pub(crate) fn new(record: &'a M) -> Self {
        Self { record, env: None }
    }

    async fn run(self, place: Place<'_>) -> Result<bool> {
        let record = self.record;
        record.before_delete()?;
        let target = delete_target(record)?;
        let touched = target.touched.clone();
        let existed = run_op::<M, _>(place, vec![touched], Invalidate::IfWritten, target).await?;
        record.after_delete();
        Ok(existed)
    }
}

/// Inserting many records at once: `User::insert_many(&mut records)` (see
/// [`Model::insert_many`]).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug)]
pub struct InsertMany<'a, M> {
    records: &'a mut [M],
    env: Option<Environment>,
}

impl<'a, M: Model> InsertMany<'a, M> {
    pub(crate) fn new(records: &'a mut [M]) -> Self {
        Self { records, env: None }
    }

    async fn run(self, place: Place<'_>) -> Result<()> {
        let records = self.records;
        if records.is_empty() {
            return Ok(());
        }
        // Every check first (hooks, validation, ids), so that a batch
        // refused part-way leaves no record changed: a retry then stores
        // what a first attempt would have.
        for record in records.iter_mut() {
            record.before_save()?;
        }
        let mut all = ValidationErrors::new();
        for record in records.iter() {
            if let Err(errors) = record.validate() {
                all.errors.extend(errors.errors);
            }
        }
        all.into_result()?;
        if records.iter().any(|record| record.id().is_none()) && <M::Id as ModelId>::generate().is_none() {
            return Err(Error::Id(format!(
                "{}: this id type is not generated; set ids before inserting",
                M::COLLECTION
            )));
        }
        let now = mongodb::bson::DateTime::now();
        for record in records.iter_mut() {
            record.stamp(now, true);
            if let Some(version) = M::VERSION_FIELD.and(record.version()) {
                record.set_version(version.max(0).saturating_add(1));
            }
            if record.id().is_none() {
                record.set_id(<M::Id as ModelId>::generate());
            }
        }
        let documents = records.iter().map(to_document).collect::<Result<Vec<_>>>()?;
        // Part of a failed batch may have been written: a failure
        // invalidates too (see `Error::may_have_written`).
        run_op::<M, _>(
            place,
            vec![Touched::Model(M::COLLECTION)],
            Invalidate::Always,
            Bulk::Insert(documents),
        )
        .await?;
        for record in records.iter() {
            record.after_save();
        }
        Ok(())
    }
}

/// Updating every record matching a filter: `User::update_many(filter,
/// update)` (see [`Model::update_many`]).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug)]
pub struct UpdateMany<M> {
    target: update::Target,
    env: Option<Environment>,
    model: std::marker::PhantomData<fn() -> M>,
}

impl<M: Model> UpdateMany<M> {
    pub(crate) fn new(filter: Document, update: Document) -> Self {
        let target = update::Target::new(filter, update, false);
        let model = std::marker::PhantomData;
        Self {
            target,
            env: None,
            model,
        }
    }

    async fn run(self, place: Place<'_>) -> Result<u64> {
        let op = Bulk::Update {
            filter: self.target.filter,
            update: update::bulk::<M>(self.target.update)?,
        };
        run_op::<M, _>(place, vec![Touched::Model(M::COLLECTION)], Invalidate::IfWritten, op).await
    }
}

/// Deleting every record matching a filter: `User::delete_many(filter)`
/// (see [`Model::delete_many`]).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug)]
pub struct DeleteMany<M> {
    filter: Document,
    env: Option<Environment>,
    model: std::marker::PhantomData<fn() -> M>,
}

impl<M: Model> DeleteMany<M> {
    pub(crate) fn new(filter: Document) -> Self {
        Self {
            filter,
            env: None,
            model: std::marker::PhantomData,
        }
    }

    async fn run(self, place: Place<'_>) -> Result<u64> {
        let op = Bulk::Delete(self.filter);
        run_op::<M, _>(place, vec![Touched::Model(M::COLLECTION)], Invalidate::IfWritten, op).await
    }
}

/// The scope a write to the record with this id touches: the record's, or
/// the whole model's when the id has no key form.
fn record_scope<M: Model>(id: &M::Id) -> Touched {
    match record_id::<M>(id) {
        Ok(key) => Touched::Record(M::COLLECTION, key),
        Err(_) => Touched::Model(M::COLLECTION),
    }
}

/// A save as prepared: what it sends, and what to put back on the record
/// if nothing was written.
struct Prepared {
    op: SaveOp,
    touched: Touched,
    /// The id was generated for this insert (taken back if nothing was written).
    generated: bool,
    /// The version of the copy before this save (put back if nothing was
    /// written), for versioned models.
    previous_version: Option<i64>,
}

/// What `save` sends: an insert of a new record or a replacement by id.
enum SaveOp {
    Insert(Document),
    Replace {
        filter: Document,
        document: Document,
        /// Insert when nothing matches (an unversioned save, or the first
        /// save of a versioned record with an assigned id).
        upsert: bool,
        /// The version the filter expects, for versioned models: nothing
        /// matching is a [`Error::Conflict`].
        expected: Option<(String, i64)>,
    },
}

impl Prepared {
    /// Validates `record`, gives it an id if it needs one, moves a versioned
    /// record to its next version, and builds the write.
    fn save<M: Model>(record: &mut M) -> Result<Self> {
        record.validate()?;
        let generated = record.id().is_none();
        if generated {
            let id = <M::Id as ModelId>::generate().ok_or_else(|| {
                Error::Id(format!(
                    "{}: this id type is not generated; set the id before saving",
                    M::COLLECTION
                ))
            })?;
            record.set_id(Some(id));
        }
        record.stamp(mongodb::bson::DateTime::now(), generated);
        let previous_version = M::VERSION_FIELD.map(|_| record.version().unwrap_or(0));
        if let Some(version) = previous_version {
            record.set_version(version.saturating_add(1));
        }
        let built = (|| {
            let id = record
                .id()
                .ok_or_else(|| Error::Id(format!("{}: no id", M::COLLECTION)))?;
            let touched = record_scope::<M>(id);
            let document = to_document(&*record)?;
            let op = if generated {
                SaveOp::Insert(document)
            } else {
                let mut filter = doc! { "_id": to_bson(id)? };
                let expected = match (M::VERSION_FIELD, previous_version) {
                    (Some(field), Some(version)) => {
                        filter.insert(field, update::version_filter(version));
                        Some((record_id::<M>(id).unwrap_or_default(), version))
                    }
                    _ => None,
                };
                SaveOp::Replace {
                    filter,
                    document,
                    upsert: expected.as_ref().is_none_or(|(_, version)| *version == 0),
                    expected,
                }
            };
            Ok(Self {
                op,
                touched,
                generated,
                previous_version,
            })
        })();
        if built.is_err() {
            undo(record, generated, previous_version);
        }
        built
    }
}

/// Puts the id and version back as they were before [`Prepared::save`].
fn undo<M: Model>(record: &mut M, generated: bool, previous_version: Option<i64>) {
    if generated {
        record.set_id(None);
    }
    if let Some(version) = previous_version {
        record.set_version(version);
    }
}

/// Takes a `generated` id (and a versioned record's new version) back when
/// the write surely wrote nothing, so that a retry inserts (or saves the
/// same version); keeps them when it may have been written, so that a retry
/// updates that record instead of inserting a second one.
fn settle<M: Model>(generated: bool, previous_version: Option<i64>, record: &mut M, result: Result<()>) -> Result<()> {
    if matches!(&result, Err(err) if !err.may_have_written()) {
        undo(record, generated, previous_version);
    }
    result
}

impl Op for SaveOp {
    type Output = ();

    async fn send<M: Model>(self, coll: Collection<Document>, session: Option<&mut ClientSession>) -> Result<()> {
        match self {
            SaveOp::Insert(document) => in_session!(coll.insert_one(document), session)
                .map(|_| ())
                .map_err(|e| Error::from_mongo(M::COLLECTION, e)),
            SaveOp::Replace {
                filter,
                document,
                upsert,
                expected,
            } => {
                let result = in_session!(coll.replace_one(filter, document).upsert(upsert), session);
                let conflict = |(id, version): (String, i64)| Error::Conflict {
                    model: M::COLLECTION,
                    id,
                    version,
                };
                match (result.map_err(|e| Error::from_mongo(M::COLLECTION, e)), expected) {
                    (Ok(done), Some(expected)) if done.matched_count == 0 && done.upserted_id.is_none() => {
                        Err(conflict(expected))
                    }
                    (Ok(_), _) => Ok(()),
                    // A first save of a versioned record whose id is
                    // taken: someone saved it first.
                    (Err(Error::DuplicateKey { .. }), Some(expected)) => Err(conflict(expected)),
                    (Err(err), _) => Err(err),
                }
            }
        }
    }
}

/// What deleting a record sends: by id, and for a versioned model only
/// over the copy's own version.
struct DeleteTarget {
    filter: Document,
    touched: Touched,
    /// A versioned copy's id key and version: a delete that matches nothing
    /// while the record exists is a conflict.
    expected: Option<(String, i64)>,
}

/// The filter and scope of deleting `record`.
fn delete_target<M: Model>(record: &M) -> Result<DeleteTarget> {
    let id = record
        .id()
        .ok_or_else(|| Error::Id(format!("{}: cannot delete a record without an id", M::COLLECTION)))?;
    let mut filter = doc! { "_id": to_bson(id)? };
    let mut expected = None;
    if let Some(field) = M::VERSION_FIELD {
        let version = record.version().unwrap_or(0);
        filter.insert(field, update::version_filter(version));
        expected = Some((record_id::<M>(id).unwrap_or_default(), version));
    }
    Ok(DeleteTarget {
        filter,
        touched: record_scope::<M>(id),
        expected,
    })
}

/// Deletes by the target; whether it deleted. A versioned copy that deleted
/// nothing while its record still exists is outdated: `Conflict`.
impl Op for DeleteTarget {
    type Output = bool;

    async fn send<M: Model>(self, coll: Collection<Document>, mut session: Option<&mut ClientSession>) -> Result<bool> {
        let mongo = |e| Error::from_mongo(M::COLLECTION, e);
        let DeleteTarget { filter, expected, .. } = self;
        let id = filter.get("_id").cloned().unwrap_or(Bson::Null);
        let deleted = in_session!(coll.delete_one(filter), session.as_deref_mut())
            .map_err(mongo)?
            .deleted_count
            > 0;
        match expected {
            Some((key, version)) if !deleted => {
                let exists = in_session!(coll.count_documents(doc! { "_id": id }), session).map_err(mongo)? > 0;
                if exists {
                    Err(Error::Conflict {
                        model: M::COLLECTION,
                        id: key,
                        version,
                    })
                } else {
                    Ok(false)
                }
            }
            _ => Ok(deleted),
        }
    }
}

/// A write of many documents: how many it inserted, modified or deleted.
enum Bulk {
    Insert(Vec<Document>),
    Update { filter: Document, update: Document },
    Delete(Document),
}

impl Op for Bulk {
    type Output = u64;

    async fn send<M: Model>(self, coll: Collection<Document>, session: Option<&mut ClientSession>) -> Result<u64> {
        let count = match self {
            Bulk::Insert(documents) => {
                in_session!(coll.insert_many(documents), session).map(|r| r.inserted_ids.len() as u64)
            }
            Bulk::Update { filter, update } => {
                in_session!(coll.update_many(filter, update), session).map(|r| r.modified_count)
            }
            Bulk::Delete(filter) => in_session!(coll.delete_many(filter), session).map(|r| r.deleted_count),
        };
        count.map_err(|e| Error::from_mongo(M::COLLECTION, e))
    }
}
