//! Writes the storage refuses because of their value (a constraint, a
//! trigger, an encoding that cannot hold it), and batches bounded by size:
//! against `MemoryBackend`, where refusals are injected per key.
//!
//! A refused write is isolated by splitting its batch, reported by key and
//! reason, retried alone and slowly, never blocks another key, and is
//! replaced by a newer write of its key.

use std::sync::Arc;
use std::time::Duration;

use faucet_core::check::{CheckContext, ProbeStatus};
use faucet_core::state::StateStore;
use faucet_state_postgres::{
    CacheOptions, CachedStateStore, Durability, MemoryBackend, RefusedWrite,
};
use serde_json::json;

const NEVER: Duration = Duration::from_secs(3600);

fn options(durability: Durability) -> CacheOptions {
    CacheOptions::new()
        .durability(durability)
        .flush_interval(NEVER)
        .shutdown_timeout(Duration::from_millis(200))
}

fn store_with(options: CacheOptions) -> (Arc<MemoryBackend>, CachedStateStore<MemoryBackend>) {
    let backend = Arc::new(MemoryBackend::new());
    let store = CachedStateStore::new(backend.clone(), options).unwrap();
    (backend, store)
}

fn refused_keys(store: &CachedStateStore<MemoryBackend>) -> Vec<String> {
    store
        .stats()
        .refused_writes
        .into_iter()
        .map(|RefusedWrite { key, .. }| key)
        .collect()
}

#[tokio::test]
async fn a_refused_write_is_isolated_and_every_other_key_commits_in_the_same_round() {
    let (backend, store) = store_with(options(Durability::WriteBehind));
    backend.refuse_key("k050");
    for i in 0..100 {
        store.put(&format!("k{i:03}"), &json!(i)).await.unwrap();
    }
    let err = store.flush().await.unwrap_err().to_string();
    assert!(
        err.contains("'k050'") && err.contains("refused the value of key 'k050'"),
        "the error names the key and the reason: {err}"
    );
    let rows = backend.rows();
    assert_eq!(rows.len(), 99, "every other key committed");
    assert!(!rows.contains_key("k050"));
    assert_eq!(refused_keys(&store), ["k050"]);
    let stats = store.stats();
    assert_eq!(stats.dirty_keys, 1, "the refused write stays pending");
    assert_eq!(stats.refusals, 1);
    // Read-your-writes still holds for the pending write.
    assert_eq!(store.get("k050").await.unwrap(), Some(json!(50)));

    let report = store.check(&CheckContext::default()).await.unwrap();
    let flusher = report.probes.iter().find(|p| p.name == "flusher").unwrap();
    assert!(
        matches!(&flusher.status, ProbeStatus::Fail { reason, .. } if reason.contains("'k050'")),
        "{flusher:?}"
    );
    let err = store.shutdown().await.unwrap_err().to_string();
    assert!(
        err.contains("1 keys were not persisted") && err.contains("'k050'"),
        "{err}"
    );
}

#[tokio::test]
async fn group_commit_tells_only_the_refused_writer() {
    let (backend, store) = store_with(options(Durability::GroupCommit));
    let store = Arc::new(store);
    backend.refuse_key("bad");
    let mut tasks = Vec::new();
    for i in 0..32 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store.put(&format!("good{i:02}"), &json!(i)).await
        }));
    }
    let bad = store.put("bad", &json!("refused")).await;
    for task in tasks {
        task.await.unwrap().expect("a good key's put succeeds");
    }
    let err = bad.unwrap_err().to_string();
    assert!(
        err.contains("refused the write of key 'bad'")
            && err.contains("refused the value of key 'bad'"),
        "{err}"
    );
    assert_eq!(backend.rows().len(), 32);
    store.put("after", &json!(1)).await.unwrap();
    assert_eq!(
        backend.rows()["after"],
        json!(1),
        "the flusher is not wedged"
    );
}

#[tokio::test]
async fn write_through_reports_the_key_and_the_reason() {
    let (backend, store) = store_with(options(Durability::WriteThrough));
    backend.refuse_key("bad");
    let err = store.put("bad", &json!(1)).await.unwrap_err().to_string();
    assert!(
        err.contains("refused the write of key 'bad'")
            && err.contains("refused the value of key 'bad'"),
        "{err}"
    );
    assert_eq!(store.get("bad").await.unwrap(), None, "nothing was cached");
    store.put("good", &json!(2)).await.unwrap();
    assert_eq!(backend.rows()["good"], json!(2));
}

