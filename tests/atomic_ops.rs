//! The cached store's `compare_and_put` and `put_batch` against
//! `MemoryBackend`: decided by the backend, never by the cache; this store's
//! pending writes count and can never overwrite the result afterwards;
//! concurrent puts of a held key wait; faults and drops leave nothing stale.

use std::sync::Arc;
use std::time::Duration;

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
use serde_json::json;

const MODES: [Durability; 3] = [
    Durability::WriteThrough,
    Durability::GroupCommit,
    Durability::WriteBehind,
];

/// Only explicit flushes, shutdown and these operations make the flusher
/// write during a test.
fn options(durability: Durability) -> CacheOptions {
    CacheOptions::new()
        .durability(durability)
        .flush_interval(Duration::from_secs(3600))
}

fn store(durability: Durability) -> (Arc<MemoryBackend>, Arc<CachedStateStore<MemoryBackend>>) {
    let backend = Arc::new(MemoryBackend::new());
    let store = CachedStateStore::new(backend.clone(), options(durability)).unwrap();
    (backend, Arc::new(store))
}

fn entries(pairs: &[(&str, serde_json::Value)]) -> Vec<(String, serde_json::Value)> {
    pairs
        .iter()
        .map(|(key, value)| ((*key).to_owned(), value.clone()))
        .collect()
}

#[tokio::test]
async fn a_pending_put_counts_as_the_current_value_and_never_lands_after_the_cas() {
    for durability in MODES {
        let (backend, store) = store(durability);
        store.put("k", &json!(1)).await.unwrap();
        assert!(
            store
                .compare_and_put("k", Some(&json!(1)), &json!(2))
                .await
                .unwrap(),
            "{durability:?}"
        );
        assert_eq!(backend.rows()["k"], json!(2), "{durability:?}");
        assert_eq!(store.get("k").await.unwrap(), Some(json!(2)));
        // Nothing older is left to be written: the table stays at 2.
        store.flush().await.unwrap();
        store.shutdown().await.unwrap();
        assert_eq!(backend.rows()["k"], json!(2), "{durability:?}");
    }
}

#[tokio::test]
async fn a_pending_delete_makes_the_key_absent_for_the_cas() {
    for durability in MODES {
        let (backend, store) = store(durability);
        backend.insert_row("k", json!("old"));
        store.delete("k").await.unwrap();
        assert!(
            !store
                .compare_and_put("k", Some(&json!("old")), &json!("x"))
                .await
                .unwrap(),
            "{durability:?}"
        );
        assert!(
            store
                .compare_and_put("k", None, &json!("new"))
                .await
                .unwrap()
        );
        store.shutdown().await.unwrap();
        assert_eq!(backend.rows()["k"], json!("new"), "{durability:?}");
    }
}

