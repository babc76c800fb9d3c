//! Side-by-side benchmarks of the cache, each comparison measured in one run
//! on one Redis, printed as medians and ratios. Run all with
//! `scripts/bench.sh` (or `cargo bench -p earnorm-bench` with the services up).
//!
//! Each figure is the median over rounds of the mean time per operation in
//! that round; the contenders of a comparison alternate round by round, so
//! drift on a shared machine hits them alike.

use std::future::Future;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cached::stores::AsyncRedisCache;
use cached::ConcurrentCachedAsync;
use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use earnorm::{Environment, ModelId};
use earnorm_cache::{CacheManager, PlainOutput, Scope};
use serde::{Deserialize, Serialize};
use support::{connect, fast_cache_config, test_config, RedisServer};

/// The cached value: about 250 bytes in MessagePack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub id: u64,
    pub name: String,
    pub email: String,
    pub bio: String,
    pub tags: Vec<String>,
    pub score: f64,
    pub active: bool,
}

fn profile(id: u64) -> Profile {
    Profile {
        id,
        name: "Ada Lovelace".into(),
        email: "ada.lovelace@example.com".into(),
        bio: "Mathematician and writer, chiefly known for her work on the Analytical Engine; first to publish an algorithm for it.".into(),
        tags: vec!["math".into(), "computing".into(), "poetry".into()],
        score: 98.5,
        active: true,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "bench_users")]
pub struct User {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub n: i64,
}

impl User {
    /// Record scope: a hit costs key building (record + arguments) and one MGET.
    #[cached(ttl = 600)]
    pub async fn profile(&self) -> earnorm::Result<Profile> {
        Ok(profile(u64::try_from(self.n).unwrap_or(0)))
    }

    /// One distinct key per `i`: how the in-process tier's bound is measured.
    #[cached(ttl = 600)]
    pub async fn square(&self, i: u64) -> u64 {
        i.wrapping_mul(i)
    }

    /// Model scope, wrapping a database read.
    #[cached(ttl = 600)]
    pub async fn by_id_cached(id: ObjectId) -> earnorm::Result<Option<User>> {
        User::find_by_id(id).await
    }
}

/// The same collection, with a record cache.
#[derive(Debug, Clone, Serialize, Deserialize, Model)]
#[earnorm(collection = "bench_users", cache(ttl = 600))]
pub struct CachedUser {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub n: i64,
}

/// The per-round mean times of each contender of one comparison.
struct Samples<const N: usize>([Vec<Duration>; N]);

impl<const N: usize> Samples<N> {
    /// Median of contender `i`'s per-round means.
    fn median(&self, i: usize) -> Duration {
        let mut s = self.0[i].clone();
        s.sort_unstable();
        s[s.len() / 2]
    }

    /// Median over rounds of `a`'s time divided by `b`'s in the same round:
    /// drift between rounds cancels out.
    fn ratio(&self, a: usize, b: usize) -> String {
        let mut r: Vec<f64> = self.0[a]
            .iter()
            .zip(&self.0[b])
            .map(|(x, y)| x.as_secs_f64() / y.as_secs_f64())
            .collect();
        r.sort_by(f64::total_cmp);
        format!("{:.3}x", r[r.len() / 2])
    }
}

/// Runs `rounds` rounds of `per_round` calls of each contender, rotating the
/// order of the contenders from round to round, after a warm-up.
async fn compare<const N: usize>(
    rounds: usize,
    per_round: usize,
    mut contenders: [&mut dyn Contender; N],
) -> Samples<N> {
    let mut samples: [Vec<Duration>; N] = std::array::from_fn(|_| Vec::with_capacity(rounds));
    for c in &mut contenders {
        for _ in 0..per_round {
            c.call().await;
        }
    }
    for round in 0..rounds {
        for k in 0..N {
            let i = (round + k) % N;
            let start = Instant::now();
            for _ in 0..per_round {
                contenders[i].call().await;
            }
            samples[i].push(start.elapsed() / u32::try_from(per_round).unwrap_or(1));
        }
    }
    Samples(samples)
}

/// Something to time, one call at a time.
trait Contender {
    fn call(&mut self) -> std::pin::Pin<Box<dyn Future<Output = ()> + '_>>;
}

struct Closure<F>(F);
impl<F, Fut> Contender for Closure<F>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + 'static,
{
    fn call(&mut self) -> std::pin::Pin<Box<dyn Future<Output = ()> + '_>> {
        Box::pin((self.0)())
    }
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

