//! What a user sees: wall time of one `faucet_core::Pipeline` run of 10,000
//! pages, checkpointing after every page, with each state store.
//!
//! ```text
//! cargo bench --bench pipeline
//! ```
//!
//! The source and the sink live in memory, so the time is the pipeline's
//! own work plus one bookmark `put` per page (and one `get` at the start):
//! the difference between the lines is the state store's. The plain store
//! with default options is the `faucet` CLI's case; "(messages)" pins one
//! message per call (`with_prepared_statements(false)`), the form a store
//! behind a transaction pooler sends. Under
//! `cargo test --benches` it runs 200 pages, as a smoke test.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faucet_core::state::StateStore;
use faucet_core::{FaucetError, Pipeline, Sink, Source, Stream, StreamPage, async_trait};
use faucet_state_postgres::{CacheOptions, Durability, PostgresStateStore};
use serde_json::{Value, json};

const RECORDS_PER_PAGE: u64 = 10;

/// Emits `pages` pages of small records, each page with its CDC-like bookmark.
struct MemorySource {
    pages: u64,
}

fn page(n: u64) -> StreamPage {
    StreamPage {
        records: (0..RECORDS_PER_PAGE)
            .map(|i| json!({"id": n * RECORDS_PER_PAGE + i}))
            .collect(),
        bookmark: Some(json!({"lsn": format!("0/{:08X}", n * 4096), "page": n})),
    }
}

#[async_trait]
impl Source for MemorySource {
    async fn fetch_with_context(
        &self,
        _context: &HashMap<String, Value>,
    ) -> Result<Vec<Value>, FaucetError> {
        Ok((1..=self.pages).flat_map(|n| page(n).records).collect())
    }

    fn stream_pages<'a>(
        &'a self,
        _context: &'a HashMap<String, Value>,
        _batch_size: usize,
    ) -> Pin<Box<dyn Stream<Item = Result<StreamPage, FaucetError>> + Send + 'a>> {
        let pages = self.pages;
        Box::pin(faucet_core::async_stream::stream! {
            for n in 1..=pages {
                yield Ok(page(n));
            }
        })
    }

    fn state_key(&self) -> Option<String> {
        Some("bench:pipeline".to_owned())
    }

    async fn apply_start_bookmark(&self, _bookmark: Value) -> Result<(), FaucetError> {
        Ok(())
    }
}

/// Counts what it is given.
#[derive(Default)]
struct MemorySink {
    records: AtomicU64,
}

#[async_trait]
impl Sink for MemorySink {
    async fn write_batch(&self, records: &[Value]) -> Result<usize, FaucetError> {
        self.records
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(records.len())
    }
}

async fn run(pages: u64, store: Arc<dyn StateStore>) -> Duration {
    let source = MemorySource { pages };
    let sink = MemorySink::default();
    let started = Instant::now();
    let result = Pipeline::new(&source, &sink)
        .with_name("bench")
        .with_state_store(store.clone())
        .run()
        .await
        .expect("pipeline run");
    let elapsed = started.elapsed();
    assert_eq!(result.records_written as u64, pages * RECORDS_PER_PAGE);
    assert_eq!(
        store
            .get("bench:pipeline")
            .await
            .expect("get")
            .expect("a stored bookmark"),
        page(pages).bookmark.expect("bookmark")
    );
    elapsed
}

/// The plain store as the `faucet` CLI opens it (`connect_with` and
/// `ensure_table`, default options), or pinned to one message per call.
async fn plain(url: &str, tag: &str, messages: bool) -> PostgresStateStore {
    let mut store = PostgresStateStore::connect_with(url, 5, &support::unique_table(tag))
        .await
        .expect("connect");
    if messages {
        store = store.with_prepared_statements(false);
    }
    store.ensure_table().await.expect("table");
    store
}

fn main() {
    let pages: u64 = if common::full_run() { 10_000 } else { 200 };
    let url = support::database_url();
    let rt = common::runtime();
    rt.block_on(async {
        println!(
            "pipeline: {pages} pages of {RECORDS_PER_PAGE} records, a bookmark put after each"
        );
        let upstream = run(
            pages,
            Arc::new(common::upstream_store(&url, "pipeline_upstream").await),
        )
        .await;
        let line = |name: &str, elapsed: Duration| {
            println!(
                "pipeline: {name:<32} {elapsed:>10.2?}  ({:.1}x faster than 1.0.1)",
                upstream.as_secs_f64() / elapsed.as_secs_f64()
            );
        };
        line("upstream_1_0_1", upstream);
        // The plain store behind PgBouncer in transaction mode, where it
        // sends messages (1.0.1 cannot run there: it prepares statements).
        if let Some(bouncer) = support::pgbouncer_url() {
            let store = plain(&bouncer, "pipeline_pgbouncer", false).await;
            assert!(!store.prepared_statements(), "PgBouncer is found out");
            line("plain via PgBouncer", run(pages, Arc::new(store)).await);
        }
        for messages in [false, true] {
            let suffix = if messages { " (messages)" } else { "" };
            line(
                &format!("plain{suffix}"),
                run(
                    pages,
                    Arc::new(plain(&url, "pipeline_plain", messages).await),
                )
                .await,
            );
            for (mode, durability) in [
                ("write_through", Durability::WriteThrough),
                ("group_commit", Durability::GroupCommit),
                ("write_behind", Durability::WriteBehind),
            ] {
                let store = Arc::new(
                    plain(&url, mode, messages)
                        .await
                        .cached(CacheOptions::new().durability(durability))
                        .expect("cached store"),
                );
                let elapsed = run(pages, store.clone()).await;
                store.shutdown().await.expect("shutdown");
                line(&format!("{mode}{suffix}"), elapsed);
            }
        }
    });
}
