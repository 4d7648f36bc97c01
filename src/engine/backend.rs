//! The storage a [`CachedStateStore`](crate::CachedStateStore) persists to.
//!
//! The write-behind engine needs only a few things of its storage, and this
//! trait names exactly those, the way `object_store` layers its wrappers over
//! any store. [`PostgresStateStore`] implements it for production;
//! [`MemoryBackend`](crate::MemoryBackend) implements it in memory, with
//! injectable failures and delays, so the engine's concurrency and fault
//! handling can be tested quickly and deterministically.

use std::sync::Arc;

use async_trait::async_trait;
use faucet_core::FaucetError;
use faucet_core::check::{CheckContext, CheckReport};
use faucet_core::state::{StateStore, validate_state_key};
use serde_json::Value;

use crate::PostgresStateStore;
use crate::changes::ChangeFeed;
use crate::codec;

/// Storage under a [`CachedStateStore`](crate::CachedStateStore).
///
/// Implementations must be safe to call from several tasks at once. The
/// engine runs up to [`concurrent_batches`](crate::CacheOptions::concurrent_batches)
/// `write_batch` calls at the same time, always with distinct keys.
#[async_trait]
pub trait StateBackend: Send + Sync + 'static {
    /// Encodes `value` for storage under `key`, checking without I/O
    /// everything that can be checked: the key rules and any size or shape
    /// limits. The cache calls this once, in `put`, so that a value the
    /// backend can never store is refused at once rather than failing the
    /// flusher on every retry; it then holds the returned text as is (shared,
    /// not copied), measures batches by its length (see [`max_batch_bytes`](crate::CacheOptions::max_batch_bytes))
    /// and hands it to [`write_batch`](Self::write_batch) as is.
    fn encode(&self, key: &str, value: &Value) -> Result<Arc<str>, FaucetError>;

    /// Turns text made by [`encode`](Self::encode) or returned by
    /// [`load`](Self::load) back into the value. The cache calls it on every
    /// hit; an error names the key and why the text cannot be read.
    fn decode(&self, key: &str, stored: &str) -> Result<Value, FaucetError>;

    /// Reads one key's stored text; `None` when it has no value.
    async fn load(&self, key: &str) -> Result<Option<String>, FaucetError>;

    /// Writes `upserts` (each a key and its text from
    /// [`encode`](Self::encode)) and removes `deletes`, atomically: all or
    /// nothing. No key appears twice across both lists. Calling it again
    /// with the same arguments must be harmless (the engine retries failed
    /// batches).
    ///
    /// A failure says whether the storage refused the batch because of the
    /// rows it carries ([`BatchError::Refused`]: the engine splits the batch
    /// until the refused rows stand alone) or failed for any other reason
    /// ([`BatchError::Transient`]: the engine retries the batch whole, later).
    async fn write_batch(
        &self,
        upserts: &[(&str, &str)],
        deletes: &[&str],
    ) -> Result<(), BatchError>;

    /// Writes `stored` (text from [`encode`](Self::encode)) under `key` only
    /// while the stored value equals `expected` (`None`: the key has no
    /// value), atomically against every other writer of the storage, and
    /// says whether it wrote. Sent once, never retried. The error says what
    /// became of it: [`BatchError::Transient`], it may or may not have been
    /// applied (the answer was lost; the cached store hands this error to
    /// its caller as it is, so its message should say so and name the
    /// key); [`BatchError::Refused`], it was not
    /// applied (refused, or never sent); [`BatchError::Fenced`], it was not
    /// applied and the engine stops as for a fenced batch.
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        stored: &str,
    ) -> Result<bool, BatchError>;

    /// Every stored key that starts with `prefix`, in byte order. The
    /// prefix is literal and may hold what a key may hold; the empty prefix
    /// lists every key.
    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, FaucetError>;

    /// The `faucet doctor` probe of the storage.
    async fn check(&self, ctx: &CheckContext) -> Result<CheckReport, FaucetError>;

    /// How long after its caller gave up on it (dropped the call, or lost
    /// the answer) a write may still commit in the storage. For that long
    /// the cached store reads the key from the storage without caching what
    /// it reads, so a read made before that write commits is not served
    /// afterwards. The default, zero, says an abandoned write never lands
    /// later.
    fn abandoned_writes_settle_within(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }

    /// A feed of changes made to the storage by any writer, for
    /// [`listen_for_changes`](crate::CacheOptions::listen_for_changes);
    /// `None` (the default) when the storage publishes none. Called once,
    /// when the store is built; the feed subscribes on its first `next`.
    fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        None
    }
}

