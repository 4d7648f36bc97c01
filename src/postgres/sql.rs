//! Every SQL statement the crate sends, in one place.
//!
//! # Two forms: prepared statements, or one message each
//!
//! Where the store's connections reach a server session of their own
//! (found out when it connects, see `pooler.rs`), the frequent statements go
//! as prepared statements ([`Prepared`]): parsed and planned once per
//! connection, then one round trip of a few bytes, bounded by the session's
//! `statement_timeout` (see `session.rs`).
//!
//! Anywhere else (behind a transaction pooler, or through a pool given to
//! `from_pool`), and for every statement of a fenced store's writes, each
//! operation is a single simple-protocol `Query` message ([`Statements`]),
//! with its inputs written into the text as literals:
//!
//! ```sql
//! SET LOCAL statement_timeout = '30000ms'; INSERT INTO "faucet_state" ... ;
//! ```
//!
//! - PostgreSQL runs the statements of one message as one implicit
//!   transaction, so `SET LOCAL` bounds just this statement on the server and
//!   leaves no session state behind, and the whole message commits or fails
//!   as one.
//! - No named prepared statement exists, so the stores work behind
//!   PgBouncer in transaction pooling mode, which hands each transaction to
//!   any server connection (sqlx's named statements `sqlx_s_N` collide
//!   there, and its unnamed ones span two transactions).
//! - It is still one round trip per operation. What it gives up is the
//!   server's cached plan for these few short statements; the README's
//!   performance section measures that cost.
//!
//! Literals are safe to splice: every text is written as an `E'…'` escape
//! string with `'` doubled and `\` escaped, so its content can never end the
//! literal; U+0000, which PostgreSQL text cannot hold, is written as the
//! escape `\000`, which the server refuses with an error rather than a
//! truncated message. The table name comes from a validated
//! [`TableName`] and is double-quoted.

use std::fmt::Write as _;
use std::time::Duration;

use crate::config::TableName;

/// The statements of one table, bounded by one server-side timeout.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    table: String,
    /// `SET LOCAL statement_timeout = '…ms'; `, the prefix of every message.
    prelude: String,
    /// A fenced store's guard (see `fence.rs`), sent before every write;
    /// empty when the store is not fenced.
    guard: String,
}

/// Appends `text` as an escape-string literal.
pub(crate) fn push_literal(sql: &mut String, text: &str) {
    sql.reserve(text.len() + 3);
    sql.push_str("E'");
    push_escaped(sql, text, |byte| match byte {
        b'\'' => Some("''"),
        b'\\' => Some(r"\\"),
        // The server refuses a NUL byte; this way it says so.
        b'\0' => Some(r"\000"),
        _ => None,
    });
    sql.push('\'');
}

/// Appends `text` with every byte `escape` maps replaced by what it maps
/// to (only ASCII bytes are mapped, so every cut falls between characters).
/// Runs of other bytes are copied whole: values can be megabytes long.
fn push_escaped(sql: &mut String, text: &str, escape: impl Fn(u8) -> Option<&'static str>) {
    let mut rest = text;
    while let Some((at, replacement)) = rest
        .bytes()
        .enumerate()
        .find_map(|(at, byte)| escape(byte).map(|replacement| (at, replacement)))
    {
        sql.push_str(&rest[..at]);
        sql.push_str(replacement);
        rest = &rest[at + 1..];
    }
    sql.push_str(rest);
}

/// `text` as an escape-string literal.
pub(crate) fn literal(text: &str) -> String {
    let mut sql = String::new();
    push_literal(&mut sql, text);
    sql
}

/// Appends `items` as one text-array literal, `E'{"a","b"}'::text[]`.
///
/// The server reads it with one call of `array_in`. Written as
/// `ARRAY[E'a', E'b']`, every item was a constant of its own to parse and
/// plan: a 64-row upsert took 1.34-1.50 ms that way and 1.09 ms this way
/// (`pgbench -M simple`, the same statement otherwise).
fn push_text_array<S: AsRef<str>>(sql: &mut String, items: &[S]) {
    sql.reserve(
        items
            .iter()
            .map(|item| item.as_ref().len() + 3)
            .sum::<usize>()
            + 16,
    );
    sql.push_str("E'{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            sql.push(',');
        }
        sql.push('"');
        push_array_element(sql, item.as_ref());
        sql.push('"');
    }
    sql.push_str("}'::text[]");
}

