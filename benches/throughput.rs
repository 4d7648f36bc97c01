//! Write and read throughput of every store, side by side in one run, against
//! the throwaway PostgreSQL (or `DATABASE_URL`).
//!
//! ```text
//! cargo bench --bench throughput             # full run
//! cargo bench --bench throughput -- --quick  # quick run, under 3 minutes
//! ```
//!
//! Every group has `upstream_1_0_1`, the published faucet-state-postgres
//! 1.0.1 with its defaults, and a `baseline`: what a plain store does, one
//! statement per call through a bare sqlx pool with sqlx's default options
//! (which ping a connection on every acquire). `baseline_no_ping` is the same
//! with that ping turned off, to show how much of the gap the ping alone
//! explains.
//!
//! Stores without a suffix have the default options, so on this direct
//! connection their statements go prepared; `_messages` pins the
//! one-message-per-call form (`with_prepared_statements(false)`), which is
//! what a store behind a transaction pooler sends. `_via_pgbouncer` rows go
//! through a PgBouncer in transaction mode in front of the same server
//! (left out with `DATABASE_URL`, or without PgBouncer installed): the
//! default store there, and the pinned message form, which is what the
//! default was before the form was chosen per endpoint.

mod common;
#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main,
};
use faucet_core::state::StateStore;
use faucet_state_postgres::{CacheOptions, CachedStateStore, Durability, PostgresStateStore};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;
use tokio::runtime::Runtime;

const POOL_SIZE: u32 = 5;
const DISTINCT_KEYS: usize = 10_000;

/// One way of writing and reading bookmarks.
#[derive(Clone)]
enum Subject {
    /// One statement per call through a bare sqlx pool.
    Baseline {
        pool: PgPool,
        table: String,
    },
    Store(Arc<dyn StateStore>),
}

impl Subject {
    async fn put(&self, key: &str, value: &Value) {
        match self {
            Subject::Baseline { pool, table } => {
                sqlx::query(&format!(
                    "INSERT INTO \"{table}\" (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = NOW()"
                ))
                .bind(key)
                .bind(Json(value))
                .execute(pool)
                .await
                .expect("baseline upsert");
            }
            Subject::Store(store) => store.put(key, value).await.expect("put"),
        }
    }

    async fn get(&self, key: &str) -> Option<Value> {
        match self {
            Subject::Baseline { pool, table } => sqlx::query_scalar::<_, Json<Value>>(&format!(
                "SELECT value FROM \"{table}\" WHERE key = $1"
            ))
            .bind(key)
            .fetch_optional(pool)
            .await
            .expect("baseline select")
            .map(|Json(v)| v),
            Subject::Store(store) => store.get(key).await.expect("get"),
        }
    }
}

struct Env {
    rt: Runtime,
    url: String,
}

impl Env {
    fn new() -> Self {
        Self {
            rt: common::runtime(),
            url: support::database_url(),
        }
    }

    async fn plain(&self, tag: &str) -> PostgresStateStore {
        self.plain_at(&self.url, tag).await
    }

    async fn plain_at(&self, url: &str, tag: &str) -> PostgresStateStore {
        let store = PostgresStateStore::connect_with(url, POOL_SIZE, &support::unique_table(tag))
            .await
            .expect("connect");
        store.ensure_table().await.expect("table");
        store
    }

    /// The plain store pinned to one message per call.
    async fn messages(&self, tag: &str) -> PostgresStateStore {
        self.plain(tag).await.with_prepared_statements(false)
    }

    /// The plain store through PgBouncer, default and pinned to messages
    /// (both send messages there); none without a PgBouncer.
    async fn via_pgbouncer(&self, tag: &str) -> Vec<(&'static str, Subject)> {
        let Some(url) = support::pgbouncer_url() else {
            return Vec::new();
        };
        let default = self.plain_at(&url, tag).await;
        assert!(!default.prepared_statements(), "PgBouncer is found out");
        let messages = self
            .plain_at(&url, tag)
            .await
            .with_prepared_statements(false);
        vec![
            ("plain_via_pgbouncer", Subject::Store(Arc::new(default))),
            (
                "plain_messages_via_pgbouncer",
                Subject::Store(Arc::new(messages)),
            ),
        ]
    }

