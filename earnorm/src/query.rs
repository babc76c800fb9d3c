//! Reads: the record cache behind `find_by_id` and `find_many_by_ids`, and
//! the read actions (`find`, `find_one`, `count`) that can be awaited as
//! they are or configured first, the query cache included.

use std::collections::HashSet;
use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::time::Duration;

use earnorm_cache::{CacheKey, ResultOutput, Scope};
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Document};
use serde::Serialize;
use tracing::{debug, Instrument};

use crate::action::{placed, ActionFuture, ActionFutureOf, InTransaction};
use crate::document::to_bson;
use crate::ModelId;
use crate::{Environment, Error, Model, Result, Transaction};

/// The record cache of a model, declared with
/// `#[earnorm(collection = "..", cache(ttl = 300))]`: `find_by_id` and
/// `find_many_by_ids` read through the cache, under the record's scope
/// (so a write to that record, through EarnORM or seen by the database
/// feed, invalidates it, and a write to another record does not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordCache {
    /// How long a record stays cached.
    pub ttl: Duration,
    /// How long "no such record" stays cached (`cache(missing = 30)`);
    /// `None`: it is not cached, every lookup of a missing id reads
    /// MongoDB. Inserting the record invalidates it (it is the record's
    /// scope).
    pub missing: Option<Duration>,
    /// Refresh ahead (`cache(refresh = 30)`): a hit on a record with less
    /// than this left to live reads it again (one caller per process and
    /// key, one process at a time) before it expires.
    pub refresh: Option<Duration>,
    /// Whether records may be kept in the in-process tier, when the cache
    /// has one (`cache(local = false)`: off, every read goes to Redis).
    pub local: bool,
}

impl RecordCache {
    /// A record cache keeping records `ttl_seconds`, and missing records
    /// `missing` (not at all for `None`).
    pub const fn new(ttl_seconds: u64, missing: Option<Duration>) -> Self {
        Self {
            ttl: Duration::from_secs(ttl_seconds),
            missing,
            refresh: None,
            local: true,
        }
    }

    /// The same, kept in the in-process tier or not (see [`local`](Self::local)).
    pub const fn in_process(mut self, local: bool) -> Self {
        self.local = local;
        self
    }

    /// The same, refreshing ahead of the expiry in the last `refresh`.
    pub const fn refreshing(mut self, refresh: Option<Duration>) -> Self {
        self.refresh = refresh;
        self
    }

    /// How long a lookup's result is kept: `None` for one not to keep.
    fn ttl_of<M>(&self, found: &Option<M>) -> Option<Duration> {
        match found {
            Some(_) => Some(self.ttl),
            None => self.missing,
        }
    }
}

/// The key of `id`'s record in the record cache of `M`, when `M` has one,
/// the cache is on and the id has a key form.
fn record_cache_key<M: Model>(env: &Environment, id: &M::Id) -> Option<CacheKey> {
    record_key_in::<M>(env, &env.model_scope(M::COLLECTION), &id.to_key()?)
}

/// The key of the record whose id's key form is `id` in the record cache
/// of `M` (its model scope: `namespace`), when `M` has one and the cache is
/// on.
fn record_key_in<M: Model>(env: &Environment, namespace: &str, id: &str) -> Option<CacheKey> {
    let record_cache = M::CACHE?;
    let cache = env.cache();
    if !cache.config().enabled {
        return None;
    }
    cache
        .key(namespace, "record")
        .scope(Scope::Record(namespace, id))
        // Two types stored in one collection never read each other's entries.
        .raw(std::any::type_name::<M>().as_bytes())
        .local(record_cache.local)
        .build()
        .ok()
}

/// `find_by_id`: through the record cache when the model has one.
pub(crate) async fn find_by_id<M: Model>(env: &Environment, id: M::Id) -> Result<Option<M>> {
    find_by_id_inner::<M>(env, id)
        .instrument(crate::op_span(M::COLLECTION, "find_by_id"))
        .await
}

