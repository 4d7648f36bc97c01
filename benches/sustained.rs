//! Sustained writes over many distinct keys: the write-behind store under
//! back-pressure against the server's own limit for the same rows, measured
//! side by side in one run, and the table's health afterwards.
//!
//! ```text
//! cargo bench --bench sustained     # 1,000,000 keys, about 4 minutes
//! ```
//!
//! Under `cargo test --benches` it runs with 20,000 keys, as a smoke test.
//!
//! Every subject writes the same keys (`k0` … `k{N-1}`) with a bookmark of
//! the same size, twice: an insert pass, then an update pass (the steady
//! state of a pipeline). Rows per second are keys written divided by the
//! time from the first write to the last commit (`flush()` for the
//! write-behind store); for `put_many` and the bare sqlx loop, by the time
//! inside the calls (building the batches is the caller's work, and
//! pgbench has none). The subjects:
//!
//! - `write_behind`: `put` from one task, default options (`max_pending`
//!   100,000, fewer than the keys, so back-pressure engages); `put` latency
//!   p50/p99/max of the update pass. Default (on this direct connection,
//!   prepared statements) and pinned to one message per call
//!   (`with_prepared_statements(false)`, the form behind a transaction
//!   pooler).
//! - `put_many`: 1,000-key batches of the plain store, default and messages.
//! - `sqlx`: a bare sqlx loop of the same 1,000-row `UNNEST` upsert,
//!   prepared, on one connection.
//! - `pgbench`: PostgreSQL's own client, `-M prepared`, one client, the same
//!   1,000-row upsert, keys computed from a random batch number and the
//!   values as one `text[]` parameter: the server's limit for these rows.
//! - `upstream_1_0_1`: the published faucet-state-postgres 1.0.1, `put` in a
//!   loop, over the first 20,000 keys only (it would take minutes).
//!
//! After each write-behind run it reports the table's HOT-update ratio and
//! heap size (`pg_stat_user_tables`, `pg_table_size`), at the default
//! fillfactor and at the one `ensure_table` uses.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, Durability, PostgresStateStore};
use serde_json::{Value, json};
use sqlx::Connection;

const BATCH: usize = 1_000;
const UPSTREAM_KEYS: usize = 20_000;

fn key(i: usize) -> String {
    format!("k{i}")
}

fn bookmark(i: usize, pass: usize) -> Value {
    json!({"lsn": format!("0/{:08X}", i * 4096 + pass), "ts": 1_764_000_000 + i})
}

struct Bench {
    url: String,
    keys: usize,
}

/// Throughput of one pass, and `put` latencies when measured.
struct Pass {
    rows_per_sec: f64,
    latencies: Vec<Duration>,
}

impl Bench {
    /// A plain store on a table of its own (see `on_table`).
    async fn plain(
        &self,
        tag: &str,
        messages: bool,
        fillfactor: Option<u32>,
    ) -> PostgresStateStore {
        let store = self.on_table(&support::unique_table(tag), messages).await;
        store.ensure_table().await.expect("table");
        if let Some(fillfactor) = fillfactor {
            sqlx::raw_sql(&format!(
                "ALTER TABLE \"{}\" SET (fillfactor = {fillfactor})",
                store.table()
            ))
            .execute(store.pool())
            .await
            .expect("set fillfactor");
        }
        store
    }

    /// A plain store on `table` with default options, or pinned to one
    /// message per call (`messages`).
    async fn on_table(&self, table: &str, messages: bool) -> PostgresStateStore {
        let store = PostgresStateStore::connect_with(&self.url, 5, table)
            .await
            .expect("connect");
        if messages {
            store.with_prepared_statements(false)
        } else {
            store
        }
    }

