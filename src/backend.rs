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
    fn validate(&self, key: &str, value: &Value) -> Result<(), FaucetError>;

    /// Reads one key; `None` when it has no value.
    async fn load(&self, key: &str) -> Result<Option<Value>, FaucetError>;

    /// Writes `upserts` and removes `deletes`, atomically: all or nothing.
    /// No key appears twice across both lists. Calling it again with the same
    /// arguments must be harmless (the engine retries failed batches).
    async fn write_batch(
        &self,
        upserts: &[(String, Arc<Value>)],
        deletes: &[String],
    ) -> Result<(), FaucetError>;

    /// The `faucet doctor` probe of the storage.
    async fn check(&self, ctx: &CheckContext) -> Result<CheckReport, FaucetError>;
}

/// The plain store is the production backend: each batch is one statement,
/// a multi-row upsert and a batched delete together (see `sql.rs`).
#[async_trait]
impl StateBackend for PostgresStateStore {
    fn validate(&self, key: &str, value: &Value) -> Result<(), FaucetError> {
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
    ) -> Result<(), FaucetError> {
        let mut upsert_keys = Vec::with_capacity(upserts.len());
        let mut texts = Vec::with_capacity(upserts.len());
        for (key, value) in upserts {
            texts.push(codec::encode(key, value, self.max_value_bytes())?);
            upsert_keys.push(key.as_str());
        }
        let delete_keys: Vec<&str> = deletes.iter().map(String::as_str).collect();
        Ok(self.apply(&upsert_keys, &texts, &delete_keys).await?)
    }

    async fn check(&self, ctx: &CheckContext) -> Result<CheckReport, FaucetError> {
        StateStore::check(self, ctx).await
    }
}