#[tokio::test]
async fn a_row_changed_by_another_process_fails_the_cas_and_drops_the_stale_entry() {
    for durability in MODES {
        let (backend, store) = store(durability);
        store.put("k", &json!(1)).await.unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.get("k").await.unwrap(), Some(json!(1))); // cached
        backend.insert_row("k", json!(7)); // another process
        assert!(
            !store
                .compare_and_put("k", Some(&json!(1)), &json!(2))
                .await
                .unwrap(),
            "{durability:?}: decided from the cache"
        );
        assert_eq!(
            store.get("k").await.unwrap(),
            Some(json!(7)),
            "{durability:?}"
        );
        assert!(
            store
                .compare_and_put("k", Some(&json!(7)), &json!(8))
                .await
                .unwrap()
        );
        store.shutdown().await.unwrap();
        assert_eq!(backend.rows()["k"], json!(8));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_of_a_key_held_by_a_cas_waits_for_it_and_lands_after_it() {
    for durability in [Durability::GroupCommit, Durability::WriteBehind] {
        let (backend, store) = store(durability);
        backend.insert_row("k", json!(0));
        let paused = backend.pause_writes().await;
        let cas = tokio::spawn({
            let store = store.clone();
            async move { store.compare_and_put("k", Some(&json!(0)), &json!(1)).await }
        });
        // The CAS holds its key and waits at the gate when the put starts.
        backend.wait_for_write_attempts(1).await;
        let put = tokio::spawn({
            let store = store.clone();
            async move { store.put("k", &json!(2)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!put.is_finished(), "{durability:?}: the put did not wait");
        assert_eq!(
            store.stats().dirty_keys,
            0,
            "{durability:?}: staged while held"
        );
        drop(paused);
        assert!(cas.await.unwrap().unwrap(), "{durability:?}");
        put.await.unwrap().unwrap();
        assert_eq!(store.get("k").await.unwrap(), Some(json!(2)));
        store.shutdown().await.unwrap();
        assert_eq!(backend.rows()["k"], json!(2), "{durability:?}");
    }
}

#[tokio::test]
async fn a_refused_pending_write_fails_the_cas_without_sending_it() {
    let (backend, store) = store(Durability::WriteBehind);
    backend.refuse_key("k");
    store.put("k", &json!(1)).await.unwrap();
    let err = store
        .compare_and_put("k", None, &json!(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("'k'") && err.contains("refused"), "{err}");
    assert!(backend.rows().is_empty());
    // A newer put replaces the refused write; then the CAS is decided.
    backend.accept_key("k");
    store.put("k", &json!(3)).await.unwrap();
    assert!(
        store
            .compare_and_put("k", Some(&json!(3)), &json!(4))
            .await
            .unwrap()
    );
    store.shutdown().await.unwrap();
    assert_eq!(backend.rows()["k"], json!(4));
}

#[tokio::test]
async fn a_cas_whose_pending_write_cannot_be_flushed_sends_nothing() {
    let (backend, store) = store(Durability::WriteBehind);
    store.put("k", &json!(1)).await.unwrap();
    backend.fail_next_writes(1);
    let err = store
        .compare_and_put("k", Some(&json!(1)), &json!(2))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("was not sent"), "{err}");
    assert!(backend.rows().is_empty());
    // The pending write was kept, and is the current value afterwards.
    assert!(
        store
            .compare_and_put("k", Some(&json!(1)), &json!(2))
            .await
            .unwrap()
    );
    store.shutdown().await.unwrap();
    assert_eq!(backend.rows()["k"], json!(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_cas_releases_its_key_and_forgets_its_cached_value() {
    let (backend, store) = store(Durability::GroupCommit);
    store.put("k", &json!(1)).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!(1)));
    let paused = backend.pause_writes().await;
    let cas = tokio::spawn({
        let store = store.clone();
        async move { store.compare_and_put("k", Some(&json!(1)), &json!(2)).await }
    });
    backend.wait_for_write_attempts(2).await; // the put's batch, then the CAS
    cas.abort();
    assert!(cas.await.unwrap_err().is_cancelled());
    drop(paused);
    let loads = backend.loads();
    // Not trusted any more: the next read goes to the backend.
    assert_eq!(store.get("k").await.unwrap(), Some(json!(1)));
    assert_eq!(backend.loads(), loads + 1);
    // And the key is free again.
    tokio::time::timeout(Duration::from_secs(5), store.put("k", &json!(3)))
        .await
        .expect("the dropped CAS still holds the key")
        .unwrap();
    store.shutdown().await.unwrap();
    assert_eq!(backend.rows()["k"], json!(3));
}

#[tokio::test]
async fn cas_and_put_batch_refuse_bad_input_and_a_closed_store() {
    let (backend, store) = store(Durability::GroupCommit);
    assert!(store.compare_and_put("a b", None, &json!(1)).await.is_err());
    let bad = entries(&[("ok", json!(1)), ("not ok", json!(2))]);
    let err = store.put_batch(&bad).await.unwrap_err().to_string();
    assert!(err.contains("not ok"), "{err}");
    assert!(backend.rows().is_empty());
    store.put_batch(&[]).await.unwrap();
    store.shutdown().await.unwrap();
    assert!(store.compare_and_put("k", None, &json!(1)).await.is_err());
    assert!(store.put_batch(&entries(&[("k", json!(1))])).await.is_err());
    assert!(backend.rows().is_empty());
}

#[tokio::test]
async fn put_batch_is_all_or_nothing_and_no_older_pending_write_overwrites_it() {
    for durability in MODES {
        let (backend, store) = store(durability);
        store.put("a", &json!("old")).await.unwrap();
        store.delete("b").await.unwrap();
        store
            .put_batch(&entries(&[
                ("a", json!(1)),
                ("b", json!(2)),
                ("a", json!(3)),
            ]))
            .await
            .unwrap();
        let rows = backend.rows();
        assert_eq!(
            (&rows["a"], &rows["b"]),
            (&json!(3), &json!(2)),
            "{durability:?}"
        );
        assert_eq!(store.get("a").await.unwrap(), Some(json!(3)));

        // A refused entry: nothing of the batch is written or cached.
        backend.refuse_key("c");
        let err = store
            .put_batch(&entries(&[("a", json!(4)), ("c", json!(5))]))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("refused") && err.contains("nothing was written"),
            "{err}"
        );
        assert_eq!(
            store.get("a").await.unwrap(),
            Some(json!(3)),
            "{durability:?}"
        );
        assert_eq!(store.get("c").await.unwrap(), None);

        store.shutdown().await.unwrap();
        let rows = backend.rows();
        assert_eq!(
            (&rows["a"], &rows["b"]),
            (&json!(3), &json!(2)),
            "{durability:?}"
        );
        assert_eq!(rows.get("c"), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_races_on_one_store_have_exactly_one_winner() {
    for durability in MODES {
        let (backend, store) = store(durability);
        for round in 0..20 {
            let key = format!("lease-{round}");
            let tasks: Vec<_> = (0..32)
                .map(|task| {
                    let (store, key) = (store.clone(), key.clone());
                    tokio::spawn(async move {
                        store
                            .compare_and_put(&key, None, &json!(task))
                            .await
                            .unwrap()
                    })
                })
                .collect();
            let mut winners = 0;
            for task in tasks {
                winners += usize::from(task.await.unwrap());
            }
            assert_eq!(winners, 1, "{durability:?} round {round}");
            assert!(backend.rows().contains_key(&key));
        }
        store.shutdown().await.unwrap();
    }
}
