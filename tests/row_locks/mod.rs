//! Making a statement wait on the server: another session holds a row's
//! lock, and `pg_stat_activity` shows who waits for it. Shared by the tests
//! that force a write to wait (fencing, abandoned statements, the fault
//! suite's slow guard).

#![allow(dead_code)]

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