    /// Writes every dirty page out now, so that the next pass starts where
    /// every other one did. Needs a superuser (the throwaway server's);
    /// skipped quietly elsewhere.
    async fn checkpoint(&self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&self.url).await {
            let _ = sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await;
            let _ = conn.close().await;
        }
    }

    /// One pass through a write-behind store on `plain`'s table; returns a
    /// plain store on the same table for the next pass.
    async fn write_behind(
        &self,
        plain: PostgresStateStore,
        pass: usize,
    ) -> (Pass, PostgresStateStore) {
        let backend =
            PostgresStateStore::from_pool(plain.pool().clone(), plain.table()).expect("table name");
        let store = plain
            .cached(CacheOptions::new().durability(Durability::WriteBehind))
            .expect("cached store");
        let mut latencies = Vec::with_capacity(self.keys);
        let values: Vec<Value> = (0..BATCH).map(|i| bookmark(i, pass)).collect();
        let keys: Vec<String> = (0..self.keys).map(key).collect();
        let started = Instant::now();
        for (i, key) in keys.iter().enumerate() {
            let put_started = Instant::now();
            store.put(key, &values[i % BATCH]).await.expect("put");
            latencies.push(put_started.elapsed());
        }
        store.flush().await.expect("flush");
        let elapsed = started.elapsed();
        store.shutdown().await.expect("shutdown");
        let pass = Pass {
            rows_per_sec: self.keys as f64 / elapsed.as_secs_f64(),
            latencies,
        };
        (pass, backend)
    }

    /// Only the calls are timed: the caller's building of each batch (keys
    /// and bookmarks) is not the store's work, and pgbench has none.
    async fn put_many(&self, store: &PostgresStateStore, pass: usize) -> Pass {
        let mut in_calls = Duration::ZERO;
        for start in (0..self.keys).step_by(BATCH) {
            let batch: Vec<(String, Value)> = (start..(start + BATCH).min(self.keys))
                .map(|i| (key(i), bookmark(i % BATCH, pass)))
                .collect();
            let started = Instant::now();
            store.put_many(&batch).await.expect("put_many");
            in_calls += started.elapsed();
        }
        self.rate_over(in_calls)
    }

    /// Timed like `put_many`: the statement, its arguments' encoding
    /// included, not the building of the batch.
    async fn bare_sqlx(&self, table: &str, pass: usize) -> Pass {
        let mut conn = sqlx::PgConnection::connect(&self.url)
            .await
            .expect("connect");
        let sql = upsert_sql(table);
        let mut in_calls = Duration::ZERO;
        for start in (0..self.keys).step_by(BATCH) {
            let range = start..(start + BATCH).min(self.keys);
            let keys: Vec<String> = range.clone().map(key).collect();
            let values: Vec<Value> = range.map(|i| bookmark(i % BATCH, pass)).collect();
            let started = Instant::now();
            let values: Vec<String> = values.iter().map(Value::to_string).collect();
            sqlx::query(&sql)
                .bind(keys)
                .bind(values)
                .execute(&mut conn)
                .await
                .expect("bare upsert");
            in_calls += started.elapsed();
        }
        self.rate_over(in_calls)
    }

    async fn upstream(&self) -> Pass {
        let keys = UPSTREAM_KEYS.min(self.keys);
        let store = common::upstream_store(&self.url, "sustained_upstream").await;
        let started = Instant::now();
        for i in 0..keys {
            store
                .put(&key(i), &bookmark(i % BATCH, 0))
                .await
                .expect("put");
        }
        Pass {
            rows_per_sec: keys as f64 / started.elapsed().as_secs_f64(),
            latencies: Vec::new(),
        }
    }

    fn rate_over(&self, elapsed: Duration) -> Pass {
        Pass {
            rows_per_sec: self.keys as f64 / elapsed.as_secs_f64(),
            latencies: Vec::new(),
        }
    }

    /// pgbench running the same upsert: the server's own limit.
    fn pgbench(&self, table: &str) -> Option<f64> {
        let pgbench = support::pgbench()?;
        let script = std::env::temp_dir().join(format!("fsp-pgbench-{}.sql", std::process::id()));
        let batches = self.keys / BATCH;
        std::fs::write(
            &script,
            format!(
                "\\set b random(0, {last})\n\
                 INSERT INTO \"{table}\" (key, value) \
                 SELECT 'k' || (:b * {BATCH} + n - 1), v::jsonb \
                 FROM unnest(:values::text[]) WITH ORDINALITY AS batch(v, n) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = NOW();\n",
                last = batches - 1
            ),
        )
        .ok()?;
        let values = format!(
            "{{{}}}",
            (0..BATCH)
                .map(|i| format!("\"{}\"", bookmark(i, 1).to_string().replace('"', "\\\"")))
                .collect::<Vec<_>>()
                .join(",")
        );
        let out = Command::new(pgbench)
            .args(["-n", "-M", "prepared", "-c", "1", "-t"])
            .arg(batches.to_string())
            .arg("-f")
            .arg(&script)
            .arg("-D")
            .arg(format!("values={values}"))
            .arg(&self.url)
            .output()
            .ok()?;
        let _ = std::fs::remove_file(&script);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let tps: f64 = stdout
            .lines()
            .find(|l| l.starts_with("tps = "))?
            .split_whitespace()
            .nth(2)?
            .parse()
            .ok()?;
        Some(tps * BATCH as f64)
    }
}

fn upsert_sql(table: &str) -> String {
    format!(
        "INSERT INTO \"{table}\" (key, value) SELECT k, v::jsonb \
         FROM UNNEST($1::text[], $2::text[]) AS batch(k, v) \
         ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = NOW()"
    )
}

