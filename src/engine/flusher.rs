//! The background task that persists dirty keys in batches.
//!
//! The flusher works in *rounds*. A round takes every queued dirty key,
//! writes them in batches of at most `max_batch` keys and `max_batch_bytes`
//! bytes (one atomic `write_batch` each, up to `concurrent_batches` of them
//! at the same time), and then publishes that it ended, and whether every
//! batch committed. A batch the server refuses because of
//! a row it holds is split until that row stands alone; the row's key is
//! parked (see `cache.rs`) and the rest commits in the same round. Rounds never overlap, so per key the values written only
//! ever move forward.
//!
//! Waiting for durability rests on one fact: a write made while round `r` is
//! the newest round started is carried by round `r` or, at the latest, by
//! round `r + 1` (if round `r` had already taken its key's value, the key is
//! queued again and round `r + 1` takes it). So a writer, or `flush()`, asks
//! for round `r + 1` and waits until it ends; if it succeeded, the write is
//! committed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use faucet_core::FaucetError;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::{BatchError, StateBackend};
use crate::cache::{Cache, DirtyEntry, Key};
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
    /// The store was dropped: send nothing more.
    pub abandoned: AtomicBool,
    /// The flusher task has ended, for whatever reason.
    pub stopped: AtomicBool,
    /// Queued keys that make a round due at once: `max_batch`, or
    /// `max_pending` when that is smaller (a full buffer must be flushed
    /// however small it is).
    pub flush_threshold: usize,
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

            wake: Notify::new(),
            progress: watch::channel(Progress::default()).0,
            requested: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            flush_threshold: options.get_max_batch().min(options.get_max_pending()),
            options,
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
                    .map_or(RETRY_BACKOFF_START, |previous| previous.saturating_mul(2))
                    .min(engine.options.get_retry_backoff_max()),
            ),
        };
    }
}

/// Sleeps until a round is due: requested by a waiter, enough queued keys,
/// group commit with anything queued, a parked key due for its retry,
/// shutdown, or the flush interval.
async fn wait_for_work<B: StateBackend>(engine: &Engine<B>) {
    let interval = engine.options.get_flush_interval();
    let mut deadline = deadline_after(interval);
    loop {
        let cache = &engine.cache;
        let queued = cache.queued_len();
        let next_retry = cache.next_retry();
        let now = Instant::now();
        let shutting_down = engine.shutting_down.load(Ordering::SeqCst);
        let due = engine.requested.load(Ordering::SeqCst) > engine.progress.borrow().ended
            || next_retry.is_some_and(|at| at <= now)
            || queued >= engine.flush_threshold
            || (queued > 0
                && (shutting_down || engine.options.get_durability() == Durability::GroupCommit))
            || (shutting_down && cache.dirty_len() == 0);
        if due {
            if engine.options.get_durability() == Durability::GroupCommit {
                let_writers_catch_up(engine).await;
            }
            return;
        }
        let wake_at = next_retry.map_or(deadline, |at| at.min(deadline));
        // `notify_one` leaves a permit when nobody waits, so a wake-up sent
        // between the check above and this wait is not lost.
        tokio::select! {
            () = engine.wake.notified() => {}
            () = tokio::time::sleep_until(wake_at) => {
                if Instant::now() >= deadline {
                    if engine.cache.queued_len() > 0 {
                        return;
                    }
                    deadline = deadline_after(interval);
                }
            }
        }
    }
}