mod report;
use report::row;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (rounds, per_round) = if quick { (5, 200) } else { (41, 1000) };
    let redis = RedisServer::start();
    if std::env::args().any(|a| a == "--profile-local") {
        // For `perf record`: only the in-process `#[cached]` hit, for 10 s.
        let mut config = test_config("bench_profile_local");
        config.redis_uri = None;
        let env = connect(config).await;
        let mut user = User { id: None, n: 1 };
        user.save().in_env(&env).await.expect("save");
        let deadline = Instant::now() + Duration::from_secs(10);
        env.scope(async {
            while Instant::now() < deadline {
                for _ in 0..1000 {
                    std::hint::black_box(user.profile().await.expect("hit"));
                }
            }
        })
        .await;
        let _ = env.database().drop().await;
        return;
    }
    if std::env::args().any(|a| a == "--cluster") {
        // Redis Cluster against one server (group 10), printed, not written.
        println!("| benchmark | median | notes |\n|---|---|---|");
        cluster_group(&redis, rounds, per_round, quick).await;
        return;
    }
    if std::env::args().any(|a| a == "--monitor") {
        // The consistency monitor's cost (group 11), printed, not written.
        println!("| benchmark | median | notes |\n|---|---|---|");
        monitor_group(&redis, rounds, per_round).await;
        return;
    }
    if std::env::args().any(|a| a == "--local") {
        // The in-process tier's group alone (group 9), printed, not written.
        println!("| benchmark | median | notes |\n|---|---|---|");
        local_group(&redis, rounds, per_round, quick).await;
        return;
    }
    if std::env::args().any(|a| a == "--feed") {
        // The database feed's group alone (group 7), printed, not written.
        println!("| benchmark | median | notes |\n|---|---|---|");
        run_feed_groups(redis.url(), rounds, per_round, quick);
        return;
    }
    let mut config = test_config("bench");
    config.redis_uri = Some(redis.url());
    config.cache_config = earnorm::CacheConfig {
        operation_timeout: Duration::from_secs(2),
        ..fast_cache_config(&config.database)
    };
    let env = connect(config).await;
    let cache = env.cache().clone();
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut raw = client.get_multiplexed_async_connection().await.expect("connect");

    let value = profile(1);
    let payload = rmp_serde::to_vec_named(&value).expect("encode");
    println!("# EarnORM cache benchmarks\n");
    println!(
        "value: {} bytes of MessagePack; Redis {} on loopback; rounds {rounds} x {per_round}\n",
        payload.len(),
        redis_version(&redis)
    );
    println!("| benchmark | median | notes |\n|---|---|---|");

    // 1. Sequential hit: bare GET + decode vs CacheManager vs #[cached].
    redis::cmd("SET")
        .arg("bench:raw")
        .arg(&payload)
        .query_async::<()>(&mut raw)
        .await
        .expect("set");
    let key = cache
        .key("bench", "profile")
        .scope(Scope::Record("bench", "1"))
        .build()
        .expect("key");
    let _: Profile = cache
        .get_or_compute::<_, PlainOutput, _>(&key, None, async { profile(1) })
        .await;
    let mut user = User { id: None, n: 1 };
    user.save().in_env(&env).await.expect("save");
    env.scope(user.profile()).await.expect("warm");

    if std::env::args().any(|a| a == "--micro") {
        let n = 200_000u32;
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(
                env.scope(async {
                    earnorm::__private::record_method_key::<User, _>(
                        &user,
                        &earnorm::__private::Method {
                            name: "profile",
                            version: 0,
                            local: true,
                            identity: &[
                                std::any::type_name::<User>(),
                                std::any::type_name::<earnorm::Result<Profile>>(),
                            ],
                            deps: &[],
                        },
                        &(),
                    )
                })
                .await,
            );
        }
        println!("record_method_key: {:?}/op", start.elapsed() / n);
        let start = Instant::now();
        for _ in 0..n {
            std::hint::black_box(
                cache
                    .key("bench", "profile")
                    .scope(Scope::Record("bench", "1"))
                    .build()
                    .expect("key"),
            );
        }
        println!("key build: {:?}/op", start.elapsed() / n);
        let keys: Vec<String> = std::iter::once(key.as_str().to_owned())
            .chain(key.generations().iter().cloned())
            .collect();
        let mut c4 = raw.clone();
        let start = Instant::now();
        for _ in 0..20_000u32 {
            let v: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(&keys).query_async(&mut c4).await.expect("mget");
            std::hint::black_box(v);
        }
        println!("raw MGET {} keys: {:?}/op", keys.len(), start.elapsed() / 20_000);
        for n in 1..keys.len() {
            let start = Instant::now();
            for _ in 0..20_000u32 {
                let v: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                    .arg(&keys[..=n])
                    .query_async(&mut c4)
                    .await
                    .expect("mget");
                std::hint::black_box(v);
            }
            println!("raw MGET {} keys: {:?}/op", n + 1, start.elapsed() / 20_000);
        }
        let start = Instant::now();
        for _ in 0..20_000u32 {
            let v: Option<Vec<u8>> = redis::cmd("GET").arg(&keys[0]).query_async(&mut c4).await.expect("get");
            std::hint::black_box(v);
        }
        println!("raw GET: {:?}/op", start.elapsed() / 20_000);
        let start = Instant::now();
        for _ in 0..20_000u32 {
            let v: Option<Vec<u8>> = tokio::time::timeout(
                Duration::from_secs(1),
                redis::cmd("GET").arg(&keys[0]).query_async(&mut c4),
            )
            .await
            .expect("t")
            .expect("get");
            std::hint::black_box(v);
        }
        println!("raw GET with timeout: {:?}/op", start.elapsed() / 20_000);
        return;
    }

    if std::env::args().any(|a| a == "--batch") {
        // Group 8e alone, printed, not written.
        batch_group(&env, rounds, per_round).await;
        return;
    }
    if std::env::args().any(|a| a == "--micro-batch") {
        // What a cold batch's lookup costs Redis and the client alone: its
        // pipeline (the values' MGET and a SET NX GET per generation), a
        // script doing the creations, one MGET of as many keys, one GET.
        let names: Vec<String> = (0..101).map(|i| format!("mb:g:{i}")).collect();
        let values: Vec<String> = (0..100).map(|i| format!("mb:v:{i}")).collect();
        let script = redis::Script::new(
            "local out = {} for i, k in ipairs(KEYS) do out[i] = redis.call('SET', k, ARGV[1], 'NX', 'GET', 'PX', ARGV[2]) or false end return out",
        );
        for scripted in [false, true] {
            for (label, delete) in [("existing", false), ("absent", true)] {
                let mut total = Duration::ZERO;
                for _ in 0..500 {
                    if delete {
                        let _: () = redis::cmd("DEL").arg(&names).query_async(&mut raw).await.expect("del");
                    }
                    let mut pipe = redis::pipe();
                    pipe.cmd("MGET").arg(&values);
                    let mut invocation = script.prepare_invoke();
                    if scripted {
                        invocation.key(&names).arg("0123456789abcdef").arg(600_000);
                    } else {
                        for name in &names {
                            pipe.cmd("SET")
                                .arg(name)
                                .arg("0123456789abcdef")
                                .arg("NX")
                                .arg("GET")
                                .arg("PX")
                                .arg(600_000);
                        }
                    }
                    let start = Instant::now();
                    let read: Vec<redis::Value> = pipe.query_async(&mut raw).await.expect("pipe");
                    if scripted {
                        let created: Vec<Option<Vec<u8>>> = invocation.invoke_async(&mut raw).await.expect("script");
                        std::hint::black_box(created);
                    }
                    total += start.elapsed();
                    std::hint::black_box(read);
                }
                let how = if scripted {
                    "MGET, then a script of 101 SET NX GET (two round trips"
                } else {
                    "pipeline MGET + 101 SET NX GET (one round trip"
                };
                println!("{how}, {label}): {:?}", total / 500);
            }
        }
        let start = Instant::now();
        for _ in 0..500 {
            let v: Vec<Option<Vec<u8>>> = redis::cmd("MGET")
                .arg(&values)
                .arg(&names)
                .query_async(&mut raw)
                .await
                .expect("mget");
            std::hint::black_box(v);
        }
        println!("MGET 201: {:?}", start.elapsed() / 500);
        let start = Instant::now();
        for _ in 0..500 {
            let v: Option<Vec<u8>> = redis::cmd("GET")
                .arg("mb:g:1")
                .query_async(&mut raw)
                .await
                .expect("get");
            std::hint::black_box(v);
        }
        println!("GET: {:?}", start.elapsed() / 500);
        return;
    }
    if std::env::args().any(|a| a == "--profile-batch") {
        // For `perf record`: cold batches of 100 ids (each after invalidating
        // them all), sequentially, for 10 s.
        let mut users: Vec<User> = (0..100).map(|n| User { id: None, n }).collect();
        User::insert_many(&mut users).in_env(&env).await.expect("insert");
        let ids: Vec<ObjectId> = users.iter().map(|u| u.id.expect("id")).collect();
        let namespace = env.model_scope(User::COLLECTION);
        let keys: Vec<String> = ids.iter().map(|id| id.to_hex()).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let scopes: Vec<Scope<'_>> = keys.iter().map(|k| Scope::Record(&namespace, k)).collect();
            env.cache().invalidate(&scopes).await;
            std::hint::black_box(
                CachedUser::find_many_by_ids(&ids)
                    .in_env(&env)
                    .await
                    .expect("find many"),
            );
        }
        return;
    }
    if std::env::args().any(|a| a == "--profile-hit") {
        // For `perf record`: only the #[cached] hit path, sequentially, for 10 s.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            std::hint::black_box(env.scope(user.profile()).await.expect("hit"));
        }
        return;
    }

    // The `cached` crate's Redis store on the same value and server.
    let peer: AsyncRedisCache<String, Profile> = AsyncRedisCache::builder("bench-peer")
        .connection_string(&redis.url())
        .ttl(Duration::from_secs(600))
        .build()
        .await
        .expect("cached store");
    peer.async_cache_set("k".to_owned(), value.clone()).await.expect("set");
    let peer = Arc::new(peer);

    let hits = {
        let raw = raw.clone();
        let mut bare = Closure(move || {
            let mut conn = raw.clone();
            async move {
                let bytes: Vec<u8> = redis::cmd("GET")
                    .arg("bench:raw")
                    .query_async(&mut conn)
                    .await
                    .expect("get");
                let p: Profile = rmp_serde::from_slice(&bytes).expect("decode");
                std::hint::black_box(p);
            }
        });
        let (c, k) = (cache.clone(), key.clone());
        let mut manager = Closure(move || {
            let (c, k) = (c.clone(), k.clone());
            async move {
                let p: Profile = c
                    .get_or_compute::<_, PlainOutput, _>(&k, None, async { unreachable!("a hit") })
                    .await;
                std::hint::black_box(p);
            }
        });
        // As an application calls it: the default environment from `init`.
        env.set_default();
        let u = Arc::new(user.clone());
        let mut macro_hit = Closure(move || {
            let u = Arc::clone(&u);
            async move {
                let p = u.profile().await.expect("hit");
                std::hint::black_box(p);
            }
        });
        let p = Arc::clone(&peer);
        let mut theirs = Closure(move || {
            let p = Arc::clone(&p);
            async move {
                let v = p.async_cache_get(&"k".to_owned()).await.expect("get").expect("hit");
                std::hint::black_box(v);
            }
        });
        compare(
            rounds,
            per_round,
            [&mut bare, &mut manager, &mut macro_hit, &mut theirs],
        )
        .await
    };
    row(
        "1a. bare `redis` GET + decode",
        &us(hits.median(0)),
        "the wire: one round trip and one decode",
    );
    row(
        "1b. `CacheManager::get_or_compute` hit",
        &us(hits.median(1)),
        &format!("{} of bare (one MGET of value + generations)", hits.ratio(1, 0)),
    );
    row(
        "1c. `#[cached]` hit (record method)",
        &us(hits.median(2)),
        &format!("{} of bare (bar: <= 1.10x)", hits.ratio(2, 0)),
    );
    row(
        "2. `cached` crate `AsyncRedisCache` hit",
        &us(hits.median(3)),
        &format!("peer; `#[cached]` is {} of it (bar: <= 1.00x)", hits.ratio(2, 3)),
    );

    // 3. 64 concurrent tasks on hits vs redis-benchmark -c 50.
    let seconds = if quick { 1 } else { 3 };
    let ours_rps = concurrent_hits(&env, &user, 64, Duration::from_secs(seconds)).await;
    let theirs_rps = redis_benchmark(&redis, if quick { 50_000 } else { 200_000 });
    row(
        "3a. `redis-benchmark -c 50 -t get -d 256`",
        &format!("{theirs_rps:.0} req/s"),
        "unpipelined, 50 connections",
    );
    row(
        "3b. `#[cached]` hits, 64 tasks, one connection",
        &format!("{ours_rps:.0} calls/s"),
        &format!("{:.2}x redis-benchmark (bar: >= 1.00x)", ours_rps / theirs_rps),
    );

    // 4. A miss (compute + store) vs the body alone.
    let counter = Arc::new(AtomicU64::new(0));
    let misses = {
        let (c, n) = (cache.clone(), Arc::clone(&counter));
        let mut miss = Closure(move || {
            let (c, n) = (c.clone(), Arc::clone(&n));
            async move {
                let i = n.fetch_add(1, Ordering::Relaxed);
                let k = c
                    .key("bench", "miss")
                    .scope(Scope::Record("bench", "m"))
                    .arg(&i)
                    .and_then(earnorm_cache::KeyBuilder::build)
                    .expect("key");
                std::hint::black_box(
                    c.get_or_compute::<_, PlainOutput, _>(&k, None, async move { profile(i) })
                        .await,
                );
            }
        });
        let mut body = Closure(|| async {
            std::hint::black_box(profile(7));
        });
        compare(rounds, per_round / 4, [&mut miss, &mut body]).await
    };
    row(
        "4a. miss: lookup + compute + compare-and-set store",
        &us(misses.median(0)),
        "two round trips (MGET, EVALSHA; a cold scope adds SET NX)",
    );
    row("4b. the body alone", &us(misses.median(1)), "");

    // 5. Invalidation cost with 1k, 100k and 1M unrelated keys: one server
    // (so all three see the same process), one database per size, measured
    // round by round side by side.
    let sizes = [1_000u64, 100_000, 1_000_000];
    let server = RedisServer::start_with(&["--enable-debug-command", "local"]);
    let mut managers = Vec::new();
    for (db, keys) in sizes.iter().enumerate() {
        server.cli(&["-n", &db.to_string(), "DEBUG", "POPULATE", &keys.to_string(), "other:"]);
        let url = format!("redis://127.0.0.1:{}/{db}", server.port());
        let config = earnorm::CacheConfig {
            prefix: "inv:".into(),
            ..Default::default()
        };
        managers.push(CacheManager::connect(Some(&url), config).await.expect("connect"));
    }
    // Let the server finish growing its hash tables.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let invalidate = |c: CacheManager| {
        Closure(move || {
            let c = c.clone();
            async move { c.invalidate(&[Scope::Record("users", "42")]).await }
        })
    };
    let (mut a, mut b, mut c) = (
        invalidate(managers[0].clone()),
        invalidate(managers[1].clone()),
        invalidate(managers[2].clone()),
    );
    let inv = compare(rounds, per_round / 4, [&mut a, &mut b, &mut c]).await;
    for (i, keys) in sizes.iter().enumerate() {
        let size = server.cli(&["-n", &i.to_string(), "DBSIZE"]);
        row(
            &format!("5. invalidate one record, {keys} other keys"),
            &us(inv.median(i)),
            &format!("dbsize {size}"),
        );
    }
    row("5. 1M vs 1k", &inv.ratio(2, 0), "flat: no scanning (bar: ~1.0x)");

    // 6. find_by_id uncached vs cached.
    let id = user.id.expect("id");
    let finds = {
        let e = env.clone();
        let mut db = Closure(move || {
            let e = e.clone();
            async move {
                std::hint::black_box(User::find_by_id(id).in_env(&e).await.expect("find"));
            }
        });
        let e = env.clone();
        let mut hit = Closure(move || {
            let e = e.clone();
            async move {
                std::hint::black_box(e.scope(User::by_id_cached(id)).await.expect("find"));
            }
        });
        compare(rounds, per_round / 4, [&mut db, &mut hit]).await
    };
    row("6a. `find_by_id` (MongoDB)", &us(finds.median(0)), "");
    row(
        "6b. `find_by_id` through `#[cached]`",
        &us(finds.median(1)),
        &format!("{} of uncached", finds.ratio(1, 0)),
    );
    record_cache_group(&env, id, rounds, per_round).await;
    distributions(&env, &user, id, if quick { 300 } else { 3000 }).await;

    // 7. The database feed.
    run_feed_groups(redis.url(), rounds, per_round, quick);

    // 9. The in-process tier.
    local_group(&redis, rounds, per_round, quick).await;

    // 10. Redis Cluster.
    cluster_group(&redis, rounds, per_round, quick).await;

    let stats = cache.stats();
    println!(
        "\ncache stats: hits {} misses {} sets {} errors {} fallbacks {}",
        stats.hits, stats.misses, stats.sets, stats.errors, stats.fallbacks
    );
    let header = format!(
        "scripts/bench.sh{}: Redis {} on loopback, MongoDB wire protocol by secantusd-rs, 2 vCPU",
        if quick { " --quick" } else { "" },
        redis_version(&redis)
    );
    match report::write(&header) {
        Ok((json, svg)) => println!("wrote {} and {}", json.display(), svg.display()),
        Err(err) => println!("could not write the results: {err}"),
    }
    let _ = env.database().drop().await;
    let _ = <ObjectId as ModelId>::generate();
}

