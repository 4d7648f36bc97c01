//! The plain store: every operation is one statement, durable on return.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use faucet_core::FaucetError;
use faucet_core::check::{CheckContext, CheckReport, Probe};
use faucet_core::state::{StateStore, validate_state_key};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgPool, Row};

use crate::codec;
use crate::config::{
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_VALUE_BYTES, DEFAULT_TABLE, TableName,
    validate_max_connections, validate_prefix,
};
use crate::connect::connect_pool;
use crate::error::{StoreError, describe_sqlx, refuses_rows, sqlstate};
use crate::exec::{DEFAULT_STATEMENT_TIMEOUT, Executor, outcome_unknown};
use crate::fence::{self, FENCED_SQLSTATE, Fence};
use crate::host_choice::HostChoice;
use crate::pooler::Endpoint;
use crate::session::SessionSettings;
use crate::sql::{Prepared, Statements, timeout_millis};
use crate::{probe, schema};

/// A [`StateStore`] that keeps each bookmark in one row of a PostgreSQL table.
///
/// Every call is a single statement: `get` one `SELECT`, `put` one upsert,
/// `delete` one `DELETE`. A `put` or `delete` is committed, and so durable,
/// when it returns. The store is cheap to share: wrap it in an `Arc`.
///
/// Every statement ends within [`statement_timeout`](Self::with_statement_timeout).
/// Every method may be cancelled (its future dropped) at any await: a
/// dropped `get` has no effect; a dropped write may or may not have
/// committed, all of it or none of it (each call is one transaction), and
/// its connection is closed rather than reused; where the server checks for
/// a vanished client (see the crate docs), it then ends the statement within
/// about 100 ms instead of letting it commit later.
///
/// The table has the layout `key TEXT PRIMARY KEY, value JSONB NOT NULL,
/// updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()`; create it with
/// [`ensure_table`](Self::ensure_table) or out of band.
///
/// ```no_run
/// use std::sync::Arc;
/// use faucet_core::state::StateStore;
/// use faucet_state_postgres::PostgresStateStore;
///
/// # async fn run() -> Result<(), faucet_core::FaucetError> {
/// let store = PostgresStateStore::connect("postgres://app:secret@localhost/app").await?;
/// store.ensure_table().await?;
/// store.put("orders:cursor", &serde_json::json!({"id": 42})).await?;
/// assert_eq!(
///     store.get("orders:cursor").await?,
///     Some(serde_json::json!({"id": 42}))
/// );
/// let shared: Arc<dyn StateStore> = Arc::new(store); // for Pipeline::with_state_store
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStateStore {
    exec: Executor,
    table: TableName,
    sql: Statements,
    /// `Some` when get, put, delete and batch writes go as prepared
    /// statements: where the first connection found a server session of its
    /// own (`pooler.rs`), unless told otherwise (see
    /// [`with_prepared_statements`](Self::with_prepared_statements)).
    prepared: Option<Prepared>,
    /// Settings of the connections this store opened itself; `None` for a
    /// pool from `from_pool`.
    session: Option<Arc<SessionSettings>>,
    max_value_bytes: usize,
    /// The scope this store claimed, if fenced (see `fence.rs`).
    fence: Option<Fence>,
    /// Messages ask the server to end them once their client is gone (see
    /// `sql.rs`); known for pools this store opened.
    client_check: bool,
}

impl PostgresStateStore {
    /// Connects with a pool of 5 connections and the table `faucet_state`.
    ///
    /// One connection is opened before this returns, so a wrong URL, password
    /// or address fails here, with a message that names the target (password
    /// redacted) and what to fix.
    pub async fn connect(url: &str) -> Result<Self, FaucetError> {
        Self::connect_with(url, DEFAULT_MAX_CONNECTIONS, DEFAULT_TABLE).await
    }

