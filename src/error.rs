//! Errors that say what failed and what to do about it.
//!
//! Every public method returns [`FaucetError`], the error type of the
//! [`StateStore`](faucet_core::state::StateStore) trait, so the store drops into
//! a pipeline unchanged. Inside the crate the failures are first described by
//! [`StoreError`], which renders one sentence per failure: the operation, the
//! table or key it concerned, the cause, and the fix. Configuration mistakes
//! become [`FaucetError::Config`]; everything else becomes
//! [`FaucetError::State`]. No message ever carries a password: connection
//! targets are rendered through [`redact_url`](crate::connect::redact_url).

use faucet_core::FaucetError;

/// A failure inside the store, before it is handed out as a [`FaucetError`].
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    #[error(
        "invalid table name {name:?}: {reason}; a table name is 1 to 63 ASCII letters, digits or '_'"
    )]
    InvalidTable { name: String, reason: &'static str },

    #[error("max_connections must be at least 1, got 0")]
    ZeroConnections,

    #[error("invalid cache option: {0}")]
    InvalidOption(&'static str),

    #[error("invalid key prefix {prefix:?}: {reason}")]
    InvalidPrefix { prefix: String, reason: String },

    #[error(
        "value for key '{key}' is {size} bytes of JSON, over the limit of {limit} bytes; \
         store a smaller bookmark or raise the limit with with_max_value_bytes()"
    )]
    ValueTooLarge {
        key: String,
        size: usize,
        limit: usize,
    },

    #[error(
        "value for key '{key}' nests {depth} levels deep, over the limit of {limit}; \
         serde_json cannot read deeper values back, so flatten the bookmark"
    )]
    ValueTooDeep {
        key: String,
        depth: usize,
        limit: usize,
    },

    #[error("could not serialize the value for key '{key}': {source}")]
    Serialize {
        key: String,
        source: serde_json::Error,
    },

    #[error(
        "the row for key '{key}' in table \"{table}\" holds an unreadable encoded value: {reason}"
    )]
    Corrupt {
        key: String,
        table: String,
        reason: String,
    },

    #[error("could not connect to PostgreSQL at {target}: {reason}")]
    Connect { target: String, reason: String },

    #[error("{op} on table \"{table}\" failed: {reason}")]
    Query {
        op: &'static str,
        table: String,
        reason: String,
        /// The server refused the statement because of the rows it carries
        /// (see [`refuses_rows`]).
        refused: bool,
    },

    #[error(
        "{op} on table \"{table}\" was refused: this store (fence scope '{scope}', epoch {epoch}) \
         was {reason}; nothing was written, and no write of this store will land again: \
         another instance of the pipeline now owns the scope, so stop this one"
    )]
    Fenced {
        op: &'static str,
        table: String,
        scope: String,
        epoch: i64,
        /// The server's message, which names the newer epoch.
        reason: String,
    },

    #[error(
        "{op} of key '{key}' in table \"{table}\": {reason}; it may or may not have been \
         applied: read the key to find out before trying again"
    )]
    OutcomeUnknown {
        op: &'static str,
        key: String,
        table: String,
        reason: String,
    },

    #[error(
        "table \"{table}\" exists but does not have the state-store layout: {problem}; \
         expected (key TEXT PRIMARY KEY, value JSONB NOT NULL, updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW())"
    )]
    Layout { table: String, problem: String },
}

impl StoreError {
    /// Whether the statement failed because of the rows it carried, so that
    /// the same rows will fail again and other rows may not.
    pub(crate) fn refuses_rows(&self) -> bool {
        matches!(self, StoreError::Query { refused: true, .. })
    }

    /// Whether a newer instance claimed this store's fence scope.
    pub(crate) fn is_fenced(&self) -> bool {
        matches!(self, StoreError::Fenced { .. })
    }

    /// Whether a statement sent once may or may not have been applied (the
    /// connection was lost before its answer).
    pub(crate) fn outcome_unknown(&self) -> bool {
        matches!(self, StoreError::OutcomeUnknown { .. })
    }
}

