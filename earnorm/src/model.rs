//! The [`Model`] trait: a struct stored in a MongoDB collection, with CRUD
//! that keeps the cache correct.

use std::fmt::Debug;
use std::future::Future;

use mongodb::bson::{doc, oid::ObjectId, Bson, Document};
use mongodb::options::IndexOptions;
use mongodb::{ClientSession, Collection, IndexModel};
use serde::{de::DeserializeOwned, Serialize};

use crate::aggregate::Aggregate;
use crate::document::{to_bson, to_document};
use crate::naming::{id_key, record_id};
use crate::query::{self, Count, Find, FindOne, RecordCache};
use crate::transaction::{write_then_invalidate, Invalidate, Touched, Transaction};
use crate::update;
use crate::watch::ChangeEvents;
use crate::{Environment, Error, Result, ValidationErrors};
use tracing::Instrument;

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

/// Lifecycle hooks, called by `save`, `insert_many` and `delete` (and their
/// `_in` and `_tx` forms; not by the bulk and partial updates, which never
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
    /// After `save` wrote and invalidated.
    fn after_save(&self) {}
    /// Before `delete`: an error stops it (nothing deleted).
    ///
    /// # Errors
    /// Whatever refuses the delete; it is returned by `delete`.
    fn before_delete(&self) -> Result<()> {
        Ok(())
    }
    /// After `delete` deleted and invalidated (also when there was nothing
    /// to delete).
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
/// Every method has an `_in` form that takes an explicit [`Environment`];
/// the plain form uses [`Environment::current`].
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
    /// generate one) or replaces the stored one; validates first.
    fn save(&mut self) -> impl Future<Output = Result<()>> + Send {
        async move { self.save_in(&Environment::current()?).await }
    }

    /// [`save`](Self::save) in `env`.
    fn save_in<'a>(&'a mut self, env: &'a Environment) -> impl Future<Output = Result<()>> + Send + 'a {
        async move {
            self.before_save()?;
            let Save {
                op,
                touched,
                generated,
                previous_version,
            } = Save::prepare(self)?;
            let coll = env.documents(Self::COLLECTION);
            let save = async move { op.run::<Self>(coll, None).await };
            let result = write_then_invalidate(env, vec![touched], Invalidate::IfWritten, save).await;
            settle(generated, previous_version, self, result)?;
            self.after_save();
            Ok(())
        }
        .instrument(crate::op_span(Self::COLLECTION, "save"))
    }

    /// [`save`](Self::save) inside a transaction: applied and invalidated at commit.
    fn save_tx<'a>(&'a mut self, tx: &'a mut Transaction) -> impl Future<Output = Result<()>> + Send + 'a {
        async move {
            self.before_save()?;
            let Save {
                op,
                touched: scope,
                generated,
                previous_version,
            } = Save::prepare(self)?;
            let (env, session, touched) = tx.parts();
            // Remembered before sending: a write cancelled half-way may still
            // commit with the transaction.
            touched.push(scope);
            let result = op.run::<Self>(env.documents(Self::COLLECTION), Some(session)).await;
            settle(generated, previous_version, self, result)?;
            self.after_save();
            Ok(())
        }
    }

    /// Deletes the record. Returns whether it existed.
    ///
    /// # Errors
    /// For a versioned model (`#[earnorm(version)]`), [`Error::Conflict`]
    /// when the stored record has moved past this copy's version (it was
    /// changed since this copy was read): nothing is deleted. Read it again
    /// and decide. A record already deleted is `Ok(false)`.
    fn delete(&self) -> impl Future<Output = Result<bool>> + Send {
        async move { self.delete_in(&Environment::current()?).await }
    }

    /// [`delete`](Self::delete) in `env`.
    fn delete_in<'a>(&'a self, env: &'a Environment) -> impl Future<Output = Result<bool>> + Send + 'a {
        async move {
            self.before_delete()?;
            let target = delete_target(self)?;
            let touched = target.touched.clone();
            let coll = env.documents(Self::COLLECTION);
            let delete = async move { delete_one::<Self>(coll, target, None).await };
            let existed = write_then_invalidate(env, vec![touched], Invalidate::IfWritten, delete).await?;
            self.after_delete();
            Ok(existed)
        }
        .instrument(crate::op_span(Self::COLLECTION, "delete"))
    }

    /// [`delete`](Self::delete) inside a transaction.
    fn delete_tx<'a>(&'a self, tx: &'a mut Transaction) -> impl Future<Output = Result<bool>> + Send + 'a {
        async move {
            self.before_delete()?;
            let target = delete_target(self)?;
            let (env, session, touched) = tx.parts();
            touched.push(target.touched.clone());
            let existed = delete_one::<Self>(env.documents(Self::COLLECTION), target, Some(session)).await?;
            self.after_delete();
            Ok(existed)
        }
    }

    /// Inserts many records at once (validating all first; nothing is
    /// written if any fails). Generated ids are set on the records.
    fn insert_many(records: &mut [Self]) -> impl Future<Output = Result<()>> + Send {
        async move { Self::insert_many_in(&Environment::current()?, records).await }
    }

    /// [`insert_many`](Self::insert_many) in `env`.
    fn insert_many_in<'a>(
        env: &'a Environment,
        records: &'a mut [Self],
    ) -> impl Future<Output = Result<()>> + Send + 'a {
        async move {
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
            if records.iter().any(|record| record.id().is_none()) && <Self::Id as ModelId>::generate().is_none() {
                return Err(Error::Id(format!(
                    "{}: this id type is not generated; set ids before inserting",
                    Self::COLLECTION
                )));
            }
            let now = mongodb::bson::DateTime::now();
            for record in records.iter_mut() {
                record.stamp(now, true);
                if let Some(version) = Self::VERSION_FIELD.and(record.version()) {
                    record.set_version(version.max(0).saturating_add(1));
                }
                if record.id().is_none() {
                    record.set_id(<Self::Id as ModelId>::generate());
                }
            }
            let documents = records.iter().map(to_document).collect::<Result<Vec<_>>>()?;
            let coll = env.documents(Self::COLLECTION);
            let insert = async move {
                coll.insert_many(documents)
                    .await
                    .map(|_| ())
                    .map_err(|e| Error::from_mongo(Self::COLLECTION, e))
            };
            // Part of a failed batch may have been written: a failure
            // invalidates too (see `Error::may_have_written`).
            write_then_invalidate(env, vec![Touched::Model(Self::COLLECTION)], Invalidate::Always, insert).await?;
            for record in records.iter() {
                record.after_save();
            }
            Ok(())
        }
        .instrument(crate::op_span(Self::COLLECTION, "insert_many"))
    }

    /// The record with this id. With a record cache
    /// (`#[earnorm(cache(ttl = ..))]`), a hit is served from Redis, with
    /// every guarantee of `#[cached]`.
    fn find_by_id(id: impl Into<Self::Id> + Send) -> impl Future<Output = Result<Option<Self>>> + Send {
        let id = id.into();
        async move { Self::find_by_id_in(&Environment::current()?, id).await }
    }

    /// [`find_by_id`](Self::find_by_id) in `env`.
    fn find_by_id_in(env: &Environment, id: Self::Id) -> impl Future<Output = Result<Option<Self>>> + Send + '_ {
        query::find_by_id::<Self>(env, id)
    }

    /// The records with these ids, each once, in the order its id first
    /// appears in `ids`; ids with no record are left out. With a record
    /// cache, one round trip to Redis looks them all up, one `$in` query
    /// reads the misses, and one more round trip stores them; without,
    /// one `$in` query.
    fn find_many_by_ids(ids: &[Self::Id]) -> impl Future<Output = Result<Vec<Self>>> + Send + '_ {
        async move { Self::find_many_by_ids_in(&Environment::current()?, ids).await }
    }

    /// [`find_many_by_ids`](Self::find_many_by_ids) in `env`.
    fn find_many_by_ids_in<'a>(
        env: &'a Environment,
        ids: &'a [Self::Id],
    ) -> impl Future<Output = Result<Vec<Self>>> + Send + 'a {
        query::find_many_by_ids::<Self>(env, ids)
    }

    /// Fills the record cache with the records matching `filter` (in
    /// batches of 500: one cache round trip, one `$in` query and one store
    /// each, under the compare-and-set, so a record written meanwhile is not
    /// stored stale). Records already cached are left as they are. Returns
    /// how many records are cached; reports progress at `info`. For start-up,
    /// before serving.
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
    fn find_one_in(env: &Environment, filter: Document) -> FindOne<Self> {
        FindOne::new(Some(env.clone()), filter)
    }

    /// Every record matching `filter`: await it, or configure it first
    /// (see [`Find`]):
    /// `User::find(filter).sort(doc! {"age": -1}).limit(10).skip(20).cached(ttl).await`.
    fn find(filter: Document) -> Find<Self> {
        Find::new(None, filter)
    }

    /// [`find`](Self::find) in `env`.
    fn find_in(env: &Environment, filter: Document) -> Find<Self> {
        Find::new(Some(env.clone()), filter)
    }

    /// Runs an aggregation pipeline over the collection: await it for
    /// documents, or configure it first (see [`Aggregate`]):
    /// `User::aggregate(pipeline).typed::<Stats>().cached(ttl).await`.
    fn aggregate(pipeline: Vec<Document>) -> Aggregate<Self> {
        Aggregate::new(None, pipeline)
    }

    /// [`aggregate`](Self::aggregate) in `env`.
    fn aggregate_in(env: &Environment, pipeline: Vec<Document>) -> Aggregate<Self> {
        Aggregate::new(Some(env.clone()), pipeline)
    }

    /// The number of records matching `filter`: await it, or cache it
    /// first (see [`Count`]): `User::count(filter).cached(ttl).await`.
    fn count(filter: Document) -> Count<Self> {
        Count::new(None, filter)
    }

    /// [`count`](Self::count) in `env`.
    fn count_in(env: &Environment, filter: Document) -> Count<Self> {
        Count::new(Some(env.clone()), filter)
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
    /// "Partial updates"): the server must support transactions.
    ///
    /// # Errors
    /// [`Error::Validation`] when the resulting record fails validation
    /// (nothing is written), [`Error::Conflict`], or MongoDB's errors.
    fn update(&mut self, update: Document) -> impl Future<Output = Result<bool>> + Send + '_ {
        async move { self.update_in(&Environment::current()?, update).await }
    }

    /// [`update`](Self::update) in `env`.
    fn update_in<'a>(
        &'a mut self,
        env: &'a Environment,
        update: Document,
    ) -> impl Future<Output = Result<bool>> + Send + 'a {
        async move {
            let target = update::record_target(self, update)?;
            match update::update_validated::<Self>(env, target).await? {
                Some(updated) => {
                    *self = updated;
                    Ok(true)
                }
                None => match (Self::VERSION_FIELD, self.version(), self.id_key()) {
                    (Some(_), Some(version), Some(id)) => Err(Error::Conflict {
                        model: Self::COLLECTION,
                        id,
                        version,
                    }),
                    _ => Ok(false),
                },
            }
        }
        .instrument(crate::op_span(Self::COLLECTION, "update"))
    }

    /// Applies `update` to the first record matching `filter`, validates
    /// the result before it commits (as [`update`](Self::update) does), and
    /// invalidates that record's scope. Returns the record as updated, or
    /// `None` when nothing matched.
    ///
    /// # Errors
    /// [`Error::Validation`] (nothing written) or MongoDB's errors.
    fn update_one(filter: Document, update: Document) -> impl Future<Output = Result<Option<Self>>> + Send {
        async move { Self::update_one_in(&Environment::current()?, filter, update).await }
    }

    /// [`update_one`](Self::update_one) in `env`.
    fn update_one_in(
        env: &Environment,
        filter: Document,
        update: Document,
    ) -> impl Future<Output = Result<Option<Self>>> + Send + '_ {
        update::update_validated::<Self>(
            env,
            update::Target {
                filter,
                update,
                upsert: false,
            },
        )
    }

    /// [`update_one`](Self::update_one), inserting a record built from
    /// `filter` and `update` when nothing matches (MongoDB's upsert).
    /// Returns the record as it is now.
    ///
    /// # Errors
    /// [`Error::Validation`] (nothing written) or MongoDB's errors.
    fn upsert_one(filter: Document, update: Document) -> impl Future<Output = Result<Self>> + Send {
        async move { Self::upsert_one_in(&Environment::current()?, filter, update).await }
    }

    /// [`upsert_one`](Self::upsert_one) in `env`.
    fn upsert_one_in(
        env: &Environment,
        filter: Document,
        update: Document,
    ) -> impl Future<Output = Result<Self>> + Send + '_ {
        async move {
            update::update_validated::<Self>(
                env,
                update::Target {
                    filter,
                    update,
                    upsert: true,
                },
            )
            .await?
            .ok_or_else(|| Error::Id(format!("{}: the upsert returned no record", Self::COLLECTION)))
        }
    }

    /// Applies `update` to every record matching `filter`; returns how many
    /// were modified. Invalidates the whole model.
    fn update_many(filter: Document, update: Document) -> impl Future<Output = Result<u64>> + Send {
        async move { Self::update_many_in(&Environment::current()?, filter, update).await }
    }

    /// [`update_many`](Self::update_many) in `env`.
    fn update_many_in(
        env: &Environment,
        filter: Document,
        update: Document,
    ) -> impl Future<Output = Result<u64>> + Send + '_ {
        async move {
            let update = update::bulk::<Self>(update)?;
            let coll = env.documents(Self::COLLECTION);
            let update = async move { update_many::<Self>(coll, filter, update, None).await };
            write_then_invalidate(
                env,
                vec![Touched::Model(Self::COLLECTION)],
                Invalidate::IfWritten,
                update,
            )
            .await
        }
        .instrument(crate::op_span(Self::COLLECTION, "update_many"))
    }

    /// [`update_many`](Self::update_many) inside a transaction.
    fn update_many_tx(
        tx: &mut Transaction,
        filter: Document,
        update: Document,
    ) -> impl Future<Output = Result<u64>> + Send + '_ {
        async move {
            let update = update::bulk::<Self>(update)?;
            let (env, session, touched) = tx.parts();
            touched.push(Touched::Model(Self::COLLECTION));
            update_many::<Self>(env.documents(Self::COLLECTION), filter, update, Some(session)).await
        }
    }

    /// Deletes every record matching `filter`; returns how many. Invalidates
    /// the whole model.
    fn delete_many(filter: Document) -> impl Future<Output = Result<u64>> + Send {
        async move { Self::delete_many_in(&Environment::current()?, filter).await }
    }

    /// [`delete_many`](Self::delete_many) in `env`.
    fn delete_many_in(env: &Environment, filter: Document) -> impl Future<Output = Result<u64>> + Send + '_ {
        async move {
            let coll = env.documents(Self::COLLECTION);
            let delete = async move { delete_many::<Self>(coll, filter, None).await };
            write_then_invalidate(
                env,
                vec![Touched::Model(Self::COLLECTION)],
                Invalidate::IfWritten,
                delete,
            )
            .await
        }
        .instrument(crate::op_span(Self::COLLECTION, "delete_many"))
    }

    /// [`delete_many`](Self::delete_many) inside a transaction.
    fn delete_many_tx(tx: &mut Transaction, filter: Document) -> impl Future<Output = Result<u64>> + Send + '_ {
        async move {
            let (env, session, touched) = tx.parts();
            touched.push(Touched::Model(Self::COLLECTION));
            delete_many::<Self>(env.documents(Self::COLLECTION), filter, Some(session)).await
        }
    }

    /// The first record matching `filter`, as the transaction sees it.
    fn find_one_tx(tx: &mut Transaction, filter: Document) -> impl Future<Output = Result<Option<Self>>> + Send + '_ {
        async move {
            let (env, session, _) = tx.parts();
            Self::collection_in(env)
                .find_one(filter)
                .session(session)
                .await
                .map_err(|e| Error::from_mongo(Self::COLLECTION, e))
        }
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

