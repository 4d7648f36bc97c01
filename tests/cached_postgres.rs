//! The cached store against a real PostgreSQL: the guarantees of the crate
//! docs where the server matters (batching, outages, restarts, shutdown).

mod support;

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, PostgresStateStore};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

const NEVER: Duration = Duration::from_secs(3600);

async fn plain_on(url: &str, tag: &str) -> PostgresStateStore {
    // A short acquire timeout: while a server is down, each failed batch
    // gives up after a second instead of ten. No extra_float_digits, which
    // PgBouncer refuses (these tests also run behind it).
    let options = PgConnectOptions::from_str(url)
        .unwrap()
        .extra_float_digits(None);
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(1))
        .connect_with(options)
        .await
        .unwrap();
    let store = PostgresStateStore::from_pool(pool, support::unique_table(tag)).unwrap();
    store.ensure_table().await.unwrap();
    store
}

async fn cached_on(url: &str, tag: &str, options: CacheOptions) -> CachedStateStore {
    plain_on(url, tag).await.cached(options).unwrap()
}

/// Every row of the store's table, read through the plain store's own
/// statements (which, unlike sqlx's prepared ones, also work behind PgBouncer).
async fn table_rows(store: &CachedStateStore) -> HashMap<String, Value> {
    let plain = store.backend();
    let keys = plain.list("").await.unwrap();
    let values = plain.get_many(&keys).await.unwrap();
    keys.into_iter()
        .zip(values)
        .map(|(key, value)| (key, value.expect("a listed key has a row")))
        .collect()
}

fn write_behind() -> CacheOptions {
    CacheOptions::new()
        .durability(Durability::WriteBehind)
        .flush_interval(NEVER)
}

