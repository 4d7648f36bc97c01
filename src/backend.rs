//! The storage a [`CachedStateStore`](crate::CachedStateStore) persists to.
//!
//! The write-behind engine needs only four things of its storage, and this
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
use crate::codec;

/// Storage under a [`CachedStateStore`](crate::CachedStateStore).
///
/// Implementations must be safe to call from several tasks at once; the
/// engine never runs two `write_batch` calls at the same time.
#[async_trait]
pub trait StateBackend: Send + Sync + 'static {
    /// Checks, without I/O, that `value` could be stored under `key`: the key
    /// rules and any size or shape limits. The cache calls this in `put`, so
    /// that a value the backend can never store is refused at once rather
    /// than failing the flusher on every retry.
    ///
    /// Returns the value's encoded size in bytes, which the engine uses to
    /// bound its batches by [`max_batch_bytes`](crate::CacheOptions::max_batch_bytes).
    fn validate(&self, key: &str, value: &Value) -> Result<usize, FaucetError>;

    /// Reads one key; `None` when it has no value.
    async fn load(&self, key: &str) -> Result<Option<Value>, FaucetError>;

    /// Writes `upserts` and removes `deletes`, atomically: all or nothing.
    /// No key appears twice across both lists. Calling it again with the same
    /// arguments must be harmless (the engine retries failed batches).
    ///
    /// A failure says whether the storage refused the batch because of the
    /// rows it carries ([`BatchError::Refused`]: the engine splits the batch
    /// until the refused rows stand alone) or failed for any other reason
    /// ([`BatchError::Transient`]: the engine retries the batch whole, later).
    async fn write_batch(
        &self,
        upserts: &[(String, Arc<Value>)],
        deletes: &[String],
    ) -> Result<(), BatchError>;

    /// The `faucet doctor` probe of the storage.
    async fn check(&self, ctx: &CheckContext) -> Result<CheckReport, FaucetError>;
}

/// Why a [`StateBackend::write_batch`] failed, which decides what the engine
/// does next.
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
            Self::Transient(error) | Self::Refused(error) => error,
        }
    }

    /// The underlying error, consuming `self`.
    pub fn into_error(self) -> FaucetError {
        match self {
            Self::Transient(error) | Self::Refused(error) => error,
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
    fn validate(&self, key: &str, value: &Value) -> Result<usize, FaucetError> {
        validate_state_key(key)?;
        Ok(codec::validate(key, value, self.max_value_bytes())?)
    }

    async fn load(&self, key: &str) -> Result<Option<Value>, FaucetError> {
        StateStore::get(self, key).await
    }

    async fn write_batch(
        &self,
        upserts: &[(String, Arc<Value>)],
        deletes: &[String],
    ) -> Result<(), BatchError> {
        let mut upsert_keys = Vec::with_capacity(upserts.len());
        let mut texts = Vec::with_capacity(upserts.len());
        for (key, value) in upserts {
            let text = codec::encode(key, value, self.max_value_bytes())
                .map_err(|e| BatchError::Refused(e.into()))?;
            texts.push(text);
            upsert_keys.push(key.as_str());
        }
        let delete_keys: Vec<&str> = deletes.iter().map(String::as_str).collect();
        self.apply(&upsert_keys, &texts, &delete_keys)
            .await
            .map_err(|e| {
                if e.refuses_rows() {
                    BatchError::Refused(e.into())
                } else {
                    BatchError::Transient(e.into())
                }
            })
    }

    async fn check(&self, ctx: &CheckContext) -> Result<CheckReport, FaucetError> {
        StateStore::check(self, ctx).await
    }
}
