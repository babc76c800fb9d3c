//! Test support shared by every integration test: where the servers are,
//! isolated names per test, and private `redis-server` processes that tests
//! can kill, restart, freeze and thaw.
//!
//! Server addresses come from the environment, with localhost defaults:
//! `REDIS_URL` (default `redis://127.0.0.1:6379/0`) and `MONGODB_URI`
//! (default `mongodb://127.0.0.1:27017`). A test that needs a server it cannot
//! reach fails with a message saying how to start it.
#![allow(clippy::missing_panics_doc)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod captured;
mod checker;
mod cluster;
mod crash_writer;
mod env;
mod shared_redis;
pub use captured::CapturedLogs;
pub use checker::{run as run_checker, run_printed, CheckerConfig, Report};
pub use cluster::RedisCluster;
pub use crash_writer::{crash_writer_child, ChildCommand};
pub use env::*;
pub use shared_redis::{shared_redis, SharedRedis};

/// How to start the services, printed when a test cannot reach one.
pub const HOW_TO_START: &str = "start the services with `scripts/services.sh up` (or `docker compose up -d`), \
     or point REDIS_URL / MONGODB_URI at running servers";

/// The shared Redis URL (`REDIS_URL`, default `redis://127.0.0.1:6379/0`).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".to_owned())
}

/// The MongoDB URI (`MONGODB_URI`, default `mongodb://127.0.0.1:27017`).
pub fn mongo_uri() -> String {
    std::env::var("MONGODB_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27017".to_owned())
}

/// The port of the MongoDB of [`mongo_uri`] (its first host).
pub fn mongo_port() -> u16 {
    host_port(&mongo_uri(), 27017)
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(27017)
}

/// A name unique to this test run and call: use it as a key prefix or a
/// database name so that tests running in parallel never share data.
pub fn unique_name(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() % 1_000_000_000);
    format!(
        "t_{tag}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// `host:port` of a `redis://` or `mongodb://` URL (no credentials, no path).
fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let first = hosts.split(',').next().unwrap_or(hosts);
    if first.contains(':') {
        first.to_owned()
    } else {
        format!("{first}:{default_port}")
    }
}

/// Whether something accepts TCP connections at `addr` within `limit`.
fn tcp_answers(addr: &str, limit: Duration) -> bool {
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .is_some_and(|a| TcpStream::connect_timeout(&a, limit).is_ok())
}

/// Panics with instructions unless the shared Redis answers PING.
pub fn require_redis() -> String {
    let url = redis_url();
    check_redis(&url).unwrap_or_else(|message| panic!("{message}"));
    url
}

/// Panics with instructions unless MongoDB accepts connections.
pub fn require_mongo() -> String {
    let uri = mongo_uri();
    check_mongo(&uri).unwrap_or_else(|message| panic!("{message}"));
    uri
}

/// Whether a Redis answers at `url`; the error says how to start one.
///
/// # Errors
/// A message naming the service, the address and how to start it.
pub fn check_redis(url: &str) -> Result<(), String> {
    let addr = host_port(url, 6379);
    if ping_redis(&addr, Duration::from_secs(2)) {
        Ok(())
    } else {
        Err(format!("Redis is not reachable at {addr} (REDIS_URL): {HOW_TO_START}"))
    }
}

/// Whether a MongoDB accepts connections at `uri`; the error says how to start one.
///
/// # Errors
/// A message naming the service, the address and how to start it.
pub fn check_mongo(uri: &str) -> Result<(), String> {
    let addr = host_port(uri, 27017);
    if tcp_answers(&addr, Duration::from_secs(2)) {
        Ok(())
    } else {
        Err(format!(
            "MongoDB is not reachable at {addr} (MONGODB_URI): {HOW_TO_START}"
        ))
    }
}

/// Sends a raw PING and checks that a Redis answers (`+PONG`, or an error
/// such as `-NOAUTH` from a server that wants a password).
fn ping_redis(addr: &str, limit: Duration) -> bool {
    let Some(sock) = addr.to_socket_addrs().ok().and_then(|mut a| a.next()) else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&sock, limit) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(limit));
    let _ = stream.set_write_timeout(Some(limit));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 1];
    stream.read_exact(&mut buf).is_ok() && (buf[0] == b'+' || buf[0] == b'-')
}

