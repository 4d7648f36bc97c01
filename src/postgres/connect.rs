//! Opening the connection pool, and keeping passwords out of every message.
//!
//! ## How dead connections are found
//!
//! sqlx's pool pings a connection each time one is acquired by default
//! (`test_before_acquire`). That ping is a full round trip before every
//! statement: on loopback about a third of the time of a put and half of a get.
//! The store turns it off and relies on two cheaper mechanisms instead:
//!
//! - sqlx already pings every connection when it goes *back* to the pool, off
//!   the caller's path, and drops it if the ping fails; so a connection that
//!   broke during a statement is never reused.
//! - A connection that died while idle (server restart, a proxy cutting it)
//!   fails its next statement with an I/O or connection-class error. The store
//!   then runs the statement again on another connection, up to
//!   `max_connections + 1` times, since a blip kills every idle connection at
//!   once. Every statement it sends is idempotent, so a retry cannot change
//!   the outcome.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};

use crate::error::{StoreError, describe_sqlx};
use crate::host_choice::HostChoice;
use crate::hosts::{HostList, SessionAttrs};
use crate::pooler::{self, Endpoint};
use crate::session::SessionSettings;
use crate::sql::client_check_session_sql;

/// How long a caller waits for a pool connection before giving up.
pub(crate) const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive on the server's end of each connection the store opens:
/// after 30 s of silence the server probes every 10 s and gives up after 3
/// unanswered probes, so a server backend whose client vanished in a
/// partition is ended (and whatever it held released) within about a
/// minute. The client's end is bounded by the statement deadline instead
/// (sqlx exposes no socket options). A socket setting, harmless where a
/// pooler such as PgBouncer hands the server connection to others.
const KEEPALIVE_SQL: &str =
    "SET tcp_keepalives_idle = 30; SET tcp_keepalives_interval = 10; SET tcp_keepalives_count = 3";

/// Pool settings shared by every constructor that opens its own pool. With a
/// `choice` whose URL asks for a kind of session, each new connection is
/// checked to be one (see `host_choice.rs`).
pub(crate) fn pool_options(
    max_connections: u32,
    session: Arc<SessionSettings>,
    choice: Option<Arc<HostChoice>>,
) -> PgPoolOptions {
    let on_acquire = session.clone();
    let verify = choice.filter(|choice| choice.attrs() != SessionAttrs::Any);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .test_before_acquire(false)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(move |conn, _meta| {
            let session = session.clone();
            let verify = verify.clone();
            Box::pin(async move {
                if let Some(choice) = verify {
                    choice.verify(conn).await?;
                }
                sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(KEEPALIVE_SQL)).await?;
                if let Some(sql) = session.on_connect_sql() {
                    sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(&sql)).await?;
                }
                Ok(())
            })
        })
        // Not a ping: no round trip. A connection opened before the mode or
        // the timeout changed is dropped and replaced (see `session.rs`).
        .before_acquire(move |_conn, meta| {
            let current = on_acquire.is_current(meta.age);
            Box::pin(async move { Ok(current) })
        })
}

/// A pool the store opened, and what its first connection found out.
pub(crate) struct Connected {
    pub pool: PgPool,
    /// For a URL that lists several hosts or asks for a kind of session:
    /// what keeps the pool pointed at the right host.
    pub choice: Option<Arc<HostChoice>>,
    /// Whether connections reach a server session of their own (see
    /// `pooler.rs`).
    pub endpoint: Endpoint,
}

/// Opens the store's pool for `url` (see [`Connected`]). The first
/// connection's answers (whether the server takes the client check, whether
/// it is a session of its own) are recorded in `session` before the pool
/// opens its connections, so that each is set up for the form chosen.
pub(crate) async fn connect_pool(
    url: &str,
    max_connections: u32,
    session: Arc<SessionSettings>,
) -> Result<Connected, StoreError> {
    let connect_error = |e: sqlx::Error| connect_failed(url, describe_sqlx(&e));
    let list = HostList::parse(url).map_err(|reason| connect_failed(url, reason))?;
    if list.needs_choosing() {
        return connect_choosing(url, list, max_connections, session).await;
    }
    // PgBouncer refuses startup parameters it does not track, and sqlx sends
    // extra_float_digits by default; the stores never read a float column.
    let options = crate::environment::connect_options(&list.url_for(0))
        .map_err(|reason| connect_failed(url, reason))?
        .extra_float_digits(None);
    // Bounded like the pool's own connects: an address that drops packets
    // would otherwise hold the caller for the system's TCP timeout.
    let (first, endpoint) = tokio::time::timeout(
        ACQUIRE_TIMEOUT,
        pooler::connect_and_probe(&options),
    )
    .await
    .map_err(|_| StoreError::Connect {
        target: redact_url(url),
        reason: format!(
            "no answer within {ACQUIRE_TIMEOUT:?}; check the host, the port and any firewall"
        ),
    })?
    .map_err(connect_error)?;
    learn_from_first(first, endpoint, &session).await;
    let pool = pool_options(max_connections, session, None)
        .connect_with(options)
        .await
        .map_err(connect_error)?;
    Ok(Connected {
        pool,
        choice: None,
        endpoint,
    })
}