/// The scope a write to the record with this id touches: the record's, or
/// the whole model's when the id has no key form.
fn record_scope<M: Model>(id: &M::Id) -> Touched {
    match record_id::<M>(id) {
        Ok(key) => Touched::Record(M::COLLECTION, key),
        Err(_) => Touched::Model(M::COLLECTION),
    }
}

/// What `save` sends: an insert of a new record or a replacement by id.
struct Save {
    op: SaveOp,
    touched: Touched,
    /// The id was generated for this insert (taken back if nothing was written).
    generated: bool,
    /// The version of the copy before this save (put back if nothing was
    /// written), for versioned models.
    previous_version: Option<i64>,
}

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

impl Save {
    /// Validates `record`, gives it an id if it needs one, moves a versioned
    /// record to its next version, and builds the write.
    fn prepare<M: Model>(record: &mut M) -> Result<Self> {
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
            Self::undo(record, generated, previous_version);
        }
        built
    }

    /// Puts the id and version back as they were before `prepare`.
    fn undo<M: Model>(record: &mut M, generated: bool, previous_version: Option<i64>) {
        if generated {
            record.set_id(None);
        }
        if let Some(version) = previous_version {
            record.set_version(version);
        }
    }
}

/// Takes a `generated` id (and a versioned record's new version) back when
/// the write surely wrote nothing, so that a retry inserts (or saves the
/// same version); keeps them when it may have been written, so that a retry
/// updates that record instead of inserting a second one.
fn settle<M: Model>(generated: bool, previous_version: Option<i64>, record: &mut M, result: Result<()>) -> Result<()> {
    if matches!(&result, Err(err) if !err.may_have_written()) {
        Save::undo(record, generated, previous_version);
    }
    result
}