async fn find_by_id_inner<M: Model>(env: &Environment, id: M::Id) -> Result<Option<M>> {
    let filter = doc! { "_id": to_bson(&id)? };
    let ttl_of = move |found: &Result<Option<M>>| {
        let cache = M::CACHE?;
        found.as_ref().ok().and_then(|found| cache.ttl_of(found))
    };
    match (M::CACHE, record_cache_key::<M>(env, &id)) {
        (
            Some(RecordCache {
                refresh: Some(refresh), ..
            }),
            Some(key),
        ) => {
            // The refresh owns what it reads: it runs in the background.
            let (env_owned, again) = (env.clone(), filter.clone());
            let refresher = move || async move { find_one_in_db::<M>(&env_owned, again, None).await };
            let read = find_one_in_db::<M>(env, filter, None);
            env.cache()
                .get_or_compute_refreshed::<_, ResultOutput, _, _, _, _>(&key, ttl_of, refresh, read, refresher)
                .await
        }
        (Some(_), Some(key)) => {
            let read = find_one_in_db::<M>(env, filter, None);
            env.cache()
                .get_or_compute_by::<_, ResultOutput, _, _>(&key, ttl_of, None, read)
                .await
        }
        _ => find_one_in_db::<M>(env, filter, None).await,
    }
}

/// `find_many_by_ids`: each distinct id once, in the order it first
/// appears; ids with no record are left out. One cache round trip for all
/// of them, one `$in` query for the misses.
pub(crate) async fn find_many_by_ids<M: Model>(env: &Environment, ids: &[M::Id]) -> Result<Vec<M>> {
    find_many_inner::<M>(env, ids)
        .instrument(crate::op_span(M::COLLECTION, "find_many_by_ids"))
        .await
}

/// Each distinct id of `ids` once, in the order it first appears, with its
/// key form (ids without one are kept as they come).
fn unique_ids<M: Model>(ids: &[M::Id]) -> Vec<(&M::Id, Option<String>)> {
    let mut seen = HashSet::new();
    let mut unique: Vec<(&M::Id, Option<String>)> = Vec::with_capacity(ids.len());
    for id in ids {
        let key = id.to_key();
        let first = match &key {
            Some(key) => seen.insert(key.clone()),
            None => true,
        };
        if first {
            unique.push((id, key));
        }
    }
    unique
}

/// `found` in the order of `wanted` (`None` where there is none).
fn in_order<M: Model>(found: Vec<M>, wanted: &[&(&M::Id, Option<String>)]) -> Vec<Option<M>> {
    let mut by_key: std::collections::HashMap<String, M> = std::collections::HashMap::with_capacity(found.len());
    for record in found {
        if let Some(key) = record.id_key() {
            by_key.insert(key, record);
        }
    }
    wanted
        .iter()
        .map(|(_, key)| key.as_ref().and_then(|key| by_key.remove(key)))
        .collect()
}

async fn find_many_inner<M: Model>(env: &Environment, ids: &[M::Id]) -> Result<Vec<M>> {
    let unique = unique_ids::<M>(ids);
    let fetch = |positions: Vec<usize>| {
        let wanted: Vec<&(&M::Id, Option<String>)> = positions.iter().map(|&p| &unique[p]).collect();
        async move { fetch_by_ids::<M>(env, &wanted).await }
    };
    let keys: Option<Vec<CacheKey>> = match M::CACHE {
        Some(_) => {
            let namespace = env.model_scope(M::COLLECTION);
            unique
                .iter()
                .map(|(_, key)| record_key_in::<M>(env, &namespace, key.as_deref()?))
                .collect()
        }
        None => None,
    };
    let found = match (M::CACHE, keys) {
        (Some(cache), Some(keys)) => {
            env.cache()
                .get_many_or_compute_refreshed(&keys, |found: &Option<M>| cache.ttl_of(found), cache.refresh, fetch)
                .await?
        }
        _ => fetch((0..unique.len()).collect()).await?,
    };
    Ok(found.into_iter().flatten().collect())
}

