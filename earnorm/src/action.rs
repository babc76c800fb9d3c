//! Actions: what a read or a write call returns, awaited as it is (in the
//! current environment) or configured first, in the style of the MongoDB
//! driver. What this module alone owns: where an action runs. Every action
//! has `.in_env(&env)`, to run in another environment, and `.session(&mut
//! tx)`, to run inside a transaction ([`InTransaction`]); the reads in
//! `query.rs`, the writes in `write.rs`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use crate::{Environment, Result, Transaction};

/// The future an action becomes when awaited.
pub type ActionFuture<T> = Pin<Box<dyn Future<Output = Result<T>> + Send>>;

/// The future an action that borrows (a record, a transaction) becomes when
/// awaited.
pub type ActionFutureOf<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// `.in_env(&env)` and `.session(&mut tx)` for an action that keeps its
/// environment in a field `env: Option<Environment>`.
macro_rules! placed {
    () => {
        /// Runs in `env` instead of [`Environment::current`].
        pub fn in_env(mut self, env: &Environment) -> Self {
            self.env = Some(env.clone());
            self
        }

        /// Runs inside `tx` (see [`InTransaction`]): a write is applied,
        /// and what it makes stale invalidated, when the transaction
        /// commits; a read sees the transaction's own writes and never the
        /// cache.
        pub fn session(self, tx: &mut Transaction) -> InTransaction<'_, Self> {
            InTransaction::new(self, tx)
        }
    };
}
pub(crate) use placed;

/// Where an action runs.
pub(crate) enum Place<'t> {
    /// In this environment: reads through the cache, each write as one unit
    /// with its invalidation.
    Env(Environment),
    /// Inside this transaction: reads see its writes and never the cache;
    /// writes are invalidated at its commit.
    Tx(&'t mut Transaction),
}

/// An action run inside a transaction: what `.session(&mut tx)` returns.
/// Awaited, it runs in the transaction's session: a write is applied, and
/// what it made stale is invalidated, when the transaction commits; a read
/// sees the transaction's own writes, so it never reads through the cache.
#[must_use = "an action does nothing until it is awaited"]
pub struct InTransaction<'t, A> {
    pub(crate) action: A,
    pub(crate) tx: &'t mut Transaction,
}

impl<'t, A> InTransaction<'t, A> {
    pub(crate) fn new(action: A, tx: &'t mut Transaction) -> Self {
        Self { action, tx }
    }
}

impl<A: fmt::Debug> fmt::Debug for InTransaction<'_, A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InTransaction")
            .field("action", &self.action)
            .field("tx", &self.tx)
            .finish()
    }
}
