//! Keys held by an operation the table decides: while a `compare_and_put`
//! or `put_batch` of the cached store is between its first look at a key and
//! its own commit, no write of that key may be staged, or the operation
//! could compare against (or be overwritten by) a value it never saw.
//!
//! Invariant: a key is held only by a task that also holds the store's
//! async mutex of the key's stripe, and it releases the hold before that
//! mutex. A writer that finds its key held therefore waits on the stripe's
//! mutex, and finds the hold gone once it gets it (unless a new holder took
//! both meanwhile, when it waits again).

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::cache::Key;
use crate::lock::lock;

#[derive(Debug, Default)]
pub(crate) struct Holds {
    /// How many keys are held: while none is (almost always), a write
    /// decides without hashing its key again or taking `keys`' lock.
    count: AtomicUsize,
    keys: Mutex<HashSet<Key>>,
}

impl Holds {
    /// Whether `key` is held. Writers ask under the key's slot lock, and
    /// holders take that lock after [`hold`](Self::hold): a write that saw no
    /// hold has finished updating the slot before the holder reads it.
    pub(crate) fn is_held(&self, key: &str) -> bool {
        self.count.load(Ordering::SeqCst) > 0 && lock(&self.keys).contains(key)
    }

    /// Holds `key`; the key is in the set before the count moves, so a
    /// writer that sees the count sees the key.
    pub(crate) fn hold(&self, key: Key) {
        let inserted = lock(&self.keys).insert(key);
        debug_assert!(inserted, "a key is held by one holder at a time");
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn release(&self, key: &str) {
        if lock(&self.keys).remove(key) {
            self.count.fetch_sub(1, Ordering::SeqCst);
        }
    }
}
