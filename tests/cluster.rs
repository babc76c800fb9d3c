//! The cache on a Redis Cluster of its own (three masters on free ports):
//! a value whose generations live on other masters is served and
//! invalidated; administration reaches every master; a slot moved to
//! another master is followed (`ASK` during the move, `MOVED` after); a
//! master that dies or freezes makes the calls on its slots compute while
//! the other masters serve, a write it misses is held for it, and its
//! return (empty) drops every generation of every master before anything
//! is served, as does a failover (a promoted replica may lack the last
//! invalidations its master took). The rest of the suite runs on a cluster
//! too when `REDIS_URL` names one (`scripts/test.sh` does both).

use std::time::{Duration, Instant};

use earnorm_cache::{CacheConfig, CacheKey, CacheManager, ConnectionStatus, PlainOutput, Scope};
use support::{fast_cache_config, unique_name, RedisCluster};

fn config() -> CacheConfig {
    fast_cache_config(&unique_name("cluster"))
}

fn record_key(cache: &CacheManager, id: &str) -> CacheKey {
    cache
        .key("users", "profile")
        .scope(Scope::Record("users", id))
        .build()
        .expect("key")
}

async fn get_or(cache: &CacheManager, key: &CacheKey, v: u64) -> u64 {
    cache
        .get_or_compute::<_, PlainOutput, _>(key, None, async move { v })
        .await
}

/// The index of the node that holds `key`, if one does.
fn holder(cluster: &mut RedisCluster, key: &str) -> Option<usize> {
    (0..3).find(|&i| cluster.node(i).cli(&["EXISTS", key]) == "1")
}