    async fn baseline(&self, ping: bool) -> Subject {
        let plain = self.plain("baseline").await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .test_before_acquire(ping)
            .connect(&self.url)
            .await
            .expect("baseline pool");
        Subject::Baseline {
            pool,
            table: plain.table().to_owned(),
        }
    }

    /// The published crate this one is measured against, with its own
    /// defaults (a pool of 5 that pings on every acquire).
    async fn upstream(&self, tag: &str) -> Subject {
        Subject::Store(Arc::new(common::upstream_store(&self.url, tag).await))
    }

    async fn cached(&self, durability: Durability, options: CacheOptions) -> Arc<CachedStateStore> {
        self.cached_on(self.plain("cached").await, durability, options)
    }

    fn cached_on(
        &self,
        plain: PostgresStateStore,
        durability: Durability,
        options: CacheOptions,
    ) -> Arc<CachedStateStore> {
        Arc::new(
            plain
                .cached(options.durability(durability))
                .expect("cached store"),
        )
    }

    /// Every subject of the write comparison, by name.
    fn writers(&self) -> Vec<(&'static str, Subject, Option<Arc<CachedStateStore>>)> {
        self.rt.block_on(async {
            let mut subjects = vec![
                ("baseline", self.baseline(true).await, None),
                ("baseline_no_ping", self.baseline(false).await, None),
                ("upstream_1_0_1", self.upstream("upstream").await, None),
                (
                    "plain",
                    Subject::Store(Arc::new(self.plain("plain").await)),
                    None,
                ),
            ];
            subjects.push((
                "plain_messages",
                Subject::Store(Arc::new(self.messages("plain_messages").await)),
                None,
            ));
            for (name, subject) in self.via_pgbouncer("plain_pgbouncer").await {
                subjects.push((name, subject, None));
            }
            for (name, durability, messages) in [
                ("write_through", Durability::WriteThrough, false),
                ("write_through_messages", Durability::WriteThrough, true),
                ("group_commit", Durability::GroupCommit, false),
                ("group_commit_messages", Durability::GroupCommit, true),
                ("write_behind", Durability::WriteBehind, false),
            ] {
                let plain = if messages {
                    self.messages(name).await
                } else {
                    self.plain(name).await
                };
                let store = self.cached_on(plain, durability, CacheOptions::new());
                subjects.push((name, Subject::Store(store.clone()), Some(store)));
            }
            subjects
        })
    }
}

/// The keys and values of one put scenario, built before any timing so that
/// only the store's work is measured: task `t`'s `i`-th put writes
/// `keys[t][i % keys[t].len()]` with `values[i % values.len()]`, a typical
/// bookmark (a CDC position and a timestamp).
///
/// There are [`VALUES`] values, few enough to stay in the CPU's cache, as a
/// bookmark the caller has just built is. With thousands of them, each put
/// first waited for its value's map node to come from memory (a third of
/// a write-behind put's time, measured with `perf`): a cost of the
/// benchmark's layout, not of any store.
struct Workload {
    keys: Vec<Vec<String>>,
    values: Vec<Value>,
}

impl Workload {
    fn new(tasks: usize, keys_per_task: usize, key_of: fn(usize, usize) -> String) -> Arc<Self> {
        Arc::new(Self {
            keys: (0..tasks)
                .map(|t| (0..keys_per_task).map(|i| key_of(t, i)).collect())
                .collect(),
            values: (0..VALUES).map(bookmark).collect(),
        })
    }
}

/// Distinct values a put scenario cycles through (see [`Workload`]).
const VALUES: usize = 64;

fn bookmark(i: usize) -> Value {
    json!({"lsn": format!("0/{:08X}", i * 4096), "ts": 1_764_000_000 + i})
}