/// `text` as the inside of a double-quoted array element, itself inside an
/// escape-string literal. Two layers: the array syntax escapes `"` and `\`
/// with a backslash, then the string literal doubles every backslash and
/// every `'`. Always quoted, an element is never read as `NULL`, and
/// braces, commas and spaces in it are plain text.
fn push_array_element(sql: &mut String, text: &str) {
    push_escaped(sql, text, |byte| match byte {
        b'\'' => Some("''"),
        // The element's `\\`, each backslash doubled for the literal.
        b'\\' => Some(r"\\\\"),
        // The element's `\"`, its backslash doubled for the literal.
        b'"' => Some(r#"\\""#),
        // As in `push_literal`: the server refuses a NUL byte.
        b'\0' => Some(r"\000"),
        _ => None,
    });
}

/// The most PostgreSQL's `statement_timeout` holds: `INT_MAX` milliseconds.
const MAX_TIMEOUT_MS: u128 = i32::MAX as u128;

/// How often, in milliseconds, the server checks while running a statement
/// that the client is still connected (see
/// [`Statements::checking_the_client`]): one `poll()` on the socket each
/// time.
const CLIENT_CHECK_MS: u64 = 100;

/// The session form of the client check, for prepared statements, which
/// carry no prelude, and for asking a server whether it accepts the setting.
pub(crate) fn client_check_session_sql() -> String {
    format!("SET client_connection_check_interval = {CLIENT_CHECK_MS}")
}

/// A statement timeout as whole milliseconds the server accepts: at least 1
/// (0 would turn the limit off) and at most `INT_MAX`.
pub(crate) fn timeout_millis(timeout: Duration) -> u64 {
    timeout.as_millis().clamp(1, MAX_TIMEOUT_MS) as u64
}

impl Statements {
    pub(crate) fn new(table: &TableName, statement_timeout: Duration) -> Self {
        Self {
            table: table.quoted(),
            prelude: format!(
                "SET LOCAL statement_timeout = '{}ms'; ",
                timeout_millis(statement_timeout)
            ),
            guard: String::new(),
        }
    }

    /// The same statements, each message also telling the server to check
    /// every [`CLIENT_CHECK_MS`] whether the client is still there
    /// (`client_connection_check_interval`, PostgreSQL 14 and later): a
    /// message whose caller gave up and closed its connection is then
    /// ended and rolled back by the server, instead of running on, waiting
    /// for a lock, and committing later. Only for servers that accept the
    /// setting (see `connect.rs`).
    pub(crate) fn checking_the_client(mut self) -> Self {
        let _ = write!(
            self.prelude,
            "SET LOCAL client_connection_check_interval = '{CLIENT_CHECK_MS}ms'; "
        );
        self
    }

    /// The same statements, each write preceded by a fence's `guard`.
    pub(crate) fn guarded(mut self, guard: String) -> Self {
        self.guard = guard;
        self
    }

    fn start(&self, capacity: usize) -> String {
        let mut sql = String::with_capacity(self.prelude.len() + 160 + capacity);
        sql.push_str(&self.prelude);
        sql
    }

    /// The start of a message that writes: the prelude, then the guard.
    fn start_write(&self, capacity: usize) -> String {
        let mut sql = self.start(self.guard.len() + capacity);
        sql.push_str(&self.guard);
        sql
    }

    /// `body`, bounded by the statement timeout like every message.
    pub(crate) fn bounded(&self, body: &str) -> String {
        let mut sql = self.start(body.len());
        sql.push_str(body);
        sql
    }

    /// The row's value of `key`.
    pub(crate) fn get(&self, key: &str) -> String {
        let mut sql = self.start(key.len());
        self.push_get(&mut sql, key);
        sql
    }

    /// One upsert of `key` with the JSON text `value`.
    pub(crate) fn put(&self, key: &str, value: &str) -> String {
        let mut sql = self.start_write(key.len() + value.len());
        self.push_put(&mut sql, key, value);
        sql
    }

    /// One delete of `key`.
    pub(crate) fn delete(&self, key: &str) -> String {
        let mut sql = self.start_write(key.len());
        self.push_delete(&mut sql, key);
        sql
    }

    fn push_get(&self, sql: &mut String, key: &str) {
        let _ = write!(sql, "SELECT value::text FROM {} WHERE key = ", self.table);
        push_literal(sql, key);
    }

    fn push_put(&self, sql: &mut String, key: &str, value: &str) {
        let _ = write!(sql, "INSERT INTO {} (key, value) VALUES (", self.table);
        push_literal(sql, key);
        sql.push_str(", ");
        push_literal(sql, value);
        sql.push_str(
            "::jsonb) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = NOW()",
        );
    }

    fn push_delete(&self, sql: &mut String, key: &str) {
        let _ = write!(sql, "DELETE FROM {} WHERE key = ", self.table);
        push_literal(sql, key);
    }

    /// Upserts `keys` with the JSON texts `values` (pairwise, keys distinct)
    /// and deletes `deletes` (disjoint from `keys`), in one statement, the
    /// cheapest that does the job. Data-modifying CTEs share a snapshot,
    /// which is safe here because no key is both upserted and deleted.
    /// `None` when there is nothing to do.
    pub(crate) fn write<S: AsRef<str>>(
        &self,
        keys: &[&str],
        values: &[S],
        deletes: &[&str],
    ) -> Option<String> {
        debug_assert_eq!(keys.len(), values.len());
        let keys_bytes = |keys: &[&str]| keys.iter().map(|k| k.len() + 6).sum::<usize>();
        match (keys, values, deletes) {
            ([], _, []) => None,
            ([key], [value], []) => Some(self.put(key, value.as_ref())),
            ([], _, [key]) => Some(self.delete(key)),
            ([], _, deletes) => {
                let mut sql = self.start_write(keys_bytes(deletes));
                let _ = write!(sql, "DELETE FROM {} WHERE key = ANY(", self.table);
                push_text_array(&mut sql, deletes);
                sql.push(')');
                Some(sql)
            }
            (keys, values, deletes) => {
                let size = keys_bytes(keys)
                    + keys_bytes(deletes)
                    + values.iter().map(|v| v.as_ref().len() + 6).sum::<usize>();
                let mut sql = self.start_write(size);
                if !deletes.is_empty() {
                    let _ = write!(
                        sql,
                        "WITH deleted AS (DELETE FROM {} WHERE key = ANY(",
                        self.table
                    );
                    push_text_array(&mut sql, deletes);
                    sql.push_str(")) ");
                }
                let _ = write!(
                    sql,
                    "INSERT INTO {} (key, value) SELECT k, v::jsonb FROM UNNEST(",
                    self.table
                );
                push_text_array(&mut sql, keys);
                sql.push_str(", ");
                push_text_array(&mut sql, values);
                sql.push_str(
                    ") AS batch(k, v) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = NOW()",
                );
                Some(sql)
            }
        }
    }

    /// (key, value) of the rows of `keys` that exist.
    pub(crate) fn get_many(&self, keys: &[&str]) -> String {
        let mut sql = self.start(keys.iter().map(|k| k.len() + 6).sum());
        let _ = write!(
            sql,
            "SELECT key, value FROM {} WHERE key = ANY(",
            self.table
        );
        push_text_array(&mut sql, keys);
        sql.push(')');
        sql
    }

    /// Writes the JSON text `value` under `key` only if the key has no row
    /// (`expected` is `None`) or its value equals the JSON text `expected`
    /// (as JSONB). One statement, atomic against every other writer: the
    /// insert leaves an existing row alone, and the update re-checks its
    /// condition on the newest row version if another transaction changed
    /// the row meanwhile. Returns one row if it wrote.
    pub(crate) fn compare_and_put(&self, key: &str, expected: Option<&str>, value: &str) -> String {
        let mut sql = self.start_write(key.len() + value.len() + expected.map_or(0, str::len));
        match expected {
            None => {
                let _ = write!(sql, "INSERT INTO {} (key, value) VALUES (", self.table);
                push_literal(&mut sql, key);
                sql.push_str(", ");
                push_literal(&mut sql, value);
                sql.push_str("::jsonb) ON CONFLICT (key) DO NOTHING RETURNING 1");
            }
            Some(expected) => {
                let _ = write!(sql, "UPDATE {} SET value = ", self.table);
                push_literal(&mut sql, value);
                sql.push_str("::jsonb, updated_at = NOW() WHERE key = ");
                push_literal(&mut sql, key);
                sql.push_str(" AND value = ");
                push_literal(&mut sql, expected);
                sql.push_str("::jsonb RETURNING 1");
            }
        }
        sql
    }

    /// Keys starting with the literal `prefix`, in byte order. `starts_with`
    /// compares characters, so `_` and `%` in a prefix are not wildcards.
    /// Fence rows (`#…`, never a state key) are left out.
    pub(crate) fn list(&self, prefix: &str) -> String {
        let mut sql = self.start(prefix.len());
        let _ = write!(
            sql,
            "SELECT key FROM {} WHERE starts_with(key, ",
            self.table
        );
        push_literal(&mut sql, prefix);
        sql.push_str(") AND NOT starts_with(key, '#') ORDER BY key COLLATE \"C\"");
        sql
    }

    /// The doctor's sentinel: writes `value` under `key`, reads it back and
    /// deletes it, in one implicit transaction. The net effect is no row,
    /// atomically; an interrupted message rolls back as a whole.
    pub(crate) fn sentinel(&self, key: &str, value: &str) -> String {
        let mut sql = self.start(3 * key.len() + value.len());
        self.push_put(&mut sql, key, value);
        sql.push_str("; ");
        self.push_get(&mut sql, key);
        sql.push_str("; ");
        self.push_delete(&mut sql, key);
        sql
    }
}

/// The statements of one table as parameterized text, for the prepared form
/// (see [`with_prepared_statements`](crate::PostgresStateStore::with_prepared_statements)):
/// each is prepared once per connection (sqlx caches it by its text) and
/// then costs one round trip and no parse or plan. The server-side timeout
/// is the session's `statement_timeout` there (see `session.rs`), not a
/// prelude.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    /// `$1` key → the value as JSON text.
    pub get: String,
    /// `$1` key, `$2` JSON text.
    pub put: String,
    /// `$1` key.
    pub delete: String,
    /// `$1` keys, `$2` JSON texts (pairwise).
    pub upsert_many: String,
    /// `$1` keys.
    pub delete_many: String,
    /// `$1` keys, `$2` JSON texts, `$3` keys to delete (disjoint).
    pub write: String,
    /// `$1` key, `$2` JSON text; a row if the key had none and was written.
    pub insert_if_absent: String,
    /// `$1` key, `$2` expected JSON text, `$3` new JSON text; a row if the
    /// value equalled the expected one and was replaced.
    pub update_if_equal: String,
}

