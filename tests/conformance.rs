//! One suite of `StateStore` semantics, run against every store: the same
//! checks must pass for faucet-core's `MemoryStateStore` (the reference) and
//! for each store of this crate.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use faucet_core::FaucetError;
use faucet_core::state::{MemoryStateStore, StateStore};
use faucet_state_postgres::{CacheOptions, Durability, PostgresStateStore};
use serde_json::{Value, json};

type Store = Arc<dyn StateStore>;
type FlushFuture = Pin<Box<dyn Future<Output = Result<(), FaucetError>> + Send>>;

/// A store under test, with what the flush checks need: how to flush it, and
/// a reader that sees only what has been persisted (for stores without a
/// write buffer, the store itself).
struct Subject {
    store: Store,
    flush: Box<dyn Fn() -> FlushFuture + Send + Sync>,
    persisted: Store,
}

impl std::ops::Deref for Subject {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

impl Subject {
    fn unbuffered(store: Store) -> Self {
        Subject {
            persisted: store.clone(),
            store,
            flush: Box::new(|| Box::pin(async { Ok(()) })),
        }
    }
}

async fn absent_key_reads_none(store: Subject) {
    assert_eq!(store.get("absent").await.unwrap(), None);
}

async fn put_then_get_returns_the_value(store: Subject) {
    let value = json!({"cursor": {"page": 3, "ids": [1, 2]}, "done": false});
    store.put("k", &value).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(value));
}

async fn put_overwrites(store: Subject) {
    store.put("k", &json!(1)).await.unwrap();
    store.put("k", &json!("two")).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!("two")));
}

async fn delete_removes_and_is_idempotent(store: Subject) {
    store.delete("never").await.unwrap();
    store.put("k", &json!(1)).await.unwrap();
    store.delete("k").await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), None);
    store.delete("k").await.unwrap();
    store.put("k", &json!(2)).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!(2)));
}

async fn keys_are_independent(store: Subject) {
    for i in 0..20 {
        store.put(&format!("key-{i}"), &json!(i)).await.unwrap();
    }
    store.delete("key-7").await.unwrap();
    for i in 0..20 {
        let expected = (i != 7).then(|| json!(i));
        assert_eq!(store.get(&format!("key-{i}")).await.unwrap(), expected);
    }
}

async fn every_json_kind_round_trips(store: Subject) {
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

async fn invalid_keys_are_refused(store: Subject) {
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

async fn flush_makes_writes_visible_to_a_fresh_reader(store: Subject) {
    store.put("gone", &json!("soon")).await.unwrap();
    (store.flush)().await.unwrap();
    store.put("a", &json!({"v": 1})).await.unwrap();
    store.put("a", &json!({"v": 2})).await.unwrap();
    store.put("b", &json!([true])).await.unwrap();
    store.delete("gone").await.unwrap();
    (store.flush)().await.unwrap();
    assert_eq!(
        store.persisted.get("a").await.unwrap(),
        Some(json!({"v": 2}))
    );
    assert_eq!(store.persisted.get("b").await.unwrap(), Some(json!([true])));
    assert_eq!(store.persisted.get("gone").await.unwrap(), None);
    (store.flush)().await.unwrap();
}

async fn check_passes_on_a_healthy_store(store: Subject) {
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
/// expression yielding a `Subject` with no rows).
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
                flush_makes_writes_visible_to_a_fresh_reader,
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
    // A store in prepared mode: not behind a transaction pooler.
    ($suite:ident, $make:expr, direct_connections_only) => {
        conformance!($suite, {
            if support::via_pgbouncer() {
                eprintln!("skipped: prepared statements need connections that keep their session");
                return;
            }
            $make
        });
    };
}

async fn memory() -> Subject {
    Subject::unbuffered(Arc::new(MemoryStateStore::new()))
}

async fn plain_store(prepared: bool) -> PostgresStateStore {
    let table = support::unique_table("conformance");
    let store = PostgresStateStore::connect_with(&support::database_url(), 2, &table)
        .await
        .unwrap()
        .with_prepared_statements(prepared);
    store.ensure_table().await.unwrap();
    store
}

async fn plain(prepared: bool) -> Subject {
    Subject::unbuffered(Arc::new(plain_store(prepared).await))
}

async fn cached(durability: Durability, prepared: bool) -> Subject {
    let plain = plain_store(prepared).await;
    let persisted: Store =
        Arc::new(PostgresStateStore::from_pool(plain.pool().clone(), plain.table()).unwrap());
    let cached = Arc::new(
        plain
            .cached(CacheOptions::new().durability(durability))
            .unwrap(),
    );
    Subject {
        store: cached.clone(),
        flush: Box::new(move || {
            let cached = cached.clone();
            Box::pin(async move { cached.flush().await })
        }),
        persisted,
    }
}

conformance!(memory_store, memory().await);
conformance!(plain_store, plain(false).await);
conformance!(
    cached_write_through,
    cached(Durability::WriteThrough, false).await
);
conformance!(
    cached_group_commit,
    cached(Durability::GroupCommit, false).await
);
conformance!(
    cached_write_behind,
    cached(Durability::WriteBehind, false).await
);
conformance!(plain_prepared, plain(true).await, direct_connections_only);
conformance!(
    cached_write_through_prepared,
    cached(Durability::WriteThrough, true).await,
    direct_connections_only
);
conformance!(
    cached_group_commit_prepared,
    cached(Durability::GroupCommit, true).await,
    direct_connections_only
);
conformance!(
    cached_write_behind_prepared,
    cached(Durability::WriteBehind, true).await,
    direct_connections_only
);