/// Group 7, the database feed, on a multi-threaded runtime (two workers,
/// as a server runs): the leader works beside the writers, as it would in a
/// real process.
fn run_feed_groups(url: String, rounds: usize, per_round: usize, quick: bool) {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                feed_group(&url, rounds, per_round, quick).await;
                feed_takeover(&url, quick).await;
            });
    })
    .join()
    .expect("feed benchmarks");
}

/// The latency of single reads, one call at a time, interleaved: a
/// `#[cached]` hit and a record-cache hit (both one Redis round trip), and
/// `find_by_id` from MongoDB. (An in-process tier does not exist yet.)
async fn distributions(env: &Environment, user: &User, id: ObjectId, samples: usize) {
    let (mut cached, mut record, mut mongo) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..samples {
        let start = Instant::now();
        std::hint::black_box(env.scope(user.profile()).await.expect("hit"));
        cached.push(start.elapsed());
        let start = Instant::now();
        std::hint::black_box(CachedUser::find_by_id(id).in_env(env).await.expect("hit"));
        record.push(start.elapsed());
        let start = Instant::now();
        std::hint::black_box(User::find_by_id(id).in_env(env).await.expect("read"));
        mongo.push(start.elapsed());
    }
    report::series("#[cached] hit (Redis)", "#1f77b4", cached);
    report::series("record cache hit (Redis)", "#2ca02c", record);
    report::series("find_by_id (MongoDB)", "#d62728", mongo);
}

