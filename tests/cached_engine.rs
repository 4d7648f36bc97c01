//! The write-behind engine against `MemoryBackend`: every guarantee of the
//! crate docs, checked without a server, with faults and stalls injected at
//! chosen moments instead of sleeps.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
use serde_json::{Value, json};

/// A flush interval long enough that only explicit flushes, full batches and
/// shutdown make the flusher write during a test.
const NEVER: Duration = Duration::from_secs(3600);

fn write_behind() -> CacheOptions {
    CacheOptions::new()
        .durability(Durability::WriteBehind)
        .flush_interval(NEVER)
}

fn store_with(options: CacheOptions) -> (Arc<MemoryBackend>, CachedStateStore<MemoryBackend>) {
    let backend = Arc::new(MemoryBackend::new());
    let store = CachedStateStore::new(backend.clone(), options).unwrap();
    (backend, store)
}

// Guarantee 1: read-your-writes, flushed or not, in every mode.
#[tokio::test]
async fn reads_see_the_newest_write_before_and_after_flush() {
    for durability in [
        Durability::WriteThrough,
        Durability::GroupCommit,
        Durability::WriteBehind,
    ] {
        let (backend, store) = store_with(write_behind().durability(durability));
        backend.insert_row("old", json!("persisted"));
        assert_eq!(store.get("old").await.unwrap(), Some(json!("persisted")));
        store.put("old", &json!("new")).await.unwrap();
        store.put("fresh", &json!({"n": 1})).await.unwrap();
        assert_eq!(
            store.get("old").await.unwrap(),
            Some(json!("new")),
            "{durability:?}"
        );
        assert_eq!(store.get("fresh").await.unwrap(), Some(json!({"n": 1})));
        store.delete("old").await.unwrap();
        assert_eq!(store.get("old").await.unwrap(), None, "{durability:?}");
        store.flush().await.unwrap();
        assert_eq!(store.get("old").await.unwrap(), None);
        assert_eq!(store.get("fresh").await.unwrap(), Some(json!({"n": 1})));
        let rows = backend.rows();
        assert_eq!(rows.get("old"), None, "{durability:?}");
        assert_eq!(rows.get("fresh"), Some(&json!({"n": 1})));
        store.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn write_behind_acknowledges_from_memory_and_coalesces_per_key() {
    let (backend, store) = store_with(write_behind());
    for i in 0..100 {
        store.put("hot", &json!(i)).await.unwrap();
    }
    assert!(
        backend.rows().is_empty(),
        "write-behind wrote before a flush was due"
    );
    assert_eq!(backend.write_attempts(), 0);
    store.flush().await.unwrap();
    assert_eq!(backend.rows()["hot"], json!(99));
    assert_eq!(
        backend.committed_batches(),
        [1],
        "100 puts of one key are one row"
    );
    let stats = store.stats();
    assert_eq!(
        (stats.puts, stats.coalesced_puts, stats.rows_written),
        (100, 99, 1)
    );
    assert_eq!(stats.dirty_keys, 0);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn write_behind_flushes_on_its_own_when_half_of_max_pending_keys_are_waiting() {
    let (backend, store) = store_with(write_behind().max_pending(20).max_batch(5));
    for i in 0..9 {
        store.put(&format!("k{i}"), &json!(i)).await.unwrap();
    }
    // Nine keys: below half the buffer, so nothing is written before the
    // flush interval; coalescing goes on.
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert_eq!(backend.write_attempts(), 0);
    store.put("k9", &json!(9)).await.unwrap();
    backend.wait_for_write_attempts(1).await;
    store.flush().await.unwrap();
    assert_eq!(backend.committed_batches(), [5, 5]);
    store.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn write_behind_flushes_every_flush_interval() {
    let backend = Arc::new(MemoryBackend::new());
    let store = CachedStateStore::new(
        backend.clone(),
        write_behind().flush_interval(Duration::from_secs(1)),
    )
    .unwrap();
    store.put("k", &json!(1)).await.unwrap();
    // Paused time: the runtime jumps to the flusher's deadline when idle.
    backend.wait_for_write_attempts(1).await;
    assert_eq!(backend.rows()["k"], json!(1));
    store.shutdown().await.unwrap();
}

// Guarantee 2: a put that arrives while its key is being flushed stays dirty,
// and the older batch never overwrites it.
#[tokio::test]
async fn a_put_racing_the_flush_of_its_key_stays_dirty_and_lands_next() {
    let (backend, store) = store_with(write_behind());
    let store = Arc::new(store);
    store.put("k", &json!("v1")).await.unwrap();
    let pause = backend.pause_writes().await;
    let first_flush = tokio::spawn({
        let store = store.clone();
        async move { store.flush().await }
    });
    backend.wait_for_write_attempts(1).await; // the batch carrying v1 is in flight
    store.put("k", &json!("v2")).await.unwrap();
    assert_eq!(
        store.stats().dirty_keys,
        1,
        "v2 is dirty while v1 is in flight"
    );
    assert_eq!(store.get("k").await.unwrap(), Some(json!("v2")));
    drop(pause);
    first_flush.await.unwrap().unwrap();
    // The flush waited for the next round too (rounds may overlap), and
    // that round carried v2; the older batch did not overwrite it.
    store.flush().await.unwrap();
    assert_eq!(backend.rows()["k"], json!("v2"));
    assert_eq!(store.stats().dirty_keys, 0);
    assert_eq!(backend.committed_batches(), [1, 1]);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_delete_after_a_put_in_one_window_does_not_resurrect_the_key() {
    let (backend, store) = store_with(write_behind());
    backend.insert_row("k", json!("persisted"));
    store.put("k", &json!("transient")).await.unwrap();
    store.delete("k").await.unwrap();
    store.put("gone-too", &json!(1)).await.unwrap();
    store.delete("gone-too").await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(backend.rows(), HashMap::new());
    assert_eq!(store.get("k").await.unwrap(), None);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn flushes_are_chunked_into_batches_of_at_most_max_batch_keys() {
    let (backend, store) = store_with(write_behind().max_batch(10).max_pending(1000));
    // 95 keys: under half of max_pending, so only the flush writes them.
    for i in 0..95 {
        store.put(&format!("key-{i}"), &json!(i)).await.unwrap();
    }
    store.flush().await.unwrap();
    let batches = backend.committed_batches();
    assert_eq!(batches, [10, 10, 10, 10, 10, 10, 10, 10, 10, 5]);
    assert_eq!(backend.rows().len(), 95);
    store.shutdown().await.unwrap();
}

// Guarantee 3: flush() Ok means committed; Err drops nothing.
#[tokio::test]
async fn a_failed_flush_keeps_every_entry_dirty_and_a_later_flush_commits_it() {
    let (backend, store) = store_with(write_behind());
    store.put("a", &json!(1)).await.unwrap();
    store.delete("b").await.unwrap();
    backend.fail_next_writes(1);
    let err = store.flush().await.unwrap_err().to_string();
    assert!(
        err.contains("flush failed") && err.contains("2 keys stay dirty"),
        "{err}"
    );
    let stats = store.stats();
    assert_eq!((stats.dirty_keys, stats.flush_errors), (2, 1));
    assert!(stats.last_error.unwrap().contains("fault injected"));
    store.flush().await.unwrap();
    assert_eq!(backend.rows(), HashMap::from([("a".to_owned(), json!(1))]));
    assert_eq!(store.stats().dirty_keys, 0);
    store.shutdown().await.unwrap();
}

// Guarantee 4: shutdown.
#[tokio::test]
async fn shutdown_persists_everything_then_refuses_writes() {
    let (backend, store) = store_with(write_behind());
    for i in 0..50 {
        store.put(&format!("k{i}"), &json!(i)).await.unwrap();
    }
    store.shutdown().await.unwrap();
    assert_eq!(backend.rows().len(), 50);
    let err = store.put("late", &json!(1)).await.unwrap_err().to_string();
    assert!(err.contains("shut down") && err.contains("late"), "{err}");
    assert!(store.delete("k1").await.is_err());
    assert_eq!(
        store.get("k1").await.unwrap(),
        Some(json!(1)),
        "reads keep working"
    );
    store.shutdown().await.unwrap();
    store.flush().await.unwrap();
}

#[tokio::test]
async fn shutdown_retries_until_its_deadline_then_reports_what_was_not_persisted() {
    let (backend, store) = store_with(
        write_behind()
            .shutdown_timeout(Duration::from_millis(300))
            .retry_backoff_max(Duration::from_millis(20)),
    );
    store.put("a", &json!(1)).await.unwrap();
    store.put("b", &json!(2)).await.unwrap();
    backend.set_unavailable(true);
    let err = store.shutdown().await.unwrap_err().to_string();
    assert!(
        err.contains("2 keys were not persisted") && err.contains("unavailable"),
        "{err}"
    );
    assert!(backend.write_attempts() >= 2, "shutdown retried");
    assert!(
        store.flush().await.is_err(),
        "the flusher is gone and keys are left"
    );
}

#[tokio::test]
async fn shutdown_succeeds_once_a_failing_backend_recovers_within_the_deadline() {
    let (backend, store) = store_with(write_behind().retry_backoff_max(Duration::from_millis(10)));
    store.put("a", &json!(1)).await.unwrap();
    backend.fail_next_writes(3);
    store.shutdown().await.unwrap();
    assert_eq!(backend.rows()["a"], json!(1));
    assert_eq!(backend.write_attempts(), 4);
}

#[tokio::test]
async fn dropping_without_shutdown_stops_the_flusher() {
    let (backend, store) = store_with(write_behind());
    store.put("unflushed", &json!(1)).await.unwrap();
    assert!(Arc::strong_count(&backend) > 1);
    drop(store);
    // The aborted flusher task releases the engine, and with it the backend.
    for _ in 0..100 {
        if Arc::strong_count(&backend) == 1 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        Arc::strong_count(&backend),
        1,
        "the flusher task outlived the store"
    );
    assert!(backend.rows().is_empty());
}

#[tokio::test]
async fn a_panicking_flusher_makes_later_writes_fail_instead_of_vanishing() {
    let (backend, store) = store_with(write_behind());
    store.put("a", &json!(1)).await.unwrap();
    backend.panic_next_write();
    let err = store.flush().await.unwrap_err().to_string();
    assert!(err.contains("1 keys were not persisted"), "{err}");
    let err = store.put("b", &json!(2)).await.unwrap_err().to_string();
    assert!(
        err.contains("flusher has stopped") && err.contains("'b'"),
        "{err}"
    );
    assert_eq!(
        store.get("a").await.unwrap(),
        Some(json!(1)),
        "reads keep working"
    );
    let report = store.check(&Default::default()).await.unwrap();
    assert_eq!(report.failed_count(), 1, "{report:?}");
    assert!(store.shutdown().await.is_err());
}

// Guarantee 5, in process: what a crash (a drop without shutdown) can cost.
#[tokio::test]
async fn a_crash_costs_at_most_the_writes_since_the_last_committed_batch() {
    let (backend, store) = store_with(write_behind());
    store.put("a", &json!(1)).await.unwrap();
    store.flush().await.unwrap();
    store.put("a", &json!(2)).await.unwrap();
    store.put("b", &json!(1)).await.unwrap();
    drop(store);
    assert_eq!(
        backend.rows(),
        HashMap::from([("a".to_owned(), json!(1))]),
        "the flushed write survives; only the later ones are lost"
    );

    for durability in [Durability::WriteThrough, Durability::GroupCommit] {
        let (backend, store) = store_with(write_behind().durability(durability));
        store.put("a", &json!(1)).await.unwrap();
        store.put("a", &json!(2)).await.unwrap();
        store.delete("b").await.unwrap();
        store.put("c", &json!(3)).await.unwrap();
        drop(store);
        assert_eq!(
            backend.rows(),
            HashMap::from([("a".to_owned(), json!(2)), ("c".to_owned(), json!(3))]),
            "{durability:?}: every acknowledged write survives"
        );
    }
}

// Guarantee 6: bounded memory.
#[tokio::test]
async fn a_full_buffer_makes_writes_wait_then_fail_and_never_drops_one() {
    let (backend, store) = store_with(
        write_behind()
            .max_pending(3)
            .put_timeout(Duration::from_millis(100))
            .retry_backoff_max(Duration::from_millis(10)),
    );
    backend.set_unavailable(true);
    for key in ["a", "b", "c"] {
        store.put(key, &json!(key)).await.unwrap();
    }
    store
        .put("a", &json!("a2"))
        .await
        .expect("coalescing needs no room");
    let err = store.put("d", &json!("d")).await.unwrap_err().to_string();
    assert!(err.contains("'d'") && err.contains("max_pending"), "{err}");
    assert_eq!(
        store.get("d").await.ok().flatten(),
        None,
        "the refused write is not visible"
    );
    assert_eq!(store.stats().dirty_keys, 3);

    backend.set_unavailable(false);
    store.flush().await.unwrap();
    store.put("d", &json!("d")).await.unwrap();
    store.shutdown().await.unwrap();
    let rows = backend.rows();
    assert_eq!(
        rows,
        HashMap::from([
            ("a".to_owned(), json!("a2")),
            ("b".to_owned(), json!("b")),
            ("c".to_owned(), json!("c")),
            ("d".to_owned(), json!("d")),
        ])
    );
}

#[tokio::test]
async fn a_waiting_write_proceeds_as_soon_as_the_flusher_makes_room() {
    let (backend, store) = store_with(
        write_behind()
            .max_pending(1)
            .max_batch(1)
            .put_timeout(Duration::from_secs(30)),
    );
    let pause = backend.pause_writes().await;
    store.put("a", &json!(1)).await.unwrap();
    let store = Arc::new(store);
    let waiting = tokio::spawn({
        let store = store.clone();
        async move { store.put("b", &json!(2)).await }
    });
    backend.wait_for_write_attempts(1).await;
    assert!(!waiting.is_finished(), "no room while a is in flight");
    drop(pause);
    waiting.await.unwrap().unwrap();
    store.shutdown().await.unwrap();
    assert_eq!(backend.rows().len(), 2);
}

#[tokio::test]
async fn only_clean_entries_are_evicted_and_clean_ones_stay_within_capacity() {
    let (backend, store) = store_with(write_behind().cache_capacity(5).max_pending(100));
    backend.set_unavailable(true);
    for i in 0..20 {
        store.put(&format!("k{i}"), &json!(i)).await.unwrap();
    }
    for i in 0..20 {
        assert_eq!(store.get(&format!("k{i}")).await.unwrap(), Some(json!(i)));
    }
    assert_eq!(
        store.stats().cached_keys,
        20,
        "dirty entries are never evicted"
    );
    assert_eq!(backend.loads(), 0);

    backend.set_unavailable(false);
    store.flush().await.unwrap();
    let stats = store.stats();
    assert_eq!(stats.cached_keys, 5, "{stats:?}");
    assert_eq!(stats.evictions, 15);
    // An evicted key is read back from the backend, with the right value.
    assert_eq!(store.get("k0").await.unwrap(), Some(json!(0)));
    assert_eq!(backend.loads(), 1);
    assert!(store.stats().cached_keys <= 5);
    store.shutdown().await.unwrap();
}

// Invariant 4 of the cache: a read that raced a write never caches what it
// read, even when the written entry was evicted before the read returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_read_racing_a_write_never_caches_a_stale_value() {
    let (backend, store) = store_with(
        CacheOptions::new()
            .durability(Durability::WriteThrough)
            .cache_capacity(1),
    );
    let store = Arc::new(store);
    backend.insert_row("k", json!("old"));
    let pause = backend.pause_loads().await;
    let slow_read = tokio::spawn({
        let store = store.clone();
        async move { store.get("k").await.unwrap() }
    });
    backend.wait_for_loads(1).await; // it has read "old" and is held
    store.put("k", &json!("new")).await.unwrap();
    store.put("other", &json!(1)).await.unwrap(); // evicts k (capacity 1)
    drop(pause);
    assert_eq!(
        slow_read.await.unwrap(),
        Some(json!("old")),
        "the racing read itself"
    );
    assert_eq!(
        store.get("k").await.unwrap(),
        Some(json!("new")),
        "the stale answer was cached"
    );
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn misses_read_the_backend_once_and_cache_absence_too() {
    let (backend, store) = store_with(write_behind());
    backend.insert_row("present", json!([1]));
    for _ in 0..3 {
        assert_eq!(store.get("present").await.unwrap(), Some(json!([1])));
        assert_eq!(store.get("absent").await.unwrap(), None);
    }
    assert_eq!(backend.loads(), 2);
    let stats = store.stats();
    assert_eq!((stats.cache_misses, stats.cache_hits), (2, 4));

    let (backend, store) = store_with(write_behind().cache_capacity(0));
    backend.insert_row("present", json!(1));
    store.get("present").await.unwrap();
    store.get("present").await.unwrap();
    assert_eq!(backend.loads(), 2, "capacity 0 turns read caching off");
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_by_put_not_discovered_by_the_flusher() {
    let backend = Arc::new(MemoryBackend::new().with_max_value_bytes(64));
    let store = CachedStateStore::new(backend.clone(), write_behind()).unwrap();
    assert!(store.put("bad key", &json!(1)).await.is_err());
    assert!(store.delete("").await.is_err());
    assert!(store.get("a b").await.is_err());
    let err = store
        .put("k", &json!("x".repeat(100)))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("over the limit of 64 bytes"), "{err}");
    let deep = (0..200).fold(json!(0), |inner, _| json!([inner]));
    assert!(store.put("k", &deep).await.is_err());
    store.flush().await.unwrap();
    assert_eq!(store.stats().puts, 0);
    assert_eq!(backend.write_attempts(), 0);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn invalid_options_and_a_missing_runtime_are_clear_errors() {
    let backend = Arc::new(MemoryBackend::new());
    let err = CachedStateStore::new(backend.clone(), CacheOptions::new().max_pending(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("max_pending must be at least 1"), "{err}");
    let outside = std::thread::spawn(move || {
        CachedStateStore::new(backend, CacheOptions::new())
            .unwrap_err()
            .to_string()
    })
    .join()
    .unwrap();
    assert!(outside.contains("inside a tokio runtime"), "{outside}");
}

// Group commit: concurrent callers share a batch, each durable on return.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_shares_batches_and_each_put_is_durable_on_return() {
    let (backend, store) = store_with(CacheOptions::new().durability(Durability::GroupCommit));
    let store = Arc::new(store);
    let pause = backend.pause_writes().await;
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let (store, backend) = (store.clone(), backend.clone());
            tokio::spawn(async move {
                let key = format!("task-{i}");
                store.put(&key, &json!(i)).await.unwrap();
                assert_eq!(
                    backend.rows().get(&key),
                    Some(&json!(i)),
                    "not durable on return"
                );
            })
        })
        .collect();
    backend.wait_for_write_attempts(1).await; // the first batch is in flight
    while store.stats().puts < 32 {
        tokio::task::yield_now().await;
    }
    drop(pause);
    for task in tasks {
        task.await.unwrap();
    }
    let batches = backend.committed_batches();
    assert_eq!(batches.iter().sum::<usize>(), 32);
    assert!(
        batches.len() <= 2,
        "32 concurrent puts took batches {batches:?}"
    );
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_group_commit_put_whose_batch_fails_errs_and_stays_queued() {
    let (backend, store) = store_with(CacheOptions::new());
    backend.fail_next_writes(1);
    let err = store.put("k", &json!(1)).await.unwrap_err().to_string();
    assert!(err.contains("'k'") && err.contains("stays queued"), "{err}");
    assert_eq!(store.get("k").await.unwrap(), Some(json!(1)));
    store.flush().await.unwrap();
    assert_eq!(backend.rows()["k"], json!(1));
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn write_through_commits_before_returning_and_forgets_failed_writes() {
    let (backend, store) = store_with(CacheOptions::new().durability(Durability::WriteThrough));
    store.put("k", &json!(1)).await.unwrap();
    assert_eq!(backend.rows()["k"], json!(1));
    assert_eq!(store.get("k").await.unwrap(), Some(json!(1)));
    assert_eq!(backend.loads(), 0, "served by the cache");

    backend.fail_next_writes(1);
    assert!(store.put("k", &json!(2)).await.is_err());
    assert_eq!(
        store.get("k").await.unwrap(),
        Some(json!(1)),
        "re-read from the backend"
    );
    assert_eq!(backend.loads(), 1);
    store.delete("k").await.unwrap();
    assert!(backend.rows().is_empty());
    assert_eq!(store.stats().dirty_keys, 0);
    store.shutdown().await.unwrap();
}

/// What the test knows of one key: how many writes it has had, and the
/// sequence number of the write that is current (`None` after a delete).
#[derive(Default)]
struct KeyModel {
    writes: u64,
    current: Option<u64>,
}

/// Many tasks writing few keys while flushes run: reads always match a model
/// kept under the same per-key order, the stored values of a key only move
/// forward, and after shutdown the backend equals the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_on_few_keys_end_with_the_last_writes() {
    use std::sync::atomic::{AtomicBool, Ordering};
    const KEYS: [&str; 4] = ["a", "b", "c", "d"];
    for durability in [
        Durability::WriteBehind,
        Durability::GroupCommit,
        Durability::WriteThrough,
    ] {
        let (backend, store) = store_with(write_behind().durability(durability).max_batch(2));
        let store = Arc::new(store);
        // The model and the store are updated under one lock per key, so
        // "the last write" of a key is well defined.
        let model: Arc<Vec<tokio::sync::Mutex<KeyModel>>> =
            Arc::new(KEYS.iter().map(|_| Default::default()).collect());
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn({
            let (backend, stop) = (backend.clone(), stop.clone());
            async move {
                let mut highest: HashMap<String, u64> = HashMap::new();
                while !stop.load(Ordering::SeqCst) {
                    for (key, value) in backend.rows() {
                        let seq = value["seq"].as_u64().unwrap();
                        let seen = highest.entry(key.clone()).or_insert(0);
                        assert!(seq >= *seen, "{key} went back from {seen} to {seq}");
                        *seen = seq;
                    }
                    tokio::task::yield_now().await;
                }
            }
        });
        let tasks: Vec<_> = (0..8u64)
            .map(|task| {
                let (store, model) = (store.clone(), model.clone());
                tokio::spawn(async move {
                    for step in 0..150u64 {
                        let k = ((task * 7 + step * 3) % 4) as usize;
                        let mut key_model = model[k].lock().await;
                        key_model.writes += 1;
                        let seq = key_model.writes;
                        if step % 11 == 5 {
                            store.delete(KEYS[k]).await.unwrap();
                            key_model.current = None;
                        } else {
                            let value = json!({"task": task, "step": step, "seq": seq});
                            store.put(KEYS[k], &value).await.unwrap();
                            key_model.current = Some(seq);
                        }
                        let read = store.get(KEYS[k]).await.unwrap();
                        assert_eq!(read.map(|v| v["seq"].as_u64().unwrap()), key_model.current);
                        drop(key_model);
                        if step % 37 == 0 {
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
        stop.store(true, Ordering::SeqCst);
        watcher.await.unwrap();
        let rows = backend.rows();
        for (k, key) in KEYS.iter().enumerate() {
            let expected = model[k].lock().await.current;
            let stored = rows.get(*key).map(|v: &Value| v["seq"].as_u64().unwrap());
            assert_eq!(stored, expected, "{durability:?}: key {key}");
        }
    }
}

/// A round writes up to `concurrent_batches` batches at the same time, never
/// more, and the round ends only when every one of them has committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_writes_at_most_concurrent_batches_at_once() {
    for concurrent in [1usize, 2] {
        let (backend, store) =
            store_with(write_behind().max_batch(1).concurrent_batches(concurrent));
        let store = Arc::new(store);
        for key in ["a", "b", "c"] {
            store.put(key, &json!(key)).await.unwrap();
        }
        let paused = backend.pause_writes().await;
        let flush = tokio::spawn({
            let store = store.clone();
            async move { store.flush().await }
        });
        backend.wait_for_write_attempts(concurrent as u64).await;
        // The batches in flight are held; nothing else can start.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        assert_eq!(backend.write_attempts(), concurrent as u64);
        assert!(
            !flush.is_finished(),
            "flush returned before its round ended"
        );
        drop(paused);
        flush.await.unwrap().unwrap();
        assert_eq!(backend.committed_batches(), [1, 1, 1]);
        assert_eq!(backend.rows().len(), 3);
        store.shutdown().await.unwrap();
    }
}

/// Group commit is pipelined: while one batch is in flight, writes of other
/// keys go in the next round, on another of the `concurrent_batches`, and
/// each returns as soon as its own batch commits. With one batch at a time
/// they wait for the batch in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_commit_put_returns_when_its_own_batch_commits_while_another_is_in_flight() {
    for concurrent in [2usize, 1] {
        let options = CacheOptions::new()
            .durability(Durability::GroupCommit)
            .concurrent_batches(concurrent);
        let (backend, store) = store_with(options);
        let store = Arc::new(store);
        let paused = backend.pause_writes_of("slow").await;
        let slow = tokio::spawn({
            let store = store.clone();
            async move { store.put("slow", &json!(1)).await }
        });
        backend.wait_for_write_attempts(1).await;
        let fast = tokio::spawn({
            let store = store.clone();
            async move { store.put("fast", &json!(2)).await }
        });
        if concurrent == 2 {
            // A hang guard only: the put needs no time, just its own batch.
            tokio::time::timeout(Duration::from_secs(30), fast)
                .await
                .expect("the put waited for another key's batch")
                .unwrap()
                .unwrap();
            assert_eq!(backend.rows().get("fast"), Some(&json!(2)));
            assert!(!slow.is_finished(), "the held batch cannot have returned");
            drop(paused);
        } else {
            for _ in 0..50 {
                tokio::task::yield_now().await;
            }
            assert_eq!(backend.write_attempts(), 1, "a second batch started");
            assert!(!fast.is_finished());
            drop(paused);
            fast.await.unwrap().unwrap();
        }
        slow.await.unwrap().unwrap();
        assert_eq!(backend.rows().get("slow"), Some(&json!(1)));
        store.shutdown().await.unwrap();
    }
}

/// Guarantee 3 with rounds overlapping: `flush()` waits for a round that
/// was already in flight when it was called, even when later rounds commit
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_for_a_round_in_flight_even_when_later_rounds_commit_first() {
    let (backend, store) = store_with(write_behind());
    let store = Arc::new(store);
    store.put("slow", &json!(1)).await.unwrap();
    let paused = backend.pause_writes_of("slow").await;
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.flush().await }
    });
    backend.wait_for_write_attempts(1).await;
    store.put("fast", &json!(2)).await.unwrap();
    let second = tokio::spawn({
        let store = store.clone();
        async move { store.flush().await }
    });
    while !backend.rows().contains_key("fast") {
        tokio::task::yield_now().await;
    }
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
    assert!(!first.is_finished() && !second.is_finished());
    assert!(!backend.rows().contains_key("slow"));
    drop(paused);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(backend.rows().get("slow"), Some(&json!(1)));
    store.shutdown().await.unwrap();
}

/// `list` merges the backend's keys with the store's pending writes, and a
/// backend that cannot answer makes it fail rather than guess.
#[tokio::test]
async fn list_merges_stored_keys_with_pending_writes() {
    let (backend, store) = store_with(write_behind());
    backend.insert_row("a::stored", json!(1));
    backend.insert_row("a::deleted", json!(2));
    backend.insert_row("b::other", json!(3));
    store.put("a::new", &json!(4)).await.unwrap();
    store.delete("a::deleted").await.unwrap();
    store.delete("a::never-stored").await.unwrap();
    assert_eq!(store.list("a::").await.unwrap(), ["a::new", "a::stored"]);
    store.flush().await.unwrap();
    assert_eq!(store.list("a::").await.unwrap(), ["a::new", "a::stored"]);
    assert_eq!(
        store.list("").await.unwrap(),
        ["a::new", "a::stored", "b::other"]
    );
    backend.set_unavailable(true);
    assert!(store.list("a::").await.is_err());
    backend.set_unavailable(false);
    assert!(store.list("bad prefix").await.is_err());
    store.shutdown().await.unwrap();
}

/// `cache_ttl`: a value another writer changed is served at most that long.
#[tokio::test(start_paused = true)]
async fn cache_ttl_bounds_how_long_a_clean_entry_is_served() {
    let options = write_behind().cache_ttl(Duration::from_millis(100));
    let (backend, store) = store_with(options);
    backend.insert_row("k", json!(1));
    assert_eq!(store.get("k").await.unwrap(), Some(json!(1)));
    backend.insert_row("k", json!(2)); // another writer
    assert_eq!(store.get("k").await.unwrap(), Some(json!(1)), "cached");
    store.put("mine", &json!("pending")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(store.get("k").await.unwrap(), Some(json!(2)));
    // This store's own pending write is not dropped.
    assert_eq!(store.get("mine").await.unwrap(), Some(json!("pending")));
    assert!(
        CachedStateStore::new(
            Arc::new(MemoryBackend::new()),
            CacheOptions::new().cache_ttl(Duration::ZERO)
        )
        .is_err()
    );
    store.shutdown().await.unwrap();
}
