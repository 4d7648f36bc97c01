//! The fault suite: what survives when things break, against a real
//! PostgreSQL. Every scenario reports (on stderr, uncaptured) what it tried,
//! how many faults it injected and how many acknowledged writes were lost,
//! and asserts that number is zero. Random choices come from a seed that is
//! reported and can be replayed with `FAUCET_FAULT_SEED`.
//!
//! ```text
//! cargo test --test faults
//! ```

mod fault_support;
mod row_locks;
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use faucet_core::state::{MemoryStateStore, StateStore};
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, PostgresStateStore};
use fault_support::{CHILD_ROLE, Cutter, FaultProxy, Rng, counter_of, counter_value, report, seed};
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;

/// The test through which child processes of this binary run.
const CHILD_ENTRY: &str = "child_process_entry";
const MODES: [Durability; 3] = [
    Durability::WriteThrough,
    Durability::GroupCommit,
    Durability::WriteBehind,
];

fn mode_name(mode: Durability) -> &'static str {
    match mode {
        Durability::WriteThrough => "write_through",
        Durability::GroupCommit => "group_commit",
        Durability::WriteBehind => "write_behind",
    }
}

fn mode_named(name: &str) -> Durability {
    MODES
        .into_iter()
        .find(|m| mode_name(*m) == name)
        .expect("known mode")
}

/// A pool that gives up on an unreachable server after a second, so that
/// outages make batches fail quickly instead of after ten seconds.
async fn quick_pool(url: &str) -> sqlx::PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .test_before_acquire(false)
        .acquire_timeout(Duration::from_secs(1))
        .connect(url)
        .await
        .expect("connect")
}

async fn plain_table(url: &str, table: &str) -> PostgresStateStore {
    let store = PostgresStateStore::from_pool(quick_pool(url).await, table).unwrap();
    store.ensure_table().await.unwrap();
    store
}

fn options(mode: Durability) -> CacheOptions {
    CacheOptions::new()
        .durability(mode)
        .flush_interval(Duration::from_millis(20))
        .max_batch(4)
        .retry_backoff_max(Duration::from_millis(100))
}

/// Flushes until it succeeds (the store recovers by itself), or gives up.
async fn flush_until_ok(store: &CachedStateStore) {
    for _ in 0..100 {
        if store.flush().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the store did not recover: {:?}", store.stats());
}

/// Counts keys whose stored row differs from the value last written.
async fn lost_writes(plain: &PostgresStateStore, last: &HashMap<String, Option<Value>>) -> usize {
    let keys: Vec<&String> = last.keys().collect();
    let stored = plain.get_many(&keys).await.unwrap();
    keys.iter()
        .zip(stored)
        .filter(|(key, row)| last[**key] != *row)
        .count()
}

/// A writer under faults: remembers the last acknowledged value of each key,
/// and which keys' rows are uncertain because their latest write failed
/// without being queued (a write-through commit whose outcome was not seen).
#[derive(Default)]
struct Writer {
    acknowledged: HashMap<String, Option<Value>>,
    uncertain: std::collections::HashSet<String>,
    writes: usize,
    errors: usize,
}

impl Writer {
    async fn put(&mut self, store: &CachedStateStore, key: String, value: Value) {
        self.writes += 1;
        match store.put(&key, &value).await {
            Ok(()) => {
                self.uncertain.remove(&key);
                self.acknowledged.insert(key, Some(value));
            }
            // Group commit: staged, its batch failed; it stays queued and is
            // retried, so it counts as written.
            Err(e) if e.to_string().contains("stays queued") => {
                self.errors += 1;
                self.uncertain.remove(&key);
                self.acknowledged.insert(key, Some(value));
            }
            Err(_) => {
                self.errors += 1;
                self.uncertain.insert(key);
            }
        }
    }

    /// Repeats the last acknowledged write of each uncertain key (only
    /// those: repeating the others could hide a lost write), waits for the
    /// store to persist everything, and counts the keys whose row differs
    /// from their last acknowledged value.
    async fn settle_and_count_lost(
        &self,
        store: &CachedStateStore,
        direct: &PostgresStateStore,
    ) -> usize {
        for key in &self.uncertain {
            let mut repeated = false;
            for _ in 0..50 {
                let result = match self.acknowledged.get(key) {
                    Some(Some(value)) => store.put(key, value).await,
                    _ => store.delete(key).await,
                };
                if result.is_ok() {
                    repeated = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                repeated,
                "could not repeat the write of {key}: {:?}",
                store.stats()
            );
        }
        flush_until_ok(store).await;
        let mut expected = self.acknowledged.clone();
        for key in &self.uncertain {
            expected.entry(key.clone()).or_insert(None);
        }
        lost_writes(direct, &expected).await
    }
}

// ── Process crash ─────────────────────────────────────────────────────────

/// A child writing increasing counters is killed with SIGKILL at random
/// moments; every row must hold a whole written value, at least the last one
/// acknowledged (by `put` in write-through and group commit, by a completed
/// `flush()` in write-behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_loses_no_acknowledged_write() {
    let url = support::database_url();
    let mut rng = Rng::new(seed("process-crash"));
    for mode in MODES {
        let (mut kills, mut acks, mut lost) = (0, 0, 0);
        for _ in 0..7 {
            let table = support::unique_table("crash");
            let plain = plain_table(&url, &table).await;
            let mut child = fault_support::child(CHILD_ENTRY, "crash_writer")
                .env("DATABASE_URL", &url)
                .env("FAULT_TABLE", &table)
                .env("FAULT_MODE", mode_name(mode))
                .spawn()
                .expect("spawn the writer");
            let stdout = child.stdout.take().expect("child stdout");
            let started = Arc::new(AtomicBool::new(false));
            let reader = std::thread::spawn({
                let started = started.clone();
                move || {
                    let mut acked: HashMap<String, u64> = HashMap::new();
                    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                        let parts: Vec<&str> = line.split(' ').collect();
                        if let ["ACK", key, n] = parts[..]
                            && let Ok(n) = n.parse::<u64>()
                        {
                            started.store(true, Ordering::SeqCst);
                            let best = acked.entry(key.to_owned()).or_default();
                            *best = (*best).max(n);
                        }
                    }
                    acked
                }
            });
            let deadline = Instant::now() + Duration::from_secs(20);
            while !started.load(Ordering::SeqCst) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            assert!(
                started.load(Ordering::SeqCst),
                "the writer never acknowledged a write"
            );
            tokio::time::sleep(rng.millis(20, 300)).await;
            child.kill().expect("SIGKILL the writer");
            child.wait().expect("reap the writer");
            kills += 1;
            let acked = reader.join().expect("reader thread");
            acks += acked.len();
            let keys: Vec<String> = (0..8).map(|k| format!("k{k}")).collect();
            let rows = plain.get_many(&keys).await.unwrap();
            for (key, row) in keys.iter().zip(rows) {
                let stored = row.map(|v| counter_of(&v).expect("a whole, written value"));
                if let Some(&acknowledged) = acked.get(key)
                    && stored.is_none_or(|n| n < acknowledged)
                {
                    lost += 1;
                }
            }
        }
        report(&format!(
            "process-crash[{}]: {kills} SIGKILLs, {acks} keys with acknowledged writes checked, {lost} acknowledged writes lost",
            mode_name(mode)
        ));
        assert_eq!(lost, 0, "{mode:?}");
    }
}

