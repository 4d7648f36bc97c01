//! Writes a real server refuses: a database encoding that cannot hold a
//! value, a CHECK constraint, a trigger; and table layouts on which every
//! write would fail, which `ensure_table()` and `check()` refuse up front.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use faucet_core::check::{CheckContext, ProbeStatus};
use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, PostgresStateStore};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;

async fn plain_on(url: &str, tag: &str) -> PostgresStateStore {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
        .connect(url)
        .await
        .unwrap();
    let store = PostgresStateStore::from_pool(pool, support::unique_table(tag)).unwrap();
    store.ensure_table().await.unwrap();
    store
}

fn options(durability: Durability) -> CacheOptions {
    CacheOptions::new()
        .durability(durability)
        .flush_interval(Duration::from_secs(3600))
        .shutdown_timeout(Duration::from_millis(300))
}

async fn table_rows(store: &CachedStateStore) -> HashMap<String, Value> {
    let plain = store.backend();
    let rows: Vec<(String, Value)> =
        sqlx::query_as(&format!("SELECT key, value FROM \"{}\"", plain.table()))
            .fetch_all(plain.pool())
            .await
            .unwrap();
    rows.into_iter().collect()
}

async fn execute(store: &PostgresStateStore, sql: &str) {
    sqlx::query(sql).execute(store.pool()).await.unwrap();
}

