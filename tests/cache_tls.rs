//! `rediss://`: the cache talks TLS to a redis-server with a self-signed
//! certificate (accepted through the URL's `#insecure` fragment).

use std::process::Command;
use std::time::Duration;

use earnorm_cache::{CacheConfig, CacheManager, ConnectionStatus, PlainOutput};
use support::{free_port, unique_name, RedisServer};

#[tokio::test]
async fn rediss_urls_connect_over_tls() {
    let dir = std::env::temp_dir().join(unique_name("tls"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (cert, key) = (dir.join("redis.crt"), dir.join("redis.key"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (Debian: apt-get install openssl)");
    assert!(
        made.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&made.stderr)
    );

    let tls_port = free_port().to_string();
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let _redis = RedisServer::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &cert,
        "--tls-auth-clients",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{tls_port}/0#insecure");
    let config = CacheConfig {
        prefix: format!("{}:", unique_name("tls")),
        ..Default::default()
    };
    let cache = CacheManager::connect(Some(&url), config)
        .await
        .expect("a rediss:// URL is accepted");
    assert!(
        cache
            .wait_for_status(ConnectionStatus::Connected, Duration::from_secs(5))
            .await,
        "connected over TLS"
    );
    let key = cache.key("tls", "value").build().expect("key");
    assert_eq!(
        cache
            .get_or_compute::<_, PlainOutput, _>(&key, None, async { 1u8 })
            .await,
        1
    );
    assert_eq!(
        cache
            .get_or_compute::<_, PlainOutput, _>(&key, None, async { 2u8 })
            .await,
        1,
        "a hit over TLS"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
