//! Coherence in the interleavings timing alone rarely produces, forced
//! against a real PostgreSQL: the backend is the plain store behind a thin
//! wrapper that pauses right after a statement carrying the watched key has
//! committed, so the test can make another writer commit and its
//! notification be applied exactly there, before the cached store learns of
//! its own commit.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use faucet_core::FaucetError;
use faucet_core::check::{CheckContext, CheckReport};
use faucet_core::state::StateStore;
use faucet_state_postgres::{
    BatchError, CacheOptions, CachedStateStore, Change, ChangeFeed, Durability, PostgresStateStore,
    StateBackend,
};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

const KEY: &str = "k";
/// Written in the same statement as the other writer's change of `KEY`, so
/// that one notification names both.
const MARKER: &str = "marker";

/// The plain store, pausing once, when armed, right after a commit that
/// carries `KEY`, until the test resumes it.
struct Paused {
    inner: PostgresStateStore,
    armed: AtomicBool,
    committed: Notify,
    resume: Notify,
    /// How many changes naming `MARKER` the store's listener has applied.
    marker_changes: Arc<watch::Sender<u64>>,
}

impl Paused {
    async fn pause_if_armed(&self) {
        if self.armed.swap(false, Ordering::SeqCst) {
            self.committed.notify_one();
            self.resume.notified().await;
        }
    }
}

#[async_trait]
impl StateBackend for Paused {
    fn encode(&self, key: &str, value: &Value) -> Result<Arc<str>, FaucetError> {
        self.inner.encode(key, value)
    }

    fn decode(&self, key: &str, stored: &str) -> Result<Value, FaucetError> {
        self.inner.decode(key, stored)
    }

    async fn load(&self, key: &str) -> Result<Option<String>, FaucetError> {
        self.inner.load(key).await
    }

    async fn write_batch(
        &self,
        upserts: &[(&str, &str)],
        deletes: &[&str],
    ) -> Result<(), BatchError> {
        self.inner.write_batch(upserts, deletes).await?;
        if upserts.iter().any(|(key, _)| *key == KEY) {
            self.pause_if_armed().await;
        }
        Ok(())
    }

    async fn compare_and_put(
        &self,
        key: &str,
        expected: Option<&Value>,
        stored: &str,
    ) -> Result<bool, BatchError> {
        let wrote = StateBackend::compare_and_put(&self.inner, key, expected, stored).await?;
        if wrote && key == KEY {
            self.pause_if_armed().await;
        }
        Ok(wrote)
    }

    async fn list_keys(&self, prefix: &str) -> Result<Vec<String>, FaucetError> {
        self.inner.list_keys(prefix).await
    }

    async fn check(&self, ctx: &CheckContext) -> Result<CheckReport, FaucetError> {
        StateStore::check(&self.inner, ctx).await
    }

    fn change_feed(&self) -> Option<Box<dyn ChangeFeed>> {
        Some(Box::new(CountingFeed {
            inner: self.inner.change_feed()?,
            marker_changes: self.marker_changes.clone(),
            names_marker: false,
        }))
    }
}

/// The plain store's feed, counting the changes naming `MARKER` once they
/// have been applied: the listener asks for the next change only after
/// applying the previous one.
struct CountingFeed {
    inner: Box<dyn ChangeFeed>,
    marker_changes: Arc<watch::Sender<u64>>,
    names_marker: bool,
}

#[async_trait]
impl ChangeFeed for CountingFeed {
    async fn next(&mut self) -> Change {
        if std::mem::take(&mut self.names_marker) {
            self.marker_changes.send_modify(|n| *n += 1);
        }
        let change = self.inner.next().await;
        self.names_marker =
            matches!(&change, Change::Keys(keys) if keys.iter().any(|k| k == MARKER));
        change
    }
}

/// How the watched write is made.
#[derive(Debug, Clone, Copy)]
enum Write {
    Put(Durability),
    /// A write-behind put, then `flush()`.
    Flush,
    CompareAndPut,
}

async fn within_30s<T>(what: &str, wait: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), wait)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within 30 s"))
}

/// Issue 21, item 1. This store commits `KEY`; another writer, which waited
/// for the row, commits its own value right after; that change's
/// notification is applied before this store learns of its own commit. The
/// store must not then serve its own, older value. Regression: the
/// notification found the key dirty (or not cached yet) and was ignored,
/// then the commit stored the key clean with this store's value, stale for
/// good. Checked to fail without the fix in every case (`get` returned
/// "mine" while the table held "theirs").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_right_after_this_stores_own_is_never_hidden() {
    for write in [
        Write::Put(Durability::WriteThrough),
        Write::Put(Durability::GroupCommit),
        Write::Flush,
        Write::CompareAndPut,
    ] {
        let table = support::unique_table("coherent_after");
        let url = support::database_url();
        let other = PostgresStateStore::connect_with(&url, 2, &table)
            .await
            .unwrap();
        other.ensure_table().await.unwrap();
        other.ensure_change_notifications().await.unwrap();
        other.put(KEY, &json!("start")).await.unwrap();
        let backend = Arc::new(Paused {
            inner: PostgresStateStore::connect_with(&url, 3, &table)
                .await
                .unwrap(),
            armed: AtomicBool::new(false),
            committed: Notify::new(),
            resume: Notify::new(),
            marker_changes: Arc::new(watch::channel(0).0),
        });
        let durability = match write {
            Write::Put(durability) => durability,
            Write::Flush => Durability::WriteBehind,
            Write::CompareAndPut => Durability::GroupCommit,
        };
        let options = CacheOptions::new()
            .durability(durability)
            .flush_interval(Duration::from_secs(3600))
            .listen_for_changes(true);
        let store = Arc::new(CachedStateStore::new(backend.clone(), options).unwrap());
        within_30s("subscribing", async {
            while !store.stats().listening {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert_eq!(store.get(KEY).await.unwrap(), Some(json!("start")));

        backend.armed.store(true, Ordering::SeqCst);
        let writing = tokio::spawn({
            let store = store.clone();
            async move {
                match write {
                    Write::Put(_) => store.put(KEY, &json!("mine")).await,
                    Write::Flush => {
                        store.put(KEY, &json!("mine")).await?;
                        store.flush().await
                    }
                    Write::CompareAndPut => store
                        .compare_and_put(KEY, Some(&json!("start")), &json!("mine"))
                        .await
                        .map(|wrote| assert!(wrote)),
                }
            }
        });
        within_30s("this store's commit", backend.committed.notified()).await;
        let mut applied = backend.marker_changes.subscribe();
        let before = *applied.borrow_and_update();
        let theirs = vec![
            (KEY.to_owned(), json!("theirs")),
            (MARKER.to_owned(), json!(1)),
        ];
        other.put_batch(&theirs).await.unwrap();
        within_30s(
            "the other writer's notification",
            applied.wait_for(|n| *n > before),
        )
        .await
        .unwrap();
        backend.resume.notify_one();
        within_30s("the write", writing).await.unwrap().unwrap();

        assert_eq!(other.get(KEY).await.unwrap(), Some(json!("theirs")));
        assert_eq!(
            store.get(KEY).await.unwrap(),
            Some(json!("theirs")),
            "{write:?}: this store serves its own older value"
        );
        store.shutdown().await.unwrap();
    }
}
