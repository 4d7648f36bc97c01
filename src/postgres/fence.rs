//! Fencing: at most one instance of a scope writes.
//!
//! A store opened with [`PostgresStateStore::fence`](crate::PostgresStateStore::fence)
//! claims its scope: one row of the state table, under a key no bookmark can
//! have (`#fence:<scope>`: `#` is not a key character), holds the scope's
//! newest epoch, and each claim increases it. From then on every write of
//! that store is sent as one message with a guard before it:
//!
//! ```sql
//! SET LOCAL statement_timeout = …;
//! DO $faucet_fence$ … SELECT value->>'epoch' … WHERE key = '#fence:<scope>' FOR SHARE;
//!   IF it is not this store's epoch THEN RAISE … 'fenced by a newer instance (epoch N)' … END IF;
//!   set_config('statement_timeout', <what is left of it>, true) … $faucet_fence$;
//! INSERT … / DELETE … / UPDATE …
//! ```
//!
//! Why there is no window between the check and the write: the guard holds
//! a share lock on the fence row until the message's transaction ends, and a
//! claim updates that row, which waits for every share lock. So a claim
//! commits either before a write's guard reads the row (the guard then sees
//! the newer epoch, under READ COMMITTED the newest committed version, and
//! the message fails whole) or after the write has committed (the write
//! came first). A write that raced a claim therefore never lands after it.
//!
//! **One deadline for guard and write.** PostgreSQL times each statement of
//! a multi-statement message separately, so a guard that waited for the
//! fence row's lock and a write that then waited for its rows could each
//! run for the whole `statement_timeout`, and the write could commit after
//! the client had given up. The guard therefore ends by setting the
//! transaction's `statement_timeout` to what is left of the message's
//! budget (`statement_timestamp()` is when the server received the
//! message), at least 1 ms: the write's own timer starts from that value,
//! so the message as a whole ends within `statement_timeout` on the server.
//!
//! **Epochs never repeat for a scope.** A claim sets the epoch to the
//! server's clock in microseconds, or to one more than the stored epoch if
//! that is larger. If the fence row disappears (a `TRUNCATE` or `DELETE` of
//! the table, a restore from an older backup), every holder's guard fails
//! (fail closed: no row, no write) and the next claim still gets an epoch no
//! earlier claim had, so an old instance can never match it again.
//!
//! The scope is a valid state key and the table a validated identifier, so
//! neither can hold a quote or a `$`, and both are written into the guard's
//! text as they are.

use std::time::Duration;

use crate::config::TableName;
use crate::sql::timeout_millis;

/// SQLSTATE the guard raises; class `FS` is not one PostgreSQL uses.
pub(crate) const FENCED_SQLSTATE: &str = "FS001";

/// The key of a scope's fence row. Never a valid state key (`#`), so no
/// bookmark can collide with it, and `list` leaves it out.
pub(crate) fn fence_key(scope: &str) -> String {
    format!("#fence:{scope}")
}

/// A claimed scope and the epoch this store claimed it with.
#[derive(Debug, Clone)]
pub(crate) struct Fence {
    pub scope: String,
    pub epoch: i64,
}

impl Fence {
    /// The guard statement (see the module docs), ending in `; `, for
    /// messages bounded by `statement_timeout`.
    pub(crate) fn guard(&self, table: &TableName, statement_timeout: Duration) -> String {
        format!(
            "DO $faucet_fence$ DECLARE newest text; BEGIN \
             SELECT value->>'epoch' INTO newest FROM {table} WHERE key = '{key}' FOR SHARE; \
             IF newest IS DISTINCT FROM '{epoch}' THEN \
             RAISE EXCEPTION 'fenced by a newer instance (epoch %)', coalesce(newest, 'unknown: the fence row was deleted') \
             USING ERRCODE = '{FENCED_SQLSTATE}'; END IF; \
             PERFORM set_config('statement_timeout', greatest(1, {budget} - \
             (extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1000)::bigint)::text, true); \
             END $faucet_fence$; ",
            table = table.quoted(),
            key = fence_key(&self.scope),
            epoch = self.epoch,
            budget = timeout_millis(statement_timeout),
        )
    }
}

/// Claims `scope`: creates its fence row or raises its epoch (see the
/// module docs: never an epoch the scope had before), and returns the new
/// epoch. The update waits for every write holding the row's share lock.
pub(crate) fn claim_sql(table: &TableName, scope: &str) -> String {
    // Microseconds since 1970 stay below 2^53 until the year 2255, so the
    // epoch is exact as a JSON number in any reader.
    let clock = "(extract(epoch FROM clock_timestamp()) * 1000000)::bigint";
    format!(
        "INSERT INTO {table} AS t (key, value) VALUES ('{key}', jsonb_build_object('epoch', {clock})) \
         ON CONFLICT (key) DO UPDATE SET \
         value = jsonb_build_object('epoch', greatest(coalesce((t.value->>'epoch')::bigint, 0) + 1, {clock})), \
         updated_at = NOW() \
         RETURNING (value->>'epoch')::bigint",
        table = table.quoted(),
        key = fence_key(scope),
    )
}

/// The scope's newest epoch, if it was ever claimed.
pub(crate) fn newest_epoch_sql(table: &TableName, scope: &str) -> String {
    format!(
        "SELECT (value->>'epoch')::bigint FROM {table} WHERE key = '{key}'",
        table = table.quoted(),
        key = fence_key(scope),
    )
}
