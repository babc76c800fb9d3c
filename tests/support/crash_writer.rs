//! The checker's crash writer: a separate OS process that leads the
//! database feed and saves its own records through EarnORM, until the
//! checker kills it with SIGKILL (while Redis is frozen, so that its last
//! invalidations cannot have gone out: they die with it).
//!
//! It reports each write on its standard output, before sending it
//! (`CHECKER W slot seq unix_ns`) and once `save` returned
//! (`CHECKER A slot seq unix_ns lagged`), so that the checker can add
//! them to its history.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use earnorm::Environment;

use super::checker::Item;
use crate::connect;

/// How to start the crash writer: a program (the test binary or the checker
/// example) and the arguments that make it run
/// [`crash_writer_child`](crate::crash_writer_child).
#[derive(Debug, Clone)]
pub struct ChildCommand {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
}

/// Sequence numbers of the child's writes start here, above any the
/// checker's own writers reach.
pub(crate) const CHILD_SEQ: i64 = 1_000_000_000;

const VAR: &str = "EARNORM_CHECKER_CHILD";

/// What the child reported.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Line {
    /// About to save `seq` in `slot`, at this instant.
    Sending { slot: usize, seq: i64, at: Instant },
    /// `save` returned; `lagged`: its invalidation was deferred.
    Acked {
        slot: usize,
        seq: i64,
        at: Instant,
        lagged: bool,
    },
}

/// The running child, from the checker's side.
pub(crate) struct CrashWriter {
    child: Child,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<Line>,
    leading: mpsc::Receiver<()>,
}

fn unix_ns() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

impl CrashWriter {
    /// Starts the child on `config`'s database and Redis, writing the
    /// records `ids` (slots `first_slot..`), and waits until it leads the feed.
    pub(crate) fn spawn(command: &ChildCommand, config: &earnorm::Config, ids: &[ObjectId], first_slot: usize) -> Self {
        let spec = [
            config.mongo_uri.clone(),
            config.database.clone(),
            config.redis_uri.clone().unwrap_or_default(),
            config.cache_config.prefix.clone(),
            first_slot.to_string(),
            ids.iter().map(|id| id.to_hex()).collect::<Vec<_>>().join(","),
        ]
        .join("\n");
        let mut child = Command::new(&command.program)
            .args(&command.args)
            .env(VAR, spec)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the crash writer process");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        // The child's wall clock and ours are the same clock: its instants
        // are placed on ours by their distance from now.
        let (base_ns, base) = (unix_ns(), Instant::now());
        let to_instant = move |ns: u128| {
            let delta = Duration::from_nanos(u64::try_from(ns.abs_diff(base_ns)).unwrap_or(u64::MAX));
            if ns >= base_ns {
                base + delta
            } else {
                base.checked_sub(delta).unwrap_or(base)
            }
        };
        let (tx, lines) = mpsc::channel();
        let (leader_tx, leading) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The test harness may print its own words before ours.
                let Some((_, ours)) = line.split_once("CHECKER ") else {
                    continue;
                };
                let words: Vec<&str> = ours.split_whitespace().collect();
                let number = |i: usize| words.get(i).and_then(|w| w.parse::<i64>().ok()).unwrap_or(-1);
                let slot = usize::try_from(number(1)).unwrap_or(usize::MAX);
                let at = || to_instant(words.get(3).and_then(|w| w.parse().ok()).unwrap_or(0));
                let parsed = match words.first() {
                    Some(&"leading") => {
                        let _ = leader_tx.send(());
                        continue;
                    }
                    Some(&"W") => Line::Sending {
                        slot,
                        seq: number(2),
                        at: at(),
                    },
                    Some(&"A") => Line::Acked {
                        slot,
                        seq: number(2),
                        at: at(),
                        lagged: words.get(4) == Some(&"1"),
                    },
                    _ => continue,
                };
                if tx.send(parsed).is_err() {
                    break;
                }
            }
        });
        let writer = Self {
            child,
            stdin,
            lines,
            leading,
        };
        assert!(
            writer.leading.recv_timeout(Duration::from_secs(20)).is_ok(),
            "the crash writer process did not start leading the feed"
        );
        writer
    }

    /// Lets the child start writing.
    pub(crate) fn go(&mut self) {
        writeln!(self.stdin, "go").expect("tell the crash writer to start");
        self.stdin.flush().expect("flush");
    }

    /// Kills the child with SIGKILL and returns what it reported.
    pub(crate) fn kill(mut self) -> Vec<Line> {
        self.child.kill().expect("SIGKILL the crash writer");
        let _ = self.child.wait();
        // The reading thread ends at the pipe's end.
        let mut lines = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(2)) {
            lines.push(line);
        }
        let _ = self.leading.try_recv();
        lines
    }
}

/// The child's side. Returns `false` at once when this process was not
/// started as the crash writer; otherwise saves until it is killed.
pub async fn crash_writer_child() -> bool {
    let Ok(spec) = std::env::var(VAR) else {
        return false;
    };
    let fields: Vec<&str> = spec.split('\n').collect();
    let [mongo_uri, database, redis, prefix, first, ids] = fields[..] else {
        panic!("{VAR} is malformed");
    };
    let first: usize = first.parse().expect("first slot");
    let ids: Vec<ObjectId> = ids
        .split(',')
        .map(|hex| ObjectId::parse_str(hex).expect("an id"))
        .collect();
    let mut cache_config = crate::fast_cache_config("unused");
    cache_config.prefix = prefix.to_owned();
    let env: Environment = connect(earnorm::Config {
        mongo_uri: mongo_uri.to_owned(),
        database: database.to_owned(),
        redis_uri: Some(redis.to_owned()),
        cache_config,
        connect_timeout: Duration::from_secs(5),
        feed: true,
    })
    .await;
    let say = |words: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "CHECKER {words}");
        let _ = out.flush();
    };
    while !env.feed_stats().leader {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    say("leading".to_owned());
    let mut go = String::new();
    let _ = std::io::stdin().read_line(&mut go);
    let mut n: usize = 0;
    loop {
        let k = n % ids.len();
        let (slot, seq) = (first + k, CHILD_SEQ + i64::try_from(n).unwrap_or(i64::MAX));
        let deferred = env.cache().stats().invalidations_deferred;
        say(format!("W {slot} {seq} {}", unix_ns()));
        let mut item = Item {
            id: Some(ids[k]),
            slot: i64::try_from(slot).unwrap_or(-1),
            version: seq,
        };
        if item.save().in_env(&env).await.is_ok() {
            let lagged = env.cache().stats().invalidations_deferred > deferred;
            say(format!("A {slot} {seq} {} {}", unix_ns(), u8::from(lagged)));
        }
        tokio::time::sleep(Duration::from_millis(3 + (n % 5) as u64)).await;
        n += 1;
    }
}