const ON_CONFLICT: &str =
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = NOW()";

impl Prepared {
    pub(crate) fn new(table: &TableName) -> Self {
        let t = table.quoted();
        let upsert_many = format!(
            "INSERT INTO {t} (key, value) SELECT k, v::jsonb \
             FROM UNNEST($1::text[], $2::text[]) AS batch(k, v) {ON_CONFLICT}"
        );
        Self {
            get: format!("SELECT value::text FROM {t} WHERE key = $1"),
            put: format!("INSERT INTO {t} (key, value) VALUES ($1, $2::jsonb) {ON_CONFLICT}"),
            delete: format!("DELETE FROM {t} WHERE key = $1"),
            write: format!(
                "WITH deleted AS (DELETE FROM {t} WHERE key = ANY($3::text[])) {upsert_many}"
            ),
            delete_many: format!("DELETE FROM {t} WHERE key = ANY($1::text[])"),
            insert_if_absent: format!(
                "INSERT INTO {t} (key, value) VALUES ($1, $2::jsonb) \
                 ON CONFLICT (key) DO NOTHING RETURNING 1"
            ),
            update_if_equal: format!(
                "UPDATE {t} SET value = $3::jsonb, updated_at = NOW() \
                 WHERE key = $1 AND value = $2::jsonb RETURNING 1"
            ),
            upsert_many,
        }
    }
}

