//! Making a statement wait on the server: another session holds a row's
//! lock, and `pg_stat_activity` shows who waits for it. Shared by the tests
//! that force a write to wait (fencing, abandoned statements, the fault
//! suite's slow guard, the server-side statement timeout of each statement
//! form).

#![allow(dead_code)]

use faucet_core::state::StateStore;
use faucet_state_postgres::PostgresStateStore;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres, Row, Transaction};

/// A transaction of another session holding the row of `key` in `table`
/// (`SELECT … FOR UPDATE`) until it is committed or rolled back.
pub async fn lock_row(pool: &PgPool, table: &str, key: &str) -> Transaction<'static, Postgres> {
    let mut locked = pool.begin().await.unwrap();
    sqlx::query(&format!(
        "SELECT 1 FROM \"{table}\" WHERE key = $1 FOR UPDATE"
    ))
    .bind(key)
    .execute(&mut *locked)
    .await
    .unwrap();
    locked
}

/// How many statements whose text holds `text` wait for a lock right now.
pub async fn lock_waiters(pool: &PgPool, text: &str) -> i64 {
    sqlx::query(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND strpos(query, $1) > 0",
    )
    .bind(text)
    .fetch_one(pool)
    .await
    .unwrap()
    .get(0)
}

/// A put of `key` (which must have a row) through `store`, while a session
/// opened at `lock_url` holds the row's lock, is ended by the server's
/// statement timeout (SQLSTATE 57014), not by the client one second later;
/// once the lock is gone, the key's puts go through. Sends nothing through
/// `store` before the stuck put, so that put runs on whatever connection
/// the store would use next (a kept one included).
pub async fn a_stuck_put_is_ended_by_the_server(
    store: &PostgresStateStore,
    lock_url: &str,
    key: &str,
) {
    let holder = PgPoolOptions::new()
        .max_connections(1)
        .connect(lock_url)
        .await
        .unwrap();
    let tx = lock_row(&holder, store.table(), key).await;
    let err = store.put(key, &json!(2)).await.unwrap_err().to_string();
    assert!(err.contains("statement timeout"), "{err}");
    tx.rollback().await.unwrap();
    store.put(key, &json!(3)).await.unwrap();
    assert_eq!(store.get(key).await.unwrap(), Some(json!(3)));
}