/// Child role: write counters to k0..k7 until killed (or 30 s pass),
/// printing `ACK key n` for every acknowledged write.
async fn crash_writer() {
    let url = std::env::var("DATABASE_URL").unwrap();
    let table = std::env::var("FAULT_TABLE").unwrap();
    let mode = mode_named(&std::env::var("FAULT_MODE").unwrap());
    let store = plain_table(&url, &table)
        .await
        .cached(options(mode))
        .unwrap();
    let keys: Vec<String> = (0..8).map(|k| format!("k{k}")).collect();
    let until = Instant::now() + Duration::from_secs(30);
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        for key in &keys {
            store.put(key, &counter_value(n)).await.unwrap();
            if mode != Durability::WriteBehind {
                println!("ACK {key} {n}");
            }
        }
        if mode == Durability::WriteBehind && n.is_multiple_of(5) {
            store.flush().await.unwrap();
            for key in &keys {
                println!("ACK {key} {n}");
            }
        }
    }
}

// ── Server crash ──────────────────────────────────────────────────────────

/// `pg_ctl stop -m immediate` in the middle of a write load, then a restart:
/// the same store keeps running, reconnects by itself, and ends with the
/// table equal to what was last written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_crash_and_restart_loses_nothing() {
    let server = Arc::new(support::PgServer::start());
    let mut rng = Rng::new(seed("server-crash"));
    for mode in MODES {
        let table = support::unique_table("server_crash");
        let plain = plain_table(&server.url(), &table).await;
        let store = Arc::new(plain.clone().cached(options(mode)).unwrap());
        let crash_after = rng.millis(50, 250);
        let crasher = tokio::spawn({
            let server = server.clone();
            async move {
                tokio::time::sleep(crash_after).await;
                tokio::task::spawn_blocking(move || {
                    server.stop_immediate();
                    // Longer than the pool's acquire timeout, so that
                    // batches fail rather than wait the outage out.
                    std::thread::sleep(Duration::from_millis(1500));
                    server.restart();
                })
                .await
                .unwrap();
            }
        });
        let mut writer = Writer::default();
        let started = Instant::now();
        let mut i = 0u64;
        while !crasher.is_finished() || started.elapsed() < Duration::from_millis(800) {
            i += 1;
            writer
                .put(&store, format!("k{}", i % 8), counter_value(i))
                .await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        crasher.await.unwrap();
        let lost = writer.settle_and_count_lost(&store, &plain).await;
        report(&format!(
            "server-crash[{}]: {} writes, 1 immediate stop + restart, {} writes and {} batches saw the outage, {lost} acknowledged writes lost",
            mode_name(mode),
            writer.writes,
            writer.errors,
            store.stats().flush_errors
        ));
        assert_eq!(lost, 0, "{mode:?}");
        store.shutdown().await.unwrap();
    }
}

// ── Connection cuts ───────────────────────────────────────────────────────

/// A proxy between store and server resets every connection at random
/// moments, in the middle of batches and commits too. Batches cut before
/// their commit are retried; the table ends equal to what was last written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cuts_lose_nothing() {
    let url = support::database_url();
    let proxy = Arc::new(FaultProxy::start(fault_support::port_of(&url)).await);
    let proxied_url = fault_support::with_port(&url, proxy.port());
    let mut rng = Rng::new(seed("connection-cuts"));
    for mode in MODES {
        let table = support::unique_table("cuts");
        let direct = plain_table(&url, &table).await;
        let through_proxy = plain_table(&proxied_url, &table).await;
        let store = through_proxy.cached(options(mode)).unwrap();
        let cuts_before = proxy.cuts();
        let cutter = Cutter::start(proxy.clone(), Rng::new(rng.next_u64()), 10, 80);
        let mut writer = Writer::default();
        // At least 400 writes and 20 resets, whichever takes longer, so
        // that even buffered writes see batches cut mid-flight.
        let mut i = 0u64;
        while i < 400 || (proxy.cuts() - cuts_before < 20 && i < 20_000) {
            i += 1;
            let key = format!("k{}", rng.below(16));
            writer.put(&store, key, counter_value(i)).await;
            if i.is_multiple_of(50) && store.flush().await.is_err() {
                writer.errors += 1;
            }
            if i.is_multiple_of(4) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        cutter.stop().await;
        let lost = writer.settle_and_count_lost(&store, &direct).await;
        report(&format!(
            "connection-cuts[{}]: {} writes, {} connection resets, {} errors seen and retried, {lost} acknowledged writes lost",
            mode_name(mode),
            writer.writes,
            proxy.cuts() - cuts_before,
            writer.errors
        ));
        assert_eq!(lost, 0, "{mode:?}");
        store.shutdown().await.unwrap();
    }
}