/// A LATIN1 database on the throwaway server; `None` against `DATABASE_URL`,
/// where the tests may not create databases.
async fn latin1_database_url() -> Option<String> {
    if !support::is_throwaway() {
        return None;
    }
    let url = support::database_url();
    let name = format!("latin1_{}", std::process::id());
    let admin = PgPoolOptions::new().connect(&url).await.unwrap();
    let create = format!(
        "CREATE DATABASE {name} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    );
    if let Err(e) = sqlx::query(&create).execute(&admin).await {
        assert!(e.to_string().contains("already exists"), "{e}");
    }
    let (server, _database) = url.rsplit_once('/').expect("a URL with a database");
    Some(format!("{server}/{name}"))
}

#[tokio::test]
async fn a_value_the_database_encoding_cannot_hold_blocks_no_other_key() {
    let Some(url) = latin1_database_url().await else {
        return;
    };
    for durability in [Durability::GroupCommit, Durability::WriteBehind] {
        let store = plain_on(&url, "latin1")
            .await
            .cached(options(durability))
            .unwrap();
        let mut goods = Vec::new();
        for i in 0..50 {
            let key = format!("good{i:02}");
            store
                .put(&key, &json!({"n": i, "s": "café"}))
                .await
                .unwrap();
            goods.push(key);
        }
        // The euro sign has no LATIN1 equivalent.
        let bad = store.put("bad", &json!("café €")).await;
        let flushed = store.flush().await;
        let errors = match durability {
            Durability::GroupCommit => vec![bad.unwrap_err().to_string()],
            _ => vec![flushed.unwrap_err().to_string()],
        };
        for err in errors {
            assert!(
                err.contains("'bad'") && err.contains("LATIN1"),
                "{durability:?}: {err}"
            );
        }
        let rows = table_rows(&store).await;
        assert_eq!(rows.len(), 50, "{durability:?}: every good key committed");
        assert_eq!(rows["good07"], json!({"n": 7, "s": "café"}));
        assert_eq!(store.stats().refused_writes.len(), 1);
        // A newer, storable write of the key replaces the refused one.
        store.put("bad", &json!("cafe EUR")).await.unwrap();
        store.shutdown().await.unwrap();
        assert_eq!(table_rows(&store).await["bad"], json!("cafe EUR"));
    }
}

#[tokio::test]
async fn a_check_constraint_and_a_trigger_refuse_single_keys_not_batches() {
    let plain = plain_on(&support::database_url(), "constraint").await;
    let table = format!("\"{}\"", plain.table());
    execute(
        &plain,
        &format!(
            "ALTER TABLE {table} ADD CONSTRAINT no_poison CHECK (value <> '\"poison\"'::jsonb)"
        ),
    )
    .await;
    let function = format!("{}_guard", plain.table());
    execute(
        &plain,
        &format!(
            "CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.key = 'forbidden' THEN RAISE EXCEPTION 'key % is forbidden here', NEW.key; END IF; \
             RETURN NEW; END $$"
        ),
    )
    .await;
    execute(
        &plain,
        &format!(
            "CREATE TRIGGER guard BEFORE INSERT OR UPDATE ON {table} \
             FOR EACH ROW EXECUTE FUNCTION {function}()"
        ),
    )
    .await;
    let store = plain.cached(options(Durability::WriteBehind)).unwrap();
    for i in 0..300 {
        store.put(&format!("k{i:03}"), &json!(i)).await.unwrap();
    }
    store.put("k150", &json!("poison")).await.unwrap();
    store.put("forbidden", &json!(1)).await.unwrap();
    let err = store.flush().await.unwrap_err().to_string();
    assert!(
        err.contains("key 'k150'") && err.contains("no_poison"),
        "the error names the key and the server's reason: {err}"
    );
    assert!(
        err.contains("key 'forbidden'") && err.contains("is forbidden here"),
        "{err}"
    );
    let rows = table_rows(&store).await;
    assert_eq!(rows.len(), 299, "all but the two refused keys committed");
    assert_eq!(rows["k151"], json!(151));
    assert_eq!(rows.get("k150"), None);

    // Write-through reports its own refusal the same way.
    let through = PostgresStateStore::clone(store.backend())
        .cached(options(Durability::WriteThrough))
        .unwrap();
    let err = through.put("k000", &json!("poison")).await.unwrap_err();
    assert!(
        err.to_string().contains("key 'k000'") && err.to_string().contains("no_poison"),
        "{err}"
    );
    through.shutdown().await.unwrap();
    assert!(
        store.shutdown().await.is_err(),
        "the refused writes are reported"
    );
}

#[tokio::test]
async fn layouts_on_which_every_write_fails_are_refused_by_ensure_table_and_check() {
    let url = support::database_url();
    let pool = PgPoolOptions::new().connect(&url).await.unwrap();
    let cases = [
        (
            "deferrable",
            "key TEXT UNIQUE DEFERRABLE INITIALLY DEFERRED, value JSONB NOT NULL, \
             updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW()",
            "DEFERRABLE",
        ),
        (
            "extra_not_null",
            "key TEXT PRIMARY KEY, value JSONB NOT NULL, \
             updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), owner TEXT NOT NULL",
            "column owner is NOT NULL without a default",
        ),
    ];
    for (tag, columns, expected) in cases {
        let table = support::unique_table(tag);
        sqlx::query(&format!("CREATE TABLE \"{table}\" ({columns})"))
            .execute(&pool)
            .await
            .unwrap();
        let store = PostgresStateStore::from_pool(pool.clone(), &table).unwrap();
        let err = store.ensure_table().await.unwrap_err().to_string();
        assert!(err.contains(expected), "{tag}: {err}");
        let report = store.check(&CheckContext::default()).await.unwrap();
        let probe = report.probes.iter().find(|p| p.name == "table").unwrap();
        assert!(
            matches!(&probe.status, ProbeStatus::Fail { reason, .. } if reason.contains(expected)),
            "{tag}: {probe:?}"
        );
    }
    // A NOT NULL column with a default is fine: the store never names it.
    let table = support::unique_table("extra_default");
    sqlx::query(&format!(
        "CREATE TABLE \"{table}\" (key TEXT PRIMARY KEY, value JSONB NOT NULL, \
         updated_at TIMESTAMPTZ NOT NULL DEFAULT NOW(), owner TEXT NOT NULL DEFAULT 'me')"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let store = PostgresStateStore::from_pool(pool.clone(), &table).unwrap();
    store.ensure_table().await.unwrap();
    store.put("k", &json!(1)).await.unwrap();
}
