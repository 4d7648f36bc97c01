//! Session settings of the connections a store opens itself, which the
//! prepared form (see `sql.rs`) needs.
//!
//! A simple-protocol message bounds itself with `SET LOCAL
//! statement_timeout` (see `sql.rs`). A prepared statement cannot carry a
//! prelude in the same round trip, so in the prepared form the bound is the
//! session's `statement_timeout`, set when a connection opens. Which form a
//! store's connections take is known before its pool opens any (its first
//! connection finds out, see `pooler.rs`); changing the form or the timeout
//! later retires the connections opened before the change: the pool drops
//! them on their next acquire and opens fresh ones.
//!
//! Nothing here runs in the message form: behind a transaction pooler a
//! session `SET` would leak to whichever client gets that server connection
//! next.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::lock::lock;
use crate::sql::{client_check_session_sql, timeout_millis};

/// What every connection of one pool should have set, and since when.
#[derive(Debug)]
pub(crate) struct SessionSettings {
    prepared: AtomicBool,
    timeout_ms: AtomicU64,
    /// When `prepared` or `timeout_ms` last changed.
    changed_at: Mutex<Instant>,
    /// The server accepts `client_connection_check_interval` (see
    /// `sql.rs`); set once, before the pool opens its first connection.
    client_check: AtomicBool,
}

impl SessionSettings {
    pub(crate) fn new(timeout: Duration) -> Self {
        Self {
            prepared: AtomicBool::new(false),
            timeout_ms: AtomicU64::new(timeout_millis(timeout)),
            changed_at: Mutex::new(Instant::now()),
            client_check: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_client_check(&self, accepted: bool) {
        self.client_check.store(accepted, Ordering::SeqCst);
    }

    /// Whether messages should carry the client check (see `sql.rs`).
    pub(crate) fn client_check(&self) -> bool {
        self.client_check.load(Ordering::SeqCst)
    }

    /// Records whether connections are to run prepared statements, before
    /// the pool opens any (see `pooler.rs`).
    pub(crate) fn set_prepared(&self, prepared: bool) {
        let timeout = Duration::from_millis(self.timeout_ms.load(Ordering::SeqCst));
        self.configure(prepared, timeout);
    }

    /// Records the store's mode and timeout. The values change before the
    /// stamp, so a connection created after the stamp has read them.
    pub(crate) fn configure(&self, prepared: bool, timeout: Duration) {
        self.prepared.store(prepared, Ordering::SeqCst);
        self.timeout_ms
            .store(timeout_millis(timeout), Ordering::SeqCst);
        *lock(&self.changed_at) = Instant::now();
    }

    /// The statement a new connection runs, if any: prepared statements
    /// carry no prelude, so their bounds are the session's.
    pub(crate) fn on_connect_sql(&self) -> Option<String> {
        self.prepared.load(Ordering::SeqCst).then(|| {
            let mut sql = format!(
                "SET statement_timeout = {}",
                self.timeout_ms.load(Ordering::SeqCst)
            );
            if self.client_check() {
                sql.push_str("; ");
                sql.push_str(&client_check_session_sql());
            }
            sql
        })
    }

    /// Whether a connection of this `age` may be handed out: not if it was
    /// opened before the last change (it has the old settings).
    pub(crate) fn is_current(&self, age: Duration) -> bool {
        let since_change = lock(&self.changed_at).elapsed();
        age < since_change
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_prepared_form_sets_the_session_and_a_change_retires_older_connections() {
        let settings = SessionSettings::new(Duration::from_secs(30));
        assert_eq!(settings.on_connect_sql(), None);
        std::thread::sleep(Duration::from_millis(5));
        let opened_before = Duration::from_secs(1);
        settings.configure(true, Duration::from_millis(1500));
        assert_eq!(
            settings.on_connect_sql().as_deref(),
            Some("SET statement_timeout = 1500")
        );
        assert!(!settings.is_current(opened_before));
        assert!(settings.is_current(Duration::ZERO));
    }
}
