//! The background task that persists dirty keys in batches.
//!
//! The flusher works in *rounds*. A round takes every queued dirty key,
//! writes them in chunks of at most `max_batch` keys (one atomic
//! `write_batch` each), and then publishes that it ended, and whether every
//! chunk committed. Rounds never overlap, so per key the values written only
//! ever move forward.
//!
//! Waiting for durability rests on one fact: a write made while round `r` is
//! the newest round started is carried by round `r` or, at the latest, by
//! round `r + 1` (if round `r` had already taken its key's value, the key is
//! queued again and round `r + 1` takes it). So a writer, or `flush()`, asks
//! for round `r + 1` and waits until it ends; if it succeeded, the write is
//! committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{Notify, watch};
use tracing::Instrument;

use crate::backend::StateBackend;
use crate::cache::Cache;
use crate::config::{CacheOptions, Durability, RETRY_BACKOFF_START};
use crate::stats::Counters;

/// What the flusher has done so far, as waiters see it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    /// The newest round that ended, successfully or not.
    pub ended: u64,
    /// The newest round in which every chunk committed.
    pub succeeded: u64,
    /// Why the newest failed round failed.
    pub last_error: Option<Arc<str>>,
    /// The flusher has exited (shutdown, or the store was dropped).
    pub stopped: bool,
}

/// State shared by the store's handle and its flusher task.
pub(crate) struct Engine<B> {
    pub backend: Arc<B>,
    pub cache: Cache,
    pub options: CacheOptions,
    pub counters: Counters,
    /// Wakes the flusher: work is due, a round was requested, or shutdown.
    pub wake: Notify,
    pub progress: watch::Sender<Progress>,
    /// The newest round some waiter needs; the flusher runs rounds (empty
    /// ones too) until this one has ended.
    pub requested: AtomicU64,
    pub shutting_down: AtomicBool,
    /// The flusher task has ended, for whatever reason.
    pub stopped: AtomicBool,
}

/// How a wait for a round ended.
pub(crate) enum RoundOutcome {
    Committed,
    Failed(Arc<str>),
    /// The flusher stopped before the round ran.
    Stopped,
}

impl<B: StateBackend> Engine<B> {
    pub(crate) fn new(backend: Arc<B>, options: CacheOptions) -> Self {
        Self {
            backend,
            cache: Cache::new(options.get_max_pending(), options.get_cache_capacity()),
            counters: Counters::new(options.get_name()),
            options,

            wake: Notify::new(),
            progress: watch::channel(Progress::default()).0,
            requested: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
        }
    }

    /// Waits until a round that carries every write made before this call
    /// has ended, and says whether it committed.
    pub(crate) async fn wait_for_durability(&self) -> RoundOutcome {
        let target = self.cache.rounds_started() + 1;
        self.requested.fetch_max(target, Ordering::SeqCst);
        let mut progress = self.progress.subscribe();
        self.wake.notify_one();
        let seen = match progress.wait_for(|p| p.ended >= target || p.stopped).await {
            Ok(seen) => seen.clone(),
            // The sender lives in the engine, which outlives this borrow.
            Err(_) => return RoundOutcome::Stopped,
        };
        if seen.succeeded >= target {
            RoundOutcome::Committed
        } else if seen.ended >= target {
            RoundOutcome::Failed(seen.last_error.unwrap_or_else(|| "unknown error".into()))
        } else {
            RoundOutcome::Stopped
        }
    }
}

/// The flusher task: runs rounds when work is due, backs off after a failed
/// round, and exits once shutdown is requested and nothing is dirty.
pub(crate) async fn run<B: StateBackend>(engine: Arc<Engine<B>>) {
    // Waiters must learn that no more rounds will run however the task ends:
    // by returning, by being aborted (shutdown's deadline, drop) or by a panic.
    struct MarkStopped<'a>(&'a watch::Sender<Progress>, &'a AtomicBool);
    impl Drop for MarkStopped<'_> {
        fn drop(&mut self) {
            self.1.store(true, Ordering::SeqCst);
            self.0.send_modify(|p| p.stopped = true);
        }
    }
    let _mark_stopped = MarkStopped(&engine.progress, &engine.stopped);
    let mut backoff: Option<Duration> = None;
    loop {
        match backoff {
            Some(delay) => tokio::time::sleep(delay).await,
            None => wait_for_work(&engine).await,
        }
        if engine.shutting_down.load(Ordering::SeqCst)
            && engine.cache.dirty_len() == 0
            && engine.requested.load(Ordering::SeqCst) <= engine.progress.borrow().ended
        {
            break;
        }
        backoff = match run_round(&engine).await {
            Ok(()) => None,
            Err(()) => Some(
                backoff
                    .map_or(RETRY_BACKOFF_START, |previous| previous * 2)
                    .min(engine.options.get_retry_backoff_max()),
            ),
        };
    }
}

