//! Connections kept between operations, so that each does not pay sqlx's
//! release ping.
//!
//! sqlx returns a connection to its pool through a spawned task that pings
//! it first: a second round trip after every statement. It is off the
//! caller's path but not off the CPU, and with client and server sharing a
//! few cores that is most of what separates a pooled `get` from one on a
//! connection of its own (measured here: about 95 µs against 60-70 µs for
//! the same prepared statement). So the executor keeps a connection that
//! answered and hands it to the next operation. Invariants:
//!
//! 1. Only a connection whose last message was answered in full, without
//!    error, is kept: one in an unknown state (cancelled, timed out, failed)
//!    goes back to sqlx, which pings it and drops it if it is broken.
//! 2. At most `max_connections - 1` connections are kept, so another user of
//!    the same pool (`pool()`, a second store on it) can always get one.
//! 3. A kept connection unused for [`HOLD`] goes back to the pool: a store
//!    that is idle holds none.
//! 4. No operation of the store waits for the pool while a connection is
//!    kept: when one is waiting, a connection that answers goes back to the
//!    pool (to that waiter) instead. Otherwise operations that found the
//!    reserve empty would queue on the pool while others cycled through the
//!    reserve, and could wait up to the acquire timeout.
//!
//! A kept connection that died meanwhile (a server restart) fails its next
//! statement as a lost connection, which the executor retries on another.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::Postgres;

use crate::lock::lock;

/// How long an unused connection is kept (invariant 3).
pub(crate) const HOLD: Duration = Duration::from_millis(250);

/// The kept connections of one executor and its clones.
#[derive(Debug, Clone)]
pub(crate) struct Reserve {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Most recently used last.
    kept: Mutex<Vec<Kept>>,
    /// Operations of this store waiting for the pool (invariant 4).
    waiting: AtomicUsize,
    capacity: usize,
    sweeping: AtomicBool,
}

#[derive(Debug)]
struct Kept {
    conn: PoolConnection<Postgres>,
    since: Instant,
}

impl Reserve {
    /// A reserve for a pool of `max_connections` (invariant 2).
    pub(crate) fn new(max_connections: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                kept: Mutex::default(),
                waiting: AtomicUsize::new(0),
                capacity: (max_connections as usize).saturating_sub(1),
                sweeping: AtomicBool::new(false),
            }),
        }
    }

    /// The most recently kept connection, if any.
    pub(crate) fn take(&self) -> Option<PoolConnection<Postgres>> {
        lock(&self.inner.kept).pop().map(|kept| kept.conn)
    }

    /// Registers an operation about to wait for the pool, then takes a
    /// connection kept meanwhile, if any. From here until the guard drops,
    /// answered connections go back to the pool (invariant 4). The count
    /// moves before the reserve is looked at, and `keep` reads it under the
    /// reserve's lock, so a connection is never kept unseen by a waiter.
    pub(crate) fn wait_for_pool(&self) -> (WaitingGuard<'_>, Option<PoolConnection<Postgres>>) {
        self.inner.waiting.fetch_add(1, Ordering::SeqCst);
        let guard = WaitingGuard(&self.inner.waiting);
        (guard, self.take())
    }

    /// Keeps a connection that answered in full (invariant 1), or returns it
    /// to the pool when the reserve is full.
    pub(crate) fn keep(&self, conn: PoolConnection<Postgres>) {
        if self.inner.capacity == 0 {
            return;
        }
        let overflow = {
            let mut kept = lock(&self.inner.kept);
            if kept.len() < self.inner.capacity && self.inner.waiting.load(Ordering::SeqCst) == 0 {
                kept.push(Kept {
                    conn,
                    since: Instant::now(),
                });
                None
            } else {
                Some(conn)
            }
        };
        // Dropped outside the lock: sqlx spawns its return to the pool.
        drop(overflow);
        self.start_sweeper();
    }

    /// Gives every kept connection back to the pool (the session settings
    /// changed, and the pool's `before_acquire` must see them).
    pub(crate) fn release_all(&self) {
        let kept = std::mem::take(&mut *lock(&self.inner.kept));
        give_back(kept);
    }

    /// One task per reserve returns connections unused for [`HOLD`]; it ends
    /// when the reserve is gone. Started at the first `keep`, which runs
    /// inside the runtime.
    fn start_sweeper(&self) {
        if self.inner.sweeping.swap(true, Ordering::SeqCst) {
            return;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HOLD / 2).await;
                let Some(inner) = weak.upgrade() else {
                    return;
                };
                let stale: Vec<Kept> = {
                    let mut kept = lock(&inner.kept);
                    let (stale, fresh) = std::mem::take(&mut *kept)
                        .into_iter()
                        .partition(|k| k.since.elapsed() >= HOLD);
                    *kept = fresh;
                    stale
                };
                give_back(stale);
            }
        });
    }
}

/// Counts an operation waiting for the pool while it lives.
pub(crate) struct WaitingGuard<'a>(&'a AtomicUsize);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        give_back(std::mem::take(
            self.kept.get_mut().unwrap_or_else(|p| p.into_inner()),
        ));
    }
}

/// Returns connections to their pool. sqlx does that from a spawned task,
/// which needs a runtime; without one (a store dropped, or reconfigured,
/// outside its runtime) the connections are closed directly instead.
fn give_back(kept: Vec<Kept>) {
    if tokio::runtime::Handle::try_current().is_ok() {
        drop(kept);
        return;
    }
    for kept in kept {
        drop(kept.conn.leak());
    }
}