    /// Connects with `max_connections` pooled connections to `table`.
    ///
    /// The table name and pool size are checked before anything is sent: a
    /// table name is 1 to 63 ASCII letters, digits or `_`, and the pool needs
    /// at least one connection.
    ///
    /// What the URL leaves out comes from the `PG*` environment variables and
    /// the password file, as with libpq, unless faucet's config-only switch
    /// is on (`faucet_core::libpq::set_config_only`, with the
    /// `faucet-core-1-16` feature): then nothing does, and a URL leaving out
    /// what cannot be pinned (the user while `PGUSER` is set, say) is refused
    /// naming the variable.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), faucet_core::FaucetError> {
    /// let store = faucet_state_postgres::PostgresStateStore::connect_with(
    ///     "postgres://app@localhost/app", 2, "pipeline_state",
    /// ).await?;
    /// assert_eq!(store.table(), "pipeline_state");
    /// # Ok(()) }
    /// ```
    pub async fn connect_with(
        url: &str,
        max_connections: u32,
        table: &str,
    ) -> Result<Self, FaucetError> {
        let table = TableName::parse(table)?;
        let max_connections = validate_max_connections(max_connections)?;
        let session = Arc::new(SessionSettings::new(DEFAULT_STATEMENT_TIMEOUT));
        let connected = connect_pool(url, max_connections, session.clone()).await?;
        let mut store = Self::with_table(connected.pool, table);
        store.exec = store.exec.with_host_choice(connected.choice);
        // The session was set up for this form before the pool connected.
        let direct = connected.endpoint == Endpoint::Direct;
        store.prepared = direct.then(|| Prepared::new(&store.table));
        store.client_check = session.client_check();
        store.session = Some(session);
        store.sql = store.statements(DEFAULT_STATEMENT_TIMEOUT);
        Ok(store)
    }

    /// Uses a pool the caller built, for example one shared with the rest of
    /// an application. Nothing is sent until the first operation.
    ///
    /// The pool's own settings apply. Note that sqlx pings a connection on
    /// every acquire unless the pool was built with
    /// `test_before_acquire(false)`, which the other constructors do (see the
    /// crate docs on dead-connection detection).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let pool = sqlx::postgres::PgPoolOptions::new()
    ///     .connect_lazy("postgres://app@localhost/app")
    ///     .unwrap();
    /// let store = faucet_state_postgres::PostgresStateStore::from_pool(pool, "state").unwrap();
    /// assert_eq!(store.table(), "state");
    /// assert!(faucet_state_postgres::PostgresStateStore::from_pool(
    ///     store.pool().clone(), "bad-name").is_err());
    /// # }
    /// ```
    pub fn from_pool(pool: PgPool, table: impl Into<String>) -> Result<Self, FaucetError> {
        Ok(Self::with_table(pool, TableName::parse(table.into())?))
    }

    fn with_table(pool: PgPool, table: TableName) -> Self {
        Self {
            exec: Executor::new(pool, DEFAULT_STATEMENT_TIMEOUT),
            sql: Statements::new(&table, DEFAULT_STATEMENT_TIMEOUT),
            prepared: None,
            session: None,
            table,
            max_value_bytes: DEFAULT_MAX_VALUE_BYTES,
            fence: None,
            client_check: false,
        }
    }

    /// Every statement, bounded by `timeout`, writes guarded by the fence.
    fn statements(&self, timeout: Duration) -> Statements {
        let mut statements = Statements::new(&self.table, timeout);
        if self.client_check {
            statements = statements.checking_the_client();
        }
        match &self.fence {
            Some(fence) => statements.guarded(fence.guard(&self.table, timeout)),
            None => statements,
        }
    }

