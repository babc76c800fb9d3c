//! Names: how models, records and ids are named in the cache. What this
//! module alone owns: the scope name of a model (`DATABASE.COLLECTION`,
//! [`model_scope`]), the key form of an id ([`id_key`] for any BSON id,
//! [`record_id`] for a model's id type), which together name a record's
//! scope. The record cache's key is built from them in `query.rs`
//! (`record_cache_key`), a record method's in `private.rs`
//! (`record_method_key`).

use mongodb::bson::Bson;
use serde::Serialize;

use crate::{Error, Model, ModelId, Result};

/// The cache name of a model in an environment: `DATABASE.COLLECTION`, so
/// that environments on different databases sharing one Redis and prefix
/// never share entries or invalidations.
pub(crate) fn model_scope(database: &str, collection: &str) -> String {
    let mut name = String::with_capacity(database.len() + collection.len() + 1);
    name.push_str(database);
    name.push('.');
    name.push_str(collection);
    name
}

/// The key form of `M`'s id `id`: the id part of its record's scope.
///
/// # Errors
/// [`Error::Id`] when the id has no key form.
pub(crate) fn record_id<M: Model>(id: &M::Id) -> Result<String> {
    id.to_key()
        .ok_or_else(|| Error::Id(format!("{}: the id has no key form", M::COLLECTION)))
}

/// The canonical string of an id, as used in cache scopes.
///
/// # Errors
/// When the id does not serialize to BSON.
pub fn id_key<T: Serialize + ?Sized>(id: &T) -> Result<String> {
    Ok(match mongodb::bson::serialize_to_bson(id)? {
        Bson::ObjectId(oid) => oid.to_hex(),
        Bson::String(s) => s,
        Bson::Int32(n) => n.to_string(),
        Bson::Int64(n) => n.to_string(),
        other => other.to_string(),
    })
}
