//! Every SQL statement the crate sends, in one place.
//!
//! The table name is spliced in once, when a store is built, from a
//! [`TableName`] (validated and double-quoted); every other input is a bind
//! parameter. Values travel as JSON text and are cast to JSONB by the server,
//! so each value is serialized exactly once, by [`codec`](crate::codec).

use crate::config::TableName;

/// The statements of one table.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    /// `$1` key → the row's value.
    pub get: String,
    /// `$1` key, `$2` JSON text: one upsert.
    pub put: String,
    /// `$1` key.
    pub delete: String,
    /// `$1` keys, `$2` JSON texts (parallel arrays, keys distinct): one
    /// multi-row upsert, atomic as a single statement.
    pub put_many: String,
    /// `$1` keys.
    pub delete_many: String,
    /// `$1` keys, `$2` JSON texts, `$3` keys to delete (disjoint from `$1`):
    /// the upserts and the deletes in one statement, so one round trip and
    /// one commit. Data-modifying CTEs share a snapshot, which is safe here
    /// because no key is both upserted and deleted.
    pub upsert_and_delete: String,
    /// `$1` keys → (key, value) of the rows that exist.
    pub get_many: String,
    /// `$1` literal prefix → keys in byte order. `starts_with` compares
    /// characters, so `_` and `%` in a prefix are not wildcards.
    pub list: String,
}

impl Statements {
    pub(crate) fn new(table: &TableName) -> Self {
        let t = table.quoted();
        Self {
            get: format!("SELECT value FROM {t} WHERE key = $1"),
            put: format!(
                "INSERT INTO {t} (key, value) VALUES ($1, $2::jsonb) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = NOW()"
            ),
            delete: format!("DELETE FROM {t} WHERE key = $1"),
            put_many: format!(
                "INSERT INTO {t} (key, value) \
                 SELECT k, v::jsonb FROM UNNEST($1::text[], $2::text[]) AS batch(k, v) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = NOW()"
            ),
            delete_many: format!("DELETE FROM {t} WHERE key = ANY($1::text[])"),
            upsert_and_delete: format!(
                "WITH deleted AS (DELETE FROM {t} WHERE key = ANY($3::text[])) \
                 INSERT INTO {t} (key, value) \
                 SELECT k, v::jsonb FROM UNNEST($1::text[], $2::text[]) AS batch(k, v) \
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = NOW()"
            ),
            get_many: format!("SELECT key, value FROM {t} WHERE key = ANY($1::text[])"),
            list: format!(
                "SELECT key FROM {t} WHERE starts_with(key, $1) ORDER BY key COLLATE \"C\""
            ),
        }
    }
}

/// `CREATE TABLE` for the state-store layout; also quoted in error hints for
/// operators who must create the table out of band.
pub(crate) fn create_table_sql(table: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\
         key TEXT PRIMARY KEY, \
         value JSONB NOT NULL, \
         updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW())",
        table.quoted()
    )
}

/// `$1` quoted table name → (column, type, not null, has a value of its own
/// on insert: a default, an identity or a generated expression) of each live
/// column; no rows when the table does not exist.
pub(crate) const TABLE_COLUMNS: &str = "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
     (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') \
     FROM pg_attribute a \
     WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
     ORDER BY a.attnum";

/// `$1` quoted table name → whether `key` alone is the primary key or a
/// unique index that is checked immediately, which `ON CONFLICT (key)`
/// needs, and whether it only has a deferrable one, which `ON CONFLICT`
/// cannot use as its arbiter.
pub(crate) const KEY_IS_UNIQUE: &str = "SELECT \
     COALESCE(bool_or(i.indimmediate), false), COALESCE(bool_or(NOT i.indimmediate), false) \
     FROM pg_index i \
     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
     WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnatts = 1 \
     AND i.indpred IS NULL AND a.attname = 'key'";

/// Who the probe is connected as, and where.
pub(crate) const WHOAMI: &str = "SELECT current_user::text, current_database()::text";
