//! One suite of `StateStore` semantics, run against every store: the same
//! checks must pass for faucet-core's `MemoryStateStore` (the reference) and
//! for each store of this crate.
//!
//! faucet-core 1.16's operations (`list`, `compare_and_put`, `put_batch`)
//! are checked through the trait when the `faucet-core-1-16` feature is on
//! (CI's second lane), and through the stores' inherent methods otherwise;
//! faucet-core 1.0's `MemoryStateStore` has none of them, so the reference
//! runs those cases only in that lane.

mod support;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use faucet_core::FaucetError;
use faucet_core::state::{MemoryStateStore, StateStore};
use faucet_state_postgres::{CacheOptions, Durability, PostgresStateStore};
#[cfg(not(feature = "faucet-core-1-16"))]
use faucet_state_postgres::{CachedStateStore, StateBackend};
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
    /// faucet-core 1.16's operations, where this lane can reach them.
    newer: Option<Arc<dyn Newer>>,
}

/// faucet-core 1.16's operations of a store.
#[async_trait]
trait Newer: Send + Sync {
    async fn list(&self, prefix: &str) -> Result<Vec<String>, FaucetError>;
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: &Value,
    ) -> Result<bool, FaucetError>;
    async fn put_batch(&self, entries: &[(String, Value)]) -> Result<(), FaucetError>;
}

/// Through the trait: the feature's overrides, and the reference's own.
#[cfg(feature = "faucet-core-1-16")]
struct ViaTrait(Store);

#[cfg(feature = "faucet-core-1-16")]
#[async_trait]
impl Newer for ViaTrait {
    async fn list(&self, prefix: &str) -> Result<Vec<String>, FaucetError> {
        assert!(self.0.supports_list());
        self.0.list(prefix).await
    }
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: &Value,
    ) -> Result<bool, FaucetError> {
        assert!(self.0.supports_compare_and_put());
        self.0.compare_and_put(key, expected, value).await
    }
    async fn put_batch(&self, entries: &[(String, Value)]) -> Result<(), FaucetError> {
        assert!(self.0.supports_atomic_batch());
        self.0.put_batch(entries).await
    }
}

/// Through the inherent methods, as faucet-core 1.0 users call them.
#[cfg(not(feature = "faucet-core-1-16"))]
#[async_trait]
impl Newer for PostgresStateStore {
    async fn list(&self, prefix: &str) -> Result<Vec<String>, FaucetError> {
        PostgresStateStore::list(self, prefix).await
    }
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: &Value,
    ) -> Result<bool, FaucetError> {
        PostgresStateStore::compare_and_put(self, key, expected, value).await
    }
    async fn put_batch(&self, entries: &[(String, Value)]) -> Result<(), FaucetError> {
        PostgresStateStore::put_batch(self, entries).await
    }
}

#[cfg(not(feature = "faucet-core-1-16"))]
#[async_trait]
impl<B: StateBackend> Newer for CachedStateStore<B> {
    async fn list(&self, prefix: &str) -> Result<Vec<String>, FaucetError> {
        CachedStateStore::list(self, prefix).await
    }
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: &Value,
    ) -> Result<bool, FaucetError> {
        CachedStateStore::compare_and_put(self, key, expected, value).await
    }
    async fn put_batch(&self, entries: &[(String, Value)]) -> Result<(), FaucetError> {
        CachedStateStore::put_batch(self, entries).await
    }
}

/// The newer operations of one of this crate's stores, in this lane.
#[cfg(feature = "faucet-core-1-16")]
fn newer_of<S: StateStore + 'static>(store: Arc<S>) -> Option<Arc<dyn Newer>> {
    Some(Arc::new(ViaTrait(store)))
}

#[cfg(not(feature = "faucet-core-1-16"))]
fn newer_of<S: Newer + 'static>(store: Arc<S>) -> Option<Arc<dyn Newer>> {
    Some(store)
}

impl std::ops::Deref for Subject {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

impl Subject {
    fn unbuffered(store: Store, newer: Option<Arc<dyn Newer>>) -> Self {
        Subject {
            persisted: store.clone(),
            store,
            flush: Box::new(|| Box::pin(async { Ok(()) })),
            newer,
        }
    }

