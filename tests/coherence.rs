//! Coherent caches across writers, against a real PostgreSQL: a change made
//! by another store, an operator's SQL, a delete or a truncate reaches a
//! listening store's reads; its own pending writes are never hidden; a lost
//! listening connection never leaves a stale entry behind.

mod support;

use std::time::Duration;

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, PostgresStateStore};
use serde_json::{Value, json};

async fn plain(table: &str) -> PostgresStateStore {
    let store = PostgresStateStore::connect_with(&support::database_url(), 3, table)
        .await
        .unwrap();
    store.ensure_table().await.unwrap();
    store.ensure_change_notifications().await.unwrap();
    store
}

async fn listening(table: &str, durability: Durability) -> CachedStateStore {
    let options = CacheOptions::new()
        .durability(durability)
        .flush_interval(Duration::from_secs(3600))
        .listen_for_changes(true);
    plain(table).await.cached(options).unwrap()
}

/// Polls `get(key)` until it returns `expected` (notifications are
/// asynchronous: the bound is measured in a benchmark, not asserted here).
async fn eventually(store: &CachedStateStore, key: &str, expected: Option<Value>) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let seen = store.get(key).await.unwrap();
        if seen == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key}: still {seen:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn operator(table: &str, sql: &str) {
    let pool = sqlx::PgPool::connect(&support::database_url())
        .await
        .unwrap();
    sqlx::raw_sql(&sql.replace("$table", &format!("\"{table}\"")))
        .execute(&pool)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_by_any_writer_reach_a_listening_store() {
    let table = support::unique_table("coherent");
    let reader = listening(&table, Durability::GroupCommit).await;
    let other = plain(&table).await;
    other.put("k", &json!(1)).await.unwrap();
    eventually(&reader, "k", Some(json!(1))).await;
    assert_eq!(reader.get("k").await.unwrap(), Some(json!(1))); // cached now

    other.put("k", &json!(2)).await.unwrap(); // another store
    eventually(&reader, "k", Some(json!(2))).await;
    operator(&table, "UPDATE $table SET value = '3' WHERE key = 'k'").await;
    eventually(&reader, "k", Some(json!(3))).await;
    operator(&table, "DELETE FROM $table WHERE key = 'k'").await;
    eventually(&reader, "k", None).await;
    other.put("k", &json!(4)).await.unwrap();
    eventually(&reader, "k", Some(json!(4))).await;
    operator(&table, "TRUNCATE $table").await;
    eventually(&reader, "k", None).await;
    reader.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_by_another_writer_never_hides_this_stores_pending_write() {
    let table = support::unique_table("coherent_own");
    let store = listening(&table, Durability::WriteBehind).await;
    let other = plain(&table).await;
    other.put("marker", &json!(0)).await.unwrap();
    eventually(&store, "marker", Some(json!(0))).await;

    store.put("k", &json!("mine")).await.unwrap(); // pending
    // One statement, one notification for both keys: once the marker's
    // change is seen, so was k's.
    let batch = vec![
        ("k".to_owned(), json!("theirs")),
        ("marker".to_owned(), json!(1)),
    ];
    other.put_batch(&batch).await.unwrap();
    eventually(&store, "marker", Some(json!(1))).await;
    assert_eq!(store.get("k").await.unwrap(), Some(json!("mine")));
    store.shutdown().await.unwrap();
    assert_eq!(other.get("k").await.unwrap(), Some(json!("mine")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listening_connection_leaves_no_stale_entry() {
    let table = support::unique_table("coherent_lost");
    let store = listening(&table, Durability::GroupCommit).await;
    let other = plain(&table).await;
    for round in 0..5 {
        other.put("k", &json!(round * 10)).await.unwrap();
        eventually(&store, "k", Some(json!(round * 10))).await; // cached
        // Cut the listening connection, then change the row while the
        // store may not be listening: that notification can be lost.
        operator(
            &table,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query ILIKE 'LISTEN%faucet_state_changes%' AND pid <> pg_backend_pid()",
        )
        .await;
        other.put("k", &json!(round * 10 + 1)).await.unwrap();
        eventually(&store, "k", Some(json!(round * 10 + 1))).await;
    }
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn listening_needs_a_backend_that_publishes_changes() {
    let options = CacheOptions::new().listen_for_changes(true);
    let backend = std::sync::Arc::new(faucet_state_postgres::MemoryBackend::new());
    let error = CachedStateStore::new(backend, options).unwrap_err();
    assert!(
        error.to_string().contains("publishes no changes"),
        "{error}"
    );
}