// ── A cut listening connection ────────────────────────────────────────────

/// A store listening for changes through the proxy, which cuts every
/// connection (the listening one too) every 50–250 ms; another writer
/// changes a key 300 times, directly. After each change the store's reads
/// are checked against the table: they must come to return the committed
/// value, so no entry the store could not vouch for survives a cut (a missed
/// notification would leave the old value cached for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_listener_leaves_no_stale_read() {
    const CHANGES: u64 = 300;
    let url = support::database_url();
    let proxy = Arc::new(FaultProxy::start(fault_support::port_of(&url)).await);
    let proxied_url = fault_support::with_port(&url, proxy.port());
    let mut rng = Rng::new(seed("listener-cuts"));
    let table = support::unique_table("listener_cuts");
    let writer = plain_table(&url, &table).await;
    writer.ensure_change_notifications().await.unwrap();
    let store = plain_table(&proxied_url, &table)
        .await
        .cached(options(Durability::GroupCommit).listen_for_changes(true))
        .unwrap();
    let cuts_before = proxy.cuts();
    let cutter = Cutter::start(proxy.clone(), Rng::new(rng.next_u64()), 50, 250);
    let mut stale_reads = 0u64;
    for n in 1..=CHANGES {
        writer.put("k", &json!(n)).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            // A read cut by the proxy fails; the next one is checked.
            match store.get("k").await {
                Ok(Some(value)) if value == json!(n) => break,
                Ok(_) => stale_reads += 1,
                Err(_) => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "change {n} was never read: a stale entry survived a cut"
            );
            tokio::time::sleep(rng.millis(0, 3)).await;
        }
    }
    cutter.stop().await;
    report(&format!(
        "listener-cuts: {CHANGES} changes by another writer, {} connection resets, \
         {stale_reads} reads before a change arrived, 0 changes never read",
        proxy.cuts() - cuts_before
    ));
    store.shutdown().await.unwrap();
}

