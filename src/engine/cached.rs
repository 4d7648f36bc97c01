//! The cached store: a read-through cache and a write-behind flusher in front
//! of a [`StateBackend`], with the durability the caller chose.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use faucet_core::FaucetError;
use faucet_core::check::{CheckContext, CheckReport};
use faucet_core::state::{StateStore, validate_state_key};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::PostgresStateStore;
use crate::backend::{BatchError, StateBackend};
use crate::cache::{Cache, Lookup, STRIPES, StageError, Stored};
use crate::changes;
use crate::config::{CacheOptions, Durability};
use crate::flusher::{self, Engine, RoundOutcome, WriteOutcome, deadline_after};
use crate::lock::lock;
use crate::report;
use crate::stats::{CacheStats, RefusedWrite};

/// How long `shutdown` waits, after its deadline, for an aborted flusher to
/// reach its next await and stop.
const ABORT_GRACE: Duration = Duration::from_millis(100);

/// A [`StateStore`] that answers from memory and persists in batches.
///
/// Reads go through an in-memory cache; a miss reads the backend once and
/// caches the answer, absence included. Writes are coalesced per key (only
/// the newest value, or a delete, of a key is kept) and a background flusher
/// writes dirty keys in batches: one multi-row upsert and one batched delete
/// per transaction, at most [`max_batch`](CacheOptions::max_batch) keys each.
///
/// When a `put` or `delete` returns depends on the [`Durability`]:
///
/// | mode | a write returns | a crash loses |
/// |---|---|---|
/// | [`WriteThrough`](Durability::WriteThrough) | after its own commit | nothing acknowledged |
/// | [`GroupCommit`](Durability::GroupCommit) (default) | after the batch carrying it commits | nothing acknowledged |
/// | [`WriteBehind`](Durability::WriteBehind) | once the cache holds it | writes since the last committed batch, at most `flush_interval` old; never one acknowledged by `flush()` or `shutdown()` |
///
/// The guarantees, each pinned by a test, are listed in the
/// [crate documentation](crate#guarantees-of-the-cached-store). Call
/// [`shutdown`](Self::shutdown) before dropping the store.
///
/// ```no_run
/// use std::sync::Arc;
/// use std::time::Duration;
/// use faucet_core::state::StateStore;
/// use faucet_state_postgres::{CacheOptions, Durability, PostgresStateStore};
///
/// # async fn run() -> Result<(), faucet_core::FaucetError> {
/// let plain = PostgresStateStore::connect("postgres://app:secret@localhost/app").await?;
/// plain.ensure_table().await?;
/// let store = Arc::new(plain.cached(
///     CacheOptions::new()
///         .durability(Durability::WriteBehind)
///         .flush_interval(Duration::from_millis(500)),
/// )?);
/// store.put("orders:cursor", &serde_json::json!({"id": 42})).await?; // in memory
/// store.flush().await?;                                              // now committed
/// store.shutdown().await?;
/// # Ok(()) }
/// ```
pub struct CachedStateStore<B: StateBackend = PostgresStateStore> {
    pub(super) engine: Arc<Engine<B>>,
    flusher: Mutex<Option<JoinHandle<()>>>,
    /// The change-feed listener (`listen_for_changes`, see `changes.rs`)
    /// and the `cache_ttl` sweeper, if configured; aborted when the store is
    /// dropped.
    background: Vec<JoinHandle<()>>,
    /// Set by `shutdown`: later writes are refused.
    closed: AtomicBool,
    /// Writes between their `closed` check and the end of staging; shutdown
    /// waits for them, so no accepted write lands after the final flush.
    writers: AtomicUsize,
    /// Per stripe of keys: write-through writes of one key commit and update
    /// the cache in the same order, and `compare_and_put`/`put_batch` hold
    /// their keys under them (see `atomic.rs`).
    pub(super) write_through_locks: Box<[tokio::sync::Mutex<()>]>,
}