/// Runs about `iters` puts of `workload` spread over its tasks and returns
/// the time `iters` of them took (scaled, since the count is rounded up to a
/// multiple of the tasks).
fn timed_puts(env: &Env, subject: &Subject, iters: u64, workload: &Arc<Workload>) -> Duration {
    let tasks = workload.keys.len();
    let per_task = (iters as usize).div_ceil(tasks).max(1);
    let elapsed = env.rt.block_on(async {
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|task| {
                let subject = subject.clone();
                let workload = workload.clone();
                tokio::spawn(async move {
                    let keys = &workload.keys[task];
                    let values = &workload.values;
                    for i in 0..per_task {
                        subject
                            .put(&keys[i % keys.len()], &values[i % values.len()])
                            .await;
                    }
                })
            })
            .collect();
        for handle in handles {
            handle.await.expect("put task");
        }
        start.elapsed()
    });
    elapsed.mul_f64(iters as f64 / (per_task * tasks) as f64)
}

fn puts(c: &mut Criterion) {
    let env = Env::new();
    let writers = env.writers();
    type KeyOf = fn(usize, usize) -> String;
    let scenarios: [(&str, usize, usize, KeyOf); 4] = [
        ("1_task_hot_key", 1, 1, |_, _| "hot".to_owned()),
        ("1_task_10k_keys", 1, DISTINCT_KEYS, |_, i| format!("k{i}")),
        ("16_tasks_distinct_keys", 16, DISTINCT_KEYS / 16, |t, i| {
            format!("t{t}-{i}")
        }),
        ("64_tasks_distinct_keys", 64, DISTINCT_KEYS / 64, |t, i| {
            format!("t{t}-{i}")
        }),
    ];
    for (scenario, tasks, keys_per_task, key_of) in scenarios {
        let workload = Workload::new(tasks, keys_per_task, key_of);
        let mut group = c.benchmark_group(format!("put/{scenario}"));
        group.throughput(Throughput::Elements(1));
        for (name, subject, _) in &writers {
            group.bench_function(*name, |b| {
                b.iter_custom(|iters| timed_puts(&env, subject, iters, &workload))
            });
        }
        group.finish();
    }
    env.rt.block_on(async {
        for (_, _, store) in writers {
            if let Some(store) = store {
                store.shutdown().await.expect("shutdown");
            }
        }
    });
}

/// Rows persisted per second: put `n` distinct keys into a write-behind store
/// and `flush()`; the time covers both, so it is a lower bound on the
/// flusher's own rate.
fn flushes(c: &mut Criterion) {
    let env = Env::new();
    let mut group = c.benchmark_group("flush");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    for n in [1_000usize, 10_000, 100_000] {
        group.throughput(Throughput::Elements(n as u64));
        for max_batch in [100usize, 1_000, 10_000] {
            let store = env.rt.block_on(
                env.cached(
                    Durability::WriteBehind,
                    CacheOptions::new()
                        .flush_interval(Duration::from_secs(3600))
                        .max_batch(max_batch)
                        .max_pending(n.max(max_batch)),
                ),
            );
            let mut round = 0u64;
            group.bench_function(BenchmarkId::new(format!("{n}_keys"), max_batch), |b| {
                b.iter_custom(|iters| {
                    env.rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            round += 1;
                            for i in 0..n {
                                store
                                    .put(&format!("f{i}"), &json!({"round": round, "i": i}))
                                    .await
                                    .expect("put");
                            }
                            store.flush().await.expect("flush");
                        }
                        start.elapsed()
                    })
                })
            });
            env.rt.block_on(store.shutdown()).expect("shutdown");
        }
    }
    group.finish();
}

