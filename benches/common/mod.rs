//! What every benchmark shares: how a full run is told from a smoke test,
//! the runtime, and the published crate they are measured against.

// Each benchmark uses only part of this module.
#![allow(dead_code)]

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
