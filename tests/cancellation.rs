//! Cancellation and deadlines. Every public async method of the cached
//! store, cancelled at its await points (a `tokio::time::timeout` that fires, as `select!` or an aborted
//! task would drop it): the store stays consistent, and a dropped store's
//! flusher never writes after the drop; and a stalled backend makes every
//! wait end within its stated deadline. Against `MemoryBackend`, whose
//! pauses hold a call at a chosen await point.

use std::sync::Arc;
use std::time::Duration;

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
use serde_json::json;
use tokio::time::timeout;

const SOON: Duration = Duration::from_millis(50);

fn store_with(options: CacheOptions) -> (Arc<MemoryBackend>, CachedStateStore<MemoryBackend>) {
    let backend = Arc::new(MemoryBackend::new());
    let store = CachedStateStore::new(backend.clone(), options).unwrap();
    (backend, store)
}

fn options(durability: Durability) -> CacheOptions {
    CacheOptions::new()
        .durability(durability)
        .flush_interval(Duration::from_secs(3600))
}

#[tokio::test]
async fn a_cancelled_write_through_put_that_committed_is_read_back_not_the_old_value() {
    let (backend, store) = store_with(options(Durability::WriteThrough));
    store.put("k", &json!(1)).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!(1)));
    let pause = backend.pause_after_commit().await;
    assert!(timeout(SOON, store.put("k", &json!(2))).await.is_err());
    assert_eq!(backend.rows()["k"], json!(2), "the statement had committed");
    drop(pause);
    assert_eq!(store.get("k").await.unwrap(), Some(json!(2)));
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_write_through_put_that_never_ran_leaves_the_old_value() {
    let (backend, store) = store_with(options(Durability::WriteThrough));
    store.put("k", &json!(1)).await.unwrap();
    let pause = backend.pause_writes().await;
    assert!(timeout(SOON, store.put("k", &json!(2))).await.is_err());
    drop(pause);
    assert_eq!(store.get("k").await.unwrap(), Some(json!(1)));
    store.put("k", &json!(3)).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!(3)));
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_group_commit_put_was_staged_and_is_persisted() {
    let (backend, store) = store_with(options(Durability::GroupCommit));
    let pause = backend.pause_writes().await;
    assert!(timeout(SOON, store.put("k", &json!(1))).await.is_err());
    assert_eq!(store.get("k").await.unwrap(), Some(json!(1)));
    drop(pause);
    store.flush().await.unwrap();
    assert_eq!(backend.rows()["k"], json!(1));
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_put_cancelled_while_waiting_for_room_stages_nothing() {
    let (backend, store) = store_with(
        options(Durability::WriteBehind)
            .max_pending(1)
            .put_timeout(Duration::from_secs(60)),
    );
    backend.set_unavailable(true);
    store.put("a", &json!(1)).await.unwrap();
    assert!(timeout(SOON, store.put("b", &json!(2))).await.is_err());
    assert_eq!(store.stats().dirty_keys, 1);
    backend.set_unavailable(false);
    store.flush().await.unwrap();
    assert_eq!(backend.rows().len(), 1);
    assert_eq!(store.get("b").await.unwrap(), None);
    store.put("b", &json!(2)).await.unwrap();
    store.shutdown().await.unwrap();
    assert_eq!(backend.rows().len(), 2);
}

#[tokio::test]
async fn a_cancelled_get_caches_nothing_and_later_reads_are_right() {
    let (backend, store) = store_with(options(Durability::WriteBehind));
    backend.insert_row("k", json!("old"));
    let pause = backend.pause_loads().await;
    assert!(timeout(SOON, store.get("k")).await.is_err());
    drop(pause);
    backend.insert_row("k", json!("changed"));
    assert_eq!(store.get("k").await.unwrap(), Some(json!("changed")));
    store.put("k", &json!("mine")).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!("mine")));
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_flush_drops_nothing() {
    let (backend, store) = store_with(options(Durability::WriteBehind));
    store.put("k", &json!(1)).await.unwrap();
    let pause = backend.pause_writes().await;
    assert!(timeout(SOON, store.flush()).await.is_err());
    drop(pause);
    store.flush().await.unwrap();
    assert_eq!(backend.rows()["k"], json!(1));
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cancelled_shutdown_can_be_called_again_and_completes() {
    let (backend, store) = store_with(options(Durability::WriteBehind));
    store.put("k", &json!(1)).await.unwrap();
    let pause = backend.pause_writes().await;
    assert!(timeout(SOON, store.shutdown()).await.is_err());
    assert!(
        store.put("late", &json!(2)).await.is_err(),
        "writes are refused"
    );
    drop(pause);
    store.shutdown().await.unwrap();
    assert_eq!(backend.rows()["k"], json!(1));
}

#[tokio::test]
async fn a_store_dropped_after_a_cancelled_shutdown_writes_nothing_afterwards() {
    let (backend, store) = store_with(options(Durability::WriteBehind));
    store.put("k", &json!(1)).await.unwrap();
    let pause = backend.pause_writes().await;
    assert!(timeout(SOON, store.shutdown()).await.is_err());
    drop(store);
    drop(pause);
    // Give a detached flusher every chance to run and write.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        backend.rows().is_empty(),
        "the flusher wrote after its store was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_shutdowns_report_the_same_outcome() {
    for _ in 0..20 {
        let (backend, store) = store_with(options(Durability::WriteBehind));
        backend.set_write_delay(Duration::from_millis(20));
        store.put("k", &json!(1)).await.unwrap();
        let store = Arc::new(store);
        let other = tokio::spawn({
            let store = store.clone();
            async move { store.shutdown().await.map_err(|e| e.to_string()) }
        });
        let mine = store.shutdown().await.map_err(|e| e.to_string());
        assert_eq!(mine, other.await.unwrap());
        assert!(mine.is_ok(), "{mine:?}");
    }
}

// Every wait has a deadline: a stalled backend (a half-open connection, a
// row lock someone else holds) makes writes and flush() fail after
// write_timeout, and nothing buffered is lost.
#[tokio::test]
async fn a_stalled_backend_makes_writes_and_flush_fail_within_write_timeout() {
    for durability in [
        Durability::WriteThrough,
        Durability::GroupCommit,
        Durability::WriteBehind,
    ] {
        let (backend, store) =
            store_with(options(durability).write_timeout(Duration::from_millis(100)));
        let pause = backend.pause_writes().await;
        let put = timeout(Duration::from_secs(30), store.put("k", &json!(1)))
            .await
            .expect("put returned within its write_timeout");
        let flushed = timeout(Duration::from_secs(30), store.flush())
            .await
            .expect("flush returned within its write_timeout");
        match durability {
            Durability::WriteBehind => put.unwrap(),
            _ => {
                let err = put.unwrap_err().to_string();
                assert!(
                    err.contains("'k'") && err.contains("write_timeout"),
                    "{err}"
                );
            }
        }
        if durability != Durability::WriteThrough {
            let err = flushed.unwrap_err().to_string();
            assert!(err.contains("write_timeout"), "{durability:?}: {err}");
        }
        drop(pause);
        if durability != Durability::WriteThrough {
            store.flush().await.unwrap();
            assert_eq!(
                backend.rows()["k"],
                json!(1),
                "{durability:?}: retried and committed"
            );
        }
        store.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn shutdown_ends_within_shutdown_timeout_while_a_write_is_stalled() {
    let (backend, store) =
        store_with(options(Durability::WriteBehind).shutdown_timeout(Duration::from_millis(100)));
    store.put("k", &json!(1)).await.unwrap();
    let _pause = backend.pause_writes().await;
    let err = timeout(Duration::from_secs(30), store.shutdown())
        .await
        .expect("shutdown returned within its shutdown_timeout")
        .unwrap_err()
        .to_string();
    assert!(err.contains("1 keys were not persisted"), "{err}");
}

#[tokio::test]
async fn a_cancelled_put_batch_releases_its_keys_and_its_outcome_is_read_from_the_table() {
    let batch = |value: i64| vec![("k".to_owned(), json!(value))];
    for durability in [
        Durability::WriteThrough,
        Durability::GroupCommit,
        Durability::WriteBehind,
    ] {
        let (backend, store) = store_with(options(durability));
        store.put_batch(&batch(1)).await.unwrap();
        assert_eq!(store.get("k").await.unwrap(), Some(json!(1)));

        // Dropped after its statement committed, before the answer came:
        // the cached 1 is not trusted, the table's 2 is read.
        let pause = backend.pause_after_commit().await;
        assert!(timeout(SOON, store.put_batch(&batch(2))).await.is_err());
        drop(pause);
        assert_eq!(
            store.get("k").await.unwrap(),
            Some(json!(2)),
            "{durability:?}"
        );

        // Dropped before its statement ran: nothing changed.
        let pause = backend.pause_writes().await;
        assert!(timeout(SOON, store.put_batch(&batch(3))).await.is_err());
        drop(pause);
        assert_eq!(
            store.get("k").await.unwrap(),
            Some(json!(2)),
            "{durability:?}"
        );

        // Its key is free again.
        timeout(Duration::from_secs(5), store.put("k", &json!(4)))
            .await
            .expect("a dropped put_batch still holds its key")
            .unwrap();
        store.shutdown().await.unwrap();
        assert_eq!(backend.rows()["k"], json!(4), "{durability:?}");
    }
}

#[tokio::test]
async fn a_cas_cancelled_while_its_pending_write_is_flushed_leaves_that_write_queued() {
    let (backend, store) = store_with(options(Durability::WriteBehind));
    store.put("k", &json!(1)).await.unwrap();
    let pause = backend.pause_writes().await;
    let (expected, value) = (json!(1), json!(2));
    let cas = store.compare_and_put("k", Some(&expected), &value);
    assert!(timeout(SOON, cas).await.is_err());
    drop(pause);
    store.flush().await.unwrap();
    assert_eq!(backend.rows()["k"], json!(1), "the pending write was kept");
    store.put("k", &json!(3)).await.unwrap(); // the key is free again
    store.shutdown().await.unwrap();
    assert_eq!(backend.rows()["k"], json!(3));
}
