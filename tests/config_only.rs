//! faucet's config-only switch (`faucet_core::libpq::set_config_only`,
//! faucet-core 1.16): once a process turns it on, the stores connect with
//! what their URL names and nothing from the `PG*` environment or the
//! password file (issue 22, item 4). Built only with the `faucet-core-1-16`
//! feature, in `.ci/run`'s second lane.
//!
//! One test in its own binary: it sets process-wide environment variables
//! and the process-wide switch, which no other test may see. It always
//! starts a throwaway server of its own, whose password authentication it
//! relies on.
#![cfg(feature = "faucet-core-1-16")]

mod support;

use faucet_core::state::StateStore;
use faucet_state_postgres::{PostgresStateConfig, PostgresStateStore};
use sqlx::Connection;
use std::os::unix::fs::PermissionsExt;

const ROLE: &str = "config_only_reader";
const PASSWORD: &str = "only-in-the-environment";

#[tokio::test]
async fn with_config_only_on_no_password_user_or_host_comes_from_the_environment() {
    let server = support::PgServer::start();
    let mut admin = sqlx::PgConnection::connect(&server.url()).await.unwrap();
    sqlx::raw_sql(&format!(
        "CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'; GRANT CREATE ON SCHEMA public TO {ROLE}"
    ))
    .execute(&mut admin)
    .await
    .unwrap();
    let port = server.port();
    let no_password = format!("postgres://{ROLE}@127.0.0.1:{port}/postgres");
    let pgpass = std::env::temp_dir().join(format!("config-only-pgpass-{}", std::process::id()));
    std::fs::write(&pgpass, format!("127.0.0.1:{port}:*:{ROLE}:{PASSWORD}\n")).unwrap();
    // libpq and sqlx ignore a password file others can read.
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let table = support::unique_table("config_only");

    // Switch off (faucet's default): each of PGPASSWORD and the password file
    // supplies the password the URL leaves out. This is what the switch must
    // stop, so the test would pass for the wrong reason if it did not hold.
    // SAFETY (set_var/remove_var): this binary holds this one test, and no
    // other thread reads the environment while it changes.
    unsafe { std::env::set_var("PGPASSWORD", PASSWORD) };
    let store = PostgresStateStore::connect_with(&no_password, 1, &table)
        .await
        .expect("without the switch, PGPASSWORD supplies the password");
    store.ensure_table().await.unwrap();
    store.put("k", &serde_json::json!(0)).await.unwrap();
    unsafe {
        std::env::remove_var("PGPASSWORD");
        std::env::set_var("PGPASSFILE", &pgpass);
    }
    PostgresStateStore::connect_with(&no_password, 1, &table)
        .await
        .expect("without the switch, the password file supplies the password");

    // Switch on: neither is used, by either store.
    faucet_core::libpq::set_config_only(true);
    unsafe { std::env::set_var("PGPASSWORD", PASSWORD) };
    let refused = PostgresStateStore::connect_with(&no_password, 1, &table)
        .await
        .expect_err("with the switch on, a URL without a password must not borrow one");
    let message = refused.to_string();
    assert!(
        message.contains("password authentication failed"),
        "{message}"
    );
    assert!(!message.contains(PASSWORD), "{message}");
    let config = PostgresStateConfig {
        url: no_password.clone(),
        table: table.clone(),
        ..PostgresStateConfig::default()
    };
    let refused = config.connect().await.expect_err("the cached store too");
    assert!(
        refused
            .to_string()
            .contains("password authentication failed"),
        "{refused}"
    );

    // What the URL names still connects.
    let with_password = format!("postgres://{ROLE}:{PASSWORD}@127.0.0.1:{port}/postgres");
    let store = PostgresStateStore::connect_with(&with_password, 1, &table)
        .await
        .expect("a URL naming its password connects with the switch on");
    store.put("k", &serde_json::json!(1)).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(serde_json::json!(1)));

    // A setting the store cannot pin is refused, naming the variable.
    unsafe { std::env::set_var("PGUSER", ROLE) };
    let no_user = format!("postgres://127.0.0.1:{port}/postgres");
    let refused = PostgresStateStore::connect_with(&no_user, 1, &table)
        .await
        .expect_err("a URL without a user is refused while PGUSER is set");
    assert!(refused.to_string().contains("PGUSER"), "{refused}");

    faucet_core::libpq::set_config_only(false);
    unsafe {
        std::env::remove_var("PGPASSWORD");
        std::env::remove_var("PGPASSFILE");
        std::env::remove_var("PGUSER");
    }
    let _ = std::fs::remove_file(&pgpass);
}