/// A group-commit store listening for changes, connected through a fault
/// proxy, that has `k = "v1"` cached and is subscribed; and a plain store,
/// connected directly, to change the table behind its back. The listening
/// store is opened as users open it (`connect_with`: the pool's own 10 s
/// acquire timeout), not on the suite's quick pool, so that a reconnect can
/// outlast the feed's quiet check.
async fn listening_behind_a_proxy(
    tag: &str,
) -> (Arc<FaultProxy>, PostgresStateStore, CachedStateStore) {
    let url = support::database_url();
    let proxy = Arc::new(FaultProxy::start(fault_support::port_of(&url)).await);
    let proxied_url = fault_support::with_port(&url, proxy.port());
    let table = support::unique_table(tag);
    let writer = plain_table(&url, &table).await;
    writer.ensure_change_notifications().await.unwrap();
    writer.put("k", &json!("v1")).await.unwrap();
    let store = PostgresStateStore::connect_with(&proxied_url, 3, &table)
        .await
        .unwrap()
        .cached(options(Durability::GroupCommit).listen_for_changes(true))
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !store.stats().listening {
        assert!(tokio::time::Instant::now() < deadline, "never listening");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(store.get("k").await.unwrap(), Some(json!("v1")));
    (proxy, writer, store)
}

/// Issue 21, item 2: an outage longer than the feed's 5 s quiet check,
/// while another writer changes a key. The listening store's connections
/// go through a proxy that goes down for 6 s (open connections closed in an
/// orderly way, new ones refused, as with a server that went down); the
/// other writer, connected directly, changes the key meanwhile. Its
/// notification is lost with the listening session, so the feed must report
/// the loss, and the stale entry must not be served. Regression: sqlx's
/// listener reconnected by itself (its reconnect inside `try_recv` was cut
/// short by the quiet check, then the liveness query reconnected and listened
/// again), the feed never reported the loss, and the old value was served
/// for good. Checked to fail without the fix: "still Some(\"v1\")" after
/// 30 s, with `listening` true all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_quiet_check_leaves_no_stale_read() {
    let (proxy, writer, store) = listening_behind_a_proxy("listener_outage").await;
    let listening = |store: &CachedStateStore| store.stats().listening;
    let hits = store.stats().cache_hits;
    assert_eq!(store.get("k").await.unwrap(), Some(json!("v1")));
    assert_eq!(
        store.stats().cache_hits,
        hits + 1,
        "the entry is served from the cache"
    );

    proxy.down(true);
    writer.put("k", &json!("v2")).await.unwrap();
    let mut lost_seen = false;
    let outage = tokio::time::Instant::now();
    while outage.elapsed() < Duration::from_secs(6) {
        lost_seen |= !listening(&store);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.down(false);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut stale_reads = 0u64;
    loop {
        lost_seen |= !listening(&store);
        match store.get("k").await {
            Ok(Some(value)) if value == json!("v2") => break,
            Ok(_) => stale_reads += 1,
            Err(_) => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the change made during the outage was never read (listening went false: {lost_seen})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(lost_seen, "the feed never reported the outage");
    report(&format!(
        "listener-outage: 6 s outage of the listening store's connections, 1 change by another \
         writer meanwhile, {stale_reads} reads before it was read, the loss was reported"
    ));
    store.shutdown().await.unwrap();
}

/// The listening connection stalls (a partition: nothing forwarded, nothing
/// closed) for longer than the quiet check and its liveness query's
/// deadline, while another writer changes a key; then the network heals.
/// The feed must report the loss, subscribe again on a new connection and
/// the change must come to be read. Checked to fail with one pool shared by
/// every subscription: sqlx's `UNLISTEN *` on the dropped listener's stalled
/// connection never ended and kept the pool's only connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_listening_connection_is_replaced_and_leaves_no_stale_read() {
    let (proxy, writer, store) = listening_behind_a_proxy("listener_stall").await;

    proxy.stall(true);
    writer.put("k", &json!("v2")).await.unwrap();
    // Past the 5 s quiet check and the 10 s deadline of its liveness query.
    let mut lost_seen = false;
    let stalled = tokio::time::Instant::now();
    while stalled.elapsed() < Duration::from_secs(16) {
        lost_seen |= !store.stats().listening;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    proxy.stall(false);
    assert!(lost_seen, "the feed never reported the stalled connection");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let listening = store.stats().listening;
        if listening && store.get("k").await.ok() == Some(Some(json!("v2"))) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not listening again with the change read within 30 s (listening: {listening})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    report(
        "listener-stall: a 16 s stall of the listening connection, 1 change meanwhile: the loss was reported, the feed subscribed again, the change was read",
    );
    store.shutdown().await.unwrap();
}

// ── Stalled connections ───────────────────────────────────────────────────

/// A proxy stops forwarding without closing anything (a network partition)
/// for longer than every deadline, then resumes, then resets every
/// connection once. Every call returns within its deadline (the bound below
/// only catches a hang: the deadlines themselves are a few seconds), the
/// store recovers by itself, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_connection_ends_every_wait_and_loses_nothing() {
    // No call may take longer than this; a hang would.
    const HANG: Duration = Duration::from_secs(15);
    let url = support::database_url();
    let proxy = Arc::new(FaultProxy::start(fault_support::port_of(&url)).await);
    let proxied_url = fault_support::with_port(&url, proxy.port());
    let mut rng = Rng::new(seed("stall"));
    for mode in MODES {
        let table = support::unique_table("stall");
        let direct = plain_table(&url, &table).await;
        let store = plain_table(&proxied_url, &table)
            .await
            .with_statement_timeout(Duration::from_millis(500))
            .cached(
                options(mode)
                    .write_timeout(Duration::from_secs(1))
                    .put_timeout(Duration::from_secs(1))
                    .shutdown_timeout(Duration::from_secs(5)),
            )
            .unwrap();
        let mut writer = Writer::default();
        let mut slowest = Duration::ZERO;
        let mut i = 0u64;
        for phase in ["before", "stalled", "after"] {
            proxy.stall(phase == "stalled");
            if phase == "after" {
                proxy.cut_all();
            }
            // The stall outlasts the client deadline (statement timeout plus
            // one second) and write_timeout.
            let until = Instant::now() + Duration::from_millis(2_500);
            while Instant::now() < until {
                i += 1;
                let key = format!("k{}", rng.below(8));
                let started = Instant::now();
                tokio::time::timeout(HANG, writer.put(&store, key, counter_value(i)))
                    .await
                    .unwrap_or_else(|_| panic!("{mode:?}: a put hung while {phase}"));
                if i.is_multiple_of(10) {
                    let flushed = tokio::time::timeout(HANG, store.flush())
                        .await
                        .unwrap_or_else(|_| panic!("{mode:?}: flush hung while {phase}"));
                    if flushed.is_err() {
                        writer.errors += 1;
                    }
                }
                slowest = slowest.max(started.elapsed());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let lost = tokio::time::timeout(HANG * 4, writer.settle_and_count_lost(&store, &direct))
            .await
            .expect("the store recovered after the stall");
        report(&format!(
            "stall[{}]: {} writes, a 2.5 s stall then a reset, {} errors seen, slowest call {slowest:.1?}, {lost} acknowledged writes lost",
            mode_name(mode),
            writer.writes,
            writer.errors
        ));
        assert_eq!(lost, 0, "{mode:?}");
        tokio::time::timeout(HANG, store.shutdown())
            .await
            .expect("shutdown returned")
            .unwrap();
    }
}

/// Regression: a network blip kills every idle pooled connection at once.
/// The first statement afterwards used to meet a dead connection, retry once,
/// meet another dead one and fail; it must reach a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_write_after_every_pooled_connection_was_cut_succeeds() {
    let url = support::database_url();
    let proxy = FaultProxy::start(fault_support::port_of(&url)).await;
    let proxied_url = fault_support::with_port(&url, proxy.port());
    let table = support::unique_table("blip");
    plain_table(&url, &table).await;
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .test_before_acquire(false)
        .connect(&proxied_url)
        .await
        .unwrap();
    // Open all three connections and leave them idle in the pool.
    let sleepers: Vec<_> = (0..3)
        .map(|_| {
            let pool = pool.clone();
            tokio::spawn(async move { sqlx::query("SELECT pg_sleep(0.05)").execute(&pool).await })
        })
        .collect();
    for sleeper in sleepers {
        sleeper.await.unwrap().unwrap();
    }
    assert_eq!(pool.size(), 3);
    let store = PostgresStateStore::from_pool(pool, &table).unwrap();
    proxy.cut_all();
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.put("k", &json!("after the blip")).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(json!("after the blip")));
    report(
        "connection-blip: 3 idle pooled connections reset at once, the next write succeeded; 0 writes lost",
    );
}

/// A compare-and-put whose connection is cut while it waits for its answer
/// is not sent again (a second send could find its own write and answer
/// "not written"): its error says the outcome is unknown. Here the proxy
/// had swallowed the statement, so the key is still absent and the next
/// claim wins. A resend would have succeeded: the proxy forwards again as
/// soon as the cut is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compare_and_put_cut_in_flight_is_not_sent_again() {
    let url = support::database_url();
    let proxy = Arc::new(FaultProxy::start(fault_support::port_of(&url)).await);
    let proxied_url = fault_support::with_port(&url, proxy.port());
    let table = support::unique_table("cas_cut");
    plain_table(&url, &table).await;
    let store = plain_table(&proxied_url, &table).await;
    store.get("warm-up").await.unwrap();
    proxy.stall(true);
    let claim = tokio::spawn({
        let store = store.clone();
        async move { store.compare_and_put("claim", None, &json!("first")).await }
    });
    // Long enough for the statement to reach the proxy and be swallowed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut_all();
    proxy.stall(false);
    let err = claim.await.unwrap().unwrap_err().to_string();
    assert!(
        err.contains("'claim'") && err.contains("may or may not have been applied"),
        "{err}"
    );
    assert_eq!(store.get("claim").await.unwrap(), None);
    assert!(
        store
            .compare_and_put("claim", None, &json!("second"))
            .await
            .unwrap()
    );
    assert_eq!(store.get("claim").await.unwrap(), Some(json!("second")));
    report(
        "cas-cut: a compare_and_put cut in flight reported an unknown outcome and was not resent; the next claim won",
    );
}

// ── Cancelled calls ───────────────────────────────────────────────────────

/// Puts, reads and flushes are dropped at random points (a timeout of 0 to
/// 3 ms, as `select!` or an aborted task would), then `shutdown()` is
/// cancelled once and called again. The store stays consistent: once the
/// writes whose outcome was unknown are repeated, every key holds its last
/// acknowledged value, and the second shutdown succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_calls_leave_the_store_consistent() {
    let url = support::database_url();
    let mut rng = Rng::new(seed("cancel"));
    for mode in MODES {
        let table = support::unique_table("cancel");
        let direct = plain_table(&url, &table).await;
        let store = plain_table(&url, &table)
            .await
            .cached(options(mode))
            .unwrap();
        let mut writer = Writer::default();
        let mut cancelled = 0;
        for i in 1..=400u64 {
            let key = format!("k{}", rng.below(8));
            let budget = rng.millis(0, 3);
            match rng.below(4) {
                0 => {
                    if tokio::time::timeout(budget, store.get(&key)).await.is_err() {
                        cancelled += 1;
                    }
                }
                1 => {
                    if tokio::time::timeout(budget, store.flush()).await.is_err() {
                        cancelled += 1;
                    }
                }
                _ => {
                    let value = counter_value(i);
                    match tokio::time::timeout(budget, store.put(&key, &value)).await {
                        Ok(Ok(())) => {
                            writer.writes += 1;
                            writer.uncertain.remove(&key);
                            writer.acknowledged.insert(key, Some(value));
                        }
                        // Not acknowledged: it may land or not, so the key
                        // is repeated with its last acknowledged value.
                        Ok(Err(_)) | Err(_) => {
                            cancelled += 1;
                            writer.uncertain.insert(key);
                        }
                    }
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_millis(1), store.shutdown()).await;
        assert!(
            store.put("late", &json!(0)).await.is_err(),
            "{mode:?}: writes are refused"
        );
        store.shutdown().await.unwrap();
        // The store refuses writes now: the keys whose last write is
        // uncertain are repeated through a second store on the same table.
        let again = plain_table(&url, &table)
            .await
            .cached(options(mode))
            .unwrap();
        let lost = writer.settle_and_count_lost(&again, &direct).await;
        again.shutdown().await.unwrap();
        report(&format!(
            "cancel[{}]: 400 calls, {cancelled} cancelled or failed, a cancelled shutdown then a second one, {lost} acknowledged writes lost",
            mode_name(mode),
        ));
        assert_eq!(lost, 0, "{mode:?}");
    }
}

// ── A writer that never yields ────────────────────────────────────────────

/// A task calls write-behind `put` in a tight loop over 100,000 keys, on a
/// worker thread of a 2-worker runtime. The flusher still commits batches to
/// PostgreSQL during the spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spinning_writer_does_not_starve_the_flusher() {
    const LIMIT: u64 = 5_000_000;
    let url = support::database_url();
    let table = support::unique_table("spin");
    let store = Arc::new(
        plain_table(&url, &table)
            .await
            .cached(CacheOptions::new().durability(Durability::WriteBehind))
            .unwrap(),
    );
    let spinner = tokio::spawn({
        let store = store.clone();
        async move {
            let mut puts = 0u64;
            while store.stats().batches_written < 3 && puts < LIMIT {
                store
                    .put(&format!("k{}", puts % 100_000), &json!(puts))
                    .await
                    .unwrap();
                puts += 1;
            }
            puts
        }
    });
    let puts = spinner.await.unwrap();
    let batches = store.stats().batches_written;
    report(&format!(
        "spinning-writer: {puts} puts in a tight loop, {batches} batches committed during the spin"
    ));
    assert!(
        batches >= 3,
        "{puts} puts and the flusher committed {batches} batches"
    );
    store.shutdown().await.unwrap();
}

// ── Poison values and oversized batches ───────────────────────────────────

/// Under a write load in each mode, a value the table refuses (a CHECK
/// constraint) is written now and then to a random key, and replaced by a
/// good write of that key a little later. No refused write ever blocks
/// another key, every refused write is reported, and once replaced nothing
/// is pending and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_values_block_no_other_key() {
    let url = support::database_url();
    let mut rng = Rng::new(seed("poison"));
    for mode in MODES {
        let table = support::unique_table("poison");
        let direct = plain_table(&url, &table).await;
        sqlx::query(&format!(
            "ALTER TABLE \"{table}\" ADD CONSTRAINT no_poison CHECK (NOT value ? 'poison')"
        ))
        .execute(direct.pool())
        .await
        .unwrap();
        let store = plain_table(&url, &table)
            .await
            .cached(options(mode))
            .unwrap();
        let mut writer = Writer::default();
        let mut poisoned: Vec<String> = Vec::new();
        let mut refused_seen = 0;
        for i in 1..=600u64 {
            let key = format!("k{}", rng.below(16));
            if rng.below(40) == 0 {
                // Not an acknowledged value: the table can never hold it.
                match store.put(&key, &json!({"poison": i})).await {
                    Err(e) => assert!(e.to_string().contains("refused"), "{e}"),
                    Ok(()) => assert_eq!(mode, Durability::WriteBehind),
                }
                poisoned.push(key);
                continue;
            }
            // A good write replaces the refused one, in every mode.
            poisoned.retain(|k| *k != key);
            writer.put(&store, key, counter_value(i)).await;
            if i.is_multiple_of(50)
                && let Err(e) = store.flush().await
            {
                assert!(e.to_string().contains("refused"), "{e}");
                refused_seen += 1;
            }
        }
        for key in poisoned.drain(..) {
            writer.put(&store, key, counter_value(0)).await;
        }
        let lost = writer.settle_and_count_lost(&store, &direct).await;
        let stats = store.stats();
        report(&format!(
            "poison[{}]: {} writes, {} refusals reported ({refused_seen} by flush), {lost} acknowledged writes lost",
            mode_name(mode),
            writer.writes,
            stats.refusals,
        ));
        assert!(stats.refusals > 0, "{mode:?}: no poison was written");
        assert!(
            stats.refused_writes.is_empty(),
            "{:?}",
            stats.refused_writes
        );
        assert_eq!(lost, 0, "{mode:?}");
        store.shutdown().await.unwrap();
    }
}