impl<B: StateBackend> CachedStateStore<B> {
    /// Builds the store and starts its flusher task.
    ///
    /// Fails if `options` are invalid, or if called outside a tokio runtime
    /// (the flusher is a tokio task).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::sync::Arc;
    /// use faucet_state_postgres::{CacheOptions, CachedStateStore, MemoryBackend};
    ///
    /// let store = CachedStateStore::new(Arc::new(MemoryBackend::new()), CacheOptions::new()).unwrap();
    /// assert!(CachedStateStore::new(Arc::new(MemoryBackend::new()), CacheOptions::new().max_batch(0)).is_err());
    /// store.shutdown().await.unwrap();
    /// # }
    /// ```
    pub fn new(backend: Arc<B>, options: CacheOptions) -> Result<Self, FaucetError> {
        options.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            FaucetError::Config(
                "CachedStateStore::new must be called inside a tokio runtime: it spawns the flusher task"
                    .to_owned(),
            )
        })?;
        let feed = if options.get_listen_for_changes() {
            Some(backend.change_feed().ok_or_else(|| {
                FaucetError::Config(
                    "listen_for_changes: this backend publishes no changes; turn the option off"
                        .to_owned(),
                )
            })?)
        } else {
            None
        };
        let engine = Arc::new(Engine::new(backend, options));
        let flusher = runtime.spawn(flusher::run(engine.clone()));
        let mut background = Vec::new();
        if let Some(feed) = feed {
            // Invariant 1 of `changes.rs`: nothing clean is served until the
            // feed is subscribed.
            engine.cache.set_vouched(false);
            background.push(runtime.spawn(changes::listen(engine.clone(), feed)));
        }
        let ttl = engine.options.get_cache_ttl();
        if ttl != Duration::MAX {
            let engine = engine.clone();
            background.push(runtime.spawn(async move {
                loop {
                    tokio::time::sleep(ttl).await;
                    engine.cache.drop_clean_entries();
                }
            }));
        }
        Ok(Self {
            engine,
            flusher: Mutex::new(Some(flusher)),
            background,
            closed: AtomicBool::new(false),
            writers: AtomicUsize::new(0),
            write_through_locks: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
        })
    }

    /// Persists every write that returned before this call.
    ///
    /// `Ok` means each of them is committed. On `Err` nothing is dropped: the
    /// writes stay dirty and the flusher keeps retrying them. The error says
    /// which writes the server refused, if any (see the crate docs), or that
    /// no commit came within [`write_timeout`](CacheOptions::write_timeout).
    /// Dropping the future changes nothing: the flusher goes on.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::sync::Arc;
    /// use faucet_core::state::StateStore;
    /// use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
    ///
    /// let backend = Arc::new(MemoryBackend::new());
    /// let options = CacheOptions::new().durability(Durability::WriteBehind);
    /// let store = CachedStateStore::new(backend.clone(), options).unwrap();
    /// store.put("cursor", &serde_json::json!(41)).await.unwrap();
    /// store.put("cursor", &serde_json::json!(42)).await.unwrap(); // coalesced
    /// assert!(backend.rows().is_empty()); // still in memory
    /// store.flush().await.unwrap();
    /// assert_eq!(backend.rows()["cursor"], serde_json::json!(42));
    /// # store.shutdown().await.unwrap();
    /// # }
    /// ```
    pub async fn flush(&self) -> Result<(), FaucetError> {
        let Ok(outcome) = self
            .within_write_timeout(self.engine.wait_for_durability())
            .await
        else {
            return Err(FaucetError::State(format!(
                "flush: the writes were not committed within write_timeout ({:?}); {} keys stay \
                 dirty and the flusher keeps retrying them; check the database's health and latency",
                self.engine.options.get_write_timeout(),
                self.engine.cache.dirty_len()
            )));
        };
        match outcome {
            RoundOutcome::Committed => report::no_refusals(&self.engine, "flush"),
            RoundOutcome::Failed(error) => Err(FaucetError::State(format!(
                "flush failed: {error}; {} keys stay dirty and are retried",
                self.engine.cache.dirty_len()
            ))),
            RoundOutcome::Stopped => report::nothing_left(&self.engine, "flush"),
        }
    }

    /// Stops the store: later writes get an error, every dirty entry is
    /// persisted (retrying up to [`shutdown_timeout`](CacheOptions::shutdown_timeout)),
    /// and the flusher ends.
    ///
    /// `Ok` only when nothing is left unpersisted; otherwise the error says
    /// how many keys were not persisted. Reads keep working afterwards.
    /// Calling it again, or concurrently, reports the same outcome. It
    /// returns within [`shutdown_timeout`](CacheOptions::shutdown_timeout)
    /// (aborting the flusher if need be). Dropping the future leaves writes
    /// refused and the flusher persisting what is dirty; call `shutdown()`
    /// again to wait for it, or drop the store to abort it.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::sync::Arc;
    /// use faucet_core::state::StateStore;
    /// use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
    ///
    /// let backend = Arc::new(MemoryBackend::new());
    /// let options = CacheOptions::new().durability(Durability::WriteBehind);
    /// let store = CachedStateStore::new(backend.clone(), options).unwrap();
    /// store.put("cursor", &serde_json::json!(1)).await.unwrap();
    /// store.shutdown().await.unwrap();
    /// assert_eq!(backend.rows()["cursor"], serde_json::json!(1));
    /// assert!(store.put("cursor", &serde_json::json!(2)).await.is_err());
    /// # }
    /// ```
    pub async fn shutdown(&self) -> Result<(), FaucetError> {
        // One deadline for all of it: waiting for admitted writes, the
        // flusher's last rounds, and its end.
        let deadline = deadline_after(self.engine.options.get_shutdown_timeout());
        self.closed.store(true, Ordering::SeqCst);
        while self.writers.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.engine.shutting_down.store(true, Ordering::SeqCst);
        self.engine.wake.notify_one();
        let mut progress = self.engine.progress.subscribe();
        let ended = tokio::time::timeout_at(deadline, progress.wait_for(|p| p.stopped))
            .await
            .is_ok();
        if !ended {
            // The handle stays with the store, so a shutdown that is itself
            // cancelled never detaches the flusher: Drop still aborts it.
            if let Some(flusher) = lock(&self.flusher).as_ref() {
                flusher.abort();
            }
            // Aborting takes effect at the flusher's next await, where it
            // marks itself stopped.
            let _ = tokio::time::timeout(ABORT_GRACE, progress.wait_for(|p| p.stopped)).await;
        }
        // Every caller gets here only once the flusher has stopped (or could
        // not be stopped), and later writes are refused, so every caller
        // reads the same final state.
        report::nothing_left(&self.engine, "shutdown")
    }

    /// A snapshot of the store's state and counters.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # use std::sync::Arc;
    /// # use faucet_core::state::StateStore;
    /// # use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
    /// # let options = CacheOptions::new().durability(Durability::WriteBehind);
    /// let store = CachedStateStore::new(Arc::new(MemoryBackend::new()), options).unwrap();
    /// store.put("a", &serde_json::json!(1)).await.unwrap();
    /// store.put("a", &serde_json::json!(2)).await.unwrap();
    /// let stats = store.stats();
    /// assert_eq!((stats.puts, stats.coalesced_puts, stats.dirty_keys), (2, 1, 1));
    /// # store.shutdown().await.unwrap();
    /// # }
    /// ```
    pub fn stats(&self) -> CacheStats {
        let refused = self
            .engine
            .cache
            .refused_writes()
            .into_iter()
            .map(|write| RefusedWrite {
                key: write.key.to_string(),
                reason: write.reason.to_string(),
            })
            .collect();
        let mut stats = self.engine.counters.snapshot(
            self.engine.cache.dirty_len(),
            self.engine.cache.len(),
            refused,
        );
        // Vouched is always true for a store that does not listen.
        stats.listening =
            self.engine.options.get_listen_for_changes() && self.engine.cache.is_vouched();
        stats
    }

    /// Every key that starts with `prefix`, in byte order, as this store sees
    /// it: the stored keys, plus the keys of its puts not yet persisted,
    /// minus the keys of its deletes not yet persisted. The prefix is
    /// literal and may hold what a key may hold; the empty prefix lists every
    /// key. One read of the backend, in every mode (faucet-core 1.16's
    /// `list`; `faucet state show|export` uses it).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::sync::Arc;
    /// use faucet_core::state::StateStore;
    /// use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
    ///
    /// let backend = Arc::new(MemoryBackend::new());
    /// backend.insert_row("orders::cursor", serde_json::json!(1));
    /// backend.insert_row("orders::old", serde_json::json!(0));
    /// let options = CacheOptions::new().durability(Durability::WriteBehind);
    /// let store = CachedStateStore::new(backend, options).unwrap();
    /// store.put("orders::lsn", &serde_json::json!("0/16")).await.unwrap(); // not yet flushed
    /// store.delete("orders::old").await.unwrap();                         // not yet flushed
    /// assert_eq!(store.list("orders::").await.unwrap(), ["orders::cursor", "orders::lsn"]);
    /// # store.shutdown().await.unwrap();
    /// # }
    /// ```
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, FaucetError> {
        // The cache is read first: a pending write seen here is counted
        // whether or not the flusher persists it before the backend is read
        // (a persisted put is then listed twice and merged; a persisted
        // delete is then absent from the backend too).
        let pending = self.engine.cache.dirty_under(prefix);
        let mut keys: std::collections::BTreeSet<String> = self
            .engine
            .backend
            .list_keys(prefix)
            .await?
            .into_iter()
            .collect();
        for (key, is_put) in pending {
            if is_put {
                keys.insert(key.to_string());
            } else {
                keys.remove(&*key);
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// The backend the store persists to.
    pub fn backend(&self) -> &Arc<B> {
        &self.engine.backend
    }

    /// The options the store was built with.
    pub fn options(&self) -> &CacheOptions {
        &self.engine.options
    }

    /// Admits one write, unless the store is shut down. The guard keeps
    /// shutdown waiting until the write is staged.
    pub(super) fn enter(&self, key: &str) -> Result<WriterGuard<'_>, FaucetError> {
        self.writers.fetch_add(1, Ordering::SeqCst);
        let guard = WriterGuard(&self.writers);
        if self.closed.load(Ordering::SeqCst) {
            return Err(FaucetError::State(format!(
                "the store has been shut down; the write of key '{key}' was refused"
            )));
        }
        Ok(guard)
    }

    async fn write(&self, key: &str, value: Option<&Value>) -> Result<(), FaucetError> {
        let writer = self.enter(key)?;
        // Encoded once, here: the cache holds the text, batches are measured
        // by it and the flusher sends it as is.
        let stored: Option<Stored> = match value {
            Some(value) => Some(self.engine.backend.encode(key, value)?),
            None => {
                validate_state_key(key)?;
                None
            }
        };
        let counters = &self.engine.counters;
        let durability = self.engine.options.get_durability();
        if durability == Durability::WriteThrough {
            self.refuse_if_flusher_died(key)?;
            // Dropped on time-out: the guard in write_through invalidates the key.
            self.within_write_timeout(self.write_through(key, stored))
                .await
                .map_err(|_| {
                    FaucetError::State(format!(
                        "the write of key '{key}' got no answer within write_timeout ({:?}); it may \
                         or may not have committed, so the key is read from the table next: retry it",
                        self.engine.options.get_write_timeout()
                    ))
                })??;
            counters.write_accepted(value.is_some());
            return Ok(());
        }
        self.refuse_if_flusher_died(key)?;
        #[cfg(test)]
        crate::test_hooks::reached("write: between the flusher check and staging");
        // A writer that never awaits anything that pends (write-behind puts
        // in a loop) would keep its worker thread forever, and a flusher
        // woken onto that thread would never run. Spending the task's
        // cooperative budget makes such a writer yield now and then.
        tokio::task::consume_budget().await;
        let mut stored = stored;
        let put_timeout = self.engine.options.get_put_timeout();
        let (staged, rounds_before) = loop {
            // Group commit: only rounds started after this point can carry
            // the write (see `Engine::wait_for_write`).
            let rounds_before = match durability {
                Durability::GroupCommit => self.engine.cache.rounds_started(),
                _ => 0,
            };
            match self.engine.cache.stage(key, stored, put_timeout).await {
                Ok(staged) => break (staged, rounds_before),
                Err(StageError::Full) => return Err(report::full_error(&self.engine, key)),
                Err(StageError::Held(handed_back)) => {
                    stored = handed_back;
                    self.wait_for_holder(key).await?;
                }
            }
        };
        // Checked again once staged: a flusher that died before this write
        // was staged will never persist it, so it must not be acknowledged.
        self.refuse_if_flusher_died(key)?;
        counters.write_accepted(value.is_some());
        if staged.coalesced {
            counters.coalesced();
        } else {
            counters.dirty_keys(self.engine.cache.dirty_len());
        }
        drop(writer);
        if durability == Durability::WriteBehind {
            if self.engine.cache.dirty_len() >= self.engine.flush_threshold {
                self.engine.wake.notify_one();
            }
            return Ok(());
        }
        let Ok(outcome) = self
            .within_write_timeout(
                self.engine
                    .wait_for_write(key, staged.version, rounds_before),
            )
            .await
        else {
            return Err(FaucetError::State(format!(
                "the write of key '{key}' was not committed within write_timeout ({:?}); it stays \
                 queued and the flusher keeps retrying it; check the database's health and latency",
                self.engine.options.get_write_timeout()
            )));
        };
        match outcome {
            WriteOutcome::Durable => Ok(()),
            WriteOutcome::Refused(reason) => Err(FaucetError::State(format!(
                "the server refused the write of key '{key}': {reason}; the write stays pending \
                 and is retried alone every retry_backoff_max, blocking no other key; \
                 write the key again with a value the table accepts"
            ))),
            WriteOutcome::Failed(error) => Err(FaucetError::State(format!(
                "the batch carrying key '{key}' failed: {error}; the write stays queued and is retried"
            ))),
            WriteOutcome::Stopped => report::nothing_left(&self.engine, "put"),
        }
    }

    pub(super) async fn within_write_timeout<T>(
        &self,
        wait: impl std::future::Future<Output = T>,
    ) -> Result<T, tokio::time::error::Elapsed> {
        tokio::time::timeout_at(
            deadline_after(self.engine.options.get_write_timeout()),
            wait,
        )
        .await
    }

    /// A `compare_and_put` or `put_batch` of this store holds `key`: it
    /// releases the key before the stripe's mutex, so once the mutex is ours
    /// the hold is gone (see `holds.rs`).
    async fn wait_for_holder(&self, key: &str) -> Result<(), FaucetError> {
        let stripe = self.engine.cache.stripe_of(key);
        match self
            .within_write_timeout(self.write_through_locks[stripe].lock())
            .await
        {
            Ok(_released) => Ok(()),
            Err(_) => Err(FaucetError::State(format!(
                "the write of key '{key}' was refused: a compare_and_put or put_batch of this \
                 store held the key for longer than write_timeout ({:?}); nothing was written; \
                 retry it",
                self.engine.options.get_write_timeout()
            ))),
        }
    }

    /// Only a panic or a fence ends the flusher before shutdown; accepting
    /// more writes would buffer them where nothing will ever persist them.
    pub(super) fn refuse_if_flusher_died(&self, key: &str) -> Result<(), FaucetError> {
        if let Some(fenced) = self.engine.fenced.get() {
            return Err(report::fenced_error(&self.engine, key, fenced));
        }
        if self.engine.stopped.load(Ordering::SeqCst) && !self.closed.load(Ordering::SeqCst) {
            return Err(FaucetError::State(format!(
                "the flusher has stopped unexpectedly (see the panic in the log); \
                 the write of key '{key}' was refused; {} keys were not persisted; build a new store",
                self.engine.cache.dirty_len()
            )));
        }
        Ok(())
    }

    async fn write_through(&self, key: &str, value: Option<Stored>) -> Result<(), FaucetError> {
        let stripe = self.engine.cache.stripe_of(key);
        let _in_order = self.write_through_locks[stripe].lock().await;
        // If this future is dropped while the statement is in flight, the
        // write may or may not have committed, and may even commit later:
        // the key is read from the table, uncached, until it cannot.
        let mut outcome = OutcomeGuard {
            cache: &self.engine.cache,
            key,
            settle: self.engine.backend.abandoned_writes_settle_within(),
            known: Known::No,
        };
        let ticket = self.engine.cache.write_ticket(key);
        let started = std::time::Instant::now();
        let result = match &value {
            Some(value) => self.engine.backend.write_batch(&[(key, value)], &[]).await,
            None => self.engine.backend.write_batch(&[], &[key]).await,
        };
        match result {
            Ok(()) => {
                let counters = &self.engine.counters;
                counters.record_batch(1, started.elapsed());
                self.engine.cache.store_clean(key, value, ticket, counters);
                outcome.known = Known::Committed;
                Ok(())
            }
            Err(error) => {
                // The guard drops the key's entry as it goes out of scope.
                outcome.known = Known::answered(Some(&error));
                let what = if value.is_some() { "write" } else { "delete" };
                Err(FaucetError::State(match error {
                    BatchError::Refused(error) => {
                        self.engine.counters.record_refusal();
                        format!(
                            "the server refused the {what} of key '{key}': {error}; \
                             nothing was written: write the key with a value the table accepts"
                        )
                    }
                    BatchError::Transient(error) => format!(
                        "the {what} of key '{key}' failed: {error}; it may or may not have \
                         committed: retry it"
                    ),
                    BatchError::Fenced(error) => {
                        self.engine.fence(&error);
                        format!("the {what} of key '{key}' was not written: {error}")
                    }
                }))
            }
        }
    }
}

impl PostgresStateStore {
    /// Puts a [`CachedStateStore`] in front of this store.
    ///
    /// Equivalent to `CachedStateStore::new(Arc::new(self), options)`, with
    /// the table name as the store's metrics name unless `options` names it;
    /// must be called inside a tokio runtime.
    pub fn cached(
        self,
        options: CacheOptions,
    ) -> Result<CachedStateStore<PostgresStateStore>, FaucetError> {
        let options = if options.has_name() {
            options
        } else {
            options.name(self.table())
        };
        CachedStateStore::new(Arc::new(self), options)
    }
}

/// What became of a write sent outside the flusher.
#[derive(Clone, Copy)]
pub(super) enum Known {
    /// Nothing yet, or the answer was lost: it may commit, even later.
    No,
    /// It was not written (refused, fenced, or never sent).
    NotWritten,
    /// It committed, and the cache was told.
    Committed,
}

impl Known {
    /// What an answer tells, given its error if any: a lost answer
    /// ([`BatchError::Transient`]) leaves the outcome unknown; otherwise the
    /// write was not written, unless it succeeded, which the caller records
    /// as [`Committed`](Self::Committed) once the cache holds the value.
    pub(super) fn answered(error: Option<&BatchError>) -> Self {
        match error {
            Some(BatchError::Transient(_)) => Self::No,
            _ => Self::NotWritten,
        }
    }

    /// Leaves `key` in the cache as this outcome allows: a committed write
    /// is cached already; one not written drops the entry; one whose outcome
    /// is unknown keeps the key uncached for `settle` (cache invariant 8).
    pub(super) fn leave(self, cache: &Cache, key: &str, settle: Duration) {
        match self {
            Self::Committed => {}
            Self::NotWritten => cache.invalidate(key),
            Self::No => cache.unsettle(key, deadline_after(settle)),
        }
    }
}

/// Makes the cache distrust a key its write left in doubt, when dropped:
/// the entry goes; if the outcome is unknown, the key stays uncached until
/// the write can no longer commit (cache invariant 8).
struct OutcomeGuard<'a> {
    cache: &'a Cache,
    key: &'a str,
    settle: Duration,
    known: Known,
}

