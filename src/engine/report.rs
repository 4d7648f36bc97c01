//! What the cached store tells its users when something is not as it
//! should be: the errors of `flush()`, `shutdown()` and a refused write, the
//! back-pressure error, and the `flusher` probe of `check()`. Each names the
//! keys, the cause, and what to do.

use std::time::Duration;

use faucet_core::FaucetError;
use faucet_core::check::Probe;

use crate::backend::StateBackend;
use crate::flusher::Engine;

/// `Ok` when nothing is left unpersisted; otherwise how many keys were not
/// persisted, the refused writes among them, and the last error.
pub(crate) fn nothing_left<B: StateBackend>(
    engine: &Engine<B>,
    operation: &str,
) -> Result<(), FaucetError> {
    if let Some(fenced) = engine.fenced.get() {
        return Err(FaucetError::State(format!(
            "{operation}: this store was fenced, so its {} buffered writes will never be \
             written: {fenced}",
            engine.cache.dirty_len()
        )));
    }
    match engine.cache.dirty_len() {
        0 => Ok(()),
        left => Err(FaucetError::State(format!(
            "{operation}: {left} keys were not persisted (the flusher has stopped); {}last error: {}",
            refusal_summary(engine),
            engine
                .counters
                .last_error()
                .unwrap_or_else(|| "none".to_owned())
        ))),
    }
}

/// `Ok` unless the server refused writes that are still pending.
pub(crate) fn no_refusals<B: StateBackend>(
    engine: &Engine<B>,
    operation: &str,
) -> Result<(), FaucetError> {
    let summary = refusal_summary(engine);
    if summary.is_empty() {
        return Ok(());
    }
    Err(FaucetError::State(format!(
        "{operation}: every other write is committed, but {summary}they stay pending and are \
         retried alone every retry_backoff_max; write those keys again with values the table accepts"
    )))
}

/// "the server refused N writes: key 'a': reason; …; " naming up to five
/// keys, or "" when nothing is refused.
fn refusal_summary<B: StateBackend>(engine: &Engine<B>) -> String {
    const SHOWN: usize = 5;
    let refused = engine.cache.refused_writes();
    if refused.is_empty() {
        return String::new();
    }
    let mut summary = format!("the server refused {} writes: ", refused.len());
    for write in refused.iter().take(SHOWN) {
        summary.push_str(&format!("key '{}': {}; ", write.key, write.reason));
    }
    if refused.len() > SHOWN {
        summary.push_str(&format!("and {} more; ", refused.len() - SHOWN));
    }
    summary
}

/// Why the buffer is full: a failing flusher, refused writes, or one that
/// is slow or stalled while its batches still commit.
pub(crate) fn full_error<B: StateBackend>(engine: &Engine<B>, key: &str) -> FaucetError {
    let progress = engine.progress.borrow().clone();
    let cause = if progress.stopped {
        "the flusher has stopped".to_owned()
    } else if progress.newest_round_failed() {
        format!(
            "the flusher is failing: its last batch failed with: {}; it retries with backoff",
            progress.last_error.as_deref().unwrap_or("unknown error")
        )
    } else if !engine.cache.refused_writes().is_empty() {
        format!(
            "{}write those keys again with values the table accepts",
            refusal_summary(engine)
        )
    } else {
        let age = engine
            .cache
            .oldest_pending()
            .map_or(Duration::ZERO, |since| since.elapsed());
        format!(
            "the flusher's batches commit, but it is stalled or slower than the writers \
             (the oldest waiting write is {age:.1?} old): check the database's latency, \
             or raise max_batch"
        )
    };
    FaucetError::State(format!(
        "cannot accept the write of key '{key}': {} keys are waiting to be persisted \
         (max_pending) and none was persisted within put_timeout ({:?}); {cause}",
        engine.cache.dirty_len(),
        engine.options.get_put_timeout(),
    ))
}

/// A write refused because the store was fenced (see `BatchError::Fenced`).
pub(crate) fn fenced_error<B: StateBackend>(
    engine: &Engine<B>,
    key: &str,
    fenced: &str,
) -> FaucetError {
    FaucetError::State(format!(
        "the write of key '{key}' was refused: this store was fenced, and {} buffered writes \
         will never be written: {fenced}",
        engine.cache.dirty_len()
    ))
}

/// The `flusher` probe: running, its last round committed, and the
/// oldest unpersisted write younger than `2 × flush_interval + 10 s`.
pub(crate) fn flusher_probe<B: StateBackend>(engine: &Engine<B>) -> Probe {
    let progress = engine.progress.borrow().clone();
    let dirty = engine.cache.dirty_len();
    let age = engine.cache.oldest_pending().map(|since| since.elapsed());
    let backlog = match age {
        Some(age) if dirty > 0 => format!("{dirty} keys waiting, the oldest for {age:.1?}"),
        _ => format!("{dirty} keys waiting"),
    };
    let stall = engine
        .options
        .get_flush_interval()
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(10));
    let refused = refusal_summary(engine);
    if let Some(fenced) = engine.fenced.get() {
        Probe::fail_hint(
            "flusher",
            Duration::ZERO,
            format!("stopped: {fenced}; {backlog} will never be written"),
            "another instance owns the fence scope now; stop this one",
        )
    } else if progress.stopped {
        Probe::fail_hint(
            "flusher",
            Duration::ZERO,
            format!("the flusher is not running; {backlog}"),
            "the store was shut down or dropped; build a new store",
        )
    } else if progress.newest_round_failed() {
        Probe::fail_hint(
            "flusher",
            Duration::ZERO,
            format!(
                "the last flush failed: {}; {backlog}",
                progress.last_error.as_deref().unwrap_or("unknown error")
            ),
            "check the database; the flusher keeps retrying with backoff",
        )
    } else if !refused.is_empty() {
        Probe::fail_hint(
            "flusher",
            Duration::ZERO,
            format!("{refused}{backlog}"),
            "a value, a constraint, a trigger or the database encoding refuses these writes: \
             write the keys again with values the table accepts, or fix the table",
        )
    } else if age.is_some_and(|age| age > stall) {
        Probe::fail_hint(
            "flusher",
            Duration::ZERO,
            format!("the flusher is not keeping up: {backlog}"),
            "check the database's latency and load, or raise max_batch",
        )
    } else {
        Probe::pass("flusher", Duration::ZERO)
    }
}
