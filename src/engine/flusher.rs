//! The background task that persists dirty keys in batches.
//!
//! The flusher works in *rounds*. A round takes every queued dirty key and
//! writes them in batches of at most `max_batch` keys and `max_batch_bytes`
//! bytes, one atomic `write_batch` each. Up to `concurrent_batches` batches
//! are in flight at once, of one round or of consecutive ones: the next
//! round may take the queue while the previous one commits, so writers
//! whose batch committed can stage again and be carried while the other
//! batch is still in flight. A batch the server refuses because of a row it
//! holds is split until that row stands alone; the row's key is parked (see
//! `cache.rs`) and the rest commits in the same round.
//!
//! Per key, the values written only ever move forward: a key is in exactly
//! one place (invariant 2 of the cache), so it is never in two batches at
//! once, and a write that arrives while its key is in flight is queued
//! again only once that batch has ended.
//!
//! Waiting for durability:
//! - A group-commit write waits for its own key: the cache records, per key,
//!   up to which write the key is committed (invariant 6 of the cache), and
//!   waiters look after every batch.
//! - `flush()` waits for rounds. Rounds are published as ended in order, and
//!   at most `concurrent_batches` (`D`) rounds are unpublished at a time. A
//!   write made while round `s` is the newest round started is queued (the
//!   next round takes it), or in flight in a round `<= s`, which hands it
//!   back (newer value, or failure) before that round ends; at most `D - 1`
//!   rounds start before that. So it is carried by a round in `s + 1 ..=
//!   s + D`; if every round after `s` up to `s + D` succeeded, it is
//!   committed.

use std::collections::VecDeque;
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
use crate::cache::{Cache, DirtyEntry, Key, WriteStatus};
use crate::config::{CacheOptions, Durability, RETRY_BACKOFF_START};
use crate::stats::Counters;

/// What the flusher has done so far, as waiters see it.
#[derive(Debug, Clone, Default)]
pub(crate) struct Progress {
    /// Every round up to this one has ended, successfully or not.
    pub ended: u64,
    /// The newest ended round that did not commit everything it took (0:
    /// none has failed).
    pub last_failed: u64,
    /// Why the newest failed round failed.
    pub last_error: Option<Arc<str>>,
    /// The flusher has exited (shutdown, or the store was dropped).
    pub stopped: bool,
}

impl Progress {
    /// The newest round that ended did not commit everything it took.
    pub(crate) fn newest_round_failed(&self) -> bool {
        self.last_failed != 0 && self.last_failed == self.ended
    }
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
    /// Set once a write was fenced (see `BatchError::Fenced`): why. The
    /// flusher then ends, and writes are refused with this reason.
    pub fenced: std::sync::OnceLock<Arc<str>>,
    /// Queued keys that make a round due before the flush interval ends:
    /// half of `max_pending`. Writing earlier would only write hot keys
    /// again and again, costing the server what coalescing saves; writing
    /// at half keeps room in the buffer, so writers do not wait for it.
    pub flush_threshold: usize,
}

/// How a wait for rounds ended.
pub(crate) enum RoundOutcome {
    Committed,
    Failed(Arc<str>),
    /// The flusher stopped before the rounds ran.
    Stopped,
}

