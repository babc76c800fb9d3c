//! Typed references between models: `Ref<User>` is stored as the user's id
//! and fetched through the record cache, one at a time or many in one
//! round trip.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::ModelId;
use crate::{Environment, Model, Result};

/// A reference to a record of `M`, stored in MongoDB as the record's id
/// (`author: Ref<User>` is stored as `author: ObjectId(..)`).
///
/// [`fetch`](Self::fetch) reads the record through `M`'s record cache
/// when it has one; [`fetch_all`](Self::fetch_all) reads the records of
/// many references with one `find_many_by_ids` (one cache round trip, one
/// `$in` query for the misses), so that "load the posts and their authors"
/// is two round trips, not one per post.
pub struct Ref<M: Model> {
    id: M::Id,
}

impl<M: Model> Ref<M> {
    /// A reference to the record with this id.
    pub fn new(id: M::Id) -> Self {
        Self { id }
    }

    /// A reference to `record` (`None` when it has no id yet: save it first).
    pub fn to(record: &M) -> Option<Self> {
        record.id().cloned().map(Self::new)
    }

    /// The referenced id.
    pub fn id(&self) -> &M::Id {
        &self.id
    }

    /// The referenced record (`None` when it does not exist), through the
    /// record cache when `M` has one.
    ///
    /// # Errors
    /// As [`Model::find_by_id`].
    pub async fn fetch(&self) -> Result<Option<M>> {
        self.fetch_in(&Environment::current()?).await
    }

    /// [`fetch`](Self::fetch) in `env`.
    ///
    /// # Errors
    /// As [`Model::find_by_id`].
    pub async fn fetch_in(&self, env: &Environment) -> Result<Option<M>> {
        M::find_by_id(self.id.clone()).in_env(env).await
    }

    /// The records of all `refs`, with one `find_many_by_ids`, by id: look
    /// each reference up with [`Refs::get`].
    ///
    /// # Errors
    /// As [`Model::find_many_by_ids`].
    pub async fn fetch_all<'a>(refs: impl IntoIterator<Item = &'a Self>) -> Result<Refs<M>> {
        Self::fetch_all_in(&Environment::current()?, refs).await
    }

    /// [`fetch_all`](Self::fetch_all) in `env`.
    ///
    /// # Errors
    /// As [`Model::find_many_by_ids`].
    pub async fn fetch_all_in<'a>(env: &Environment, refs: impl IntoIterator<Item = &'a Self>) -> Result<Refs<M>> {
        let ids: Vec<M::Id> = refs.into_iter().map(|r| r.id.clone()).collect();
        let records = M::find_many_by_ids(&ids).in_env(env).await?;
        Ok(Refs {
            by_id: records
                .into_iter()
                .filter_map(|record| record.id_key().map(|key| (key, record)))
                .collect(),
        })
    }
}

/// The records fetched for many references (see [`Ref::fetch_all`]).
pub struct Refs<M: Model> {
    by_id: HashMap<String, M>,
}

impl<M: Model> Refs<M> {
    /// The record `reference` points to, if it exists.
    pub fn get(&self, reference: &Ref<M>) -> Option<&M> {
        self.by_id.get(&reference.id.to_key()?)
    }

    /// How many distinct records were found.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none was found.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The records, in no particular order.
    pub fn into_records(self) -> impl Iterator<Item = M> {
        self.by_id.into_values()
    }
}

impl<M: Model> fmt::Debug for Refs<M>
where
    M: fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.by_id.iter()).finish()
    }
}

impl<M: Model> Clone for Ref<M> {
    fn clone(&self) -> Self {
        Self { id: self.id.clone() }
    }
}

impl<M: Model> fmt::Debug for Ref<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Ref").field(&self.id).finish()
    }
}

/// Two references are equal when they name the same record.
impl<M: Model> PartialEq for Ref<M> {
    fn eq(&self, other: &Self) -> bool {
        match (self.id.to_key(), other.id.to_key()) {
            (Some(a), Some(b)) => a == b,
            _ => false,
        }
    }
}

impl<M: Model> Serialize for Ref<M> {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.id.serialize(serializer)
    }
}

impl<'de, M: Model> Deserialize<'de> for Ref<M> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        <M::Id as Deserialize<'de>>::deserialize(deserializer).map(Self::new)
    }
}
