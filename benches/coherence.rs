//! How soon a change committed in one process is read by another process's
//! listening cached store (`listen_for_changes`).
//!
//! ```text
//! cargo bench --bench coherence
//! ```
//!
//! A child process (this binary again) commits 1,000 changes of one key
//! through a plain store, 3 ms apart, printing the wall-clock time at which
//! each `put` returned (committed). This process reads the key through a
//! listening cached store in a loop (a `get` every 100 µs, a cache hit while
//! nothing changed) and notes when each value is first returned. The delay
//! is the difference; both clocks are this machine's. Under
//! `cargo test --benches` it runs 50 changes, as a smoke test.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, PostgresStateStore};
use serde_json::json;

const WRITER: &str = "FAUCET_COHERENCE_WRITER";

/// The child: commits `changes` values of `k`, printing `n micros` after each.
async fn write_changes(url: &str, table: &str, changes: u64) {
    let store = PostgresStateStore::connect_with(url, 2, table)
        .await
        .unwrap();
    for n in 1..=changes {
        store.put("k", &json!(n)).await.unwrap();
        println!("{n} {}", common::wall_micros());
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let runtime = common::runtime();
    if let Ok(table) = std::env::var(WRITER) {
        let changes = std::env::var("FAUCET_COHERENCE_CHANGES")
            .unwrap()
            .parse()
            .unwrap();
        runtime.block_on(write_changes(&support::database_url(), &table, changes));
        return;
    }
    let changes: u64 = if common::full_run() { 1_000 } else { 50 };
    let url = support::database_url();
    let table = support::unique_table("coherence");
    runtime.block_on(async {
        let plain = PostgresStateStore::connect_with(&url, 3, &table)
            .await
            .unwrap();
        plain.ensure_table().await.unwrap();
        plain.ensure_change_notifications().await.unwrap();
        plain.put("k", &json!(0)).await.unwrap();
        let reader = plain
            .cached(CacheOptions::new().listen_for_changes(true))
            .unwrap();
        // Subscribed once a read is served from the cache: wait for it.
        while reader.stats().cache_hits == 0 {
            reader.get("k").await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        let mut writer = Command::new(std::env::current_exe().unwrap())
            .env(WRITER, &table)
            .env("FAUCET_COHERENCE_CHANGES", changes.to_string())
            .env("DATABASE_URL", &url)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = writer.stdout.take().unwrap();
        let committed = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|line| {
                    let (n, at) = line.split_once(' ')?;
                    Some((n.parse::<u64>().ok()?, at.parse::<u64>().ok()?))
                })
                .collect::<HashMap<u64, u64>>()
        });

        let mut seen: HashMap<u64, u64> = HashMap::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut last = 0;
        while last < changes && std::time::Instant::now() < deadline {
            let value = reader.get("k").await.unwrap().and_then(|v| v.as_u64());
            if let Some(n) = value
                && n > last
            {
                let at = common::wall_micros();
                for skipped in last + 1..=n {
                    seen.entry(skipped).or_insert(at);
                }
                last = n;
            }
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        let committed = committed.join().unwrap();
        writer.wait().unwrap();
        reader.shutdown().await.unwrap();

        let mut delays: Vec<u64> = (1..=changes)
            .filter_map(|n| Some(seen.get(&n)?.saturating_sub(*committed.get(&n)?)))
            .collect();
        assert_eq!(delays.len() as u64, changes, "every change was read");
        delays.sort_unstable();
        println!(
            "coherence: {changes} changes committed in another process; delay until a listening \
             store's get returned them: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&delays, 0.50) as f64 / 1000.0,
            percentile(&delays, 0.99) as f64 / 1000.0,
            *delays.last().unwrap() as f64 / 1000.0,
        );
    });
}
