//! Multi-host URLs against real servers (issue 23): a dead host listed first
//! is skipped, `target_session_attrs=read-write` goes past a standby, a
//! server that turns read-only is left for the next host, and after the
//! primary is killed and its synchronous standby promoted, every
//! acknowledged write is on the new primary and writes resume by
//! themselves, in every durability mode.
//!
//! The standby is a real one: `pg_basebackup -R` of the primary, streaming,
//! promoted with `pg_ctl promote`. Each test starts its own servers (it
//! stops or promotes them), so `DATABASE_URL` is not used.

mod support;

use std::net::TcpListener;

use faucet_core::check::{CheckContext, ProbeStatus};
use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, PostgresStateStore};
use serde_json::json;
use sqlx::Connection;
use support::{PgServer, SUPERUSER_PASSWORD};

const MODES: [Durability; 3] = [
    Durability::WriteThrough,
    Durability::GroupCommit,
    Durability::WriteBehind,
];

/// `postgres://…@127.0.0.1:p1,127.0.0.1:p2/postgres` plus `query`.
fn url_of(ports: &[u16], query: &str) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    format!(
        "postgres://postgres:{SUPERUSER_PASSWORD}@{}/postgres{query}",
        hosts.join(",")
    )
}

/// `first`, then `second`, asking for a read-write session.
fn read_write_url(first: &PgServer, second: &PgServer) -> String {
    url_of(
        &[first.port(), second.port()],
        "?target_session_attrs=read-write",
    )
}

/// A loopback port nothing listens on.
fn dead_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `setting`, then reloads the configuration.
async fn alter_system(server: &PgServer, setting: &str) {
    let mut conn = sqlx::PgConnection::connect(&server.url()).await.unwrap();
    for statement in [
        &format!("ALTER SYSTEM SET {setting}"),
        "SELECT pg_reload_conf()",
    ] {
        sqlx::raw_sql(statement).execute(&mut conn).await.unwrap();
    }
}

/// The value `key` holds in `table` on `server` (read directly, as text).
async fn stored(server: &PgServer, table: &str, key: &str) -> Option<String> {
    let mut conn = sqlx::PgConnection::connect(&server.url()).await.unwrap();
    sqlx::query_scalar(&format!("SELECT value::text FROM {table} WHERE key = $1"))
        .bind(key)
        .fetch_optional(&mut conn)
        .await
        .unwrap()
}

/// A primary and a standby replicating from it synchronously: a commit is
/// acknowledged only once the standby has flushed it.
async fn primary_and_sync_standby() -> (PgServer, PgServer) {
    let primary = PgServer::start();
    let standby = PgServer::start_standby_of(&primary);
    alter_system(&primary, "synchronous_standby_names = '*'").await;
    let mut conn = sqlx::PgConnection::connect(&primary.url()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let sync: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if sync == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the standby never became synchronous"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    (primary, standby)
}

async fn cached(url: &str, table: &str, mode: Durability) -> CachedStateStore {
    let plain = PostgresStateStore::connect_with(url, 2, table)
        .await
        .unwrap();
    plain.ensure_table().await.unwrap();
    plain.cached(CacheOptions::new().durability(mode)).unwrap()
}

#[tokio::test]
async fn a_dead_host_listed_first_is_skipped() {
    let server = PgServer::start();
    let table = support::unique_table("dead_first");
    let url = url_of(&[dead_port(), server.port()], "");
    let store = PostgresStateStore::connect_with(&url, 2, &table)
        .await
        .unwrap();
    store.ensure_table().await.unwrap();
    store.put("k", &json!("v")).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!("v")));
    assert_eq!(stored(&server, &table, "k").await.as_deref(), Some("\"v\""));
}

#[tokio::test]
async fn no_listed_host_answering_is_an_error_naming_each_host() {
    let (first, second) = (dead_port(), dead_port());
    let url = url_of(&[first, second], "?password=x");
    let error = PostgresStateStore::connect_with(&url, 1, "t")
        .await
        .expect_err("nothing listens")
        .to_string();
    for port in [first, second] {
        assert!(error.contains(&format!("127.0.0.1:{port}:")), "{error}");
    }
    assert!(!error.contains(SUPERUSER_PASSWORD), "{error}");
    assert!(!error.contains("password=x"), "{error}");
}

