//! The [`Model`] trait: a struct stored in a MongoDB collection, with CRUD
//! that keeps the cache correct.

use std::fmt::Debug;
use std::future::{Future, IntoFuture};

use mongodb::bson::{doc, oid::ObjectId, Document};
use mongodb::options::IndexOptions;
use mongodb::{Collection, IndexModel};
use serde::{de::DeserializeOwned, Serialize};

use crate::aggregate::Aggregate;
use crate::naming::id_key;
use crate::query::{self, Count, Find, FindById, FindManyByIds, FindOne, RecordCache};
use crate::transaction::Transaction;
use crate::update::{Update, UpdateOne, UpsertOne};
use crate::watch::ChangeEvents;
use crate::write::{Delete, DeleteMany, InsertMany, Save, UpdateMany};
use crate::{Environment, Error, Result, ValidationErrors};

/// An id type a model can use.
pub trait ModelId: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static {
    /// A new id for a record inserted without one (`ObjectId`: a fresh one);
    /// `None` for types the application must assign itself.
    fn generate() -> Option<Self>;

    /// The id as it appears in cache scopes and keys. The default goes
    /// through BSON ([`id_key`]); the built-in id types format directly.
    fn to_key(&self) -> Option<String> {
        id_key(self).ok()
    }
}

impl ModelId for ObjectId {
    fn generate() -> Option<Self> {
        Some(ObjectId::new())
    }
    fn to_key(&self) -> Option<String> {
        Some(self.to_hex())
    }
}
macro_rules! assigned_ids {
    ($($t:ty),*) => { $(impl ModelId for $t {
        fn generate() -> Option<Self> { None }
        fn to_key(&self) -> Option<String> { Some(self.to_string()) }
    })* };
}
assigned_ids!(String, i32, i64, u32);
impl ModelId for mongodb::bson::Uuid {
    fn generate() -> Option<Self> {
        None
    }
}

/// Lifecycle hooks, called by `save`, `insert_many` and `delete` (wherever
/// they run: `.in_env`, `.session`); not by the bulk and partial updates, which never
/// hold the record). `#[derive(Model)]` implements them with the defaults
/// (doing nothing); write `#[earnorm(hooks)]` on the struct and implement
/// this trait yourself to run code around writes:
///
/// ```no_run
/// use earnorm::bson::oid::ObjectId;
/// use earnorm::prelude::*;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Debug, Clone, Serialize, Deserialize, Model)]
/// #[earnorm(collection = "users", hooks)]
/// pub struct User {
///     #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
///     pub id: Option<ObjectId>,
///     pub email: String,
/// }
///
/// impl earnorm::Hooks for User {
///     fn before_save(&mut self) -> earnorm::Result<()> {
///         self.email = self.email.trim().to_lowercase();
///         if self.email.ends_with("@example.invalid") {
///             return Err(earnorm::Error::refused("no test addresses here"));
///         }
///         Ok(())
///     }
/// }
/// ```
///
/// The hooks are synchronous: they can change the record and refuse the
/// write, not wait on I/O (do that before calling `save`).
pub trait Hooks {
    /// Before `save` validates and writes: may change the record; an error
    /// stops the save (nothing written).
    ///
    /// # Errors
    /// Whatever refuses the save; it is returned by `save`.
    fn before_save(&mut self) -> Result<()> {
        Ok(())
    }
    /// After `save` wrote and invalidated; inside a transaction, after it
    /// wrote in the transaction, before the commit (which may still fail or
    /// be aborted).
    fn after_save(&self) {}
    /// Before `delete`: an error stops it (nothing deleted).
    ///
    /// # Errors
    /// Whatever refuses the delete; it is returned by `delete`.
    fn before_delete(&self) -> Result<()> {
        Ok(())
    }
    /// After `delete` deleted and invalidated (also when there was nothing
    /// to delete); inside a transaction, before the commit.
    fn after_delete(&self) {}
}

/// An index declared with `#[earnorm(index)]` or `#[earnorm(unique)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSpec {
    /// The BSON field name.
    pub field: &'static str,
    /// Whether values must be unique.
    pub unique: bool,
}

