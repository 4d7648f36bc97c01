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
//! # The cached store
//!
//! [`CachedStateStore`] puts a read-through cache and a batching flusher in
//! front of the plain store (or any [`StateBackend`]). Reads are answered from
//! memory; writes are coalesced per key and persisted in batches of up to
//! [`max_batch`](CacheOptions::max_batch) keys, one statement each. When a
//! write returns is the [`Durability`] you choose:
//!
//! | mode | `put`/`delete` returns | a crash loses |
//! |---|---|---|
//! | [`WriteThrough`](Durability::WriteThrough) | after its own commit | nothing acknowledged |
//! | [`GroupCommit`](Durability::GroupCommit) (default) | after the batch carrying it commits; concurrent writers share one | nothing acknowledged |
//! | [`WriteBehind`](Durability::WriteBehind) | once the cache holds it | the writes not yet committed: about one `flush_interval` of them normally, more while the server is unreachable |
//!
//! Every knob and its default is listed on [`CacheOptions`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use faucet_core::state::StateStore;
//! use faucet_state_postgres::{CacheOptions, Durability, PostgresStateStore};
//!
//! # async fn run() -> Result<(), faucet_core::FaucetError> {
//! let plain = PostgresStateStore::connect("postgres://app:secret@localhost/app").await?;
//! plain.ensure_table().await?;
//! let store = Arc::new(plain.cached(CacheOptions::new().durability(Durability::WriteBehind))?);
//! // Pipeline::new(&source, &sink).with_state_store(store.clone()).run().await?;
//! store.shutdown().await?; // persist what is dirty before exiting
//! # Ok(()) }
//! ```
//!
//! # Guarantees of the cached store
//!
//! These hold in every mode unless a mode is named. Each is pinned by the
//! tests named after it: in `tests/cached_engine.rs` (an in-memory backend
//! with injected faults), `tests/observability.rs` (what is logged and
//! probed), `tests/cached_postgres.rs` (a real server) and `tests/faults.rs`
//! (processes killed, servers crashed, connections cut).
//!
//! 1. **Read-your-writes.** After `put(k, v)` returns, `get(k)` on the same
//!    store returns `v`; after `delete(k)`, `None`; flushed or not. Dirty
//!    entries are never evicted. *(`reads_see_the_newest_write_before_and_after_flush`,
//!    the conformance suite)*
//! 2. **Whole values, never older.** A row only ever holds a value that was
//!    put for its key, whole, and per key never goes back to an older value:
//!    a key is in at most one batch in flight (batches written at the same
//!    time, up to [`concurrent_batches`](CacheOptions::concurrent_batches),
//!    of one flush round or of consecutive ones, hold distinct keys), and a
//!    put that arrives while its key is being flushed stays dirty and is
//!    written by a later batch, started only once that one has ended. A delete after a
//!    put in the same window deletes. *(`a_put_racing_the_flush_of_its_key_stays_dirty_and_lands_next`,
//!    `a_delete_after_a_put_in_one_window_does_not_resurrect_the_key`,
//!    `many_tasks_on_few_keys_end_with_the_last_writes`, `puts_racing_flushes_end_with_the_last_values`,
//!    `a_round_writes_at_most_concurrent_batches_at_once`)*
//!    A read that raced a write never caches what it read, so the cache
//!    cannot go back either. *(`a_slow_read_racing_a_write_never_caches_a_stale_value`)*
//! 3. **`flush()`.** When it returns `Ok`, every put and delete that returned
//!    before `flush()` was called is committed. On `Err` nothing is dropped:
//!    the entries stay dirty and the flusher retries them. It waits for
//!    every batch that may carry those writes, including one that was
//!    already in flight when it was called.
//!    *(`a_failed_flush_keeps_every_entry_dirty_and_a_later_flush_commits_it`,
//!    `flush_waits_for_a_round_in_flight_even_when_later_rounds_commit_first`)*
//! 4. **`shutdown()`.** Later writes get an error; every dirty entry is
//!    flushed, retrying until [`shutdown_timeout`](CacheOptions::shutdown_timeout);
//!    the flusher ends. `Ok` only when nothing is left; otherwise the error
//!    says how many keys were not persisted. Dropping the store without
//!    `shutdown()` logs a warning with that count and stops the flusher task.
//!    *(`shutdown_persists_everything_then_refuses_writes`,
//!    `shutdown_retries_until_its_deadline_then_reports_what_was_not_persisted`,
//!    `shutdown_with_the_server_down_reports_what_was_not_persisted`,
//!    `dropping_without_shutdown_stops_the_flusher`,
//!    `failed_batches_and_drops_without_shutdown_are_logged_as_warnings`)*
//! 5. **Crash loss.** In write-behind mode a crash loses at most the writes
//!    made since the last committed batch, never a write that a completed
//!    `flush()` or `shutdown()` acknowledged. In write-through and group-commit
//!    modes it loses no write whose `put` or `delete` returned. A
//!    group-commit write returns as soon as the batch carrying it (or a newer
//!    write of its key) commits, whatever other batches are still in flight.
//!    *(`a_crash_costs_at_most_the_writes_since_the_last_committed_batch`,
//!    `group_commit_puts_from_64_tasks_are_each_durable_on_return`,
//!    `a_group_commit_put_returns_when_its_own_batch_commits_while_another_is_in_flight`,
//!    `a_killed_process_loses_no_acknowledged_write`)*
//! 6. **Bounded memory.** At most [`max_pending`](CacheOptions::max_pending)
//!    keys are dirty. When that many are, a write of another key waits for
//!    the flusher up to [`put_timeout`](CacheOptions::put_timeout), then
//!    returns an error; a write is never dropped silently (nor accepted once
//!    the flusher has died, which only a panic can cause). Clean entries are
//!    bounded by [`cache_capacity`](CacheOptions::cache_capacity), oldest
//!    first, and only clean entries are evicted.
//!    *(`a_full_buffer_makes_writes_wait_then_fail_and_never_drops_one`,
//!    `a_panicking_flusher_makes_later_writes_fail_instead_of_vanishing`,
//!    `only_clean_entries_are_evicted_and_clean_ones_stay_within_capacity`,
//!    `an_outage_fills_the_buffer_then_the_store_recovers_by_itself`)*
//! 7. **Outages.** With the server down or a connection cut, the flusher
//!    retries with capped exponential backoff (50 ms doubling up to
//!    [`retry_backoff_max`](CacheOptions::retry_backoff_max)) and the store
//!    recovers by itself when the server is back. The failure is visible: a
//!    `tracing` warning, the error from `flush()`, the `flusher` probe of
//!    `check()`, and [`CachedStateStore::stats`] (dirty keys, batches, rows
//!    written, coalesced puts, last error, cache hits and misses).
//!    *(`an_outage_fills_the_buffer_then_the_store_recovers_by_itself`,
//!    `a_server_crash_and_restart_loses_nothing`, `connection_cuts_lose_nothing`,
//!    `the_first_write_after_every_pooled_connection_was_cut_succeeds`,
//!    `check_reports_a_failing_flusher_and_a_stopped_one`,
//!    `failed_batches_and_drops_without_shutdown_are_logged_as_warnings`)*
//!
//! 8. **Refused writes are isolated.** A batch the server refuses because of
//!    a row it carries (a value the database encoding cannot hold, a CHECK
//!    constraint, a trigger, a statement running past its time) is split in
//!    halves until each refused write stands alone; every other write commits
//!    in the same round. The refused write stays pending (reads still see
//!    it), is retried alone every [`retry_backoff_max`](CacheOptions::retry_backoff_max),
//!    never blocks another key, and a newer write or delete of the key
//!    replaces it. It is reported by key and by the server's reason: in its
//!    own `put`'s error (write-through, group commit), in
//!    [`CacheStats::refused_writes`], the `flusher` probe of `check()`, a
//!    `tracing` warning, and the errors of `flush()` and `shutdown()`.
//!    Batches are bounded by [`max_batch_bytes`](CacheOptions::max_batch_bytes)
//!    as well as by keys, so none nears PostgreSQL's 1 GiB message limit; and
//!    `ensure_table()`/`check()` refuse layouts on which every write fails (a
//!    deferrable key, a NOT NULL column without default).
//!    *(`tests/refused_writes.rs`, `tests/refused_writes_postgres.rs`)*
//! 9. **Cancellation is safe.** Every public async method may be dropped at
//!    any await (a `timeout`, `select!`, an aborted task). A dropped `get`
//!    caches nothing. A dropped `compare_and_put`/`put_batch` releases its
//!    keys and drops their cached entries (it may or may not have applied).
//!    A dropped buffered `put`/`delete` was either not staged
//!    (it was waiting for room) or is staged and will be persisted like any
//!    other. A dropped write-through `put` may or may not have committed, so
//!    its key is read from the table next. Until such a statement can no
//!    longer commit ([`StateBackend::abandoned_writes_settle_within`]:
//!    `statement_timeout` plus one second for PostgreSQL), nothing read or
//!    written for its keys is cached, so a read taken before it commits is
//!    never served after. A dropped `flush()` changes
//!    nothing. A dropped `shutdown()` has already refused later writes; call
//!    it again to finish. The store owns its flusher until it is dropped:
//!    dropping it aborts the flusher, which sends nothing more, and closes
//!    the connection of a batch in flight; the server then ends that batch
//!    instead of committing it later (on servers that check for a vanished
//!    client, see *Connections* below). Concurrent
//!    `shutdown()` calls report the same outcome. *(`tests/cancellation.rs`,
//!    `tests/abandoned_statements.rs`)*
//! 10. **Every wait has a deadline.** A write-through or group-commit
//!     `put`/`delete` and `flush()` return an error after
//!     [`write_timeout`](CacheOptions::write_timeout) (default 30 s) when their
//!     commit has not come (the write stays queued and is retried);
//!     `shutdown()` ends within [`shutdown_timeout`](CacheOptions::shutdown_timeout)
//!     in total; a write waits for room at most
//!     [`put_timeout`](CacheOptions::put_timeout); every statement ends
//!     within the store's [`statement_timeout`](PostgresStateStore::with_statement_timeout),
//!     on the server and, a second later, on the client. *(`tests/cancellation.rs`,
//!     `a_stalled_connection_ends_every_wait_and_loses_nothing`)* A statement
//!     whose answer never came may still have committed; if the network held
//!     it back, it may even commit after a later write of the same key
//!     through another connection. A timed-out write is therefore reported
//!     as "not known to be durable" and, in buffered modes, written again.
//! 11. **Liveness.** The flusher runs every `flush_interval`, and as soon as
//!     half of `max_pending` keys are waiting (rounding up), however
//!     the writers are scheduled: a writer that never awaits anything else
//!     still yields its thread now and then. No option value makes the store
//!     panic. *(`tests/engine_liveness.rs`)*
//! 12. **`compare_and_put` and `put_batch` are decided by the table.**
//!     Never by the cache, in every mode, so `compare_and_put` is atomic
//!     against other processes too. This store's pending writes of their
//!     keys are committed first: a pending write counts as the current value,
//!     and no write buffered before the call can overwrite its result. Puts
//!     and deletes of those keys through this store wait until it ends (at
//!     most `write_timeout`). When the table disagrees, or the outcome is
//!     unknown (an error, a time-out, a dropped call), the keys' cached
//!     entries are dropped, so the next read goes to the table; while a
//!     statement with an unknown outcome may still commit, what is read for
//!     its keys is not cached (see 9).
//!     `put_batch` is one statement: all or nothing, validation included.
//!     *(`tests/atomic_ops.rs`, the conformance suite's `claim_race`,
//!     `tests/abandoned_statements.rs`)*
//! 13. **Fencing.** Over a plain store opened with
//!     [`fence(scope)`](PostgresStateStore::fence), once a newer instance has
//!     claimed the scope no write of this store lands: each write checks the
//!     scope's epoch in its own transaction, under a share lock the claim
//!     waits for, so a write racing the claim commits before it or not at
//!     all. The first fenced batch stops the flusher; nothing it had buffered
//!     is ever written, every later write is refused naming the newer epoch,
//!     and `check()` fails. Epochs never repeat for a scope, whatever
//!     happens to its row: if the fence row is gone (a truncate, a delete, a
//!     restore from an older backup) every holder's writes fail, and the
//!     next claim still fences them all. A fenced write, guard included,
//!     ends within one `statement_timeout` on the server.
//!     *(`tests/fencing.rs`: `a_claim_after_the_fence_row_is_gone_still_fences_the_old_instance`,
//!     `a_fenced_write_ends_within_one_statement_timeout_guard_included`; `tests/faults_zombie.rs`:
//!     an instance stopped with SIGSTOP mid-batch, then resumed after a newer
//!     claim, in real processes)*
//! 14. **Coherence across writers** (with
//!     [`listen_for_changes`](CacheOptions::listen_for_changes), over a table
//!     with [`ensure_change_notifications`](PostgresStateStore::ensure_change_notifications)).
//!     A change committed by any writer (another process, a plain store, an
//!     operator's SQL, a truncate) drops the key's clean entry when its
//!     notification arrives, so reads return it from then on. Clean entries
//!     are served only while the store is listening: before it first
//!     subscribes and from a lost connection until it has subscribed again,
//!     reads go to the table, and every clean entry is dropped on each
//!     (re)subscription. This store's own pending writes are never dropped by
//!     a notification, and never hide one either: a change reported while
//!     this store's own write of the key is pending or in flight may have
//!     committed after it, so once that write is acknowledged the key is
//!     read from the table, not served from memory (a write-through `put`,
//!     `compare_and_put` and `put_batch` likewise cache what they wrote only
//!     if no change was reported while they were in flight)
//!     *(`tests/coherence_interleavings.rs`)*. The feed listens on a
//!     connection of its own, and a new session under it counts as a lost
//!     connection. *(`tests/coherence.rs`, across two processes in
//!     `changes_cross_process_boundaries_both_ways`, on a pool of one in
//!     `a_listening_store_on_a_pool_of_one_reads_and_writes`;
//!     `tests/faults.rs`: `an_outage_longer_than_the_quiet_check_leaves_no_stale_read`,
//!     `a_stalled_listening_connection_is_replaced_and_leaves_no_stale_read`)*
//!     The limit: a change that fires no trigger sends no notification (a
//!     session with `session_replication_role = replica`, as logical
//!     replication's apply worker and `pg_restore --disable-triggers` use,
//!     or a table whose triggers were disabled); such a change is seen once
//!     the entry is evicted or `cache_ttl` passes. Without notifications,
//!     [`cache_ttl`](CacheOptions::cache_ttl) bounds staleness: no clean
//!     entry is served for longer than one period.
//!     *(`cache_ttl_bounds_how_long_a_clean_entry_is_served`)*
//!
//! In group-commit mode a `put` whose batch fails returns the error, but the
//! write stays queued and is retried like any dirty entry: an `Err` means
//! "not known to be durable yet", as with any database commit whose outcome
//! was not seen.
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
//! itself; those are stored as `{"$faucet_nul_escaped_json": "<JSON text>"}`,
//! the envelope of the published 1.5.1, and decoded transparently, so rows
//! are interchangeable with 1.5.1 both ways (see [`ENVELOPE_KEY`]; the
//! envelope this crate wrote before 1.6, [`EARLIER_ENVELOPE_KEY`], is still
//! read). `compare_and_put` compares values, not stored text.
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
//! # Connections, deadlines and PgBouncer
//!
//! Statements take one of two forms, chosen when a store connects (see
//! [`with_prepared_statements`](PostgresStateStore::with_prepared_statements)).
//! The first connection is opened with a startup setting that only a server
//! session of its own applies; a transaction pooler such as PgBouncer
//! refuses or drops it.
//!
//! - **On a direct connection** (or a proxy that keeps one server session
//!   per client), `get`, `put`, `delete`, `compare_and_put` and batch
//!   writes go as prepared statements: parsed and planned once per
//!   connection, then one round trip. The server-side bound is the
//!   session's `statement_timeout`, set on every connection the store
//!   opens.
//! - **Anywhere else**, and for a pool given to
//!   [`from_pool`](PostgresStateStore::from_pool), every operation is one
//!   simple-protocol message, `SET LOCAL statement_timeout = …;
//!   <statement>`, with its inputs written as escaped literals, which the
//!   server runs as one implicit transaction; no prepared statement and no
//!   session state outlive it.
//!
//! Either way:
//!
//! - every statement ends within
//!   [`statement_timeout`](PostgresStateStore::with_statement_timeout)
//!   (default [`DEFAULT_STATEMENT_TIMEOUT`], 30 s), enforced by the server
//!   and, one second later, by the client, which then closes that
//!   connection rather than reuse it;
//! - both stores work behind **PgBouncer in transaction pooling mode** (what
//!   managed PostgreSQL services put in front of the database) with
//!   PgBouncer's default settings. Pools the store opens send no
//!   `extra_float_digits`, a startup parameter PgBouncer refuses; build a
//!   pool for [`from_pool`](PostgresStateStore::from_pool) the same way
//!   (`PgConnectOptions::extra_float_digits(None)`).
//!
//! The constructors that open a pool also turn on TCP keepalive at the
//! server's end of each connection (30 s idle, then a probe every 10 s, 3
//! probes), so a backend whose client vanished is ended within about a
//! minute. Behind a pooler that one socket setting is the only session
//! state they leave; on a direct connection the session also keeps the
//! statement timeout and the client check below.
//!
//! A statement whose caller gave up (a dropped future, a dropped store) has
//! its connection closed, but PostgreSQL notices a closed connection only
//! when it next writes to it: a statement waiting for a lock would wait on
//! and commit later. So where the server accepts it (PostgreSQL 14 and later
//! on Linux, macOS and the BSDs; asked once, on the first connection),
//! every message of the stores that `connect`/`connect_with` open also sets
//! `client_connection_check_interval` to 100 ms for its own transaction (for
//! prepared statements, for the session), and the server ends and rolls back
//! a statement within about 100 ms of its client going away. Through a
//! transaction pooler this relies on the pooler closing the server
//! connection of a client that left mid-transaction, as PgBouncer does. A
//! pool given to [`from_pool`](PostgresStateStore::from_pool) keeps its own
//! settings; set the parameter there (or on the server) to get the same.
//!
//! The constructors that open a pool turn off sqlx's ping-before-acquire,
//! which costs a round trip per statement, and every store keeps a connection
//! that answered for its next operation (at most `max_connections - 1`, each
//! for at most 250 ms unused) rather than paying the ping sqlx sends when a
//! connection goes back to its pool. A connection in an unknown state is never
//! kept. Dead connections are found by the store itself: a statement that fails because its connection was lost is run
//! again on another connection, up to `max_connections + 1` times in all (a
//! network blip kills every idle pooled connection at once, and each dead one
//! fails fast). Every statement is idempotent (an upsert of the same value, a
//! delete, a read), so a retry cannot change the outcome.
//!
//! Error messages name the table, key and operation, and say what to do. No
//! message, and no `Debug` output, contains a password: connection targets
//! are shown through [`redact_url`].