/// How a wait for one write ended.
pub(crate) enum WriteOutcome {
    /// The write, or a newer one of its key, is committed.
    Durable,
    /// The server refused it; it stays pending (parked).
    Refused(Arc<str>),
    /// A round that could have carried it failed; it stays queued.
    Failed(Arc<str>),
    /// The flusher stopped first.
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
            fenced: std::sync::OnceLock::new(),
            flush_threshold: options.get_max_pending().div_ceil(2),
            options,
        }
    }

    /// Records that a write was fenced; the first reason is kept.
    pub(crate) fn fence(&self, error: &FaucetError) {
        let _ = self.fenced.set(Arc::from(error.to_string()));
        self.wake.notify_one();
    }

    /// Waits until the rounds that carry every write made before this call
    /// have ended (see the module docs), and says whether they committed.
    pub(crate) async fn wait_for_durability(&self) -> RoundOutcome {
        let newest_started = self.cache.rounds_started();
        let target = newest_started + self.options.get_concurrent_batches() as u64;
        self.requested.fetch_max(target, Ordering::SeqCst);
        let mut progress = self.progress.subscribe();
        self.wake.notify_one();
        // A failed round after `newest_started` may have handed back one of
        // the writes: that is reported at once, not after the retries.
        let seen = progress
            .wait_for(|p| p.ended >= target || p.last_failed > newest_started || p.stopped)
            .await;
        let seen = match seen {
            Ok(seen) => seen.clone(),
            // The sender lives in the engine, which outlives this borrow.
            Err(_) => return RoundOutcome::Stopped,
        };
        if seen.last_failed > newest_started {
            RoundOutcome::Failed(seen.last_error.unwrap_or_else(|| "unknown error".into()))
        } else if seen.ended >= target {
            RoundOutcome::Committed
        } else {
            RoundOutcome::Stopped
        }
    }

    /// Waits until the write `version` of `key`, staged when `rounds_before`
    /// rounds had started, is durable, refused, or failed with a round.
    pub(crate) async fn wait_for_write(
        &self,
        key: &str,
        version: u64,
        rounds_before: u64,
    ) -> WriteOutcome {
        let mut progress = self.progress.subscribe();
        self.wake.notify_one();
        loop {
            // Marked seen before the key is looked at: a batch that ends
            // after the look changes the channel again, and wakes this wait.
            let seen = progress.borrow_and_update().clone();
            match self.cache.write_status(key, version) {
                WriteStatus::Durable => return WriteOutcome::Durable,
                WriteStatus::Refused(reason) => return WriteOutcome::Refused(reason),
                WriteStatus::Pending => {}
            }
            // Only a round that started after the write was staged can carry
            // it; one of those failed, so it is not known to be durable.
            if seen.last_failed > rounds_before {
                let error = seen.last_error.unwrap_or_else(|| "unknown error".into());
                return WriteOutcome::Failed(error);
            }
            if seen.stopped || progress.changed().await.is_err() {
                return WriteOutcome::Stopped;
            }
        }
    }
}

/// The flusher task: starts rounds when work is due, keeps up to
/// `concurrent_batches` batches in flight, backs off after a transient
/// failure, and exits once shutdown is requested and nothing is dirty.
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
    Flusher::new(&engine).drive().await;
}

/// A round that has started and not yet been published as ended.
struct Round {
    number: u64,
    /// Batches not yet started; the next one is on top.
    pending: Vec<Batch>,
    /// Batches of this round being written.
    in_flight: usize,
    /// Why the round did not commit everything it took, if it did not.
    error: Option<Arc<str>>,
    since: Option<Instant>,
}

/// The flusher's own state; lives in its task.
struct Flusher<'a, B: StateBackend> {
    engine: &'a Engine<B>,
    /// Oldest first. A round is published as ended only after every earlier
    /// one, and at most `concurrent_batches` rounds are unpublished, so a
    /// key a round hands back is taken by one of the next
    /// `concurrent_batches` rounds (see `Engine::wait_for_durability`).
    rounds: VecDeque<Round>,
    in_flight: Vec<InFlight<'a>>,
    /// The current backoff after transient failures, doubled by each.
    backoff: Option<Duration>,
    /// No batch starts before this (backing off after a failure).
    resume_at: Option<Instant>,
    /// The keys a failure handed back are retried as soon as the backoff
    /// ends, not at the next flush interval.
    retry_due: bool,
    /// When the flush interval makes a round due.
    interval_ends: Instant,
}

impl<'a, B: StateBackend> Flusher<'a, B> {
    fn new(engine: &'a Engine<B>) -> Self {
        Self {
            engine,
            rounds: VecDeque::new(),
            in_flight: Vec::new(),
            backoff: None,
            resume_at: None,
            retry_due: false,
            interval_ends: deadline_after(engine.options.get_flush_interval()),
        }
    }

