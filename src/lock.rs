//! Locking the crate's std mutexes.

use std::sync::{Mutex, MutexGuard};

/// Locks `mutex`, ignoring poisoning.
///
/// Every std mutex in this crate guards data that is updated in single steps
/// (a queue push, a swapped `Vec`, an `Option` set or taken), so a panic while
/// one is held cannot leave it half updated, and a poisoned lock is safe to
/// keep using.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
