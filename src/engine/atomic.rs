//! The cached store's operations that the table decides: `compare_and_put`
//! and `put_batch` (faucet-core 1.16's, inherent here so that faucet-core
//! 1.0 users have them too).
//!
//! Neither is ever decided from the cache. Each one, in every mode:
//!
//! 1. takes the store's async mutex of every stripe its keys fall in, in
//!    stripe order (write-through writes and other such operations of those
//!    stripes wait; no two of them deadlock), and *holds* its keys, so that
//!    no put or delete of them is staged until it ends (`holds.rs`);
//! 2. makes this store's pending writes of those keys durable (a flush), so
//!    that the table holds what this store last wrote: a `compare_and_put`
//!    compares against it, and no older buffered write is left to overwrite
//!    the result later;
//! 3. sends one statement, atomic against every writer of the table;
//! 4. caches what it wrote as clean, or, when the table disagreed or the
//!    outcome is unknown, drops the cached entries so the next read goes to
//!    the table; then releases the keys.
//!
//! A dropped call releases its keys and drops their cached entries (a
//! statement in flight may or may not have been applied), and leaves any
//! pending write it was waiting for with the flusher, like any other.

use std::collections::BTreeMap;

use faucet_core::FaucetError;
use serde_json::Value;
use tokio::sync::MutexGuard;

use crate::backend::{BatchError, StateBackend};
use crate::cache::{Cache, FillTicket, Stored, WriteStatus};
use crate::cached::{CachedStateStore, Known};
use crate::flusher::RoundOutcome;
use crate::stats::Counters;