/// One `$in` query for `wanted`; the records in the same order (`None`
/// where there is none).
async fn fetch_by_ids<M: Model>(env: &Environment, wanted: &[&(&M::Id, Option<String>)]) -> Result<Vec<Option<M>>> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let ids = wanted.iter().map(|(id, _)| to_bson(*id)).collect::<Result<Vec<_>>>()?;
    let found: Vec<M> = M::collection_in(env)
        .find(doc! { "_id": { "$in": ids } })
        .await
        .map_err(|e| Error::from_mongo(M::COLLECTION, e))?
        .try_collect()
        .await
        .map_err(|e| Error::from_mongo(M::COLLECTION, e))?;
    Ok(in_order(found, wanted))
}

/// One record read from MongoDB, with an optional sort.
async fn find_one_in_db<M: Model>(env: &Environment, filter: Document, sort: Option<Document>) -> Result<Option<M>> {
    let options = mongodb::options::FindOneOptions::builder().sort(sort).build();
    match M::collection_in(env)
        .find_one(filter.clone())
        .with_options(options.clone())
        .await
        .map_err(|e| Error::from_mongo(M::COLLECTION, e))
    {
        Err(err @ Error::Decode { field: None, .. }) => {
            // Only on this error's path: read the document as it is, to name
            // the field that does not decode.
            let document = env
                .database()
                .collection::<Document>(M::COLLECTION)
                .find_one(filter)
                .with_options(options)
                .await
                .ok()
                .flatten();
            Err(err.locate::<M>(document))
        }
        other => other,
    }
}

/// What every read action shares: where it runs, its filter, and whether
/// (and for how long) its result is cached.
#[derive(Debug, Clone)]
struct Read {
    env: Option<Environment>,
    filter: Document,
    cached: Option<Duration>,
}

impl Read {
    fn new(env: Option<Environment>, filter: Document) -> Self {
        Self {
            env,
            filter,
            cached: None,
        }
    }

    fn env(&self) -> Result<Environment> {
        Environment::chosen_or_current(self.env.as_ref())
    }

    /// Runs `read` (given the environment and the filter) through the
    /// query cache of `M` when `.cached(..)` was asked for: the entry is
    /// named `name`, keyed by the canonical encoding of the filter and
    /// `options` (key order included: MongoDB
    /// itself treats `{a: 1, b: 2}` and `{b: 2, a: 1}` as different
    /// documents, and a sort in another order is another query), and
    /// invalidated by any write to the collection.
    async fn run<M: Model, T, Q, F>(
        self,
        name: &'static str,
        options: &Q,
        read: impl FnOnce(Environment, Document) -> F,
    ) -> Result<T>
    where
        T: Serialize + serde::de::DeserializeOwned + 'static,
        Q: Serialize,
        F: Future<Output = Result<T>>,
    {
        let span = crate::op_span(M::COLLECTION, name);
        async move {
            let env = self.env()?;
            let Some(ttl) = self.cached else {
                return read(env, self.filter).await;
            };
            let model = [env.model_scope(M::COLLECTION)];
            let key = query_key(&env, &model, name, std::any::type_name::<M>(), &(&self.filter, options));
            read_cached(&env, key, ttl, read(env.clone(), self.filter)).await
        }
        .instrument(span)
        .await
    }
}

/// The key of a read in the query cache of the model named `names[0]` (a
/// model scope name, `DATABASE.COLLECTION`), invalidated by any write to any
/// of `names`: it is named `name`, and holds `type_name` (what the result
/// decodes into) and the canonical encoding of `arg`.
pub(crate) fn query_key<A: Serialize + ?Sized>(
    env: &Environment,
    names: &[String],
    name: &str,
    type_name: &str,
    arg: &A,
) -> std::result::Result<CacheKey, earnorm_cache::CacheError> {
    let namespace = names.first().map_or("", String::as_str);
    let mut key = env.cache().key(namespace, name);
    for name in names {
        key = key.scope(Scope::Model(name));
    }
    key.raw(type_name.as_bytes())
        .arg(arg)
        .and_then(earnorm_cache::KeyBuilder::build)
}

