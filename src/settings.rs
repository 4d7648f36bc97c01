//! The store's configuration as a pipeline file carries it.

use std::fmt;
use std::time::Duration;

use faucet_core::FaucetError;
use serde::{Deserialize, Serialize};

use crate::config::{
    CacheOptions, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_VALUE_BYTES, DEFAULT_TABLE, Durability,
    TableName, validate_max_connections,
};
use crate::connect::redact_url;
use crate::exec::DEFAULT_STATEMENT_TIMEOUT;
use crate::{CachedStateStore, PostgresStateStore};

/// Everything needed to build a [`CachedStateStore`] over PostgreSQL, in a
/// form serde reads from a pipeline file (JSON, YAML, TOML, …).
///
/// Every field but `url` has a default; durations are written in human form
/// (`"500ms"`, `"2s"`, `"1m"`); unknown fields are refused, so a typo does
/// not silently fall back to a default. `Debug` redacts the password.
///
/// ```
/// use faucet_state_postgres::{Durability, PostgresStateConfig};
///
/// let config: PostgresStateConfig = serde_json::from_str(r#"{
///     "url": "postgres://app:secret@db.internal/app",
///     "table": "pipeline_state",
///     "mode": "write_behind",
///     "flush_interval": "250ms"
/// }"#).unwrap();
/// config.validate().unwrap();
/// assert_eq!(config.mode, Durability::WriteBehind);
/// assert_eq!(config.max_connections, 5);
/// assert!(!format!("{config:?}").contains("secret"));
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresStateConfig {
    /// Connection URL, e.g. `postgres://user:password@host:5432/database`.
    /// Required. Serialized with its password replaced by `***` (see
    /// [`redact_url`]), so a configuration can be logged or shown safely.
    #[serde(serialize_with = "serialize_redacted")]
    pub url: String,
    /// Table name: 1 to 63 ASCII letters, digits or `_`. Default `faucet_state`.
    pub table: String,
    /// Pool size, at least 1. Default 5.
    pub max_connections: u32,
    /// Create the table at startup when it is missing. Default `true`.
    pub ensure_table: bool,
    /// `write_through`, `group_commit` or `write_behind`. Default `group_commit`.
    pub mode: Durability,
    /// Write-behind: longest a write waits for the flusher. Default `1s`.
    #[serde(with = "humantime_serde")]
    pub flush_interval: Duration,
    /// Most keys per batch. Default 1000.
    pub max_batch: usize,
    /// Most encoded bytes (values and keys) per batch. Default 33554432 (32 MiB).
    pub max_batch_bytes: usize,
    /// Batches of one flush round written at the same time. Default 2.
    pub concurrent_batches: usize,
    /// Most dirty keys held in memory. Default 100000.
    pub max_pending: usize,
    /// How long a write waits for room when `max_pending` keys are dirty.
    /// Default `5s`.
    #[serde(with = "humantime_serde")]
    pub put_timeout: Duration,
    /// How long a write-through or group-commit write, or `flush()`, waits
    /// for its commit before returning an error. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Most clean entries kept for reads; 0 turns read caching off.
    /// Default 100000.
    pub cache_capacity: usize,
    /// How long `shutdown()` keeps retrying. Default `30s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Cap of the flusher's backoff after a failed batch. Default `5s`.
    #[serde(with = "humantime_serde")]
    pub retry_backoff_max: Duration,
    /// Largest encoded value in bytes. Default 16777216 (16 MiB).
    pub max_value_bytes: usize,
    /// How long any statement may run, enforced by the server and the
    /// client. Default `30s`; at least `1ms`.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Whether statements go as prepared statements: `true` on every
    /// connection (only for connections that keep their session, not
    /// PgBouncer in transaction mode before 1.21), `false` as one message
    /// each everywhere; see
    /// [`PostgresStateStore::with_prepared_statements`]. Default: none, the
    /// store chooses when it connects (prepared on a direct connection).
    pub prepared_statements: Option<bool>,
    /// Claim this fence scope (the pipeline's name, say) when connecting,
    /// fencing every earlier instance that claimed it; see
    /// [`PostgresStateStore::fence`]. Default: none (not fenced).
    pub fence: Option<String>,
    /// Keep the read cache coherent with other writers; see
    /// [`CacheOptions::listen_for_changes`]. With `ensure_table`, the
    /// change-notification triggers are installed too. Default `false`.
    pub listen_for_changes: bool,
    /// Longest a clean entry is served; see [`CacheOptions::cache_ttl`].
    /// Default: none.
    #[serde(with = "humantime_serde")]
    pub cache_ttl: Option<Duration>,
}