impl Drop for OutcomeGuard<'_> {
    fn drop(&mut self) {
        self.known.leave(self.cache, self.key, self.settle);
    }
}

pub(super) struct WriterGuard<'a>(&'a AtomicUsize);

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl<B: StateBackend> StateStore for CachedStateStore<B> {
    async fn get(&self, key: &str) -> Result<Option<Value>, FaucetError> {
        validate_state_key(key)?;
        let counters = &self.engine.counters;
        match self.engine.cache.lookup(key, counters) {
            Lookup::Hit(stored) => stored
                .map(|text| self.engine.backend.decode(key, &text))
                .transpose(),
            Lookup::Miss(ticket) => {
                let Some(text) = self.engine.backend.load(key).await? else {
                    self.engine.cache.fill(key, None, ticket, counters);
                    return Ok(None);
                };
                // Decoded before it is cached: text that cannot be read is
                // reported, never kept.
                let value = self.engine.backend.decode(key, &text)?;
                self.engine
                    .cache
                    .fill(key, Some(Stored::from(text)), ticket, counters);
                Ok(Some(value))
            }
        }
    }

    async fn put(&self, key: &str, value: &Value) -> Result<(), FaucetError> {
        self.write(key, Some(value)).await
    }

    async fn delete(&self, key: &str) -> Result<(), FaucetError> {
        self.write(key, None).await
    }

    /// The backend's probes, plus `flusher`: running, and whether its last
    /// round committed (with the dirty backlog and last error if not).
    async fn check(&self, ctx: &CheckContext) -> Result<CheckReport, FaucetError> {
        let mut report = self.engine.backend.check(ctx).await?;
        report.probes.push(report::flusher_probe(&self.engine));
        Ok(report)
    }

    #[cfg(feature = "faucet-core-1-16")]
    fn supports_list(&self) -> bool {
        true
    }

    /// [`CachedStateStore::list`]: pending puts included, pending deletes
    /// excluded.
    #[cfg(feature = "faucet-core-1-16")]
    async fn list(&self, prefix: &str) -> Result<Vec<String>, FaucetError> {
        CachedStateStore::list(self, prefix).await
    }

    #[cfg(feature = "faucet-core-1-16")]
    fn supports_compare_and_put(&self) -> bool {
        true
    }

    /// [`CachedStateStore::compare_and_put`]: decided by the table.
    #[cfg(feature = "faucet-core-1-16")]
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: &Value,
    ) -> Result<bool, FaucetError> {
        CachedStateStore::compare_and_put(self, key, expected, value).await
    }

    #[cfg(feature = "faucet-core-1-16")]
    fn supports_atomic_batch(&self) -> bool {
        true
    }

    /// [`CachedStateStore::put_batch`]: one statement, all or nothing.
    #[cfg(feature = "faucet-core-1-16")]
    async fn put_batch(&self, entries: &[(String, Value)]) -> Result<(), FaucetError> {
        CachedStateStore::put_batch(self, entries).await
    }
}