impl SaveOp {
    /// Sends the write (owning all it needs, unless it runs in a session).
    async fn run<M: Model>(self, coll: Collection<Document>, session: Option<&mut ClientSession>) -> Result<()> {
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
                    // A first save of a versioned record whose id is taken:
                    // someone saved it first.
                    (Err(Error::DuplicateKey { .. }), Some(expected)) => Err(conflict(expected)),
                    (Err(err), _) => Err(err),
                }
            }
        }
    }
}

/// What deleting `record` sends: by id, and for a versioned model only
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

/// Deletes by `target`; whether it deleted. A versioned copy that deleted
/// nothing while its record still exists is outdated: `Conflict`.
async fn delete_one<M: Model>(
    coll: Collection<Document>,
    target: DeleteTarget,
    mut session: Option<&mut ClientSession>,
) -> Result<bool> {
    let mongo = |e| Error::from_mongo(M::COLLECTION, e);
    let DeleteTarget { filter, expected, .. } = target;
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

async fn update_many<M: Model>(
    coll: Collection<Document>,
    filter: Document,
    update: Document,
    session: Option<&mut ClientSession>,
) -> Result<u64> {
    in_session!(coll.update_many(filter, update), session)
        .map(|r| r.modified_count)
        .map_err(|e| Error::from_mongo(M::COLLECTION, e))
}

async fn delete_many<M: Model>(
    coll: Collection<Document>,
    filter: Document,
    session: Option<&mut ClientSession>,
) -> Result<u64> {
    in_session!(coll.delete_many(filter), session)
        .map(|r| r.deleted_count)
        .map_err(|e| Error::from_mongo(M::COLLECTION, e))
}
