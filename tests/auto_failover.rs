//! Failovers run by a real failover manager (issue 23): a pg_auto_failover
//! formation on loopback (a monitor, a primary and a synchronous secondary;
//! see `tests/formation`), the store on the formation's multi-host
//! `target_session_attrs=read-write` URL, four writers running throughout.
//! In every durability mode: a planned switchover (`pg_autoctl perform
//! switchover`), then the primary killed (its `pg_autoctl` SIGKILLed, its
//! PostgreSQL stopped `-m immediate`) and failed over by the monitor. Every
//! write acknowledged (by `put` in write-through and group commit, by a
//! completed `flush()` in write-behind) must be on the primary afterwards,
//! and writes must resume by themselves. The time from each promotion to the
//! next acknowledged write is reported on stderr, not asserted.

mod formation;
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, PostgresStateStore};
use formation::Formation;
use serde_json::json;
use sqlx::Connection;

const MODES: [Durability; 3] = [
    Durability::WriteThrough,
    Durability::GroupCommit,
    Durability::WriteBehind,
];
const WRITERS: usize = 4;

/// Writes acknowledged so far: (key, when).
type Acks = Arc<Mutex<Vec<(String, Instant)>>>;

fn start_writers(
    store: &Arc<CachedStateStore>,
    mode: Durability,
    acks: &Acks,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|writer| {
            let (store, acks) = (store.clone(), acks.clone());
            tokio::spawn(async move {
                for n in 0u64.. {
                    let key = format!("w{writer}-{n}");
                    // A put the store gave up on (during the switch) is not
                    // acknowledged; go on with the next key.
                    if store.put(&key, &json!(n)).await.is_err() {
                        continue;
                    }
                    if mode == Durability::WriteBehind && store.flush().await.is_err() {
                        continue;
                    }
                    acks.lock().unwrap().push((key, Instant::now()));
                }
            })
        })
        .collect()
}

/// Waits until `more` writes were acknowledged after `since`; returns how
/// long after `since` the first of them was. Fails after waiting 60 s.
async fn acknowledged_after(acks: &Acks, since: Instant, more: usize) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let after: Vec<Instant> = acks
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, at)| *at > since)
            .map(|(_, at)| *at)
            .collect();
        if after.len() >= more {
            return after[0] - since;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not resume within 60 s ({} after)",
            after.len()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs a blocking formation step off the runtime's threads.
async fn step<T: Send + 'static>(
    formation: Formation,
    action: impl FnOnce(&mut Formation) -> T + Send + 'static,
) -> (Formation, T) {
    tokio::task::spawn_blocking(move || {
        let mut formation = formation;
        let out = action(&mut formation);
        (formation, out)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchovers_and_failovers_lose_no_acknowledged_write() {
    let mut formation = tokio::task::spawn_blocking(Formation::start).await.unwrap();
    for mode in MODES {
        let table = format!("auto_failover_{}", format!("{mode:?}").to_lowercase());
        let plain = PostgresStateStore::connect_with(&formation.uri(), WRITERS as u32, &table)
            .await
            .unwrap();
        plain.ensure_table().await.unwrap();
        let store = Arc::new(plain.cached(CacheOptions::new().durability(mode)).unwrap());
        let acks: Acks = Arc::default();
        let began = Instant::now();
        let writers = start_writers(&store, mode, &acks);
        acknowledged_after(&acks, began, 200).await;

        let (f, _) = step(formation, |f| f.switchover()).await;
        formation = f;
        let after_switchover = acknowledged_after(&acks, Instant::now(), 100).await;

        let (f, killed) = step(formation, Formation::kill_primary).await;
        formation = f;
        let after_failover = acknowledged_after(&acks, Instant::now(), 100).await;

        for writer in writers {
            writer.abort();
            let _ = writer.await;
        }
        store.flush().await.unwrap();
        let acked: Vec<String> = acks
            .lock()
            .unwrap()
            .iter()
            .map(|(k, _)| k.clone())
            .collect();
        let mut conn = sqlx::PgConnection::connect(&formation.primary_url())
            .await
            .unwrap();
        let held: std::collections::HashSet<String> =
            sqlx::query_scalar(&format!("SELECT key FROM {table}"))
                .fetch_all(&mut conn)
                .await
                .unwrap()
                .into_iter()
                .collect();
        let lost: Vec<&String> = acked.iter().filter(|k| !held.contains(*k)).collect();
        eprintln!(
            "auto_failover {mode:?}: {} writes acknowledged; first write acknowledged \
             {after_switchover:?} after the switchover returned and {after_failover:?} after \
             the failover was reported; {} lost",
            acked.len(),
            lost.len()
        );
        assert!(
            lost.is_empty(),
            "{mode:?}: acknowledged writes lost: {lost:?}"
        );
        store.shutdown().await.unwrap();
        let (f, _) = step(formation, move |f| f.rejoin(killed)).await;
        formation = f;
    }

    // The secondary listed first: everything still goes to the primary.
    let table = "auto_failover_secondary_first";
    let plain = PostgresStateStore::connect_with(&formation.uri_secondary_first(), 2, table)
        .await
        .unwrap();
    plain.ensure_table().await.unwrap();
    for mode in MODES {
        let store = PostgresStateStore::connect_with(&formation.uri_secondary_first(), 2, table)
            .await
            .unwrap()
            .cached(CacheOptions::new().durability(mode))
            .unwrap();
        store.put(&format!("{mode:?}"), &json!(1)).await.unwrap();
        store.shutdown().await.unwrap();
    }
    let mut conn = sqlx::PgConnection::connect(&formation.primary_url())
        .await
        .unwrap();
    let count: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 3);
}
