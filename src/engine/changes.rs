//! Coherence across processes: the backend's change feed, and the task that
//! applies it to the read cache.
//!
//! Invariants (with [`listen_for_changes`](crate::CacheOptions::listen_for_changes)):
//!
//! 1. A clean entry is served only while the store is *vouched*: listening,
//!    with every change committed since the listening began either received
//!    or not yet delivered. Until the first subscription, and from a lost
//!    connection until the next subscription, clean entries are not served
//!    and reads go to the storage (and are not cached).
//! 2. A change received drops the key's clean entry and moves its stripe's
//!    write stamp (cache invariant 4), so a read in flight cannot bring the
//!    old value back. Dirty entries are this store's own newer writes and
//!    are never dropped: a notification of another write, or of this store's
//!    own earlier flush, cannot hide them. They are *doubted* instead (cache
//!    invariant 7): the change may have committed after this store's batch
//!    of the key, so once that batch is acknowledged the entry is dropped,
//!    not cleaned, and the next read goes to the storage. Likewise a write
//!    committed outside the flusher is not cached when a change was reported
//!    for its stripe while it was in flight.
//! 3. On each (re)subscription, every clean entry is dropped before the
//!    store vouches again: changes made while it was not listening are lost
//!    with the connection, so nothing cached before can be trusted.
//!
//! The bound this gives: a committed change stops being served within the
//! notification's delivery time (measured in the README), and never later
//! than the listener noticing a lost connection.

use std::sync::Arc;

use async_trait::async_trait;

use crate::backend::StateBackend;
use crate::flusher::Engine;

/// What a [`ChangeFeed`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The feed is subscribed: every change committed from now on will be
    /// delivered (or the feed will report [`Lost`](Self::Lost)).
    Listening,
    /// These keys changed (written or deleted by anyone).
    Keys(Vec<String>),
    /// Any key may have changed (too many to name, or a truncate).
    Everything,
    /// The subscription is gone; changes may be missed until the next
    /// [`Listening`](Self::Listening). The feed resubscribes by itself.
    Lost(String),
}

/// A stream of changes to a backend's storage, made by any writer.
#[async_trait]
pub trait ChangeFeed: Send {
    /// The next change. Never ends: after [`Change::Lost`] the feed keeps
    /// trying to subscribe again (with backoff) and reports
    /// [`Change::Listening`] once it has.
    async fn next(&mut self) -> Change;
}

/// Applies `feed` to the engine's cache until the task is aborted.
pub(crate) async fn listen<B: StateBackend>(engine: Arc<Engine<B>>, mut feed: Box<dyn ChangeFeed>) {
    let cache = &engine.cache;
    loop {
        match feed.next().await {
            Change::Listening => {
                // Invariant 3: drop first, then vouch.
                cache.everything_changed_elsewhere();
                cache.set_vouched(true);
            }
            Change::Keys(keys) => {
                for key in keys {
                    cache.changed_elsewhere(&key);
                }
            }
            Change::Everything => cache.everything_changed_elsewhere(),
            Change::Lost(reason) => {
                cache.set_vouched(false);
                cache.everything_changed_elsewhere();
                tracing::warn!(%reason, "faucet-state-postgres: lost the change feed; reads go to the table until it is back");
            }
        }
    }
}