/// A struct stored in a MongoDB collection. Derive it with
/// `#[derive(Model)]`; the provided methods are the CRUD.
///
/// Reads and writes return actions: awaited as they are, they run in
/// [`Environment::current`]; `.in_env(&env)` runs one in another
/// environment and `.session(&mut tx)` inside a transaction (see
/// [`InTransaction`](crate::InTransaction)). The `_in` and `_tx` forms of
/// earlier releases are deprecated forwards to those.
///
/// Writes invalidate the cache after they commit: `save` and `delete`
/// invalidate the record's scope (its cached methods, and cached queries over
/// the model); `insert_many`, `update_many` and `delete_many` invalidate the
/// whole model. A write refused before anything could be written
/// (validation, a duplicate key) invalidates nothing; a failure that may have
/// applied part of the write (a bulk write stopped half-way, a connection lost
/// after sending) still invalidates its scope. Cache trouble never fails a
/// write.
pub trait Model: Hooks + Serialize + DeserializeOwned + Send + Sync + Unpin + Sized + 'static {
    /// The collection name.
    const COLLECTION: &'static str;
    /// The record cache, when declared (`#[earnorm(cache(ttl = 300))]`):
    /// [`find_by_id`](Self::find_by_id) and
    /// [`find_many_by_ids`](Self::find_many_by_ids) read through it.
    const CACHE: Option<RecordCache> = None;
    /// The stored name of the version field (`#[earnorm(version)]`), when
    /// the model has one: `save` then refuses an outdated copy
    /// ([`Error::Conflict`]) instead of overwriting newer data, and
    /// increments the version of each record it saves.
    const VERSION_FIELD: Option<&'static str> = None;
    /// The stored name of the field `#[earnorm(created_at)]` marks: set by
    /// `save` when it inserts (and when an `Option` field is `None`), and by
    /// `upsert_one` when it inserts.
    const CREATED_AT_FIELD: Option<&'static str> = None;
    /// The stored name of the field `#[earnorm(updated_at)]` marks: set by
    /// every `save`, `update`, `update_one` and `upsert_one`.
    const UPDATED_AT_FIELD: Option<&'static str> = None;
    /// The type of the `_id` field.
    type Id: ModelId;

    /// The record's id, if it has one.
    fn id(&self) -> Option<&Self::Id>;
    /// Sets the record's id.
    fn set_id(&mut self, id: Option<Self::Id>);
    /// The record's version (see [`VERSION_FIELD`](Self::VERSION_FIELD));
    /// `None` for models without one.
    fn version(&self) -> Option<i64> {
        None
    }
    /// Sets the record's version.
    fn set_version(&mut self, version: i64) {
        let _ = version;
    }
    /// Sets the timestamp fields for a save at `now` (`inserting`: the save
    /// inserts a new record).
    fn stamp(&mut self, now: mongodb::bson::DateTime, inserting: bool) {
        let _ = (now, inserting);
    }
    /// Checks every validation rule; reports every failing field.
    ///
    /// # Errors
    /// The failures.
    fn validate(&self) -> Result<(), ValidationErrors>;
    /// The indexes declared on the model.
    fn indexes() -> Vec<IndexSpec> {
        Vec::new()
    }

    /// The typed collection in `env`.
    fn collection_in(env: &Environment) -> Collection<Self> {
        env.database().collection(Self::COLLECTION)
    }

    /// The record id as the string used in cache scopes.
    fn id_key(&self) -> Option<String> {
        self.id().and_then(ModelId::to_key)
    }

    /// Inserts the record (giving it an id if it has none and the id type can
    /// generate one) or replaces the stored one; validates first. Await it,
    /// or configure it first (see [`Save`]): `user.save().session(&mut tx)`.
    fn save(&mut self) -> Save<'_, Self> {
        Save::new(self)
    }

    /// [`save`](Self::save) in `env`.
    #[deprecated(note = "use `record.save().in_env(env)`")]
    fn save_in<'a>(&'a mut self, env: &'a Environment) -> impl Future<Output = Result<()>> + Send + 'a {
        self.save().in_env(env).into_future()
    }

    /// [`save`](Self::save) inside a transaction: applied and invalidated at commit.
    #[deprecated(note = "use `record.save().session(tx)`")]
    fn save_tx<'a>(&'a mut self, tx: &'a mut Transaction) -> impl Future<Output = Result<()>> + Send + 'a {
        self.save().session(tx).into_future()
    }

    /// Deletes the record. Returns whether it existed.
    ///
    /// # Errors
    /// For a versioned model (`#[earnorm(version)]`), [`Error::Conflict`]
    /// when the stored record has moved past this copy's version (it was
    /// changed since this copy was read): nothing is deleted. Read it again
    /// and decide. A record already deleted is `Ok(false)`.
    fn delete(&self) -> Delete<'_, Self> {
        Delete::new(self)
    }

    /// [`delete`](Self::delete) in `env`.
    #[deprecated(note = "use `record.delete().in_env(env)`")]
    fn delete_in<'a>(&'a self, env: &'a Environment) -> impl Future<Output = Result<bool>> + Send + 'a {
        self.delete().in_env(env).into_future()
    }

    /// [`delete`](Self::delete) inside a transaction.
    #[deprecated(note = "use `record.delete().session(tx)`")]
    fn delete_tx<'a>(&'a self, tx: &'a mut Transaction) -> impl Future<Output = Result<bool>> + Send + 'a {
        self.delete().session(tx).into_future()
    }

    /// Inserts many records at once (validating all first; nothing is
    /// written if any fails). Generated ids are set on the records.
    fn insert_many(records: &mut [Self]) -> InsertMany<'_, Self> {
        InsertMany::new(records)
    }

    /// [`insert_many`](Self::insert_many) in `env`.
    #[deprecated(note = "use `Model::insert_many(records).in_env(env)`")]
    fn insert_many_in<'a>(
        env: &'a Environment,
        records: &'a mut [Self],
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        Self::insert_many(records).in_env(env).into_future()
    }

    /// The record with this id. With a record cache
    /// (`#[earnorm(cache(ttl = ..))]`), a hit is served from Redis, with
    /// every guarantee of `#[cached]`.
    fn find_by_id(id: impl Into<Self::Id>) -> FindById<Self> {
        FindById::new(id.into())
    }

    /// [`find_by_id`](Self::find_by_id) in `env`.
    #[deprecated(note = "use `Model::find_by_id(id).in_env(env)`")]
    fn find_by_id_in(env: &Environment, id: Self::Id) -> impl Future<Output = Result<Option<Self>>> + Send + 'static {
        Self::find_by_id(id).in_env(env).into_future()
    }

    /// The records with these ids, each once, in the order its id first
    /// appears in `ids`; ids with no record are left out. With a record
    /// cache, one round trip to Redis looks them all up, one `$in` query
    /// reads the misses, and one more round trip stores them; without,
    /// one `$in` query.
    fn find_many_by_ids(ids: &[Self::Id]) -> FindManyByIds<'_, Self> {
        FindManyByIds::new(ids)
    }

    /// [`find_many_by_ids`](Self::find_many_by_ids) in `env`.
    #[deprecated(note = "use `Model::find_many_by_ids(ids).in_env(env)`")]
    fn find_many_by_ids_in<'a>(
        env: &'a Environment,
        ids: &'a [Self::Id],
    ) -> impl Future<Output = Result<Vec<Self>>> + Send + 'a {
        Self::find_many_by_ids(ids).in_env(env).into_future()
    }

    /// Fills the record cache with the records matching `filter` (in
    /// batches of 500: one cache round trip, one `$in` query and one store
    /// each, every record stored with the generations it was read under, so
    /// a record written meanwhile is never served stale). Records already
    /// cached are left as they are. Returns how many records are cached;
    /// reports progress at `info`. For start-up, before serving.
    ///
    /// # Errors
    /// [`Error::Config`] when the model has no record cache; MongoDB's errors.
    fn warm(filter: Document) -> impl Future<Output = Result<u64>> + Send {
        async move { Self::warm_in(&Environment::current()?, filter).await }
    }

    /// [`warm`](Self::warm) in `env`.
    fn warm_in(env: &Environment, filter: Document) -> impl Future<Output = Result<u64>> + Send + '_ {
        query::warm::<Self>(env, filter)
    }

    /// [`warm`](Self::warm) for these ids.
    fn warm_ids(ids: &[Self::Id]) -> impl Future<Output = Result<u64>> + Send + '_ {
        async move { Self::warm_ids_in(&Environment::current()?, ids).await }
    }

    /// [`warm_ids`](Self::warm_ids) in `env`.
    fn warm_ids_in<'a>(env: &'a Environment, ids: &'a [Self::Id]) -> impl Future<Output = Result<u64>> + Send + 'a {
        query::warm_ids::<Self>(env, ids)
    }

    /// The first record matching `filter`: await it, or configure it first
    /// (see [`FindOne`]): `User::find_one(filter).cached(ttl).await`.
    fn find_one(filter: Document) -> FindOne<Self> {
        FindOne::new(None, filter)
    }

    /// [`find_one`](Self::find_one) in `env`.
    #[deprecated(note = "use `Model::find_one(filter).in_env(env)`")]
    fn find_one_in(env: &Environment, filter: Document) -> FindOne<Self> {
        Self::find_one(filter).in_env(env)
    }

    /// Every record matching `filter`: await it, or configure it first
    /// (see [`Find`]):
    /// `User::find(filter).sort(doc! {"age": -1}).limit(10).skip(20).cached(ttl).await`.
    fn find(filter: Document) -> Find<Self> {
        Find::new(None, filter)
    }

    /// [`find`](Self::find) in `env`.
    #[deprecated(note = "use `Model::find(filter).in_env(env)`")]
    fn find_in(env: &Environment, filter: Document) -> Find<Self> {
        Self::find(filter).in_env(env)
    }

    /// Runs an aggregation pipeline over the collection: await it for
    /// documents, or configure it first (see [`Aggregate`]):
    /// `User::aggregate(pipeline).typed::<Stats>().cached(ttl).await`.
    fn aggregate(pipeline: Vec<Document>) -> Aggregate<Self> {
        Aggregate::new(None, pipeline)
    }

    /// [`aggregate`](Self::aggregate) in `env`.
    #[deprecated(note = "use `Model::aggregate(pipeline).in_env(env)`")]
    fn aggregate_in(env: &Environment, pipeline: Vec<Document>) -> Aggregate<Self> {
        Self::aggregate(pipeline).in_env(env)
    }

    /// The number of records matching `filter`: await it, or cache it
    /// first (see [`Count`]): `User::count(filter).cached(ttl).await`.
    fn count(filter: Document) -> Count<Self> {
        Count::new(None, filter)
    }

    /// [`count`](Self::count) in `env`.
    #[deprecated(note = "use `Model::count(filter).in_env(env)`")]
    fn count_in(env: &Environment, filter: Document) -> Count<Self> {
        Self::count(filter).in_env(env)
    }

    /// Applies `update` (an update document: `doc! {"$set": {"name": "Ada"}}`,
    /// `$inc`, `$push`, ...) to this record only, validates the resulting
    /// record before it is committed, refreshes `self` from it, and
    /// invalidates the record's scope. Returns whether the record exists
    /// (`false`: nothing matched, nothing written).
    ///
    /// A versioned model (`#[earnorm(version)]`) updates only the version
    /// this copy has, and moves it to the next: an outdated copy is
    /// [`Error::Conflict`], as with `save`. The update runs in a
    /// transaction of its own, for the validation (see the crate docs,
    /// "Partial updates"): the server must support transactions. Given a
    /// transaction (`.session(&mut tx)`), it runs in that one instead: a
    /// result that fails validation then dooms the transaction, whose
    /// `commit` aborts it ([`Error::TransactionAborted`]).
    ///
    /// # Errors
    /// [`Error::Validation`] when the resulting record fails validation
    /// (nothing is written), [`Error::Conflict`], or MongoDB's errors.
    fn update(&mut self, update: Document) -> Update<'_, Self> {
        Update::new(self, update)
    }

    /// [`update`](Self::update) in `env`.
    #[deprecated(note = "use `record.update(update).in_env(env)`")]
    fn update_in<'a>(
        &'a mut self,
        env: &'a Environment,
        update: Document,
    ) -> impl Future<Output = Result<bool>> + Send + 'a {
        self.update(update).in_env(env).into_future()
    }

    /// Applies `update` to the first record matching `filter`, validates
    /// the result before it commits (as [`update`](Self::update) does), and
    /// invalidates that record's scope. Returns the record as updated, or
    /// `None` when nothing matched. Await it, or configure it first (see
    /// [`UpdateOne`]).
    ///
    /// # Errors
    /// [`Error::Validation`] (nothing written) or MongoDB's errors.
    fn update_one(filter: Document, update: Document) -> UpdateOne<Self> {
        UpdateOne::new(filter, update)
    }

    /// [`update_one`](Self::update_one) in `env`.
    #[deprecated(note = "use `Model::update_one(filter, update).in_env(env)`")]
    fn update_one_in(
        env: &Environment,
        filter: Document,
        update: Document,
    ) -> impl Future<Output = Result<Option<Self>>> + Send + 'static {
        Self::update_one(filter, update).in_env(env).into_future()
    }

    /// [`update_one`](Self::update_one), inserting a record built from
    /// `filter` and `update` when nothing matches (MongoDB's upsert).
    /// Returns the record as it is now.
    ///
    /// # Errors
    /// [`Error::Validation`] (nothing written) or MongoDB's errors.
    fn upsert_one(filter: Document, update: Document) -> UpsertOne<Self> {
        UpsertOne::new(filter, update)
    }

    /// [`upsert_one`](Self::upsert_one) in `env`.
    #[deprecated(note = "use `Model::upsert_one(filter, update).in_env(env)`")]
    fn upsert_one_in(
        env: &Environment,
        filter: Document,
        update: Document,
    ) -> impl Future<Output = Result<Self>> + Send + 'static {
        Self::upsert_one(filter, update).in_env(env).into_future()
    }

    /// Applies `update` to every record matching `filter`; returns how many
    /// were modified. Invalidates the whole model. Await it, or configure
    /// it first (see [`UpdateMany`]).
    fn update_many(filter: Document, update: Document) -> UpdateMany<Self> {
        UpdateMany::new(filter, update)
    }

    /// [`update_many`](Self::update_many) in `env`.
    #[deprecated(note = "use `Model::update_many(filter, update).in_env(env)`")]
    fn update_many_in(
        env: &Environment,
        filter: Document,
        update: Document,
    ) -> impl Future<Output = Result<u64>> + Send + 'static {
        Self::update_many(filter, update).in_env(env).into_future()
    }

    /// [`update_many`](Self::update_many) inside a transaction.
    #[deprecated(note = "use `Model::update_many(filter, update).session(tx)`")]
    fn update_many_tx(
        tx: &mut Transaction,
        filter: Document,
        update: Document,
    ) -> impl Future<Output = Result<u64>> + Send + '_ {
        Self::update_many(filter, update).session(tx).into_future()
    }

    /// Deletes every record matching `filter`; returns how many. Invalidates
    /// the whole model. Await it, or configure it first (see [`DeleteMany`]).
    fn delete_many(filter: Document) -> DeleteMany<Self> {
        DeleteMany::new(filter)
    }

    /// [`delete_many`](Self::delete_many) in `env`.
    #[deprecated(note = "use `Model::delete_many(filter).in_env(env)`")]
    fn delete_many_in(env: &Environment, filter: Document) -> impl Future<Output = Result<u64>> + Send + 'static {
        Self::delete_many(filter).in_env(env).into_future()
    }

    /// [`delete_many`](Self::delete_many) inside a transaction.
    #[deprecated(note = "use `Model::delete_many(filter).session(tx)`")]
    fn delete_many_tx(tx: &mut Transaction, filter: Document) -> impl Future<Output = Result<u64>> + Send + '_ {
        Self::delete_many(filter).session(tx).into_future()
    }

    /// The first record matching `filter`, as the transaction sees it.
    #[deprecated(note = "use `Model::find_one(filter).session(tx)`")]
    fn find_one_tx(tx: &mut Transaction, filter: Document) -> impl Future<Output = Result<Option<Self>>> + Send + '_ {
        Self::find_one(filter).session(tx).into_future()
    }

    /// Typed change events of the collection, from the moment the stream
    /// is open (this future resolves then): `let mut events =
    /// User::watch().await?; while let Some(event) = events.next().await {..}`.
    /// Needs change streams (a replica set or sharded cluster), like the
    /// database feed; each call opens a stream of its own.
    ///
    /// # Errors
    /// When the stream cannot be opened (a standalone server, for one).
    fn watch() -> impl Future<Output = Result<ChangeEvents<Self>>> + Send {
        async move { Self::watch_in(&Environment::current()?).await }
    }

    /// [`watch`](Self::watch) in `env`.
    fn watch_in(env: &Environment) -> impl Future<Output = Result<ChangeEvents<Self>>> + Send + '_ {
        crate::watch::watch::<Self>(env)
    }

    /// Creates the declared indexes (idempotent).
    fn ensure_indexes() -> impl Future<Output = Result<()>> + Send {
        async move { Self::ensure_indexes_in(&Environment::current()?).await }
    }

    /// [`ensure_indexes`](Self::ensure_indexes) in `env`.
    fn ensure_indexes_in(env: &Environment) -> impl Future<Output = Result<()>> + Send + '_ {
        async move {
            let models: Vec<IndexModel> = Self::indexes()
                .into_iter()
                .map(|spec| {
                    IndexModel::builder()
                        .keys(doc! { spec.field: 1 })
                        .options(IndexOptions::builder().unique(spec.unique.then_some(true)).build())
                        .build()
                })
                .collect();
            if models.is_empty() {
                return Ok(());
            }
            Self::collection_in(env)
                .create_indexes(models)
                .await
                .map_err(|e| Error::from_mongo(Self::COLLECTION, e))?;
            Ok(())
        }
    }
}
