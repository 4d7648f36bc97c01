//! Defaults and the validation of everything a caller configures.
//!
//! Validation happens before any SQL is sent: a bad table name or pool size is
//! refused when the store is built, a bad key when the operation is called.

use std::time::Duration;

use crate::error::StoreError;

/// Table used by [`PostgresStateStore::connect`](crate::PostgresStateStore::connect).
pub const DEFAULT_TABLE: &str = "faucet_state";

/// Pool size used by [`PostgresStateStore::connect`](crate::PostgresStateStore::connect).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 5;

/// Largest encoded JSON value, in bytes, that a store accepts by default (16 MiB).
///
/// Bookmarks are small; a value this large is almost always a bug (a whole
/// page stored as state). Raise it with
/// [`PostgresStateStore::with_max_value_bytes`](crate::PostgresStateStore::with_max_value_bytes).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;

/// Longest identifier PostgreSQL keeps without truncating it (NAMEDATALEN - 1).
const MAX_IDENTIFIER_LEN: usize = 63;

/// A table name that is safe to splice into SQL.
///
/// Invariant: 1 to 63 ASCII letters, digits or `_`. Such a name cannot contain
/// a quote, so double-quoting it yields an identifier that PostgreSQL takes
/// verbatim (case preserved, no truncation, reserved words allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableName(String);

impl TableName {
    pub(crate) fn parse(name: impl Into<String>) -> Result<Self, StoreError> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_IDENTIFIER_LEN {
            Some("it is longer than 63 characters")
        } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            Some("it contains a character other than an ASCII letter, digit or '_'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(StoreError::InvalidTable { name, reason }),
            None => Ok(Self(name)),
        }
    }

    /// The name as the caller gave it.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The name double-quoted, ready to splice into a statement.
    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

/// Checks a pool size: zero connections would make every call time out.
pub(crate) fn validate_max_connections(max_connections: u32) -> Result<u32, StoreError> {
    if max_connections == 0 {
        Err(StoreError::ZeroConnections)
    } else {
        Ok(max_connections)
    }
}

/// Checks a key prefix for [`list`](crate::PostgresStateStore::list): the
/// characters a key may hold, and nothing else. The empty prefix lists every key.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.len() > 256 {
        return Err(StoreError::InvalidPrefix {
            prefix: prefix.to_owned(),
            reason: "it is longer than any valid key (256 characters)".to_owned(),
        });
    }
    match prefix.char_indices().find(|&(_, c)| !can_occur_in_a_key(c)) {
        Some((at, c)) => Err(StoreError::InvalidPrefix {
            prefix: prefix.to_owned(),
            reason: format!(
                "character {c:?} at byte {at} cannot occur in a key (see faucet_core::state::validate_state_key)"
            ),
        }),
        None => Ok(()),
    }
}

/// Whether `c` may occur inside a key, by the rules of the faucet-core this
/// crate is built with: `/` (an owner namespace) is a key character from
/// faucet-core 1.16 on. Asked of the core's own validator, with `c` between
/// two letters, so the rule cannot drift from the core's.
fn can_occur_in_a_key(c: char) -> bool {
    let mut probe = [0u8; 6];
    probe[0] = b'a';
    let len = c.encode_utf8(&mut probe[1..5]).len();
    probe[1 + len] = b'a';
    std::str::from_utf8(&probe[..len + 2])
        .is_ok_and(|key| faucet_core::state::validate_state_key(key).is_ok())
}

/// When a write of a [`CachedStateStore`](crate::CachedStateStore) returns,
/// and so what a crash can cost.
///
/// In configuration files it is written `write_through`, `group_commit` or
/// `write_behind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// `put` and `delete` return after their own commit, exactly like
    /// [`PostgresStateStore`](crate::PostgresStateStore); reads are served by
    /// the cache. A crash loses nothing that was acknowledged.
    WriteThrough,
    /// `put` and `delete` return after the batch that carries them commits.
    /// Concurrent callers share one round trip, and while one batch
    /// commits the next one, carrying the writes made meanwhile, is already
    /// on its way (up to `concurrent_batches`). A crash loses nothing that
    /// was acknowledged. The default.
    #[default]
    GroupCommit,
    /// `put` and `delete` return once the cache holds them; the flusher
    /// writes every `flush_interval`, or as soon as half of `max_pending`
    /// keys are waiting. A crash loses the writes made since the last committed batch,
    /// but never one that a completed `flush()` or `shutdown()` acknowledged.
    WriteBehind,
}

