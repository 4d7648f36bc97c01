//! Many processes, one table: 8 processes × 1,000 keys each write through
//! cached stores on one state table, as 8,000 pipelines checkpointing as fast
//! as they can would.
//!
//! ```text
//! cargo bench --bench scale
//! ```
//!
//! Each process (this binary again) opens a cached store with the defaults
//! (a pool of 5) and runs one task per key, each putting its own key in a
//! loop, the way a pipeline writes its bookmark after every page. All
//! processes first write each of their keys once (so the window measures
//! updates), then start together and write for 10 s. Four configurations,
//! each on a fresh table: group commit and write-behind, each without and
//! with change notifications (the triggers installed and every store
//! listening), which shows what the notifications cost under write load.
//!
//! Reported per configuration: acknowledged puts/s; persisted rows/s (rows
//! the flushers committed inside the window, all processes together);
//! batches/s and rows per batch; `put` latency p50/p99/max (log histogram,
//! ±3%); the CPU used by the server's processes, by the writers, and by the
//! whole machine; the table's HOT-update ratio and size afterwards. Server
//! CPU is read from `/proc`, so it needs the server on this machine (the
//! throwaway one, or a local `DATABASE_URL`). Under `cargo test --benches`
//! it runs 2 processes × 50 keys for 1 s each, as a smoke test.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, Durability, PostgresStateStore};
use serde_json::json;
use sqlx::Connection;

const CHILD: &str = "FAUCET_SCALE_CHILD";

/// One run of the benchmark: how writes are made durable, and whether the
/// table publishes its changes to listening stores.
#[derive(Clone, Copy)]
struct Configuration {
    name: &'static str,
    durability: Durability,
    notifications: bool,
}

const CONFIGURATIONS: [Configuration; 4] = [
    Configuration {
        name: "group commit",
        durability: Durability::GroupCommit,
        notifications: false,
    },
    Configuration {
        name: "write-behind",
        durability: Durability::WriteBehind,
        notifications: false,
    },
    Configuration {
        name: "group commit + notifications",
        durability: Durability::GroupCommit,
        notifications: true,
    },
    Configuration {
        name: "write-behind + notifications",
        durability: Durability::WriteBehind,
        notifications: true,
    },
];

/// The `Instant` at which the wall clock reads `micros` (both clocks are
/// this machine's, so every process agrees on it to within microseconds).
fn instant_at(micros: u64) -> Instant {
    Instant::now() + Duration::from_micros(micros.saturating_sub(common::wall_micros()))
}

/// Latencies in buckets of 1/16 of a power of two (a bucket spans ~4.4%; a
/// percentile is reported at its bucket's geometric middle).
struct Histogram {
    buckets: Vec<u64>,
    max_nanos: u64,
}

impl Histogram {
    const BUCKETS: usize = 64 * 16;

    fn new() -> Self {
        Self {
            buckets: vec![0; Self::BUCKETS],
            max_nanos: 0,
        }
    }

    fn record(&mut self, latency: Duration) {
        let nanos = latency.as_nanos().min(u64::MAX as u128) as u64;
        let bucket = ((nanos.max(1) as f64).log2() * 16.0) as usize;
        self.buckets[bucket.min(Self::BUCKETS - 1)] += 1;
        self.max_nanos = self.max_nanos.max(nanos);
    }

    fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.buckets.iter_mut().zip(&other.buckets) {
            *mine += theirs;
        }
        self.max_nanos = self.max_nanos.max(other.max_nanos);
    }

    fn percentile(&self, p: f64) -> Duration {
        let total: u64 = self.buckets.iter().sum();
        let rank = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (bucket, count) in self.buckets.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Duration::from_nanos(2f64.powf((bucket as f64 + 0.5) / 16.0) as u64);
            }
        }
        Duration::ZERO
    }

    /// `bucket:count` pairs of the non-empty buckets, then the maximum.
    fn encode(&self) -> String {
        let pairs: Vec<String> = self
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(bucket, count)| format!("{bucket}:{count}"))
            .collect();
        format!("{};{}", pairs.join(","), self.max_nanos)
    }

    fn decode(text: &str) -> Self {
        let mut histogram = Self::new();
        let (pairs, max) = text.split_once(';').expect("histogram;max");
        for pair in pairs.split(',').filter(|p| !p.is_empty()) {
            let (bucket, count) = pair.split_once(':').expect("bucket:count");
            histogram.buckets[bucket.parse::<usize>().unwrap()] += count.parse::<u64>().unwrap();
        }
        histogram.max_nanos = max.parse().unwrap();
        histogram
    }
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is the
    // 3rd field of the file, utime the 14th and stime the 15th.
    let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Busy and total time of the whole machine, from the first line of `/proc/stat`.
fn machine_time() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let total: u64 = ticks.iter().take(8).sum();
    // idle and iowait
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((total - idle, total))
}

/// The CPU time of every process of the server: the postmaster (the parent
/// of any backend) and all its children, by pid.
fn server_cpu(postmaster: u32) -> HashMap<u32, Duration> {
    let mut times = HashMap::new();
    if let Some(time) = cpu_time(postmaster) {
        times.insert(postmaster, time);
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if parent_pid(pid) == Some(postmaster)
            && let Some(time) = cpu_time(pid)
        {
            times.insert(pid, time);
        }
    }
    times
}

/// CPU the server used between two samples; a process started in between
/// counts from zero, one gone by the end is not counted (none are expected:
/// the pools keep their connections).
fn server_cpu_used(before: &HashMap<u32, Duration>, after: &HashMap<u32, Duration>) -> Duration {
    after
        .iter()
        .map(|(pid, time)| time.saturating_sub(before.get(pid).copied().unwrap_or_default()))
        .sum()
}

fn key(process: usize, i: usize) -> String {
    format!("scale_p{process}_k{i}")
}

/// What a child reports.
struct ChildResult {
    puts: u64,
    rows: u64,
    batches: u64,
    cpu: Duration,
    latencies: Histogram,
}

/// The child: one cached store, one task per key. Prints `READY` once every
/// key has been written once, waits for `GO <start> <end>` (wall-clock
/// microseconds) on stdin, writes during that window, then prints its result.
async fn child(
    url: &str,
    table: &str,
    process: usize,
    keys: usize,
    durability: Durability,
    listen: bool,
) {
    let plain = PostgresStateStore::connect_with(url, 5, table)
        .await
        .unwrap();
    let store = Arc::new(
        plain
            .cached(
                CacheOptions::new()
                    .durability(durability)
                    .listen_for_changes(listen),
            )
            .unwrap(),
    );
    let keys: Arc<Vec<String>> = Arc::new((0..keys).map(|i| key(process, i)).collect());
    let warm: Vec<_> = keys
        .iter()
        .map(|key| {
            let (store, key) = (store.clone(), key.clone());
            tokio::spawn(async move { store.put(&key, &json!({"lsn": 0, "page": 0})).await })
        })
        .collect();
    for task in warm {
        task.await.unwrap().unwrap();
    }
    store.flush().await.unwrap();
    println!("READY");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let mut words = line
        .split_whitespace()
        .skip(1)
        .map(|w| w.parse::<u64>().unwrap());
    let (start, end) = (
        instant_at(words.next().unwrap()),
        instant_at(words.next().unwrap()),
    );

    let writers: Vec<_> = (0..keys.len())
        .map(|i| {
            let (store, keys) = (store.clone(), keys.clone());
            tokio::spawn(async move {
                let mut latencies = Histogram::new();
                let mut puts = 0u64;
                tokio::time::sleep_until(start.into()).await;
                while Instant::now() < end {
                    puts += 1;
                    let bookmark = json!({"lsn": puts, "page": puts});
                    let began = Instant::now();
                    store.put(&keys[i], &bookmark).await.unwrap();
                    latencies.record(began.elapsed());
                }
                (puts, latencies)
            })
        })
        .collect();
    tokio::time::sleep_until(start.into()).await;
    let (stats_before, cpu_before) = (store.stats(), cpu_time(std::process::id()).unwrap());
    tokio::time::sleep_until(end.into()).await;
    let (stats_after, cpu_after) = (store.stats(), cpu_time(std::process::id()).unwrap());
    let mut result = ChildResult {
        puts: 0,
        rows: stats_after.rows_written - stats_before.rows_written,
        batches: stats_after.batches_written - stats_before.batches_written,
        cpu: cpu_after.saturating_sub(cpu_before),
        latencies: Histogram::new(),
    };
    for writer in writers {
        let (puts, latencies) = writer.await.unwrap();
        result.puts += puts;
        result.latencies.merge(&latencies);
    }
    // The parent samples the server's CPU at the window's end and then
    // closes stdin: until then the pool's backends must live, or the work
    // they did would drop out of the sample with them.
    let mut rest = String::new();
    std::io::stdin().read_line(&mut rest).unwrap();
    store.shutdown().await.unwrap();
    println!(
        "RESULT {} {} {} {} {}",
        result.puts,
        result.rows,
        result.batches,
        result.cpu.as_secs_f64(),
        result.latencies.encode()
    );
}