    /// Installs the triggers that publish every change of this table (by
    /// any writer: this crate's stores, other versions, an operator's SQL)
    /// as a PostgreSQL notification, which cached stores built with
    /// [`listen_for_changes`](crate::CacheOptions::listen_for_changes) use to
    /// drop stale entries. Idempotent; needs the right to create functions
    /// and triggers. Every writer of the table then sends one `NOTIFY` per
    /// statement, delivered at commit (see the README for what that costs).
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), faucet_core::FaucetError> {
    /// use faucet_state_postgres::{CacheOptions, PostgresStateStore};
    /// let plain = PostgresStateStore::connect("postgres://app:secret@localhost/app").await?;
    /// plain.ensure_table().await?;
    /// plain.ensure_change_notifications().await?;
    /// let store = plain.cached(CacheOptions::new().listen_for_changes(true))?;
    /// # Ok(()) }
    /// ```
    pub async fn ensure_change_notifications(&self) -> Result<(), FaucetError> {
        let sql = self.sql.bounded(&crate::notify::install_sql(&self.table));
        self.run("ensure_change_notifications", &sql).await?;
        Ok(())
    }

    /// Claims `scope` for this store, fencing every earlier claimant: from
    /// now on a write of a store that claimed `scope` before lands only
    /// while no newer claim exists, checked in the write's own transaction.
    ///
    /// Open each instance of a pipeline with the same scope (its name, say);
    /// the newest instance wins. A fenced store's writes, and its
    /// [`CachedStateStore`](crate::CachedStateStore)'s buffered ones, fail
    /// with "fenced by a newer instance (epoch N)" and never land, and its
    /// `check()` fails naming the newer epoch. Reads are not fenced. The
    /// claim is one statement: the scope's epoch, kept in a row of the
    /// table under the key `#fence:<scope>` (never a state key, and left out
    /// of [`list`](Self::list)), goes up by one; it waits for writes of older
    /// claimants that are in flight, so none lands after it. The scope
    /// follows the state-key rules. Fenced writes are sent as simple-protocol
    /// messages (a guard, then the write) even where other statements go prepared.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), faucet_core::FaucetError> {
    /// use faucet_state_postgres::PostgresStateStore;
    /// let store = PostgresStateStore::connect("postgres://app:secret@localhost/app")
    ///     .await?
    ///     .fence("orders-pipeline")
    ///     .await?;
    /// assert!(store.fence_epoch().is_some());
    /// # Ok(()) }
    /// ```
    pub async fn fence(mut self, scope: &str) -> Result<Self, FaucetError> {
        validate_state_key(scope)
            .map_err(|e| FaucetError::Config(format!("invalid fence scope {scope:?}: {e}")))?;
        let claim = self.sql.bounded(&fence::claim_sql(&self.table, scope));
        let rows = self.run("claim of the fence", &claim).await?;
        let epoch: i64 = rows
            .first()
            .map(|row| decode(row, 0, self.table()))
            .transpose()?
            .ok_or_else(|| {
                FaucetError::State(format!(
                    "the claim of fence scope '{scope}' in table '{}' returned no epoch",
                    self.table()
                ))
            })?;
        self.fence = Some(Fence {
            scope: scope.to_owned(),
            epoch,
        });
        self.sql = self.statements(self.statement_timeout());
        Ok(self)
    }

    /// The epoch this store claimed its scope with, if it is fenced (see
    /// [`fence`](Self::fence)).
    pub fn fence_epoch(&self) -> Option<i64> {
        self.fence.as_ref().map(|fence| fence.epoch)
    }

    /// The newest epoch of this store's fence scope, as the table holds it
    /// now (`None` when the store is not fenced or the row is gone).
    pub(crate) async fn newest_fence_epoch(&self) -> Result<Option<i64>, StoreError> {
        let Some(fence) = &self.fence else {
            return Ok(None);
        };
        let sql = self
            .sql
            .bounded(&fence::newest_epoch_sql(&self.table, &fence.scope));
        let rows = self.run("read of the fence", &sql).await?;
        rows.first()
            .map(|row| decode::<Option<i64>>(row, 0, self.table()))
            .transpose()
            .map(Option::flatten)
    }

    /// Sets how long any statement this store sends may run (default
    /// [`DEFAULT_STATEMENT_TIMEOUT`], 30 s), between 1 ms and about 24 days.
    ///
    /// The server enforces it (SQLSTATE 57014 past it: each message sets
    /// `statement_timeout` for its own transaction, and where statements go
    /// prepared, each connection the store opens has it as a session
    /// setting), and so does the client, one second later, for a connection
    /// that stalls without an answer: that connection is closed, and the
    /// call fails with an error saying so.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://localhost/x").unwrap();
    /// use std::time::Duration;
    /// let store = faucet_state_postgres::PostgresStateStore::from_pool(pool, "state")
    ///     .unwrap()
    ///     .with_statement_timeout(Duration::from_secs(5));
    /// assert_eq!(store.statement_timeout(), Duration::from_secs(5));
    /// # }
    /// ```
    pub fn with_statement_timeout(mut self, timeout: Duration) -> Self {
        let timeout = Duration::from_millis(timeout_millis(timeout));
        self.exec = self.exec.with_statement_timeout(timeout);
        self.sql = self.statements(timeout);
        self.configure_sessions();
        self
    }

    /// How long any statement this store sends may run.
    pub fn statement_timeout(&self) -> Duration {
        self.exec.statement_timeout()
    }

    /// Chooses the form of `get`, `put`, `delete`, `compare_and_put` and
    /// batch writes (the cached store's flushes, `put_many`, `delete_many`)
    /// instead of leaving it to the store: `true` sends them as prepared
    /// statements on every connection, `false` as one simple-protocol
    /// message each on every connection.
    ///
    /// Without this call, a store that opened its own pool (`connect`,
    /// `connect_with`, `PostgresStateConfig`) chose when it connected: its
    /// first connection was opened with a startup setting that only a
    /// server session of its own applies (a transaction pooler such as
    /// PgBouncer refuses or drops it), and on such a direct connection the
    /// statements go prepared; anywhere else, and for a pool given to
    /// [`from_pool`](Self::from_pool), they go as messages. A prepared
    /// statement is parsed and planned once per connection, then costs one
    /// round trip of a few bytes: about 1.5 times as fast for a `get` as
    /// the message (see the README's performance section).
    ///
    /// `true` is **only for connections that keep their session**: a direct
    /// connection to PostgreSQL, a pooler in session mode, or PgBouncer 1.21
    /// or later with `max_prepared_statements` set. Behind a pooler in
    /// transaction mode without that, named prepared statements meet server
    /// connections that never saw them. `false` is for a URL that may turn
    /// from a server into a transaction pooler while the store runs, which
    /// the check at connect cannot foresee.
    ///
    /// The server-side bound of a prepared statement is the session's
    /// `statement_timeout`, set on every connection a store opens;
    /// connections opened before this call, or before a later
    /// [`with_statement_timeout`](Self::with_statement_timeout), are replaced
    /// on their next use. A pool given to [`from_pool`](Self::from_pool)
    /// keeps its own session settings: the store does not change them, and
    /// only the client-side deadline applies to its prepared statements
    /// unless that pool sets `statement_timeout` itself.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://localhost/x").unwrap();
    /// let store = faucet_state_postgres::PostgresStateStore::from_pool(pool, "state").unwrap();
    /// assert!(!store.prepared_statements()); // a pool of unknown kind
    /// let store = store.with_prepared_statements(true);
    /// assert!(store.prepared_statements());
    /// # }
    /// ```
    pub fn with_prepared_statements(mut self, enabled: bool) -> Self {
        self.prepared = enabled.then(|| Prepared::new(&self.table));
        self.configure_sessions();
        self
    }

    /// Whether statements go as prepared statements: as chosen with
    /// [`with_prepared_statements`](Self::with_prepared_statements), else
    /// whether the store found a direct connection when it connected.
    pub fn prepared_statements(&self) -> bool {
        self.prepared.is_some()
    }

    /// Records the mode and timeout every connection should have. Kept
    /// connections go back to the pool, whose `before_acquire` retires the
    /// ones opened before the change; the reserve bypasses that check.
    fn configure_sessions(&self) {
        if let Some(session) = &self.session {
            session.configure(self.prepared.is_some(), self.statement_timeout());
            self.exec.release_kept();
        }
    }

    /// Sets the largest encoded value, in bytes, that `put` accepts (default
    /// [`DEFAULT_MAX_VALUE_BYTES`], 16 MiB). A larger value is refused with an
    /// error naming the key and both sizes, before anything is sent.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// # let pool = sqlx::postgres::PgPoolOptions::new().connect_lazy("postgres://localhost/x").unwrap();
    /// use faucet_core::state::StateStore;
    /// let store = faucet_state_postgres::PostgresStateStore::from_pool(pool, "state")
    ///     .unwrap()
    ///     .with_max_value_bytes(64);
    /// let err = store.put("k", &serde_json::json!("x".repeat(100))).await.unwrap_err();
    /// assert!(err.to_string().contains("over the limit of 64 bytes"));
    /// # }
    /// ```
    pub fn with_max_value_bytes(mut self, limit: usize) -> Self {
        self.max_value_bytes = limit;
        self
    }

    /// The largest encoded value, in bytes, that `put` accepts.
    pub fn max_value_bytes(&self) -> usize {
        self.max_value_bytes
    }

    /// The table name, as given (unquoted).
    pub fn table(&self) -> &str {
        self.table.as_str()
    }

    /// How connections choose their host, for a multi-host URL.
    pub(crate) fn host_choice(&self) -> Option<Arc<HostChoice>> {
        self.exec.host_choice().cloned()
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        self.exec.pool()
    }

    /// Creates the table if it does not exist.
    ///
    /// A table that already has the state-store layout is left alone and no
    /// DDL is sent, so a role with only `SELECT, INSERT, UPDATE, DELETE` may
    /// call this. If the table is missing and the role may not create it, the
    /// error says so and gives the `CREATE TABLE` statement to run out of band.
    /// A relation of that name with another layout is an error naming the
    /// difference.
    pub async fn ensure_table(&self) -> Result<(), FaucetError> {
        Ok(schema::ensure(&self.exec, &self.table).await?)
    }

    /// Writes many entries in one statement, atomically: all or none.
    ///
    /// When a key appears more than once, its last entry wins. Every key and
    /// value is checked before anything is sent. An empty slice sends nothing.
    /// The whole batch travels in one message, which PostgreSQL caps at 1 GiB.
    ///
    /// ```no_run
    /// # async fn run(store: faucet_state_postgres::PostgresStateStore) -> Result<(), faucet_core::FaucetError> {
    /// use serde_json::json;
    /// store.put_many(&[("a", json!(1)), ("b", json!(2)), ("a", json!(3))]).await?;
    /// assert_eq!(store.get_many(&["a", "b", "c"]).await?, vec![Some(json!(3)), Some(json!(2)), None]);
    /// # Ok(()) }
    /// ```
    pub async fn put_many<K: AsRef<str>>(&self, entries: &[(K, Value)]) -> Result<(), FaucetError> {
        // A key given twice keeps its last entry; key order makes concurrent
        // batches lock rows in the same order, so they cannot deadlock. A
        // sorted vector rather than a map: one allocation, and a batch
        // already in key order (the usual one) sorts in one pass.
        let mut latest: Vec<(&str, String)> = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            let key = key.as_ref();
            validate_state_key(key)?;
            latest.push((key, codec::encode(key, value, self.max_value_bytes)?));
        }
        // Stable: the entries of one key stay in call order, and the
        // retained (first) one of each run takes the run's last value.
        latest.sort_by(|a, b| a.0.cmp(b.0));
        latest.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(&mut later.1, &mut kept.1);
            }
            same
        });
        let (keys, texts): (Vec<&str>, Vec<String>) = latest.into_iter().unzip();
        Ok(self.apply(&keys, &texts, &[]).await?)
    }

    /// Writes every entry in one statement, all or nothing: nothing is sent
    /// unless every key and value is valid, and the statement commits every
    /// row or none. A key given twice keeps its last value. This is
    /// faucet-core 1.16's `put_batch`, usable with faucet-core 1.0 too.
    ///
    /// ```no_run
    /// # async fn run(store: faucet_state_postgres::PostgresStateStore) -> Result<(), faucet_core::FaucetError> {
    /// use serde_json::json;
    /// let entries = vec![("a".to_owned(), json!(1)), ("b".to_owned(), json!(2))];
    /// store.put_batch(&entries).await?;
    /// // One bad key: nothing is written.
    /// let bad = vec![("c".to_owned(), json!(3)), ("no spaces".to_owned(), json!(4))];
    /// assert!(store.put_batch(&bad).await.is_err());
    /// # Ok(()) }
    /// ```
    pub async fn put_batch(&self, entries: &[(String, Value)]) -> Result<(), FaucetError> {
        self.put_many(entries).await
    }

    /// Writes `value` under `key` only while the stored value still equals
    /// `expected` (`None`: the key has no row), and says whether it wrote.
    ///
    /// One statement, atomic against every other writer of the table, other
    /// processes included: of many callers racing from the same `expected`,
    /// exactly one gets `true`. Values are compared as JSONB, so the order
    /// of an object's keys and the spelling of a number (`1`, `1.0`) do not
    /// matter. This is faucet-core 1.16's `compare_and_put`, usable with
    /// faucet-core 1.0 too.
    ///
    /// Unlike other operations it is not sent again after a lost
    /// connection (a second send could see this call's own write and answer
    /// `false`): the error then says the outcome is unknown; read the key
    /// to find out. The same holds when the future is dropped once the
    /// statement was sent: it may or may not have been applied, and the
    /// connection is closed rather than reused.
    ///
    /// ```no_run
    /// # async fn run(store: faucet_state_postgres::PostgresStateStore) -> Result<(), faucet_core::FaucetError> {
    /// use serde_json::json;
    /// assert!(store.compare_and_put("lease", None, &json!({"owner": "a"})).await?);
    /// assert!(!store.compare_and_put("lease", None, &json!({"owner": "b"})).await?);
    /// let current = json!({"owner": "a"});
    /// assert!(store.compare_and_put("lease", Some(&current), &json!({"owner": "b"})).await?);
    /// # Ok(()) }
    /// ```
    pub async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: &Value,
    ) -> Result<bool, FaucetError> {
        validate_state_key(key)?;
        let text = codec::encode(key, value, self.max_value_bytes)?;
        Ok(self.compare_and_put_text(key, expected, &text).await?)
    }

    /// [`compare_and_put`](Self::compare_and_put) of a value already encoded
    /// for storage (the cached store encodes once, at the call). Only
    /// [`StoreError::OutcomeUnknown`] leaves the outcome open; after any other
    /// error nothing was written.
    pub(crate) async fn compare_and_put_text(
        &self,
        key: &str,
        expected: Option<&Value>,
        text: &str,
    ) -> Result<bool, StoreError> {
        // Encoded as a stored value would be (the envelope included), so
        // that it compares equal to the row a put of it wrote.
        let expected_stored = expected
            .map(|expected| codec::encode(key, expected, usize::MAX))
            .transpose()?;
        if let (Some(value), Some(stored)) = (expected, expected_stored.as_deref())
            && codec::is_envelope(stored)
        {
            return self.compare_enveloped_and_put(key, value, text).await;
        }
        let exec = &self.exec;
        let sent = match (self.prepared_writes(), expected_stored.as_deref()) {
            (None, expected) => {
                let sql = self.sql.compare_and_put(key, expected, text);
                exec.fetch_once(sqlx::raw_sql(&sql)).await
            }
            (Some(prepared), None) => {
                let query = sqlx::query(&prepared.insert_if_absent).bind(key).bind(text);
                exec.fetch_once(query).await
            }
            (Some(prepared), Some(expected)) => {
                let query = sqlx::query(&prepared.update_if_equal)
                    .bind(key)
                    .bind(expected)
                    .bind(text);
                exec.fetch_once(query).await
            }
        };
        self.compare_and_put_answer(key, sent)
    }

    /// `compare_and_put` of an `expected` value stored in an envelope. Its
    /// JSON text cannot be compared as JSONB on the server (it holds
    /// `\u0000`, which JSONB refuses), and its text differs between writers
    /// that order object members differently (1.5.1 built with serde_json's
    /// `preserve_order`, say). So the row is read and compared as a value
    /// here, and the update is conditional on the row still holding exactly
    /// the stored value that was read: atomic against every other writer,
    /// like the one-statement form.
    async fn compare_enveloped_and_put(
        &self,
        key: &str,
        expected: &Value,
        text: &str,
    ) -> Result<bool, StoreError> {
        let Some(current) = self.get_text(key).await? else {
            return Ok(false);
        };
        if codec::decode_text(key, self.table(), &current)? != *expected {
            return Ok(false);
        }
        let sql = self.sql.compare_and_put(key, Some(&current), text);
        let sent = self.exec.fetch_once(sqlx::raw_sql(&sql)).await;
        self.compare_and_put_answer(key, sent)
    }

    fn compare_and_put_answer(
        &self,
        key: &str,
        sent: Result<Vec<PgRow>, sqlx::Error>,
    ) -> Result<bool, StoreError> {
        match sent {
            Ok(rows) => Ok(!rows.is_empty()),
            Err(e) if outcome_unknown(&e) => Err(StoreError::OutcomeUnknown {
                op: "compare_and_put",
                key: key.to_owned(),
                table: self.table().to_owned(),
                reason: describe_sqlx(&e),
            }),
            Err(e) => Err(self.query_error("compare_and_put", &e)),
        }
    }

    /// Deletes many keys in one statement, atomically. Missing keys are not an
    /// error; an empty slice sends nothing.
    pub async fn delete_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<(), FaucetError> {
        let keys = validated_keys(keys)?;
        Ok(self.apply::<&str>(&[], &[], &keys).await?)
    }

    /// Reads many keys in one statement. The result is aligned with `keys`:
    /// `None` where a key has no row.
    pub async fn get_many<K: AsRef<str>>(
        &self,
        keys: &[K],
    ) -> Result<Vec<Option<Value>>, FaucetError> {
        let keys = validated_keys(keys)?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.run("get_many", &self.sql.get_many(&keys)).await?;
        let mut found: HashMap<String, Value> = HashMap::with_capacity(rows.len());
        for row in rows {
            let (key, Json(stored)): (String, Json<Value>) = (
                decode(&row, 0, self.table())?,
                decode(&row, 1, self.table())?,
            );
            let value = codec::decode(&key, self.table(), stored)?;
            found.insert(key, value);
        }
        Ok(keys.iter().map(|k| found.get(*k).cloned()).collect())
    }

    /// Lists the keys that start with `prefix`, in byte order.
    ///
    /// The prefix is matched literally (no `LIKE` wildcards) and may only hold
    /// characters a key may hold; the empty prefix lists every key.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, FaucetError> {
        validate_prefix(prefix)?;
        let rows = self.run("list", &self.sql.list(prefix)).await?;
        Ok(rows
            .iter()
            .map(|row| decode(row, 0, self.table()))
            .collect::<Result<_, _>>()?)
    }

    /// Upserts `upsert_keys` (with the encoded `upsert_texts`, pairwise) and
    /// deletes `delete_keys` in one statement, the cheapest that does the job.
    /// Keys must be distinct across both lists. Empty lists send nothing.
    pub(crate) async fn apply<S: AsRef<str>>(
        &self,
        upsert_keys: &[&str],
        upsert_texts: &[S],
        delete_keys: &[&str],
    ) -> Result<(), StoreError> {
        let op = match (upsert_keys.len(), delete_keys.len()) {
            (0, 0) => return Ok(()),
            (1, 0) => "put",
            (0, 1) => "delete",
            (_, 0) => "put_many",
            (0, _) => "delete_many",
            _ => "write_batch",
        };
        let Some(prepared) = self.prepared_writes() else {
            let Some(sql) = self.sql.write(upsert_keys, upsert_texts, delete_keys) else {
                return Ok(());
            };
            return self.run(op, &sql).await.map(drop);
        };
        let texts: Vec<&str> = upsert_texts.iter().map(AsRef::as_ref).collect();
        let exec = &self.exec;
        let sent = match (upsert_keys, texts.as_slice(), delete_keys) {
            ([key], [text], []) => {
                exec.fetch_with(|| sqlx::query(&prepared.put).bind(*key).bind(*text))
                    .await
            }
            ([], _, [key]) => {
                exec.fetch_with(|| sqlx::query(&prepared.delete).bind(*key))
                    .await
            }
            ([], _, deletes) => {
                exec.fetch_with(|| sqlx::query(&prepared.delete_many).bind(deletes.to_vec()))
                    .await
            }
            (keys, texts, []) => {
                exec.fetch_with(|| {
                    sqlx::query(&prepared.upsert_many)
                        .bind(keys.to_vec())
                        .bind(texts.to_vec())
                })
                .await
            }
            (keys, texts, deletes) => {
                exec.fetch_with(|| {
                    sqlx::query(&prepared.write)
                        .bind(keys.to_vec())
                        .bind(texts.to_vec())
                        .bind(deletes.to_vec())
                })
                .await
            }
        };
        sent.map(drop).map_err(|e| self.query_error(op, &e))
    }

    /// The stored JSON text of `key`'s value, as the server prints it.
    pub(crate) async fn get_text(&self, key: &str) -> Result<Option<String>, StoreError> {
        let rows = match &self.prepared {
            Some(prepared) => self
                .exec
                .fetch_with(|| sqlx::query(&prepared.get).bind(key))
                .await
                .map_err(|e| self.query_error("get", &e))?,
            None => self.run("get", &self.sql.get(key)).await?,
        };
        rows.first()
            .map(|row| decode::<String>(row, 0, self.table()))
            .transpose()
    }

    /// The prepared statements writes may use: none for a fenced store,
    /// whose writes carry their guard in the same simple-protocol message.
    fn prepared_writes(&self) -> Option<&Prepared> {
        self.prepared.as_ref().filter(|_| self.fence.is_none())
    }

    fn query_error(&self, op: &'static str, e: &sqlx::Error) -> StoreError {
        if let (Some(fence), Some(FENCED_SQLSTATE)) = (&self.fence, sqlstate(e).as_deref()) {
            return StoreError::Fenced {
                op,
                table: self.table().to_owned(),
                scope: fence.scope.clone(),
                epoch: fence.epoch,
                reason: describe_sqlx(e),
            };
        }
        let mut reason = describe_sqlx(e);
        if let Some(choice) = self.exec.host_choice() {
            // Which of the URL's hosts the statement went to.
            reason = format!("{reason} (host {})", choice.current_host());
        }
        StoreError::Query {
            op,
            table: self.table().to_owned(),
            reason,
            refused: refuses_rows(e),
        }
    }

    /// Sends one message (see `exec.rs`: a deadline, retries on a lost
    /// connection) and describes a failure for the user.
    async fn run(&self, op: &'static str, sql: &str) -> Result<Vec<PgRow>, StoreError> {
        self.exec
            .fetch(sql)
            .await
            .map_err(|e| self.query_error(op, &e))
    }
}