/// A private `redis-server` on a free port, in its own temporary directory,
/// with nothing persisted. Killed and cleaned up on drop.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
    frozen: bool,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Like [`start`](Self::start), with extra `redis-server` arguments.
    pub fn start_with(extra_args: &[&str]) -> Self {
        Self::start_on(free_port(), extra_args)
    }

    /// Starts a server on `port` (which must be free).
    pub fn start_on(port: u16, extra_args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(unique_name(&format!("redis{port}")));
        std::fs::create_dir_all(&dir).expect("create a temporary directory for redis-server");
        let mut server = Self {
            port,
            dir,
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
            frozen: false,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("could not run redis-server ({err}); install it (Debian: apt-get install redis-server)")
            });
        self.child = Some(child);
        self.frozen = false;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping_redis(&self.addr(), Duration::from_millis(200)) {
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Whether the server answers PING now.
    pub fn answers(&self) -> bool {
        ping_redis(&self.addr(), Duration::from_millis(300))
    }

    /// Kills the server (SIGKILL) and waits for it to exit. Its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.frozen {
                let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.frozen = false;
    }

    /// Starts it again on the same port (empty) and waits for PING.
    pub fn restart(&mut self) {
        self.kill();
        // The port is ours; a just-closed listener may take a moment to free.
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpListener::bind(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "port {} did not become free", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
        self.spawn();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&mut self) {
        self.signal("-STOP");
        self.frozen = true;
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&mut self) {
        self.signal("-CONT");
        self.frozen = false;
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("the server is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Runs a command through `redis-cli` on this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli (Debian: apt-get install redis-tools)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// A TCP proxy in front of a server, for one process's view of it: cutting
/// it drops the connections through it and refuses new ones, as a network
/// partition between that process and the server would, while other
/// processes reach the server directly.
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    state: std::sync::Arc<tokio::sync::watch::Sender<Path>>,
    task: tokio::task::JoinHandle<()>,
}

/// What a [`TcpProxy`] does with the bytes it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Forwards them.
    Open,
    /// Holds every connection open and forwards nothing, as a network that
    /// silently drops packets does: no error, no answer.
    Stalled,
    /// Drops the connections and refuses new ones.
    Cut,
}

impl TcpProxy {
    /// Listens on a free port and forwards to `127.0.0.1:target`.
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let state = std::sync::Arc::new(tokio::sync::watch::Sender::new(Path::Open));
        let shared = std::sync::Arc::clone(&state);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut path = shared.subscribe();
                let now = *path.borrow_and_update();
                match now {
                    Path::Cut => continue, // dropped: refused
                    Path::Stalled => {
                        // Accepted, and never answered until cut.
                        tokio::spawn(async move {
                            let _held = inbound;
                            let _ = path.wait_for(|p| *p == Path::Cut).await;
                        });
                        continue;
                    }
                    Path::Open => {}
                }
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = path.wait_for(|p| *p != Path::Open) => {}
                    }
                    // Stalled: hold both ends, silent, until cut.
                    let _ = path.wait_for(|p| *p == Path::Cut).await;
                });
            }
        });
        Self { port, state, task }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0` through the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Cuts: open connections are dropped, new ones refused.
    pub fn cut(&self) {
        self.state.send_replace(Path::Cut);
    }

    /// Stalls: open connections stay open but carry nothing, new ones are
    /// accepted and never answered (until [`cut`](Self::cut)); as a network
    /// that drops packets silently. Connections stalled stay so after a
    /// [`heal`](Self::heal).
    pub fn stall(&self) {
        self.state.send_replace(Path::Stalled);
    }

    /// Heals a cut: new connections are forwarded again.
    pub fn heal(&self) {
        self.state.send_replace(Path::Open);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Another process: this test binary started again to run one of its
/// ignored tests (`--ignored --exact NAME --nocapture`), driven through
/// its standard input and output. Killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct ChildTest {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl ChildTest {
    /// Starts the test `name` with the environment variables `vars`.
    pub fn start(name: &str, vars: &[(&str, &str)]) -> Self {
        let mut command = Command::new(std::env::current_exe().expect("the test binary"));
        command
            .args(["--ignored", "--exact", name, "--nocapture", "--test-threads=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (key, value) in vars {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start the child process");
        let stdin = child.stdin.take().expect("stdin");
        let lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().expect("stdout")));
        Self { child, stdin, lines }
    }

    /// What follows `marker` on the next line that holds it (the test
    /// harness may print its own words before the child's on a line).
    pub fn answer(&mut self, marker: &str) -> String {
        loop {
            let line = self.lines.next().expect("the child process runs").expect("a line");
            if let Some((_, rest)) = line.split_once(marker) {
                return rest.trim().to_owned();
            }
        }
    }

    /// Sends a line.
    pub fn send(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("the child's standard input");
        self.stdin.flush().expect("flush");
    }

    /// Waits for the process to exit by itself.
    pub fn wait(&mut self) {
        let _ = self.child.wait();
    }

    /// Kills the process with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildTest {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How many times each cached body ran, by name: bodies call [`ran`],
/// tests read [`runs`] (one table per test binary).
static RUNS: std::sync::Mutex<Option<std::collections::HashMap<String, usize>>> = std::sync::Mutex::new(None);

/// Counts one run of the body named `what`.
pub fn ran(what: &str) {
    *RUNS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get_or_insert_with(std::collections::HashMap::new)
        .entry(what.to_owned())
        .or_default() += 1;
}

/// How many times the body named `what` ran.
pub fn runs(what: &str) -> usize {
    RUNS.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .and_then(|m| m.get(what).copied())
        .unwrap_or(0)
}
