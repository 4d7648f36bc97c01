//! The public API of the published 1.5.1, used as its documentation uses it:
//! code written against 1.5.1 compiles unchanged against this crate (issue
//! 22, item 1). The signatures are pinned as function pointers, so a change
//! that still happens to compile at one call site (a new generic parameter,
//! a narrower argument type) fails here. Nothing here needs a server.

use std::future::Future;

use faucet_core::FaucetError;
use faucet_core::state::StateStore;
use faucet_state_postgres::PostgresStateStore;
use faucet_state_postgres::store;

/// 1.5.1's `connect(connection_url: &str)`.
fn connect(url: &str) -> impl Future<Output = Result<PostgresStateStore, FaucetError>> + '_ {
    PostgresStateStore::connect(url)
}

/// 1.5.1's `connect_with(url: &str, max_connections: u32, table: &str)`.
fn connect_with<'a>(
    url: &'a str,
    max_connections: u32,
    table: &'a str,
) -> impl Future<Output = Result<PostgresStateStore, FaucetError>> + 'a {
    PostgresStateStore::connect_with(url, max_connections, table)
}

#[test]
fn the_1_5_1_api_compiles_unchanged() {
    // Both module paths of 1.5.1.
    let _: &str = store::DEFAULT_TABLE;
    let _: &str = faucet_state_postgres::DEFAULT_TABLE;
    assert_eq!(store::DEFAULT_TABLE, "faucet_state");
    let _same_type: fn(store::PostgresStateStore) -> PostgresStateStore = |s| s;
    // The constructors, by signature.
    let _ = connect;
    let _ = connect_with;
    let _table: fn(&PostgresStateStore) -> &str = PostgresStateStore::table;
    // A store behind `Arc<dyn StateStore>`, as faucet's CLI holds it.
    fn _as_dyn(store: PostgresStateStore) -> std::sync::Arc<dyn StateStore> {
        std::sync::Arc::new(store)
    }
    fn _ensure_table(
        store: &PostgresStateStore,
    ) -> impl Future<Output = Result<(), FaucetError>> + '_ {
        store.ensure_table()
    }
}

#[tokio::test]
async fn from_pool_takes_any_string_as_1_5_1_does() {
    let pool = || {
        sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://app@localhost/app")
            .unwrap()
    };
    // `impl Into<String>`: a `&str`, a `String`, a `&String`.
    let owned = String::from("pipeline_state");
    let by_str = PostgresStateStore::from_pool(pool(), "pipeline_state").unwrap();
    let by_string = PostgresStateStore::from_pool(pool(), owned.clone()).unwrap();
    let by_ref = PostgresStateStore::from_pool(pool(), &owned).unwrap();
    let default = PostgresStateStore::from_pool(pool(), store::DEFAULT_TABLE).unwrap();
    for store in [&by_str, &by_string, &by_ref] {
        assert_eq!(store.table(), "pipeline_state");
    }
    assert_eq!(default.table(), "faucet_state");
    // Validation is this crate's: a name that is not an identifier is
    // refused before anything is sent.
    assert!(PostgresStateStore::from_pool(pool(), String::from("bad-name")).is_err());
}
