//! A PostgreSQL-backed [`StateStore`](faucet_core::state::StateStore) for
//! faucet-stream pipelines: where incremental-replication bookmarks (CDC
//! positions, cursors, watermarks) are kept so that a restarted pipeline
//! resumes exactly where it left off.
//!
//! # The plain store
//!
//! [`PostgresStateStore`] keeps each key in one row and sends one statement
//! per call; a `put` is committed when it returns.
//!
//! ```no_run
//! use std::sync::Arc;
//! use faucet_core::state::StateStore;
//! use faucet_state_postgres::PostgresStateStore;
//!
//! # async fn run() -> Result<(), faucet_core::FaucetError> {
//! let store = PostgresStateStore::connect("postgres://app:secret@localhost/app").await?;
//! store.ensure_table().await?;
//! let store: Arc<dyn StateStore> = Arc::new(store);
//! // faucet_core::Pipeline::new(&source, &sink).with_state_store(store.clone())
//! # Ok(()) }
//! ```
//!
//! # Storage layout
//!
//! One table (default `faucet_state`):
//!
//! ```sql
//! CREATE TABLE IF NOT EXISTS "faucet_state" (
//!     key        TEXT PRIMARY KEY,
//!     value      JSONB NOT NULL,
//!     updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
//! );
//! ```
//!
//! Values are stored as themselves, so the table can be read and edited with
//! plain SQL. The exceptions are values that JSONB cannot hold (U+0000 in a
//! string or object key) and objects that could be mistaken for the encoding
//! itself; those are stored as `{"$faucet_state_encoded": "<JSON text>"}`
//! and decoded transparently (see [`ENVELOPE_KEY`]).
//!
//! # Validation
//!
//! Nothing is sent to the server for input that is known to be bad:
//!
//! - keys must pass [`faucet_core::state::validate_state_key`] (1 to 256
//!   ASCII letters, digits, `_`, `-`, `:`, `.`; no leading dot);
//! - table names are 1 to 63 ASCII letters, digits or `_`, and are
//!   double-quoted in every statement (case is kept);
//! - `max_connections` must be at least 1;
//! - values may nest at most [`MAX_DEPTH`] levels and encode to at most
//!   [`DEFAULT_MAX_VALUE_BYTES`] bytes (configurable per store).
//!
//! # Connections
//!
//! The constructors that open a pool turn off sqlx's ping-before-acquire,
//! which costs a round trip per statement. Dead connections are found instead
//! by sqlx's ping when a connection is returned to the pool, and by the store
//! itself: a statement that fails because its connection was lost is run once
//! more on another connection. Every statement is idempotent (an upsert of
//! the same value, a delete, a read), so the retry cannot change the outcome.
//!
//! Error messages name the table, key and operation, and say what to do. No
//! message, and no `Debug` output, contains a password: connection targets
//! are shown through [`redact_url`].

#![deny(missing_docs)]

mod backend;
mod cache;
mod cached;
mod codec;
mod config;
mod connect;
mod error;
mod flusher;
mod memory;
mod pg;
mod probe;
mod schema;
mod sql;
mod stats;

pub use backend::StateBackend;
pub use cached::CachedStateStore;
pub use codec::{ENVELOPE_KEY, MAX_DEPTH};
pub use config::{
    CacheOptions, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_VALUE_BYTES, DEFAULT_TABLE, Durability,
};
pub use connect::redact_url;
pub use memory::{MemoryBackend, WritePause};
pub use pg::PostgresStateStore;
pub use stats::CacheStats;