/// Seventy 15 MiB values, each under the 16 MiB limit, are over 1 GiB
/// together, more than PostgreSQL takes in one message. Batches bounded by
/// `max_batch_bytes` carry them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_a_gigabyte_in_all_are_written_in_bounded_batches() {
    const VALUES: usize = 70;
    const VALUE_BYTES: usize = 15 * 1024 * 1024;
    let url = support::database_url();
    let table = support::unique_table("gigabyte");
    let direct = plain_table(&url, &table).await;
    let store = plain_table(&url, &table)
        .await
        .cached(
            CacheOptions::new()
                .durability(Durability::WriteBehind)
                .flush_interval(Duration::from_secs(3600))
                .write_timeout(Duration::from_secs(600)),
        )
        .unwrap();
    let started = Instant::now();
    for i in 0..VALUES {
        let filler = char::from(b'a' + (i % 26) as u8).to_string();
        store
            .put(&format!("big{i:02}"), &json!(filler.repeat(VALUE_BYTES)))
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(600), store.flush())
        .await
        .expect("the flush ended")
        .unwrap();
    let (rows, bytes): (i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), sum(octet_length(value #>> '{{}}'))::bigint FROM \"{table}\""
    ))
    .fetch_one(direct.pool())
    .await
    .unwrap();
    let stats = store.stats();
    report(&format!(
        "gigabyte: {VALUES} values of 15 MiB ({} MiB in all) written in {} batches in {:.1?}",
        VALUES * VALUE_BYTES / (1024 * 1024),
        stats.batches_written,
        started.elapsed()
    ));
    assert_eq!(rows as usize, VALUES);
    assert_eq!(bytes as usize, VALUES * VALUE_BYTES);
    assert!(stats.batches_written >= (VALUES / 2) as u64, "{stats:?}");
    store.shutdown().await.unwrap();
}