/// The one cached-read path of queries, counts and aggregations: `read`
/// through the cache under `key` for `ttl` (with every guarantee of
/// `#[cached]`), or without the cache when the read did not encode into a
/// key.
pub(crate) async fn read_cached<T, F>(
    env: &Environment,
    key: std::result::Result<CacheKey, earnorm_cache::CacheError>,
    ttl: Duration,
    read: F,
) -> Result<T>
where
    T: Serialize + serde::de::DeserializeOwned + 'static,
    F: Future<Output = Result<T>>,
{
    match key {
        Ok(key) => {
            env.cache()
                .get_or_compute::<Result<T>, ResultOutput, _>(&key, Some(ttl), read)
                .await
        }
        Err(err) => {
            debug!(error = %err, "the read does not encode: reading without the cache");
            read.await
        }
    }
}

macro_rules! read_action_common {
    () => {
        /// Runs in `env` instead of [`Environment::current`].
        pub fn in_env(mut self, env: &Environment) -> Self {
            self.read.env = Some(env.clone());
            self
        }

        /// Reads inside `tx`: sees the transaction's own writes, and never
        /// the cache (`cached` is ignored).
        pub fn session(self, tx: &mut Transaction) -> InTransaction<'_, Self> {
            InTransaction::new(self, tx)
        }

        /// Caches the result for `ttl` in the query cache of the model:
        /// the same query (same filter and options, keys in the same order)
        /// in any process is then answered from Redis until any write to the
        /// collection (through EarnORM, or seen by the database feed)
        /// invalidates it. With every guarantee of `#[cached]`: no stale
        /// sets, fail open, one computation per query.
        pub fn cached(mut self, ttl: Duration) -> Self {
            self.read.cached = Some(ttl);
            self
        }
    };
}

/// The records matching a filter: `User::find(filter)`, awaited as it is
/// or configured first with [`sort`](Self::sort), [`limit`](Self::limit),
/// [`skip`](Self::skip) and [`cached`](Self::cached); read one by one with
/// [`stream`](Self::stream), or as another type holding some of the fields
/// with [`project`](Self::project).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Find<M> {
    read: Read,
    sort: Option<Document>,
    limit: Option<i64>,
    skip: Option<u64>,
    batch_size: Option<u32>,
    model: PhantomData<fn() -> M>,
}

impl<M: Model> Find<M> {
    pub(crate) fn new(env: Option<Environment>, filter: Document) -> Self {
        Self {
            read: Read::new(env, filter),
            sort: None,
            limit: None,
            skip: None,
            batch_size: None,
            model: PhantomData,
        }
    }

    read_action_common!();

    /// Orders the records: `doc! {"age": -1, "name": 1}`.
    pub fn sort(mut self, sort: Document) -> Self {
        self.sort = Some(sort);
        self
    }

    /// Returns at most `n` records (MongoDB's meaning: a negative `n`
    /// returns at most `-n` in a single batch; `i64::MIN`, which has no
    /// such counterpart, makes the find an [`Error::InvalidQuery`]).
    pub fn limit(mut self, n: i64) -> Self {
        self.limit = Some(n);
        self
    }

    /// Skips the first `n` matching records (more than `i64::MAX` makes the
    /// find an [`Error::InvalidQuery`]).
    pub fn skip(mut self, n: u64) -> Self {
        self.skip = Some(n);
        self
    }

    /// How many documents each round trip to the server brings (the
    /// server's default otherwise: 101 first, then up to 16 MiB): what a
    /// [`stream`](Self::stream) holds in memory at most.
    pub fn batch_size(mut self, n: u32) -> Self {
        self.batch_size = Some(n);
        self
    }