/// Why a [`StateBackend::write_batch`] (or a
/// [`StateBackend::compare_and_put`], whose method docs say what each kind
/// means for it) failed, which decides what the engine does next.
#[derive(Debug)]
pub enum BatchError {
    /// Nothing about the rows: the server is down or restarting, a connection
    /// broke, a deadlock, the pool is exhausted. The same batch may succeed
    /// later, so it is retried whole, with backoff.
    Transient(FaucetError),
    /// The storage refused what the batch holds: a value it cannot store (an
    /// encoding that cannot represent it, a constraint or a trigger that
    /// rejects it) or a batch too large to finish in time. Retrying the same
    /// batch fails the same way, so the engine splits it until each refused
    /// row stands alone, and commits everything else.
    Refused(FaucetError),
    /// A newer instance claimed this store's fence scope (see
    /// [`PostgresStateStore::fence`]): nothing of the batch was written and
    /// no later write will be. The engine stops, refuses further writes and
    /// never sends what it buffered.
    Fenced(FaucetError),
}

impl BatchError {
    /// The underlying error.
    ///
    /// ```
    /// use faucet_state_postgres::BatchError;
    /// let err = BatchError::Refused(faucet_core::FaucetError::State("no".into()));
    /// assert_eq!(err.error().to_string(), faucet_core::FaucetError::State("no".into()).to_string());
    /// ```
    pub fn error(&self) -> &FaucetError {
        match self {
            Self::Transient(error) | Self::Refused(error) | Self::Fenced(error) => error,
        }
    }

    /// The underlying error, consuming `self`.
    pub fn into_error(self) -> FaucetError {
        match self {
            Self::Transient(error) | Self::Refused(error) | Self::Fenced(error) => error,
        }
    }
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error().fmt(f)
    }
}

impl std::error::Error for BatchError {}

/// The plain store is the production backend: each batch is one statement,
/// a multi-row upsert and a batched delete together (see `sql.rs`).
#[async_trait]
impl StateBackend for PostgresStateStore {
    fn encode(&self, key: &str, value: &Value) -> Result<Arc<str>, FaucetError> {
        validate_state_key(key)?;
        Ok(codec::encode_shared(key, value, self.max_value_bytes())?)
    }

    fn decode(&self, key: &str, stored: &str) -> Result<Value, FaucetError> {
        Ok(codec::decode_text(key, self.table(), stored)?)
    }

    async fn load(&self, key: &str) -> Result<Option<String>, FaucetError> {
        validate_state_key(key)?;
        Ok(self.get_text(key).await?)
    }

    async fn write_batch(
        &self,
        upserts: &[(&str, &str)],
        deletes: &[&str],
    ) -> Result<(), BatchError> {
        let (keys, texts): (Vec<&str>, Vec<&str>) = upserts.iter().copied().unzip();
        self.apply(&keys, &texts, deletes).await.map_err(|e| {
            if e.is_fenced() {
                BatchError::Fenced(e.into())
            } else if e.refuses_rows() {
                BatchError::Refused(e.into())
            } else {
                BatchError::Transient(e.into())
            }
        })
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        stored: &str,
    ) -> Result<bool, BatchError> {
        validate_state_key(key).map_err(BatchError::Refused)?;
        self.compare_and_put_text(key, expected, stored)
            .await
            .map_err(|e| {
                if e.is_fenced() {
                    BatchError::Fenced(e.into())
                } else if e.outcome_unknown() {
                    BatchError::Transient(e.into())
                } else {
                    // The server answered with an error, or nothing was sent.
                    BatchError::Refused(e.into())
                }
            })
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, FaucetError> {
        self.list(prefix).await
    }

    async fn check(&self, ctx: &CheckContext) -> Result<CheckReport, FaucetError> {
        StateStore::check(self, ctx).await
    }

    /// The server ends every message within `statement_timeout` of
    /// receiving it, whatever it waits for (see `fence.rs` for a fenced
    /// write), and the client gives a message one second more to arrive:
    /// a write given up now can commit at most that long from now. (Where
    /// the server checks for a vanished client, see `sql.rs`, it is ended
    /// much sooner: this is the bound that holds without it.)
    fn abandoned_writes_settle_within(&self) -> std::time::Duration {
        self.statement_timeout()
            .saturating_add(crate::exec::CLIENT_GRACE)
    }

    /// `LISTEN` on a connection of its own (not one of the store's pool),
    /// for the notifications of [`ensure_change_notifications`](PostgresStateStore::ensure_change_notifications).
    fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        Some(Box::new(crate::notify::PgChangeFeed::new(
            self.pool(),
            self.table(),
            self.host_choice(),
        )))
    }
}
