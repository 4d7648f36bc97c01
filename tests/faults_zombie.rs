//! The fault suite's zombie scenario, with real processes: instance A (a
//! child process of this test binary) writes continuously through a fenced
//! cached store; it is stopped with SIGSTOP at a seeded moment, usually in
//! the middle of a batch; instance B claims the scope and writes; A is
//! resumed. A trigger logs every committed row change of the table in
//! order: no write of A may come after B's claim. 20 seeded repetitions per
//! mode.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, Durability, PostgresStateStore};
use serde_json::json;
use sqlx::Row;

const SCOPE: &str = "zombie-pipeline";
const REPETITIONS: u64 = 20;
const CHILD: &str = "FAUCET_ZOMBIE_TABLE";

fn mode_named(name: &str) -> Durability {
    match name {
        "write_through" => Durability::WriteThrough,
        "group_commit" => Durability::GroupCommit,
        _ => Durability::WriteBehind,
    }
}

/// Instance A. Run only as the child process the scenario starts (it is
/// ignored otherwise): claims the scope, says so on stdout, then writes
/// until a write fails because it was fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "instance A of the zombie scenario; started as a child process by it"]
async fn zombie_instance() {
    let table = std::env::var(CHILD).expect("run by the zombie scenario");
    let mode = mode_named(&std::env::var("FAUCET_ZOMBIE_MODE").unwrap());
    let plain = PostgresStateStore::connect_with(&support::database_url(), 3, &table)
        .await
        .unwrap()
        .fence(SCOPE)
        .await
        .unwrap();
    let epoch = plain.fence_epoch().unwrap();
    let store = plain
        .cached(CacheOptions::new().durability(mode).max_batch(4))
        .unwrap();
    println!("claimed {epoch}");
    for n in 0u64.. {
        let value = json!({"writer": "A", "n": n});
        let mut written = store.put("cursor", &value).await;
        if written.is_ok() {
            written = store.put(&format!("partition-{}", n % 16), &value).await;
        }
        if written.is_ok() && mode == Durability::WriteBehind && n % 8 == 0 {
            written = store.flush().await;
        }
        match written {
            Ok(()) => {}
            Err(error) if error.to_string().contains("fenced by a newer instance") => {
                println!("fenced");
                return;
            }
            Err(error) => panic!("instance A failed otherwise: {error}"),
        }
    }
}

/// A child process running [`zombie_instance`], its stdout lines on a channel.
struct InstanceA {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl InstanceA {
    fn start(url: &str, table: &str, mode: &str) -> InstanceA {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "zombie_instance", "--nocapture"])
            .args(["--test-threads", "1", "--quiet"])
            .env("DATABASE_URL", url)
            .env(CHILD, table)
            .env("FAUCET_ZOMBIE_MODE", mode)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        InstanceA { child, lines }
    }

    /// Whether a line starting with `prefix` came within 30 s.
    fn wait_for_line(&self, prefix: &str) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("sh")
            .args(["-c", &format!("kill -{signal} {}", self.child.id())])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal}");
    }
}

impl Drop for InstanceA {
    fn drop(&mut self) {
        // Stops by itself once fenced; never outlives a failed scenario.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A deterministic pause in 0..max µs for repetition `seed`.
fn seeded_micros(seed: u64, max: u64) -> u64 {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    x ^= x >> 33;
    x % max
}

/// Creates the table with a trigger that logs every committed row change,
/// in the order the changes were made.
async fn logged_table(pool: &sqlx::PgPool, table: &str) {
    let plain = PostgresStateStore::from_pool(pool.clone(), table).unwrap();
    plain.ensure_table().await.unwrap();
    for statement in [
        format!("CREATE TABLE \"{table}_log\" (seq bigserial PRIMARY KEY, key text, value jsonb)"),
        format!(
            "CREATE FUNCTION \"{table}_log\"() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             INSERT INTO \"{table}_log\" (key, value) VALUES (NEW.key, NEW.value); RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER log AFTER INSERT OR UPDATE ON \"{table}\" \
             FOR EACH ROW EXECUTE FUNCTION \"{table}_log\"()"
        ),
    ] {
        sqlx::raw_sql(&statement).execute(pool).await.unwrap();
    }
}

async fn one_repetition(url: &str, pool: &sqlx::PgPool, mode: &str, seed: u64) {
    let table = support::unique_table(&format!("zombie_{mode}"));
    logged_table(pool, &table).await;
    let a = InstanceA::start(url, &table, mode);
    assert!(a.wait_for_line("claimed"), "instance A did not start");
    // A is writing: its cursor is in the table.
    let reader = PostgresStateStore::from_pool(pool.clone(), &table).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while reader.get("cursor").await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "A never wrote");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_micros(seeded_micros(seed, 20_000))).await;
    a.signal("STOP");

    let b = PostgresStateStore::connect_with(url, 2, &table)
        .await
        .unwrap()
        .fence(SCOPE)
        .await
        .unwrap();
    let epoch_b = b.fence_epoch().unwrap();
    b.put("cursor", &json!({"writer": "B"})).await.unwrap();
    a.signal("CONT");
    // The log is checked first: it says more than a missing line would.
    let fenced = a.wait_for_line("fenced");

    let log = sqlx::query(&format!(
        "SELECT seq, key, value->>'writer', (value->>'epoch')::bigint FROM \"{table}_log\" ORDER BY seq"
    ))
    .fetch_all(pool)
    .await
    .unwrap();
    let claim = log
        .iter()
        .find(|row| row.get::<Option<i64>, _>(3) == Some(epoch_b))
        .map(|row| row.get::<i64, _>(0))
        .expect("B's claim is logged");
    let a_writes: Vec<i64> = log
        .iter()
        .filter(|row| row.get::<Option<String>, _>(2).as_deref() == Some("A"))
        .map(|row| row.get(0))
        .collect();
    assert!(!a_writes.is_empty(), "{mode} seed {seed}: A wrote nothing");
    let late: Vec<&i64> = a_writes.iter().filter(|&&seq| seq > claim).collect();
    assert!(
        late.is_empty(),
        "{mode} seed {seed}: {} writes of A landed after B's claim (log entry {claim}), \
         the first at log entries {:?}",
        late.len(),
        &late[..late.len().min(5)]
    );
    assert!(fenced, "{mode} seed {seed}: A was never told it was fenced");
    assert_eq!(
        reader.get("cursor").await.unwrap(),
        Some(json!({"writer": "B"})),
        "{mode} seed {seed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_never_writes_after_a_newer_claim() {
    let url = support::database_url();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for mode in ["write_behind", "group_commit", "write_through"] {
        for seed in 0..REPETITIONS {
            one_repetition(&url, &pool, mode, seed).await;
        }
    }
}
