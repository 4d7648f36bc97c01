//! What an operator sees: metrics through a recorder, tracing spans of each
//! flush, and the `flusher` probe of `check()`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use faucet_core::check::ProbeStatus;
use faucet_core::state::StateStore;
use faucet_state_postgres::metric_names as m;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use serde_json::json;

fn write_behind(name: &str) -> CacheOptions {
    CacheOptions::new()
        .name(name)
        .durability(Durability::WriteBehind)
        .flush_interval(Duration::from_secs(3600))
}

#[tokio::test]
async fn metrics_count_what_the_store_did() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let backend = Arc::new(MemoryBackend::new());
    // Handles are registered when the store is built, with the recorder
    // in force at that moment.
    let store = metrics::with_local_recorder(&recorder, || {
        CachedStateStore::new(backend.clone(), write_behind("orders")).unwrap()
    });
    backend.insert_row("existing", json!(0));
    for i in 0..3 {
        store.put("cursor", &json!(i)).await.unwrap();
    }
    store.delete("old").await.unwrap();
    store.get("cursor").await.unwrap(); // hit
    store.get("existing").await.unwrap(); // miss
    store.get("existing").await.unwrap(); // hit
    store.flush().await.unwrap();
    store.put("cursor", &json!(9)).await.unwrap();
    backend.fail_next_writes(1);
    assert!(store.flush().await.is_err());
    store.flush().await.unwrap();

    let mut seen: HashMap<String, DebugValue> = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<(String, String)> = key
            .key()
            .labels()
            .map(|l| (l.key().to_owned(), l.value().to_owned()))
            .collect();
        assert_eq!(labels, [("store".to_owned(), "orders".to_owned())]);
        seen.insert(key.key().name().to_owned(), value);
    }
    let counter = |name: &str| match seen.get(name) {
        Some(DebugValue::Counter(n)) => *n,
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(counter(m::PUTS), 4);
    assert_eq!(counter(m::DELETES), 1);
    assert_eq!(counter(m::COALESCED), 2);
    assert_eq!(counter(m::FLUSH_BATCHES), 2);
    assert_eq!(counter(m::ROWS_FLUSHED), 3);
    assert_eq!(counter(m::FLUSH_ERRORS), 1);
    assert_eq!(counter(m::CACHE_HITS), 2);
    assert_eq!(counter(m::CACHE_MISSES), 1);
    match &seen[m::FLUSH_SECONDS] {
        DebugValue::Histogram(samples) => assert_eq!(samples.len(), 3, "two commits, one failure"),
        other => panic!("{other:?}"),
    }
    match &seen[m::DIRTY_KEYS] {
        DebugValue::Gauge(dirty) => assert_eq!(dirty.into_inner(), 0.0),
        other => panic!("{other:?}"),
    }
    store.shutdown().await.unwrap();
}

/// Everything logged through `tracing` on this thread while `f` runs, span
/// closings (with their recorded fields) included.
async fn logged<F: std::future::Future<Output = ()>>(f: F) -> String {
    #[derive(Clone, Default)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let buffer = buffer.clone();
            move || buffer.clone()
        })
        .with_ansi(false)
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    f.await;
    drop(guard);
    let bytes = buffer.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[tokio::test]
async fn each_flush_is_a_span_with_its_size_latency_and_outcome() {
    let log = logged(async {
        let backend = Arc::new(MemoryBackend::new());
        let store = CachedStateStore::new(backend.clone(), write_behind("spans")).unwrap();
        store.put("a", &json!(1)).await.unwrap();
        store.delete("b").await.unwrap();
        store.flush().await.unwrap();
        store.put("a", &json!(2)).await.unwrap();
        backend.fail_next_writes(1);
        assert!(store.flush().await.is_err());
        store.shutdown().await.unwrap();
    })
    .await;
    let spans: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("faucet_state.flush"))
        .collect();
    assert!(
        spans.iter().any(|l| l.contains("upserts=1")
            && l.contains("deletes=1")
            && l.contains("store=\"spans\"")
            && l.contains("outcome=\"committed\"")
            && l.contains("elapsed_ms=")),
        "{log}"
    );
    assert!(
        spans.iter().any(|l| l.contains("outcome=\"failed\"")),
        "{log}"
    );
}

// Guarantees 7 (visibility) and 4 (drop): failures are logged as warnings.
#[tokio::test]
async fn failed_batches_and_drops_without_shutdown_are_logged_as_warnings() {
    let log = logged(async {
        let backend = Arc::new(MemoryBackend::new());
        let store = CachedStateStore::new(backend.clone(), write_behind("warnings")).unwrap();
        store.put("a", &json!(1)).await.unwrap();
        backend.fail_next_writes(1);
        assert!(store.flush().await.is_err());
        store.put("b", &json!(2)).await.unwrap();
        drop(store);
    })
    .await;
    assert!(
        log.contains("WARN")
            && log.contains("flushing a batch failed")
            && log.contains("fault injected"),
        "{log}"
    );
    assert!(
        log.contains("dropped without shutdown()") && log.contains("2 keys were not persisted"),
        "{log}"
    );
}

async fn failed_probes(store: &CachedStateStore<MemoryBackend>) -> usize {
    store
        .check(&Default::default())
        .await
        .unwrap()
        .failed_count()
}

// Guarantee 7 (visibility): failures show in stats and in check().
#[tokio::test]
async fn check_reports_a_failing_flusher_and_a_stopped_one() {
    let backend = Arc::new(MemoryBackend::new());
    let options = write_behind("probe").retry_backoff_max(Duration::from_millis(5));
    let store = CachedStateStore::new(backend.clone(), options).unwrap();
    assert_eq!(failed_probes(&store).await, 0);
    store.put("k", &json!(1)).await.unwrap();
    backend.fail_next_writes(1);
    assert!(store.flush().await.is_err());
    let report = store.check(&Default::default()).await.unwrap();
    let flusher = report.probes.iter().find(|p| p.name == "flusher").unwrap();
    assert!(
        format!("{:?}", flusher.status).contains("1 keys waiting"),
        "{report:?}"
    );
    store.flush().await.unwrap();
    assert_eq!(failed_probes(&store).await, 0);
    store.shutdown().await.unwrap();
    assert_eq!(failed_probes(&store).await, 1);
}

#[tokio::test(start_paused = true)]
async fn check_reports_the_backlog_and_its_age_when_the_flusher_falls_behind() {
    let backend = Arc::new(MemoryBackend::new());
    let store = CachedStateStore::new(
        backend.clone(),
        write_behind("backlog").flush_interval(Duration::from_secs(1)),
    )
    .unwrap();
    assert_eq!(failed_probes(&store).await, 0);
    let pause = backend.pause_writes().await;
    store.put("a", &json!(1)).await.unwrap();
    store.put("b", &json!(1)).await.unwrap();
    backend.wait_for_write_attempts(1).await; // the flusher is stuck in a batch
    tokio::time::advance(Duration::from_secs(30)).await;
    let report = store.check(&Default::default()).await.unwrap();
    let flusher = report.probes.iter().find(|p| p.name == "flusher").unwrap();
    match &flusher.status {
        ProbeStatus::Fail { reason } => assert!(
            reason.contains("not keeping up")
                && reason.contains("2 keys waiting")
                && reason.contains("the oldest for 3"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(flusher.hint.as_deref().unwrap().contains("max_batch"));
    drop(pause);
    store.flush().await.unwrap();
    assert_eq!(failed_probes(&store).await, 0);
    store.shutdown().await.unwrap();
}
