//! Isolated EarnORM environments for tests: each gets its own database and
//! key prefix, so tests run in parallel against one MongoDB and one Redis.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use earnorm::{CacheConfig, Config, Environment};

use crate::{require_mongo, require_redis, unique_name};

/// Cache settings that recover quickly, for tests.
pub fn fast_cache_config(prefix: &str) -> CacheConfig {
    CacheConfig {
        prefix: format!("{prefix}:"),
        operation_timeout: Duration::from_millis(300),
        connect_timeout: Duration::from_millis(300),
        retry_delay: Duration::from_millis(50),
        max_retry_delay: Duration::from_millis(200),
        health_check_interval: Duration::from_millis(300),
        heartbeat_interval: Duration::from_millis(100),
        ..Default::default()
    }
}

/// A config with a fresh database and prefix, on the shared services.
pub fn test_config(tag: &str) -> Config {
    let name = unique_name(tag);
    Config {
        mongo_uri: require_mongo(),
        database: name.clone(),
        redis_uri: Some(require_redis()),
        cache_config: fast_cache_config(&name),
        connect_timeout: Duration::from_secs(5),
        // Off here: its redundant invalidation of an ORM write, arriving a few
        // milliseconds later, would make tests that count body runs racy.
        // The feed's own tests and the checker turn it on.
        feed: false,
    }
}

/// An environment with a fresh database and prefix on the shared services.
pub async fn test_env(tag: &str) -> Environment {
    connect(test_config(tag)).await
}

/// Connects, failing the test with instructions when MongoDB is missing.
pub async fn connect(config: Config) -> Environment {
    match Environment::connect(config).await {
        Ok(env) => env,
        Err(err) => panic!("{err}: {}", crate::HOW_TO_START),
    }
}

/// An environment like [`test_env`] whose driver counts the commands named
/// `command` it sends (`"find"`, say), through its command monitor.
pub async fn counting_env(tag: &str, command: &'static str) -> (Environment, Arc<AtomicU64>) {
    counting_env_with(test_config(tag), command).await
}

/// [`counting_env`] with `config`.
pub async fn counting_env_with(config: earnorm::Config, command: &'static str) -> (Environment, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&count);
    let env = Environment::connect_with(config, move |options| {
        options.command_event_handler = Some(earnorm::mongodb::event::EventHandler::callback(
            move |event: earnorm::mongodb::event::command::CommandEvent| {
                if let earnorm::mongodb::event::command::CommandEvent::Started(started) = event {
                    if started.command_name == command {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            },
        ));
    })
    .await
    .unwrap_or_else(|err| panic!("{err}: {}", crate::HOW_TO_START));
    (env, count)
}
