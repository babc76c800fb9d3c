//! Environments: a MongoDB database and a cache, used by model calls.
//!
//! An [`Environment`] is a cheap cloneable handle. Model methods find theirs
//! in this order:
//!
//! 1. the environment of the enclosing [`Environment::scope`] (a Tokio
//!    task-local: it follows the future, not the thread, and does not pass
//!    into `tokio::spawn`ed tasks);
//! 2. the process-wide default installed by [`init`].
//!
//! So an application calls `init` once; tests (or a multi-tenant service)
//! build several environments with [`Environment::connect`] and run each
//! piece of work inside `env.scope(...)`, or give an action the environment
//! (`User::find_by_id(id).in_env(&env)`).

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use earnorm_cache::{redact_url, CacheManager};
use mongodb::bson::{doc, Document};
use mongodb::options::ClientOptions;
use mongodb::{Client, Collection, Database};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::feed::{self, FeedStats};
use crate::naming::model_scope;

use crate::{Config, Error, Result};

/// A connected database and its cache.
#[derive(Clone, Debug)]
pub struct Environment {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    database: Database,
    cache: CacheManager,
    feed: Arc<feed::Counters>,
    /// Dropped with the environment (or signalled by `close`), which ends
    /// its feed task.
    feed_stop: watch::Sender<()>,
    feed_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Refuses database names MongoDB does not accept: empty, 64 bytes or
/// longer, or holding `/ \ . " $`, a space or a NUL.
fn check_database_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "is empty"
    } else if name.len() >= 64 {
        "is 64 bytes or longer"
    } else if name.contains(['/', '\\', '.', '"', '$', ' ', '\0']) {
        "contains one of / \\ . \" $, a space or a NUL"
    } else {
        return Ok(());
    };
    Err(Error::Config(format!(
        "the database name `{}` {reason}",
        name.escape_debug()
    )))
}

static DEFAULT: RwLock<Option<Environment>> = RwLock::new(None);

tokio::task_local! {
    static CURRENT: Environment;
}

impl Environment {
    /// Connects to MongoDB (checking that it answers within
    /// `connect_timeout`) and sets up the cache. A Redis that is down is not
    /// an error: the cache runs degraded and attaches when Redis comes up.
    /// With the database feed on, returns once the feed follows a leader or
    /// leads with its stream open (at most `feed::READY_WAIT`, then a
    /// `warn`), so that what is cached next is not wiped by its start.
    ///
    /// # Errors
    /// [`Error::Config`] for a database name MongoDB does not accept;
    /// [`Error::Connection`] when MongoDB cannot be reached or the URI is
    /// invalid; [`Error::Cache`] for an invalid Redis URL or cache settings
    /// that cannot work.
    pub async fn connect(config: Config) -> Result<Self> {
        Self::connect_with(config, |_| {}).await
    }