/// The table's `fillfactor`: each page keeps a fifth free, so that an
/// update of a bookmark can put the new row version on the same page (a HOT
/// update: no new index entry to write now and vacuum later). Measured with
/// `cargo bench --bench sustained` (1,000,000 keys, an insert pass then an
/// update pass): 25% of updates HOT at 80 against 1% at the default 100,
/// for a heap 9% larger; the update pass was as fast within noise (+13% in
/// one run, -2% in the next).
pub(crate) const FILLFACTOR: u32 = 80;

/// `CREATE TABLE` for the state-store layout; also quoted in error hints for
/// operators who must create the table out of band.
pub(crate) fn create_table_sql(table: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (\
         key TEXT PRIMARY KEY, \
         value JSONB NOT NULL, \
         updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()) \
         WITH (fillfactor = {FILLFACTOR})",
        table.quoted()
    )
}

/// (column, type, not null, has a value of its own on insert: a default, an
/// identity or a generated expression) of each live column of `table`; no
/// rows when the table does not exist.
pub(crate) fn table_columns(table: &TableName) -> String {
    format!(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull, \
         (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') \
         FROM pg_attribute a \
         WHERE a.attrelid = to_regclass({}) AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum",
        literal(&table.quoted())
    )
}

/// Whether `key` alone is the primary key or a unique index that is checked
/// immediately, which `ON CONFLICT (key)` needs, and whether it only has a
/// deferrable one, which `ON CONFLICT` cannot use as its arbiter.
pub(crate) fn key_is_unique(table: &TableName) -> String {
    format!(
        "SELECT COALESCE(bool_or(i.indimmediate), false), COALESCE(bool_or(NOT i.indimmediate), false) \
         FROM pg_index i \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
         WHERE i.indrelid = to_regclass({}) AND i.indisunique AND i.indnatts = 1 \
         AND i.indpred IS NULL AND a.attname = 'key'",
        literal(&table.quoted())
    )
}

/// Who the probe is connected as, and where.
pub(crate) const WHOAMI: &str = "SELECT current_user::text, current_database()::text";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_cannot_be_escaped_from() {
        assert_eq!(literal("plain"), "E'plain'");
        assert_eq!(literal("it's"), "E'it''s'");
        assert_eq!(literal(r"a\'b"), r"E'a\\''b'");
        assert_eq!(literal("x\0y"), r"E'x\000y'");
        assert_eq!(literal("café €"), "E'café €'");
    }

    #[test]
    fn array_elements_cannot_be_escaped_from() {
        let mut sql = String::new();
        push_text_array(
            &mut sql,
            &["plain", r#"{"a":"b\\c"}"#, "it's", "NULL", "", "x\0y"],
        );
        assert_eq!(
            sql,
            r#"E'{"plain","{\\"a\\":\\"b\\\\\\\\c\\"}","it''s","NULL","","x\000y"}'::text[]"#
        );
    }

    #[test]
    fn every_message_is_bounded_by_the_statement_timeout() {
        let table = TableName::parse("t").unwrap();
        let sql = Statements::new(&table, Duration::from_millis(1500));
        for statement in [
            sql.get("k"),
            sql.put("k", "1"),
            sql.delete("k"),
            sql.write(&["a", "b"], &["1", "2"], &["c"]).unwrap(),
            sql.get_many(&["a"]),
            sql.list("p"),
            sql.sentinel("k", "1"),
        ] {
            assert!(
                statement.starts_with("SET LOCAL statement_timeout = '1500ms'; "),
                "{statement}"
            );
            assert_eq!(statement.matches("SET LOCAL").count(), 1, "{statement}");
        }
        let checking = Statements::new(&table, Duration::from_millis(1500)).checking_the_client();
        assert!(
            checking.get("k").starts_with(
                "SET LOCAL statement_timeout = '1500ms'; \
                 SET LOCAL client_connection_check_interval = '100ms'; SELECT"
            ),
            "{}",
            checking.get("k")
        );
        assert_eq!(timeout_millis(Duration::ZERO), 1);
        assert_eq!(timeout_millis(Duration::MAX), i32::MAX as u64);
    }
}
