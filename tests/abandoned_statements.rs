//! Statements whose caller gave up, against a real PostgreSQL: a dropped
//! call's statement may still be on the server, waiting for a lock. It must
//! not land later unannounced (the server is told to end it once its client
//! is gone), and the cached store must never cache a read taken before it
//! could no longer commit.

mod row_locks;
mod support;

use std::sync::Arc;
use std::time::Duration;

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, PostgresStateStore};
use row_locks::{lock_row, lock_waiters};
use serde_json::{Value, json};

/// Polls `check` every 10 ms until it holds; fails naming `what` after 30 s.
async fn within_30s<F: Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `call` until its statement waits for a lock on `table`, then drops
/// it there (a caller's `timeout` or `select!`).
async fn drop_while_waiting<T>(admin: &sqlx::PgPool, table: &str, call: impl Future<Output = T>) {
    tokio::select! {
        _ = call => panic!("the call finished although its row was locked"),
        () = within_30s("the call's statement waiting for the lock", || async {
            lock_waiters(admin, table).await > 0
        }) => {}
    }
}

async fn table_value(admin: &sqlx::PgPool, table: &str, key: &str) -> Option<Value> {
    sqlx::query_scalar(&format!("SELECT value FROM \"{table}\" WHERE key = $1"))
        .bind(key)
        .fetch_optional(admin)
        .await
        .unwrap()
}

/// Issue 21, item 3. A write-through `put` and a `compare_and_put` are
/// dropped while their statement waits for a row lock; the key is read
/// (the old value, since nothing committed yet); then the lock goes and the
/// abandoned statement commits. The store must then read the new value.
/// The store is built on a caller's pool (`from_pool`), where the server is
/// not told to end statements whose client is gone, so the statement does
/// commit: what is tested is the cache. Regression: the read before the
/// commit was cached, and the old value was served for good. Checked to
/// fail without the fix (`get` = "old" while the table held "new").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_before_an_abandoned_write_commits_is_not_served_after_it() {
    let url = support::database_url();
    let table = support::unique_table("abandoned_read");
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(3)
        .connect(&url)
        .await
        .unwrap();
    let plain = PostgresStateStore::from_pool(pool, &table).unwrap();
    plain.ensure_table().await.unwrap();
    let store = plain
        .clone()
        .cached(CacheOptions::new().durability(Durability::WriteThrough))
        .unwrap();
    for (round, write) in ["put", "compare_and_put"].into_iter().enumerate() {
        let key = format!("k{round}");
        plain.put(&key, &json!("old")).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), Some(json!("old")));

        let locked = lock_row(&admin, &table, &key).await;
        match write {
            "put" => drop_while_waiting(&admin, &table, store.put(&key, &json!("new"))).await,
            _ => {
                let (old, new) = (json!("old"), json!("new"));
                let call = store.compare_and_put(&key, Some(&old), &new);
                drop_while_waiting(&admin, &table, call).await
            }
        }
        // Nothing has committed yet: the table still says "old".
        assert_eq!(
            store.get(&key).await.unwrap(),
            Some(json!("old")),
            "{write}"
        );
        locked.commit().await.unwrap();
        within_30s("the abandoned statement committing", || async {
            table_value(&admin, &table, &key).await == Some(json!("new"))
        })
        .await;
        assert_eq!(
            store.get(&key).await.unwrap(),
            Some(json!("new")),
            "{write}: a read taken before the abandoned write committed is served"
        );
    }
    store.shutdown().await.unwrap();
}

/// Issue 21, item 7. A write-behind store whose batch waits for a row lock
/// is dropped (its `shutdown()` cancelled first). The batch was already on
/// the server; since the store's connection closed, the server must end it
/// rather than commit it once the lock goes. Regression: it committed after
/// the drop had returned. Checked to fail without the fix (the statement
/// kept waiting for the lock for 30 s, and committed once it was released).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stores_batch_never_commits_after_the_drop() {
    let url = support::database_url();
    let table = support::unique_table("abandoned_batch");
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    let plain = PostgresStateStore::connect_with(&url, 3, &table)
        .await
        .unwrap();
    plain.ensure_table().await.unwrap();
    plain.put("k", &json!("before")).await.unwrap();
    let store = Arc::new(
        plain
            .cached(
                CacheOptions::new()
                    .durability(Durability::WriteBehind)
                    .shutdown_timeout(Duration::from_secs(60)),
            )
            .unwrap(),
    );

    let locked = lock_row(&admin, &table, "k").await;
    store.put("k", &json!("dropped")).await.unwrap();
    drop_while_waiting(&admin, &table, store.shutdown()).await;
    let store = Arc::into_inner(store).expect("the only handle");
    drop::<CachedStateStore>(store);

    // The server ends it once it notices the closed connection; give it up
    // to 10 s, well inside the 30 s after which TCP keepalive would end it
    // anyway (and the test would pass without the fix), then let go of the
    // lock whether or not it did.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while lock_waiters(&admin, &table).await > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    locked.commit().await.unwrap();
    // Had it still been waiting, it would commit now: wait until nothing on
    // the table is running any more.
    within_30s("the statements on the table ending", || async {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE state = 'active' AND strpos(query, $1) > 0 AND pid <> pg_backend_pid()",
        )
        .bind(&table)
        .fetch_one(&admin)
        .await
        .unwrap();
        running == 0
    })
    .await;
    assert_eq!(
        table_value(&admin, &table, "k").await,
        Some(json!("before")),
        "the dropped store's batch committed after the drop"
    );
}