impl<B: StateBackend> CachedStateStore<B> {
    /// Writes `value` under `key` only while the key's current value equals
    /// `expected` (`None`: the key has no value), and says whether it wrote.
    ///
    /// Decided by the table, never by the cache, in every mode: atomic
    /// against every writer of the table, other processes included. This
    /// store's own pending write of the key counts as the current value: it
    /// is made durable first (so in write-behind this costs a flush of the
    /// pending writes), then one conditional statement is sent. While it
    /// runs, puts and deletes of `key` through this store wait for it. When
    /// the table disagrees, the key's cached entry is dropped (another
    /// process changed the row), so the next `get` reads the table.
    ///
    /// It fails, writing nothing, when this store's pending write of the key
    /// cannot be committed (the server refused it, or the flush failed).
    /// Like the plain store's, it is sent once: after an error or a time-out
    /// ([`write_timeout`](crate::CacheOptions::write_timeout) in total) it
    /// may or may not have been applied; read the key to find out. A dropped
    /// call means the same.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::sync::Arc;
    /// use faucet_core::state::StateStore;
    /// use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, MemoryBackend};
    /// use serde_json::json;
    ///
    /// let backend = Arc::new(MemoryBackend::new());
    /// let options = CacheOptions::new().durability(Durability::WriteBehind);
    /// let store = CachedStateStore::new(backend.clone(), options).unwrap();
    /// store.put("lease", &json!(1)).await.unwrap(); // pending, in memory
    /// assert!(store.compare_and_put("lease", Some(&json!(1)), &json!(2)).await.unwrap());
    /// assert_eq!(backend.rows()["lease"], json!(2)); // committed, never 1 afterwards
    /// assert!(!store.compare_and_put("lease", None, &json!(3)).await.unwrap());
    /// # store.shutdown().await.unwrap();
    /// # }
    /// ```
    pub async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: &Value,
    ) -> Result<bool, FaucetError> {
        let stored = self.engine.backend.encode(key, value)?;
        drop(self.enter(key)?);
        self.refuse_if_flusher_died(key)?;
        let decided = self.within_write_timeout(async {
            let mut held = self.hold(&[key]).await;
            self.settle(&held, "compare_and_put").await?;
            held.sending();
            let answer = self
                .engine
                .backend
                .compare_and_put(key, expected, &stored)
                .await;
            held.answered(answer.as_ref().err());
            let wrote = match answer {
                Ok(wrote) => wrote,
                // The backend's error says the outcome is unknown.
                Err(BatchError::Transient(error)) => return Err(error),
                Err(BatchError::Refused(error)) => {
                    return Err(FaucetError::State(format!(
                        "compare_and_put of key '{key}' was not applied: {error}"
                    )));
                }
                Err(BatchError::Fenced(error)) => {
                    // Like a fenced batch: this store writes nothing more.
                    self.engine.fence(&error);
                    return Err(FaucetError::State(format!(
                        "compare_and_put of key '{key}' was not written: {error}"
                    )));
                }
            };
            if wrote {
                held.committed([stored], &self.engine.counters);
            }
            // Not written: the table disagreed with whatever is cached, so
            // the guard drops the entry as it goes.
            Ok(wrote)
        });
        decided.await.unwrap_or_else(|_| {
            Err(FaucetError::State(format!(
                "compare_and_put of key '{key}' did not finish within write_timeout ({:?}); it \
                 may or may not have been applied: read the key to find out before trying again",
                self.engine.options.get_write_timeout()
            )))
        })
    }

    /// Writes every entry, all or nothing, in one statement sent directly to
    /// the table (not through the flusher), in every mode; a key given twice
    /// keeps its last value.
    ///
    /// Nothing is sent unless every key and value is valid. This store's
    /// pending writes of the batch's keys are made durable first, so none of
    /// them can overwrite the batch afterwards; while it runs, puts and
    /// deletes of those keys through this store wait for it. `Ok` means
    /// every entry is committed. After an error, a refusal by the server or
    /// a failed pending write writes nothing; a lost connection or a
    /// time-out ([`write_timeout`](crate::CacheOptions::write_timeout) in
    /// total) may or may not have committed the whole batch (never part of
    /// it): read the keys, or send it again. A dropped call means the same.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::sync::Arc;
    /// use faucet_state_postgres::{CacheOptions, CachedStateStore, MemoryBackend};
    /// use serde_json::json;
    ///
    /// let backend = Arc::new(MemoryBackend::new());
    /// let store = CachedStateStore::new(backend.clone(), CacheOptions::new()).unwrap();
    /// let entries = vec![("a".to_owned(), json!(1)), ("b".to_owned(), json!(2))];
    /// store.put_batch(&entries).await.unwrap();
    /// assert_eq!(backend.rows().len(), 2);
    /// // One key that is not valid: nothing is written.
    /// let bad = vec![("c".to_owned(), json!(3)), ("not a key".to_owned(), json!(4))];
    /// assert!(store.put_batch(&bad).await.is_err());
    /// assert_eq!(backend.rows().len(), 2);
    /// # store.shutdown().await.unwrap();
    /// # }
    /// ```
    pub async fn put_batch(&self, entries: &[(String, Value)]) -> Result<(), FaucetError> {
        let mut latest: BTreeMap<&str, Stored> = BTreeMap::new();
        for (key, value) in entries {
            latest.insert(key, self.engine.backend.encode(key, value)?);
        }
        let Some(first) = latest.keys().next().copied() else {
            return Ok(());
        };
        drop(self.enter(first)?);
        self.refuse_if_flusher_died(first)?;
        let keys: Vec<&str> = latest.keys().copied().collect();
        let described = describe_keys(&keys);
        let decided = self.within_write_timeout(async {
            let mut held = self.hold(&keys).await;
            self.settle(&held, "put_batch").await?;
            held.sending();
            let upserts: Vec<(&str, &str)> = latest
                .iter()
                .map(|(key, stored)| (*key, &**stored))
                .collect();
            let answer = self.engine.backend.write_batch(&upserts, &[]).await;
            held.answered(answer.as_ref().err());
            match answer {
                Ok(()) => {
                    // In key order, as the keys were held.
                    held.committed(latest.into_values(), &self.engine.counters);
                    Ok(())
                }
                Err(BatchError::Refused(error)) => {
                    self.engine.counters.record_refusal();
                    Err(FaucetError::State(format!(
                        "the server refused put_batch of {described}: {error}; nothing was \
                         written: send the batch again with values the table accepts"
                    )))
                }
                Err(BatchError::Transient(error)) => Err(FaucetError::State(format!(
                    "put_batch of {described} failed: {error}; either all of it or none of it \
                     was committed: send it again"
                ))),
                Err(BatchError::Fenced(error)) => {
                    self.engine.fence(&error);
                    Err(FaucetError::State(format!(
                        "put_batch of {described} was not written: {error}"
                    )))
                }
            }
        });
        decided.await.unwrap_or_else(|_| {
            Err(FaucetError::State(format!(
                "put_batch of {described} did not finish within write_timeout ({:?}); either \
                 all of it or none of it was committed: send it again",
                self.engine.options.get_write_timeout()
            )))
        })
    }

    /// Step 1 of the module docs for `keys` (sorted, distinct).
    async fn hold<'a>(&'a self, keys: &[&'a str]) -> Held<'a> {
        let mut stripes: Vec<usize> = keys
            .iter()
            .map(|key| self.engine.cache.stripe_of(key))
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut serialized = Vec::with_capacity(stripes.len());
        for stripe in stripes {
            serialized.push(self.write_through_locks[stripe].lock().await);
        }
        let mut held = Held {
            cache: &self.engine.cache,
            keys: Vec::with_capacity(keys.len()),
            tickets: Vec::new(),
            known: Known::NotWritten,
            settle: self.engine.backend.abandoned_writes_settle_within(),
            pending: Vec::new(),
            _serialized: serialized,
        };
        for &key in keys {
            let pending = self.engine.cache.hold(key);
            held.keys.push(key);
            if let Some(version) = pending {
                held.pending.push((key, version));
            }
        }
        held
    }

    /// Step 2 of the module docs: this store's pending writes of the held
    /// keys are committed, or the operation fails with nothing sent.
    async fn settle(&self, held: &Held<'_>, operation: &str) -> Result<(), FaucetError> {
        let cache = &self.engine.cache;
        let all_durable = || -> Result<bool, FaucetError> {
            let mut durable = true;
            for &(key, version) in &held.pending {
                match cache.write_status(key, version) {
                    WriteStatus::Durable => {}
                    WriteStatus::Pending => durable = false,
                    WriteStatus::Refused(reason) => {
                        return Err(FaucetError::State(format!(
                            "{operation} was not sent: the server refused this store's pending \
                             write of key '{key}' ({reason}); put or delete the key with a value \
                             the table accepts first"
                        )));
                    }
                }
            }
            Ok(durable)
        };
        if all_durable()? {
            return Ok(());
        }
        let failed = |why: &str| {
            FaucetError::State(format!(
                "{operation} was not sent: this store's pending writes of its keys could not be \
                 committed first: {why}; they stay queued and are retried"
            ))
        };
        match self.engine.wait_for_durability().await {
            RoundOutcome::Committed => {}
            RoundOutcome::Failed(error) => return Err(failed(&error)),
            RoundOutcome::Stopped => return Err(failed("the flusher has stopped")),
        }
        if all_durable()? {
            Ok(())
        } else {
            // Unreachable by the flusher's argument (every write made before
            // a flush is in a round it waits for); reported, not assumed.
            Err(failed(
                "a pending write was still not committed after a flush",
            ))
        }
    }
}

