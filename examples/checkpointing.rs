//! A busy faucet-stream pipeline checkpointing through the write-behind store.
//!
//! A source emits pages of events, each page carrying its bookmark (as a CDC
//! source does); a sink inserts the events into a PostgreSQL table. The first
//! run is stopped part way, as a deploy or a crash would; the second run, with
//! a new store as after a restart, resumes from the stored bookmark. At the
//! end the example checks that the bookmark matches the last page the sink
//! confirmed and that every event landed exactly once.
//!
//! ```text
//! cargo run --example checkpointing
//! ```
//!
//! Uses `DATABASE_URL` when set, otherwise a throwaway PostgreSQL started from
//! the local binaries and removed afterwards. It drops and recreates the
//! tables `checkpointing_events` and `checkpointing_state` in that database.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use faucet_core::state::StateStore;
use faucet_core::{
    CancellationToken, FaucetError, Pipeline, Sink, Source, Stream, StreamPage, async_trait,
};
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, PostgresStateStore};
use serde_json::{Value, json};
use sqlx::PgPool;

const PAGES: u64 = 400;
const RECORDS_PER_PAGE: u64 = 25;
const STOP_FIRST_RUN_AFTER: u64 = 150;
const STATE_KEY: &str = "checkpointing:events";

/// Emits pages of events, each with the bookmark `{"page": n, "last_id": id}`,
/// starting after the page of the bookmark it is given.
struct EventSource {
    resume_after_page: AtomicU64,
}

impl EventSource {
    fn page(page: u64) -> StreamPage {
        let first = (page - 1) * RECORDS_PER_PAGE + 1;
        let records = (first..first + RECORDS_PER_PAGE)
            .map(|id| json!({"id": id, "page": page, "kind": "order_updated"}))
            .collect();
        StreamPage {
            records,
            bookmark: Some(json!({"page": page, "last_id": first + RECORDS_PER_PAGE - 1})),
        }
    }
}

#[async_trait]
impl Source for EventSource {
    async fn fetch_with_context(
        &self,
        _context: &HashMap<String, Value>,
    ) -> Result<Vec<Value>, FaucetError> {
        let start = self.resume_after_page.load(Ordering::SeqCst) + 1;
        Ok((start..=PAGES)
            .flat_map(|p| Self::page(p).records)
            .collect())
    }

    fn stream_pages<'a>(
        &'a self,
        _context: &'a HashMap<String, Value>,
        _batch_size: usize,
    ) -> Pin<Box<dyn Stream<Item = Result<StreamPage, FaucetError>> + Send + 'a>> {
        let start = self.resume_after_page.load(Ordering::SeqCst) + 1;
        Box::pin(faucet_core::async_stream::stream! {
            for page in start..=PAGES {
                yield Ok(Self::page(page));
            }
        })
    }

    fn state_key(&self) -> Option<String> {
        Some(STATE_KEY.to_owned())
    }

    async fn apply_start_bookmark(&self, bookmark: Value) -> Result<(), FaucetError> {
        let page = bookmark["page"].as_u64().ok_or_else(|| {
            FaucetError::State(format!("bookmark without a page number: {bookmark}"))
        })?;
        self.resume_after_page.store(page, Ordering::SeqCst);
        Ok(())
    }
}

/// Inserts events into `checkpointing_events`, idempotently, and stops the
/// run (through the cancellation token) after a given number of pages.
struct EventTable {
    pool: PgPool,
    run: u32,
    pages_written: AtomicU64,
    last_confirmed_page: AtomicU64,
    stop_after_pages: Option<u64>,
    cancel: CancellationToken,
}