/// HOT-update ratio and heap size of `store`'s table. Closing the pool that
/// wrote ends its server backends, which report their pending statistics as
/// they exit (an idle backend may otherwise hold them for 10 s).
async fn table_health(url: &str, store: PostgresStateStore) -> (f64, i64) {
    store.pool().close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    common::table_health(&mut conn, store.table()).await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn report(name: &str, pass: &Pass, upstream: f64, limit: Option<f64>) {
    let vs_limit = limit.map_or(String::new(), |l| {
        format!(", {:.2}x pgbench", pass.rows_per_sec / l)
    });
    println!(
        "sustained: {name:<34} {:>9.0} rows/s  ({:.1}x 1.0.1{vs_limit})",
        pass.rows_per_sec,
        pass.rows_per_sec / upstream
    );
    if !pass.latencies.is_empty() {
        let mut sorted = pass.latencies.clone();
        sorted.sort_unstable();
        println!(
            "sustained: {name:<34} put latency p50 {:?}, p99 {:?}, max {:?}",
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.99),
            sorted[sorted.len() - 1]
        );
    }
}

fn main() {
    let bench = Bench {
        url: support::database_url(),
        keys: if common::full_run() {
            1_000_000
        } else {
            20_000
        },
    };
    let rt = common::runtime();
    rt.block_on(async {
        println!(
            "sustained: {} distinct keys, {BATCH}-row batches, insert pass then update pass",
            bench.keys
        );
        let upstream = bench.upstream().await;
        report(
            "upstream_1_0_1 put (first 20,000)",
            &upstream,
            upstream.rows_per_sec,
            None,
        );
        let upstream = upstream.rows_per_sec;

        // The server's limit and the one-statement batches, on the same
        // table and rows: pgbench, the bare sqlx loop and `put_many` in
        // both forms take turns, round after round, each pass right after
        // a checkpoint (so that none gets a checkpoint's full-page writes
        // that another was spared), each ratio against its round's pgbench.
        let target = bench.plain("sustained_pgbench", false, None).await;
        let _ = bench.bare_sqlx(target.table(), 0).await;
        let default_form = bench.on_table(target.table(), false).await;
        let messages = bench.on_table(target.table(), true).await;
        let rounds = if common::full_run() { 2 } else { 1 };
        let mut last_limit = None;
        for round in 1..=rounds {
            bench.checkpoint().await;
            let limit = bench.pgbench(target.table());
            last_limit = limit;
            match limit {
                Some(rows) => println!(
                    "sustained: {:<34} {rows:>9.0} rows/s  (the server's limit)",
                    format!("round {round}: pgbench -M prepared, 1 client")
                ),
                None => println!("sustained: pgbench not found or failed; no server-limit line"),
            }
            bench.checkpoint().await;
            let bare = bench.bare_sqlx(target.table(), round).await;
            report(
                &format!("round {round}: bare sqlx loop, update pass"),
                &bare,
                upstream,
                limit,
            );
            for (mode, store) in [("default", &default_form), ("messages", &messages)] {
                bench.checkpoint().await;
                let pass = bench.put_many(store, round).await;
                report(
                    &format!("round {round}: put_many ({mode}), update pass"),
                    &pass,
                    upstream,
                    limit,
                );
            }
        }
        drop((default_form, messages));
        // The write-behind passes below are compared with the last round's.
        let limit = last_limit;

        for (messages, fillfactor) in [(true, 100), (false, 100), (false, 80)] {
            let ff = format!(", fillfactor {fillfactor}");
            let mode = format!("{}{ff}", if messages { "messages" } else { "default" });
            let plain = bench
                .plain("sustained_wb", messages, Some(fillfactor))
                .await;
            // The next pass's store is built on this one's pool, which
            // cannot tell its endpoint: it gets the form this one chose.
            let prepared = plain.prepared_statements();
            let (insert, table) = bench.write_behind(plain, 0).await;
            report(
                &format!("write_behind ({mode}), insert pass"),
                &insert,
                upstream,
                limit,
            );
            let (update, backend) = bench
                .write_behind(table.with_prepared_statements(prepared), 1)
                .await;
            report(
                &format!("write_behind ({mode}), update pass"),
                &update,
                upstream,
                limit,
            );
            let (hot, size) = table_health(&bench.url, backend).await;
            println!(
                "sustained: {:<34} HOT updates {:.0}%, heap {:.1} MiB",
                format!("write_behind ({mode}) table"),
                hot * 100.0,
                size as f64 / (1024.0 * 1024.0)
            );
        }
    });
}
