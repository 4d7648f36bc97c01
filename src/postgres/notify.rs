//! Change notifications of a state table: the trigger that publishes them,
//! and the feed a [`CachedStateStore`](crate::CachedStateStore) listens to.
//!
//! [`ensure_change_notifications`](crate::PostgresStateStore::ensure_change_notifications)
//! installs one function, `faucet_state_notify()`, and statement-level
//! triggers on the table for INSERT, UPDATE, DELETE and TRUNCATE. Each
//! statement that changes rows sends one `NOTIFY faucet_state_changes` with
//! the payload `<table>\n<key>\n<key>…` (the keys from the statement's
//! transition table), or `<table>\n*` when that would not fit in NOTIFY's
//! 8,000 bytes or the table was truncated. Notifications are delivered at
//! commit, only if the transaction commits: a listener never hears of a
//! change that did not happen. They are sent whoever writes: this crate's
//! stores, the 1.0 store, an operator's `UPDATE` in psql.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::{PgListener, PgPoolOptions};

use crate::changes::{Change, ChangeFeed};
use crate::config::TableName;
use crate::host_choice::HostChoice;

/// The channel every state table notifies on; the payload names the table.
pub(crate) const CHANNEL: &str = "faucet_state_changes";

/// Payloads larger than this say `*` instead of the keys (NOTIFY's limit is
/// 8,000 bytes).
const MAX_PAYLOAD: usize = 7_900;

/// Installs the function and the triggers; idempotent, one transaction.
pub(crate) fn install_sql(table: &TableName) -> String {
    let quoted = table.quoted();
    // Two installs at once would race on the shared function (a unique
    // violation in pg_proc): one at a time.
    let mut sql = format!(
        "SELECT pg_advisory_xact_lock(hashtext('faucet_state_notify')); \
         CREATE OR REPLACE FUNCTION faucet_state_notify() RETURNS trigger LANGUAGE plpgsql AS $faucet$ \
         DECLARE keys text; \
         BEGIN \
           IF TG_OP = 'TRUNCATE' THEN keys := '*'; \
           ELSIF TG_OP = 'DELETE' THEN SELECT string_agg(key, E'\\n') INTO keys FROM faucet_old_rows; \
           ELSE SELECT string_agg(key, E'\\n') INTO keys FROM faucet_new_rows; \
           END IF; \
           IF keys IS NULL THEN RETURN NULL; END IF; \
           IF octet_length(keys) + octet_length(TG_TABLE_NAME) > {MAX_PAYLOAD} THEN keys := '*'; END IF; \
           PERFORM pg_notify('{CHANNEL}', TG_TABLE_NAME || E'\\n' || keys); \
           RETURN NULL; \
         END $faucet$; "
    );
    for (name, event, referencing) in [
        (
            "faucet_notify_insert",
            "INSERT",
            "REFERENCING NEW TABLE AS faucet_new_rows",
        ),
        (
            "faucet_notify_update",
            "UPDATE",
            "REFERENCING NEW TABLE AS faucet_new_rows",
        ),
        (
            "faucet_notify_delete",
            "DELETE",
            "REFERENCING OLD TABLE AS faucet_old_rows",
        ),
        ("faucet_notify_truncate", "TRUNCATE", ""),
    ] {
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {name} ON {quoted}; \
             CREATE TRIGGER {name} AFTER {event} ON {quoted} {referencing} \
             FOR EACH STATEMENT EXECUTE FUNCTION faucet_state_notify(); "
        ));
    }
    sql
}

/// What a notification's payload says about `table`, if it concerns it.
pub(crate) fn parse(payload: &str, table: &str) -> Option<Change> {
    let mut lines = payload.split('\n');
    if lines.next()? != table {
        return None;
    }
    let keys: Vec<String> = lines.map(str::to_owned).collect();
    if keys.iter().any(|key| key == "*") {
        Some(Change::Everything)
    } else {
        Some(Change::Keys(keys))
    }
}

