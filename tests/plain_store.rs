//! The plain store against a real PostgreSQL (throwaway, or `DATABASE_URL`).

mod support;

use std::collections::HashSet;
use std::sync::Arc;

use faucet_core::FaucetError;
use faucet_core::check::{CheckContext, ProbeStatus};
use faucet_core::state::{DOCTOR_SENTINEL_KEY, StateStore};
use faucet_state_postgres::{ENVELOPE_KEY, PostgresStateStore};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;

async fn fresh_store(tag: &str) -> PostgresStateStore {
    let table = support::unique_table(tag);
    let store = PostgresStateStore::connect_with(&support::database_url(), 5, &table)
        .await
        .expect("connect to the test server");
    store.ensure_table().await.expect("create the table");
    store
}

async fn row_count(store: &PostgresStateStore) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM \"{}\"", store.table()))
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn nested_json_round_trips_and_overwrites() {
    let store = fresh_store("roundtrip").await;
    let nested = json!({
        "cursor": {"ts": "2026-11-25T10:00:00Z", "ids": [1, 2, 3]},
        "float": 1.5, "neg": -7, "big": u64::MAX, "null": null, "flag": true,
        "text": "ünïcødé \"quoted\" \\ slash", "empty": {}, "list": []
    });
    store.put("orders:cursor", &nested).await.unwrap();
    assert_eq!(store.get("orders:cursor").await.unwrap(), Some(nested));

    store.put("orders:cursor", &json!(2)).await.unwrap();
    assert_eq!(store.get("orders:cursor").await.unwrap(), Some(json!(2)));
    assert_eq!(row_count(&store).await, 1);
}

#[tokio::test]
async fn absent_keys_read_as_none_and_delete_is_idempotent() {
    let store = fresh_store("absent").await;
    assert_eq!(store.get("never-written").await.unwrap(), None);
    store.delete("never-written").await.unwrap();

    store.put("k", &json!("v")).await.unwrap();
    store.delete("k").await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), None);
    store.delete("k").await.unwrap();
    assert_eq!(row_count(&store).await, 0);
}

#[tokio::test]
async fn overwrite_moves_updated_at_forward() {
    let store = fresh_store("updated_at").await;
    store.put("k", &json!(1)).await.unwrap();
    let ts_sql = format!(
        "SELECT extract(epoch FROM updated_at)::float8 FROM \"{}\" WHERE key = 'k'",
        store.table()
    );
    let first: f64 = sqlx::query_scalar(&ts_sql).fetch_one(store.pool()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store.put("k", &json!(2)).await.unwrap();
    let second: f64 = sqlx::query_scalar(&ts_sql).fetch_one(store.pool()).await.unwrap();
    assert!(second > first, "{second} is not after {first}");
}