fn parse_result(line: &str) -> ChildResult {
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words[0], "RESULT", "a child's last line: {line}");
    ChildResult {
        puts: words[1].parse().unwrap(),
        rows: words[2].parse().unwrap(),
        batches: words[3].parse().unwrap(),
        cpu: Duration::from_secs_f64(words[4].parse().unwrap()),
        latencies: Histogram::decode(words[5]),
    }
}

struct Scale {
    url: String,
    processes: usize,
    keys: usize,
    window: Duration,
    /// The server's postmaster, when it runs on this machine.
    postmaster: Option<u32>,
}

impl Scale {
    async fn run(&self, configuration: Configuration) {
        let table = support::unique_table("scale");
        let plain = PostgresStateStore::connect_with(&self.url, 2, &table)
            .await
            .unwrap();
        plain.ensure_table().await.unwrap();
        if configuration.notifications {
            plain.ensure_change_notifications().await.unwrap();
        }
        let mode = match configuration.durability {
            Durability::GroupCommit => "group_commit",
            Durability::WriteBehind => "write_behind",
            Durability::WriteThrough => "write_through",
        };
        let mut children: Vec<(Child, ChildStdin, BufReader<std::process::ChildStdout>)> = (0
            ..self.processes)
            .map(|process| {
                let mut child = Command::new(std::env::current_exe().unwrap())
                    .env(
                        CHILD,
                        format!(
                            "{table} {process} {} {mode} {}",
                            self.keys, configuration.notifications
                        ),
                    )
                    .env("DATABASE_URL", &self.url)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap();
                let stdin = child.stdin.take().unwrap();
                let stdout = BufReader::new(child.stdout.take().unwrap());
                (child, stdin, stdout)
            })
            .collect();
        for (_, _, stdout) in &mut children {
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "READY", "a child's first line");
        }
        let start = common::wall_micros() + 200_000;
        let end = start + self.window.as_micros() as u64;
        for (_, stdin, _) in &mut children {
            writeln!(stdin, "GO {start} {end}").unwrap();
        }
        tokio::time::sleep_until(instant_at(start).into()).await;
        let server_before = self.postmaster.map(server_cpu);
        let machine_before = machine_time();
        tokio::time::sleep_until(instant_at(end).into()).await;
        let server_after = self.postmaster.map(server_cpu);
        let machine_after = machine_time();

        let mut results = Vec::new();
        for (mut child, stdin, mut stdout) in children {
            drop(stdin);
            let mut line = String::new();
            stdout.read_line(&mut line).unwrap();
            assert!(child.wait().unwrap().success(), "a writer process failed");
            results.push(parse_result(&line));
        }
        let (hot_ratio, size) = table_health_after_writers(&self.url, &table).await;