#[tokio::test]
async fn read_write_goes_past_a_standby_listed_first() {
    let (primary, standby) = primary_and_sync_standby().await;
    let url = read_write_url(&standby, &primary);
    for mode in MODES {
        let table = support::unique_table("standby_first");
        let store = cached(&url, &table, mode).await;
        store
            .put("k", &json!({"mode": format!("{mode:?}")}))
            .await
            .unwrap();
        store.flush().await.unwrap();
        assert!(stored(&primary, &table, "k").await.is_some(), "{mode:?}");
        store.shutdown().await.unwrap();
    }
    // `standby` asks for the other one, and gets it: reads work, writes are
    // refused by the server.
    let url = url_of(
        &[primary.port(), standby.port()],
        "?target_session_attrs=standby",
    );
    let table = support::unique_table("standby_target");
    let on_primary = PostgresStateStore::connect_with(&primary.url(), 1, &table)
        .await
        .unwrap();
    on_primary.ensure_table().await.unwrap();
    // Flushed on the standby when that returned (synchronous), replayed a
    // moment later.
    let mut on_standby = sqlx::PgConnection::connect(&standby.url()).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass($1)::text")
        .bind(&table)
        .fetch_one(&mut on_standby)
        .await
        .unwrap()
        .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the table never reached the standby"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let store = PostgresStateStore::connect_with(&url, 1, &table)
        .await
        .unwrap();
    let refused = store
        .put("k", &json!(1))
        .await
        .expect_err("a standby is read-only")
        .to_string();
    assert!(refused.contains("read-only"), "{refused}");
    // The error names the host it came from.
    let host = format!("(host 127.0.0.1:{})", standby.port());
    assert!(refused.contains(&host), "{refused}");
}

#[tokio::test]
async fn a_server_turned_read_only_is_left_for_the_next_host() {
    let (first, second) = (PgServer::start(), PgServer::start());
    let table = support::unique_table("turned_read_only");
    let url = read_write_url(&first, &second);
    for server in [&first, &second] {
        let store = PostgresStateStore::connect_with(&server.url(), 1, &table)
            .await
            .unwrap();
        store.ensure_table().await.unwrap();
    }
    let store = PostgresStateStore::connect_with(&url, 2, &table)
        .await
        .unwrap();
    store.put("k", &json!(1)).await.unwrap();
    assert_eq!(stored(&first, &table, "k").await.as_deref(), Some("1"));
    alter_system(&first, "default_transaction_read_only = on").await;
    // The reload is asynchronous: once a new session starts read-only, the
    // postmaster has re-read the file and signalled every backend, the
    // store's pooled one too, which applies it before its next statement.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let mut conn = sqlx::PgConnection::connect(&first.url()).await.unwrap();
        let now: String = sqlx::query_scalar("SHOW default_transaction_read_only")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if now == "on" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload never took"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The pooled connection to `first` now answers 25006; the put goes to
    // `second` instead of failing.
    store.put("k", &json!(2)).await.unwrap();
    assert_eq!(stored(&second, &table, "k").await.as_deref(), Some("2"));
    assert_eq!(stored(&first, &table, "k").await.as_deref(), Some("1"));
}

