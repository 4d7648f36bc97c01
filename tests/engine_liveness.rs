//! The engine always makes progress: a writer that never yields cannot
//! starve the flusher, a full buffer is flushed however small `max_pending`
//! is, no option value makes it panic, and a back-pressure error says why
//! the buffer is full. Against `MemoryBackend`.

use std::sync::Arc;
use std::time::Duration;

use faucet_core::check::CheckContext;
use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
use serde_json::json;

/// Writes distinct keys (cycling over 100,000, within the default
/// `max_pending`, so the writer never has to wait for room) until the flusher has committed
/// `batches` batches, or `limit` puts were made without that.
async fn spin_until_batches_commit(
    store: &CachedStateStore<MemoryBackend>,
    backend: &MemoryBackend,
    batches: usize,
    limit: u64,
) -> u64 {
    let mut puts = 0u64;
    while backend.committed_batches().len() < batches {
        assert!(
            puts < limit,
            "{puts} puts in a tight loop and the flusher committed only {:?}",
            backend.committed_batches()
        );
        store
            .put(&format!("k{}", puts % 100_000), &json!(puts))
            .await
            .unwrap();
        puts += 1;
    }
    puts
}

fn spinning_options() -> CacheOptions {
    CacheOptions::new()
        .durability(Durability::WriteBehind)
        .max_batch(1_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_writer_does_not_starve_the_flusher_on_a_multi_thread_runtime() {
    let backend = Arc::new(MemoryBackend::new());
    let store = Arc::new(CachedStateStore::new(backend.clone(), spinning_options()).unwrap());
    // On a worker thread, as a pipeline task runs: the flusher it wakes is
    // queued on that same worker.
    let writer = tokio::spawn({
        let (store, backend) = (store.clone(), backend.clone());
        async move { spin_until_batches_commit(&store, &backend, 3, 3_000_000).await }
    });
    writer.await.unwrap();
    store.shutdown().await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn a_spinning_writer_does_not_starve_the_flusher_on_a_current_thread_runtime() {
    let backend = Arc::new(MemoryBackend::new());
    let store = CachedStateStore::new(backend.clone(), spinning_options()).unwrap();
    spin_until_batches_commit(&store, &backend, 3, 3_000_000).await;
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_buffer_smaller_than_max_batch_is_flushed_when_full() {
    let backend = Arc::new(MemoryBackend::new());
    let options = CacheOptions::new()
        .durability(Durability::WriteBehind)
        .flush_interval(Duration::from_secs(3600))
        .max_pending(2)
        .max_batch(10)
        .put_timeout(Duration::from_secs(60));
    let store = CachedStateStore::new(backend.clone(), options).unwrap();
    for i in 0..7 {
        store.put(&format!("k{i}"), &json!(i)).await.unwrap();
    }
    assert!(backend.write_attempts() >= 3, "full buffers were flushed");
    store.shutdown().await.unwrap();
    assert_eq!(backend.rows().len(), 7);
}

#[tokio::test]
async fn no_option_value_makes_the_store_panic() {
    let extremes = [
        CacheOptions::new()
            .flush_interval(Duration::MAX)
            .put_timeout(Duration::MAX)
            .shutdown_timeout(Duration::MAX)
            .retry_backoff_max(Duration::MAX)
            .max_batch(usize::MAX)
            .max_batch_bytes(usize::MAX)
            .max_pending(usize::MAX)
            .cache_capacity(usize::MAX),
        CacheOptions::new()
            .flush_interval(Duration::from_nanos(1))
            .put_timeout(Duration::ZERO)
            .shutdown_timeout(Duration::ZERO)
            .retry_backoff_max(Duration::from_nanos(1))
            .max_batch(1)
            .max_batch_bytes(1)
            .max_pending(1)
            .cache_capacity(0),
    ];
    for options in extremes {
        for durability in [
            Durability::WriteThrough,
            Durability::GroupCommit,
            Durability::WriteBehind,
        ] {
            let backend = Arc::new(MemoryBackend::new());
            let options = options.clone().durability(durability);
            let store = CachedStateStore::new(backend.clone(), options.clone()).unwrap();
            let _ = store.put("a", &json!(1)).await;
            let _ = store.put("b", &json!(2)).await;
            let _ = store.get("a").await;
            let _ = store.delete("a").await;
            let _ = store.flush().await;
            store.check(&CheckContext::default()).await.unwrap();
            let _ = store.stats();
            let _ = store.shutdown().await;
        }
    }
}

#[tokio::test]
async fn a_back_pressure_error_tells_a_failing_flusher_from_a_slow_one() {
    let backend = Arc::new(MemoryBackend::new());
    let options = CacheOptions::new()
        .durability(Durability::WriteBehind)
        .flush_interval(Duration::from_secs(3600))
        .max_pending(1)
        .put_timeout(Duration::from_millis(50))
        .retry_backoff_max(Duration::from_millis(10));
    let store = CachedStateStore::new(backend.clone(), options).unwrap();

    // Failing: every batch fails.
    backend.set_unavailable(true);
    store.put("a", &json!(1)).await.unwrap();
    let err = store.put("b", &json!(2)).await.unwrap_err().to_string();
    assert!(
        err.contains("the flusher is failing") && err.contains("unavailable"),
        "{err}"
    );
    backend.set_unavailable(false);
    store.flush().await.unwrap();

    // Stalled: the batch in flight never answers, nothing failed.
    let pause = backend.pause_writes().await;
    store.put("c", &json!(3)).await.unwrap();
    let err = store.put("d", &json!(4)).await.unwrap_err().to_string();
    assert!(err.contains("stalled or slower"), "{err}");
    drop(pause);

    // Refused: the buffer is full of a write the storage refuses.
    store.flush().await.unwrap();
    backend.refuse_key("poison");
    store.put("poison", &json!(5)).await.unwrap();
    let _ = store.flush().await;
    let err = store.put("e", &json!(6)).await.unwrap_err().to_string();
    assert!(err.contains("refused") && err.contains("'poison'"), "{err}");
    backend.accept_key("poison");
    store.put("poison", &json!(7)).await.unwrap();
    store.shutdown().await.unwrap();
}