/// Column `index` of `row`, or an error naming the table.
fn decode<'r, T>(row: &'r PgRow, index: usize, table: &str) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index).map_err(|e| StoreError::Query {
        op: "decode",
        table: table.to_owned(),
        reason: describe_sqlx(&e),
        refused: false,
    })
}

fn validated_keys<K: AsRef<str>>(keys: &[K]) -> Result<Vec<&str>, FaucetError> {
    keys.iter()
        .map(|k| {
            let k = k.as_ref();
            validate_state_key(k).map(|()| k)
        })
        .collect()
}

#[deny(clippy::missing_trait_methods)]
#[async_trait]
impl StateStore for PostgresStateStore {
    async fn get(&self, key: &str) -> Result<Option<Value>, FaucetError> {
        validate_state_key(key)?;
        match self.get_text(key).await? {
            Some(stored) => Ok(Some(codec::decode_text(key, self.table(), &stored)?)),
            None => Ok(None),
        }
    }

    async fn put(&self, key: &str, value: &Value) -> Result<(), FaucetError> {
        validate_state_key(key)?;
        let text = codec::encode(key, value, self.max_value_bytes)?;
        Ok(self.apply(&[key], &[text], &[]).await?)
    }

    async fn delete(&self, key: &str) -> Result<(), FaucetError> {
        validate_state_key(key)?;
        Ok(self.apply::<&str>(&[], &[], &[key]).await?)
    }