    /// Reads only the fields of `T` (a struct: its fields are found through
    /// its `Deserialize` implementation, renames included; `_id` is left
    /// out unless `T` has it) into values of `T`: `User::find(filter)
    /// .project::<UserName>().await`. Can be cached and streamed like the
    /// records themselves; the cached entries are under the model's scope.
    pub fn project<T: Projection>(self) -> Projected<M, T> {
        let projection = projection_of::<T>();
        self.project_with(projection)
    }

    /// [`project`](Self::project) with an explicit projection document
    /// (`doc! {"name": 1, "_id": 0}`), for fields `T` names differently or
    /// computed ones.
    pub fn project_with<T: Projection>(self, projection: Document) -> Projected<M, T> {
        Projected {
            find: self,
            projection,
            target: PhantomData,
        }
    }

    /// The records one by one, as the cursor brings them from the server:
    /// memory stays bounded by the batch size whatever the number of
    /// records. Never cached (`cached` is ignored). The environment is
    /// taken now (the current one, unless [`in_env`](Self::in_env) named
    /// one), so the stream can be moved into another task.
    pub fn stream(self) -> RecordStream<M> {
        self.stream_of::<M>(None)
    }

    /// The driver's options; a limit or skip MongoDB cannot take is
    /// [`Error::InvalidQuery`].
    fn options(&self, projection: Option<Document>) -> Result<mongodb::options::FindOptions> {
        let invalid = |reason: String| Error::InvalidQuery {
            model: M::COLLECTION,
            reason,
        };
        if self.limit == Some(i64::MIN) {
            return Err(invalid(format!("limit {} has no positive counterpart", i64::MIN)));
        }
        if let Some(skip) = self.skip.filter(|&skip| i64::try_from(skip).is_err()) {
            return Err(invalid(format!(
                "skip {skip} is past the largest MongoDB takes ({})",
                i64::MAX
            )));
        }
        Ok(mongodb::options::FindOptions::builder()
            .sort(self.sort.clone())
            .limit(self.limit)
            .skip(self.skip)
            .batch_size(self.batch_size)
            .projection(projection)
            .build())
    }

    fn stream_of<T: Projection>(self, projection: Option<Document>) -> RecordStream<T> {
        let options = self.options(projection);
        let env = self.read.env();
        let filter = self.read.filter;
        let opened = async move {
            let options = options?;
            let cursor = env?
                .database()
                .collection::<T>(M::COLLECTION)
                .find(filter)
                .with_options(options)
                .await
                .map_err(|e| Error::from_mongo(M::COLLECTION, e))?;
            Ok::<_, Error>(cursor.map_err(|e| Error::from_mongo(M::COLLECTION, e)))
        };
        Box::pin(futures_util::stream::once(opened).try_flatten())
    }

    /// Runs the find (through the query cache when asked), reading `T`.
    async fn collect<T: Projection>(self, projection: Option<Document>) -> Result<Vec<T>> {
        let options = self.options(projection.clone())?;
        let Find {
            read,
            sort,
            limit,
            skip,
            ..
        } = self;
        let name = if projection.is_some() { "find_projected" } else { "find" };
        let key = (&sort, limit, skip, &projection, std::any::type_name::<T>());
        read.run::<M, _, _, _>(name, &key, |env, filter| async move {
            env.database()
                .collection::<T>(M::COLLECTION)
                .find(filter)
                .with_options(options)
                .await
                .map_err(|e| Error::from_mongo(M::COLLECTION, e))?
                .try_collect()
                .await
                .map_err(|e| Error::from_mongo(M::COLLECTION, e))
        })
        .await
    }
}

impl<M: Model> IntoFuture for Find<M> {
    type Output = Result<Vec<M>>;
    type IntoFuture = ActionFuture<Vec<M>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.collect::<M>(None))
    }
}

/// Records read one by one (see [`Find::stream`]).
pub type RecordStream<T> = Pin<Box<dyn futures_util::Stream<Item = Result<T>> + Send>>;

