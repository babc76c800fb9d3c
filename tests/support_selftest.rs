//! The test harness itself: the private redis-server helper can be killed,
//! restarted on the same port, frozen and thawed; missing services are named.

use std::time::{Duration, Instant};

use support::{check_mongo, check_redis, RedisServer};

#[test]
fn redis_server_kill_restart_freeze_thaw() {
    let mut server = RedisServer::start();
    let port = server.port();
    assert!(server.answers());
    assert_eq!(server.cli(&["SET", "k", "v"]), "OK");
    assert_eq!(server.cli(&["GET", "k"]), "v");

    server.kill();
    assert!(!server.answers(), "a killed server does not answer");

    server.restart();
    assert_eq!(server.port(), port, "restarted on the same port");
    assert!(server.answers());
    assert_eq!(server.cli(&["GET", "k"]), "", "nothing persisted across the restart");

    server.freeze();
    let start = Instant::now();
    assert!(
        !server.answers(),
        "a frozen server accepts connections but never answers"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    server.thaw();
    assert!(server.answers(), "thawed");
}

#[test]
fn dropping_the_helper_stops_the_server() {
    let server = RedisServer::start();
    let url = server.url();
    drop(server);
    assert!(check_redis(&url).is_err());
}

#[test]
fn missing_services_are_named_with_instructions() {
    // Port 1 is privileged and unused: nothing can be listening there, and no
    // parallel test can take it.
    let port = 1;
    let mongo = check_mongo(&format!("mongodb://127.0.0.1:{port}")).expect_err("nothing listens");
    assert!(
        mongo.contains("MongoDB is not reachable") && mongo.contains("scripts/services.sh up"),
        "{mongo}"
    );
    let redis = check_redis(&format!("redis://127.0.0.1:{port}/0")).expect_err("nothing listens");
    assert!(redis.contains("Redis is not reachable"), "{redis}");
}