/// Options of a [`CachedStateStore`](crate::CachedStateStore), built like
/// sqlx's pool options: start from [`CacheOptions::new`] (the defaults) and
/// change what you need. [`CachedStateStore::new`](crate::CachedStateStore::new)
/// validates them.
///
/// | option | default | meaning |
/// |---|---|---|
/// | [`name`](Self::name) | the table name, or `default` | the `store` label of metrics and spans |
/// | [`durability`](Self::durability) | [`Durability::GroupCommit`] | when a write returns |
/// | [`flush_interval`](Self::flush_interval) | 1 s | write-behind: longest time a write waits for the flusher |
/// | [`max_batch`](Self::max_batch) | 1,000 | most keys per transaction |
/// | [`max_batch_bytes`](Self::max_batch_bytes) | 32 MiB | most encoded bytes (values and keys) per transaction; a larger single write goes alone |
/// | [`max_pending`](Self::max_pending) | 100,000 | most dirty keys held in memory; write-behind also flushes as soon as half this many are waiting |
/// | [`put_timeout`](Self::put_timeout) | 5 s | how long a write waits for room when `max_pending` keys are dirty |
/// | [`write_timeout`](Self::write_timeout) | 30 s | how long a write-through or group-commit `put`/`delete`, or `flush()`, waits for its commit before it returns an error (the write stays queued); also bounds a whole `compare_and_put`/`put_batch`, and a write's wait for one holding its key |
/// | [`cache_capacity`](Self::cache_capacity) | 100,000 | most clean (persisted) entries kept for reads |
/// | [`shutdown_timeout`](Self::shutdown_timeout) | 30 s | how long `shutdown()` keeps retrying to persist dirty keys |
/// | [`retry_backoff_max`](Self::retry_backoff_max) | 5 s | cap of the flusher's exponential backoff after a failed batch (it starts at 50 ms) |
/// | [`cache_ttl`](Self::cache_ttl) | off (`Duration::MAX`) | longest a clean entry is served: every `cache_ttl` all clean entries are dropped |
/// | [`listen_for_changes`](Self::listen_for_changes) | off | drop cached entries that any other writer changed, as the backend notifies them; serve clean entries only while listening |
///
/// ```
/// use std::time::Duration;
/// use faucet_state_postgres::{CacheOptions, Durability};
///
/// let options = CacheOptions::new()
///     .durability(Durability::WriteBehind)
///     .flush_interval(Duration::from_millis(200))
///     .max_batch(5_000);
/// assert_eq!(options.get_max_pending(), 100_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheOptions {
    name: Option<String>,
    durability: Durability,
    flush_interval: Duration,
    max_batch: usize,
    max_batch_bytes: usize,
    concurrent_batches: usize,
    max_pending: usize,
    put_timeout: Duration,
    write_timeout: Duration,
    cache_capacity: usize,
    shutdown_timeout: Duration,
    retry_backoff_max: Duration,
    listen_for_changes: bool,
    cache_ttl: Duration,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            name: None,
            durability: Durability::default(),
            flush_interval: Duration::from_secs(1),
            max_batch: 1_000,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            concurrent_batches: 2,
            max_pending: 100_000,
            put_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(30),
            cache_capacity: 100_000,
            shutdown_timeout: Duration::from_secs(30),
            retry_backoff_max: Duration::from_secs(5),
            listen_for_changes: false,
            cache_ttl: Duration::MAX,
        }
    }
}

/// Default of [`CacheOptions::max_batch_bytes`]: 32 MiB, far below the
/// 1 GiB PostgreSQL accepts in one message, and twice the largest value a
/// store accepts by default.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 32 * 1024 * 1024;