/// A type a find can read into: a model, or a struct of some of its fields
/// (see [`Find::project`]).
pub trait Projection: Serialize + serde::de::DeserializeOwned + Send + Sync + Unpin + 'static {}
impl<T: Serialize + serde::de::DeserializeOwned + Send + Sync + Unpin + 'static> Projection for T {}

/// A find reading some fields into `T` (see [`Find::project`]).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Projected<M, T> {
    find: Find<M>,
    projection: Document,
    target: PhantomData<fn() -> T>,
}

impl<M: Model, T: Projection> Projected<M, T> {
    /// Caches the result for `ttl` under the model's query scope (see
    /// [`Find::cached`]).
    pub fn cached(mut self, ttl: Duration) -> Self {
        self.find.read.cached = Some(ttl);
        self
    }

    /// The values one by one (see [`Find::stream`]).
    pub fn stream(self) -> RecordStream<T> {
        self.find.stream_of::<T>(Some(self.projection))
    }

    /// The projection sent to the server.
    pub fn projection(&self) -> &Document {
        &self.projection
    }
}

impl<M: Model, T: Projection> IntoFuture for Projected<M, T> {
    type Output = Result<Vec<T>>;
    type IntoFuture = ActionFuture<Vec<T>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.find.collect::<T>(Some(self.projection)))
    }
}

/// The projection of the fields `T`'s `Deserialize` implementation asks for;
/// every field (an empty projection) when it is not a plain struct.
fn projection_of<T: Projection>() -> Document {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut fields));
    let mut projection = Document::new();
    for field in fields {
        projection.insert(*field, 1);
    }
    if !projection.is_empty() && !fields.contains(&"_id") {
        projection.insert("_id", 0);
    }
    projection
}

/// A deserializer that only records the field names a struct asks for.
struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
    type Error = serde::de::value::Error;

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(serde::de::Error::custom("field names recorded"))
    }

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _visitor: V) -> std::result::Result<V::Value, Self::Error> {
        Err(serde::de::Error::custom("not a struct"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

/// The first record matching a filter: `User::find_one(filter)`, awaited
/// as it is or configured first with [`sort`](Self::sort) and
/// [`cached`](Self::cached) (a cached "none matched" is kept too, until a
/// write to the collection).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct FindOne<M> {
    read: Read,
    sort: Option<Document>,
    model: PhantomData<fn() -> M>,
}

impl<M: Model> FindOne<M> {
    pub(crate) fn new(env: Option<Environment>, filter: Document) -> Self {
        Self {
            read: Read::new(env, filter),
            sort: None,
            model: PhantomData,
        }
    }

    read_action_common!();

    /// Which record comes first: `doc! {"created": -1}`.
    pub fn sort(mut self, sort: Document) -> Self {
        self.sort = Some(sort);
        self
    }
}

impl<M: Model> IntoFuture for FindOne<M> {
    type Output = Result<Option<M>>;
    type IntoFuture = ActionFuture<Option<M>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let FindOne { read, sort, .. } = self;
            let sort_for_read = sort.clone();
            read.run::<M, _, _, _>("find_one", &sort, |env, filter| async move {
                find_one_in_db::<M>(&env, filter, sort_for_read).await
            })
            .await
        })
    }
}

/// The number of records matching a filter: `User::count(filter)`, awaited
/// as it is or with [`cached`](Self::cached).
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Count<M> {
    read: Read,
    model: PhantomData<fn() -> M>,
}

impl<M: Model> Count<M> {
    pub(crate) fn new(env: Option<Environment>, filter: Document) -> Self {
        Self {
            read: Read::new(env, filter),
            model: PhantomData,
        }
    }

    read_action_common!();
}

impl<M: Model> IntoFuture for Count<M> {
    type Output = Result<u64>;
    type IntoFuture = ActionFuture<u64>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let Count { read, .. } = self;
            read.run::<M, _, _, _>("count", &(), |env, filter| async move {
                M::collection_in(&env)
                    .count_documents(filter)
                    .await
                    .map_err(|e| Error::from_mongo(M::COLLECTION, e))
            })
            .await
        })
    }
}