/// `connect_pool` for a URL whose host must be chosen: the first host that
/// fits takes the first connection, and the pool connects there.
async fn connect_choosing(
    url: &str,
    list: HostList,
    max_connections: u32,
    session: Arc<SessionSettings>,
) -> Result<Connected, StoreError> {
    let failed = |reason: String| connect_failed(url, reason);
    let options = (0..list.hosts.len())
        .map(|index| {
            let options = crate::environment::connect_options(&list.url_for(index))?;
            Ok(options.extra_float_digits(None))
        })
        .collect::<Result<Vec<_>, String>>()
        .map_err(failed)?;
    let choice = Arc::new(HostChoice::new(list, options));
    let (index, chosen) = choice.search().await.map_err(failed)?;
    choice.settle_on(index, None);
    let _ = tokio::time::timeout(ACQUIRE_TIMEOUT, chosen.close()).await;
    // The search's connection carried no probe: ask the chosen host again.
    let chosen_options = choice.current_options();
    let probed = pooler::connect_and_probe(&chosen_options);
    let (first, endpoint) = tokio::time::timeout(ACQUIRE_TIMEOUT, probed)
        .await
        .map_err(|_| {
            failed(format!(
                "the chosen host gave no answer within {ACQUIRE_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| failed(describe_sqlx(&e)))?;
    learn_from_first(first, endpoint, &session).await;
    let pool = pool_options(max_connections, session, Some(choice.clone()))
        .connect_with(chosen_options)
        .await
        .map_err(|e| failed(describe_sqlx(&e)))?;
    Ok(Connected {
        pool,
        choice: Some(choice),
        endpoint,
    })
}

/// Records in `session` what the store's first connection found out (the
/// client check, the statement form), before the pool opens any connection,
/// then closes it: the pool opens its own. A close that hangs is abandoned
/// (the socket is dropped with it).
async fn learn_from_first(mut first: PgConnection, endpoint: Endpoint, session: &SessionSettings) {
    session.set_client_check(accepts_client_check(&mut first).await);
    session.set_prepared(endpoint == Endpoint::Direct);
    let _ = tokio::time::timeout(ACQUIRE_TIMEOUT, first.close()).await;
}

/// Connecting to `url` failed for `reason`: the error names every host of the
/// URL, with each password redacted from both.
fn connect_failed(url: &str, reason: String) -> StoreError {
    StoreError::Connect {
        target: redact_url(url),
        reason: scrub_password(reason, url),
    }
}

/// Whether the server accepts `client_connection_check_interval`
/// (PostgreSQL 14 and later, on platforms that can watch a socket for a
/// closed peer): asked once, on the first connection, by setting it there.
async fn accepts_client_check(conn: &mut PgConnection) -> bool {
    let sql = client_check_session_sql();
    let set = sqlx::Executor::execute(&mut *conn, sqlx::raw_sql(&sql));
    matches!(tokio::time::timeout(ACQUIRE_TIMEOUT, set).await, Ok(Ok(_)))
}

/// Renders a connection URL with its password replaced by `***`, both in the
/// user-info part and in a `password=` query parameter. A URL that does not
/// parse is not echoed at all, since it may hold a password in a form the
/// parser did not recognise.
pub fn redact_url(url: &str) -> String {
    if let Ok(list) = HostList::parse(url)
        && list.hosts.len() > 1
    {
        return list.redacted();
    }
    let Ok(mut parsed) = url::Url::parse(url) else {
        return "<unparseable connection URL>".to_owned();
    };
    if parsed.password().is_some() {
        // Only fails for URLs that cannot have a password, which this one has.
        let _ = parsed.set_password(Some("***"));
    }
    if parsed
        .query_pairs()
        .any(|(k, _)| k.eq_ignore_ascii_case("password"))
    {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k.eq_ignore_ascii_case("password") {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

/// Removes any password found in `url` from `message`: a last line of defence
/// for driver messages that might quote connection options.
fn scrub_password(message: String, url: &str) -> String {
    if let Ok(list) = HostList::parse(url)
        && list.hosts.len() > 1
    {
        return list
            .passwords()
            .into_iter()
            .fold(message, |m, secret| m.replace(&secret, "***"));
    }
    let Ok(parsed) = url::Url::parse(url) else {
        return message;
    };
    let mut secrets: Vec<String> = parsed
        .query_pairs()
        .filter(|(k, _)| k.eq_ignore_ascii_case("password"))
        .map(|(_, v)| v.into_owned())
        .collect();
    if let Some(p) = parsed.password() {
        secrets.push(p.to_owned());
        secrets.push(
            percent_encoding::percent_decode_str(p)
                .decode_utf8_lossy()
                .into_owned(),
        );
    }
    secrets
        .into_iter()
        .filter(|s| !s.is_empty())
        .fold(message, |m, secret| m.replace(&secret, "***"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_user_info_and_query_passwords() {
        let r = redact_url("postgres://bob:s3cret@db:5432/app?sslmode=require");
        assert_eq!(r, "postgres://bob:***@db:5432/app?sslmode=require");
        let r = redact_url("postgres://bob@db/app?password=s3cret&application_name=x");
        assert!(
            !r.contains("s3cret") && r.contains("application_name=x"),
            "{r}"
        );
        assert_eq!(redact_url("postgres://db/app"), "postgres://db/app");
        assert_eq!(
            redact_url("not a url s3cret"),
            "<unparseable connection URL>"
        );
        assert_eq!(
            redact_url("postgres://bob:s3cret@h1:1,h2:2/app?target_session_attrs=read-write"),
            "postgres://bob:***@h1:1,h2:2/app?target_session_attrs=read-write"
        );
    }

    #[test]
    fn scrubbing_removes_raw_and_percent_encoded_passwords() {
        let url = "postgres://bob:p%40ss@db/app?password=other";
        let m = scrub_password("x p%40ss y p@ss z other".to_owned(), url);
        assert_eq!(m, "x *** y *** z ***");
        let url = "postgres://bob:p%40ss@h1,h2/app?password=other";
        let m = scrub_password("x p%40ss y p@ss z other".to_owned(), url);
        assert_eq!(m, "x *** y *** z ***");
    }
}
