//! Transactions: several writes that commit together, invalidating the cache
//! only once they have committed.

use std::fmt;
use std::future::Future;
use std::time::Duration;

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
    /// A whole collection named at run time, maybe of another database
    /// (what `$out`/`$merge` write to): its model scope name,
    /// `DATABASE.COLLECTION`.
    Named(String),
}

/// A MongoDB transaction (the server must support them: a replica set or a
/// sharded cluster). Writes given the transaction (`.session(&mut tx)`) are applied
/// on [`commit`](Self::commit), which then invalidates what they made stale;
/// [`abort`](Self::abort), or dropping the transaction, discards them and
/// invalidates nothing.
///
/// ```no_run
/// # use earnorm::{Environment, Model};
/// # async fn demo<M: Model>(env: &Environment, a: &mut M, b: &mut M) -> earnorm::Result<()> {
/// let mut tx = env.start_transaction().await?;
/// a.save().session(&mut tx).await?;
/// b.save().session(&mut tx).await?;
/// tx.commit().await?; // both writes, then the cache invalidations
/// # Ok(()) }
/// ```
pub struct Transaction {
    env: Environment,
    session: ClientSession,
    touched: Vec<Touched>,
    /// Why the transaction may not commit, once a write inside it failed
    /// after changing its data.
    doomed: Option<String>,
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
            doomed: None,
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

    /// Marks the transaction as one that may not commit: a write inside it
    /// changed its data and then failed, and MongoDB cannot take back one
    /// statement of a transaction. `commit` aborts it instead.
    pub(crate) fn doom(&mut self, reason: String) {
        self.doomed.get_or_insert(reason);
    }

    /// Whether the transaction is doomed.
    pub(crate) fn is_doomed(&self) -> bool {
        self.doomed.is_some()
    }

    /// Lifts a doom that its own caller set (see [`doom`](Self::doom)),
    /// once the write it guarded turned out well.
    pub(crate) fn lift_doom(&mut self) {
        self.doomed = None;
    }

    /// Commits, then invalidates every scope the transaction's writes touched.
    /// If the commit fails, they are invalidated all the same: a commit whose
    /// answer was lost may have been applied, and invalidating costs only misses.
    ///
    /// # Errors
    /// When the commit fails, and [`Error::TransactionAborted`] (nothing
    /// applied) when a write inside the transaction failed after changing
    /// its data (a partial update whose result failed validation).
    pub async fn commit(self) -> Result<()> {
        let Transaction {
            env,
            mut session,
            touched,
            doomed,
        } = self;
        if let Some(reason) = doomed {
            // Not committed either way: a failed abort leaves the server to
            // drop the transaction when the session ends.
            let _ = session.abort_transaction().await;
            return Err(Error::TransactionAborted { reason });
        }
        let commit = async move { session.commit_transaction().await.map_err(Error::Mongo) };
        // A failed commit invalidates too (an `Error::Mongo` may have
        // written): one whose answer was lost may have been applied.
        write_then_invalidate(&env, touched, Invalidate::IfWritten, commit).await
    }

    /// Aborts: no write is applied, nothing is invalidated.
    ///
    /// # Errors
    /// When the server cannot be told.
    pub async fn abort(mut self) -> Result<()> {
        self.session.abort_transaction().await.map_err(Error::Mongo)
    }
}

/// How long after an ambiguous write failure its scopes are invalidated a
/// second time.
const LATE_APPLY: Duration = Duration::from_secs(1);

/// When a write unit invalidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalidate {
    /// Unless the write surely changed nothing (see `Error::may_have_written`).
    IfWritten,
    /// Whatever the outcome: a batch refused part-way may have written its
    /// first part.
    Always,
}

/// Runs `write`, then invalidates `touched` as `when` says, as one unit the caller cannot split: both run in a task of their
/// own that the caller awaits. A caller that stops waiting (its future
/// dropped, a timeout) leaves the task to finish, so the invalidation still
/// happens, once the driver has the write's outcome. When that outcome is an
/// error that leaves it open whether the server applied the write (a lost
/// connection, a timeout), the server may still apply it later: the scopes
/// are invalidated again [`LATE_APPLY`] later (with the database feed, its
/// event invalidates them too).
pub(crate) async fn write_then_invalidate<T, W>(
    env: &Environment,
    touched: Vec<Touched>,
    when: Invalidate,
    write: W,
) -> Result<T>
where
    T: Send + 'static,
    W: Future<Output = Result<T>> + Send + 'static,
{
    write_then_invalidate_found(env, Found::new(touched), when, write).await
}