#[tokio::test]
async fn after_a_failover_every_acknowledged_write_is_on_the_new_primary() {
    for mode in MODES {
        let (primary, standby) = primary_and_sync_standby().await;
        let table = support::unique_table("failover");
        let url = read_write_url(&primary, &standby);
        let store = cached(&url, &table, mode).await;
        for i in 0..50 {
            store.put(&format!("k{i}"), &json!(i)).await.unwrap();
        }
        // What write-behind acknowledges: a completed flush.
        store.flush().await.unwrap();
        primary.stop_immediate();
        standby.promote();
        // Writes resume by themselves on the promoted standby.
        for i in 50..60 {
            store.put(&format!("k{i}"), &json!(i)).await.unwrap();
        }
        store.flush().await.unwrap();
        for i in 0..60 {
            assert_eq!(
                stored(&standby, &table, &format!("k{i}")).await,
                Some(i.to_string()),
                "{mode:?}: k{i} is not on the new primary"
            );
        }
        store.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn check_names_the_host_it_uses_and_why_each_host_fails() {
    let (first, second) = (PgServer::start(), PgServer::start());
    let table = support::unique_table("check_hosts");
    let url = read_write_url(&first, &second);
    let store = PostgresStateStore::connect_with(&url, 1, &table)
        .await
        .unwrap();
    store.ensure_table().await.unwrap();
    let report = store.check(&CheckContext::default()).await.unwrap();
    let connect = &report.probes[0];
    assert!(matches!(connect.status, ProbeStatus::Pass), "{report:?}");
    let hint = connect.hint.as_deref().unwrap_or_default();
    assert!(
        hint.contains(&format!("127.0.0.1:{}", first.port())),
        "{hint}"
    );

    first.stop_immediate();
    second.stop_immediate();
    let report = store.check(&CheckContext::default()).await.unwrap();
    let ProbeStatus::Fail { reason } = &report.probes[0].status else {
        panic!("no host is up, yet: {report:?}");
    };
    for port in [first.port(), second.port()] {
        assert!(reason.contains(&format!("127.0.0.1:{port}:")), "{reason}");
    }
    assert!(
        reason.contains("target_session_attrs=read-write"),
        "{reason}"
    );
    assert!(!reason.contains(SUPERUSER_PASSWORD), "{reason}");
}

#[tokio::test]
async fn a_fence_holds_across_a_promotion_and_a_newer_claim_there_fences_the_old_instance() {
    let (primary, standby) = primary_and_sync_standby().await;
    let table = support::unique_table("fence_failover");
    let url = read_write_url(&primary, &standby);
    let fenced = |url: String, table: String| async move {
        let plain = PostgresStateStore::connect_with(&url, 2, &table)
            .await
            .unwrap();
        plain.ensure_table().await.unwrap();
        plain.fence("orders").await.unwrap()
    };
    let old = fenced(url.clone(), table.clone()).await;
    let first = old.fence_epoch().unwrap();
    old.put("cursor", &json!(1)).await.unwrap();

    primary.stop_immediate();
    standby.promote();
    // The epoch row was replicated: the old instance still holds its fence
    // on the new primary and keeps writing.
    old.put("cursor", &json!(2)).await.unwrap();
    assert_eq!(
        stored(&standby, &table, "cursor").await.as_deref(),
        Some("2")
    );

    // A newer claim, made on the new primary, fences it.
    let new = fenced(url, table.clone()).await;
    let newer = new.fence_epoch().unwrap();
    assert!(newer > first, "{newer} after {first}");
    let refused = old.put("cursor", &json!(3)).await.expect_err("fenced");
    assert!(
        refused
            .to_string()
            .contains(&format!("fenced by a newer instance (epoch {newer})")),
        "{refused}"
    );
    assert_eq!(
        stored(&standby, &table, "cursor").await.as_deref(),
        Some("2")
    );
    new.put("cursor", &json!(4)).await.unwrap();
}

#[tokio::test]
async fn a_listening_store_listens_on_the_new_primary_and_serves_nothing_stale() {
    let (primary, standby) = primary_and_sync_standby().await;
    let table = support::unique_table("listen_failover");
    let url = read_write_url(&primary, &standby);
    let plain = PostgresStateStore::connect_with(&url, 2, &table)
        .await
        .unwrap();
    plain.ensure_table().await.unwrap();
    plain.ensure_change_notifications().await.unwrap();
    let options = CacheOptions::new()
        .durability(Durability::GroupCommit)
        .listen_for_changes(true);
    let reader = plain.cached(options).unwrap();
    within_30s(|| async { (!reader.stats().listening).then(|| "never listening".to_owned()) })
        .await;
    reader.put("k", &json!("before")).await.unwrap();
    assert_eq!(reader.get("k").await.unwrap(), Some(json!("before")));

    // The reader sends nothing: its feed alone must notice the loss (while no
    // host can take writes, it cannot subscribe again, so this is observed)
    // and then find the new primary.
    primary.stop_immediate();
    within_30s(|| async {
        reader
            .stats()
            .listening
            .then(|| "the loss went unnoticed".to_owned())
    })
    .await;
    standby.promote();
    within_30s(|| async { (!reader.stats().listening).then(|| "not listening again".to_owned()) })
        .await;
    let writer = PostgresStateStore::connect_with(&standby.url(), 1, &table)
        .await
        .unwrap();
    for value in ["after", "later"] {
        writer.put("k", &json!(value)).await.unwrap();
        within_30s(|| async {
            let seen = reader.get("k").await.unwrap();
            (seen != Some(json!(value))).then(|| format!("still {seen:?}, expected {value}"))
        })
        .await;
    }
    reader.shutdown().await.unwrap();
}

/// Runs `check` every 5 ms until it returns `None`; fails with its last
/// message once 30 s have passed.
async fn within_30s<F: std::future::Future<Output = Option<String>>>(mut check: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while let Some(failure) = check().await {
        assert!(tokio::time::Instant::now() < deadline, "{failure}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
