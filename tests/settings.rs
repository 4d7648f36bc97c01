//! The configuration a pipeline file carries: parsing, defaults, validation,
//! and building a working store from it.

mod support;

use std::time::Duration;

use faucet_core::FaucetError;
use faucet_core::state::StateStore;
use faucet_state_postgres::{Durability, PostgresStateConfig};
use serde_json::json;

fn parse(value: serde_json::Value) -> Result<PostgresStateConfig, String> {
    serde_json::from_value(value).map_err(|e| e.to_string())
}

fn config_error(config: &PostgresStateConfig) -> String {
    match config.validate() {
        Err(FaucetError::Config(msg)) => msg,
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

#[test]
fn only_the_url_is_required_and_the_rest_defaults() {
    let config = parse(json!({"url": "postgres://app@db/app"})).unwrap();
    config.validate().unwrap();
    assert_eq!(config.table, "faucet_state");
    assert_eq!(config.max_connections, 5);
    assert!(config.ensure_table);
    assert_eq!(config.mode, Durability::GroupCommit);
    assert_eq!(config.flush_interval, Duration::from_secs(1));
    assert_eq!((config.max_batch, config.max_pending), (1000, 100_000));
    assert_eq!(config.put_timeout, Duration::from_secs(5));
    assert_eq!(config.cache_capacity, 100_000);
    assert_eq!(config.max_value_bytes, 16 * 1024 * 1024);
    assert_eq!(config.max_batch_bytes, 32 * 1024 * 1024);
    assert_eq!(config.write_timeout, Duration::from_secs(30));
    assert_eq!(config.statement_timeout, Duration::from_secs(30));
    let err = config_error(&parse(json!({})).unwrap());
    assert!(err.contains("url is required"), "{err}");
}

#[test]
fn durations_are_written_in_human_form() {
    let config = parse(json!({
        "url": "postgres://db/app",
        "mode": "write_behind",
        "flush_interval": "500ms",
        "put_timeout": "2s",
        "shutdown_timeout": "1m 30s",
        "retry_backoff_max": "750ms",
        "write_timeout": "3s",
        "statement_timeout": "1500ms"
    }))
    .unwrap();
    assert_eq!(config.mode, Durability::WriteBehind);
    assert_eq!(config.flush_interval, Duration::from_millis(500));
    assert_eq!(config.put_timeout, Duration::from_secs(2));
    assert_eq!(config.shutdown_timeout, Duration::from_secs(90));
    assert_eq!(config.statement_timeout, Duration::from_millis(1500));
    let options = config.cache_options();
    assert_eq!(options.get_write_timeout(), Duration::from_secs(3));
    assert_eq!(options.get_retry_backoff_max(), Duration::from_millis(750));
    assert_eq!(options.get_name(), "faucet_state");
    let err = parse(json!({"url": "x", "flush_interval": "fast"})).unwrap_err();
    assert!(
        err.contains("flush_interval") || err.contains("fast"),
        "{err}"
    );
}

#[test]
fn mistakes_are_refused_with_the_field_and_the_rule() {
    let err = parse(json!({"url": "x", "mode": "turbo"})).unwrap_err();
    assert!(
        err.contains("unknown variant `turbo`") && err.contains("write_behind"),
        "{err}"
    );
    let err = parse(json!({"url": "x", "flush_intervall": "1s"})).unwrap_err();
    assert!(err.contains("unknown field `flush_intervall`"), "{err}");

    let base = json!({"url": "postgres://db/app"});
    for (field, value, rule) in [
        (
            "max_connections",
            json!(0),
            "max_connections must be at least 1",
        ),
        (
            "flush_interval",
            json!("0s"),
            "flush_interval must be greater than zero",
        ),
        (
            "retry_backoff_max",
            json!("0ms"),
            "retry_backoff_max must be greater than zero",
        ),
        ("max_batch", json!(0), "max_batch must be at least 1"),
        ("max_pending", json!(0), "max_pending must be at least 1"),
        (
            "max_batch_bytes",
            json!(0),
            "max_batch_bytes must be at least 1",
        ),
        (
            "statement_timeout",
            json!("0s"),
            "statement_timeout must be at least 1ms",
        ),
        (
            "max_value_bytes",
            json!(0),
            "max_value_bytes must be at least 1",
        ),
        ("table", json!("bad-name"), "invalid table name"),
        ("fence", json!("not a scope"), "invalid fence scope"),
    ] {
        let mut value_json = base.clone();
        value_json[field] = value;
        let err = config_error(&parse(value_json).unwrap());
        assert!(err.contains(rule), "{field}: {err}");
    }
}

#[test]
fn debug_hides_the_password() {
    let config = parse(json!({"url": "postgres://app:hunter2@db/app?password=hunter2"})).unwrap();
    let shown = format!("{config:?}");
    assert!(
        !shown.contains("hunter2") && shown.contains("app:***@db"),
        "{shown}"
    );
}

#[test]
fn serializing_hides_the_password_too() {
    let config = parse(json!({"url": "postgres://app:hunter2@db/app?password=hunter2"})).unwrap();
    let written = serde_json::to_string(&config).unwrap();
    assert!(
        !written.contains("hunter2") && written.contains("app:***@db"),
        "{written}"
    );
    // What was written still parses, with every other field kept.
    let back: PostgresStateConfig = serde_json::from_str(&written).unwrap();
    assert_eq!(back.max_batch_bytes, config.max_batch_bytes);
}

#[tokio::test]
async fn a_config_builds_a_working_store() {
    let config = parse(json!({
        "url": support::database_url(),
        "table": support::unique_table("settings"),
        "max_connections": 2,
        "mode": "write_behind",
        "flush_interval": "50ms",
        "max_value_bytes": 1024,
        "statement_timeout": "5s",
        "fence": "settings-pipeline"
    }))
    .unwrap();
    let store = config.connect().await.unwrap();
    let epoch = store
        .backend()
        .fence_epoch()
        .expect("the scope was claimed");
    store.put("k", &json!({"from": "config"})).await.unwrap();
    assert!(store.put("big", &json!("x".repeat(2000))).await.is_err());
    store.shutdown().await.unwrap();
    assert_eq!(
        store.backend().get("k").await.unwrap(),
        Some(json!({"from": "config"}))
    );
    assert_eq!(store.options().get_durability(), Durability::WriteBehind);
    assert_eq!(store.options().get_name(), config.table);
    assert_eq!(store.backend().statement_timeout(), Duration::from_secs(5));
    // A second instance from the same file fences the first.
    let newer = config.connect().await.unwrap();
    assert!(newer.backend().fence_epoch().unwrap() > epoch);
    newer.put("k", &json!(2)).await.unwrap();
    newer.shutdown().await.unwrap();
    let refused = store.backend().put("k", &json!(1)).await.unwrap_err();
    assert!(
        refused.to_string().contains("fenced by a newer instance"),
        "{refused}"
    );
    assert_eq!(newer.backend().get("k").await.unwrap(), Some(json!(2)));
}
