//! Sending one message (see `sql.rs`) with a deadline, on a connection that
//! is closed rather than reused when its answer did not come.
//!
//! - **Deadline.** The server ends a statement after `statement_timeout`
//!   (each message sets it with `SET LOCAL`; the session has it in the
//!   prepared form, see `session.rs`). The client waits that long
//!   plus [`CLIENT_GRACE`] for the answer, so a connection that stalls (a
//!   half-open TCP connection after a partition, a proxy that stops
//!   forwarding) cannot hold a caller forever either.
//! - **No reuse of a connection in an unknown state.** A connection whose
//!   answer did not arrive (the deadline passed, or the caller dropped the
//!   future) is closed, not returned to the pool, where sqlx would otherwise
//!   ping it and wait on it in the background.
//! - **Lost connections.** A network blip or a server restart kills every
//!   idle pooled connection at once, and each is found dead only when used,
//!   failing fast. So a message that meets a lost connection is sent again on
//!   another one, up to `max_connections + 1` times in all. Every message the
//!   stores send is idempotent (an upsert of given values, a delete, a read),
//!   so sending it again cannot change the outcome. A deadline that passed is
//!   not retried: the caller decides. Nor is a connection that could not be
//!   opened: the server (or a proxy in front of a dead one, which accepts
//!   and closes) is unreachable, and opening one connection after another
//!   would only churn; the caller, or the flusher with its backoff, tries
//!   again later. (sqlx's pool itself retries a refused connect, with
//!   backoff, within its acquire timeout.)
//! - **Another host.** With a URL whose host is chosen (`host_choice.rs`), a
//!   message that meets a lost connection, a read-only session (25006), a
//!   server shutting down or not yet accepting connections (57P01, 57P02,
//!   57P03), or no new connection within 1 s (a host that changed role: the
//!   pool keeps retrying a connect it refuses), first has the host chosen
//!   again (paced), then is sent again, within the same number of attempts.
//!   The connection that answered read-only is closed, not returned to the
//!   pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgRow, Postgres};
use sqlx::{Execute, PgPool};

use crate::error::{is_connection_lost, sqlstate};
use crate::host_choice::HostChoice;
use crate::reserve::Reserve;

/// How much longer than `statement_timeout` the client waits for an answer
/// before it gives the connection up: the server's own timeout normally
/// answers first, with a clearer error.
pub(crate) const CLIENT_GRACE: Duration = Duration::from_secs(1);

/// How long a statement of a store whose host is chosen waits for the pool
/// to open a connection before choosing again: a loopback connect takes
/// milliseconds, one across a region with TLS a few hundred.
const CONNECT_PATIENCE: Duration = Duration::from_secs(1);

/// Default of [`PostgresStateStore::with_statement_timeout`](crate::PostgresStateStore::with_statement_timeout).
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A pool and the deadline of every message sent through it.
#[derive(Debug, Clone)]
pub(crate) struct Executor {
    pool: PgPool,
    statement_timeout: Duration,
    reserve: Reserve,
    /// For a URL whose host is chosen: where connections go, and how to
    /// choose again.
    choice: Option<Arc<HostChoice>>,
}

impl Executor {
    pub(crate) fn new(pool: PgPool, statement_timeout: Duration) -> Self {
        Self {
            reserve: Reserve::new(pool.options().get_max_connections()),
            pool,
            statement_timeout,
            choice: None,
        }
    }

    /// The same pool and host choice with another deadline (and a reserve of
    /// its own).
    pub(crate) fn with_statement_timeout(&self, statement_timeout: Duration) -> Self {
        Self::new(self.pool.clone(), statement_timeout).with_host_choice(self.choice.clone())
    }

    /// Chooses the host again when a message meets the wrong one.
    pub(crate) fn with_host_choice(mut self, choice: Option<Arc<HostChoice>>) -> Self {
        self.choice = choice;
        self
    }

