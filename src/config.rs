//! Defaults and the validation of everything a caller configures.
//!
//! Validation happens before any SQL is sent: a bad table name or pool size is
//! refused when the store is built, a bad key when the operation is called.

use crate::error::StoreError;

/// Table used by [`PostgresStateStore::connect`](crate::PostgresStateStore::connect).
pub const DEFAULT_TABLE: &str = "faucet_state";

/// Pool size used by [`PostgresStateStore::connect`](crate::PostgresStateStore::connect).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 5;

/// Largest encoded JSON value, in bytes, that a store accepts by default (16 MiB).
///
/// Bookmarks are small; a value this large is almost always a bug (a whole
/// page stored as state). Raise it with
/// [`PostgresStateStore::with_max_value_bytes`](crate::PostgresStateStore::with_max_value_bytes).
pub const DEFAULT_MAX_VALUE_BYTES: usize = 16 * 1024 * 1024;

/// Longest identifier PostgreSQL keeps without truncating it (NAMEDATALEN - 1).
const MAX_IDENTIFIER_LEN: usize = 63;

/// A table name that is safe to splice into SQL.
///
/// Invariant: 1 to 63 ASCII letters, digits or `_`. Such a name cannot contain
/// a quote, so double-quoting it yields an identifier that PostgreSQL takes
/// verbatim (case preserved, no truncation, reserved words allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TableName(String);

impl TableName {
    pub(crate) fn parse(name: impl Into<String>) -> Result<Self, StoreError> {
        let name = name.into();
        let reason = if name.is_empty() {
            Some("it is empty")
        } else if name.len() > MAX_IDENTIFIER_LEN {
            Some("it is longer than 63 characters")
        } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            Some("it contains a character other than an ASCII letter, digit or '_'")
        } else {
            None
        };
        match reason {
            Some(reason) => Err(StoreError::InvalidTable { name, reason }),
            None => Ok(Self(name)),
        }
    }

    /// The name as the caller gave it.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// The name double-quoted, ready to splice into a statement.
    pub(crate) fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

/// Checks a pool size: zero connections would make every call time out.
pub(crate) fn validate_max_connections(max_connections: u32) -> Result<u32, StoreError> {
    if max_connections == 0 {
        Err(StoreError::ZeroConnections)
    } else {
        Ok(max_connections)
    }
}

/// Checks a key prefix for [`list`](crate::PostgresStateStore::list): the
/// characters a key may hold, and nothing else. The empty prefix lists every key.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.len() > 256 {
        return Err(StoreError::InvalidPrefix {
            prefix: prefix.to_owned(),
            reason: "it is longer than any valid key (256 characters)".to_owned(),
        });
    }
    match prefix
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.')))
    {
        Some((at, c)) => Err(StoreError::InvalidPrefix {
            prefix: prefix.to_owned(),
            reason: format!(
                "character {c:?} at byte {at} cannot occur in a key (keys use ASCII letters, digits, '_', '-', ':' and '.')"
            ),
        }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_postgres_identifiers() {
        for ok in ["faucet_state", "T1", "_x", &"a".repeat(63), "select"] {
            assert_eq!(TableName::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "",
            &"a".repeat(64),
            "a-b",
            "a.b",
            "a\"b",
            "a b",
            "tëst",
            "x;drop",
            "a\0b",
        ] {
            assert!(TableName::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert_eq!(TableName::parse("Mixed").unwrap().quoted(), "\"Mixed\"");
    }

    #[test]
    fn zero_connections_is_refused() {
        assert!(validate_max_connections(0).is_err());
        assert_eq!(validate_max_connections(1).unwrap(), 1);
    }

    #[test]
    fn prefixes_use_the_key_alphabet() {
        for ok in ["", "pipeline:", "a.b-c_d"] {
            validate_prefix(ok).unwrap();
        }
        for bad in ["%", "a_%", "a\\", "é", &"a".repeat(257)] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
