//! What every benchmark shares: how a full run is told from a smoke test,
//! the runtime, the published crate they are measured against, the wall
//! clock processes compare, and a table's health afterwards.

// Each benchmark uses only part of this module.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use tokio::runtime::Runtime;

/// `cargo bench` passes `--bench`; `cargo test --benches` does not, and then
/// every benchmark runs briefly, as a smoke test.
pub fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// Two worker threads, like the machine the README's figures come from.
pub fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// The published faucet-state-postgres 1.0.1 with its defaults (a pool of 5
/// that pings on every acquire), on a table of its own.
pub async fn upstream_store(url: &str, tag: &str) -> upstream::PostgresStateStore {
    let store =
        upstream::PostgresStateStore::connect_with(url, 5, &crate::support::unique_table(tag))
            .await
            .expect("connect upstream 1.0.1");
    store.ensure_table().await.expect("upstream table");
    store
}

/// Microseconds since the Unix epoch: the clock a benchmark and its child
/// processes on this machine agree on.
pub fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
}

/// HOT-update ratio and heap size of `table`, from `pg_stat_user_tables`.
/// Backends report their statistics as they exit: end the writers'
/// connections before asking.
pub async fn table_health(conn: &mut sqlx::PgConnection, table: &str) -> (f64, i64) {
    let (updates, hot, size): (i64, i64, i64) = sqlx::query_as(
        "SELECT n_tup_upd, n_tup_hot_upd, pg_table_size(relid) \
         FROM pg_stat_user_tables WHERE relname = $1",
    )
    .bind(table)
    .fetch_one(conn)
    .await
    .expect("table statistics");
    (hot as f64 / updates.max(1) as f64, size)
}
