//! One `tracing` span per ORM operation (`earnorm.op`) and per cached call
//! (`earnorm.cache`, with how it was served), without credentials.

use std::io::Write;
use std::sync::{Arc, Mutex};

use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};
use tracing_subscriber::fmt::format::FmtSpan;

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "traced", cache(ttl = 60))]
struct Traced {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    id: Option<ObjectId>,
    n: i64,
}

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// One thread: the subscriber below is this thread's default, and the
// tasks the ORM spawns run on it too.
#[tokio::test]
async fn orm_operations_and_cached_calls_have_spans_without_secrets() {
    let mut config = support::test_config("traces");
    let password_url = config
        .redis_uri
        .clone()
        .expect("redis")
        .replacen("redis://", "redis://user:s3cret-pw@", 1);
    let env = earnorm::Environment::connect(config.clone()).await.expect("connect");
    config.redis_uri = Some(password_url);
    let with_password = earnorm::Environment::connect(config).await.expect("connect");

    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let mut record = Traced { id: None, n: 1 };
    record.save().in_env(&env).await.expect("save");
    let id = record.id.expect("id");
    Traced::find_by_id(id).in_env(&env).await.expect("miss");
    Traced::find_by_id(id).in_env(&env).await.expect("hit");
    let _ = Traced::find_by_id(id).in_env(&with_password).await;
    drop(guard);

    let output = String::from_utf8(buffer.0.lock().expect("buffer").clone()).expect("text");
    let closes: Vec<&str> = output.lines().filter(|line| line.contains("close")).collect();
    let has = |parts: &[&str]| closes.iter().any(|line| parts.iter().all(|p| line.contains(p)));
    assert!(has(&["earnorm.op", "op=\"save\"", "model=\"traced\""]), "{output}");
    assert!(has(&["earnorm.op", "op=\"find_by_id\""]), "{output}");
    assert!(
        has(&["earnorm.cache", "method=\"record\"", "outcome=\"miss\""]),
        "{output}"
    );
    assert!(
        has(&["earnorm.cache", "method=\"record\"", "outcome=\"hit\""]),
        "{output}"
    );
    assert!(
        closes.iter().any(|line| line.contains("time.busy")),
        "durations: {output}"
    );
    assert!(!output.contains("s3cret-pw"), "a password reached a trace: {output}");
    let _ = env.database().drop().await;
}
