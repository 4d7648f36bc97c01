//! An in-memory [`StateBackend`] with failure and delay injection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use faucet_core::FaucetError;
use faucet_core::check::{CheckContext, CheckReport, Probe};
use faucet_core::state::validate_state_key;
use serde_json::Value;
use tokio::sync::{OwnedRwLockWriteGuard, RwLock, watch};

use crate::backend::{BatchError, StateBackend};
use crate::codec;
use crate::config::{DEFAULT_MAX_VALUE_BYTES, validate_prefix};
use crate::lock::lock;

/// A [`StateBackend`] that keeps rows in a map, for tests.
///
/// It applies the same key and value rules as [`PostgresStateStore`](crate::PostgresStateStore),
/// commits each batch atomically, and lets a test make the storage slow,
/// failing or stalled at chosen moments, so that the behaviour of a
/// [`CachedStateStore`](crate::CachedStateStore) under faults can be checked
/// without a server and without sleeping.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use faucet_core::state::StateStore;
/// use faucet_state_postgres::{CacheOptions, CachedStateStore, MemoryBackend};
///
/// let backend = Arc::new(MemoryBackend::new());
/// let store = CachedStateStore::new(backend.clone(), CacheOptions::new()).unwrap();
/// backend.fail_next_writes(1);
/// assert!(store.put("k", &serde_json::json!(1)).await.is_err()); // the batch failed
/// store.flush().await.unwrap(); // retried: nothing was dropped
/// assert_eq!(backend.rows()["k"], serde_json::json!(1));
/// # store.shutdown().await.unwrap();
/// # }
/// ```
#[derive(Debug)]
pub struct MemoryBackend {
    rows: Mutex<HashMap<String, Value>>,
    faults: Mutex<Faults>,
    /// Writers take it shared; [`pause_writes`](Self::pause_writes) takes it
    /// exclusively, so a batch can be held in flight.
    gate: Arc<RwLock<()>>,
    /// Like `gate`, for reads: held by [`pause_loads`](Self::pause_loads).
    load_gate: Arc<RwLock<()>>,
    /// Like `gate`, after a batch committed and before it returns: held by
    /// [`pause_after_commit`](Self::pause_after_commit).
    ack_gate: Arc<RwLock<()>>,
    /// Like `gate`, for the batches that carry one key: held by
    /// [`pause_writes_of`](Self::pause_writes_of).
    key_gates: Mutex<HashMap<String, Arc<RwLock<()>>>>,
    attempts: watch::Sender<u64>,
    loads: watch::Sender<u64>,
    /// Rows and encoded bytes (values and keys) of each committed batch.
    committed: Mutex<Vec<(usize, usize)>>,
    max_value_bytes: usize,
}

#[derive(Debug, Default)]
struct Faults {
    panic_next_write: bool,
    fail_next_writes: usize,
    unavailable: bool,
    write_delay: Duration,
    /// Keys whose upserts are refused, as a constraint or trigger would.
    refused_keys: HashSet<String>,
}