/// Group 8, cached ORM reads: the record cache against the raw driver and
/// `#[cached]`, and `find_many_by_ids` of 100 ids against one `$in` query.
async fn record_cache_group(env: &Environment, id: ObjectId, rounds: usize, per_round: usize) {
    use earnorm::bson::doc;
    let typed = env.database().collection::<User>(User::COLLECTION);
    let finds = {
        let coll = typed.clone();
        let mut raw = Closure(move || {
            let coll = coll.clone();
            async move {
                std::hint::black_box(coll.find_one(doc! { "_id": id }).await.expect("find_one"));
            }
        });
        let e = env.clone();
        let mut orm = Closure(move || {
            let e = e.clone();
            async move {
                std::hint::black_box(User::find_by_id(id).in_env(&e).await.expect("find"));
            }
        });
        let e = env.clone();
        let mut record = Closure(move || {
            let e = e.clone();
            async move {
                std::hint::black_box(CachedUser::find_by_id(id).in_env(&e).await.expect("find"));
            }
        });
        let e = env.clone();
        let mut method = Closure(move || {
            let e = e.clone();
            async move {
                std::hint::black_box(e.scope(User::by_id_cached(id)).await.expect("find"));
            }
        });
        compare(rounds, per_round / 4, [&mut raw, &mut orm, &mut record, &mut method]).await
    };
    row(
        "8a. raw driver `find_one` + deserialize",
        &us(finds.median(0)),
        "typed collection, one document",
    );
    row(
        "8b. `find_by_id`, no record cache",
        &us(finds.median(1)),
        &format!("{} of raw (bar: <= 1.05x)", finds.ratio(1, 0)),
    );
    row(
        "8c. `find_by_id` through the record cache (hit)",
        &us(finds.median(2)),
        &format!(
            "{} of a `#[cached]` hit of the same record ({}; bar: <= 1.10x); {} of raw",
            finds.ratio(2, 3),
            us(finds.median(3)),
            finds.ratio(2, 0)
        ),
    );

    // save against a raw replace_one of the same document.
    let saves = {
        let coll = typed.clone();
        let mut raw = Closure(move || {
            let coll = coll.clone();
            async move {
                let user = User { id: Some(id), n: 1 };
                std::hint::black_box(
                    coll.replace_one(doc! { "_id": id }, &user)
                        .upsert(true)
                        .await
                        .expect("replace_one"),
                );
            }
        });
        let e = env.clone();
        let mut orm = Closure(move || {
            let e = e.clone();
            async move {
                let mut user = User { id: Some(id), n: 1 };
                user.save().in_env(&e).await.expect("save");
            }
        });
        compare(rounds, per_round / 4, [&mut raw, &mut orm]).await
    };
    row(
        "8f. raw driver `replace_one` (upsert)",
        &us(saves.median(0)),
        "typed, one document",
    );
    row(
        "8g. `save` of the same record",
        &us(saves.median(1)),
        &format!(
            "{} of raw: validation, the write, then its invalidation in Redis",
            saves.ratio(1, 0)
        ),
    );

    batch_group(env, rounds, per_round).await;
}

/// Group 8e: `find_many_by_ids` of 100 ids with 0%, 50% and 100% hits, each
/// call preceded by one invalidation round trip (of half the ids, all of
/// them, or an unrelated record), against one `$in` query.
async fn batch_group(env: &Environment, rounds: usize, per_round: usize) {
    use earnorm::bson::doc;
    use futures_util::TryStreamExt;
    let typed = env.database().collection::<User>(User::COLLECTION);
    let mut users: Vec<User> = (0..100).map(|n| User { id: None, n }).collect();
    User::insert_many(&mut users).in_env(env).await.expect("insert");
    let ids: Arc<Vec<ObjectId>> = Arc::new(users.iter().map(|u| u.id.expect("id")).collect());
    let namespace = env.model_scope(User::COLLECTION);
    let keys: Arc<Vec<String>> = Arc::new(ids.iter().map(|id| id.to_hex()).collect());
    let scopes_of = |keys: &[String], namespace: &str, invalidate: usize| -> Vec<(String, String)> {
        if invalidate == 0 {
            vec![(namespace.to_owned(), "unrelated".to_owned())]
        } else {
            keys.iter()
                .take(invalidate)
                .map(|k| (namespace.to_owned(), k.clone()))
                .collect()
        }
    };
    // Each call first invalidates `invalidate` of the ids (none: an
    // unrelated record), then reads all 100 when `read`.
    let many = |invalidate: usize, read: bool| {
        let (e, ids) = (env.clone(), Arc::clone(&ids));
        let scopes = Arc::new(scopes_of(&keys, &namespace, invalidate));
        Closure(move || {
            let (e, ids, scopes) = (e.clone(), Arc::clone(&ids), Arc::clone(&scopes));
            async move {
                let scopes: Vec<Scope<'_>> = scopes.iter().map(|(m, k)| Scope::Record(m, k)).collect();
                e.cache().invalidate(&scopes).await;
                if read {
                    let found = CachedUser::find_many_by_ids(&ids).in_env(&e).await.expect("find many");
                    assert_eq!(found.len(), 100);
                }
            }
        })
    };
    let (mut cold, mut half, mut warm) = (many(100, true), many(50, true), many(0, true));
    let (mut inv_all, mut inv_half, mut inv_one) = (many(100, false), many(50, false), many(0, false));
    let coll = typed.clone();
    let in_ids = Arc::clone(&ids);
    let mut in_query = Closure(move || {
        let (coll, ids) = (coll.clone(), Arc::clone(&in_ids));
        async move {
            let found: Vec<User> = coll
                .find(doc! { "_id": { "$in": ids.as_slice() } })
                .await
                .expect("find")
                .try_collect()
                .await
                .expect("collect");
            assert_eq!(found.len(), 100);
        }
    });
    let batches = compare(
        rounds,
        (per_round / 40).max(5),
        [
            &mut in_query,
            &mut cold,
            &mut half,
            &mut warm,
            &mut inv_all,
            &mut inv_half,
            &mut inv_one,
        ],
    )
    .await;
    let in_query = batches.median(0);
    row("8d. one `$in` query of 100 ids", &us(in_query), "raw driver, typed");
    for (i, label) in [(1, "0%"), (2, "50%"), (3, "100%")] {
        // The invalidation that set the hit rate up, timed alone, taken off.
        let net = batches.median(i).saturating_sub(batches.median(i + 3));
        row(
            &format!("8e. `find_many_by_ids`, 100 ids, {label} hits"),
            &us(net),
            &format!(
                "{:.3}x of the `$in` query (the invalidation before each call, {}, taken off)",
                net.as_secs_f64() / in_query.as_secs_f64(),
                us(batches.median(i + 3))
            ),
        );
    }
}

/// An environment on `redis` with its own database and prefix, the feed on or off.
async fn env_on(redis_url: &str, tag: &str, feed: bool) -> Environment {
    let mut config = test_config(tag);
    config.redis_uri = Some(redis_url.to_owned());
    config.cache_config = earnorm::CacheConfig {
        operation_timeout: Duration::from_secs(2),
        ..fast_cache_config(&config.database)
    };
    config.feed = feed;
    connect(config).await
}

/// 7a/b: the feed's lag (acknowledgement of a raw-driver update to the
/// deletion of the record's generation in Redis) while another task saves
/// through EarnORM without pause; 7c/d: the time of an EarnORM save with and
/// without a feed reading the same database.
async fn feed_group(redis_url: &str, rounds: usize, per_round: usize, quick: bool) {
    let fed = env_on(redis_url, "bench_feed", true).await;
    let start = Instant::now();
    while !fed.feed_stats().leader && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let plain = env_on(redis_url, "bench_nofeed", false).await;

    // Sustained load: saves of other records, back to back.
    let load = {
        let env = fed.clone();
        tokio::spawn(async move {
            let mut n = 0i64;
            loop {
                n += 1;
                let mut user = User { id: None, n };
                let _ = user.save().in_env(&env).await;
            }
        })
    };
    let mut probe = User { id: None, n: 0 };
    probe.save().in_env(&fed).await.expect("save");
    let id = probe.id.expect("id");
    let client = redis::Client::open(redis_url).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
    let samples = if quick { 50 } else { 500 };
    let lags = probe_lags(&fed, &mut conn, id, samples).await;
    load.abort();
    let pct = |p: f64| percentile(&lags, p);
    row(
        "7a. feed lag, p50 (sustained EarnORM saves meanwhile)",
        &us(pct(0.5)),
        &format!("{samples} raw-driver updates; acknowledgement to invalidation in Redis"),
    );
    row(
        "7b. feed lag, p99",
        &us(pct(0.99)),
        &format!("max {} (bar: p99 <= 50 ms)", us(lags[lags.len() - 1])),
    );
    feed_rates(&fed, &mut conn, id, quick).await;
    feed_bulk(&fed, &mut conn, quick).await;

    let saves = {
        let e = fed.clone();
        let mut with = Closure(move || {
            let e = e.clone();
            async move {
                let mut user = User { id: None, n: 1 };
                user.save().in_env(&e).await.expect("save");
            }
        });
        let e = plain.clone();
        let mut without = Closure(move || {
            let e = e.clone();
            async move {
                let mut user = User { id: None, n: 1 };
                user.save().in_env(&e).await.expect("save");
            }
        });
        compare(rounds, (per_round / 10).max(20), [&mut with, &mut without]).await
    };
    row("7c. EarnORM save, feed on", &us(saves.median(0)), "");
    row(
        "7d. EarnORM save, feed off",
        &us(saves.median(1)),
        &format!(
            "feed on is {} of off (bar: <= 1.053x, i.e. >= 0.95x the writes/s)",
            saves.ratio(0, 1)
        ),
    );
    let _ = fed.database().drop().await;
    let _ = plain.database().drop().await;
}