#[tokio::test]
async fn a_newer_write_of_the_key_replaces_the_refused_one() {
    for durability in [Durability::WriteBehind, Durability::GroupCommit] {
        let (backend, store) = store_with(options(durability));
        backend.refuse_key("bad");
        let _ = store.put("bad", &json!("poison")).await;
        let _ = store.flush().await;
        assert_eq!(refused_keys(&store), ["bad"], "{durability:?}");
        backend.accept_key("bad");
        store.put("bad", &json!("fixed")).await.unwrap();
        store.flush().await.unwrap();
        assert_eq!(backend.rows()["bad"], json!("fixed"), "{durability:?}");
        assert!(refused_keys(&store).is_empty());
        store.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn a_delete_replaces_a_refused_write_too() {
    let (backend, store) = store_with(options(Durability::WriteBehind));
    backend.refuse_key("bad");
    store.put("bad", &json!("poison")).await.unwrap();
    assert!(store.flush().await.is_err());
    store.delete("bad").await.unwrap();
    store.flush().await.unwrap();
    assert!(refused_keys(&store).is_empty());
    assert_eq!(store.get("bad").await.unwrap(), None);
    store.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_refused_write_is_retried_alone_every_retry_backoff_max_not_in_a_tight_loop() {
    let (backend, store) =
        store_with(options(Durability::WriteBehind).retry_backoff_max(Duration::from_secs(1)));
    backend.refuse_key("bad");
    store.put("bad", &json!(1)).await.unwrap();
    store.put("good", &json!(2)).await.unwrap();
    assert!(store.flush().await.is_err());
    let attempts_at_refusal = backend.write_attempts();
    // Ten seconds of (paused, so exact) time: about ten retries, no more.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let retries = backend.write_attempts() - attempts_at_refusal;
    assert!(
        (5..=11).contains(&retries),
        "{retries} retries in 10 s at one per second"
    );
    // Once the storage accepts it, a retry commits it with nobody writing.
    backend.accept_key("bad");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(backend.rows()["bad"], json!(1));
    assert!(refused_keys(&store).is_empty());
    assert_eq!(store.stats().dirty_keys, 0);
    store.shutdown().await.unwrap();
}

#[tokio::test]
async fn several_refused_keys_in_one_batch_each_stand_alone() {
    let (backend, store) = store_with(options(Durability::WriteBehind));
    for bad in ["k003", "k004", "k500", "k999"] {
        backend.refuse_key(bad);
    }
    for i in 0..1000 {
        store.put(&format!("k{i:03}"), &json!(i)).await.unwrap();
    }
    assert!(store.flush().await.is_err());
    assert_eq!(backend.rows().len(), 996);
    assert_eq!(refused_keys(&store), ["k003", "k004", "k500", "k999"]);
    // Bisection, not one batch per key: far fewer attempts than keys.
    assert!(
        backend.write_attempts() < 100,
        "{}",
        backend.write_attempts()
    );
}

#[tokio::test]
async fn batches_are_bounded_by_encoded_bytes_as_well_as_by_keys() {
    let (backend, store) = store_with(options(Durability::WriteBehind).max_batch_bytes(1_000));
    let value = json!("x".repeat(290)); // 292 bytes of JSON, plus the key
    for i in 0..20 {
        store.put(&format!("k{i:02}"), &value).await.unwrap();
    }
    // One value larger than max_batch_bytes still goes, alone.
    store.put("huge", &json!("y".repeat(5_000))).await.unwrap();
    store.flush().await.unwrap();
    assert_eq!(backend.rows().len(), 21);
    let sizes = backend.committed_batch_bytes();
    assert!(sizes.len() >= 8, "{sizes:?}");
    for size in sizes {
        assert!(size <= 1_000 || size == "huge".len() + 5_002, "{size}");
    }
    store.shutdown().await.unwrap();
}

/// Regression: with two batches in flight, one failing for a transient
/// reason and the other refused, the refused batch's halves were pushed
/// after the round had stopped starting batches, and were dropped: their
/// keys stayed dirty but in no queue, so a good key among them was never
/// written.
#[tokio::test]
async fn a_batch_refused_beside_a_failed_one_loses_no_key() {
    let (backend, store) = store_with(
        options(Durability::WriteBehind)
            .max_batch(2)
            .concurrent_batches(2),
    );
    for key in ["a", "b", "c", "d"] {
        store.put(key, &json!(key)).await.unwrap();
    }
    backend.refuse_key("c");
    // Batches [a, b] and [c, d]: the first fails, the second is refused.
    backend.fail_next_writes(1);
    assert!(store.flush().await.is_err());
    let err = store.flush().await.unwrap_err().to_string();
    assert!(err.contains("'c'"), "{err}");
    let rows = backend.rows();
    for key in ["a", "b", "d"] {
        assert_eq!(rows.get(key), Some(&json!(key)), "{key} was not written");
    }
    assert_eq!(refused_keys(&store), ["c"]);
    assert_eq!(store.stats().dirty_keys, 1);
}