/// How long subscribing, and a liveness check, may take.
const DEADLINE: Duration = Duration::from_secs(10);
/// A quiet connection is checked this often: a connection that stalled
/// without closing would otherwise be trusted forever.
const QUIET_CHECK: Duration = Duration::from_secs(5);
const RETRY_START: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// `LISTEN faucet_state_changes` on a connection of its own, resubscribing
/// on a new one after a loss.
///
/// Invariants:
/// - The feed never uses the store's pool: a listener holds its connection
///   for good, and in a pool of one it would leave nothing for reads and
///   writes. Each subscription opens a pool of one connection of its own,
///   with the store's connection options. Not one pool for all of them:
///   sqlx sends `UNLISTEN *` on a dropped listener's connection before
///   giving it back, which never ends on a stalled connection, and would
///   keep a shared pool's only connection from every later subscription.
/// - One subscription is one server session. sqlx's listener reconnects by
///   itself (inside `try_recv`, or when a query is run through it), and
///   notifications sent while no session listened are lost without a
///   trace; so that reconnect is turned off, any loss the listener reports
///   ends the subscription, and the liveness check compares the session's
///   backend pid with the one that subscribed: a new session is a loss.
pub(crate) struct PgChangeFeed {
    /// The store's pool, whose connect options name the server to listen
    /// on: read at each subscription, so after a failover (the store's host
    /// chosen again) the feed follows.
    store_pool: PgPool,
    /// For a URL whose host is chosen: chosen again when subscribing fails,
    /// so an idle store's feed finds the promoted primary by itself.
    choice: Option<Arc<HostChoice>>,
    table: String,
    listener: Option<Subscription>,
    /// Whether `Listening` was reported since the last `Lost`.
    listening: bool,
    retry: Duration,
}

/// A listener and the backend pid of the session that subscribed.
struct Subscription {
    listener: PgListener,
    pid: i32,
}

impl PgChangeFeed {
    /// A feed on its own connection to the server `store_pool` connects to.
    pub(crate) fn new(store_pool: &PgPool, table: &str, choice: Option<Arc<HostChoice>>) -> Self {
        Self {
            store_pool: store_pool.clone(),
            choice,
            table: table.to_owned(),
            listener: None,
            listening: false,
            retry: RETRY_START,
        }
    }

    async fn subscribe(&self) -> Result<Subscription, String> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(DEADLINE)
            .test_before_acquire(false)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_lazy_with((*self.store_pool.connect_options()).clone());
        let subscribed = tokio::time::timeout(DEADLINE, async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.eager_reconnect(false);
            listener.listen(CHANNEL).await?;
            let pid = backend_pid(&mut listener).await?;
            Ok::<_, sqlx::Error>(Subscription { listener, pid })
        })
        .await;
        match subscribed {
            Ok(Ok(subscription)) => Ok(subscription),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no answer within {DEADLINE:?}")),
        }
    }

    fn lost(&mut self, reason: String) -> Option<Change> {
        self.listener = None;
        std::mem::replace(&mut self.listening, false).then_some(Change::Lost(reason))
    }
}

async fn backend_pid(listener: &mut PgListener) -> Result<i32, sqlx::Error> {
    use sqlx::Row;
    let row = sqlx::Executor::fetch_one(&mut *listener, "SELECT pg_backend_pid()").await?;
    row.try_get(0)
}

#[async_trait]
impl ChangeFeed for PgChangeFeed {
    async fn next(&mut self) -> Change {
        loop {
            let Some(listener) = self.listener.as_mut() else {
                match self.subscribe().await {
                    Ok(listener) => {
                        self.listener = Some(listener);
                        self.listening = true;
                        self.retry = RETRY_START;
                        return Change::Listening;
                    }
                    Err(reason) => {
                        tracing::warn!(%reason, "faucet-state-postgres: could not LISTEN for changes; retrying");
                        if let Some(choice) = &self.choice {
                            choice.look_again(&self.store_pool).await;
                        }
                        tokio::time::sleep(self.retry).await;
                        self.retry = (self.retry * 2).min(RETRY_MAX);
                        continue;
                    }
                }
            };
            let lost = match tokio::time::timeout(QUIET_CHECK, listener.listener.try_recv()).await {
                Ok(Ok(Some(notification))) => match parse(notification.payload(), &self.table) {
                    Some(change) => return change,
                    None => continue,
                },
                Ok(Ok(None)) => "the listening connection was closed".to_owned(),
                Ok(Err(error)) => error.to_string(),
                // Quiet: check that the session that subscribed still
                // answers. A receive cut short may leave the connection
                // unusable; the check then fails and the feed resubscribes,
                // which is safe.
                Err(_) => {
                    let alive =
                        tokio::time::timeout(DEADLINE, backend_pid(&mut listener.listener)).await;
                    match alive {
                        Ok(Ok(pid)) if pid == listener.pid => continue,
                        Ok(Ok(pid)) => format!(
                            "the listening session (backend {}) was replaced by another ({pid})",
                            listener.pid
                        ),
                        Ok(Err(error)) => error.to_string(),
                        Err(_) => {
                            format!("the listening connection did not answer within {DEADLINE:?}")
                        }
                    }
                }
            };
            if let Some(change) = self.lost(lost) {
                return change;
            }
        }
    }
}