/// The generation key of the record `id` of `User` in `env`: what the feed
/// deletes for a write to it.
fn generation_key(env: &Environment, id: ObjectId) -> String {
    format!(
        "{}g:r:{}:{}",
        env.cache().config().prefix,
        env.model_scope(User::COLLECTION),
        id.to_hex()
    )
}

/// The value at `p` (0..=1) of sorted `samples`.
fn percentile(samples: &[Duration], p: f64) -> Duration {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((samples.len().max(1) - 1) as f64 * p).round() as usize;
    samples.get(i).copied().unwrap_or_default()
}

/// `samples` feed lags, sorted: each sets the generation of record `id`,
/// updates the record with the raw driver, and times the acknowledgement
/// to the generation's deletion by the feed.
async fn probe_lags(
    env: &Environment,
    conn: &mut redis::aio::MultiplexedConnection,
    id: ObjectId,
    samples: usize,
) -> Vec<Duration> {
    let generation = generation_key(env, id);
    let raw_coll = env.database().collection::<earnorm::bson::Document>(User::COLLECTION);
    let mut lags = Vec::with_capacity(samples);
    for i in 0..samples {
        let _: () = redis::cmd("SET")
            .arg(&generation)
            .arg("x")
            .query_async(conn)
            .await
            .expect("set");
        raw_coll
            .update_one(
                earnorm::bson::doc! { "_id": id },
                earnorm::bson::doc! { "$set": { "n": i as i64 + 1 } },
            )
            .await
            .expect("update");
        let acked = Instant::now();
        loop {
            let exists: bool = redis::cmd("EXISTS")
                .arg(&generation)
                .query_async(conn)
                .await
                .expect("exists");
            if !exists || acked.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        lags.push(acked.elapsed());
    }
    lags.sort_unstable();
    lags
}

/// 7e: the feed's lag while outside writes (raw-driver updates of a
/// thousand other records, from 16 tasks) run at a steady rate: is it flat
/// as the rate grows?
async fn feed_rates(env: &Environment, conn: &mut redis::aio::MultiplexedConnection, probe: ObjectId, quick: bool) {
    let raw_coll = env.database().collection::<earnorm::bson::Document>(User::COLLECTION);
    let others: Vec<earnorm::bson::Document> = (0..1000).map(|n| earnorm::bson::doc! { "n": n }).collect();
    let inserted = raw_coll.insert_many(others).await.expect("insert");
    let ids: Arc<Vec<earnorm::bson::Bson>> = Arc::new(inserted.inserted_ids.into_values().collect());
    for rate in [500_u64, 2_000, 5_000] {
        const TASKS: u64 = 16;
        let written = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut load = Vec::new();
        for t in 0..TASKS {
            let (coll, ids, written, stop) = (
                raw_coll.clone(),
                Arc::clone(&ids),
                Arc::clone(&written),
                Arc::clone(&stop),
            );
            load.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 * TASKS / rate));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut k = t as usize;
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    k = (k + 7) % ids.len();
                    let _ = coll
                        .update_one(
                            earnorm::bson::doc! { "_id": ids[k].clone() },
                            earnorm::bson::doc! { "$inc": { "n": 1 } },
                        )
                        .await;
                    written.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (before, start) = (written.load(Ordering::Relaxed), Instant::now());
        let lags = probe_lags(env, conn, probe, if quick { 50 } else { 300 }).await;
        #[allow(clippy::cast_precision_loss)]
        let achieved = (written.load(Ordering::Relaxed) - before) as f64 / start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        for task in load {
            let _ = task.await;
        }
        row(
            &format!("7e. feed lag at {rate} outside writes/s, p50 / p99 / max"),
            &format!(
                "{} / {} / {}",
                us(percentile(&lags, 0.5)),
                us(percentile(&lags, 0.99)),
                us(lags[lags.len() - 1])
            ),
            &format!(
                "{achieved:.0} writes/s achieved (16 tasks, raw driver); {} probes (bar: p99 <= 50 ms)",
                lags.len()
            ),
        );
    }
}

/// 7f: one outside `update_many` of 10,000 cached records: from its
/// acknowledgement to the deletion of the last of their generations.
async fn feed_bulk(env: &Environment, conn: &mut redis::aio::MultiplexedConnection, quick: bool) {
    let records = if quick { 2_000 } else { 10_000 };
    let raw_coll = env.database().collection::<earnorm::bson::Document>("bulk_users");
    let documents: Vec<earnorm::bson::Document> = (0..records).map(|n| earnorm::bson::doc! { "n": n }).collect();
    let inserted = raw_coll.insert_many(documents).await.expect("insert");
    let generations: Vec<String> = inserted
        .inserted_ids
        .values()
        .filter_map(earnorm::bson::Bson::as_object_id)
        .map(|id| {
            format!(
                "{}g:r:{}:{}",
                env.cache().config().prefix,
                env.model_scope("bulk_users"),
                id.to_hex()
            )
        })
        .collect();
    // Let the inserts' events pass, then mark every record cached.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for chunk in generations.chunks(1000) {
        let mut set = redis::cmd("MSET");
        for key in chunk {
            set.arg(key).arg("x");
        }
        let _: () = set.query_async(conn).await.expect("mset");
    }
    let before = env.feed_stats();
    raw_coll
        .update_many(earnorm::bson::doc! {}, earnorm::bson::doc! { "$inc": { "n": 1 } })
        .await
        .expect("update_many");
    let acked = Instant::now();
    loop {
        let mut left = 0_u64;
        for chunk in generations.chunks(1000) {
            let n: u64 = redis::cmd("EXISTS").arg(chunk).query_async(conn).await.expect("exists");
            left += n;
        }
        if left == 0 || acked.elapsed() > Duration::from_secs(30) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let took = acked.elapsed();
    let stats = env.feed_stats();
    row(
        &format!("7f. one outside `update_many` of {records} cached records, fully invalidated"),
        &us(took),
        &format!(
            "{} events in {} round trips to Redis (bar: within 1 s)",
            stats.events - before.events,
            stats.batches - before.batches
        ),
    );
}

