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

use mongodb::bson::{doc, Document};
use mongodb::options::ReturnDocument;

use crate::model::{raw_collection, to_bson};
use crate::transaction::{write_then_invalidate_found, Found, Invalidate, Touched};
use crate::{Environment, Error, Model, Result};

/// What an update targets and how.
pub(crate) struct Target {
    pub(crate) filter: Document,
    pub(crate) update: Document,
    pub(crate) upsert: bool,
}

/// Runs `target` in a transaction, validating the result; returns the
/// record as it is now, or `None` when nothing matched (and nothing was
/// written).
pub(crate) async fn update_validated<M: Model>(env: &Environment, mut target: Target) -> Result<Option<M>> {
    stamp::<M>(&mut target);
    let coll = raw_collection::<M>(env);
    let client = env.client().clone();
    // Until the record is known, a failure that may have written
    // invalidates the whole model.
    let found = Found::new(vec![Touched::Model(M::COLLECTION)]);
    let narrowed = found.clone();
    let write = async move {
        let mongo = |e| Error::from_mongo(M::COLLECTION, e);
        let mut session = client.start_session().await.map_err(Error::Mongo)?;
        session.start_transaction().await.map_err(Error::Mongo)?;
        let updated = coll
            .find_one_and_update(target.filter, target.update)
            .upsert(target.upsert)
            .return_document(ReturnDocument::After)
            .session(&mut session)
            .await
            .map_err(mongo)?;
        let Some(document) = updated else {
            narrowed.set(Vec::new());
            let _ = session.abort_transaction().await;
            return Ok(None);
        };
        let record: M = mongodb::bson::deserialize_from_document(document)?;
        if let Some(id) = record.id_key() {
            narrowed.set(vec![Touched::Record(M::COLLECTION, id)]);
        }
        if let Err(errors) = record.validate() {
            let _ = session.abort_transaction().await;
            return Err(Error::Validation(errors));
        }
        session.commit_transaction().await.map_err(Error::Mongo)?;
        Ok(Some(record))
    };
    let op = if target.upsert { "upsert_one" } else { "update_one" };
    tracing::Instrument::instrument(
        write_then_invalidate_found(env, found, Invalidate::IfWritten, write),
        crate::op_span(M::COLLECTION, op),
    )
    .await
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
pub(crate) fn record_target<M: Model>(record: &M, mut update: Document) -> Result<Target> {
    let id = record
        .id()
        .ok_or_else(|| Error::Id(format!("{}: cannot update a record without an id", M::COLLECTION)))?;
    let mut filter = doc! { "_id": to_bson(id)? };
    if let (Some(field), Some(version)) = (M::VERSION_FIELD, record.version()) {
        filter.insert(field, version);
        if let Some(inc) = operator(&mut update, "$inc") {
            inc.insert(field, 1);
        }
    }
    Ok(Target {
        filter,
        update,
        upsert: false,
    })
}