/// The record with an id: `User::find_by_id(id)` (see
/// [`Model::find_by_id`]), awaited as it is or configured first.
#[must_use = "an action does nothing until it is awaited"]
pub struct FindById<M: Model> {
    id: M::Id,
    env: Option<Environment>,
}

impl<M: Model> std::fmt::Debug for FindById<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FindById").field("id", &self.id).finish_non_exhaustive()
    }
}

impl<M: Model> FindById<M> {
    pub(crate) fn new(id: M::Id) -> Self {
        Self { id, env: None }
    }

    placed!();
}

impl<M: Model> IntoFuture for FindById<M> {
    type Output = Result<Option<M>>;
    type IntoFuture = ActionFuture<Option<M>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let env = Environment::chosen_or_current(self.env.as_ref())?;
            find_by_id::<M>(&env, self.id).await
        })
    }
}

/// The records with these ids: `User::find_many_by_ids(&ids)` (see
/// [`Model::find_many_by_ids`]), awaited as it is or configured first.
#[must_use = "an action does nothing until it is awaited"]
pub struct FindManyByIds<'a, M: Model> {
    ids: &'a [M::Id],
    env: Option<Environment>,
}

impl<M: Model> std::fmt::Debug for FindManyByIds<'_, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FindManyByIds")
            .field("ids", &self.ids)
            .finish_non_exhaustive()
    }
}

impl<'a, M: Model> FindManyByIds<'a, M> {
    pub(crate) fn new(ids: &'a [M::Id]) -> Self {
        Self { ids, env: None }
    }

    placed!();
}

impl<'a, M: Model> IntoFuture for FindManyByIds<'a, M> {
    type Output = Result<Vec<M>>;
    type IntoFuture = ActionFutureOf<'a, Vec<M>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let env = Environment::chosen_or_current(self.env.as_ref())?;
            find_many_by_ids::<M>(&env, self.ids).await
        })
    }
}

/// `IntoFuture` for a read inside a transaction: `$body` reads with the
/// action, the model's collection and the transaction's session, as the
/// closure-like head names them; driver errors are the model's.
macro_rules! read_in_transaction {
    ([$($generics:tt)*] $ty:ty => $out:ty, $name:literal, |$action:ident, $coll:ident, $session:ident| $body:expr) => {
        impl<'t, $($generics)*> ::std::future::IntoFuture for $crate::action::InTransaction<'t, $ty> {
            type Output = $crate::Result<$out>;
            type IntoFuture = $crate::action::ActionFutureOf<'t, $out>;

            fn into_future(self) -> Self::IntoFuture {
                let $crate::action::InTransaction { action: $action, tx } = self;
                let read = async move {
                    let (env, $session, _) = tx.parts();
                    let $coll = <M as $crate::Model>::collection_in(env);
                    let read: ::std::result::Result<$out, $crate::query::ReadError> = $body;
                    read.map_err(|e| e.of::<M>())
                };
                let span = $crate::op_span(<M as $crate::Model>::COLLECTION, $name);
                Box::pin(::tracing::Instrument::instrument(read, span))
            }
        }
    };
}
pub(crate) use read_in_transaction;

/// What a read inside a transaction can fail with.
pub(crate) enum ReadError {
    Driver(mongodb::error::Error),
    Orm(Error),
}

impl ReadError {
    pub(crate) fn of<M: Model>(self) -> Error {
        match self {
            ReadError::Driver(e) => Error::from_mongo(M::COLLECTION, e),
            ReadError::Orm(e) => e,
        }
    }
}

impl From<mongodb::error::Error> for ReadError {
    fn from(e: mongodb::error::Error) -> Self {
        ReadError::Driver(e)
    }
}

impl From<Error> for ReadError {
    fn from(e: Error) -> Self {
        ReadError::Orm(e)
    }
}

read_in_transaction!([M: Model] FindById<M> => Option<M>, "find_by_id", |action, coll, session| async {
    Ok(coll.find_one(doc! { "_id": to_bson(&action.id)? }).session(session).await?)
}.await);

