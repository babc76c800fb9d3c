//! Actions: what a read or a write call returns, awaited as it is (in the
//! current environment) or configured first, in the style of the MongoDB
//! driver. What this module alone owns: where an action runs. Every action
//! has `.in_env(&env)`, to run in another environment, and `.session(&mut
//! tx)`, to run inside a transaction ([`InTransaction`]; an aggregation
//! that writes, with `$out` or `$merge`, is refused there); the reads are
//! in `query.rs` and `aggregate.rs`, the writes in
//! `write.rs` and, for partial updates, `update.rs`.

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
        /// Runs in `env` instead of [`Environment::current`](crate::Environment::current).
        pub fn in_env(mut self, env: &$crate::Environment) -> Self {
            self.env = Some(env.clone());
            self
        }

        /// Runs inside `tx` (see [`InTransaction`](crate::InTransaction)): a write is applied,
        /// and what it makes stale invalidated, when the transaction
        /// commits; a read sees the transaction's own writes and never the
        /// cache.
        pub fn session(self, tx: &mut $crate::Transaction) -> $crate::action::InTransaction<'_, Self> {
            $crate::action::InTransaction::new(self, tx)
        }
    };
}
pub(crate) use placed;

/// `placed!` and `IntoFuture` for write actions, awaited where they were
/// placed and traced as the operation named: each `$ty` has a field
/// `env: Option<Environment>` and a method `run(self, Place) -> Result<$out>`.
macro_rules! actions {
    ($($ty:ident$(<$lt:lifetime>)?: $out:ty = $name:literal;)*) => {$(
        impl<$($lt,)? M: $crate::Model> $ty<$($lt,)? M> {
            $crate::action::placed!();
        }

        impl<$($lt,)? M: $crate::Model> ::std::future::IntoFuture for $ty<$($lt,)? M> {
            type Output = $crate::Result<$out>;
            type IntoFuture = $crate::action::actions!(@future $($lt)?, $out);

            fn into_future(self) -> Self::IntoFuture {
                let run = async move {
                    let env = $crate::Environment::chosen_or_current(self.env.as_ref())?;
                    self.run($crate::action::Place::Env(env)).await
                };
                let span = $crate::op_span(<M as $crate::Model>::COLLECTION, $name);
                Box::pin(::tracing::Instrument::instrument(run, span))
            }
        }

        impl<'t, $($lt: 't,)? M: $crate::Model> ::std::future::IntoFuture
            for $crate::action::InTransaction<'t, $ty<$($lt,)? M>>
        {
            type Output = $crate::Result<$out>;
            type IntoFuture = $crate::action::ActionFutureOf<'t, $out>;

            fn into_future(self) -> Self::IntoFuture {
                let run = self.action.run($crate::action::Place::Tx(self.tx));
                let span = $crate::op_span(<M as $crate::Model>::COLLECTION, $name);
                Box::pin(::tracing::Instrument::instrument(run, span))
            }
        }
    )*};
    (@future $lt:lifetime, $out:ty) => { $crate::action::ActionFutureOf<$lt, $out> };
    (@future , $out:ty) => { $crate::action::ActionFutureOf<'static, $out> };
}
pub(crate) use actions;

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
