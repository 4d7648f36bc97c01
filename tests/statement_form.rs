//! The form statements take by default: prepared on a direct connection,
//! one simple-protocol message each behind a transaction pooler, found out
//! when the store connects (`src/postgres/pooler.rs`), and bounded by the
//! server's statement timeout either way (guarantee 10).
//!
//! The PgBouncer cases start their own server and PgBouncers (so they are
//! skipped with `DATABASE_URL`); the direct case uses this run's server, and
//! checks the pooler's side when the run goes through PgBouncer
//! (`FAUCET_TEST_VIA_PGBOUNCER`).

mod fault_support;
mod row_locks;
mod support;

use std::time::Duration;

use faucet_core::state::StateStore;
use faucet_state_postgres::PostgresStateStore;
use serde_json::json;
use support::{PgBouncer, PgServer};

async fn store_at(url: &str, max_connections: u32) -> PostgresStateStore {
    let store =
        PostgresStateStore::connect_with(url, max_connections, &support::unique_table("form"))
            .await
            .expect("connect");
    store.ensure_table().await.expect("create the table");
    store
}

/// Counts the statements of `store`'s table prepared on the session that
/// runs it (this query itself, prepared too, left out).
fn statements_of(store: &PostgresStateStore) -> String {
    format!(
        "SELECT count(*) FROM pg_prepared_statements \
         WHERE NOT from_sql AND statement LIKE '%\"{}\"%' \
         AND statement NOT LIKE '%pg_prepared_statements%'",
        store.table()
    )
}

/// `row_locks::a_stuck_put_is_ended_by_the_server` on a key of its own.
async fn a_stuck_put_is_ended_by_the_server(store: &PostgresStateStore, lock_url: &str) {
    store.put("locked", &json!(1)).await.unwrap();
    row_locks::a_stuck_put_is_ended_by_the_server(store, lock_url, "locked").await;
}

/// Many tasks on a few pooled connections, each writing and reading its own
/// keys: behind a transaction pooler, prepared statements would meet server
/// sessions that never saw them (or saw another client's of the same name).
async fn concurrent_puts_and_gets_are_answered(store: &PostgresStateStore) {
    let tasks = (0..8).map(|task| {
        let store = store.clone();
        tokio::spawn(async move {
            for round in 0..25 {
                let key = format!("task{task}:key{}", round % 5);
                store.put(&key, &json!({"round": round})).await.unwrap();
                assert_eq!(
                    store.get(&key).await.unwrap(),
                    Some(json!({"round": round}))
                );
            }
        })
    });
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn a_direct_connection_gets_prepared_statements_bounded_by_the_session() {
    let url = support::database_url();
    let store = store_at(&url, 1)
        .await
        .with_statement_timeout(Duration::from_millis(300));
    if support::via_pgbouncer() {
        assert!(!store.prepared_statements(), "behind PgBouncer: messages");
        concurrent_puts_and_gets_are_answered(&store).await;
        return;
    }
    assert!(store.prepared_statements(), "a direct connection: prepared");
    store.put("a", &json!({"v": 1})).await.unwrap();
    assert_eq!(store.get("a").await.unwrap(), Some(json!({"v": 1})));
    // One pooled connection: the query sees the session the store used.
    let (prepared, timeout): (i64, String) = sqlx::query_as(&format!(
        "SELECT ({}), current_setting('statement_timeout')",
        statements_of(&store)
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        prepared, 2,
        "the put and the get are prepared on the connection"
    );
    assert_eq!(timeout, "300ms");
    a_stuck_put_is_ended_by_the_server(&store, &url).await;
    concurrent_puts_and_gets_are_answered(&store).await;
}

#[tokio::test]
async fn pinning_the_message_form_on_a_direct_connection_prepares_nothing() {
    if support::via_pgbouncer() {
        return;
    }
    let url = support::database_url();
    let store = store_at(&url, 1).await.with_prepared_statements(false);
    assert!(!store.prepared_statements());
    store.put("a", &json!(1)).await.unwrap();
    assert_eq!(store.get("a").await.unwrap(), Some(json!(1)));
    let prepared: i64 = sqlx::query_scalar(&statements_of(&store))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(prepared, 0);
}

/// PgBouncer in transaction mode, refusing the probe's startup parameter
/// (its default) and dropping it (`ignore_startup_parameters = options`):
/// both leave the store on messages, which work there under concurrency
/// and are bounded by the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_statements_stay_messages_whether_it_refuses_or_drops_the_probe() {
    if !support::is_throwaway() {
        eprintln!("skipped: starts its own server and PgBouncers");
        return;
    }
    let server = PgServer::start();
    for (setup, settings) in [
        ("refusing", ""),
        ("dropping", "ignore_startup_parameters = options"),
    ] {
        let bouncer = PgBouncer::start_with(&server, settings);
        let store = store_at(&bouncer.url(), 4)
            .await
            .with_statement_timeout(Duration::from_millis(300));
        assert!(!store.prepared_statements(), "PgBouncer {setup} the probe");
        concurrent_puts_and_gets_are_answered(&store).await;
        a_stuck_put_is_ended_by_the_server(&store, &server.url()).await;
    }
}

/// A TCP proxy that keeps one server session per client connection (as
/// HAProxy or a failover endpoint does) passes the startup packet on: the
/// session applies the probe, and statements go prepared.
#[tokio::test]
async fn behind_a_tcp_proxy_the_session_is_its_own_and_statements_go_prepared() {
    if !support::is_throwaway() {
        eprintln!("skipped: starts its own server");
        return;
    }
    let server = PgServer::start();
    let proxy = fault_support::FaultProxy::start(server.port()).await;
    let url = fault_support::with_port(&server.url(), proxy.port());
    let store = store_at(&url, 2)
        .await
        .with_statement_timeout(Duration::from_millis(300));
    assert!(store.prepared_statements(), "a proxied session of its own");
    a_stuck_put_is_ended_by_the_server(&store, &server.url()).await;
    concurrent_puts_and_gets_are_answered(&store).await;
}
