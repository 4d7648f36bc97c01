//! Counters of the write-behind engine, and the snapshot users read.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

use crate::lock::lock;

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
    /// Time spent in the backend writing batches, committed or failed,
    /// summed. Against the wall time and `batches_written` it shows how much
    /// of a flush round is the database's and how much the client's.
    pub batch_write_time: Duration,
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
    /// Writes the server refused (each counted once per refusal, retries
    /// included).
    pub refusals: u64,
    /// The writes the server refused that are still pending, in key order:
    /// each is retried alone every `retry_backoff_max` until it commits or a
    /// newer write of its key replaces it.
    pub refused_writes: Vec<RefusedWrite>,
    /// Whether the store is listening for other writers' changes now (only
    /// with [`listen_for_changes`](crate::CacheOptions::listen_for_changes);
    /// always `false` without it). While it is `false` on a listening store
    /// (before the first subscription, after a lost connection) no clean
    /// entry is served: reads go to the storage, which is correct but slower.
    pub listening: bool,
}

/// A write the server refused because of its value (an encoding that cannot
/// hold it, a constraint, a trigger), reported by
/// [`CacheStats::refused_writes`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefusedWrite {
    /// The key whose write was refused.
    pub key: String,
    /// The server's reason, as the error of the refused statement.
    pub reason: String,
}

/// Names of the metrics the cached store reports through the
/// [`metrics`](https://docs.rs/metrics/0.24) facade, each labelled
/// `store = <name>` (see [`CacheOptions::name`](crate::CacheOptions::name)).
///
/// Install your recorder (for example a Prometheus exporter) before building
/// the store: the store registers its handles once, when it is built.
///
/// Every name starts with `faucet_state_cache_`, so none can be mistaken for
/// the series faucet-core's `InstrumentedStateStore` emits around any store
/// (`faucet_state_get_total`, `faucet_state_put_total`,
/// `faucet_state_delete_total`, `faucet_state_errors_total`,
/// `faucet_state_*_duration_seconds`): those count calls of the `StateStore`
/// trait, these count what the cache and its flusher do.
pub mod metric_names {
    /// Counter: `put` calls accepted.
    pub const PUTS: &str = "faucet_state_cache_puts_total";
    /// Counter: `delete` calls accepted.
    pub const DELETES: &str = "faucet_state_cache_deletes_total";
    /// Counter: writes that replaced a not-yet-persisted write of their key.
    pub const COALESCED: &str = "faucet_state_cache_coalesced_puts_total";
    /// Counter: batches committed.
    pub const FLUSH_BATCHES: &str = "faucet_state_cache_flush_batches_total";
    /// Counter: rows upserted or deleted by committed batches.
    pub const ROWS_FLUSHED: &str = "faucet_state_cache_rows_flushed_total";
    /// Counter: batches that failed (and were retried).
    pub const FLUSH_ERRORS: &str = "faucet_state_cache_flush_errors_total";
    /// Histogram: seconds per batch write, failed ones included.
    pub const FLUSH_SECONDS: &str = "faucet_state_cache_flush_seconds";
    /// Gauge: keys whose newest write is not yet persisted.
    pub const DIRTY_KEYS: &str = "faucet_state_cache_dirty_keys";
    /// Counter: `get` calls answered from the cache.
    pub const CACHE_HITS: &str = "faucet_state_cache_hits_total";
    /// Counter: `get` calls that read the backend.
    pub const CACHE_MISSES: &str = "faucet_state_cache_misses_total";
    /// Counter: writes the server refused (each retry counts again).
    pub const REFUSALS: &str = "faucet_state_cache_refused_writes_total";
}

/// The engine's counters: atomics for [`CacheStats`], and the same events
/// reported to the `metrics` recorder that was installed when the store was
/// built (handles are registered once, so the hot path does no lookup).
#[derive(Debug)]
pub(crate) struct Counters {
    puts: AtomicU64,
    deletes: AtomicU64,
    coalesced: AtomicU64,
    batches: AtomicU64,
    write_nanos: AtomicU64,
    rows: AtomicU64,
    flush_errors: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    refusals: AtomicU64,
    last_error: Mutex<Option<String>>,
    instruments: Instruments,
}

struct Instruments {
    puts: Counter,
    deletes: Counter,
    coalesced: Counter,
    batches: Counter,
    rows: Counter,
    flush_errors: Counter,
    flush_seconds: Histogram,
    dirty_keys: Gauge,
    hits: Counter,
    misses: Counter,
    refusals: Counter,
}

