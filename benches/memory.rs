//! Bytes of heap per cached key, at 1,000,000 small bookmarks.
//!
//! ```text
//! cargo bench --bench memory
//! ```
//!
//! A counting allocator measures the live heap before and after one million
//! keys are put into a `CachedStateStore` whose backend discards writes, so
//! that only the cache is counted. Not a timing: it prints one figure per
//! kind of entry. Under `cargo test --benches` it runs with 10,000 keys, as a
//! smoke test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use faucet_core::FaucetError;
use faucet_core::check::{CheckContext, CheckReport, Probe};
use faucet_core::state::{StateStore, validate_state_key};
use faucet_state_postgres::{BatchError, CacheOptions, CachedStateStore, Durability, StateBackend};
use serde_json::{Value, json};

struct CountingAllocator;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a
// counter is updated besides.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// A backend that stores nothing, so the cache is all that is measured.
struct Discard;

#[async_trait]
impl StateBackend for Discard {
    fn encode(&self, key: &str, value: &Value) -> Result<Arc<str>, FaucetError> {
        validate_state_key(key)?;
        serde_json::to_string(value)
            .map(Arc::from)
            .map_err(|e| FaucetError::State(e.to_string()))
    }

    fn decode(&self, _key: &str, stored: &str) -> Result<Value, FaucetError> {
        serde_json::from_str(stored).map_err(|e| FaucetError::State(e.to_string()))
    }

    async fn load(&self, _key: &str) -> Result<Option<String>, FaucetError> {
        Ok(None)
    }

    async fn write_batch(
        &self,
        _upserts: &[(&str, &str)],
        _deletes: &[&str],
    ) -> Result<(), BatchError> {
        Ok(())
    }

    async fn compare_and_put(
        &self,
        _key: &str,
        _expected: Option<&Value>,
        _stored: &str,
    ) -> Result<bool, BatchError> {
        Ok(true)
    }

    async fn list_keys(&self, _prefix: &str) -> Result<Vec<String>, FaucetError> {
        Ok(Vec::new())
    }

    async fn check(&self, _ctx: &CheckContext) -> Result<CheckReport, FaucetError> {
        Ok(CheckReport::single(Probe::pass("discard", Duration::ZERO)))
    }
}

/// A typical bookmark: a partition key and a CDC position.
fn key(i: usize) -> String {
    format!("pipeline:orders:partition-{i:07}")
}

fn bookmark(i: usize) -> Value {
    json!({"lsn": format!("0/{:08X}", i * 4096), "ts": 1_764_000_000 + i})
}

async fn bytes_per_key(durability: Durability, keys: usize) -> f64 {
    let options = CacheOptions::new()
        .durability(durability)
        .cache_capacity(keys)
        .max_pending(keys)
        .max_batch(keys)
        .flush_interval(Duration::from_secs(3600));
    let store = CachedStateStore::new(Arc::new(Discard), options).expect("store");
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for i in 0..keys {
        store.put(&key(i), &bookmark(i)).await.expect("put");
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    assert_eq!(store.stats().cached_keys, keys);
    let per_key = (after - before) as f64 / keys as f64;
    store.shutdown().await.expect("shutdown");
    per_key
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let keys = if full { 1_000_000 } else { 10_000 };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let payload = key(0).len() + serde_json::to_string(&bookmark(0)).unwrap().len();
    println!("memory: {keys} keys, key + bookmark JSON = {payload} bytes each");
    for (name, durability) in [
        (
            "clean entry (persisted, cached for reads)",
            Durability::WriteThrough,
        ),
        (
            "dirty entry (write-behind, not yet flushed)",
            Durability::WriteBehind,
        ),
    ] {
        let per_key = rt.block_on(bytes_per_key(durability, keys));
        println!("memory: {name}: {per_key:.0} bytes of heap per key");
    }
}
