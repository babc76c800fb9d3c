//! Transactions: several writes that commit together, invalidating the cache
//! only once they have committed.

use std::fmt;

use earnorm_cache::Scope;
use mongodb::ClientSession;

use crate::{Environment, Error, Result};

/// A cache scope a write touched, remembered until the transaction commits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Touched {
    /// A record: (collection, id key).
    Record(&'static str, String),
    /// A whole collection.
    Model(&'static str),
}

/// A MongoDB transaction (the server must support them: a replica set or a
/// sharded cluster). Writes made with the models' `*_tx` methods are applied
/// on [`commit`](Self::commit), which then invalidates what they made stale;
/// [`abort`](Self::abort), or dropping the transaction, discards them and
/// invalidates nothing.
///
/// ```no_run
/// # use earnorm::{Environment, Model};
/// # async fn demo<M: Model>(env: &Environment, a: &mut M, b: &mut M) -> earnorm::Result<()> {
/// let mut tx = env.start_transaction().await?;
/// a.save_tx(&mut tx).await?;
/// b.save_tx(&mut tx).await?;
/// tx.commit().await?; // both writes, then the cache invalidations
/// # Ok(()) }
/// ```
pub struct Transaction {
    env: Environment,
    session: ClientSession,
    touched: Vec<Touched>,
}

impl fmt::Debug for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transaction")
            .field("touched", &self.touched)
            .finish_non_exhaustive()
    }
}

impl Environment {
    /// Starts a transaction.
    ///
    /// # Errors
    /// When the server does not support transactions or cannot be reached.
    pub async fn start_transaction(&self) -> Result<Transaction> {
        let mut session = self.client().start_session().await.map_err(Error::Mongo)?;
        session.start_transaction().await.map_err(Error::Mongo)?;
        Ok(Transaction {
            env: self.clone(),
            session,
            touched: Vec::new(),
        })
    }
}

impl Transaction {
    /// The environment the transaction runs in.
    pub fn env(&self) -> &Environment {
        &self.env
    }

    /// The driver session, for operations EarnORM does not wrap. Writes made
    /// through it directly are not tracked for cache invalidation.
    pub fn session(&mut self) -> &mut ClientSession {
        &mut self.session
    }

    pub(crate) fn parts(&mut self) -> (&Environment, &mut ClientSession, &mut Vec<Touched>) {
        (&self.env, &mut self.session, &mut self.touched)
    }

    /// Commits, then invalidates every scope the transaction's writes touched.
    /// If the commit fails, they are invalidated all the same: a commit whose
    /// answer was lost may have been applied, and invalidating costs only misses.
    ///
    /// # Errors
    /// When the commit fails.
    pub async fn commit(mut self) -> Result<()> {
        let mut guard = Invalidation::new(&self.env);
        for touched in self.touched.drain(..) {
            guard.add(touched);
        }
        let result = self.session.commit_transaction().await.map_err(Error::Mongo);
        guard.run().await;
        result
    }

    /// Aborts: no write is applied, nothing is invalidated.
    ///
    /// # Errors
    /// When the server cannot be told.
    pub async fn abort(mut self) -> Result<()> {
        self.session.abort_transaction().await.map_err(Error::Mongo)
    }
}

/// Scopes a write is about to change, invalidated once it is done, and also
/// if the caller stops waiting after the write was sent (the guard is
/// dropped): then a task is spawned to invalidate them.
pub(crate) struct Invalidation {
    env: Environment,
    touched: Vec<Touched>,
}

impl Invalidation {
    pub(crate) fn new(env: &Environment) -> Self {
        Self {
            env: env.clone(),
            touched: Vec::new(),
        }
    }

    /// Arms the guard for `touched`; call before sending the write.
    pub(crate) fn add(&mut self, touched: Touched) {
        self.touched.push(touched);
    }

    /// Takes the scopes back (nothing was written, or a transaction keeps them
    /// for its commit).
    pub(crate) fn disarm(&mut self) -> Vec<Touched> {
        std::mem::take(&mut self.touched)
    }

    /// Invalidates now. If this future is dropped midway, `Drop` still does.
    pub(crate) async fn run(mut self) {
        if !self.touched.is_empty() {
            invalidate(&self.env, &self.touched).await;
            self.touched.clear();
        }
    }
}

impl Drop for Invalidation {
    fn drop(&mut self) {
        if self.touched.is_empty() {
            return;
        }
        let (env, touched) = (self.env.clone(), std::mem::take(&mut self.touched));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { invalidate(&env, &touched).await });
        }
    }
}

/// Invalidates `touched` in one call (one round trip).
pub(crate) async fn invalidate(env: &Environment, touched: &[Touched]) {
    let models: Vec<String> = touched
        .iter()
        .map(|t| match t {
            Touched::Record(collection, _) | Touched::Model(collection) => env.model_scope(collection),
        })
        .collect();
    let scopes: Vec<Scope<'_>> = touched
        .iter()
        .zip(&models)
        .map(|(t, model)| match t {
            Touched::Record(_, id) => Scope::Record(model, id),
            Touched::Model(_) => Scope::Model(model),
        })
        .collect();
    if !scopes.is_empty() {
        env.cache().invalidate(&scopes).await;
    }
}