    pub(crate) fn host_choice(&self) -> Option<&Arc<HostChoice>> {
        self.choice.as_ref()
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    /// Gives every kept connection back to the pool.
    pub(crate) fn release_kept(&self) {
        self.reserve.release_all();
    }

    /// Sends `sql` (one simple-protocol message) and returns the rows of its
    /// statements, retrying on lost connections (see the module docs).
    pub(crate) async fn fetch(&self, sql: &str) -> Result<Vec<PgRow>, sqlx::Error> {
        self.fetch_with(|| sqlx::raw_sql(sql)).await
    }

    /// Runs the query `build` makes (a prepared statement and its
    /// arguments, or a raw message) and returns its rows, retrying on lost
    /// connections with a fresh query each time.
    pub(crate) async fn fetch_with<'q, E>(
        &self,
        build: impl Fn() -> E + Send + Sync,
    ) -> Result<Vec<PgRow>, sqlx::Error>
    where
        E: Execute<'q, Postgres> + Send + 'q,
    {
        let attempts = self.pool.options().get_max_connections() + 1;
        let mut result = self.attempt(build()).await;
        for retry in 1..attempts {
            let Err(failed) = &result else { break };
            let error = &failed.error;
            match &self.choice {
                Some(choice) if meets_the_wrong_host(error) => {
                    tracing::debug!(retry, %error, "choosing the host again, then sending again");
                    choice.look_again(&self.pool).await;
                }
                // No connection could even be opened: the server, or a proxy
                // in front of it that accepts and closes, is unreachable now.
                // Opening more at once would only churn connections; the
                // caller (the flusher, with its backoff) tries again later.
                _ if failed.connecting => break,
                _ if is_connection_lost(error) && !is_deadline(error) => {
                    tracing::debug!(retry, %error, "connection lost; sending again on another");
                }
                _ => break,
            }
            result = self.attempt(build()).await;
        }
        result.map_err(|failed| failed.error)
    }

    /// Runs `query` once, never again on a lost connection: for a statement
    /// whose answer depends on whether an earlier send of it committed (a
    /// compare-and-put would report its own write as a conflict). The error
    /// then says the outcome is unknown (see [`outcome_unknown`]).
    pub(crate) async fn fetch_once<'q, E>(&self, query: E) -> Result<Vec<PgRow>, sqlx::Error>
    where
        E: Execute<'q, Postgres> + Send + 'q,
    {
        self.attempt(query).await.map_err(|failed| failed.error)
    }

    async fn attempt<'q, E>(&self, query: E) -> Result<Vec<PgRow>, Failed>
    where
        E: Execute<'q, Postgres> + Send + 'q,
    {
        let deadline = tokio::time::Instant::now() + self.client_deadline();
        let conn = match self.reserve.take() {
            Some(conn) => conn,
            None => match self.reserve.wait_for_pool() {
                (_, Some(conn)) => conn,
                (_waiting, None) => self.acquire(deadline).await.map_err(|error| Failed {
                    error,
                    connecting: true,
                })?,
            },
        };
        let mut conn = CloseUnlessAnswered {
            conn: Some(conn),
            answered: false,
        };
        let answer = tokio::time::timeout_at(deadline, fetch_on(conn.get(), query))
            .await
            .map_err(|_| Failed {
                error: self.deadline_error(
                    "the server did not answer; the connection was closed \
                     (the server may be stalled or unreachable)",
                ),
                connecting: false,
            })?;
        // An error is an answer too: the connection is in a known state (a
        // broken one fails sqlx's ping on release and is dropped). Only one
        // that answered without error is kept for the next operation.
        conn.answered = true;
        if let Err(e) = &answer
            && is_read_only(e)
            && let Some(conn) = conn.conn.as_mut()
        {
            // The server was demoted (or is a standby): the session will
            // not change, so it must not serve the next statement.
            conn.close_on_drop();
        }
        if answer.is_ok()
            && let Some(conn) = conn.conn.take()
        {
            self.reserve.keep(conn);
        }
        answer.map_err(|error| Failed {
            error,
            connecting: false,
        })
    }