    async fn drive(mut self) {
        let engine = self.engine;
        let concurrent = engine.options.get_concurrent_batches();
        loop {
            if engine.fenced.get().is_some() {
                // Nothing buffered may land now: batches in flight are
                // dropped (each is guarded, so none of them can commit) and
                // the dirty keys stay unwritten.
                return;
            }
            self.start_batches();
            self.publish_ended_rounds();
            if self.rounds.is_empty()
                && engine.shutting_down.load(Ordering::SeqCst)
                && engine.cache.dirty_len() == 0
                && engine.requested.load(Ordering::SeqCst) <= engine.progress.borrow().ended
            {
                return;
            }
            let may_start_round = self.resume_at.is_none()
                && self.rounds.len() < concurrent
                && self.in_flight.len() < concurrent;
            if may_start_round && self.retry_due {
                self.start_round();
                continue;
            }
            let resume_at = self.resume_at;
            tokio::select! {
                (round, batch, result) = next_done(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    self.batch_done(round, batch, result);
                }
                () = wait_for_work(engine, self.interval_ends, !self.rounds.is_empty()), if may_start_round => {
                    self.start_round();
                }
                () = sleep_until_some(resume_at), if resume_at.is_some() => {
                    self.resume_at = None;
                }
            }
        }
    }

    /// Takes the queue as a new round, cut into batches.
    fn start_round(&mut self) {
        let engine = self.engine;
        let taken = engine.cache.take_round();
        self.retry_due = false;
        self.interval_ends = deadline_after(engine.options.get_flush_interval());
        let mut keys = taken.keys;
        // Rows are written in key order, so that two stores sharing a table
        // lock rows in the same order and cannot deadlock each other.
        keys.sort_unstable();
        let mut pending = batches(engine, keys);
        pending.extend(batches_of_one(engine, taken.retries));
        pending.reverse();
        self.rounds.push_back(Round {
            number: taken.number,
            pending,
            in_flight: 0,
            error: None,
            since: taken.since,
        });
    }

    /// Starts batches, oldest round first, up to `concurrent_batches` in
    /// flight; none while backing off.
    fn start_batches(&mut self) {
        let engine = self.engine;
        let concurrent = engine.options.get_concurrent_batches();
        if self.resume_at.is_some() {
            return;
        }
        for round in &mut self.rounds {
            while self.in_flight.len() < concurrent {
                let Some(batch) = round.pending.pop() else {
                    break;
                };
                round.in_flight += 1;
                let number = round.number;
                self.in_flight.push(Box::pin(async move {
                    let result = write_batch(engine, &batch).await;
                    (number, batch, result)
                }));
            }
        }
    }

    fn batch_done(&mut self, round: u64, batch: Batch, result: Result<(), BatchError>) {
        let engine = self.engine;
        let index = self
            .rounds
            .iter()
            .position(|r| r.number == round)
            .expect("a round is published only once none of its batches is in flight");
        self.rounds[index].in_flight -= 1;
        match result {
            Ok(()) => {}
            Err(BatchError::Refused(error)) if batch.len() > 1 => {
                tracing::debug!(%error, keys = batch.len(), "faucet-state-postgres: a batch was refused; splitting it");
                let mut left = batch;
                let right = left.split_off(left.len() / 2);
                // The halves stay in their round, which ends only once they
                // are written (after the backoff, if one began meanwhile).
                let pending = &mut self.rounds[index].pending;
                pending.push(right);
                pending.push(left);
            }
            Err(BatchError::Refused(error)) => park(engine, batch, &error),
            Err(BatchError::Transient(error)) => self.failed(index, batch, &error),
            Err(BatchError::Fenced(error)) => {
                tracing::error!(%error, "faucet-state-postgres: this store was fenced by a newer instance; it writes nothing more");
                engine.fence(&error);
            }
        }
        // Waiters for single writes check their keys after every batch:
        // `send_modify` wakes them even though nothing in `Progress` moved.
        engine.progress.send_modify(|_| {});
    }

