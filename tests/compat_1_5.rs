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

mod support;

use faucet_state_postgres::{CacheOptions, Durability};
use serde_json::{Value, json};

/// How 1.5.1 reads a stored JSONB value (its `unwrap_nul`, from its source):
/// a one-member object `$faucet_nul_escaped_json` holding a string is the
/// JSON text of the value; anything else is the value itself.
fn read_as_1_5_1(stored: Value) -> Value {
    match &stored {
        Value::Object(map) if map.len() == 1 => match map.get("$faucet_nul_escaped_json") {
            Some(Value::String(text)) => serde_json::from_str(text).unwrap(),
            _ => stored,
        },
        _ => stored,
    }
}

/// The values whose stored form matters: plain ones, U+0000 in a string and
/// in a member name, and user objects shaped like either envelope.
fn awkward_values() -> Vec<Value> {
    vec![
        json!({"lsn": "0/16B3748"}),
        json!("a\u{0}b"),
        json!({"k\u{0}": [1, "x\u{0}y"]}),
        json!({"$faucet_nul_escaped_json": "x"}),
        json!({"$faucet_nul_escaped_json": "[1]", "other": 1}),
        json!({"$faucet_state_encoded": "[2]"}),
        json!(["$faucet_nul_escaped_json"]),
    ]
}

async fn tables(tag: &str) -> (sqlx::PgPool, PostgresStateStore, String) {
    let url = support::database_url();
    let table = support::unique_table(tag);
    let plain = PostgresStateStore::connect_with(&url, 3, &table)
        .await
        .unwrap();
    plain.ensure_table().await.unwrap();
    (sqlx::PgPool::connect(&url).await.unwrap(), plain, table)
}

/// Issue 22, item 2, this crate → 1.5.1: every row this crate writes, plain
/// and cached, reads back under 1.5.1's rule as the value that was put.
/// Checked to fail before the change: `"a\u0000b"` read back under 1.5.1's
/// rule as `{"$faucet_state_encoded": "\"a\\u0000b\""}`.
#[tokio::test]
async fn rows_this_crate_writes_read_back_in_1_5_1() {
    let (admin, plain, table) = tables("compat_to_151").await;
    let cached = plain
        .clone()
        .cached(CacheOptions::new().durability(Durability::WriteBehind))
        .unwrap();
    for (i, value) in awkward_values().into_iter().enumerate() {
        plain.put(&format!("plain{i}"), &value).await.unwrap();
        cached.put(&format!("cached{i}"), &value).await.unwrap();
        cached.flush().await.unwrap();
        for key in [format!("plain{i}"), format!("cached{i}")] {
            let stored: Value =
                sqlx::query_scalar(&format!("SELECT value FROM \"{table}\" WHERE key = $1"))
                    .bind(&key)
                    .fetch_one(&admin)
                    .await
                    .unwrap();
            assert_eq!(read_as_1_5_1(stored), value, "{key}");
        }
    }
    cached.shutdown().await.unwrap();
}

/// Issue 22, item 2, 1.5.1 → this crate: rows as 1.5.1 writes them (its
/// envelope for U+0000 and for objects shaped like it, everything else as
/// itself) read back here, plain and cached, as the value 1.5.1 was given.
/// Checked to fail before the change: `"a\u0000b"` read back as the
/// envelope object itself.
#[tokio::test]
async fn rows_1_5_1_writes_read_back_here() {
    let (admin, plain, table) = tables("compat_from_151").await;
    let envelope = |value: &Value| json!({"$faucet_nul_escaped_json": value.to_string()});
    let rows = [
        (json!({"lsn": "0/16B3748"}), json!({"lsn": "0/16B3748"})),
        (json!("a\u{0}b"), envelope(&json!("a\u{0}b"))),
        (
            json!({"k\u{0}": [1, "x\u{0}y"]}),
            envelope(&json!({"k\u{0}": [1, "x\u{0}y"]})),
        ),
        (
            json!({"$faucet_nul_escaped_json": "x"}),
            envelope(&json!({"$faucet_nul_escaped_json": "x"})),
        ),
        (
            json!({"$faucet_nul_escaped_json": "[1]", "other": 1}),
            json!({"$faucet_nul_escaped_json": "[1]", "other": 1}),
        ),
    ];
    for (i, (value, stored)) in rows.iter().enumerate() {
        sqlx::query(&format!(
            "INSERT INTO \"{table}\" (key, value) VALUES ($1, $2)"
        ))
        .bind(format!("k{i}"))
        .bind(stored)
        .execute(&admin)
        .await
        .unwrap();
        assert_eq!(
            read_as_1_5_1(stored.clone()),
            *value,
            "the row as 1.5.1 writes it"
        );
    }
    let cached = plain.clone().cached(CacheOptions::new()).unwrap();
    for (i, (value, _)) in rows.iter().enumerate() {
        let key = format!("k{i}");
        assert_eq!(
            plain.get(&key).await.unwrap().as_ref(),
            Some(value),
            "{key}"
        );
        assert_eq!(
            cached.get(&key).await.unwrap().as_ref(),
            Some(value),
            "{key}"
        );
    }
    cached.shutdown().await.unwrap();
}

/// Issue 22, item 2: `compare_and_put` compares values, not stored text. A
/// row holding U+0000 whose envelope text orders the object's members
/// otherwise (as a writer with serde_json's `preserve_order` writes it)
/// matches an equal `expected`, on the plain and the cached store. Checked
/// to fail before the change (`false`: the texts differ).
#[tokio::test]
async fn compare_and_put_compares_values_inside_an_envelope() {
    let (admin, plain, table) = tables("compat_cas").await;
    let cached = plain.clone().cached(CacheOptions::new()).unwrap();
    let reordered = r#"{"b":"x\u0000","a":1}"#;
    let expected = json!({"a": 1, "b": "x\u{0}"});
    for (key, store) in [("plain", None), ("cached", Some(&cached))] {
        sqlx::query(&format!(
            "INSERT INTO \"{table}\" (key, value) VALUES ($1, $2)"
        ))
        .bind(key)
        .bind(json!({"$faucet_nul_escaped_json": reordered}))
        .execute(&admin)
        .await
        .unwrap();
        let swapped = match store {
            None => plain.compare_and_put(key, Some(&expected), &json!(2)).await,
            Some(cached) => {
                cached
                    .compare_and_put(key, Some(&expected), &json!(2))
                    .await
            }
        };
        assert!(swapped.unwrap(), "{key}: an equal value did not match");
        assert_eq!(plain.get(key).await.unwrap(), Some(json!(2)));
        // A value that differs does not match.
        let other = json!({"a": 1, "b": "y\u{0}"});
        plain.put(key, &expected).await.unwrap();
        assert!(
            !plain
                .compare_and_put(key, Some(&other), &json!(3))
                .await
                .unwrap()
        );
        assert_eq!(plain.get(key).await.unwrap(), Some(expected.clone()));
    }
    cached.shutdown().await.unwrap();
}