impl Default for PostgresStateConfig {
    fn default() -> Self {
        let cache = CacheOptions::new();
        Self {
            url: String::new(),
            table: DEFAULT_TABLE.to_owned(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            ensure_table: true,
            mode: cache.get_durability(),
            flush_interval: cache.get_flush_interval(),
            max_batch: cache.get_max_batch(),
            max_batch_bytes: cache.get_max_batch_bytes(),
            concurrent_batches: cache.get_concurrent_batches(),
            max_pending: cache.get_max_pending(),
            put_timeout: cache.get_put_timeout(),
            write_timeout: cache.get_write_timeout(),
            cache_capacity: cache.get_cache_capacity(),
            shutdown_timeout: cache.get_shutdown_timeout(),
            retry_backoff_max: cache.get_retry_backoff_max(),
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            prepared_statements: None,
            fence: None,
            listen_for_changes: false,
            cache_ttl: None,
        }
    }
}

impl PostgresStateConfig {
    /// Checks every field; the error names the field and the rule.
    pub fn validate(&self) -> Result<(), FaucetError> {
        if self.url.trim().is_empty() {
            return Err(FaucetError::Config(
                "url is required: the PostgreSQL connection URL, e.g. postgres://user:password@host/db"
                    .to_owned(),
            ));
        }
        TableName::parse(self.table.as_str())?;
        validate_max_connections(self.max_connections)?;
        if self.statement_timeout < Duration::from_millis(1) {
            return Err(FaucetError::Config(
                "statement_timeout must be at least 1ms".to_owned(),
            ));
        }
        if self.max_value_bytes == 0 {
            return Err(FaucetError::Config(
                "max_value_bytes must be at least 1".to_owned(),
            ));
        }
        if let Some(scope) = &self.fence {
            faucet_core::state::validate_state_key(scope)
                .map_err(|e| FaucetError::Config(format!("invalid fence scope {scope:?}: {e}")))?;
        }
        self.cache_options().validate()?;
        Ok(())
    }

    /// The cache options these settings describe, named after the table.
    pub fn cache_options(&self) -> CacheOptions {
        CacheOptions::new()
            .name(self.table.as_str())
            .durability(self.mode)
            .flush_interval(self.flush_interval)
            .max_batch(self.max_batch)
            .max_batch_bytes(self.max_batch_bytes)
            .concurrent_batches(self.concurrent_batches)
            .max_pending(self.max_pending)
            .put_timeout(self.put_timeout)
            .write_timeout(self.write_timeout)
            .cache_capacity(self.cache_capacity)
            .shutdown_timeout(self.shutdown_timeout)
            .retry_backoff_max(self.retry_backoff_max)
            .listen_for_changes(self.listen_for_changes)
            .cache_ttl(self.cache_ttl.unwrap_or(Duration::MAX))
    }

    /// Validates, connects, creates the table if asked to, and starts the
    /// cached store. Must be called inside a tokio runtime.
    pub async fn connect(&self) -> Result<CachedStateStore, FaucetError> {
        self.validate()?;
        let mut plain =
            PostgresStateStore::connect_with(&self.url, self.max_connections, &self.table)
                .await?
                .with_max_value_bytes(self.max_value_bytes)
                .with_statement_timeout(self.statement_timeout);
        if let Some(prepared) = self.prepared_statements {
            plain = plain.with_prepared_statements(prepared);
        }
        if self.ensure_table {
            plain.ensure_table().await?;
            if self.listen_for_changes {
                plain.ensure_change_notifications().await?;
            }
        }
        let plain = match &self.fence {
            Some(scope) => plain.fence(scope).await?,
            None => plain,
        };
        plain.cached(self.cache_options())
    }
}

fn serialize_redacted<S: serde::Serializer>(url: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(url))
}

impl fmt::Debug for PostgresStateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStateConfig")
            .field("url", &redact_url(&self.url))
            .field("table", &self.table)
            .field("max_connections", &self.max_connections)
            .field("ensure_table", &self.ensure_table)
            .field("mode", &self.mode)
            .field("flush_interval", &self.flush_interval)
            .field("max_batch", &self.max_batch)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("concurrent_batches", &self.concurrent_batches)
            .field("max_pending", &self.max_pending)
            .field("put_timeout", &self.put_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("cache_capacity", &self.cache_capacity)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("retry_backoff_max", &self.retry_backoff_max)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("statement_timeout", &self.statement_timeout)
            .field("prepared_statements", &self.prepared_statements)
            .field("fence", &self.fence)
            .field("listen_for_changes", &self.listen_for_changes)
            .field("cache_ttl", &self.cache_ttl)
            .finish()
    }
}