read_in_transaction!(['a: 't, M: Model] FindManyByIds<'a, M> => Vec<M>, "find_many_by_ids", |action, coll, session| async {
    let unique = unique_ids::<M>(action.ids);
    let wanted: Vec<&(&M::Id, Option<String>)> = unique.iter().collect();
    let ids = unique.iter().map(|(id, _)| to_bson(*id)).collect::<Result<Vec<_>>>()?;
    let mut cursor = coll.find(doc! { "_id": { "$in": ids } }).session(&mut *session).await?;
    let found: Vec<M> = cursor.stream(session).try_collect().await?;
    Ok(in_order(found, &wanted).into_iter().flatten().collect())
}.await);

read_in_transaction!([M: Model] Find<M> => Vec<M>, "find", |action, coll, session| async {
    let options = action.options(None)?;
    let mut cursor = coll.find(action.read.filter).with_options(options).session(&mut *session).await?;
    Ok(cursor.stream(session).try_collect().await?)
}.await);

read_in_transaction!([M: Model] FindOne<M> => Option<M>, "find_one", |action, coll, session| async {
    let options = mongodb::options::FindOneOptions::builder().sort(action.sort).build();
    Ok(coll.find_one(action.read.filter).with_options(options).session(session).await?)
}.await);

read_in_transaction!([M: Model] Count<M> => u64, "count", |action, coll, session| async {
    Ok(coll.count_documents(action.read.filter).session(session).await?)
}.await);

/// How many ids one round of warming reads (one cache round trip, one `$in`).
const WARM_BATCH: usize = 500;

/// `Model::warm`: the ids matching `filter`, read in batches, each batch
/// through `find_many_by_ids` (so stored with the generations it was read
/// under).
pub(crate) async fn warm<M: Model>(env: &Environment, filter: Document) -> Result<u64> {
    let Some(_) = M::CACHE else {
        return Err(no_record_cache::<M>());
    };
    let mut ids = env
        .database()
        .collection::<IdOnly<M::Id>>(M::COLLECTION)
        .find(filter)
        .projection(doc! { "_id": 1 })
        .batch_size(u32::try_from(WARM_BATCH).unwrap_or(u32::MAX))
        .await
        .map_err(|e| Error::from_mongo(M::COLLECTION, e))?;
    let mut batch = Vec::with_capacity(WARM_BATCH);
    let mut warmed = 0;
    loop {
        let next = ids.try_next().await.map_err(|e| Error::from_mongo(M::COLLECTION, e))?;
        let done = next.is_none();
        if let Some(IdOnly { id }) = next {
            batch.push(id);
        }
        if batch.len() == WARM_BATCH || (done && !batch.is_empty()) {
            warmed += find_many_by_ids::<M>(env, &batch).await?.len() as u64;
            batch.clear();
            tracing::info!(model = M::COLLECTION, warmed, "warming the record cache");
        }
        if done {
            return Ok(warmed);
        }
    }
}

/// `Model::warm_ids`: the records with these ids, in batches.
pub(crate) async fn warm_ids<M: Model>(env: &Environment, ids: &[M::Id]) -> Result<u64> {
    let Some(_) = M::CACHE else {
        return Err(no_record_cache::<M>());
    };
    let mut warmed = 0;
    for batch in ids.chunks(WARM_BATCH) {
        warmed += find_many_by_ids::<M>(env, batch).await?.len() as u64;
        tracing::info!(
            model = M::COLLECTION,
            warmed,
            of = ids.len(),
            "warming the record cache"
        );
    }
    Ok(warmed)
}

fn no_record_cache<M: Model>() -> Error {
    Error::Config(format!(
        "{}: warming needs a record cache, #[earnorm(cache(ttl = SECONDS))]",
        M::COLLECTION
    ))
}

/// A document's id alone.
#[derive(serde::Deserialize)]
struct IdOnly<I> {
    #[serde(rename = "_id")]
    id: I,
}