    /// [`connect`](Self::connect), letting `configure` adjust the driver's
    /// options (parsed from `mongo_uri`) before the client is built: a
    /// command monitor, the pool size, compressors.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn connect_with(config: Config, configure: impl FnOnce(&mut ClientOptions)) -> Result<Self> {
        check_database_name(&config.database)?;
        let uri = redact_url(&config.mongo_uri);
        let connection = |source| Error::Connection {
            uri: uri.clone(),
            source,
        };
        let mut options = ClientOptions::parse(&config.mongo_uri).await.map_err(connection)?;
        options.server_selection_timeout = Some(config.connect_timeout);
        options.connect_timeout = Some(config.connect_timeout);
        options.app_name.get_or_insert_with(|| "earnorm".to_owned());
        configure(&mut options);
        // When each read happened, for the consistency monitor.
        let timing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        if config.cache_config.monitor.enabled {
            let theirs = options.command_event_handler.take();
            options.command_event_handler = Some(crate::read_times::noting(theirs, Arc::clone(&timing)));
        }
        let client = Client::with_options(options).map_err(connection)?;
        let database = client.database(&config.database);
        database.run_command(doc! { "ping": 1 }).await.map_err(connection)?;
        if config.cache_config.monitor.enabled {
            let hello = database.run_command(doc! { "hello": 1 }).await.map_err(connection)?;
            if hello.get_str("msg").is_ok_and(|msg| msg == "isdbgrid") {
                timing.store(false, std::sync::atomic::Ordering::Relaxed);
                info!("a sharded cluster: the consistency monitor checks generations, not read times");
            }
        }
        info!(uri = %uri, database = %config.database, "connected to MongoDB");
        let cache = CacheManager::connect(config.redis_uri.as_deref(), config.cache_config).await?;
        cache.label_database(&config.database);
        let counters = Arc::new(feed::Counters::default());
        let (stop, stopped) = watch::channel(());
        let mut feed_task = None;
        // Without Redis too, when the in-process tier caches: each process
        // then follows the feed for itself.
        if config.feed && cache.caches() {
            let (feed, mut ready) = feed::Feed::new(database.clone(), cache.clone(), Arc::clone(&counters), stopped);
            cache.follow_feed(&feed::marker_name(database.name()), &model_scope(database.name(), ""));
            feed_task = Some(tokio::spawn(feed.run()));
            // Until the feed knows its place: a new leader's reset would
            // otherwise wipe the first values this program caches.
            if tokio::time::timeout(feed::READY_WAIT, ready.wait_for(|ready| *ready))
                .await
                .is_err()
            {
                warn!(
                    database = %config.database,
                    "the database feed is not ready after {:?}; values cached before it is may be invalidated when it starts",
                    feed::READY_WAIT
                );
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                database,
                cache,
                feed: counters,
                feed_stop: stop,
                feed_task: Mutex::new(feed_task),
            }),
        })
    }

    /// The environment model calls use here: the enclosing
    /// [`scope`](Self::scope), else the default from [`init`].
    ///
    /// # Errors
    /// [`Error::NotInitialized`] when there is neither.
    pub fn current() -> Result<Self> {
        if let Ok(env) = CURRENT.try_with(Clone::clone) {
            return Ok(env);
        }
        DEFAULT
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or(Error::NotInitialized)
    }

    /// `chosen`, or else the [`current`](Self::current) one: where an
    /// action runs that may have been given an environment (`.in_env`).
    ///
    /// # Errors
    /// As [`current`](Self::current), when none was chosen.
    pub(crate) fn chosen_or_current(chosen: Option<&Environment>) -> Result<Self> {
        match chosen {
            Some(env) => Ok(env.clone()),
            None => Self::current(),
        }
    }

    /// Runs `future` with this environment as the current one.
    pub async fn scope<F: Future>(&self, future: F) -> F::Output {
        CURRENT.scope(self.clone(), future).await
    }

    /// Makes this environment the process-wide default.
    pub fn set_default(&self) {
        *DEFAULT.write().unwrap_or_else(PoisonError::into_inner) = Some(self.clone());
    }

    /// The MongoDB database.
    pub fn database(&self) -> &Database {
        &self.inner.database
    }

    /// The collection `collection` as untyped documents: writes send owned
    /// documents, so that they can run in a task of their own (see
    /// `write_then_invalidate`).
    pub(crate) fn documents(&self, collection: &str) -> Collection<Document> {
        self.inner.database.collection(collection)
    }

    /// The MongoDB client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The cache.
    pub fn cache(&self) -> &CacheManager {
        &self.inner.cache
    }

    /// What the database feed is doing (see the crate docs on the feed).
    pub fn feed_stats(&self) -> FeedStats {
        self.inner.feed.snapshot()
    }

    /// Waits until the database feed has invalidated every write committed
    /// before this call (its leader, in whichever process, has read the
    /// change stream past it), for at most `limit`; returns whether it has.
    /// An EarnORM write invalidates its own scopes at once, and its change
    /// event invalidates them again a few milliseconds later: a value
    /// computed across that second invalidation is not stored. A program
    /// that writes, then wants the values it computes next to be cached
    /// (a demo, a test, a warm-up) calls this in between.
    ///
    /// `true` at once without a feed; `false` when Redis cannot be reached
    /// or no leader catches up within `limit`.
    pub async fn wait_for_feed(&self, limit: Duration) -> bool {
        if !self.inner.feed.snapshot().enabled {
            return true;
        }
        let start = std::time::Instant::now();
        let Some(at) = self.inner.cache.server_time_at_most() else {
            return false;
        };
        let marker = feed::marker_name(self.inner.database.name());
        while start.elapsed() < limit {
            let recorded = self.inner.cache.get_meta(&marker).await.ok().flatten();
            let caught_up = recorded
                .and_then(|bytes| std::str::from_utf8(&bytes).ok()?.parse::<i64>().ok())
                .is_some_and(|marked| marked >= at);
            if caught_up {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// Leaves cleanly, for a process about to exit: stops the database feed
    /// (a leader gives its lease up, so that another process leads at once
    /// instead of after the lease expires) and shuts the cache down (see
    /// [`CacheManager::shutdown`]: the other processes do not take this one
    /// for one cut off from Redis). Waits at most two seconds. Model calls
    /// still work afterwards, but nothing is cached any more once the cache's
    /// connection goes.
    pub async fn close(&self) {
        let _ = self.inner.feed_stop.send(());
        let task = self
            .inner
            .feed_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        self.inner.cache.shutdown().await;
    }

    /// The name a collection of this environment has in cache keys and scopes.
    pub fn model_scope(&self, collection: &str) -> String {
        model_scope(self.inner.database.name(), collection)
    }
}

/// Connects with `config` and installs the result as the process-wide
/// default environment (replacing any earlier one).
///
/// # Errors
/// As [`Environment::connect`].
pub async fn init(config: Config) -> Result<Environment> {
    let env = Environment::connect(config).await?;
    env.set_default();
    Ok(env)
}

/// Closes the process-wide default environment installed by [`init`] (see
/// [`Environment::close`]) and removes it: call it when the program is
/// about to exit, so that the processes still running keep serving hits
/// and take the database feed over at once.
pub async fn shutdown() {
    let env = DEFAULT.write().unwrap_or_else(PoisonError::into_inner).take();
    if let Some(env) = env {
        env.close().await;
    }
}

/// The cache of the current environment; a disabled cache when EarnORM is
/// not initialized.
pub fn cache() -> CacheManager {
    current_cache().unwrap_or_else(|| CacheManager::disabled(earnorm_cache::CacheConfig::default()))
}

/// Runs `f` on the current environment's cache and database name.
pub(crate) fn with_current<T>(f: impl FnOnce(&CacheManager, &str) -> T) -> Option<T> {
    let env = Environment::current().ok()?;
    Some(f(&env.inner.cache, env.inner.database.name()))
}

/// The current environment's cache.
pub(crate) fn current_cache() -> Option<CacheManager> {
    with_current(|cache, _| cache.clone())
}
