//! Choosing the host of a multi-host URL, and choosing again after a switch.
//!
//! A URL that lists several hosts, or asks for a kind of session
//! (`target_session_attrs`, see `hosts.rs`), gets a [`HostChoice`]: the
//! hosts are tried in order, each with a connection of its own and one
//! query (`transaction_read_only`, `pg_is_in_recovery()`), and the pool's
//! connect options are pointed at the first that fits. Every connection the
//! pool opens afterwards is checked the same way before use, so a host that
//! changed role (a primary demoted, a standby promoted) is never written to
//! by a new connection: the pool keeps trying, and the statement waiting for
//! it has the host chosen again once its patience (1 s) ends. When a
//! statement meets a lost connection, a read-only session or a server
//! shutting down, the executor asks for the choice to be made again
//! ([`HostChoice::look_again`]) before it retries.
//!
//! Looking again is paced: one search at a time, the next no sooner than a
//! backoff after the last (25 ms, doubling to 250 ms while no host fits; reset
//! once one does), so a dead primary behind a proxy that accepts and closes
//! connections is not hammered. A URL with one host and no session
//! requirement gets no `HostChoice`: connecting is exactly as before.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::connect::ACQUIRE_TIMEOUT;
use crate::error::describe_sqlx;
use crate::hosts::{HostList, SessionAttrs};

/// First pause between two searches while no host fits.
const BACKOFF_START: Duration = Duration::from_millis(25);
/// Longest pause between two searches.
const BACKOFF_MAX: Duration = Duration::from_millis(250);

/// The role a session reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionRole {
    pub(crate) read_only: bool,
    pub(crate) in_recovery: bool,
}

impl SessionRole {
    /// One round trip on `conn`.
    pub(crate) async fn of(conn: &mut PgConnection) -> Result<Self, sqlx::Error> {
        let (read_only, in_recovery): (bool, bool) = sqlx::query_as(
            "SELECT current_setting('transaction_read_only') = 'on', pg_is_in_recovery()",
        )
        .fetch_one(conn)
        .await?;
        Ok(Self {
            read_only,
            in_recovery,
        })
    }

    /// Whether a session in this role is one `attrs` asks for.
    /// `PreferStandby` takes any (its preference is the search order).
    pub(crate) fn fits(self, attrs: SessionAttrs) -> bool {
        match attrs {
            SessionAttrs::Any | SessionAttrs::PreferStandby => true,
            SessionAttrs::ReadWrite => !self.read_only,
            SessionAttrs::ReadOnly => self.read_only,
            SessionAttrs::Primary => !self.in_recovery,
            SessionAttrs::Standby => self.in_recovery,
        }
    }

    fn describe(self) -> &'static str {
        match (self.in_recovery, self.read_only) {
            (true, _) => "a standby (in recovery)",
            (false, true) => "read-only (default_transaction_read_only is on)",
            (false, false) => "a read-write primary",
        }
    }
}

/// Why a new pool connection was refused: its host no longer gives the
/// session the URL asks for. sqlx's pool logs it and tries the connect again
/// (it retries after any `after_connect` error) until the statement's
/// patience ends (see `exec.rs`); the host is then chosen again.
#[derive(Debug, thiserror::Error)]
#[error("{host} is now {role}, and target_session_attrs={attrs}; looking for another host")]
pub(crate) struct WrongSession {
    host: String,
    role: &'static str,
    attrs: SessionAttrs,
}

/// The hosts of one URL, the options of each, and the one connections go to.
#[derive(Debug)]
pub(crate) struct HostChoice {
    list: HostList,
    options: Vec<PgConnectOptions>,
    chosen: AtomicUsize,
    /// Searches completed, so a caller that waited for another's search
    /// does not run one more.
    searches: AtomicU64,
    search: Mutex<Pace>,
}

#[derive(Debug)]
struct Pace {
    /// Whether the last search found a host: until `not_before` its choice
    /// stands, and a caller meeting a connection opened before it (to the
    /// old host) retries on the choice instead of searching again.
    found: bool,
    not_before: Instant,
    backoff: Duration,
}

impl HostChoice {
    /// `options[i]` are the options of `list.hosts[i]`.
    pub(crate) fn new(list: HostList, options: Vec<PgConnectOptions>) -> Self {
        debug_assert_eq!(list.hosts.len(), options.len());
        Self {
            list,
            options,
            chosen: AtomicUsize::new(0),
            searches: AtomicU64::new(0),
            search: Mutex::new(Pace {
                found: true,
                not_before: Instant::now(),
                backoff: BACKOFF_START,
            }),
        }
    }

    pub(crate) fn attrs(&self) -> SessionAttrs {
        self.list.attrs
    }

    /// The host connections go to now (`host:port`, no user or password).
    pub(crate) fn current_host(&self) -> String {
        self.list.hosts[self.chosen.load(Ordering::Acquire)].to_string()
    }