/// Keys held by one operation (step 1), released on drop. Until
/// [`committed`](Self::committed) is called their cached entries are not
/// trusted, and are dropped with the hold: the table disagreed, or the
/// outcome is unknown (then the keys stay unsettled, cache invariant 8).
struct Held<'a> {
    cache: &'a Cache,
    keys: Vec<&'a str>,
    /// Taken just before the statement is sent, one per key (cache
    /// invariant 7: a change reported meanwhile keeps the result uncached).
    tickets: Vec<FillTicket>,
    /// What became of the statement: not sent or not written, sent with no
    /// answer (kept on a lost answer), or committed.
    known: Known,
    /// How long an abandoned statement may still commit (cache invariant 8).
    settle: std::time::Duration,
    /// This store's pending write of a held key, by version (step 2).
    pending: Vec<(&'a str, u64)>,
    /// Released after the keys (see `holds.rs`).
    _serialized: Vec<MutexGuard<'a, ()>>,
}

impl Held<'_> {
    /// The statement is about to be sent (after step 2).
    fn sending(&mut self) {
        self.known = Known::No;
        self.tickets = self
            .keys
            .iter()
            .map(|key| self.cache.write_ticket(key))
            .collect();
    }

    /// The backend answered the statement, with this error if any: unless
    /// the answer was lost, the outcome is known.
    fn answered(&mut self, error: Option<&BatchError>) {
        self.known = Known::answered(error);
    }

    /// The statement sent after [`sending`](Self::sending) committed
    /// `values`, one per held key, in the order the keys were held.
    fn committed(&mut self, values: impl IntoIterator<Item = Stored>, counters: &Counters) {
        let tickets = std::mem::take(&mut self.tickets);
        debug_assert_eq!(tickets.len(), self.keys.len(), "sending() came first");
        for ((key, ticket), value) in self.keys.iter().zip(tickets).zip(values) {
            self.cache.store_clean(key, Some(value), ticket, counters);
        }
        self.known = Known::Committed;
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        for key in &self.keys {
            self.known.leave(self.cache, key, self.settle);
            self.cache.release(key);
        }
    }
}

/// The keys of a batch, for an error message: a few, then how many more.
fn describe_keys(keys: &[&str]) -> String {
    const SHOWN: usize = 3;
    let shown: Vec<String> = keys.iter().take(SHOWN).map(|k| format!("'{k}'")).collect();
    match keys.len().saturating_sub(SHOWN) {
        0 => format!("key(s) {}", shown.join(", ")),
        more => format!("keys {} and {more} more", shown.join(", ")),
    }
}