/// 7g: takeover after the feed's leader is cut off from MongoDB (its
/// connection stalls): from the stall to the invalidation of an outside
/// write made at once, by the environment that takes over.
async fn feed_takeover(redis_url: &str, quick: bool) {
    let samples = if quick { 1 } else { 5 };
    let mut took = Vec::new();
    for _ in 0..samples {
        let proxy = support::TcpProxy::start(support::mongo_port()).await;
        let mut config = test_config("bench_takeover");
        config.redis_uri = Some(redis_url.to_owned());
        config.cache_config = fast_cache_config(&config.database);
        config.feed = true;
        let leader = connect(earnorm::Config {
            mongo_uri: format!("mongodb://127.0.0.1:{}/?directConnection=true", proxy.port()),
            ..config.clone()
        })
        .await;
        let start = Instant::now();
        while !leader.feed_stats().leader && start.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let survivor = connect(config).await;
        let mut user = User { id: None, n: 0 };
        user.save().in_env(&survivor).await.expect("save");
        let id = user.id.expect("id");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let client = redis::Client::open(redis_url).expect("redis url");
        let mut conn = client.get_multiplexed_async_connection().await.expect("connect");
        let generation = generation_key(&survivor, id);
        let _: () = redis::cmd("SET")
            .arg(&generation)
            .arg("x")
            .query_async(&mut conn)
            .await
            .expect("set");
        proxy.stall();
        let stalled = Instant::now();
        survivor
            .database()
            .collection::<earnorm::bson::Document>(User::COLLECTION)
            .update_one(
                earnorm::bson::doc! { "_id": id },
                earnorm::bson::doc! { "$set": { "n": 1 } },
            )
            .await
            .expect("update");
        loop {
            let exists: bool = redis::cmd("EXISTS")
                .arg(&generation)
                .query_async(&mut conn)
                .await
                .expect("exists");
            if !exists || stalled.elapsed() > Duration::from_secs(10) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        took.push(stalled.elapsed());
        proxy.cut();
        let _ = survivor.database().drop().await;
    }
    took.sort_unstable();
    row(
        "7g. takeover: leader cut off from MongoDB, to the gap's write invalidated",
        &us(percentile(&took, 0.5)),
        &format!(
            "median of {samples}, max {} (bar: within 1 s; a killed leader is replaced once its 0.6 s lease lapses)",
            us(took[took.len() - 1])
        ),
    );
}

/// Calls per second of `tasks` tasks hitting `#[cached]` for `length`.
async fn concurrent_hits(env: &Environment, user: &User, tasks: usize, length: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + length;
    let mut handles = Vec::new();
    let start = Instant::now();
    for _ in 0..tasks {
        let (env, user, done) = (env.clone(), user.clone(), Arc::clone(&done));
        handles.push(tokio::spawn(async move {
            env.scope(async {
                while Instant::now() < deadline {
                    std::hint::black_box(user.profile().await.expect("hit"));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
            .await;
        }));
    }
    for h in handles {
        h.await.expect("task");
    }
    #[allow(clippy::cast_precision_loss)]
    let n = done.load(Ordering::Relaxed) as f64;
    n / start.elapsed().as_secs_f64()
}

/// A contender reading `keys` (one: `GET`, more: `MGET`) on `conn`.
fn raw_read<C>(conn: C, keys: &[&str]) -> impl Contender
where
    C: redis::aio::ConnectionLike + Clone + Send + 'static,
{
    let keys: Vec<String> = keys.iter().map(|&k| k.to_owned()).collect();
    Closure(move || {
        let (mut conn, keys) = (conn.clone(), keys.clone());
        async move {
            if let [key] = &keys[..] {
                let v: Vec<u8> = redis::cmd("GET").arg(key).query_async(&mut conn).await.expect("get");
                std::hint::black_box(v);
            } else {
                let v: Vec<Vec<u8>> = redis::cmd("MGET")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .expect("mget");
                std::hint::black_box(v);
            }
        }
    })
}

/// Group 10, Redis Cluster: a `#[cached]` hit on a local three-master
/// cluster against one on one server, side by side in one run; 64 tasks on
/// hits on each; and an invalidation of one record on each.
async fn cluster_group(redis: &RedisServer, rounds: usize, per_round: usize, quick: bool) {
    let cluster = support::RedisCluster::start();
    let node = env_on(&redis.url(), "bench_node", false).await;
    let clustered = env_on(&cluster.url(), "bench_cluster", false).await;
    let users = [filled_user(&node).await, filled_user(&clustered).await];
    let (mut on_node, mut on_cluster) = (profile_hits(&node, &users[0]), profile_hits(&clustered, &users[1]));
    let hits = compare(rounds, per_round, [&mut on_node, &mut on_cluster]).await;
    let before = clustered.cache().stats();
    row(
        "10a. `#[cached]` hit, one server",
        &us(hits.median(0)),
        "MGET of value and 2 generations",
    );
    row(
        "10b. `#[cached]` hit, 3-master cluster",
        &us(hits.median(1)),
        &format!(
            "{} of one server (bar: <= 1.10x); hits {} misses {}",
            hits.ratio(1, 0),
            before.hits,
            before.misses
        ),
    );
    // The same reads in redis-rs alone: one GET, and one MGET of three
    // keys in three slots, through a multiplexed connection and through
    // redis-rs's cluster connection.
    let single = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let nodes: Vec<String> = cluster
        .url()
        .trim_start_matches("redis+cluster://")
        .split(',')
        .map(|node| format!("redis://{node}"))
        .collect();
    let spread = redis::cluster::ClusterClient::new(nodes)
        .expect("cluster")
        .get_async_connection()
        .await
        .expect("connect");
    let keys = ["bench:{a}", "bench:{b}", "bench:{c}"];
    for key in keys {
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(vec![7u8; 227])
            .query_async(&mut single.clone())
            .await
            .expect("set");
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(vec![7u8; 227])
            .query_async(&mut spread.clone())
            .await
            .expect("set");
    }
    let (mut get_node, mut get_cluster, mut mget_node, mut mget_cluster) = (
        raw_read(single.clone(), &keys[..1]),
        raw_read(spread.clone(), &keys[..1]),
        raw_read(single.clone(), &keys),
        raw_read(spread.clone(), &keys),
    );
    let raw = compare(
        rounds,
        per_round,
        [&mut get_node, &mut get_cluster, &mut mget_node, &mut mget_cluster],
    )
    .await;
    row("10g. redis-rs GET, one server", &us(raw.median(0)), "");
    row(
        "10h. redis-rs GET, its cluster-async connection",
        &us(raw.median(1)),
        &format!("{} of one server", raw.ratio(1, 0)),
    );
    row("10i. redis-rs MGET of 3 keys, one server", &us(raw.median(2)), "");
    row(
        "10j. redis-rs MGET of 3 keys in 3 slots, its cluster-async connection",
        &us(raw.median(3)),
        &format!(
            "{} of one server: split by redis-rs, one request per master",
            raw.ratio(3, 2)
        ),
    );
    let length = Duration::from_secs(if quick { 1 } else { 3 });
    let node_rate = concurrent_hits(&node, &users[0], 64, length).await;
    let cluster_rate = concurrent_hits(&clustered, &users[1], 64, length).await;
    row("10c. 64 tasks on hits, one server", &format!("{node_rate:.0}/s"), "");
    row(
        "10d. 64 tasks on hits, 3-master cluster",
        &format!("{cluster_rate:.0}/s"),
        &format!("{:.2}x one server's throughput", cluster_rate / node_rate),
    );
    let invalidate = |env: &Environment| {
        let cache = env.cache().clone();
        Closure(move || {
            let cache = cache.clone();
            async move { cache.invalidate(&[Scope::Record("users", "42")]).await }
        })
    };
    let (mut a, mut b) = (invalidate(&node), invalidate(&clustered));
    let inv = compare(rounds, per_round / 4, [&mut a, &mut b]).await;
    row(
        "10e. invalidate one record, one server",
        &us(inv.median(0)),
        "DEL of 2 generations, one round trip",
    );
    row(
        "10f. invalidate one record, 3-master cluster",
        &us(inv.median(1)),
        &format!("{} of one server: the 2 generations' masters at once", inv.ratio(1, 0)),
    );
    for env in [node, clustered] {
        let _ = env.database().drop().await;
    }
}

/// A saved user whose `#[cached]` profile `env` holds.
async fn filled_user(env: &Environment) -> Arc<User> {
    let mut user = User { id: None, n: 1 };
    user.save().in_env(env).await.expect("save");
    env.scope(user.profile()).await.expect("fill");
    Arc::new(user)
}

/// Contender: `user`'s `#[cached]` profile read in `env` (a hit once
/// filled).
fn profile_hits(env: &Environment, user: &Arc<User>) -> impl Contender {
    let (env, user) = (env.clone(), Arc::clone(user));
    Closure(move || {
        let (env, user) = (env.clone(), Arc::clone(&user));
        async move {
            std::hint::black_box(env.scope(user.profile()).await.expect("hit"));
        }
    })
}

/// Group 11, the consistency monitor's cost: a `#[cached]` hit and a save
/// of one record with the monitor off and on (every write sampled), in
/// alternating rounds on one Redis, and the commands Redis ran per save
/// (`INFO stats` before and after a series of saves); then what it costs
/// whatever the sampling: a database read (its reply's time noted), a
/// miss stored (the value remembered for the checks) and a plain `set`
/// (noted in Redis).
async fn monitor_group(redis: &RedisServer, rounds: usize, per_round: usize) {
    let off = env_on(&redis.url(), "bench_monitor_off", false).await;
    let on = {
        let mut config = test_config("bench_monitor_on");
        config.redis_uri = Some(redis.url());
        config.cache_config = earnorm::CacheConfig {
            operation_timeout: Duration::from_secs(2),
            monitor: earnorm::cache_layer::MonitorConfig {
                enabled: true,
                sample_one_in: 1,
                ..Default::default()
            },
            ..fast_cache_config(&config.database)
        };
        connect(config).await
    };
    let users = [filled_user(&off).await, filled_user(&on).await];
    let (mut hit_off, mut hit_on) = (profile_hits(&off, &users[0]), profile_hits(&on, &users[1]));
    let hits = compare(rounds, per_round, [&mut hit_off, &mut hit_on]).await;
    row("11a. `#[cached]` hit, monitor off", &us(hits.median(0)), "");
    row(
        "11b. `#[cached]` hit, monitor on (every write)",
        &us(hits.median(1)),
        &format!("{} of off: it never runs on a read", hits.ratio(1, 0)),
    );
    let save = |env: &Environment, n: i64| {
        let env = env.clone();
        let user = Arc::new(std::sync::Mutex::new(User { id: None, n }));
        Closure(move || {
            let (env, user) = (env.clone(), Arc::clone(&user));
            async move {
                let mut current = user.lock().expect("lock").clone();
                current.n += 1;
                current.save().in_env(&env).await.expect("save");
                *user.lock().expect("lock") = current;
            }
        })
    };
    let (mut save_off, mut save_on) = (save(&off, 0), save(&on, 0));
    let saves = compare(rounds, per_round / 10, [&mut save_off, &mut save_on]).await;
    row("11c. save of one record, monitor off", &us(saves.median(0)), "");
    row(
        "11d. save of one record, monitor on (every write)",
        &us(saves.median(1)),
        &format!(
            "{} of off: one more pipelined round trip before the invalidation",
            saves.ratio(1, 0)
        ),
    );
    // Commands per save, off and on (the checks run 50 ms after each).
    let mut info = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut per_save = Vec::new();
    for env in [&off, &on] {
        let processed = |text: String| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix("total_commands_processed:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let before: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut info)
            .await
            .expect("info");
        let mut user = User { id: None, n: 0 };
        for n in 0..200 {
            user.n = n;
            user.save().in_env(env).await.expect("save");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut info)
            .await
            .expect("info");
        #[allow(clippy::cast_precision_loss)]
        per_save.push((processed(after) - processed(before)) as f64 / 200.0);
    }
    row(
        "11e. Redis commands per save, monitor off / on",
        &format!("{:.1} / {:.1}", per_save[0], per_save[1]),
        "each includes the heartbeats of the interval (one INFO is one command too)",
    );
    // What stays on with the monitor whatever the sampling: each database
    // reply's time noted (the driver's command monitor builds an event per
    // reply), and each store remembered in the index of recent values.
    let read = |env: &Environment, user: &Arc<User>| {
        let (env, id) = (env.clone(), user.id.expect("saved"));
        Closure(move || {
            let env = env.clone();
            async move {
                let found = earnorm::bypass_cache(User::find_by_id(id).in_env(&env)).await;
                std::hint::black_box(found.expect("read").expect("found"));
            }
        })
    };
    let (mut read_off, mut read_on) = (read(&off, &users[0]), read(&on, &users[1]));
    let reads = compare(rounds, per_round / 10, [&mut read_off, &mut read_on]).await;
    row(
        "11f. database read (`find_by_id`, cache bypassed), monitor off",
        &us(reads.median(0)),
        "",
    );
    row(
        "11g. database read (`find_by_id`, cache bypassed), monitor on",
        &us(reads.median(1)),
        &format!("{} of off: the reply's time noted", reads.ratio(1, 0)),
    );
    let miss = |env: &Environment, tag: &'static str| {
        let (cache, fresh) = (env.cache().clone(), Arc::new(AtomicU64::new(0)));
        Closure(move || {
            let (cache, n) = (cache.clone(), fresh.fetch_add(1, Ordering::Relaxed));
            async move {
                let key = record_key(&cache, ("bench_monitor", tag), &n.to_string(), n);
                let value = cache.get_or_compute::<_, PlainOutput, _>(&key, None, async { n }).await;
                std::hint::black_box(value);
            }
        })
    };
    let (mut miss_off, mut miss_on) = (miss(&off, "off"), miss(&on, "on"));
    let misses = compare(rounds, per_round / 10, [&mut miss_off, &mut miss_on]).await;
    row("11h. miss computed and stored, monitor off", &us(misses.median(0)), "");
    row(
        "11i. miss computed and stored, monitor on",
        &us(misses.median(1)),
        &format!("{} of off: the value remembered for the checks", misses.ratio(1, 0)),
    );
    let set = |env: &Environment, tag: &'static str| {
        let (cache, fresh) = (env.cache().clone(), Arc::new(AtomicU64::new(0)));
        Closure(move || {
            let (cache, n) = (cache.clone(), fresh.fetch_add(1, Ordering::Relaxed));
            async move {
                let key = record_key(&cache, ("bench_monitor_set", tag), &(n % 64).to_string(), n);
                cache.set(&key, &n, None).await.expect("set");
            }
        })
    };
    let (mut set_off, mut set_on) = (set(&off, "off"), set(&on, "on"));
    let sets = compare(rounds, per_round / 10, [&mut set_off, &mut set_on]).await;
    row("11j. plain `set`, monitor off", &us(sets.median(0)), "");
    row(
        "11k. plain `set`, monitor on",
        &us(sets.median(1)),
        &format!(
            "{} of off: the value noted in Redis for every process's checks",
            sets.ratio(1, 0)
        ),
    );
    for env in [off, on] {
        let _ = env.database().drop().await;
    }
}

/// The key of a value `(namespace, name)` of argument `n`, in the scope of
/// record `id` of the model named like the namespace.
fn record_key(cache: &CacheManager, (namespace, name): (&str, &str), id: &str, n: u64) -> earnorm_cache::CacheKey {
    cache
        .key(namespace, name)
        .scope(Scope::Record(namespace, id))
        .arg(&n)
        .and_then(earnorm_cache::KeyBuilder::build)
        .expect("key")
}

/// Group 9, the in-process tier: a `#[cached]` hit served in process against
/// a bare `moka::future::Cache::get` of the same value; 64 tasks on
/// in-process hits against 64 on Redis hits; and resident memory through
/// 1M distinct keys in a 10,000-entry tier.
async fn local_group(redis: &RedisServer, rounds: usize, per_round: usize, quick: bool) {
    // The embedded default: no Redis at all.
    let mut config = test_config("bench_local");
    config.redis_uri = None;
    let embedded = connect(config).await;
    let mut user = User { id: None, n: 1 };
    user.save().in_env(&embedded).await.expect("save");
    embedded.scope(user.profile()).await.expect("warm");
    let peer: moka::future::Cache<u64, Profile> = moka::future::Cache::new(10_000);
    peer.insert(1, profile(1)).await;

    let hits = {
        // As an application calls it: the default environment (the last
        // group of a full run, so nothing after it minds the switch).
        embedded.set_default();
        let u = Arc::new(user.clone());
        let mut ours = Closure(move || {
            let u = Arc::clone(&u);
            async move {
                std::hint::black_box(u.profile().await.expect("hit"));
            }
        });
        let p = peer.clone();
        let mut theirs = Closure(move || {
            let p = p.clone();
            async move {
                std::hint::black_box(p.get(&1).await.expect("hit"));
            }
        });
        compare(rounds, per_round * 10, [&mut ours, &mut theirs]).await
    };
    row(
        "9a. `#[cached]` hit in process (record method)",
        &format!("{:.0} ns", hits.median(0).as_secs_f64() * 1e9),
        &format!("{} of 9b (bar: <= 2.0x, and <= 1 us)", hits.ratio(0, 1)),
    );
    row(
        "9b. bare `moka::future::Cache::get` of the same value",
        &format!("{:.0} ns", hits.median(1).as_secs_f64() * 1e9),
        "peer: a clone of the value out of moka",
    );

    // 64 tasks: in process (Redis beside, the tier on) against Redis hits
    // (the tier off), on the same server.
    let mut tiered_config = test_config("bench_tiered");
    tiered_config.redis_uri = Some(redis.url());
    tiered_config.cache_config.local.with_redis = true;
    let tiered = connect(tiered_config).await;
    let mut strict_config = test_config("bench_strict");
    strict_config.redis_uri = Some(redis.url());
    let strict = connect(strict_config).await;
    let mut users = Vec::new();
    for env in [&tiered, &strict] {
        let mut user = User { id: None, n: 1 };
        user.save().in_env(env).await.expect("save");
        for _ in 0..3 {
            env.scope(user.profile()).await.expect("warm");
        }
        users.push(user);
    }
    let length = Duration::from_secs(if quick { 1 } else { 3 });
    let local_rps = concurrent_hits(&tiered, &users[0], 64, length).await;
    let redis_rps = concurrent_hits(&strict, &users[1], 64, length).await;
    row(
        "9c. `#[cached]` hits in process, 64 tasks",
        &format!("{local_rps:.0} calls/s"),
        &format!("{:.1}x 9d (bar: >= 10x)", local_rps / redis_rps),
    );
    row(
        "9d. `#[cached]` hits from Redis, 64 tasks",
        &format!("{redis_rps:.0} calls/s"),
        "the tier off (the default beside Redis)",
    );

    // A Redis hit with the generations known in process (one GET) against
    // the tier off (one MGET of value and generations), the `cached`
    // crate's hit and a bare GET, on the same value and server.
    let known = redis_hits_with_known_generations(redis, rounds, per_round).await;
    row(
        "9f. `CacheManager::get` hit, generations known in process",
        &us(known.median(0)),
        &format!(
            "{} of 9h, the `cached` crate (bar: <= 1.00x); {} of a bare GET + decode ({})",
            known.ratio(0, 2),
            known.ratio(0, 3),
            us(known.median(3))
        ),
    );
    row(
        "9g. `CacheManager::get` hit, the tier off",
        &us(known.median(1)),
        &format!("{} of a bare GET + decode (bar: <= 1.10x)", known.ratio(1, 3)),
    );
    row("9h. `cached` crate `AsyncRedisCache` hit", &us(known.median(2)), "peer");

    // Memory: 1M distinct keys through the default 10,000-entry tier.
    let keys: u64 = if quick { 100_000 } else { 1_000_000 };
    let resident_before = resident_bytes();
    embedded
        .scope(async {
            for i in 0..keys {
                std::hint::black_box(user.square(i).await);
            }
        })
        .await;
    let resident_after = resident_bytes();
    #[allow(clippy::cast_precision_loss)]
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    row(
        &format!("9e. resident memory through {keys} distinct keys"),
        &format!("{:.1} MiB -> {:.1} MiB", mib(resident_before), mib(resident_after)),
        &format!(
            "the tier holds {} entries (capacity 10,000)",
            embedded.cache().local_entries()
        ),
    );
    let stats = embedded.cache().stats();
    println!(
        "\nin-process tier (embedded): {} of {} hits served in process",
        stats.local_hits, stats.hits
    );

    let mut samples = Vec::new();
    for _ in 0..if quick { 300 } else { 3000 } {
        let start = Instant::now();
        std::hint::black_box(embedded.scope(user.profile()).await.expect("hit"));
        samples.push(start.elapsed());
    }
    report::series("#[cached] hit (in process)", "#9467bd", samples);
    for env in [&embedded, &tiered, &strict] {
        let _ = env.database().drop().await;
    }
}

/// Group 9f-9h: `get` of one value by a manager whose tier knows its
/// generation (a GET), by one without the tier (an MGET), by the `cached`
/// crate, and a bare GET + decode, round by round.
async fn redis_hits_with_known_generations(redis: &RedisServer, rounds: usize, per_round: usize) -> Samples<4> {
    let config = |with_redis: bool| earnorm::CacheConfig {
        prefix: "bench-known:".into(),
        operation_timeout: Duration::from_secs(2),
        local: earnorm::LocalConfig {
            capacity: 10_000,
            with_redis,
        },
        ..Default::default()
    };
    let strict = CacheManager::connect(Some(&redis.url()), config(false))
        .await
        .expect("connect");
    let tiered = CacheManager::connect(Some(&redis.url()), config(true))
        .await
        .expect("connect");
    let key = |cache: &CacheManager, n: u32| {
        cache
            .key("bench", "known")
            .scope(Scope::Tag("known"))
            .arg(&n)
            .and_then(earnorm_cache::KeyBuilder::build)
            .expect("key")
    };
    // The value, stored by the strict manager; the tiered one learns the
    // generation by reading another value of the same scope until it
    // serves that one in process.
    for n in [0, 1] {
        let _: Profile = strict
            .get_or_compute::<_, PlainOutput, _>(&key(&strict, n), None, async { profile(1) })
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while tiered.stats().local_hits == 0 && Instant::now() < deadline {
        let _: Profile = tiered
            .get_or_compute::<_, PlainOutput, _>(&key(&tiered, 0), None, async { profile(1) })
            .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (known_key, strict_key) = (key(&tiered, 1), key(&strict, 1));
    let peer: AsyncRedisCache<String, Profile> = AsyncRedisCache::builder("bench-known-peer")
        .connection_string(&redis.url())
        .ttl(Duration::from_secs(600))
        .build()
        .await
        .expect("cached store");
    peer.async_cache_set("k".to_owned(), profile(1)).await.expect("set");
    let peer = Arc::new(peer);
    let mut raw = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let payload = rmp_serde::to_vec_named(&profile(1)).expect("encode");
    redis::cmd("SET")
        .arg("bench:known:raw")
        .arg(&payload)
        .query_async::<()>(&mut raw)
        .await
        .expect("set");
    let (c, k) = (tiered.clone(), known_key);
    let mut known = Closure(move || {
        let (c, k) = (c.clone(), k.clone());
        async move {
            std::hint::black_box(c.get::<Profile>(&k).await.expect("get").expect("hit"));
        }
    });
    let (c, k) = (strict.clone(), strict_key);
    let mut unknown = Closure(move || {
        let (c, k) = (c.clone(), k.clone());
        async move {
            std::hint::black_box(c.get::<Profile>(&k).await.expect("get").expect("hit"));
        }
    });
    let p = Arc::clone(&peer);
    let mut theirs = Closure(move || {
        let p = Arc::clone(&p);
        async move {
            std::hint::black_box(p.async_cache_get(&"k".to_owned()).await.expect("get").expect("hit"));
        }
    });
    let mut bare = Closure(move || {
        let mut conn = raw.clone();
        async move {
            let bytes: Vec<u8> = redis::cmd("GET")
                .arg("bench:known:raw")
                .query_async(&mut conn)
                .await
                .expect("get");
            std::hint::black_box(rmp_serde::from_slice::<Profile>(&bytes).expect("decode"));
        }
    });
    compare(rounds, per_round, [&mut known, &mut unknown, &mut theirs, &mut bare]).await
}

/// This process's resident memory, from `/proc/self/statm` (0 where there
/// is none).
fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// `redis-benchmark -c 50 -t get -d 256` requests per second on `redis`.
fn redis_benchmark(redis: &RedisServer, requests: u64) -> f64 {
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &redis.port().to_string(),
            "-c",
            "50",
            "-t",
            "get",
            "-d",
            "256",
            "-n",
            &requests.to_string(),
            "-q",
        ])
        .output()
        .expect("run redis-benchmark (Debian: redis-tools)");
    let text = String::from_utf8_lossy(&out.stdout);
    // "GET: 108225.10 requests per second, p50=0.239 msec"
    text.rsplit("GET:")
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(f64::NAN)
}

fn redis_version(redis: &RedisServer) -> String {
    redis
        .cli(&["INFO", "server"])
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:").map(str::to_owned))
        .unwrap_or_default()
}