    /// A transient failure: that batch and every batch not yet started go
    /// back on the queue, and no batch starts until the backoff has passed.
    /// Batches already in flight finish, and what they commit stays
    /// committed. Every round that hands keys back has failed.
    fn failed(&mut self, index: usize, batch: Batch, error: &FaucetError) {
        let engine = self.engine;
        let reason: Arc<str> = Arc::from(error.to_string());
        let handed_back = batch.len()
            + self
                .rounds
                .iter()
                .flat_map(|r| &r.pending)
                .map(Vec::len)
                .sum::<usize>();
        tracing::warn!(
            %error,
            keys = handed_back,
            "faucet-state-postgres: flushing a batch failed; the keys stay dirty and will be retried"
        );
        engine.cache.requeue(batch.into_iter().map(|(key, _)| key));
        self.rounds[index]
            .error
            .get_or_insert_with(|| reason.clone());
        for round in &mut self.rounds {
            if !round.pending.is_empty() {
                engine
                    .cache
                    .requeue(round.pending.drain(..).flatten().map(|(key, _)| key));
                round.error.get_or_insert_with(|| reason.clone());
            }
        }
        let backoff = self
            .backoff
            .map_or(RETRY_BACKOFF_START, |previous| previous.saturating_mul(2))
            .min(engine.options.get_retry_backoff_max());
        self.backoff = Some(backoff);
        self.resume_at = Some(deadline_after(backoff));
        self.retry_due = true;
    }

    /// Publishes, in order, the rounds at the front that have nothing left
    /// to write.
    fn publish_ended_rounds(&mut self) {
        let engine = self.engine;
        let mut published = false;
        while let Some(round) = self
            .rounds
            .pop_front_if(|round| round.pending.is_empty() && round.in_flight == 0)
        {
            published = true;
            if round.error.is_none() {
                self.backoff = None;
            }
            engine.progress.send_modify(|p| {
                p.ended = round.number;
                if let Some(error) = round.error {
                    p.last_failed = round.number;
                    p.last_error = Some(error);
                }
            });
        }
        if published {
            let since = self.rounds.iter().filter_map(|r| r.since).min();
            engine.cache.set_in_flight_since(since);
            engine.counters.dirty_keys(engine.cache.dirty_len());
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await;
    }
}

/// Sleeps until a round is due: requested by a waiter, enough queued keys,
/// group commit with anything queued, a parked key due for its retry,
/// shutdown, or the end of the flush interval with keys queued.
///
/// A requested round with nothing queued waits for the rounds in flight
/// (`rounds_in_flight`) to end: it would carry nothing yet, and would only
/// hold a place a later round may need.
async fn wait_for_work<B: StateBackend>(
    engine: &Engine<B>,
    interval_ends: Instant,
    rounds_in_flight: bool,
) {
    let interval = engine.options.get_flush_interval();
    let mut deadline = interval_ends;
    loop {
        let cache = &engine.cache;
        let queued = cache.queued_len();
        let next_retry = cache.next_retry();
        let now = Instant::now();
        let shutting_down = engine.shutting_down.load(Ordering::SeqCst);
        let requested = engine.requested.load(Ordering::SeqCst) > engine.cache.rounds_started();
        let due = (requested && (queued > 0 || !rounds_in_flight))
            || next_retry.is_some_and(|at| at <= now)
            || queued >= engine.flush_threshold
            || (queued > 0
                && (shutting_down || engine.options.get_durability() == Durability::GroupCommit))
            || (shutting_down && cache.dirty_len() == 0)
            || (queued > 0 && now >= deadline);
        if due {
            if engine.options.get_durability() == Durability::GroupCommit {
                let_writers_catch_up(engine).await;
            }
            return;
        }
        if now >= deadline {
            deadline = deadline_after(interval);
        }
        let wake_at = next_retry.map_or(deadline, |at| at.min(deadline));
        // `notify_one` leaves a permit when nobody waits, so a wake-up sent
        // between the check above and this wait is not lost.
        tokio::select! {
            () = engine.wake.notified() => {}
            () = tokio::time::sleep_until(wake_at) => {}
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

/// A batch being written: its round, the batch, and what became of it.
type InFlight<'a> = Pin<Box<dyn Future<Output = (u64, Batch, Result<(), BatchError>)> + Send + 'a>>;

/// Waits for the first of `in_flight` to finish and removes it.
async fn next_done(in_flight: &mut Vec<InFlight<'_>>) -> (u64, Batch, Result<(), BatchError>) {
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