/// `now + after`, saturating far in the future instead of overflowing (an
/// interval of `Duration::MAX` means "never").
pub(crate) fn deadline_after(after: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Group commit: the writers woken by the previous commit are runnable right
/// now. Yielding while they keep staging fills this batch, instead of
/// starting a round with only the first of them and making the rest wait a
/// whole extra round trip. No timer: once nobody stages, it goes at once.
async fn let_writers_catch_up<B: StateBackend>(engine: &Engine<B>) {
    let mut staged = engine.cache.queued_len();
    let mut idle_passes = 0;
    for _ in 0..32 {
        tokio::task::yield_now().await;
        let now = engine.cache.queued_len();
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

/// The writes of one batch, in key order, as they were when the round took
/// them.
type Batch = Vec<(Key, DirtyEntry)>;

/// One round: every queued key, in batches of at most `max_batch` keys and
/// `max_batch_bytes` bytes, then each parked key that is due, alone.
///
/// A batch the backend refuses is split in halves, and the halves are
/// written in turn, until each refused write stands alone: that key is
/// parked and reported, everything else commits in this round. A transient
/// failure ends the round: that batch and every later one go back on the
/// queue, and the flusher backs off.
async fn run_round<B: StateBackend>(engine: &Engine<B>) -> Result<(), ()> {
    let (round, mut keys, retries) = engine.cache.take_round();
    // Rows are written in key order, so that two stores sharing a table lock
    // rows in the same order and cannot deadlock each other.
    keys.sort_unstable();
    let mut pending = batches(engine, keys);
    pending.extend(batches_of_one(engine, retries));
    // A stack: the next batch to write is on top.
    pending.reverse();
    let mut outcome: Result<(), Arc<str>> = Ok(());
    let mut in_flight: Vec<InFlight<'_>> = Vec::new();
    let concurrent = engine.options.get_concurrent_batches();
    loop {
        // After a transient failure no batch is started; those in flight
        // finish, and what they commit stays committed.
        while outcome.is_ok() && in_flight.len() < concurrent {
            let Some(batch) = pending.pop() else { break };
            in_flight.push(Box::pin(async move {
                let result = write_batch(engine, &batch).await;
                (batch, result)
            }));
        }
        if in_flight.is_empty() {
            break;
        }
        let (batch, result) = next_done(&mut in_flight).await;
        match result {
            Ok(()) => {}
            Err(BatchError::Refused(error)) if batch.len() > 1 => {
                tracing::debug!(%error, keys = batch.len(), "faucet-state-postgres: a batch was refused; splitting it");
                let mut left = batch;
                let right = left.split_off(left.len() / 2);
                pending.push(right);
                pending.push(left);
            }
            Err(BatchError::Refused(error)) => park(engine, batch, &error),
            Err(BatchError::Transient(error)) => {
                let retried = batch.len() + pending.iter().map(Vec::len).sum::<usize>();
                tracing::warn!(
                    %error,
                    keys = retried,
                    "faucet-state-postgres: flushing a batch failed; the keys stay dirty and will be retried"
                );
                engine.cache.requeue(batch.into_iter().map(|(key, _)| key));
                if outcome.is_ok() {
                    outcome = Err(Arc::from(error.to_string()));
                }
            }
        }
    }
    // After a transient failure nothing more is started: what was pending,
    // including the halves of a batch refused meanwhile, goes back on the
    // queue (invariant 2 of the cache: every dirty key stays somewhere).
    if !pending.is_empty() {
        engine
            .cache
            .requeue(pending.drain(..).flatten().map(|(key, _)| key));
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

/// A batch being written, and what became of it.
type InFlight<'a> = Pin<Box<dyn Future<Output = (Batch, Result<(), BatchError>)> + Send + 'a>>;

/// Waits for the first of `in_flight` to finish and removes it.
async fn next_done(in_flight: &mut Vec<InFlight<'_>>) -> (Batch, Result<(), BatchError>) {
    std::future::poll_fn(|cx| {
        let done =
            in_flight
                .iter_mut()
                .enumerate()
                .find_map(|(i, batch)| match batch.as_mut().poll(cx) {
                    Poll::Ready(output) => Some((i, output)),
                    Poll::Pending => None,
                });
        match done {
            Some((i, output)) => {
                drop(in_flight.swap_remove(i));
                Poll::Ready(output)
            }
            None => Poll::Pending,
        }
    })
    .await
}

/// Cuts the dirty writes of `keys` (sorted) into batches of at most
/// `max_batch` keys and `max_batch_bytes` encoded bytes; a write larger than
/// `max_batch_bytes` goes alone.
fn batches<B: StateBackend>(engine: &Engine<B>, keys: Vec<Key>) -> Vec<Batch> {
    let max_keys = engine.options.get_max_batch();
    let max_bytes = engine.options.get_max_batch_bytes();
    let mut batches = Vec::new();
    let mut current: Batch = Vec::new();
    let mut bytes = 0usize;
    for key in keys {
        // Invariant 2 of the cache: a queued key is dirty.
        let Some(entry) = engine.cache.dirty_entry(&key) else {
            continue;
        };
        let entry_bytes = entry.bytes(&key);
        let full = current.len() >= max_keys || bytes.saturating_add(entry_bytes) > max_bytes;
        if full && !current.is_empty() {
            batches.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes = bytes.saturating_add(entry_bytes);
        current.push((key, entry));
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

fn batches_of_one<B: StateBackend>(
    engine: &Engine<B>,
    keys: Vec<Key>,
) -> impl Iterator<Item = Batch> + '_ {
    keys.into_iter().filter_map(|key| {
        let entry = engine.cache.dirty_entry(&key)?;
        Some(vec![(key, entry)])
    })
}

/// The backend refused this one write: park the key until its retry time,
/// and say so, naming the key and the server's reason.
fn park<B: StateBackend>(engine: &Engine<B>, batch: Batch, error: &FaucetError) {
    let Some((key, entry)) = batch.into_iter().next() else {
        return;
    };
    let reason: Arc<str> = Arc::from(error.to_string());
    let retry_in = engine.options.get_retry_backoff_max();
    if engine.cache.refused(
        &key,
        entry.version,
        reason.clone(),
        deadline_after(retry_in),
    ) {
        engine.counters.record_refusal();
        tracing::warn!(
            key = %key,
            error = %reason,
            retry_in = ?retry_in,
            "faucet-state-postgres: the server refused the write of a key; it stays pending, \
             blocks no other key and is retried alone; a newer write of the key replaces it"
        );
    }
}

/// Writes one batch in one `write_batch` call and marks what it carried as
/// committed.
async fn write_batch<B: StateBackend>(engine: &Engine<B>, batch: &Batch) -> Result<(), BatchError> {
    let mut upserts: Vec<(&str, &str)> = Vec::with_capacity(batch.len());
    let mut deletes: Vec<&str> = Vec::new();
    for (key, entry) in batch {
        match &entry.value {
            Some(value) => upserts.push((key, value)),
            None => deletes.push(key),
        }
    }
    let span = tracing::info_span!(
        "faucet_state.flush",
        store = engine.options.get_name(),
        upserts = upserts.len(),
        deletes = deletes.len(),
        elapsed_ms = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    if engine.abandoned.load(Ordering::SeqCst) {
        return Err(BatchError::Transient(FaucetError::State(
            "the store was dropped; nothing more is written".to_owned(),
        )));
    }
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
        engine.counters.record_failure(error.to_string(), elapsed);
        return Err(error);
    }
    span.record("outcome", "committed");
    engine.counters.record_batch(batch.len(), elapsed);
    for (key, entry) in batch {
        engine.cache.committed(key, entry.version, &engine.counters);
    }
    Ok(())
}