impl std::fmt::Debug for Instruments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Instruments")
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn new(store_name: &str) -> Self {
        let labels = [("store", store_name.to_owned())];
        Self {
            puts: AtomicU64::default(),
            deletes: AtomicU64::default(),
            coalesced: AtomicU64::default(),
            batches: AtomicU64::default(),
            write_nanos: AtomicU64::default(),
            rows: AtomicU64::default(),
            flush_errors: AtomicU64::default(),
            hits: AtomicU64::default(),
            misses: AtomicU64::default(),
            evictions: AtomicU64::default(),
            refusals: AtomicU64::default(),
            last_error: Mutex::default(),
            instruments: Instruments {
                puts: counter!(metric_names::PUTS, &labels),
                deletes: counter!(metric_names::DELETES, &labels),
                coalesced: counter!(metric_names::COALESCED, &labels),
                batches: counter!(metric_names::FLUSH_BATCHES, &labels),
                rows: counter!(metric_names::ROWS_FLUSHED, &labels),
                flush_errors: counter!(metric_names::FLUSH_ERRORS, &labels),
                flush_seconds: histogram!(metric_names::FLUSH_SECONDS, &labels),
                dirty_keys: gauge!(metric_names::DIRTY_KEYS, &labels),
                hits: counter!(metric_names::CACHE_HITS, &labels),
                misses: counter!(metric_names::CACHE_MISSES, &labels),
                refusals: counter!(metric_names::REFUSALS, &labels),
            },
        }
    }

    pub(crate) fn write_accepted(&self, is_put: bool) {
        if is_put {
            bump(&self.puts);
            self.instruments.puts.increment(1);
        } else {
            bump(&self.deletes);
            self.instruments.deletes.increment(1);
        }
    }

    pub(crate) fn coalesced(&self) {
        bump(&self.coalesced);
        self.instruments.coalesced.increment(1);
    }

    pub(crate) fn hit(&self) {
        bump(&self.hits);
        self.instruments.hits.increment(1);
    }

    pub(crate) fn miss(&self) {
        bump(&self.misses);
        self.instruments.misses.increment(1);
    }

    pub(crate) fn eviction(&self) {
        bump(&self.evictions);
    }

    pub(crate) fn record_refusal(&self) {
        bump(&self.refusals);
        self.instruments.refusals.increment(1);
    }

    pub(crate) fn dirty_keys(&self, dirty: usize) {
        self.instruments.dirty_keys.set(dirty as f64);
    }

    pub(crate) fn record_batch(&self, rows: usize, elapsed: Duration) {
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.add_write_time(elapsed);
        self.instruments.batches.increment(1);
        self.instruments.rows.increment(rows as u64);
        self.instruments.flush_seconds.record(elapsed.as_secs_f64());
    }

    pub(crate) fn record_failure(&self, error: String, elapsed: Duration) {
        self.flush_errors.fetch_add(1, Ordering::Relaxed);
        self.add_write_time(elapsed);
        self.instruments.flush_errors.increment(1);
        self.instruments.flush_seconds.record(elapsed.as_secs_f64());
        *lock(&self.last_error) = Some(error);
    }

    fn add_write_time(&self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.write_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub(crate) fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    pub(crate) fn snapshot(
        &self,
        dirty_keys: usize,
        cached_keys: usize,
        refused_writes: Vec<RefusedWrite>,
    ) -> CacheStats {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CacheStats {
            dirty_keys,
            cached_keys,
            puts: read(&self.puts),
            deletes: read(&self.deletes),
            coalesced_puts: read(&self.coalesced),
            batches_written: read(&self.batches),
            rows_written: read(&self.rows),
            batch_write_time: Duration::from_nanos(read(&self.write_nanos)),
            flush_errors: read(&self.flush_errors),
            last_error: self.last_error(),
            cache_hits: read(&self.hits),
            cache_misses: read(&self.misses),
            evictions: read(&self.evictions),
            refusals: read(&self.refusals),
            refused_writes,
            listening: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::metric_names as m;

    /// Issue 22, item 5: the cache's series never share a name, or a name
    /// that differs by a plural, with faucet-core's `InstrumentedStateStore`.
    #[test]
    fn metric_names_are_apart_from_faucet_cores() {
        let ours = [
            m::PUTS,
            m::DELETES,
            m::COALESCED,
            m::FLUSH_BATCHES,
            m::ROWS_FLUSHED,
            m::FLUSH_ERRORS,
            m::FLUSH_SECONDS,
            m::DIRTY_KEYS,
            m::CACHE_HITS,
            m::CACHE_MISSES,
            m::REFUSALS,
        ];
        let faucet_core = [
            "faucet_state_get_total",
            "faucet_state_put_total",
            "faucet_state_delete_total",
            "faucet_state_errors_total",
            "faucet_state_get_duration_seconds",
            "faucet_state_put_duration_seconds",
            "faucet_state_delete_duration_seconds",
            "faucet_state_key_migrations_total",
        ];
        for name in ours {
            assert!(name.starts_with("faucet_state_cache_"), "{name}");
            assert!(!faucet_core.contains(&name), "{name}");
        }
    }
}
