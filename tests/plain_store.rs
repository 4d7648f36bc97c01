//! The plain store against a real PostgreSQL (throwaway, or `DATABASE_URL`).

mod row_locks;
mod support;

use std::sync::Arc;

use faucet_core::FaucetError;
use faucet_core::state::StateStore;
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
    let first: f64 = sqlx::query_scalar(&ts_sql)
        .fetch_one(store.pool())
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    store.put("k", &json!(2)).await.unwrap();
    let second: f64 = sqlx::query_scalar(&ts_sql)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert!(second > first, "{second} is not after {first}");
}

/// A pool aimed at a port where nothing listens: any SQL sent through it
/// fails with a connection error, so an operation that returns a validation
/// error instead provably sent nothing.
fn unreachable_pool() -> sqlx::PgPool {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(2))
        .connect_lazy(&format!("postgres://u:hunter2-secret@127.0.0.1:{port}/db"))
        .unwrap()
}

const BAD_KEYS: &[&str] = &[
    "",
    ".hidden",
    ".",
    "..",
    "a/../b", // invalid in 1.0 (no `/`) and in 1.16 (a `..` segment)
    "a b",
    "a%b",
    "a'b",
    "a\"b",
    "é",
    "a\0b",
    "line\nbreak",
];

fn assert_rejected_key(result: Result<impl std::fmt::Debug, FaucetError>, key: &str) {
    match result {
        Err(FaucetError::State(msg)) => assert!(
            msg.contains("state key"),
            "key {key:?}: expected a key validation error, got {msg}"
        ),
        other => panic!("key {key:?}: expected a key validation error, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_keys_are_refused_before_any_sql() {
    let store = PostgresStateStore::from_pool(unreachable_pool(), "state").unwrap();
    let long_key = "k".repeat(257);
    let keys = BAD_KEYS.iter().copied().chain([long_key.as_str()]);
    for key in keys {
        assert_rejected_key(store.get(key).await, key);
        assert_rejected_key(store.put(key, &json!(1)).await, key);
        assert_rejected_key(store.delete(key).await, key);
        assert_rejected_key(
            store.put_many(&[("ok", json!(1)), (key, json!(2))]).await,
            key,
        );
        assert_rejected_key(store.delete_many(&["ok", key]).await, key);
        assert_rejected_key(store.get_many(&["ok", key]).await, key);
        assert_rejected_key(store.compare_and_put(key, None, &json!(1)).await, key);
        let batch = [("ok".to_owned(), json!(1)), (key.to_owned(), json!(2))];
        assert_rejected_key(store.put_batch(&batch).await, key);
    }
    let err = store.list("a%").await.unwrap_err().to_string();
    assert!(err.contains("invalid key prefix"), "{err}");
}

#[tokio::test]
async fn bad_table_names_and_pool_sizes_are_refused_before_connecting() {
    // The URL points nowhere: reaching the network would give a connect error.
    let dead_url = "postgres://u:hunter2-secret@127.0.0.1:1/db";
    let long_name = "t".repeat(64);
    for table in [
        "",
        "a-b",
        "a.b",
        "a b",
        "x\";drop table y;--",
        "tëst",
        "a\0",
        &long_name,
    ] {
        for result in [
            PostgresStateStore::connect_with(dead_url, 5, table).await,
            PostgresStateStore::from_pool(unreachable_pool(), table),
        ] {
            match result {
                Err(FaucetError::Config(msg)) => {
                    assert!(msg.contains("invalid table name"), "{table:?}: {msg}")
                }
                other => panic!("{table:?}: expected a table-name error, got {other:?}"),
            }
        }
    }
    let zero = PostgresStateStore::connect_with(dead_url, 0, "state").await;
    assert!(
        matches!(&zero, Err(FaucetError::Config(m)) if m.contains("max_connections")),
        "{zero:?}"
    );
    // The longest legal identifier is accepted and kept verbatim.
    let longest = "T".repeat(63);
    let store = PostgresStateStore::from_pool(unreachable_pool(), &longest).unwrap();
    assert_eq!(store.table(), longest);
}

#[tokio::test]
async fn table_names_keep_their_case_and_may_be_reserved_words() {
    let url = support::database_url();
    for name in [support::unique_table("MixedCase"), "select".to_owned()] {
        let store = PostgresStateStore::connect_with(&url, 1, &name)
            .await
            .unwrap();
        store.ensure_table().await.unwrap();
        store.put("k", &json!(name)).await.unwrap();
        let exact: Value =
            sqlx::query_scalar(&format!("SELECT value FROM \"{name}\" WHERE key = 'k'"))
                .fetch_one(store.pool())
                .await
                .unwrap();
        assert_eq!(exact, json!(name));
        sqlx::query(&format!("DROP TABLE \"{name}\""))
            .execute(store.pool())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn nul_characters_round_trip_through_the_documented_envelope() {
    let store = fresh_store("nul").await;
    let value = json!({"cursor": "a\u{0}b", "k\u{0}ey": ["\u{0}"]});
    store.put("nul", &value).await.unwrap();
    assert_eq!(store.get("nul").await.unwrap(), Some(value.clone()));

    let raw: Value = sqlx::query_scalar(&format!(
        "SELECT value FROM \"{}\" WHERE key = 'nul'",
        store.table()
    ))
    .fetch_one(store.pool())
    .await
    .unwrap();
    let text = raw[ENVELOPE_KEY].as_str().expect("stored as an envelope");
    assert_eq!(serde_json::from_str::<Value>(text).unwrap(), value);

    // A user object that looks like an envelope comes back unchanged.
    let lookalike = json!({ENVELOPE_KEY: "[1]"});
    store.put("lookalike", &lookalike).await.unwrap();
    assert_eq!(store.get("lookalike").await.unwrap(), Some(lookalike));
    store.put_many(&[("batch", value.clone())]).await.unwrap();
    assert_eq!(store.get_many(&["batch"]).await.unwrap(), vec![Some(value)]);
}

#[tokio::test]
async fn oversize_values_are_refused_and_leave_the_row_alone() {
    let store = fresh_store("oversize").await.with_max_value_bytes(1024);
    store.put("k", &json!("small")).await.unwrap();
    let big = json!("x".repeat(2000));
    let err = store.put("k", &big).await.unwrap_err().to_string();
    assert!(
        err.contains("'k'") && err.contains("2002 bytes") && err.contains("1024 bytes"),
        "{err}"
    );
    let err = store.put_many(&[("k", big)]).await.unwrap_err().to_string();
    assert!(err.contains("over the limit"), "{err}");
    assert_eq!(store.get("k").await.unwrap(), Some(json!("small")));

    let default_store = fresh_store("oversize_default").await;
    assert_eq!(default_store.max_value_bytes(), 16 * 1024 * 1024);
    let huge = json!("y".repeat(16 * 1024 * 1024));
    let err = default_store
        .put("huge", &huge)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("16777218 bytes"), "{err}");

    let deep = (0..200).fold(json!(0), |inner, _| json!([inner]));
    let err = default_store
        .put("deep", &deep)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nests 200 levels"), "{err}");
    assert_eq!(row_count(&default_store).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_to_one_key_leave_one_of_the_written_values() {
    let store = Arc::new(fresh_store("hot_key").await);
    let tasks: Vec<_> = (0..64)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..5 {
                    store
                        .put("hot", &json!({"task": task, "i": i}))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let last = store.get("hot").await.unwrap().expect("a value");
    assert_eq!(
        last["i"],
        json!(4),
        "the final value is some task's last write"
    );
    assert!((0..64).contains(&last["task"].as_i64().unwrap()));
    assert_eq!(row_count(&store).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_puts_to_distinct_keys_all_land() {
    let store = Arc::new(fresh_store("distinct").await);
    let tasks: Vec<_> = (0..64)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..5 {
                    store.put(&format!("task-{task}"), &json!(i)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let keys: Vec<String> = (0..64).map(|t| format!("task-{t}")).collect();
    let values = store.get_many(&keys).await.unwrap();
    assert!(values.iter().all(|v| *v == Some(json!(4))), "{values:?}");
    assert_eq!(row_count(&store).await, 64);
}

#[tokio::test]
async fn batch_operations_are_last_wins_atomic_and_literal() {
    let store = fresh_store("batch").await;
    store
        .put_many(&[("a", json!(1)), ("b", json!(2)), ("a", json!(3))])
        .await
        .unwrap();
    assert_eq!(
        store.get_many(&["a", "b", "missing", "a"]).await.unwrap(),
        vec![Some(json!(3)), Some(json!(2)), None, Some(json!(3))]
    );
    store.put_many::<&str>(&[]).await.unwrap();
    store.delete_many::<&str>(&[]).await.unwrap();
    assert!(store.get_many::<&str>(&[]).await.unwrap().is_empty());

    // Atomic: one row the server refuses rolls back the whole batch.
    sqlx::query(&format!(
        "ALTER TABLE \"{}\" ADD CONSTRAINT no_poison CHECK (key <> 'poison')",
        store.table()
    ))
    .execute(store.pool())
    .await
    .unwrap();
    let err = store
        .put_many(&[("c", json!(1)), ("poison", json!(1)), ("a", json!(9))])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("put_many") && err.contains("no_poison"),
        "{err}"
    );
    assert_eq!(store.get("c").await.unwrap(), None);
    assert_eq!(store.get("a").await.unwrap(), Some(json!(3)));

    store.delete_many(&["a", "missing", "a"]).await.unwrap();
    assert_eq!(
        store.get_many(&["a", "b"]).await.unwrap(),
        vec![None, Some(json!(2))]
    );

    // list: byte order, literal prefix (`_` is not a wildcard).
    let keys = ["a_b", "axb", "a_c", "B", "a", "a_b.c"];
    store.put_many(&keys.map(|k| (k, json!(k)))).await.unwrap();
    assert_eq!(store.list("a_").await.unwrap(), ["a_b", "a_b.c", "a_c"]);
    assert_eq!(
        store.list("").await.unwrap(),
        ["B", "a", "a_b", "a_b.c", "a_c", "axb", "b"]
    );
    assert!(store.list("zzz").await.unwrap().is_empty());
}

/// A batch sends its keys and values as array literals inside string
/// literals (default mode) or as array parameters (prepared mode): every
/// character those layers treat specially comes back as it was put.
#[tokio::test]
async fn batch_values_come_back_through_every_quoting_layer() {
    let awkward = [
        json!("it's"),
        json!("back\\slash \\\\ and \"quoted\""),
        json!("{braces}, commas, \"NULL\""),
        json!("NULL"),
        json!(""),
        json!("  spaced  "),
        json!({"'": "\"", "\\": ["{", "}", ","], "ünï": "€ \u{1F600}"}),
        json!("nul \u{0} inside"),
        json!(["NULL", null, "", "E'x'"]),
    ];
    for prepared in [false, true] {
        let store = fresh_store("quoting")
            .await
            .with_prepared_statements(prepared);
        let entries: Vec<(String, Value)> = awkward
            .iter()
            .enumerate()
            .map(|(i, value)| (format!("k:{i}.x-y_z"), value.clone()))
            .collect();
        store.put_many(&entries).await.unwrap();
        let keys: Vec<&str> = entries.iter().map(|(key, _)| key.as_str()).collect();
        let expected: Vec<Option<Value>> = awkward.iter().cloned().map(Some).collect();
        assert_eq!(
            store.get_many(&keys).await.unwrap(),
            expected,
            "prepared: {prepared}"
        );
        for (key, value) in &entries {
            assert_eq!(store.get(key).await.unwrap().as_ref(), Some(value));
        }
        store.delete_many(&keys[..4]).await.unwrap();
        assert_eq!(row_count(&store).await, awkward.len() as i64 - 4);
    }
}

#[tokio::test]
async fn rows_are_plain_sql_readable_and_foreign_rows_are_readable() {
    let store = fresh_store("raw_sql").await;
    store
        .put("pipeline:orders", &json!({"lsn": "0/16B3748"}))
        .await
        .unwrap();
    let (value, age_ok): (Value, bool) = sqlx::query_as(&format!(
        "SELECT value, updated_at > now() - interval '1 minute' FROM \"{}\" WHERE key = $1",
        store.table()
    ))
    .bind("pipeline:orders")
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(value, json!({"lsn": "0/16B3748"}));
    assert!(age_ok);

    // A row written by another tool (or the other store) is read as is.
    sqlx::query(&format!(
        "INSERT INTO \"{}\" (key, value) VALUES ('written-by-sql', '[1, {{\"x\": null}}]')",
        store.table()
    ))
    .execute(store.pool())
    .await
    .unwrap();
    assert_eq!(
        store.get("written-by-sql").await.unwrap(),
        Some(json!([1, {"x": null}]))
    );
}

/// Prepared mode: the statements are named prepared statements on the
/// connection (one pooled connection, so the check sees the same session),
/// they read and write the same rows as the default mode, and the session
/// carries the store's statement timeout, so the server still bounds them.
#[tokio::test]
async fn prepared_mode_prepares_statements_and_keeps_the_server_side_timeout() {
    if support::via_pgbouncer() {
        eprintln!("skipped: prepared statements need connections that keep their session");
        return;
    }
    let table = support::unique_table("prepared");
    let store = PostgresStateStore::connect_with(&support::database_url(), 1, &table)
        .await
        .unwrap()
        .with_prepared_statements(true)
        .with_statement_timeout(std::time::Duration::from_millis(300));
    store.ensure_table().await.unwrap();
    assert!(store.prepared_statements());

    store.put("a", &json!({"v": 1})).await.unwrap();
    store
        .put_many(&[("b", json!(2)), ("c", json!("nul\u{0}"))])
        .await
        .unwrap();
    store.delete_many(&["b"]).await.unwrap();
    assert_eq!(store.get("a").await.unwrap(), Some(json!({"v": 1})));
    assert_eq!(store.get("b").await.unwrap(), None);
    assert_eq!(store.get("c").await.unwrap(), Some(json!("nul\u{0}")));
    // The default mode reads what prepared mode wrote.
    let simple = PostgresStateStore::from_pool(store.pool().clone(), &table).unwrap();
    assert_eq!(simple.get("c").await.unwrap(), Some(json!("nul\u{0}")));

    let (prepared, timeout): (i64, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql), \
         current_setting('statement_timeout')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert!(
        prepared >= 3,
        "{prepared} prepared statements on the connection"
    );
    assert_eq!(timeout, "300ms");

    row_locks::a_stuck_put_is_ended_by_the_server(&store, &support::database_url(), "a").await;
}

/// Regression: a connection the store kept from before prepared mode was
/// turned on (from the message form pinned with `false`) (the reserve bypasses the pool's check of session settings)
/// ran prepared statements without the session's statement timeout, so a
/// put stuck on a row lock waited for the client deadline instead of being
/// cancelled by the server.
#[tokio::test]
async fn turning_prepared_mode_on_later_keeps_the_server_side_timeout() {
    if support::via_pgbouncer() {
        eprintln!("skipped: prepared statements need connections that keep their session");
        return;
    }
    let table = support::unique_table("prepared_later");
    let store = PostgresStateStore::connect_with(&support::database_url(), 3, &table)
        .await
        .unwrap()
        .with_prepared_statements(false)
        .with_statement_timeout(std::time::Duration::from_millis(300));
    store.ensure_table().await.unwrap();
    // Answered as a message: the connection is kept for the next call.
    store.put("a", &json!(1)).await.unwrap();
    let store = store.with_prepared_statements(true);
    row_locks::a_stuck_put_is_ended_by_the_server(&store, &support::database_url(), "a").await;
}

/// faucet-core 1.16's compare-and-put, in both protocol modes: written only
/// while the row still holds `expected` (or, for `None`, while there is no
/// row), values compared as stored (the U+0000 envelope included).
#[tokio::test]
async fn compare_and_put_writes_only_over_the_expected_value() {
    for prepared in [false, true] {
        if prepared && support::via_pgbouncer() {
            continue;
        }
        let store = fresh_store("cas").await.with_prepared_statements(prepared);
        assert!(store.compare_and_put("k", None, &json!(1)).await.unwrap());
        assert!(!store.compare_and_put("k", None, &json!(2)).await.unwrap());
        assert!(
            !store
                .compare_and_put("k", Some(&json!(2)), &json!(3))
                .await
                .unwrap()
        );
        assert_eq!(store.get("k").await.unwrap(), Some(json!(1)));
        assert!(
            store
                .compare_and_put("k", Some(&json!(1)), &json!({"a": [1, "x"]}))
                .await
                .unwrap()
        );
        assert!(
            store
                .compare_and_put("k", Some(&json!({"a": [1, "x"]})), &json!("nul\u{0}"))
                .await
                .unwrap()
        );
        assert!(
            store
                .compare_and_put("k", Some(&json!("nul\u{0}")), &json!(4))
                .await
                .unwrap()
        );
        assert_eq!(store.get("k").await.unwrap(), Some(json!(4)));
        // A deleted key is absent again.
        store.delete("k").await.unwrap();
        assert!(
            !store
                .compare_and_put("k", Some(&json!(4)), &json!(5))
                .await
                .unwrap()
        );
        assert!(store.compare_and_put("k", None, &json!(5)).await.unwrap());
        assert_eq!(store.get("k").await.unwrap(), Some(json!(5)));
    }
}

/// Many writers on two stores (two pools) racing to claim one absent key:
/// exactly one wins, and the row holds the winner's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_compare_and_puts_on_an_absent_key_have_exactly_one_winner() {
    let first = fresh_store("cas_race").await;
    let second = PostgresStateStore::connect_with(&support::database_url(), 5, first.table())
        .await
        .unwrap();
    for round in 0..5 {
        let key = format!("claim-{round}");
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let store = if i % 2 == 0 {
                    first.clone()
                } else {
                    second.clone()
                };
                let key = key.clone();
                tokio::spawn(async move {
                    let won = store.compare_and_put(&key, None, &json!(i)).await.unwrap();
                    (i, won)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for task in tasks {
            let (i, won) = task.await.unwrap();
            if won {
                winners.push(i);
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: winners {winners:?}");
        assert_eq!(first.get(&key).await.unwrap(), Some(json!(winners[0])));
    }
}

/// faucet-core 1.16's atomic batch: every entry or none, a bad key or value
/// included, and a key given twice keeps its last value.
#[tokio::test]
async fn put_batch_writes_every_entry_or_none() {
    let store = fresh_store("put_batch").await;
    let batch = vec![
        ("a".to_owned(), json!(1)),
        ("b".to_owned(), json!(2)),
        ("a".to_owned(), json!(3)),
        ("a".to_owned(), json!(4)),
    ];
    store.put_batch(&batch).await.unwrap();
    assert_eq!(
        store.get_many(&["a", "b"]).await.unwrap(),
        [Some(json!(4)), Some(json!(2))]
    );
    let bad = vec![("c".to_owned(), json!(1)), ("bad key".to_owned(), json!(2))];
    assert!(store.put_batch(&bad).await.is_err());
    let deep = (0..200).fold(json!(0), |inner, _| json!([inner]));
    let too_deep = vec![("c".to_owned(), json!(1)), ("d".to_owned(), deep)];
    assert!(store.put_batch(&too_deep).await.is_err());
    assert_eq!(row_count(&store).await, 2);
}

/// A prefix may hold what a key may hold by the core's rules: `/` (an owner
/// namespace) from faucet-core 1.16 on; with 1.0 it is no key character,
/// and such a prefix is refused like any other.
#[tokio::test]
async fn list_accepts_every_character_the_core_allows_in_a_key() {
    let store = fresh_store("list_slash").await;
    store.put("acme:x", &json!(1)).await.unwrap();
    let slash_is_a_key_character = faucet_core::state::validate_state_key("a/b").is_ok();
    match store.list("acme/").await {
        Ok(keys) => assert!(slash_is_a_key_character && keys.is_empty(), "{keys:?}"),
        Err(err) => assert!(!slash_is_a_key_character, "{err}"),
    }
    assert!(store.list("acme x").await.is_err());
    assert_eq!(store.list("acme:").await.unwrap(), ["acme:x"]);
}