impl From<StoreError> for FaucetError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::InvalidTable { .. }
            | StoreError::ZeroConnections
            | StoreError::InvalidOption(_) => FaucetError::Config(err.to_string()),
            other => FaucetError::State(other.to_string()),
        }
    }
}

/// What a failed sqlx call means to the user: the cause followed by the fix,
/// where one is known. The text never includes connection options.
pub(crate) fn describe_sqlx(err: &sqlx::Error) -> String {
    match hint_for(err) {
        Some(hint) => format!("{}; {hint}", cause_of(err)),
        None => cause_of(err),
    }
}

/// The cause of a failed sqlx call, in one clause.
pub(crate) fn cause_of(err: &sqlx::Error) -> String {
    use sqlx::Error as E;
    match err {
        E::Database(db) => format!(
            "{} (SQLSTATE {})",
            db.message(),
            db.code().unwrap_or_default()
        ),
        E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused: nothing is listening there".to_owned()
        }
        E::Io(io) => format!("network error: {io}"),
        E::Tls(tls) => format!("TLS error: {tls}"),
        E::PoolTimedOut => "timed out waiting for a connection from the pool".to_owned(),
        E::PoolClosed => "the connection pool was closed".to_owned(),
        E::Configuration(cfg) => format!("invalid connection options: {cfg}"),
        E::Protocol(msg) => format!("protocol error: {msg}"),
        E::ColumnDecode { source, .. } => format!("could not decode a column: {source}"),
        other => other.to_string(),
    }
}

/// What to do about a failed sqlx call, when the failure says.
pub(crate) fn hint_for(err: &sqlx::Error) -> Option<&'static str> {
    use sqlx::Error as E;
    let hint = match err {
        E::Database(_) => match sqlstate(err).as_deref()? {
            "28P01" | "28000" => "check the user name and password in the connection URL",
            "3D000" => "create the database or fix the database name in the connection URL",
            "42P01" => "call ensure_table() or create the table out of band",
            "42501" => {
                "grant the role SELECT, INSERT, UPDATE and DELETE on the table \
                 (and CREATE on the schema if it must create the table)"
            }
            "25006" => {
                "the server is read-only (a standby, or default_transaction_read_only is on): \
                 point the store at a writable primary"
            }
            "42P10" | "42703" | "42804" => {
                "the table does not have the state-store layout: let ensure_table() create it or migrate it"
            }
            "53300" => {
                "the server has no free connection slots: lower max_connections or raise the server's"
            }
            "54001" => "the value is too deeply nested for the server",
            "57P01" | "57P02" | "57P03" => {
                "the server is shutting down or starting up: retry shortly"
            }
            _ => return None,
        },
        E::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "start the server or fix the host and port in the connection URL"
        }
        E::Tls(_) => "check sslmode and the server's certificate",
        E::PoolTimedOut => {
            "the server may be down or unreachable, or every pooled connection is busy: \
             check the server, or raise max_connections"
        }
        _ => return None,
    };
    Some(hint)
}

/// Errors after which the same statement on a fresh connection may succeed:
/// the connection broke, or the server restarted under it.
///
/// Every statement this crate sends is idempotent (an upsert of a given value,
/// a delete, a read), so one retry on such an error cannot change the outcome.
pub(crate) fn is_connection_lost(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c == "57P01" || c == "57P02"),
        _ => false,
    }
}

/// Errors that depend on the rows a statement carries: the server refused a
/// value (class 22, data exception: a character the database encoding cannot
/// hold, a number out of range), a constraint refused a row (class 23), a
/// trigger raised an error (class P0), a limit was exceeded (class 54), or
/// the statement ran past `statement_timeout` (57014), which a smaller batch
/// may not. The same rows fail the same way again; other rows may succeed.
///
/// Everything else (a lost connection, a deadlock, a missing table, a
/// read-only server, a missing privilege) does not depend on which rows were
/// sent, so splitting the batch would not help.
pub(crate) fn refuses_rows(err: &sqlx::Error) -> bool {
    sqlstate(err).is_some_and(|code| {
        code == "57014"
            || code.starts_with("22")
            || code.starts_with("23")
            || code.starts_with("54")
            || code.starts_with("P0")
    })
}

/// SQLSTATE of a database error, when the error came from the server.
pub(crate) fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}