impl<B: StateBackend> Drop for CachedStateStore<B> {
    /// Without [`shutdown`](Self::shutdown), dirty keys cannot be persisted
    /// here (no await in `drop`): warn with their count, and stop the flusher
    /// so the task does not outlive the store.
    fn drop(&mut self) {
        for task in self.background.drain(..) {
            task.abort();
        }
        // Nothing is sent after this: the flusher checks the flag before each
        // batch, and the abort ends it at its next await.
        self.engine.abandoned.store(true, Ordering::SeqCst);
        let flusher = self
            .flusher
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(flusher) = flusher {
            let dirty = self.engine.cache.dirty_len();
            if dirty > 0 {
                tracing::warn!(
                    dirty_keys = dirty,
                    "faucet-state-postgres: CachedStateStore dropped without shutdown(); \
                     {dirty} keys were not persisted"
                );
            }
            flusher.abort();
        }
    }
}

impl<B: StateBackend> fmt::Debug for CachedStateStore<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedStateStore")
            .field("options", &self.engine.options)
            .field("stats", &self.stats())
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryBackend;
    use crate::test_hooks;

    /// Regression: `write` checked that the flusher was alive, then staged.
    /// A flusher that died in between (only a panic ends it early) left a
    /// write acknowledged that nothing would ever persist.
    #[tokio::test(flavor = "current_thread")]
    async fn a_flusher_dying_while_a_write_is_staged_fails_that_write() {
        let options = CacheOptions::new().durability(Durability::WriteBehind);
        let store = CachedStateStore::new(Arc::new(MemoryBackend::new()), options).unwrap();
        test_hooks::once("write: between the flusher check and staging", {
            let engine = store.engine.clone();
            move || {
                // What the flusher's own guard does when a panic ends it.
                engine.stopped.store(true, Ordering::SeqCst);
                engine.progress.send_modify(|p| p.stopped = true);
            }
        });
        let err = store.put("k", &serde_json::json!(1)).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("the flusher has stopped unexpectedly"),
            "{err}"
        );
    }
}
