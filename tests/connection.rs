//! Connecting, the doctor probe, and roles with restricted rights.

mod fault_support;
mod support;

use std::time::Duration;

use faucet_core::FaucetError;
use faucet_core::check::{CheckContext, CheckReport, ProbeStatus};
use faucet_core::state::StateStore;
use faucet_state_postgres::PostgresStateStore;
use serde_json::json;
use sqlx::postgres::PgPoolOptions;

const SECRET: &str = "hunter2-secret";

fn with_url(edit: impl FnOnce(&mut url::Url)) -> String {
    let mut url = url::Url::parse(&support::database_url()).unwrap();
    edit(&mut url);
    url.to_string()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn probe_status<'a>(report: &'a CheckReport, name: &str) -> &'a ProbeStatus {
    &report
        .probes
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no probe {name} in {report:?}"))
        .status
}

fn probe_hint(report: &CheckReport, name: &str) -> String {
    let probe = report.probes.iter().find(|p| p.name == name).unwrap();
    probe.hint.clone().unwrap_or_default()
}

async fn connect_error(url: &str) -> String {
    match PostgresStateStore::connect(url).await {
        Err(e @ FaucetError::State(_)) => e.to_string(),
        other => panic!("expected a connection error for a bad target, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_errors_say_what_failed_and_never_show_the_password() {
    let nothing_listening = format!("postgres://app:{SECRET}@127.0.0.1:{}/db", free_port());
    let msg = connect_error(&nothing_listening).await;
    assert!(
        msg.contains("connection refused") && msg.contains("start the server"),
        "{msg}"
    );
    assert!(
        msg.contains("app:***@127.0.0.1"),
        "the target is named, redacted: {msg}"
    );

    let unknown_db = with_url(|u| u.set_path("/no_such_database"));
    let msg = connect_error(&unknown_db).await;
    assert!(
        msg.contains("no_such_database") && msg.contains("3D000"),
        "{msg}"
    );

    for bad in [
        format!("postgres://app:{SECRET}@127.0.0.1:notaport/db"),
        format!("not a url {SECRET}"),
        format!("postgres://app:{SECRET}@127.0.0.1:5432/db?sslmode=bogus"),
    ] {
        let msg = connect_error(&bad).await;
        assert!(!msg.contains(SECRET), "password leaked: {msg}");
        assert!(msg.contains("could not connect"), "{msg}");
    }

    if support::is_throwaway() {
        let wrong_password = with_url(|u| u.set_password(Some(SECRET)).unwrap());
        let msg = connect_error(&wrong_password).await;
        assert!(
            msg.contains("password authentication failed")
                && msg.contains("check the user name and password"),
            "{msg}"
        );
        assert!(!msg.contains(SECRET), "password leaked: {msg}");
    }
    for msg in [
        connect_error(&nothing_listening).await,
        connect_error(&unknown_db).await,
    ] {
        assert!(!msg.contains(SECRET), "password leaked: {msg}");
        assert!(
            !msg.contains(support::SUPERUSER_PASSWORD),
            "password leaked: {msg}"
        );
    }
}

#[tokio::test]
async fn debug_output_never_shows_the_password() {
    let url = support::database_url();
    let store = PostgresStateStore::connect(&url).await.unwrap();
    let shown = format!("{store:?}");
    assert!(shown.contains("faucet_state"), "{shown}");
    if let Some(password) = url::Url::parse(&url).unwrap().password() {
        assert!(!shown.contains(password), "{shown}");
    }
    assert!(!format!("{:?}", store.pool()).contains(support::SUPERUSER_PASSWORD));
}

#[tokio::test]
async fn check_passes_on_a_ready_table_and_leaves_no_row() {
    let table = support::unique_table("check_ok");
    let store = PostgresStateStore::connect_with(&support::database_url(), 2, &table)
        .await
        .unwrap();
    store.ensure_table().await.unwrap();
    store.put("kept", &json!(1)).await.unwrap();
    for _ in 0..2 {
        let report = store.check(&CheckContext::default()).await.unwrap();
        assert_eq!(report.failed_count(), 0, "{report:?}");
        for name in ["connect", "table", "sentinel"] {
            assert!(
                matches!(probe_status(&report, name), ProbeStatus::Pass),
                "{report:?}"
            );
        }
    }
    let keys: Vec<String> = sqlx::query_scalar(&format!("SELECT key FROM \"{table}\""))
        .fetch_all(store.pool())
        .await
        .unwrap();
    assert_eq!(keys, ["kept"], "the probe left a row behind");
}

#[tokio::test]
async fn check_reports_a_missing_table_with_a_hint_and_creates_nothing() {
    let table = support::unique_table("check_missing");
    let store = PostgresStateStore::connect_with(&support::database_url(), 1, &table)
        .await
        .unwrap();
    let report = store.check(&CheckContext::default()).await.unwrap();
    assert!(matches!(
        probe_status(&report, "connect"),
        ProbeStatus::Pass
    ));
    assert!(
        matches!(probe_status(&report, "table"), ProbeStatus::Fail { reason } if reason.contains("does not exist")),
        "{report:?}"
    );
    assert!(probe_hint(&report, "table").contains("ensure_table()"));
    assert!(matches!(
        probe_status(&report, "sentinel"),
        ProbeStatus::Skip { .. }
    ));
    let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
        .bind(format!("\"{table}\""))
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(exists, None, "check() must not create the table");
}

#[tokio::test]
async fn check_reports_a_server_that_is_down() {
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&format!(
            "postgres://app:{SECRET}@127.0.0.1:{}/db",
            free_port()
        ))
        .unwrap();
    let store = PostgresStateStore::from_pool(pool, "state").unwrap();
    let ctx = CheckContext {
        timeout: Duration::from_secs(5),
    };
    let report = store.check(&ctx).await.unwrap();
    assert_eq!(report.failed_count(), 1, "{report:?}");
    assert!(matches!(
        probe_status(&report, "connect"),
        ProbeStatus::Fail { .. }
    ));
    let hint = probe_hint(&report, "connect");
    assert!(
        hint.contains("start the server") || hint.contains("down"),
        "{hint}"
    );
    assert!(!format!("{report:?}").contains(SECRET));
    for name in ["table", "sentinel"] {
        assert!(matches!(
            probe_status(&report, name),
            ProbeStatus::Skip { .. }
        ));
    }
}

#[tokio::test]
async fn a_table_with_another_layout_is_refused_by_ensure_table_and_check() {
    let table = support::unique_table("wrong_layout");
    let store = PostgresStateStore::connect_with(&support::database_url(), 1, &table)
        .await
        .unwrap();
    sqlx::query(&format!(
        "CREATE TABLE \"{table}\" (key TEXT PRIMARY KEY, value JSON NOT NULL)"
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let err = store.ensure_table().await.unwrap_err().to_string();
    assert!(
        err.contains("column value is json, expected jsonb"),
        "{err}"
    );
    let report = store.check(&CheckContext::default()).await.unwrap();
    assert!(
        matches!(probe_status(&report, "table"), ProbeStatus::Fail { reason } if reason.contains("expected jsonb")),
        "{report:?}"
    );
}

#[tokio::test]
async fn a_role_with_only_row_rights_can_use_but_not_create_the_table() {
    let admin = PostgresStateStore::connect_with(
        &support::database_url(),
        1,
        &support::unique_table("dml_only"),
    )
    .await
    .unwrap();
    admin.ensure_table().await.unwrap();
    let role = support::unique_table("role");
    let pool = admin.pool();
    if support::is_throwaway() {
        sqlx::query("REVOKE CREATE ON SCHEMA public FROM PUBLIC")
            .execute(pool)
            .await
            .unwrap();
    }
    sqlx::query(&format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'role-pw'"))
        .execute(pool)
        .await
        .unwrap();
    sqlx::query(&format!(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON \"{}\" TO \"{role}\"",
        admin.table()
    ))
    .execute(pool)
    .await
    .unwrap();

    let role_url = with_url(|u| {
        u.set_username(&role).unwrap();
        u.set_password(Some("role-pw")).unwrap();
    });
    let role_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&role_url)
        .await
        .unwrap();
    let store = PostgresStateStore::from_pool(role_pool.clone(), admin.table()).unwrap();
    store
        .ensure_table()
        .await
        .expect("an existing table needs no DDL");
    store.put("k", &json!({"v": 1})).await.unwrap();
    store.put("k", &json!({"v": 2})).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!({"v": 2})));
    store
        .put_many(&[("a", json!(1)), ("b", json!(2))])
        .await
        .unwrap();
    assert_eq!(store.list("").await.unwrap(), ["a", "b", "k"]);
    store.delete_many(&["a", "b"]).await.unwrap();
    store.delete("k").await.unwrap();
    let report = store.check(&CheckContext::default()).await.unwrap();
    assert_eq!(report.failed_count(), 0, "{report:?}");

    let may_create: bool =
        sqlx::query_scalar("SELECT has_schema_privilege(current_user, 'public', 'CREATE')")
            .fetch_one(&role_pool)
            .await
            .unwrap();
    if may_create {
        eprintln!("DATABASE_URL lets every role create tables in public; skipping the DDL refusal");
        return;
    }
    let missing =
        PostgresStateStore::from_pool(role_pool, support::unique_table("not_there")).unwrap();
    let err = missing.ensure_table().await.unwrap_err().to_string();
    assert!(
        err.contains("create the table out of band") && err.contains("CREATE TABLE IF NOT EXISTS"),
        "{err}"
    );
    let err = missing.put("k", &json!(1)).await.unwrap_err().to_string();
    assert!(
        err.contains("does not exist") && err.contains("ensure_table()"),
        "{err}"
    );
}

/// The server's end of every connection the store opens has TCP keepalive,
/// so a backend whose client vanished in a partition is ended within about
/// a minute.
#[tokio::test]
async fn connections_the_store_opens_have_tcp_keepalive() {
    let table = support::unique_table("keepalive");
    let store = PostgresStateStore::connect_with(&support::database_url(), 2, &table)
        .await
        .unwrap();
    for setting in [
        "tcp_keepalives_idle",
        "tcp_keepalives_interval",
        "tcp_keepalives_count",
    ] {
        let row = sqlx::raw_sql(&format!("SHOW {setting}"))
            .fetch_one(store.pool())
            .await
            .unwrap();
        let value: String = sqlx::Row::try_get(&row, 0).unwrap();
        let expected = match setting {
            "tcp_keepalives_idle" => "30",
            "tcp_keepalives_interval" => "10",
            _ => "3",
        };
        assert_eq!(value, expected, "{setting}");
    }
}

/// The store keeps connections that answered for its next operations (so
/// that each does not pay sqlx's release ping), but never all of the pool,
/// and none once it is idle: another user of the pool always gets one, and
/// an idle store gives every connection back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_leave_one_for_others_and_go_back_when_idle() {
    const POOL: u32 = 3;
    let table = support::unique_table("reserve");
    let store = std::sync::Arc::new(
        PostgresStateStore::connect_with(&support::database_url(), POOL, &table)
            .await
            .unwrap(),
    );
    store.ensure_table().await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..20 {
                    store.put(&format!("k{t}"), &json!(i)).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let pool = store.pool();
    // Another user of the pool gets a connection while the store keeps some.
    let other: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(other, 1);
    // Idle, the store gives them all back (the deadline only catches a hang).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pool.num_idle() as u32 != pool.size() {
        assert!(
            std::time::Instant::now() < deadline,
            "an idle store still holds {} connections",
            pool.size() - pool.num_idle() as u32
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in 0..8 {
        assert_eq!(store.get(&format!("k{t}")).await.unwrap(), Some(json!(19)));
    }
}

/// A server that accepts the connection and never answers (a stalled proxy,
/// a wrong port on a busy host) fails `connect` within the acquire timeout
/// instead of holding the caller forever.
#[tokio::test]
async fn connect_to_a_server_that_never_answers_fails_within_its_deadline() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let url = format!("postgres://app:{SECRET}@127.0.0.1:{port}/app");
    // Far above the 10 s deadline: only a hang fails here.
    let err = tokio::time::timeout(Duration::from_secs(60), PostgresStateStore::connect(&url))
        .await
        .expect("connect hung")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no answer within"), "{err}");
    assert!(!err.contains(SECRET), "{err}");
    silent.abort();
}

/// Behind a proxy whose server is gone (it accepts each connection and
/// closes it), a failed statement opens one connection, not one after
/// another: the pool is not churned.
#[tokio::test]
async fn a_server_behind_a_proxy_gone_costs_one_connection_per_failed_statement() {
    let server = support::PgServer::start();
    let proxy = fault_support::FaultProxy::start(server.port()).await;
    let url = fault_support::with_port(&server.url(), proxy.port());
    let table = support::unique_table("proxy_gone");
    let store = PostgresStateStore::connect_with(&url, 4, &table)
        .await
        .unwrap();
    store.ensure_table().await.unwrap();
    store.put("k", &json!(1)).await.unwrap();
    server.stop_immediate();
    // The first failure drains the dead pooled connections (each a lost
    // connection, sent again on the next) and then fails to open a new one.
    store.put("k", &json!(2)).await.unwrap_err();
    for _ in 0..5 {
        let before = proxy.accepted();
        store.put("k", &json!(3)).await.unwrap_err();
        assert_eq!(
            proxy.accepted() - before,
            1,
            "connections opened for one failed put"
        );
    }
}
