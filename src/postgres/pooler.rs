//! Whether the store's connections reach a server session of their own or a
//! pooler that shares server sessions between clients, found out once, when
//! the store connects.
//!
//! It decides the form of every statement (see `sql.rs`): prepared
//! statements, parsed and planned once per connection, are only safe where
//! the session is the client's own. Behind a transaction pooler a named
//! statement meets server sessions that never saw it, or worse, one where
//! another client prepared a different statement under the same name; and a
//! session `SET statement_timeout` would leak to whoever gets that session
//! next. So a connection counts as direct only on positive proof.
//!
//! The proof: the first connection is opened with a startup parameter,
//! `options=-c faucet_state.session_probe=<nonce>`, a placeholder setting no
//! server or extension uses, with a value fresh for each store. A PostgreSQL
//! session (directly, or through a proxy that keeps one server session per
//! client: HAProxy, pg_auto_failover's or Patroni's endpoints, a pooler in
//! session mode that forwards the startup packet) applies it, and
//! `current_setting` reads the nonce back. PgBouncer refuses the parameter by
//! default ("unsupported startup parameter: options", or since 1.20
//! "unsupported options startup parameter" for a setting it does not
//! track), in which case the store connects again without it; with
//! `ignore_startup_parameters = options` it drops it, and the setting reads
//! back empty. Either way the store keeps the pooler-safe per-message form.
//! What the proof cannot see: a pooler that forwards one client's startup
//! options into a server session it then shares, or a URL whose endpoint
//! turns from a server into a transaction pooler while the store runs; for
//! those, pin the form with
//! [`with_prepared_statements(false)`](crate::PostgresStateStore::with_prepared_statements).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{Connection, Row};

/// The placeholder setting the probe sets at startup and reads back.
const PROBE_SETTING: &str = "faucet_state.session_probe";

/// What the first connection found at the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// A server session of this connection's own: it applied the startup
    /// setting.
    Direct,
    /// A pooler, or anything that did not prove to be a session of its own.
    Shared,
}

/// Opens a connection with `options` and finds out what it reached. The
/// connection is returned either way, for the caller's other first-connection
/// questions. Errors are the connect's without the probe: an endpoint that
/// refuses the probe's parameter is connected to again without it, and what
/// that says is what the caller reports. A failure to reach the endpoint at
/// all (an I/O error, not a refusal) is not tried a second time.
pub(crate) async fn connect_and_probe(
    options: &PgConnectOptions,
) -> Result<(PgConnection, Endpoint), sqlx::Error> {
    let nonce = nonce();
    let probing = options.clone().options([(PROBE_SETTING, &nonce)]);
    let mut conn = match PgConnection::connect_with(&probing).await {
        Ok(conn) => conn,
        // The endpoint answered and refused: a pooler refusing the
        // parameter, or a refusal (a password, say) that the plain connect
        // gets again and reports.
        Err(sqlx::Error::Database(refusal)) => {
            tracing::debug!(%refusal, "the probe's startup parameter was refused; connecting without it");
            let conn = PgConnection::connect_with(options).await?;
            return Ok((conn, Endpoint::Shared));
        }
        Err(other) => return Err(other),
    };
    // A simple-protocol message: through a transaction pooler, sqlx's
    // prepared form would span two transactions.
    let sql = format!("SELECT current_setting('{PROBE_SETTING}', true)");
    let read: Option<String> = match sqlx::Executor::fetch_one(&mut conn, sqlx::raw_sql(&sql)).await
    {
        Ok(row) => row.try_get(0)?,
        // Something that speaks the protocol but not this function: no
        // proof of a session of its own. The connection is still usable
        // (the message's implicit transaction ended with its error).
        Err(sqlx::Error::Database(refusal)) => {
            tracing::debug!(%refusal, "the probe's setting could not be read back");
            None
        }
        Err(other) => return Err(other),
    };
    let endpoint = if read.as_deref() == Some(nonce.as_str()) {
        Endpoint::Direct
    } else {
        Endpoint::Shared
    };
    tracing::debug!(?endpoint, "found out what the connection reached");
    Ok((conn, endpoint))
}

/// A value no other store's probe uses: 64 random bits from the standard
/// library's per-process seeded hasher, mixed with the time.
fn nonce() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("{:016x}", RandomState::new().hash_one(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_differ_and_are_plain_words() {
        let (a, b) = (nonce(), nonce());
        assert_ne!(a, b);
        assert!(
            a.len() == 16 && a.bytes().all(|b| b.is_ascii_hexdigit()),
            "{a}"
        );
    }
}