    /// Three probes, each bounded by `ctx.timeout`: `connect` (reach the
    /// server, authenticate), `table` (present, with the right layout) and
    /// `sentinel` (write, read back and delete
    /// [`DOCTOR_SENTINEL_KEY`](faucet_core::state::DOCTOR_SENTINEL_KEY) inside
    /// a transaction that is rolled back, so no row is left behind even if
    /// the probe is interrupted). A failing probe carries a hint.
    ///
    /// A fenced store (see [`fence`](PostgresStateStore::fence)) adds a
    /// `fence` probe, which fails once a newer instance claimed the scope,
    /// naming its epoch.
    async fn check(&self, ctx: &CheckContext) -> Result<CheckReport, FaucetError> {
        let mut report = probe::run(&self.exec, &self.table, &self.sql, ctx).await;
        if let Some(fence) = &self.fence {
            let started = std::time::Instant::now();
            let newest = tokio::time::timeout(ctx.timeout, self.newest_fence_epoch()).await;
            report.probes.push(match newest {
                Ok(Ok(Some(newest))) if newest == fence.epoch => {
                    Probe::pass("fence", started.elapsed())
                }
                Ok(Ok(newest)) => Probe::fail_hint(
                    "fence",
                    started.elapsed(),
                    format!(
                        "scope '{}' was fenced by a newer instance (epoch {}); this store holds epoch {}",
                        fence.scope,
                        newest.map_or_else(|| "unknown: the fence row was deleted".to_owned(), |e| e.to_string()),
                        fence.epoch
                    ),
                    "another instance owns the scope now: stop this one",
                ),
                Ok(Err(error)) => Probe::fail_hint(
                    "fence",
                    started.elapsed(),
                    error.to_string(),
                    "check the database",
                ),
                Err(_) => Probe::fail_hint(
                    "fence",
                    started.elapsed(),
                    format!("no answer within {:?}", ctx.timeout),
                    "check the database's health and latency",
                ),
            });
        }
        Ok(report)
    }