    /// The newer operations, or `None` (after saying why) where this lane
    /// has none for this store.
    fn newer(&self) -> Option<&dyn Newer> {
        if self.newer.is_none() {
            eprintln!(
                "skipped: faucet-core 1.0's MemoryStateStore has no list/compare_and_put/put_batch"
            );
        }
        self.newer.as_deref()
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
    // `/` is a key character from faucet-core 1.16 on: the core decides.
    let keys = ["", ".dot", "a/b", "a/../b", "a b", "é"]
        .into_iter()
        .filter(|key| faucet_core::state::validate_state_key(key).is_err());
    for key in keys {
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

fn batch(pairs: &[(&str, Value)]) -> Vec<(String, Value)> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect()
}

async fn list_is_sorted_and_filtered_by_prefix(store: Subject) {
    let Some(newer) = store.newer() else { return };
    for key in ["ns::b", "ns::a", "other::x", "ns", "ns::a::deep"] {
        store.put(key, &json!(1)).await.unwrap();
    }
    assert_eq!(
        newer.list("ns::").await.unwrap(),
        ["ns::a", "ns::a::deep", "ns::b"]
    );
    assert_eq!(
        newer.list("").await.unwrap(),
        ["ns", "ns::a", "ns::a::deep", "ns::b", "other::x"]
    );
    store.delete("ns::a").await.unwrap();
    assert_eq!(newer.list("ns::").await.unwrap(), ["ns::a::deep", "ns::b"]);
    assert!(newer.list("none::").await.unwrap().is_empty());
    // An owner namespace, where the core's key rules allow `/` (1.16 on).
    if faucet_core::state::validate_state_key("acme/erp::orders").is_ok() {
        store.put("acme/erp::orders", &json!(1)).await.unwrap();
        assert_eq!(newer.list("acme/").await.unwrap(), ["acme/erp::orders"]);
    }
    (store.flush)().await.unwrap();
    assert_eq!(newer.list("ns::").await.unwrap(), ["ns::a::deep", "ns::b"]);
}

async fn compare_and_put_claims_an_absent_key_once(store: Subject) {
    let Some(newer) = store.newer() else { return };
    let (a, b) = (json!({"owner": "a"}), json!({"owner": "b"}));
    assert!(newer.compare_and_put("lease", None, &a).await.unwrap());
    assert!(!newer.compare_and_put("lease", None, &b).await.unwrap());
    assert_eq!(store.get("lease").await.unwrap(), Some(a));
}

async fn compare_and_put_writes_only_over_the_expected_value(store: Subject) {
    let Some(newer) = store.newer() else { return };
    let first = json!({"a": 1, "b": [true]});
    store.put("k", &first).await.unwrap();
    assert!(
        !newer
            .compare_and_put("k", Some(&json!({"a": 2})), &json!("x"))
            .await
            .unwrap()
    );
    assert!(!newer.compare_and_put("k", None, &json!("x")).await.unwrap());
    assert_eq!(store.get("k").await.unwrap(), Some(first));
    // Equal values match whatever the order of their object's keys.
    let reordered = json!({"b": [true], "a": 1});
    assert!(
        newer
            .compare_and_put("k", Some(&reordered), &json!("y"))
            .await
            .unwrap()
    );
    assert_eq!(store.get("k").await.unwrap(), Some(json!("y")));
    // A stored null is a value, not absence.
    store.delete("k").await.unwrap();
    assert!(
        !newer
            .compare_and_put("k", Some(&json!("y")), &json!(1))
            .await
            .unwrap()
    );
    assert!(
        newer
            .compare_and_put("k", None, &json!(null))
            .await
            .unwrap()
    );
    assert!(!newer.compare_and_put("k", None, &json!(1)).await.unwrap());
    assert!(
        newer
            .compare_and_put("k", Some(&json!(null)), &json!(2))
            .await
            .unwrap()
    );
    (store.flush)().await.unwrap();
    assert_eq!(store.persisted.get("k").await.unwrap(), Some(json!(2)));
}

async fn compare_and_put_refuses_an_invalid_key(store: Subject) {
    let Some(newer) = store.newer() else { return };
    let refused = newer.compare_and_put("a b", None, &json!(1)).await;
    assert!(matches!(refused, Err(FaucetError::State(_))), "{refused:?}");
}

async fn put_batch_writes_every_entry_and_a_repeated_key_keeps_its_last(store: Subject) {
    let Some(newer) = store.newer() else { return };
    let entries = batch(&[("a", json!(1)), ("b", json!({"x": 2})), ("a", json!(3))]);
    newer.put_batch(&entries).await.unwrap();
    newer.put_batch(&[]).await.unwrap();
    assert_eq!(store.get("a").await.unwrap(), Some(json!(3)));
    assert_eq!(store.get("b").await.unwrap(), Some(json!({"x": 2})));
    (store.flush)().await.unwrap();
    assert_eq!(store.persisted.get("a").await.unwrap(), Some(json!(3)));
}

async fn put_batch_with_an_invalid_key_writes_nothing(store: Subject) {
    let Some(newer) = store.newer() else { return };
    store.put("c", &json!("before")).await.unwrap();
    let refused = newer
        .put_batch(&batch(&[
            ("c", json!(1)),
            ("a b", json!(2)),
            ("d", json!(3)),
        ]))
        .await;
    assert!(matches!(refused, Err(FaucetError::State(_))), "{refused:?}");
    assert_eq!(store.get("c").await.unwrap(), Some(json!("before")));
    assert_eq!(store.get("d").await.unwrap(), None);
    (store.flush)().await.unwrap();
    assert_eq!(store.persisted.get("d").await.unwrap(), None);
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
                list_is_sorted_and_filtered_by_prefix,
                compare_and_put_claims_an_absent_key_once,
                compare_and_put_writes_only_over_the_expected_value,
                compare_and_put_refuses_an_invalid_key,
                put_batch_writes_every_entry_and_a_repeated_key_keeps_its_last,
                put_batch_with_an_invalid_key_writes_nothing,
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
    let store = Arc::new(MemoryStateStore::new());
    #[cfg(feature = "faucet-core-1-16")]
    let newer: Option<Arc<dyn Newer>> = Some(Arc::new(ViaTrait(store.clone())));
    #[cfg(not(feature = "faucet-core-1-16"))]
    let newer: Option<Arc<dyn Newer>> = None;
    Subject::unbuffered(store, newer)
}

/// A plain store whose statements go in the form `prepared` pins, or (for
/// `None`) the form it chose when connecting: prepared on a direct
/// connection, one message each behind PgBouncer.
async fn plain_store(prepared: impl Into<Option<bool>>) -> PostgresStateStore {
    let table = support::unique_table("conformance");
    let mut store = PostgresStateStore::connect_with(&support::database_url(), 2, &table)
        .await
        .unwrap();
    if let Some(prepared) = prepared.into() {
        store = store.with_prepared_statements(prepared);
    }
    store.ensure_table().await.unwrap();
    store
}

async fn plain(prepared: impl Into<Option<bool>>) -> Subject {
    let store = Arc::new(plain_store(prepared).await);
    Subject::unbuffered(store.clone(), newer_of(store))
}

async fn cached(durability: Durability, prepared: impl Into<Option<bool>>) -> Subject {
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
        newer: newer_of(cached.clone()),
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
conformance!(plain_default_form, plain(None).await);
conformance!(
    cached_group_commit_default_form,
    cached(Durability::GroupCommit, None).await
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

/// faucet-core 1.16's wrappers over the cached store, as faucet layers them:
/// `InstrumentedStateStore` (spans and `faucet_state_*` metrics around every
/// call) and `VersionedStateStore` (the pipeline's bookmark key written in the
/// versioned envelope; every other key, which is all the suite uses, passes
/// through). Both forward every operation, atomic ones included, so the
/// suite holds through them unchanged.
#[cfg(feature = "faucet-core-1-16")]
mod wrapped {
    use super::*;
    use faucet_core::state_version::{StateCodec, VersionedStateStore};
    use faucet_core::{InstrumentedStateStore, Labels};

    /// The one key the versioned wrapper envelopes; no check of the suite
    /// writes it.
    pub(super) const BOOKMARK_KEY: &str = "orders::row-0";

    pub(super) fn codec() -> StateCodec {
        StateCodec {
            owner: "postgres".to_owned(),
            schema: 0,
            legacy: false,
        }
    }

    pub(super) fn instrumented(inner: Store) -> Store {
        Arc::new(InstrumentedStateStore::new(
            inner,
            Labels::new("orders", "row-0", "run-1"),
        ))
    }

    pub(super) fn versioned(inner: Store) -> Store {
        Arc::new(VersionedStateStore::new(inner, BOOKMARK_KEY, codec()))
    }

    pub(super) async fn cached_under(durability: Durability, wrap: fn(Store) -> Store) -> Subject {
        let cached = cached(durability, false).await;
        let store = wrap(cached.store.clone());
        Subject {
            newer: Some(Arc::new(ViaTrait(store.clone()))),
            store,
            ..cached
        }
    }

    /// What the versioned wrapper writes for the bookmark is what the table
    /// holds and what the cached store serves.
    async fn the_bookmark_is_stored_in_the_versioned_envelope(durability: Durability) {
        let store = cached_under(durability, versioned).await;
        let bookmark = json!({"value": "2026-01-01T00:25:00+00:00", "boundary": ["a1"]});
        store.put(BOOKMARK_KEY, &bookmark).await.unwrap();
        (store.flush)().await.unwrap();
        let envelope = faucet_core::wrap_versioned("postgres", 0, &bookmark);
        assert_eq!(
            store.persisted.get(BOOKMARK_KEY).await.unwrap(),
            Some(envelope.clone())
        );
        let served = store.get(BOOKMARK_KEY).await.unwrap().unwrap();
        assert_eq!(served, envelope);
        assert_eq!(faucet_core::peel_versioned(&served), bookmark);
    }

    #[tokio::test]
    async fn versioned_bookmark_write_through() {
        the_bookmark_is_stored_in_the_versioned_envelope(Durability::WriteThrough).await;
    }

    #[tokio::test]
    async fn versioned_bookmark_group_commit() {
        the_bookmark_is_stored_in_the_versioned_envelope(Durability::GroupCommit).await;
    }

    #[tokio::test]
    async fn versioned_bookmark_write_behind() {
        the_bookmark_is_stored_in_the_versioned_envelope(Durability::WriteBehind).await;
    }
}

#[cfg(feature = "faucet-core-1-16")]
conformance!(
    instrumented_cached_group_commit,
    wrapped::cached_under(Durability::GroupCommit, wrapped::instrumented).await
);
#[cfg(feature = "faucet-core-1-16")]
conformance!(
    instrumented_cached_write_behind,
    wrapped::cached_under(Durability::WriteBehind, wrapped::instrumented).await
);
#[cfg(feature = "faucet-core-1-16")]
conformance!(
    versioned_cached_group_commit,
    wrapped::cached_under(Durability::GroupCommit, wrapped::versioned).await
);
#[cfg(feature = "faucet-core-1-16")]
conformance!(
    versioned_cached_write_behind,
    wrapped::cached_under(Durability::WriteBehind, wrapped::versioned).await
);

/// Two stores on one table (two pools, as two processes would have), 32
/// tasks between them racing to claim one absent key: exactly one wins,
/// every time.
async fn two_stores_race_to_claim_a_key(make: impl AsyncFn(&str) -> Arc<dyn Newer>) {
    let table = support::unique_table("claim_race");
    let stores = [make(&table).await, make(&table).await];
    for round in 0..10 {
        let key = format!("claim-{round}");
        let racers: Vec<_> = (0..32)
            .map(|task| {
                let (store, key) = (stores[task % 2].clone(), key.clone());
                tokio::spawn(async move {
                    store
                        .compare_and_put(&key, None, &json!({"task": task}))
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut winners = 0;
        for racer in racers {
            winners += usize::from(racer.await.unwrap());
        }
        assert_eq!(winners, 1, "round {round}");
    }
}

async fn plain_on(table: &str) -> Arc<PostgresStateStore> {
    let store = PostgresStateStore::connect_with(&support::database_url(), 4, table)
        .await
        .unwrap();
    store.ensure_table().await.unwrap();
    Arc::new(store)
}

mod claim_race {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plain_stores() {
        two_stores_race_to_claim_a_key(async |table: &str| {
            newer_of(plain_on(table).await).unwrap()
        })
        .await;
    }

    async fn cached_stores(durability: Durability) {
        two_stores_race_to_claim_a_key(async |table: &str| {
            let plain = Arc::into_inner(plain_on(table).await).unwrap();
            let cached = plain
                .cached(CacheOptions::new().durability(durability))
                .unwrap();
            newer_of(Arc::new(cached)).unwrap()
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_write_through() {
        cached_stores(Durability::WriteThrough).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_group_commit() {
        cached_stores(Durability::GroupCommit).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_write_behind() {
        cached_stores(Durability::WriteBehind).await;
    }
}
