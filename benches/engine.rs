//! The write-behind engine's own share of a group-commit round, without a
//! server: group-commit writers over [`MemoryBackend`], whose batch write
//! takes at least a fixed delay standing in for the statement and its
//! commit (tokio's timer works in whole milliseconds: a 1 ms delay takes
//! about 2 ms).
//!
//! ```text
//! cargo bench --bench engine
//! ```
//!
//! For each number of writers (each a task putting its own key in a loop,
//! every `put` durable on return), it prints puts/s, keys per batch, and a
//! batch's wall time split into the time inside `write_batch` (the backend)
//! and the rest: waking the writers, their next `put`, and building the next
//! batch. That rest is what the engine adds to every round against
//! PostgreSQL too. With a delay the process goes idle while a batch is in
//! flight, as it does waiting for the server, and its threads must wake up
//! again; with none they stay busy. Under `cargo test --benches` it runs
//! briefly, as a smoke test.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
use serde_json::{Value, json};

/// One measured configuration: `writers` tasks, each batch write taking
/// `delay` in the backend.
async fn measure(writers: usize, delay: Duration, run_for: Duration) {
    let backend = Arc::new(MemoryBackend::new());
    backend.set_write_delay(delay);
    let options = CacheOptions::new().durability(Durability::GroupCommit);
    let store = Arc::new(CachedStateStore::new(backend, options).expect("cached store"));
    // Bookmarks built once: the measurement is the engine's, not json!'s.
    let values: Arc<Vec<Value>> =
        Arc::new((0..64).map(|i| json!({"lsn": i * 4096, "ts": 1})).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let puts = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let (store, values, stop, puts) =
                (store.clone(), values.clone(), stop.clone(), puts.clone());
            tokio::spawn(async move {
                let key = format!("writer-{w}");
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    store
                        .put(&key, &values[i % values.len()])
                        .await
                        .expect("put");
                    puts.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                }
            })
        })
        .collect();
    // Warm up, then measure a fixed wall time.
    tokio::time::sleep(run_for / 4).await;
    let (puts_before, stats_before) = (puts.load(Ordering::Relaxed), store.stats());
    let started = Instant::now();
    tokio::time::sleep(run_for).await;
    let wall = started.elapsed();
    let (puts_after, stats_after) = (puts.load(Ordering::Relaxed), store.stats());
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("writer");
    }
    store.shutdown().await.expect("shutdown");

    let batches = (stats_after.batches_written - stats_before.batches_written).max(1);
    let rows = stats_after.rows_written - stats_before.rows_written;
    let inside = (stats_after.batch_write_time - stats_before.batch_write_time) / batches as u32;
    let per_batch = wall / batches as u32;
    println!(
        "engine: {writers:>3} writers, write_batch delay {delay:>6?}: {:>8.0} puts/s, \
         {:>5.1} keys per batch, {per_batch:>10.2?} per batch = {inside:>10.2?} inside \
         write_batch + {:>9.2?} in the engine",
        (puts_after - puts_before) as f64 / wall.as_secs_f64(),
        rows as f64 / batches as f64,
        per_batch.saturating_sub(inside),
    );
}

fn main() {
    let full = common::full_run();
    let run_for = Duration::from_millis(if full { 3_000 } else { 100 });
    let rt = common::runtime();
    for delay in [Duration::ZERO, Duration::from_millis(1)] {
        for writers in [1, 8, 64] {
            rt.block_on(measure(writers, delay, run_for));
        }
    }
}