/// Holds every batch write (or every read) of a [`MemoryBackend`] in flight
/// until dropped.
#[derive(Debug)]
pub struct Pause {
    _guard: OwnedRwLockWriteGuard<()>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self {
            rows: Mutex::default(),
            faults: Mutex::default(),
            gate: Arc::default(),
            load_gate: Arc::default(),
            ack_gate: Arc::default(),
            key_gates: Mutex::default(),
            attempts: watch::channel(0).0,
            loads: watch::channel(0).0,
            committed: Mutex::default(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl MemoryBackend {
    /// An empty backend with no faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the largest encoded value accepted (default 16 MiB, as Postgres).
    pub fn with_max_value_bytes(mut self, limit: usize) -> Self {
        self.max_value_bytes = limit;
        self
    }

    /// Makes the next `n` batch writes fail (without applying anything).
    pub fn fail_next_writes(&self, n: usize) {
        lock(&self.faults).fail_next_writes = n;
    }

    /// Makes the next batch write panic, as a bug in a backend would.
    pub fn panic_next_write(&self) {
        lock(&self.faults).panic_next_write = true;
    }

    /// While `true`, every read and write fails, as if the server were down.
    pub fn set_unavailable(&self, unavailable: bool) {
        lock(&self.faults).unavailable = unavailable;
    }

    /// Refuses every batch that upserts `key`, as a constraint, a trigger or
    /// an encoding that cannot hold the value would: the batch fails with
    /// [`BatchError::Refused`] and applies nothing.
    pub fn refuse_key(&self, key: &str) {
        lock(&self.faults).refused_keys.insert(key.to_owned());
    }

    /// Stops refusing `key` (see [`refuse_key`](Self::refuse_key)).
    pub fn accept_key(&self, key: &str) {
        lock(&self.faults).refused_keys.remove(key);
    }

    /// Makes every batch write take at least `delay` before it commits.
    pub fn set_write_delay(&self, delay: Duration) {
        lock(&self.faults).write_delay = delay;
    }

    /// Holds every batch write in flight, after it has counted as an attempt
    /// and before it commits, until the returned guard is dropped; every
    /// `compare_and_put` too, before it compares.
    pub async fn pause_writes(&self) -> Pause {
        Pause {
            _guard: self.gate.clone().write_owned().await,
        }
    }

    /// Holds every batch write that carries `key` (an upsert or a delete)
    /// in flight, after it has counted as an attempt and before it commits,
    /// until the returned guard is dropped; other batches go on.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use faucet_state_postgres::{MemoryBackend, StateBackend};
    ///
    /// let backend = MemoryBackend::new();
    /// let paused = backend.pause_writes_of("slow").await;
    /// backend.write_batch(&[("fast", "1")], &[]).await.unwrap(); // not held
    /// drop(paused);
    /// backend.write_batch(&[("slow", "2")], &[]).await.unwrap();
    /// assert_eq!(backend.rows().len(), 2);
    /// # }
    /// ```
    pub async fn pause_writes_of(&self, key: &str) -> Pause {
        let gate = lock(&self.key_gates)
            .entry(key.to_owned())
            .or_default()
            .clone();
        Pause {
            _guard: gate.write_owned().await,
        }
    }

    /// Lets every batch write commit, then holds it before it returns until
    /// the returned guard is dropped: a write whose outcome its caller has
    /// not seen yet, as when a connection stalls after the server committed.
    pub async fn pause_after_commit(&self) -> Pause {
        Pause {
            _guard: self.ack_gate.clone().write_owned().await,
        }
    }

    /// Holds every read in flight, after it has read the row and before it
    /// returns, until the returned guard is dropped: the read's answer can
    /// then go stale while it waits, as a slow `SELECT` can.
    pub async fn pause_loads(&self) -> Pause {
        Pause {
            _guard: self.load_gate.clone().write_owned().await,
        }
    }

    /// Waits until at least `n` reads have been performed in total.
    pub async fn wait_for_loads(&self, n: u64) {
        let mut loads = self.loads.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = loads.wait_for(|&seen| seen >= n).await;
    }

    /// Waits until at least `n` writes (batches and `compare_and_put`s) have
    /// been attempted in total.
    pub async fn wait_for_write_attempts(&self, n: u64) {
        let mut attempts = self.attempts.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = attempts.wait_for(|&seen| seen >= n).await;
    }

    /// Writes (batches and `compare_and_put`s) attempted so far, failed ones
    /// included.
    pub fn write_attempts(&self) -> u64 {
        *self.attempts.borrow()
    }

    /// The number of rows (upserts plus deletes) in each committed batch, in
    /// commit order.
    pub fn committed_batches(&self) -> Vec<usize> {
        lock(&self.committed)
            .iter()
            .map(|&(rows, _)| rows)
            .collect()
    }

    /// The encoded size of each committed batch, in commit order: the JSON
    /// text of every upserted value plus every key, upserted or deleted.
    pub fn committed_batch_bytes(&self) -> Vec<usize> {
        lock(&self.committed)
            .iter()
            .map(|&(_, bytes)| bytes)
            .collect()
    }

    /// Reads performed through [`StateBackend::load`].
    pub fn loads(&self) -> u64 {
        *self.loads.borrow()
    }

    /// A copy of every stored row.
    pub fn rows(&self) -> HashMap<String, Value> {
        lock(&self.rows).clone()
    }

    /// Stores a row directly, as another writer of the same table would.
    pub fn insert_row(&self, key: &str, value: Value) {
        lock(&self.rows).insert(key.to_owned(), value);
    }
}

fn unavailable() -> BatchError {
    BatchError::Transient(FaucetError::State(
        "memory backend is unavailable (fault injected)".to_owned(),
    ))
}

#[async_trait]
impl StateBackend for MemoryBackend {
    fn encode(&self, key: &str, value: &Value) -> Result<Arc<str>, FaucetError> {
        validate_state_key(key)?;
        Ok(codec::encode_shared(key, value, self.max_value_bytes)?)
    }

    fn decode(&self, key: &str, stored: &str) -> Result<Value, FaucetError> {
        Ok(codec::decode_text(key, "memory", stored)?)
    }

    async fn load(&self, key: &str) -> Result<Option<String>, FaucetError> {
        validate_state_key(key)?;
        if lock(&self.faults).unavailable {
            self.loads.send_modify(|n| *n += 1);
            return Err(unavailable().into_error());
        }
        let row = lock(&self.rows).get(key).cloned();
        self.loads.send_modify(|n| *n += 1);
        let _open = self.load_gate.read().await;
        // A row put with `insert_row` may be one no `put` would accept.
        Ok(row
            .map(|value| codec::encode(key, &value, usize::MAX))
            .transpose()?)
    }

    async fn write_batch(
        &self,
        upserts: &[(&str, &str)],
        deletes: &[&str],
    ) -> Result<(), BatchError> {
        self.attempts.send_modify(|n| *n += 1);
        let _open = self.gate.read().await;
        let key_gates: Vec<Arc<RwLock<()>>> = {
            let gates = lock(&self.key_gates);
            upserts
                .iter()
                .map(|(key, _)| *key)
                .chain(deletes.iter().copied())
                .filter_map(|key| gates.get(key).cloned())
                .collect()
        };
        for gate in key_gates {
            drop(gate.read().await);
        }
        let delay = lock(&self.faults).write_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        {
            let mut faults = lock(&self.faults);
            if std::mem::take(&mut faults.panic_next_write) {
                drop(faults);
                panic!("memory backend write panicked (fault injected)");
            }
            if faults.unavailable {
                return Err(unavailable());
            }
            if faults.fail_next_writes > 0 {
                faults.fail_next_writes -= 1;
                return Err(BatchError::Transient(FaucetError::State(
                    "memory backend write failed (fault injected)".to_owned(),
                )));
            }
            if let Some((key, _)) = upserts
                .iter()
                .find(|(key, _)| faults.refused_keys.contains(*key))
            {
                return Err(BatchError::Refused(FaucetError::State(format!(
                    "memory backend refused the value of key '{key}' (fault injected)"
                ))));
            }
        }
        // Decoded before anything is applied: a batch is all or nothing.
        let values = upserts
            .iter()
            .map(|(key, text)| codec::decode_text(key, "memory", text))
            .collect::<Result<Vec<Value>, _>>()
            .map_err(|e| BatchError::Refused(e.into()))?;
        let mut bytes = 0;
        {
            let mut rows = lock(&self.rows);
            for ((key, text), value) in upserts.iter().zip(values) {
                bytes += key.len() + text.len();
                rows.insert((*key).to_owned(), value);
            }
            for key in deletes {
                bytes += key.len();
                rows.remove(*key);
            }
        }
        lock(&self.committed).push((upserts.len() + deletes.len(), bytes));
        let _acknowledge = self.ack_gate.read().await;
        Ok(())
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        stored: &str,
    ) -> Result<bool, BatchError> {
        validate_state_key(key).map_err(BatchError::Refused)?;
        self.attempts.send_modify(|n| *n += 1);
        // Held by `pause_writes` like a batch: a test can keep it in flight.
        let _open = self.gate.read().await;
        if lock(&self.faults).unavailable {
            // Refused before anything is applied: not an unknown outcome.
            return Err(BatchError::Refused(unavailable().into_error()));
        }
        let value =
            codec::decode_text(key, "memory", stored).map_err(|e| BatchError::Refused(e.into()))?;
        let mut rows = lock(&self.rows);
        if rows.get(key) != expected {
            return Ok(false);
        }
        rows.insert(key.to_owned(), value);
        Ok(true)
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, FaucetError> {
        validate_prefix(prefix)?;
        if lock(&self.faults).unavailable {
            return Err(unavailable().into_error());
        }
        let mut keys: Vec<String> = lock(&self.rows)
            .keys()
            .filter(|key| key.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort_unstable();
        Ok(keys)
    }

    async fn check(&self, _ctx: &CheckContext) -> Result<CheckReport, FaucetError> {
        Ok(CheckReport::single(if lock(&self.faults).unavailable {
            Probe::fail_hint(
                "backend",
                Duration::ZERO,
                "memory backend is unavailable (fault injected)",
                "call set_unavailable(false)",
            )
        } else {
            Probe::pass("backend", Duration::ZERO)
        }))
    }
}
