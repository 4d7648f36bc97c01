//! Counters of the write-behind engine, and the snapshot users read.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of a [`CachedStateStore`](crate::CachedStateStore)'s state and
/// counters, from [`stats()`](crate::CachedStateStore::stats). Counters are
/// totals since the store was built.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Keys whose newest put or delete is not yet persisted.
    pub dirty_keys: usize,
    /// Entries in the cache, dirty and clean.
    pub cached_keys: usize,
    /// `put` calls accepted: staged in the cache (write-behind, group
    /// commit) or committed (write-through).
    pub puts: u64,
    /// `delete` calls accepted, counted like `puts`.
    pub deletes: u64,
    /// Puts and deletes that replaced a not-yet-persisted write of the same
    /// key, so that only the newest was written.
    pub coalesced_puts: u64,
    /// Batches (transactions) committed by the flusher.
    pub batches_written: u64,
    /// Rows upserted or deleted by committed batches.
    pub rows_written: u64,
    /// Batches that failed and were retried.
    pub flush_errors: u64,
    /// The error of the most recent failed batch, if any batch failed.
    pub last_error: Option<String>,
    /// `get` calls answered from the cache.
    pub cache_hits: u64,
    /// `get` calls that read the backend.
    pub cache_misses: u64,
    /// Clean entries evicted to respect `cache_capacity`.
    pub evictions: u64,
}

/// The engine's live counters; [`CacheStats`] is read from these.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub puts: AtomicU64,
    pub deletes: AtomicU64,
    pub coalesced: AtomicU64,
    pub batches: AtomicU64,
    pub rows: AtomicU64,
    pub flush_errors: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub evictions: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_batch(&self, rows: usize) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
    }

    pub(crate) fn record_failure(&self, error: String) {
        self.flush_errors.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(error);
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub(crate) fn snapshot(&self, dirty_keys: usize, cached_keys: usize) -> CacheStats {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStats {
            dirty_keys,
            cached_keys,
            puts: read(&self.puts),
            deletes: read(&self.deletes),
            coalesced_puts: read(&self.coalesced),
            batches_written: read(&self.batches),
            rows_written: read(&self.rows),
            flush_errors: read(&self.flush_errors),
            last_error: self.last_error(),
            cache_hits: read(&self.hits),
            cache_misses: read(&self.misses),
            evictions: read(&self.evictions),
        }
    }
}
