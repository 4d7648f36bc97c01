//! The README's quick start: a plain `PostgresStateStore` used end to end,
//! first directly, then as the state store of a `faucet_core::Pipeline` that
//! resumes from its stored bookmark.
//!
//! Runs against `DATABASE_URL` when set, otherwise against a throwaway
//! PostgreSQL started from the local binaries and removed afterwards:
//!
//! ```text
//! cargo run --example quickstart
//! ```

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use faucet_core::check::CheckContext;
use faucet_core::state::StateStore;
use faucet_core::{FaucetError, Pipeline, Sink, Source, async_trait};
use faucet_state_postgres::PostgresStateStore;
use serde_json::{Value, json};

/// A source of numbered events that resumes after the last id it was given.
struct Events {
    available: u64,
    resume_after: Mutex<u64>,
}

#[async_trait]
impl Source for Events {
    async fn fetch_with_context(
        &self,
        context: &HashMap<String, Value>,
    ) -> Result<Vec<Value>, FaucetError> {
        Ok(self.fetch_with_context_incremental(context).await?.0)
    }

    async fn fetch_with_context_incremental(
        &self,
        _context: &HashMap<String, Value>,
    ) -> Result<(Vec<Value>, Option<Value>), FaucetError> {
        let after = *self.resume_after.lock().unwrap();
        let records: Vec<Value> = (after + 1..=self.available)
            .map(|id| json!({"id": id, "event": format!("event-{id}")}))
            .collect();
        Ok((records, Some(json!({"last_id": self.available}))))
    }

    fn state_key(&self) -> Option<String> {
        Some("quickstart:events".to_owned())
    }

    async fn apply_start_bookmark(&self, bookmark: Value) -> Result<(), FaucetError> {
        *self.resume_after.lock().unwrap() = bookmark["last_id"].as_u64().unwrap_or(0);
        Ok(())
    }
}

/// A sink that prints what it receives.
struct Printer;

#[async_trait]
impl Sink for Printer {
    async fn write_batch(&self, records: &[Value]) -> Result<usize, FaucetError> {
        let ids: Vec<u64> = records.iter().filter_map(|r| r["id"].as_u64()).collect();
        println!("  sink wrote {} records: ids {ids:?}", records.len());
        Ok(records.len())
    }
}

#[tokio::main]
async fn main() -> Result<(), FaucetError> {
    let url = support::database_url();
    println!("PostgreSQL at {}", faucet_state_postgres::redact_url(&url));

    // The plain API: a pool of 5 and the table `faucet_state`.
    let store = PostgresStateStore::connect(&url).await?;
    store.ensure_table().await?;
    store.delete_many(&["quickstart:events"]).await?; // start the demo fresh

    store.put("demo:cursor", &json!({"page": 1})).await?;
    store.put("demo:cursor", &json!({"page": 2})).await?;
    println!(
        "get demo:cursor -> {}",
        show(store.get("demo:cursor").await?)
    );
    store
        .put_many(&[("demo:a", json!(1)), ("demo:b", json!(2))])
        .await?;
    println!("list demo: -> {:?}", store.list("demo:").await?);
    store
        .delete_many(&["demo:cursor", "demo:a", "demo:b"])
        .await?;

    let report = store.check(&CheckContext::default()).await?;
    for probe in &report.probes {
        println!("check {:<8} {:?}", probe.name, probe.status);
    }

    // The same store behind a pipeline: the bookmark survives between runs.
    let store: Arc<dyn StateStore> = Arc::new(store);
    for (run, available) in [(1, 5), (2, 8)] {
        let source = Events {
            available,
            resume_after: Mutex::new(0),
        };
        println!("run {run}: the source has events 1..={available}");
        let result = Pipeline::new(&source, &Printer)
            .with_state_store(store.clone())
            .run()
            .await?;
        println!(
            "run {run}: wrote {} records, stored bookmark {}",
            result.records_written,
            show(store.get("quickstart:events").await?)
        );
    }
    Ok(())
}

fn show(value: Option<Value>) -> String {
    value.map_or_else(|| "(none)".to_owned(), |v| v.to_string())
}
