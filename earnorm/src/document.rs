//! Values as BSON: what this module alone owns is turning records, ids and
//! filter values into the documents the ORM sends, with serialization
//! errors as [`Error::Serialization`](crate::Error::Serialization).

use mongodb::bson::{Bson, Document};
use serde::Serialize;

use crate::Result;

/// BSON of a value, for filters.
pub(crate) fn to_bson<T: Serialize + ?Sized>(value: &T) -> Result<Bson> {
    Ok(mongodb::bson::serialize_to_bson(value)?)
}

/// A record as the document stored for it.
pub(crate) fn to_document<T: Serialize>(record: &T) -> Result<Document> {
    Ok(mongodb::bson::serialize_to_document(record)?)
}