/// First delay of the flusher's backoff after a failed batch; it doubles on
/// each further failure up to [`CacheOptions::retry_backoff_max`].
pub(crate) const RETRY_BACKOFF_START: Duration = Duration::from_millis(50);

macro_rules! option_accessors {
    ($($(#[$doc:meta])* $name:ident / $getter:ident : $ty:ty;)+) => {
        impl CacheOptions {
            $(
                $(#[$doc])*
                pub fn $name(mut self, $name: $ty) -> Self {
                    self.$name = $name;
                    self
                }

                #[doc = concat!("The configured `", stringify!($name), "`.")]
                pub fn $getter(&self) -> $ty {
                    self.$name
                }
            )+
        }
    };
}

option_accessors! {
    /// When a write returns; see [`Durability`].
    durability / get_durability: Durability;
    /// Write-behind: the longest a write waits before the flusher takes it.
    /// Must be greater than zero.
    flush_interval / get_flush_interval: Duration;
    /// Most keys written per transaction (one multi-row upsert plus one
    /// batched delete). Must be at least 1.
    max_batch / get_max_batch: usize;
    /// Most encoded bytes (JSON values and keys) per transaction. PostgreSQL
    /// refuses a message over 1 GiB and a large batch holds locks and
    /// memory longer, so batches are cut by size as well as by keys; a single
    /// write larger than this goes alone. Must be at least 1.
    max_batch_bytes / get_max_batch_bytes: usize;
    /// Most batches written at the same time, each in its own transaction
    /// on its own connection (default 2): while the server commits one, the
    /// next is already on its way, of the same flush round or of the next
    /// one, which keeps the server busy when many keys are dirty and lets
    /// group-commit writers whose batch committed be carried again while
    /// the other batch is in flight. Batches in flight hold distinct keys,
    /// each in key order, so they cannot deadlock each other; a key written
    /// again while in flight goes in a later batch. Must be at least 1; 1
    /// writes one batch after another, and a round starts only when the
    /// previous one has ended.
    concurrent_batches / get_concurrent_batches: usize;
    /// Most dirty (not yet persisted) keys held in memory. A write that would
    /// exceed it waits up to `put_timeout` for the flusher, then fails; it is
    /// never dropped silently. Write-behind flushes before `flush_interval`
    /// ends once half this many keys are waiting: earlier would rewrite hot
    /// keys over and over, costing the server what coalescing saves. Must be
    /// at least 1.
    max_pending / get_max_pending: usize;
    /// How long a write waits for room when `max_pending` keys are dirty.
    put_timeout / get_put_timeout: Duration;
    /// How long a write-through or group-commit `put`/`delete`, and
    /// `flush()`, wait for their commit. Past it they return an error; a
    /// buffered write stays queued and is retried by the flusher (a
    /// write-through write may or may not have committed, and its key is
    /// read from the table next). It also bounds a whole `compare_and_put`
    /// or `put_batch` (the flush of its keys' pending writes included), and
    /// how long a `put`/`delete` of a key one of them holds waits for it.
    write_timeout / get_write_timeout: Duration;
    /// Most clean entries (values known to be persisted, or known absent)
    /// kept for reads. Only clean entries are evicted, oldest first; 0 turns
    /// read caching off (dirty entries are always kept).
    cache_capacity / get_cache_capacity: usize;
    /// How long `shutdown()` keeps retrying to persist dirty keys.
    shutdown_timeout / get_shutdown_timeout: Duration;
    /// Cap of the flusher's exponential backoff after a failed batch. Must be
    /// greater than zero.
    retry_backoff_max / get_retry_backoff_max: Duration;
    /// Keep the read cache coherent with every other writer of the storage
    /// (other processes, plain stores, an operator's SQL): the store listens
    /// for the backend's change notifications and drops each changed key's
    /// clean entry; while it is not listening (at start, after a lost
    /// connection) clean entries are not served and reads go to the
    /// storage. Off by default. Needs a backend that publishes changes: for
    /// PostgreSQL, call [`ensure_change_notifications`](crate::PostgresStateStore::ensure_change_notifications)
    /// once, and connect directly (LISTEN does not work through a
    /// transaction pooler). The PostgreSQL store listens on one connection
    /// of its own, opened with the pool's connection options and not
    /// counted in `max_connections`, so a pool of one still serves reads
    /// and writes.
    listen_for_changes / get_listen_for_changes: bool;
    /// Bounds how stale a read can be where change notifications are not
    /// available (a role that may not create the triggers, a transaction
    /// pooler): every `cache_ttl`, every clean entry is dropped, so no
    /// value read from the storage is served for longer than that, and each
    /// key is read again at most once per period. `Duration::MAX` (the
    /// default) turns it off. Must be greater than zero. Dirty entries, this
    /// store's own newer writes, are kept.
    cache_ttl / get_cache_ttl: Duration;
}

impl CacheOptions {
    /// The defaults (see the table above).
    pub fn new() -> Self {
        Self::default()
    }

    /// Names the store in its metrics (label `store`) and tracing spans.
    /// [`PostgresStateStore::cached`](crate::PostgresStateStore::cached)
    /// uses the table name when none is set; otherwise it is `default`.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The configured name, or `default`.
    pub fn get_name(&self) -> &str {
        self.name.as_deref().unwrap_or("default")
    }

    pub(crate) fn has_name(&self) -> bool {
        self.name.is_some()
    }

    /// Checks the options; the error names the option and the rule.
    pub(crate) fn validate(&self) -> Result<(), StoreError> {
        let problem = if self.flush_interval.is_zero() {
            Some("flush_interval must be greater than zero")
        } else if self.max_batch == 0 {
            Some("max_batch must be at least 1")
        } else if self.max_batch_bytes == 0 {
            Some("max_batch_bytes must be at least 1")
        } else if self.concurrent_batches == 0 {
            Some("concurrent_batches must be at least 1")
        } else if self.cache_ttl.is_zero() {
            Some("cache_ttl must be greater than zero")
        } else if self.max_pending == 0 {
            Some("max_pending must be at least 1")
        } else if self.retry_backoff_max.is_zero() {
            Some("retry_backoff_max must be greater than zero")
        } else {
            None
        };
        match problem {
            Some(problem) => Err(StoreError::InvalidOption(problem)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_postgres_identifiers() {
        for ok in ["faucet_state", "T1", "_x", &"a".repeat(63), "select"] {
            assert_eq!(TableName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            &"a".repeat(64),
            "a-b",
            "a.b",
            "a\"b",
            "a b",
            "tëst",
            "x;drop",
            "a\0b",
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(TableName::parse("Mixed").unwrap().quoted(), "\"Mixed\"");
    }

    #[test]
    fn zero_connections_is_refused() {
        assert!(validate_max_connections(0).is_err());
        assert_eq!(validate_max_connections(1).unwrap(), 1);
    }

    #[test]
    fn cache_options_are_validated() {
        assert!(CacheOptions::new().validate().is_ok());
        let zero = Duration::ZERO;
        for (bad, rule) in [
            (CacheOptions::new().flush_interval(zero), "flush_interval"),
            (CacheOptions::new().max_batch(0), "max_batch"),
            (CacheOptions::new().max_batch_bytes(0), "max_batch_bytes"),
            (CacheOptions::new().max_pending(0), "max_pending"),
            (
                CacheOptions::new().concurrent_batches(0),
                "concurrent_batches",
            ),
            (
                CacheOptions::new().retry_backoff_max(zero),
                "retry_backoff_max",
            ),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(rule), "{err}");
        }
        assert!(CacheOptions::new().cache_capacity(0).validate().is_ok());
    }

    #[test]
    fn prefixes_use_the_key_alphabet() {
        for ok in ["", "pipeline:", "a.b-c_d"] {
            validate_prefix(ok).unwrap();
        }
        for bad in ["%", "a_%", "a\\", "é", &"a".repeat(257)] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
