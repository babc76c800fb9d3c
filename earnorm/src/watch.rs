//! Typed change events of a model: `User::watch()`.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use mongodb::bson::{Document, Timestamp};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use mongodb::options::FullDocumentType;

use crate::{Environment, Error, Model, Result};

/// What happened to a record (or to the collection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChangeKind {
    /// A record was inserted.
    Insert,
    /// A record was updated in place (some fields).
    Update,
    /// A record was replaced whole (as `save` does).
    Replace,
    /// A record was deleted.
    Delete,
    /// The collection was dropped.
    Drop,
    /// The collection was renamed.
    Rename,
    /// The stream ended: the collection is gone; watch again to go on.
    Invalidate,
    /// Another kind of event (an index change, for one).
    Other,
}

/// One change of a model's collection, as [`Model::watch`] reports it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ChangeEvent<M: Model> {
    /// What happened.
    pub kind: ChangeKind,
    /// The id of the record it happened to (none for collection events).
    pub id: Option<M::Id>,
    /// The record as it was right after the change, for inserts, replaces
    /// and updates (read by the server after the update, so possibly
    /// later than this change when writes follow closely); none for
    /// deletes.
    pub record: Option<M>,
    /// For updates: the fields set, as stored.
    pub updated_fields: Option<Document>,
    /// For updates: the fields removed.
    pub removed_fields: Vec<String>,
    /// The cluster time of the change.
    pub at: Option<Timestamp>,
}

/// Typed change events (see [`Model::watch`]).
pub type ChangeEvents<M> = Pin<Box<dyn Stream<Item = Result<ChangeEvent<M>>> + Send>>;

/// Opens a change stream on the collection of `M`. The stream resumes by
/// itself after a network error (the driver keeps its resume token); a
/// record that does not decode into `M` is an `Err` item, and the stream
/// goes on.
pub(crate) async fn watch<M: Model>(env: &Environment) -> Result<ChangeEvents<M>> {
    let stream = env
        .database()
        .collection::<Document>(M::COLLECTION)
        .watch()
        .full_document(FullDocumentType::UpdateLookup)
        .await
        .map_err(|e| Error::from_mongo(M::COLLECTION, e))?;
    Ok(Box::pin(stream.map(|event| {
        event
            .map_err(|e| Error::from_mongo(M::COLLECTION, e))
            .and_then(typed::<M>)
    })))
}

fn typed<M: Model>(event: ChangeStreamEvent<Document>) -> Result<ChangeEvent<M>> {
    let kind = match event.operation_type {
        OperationType::Insert => ChangeKind::Insert,
        OperationType::Update => ChangeKind::Update,
        OperationType::Replace => ChangeKind::Replace,
        OperationType::Delete => ChangeKind::Delete,
        OperationType::Drop => ChangeKind::Drop,
        OperationType::Rename => ChangeKind::Rename,
        OperationType::Invalidate => ChangeKind::Invalidate,
        _ => ChangeKind::Other,
    };
    let id = match event.document_key.as_ref().and_then(|key| key.get("_id")) {
        Some(id) => Some(mongodb::bson::deserialize_from_bson::<M::Id>(id.clone())?),
        None => None,
    };
    let record = match event.full_document {
        Some(document) => Some(
            mongodb::bson::deserialize_from_document::<M>(document.clone())
                .map_err(|e| Error::decode(M::COLLECTION, e).locate::<M>(Some(document)))?,
        ),
        None => None,
    };
    let (updated_fields, removed_fields) = match event.update_description {
        Some(description) => (Some(description.updated_fields), description.removed_fields),
        None => (None, Vec::new()),
    };
    Ok(ChangeEvent {
        kind,
        id,
        record,
        updated_fields,
        removed_fields,
        at: event.cluster_time,
    })
}
