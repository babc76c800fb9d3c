//! Credentials never reach logs, `Debug` output or errors. In its own test
//! binary: `tracing` caches per-callsite interest process-wide, so a capture
//! must not share a process with tests that log without a subscriber.

use std::time::Duration;

use earnorm_cache::{CacheConfig, CacheManager, ConnectionStatus, PlainOutput};
use support::{fast_cache_config, unique_name, CapturedLogs, RedisServer};

fn config() -> CacheConfig {
    fast_cache_config(&unique_name("redact"))
}

async fn call(cache: &CacheManager) -> u64 {
    let key = cache.key("redact", "value").build().expect("key");
    cache
        .get_or_compute::<_, PlainOutput, _>(&key, None, async { 1u64 })
        .await
}

#[tokio::test]
async fn the_password_never_appears_in_logs_debug_or_errors() {
    const SECRET: &str = "hunter2-s3cret";
    let captured = CapturedLogs::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut redis = RedisServer::start_with(&["--requirepass", SECRET]);
    let url = format!("redis://:{SECRET}@127.0.0.1:{}/0", redis.port());
    let cache = CacheManager::connect(Some(&url), config()).await.expect("connect");
    assert_eq!(cache.status(), ConnectionStatus::Connected, "the password is used");
    call(&cache).await;
    redis.kill();
    call(&cache).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    redis.restart();
    let wrong = format!("redis://:{SECRET}@127.0.0.1:1/0");
    let down = CacheManager::connect(Some(&wrong), config()).await.expect("connect");
    let bad = CacheManager::connect(Some(&format!("redis://:{SECRET}@[nonsense")), CacheConfig::default()).await;
    // Percent-encoded option names, and URLs that do not parse at all.
    let encoded = CacheManager::connect(
        Some(&format!("redis+unix:///nonexistent-earnorm.sock?pa%73s={SECRET}")),
        config(),
    )
    .await;
    let unparsable = [
        CacheManager::connect(Some(&format!("redis:/:{SECRET}@h")), config()).await,
        CacheManager::connect(Some(&format!("redis://:{SECRET}")), config()).await,
    ];

    let mut seen = captured.text();
    seen.push_str(&format!("{cache:?} {down:?} {:?} {}", cache.config(), cache.url()));
    for result in [bad, encoded].into_iter().chain(unparsable) {
        match result {
            Ok(m) => seen.push_str(&format!("{m:?} {}", m.url())),
            Err(e) => {
                seen.push_str(&format!("{e} {e:?}"));
                let mut source = std::error::Error::source(&e);
                while let Some(cause) = source {
                    seen.push_str(&format!(" {cause} {cause:?}"));
                    source = cause.source();
                }
            }
        }
    }
    assert!(seen.contains("Redis connection lost"), "the capture works: {seen}");
    assert!(seen.contains("***"), "the URL is shown redacted");
    assert!(!seen.contains(SECRET), "the password leaked: {seen}");
}