/// Sleeps until a round is due: requested by a waiter, enough dirty keys,
/// group commit with anything dirty, shutdown, or the flush interval.
async fn wait_for_work<B: StateBackend>(engine: &Engine<B>) {
    let interval = engine.options.get_flush_interval();
    let mut deadline = tokio::time::Instant::now() + interval;
    loop {
        let dirty = engine.cache.dirty_len();
        let due = engine.requested.load(Ordering::SeqCst) > engine.progress.borrow().ended
            || engine.shutting_down.load(Ordering::SeqCst)
            || dirty >= engine.options.get_max_batch()
            || (dirty > 0 && engine.options.get_durability() == Durability::GroupCommit);
        if due {
            if engine.options.get_durability() == Durability::GroupCommit {
                let_writers_catch_up(engine).await;
            }
            return;
        }
        // `notify_one` leaves a permit when nobody waits, so a wake-up sent
        // between the check above and this wait is not lost.
        tokio::select! {
            () = engine.wake.notified() => {}
            () = tokio::time::sleep_until(deadline) => {
                if engine.cache.dirty_len() > 0 {
                    return;
                }
                deadline = tokio::time::Instant::now() + interval;
            }
        }
    }
}

/// Group commit: the writers woken by the previous commit are runnable right
/// now. Yielding while they keep staging fills this batch, instead of
/// starting a round with only the first of them and making the rest wait a
/// whole extra round trip. No timer: once nobody stages, it goes at once.
async fn let_writers_catch_up<B: StateBackend>(engine: &Engine<B>) {
    let mut staged = engine.cache.dirty_len();
    let mut idle_passes = 0;
    for _ in 0..32 {
        tokio::task::yield_now().await;
        let now = engine.cache.dirty_len();
        if now >= engine.options.get_max_batch() {
            return;
        }
        // Writers woken on the other worker thread may need a second pass.
        if now == staged {
            idle_passes += 1;
            if idle_passes == 2 {
                return;
            }
        } else {
            idle_passes = 0;
        }
        staged = now;
    }
}

/// One round: every queued key, in chunks of `max_batch`. On the first
/// failed chunk, that chunk's keys and all later ones go back on the queue.
async fn run_round<B: StateBackend>(engine: &Engine<B>) -> Result<(), ()> {
    let (round, keys) = engine.cache.take_round();
    let mut outcome: Result<(), Arc<str>> = Ok(());
    let mut chunks = keys.chunks(engine.options.get_max_batch());
    while let Some(chunk) = chunks.next() {
        if let Err(error) = write_chunk(engine, chunk).await {
            let retried = chunk.len() + chunks.clone().map(<[String]>::len).sum::<usize>();
            tracing::warn!(
                %error,
                keys = retried,
                "faucet-state-postgres: flushing a batch failed; the keys stay dirty and will be retried"
            );
            engine
                .cache
                .requeue(chunk.iter().chain(chunks.flatten()).cloned());
            outcome = Err(error);
            break;
        }
    }
    engine.cache.round_ended();
    engine.counters.dirty_keys(engine.cache.dirty_len());
    let ok = outcome.is_ok();
    engine.progress.send_modify(|p| {
        p.ended = round;
        match outcome {
            Ok(()) => p.succeeded = round,
            Err(error) => p.last_error = Some(error),
        }
    });
    if ok { Ok(()) } else { Err(()) }
}

/// Writes one chunk as one batch and marks what it carried as committed.
async fn write_chunk<B: StateBackend>(engine: &Engine<B>, keys: &[String]) -> Result<(), Arc<str>> {
    // Rows are written in key order, so that two stores sharing a table lock
    // rows in the same order and cannot deadlock each other.
    let mut keys: Vec<&String> = keys.iter().collect();
    keys.sort_unstable();
    let mut upserts: Vec<(String, Arc<Value>)> = Vec::with_capacity(keys.len());
    let mut deletes: Vec<String> = Vec::new();
    let mut versions: Vec<(&str, u64)> = Vec::with_capacity(keys.len());
    for key in keys {
        // Invariant 2 of the cache: a queued key is dirty.
        let Some(entry) = engine.cache.dirty_entry(key) else {
            continue;
        };
        versions.push((key, entry.version));
        match entry.value {
            Some(value) => upserts.push((key.clone(), value)),
            None => deletes.push(key.clone()),
        }
    }
    if versions.is_empty() {
        return Ok(());
    }
    let span = tracing::info_span!(
        "faucet_state.flush",
        store = engine.options.get_name(),
        upserts = upserts.len(),
        deletes = deletes.len(),
        elapsed_ms = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let started = Instant::now();
    let written = engine
        .backend
        .write_batch(&upserts, &deletes)
        .instrument(span.clone())
        .await;
    let elapsed = started.elapsed();
    span.record("elapsed_ms", elapsed.as_millis() as u64);
    if let Err(error) = written {
        span.record("outcome", "failed");
        let message = error.to_string();
        engine.counters.record_failure(message.clone(), elapsed);
        return Err(Arc::from(message));
    }
    span.record("outcome", "committed");
    engine.counters.record_batch(versions.len(), elapsed);
    for (key, version) in versions {
        engine.cache.committed(key, version, &engine.counters);
    }
    Ok(())
}
