//! How long writes stop when the primary dies and its synchronous standby is
//! promoted, with a multi-host `target_session_attrs=read-write` URL, and
//! whether any acknowledged write is lost.
//!
//! ```text
//! cargo bench --bench failover
//! ```
//!
//! Per durability mode: a primary and a `pg_basebackup -R` standby
//! replicating synchronously, a cached store on both hosts, one writer
//! putting `k0, k1, …` back to back. After 200 acknowledged puts the primary
//! is stopped (`pg_ctl stop -m immediate`, a crash); 300 ms later (standing
//! in for a failover manager's detection) the standby is promoted
//! (`pg_ctl promote -w`). Printed: the time from the promotion's end to the
//! next acknowledged put, and the acknowledged writes missing from the new
//! primary afterwards (write-behind acknowledges with a completed `flush()`
//! after every put here, so that all three modes count the same). Under
//! `cargo test --benches` one round per mode runs, as a smoke test; `cargo
//! bench` runs five.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, Durability, PostgresStateStore};
use serde_json::json;
use sqlx::Connection;
use support::{PgServer, SUPERUSER_PASSWORD};

const MODES: [Durability; 3] = [
    Durability::WriteThrough,
    Durability::GroupCommit,
    Durability::WriteBehind,
];

async fn make_synchronous(primary: &PgServer) {
    let mut conn = sqlx::PgConnection::connect(&primary.url()).await.unwrap();
    for statement in [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::raw_sql(statement).execute(&mut conn).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap()
        != 1
    {
        assert!(
            Instant::now() < deadline,
            "the standby never became synchronous"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One failover in `mode`: (recovery after promotion, acknowledged writes lost).
async fn round(mode: Durability) -> (Duration, usize) {
    let primary = PgServer::start();
    let standby = PgServer::start_standby_of(&primary);
    make_synchronous(&primary).await;
    let url = format!(
        "postgres://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{},127.0.0.1:{}/postgres\
         ?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let table = support::unique_table("failover");
    let plain = PostgresStateStore::connect_with(&url, 4, &table)
        .await
        .unwrap();
    plain.ensure_table().await.unwrap();
    let store = Arc::new(plain.cached(CacheOptions::new().durability(mode)).unwrap());
    let acked: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let writer = {
        let (store, acked) = (store.clone(), acked.clone());
        tokio::spawn(async move {
            for n in 0u64.. {
                let key = format!("k{n}");
                // A put the store gave up on is not acknowledged; try the
                // next key.
                if store.put(&key, &json!(n)).await.is_err() {
                    continue;
                }
                if mode == Durability::WriteBehind && store.flush().await.is_err() {
                    continue;
                }
                acked.lock().unwrap().push((n, Instant::now()));
            }
        })
    };
    while acked.lock().unwrap().len() < 200 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    primary.stop_immediate();
    tokio::time::sleep(Duration::from_millis(300)).await;
    standby.promote();
    let promoted = Instant::now();
    let deadline = promoted + Duration::from_secs(60);
    let recovered = loop {
        if let Some((_, at)) = acked.lock().unwrap().iter().find(|(_, at)| *at > promoted) {
            break *at - promoted;
        }
        assert!(
            Instant::now() < deadline,
            "no write committed within 60 s of the promotion"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    writer.abort();
    let _ = writer.await;
    let acked: Vec<u64> = acked.lock().unwrap().iter().map(|(n, _)| *n).collect();
    let mut conn = sqlx::PgConnection::connect(&standby.url()).await.unwrap();
    let on_new_primary: Vec<String> = sqlx::query_scalar(&format!("SELECT key FROM {table}"))
        .fetch_all(&mut conn)
        .await
        .unwrap();
    let lost = acked
        .iter()
        .filter(|n| !on_new_primary.contains(&format!("k{n}")))
        .count();
    (recovered, lost)
}

fn main() {
    let rounds = if common::full_run() { 5 } else { 1 };
    let runtime = common::runtime();
    runtime.block_on(async {
        for mode in MODES {
            let mut recoveries = Vec::new();
            let mut lost = 0;
            for _ in 0..rounds {
                let (recovered, lost_here) = round(mode).await;
                recoveries.push(recovered);
                lost += lost_here;
            }
            recoveries.sort();
            let ms: Vec<String> = recoveries
                .iter()
                .map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0))
                .collect();
            println!(
                "failover {mode:?}: first acknowledged write {} ms after the promotion \
                 ({rounds} rounds, sorted); acknowledged writes lost: {lost}",
                ms.join(" / ")
            );
            assert_eq!(lost, 0, "{mode:?}: acknowledged writes lost in a failover");
        }
    });
}