        let seconds = self.window.as_secs_f64();
        let mut latencies = Histogram::new();
        for result in &results {
            latencies.merge(&result.latencies);
        }
        let puts: u64 = results.iter().map(|r| r.puts).sum();
        let rows: u64 = results.iter().map(|r| r.rows).sum();
        let batches: u64 = results.iter().map(|r| r.batches).sum();
        let writers_cpu: Duration = results.iter().map(|r| r.cpu).sum();
        let server = match (&server_before, &server_after) {
            (Some(before), Some(after)) => format!(
                "{:.2} cores",
                server_cpu_used(before, after).as_secs_f64() / seconds
            ),
            _ => "n/a (server not on this machine)".to_owned(),
        };
        let machine = match (machine_before, machine_after) {
            (Some((busy0, total0)), Some((busy1, total1))) => format!(
                "{:.0}%",
                100.0 * (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64
            ),
            _ => "n/a".to_owned(),
        };
        println!(
            "scale: {:<30} {} processes × {} keys: {:>9.0} puts/s acknowledged, {:>7.0} rows/s \
             persisted, {:>6.0} batches/s ({:.0} rows each); put p50 {:?}, p99 {:?}, max {:?}; \
             CPU: server {server}, writers {:.2} cores, machine {machine} busy; table: HOT {:.0}%, \
             {} kB",
            configuration.name,
            self.processes,
            self.keys,
            puts as f64 / seconds,
            rows as f64 / seconds,
            batches as f64 / seconds,
            rows as f64 / batches.max(1) as f64,
            latencies.percentile(0.50),
            latencies.percentile(0.99),
            Duration::from_nanos(latencies.max_nanos),
            writers_cpu.as_secs_f64() / seconds,
            100.0 * hot_ratio,
            size / 1024,
        );
    }
}

/// HOT-update ratio and heap size of `table`, once the writers' backends
/// have exited (a backend reports its statistics as it exits).
async fn table_health_after_writers(url: &str, table: &str) -> (f64, i64) {
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (others,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
               AND backend_type = 'client backend'",
        )
        .fetch_one(&mut conn)
        .await
        .expect("pg_stat_activity");
        if others == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    common::table_health(&mut conn, table).await
}

/// The postmaster of the server behind `url`, when it runs on this machine:
/// the parent of this connection's backend.
async fn local_postmaster(url: &str) -> Option<u32> {
    let mut conn = sqlx::PgConnection::connect(url).await.ok()?;
    let (backend,): (i32,) = sqlx::query_as("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .ok()?;
    let postmaster = parent_pid(backend as u32)?;
    // A backend of another server with the same pid would have another
    // parent; check that this one is a postgres process.
    let name = std::fs::read_to_string(format!("/proc/{postmaster}/comm")).ok()?;
    name.trim().starts_with("postgres").then_some(postmaster)
}

fn main() {
    let runtime = common::runtime();
    if let Ok(args) = std::env::var(CHILD) {
        let words: Vec<&str> = args.split(' ').collect();
        let durability = match words[3] {
            "group_commit" => Durability::GroupCommit,
            "write_behind" => Durability::WriteBehind,
            _ => Durability::WriteThrough,
        };
        runtime.block_on(child(
            &support::database_url(),
            words[0],
            words[1].parse().unwrap(),
            words[2].parse().unwrap(),
            durability,
            words[4] == "true",
        ));
        return;
    }
    let full = common::full_run();
    let url = support::database_url();
    runtime.block_on(async {
        let scale = Scale {
            postmaster: local_postmaster(&url).await,
            url: url.clone(),
            processes: if full { 8 } else { 2 },
            keys: if full { 1_000 } else { 50 },
            window: Duration::from_secs(if full { 10 } else { 1 }),
        };
        for configuration in CONFIGURATIONS {
            scale.run(configuration).await;
        }
    });
}