#[tokio::test]
async fn write_behind_writes_nothing_until_flush_then_batches() {
    let url = support::database_url();
    let store = cached_on(
        &url,
        "wb_batches",
        write_behind().max_batch(1000).max_pending(5000),
    )
    .await;
    let put = |i: usize| {
        let store = &store;
        async move {
            store
                .put(&format!("key-{i:04}"), &json!({"i": i}))
                .await
                .unwrap()
        }
    };
    // Below max_batch and long before flush_interval, nothing is written.
    for i in 0..999 {
        put(i).await;
    }
    assert!(
        table_rows(&store).await.is_empty(),
        "nothing is written before a flush is due"
    );
    assert_eq!(store.stats().batches_written, 0);
    for i in 999..2500 {
        put(i).await;
    }
    store.flush().await.unwrap();
    let rows = table_rows(&store).await;
    assert_eq!(rows.len(), 2500);
    assert_eq!(rows["key-1234"], json!({"i": 1234}));
    let stats = store.stats();
    // 1000 dirty keys trigger the flusher on their own, so the split between
    // rounds varies; the chunking rule does not.
    assert!(stats.batches_written >= 3, "{stats:?}");
    assert_eq!(stats.rows_written, 2500);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn deletes_and_upserts_share_a_batch_and_nothing_is_resurrected() {
    let url = support::database_url();
    let store = cached_on(&url, "wb_delete", write_behind()).await;
    store
        .backend()
        .put("old", &json!("persisted"))
        .await
        .unwrap();
    store.put("old", &json!("transient")).await.unwrap();
    store.delete("old").await.unwrap();
    store.put("new", &json!(1)).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(
        table_rows(&store).await,
        HashMap::from([("new".to_owned(), json!(1))])
    );
    assert_eq!(
        store.stats().batches_written,
        1,
        "one statement carried both"
    );
    assert_eq!(store.get("old").await.unwrap(), None);
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_racing_flushes_end_with_the_last_values() {
    let url = support::database_url();
    let store = Arc::new(cached_on(&url, "wb_race", write_behind().max_batch(2)).await);
    let flusher = tokio::spawn({
        let store = store.clone();
        async move {
            for _ in 0..50 {
                store.flush().await.unwrap();
            }
        }
    });
    for i in 0..600 {
        store.put(&format!("k{}", i % 3), &json!(i)).await.unwrap();
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    flusher.await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(
        table_rows(&store).await,
        HashMap::from([
            ("k0".to_owned(), json!(597)),
            ("k1".to_owned(), json!(598)),
            ("k2".to_owned(), json!(599)),
        ])
    );
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_puts_from_64_tasks_are_each_durable_on_return() {
    let url = support::database_url();
    let store = Arc::new(cached_on(&url, "gc_64", CacheOptions::new()).await);
    let tasks: Vec<_> = (0..64)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let key = format!("task-{task}");
                    store.put(&key, &json!(i)).await.unwrap();
                    // Read past the cache: the row must already be committed.
                    let persisted = store.backend().get(&key).await.unwrap();
                    assert_eq!(persisted, Some(json!(i)), "put returned before its commit");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.puts, 640);
    assert!(
        stats.batches_written < 640,
        "concurrent puts shared no batch: {stats:?}"
    );
    assert_eq!(table_rows(&store).await.len(), 64);
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_on_few_keys_leave_the_table_equal_to_the_last_writes() {
    let url = support::database_url();
    for durability in [
        Durability::WriteBehind,
        Durability::GroupCommit,
        Durability::WriteThrough,
    ] {
        let store = Arc::new(
            cached_on(
                &url,
                "few_keys",
                write_behind().durability(durability).max_batch(3),
            )
            .await,
        );
        // The test serialises writes per key (not per store), so "last" is known.
        let last: Arc<Vec<tokio::sync::Mutex<Option<Value>>>> =
            Arc::new((0..5).map(|_| tokio::sync::Mutex::new(None)).collect());
        let tasks: Vec<_> = (0..16u64)
            .map(|task| {
                let (store, last) = (store.clone(), last.clone());
                tokio::spawn(async move {
                    for step in 0..40u64 {
                        let k = ((task + step * 7) % 5) as usize;
                        let mut slot = last[k].lock().await;
                        if step % 9 == 4 {
                            store.delete(&format!("key-{k}")).await.unwrap();
                            *slot = None;
                        } else {
                            let value = json!({"task": task, "step": step});
                            store.put(&format!("key-{k}"), &value).await.unwrap();
                            *slot = Some(value);
                        }
                        drop(slot);
                        if step % 13 == 0 {
                            store.flush().await.unwrap();
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        store.shutdown().await.unwrap();
        let rows = table_rows(&store).await;
        for k in 0..5 {
            let expected = last[k].lock().await.clone();
            assert_eq!(
                rows.get(&format!("key-{k}")),
                expected.as_ref(),
                "{durability:?} key-{k}"
            );
        }
    }
}

// Guarantees 6 and 7 with a real outage: writes wait, then fail; the store
// recovers by itself when the server is back, without being rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fills_the_buffer_then_the_store_recovers_by_itself() {
    let server = support::PgServer::start();
    let store = cached_on(
        &server.url(),
        "outage",
        write_behind()
            .max_pending(10)
            .put_timeout(Duration::from_millis(300))
            .retry_backoff_max(Duration::from_millis(200)),
    )
    .await;
    store.put("before", &json!(0)).await.unwrap();
    store.flush().await.unwrap();

    server.stop_immediate();
    for i in 0..9 {
        store.put(&format!("k{i}"), &json!(i)).await.unwrap();
    }
    store.put("before", &json!("updated")).await.unwrap(); // 10th dirty key
    let err = store
        .put("overflow", &json!(1))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_pending"), "{err}");
    let err = store.flush().await.unwrap_err().to_string();
    assert!(err.contains("10 keys stay dirty"), "{err}");
    let stats = store.stats();
    assert!(
        stats.flush_errors >= 1 && stats.last_error.is_some(),
        "{stats:?}"
    );
    let report = store.check(&Default::default()).await.unwrap();
    assert!(report.failed_count() >= 1, "{report:?}");

    server.restart();
    // The flusher keeps retrying on its own; this flush just waits for it.
    let mut recovered = false;
    for _ in 0..60 {
        if store.flush().await.is_ok() {
            recovered = true;
            break;
        }
    }
    assert!(
        recovered,
        "the store did not recover after the server came back"
    );
    store.put("overflow", &json!(1)).await.unwrap();
    store.shutdown().await.unwrap();
    let rows = table_rows(&store).await;
    assert_eq!(rows.len(), 11);
    assert_eq!(rows["before"], json!("updated"));
    assert_eq!(rows["k8"], json!(8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_the_server_down_reports_what_was_not_persisted() {
    let server = support::PgServer::start();
    let store = cached_on(
        &server.url(),
        "shutdown_down",
        write_behind()
            .shutdown_timeout(Duration::from_secs(2))
            .retry_backoff_max(Duration::from_millis(100)),
    )
    .await;
    store.put("a", &json!(1)).await.unwrap();
    store.put("b", &json!(2)).await.unwrap();
    server.stop_immediate();
    let err = store.shutdown().await.unwrap_err().to_string();
    assert!(err.contains("2 keys were not persisted"), "{err}");
    assert!(
        store
            .put("c", &json!(3))
            .await
            .unwrap_err()
            .to_string()
            .contains("shut down")
    );
}

#[tokio::test]
async fn tables_are_shared_between_the_cached_and_the_plain_store() {
    let url = support::database_url();
    let cached = cached_on(&url, "shared_table", write_behind()).await;
    let plain =
        PostgresStateStore::from_pool(cached.backend().pool().clone(), cached.backend().table())
            .unwrap();
    plain
        .put("from-plain", &json!({"nul": "a\u{0}b"}))
        .await
        .unwrap();
    assert_eq!(
        cached.get("from-plain").await.unwrap(),
        Some(json!({"nul": "a\u{0}b"}))
    );
    cached
        .put("from-cached", &json!({"nul": "\u{0}"}))
        .await
        .unwrap();
    cached.shutdown().await.unwrap();
    assert_eq!(
        plain.get("from-cached").await.unwrap(),
        Some(json!({"nul": "\u{0}"}))
    );
}

/// `list` sees the store's own writes in every mode: pending puts are
/// listed, pending deletes are not, and once flushed the table agrees.
#[tokio::test]
async fn list_includes_pending_puts_and_excludes_pending_deletes_in_every_mode() {
    let url = support::database_url();
    for mode in [
        Durability::WriteThrough,
        Durability::GroupCommit,
        Durability::WriteBehind,
    ] {
        let options = CacheOptions::new().durability(mode).flush_interval(NEVER);
        let store = cached_on(&url, "list_pending", options).await;
        for key in ["p::a", "p::b", "q::a"] {
            store.put(key, &json!(key)).await.unwrap();
        }
        store.flush().await.unwrap();
        store.put("p::c", &json!(3)).await.unwrap();
        store.delete("p::a").await.unwrap();
        let expected = ["p::b", "p::c"];
        assert_eq!(store.list("p::").await.unwrap(), expected, "{mode:?}");
        assert!(store.list("p x").await.is_err(), "{mode:?}");
        store.flush().await.unwrap();
        assert_eq!(
            store.backend().list("p::").await.unwrap(),
            expected,
            "{mode:?}"
        );
        assert_eq!(
            store.list("").await.unwrap(),
            ["p::b", "p::c", "q::a"],
            "{mode:?}"
        );
        store.shutdown().await.unwrap();
    }
}

/// faucet-core 1.16's operations on the cached store, against the table:
/// a pending put is the current value of a `compare_and_put` and never
/// lands after it; a row another process changed fails the CAS and drops
/// the stale cached entry; `put_batch` is all or nothing and is not
/// overwritten by an older buffered write.
#[tokio::test]
async fn compare_and_put_and_put_batch_are_decided_by_the_table_in_every_mode() {
    let url = support::database_url();
    for mode in [
        Durability::WriteThrough,
        Durability::GroupCommit,
        Durability::WriteBehind,
    ] {
        let options = CacheOptions::new().durability(mode).flush_interval(NEVER);
        let store = cached_on(&url, "cas_cached", options).await;
        let other =
            PostgresStateStore::from_pool(store.backend().pool().clone(), store.backend().table())
                .unwrap();

        store.put("k", &json!(1)).await.unwrap();
        assert!(
            store
                .compare_and_put("k", Some(&json!(1)), &json!(2))
                .await
                .unwrap()
        );
        assert_eq!(other.get("k").await.unwrap(), Some(json!(2)), "{mode:?}");

        assert_eq!(store.get("k").await.unwrap(), Some(json!(2))); // cached
        other.put("k", &json!(7)).await.unwrap(); // another process
        assert!(
            !store
                .compare_and_put("k", Some(&json!(2)), &json!(3))
                .await
                .unwrap()
        );
        assert_eq!(store.get("k").await.unwrap(), Some(json!(7)), "{mode:?}");

        store.put("a", &json!("old")).await.unwrap();
        let batch = vec![("a".to_owned(), json!(1)), ("b".to_owned(), json!(2))];
        store.put_batch(&batch).await.unwrap();
        assert_eq!(other.get("a").await.unwrap(), Some(json!(1)), "{mode:?}");
        let bad = vec![("a".to_owned(), json!(9)), ("c d".to_owned(), json!(9))];
        assert!(store.put_batch(&bad).await.is_err());

        store.shutdown().await.unwrap();
        let rows = table_rows(&store).await;
        assert_eq!(rows["k"], json!(7), "{mode:?}");
        assert_eq!((&rows["a"], &rows["b"]), (&json!(1), &json!(2)), "{mode:?}");
    }
}