    #[cfg(feature = "faucet-core-1-16")]
    fn supports_list(&self) -> bool {
        true
    }

    /// [`PostgresStateStore::list`].
    #[cfg(feature = "faucet-core-1-16")]
    async fn list(&self, prefix: &str) -> Result<Vec<String>, FaucetError> {
        PostgresStateStore::list(self, prefix).await
    }

    #[cfg(feature = "faucet-core-1-16")]
    fn supports_compare_and_put(&self) -> bool {
        true
    }

    /// [`PostgresStateStore::compare_and_put`]: one conditional statement.
    #[cfg(feature = "faucet-core-1-16")]
    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        value: &Value,
    ) -> Result<bool, FaucetError> {
        PostgresStateStore::compare_and_put(self, key, expected, value).await
    }

    #[cfg(feature = "faucet-core-1-16")]
    fn supports_atomic_batch(&self) -> bool {
        true
    }

    /// [`PostgresStateStore::put_batch`]: one statement, all or nothing.
    #[cfg(feature = "faucet-core-1-16")]
    async fn put_batch(&self, entries: &[(String, Value)]) -> Result<(), FaucetError> {
        PostgresStateStore::put_batch(self, entries).await
    }
}

impl fmt::Debug for PostgresStateStore {
    /// Shows the table and pool size; never connection options, which may
    /// hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStateStore")
            .field("table", &self.table.as_str())
            .field(
                "max_connections",
                &self.pool().options().get_max_connections(),
            )
            .field("open_connections", &self.pool().size())
            .field("statement_timeout", &self.statement_timeout())
            .field("prepared_statements", &self.prepared_statements())
            .field("max_value_bytes", &self.max_value_bytes)
            .finish()
    }
}