#[async_trait]
impl Sink for EventTable {
    async fn write_batch(&self, records: &[Value]) -> Result<usize, FaucetError> {
        let ids: Vec<i64> = records.iter().filter_map(|r| r["id"].as_i64()).collect();
        let payloads: Vec<String> = records.iter().map(Value::to_string).collect();
        sqlx::query(
            "INSERT INTO checkpointing_events (id, payload) \
             SELECT id, payload::jsonb FROM UNNEST($1::bigint[], $2::text[]) AS e(id, payload) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&payloads)
        .execute(&self.pool)
        .await
        .map_err(|e| FaucetError::Sink(format!("inserting events: {e}")))?;
        let page = records
            .first()
            .and_then(|r| r["page"].as_u64())
            .unwrap_or(0);
        self.last_confirmed_page.store(page, Ordering::SeqCst);
        let written = self.pages_written.fetch_add(1, Ordering::SeqCst) + 1;
        if written.is_multiple_of(50) {
            println!(
                "  run {}: {written} pages written, last page {page}",
                self.run
            );
        }
        if self.stop_after_pages == Some(written) {
            println!(
                "  run {}: stopping here, as a deploy or a crash would",
                self.run
            );
            self.cancel.cancel();
        }
        Ok(records.len())
    }
}

async fn state_store(url: &str, table: &str) -> Result<Arc<CachedStateStore>, FaucetError> {
    let plain = PostgresStateStore::connect_with(url, 2, table).await?;
    plain.ensure_table().await?;
    Ok(Arc::new(
        plain.cached(
            CacheOptions::new()
                .durability(Durability::WriteBehind)
                .flush_interval(Duration::from_millis(200)),
        )?,
    ))
}

async fn run(
    url: &str,
    pool: &PgPool,
    run: u32,
    stop_after_pages: Option<u64>,
) -> Result<(u64, u64), FaucetError> {
    let store = state_store(url, "checkpointing_state").await?;
    let resume = store.get(STATE_KEY).await?;
    println!(
        "run {run}: stored bookmark {}",
        resume.as_ref().map_or(
            "(none, starting from the beginning)".to_owned(),
            Value::to_string
        )
    );
    let source = EventSource {
        resume_after_page: AtomicU64::new(0),
    };
    let cancel = CancellationToken::new();
    let sink = EventTable {
        pool: pool.clone(),
        run,
        pages_written: AtomicU64::new(0),
        last_confirmed_page: AtomicU64::new(0),
        stop_after_pages,
        cancel: cancel.clone(),
    };
    let started = Instant::now();
    let result = Pipeline::new(&source, &sink)
        .with_name("checkpointing")
        .with_state_store(store.clone())
        .with_cancel(cancel)
        .run()
        .await?;
    let elapsed = started.elapsed();
    // Persist the last bookmarks before this "process" ends.
    store.shutdown().await?;
    let stats = store.stats();
    let pages = sink.pages_written.load(Ordering::SeqCst);
    println!(
        "run {run}: {pages} pages, {} records in {elapsed:.2?}; {} bookmark puts ({} coalesced in memory), {} batches flushed",
        result.records_written, stats.puts, stats.coalesced_puts, stats.batches_written
    );
    println!(
        "run {run}: final bookmark {}",
        result
            .bookmark
            .as_ref()
            .map_or("(none)".to_owned(), Value::to_string)
    );
    Ok((pages, sink.last_confirmed_page.load(Ordering::SeqCst)))
}

#[tokio::main]
async fn main() -> Result<(), FaucetError> {
    let url = support::database_url();
    println!("PostgreSQL at {}", faucet_state_postgres::redact_url(&url));
    let pool = PgPool::connect(&url)
        .await
        .map_err(|e| FaucetError::Sink(format!("connecting the sink: {e}")))?;
    for statement in [
        "DROP TABLE IF EXISTS checkpointing_events, checkpointing_state",
        "CREATE TABLE checkpointing_events (id BIGINT PRIMARY KEY, payload JSONB NOT NULL)",
    ] {
        sqlx::query(statement)
            .execute(&pool)
            .await
            .map_err(|e| FaucetError::Sink(format!("preparing the sink table: {e}")))?;
    }

    let (first_pages, _) = run(&url, &pool, 1, Some(STOP_FIRST_RUN_AFTER)).await?;
    let (second_pages, last_page) = run(&url, &pool, 2, None).await?;

    // A fresh plain store reads what is durable in the table.
    let plain = PostgresStateStore::connect_with(&url, 1, "checkpointing_state").await?;
    let stored = plain.get(STATE_KEY).await?;
    let (events, distinct, max_id): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT id), coalesce(max(id), 0) FROM checkpointing_events",
    )
    .fetch_one(&pool)
    .await
    .map_err(|e| FaucetError::Sink(format!("reading the sink table: {e}")))?;
    println!(
        "summary: {} pages ({first_pages} + {second_pages}), {events} events stored ({distinct} distinct, last id {max_id}), stored bookmark {}",
        first_pages + second_pages,
        stored
            .as_ref()
            .map_or("(none)".to_owned(), Value::to_string)
    );
    let expected = json!({"page": last_page, "last_id": last_page * RECORDS_PER_PAGE});
    if stored.as_ref() != Some(&expected)
        || events != distinct
        || max_id as u64 != PAGES * RECORDS_PER_PAGE
    {
        return Err(FaucetError::State(format!(
            "the stored bookmark {stored:?} does not match the last confirmed page {expected}, or events are missing"
        )));
    }
    println!(
        "ok: the stored bookmark matches the last page the sink confirmed (page {last_page}), and the second run resumed after page {STOP_FIRST_RUN_AFTER}"
    );
    Ok(())
}