fn gets(c: &mut Criterion) {
    let env = Env::new();
    let subjects: Vec<(&str, Subject)> = env.rt.block_on(async {
        let hit = env
            .cached(Durability::WriteThrough, CacheOptions::new())
            .await;
        let miss = env
            .cached(
                Durability::WriteThrough,
                CacheOptions::new().cache_capacity(0),
            )
            .await;
        vec![
            ("baseline", env.baseline(true).await),
            ("baseline_no_ping", env.baseline(false).await),
            ("upstream_1_0_1", env.upstream("upstream_get").await),
            (
                "plain",
                Subject::Store(Arc::new(env.plain("plain_get").await)),
            ),
            (
                "plain_messages",
                Subject::Store(Arc::new(env.messages("messages_get").await)),
            ),
            ("cached_hit", Subject::Store(hit)),
            ("cached_miss", Subject::Store(miss)),
        ]
        .into_iter()
        .chain(env.via_pgbouncer("pgbouncer_get").await)
        .collect()
    });
    let value = json!({"lsn": "0/16B3748", "ts": 1_764_000_000});
    let mut group = c.benchmark_group("get");
    group.throughput(Throughput::Elements(1));
    for (name, subject) in &subjects {
        env.rt.block_on(async {
            subject.put("bookmark", &value).await;
            assert_eq!(subject.get("bookmark").await.as_ref(), Some(&value));
        });
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                env.rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        std::hint::black_box(subject.get("bookmark").await);
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// Where a group-commit batch's time goes, 64 tasks on their own keys:
/// keys per batch, the backend's share (time inside `write_batch`, from
/// `CacheStats::batch_write_time`; over 100% when batches overlap) and the
/// rest (waking writers, staging, building the batch). With
/// `concurrent_batches(1)` rounds run strictly one after another, as before
/// pipelining; the default 2 lets the next batch go while one commits.
/// Then the ceiling: the same statements sent alone, back to back.
/// Printed, not a criterion measurement.
fn group_commit_rounds(_: &mut Criterion) {
    let env = Env::new();
    let full = common::full_run();
    let run_for = Duration::from_millis(if full { 5_000 } else { 200 });
    let subjects = [
        ("group_commit", false, 2),
        ("group_commit_messages", true, 2),
        ("group_commit_one_batch_at_a_time", false, 1),
    ];
    let keys_per_task = DISTINCT_KEYS / 64;
    let workload = Workload::new(64, keys_per_task, |t, i| format!("t{t}-{i}"));
    // One pass over every key: the measured puts then update rows that
    // exist, as the statements measured alone below do.
    let every_key = (64 * keys_per_task) as u64;
    for (name, messages, concurrent) in subjects {
        let store = env.rt.block_on(async {
            let plain = if messages {
                env.messages("rounds").await
            } else {
                env.plain("rounds").await
            };
            let options = CacheOptions::new().concurrent_batches(concurrent);
            env.cached_on(plain, Durability::GroupCommit, options)
        });
        let subject = Subject::Store(store.clone());
        // Warm up, then measure a fixed wall time.
        timed_puts(&env, &subject, every_key, &workload);
        let before = store.stats();
        let started = Instant::now();
        let mut puts = 0u64;
        while started.elapsed() < run_for {
            timed_puts(&env, &subject, 6_400, &workload);
            puts += 6_400;
        }
        let wall = started.elapsed();
        let after = store.stats();
        let batches = (after.batches_written - before.batches_written).max(1);
        let in_backend = after.batch_write_time - before.batch_write_time;
        let per_batch = wall / batches as u32;
        println!(
            "rounds/{name}: {:.0} puts/s, {batches} batches, {:.1} keys per batch, \
             {:?} of wall time per batch, {:?} inside write_batch ({:.0}% of wall time)",
            puts as f64 / wall.as_secs_f64(),
            (after.rows_written - before.rows_written) as f64 / batches as f64,
            per_batch,
            in_backend / batches as u32,
            100.0 * in_backend.as_secs_f64() / wall.as_secs_f64(),
        );
        env.rt.block_on(store.shutdown()).expect("shutdown");
    }
    // The server's share on its own: the flusher's statement shape (a 64-row
    // upsert over UNNEST, then its commit) sent back to back by one task,
    // nothing else running, over the same rows with the same values as the
    // loop above writes them (statement `j` carries the `j`-th put of every
    // task). No closed loop of 64 writers, each waiting for its own commit,
    // can go faster than 64 puts per statement.
    let statements: Vec<Vec<(String, Value)>> = (0..keys_per_task)
        .map(|j| {
            let value = &workload.values[j % workload.values.len()];
            (workload.keys.iter())
                .map(|keys| (keys[j].clone(), value.clone()))
                .collect()
        })
        .collect();
    for (name, messages) in [("default", false), ("messages", true)] {
        let per_statement = env.rt.block_on(async {
            let plain = if messages {
                env.messages("lone").await
            } else {
                env.plain("lone").await
            };
            for entries in &statements {
                plain.put_many(entries).await.expect("warm up");
            }
            let started = Instant::now();
            let mut sent = 0u32;
            while started.elapsed() < run_for {
                let entries = &statements[sent as usize % statements.len()];
                plain.put_many(entries).await.expect("put_many");
                sent += 1;
            }
            started.elapsed() / sent
        });
        println!(
            "rounds/the same 64-row upserts alone ({name}, one task, back to back): \
             {per_statement:?} per statement, so at most {:.0} puts/s for 64 writers",
            64.0 / per_statement.as_secs_f64()
        );
    }
}

/// Where a durable one-row put's time goes, on one connection with sqlx:
/// the ping 1.0.1 sends before every statement (sqlx's
/// `test_before_acquire`), the prepared upsert the plain store sends, and
/// the same upsert with `synchronous_commit = off`, which skips the wait
/// for the commit's WAL flush. 1.0.1's put is a ping plus the upsert; the
/// plain store's is the upsert alone, so the ratio between them is at most
/// (ping + upsert) / upsert. Two alternating rounds; printed, not a
/// criterion measurement.
fn put_breakdown(_: &mut Criterion) {
    use sqlx::Connection;
    let env = Env::new();
    let run_for = Duration::from_millis(if common::full_run() { 3_000 } else { 100 });
    env.rt.block_on(async {
        let table = env.plain("breakdown").await.table().to_owned();
        let mut conn = sqlx::PgConnection::connect(&env.url)
            .await
            .expect("connect");
        let upsert = format!(
            "INSERT INTO \"{table}\" (key, value) VALUES ($1, $2::jsonb) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, updated_at = NOW()"
        );
        let keys: Vec<String> = (0..DISTINCT_KEYS).map(|i| format!("k{i}")).collect();
        let values: Vec<String> = (0..VALUES).map(|i| bookmark(i).to_string()).collect();
        for round in 1..=2 {
            let started = Instant::now();
            let mut pings = 0u32;
            while started.elapsed() < run_for {
                conn.ping().await.expect("ping");
                pings += 1;
            }
            let ping = started.elapsed() / pings;
            let mut upserts = [Duration::ZERO; 2];
            for (commit, setting) in [(0, "on"), (1, "off")] {
                sqlx::raw_sql(&format!("SET synchronous_commit = {setting}"))
                    .execute(&mut conn)
                    .await
                    .expect("set synchronous_commit");
                let started = Instant::now();
                let mut sent = 0usize;
                while started.elapsed() < run_for {
                    sqlx::query(&upsert)
                        .bind(&keys[sent % keys.len()])
                        .bind(&values[sent % values.len()])
                        .execute(&mut conn)
                        .await
                        .expect("upsert");
                    sent += 1;
                }
                upserts[commit] = started.elapsed() / sent as u32;
            }
            let [durable, unflushed] = upserts;
            println!(
                "breakdown/round {round}: ping {ping:?}, prepared upsert {durable:?} \
                 (of which waiting for the WAL flush {:?}: {unflushed:?} with \
                 synchronous_commit off), so 1.0.1 / plain put at most {:.2}x",
                durable.saturating_sub(unflushed),
                (ping + durable).as_secs_f64() / durable.as_secs_f64()
            );
        }
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = puts, flushes, gets, group_commit_rounds, put_breakdown
}
criterion_main!(benches);