/// The scopes a write touches, which the write itself may narrow once it
/// knows which record it changed (an update by filter starts with its whole
/// model, then names the record it found, or nothing when none matched).
#[derive(Debug, Clone, Default)]
pub(crate) struct Found(std::sync::Arc<std::sync::Mutex<Vec<Touched>>>);

impl Found {
    pub(crate) fn new(touched: Vec<Touched>) -> Self {
        Self(std::sync::Arc::new(std::sync::Mutex::new(touched)))
    }

    /// Replaces the scopes.
    pub(crate) fn set(&self, touched: Vec<Touched>) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = touched;
    }

    fn get(&self) -> Vec<Touched> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

/// [`write_then_invalidate`] with scopes the write may narrow (see [`Found`]).
pub(crate) async fn write_then_invalidate_found<T, W>(
    env: &Environment,
    found: Found,
    when: Invalidate,
    write: W,
) -> Result<T>
where
    T: Send + 'static,
    W: Future<Output = Result<T>> + Send + 'static,
{
    let env = env.clone();
    let unit = async move {
        let (result, at) = crate::read_times::timed_write(write).await;
        let touched = found.get();
        if when == Invalidate::Always || result.as_ref().err().is_none_or(Error::may_have_written) {
            // The write's time is its record's only when it wrote one.
            let one_record = result.is_ok() && matches!(touched.as_slice(), [Touched::Record(..)]);
            invalidate(&env, &touched, if one_record { at } else { 0 }).await;
        }
        if result.as_ref().is_err_and(Error::may_have_written) {
            // The write failed in a way that says nothing of whether the
            // server applied it (a lost connection, a timeout): it may still
            // do so after the invalidation above, when a reader could cache
            // what it read in between. Invalidate again a little later.
            let (env, touched) = (env.clone(), touched.clone());
            tokio::spawn(async move {
                tokio::time::sleep(LATE_APPLY).await;
                invalidate(&env, &touched, 0).await;
            });
        }
        result
    };
    // The unit runs in a task of its own, inside the caller's span.
    let unit = tracing::Instrument::instrument(unit, tracing::Span::current());
    // Polled outside a Tokio runtime (another executor), there is nothing
    // to spawn on: run the unit in place.
    // A plain `set` after the write may store what was written: reads
    // before it must not judge that value (see `earnorm_cache::note_write`).
    earnorm_cache::note_write();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return unit.await;
    };
    match runtime.spawn(unit).await {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(_) => Err(Error::Cancelled),
    }
}

/// Invalidates `touched` in one call (one round trip); `at`: the write's
/// logical time, for the consistency monitor (`0`: unknown).
pub(crate) async fn invalidate(env: &Environment, touched: &[Touched], at: u64) {
    let names = model_names(env, touched);
    let scopes = scopes(touched, &names);
    if !scopes.is_empty() {
        let cache = env.cache();
        // Checked by the consistency monitor once the invalidation returned.
        let _watch = cache
            .watch_write_at(&scopes, earnorm_cache::InvalidationSource::Write, at)
            .await;
        #[cfg(feature = "test-hooks")]
        if crate::__private::WRITE_INVALIDATIONS_SKIPPED.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        cache
            .invalidate_from(&scopes, earnorm_cache::InvalidationSource::Write)
            .await;
    }
}

/// The cache name of each touched collection.
fn model_names(env: &Environment, touched: &[Touched]) -> Vec<String> {
    touched
        .iter()
        .map(|t| match t {
            Touched::Record(collection, _) | Touched::Model(collection) => env.model_scope(collection),
            Touched::Named(scope) => scope.clone(),
        })
        .collect()
}

/// The cache scopes of `touched`, named by `names` (from [`model_names`]).
fn scopes<'a>(touched: &'a [Touched], names: &'a [String]) -> Vec<Scope<'a>> {
    touched
        .iter()
        .zip(names)
        .map(|(t, model)| match t {
            Touched::Record(_, id) => Scope::Record(model, id),
            Touched::Model(_) | Touched::Named(_) => Scope::Model(model),
        })
        .collect()
}
