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
//!   IF it is not this store's epoch THEN RAISE … 'fenced by a newer instance (epoch N)' … $faucet_fence$;
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
//! The scope is a valid state key and the table a validated identifier, so
//! neither can hold a quote or a `$`, and both are written into the guard's
//! text as they are.

use crate::config::TableName;

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
    /// The guard statement (see the module docs), ending in `; `.
    pub(crate) fn guard(&self, table: &TableName) -> String {
        format!(
            "DO $faucet_fence$ DECLARE newest text; BEGIN \
             SELECT value->>'epoch' INTO newest FROM {table} WHERE key = '{key}' FOR SHARE; \
             IF newest IS DISTINCT FROM '{epoch}' THEN \
             RAISE EXCEPTION 'fenced by a newer instance (epoch %)', coalesce(newest, 'unknown: the fence row was deleted') \
             USING ERRCODE = '{FENCED_SQLSTATE}'; END IF; END $faucet_fence$; ",
            table = table.quoted(),
            key = fence_key(&self.scope),
            epoch = self.epoch,
        )
    }
}

/// Claims `scope`: creates its fence row at epoch 1 or increases its epoch,
/// and returns the new epoch. The update waits for every write holding the
/// row's share lock (see the module docs).
pub(crate) fn claim_sql(table: &TableName, scope: &str) -> String {
    format!(
        "INSERT INTO {table} AS t (key, value) VALUES ('{key}', '{{\"epoch\": 1}}') \
         ON CONFLICT (key) DO UPDATE SET \
         value = jsonb_build_object('epoch', coalesce((t.value->>'epoch')::bigint, 0) + 1), \
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
