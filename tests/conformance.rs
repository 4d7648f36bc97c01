//! One suite of `StateStore` semantics, run against every store: the same
//! checks must pass for faucet-core's `MemoryStateStore` (the reference) and
//! for each store of this crate.

mod support;

use std::sync::Arc;

use faucet_core::FaucetError;
use faucet_core::state::{MemoryStateStore, StateStore};
use faucet_state_postgres::PostgresStateStore;
use serde_json::{Value, json};

type Store = Arc<dyn StateStore>;

async fn absent_key_reads_none(store: Store) {
    assert_eq!(store.get("absent").await.unwrap(), None);
}

async fn put_then_get_returns_the_value(store: Store) {
    let value = json!({"cursor": {"page": 3, "ids": [1, 2]}, "done": false});
    store.put("k", &value).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(value));
}

async fn put_overwrites(store: Store) {
    store.put("k", &json!(1)).await.unwrap();
    store.put("k", &json!("two")).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!("two")));
}

async fn delete_removes_and_is_idempotent(store: Store) {
    store.delete("never").await.unwrap();
    store.put("k", &json!(1)).await.unwrap();
    store.delete("k").await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), None);
    store.delete("k").await.unwrap();
    store.put("k", &json!(2)).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!(2)));
}

async fn keys_are_independent(store: Store) {
    for i in 0..20 {
        store.put(&format!("key-{i}"), &json!(i)).await.unwrap();
    }
    store.delete("key-7").await.unwrap();
    for i in 0..20 {
        let expected = (i != 7).then(|| json!(i));
        assert_eq!(store.get(&format!("key-{i}")).await.unwrap(), expected);
    }
}

async fn every_json_kind_round_trips(store: Store) {
    let values: [Value; 8] = [
        json!(null),
        json!(true),
        json!(-12),
        json!(u64::MAX),
        json!(2.5),
        json!("text with \"quotes\" and ünïcødé and \u{0} nul"),
        json!([1, [2, [3]]]),
        json!({"a": {"b": {"c": null}}, "k\u{0}": 1}),
    ];
    for (i, value) in values.iter().enumerate() {
        store.put(&format!("kind-{i}"), value).await.unwrap();
    }
    for (i, value) in values.iter().enumerate() {
        assert_eq!(
            store.get(&format!("kind-{i}")).await.unwrap().as_ref(),
            Some(value)
        );
    }
}

async fn invalid_keys_are_refused(store: Store) {
    for key in ["", ".dot", "a/b", "a b", "é"] {
        assert!(
            matches!(store.get(key).await, Err(FaucetError::State(_))),
            "get({key:?})"
        );
        assert!(
            matches!(store.put(key, &json!(1)).await, Err(FaucetError::State(_))),
            "put({key:?})"
        );
        assert!(
            matches!(store.delete(key).await, Err(FaucetError::State(_))),
            "delete({key:?})"
        );
    }
}

async fn check_passes_on_a_healthy_store(store: Store) {
    let report = store.check(&Default::default()).await.unwrap();
    assert_eq!(report.failed_count(), 0, "{report:?}");
    assert!(!report.probes.is_empty());
    assert_eq!(
        store
            .get(faucet_core::state::DOCTOR_SENTINEL_KEY)
            .await
            .unwrap(),
        None
    );
}

/// Instantiates every check above for one store, built by `$make` (an async
/// expression yielding a `Store` with no rows).
macro_rules! conformance {
    ($suite:ident, $make:expr) => {
        mod $suite {
            use super::*;
            conformance!(@tests $make;
                absent_key_reads_none,
                put_then_get_returns_the_value,
                put_overwrites,
                delete_removes_and_is_idempotent,
                keys_are_independent,
                every_json_kind_round_trips,
                invalid_keys_are_refused,
                check_passes_on_a_healthy_store,
            );
        }
    };
    (@tests $make:expr; $($check:ident),+ $(,)?) => {
        $(
            #[tokio::test]
            async fn $check() {
                super::$check($make).await;
            }
        )+
    };
}

async fn memory() -> Store {
    Arc::new(MemoryStateStore::new())
}

async fn plain() -> Store {
    let table = support::unique_table("conformance_plain");
    let store = PostgresStateStore::connect_with(&support::database_url(), 2, &table)
        .await
        .unwrap();
    store.ensure_table().await.unwrap();
    Arc::new(store)
}

conformance!(memory_store, memory().await);
conformance!(plain_store, plain().await);