#![deny(missing_docs)]

mod config;
mod engine;
mod error;
mod lock;
mod postgres;
mod settings;
#[cfg(test)]
mod test_hooks;

// The modules by their short names, so that every file refers to a sibling
// the same way whichever folder it lives in.
use engine::{backend, cache, cached, changes, flusher, holds, memory, report, stats};
use postgres::{
    codec, connect, environment, exec, fence, host_choice, hosts, notify, pg, pooler, probe,
    reserve, schema, session, sql,
};

pub use backend::{BatchError, StateBackend};
pub use cached::CachedStateStore;
pub use changes::{Change, ChangeFeed};
pub use codec::{EARLIER_ENVELOPE_KEY, ENVELOPE_KEY, MAX_DEPTH};
pub use config::{
    CacheOptions, DEFAULT_MAX_BATCH_BYTES, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_VALUE_BYTES,
    DEFAULT_TABLE, Durability,
};
pub use connect::redact_url;
pub use exec::DEFAULT_STATEMENT_TIMEOUT;
pub use memory::{MemoryBackend, Pause};
pub use pg::PostgresStateStore;
pub use settings::PostgresStateConfig;
pub use stats::{CacheStats, RefusedWrite, metric_names};

/// The module path of 1.5.1, so code written against it compiles unchanged:
/// `faucet_state_postgres::store::{PostgresStateStore, DEFAULT_TABLE}`.
pub mod store {
    pub use crate::{DEFAULT_TABLE, PostgresStateStore};
}