    /// The options of the chosen host.
    pub(crate) fn current_options(&self) -> PgConnectOptions {
        self.options[self.chosen.load(Ordering::Acquire)].clone()
    }

    /// Makes host `index` the one connections go to: the pool's options
    /// (when there is a pool yet) and what messages name.
    pub(crate) fn settle_on(&self, index: usize, pool: Option<&PgPool>) {
        self.chosen.store(index, Ordering::Release);
        if let Some(pool) = pool {
            pool.set_connect_options(self.options[index].clone());
        }
    }

    /// Checks a connection the pool just opened (to the current host).
    pub(crate) async fn verify(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        let role = SessionRole::of(conn).await?;
        if role.fits(self.attrs()) {
            return Ok(());
        }
        Err(sqlx::Error::Configuration(Box::new(WrongSession {
            host: self.current_host(),
            role: role.describe(),
            attrs: self.attrs(),
        })))
    }

    /// Tries every host in order and returns the index of the first that
    /// fits with its open connection. `Err` names every host and why it did
    /// not fit. Changes nothing: [`HostChoice::settle_on`] does.
    pub(crate) async fn search(&self) -> Result<(usize, PgConnection), String> {
        let mut why_not = Vec::new();
        // prefer-standby: a standby on the first pass, any host on the second.
        let passes = match self.attrs() {
            SessionAttrs::PreferStandby => vec![SessionAttrs::Standby, SessionAttrs::Any],
            attrs => vec![attrs],
        };
        for wanted in passes {
            for (index, options) in self.options.iter().enumerate() {
                let host = &self.list.hosts[index];
                match try_host(options, wanted).await {
                    Ok(conn) => return Ok((index, conn)),
                    Err(reason) => why_not.push(format!("{host}: {reason}")),
                }
            }
        }
        Err(format!(
            "no host gives a session with target_session_attrs={} ({})",
            self.attrs(),
            why_not.join("; ")
        ))
    }

    /// Makes the choice again and points `pool` at it, paced (see the module
    /// docs). Waits at most [`BACKOFF_MAX`] for its turn plus one search
    /// (each host bounded by [`ACQUIRE_TIMEOUT`]).
    pub(crate) async fn look_again(&self, pool: &PgPool) {
        let seen = self.searches.load(Ordering::Acquire);
        let mut pace = self.search.lock().await;
        if self.searches.load(Ordering::Acquire) != seen
            || (pace.found && Instant::now() < pace.not_before)
        {
            return; // another caller searched while this one waited, or just now
        }
        tokio::time::sleep_until(pace.not_before).await;
        let found = self.search().await;
        self.searches.fetch_add(1, Ordering::AcqRel);
        match found {
            Ok((index, conn)) => {
                pace.found = true;
                pace.backoff = BACKOFF_START;
                pace.not_before = Instant::now() + BACKOFF_START;
                let _ = tokio::time::timeout(ACQUIRE_TIMEOUT, conn.close()).await;
                self.settle_on(index, Some(pool));
                tracing::info!(host = %self.list.hosts[index], "connections now go to this host");
            }
            Err(reason) => {
                pace.found = false;
                pace.not_before = Instant::now() + pace.backoff;
                pace.backoff = (pace.backoff * 2).min(BACKOFF_MAX);
                tracing::warn!(%reason, "no host fits yet; looking again later");
            }
        }
    }
}

/// A connection to one host whose session is of the `wanted` kind.
async fn try_host(
    options: &PgConnectOptions,
    wanted: SessionAttrs,
) -> Result<PgConnection, String> {
    let attempt = async {
        let mut conn = PgConnection::connect_with(options).await?;
        let role = SessionRole::of(&mut conn).await?;
        Ok::<_, sqlx::Error>((conn, role))
    };
    match tokio::time::timeout(ACQUIRE_TIMEOUT, attempt).await {
        Err(_) => Err(format!("no answer within {ACQUIRE_TIMEOUT:?}")),
        Ok(Err(e)) => Err(describe_sqlx(&e)),
        Ok(Ok((conn, role))) if role.fits(wanted) => Ok(conn),
        Ok(Ok((conn, role))) => {
            let _ = tokio::time::timeout(ACQUIRE_TIMEOUT, conn.close()).await;
            Err(role.describe().to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_session_attribute_fits_the_roles_libpq_says() {
        let primary = SessionRole {
            read_only: false,
            in_recovery: false,
        };
        let read_only_primary = SessionRole {
            read_only: true,
            in_recovery: false,
        };
        let standby = SessionRole {
            read_only: true,
            in_recovery: true,
        };
        use SessionAttrs::*;
        let fits = |role: SessionRole| {
            [Any, ReadWrite, ReadOnly, Primary, Standby, PreferStandby].map(|a| role.fits(a))
        };
        assert_eq!(fits(primary), [true, true, false, true, false, true]);
        assert_eq!(
            fits(read_only_primary),
            [true, false, true, true, false, true]
        );
        assert_eq!(fits(standby), [true, false, true, false, true, true]);
    }
}
