//! Aggregations: `User::aggregate(pipeline)`, as documents or typed, cached
//! under the scopes of every collection the pipeline reads.

use std::future::IntoFuture;
use std::marker::PhantomData;
use std::time::Duration;

use futures_util::TryStreamExt;
use mongodb::bson::{Bson, Document};

use crate::action::ActionFuture;
use crate::query::{query_key, read_cached, read_in_transaction, Projection};
use crate::transaction::{write_then_invalidate, Invalidate, Touched};
use crate::{Environment, Error, Model, Result};

/// An aggregation over the collection of `M`: `User::aggregate(pipeline)`,
/// awaited as it is (documents), or configured first: [`typed`](Self::typed)
/// to decode each result into a type, [`cached`](Self::cached) to keep the
/// result in the cache.
///
/// A cached aggregation depends on the model's collection and on every
/// collection the pipeline reads (`$lookup`, `$graphLookup`, `$unionWith`,
/// also inside sub-pipelines and `$facet`), found in the pipeline; name
/// others with [`depends_on`](Self::depends_on) (a collection a `$function`
/// reads, say). A write to any of them invalidates it. A pipeline that writes
/// (`$out`, `$merge`) is never cached, and invalidates the collection it
/// writes to once it has run.
#[must_use = "an action does nothing until it is awaited"]
#[derive(Debug, Clone)]
pub struct Aggregate<M, T = Document> {
    env: Option<Environment>,
    pipeline: Vec<Document>,
    cached: Option<Duration>,
    depends_on: Vec<String>,
    types: PhantomData<fn() -> (M, T)>,
}

impl<M: Model> Aggregate<M> {
    pub(crate) fn new(env: Option<Environment>, pipeline: Vec<Document>) -> Self {
        Self {
            env,
            pipeline,
            cached: None,
            depends_on: Vec::new(),
            types: PhantomData,
        }
    }
}

impl<M: Model, T: Projection> Aggregate<M, T> {
    /// Decodes each result into `U` instead.
    pub fn typed<U: Projection>(self) -> Aggregate<M, U> {
        Aggregate {
            env: self.env,
            pipeline: self.pipeline,
            cached: self.cached,
            depends_on: self.depends_on,
            types: PhantomData,
        }
    }

    crate::action::placed!();

    /// Caches the result for `ttl`, until a write to the model's collection
    /// or to any collection the pipeline reads.
    pub fn cached(mut self, ttl: Duration) -> Self {
        self.cached = Some(ttl);
        self
    }

    /// Another collection the result depends on.
    pub fn depends_on(mut self, collection: &str) -> Self {
        self.depends_on.push(collection.to_owned());
        self
    }

    /// The collections the result depends on: the model's, those the
    /// pipeline reads, and those declared; each once.
    pub fn collections(&self) -> Vec<String> {
        let mut found = vec![M::COLLECTION.to_owned()];
        read_collections(&self.pipeline, &mut found);
        found.extend(self.depends_on.iter().cloned());
        let mut seen = std::collections::HashSet::new();
        found.retain(|c| seen.insert(c.clone()));
        found
    }

    async fn run(self) -> Result<Vec<T>> {
        let env = Environment::chosen_or_current(self.env.as_ref())?;
        let written = written_collection(&self.pipeline);
        let read = |env: Environment, pipeline: Vec<Document>| async move {
            env.database()
                .collection::<Document>(M::COLLECTION)
                .aggregate(pipeline)
                .with_type::<T>()
                .await
                .map_err(|e| Error::from_mongo(M::COLLECTION, e))?
                .try_collect::<Vec<T>>()
                .await
                .map_err(|e| Error::from_mongo(M::COLLECTION, e))
        };
        if let Some(target) = written {
            // A write: run it, then invalidate what it wrote to, as one
            // unit the caller cannot split by dropping this future.
            let scope = crate::naming::model_scope(
                target.database.as_deref().unwrap_or(env.database().name()),
                &target.collection,
            );
            let write = read(env.clone(), self.pipeline);
            return write_then_invalidate(&env, vec![Touched::Named(scope)], Invalidate::Always, write).await;
        }
        let Some(ttl) = self.cached else {
            return read(env, self.pipeline).await;
        };
        // The model's own collection comes first: it names the entry.
        let names: Vec<String> = self.collections().iter().map(|c| env.model_scope(c)).collect();
        let key = query_key(&env, &names, "aggregate", std::any::type_name::<T>(), &self.pipeline);
        read_cached(&env, key, ttl, read(env.clone(), self.pipeline)).await
    }
}

impl<M: Model, T: Projection> IntoFuture for Aggregate<M, T> {
    type Output = Result<Vec<T>>;
    type IntoFuture = ActionFuture<Vec<T>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(tracing::Instrument::instrument(
            self.run(),
            crate::op_span(M::COLLECTION, "aggregate"),
        ))
    }
}