// ── Full buffer ───────────────────────────────────────────────────────────

/// With the server down, write-behind puts are accepted up to `max_pending`,
/// then wait and fail after `put_timeout`; none accepted is lost once the
/// server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_refuses_clearly_and_loses_nothing_accepted() {
    let server = support::PgServer::start();
    let table = support::unique_table("full_buffer");
    let plain = plain_table(&server.url(), &table).await;
    let store = plain
        .clone()
        .cached(
            options(Durability::WriteBehind)
                .max_pending(50)
                .put_timeout(Duration::from_millis(200)),
        )
        .unwrap();
    server.stop_immediate();
    let mut last: HashMap<String, Option<Value>> = HashMap::new();
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..80u64 {
        let key = format!("k{i}");
        match store.put(&key, &counter_value(i)).await {
            Ok(()) => {
                accepted += 1;
                last.insert(key, Some(counter_value(i)));
            }
            Err(e) => {
                assert!(e.to_string().contains("max_pending"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!((accepted, refused), (50, 30));
    server.restart();
    flush_until_ok(&store).await;
    store.shutdown().await.unwrap();
    let lost = lost_writes(&plain, &last).await;
    report(&format!(
        "full-buffer: 80 writes during an outage, {accepted} accepted, {refused} refused with an error, {lost} accepted writes lost"
    ));
    assert_eq!(lost, 0);
}

// ── Concurrency against a model ───────────────────────────────────────────

/// Many tasks doing random put/delete/get/flush on a small key space, each
/// step checked against faucet-core's `MemoryStateStore`; after shutdown the
/// table equals the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_operations_match_the_memory_model() {
    let url = support::database_url();
    let seed = seed("model");
    for mode in MODES {
        let table = support::unique_table("model");
        let plain = plain_table(&url, &table).await;
        let store = Arc::new(plain.clone().cached(options(mode)).unwrap());
        let model = Arc::new(MemoryStateStore::new());
        // One lock per key makes "the model's value" well defined under
        // concurrency: a key's operations reach store and model in one order.
        let locks: Arc<Vec<tokio::sync::Mutex<()>>> =
            Arc::new((0..6).map(|_| tokio::sync::Mutex::new(())).collect());
        let tasks: Vec<_> = (0..8u64)
            .map(|task| {
                let (store, model, locks) = (store.clone(), model.clone(), locks.clone());
                let mut rng = Rng::new(seed ^ (task + 1).wrapping_mul(0x1234_5678_9ABC));
                tokio::spawn(async move {
                    for step in 0..120u64 {
                        let k = rng.below(6) as usize;
                        let key = format!("key-{k}");
                        let _key_lock = locks[k].lock().await;
                        match rng.below(10) {
                            0..=4 => {
                                let value = json!({"task": task, "step": step});
                                store.put(&key, &value).await.unwrap();
                                model.put(&key, &value).await.unwrap();
                            }
                            5 => {
                                store.delete(&key).await.unwrap();
                                model.delete(&key).await.unwrap();
                            }
                            6..=8 => assert_eq!(
                                store.get(&key).await.unwrap(),
                                model.get(&key).await.unwrap(),
                                "task {task} step {step}: read of {key} differs from the model"
                            ),
                            _ => store.flush().await.unwrap(),
                        }
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        store.shutdown().await.unwrap();
        let mut last = HashMap::new();
        for k in 0..6 {
            let key = format!("key-{k}");
            last.insert(key.clone(), model.get(&key).await.unwrap());
        }
        let lost = lost_writes(&plain, &last).await;
        report(&format!(
            "model[{}]: 8 tasks x 120 random operations on 6 keys, {lost} keys differing from the model",
            mode_name(mode)
        ));
        assert_eq!(lost, 0, "{mode:?}");
    }
}

// ── Two stores, one table ─────────────────────────────────────────────────

/// Two processes, each with its own cached store on the same table, write
/// disjoint and shared keys: no errors, no lost disjoint key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_table() {
    let url = support::database_url();
    let table = support::unique_table("shared");
    let plain = plain_table(&url, &table).await;
    let children: Vec<_> = (0..2)
        .map(|id| {
            fault_support::child(CHILD_ENTRY, "table_sharer")
                .env("DATABASE_URL", &url)
                .env("FAULT_TABLE", &table)
                .env("FAULT_ID", id.to_string())
                .spawn()
                .expect("spawn a sharer")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().expect("sharer output");
        assert!(out.status.success(), "a sharer failed: {out:?}");
    }
    let mut last = HashMap::new();
    for id in 0..2 {
        for k in 0..10 {
            last.insert(format!("p{id}-k{k}"), Some(counter_value(SHARER_ROUNDS)));
        }
    }
    for k in 0..5 {
        last.insert(format!("shared-{k}"), Some(counter_value(SHARER_ROUNDS)));
    }
    let lost = lost_writes(&plain, &last).await;
    report(&format!(
        "two-processes: 2 stores x {SHARER_ROUNDS} rounds over 10 own + 5 shared keys, {lost} keys lost or stale"
    ));
    assert_eq!(lost, 0);
}

const SHARER_ROUNDS: u64 = 200;

/// Child role: write own and shared keys through a write-behind store, then
/// shut down cleanly.
async fn table_sharer() {
    let url = std::env::var("DATABASE_URL").unwrap();
    let table = std::env::var("FAULT_TABLE").unwrap();
    let id = std::env::var("FAULT_ID").unwrap();
    let store = plain_table(&url, &table)
        .await
        .cached(options(Durability::WriteBehind))
        .unwrap();
    for n in 1..=SHARER_ROUNDS {
        for k in 0..10 {
            store
                .put(&format!("p{id}-k{k}"), &counter_value(n))
                .await
                .unwrap();
        }
        for k in 0..5 {
            store
                .put(&format!("shared-{k}"), &counter_value(n))
                .await
                .unwrap();
        }
        if n % 20 == 0 {
            tokio::task::yield_now().await;
        }
    }
    store.shutdown().await.unwrap();
}

// ── Child processes ───────────────────────────────────────────────────────

/// Entry point of the child processes above; does nothing in a normal run.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(CHILD_ROLE) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match role.as_str() {
        "crash_writer" => rt.block_on(crash_writer()),
        "table_sharer" => rt.block_on(table_sharer()),
        other => panic!("unknown child role {other}"),
    }
}

// ── Bad input ─────────────────────────────────────────────────────────────

/// Every kind of bad input gets a clear error, and the store keeps serving
/// other keys: invalid keys and table names, U+0000, 100,000 levels of
/// nesting, oversize values, a read-only server, a foreign table layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_store_keeps_serving() {
    let url = support::database_url();
    let plain = plain_table(&url, &support::unique_table("bad_input"))
        .await
        .with_max_value_bytes(4096);
    let store = Arc::new(plain.clone().cached(CacheOptions::new()).unwrap());
    let mut refused = 0;

    let long_key = "k".repeat(257);
    for key in [
        "", ".hidden", "..", "a/../b", "a b", "a%b", "é", "a\0b", &long_key,
    ] {
        assert!(store.put(key, &json!(1)).await.is_err(), "put {key:?}");
        assert!(store.get(key).await.is_err(), "get {key:?}");
        assert!(store.delete(key).await.is_err(), "delete {key:?}");
        refused += 3;
        store.put("good", &json!(key.len())).await.unwrap();
        assert_eq!(store.get("good").await.unwrap(), Some(json!(key.len())));
    }
    for table in ["", "a-b", "x\"; drop table y; --", &"t".repeat(64)] {
        let err = PostgresStateStore::from_pool(plain.pool().clone(), table).unwrap_err();
        assert!(err.to_string().contains("invalid table name"), "{err}");
        refused += 1;
    }

    let nul = json!({"text": "a\u{0}b", "key\u{0}": ["\u{0}"]});
    store.put("nul", &nul).await.unwrap();
    assert_eq!(plain.get("nul").await.unwrap(), Some(nul));

    // 100,000 levels: refused by a walk that does not recurse. Building and
    // dropping such a value (serde_json drops recursively) needs a big stack,
    // so that part runs on a thread of its own.
    let deep_errors = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn({
            let (store, plain) = (store.clone(), plain.clone());
            move || {
                let deep = (0..100_000).fold(json!(0), |inner, _| Value::Array(vec![inner]));
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                let errors = rt.block_on(async {
                    [
                        store.put("deep", &deep).await.unwrap_err().to_string(),
                        plain.put("deep", &deep).await.unwrap_err().to_string(),
                    ]
                });
                drop(deep);
                errors
            }
        })
        .unwrap()
        .join()
        .expect("no stack overflow");
    for err in deep_errors {
        assert!(err.contains("nests 100000 levels"), "{err}");
        refused += 1;
    }

    let err = store
        .put("big", &json!("x".repeat(5000)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'big'") && err.contains("5002 bytes") && err.contains("4096"),
        "{err}"
    );
    refused += 1;

    // A read-only server (here: a role whose transactions are read-only).
    let role = support::unique_table("readonly");
    for statement in [
        format!("CREATE ROLE \"{role}\" LOGIN PASSWORD 'ro-pw'"),
        format!("ALTER ROLE \"{role}\" SET default_transaction_read_only = on"),
        format!(
            "GRANT SELECT, INSERT, UPDATE, DELETE ON \"{}\" TO \"{role}\"",
            plain.table()
        ),
    ] {
        sqlx::query(&statement).execute(plain.pool()).await.unwrap();
    }
    let mut ro_url = url::Url::parse(&url).unwrap();
    ro_url.set_username(&role).unwrap();
    ro_url.set_password(Some("ro-pw")).unwrap();
    let read_only =
        PostgresStateStore::from_pool(quick_pool(ro_url.as_str()).await, plain.table()).unwrap();
    let err = read_only.put("k", &json!(1)).await.unwrap_err().to_string();
    assert!(
        err.contains("read-only") && err.contains("writable primary"),
        "{err}"
    );
    assert_eq!(
        read_only.get("good").await.unwrap(),
        Some(json!(long_key.len())),
        "reads still work"
    );
    let ro_cached = read_only.cached(options(Durability::WriteBehind)).unwrap();
    ro_cached.put("k", &json!(1)).await.unwrap();
    let err = ro_cached.flush().await.unwrap_err().to_string();
    assert!(err.contains("read-only"), "{err}");
    refused += 2;
    drop(ro_cached);

    // A table of that name with another layout.
    let foreign = support::unique_table("foreign");
    sqlx::query(&format!(
        "CREATE TABLE \"{foreign}\" (key TEXT PRIMARY KEY, value TEXT)"
    ))
    .execute(plain.pool())
    .await
    .unwrap();
    let other = PostgresStateStore::from_pool(plain.pool().clone(), &foreign).unwrap();
    let err = other.ensure_table().await.unwrap_err().to_string();
    assert!(
        err.contains("column value is text, expected jsonb"),
        "{err}"
    );
    let err = other.put("k", &json!(1)).await.unwrap_err().to_string();
    assert!(err.contains(&foreign), "{err}");
    refused += 2;

    store.put("good", &json!("still serving")).await.unwrap();
    assert_eq!(
        plain.get("good").await.unwrap(),
        Some(json!("still serving"))
    );
    store.shutdown().await.unwrap();
    report(&format!(
        "bad-input: {refused} bad inputs refused with a clear error, the store kept serving; 0 acknowledged writes lost"
    ));
}

// ── Fencing with real timing (issue 21) ───────────────────────────────────

/// A fenced cached store on its own pool, as an instance of a pipeline.
async fn fenced_instance(url: &str, table: &str, mode: Durability) -> CachedStateStore {
    plain_table(url, table)
        .await
        .fence("pipeline")
        .await
        .unwrap()
        .cached(options(mode))
        .unwrap()
}

/// The old instance writes; it pauses (its buffer flushed) while an
/// operator truncates the table and a new instance claims the scope, then
/// writes on, as a stale instance that slept through both would. No write
/// of the old instance may land after the truncate, in every mode.
/// Checked to fail without the fix: the new claim got epoch 1 again, the
/// old instance's epoch, and its writes landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_between_two_claims_leaves_the_old_instance_fenced() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let url = support::database_url();
    let admin = quick_pool(&url).await;
    for mode in MODES {
        let table = support::unique_table("truncate_claims");
        let old = Arc::new(fenced_instance(&url, &table, mode).await);
        let (paused, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let writer = tokio::spawn({
            let (old, paused, stop) = (old.clone(), paused.clone(), stop.clone());
            async move {
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    if !paused.load(Ordering::SeqCst) {
                        n += 1;
                        let value = json!({"by": "old", "n": n});
                        let _ = old.put(&format!("k{}", n % 8), &value).await;
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                n
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        paused.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(20)).await;
        old.flush().await.unwrap();
        sqlx::query(&format!("TRUNCATE \"{table}\""))
            .execute(&admin)
            .await
            .unwrap();
        let new = fenced_instance(&url, &table, mode).await;
        paused.store(false, Ordering::SeqCst);
        for k in 0..8 {
            new.put(&format!("k{k}"), &json!({"by": "new"}))
                .await
                .unwrap();
        }
        new.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::SeqCst);
        let writes = writer.await.unwrap();
        let flushed = old.flush().await;
        let old_rows: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{table}\" WHERE value->>'by' = 'old'"
        ))
        .fetch_one(&admin)
        .await
        .unwrap();
        report(&format!(
            "truncate-claims[{}]: {writes} writes by the old instance, paused across a truncate \
             and a new claim, {old_rows} of them in the table afterwards",
            mode_name(mode)
        ));
        assert_eq!(
            old_rows, 0,
            "{mode:?}: a write of the old instance landed after the truncate"
        );
        assert!(
            flushed.is_err(),
            "{mode:?}: the old instance flushed after the new claim"
        );
        assert!(old.shutdown().await.is_err());
        new.shutdown().await.unwrap();
    }
}

/// A slow guard: the fence row is locked for most of the statement timeout
/// (the guard waits), then the bookmark's row (the write waits). In every
/// mode, the server ends the message within one statement timeout: the
/// caller is told so by the server (SQLSTATE 57014), not by its own
/// deadline, which would mean the message was still running. Checked to
/// fail without the fix: the write-through put failed on the client's
/// deadline ("did not answer").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_guard_and_a_slow_write_end_within_one_statement_timeout() {
    let url = support::database_url();
    let admin = quick_pool(&url).await;
    for mode in MODES {
        let table = support::unique_table("slow_guard");
        let plain = plain_table(&url, &table)
            .await
            .with_statement_timeout(Duration::from_secs(2))
            .fence("pipeline")
            .await
            .unwrap();
        plain.put("k", &json!(0)).await.unwrap();
        let store = Arc::new(
            plain
                .cached(options(mode).retry_backoff_max(Duration::from_secs(60)))
                .unwrap(),
        );
        let fence_locked = row_locks::lock_row(&admin, &table, "#fence:pipeline").await;
        let row_locked = row_locks::lock_row(&admin, &table, "k").await;
        let call = tokio::spawn({
            let store = store.clone();
            async move {
                store.put("k", &json!(1)).await?;
                store.flush().await
            }
        });
        tokio::time::sleep(Duration::from_millis(1200)).await;
        fence_locked.commit().await.unwrap();
        let error = call.await.unwrap().unwrap_err().to_string();
        row_locked.commit().await.unwrap();
        report(&format!(
            "slow-guard[{}]: guard held 1.2 s, write blocked after it, 2 s budget: {error}",
            mode_name(mode)
        ));
        assert!(
            error.contains("statement timeout") && !error.contains("did not answer"),
            "{mode:?}: {error}"
        );
        drop(store);
    }
}
