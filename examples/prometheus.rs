//! EarnORM's metrics served to Prometheus: installs the
//! `metrics-exporter-prometheus` recorder, serves its text format at
//! `http://ADDR/metrics`, and runs a small workload (saves, record-cache
//! reads, a cached query, a bulk update) every second so that the counters
//! move.
//!
//! ```sh
//! scripts/services.sh up
//! cargo run --example prometheus -- 127.0.0.1:9000
//! curl -s http://127.0.0.1:9000/metrics | grep earnorm_
//! curl -s http://127.0.0.1:9000/metrics | grep earnorm_cache_monitor_
//! ```
//!
//! The `metrics` facade is what EarnORM reports through; any exporter works.
//! Install the recorder before connecting (the per-model counters are
//! registered on first use). `tests/metrics.rs` runs this file's functions
//! and scrapes them over HTTP.

use std::time::Duration;

use earnorm::bson::{doc, oid::ObjectId};
use earnorm::cache_layer::MonitorConfig;
use earnorm::prelude::*;
use earnorm::Environment;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "users", cache(ttl = 300))]
pub struct User {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
    #[serde(default)]
    pub logins: i64,
}

/// The consistency monitor as this example runs it: every write checked
/// (in production, sample one in a hundred or so). Its nines are served as
/// `earnorm_cache_monitor_nines{window="1m"|"5m"|"10m"}`.
pub fn monitor() -> MonitorConfig {
    MonitorConfig {
        enabled: true,
        sample_one_in: 1,
        ..MonitorConfig::default()
    }
}

/// Installs the Prometheus recorder as the process's `metrics` recorder.
///
/// # Panics
/// When another recorder is installed already.
pub fn install_recorder() -> PrometheusHandle {
    PrometheusBuilder::new()
        .install_recorder()
        .expect("no other metrics recorder is installed")
}

/// Answers every HTTP request on `listener` with the metrics (a minimal
/// HTTP/1.1 responder: enough for Prometheus and curl).
pub async fn serve(listener: TcpListener, handle: PrometheusHandle) {
    while let Ok((mut socket, _)) = listener.accept().await {
        let handle = handle.clone();
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let body = handle.render();
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

/// One round of the workload: a save, two reads of it (a miss, then a
/// record-cache hit), a cached count read twice, and a bulk update.
///
/// # Errors
/// From MongoDB.
pub async fn workload(env: &Environment) -> earnorm::Result<()> {
    let mut user = User {
        id: None,
        name: "Ada".into(),
        logins: 0,
    };
    user.save().in_env(env).await?;
    let id = user.id.unwrap_or_default();
    for _ in 0..2 {
        User::find_by_id(id).in_env(env).await?;
        User::count(doc! {}).in_env(env).cached(Duration::from_secs(60)).await?;
    }
    User::update_many(doc! { "_id": id }, doc! { "$inc": { "logins": 1 } })
        .in_env(env)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> earnorm::Result<()> {
    let handle = install_recorder();
    let env = earnorm::init(Config {
        mongo_uri: std::env::var("MONGODB_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".into()),
        database: "earnorm_metrics_demo".into(),
        redis_uri: Some(std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())),
        cache_config: CacheConfig {
            prefix: "earnorm-metrics-demo:".into(),
            monitor: monitor(),
            ..Default::default()
        },
        ..Default::default()
    })
    .await?;
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:9000".into());
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|e| earnorm::Error::Config(format!("cannot listen on {addr}: {e}")))?;
    println!("serving metrics on http://{addr}/metrics (Ctrl-C to stop)");
    tokio::spawn(serve(listener, handle));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = tokio::time::sleep(Duration::from_secs(1)) => workload(&env).await?,
        }
    }
    earnorm::shutdown().await;
    Ok(())
}