    /// A connection from the pool by `deadline`. With a chosen host, a pool
    /// that has to open one gets [`CONNECT_PATIENCE`]: sqlx retries a refused
    /// connect until its acquire timeout, which would hold every statement
    /// on a primary that died until then; `PoolTimedOut` instead has the host
    /// chosen again.
    async fn acquire(
        &self,
        deadline: tokio::time::Instant,
    ) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let must_connect = self.pool.num_idle() == 0
            && self.pool.size() < self.pool.options().get_max_connections();
        let patience = match &self.choice {
            Some(_) if must_connect => {
                (tokio::time::Instant::now() + CONNECT_PATIENCE).min(deadline)
            }
            _ => deadline,
        };
        match tokio::time::timeout_at(patience, self.pool.acquire()).await {
            Ok(conn) => conn,
            Err(_) if patience < deadline => Err(sqlx::Error::PoolTimedOut),
            Err(_) => Err(self.deadline_error("no pooled connection came free")),
        }
    }

    fn client_deadline(&self) -> Duration {
        self.statement_timeout.saturating_add(CLIENT_GRACE)
    }

    fn deadline_error(&self, what_happened: &str) -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no answer within statement_timeout ({:?}) plus {:?}: {what_happened}",
                self.statement_timeout, CLIENT_GRACE
            ),
        ))
    }
}

/// How one attempt failed, and whether it failed opening a connection
/// (nothing was sent) rather than on one.
struct Failed {
    error: sqlx::Error,
    connecting: bool,
}

/// Runs `sql` on one connection. A plain function returning a boxed future:
/// called inside an `async fn`, sqlx's lifetime-generic executor impl for
/// `&mut PgConnection` keeps the compiler from proving the callers'
/// `async_trait` futures `Send`.
fn fetch_on<'c, 'q: 'c, E>(
    conn: &'c mut PgConnection,
    query: E,
) -> Pin<Box<dyn Future<Output = Result<Vec<PgRow>, sqlx::Error>> + Send + 'c>>
where
    E: Execute<'q, Postgres> + Send + 'q,
{
    sqlx::Executor::fetch_all(conn, query)
}

/// The statement may have committed without its answer arriving: the
/// connection was lost, or the client-side deadline passed.
pub(crate) fn outcome_unknown(err: &sqlx::Error) -> bool {
    is_connection_lost(err) || is_deadline(err)
}

/// An error that says this host does not take the store's writes now, which
/// another host of a chosen URL may: a lost connection (not a deadline; it
/// includes a server shutting down or crashing, 57P01 and 57P02), a
/// read-only session, a server still starting (57P03), or no new connection
/// within the patience (which is how a host that changed role shows: the
/// pool keeps retrying the connect it refuses).
fn meets_the_wrong_host(err: &sqlx::Error) -> bool {
    (is_connection_lost(err) && !is_deadline(err))
        || is_read_only(err)
        || sqlstate(err).as_deref() == Some("57P03")
        || matches!(err, sqlx::Error::PoolTimedOut)
}

/// 25006: read-only SQL transaction (a standby, or a demoted primary).
fn is_read_only(err: &sqlx::Error) -> bool {
    sqlstate(err).as_deref() == Some("25006")
}

/// The client-side deadline passed: not a lost connection to retry at once.
fn is_deadline(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

/// A pooled connection that is closed instead of returned to the pool when
/// dropped before its answer arrived.
struct CloseUnlessAnswered {
    /// `None` once handed to the reserve.
    conn: Option<PoolConnection<Postgres>>,
    answered: bool,
}

impl CloseUnlessAnswered {
    fn get(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("the connection is only taken after its answer")
    }
}

impl Drop for CloseUnlessAnswered {
    fn drop(&mut self) {
        if !self.answered
            && let Some(conn) = self.conn.as_mut()
        {
            conn.close_on_drop();
        }
    }
}