/// Waits until `cache` serves a hit for a fresh key.
async fn until_serving(cache: &CacheManager, limit: Duration) {
    let start = Instant::now();
    loop {
        let key = record_key(cache, &unique_name("probe"));
        get_or(cache, &key, 1).await;
        if get_or(cache, &key, 2).await == 1 {
            return;
        }
        assert!(start.elapsed() < limit, "no hit within {limit:?}: {:?}", cache.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads every key while a master is down: each gives its cached value
/// (1) or computes it, never anything else.
async fn read_while_down(cache: &CacheManager, keys: &[CacheKey]) {
    for (n, key) in keys.iter().enumerate() {
        let computed = 100 + n as u64;
        let got = get_or(cache, key, computed).await;
        assert!(
            got == 1 || got == computed,
            "a cached or computed value, never another: {got}"
        );
    }
}

/// A cluster, a manager on it (serving), its prefix, and `count` record
/// keys each holding 1.
async fn filled(count: usize) -> (RedisCluster, CacheManager, String, Vec<CacheKey>) {
    filled_on(RedisCluster::start(), count).await
}

/// [`filled`] on `cluster`.
async fn filled_on(cluster: RedisCluster, count: usize) -> (RedisCluster, CacheManager, String, Vec<CacheKey>) {
    filled_with(cluster, config(), count).await
}

/// [`filled_on`] with `config`.
async fn filled_with(
    cluster: RedisCluster,
    config: CacheConfig,
    count: usize,
) -> (RedisCluster, CacheManager, String, Vec<CacheKey>) {
    let prefix = config.prefix.clone();
    let cache = CacheManager::connect(Some(&cluster.url()), config)
        .await
        .expect("connect");
    until_serving(&cache, Duration::from_secs(10)).await;
    let keys: Vec<CacheKey> = (0..count).map(|n| record_key(&cache, &n.to_string())).collect();
    for key in &keys {
        get_or(&cache, key, 1).await;
    }
    (cluster, cache, prefix, keys)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_whose_generations_are_on_other_masters_is_served_then_invalidated() {
    let mut cluster = RedisCluster::start();
    let cache = CacheManager::connect(Some(&cluster.url()), config())
        .await
        .expect("connect");
    until_serving(&cache, Duration::from_secs(10)).await;
    // A record whose value and generations are not all on one master.
    let mut spread = None;
    for n in 0..100 {
        let key = record_key(&cache, &format!("spread{n}"));
        assert_eq!(get_or(&cache, &key, 1).await, 1);
        let mut places: Vec<usize> = std::iter::once(key.as_str())
            .chain(key.generations().iter().map(String::as_str))
            .filter_map(|k| holder(&mut cluster, k))
            .collect();
        assert_eq!(
            places.len(),
            1 + key.generations().len(),
            "every key of the value is stored"
        );
        places.sort_unstable();
        places.dedup();
        if places.len() > 1 {
            spread = Some(key);
            break;
        }
    }
    let spread = spread.expect("some value's keys span masters");
    assert_eq!(get_or(&cache, &spread, 2).await, 1, "a hit across masters");
    let hits = cache.stats().hits;
    cache.invalidate(&[Scope::Record("users", record_id(&spread))]).await;
    assert_eq!(
        get_or(&cache, &spread, 3).await,
        3,
        "the invalidation reached the generation's master"
    );
    assert_eq!(get_or(&cache, &spread, 4).await, 3, "and the new value is served");
    assert!(cache.stats().hits > hits);
}

/// The id of a key made by [`record_key`].
fn record_id(key: &CacheKey) -> &str {
    key.generations()
        .iter()
        .find_map(|g| g.rsplit_once("g:r:users:").map(|(_, id)| id))
        .expect("a record generation")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_deletion_and_invalidate_all_reach_every_master() {
    let (mut cluster, cache, prefix, keys) = filled(60).await;
    let count = |cluster: &mut RedisCluster, pattern: &str| -> Vec<usize> {
        (0..3)
            .map(|i| {
                cluster
                    .node(i)
                    .cli(&["--scan", "--pattern", pattern])
                    .lines()
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .collect()
    };
    let values = count(&mut cluster, &format!("{prefix}v:*"));
    assert!(values.iter().all(|&n| n > 0), "values on every master: {values:?}");
    let deleted = cache.delete_pattern("v:*").await.expect("delete");
    assert_eq!(deleted, 60 + 1, "60 values and the probe's, from every master");
    assert_eq!(count(&mut cluster, &format!("{prefix}v:*")), [0, 0, 0]);

    let generations = count(&mut cluster, &format!("{prefix}g:*"));
    assert!(
        generations.iter().all(|&n| n > 0),
        "generations on every master: {generations:?}"
    );
    cache.invalidate_all().await.expect("invalidate all");
    assert_eq!(count(&mut cluster, &format!("{prefix}g:*")), [0, 0, 0]);
    assert_eq!(get_or(&cache, &keys[0], 2).await, 2, "nothing is served after it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_makes_calls_compute_and_its_return_drops_every_generation() {
    let (mut cluster, cache, prefix, keys) = filled(30).await;
    // The generations the survivors hold, with their tokens.
    let mut kept = Vec::new();
    for key in &keys {
        for generation in key.generations() {
            if let Some(node) = holder(&mut cluster, generation).filter(|&n| n != 2) {
                let token = cluster.node(node).cli(&["GET", generation]);
                kept.push((node, generation.clone(), token));
            }
        }
    }
    assert!(!kept.is_empty(), "{prefix}: generations on the surviving masters");

    cluster.node(2).kill();
    let start = Instant::now();
    read_while_down(&cache, &keys).await;
    // Each call waits `operation_timeout` (300 ms) at most, and once the
    // connection is dropped, calls skip Redis at once.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "bounded: {:?}",
        start.elapsed()
    );

    // Back, empty: as a master restarted from an old snapshot could be.
    cluster.node(2).restart();
    cluster.wait_until_whole(Duration::from_secs(30));
    until_serving(&cache, Duration::from_secs(30)).await;
    for (node, generation, token) in &kept {
        let now = cluster.node(*node).cli(&["GET", generation]);
        assert_ne!(
            &now, token,
            "{generation} on master {node} outlived the restart of another"
        );
    }
    for key in &keys {
        assert_eq!(get_or(&cache, key, 7).await, 7, "every value computed again");
    }
}

/// A master that holds some values' keys but not the heartbeats (whose
/// master down stops every hit: presence cannot be read), and for each key
/// whether all of its value's keys are on the other masters.
fn victim(cluster: &mut RedisCluster, prefix: &str, keys: &[CacheKey]) -> (usize, Vec<bool>) {
    let meta = holder(cluster, &format!("{prefix}meta:{{{prefix}}}members")).expect("the heartbeats are stored");
    // Values' keys by holder (every record value shares its model's
    // query generation: the victim must not hold that one either).
    let places: Vec<Vec<Option<usize>>> = keys
        .iter()
        .map(|key| {
            std::iter::once(key.as_str())
                .chain(key.generations().iter().map(String::as_str))
                .map(|k| holder(cluster, k))
                .collect()
        })
        .collect();
    (0..3)
        .filter(|&n| n != meta)
        .find_map(|victim| {
            let away: Vec<bool> = places
                .iter()
                .map(|held| held.iter().all(|at| at.is_some_and(|n| n != victim)))
                .collect();
            (away.contains(&true) && away.contains(&false)).then_some((victim, away))
        })
        .unwrap_or_else(|| panic!("no master holds some values' keys but not all: {places:?}"))
}

/// Reads every key `rounds` times while master `victim` is down: values
/// away from it are hits, the others computed (never their cached value,
/// which the master down could have made stale).
async fn read_around(cache: &CacheManager, keys: &[CacheKey], away: &[bool], rounds: usize) {
    for _ in 0..rounds {
        for (n, key) in keys.iter().enumerate() {
            let computed = 100 + n as u64;
            let got = get_or(cache, key, computed).await;
            if away[n] {
                assert_eq!(got, 1, "key {n}: a value on the masters that answer is served");
            } else {
                assert_eq!(got, computed, "key {n}: a value on the master down is computed");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_leaves_the_other_masters_serving_hits() {
    let (mut cluster, cache, prefix, keys) = filled(30).await;
    cluster.serve_partial();
    let (victim, away) = victim(&mut cluster, &prefix, &keys);
    let hits = cache.stats().hits;
    cluster.node(victim).kill();
    let start = Instant::now();
    read_around(&cache, &keys, &away, 3).await;
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "bounded: {:?}",
        start.elapsed()
    );
    let served = away.iter().filter(|&&a| a).count() as u64;
    assert!(cache.stats().hits >= hits + 3 * served, "{:?}", cache.stats());

    // Back, empty: every generation goes before anything is served again.
    cluster.node(victim).restart();
    cluster.wait_until_whole(Duration::from_secs(30));
    until_serving(&cache, Duration::from_secs(30)).await;
    for key in &keys {
        assert_eq!(get_or(&cache, key, 7).await, 7, "every value computed again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_master_is_marked_down_and_a_write_it_misses_is_held_until_it_thaws() {
    let (mut cluster, cache, prefix, keys) = filled(30).await;
    cluster.serve_partial();
    let (victim, away) = victim(&mut cluster, &prefix, &keys);
    let written = keys
        .iter()
        .position(|key| {
            key.generations()
                .iter()
                .any(|g| g.contains("g:r:users:") && holder(&mut cluster, g) == Some(victim))
        })
        .expect("a record generation on the victim");
    let served = keys
        .iter()
        .zip(&away)
        .find(|(_, &a)| a)
        .map(|(key, _)| key)
        .expect("a value away from the victim");
    // Another manager of the prefix, which reads only values away from
    // the victim.
    let other = CacheManager::connect(Some(&cluster.url()), fast_cache_config(prefix.trim_end_matches(':')))
        .await
        .expect("connect");
    until_serving(&other, Duration::from_secs(10)).await;

    cluster.node(victim).freeze();
    // The first call on the frozen master waits `operation_timeout`; the
    // check that follows marks it down, and the others serve again.
    let start = Instant::now();
    loop {
        let before = cache.stats().hits;
        for (n, key) in keys.iter().enumerate() {
            let got = get_or(&cache, key, 100 + n as u64).await;
            assert!(got == 1 || got == 100 + n as u64, "cached or computed: {got}");
        }
        if cache.stats().hits > before && get_or(&cache, served, 5).await == 1 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the other masters serve again: {:?}",
            cache.stats()
        );
    }
    read_around(&cache, &keys, &away, 2).await;
    assert_eq!(get_or(&other, served, 5).await, 1, "the other manager serves too");

    // A write whose invalidation cannot reach the frozen master: the other
    // masters take their part, the victim's waits, and this manager goes
    // on serving what is away from the victim.
    cache
        .invalidate(&[Scope::Record("users", record_id(&keys[written]))])
        .await;
    assert_eq!(cache.stats().invalidations_deferred, 1);
    read_around(&cache, &keys, &away, 1).await;
    // It holds an invalidation: for the other manager it is missing, and
    // that one serves no hits until it is sent.
    let start = Instant::now();
    while get_or(&other, served, 5).await == 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the other manager stops serving: {:?}",
            other.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(other.stats().status, ConnectionStatus::Recovering);

    cluster.node(victim).thaw();
    until_serving(&cache, Duration::from_secs(30)).await;
    until_serving(&other, Duration::from_secs(30)).await;
    // The same server: its generations stand, and its values are served,
    // but for the one written meanwhile (and the other manager's, which
    // computed and stored 5 while it served no hits).
    for (n, key) in keys.iter().enumerate() {
        let got = get_or(&cache, key, 9).await;
        match n {
            _ if n == written => assert_eq!(got, 9, "the value written meanwhile is computed"),
            _ if key == served => assert!(got == 5 || got == 1, "key {n} after the thaw: {got}"),
            _ => assert_eq!(got, 1, "key {n} after the thaw"),
        }
    }
}

/// With the in-process tier beside a cluster: while a master is frozen and
/// marked down, the tier serves nothing (that master's invalidations cannot
/// reach it), and the values away from it are served from Redis. Here the
/// tier is reset first, its channel from the frozen master being lost; the
/// rule that a master marked down stops the tier's hits and the lookups by
/// known tokens stands behind that (removing it alone, this still passes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_marked_down_stops_the_in_process_tier() {
    let mut config = config();
    config.local.with_redis = true;
    let (mut cluster, cache, prefix, keys) = filled_with(RedisCluster::start(), config, 30).await;
    cluster.serve_partial();
    let (victim, away) = victim(&mut cluster, &prefix, &keys);
    // Kept in process, and served from there.
    let start = Instant::now();
    loop {
        let before = cache.stats().local_hits;
        for key in &keys {
            assert_eq!(get_or(&cache, key, 7).await, 1);
        }
        if cache.stats().local_hits >= before + keys.len() as u64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the tier serves: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    cluster.node(victim).freeze();
    // Values kept in process touch no master: new keys do, until one whose
    // generation is on the frozen master times out, and the check after it
    // marks that master down.
    let fallbacks = cache.stats().fallbacks;
    let start = Instant::now();
    while cache.stats().fallbacks == fallbacks {
        get_or(&cache, &record_key(&cache, &unique_name("probe")), 1).await;
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "a call reaches the frozen master: {:?}",
            cache.stats()
        );
    }
    let start = Instant::now();
    loop {
        read_while_down(&cache, &keys).await;
        let before = cache.stats();
        let served = keys.iter().zip(&away).find(|(_, &a)| a).map(|(key, _)| key);
        let served = served.expect("a value away from the victim");
        if get_or(&cache, served, 5).await == 1 && cache.stats().local_hits == before.local_hits {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the tier stops serving: {:?}",
            cache.stats()
        );
    }
    let local_hits = cache.stats().local_hits;
    read_around(&cache, &keys, &away, 2).await;
    assert_eq!(
        cache.stats().local_hits,
        local_hits,
        "nothing served in process while a master is down"
    );
    cluster.node(victim).thaw();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_master_is_followed_during_and_after_the_move() {
    let (mut cluster, cache, _, keys) = filled(10).await;
    let key = &keys[0];
    let value_key = key.as_str();
    let source = holder(&mut cluster, value_key).expect("the value is stored");
    let target = (source + 1) % 3;
    let slot = cluster.node(source).cli(&["CLUSTER", "KEYSLOT", value_key]);
    let source_id = cluster.node(source).cli(&["CLUSTER", "MYID"]);
    let target_id = cluster.node(target).cli(&["CLUSTER", "MYID"]);
    let target_port = cluster.node(target).port().to_string();
    let ok = |answer: String| assert_eq!(answer, "OK");
    ok(cluster
        .node(target)
        .cli(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id]));
    ok(cluster
        .node(source)
        .cli(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id]));
    // Mid-move: the slot's keys are on the target, and the source answers
    // ASK for them.
    let moving = cluster.node(source).cli(&["CLUSTER", "GETKEYSINSLOT", &slot, "1000"]);
    let mut migrate = vec!["MIGRATE", "127.0.0.1", &target_port, "", "0", "5000", "KEYS"];
    migrate.extend(moving.lines().filter(|l| !l.is_empty()));
    ok(cluster.node(source).cli(&migrate));
    let hits = cache.stats().hits;
    assert_eq!(get_or(&cache, key, 2).await, 1, "served through ASK");
    assert_eq!(cache.stats().hits, hits + 1);

    // Moved: every master names the target, and the source answers MOVED.
    for n in 0..3 {
        ok(cluster.node(n).cli(&["CLUSTER", "SETSLOT", &slot, "NODE", &target_id]));
    }
    assert_eq!(get_or(&cache, key, 3).await, 1, "served after MOVED");
    assert_eq!(cache.stats().hits, hits + 2);
    assert_eq!(holder(&mut cluster, value_key), Some(target));
    assert_eq!(cache.stats().reconnects, 1, "a slot moved is no failover");

    // Writes and stores follow the slot too.
    cache.invalidate(&[Scope::Record("users", record_id(key))]).await;
    assert_eq!(get_or(&cache, key, 4).await, 4, "invalidated");
    assert_eq!(get_or(&cache, key, 5).await, 4, "stored on the new master");
    assert_eq!(holder(&mut cluster, value_key), Some(target));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_drops_every_generation_before_anything_is_served() {
    let (mut cluster, cache, _, keys) = filled_on(RedisCluster::start_with_replicas(1), 30).await;
    let kept = tokens(&cluster, &keys);
    fail_over(&mut cluster);
    // The manager learns it after a heartbeat, reconnects, and deletes
    // every generation before it serves again.
    let deadline = Instant::now() + Duration::from_secs(30);
    while kept.iter().any(|(generation, token)| &cluster.get(generation) == token) {
        assert!(
            Instant::now() < deadline,
            "generations outlived the failover: {:?}",
            cache.stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_serving(&cache, Duration::from_secs(30)).await;
    for key in &keys {
        assert_eq!(get_or(&cache, key, 9).await, 9, "every value computed again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_read_redirected_after_a_failover_drops_every_generation_before_any_heartbeat() {
    // No heartbeat (and so no check of the masters) within the test.
    let config = CacheConfig {
        heartbeat_interval: Duration::from_secs(60),
        ..config()
    };
    let (mut cluster, cache, _, keys) = filled_with(RedisCluster::start_with_replicas(1), config, 30).await;
    let kept = tokens(&cluster, &keys);
    let hits = cache.stats().hits;
    fail_over(&mut cluster);
    // A read of a slot that moved is redirected: the connection is spent,
    // the read computes, and the next connection deletes every generation.
    let deadline = Instant::now() + Duration::from_secs(20);
    while kept.iter().any(|(generation, token)| &cluster.get(generation) == token) {
        assert!(
            Instant::now() < deadline,
            "generations outlived the failover: {:?}",
            cache.stats()
        );
        for key in &keys {
            let got = get_or(&cache, key, 2).await;
            assert!(got == 1 || got == 2, "{got}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(cache.stats().hits >= hits, "{:?}", cache.stats());
}

/// The token of every generation of `keys`, as the cluster holds it now.
fn tokens(cluster: &RedisCluster, keys: &[CacheKey]) -> Vec<(String, String)> {
    let kept: Vec<(String, String)> = keys
        .iter()
        .flat_map(|key| key.generations().iter().cloned())
        .map(|generation| {
            let token = cluster.get(&generation);
            (generation, token)
        })
        .collect();
    assert!(kept.iter().all(|(_, token)| !token.is_empty()), "{kept:?}");
    kept
}

/// A replica takes over its master's slots (the old master follows it).
fn fail_over(cluster: &mut RedisCluster) {
    let replica = cluster.replicas()[0];
    cluster.fail_over_to(replica);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_and_replaced_by_its_replica_serves_again_with_every_generation_dropped() {
    let (mut cluster, cache, _, keys) = filled_on(RedisCluster::start_with_replicas(1), 30).await;
    let master = (0..cluster.len())
        .find(|i| !cluster.replicas().contains(i))
        .expect("a master");
    let reconnects = cache.stats().reconnects;
    cluster.node(master).kill();
    let start = Instant::now();
    read_while_down(&cache, &keys).await;
    // The replica takes over after the node timeout (2 s); meanwhile the
    // other masters serve. The new master makes a new connection.
    while cache.stats().reconnects == reconnects {
        assert!(start.elapsed() < Duration::from_secs(30), "the takeover is noticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    until_serving(&cache, Duration::from_secs(30)).await;
    println!("serving again {:?} after the kill", start.elapsed());
    for key in &keys {
        assert_eq!(get_or(&cache, key, 7).await, 7, "every value computed again");
    }
}

#[tokio::test]
async fn a_prefix_with_a_hash_tag_is_refused_on_a_cluster() {
    for prefix in ["app{x}", "app}"] {
        let config = CacheConfig {
            prefix: prefix.into(),
            ..CacheConfig::default()
        };
        let refused = CacheManager::connect(Some("redis+cluster://127.0.0.1:1"), config).await;
        assert!(
            matches!(
                refused,
                Err(earnorm_cache::CacheError::InvalidConfig { field: "prefix", .. })
            ),
            "{prefix}: {refused:?}"
        );
    }
}
