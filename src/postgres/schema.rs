//! The table: checking that it has the state-store layout, and creating it.

use sqlx::Row;

use crate::config::TableName;
use crate::error::{StoreError, describe_sqlx, sqlstate};
use crate::exec::Executor;
use crate::sql;

/// What the catalog says about the store's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layout {
    /// No relation of that name in the search path.
    Missing,
    /// The three columns with their types, and `key` unique.
    Ready,
    /// A relation exists but the store cannot use it; the text says why.
    Wrong(String),
}

/// Reads the table's columns and key index from the catalog. Needs no
/// privilege on the table itself, so it also works for a read-only role.
pub(crate) async fn inspect(exec: &Executor, table: &TableName) -> Result<Layout, sqlx::Error> {
    let columns = exec
        .fetch(&sql::table_columns(table))
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            ))
        })
        .collect::<Result<Vec<(String, String, bool, bool)>, sqlx::Error>>()?;
    if columns.is_empty() {
        return Ok(Layout::Missing);
    }
    const EXPECTED: [(&str, &str); 3] = [
        ("key", "text"),
        ("value", "jsonb"),
        ("updated_at", "timestamp with time zone"),
    ];
    for (name, ty) in EXPECTED {
        match columns.iter().find(|(column, ..)| column == name) {
            None => return Ok(Layout::Wrong(format!("column {name} is missing"))),
            Some((_, actual, ..)) if actual != ty => {
                return Ok(Layout::Wrong(format!(
                    "column {name} is {actual}, expected {ty}"
                )));
            }
            Some(_) => {}
        }
    }
    // The store inserts only the three columns: another NOT NULL column with
    // no value of its own would make every insert fail.
    if let Some((name, ..)) = columns.iter().find(|(name, _, not_null, has_default)| {
        *not_null && !*has_default && !EXPECTED.iter().any(|(expected, _)| expected == name)
    }) {
        return Ok(Layout::Wrong(format!(
            "column {name} is NOT NULL without a default, so every insert by the store would fail; \
             give it a default or drop NOT NULL"
        )));
    }
    let rows = exec.fetch(&sql::key_is_unique(table)).await?;
    let row = rows.first().ok_or(sqlx::Error::RowNotFound)?;
    let (immediate, deferrable): (bool, bool) = (row.try_get(0)?, row.try_get(1)?);
    if !immediate {
        return Ok(Layout::Wrong(if deferrable {
            "the unique key on column key is DEFERRABLE, which INSERT ... ON CONFLICT cannot use; \
             make it NOT DEFERRABLE"
                .to_owned()
        } else {
            "column key is neither the primary key nor uniquely indexed".to_owned()
        }));
    }
    Ok(Layout::Ready)
}

/// Makes sure the table exists with the state-store layout.
///
/// An existing table with the right layout is left alone, without DDL, so a
/// role that may only read and write rows can call this on every start. A
/// missing table is created; a table with another layout is an error.
pub(crate) async fn ensure(exec: &Executor, table: &TableName) -> Result<(), StoreError> {
    let query_error = |e: sqlx::Error| StoreError::Query {
        op: "ensure_table",
        table: table.as_str().to_owned(),
        reason: describe_sqlx(&e),
        refused: false,
    };
    match inspect(exec, table).await.map_err(query_error)? {
        Layout::Ready => return Ok(()),
        Layout::Wrong(problem) => {
            return Err(StoreError::Layout {
                table: table.as_str().to_owned(),
                problem,
            });
        }
        Layout::Missing => {}
    }
    let ddl = sql::create_table_sql(table);
    match exec.fetch(&ddl).await {
        Ok(_) => Ok(()),
        // Two processes creating the table at once: the loser trips over the
        // winner's catalog rows. The table exists either way.
        Err(e) if matches!(sqlstate(&e).as_deref(), Some("23505" | "42P07")) => Ok(()),
        Err(e) if sqlstate(&e).as_deref() == Some("42501") => Err(StoreError::Query {
            op: "ensure_table",
            table: table.as_str().to_owned(),
            reason: format!(
                "the role may not create tables ({}); create the table out of band with \
                 `{ddl}` and grant this role SELECT, INSERT, UPDATE and DELETE on it",
                crate::error::cause_of(&e)
            ),
            refused: false,
        }),
        Err(e) => Err(query_error(e)),
    }
}