read_in_transaction!([M: Model, T: Projection] Aggregate<M, T> => Vec<T>, "aggregate", |action, coll, session| async {
    // What it would write could not be invalidated at the commit (nor does
    // MongoDB take `$out` in a transaction).
    if writes(&action.pipeline) {
        return Err(Error::InvalidQuery {
            model: M::COLLECTION,
            reason: "a pipeline that writes ($out, $merge) cannot run inside a transaction".into(),
        }
        .into());
    }
    let mut cursor = coll.aggregate(action.pipeline).with_type::<T>().session(&mut *session).await?;
    Ok(cursor.stream(session).try_collect().await?)
}.await);

/// Adds to `found` the collections `pipeline` reads from, sub-pipelines
/// included.
fn read_collections(pipeline: &[Document], found: &mut Vec<String>) {
    for stage in pipeline {
        for (name, spec) in stage {
            match (name.as_str(), spec) {
                ("$lookup" | "$graphLookup", Bson::Document(spec)) => {
                    if let Ok(from) = spec.get_str("from") {
                        found.push(from.to_owned());
                    }
                    sub_pipeline(spec, found);
                }
                ("$unionWith", Bson::String(coll)) => found.push(coll.clone()),
                ("$unionWith", Bson::Document(spec)) => {
                    if let Ok(coll) = spec.get_str("coll") {
                        found.push(coll.to_owned());
                    }
                    sub_pipeline(spec, found);
                }
                ("$facet", Bson::Document(facets)) => {
                    for facet in facets.values() {
                        if let Bson::Array(stages) = facet {
                            read_collections(&documents(stages), found);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

fn sub_pipeline(spec: &Document, found: &mut Vec<String>) {
    if let Ok(stages) = spec.get_array("pipeline") {
        read_collections(&documents(stages), found);
    }
}

fn documents(stages: &[Bson]) -> Vec<Document> {
    stages.iter().filter_map(|s| s.as_document().cloned()).collect()
}

/// The collection a writing stage writes to: its database when the stage
/// names one, and its name.
#[derive(Debug, PartialEq, Eq)]
struct Written {
    database: Option<String>,
    collection: String,
}

impl Written {
    fn named(collection: &str) -> Self {
        Self {
            database: None,
            collection: collection.to_owned(),
        }
    }

    /// `{ db: .., coll: .. }`.
    fn from_spec(spec: &Document) -> Option<Self> {
        Some(Self {
            database: spec.get_str("db").ok().map(str::to_owned),
            collection: spec.get_str("coll").ok()?.to_owned(),
        })
    }
}

/// Whether the pipeline ends with a writing stage (`$out`, `$merge`),
/// well-formed or not.
fn writes(pipeline: &[Document]) -> bool {
    pipeline
        .last()
        .is_some_and(|stage| stage.contains_key("$out") || stage.contains_key("$merge"))
}

/// The collection a writing stage (`$out`, `$merge`) writes to, if any.
fn written_collection(pipeline: &[Document]) -> Option<Written> {
    let last = pipeline.last()?;
    if let Some(out) = last.get("$out") {
        return match out {
            Bson::String(coll) => Some(Written::named(coll)),
            Bson::Document(spec) => Written::from_spec(spec),
            _ => None,
        };
    }
    match last.get("$merge")? {
        Bson::String(coll) => Some(Written::named(coll)),
        Bson::Document(spec) => match spec.get("into") {
            Some(Bson::String(coll)) => Some(Written::named(coll)),
            Some(Bson::Document(into)) => Written::from_spec(into),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use mongodb::bson::doc;

    use super::*;

    #[test]
    fn every_collection_a_pipeline_reads_is_found() {
        let pipeline = vec![
            doc! { "$lookup": { "from": "orders", "localField": "_id", "foreignField": "user", "as": "orders" } },
            doc! { "$unionWith": "archive" },
            doc! { "$unionWith": { "coll": "legacy", "pipeline": [
                { "$lookup": { "from": "notes", "pipeline": [ { "$match": {} } ], "as": "n" } }
            ] } },
            doc! { "$facet": { "a": [ { "$graphLookup": { "from": "edges", "startWith": "$x",
            "connectFromField": "a", "connectToField": "b", "as": "g" } } ] } },
        ];
        let mut found = Vec::new();
        read_collections(&pipeline, &mut found);
        assert_eq!(found, ["orders", "archive", "legacy", "notes", "edges"]);
        assert_eq!(written_collection(&pipeline), None);
        assert_eq!(
            written_collection(&[doc! { "$out": "report" }]),
            Some(Written::named("report"))
        );
        assert_eq!(
            written_collection(&[doc! { "$merge": "totals" }]),
            Some(Written::named("totals"))
        );
        // Into another database: that database's collection.
        let elsewhere = Some(Written {
            database: Some("x".into()),
            collection: "totals".into(),
        });
        assert_eq!(
            written_collection(&[doc! { "$merge": { "into": { "db": "x", "coll": "totals" } } }]),
            elsewhere
        );
        assert_eq!(
            written_collection(&[doc! { "$out": { "db": "x", "coll": "totals" } }]),
            elsewhere
        );
    }
}
