//! The in-memory side of the write-behind engine: one slot per key.
//!
//! A slot is *clean* (its value is what the backend holds, or the key is
//! known to be absent) or *dirty* (its value, or its deletion, still has to be
//! written). Invariants:
//!
//! 1. A dirty slot is never evicted, so reads always see the newest write.
//! 2. Every dirty key is in exactly one place: the dirty queue, a round
//!    the flusher is writing, or *parked* after the server refused it (see
//!    below); never twice. The queue is therefore bounded by `max_pending`,
//!    like the dirty slots.
//! 3. Only the flusher turns a dirty slot clean, and only if the version it
//!    wrote is still the slot's version; otherwise a newer write arrived
//!    while the batch was in flight and the key goes back on the queue.
//! 4. A value read from the backend is cached only if no write touched its
//!    stripe of keys while the read was in flight, so a slow read can never
//!    bring back a value older than a write it raced with.
//! 5. A parked key has a record in `refusals` (why, and when to retry it
//!    alone); a newer write of the key removes the record and queues the key
//!    again. A slot's refusal state and its record change together, under
//!    the slot's lock (lock order: slot, then `refusals`, then the queue).
//! 6. A slot's `persisted` version only grows, and every write of the key
//!    with a version up to it is durable (it, or a newer write of the key,
//!    is committed). A missing slot was evicted clean, so every write of its
//!    key so far is durable; a slot created by a write starts just below
//!    that write's version for the same reason.
//! 7. A value this store committed becomes a clean entry only if no other
//!    writer's change to the key may have committed after it. A change
//!    reported while the key is dirty (its notification can arrive while
//!    this store's batch is still being acknowledged, and that change may
//!    have committed right after the batch) marks the slot *doubted*: the
//!    commit that makes it durable then drops the slot instead of cleaning
//!    it. A value committed outside the flusher (write-through,
//!    `compare_and_put`, `put_batch`) is stored clean only if its stripe's
//!    write stamp has not moved since before the statement was sent, so a
//!    change reported in between is never hidden by it.
//! 8. A key whose write outside the flusher was given up with its outcome
//!    unknown (a dropped write-through put, `compare_and_put` or
//!    `put_batch`, or one whose connection was lost) is *unsettled* until
//!    the backend says that statement can no longer commit
//!    ([`StateBackend::abandoned_writes_settle_within`](crate::StateBackend::abandoned_writes_settle_within)).
//!    Meanwhile nothing read or written for the key is cached: a read could
//!    see the table before that statement commits.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use tokio::sync::Semaphore;

use crate::holds::Holds;
use crate::lock::lock;
use crate::stats::Counters;

/// Stripes of write stamps (invariant 4). More stripes mean fewer reads that
/// skip caching because an unrelated key was written meanwhile.
pub(crate) const STRIPES: usize = 256;

/// The text a backend stores for a value (see [`StateBackend::encode`](crate::StateBackend::encode)).
pub(crate) type Stored = Arc<str>;

/// A key, held once: the slot map, the queues and the records share it.
pub(crate) type Key = Arc<str>;

#[derive(Debug)]
struct Slot {
    /// `None`: the key has no value (deleted, or never written).
    value: Option<Stored>,
    state: SlotState,
    refused: Refused,
    /// Invariant 6: writes up to this version are durable.
    persisted: u64,
    /// Invariant 7: another writer changed the key while it was dirty.
    doubted: bool,
}

/// Where a dirty key whose write the server refused stands (invariant 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// Not refused (or a newer write replaced the refused one).
    No,
    /// Out of the queue, waiting for its retry time.
    Parked,
    /// Taken again by a round, alone in its batch.
    Retrying,
}

/// Why a key's write was refused, and when it is tried again.
#[derive(Debug, Clone)]
struct Refusal {
    reason: Arc<str>,
    retry_at: Instant,
}

/// A write the server refused, as [`Cache::refused_writes`] reports it.
#[derive(Debug, Clone)]
pub(crate) struct RefusedKey {
    pub key: Key,
    pub reason: Arc<str>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Persisted; `stamp` identifies this clean period in the eviction queue.
    Clean { stamp: u64 },
    /// Not yet persisted; `version` identifies the newest write.
    Dirty { version: u64 },
}

/// Keys waiting for the flusher, the number of rounds that took them, and
/// how long the oldest waiting write has waited (approximately: a key queued
/// again after its batch keeps the time of that batch).
#[derive(Debug, Default)]
struct DirtyQueue {
    keys: Vec<Key>,
    rounds_started: u64,
    /// When the queue last went from empty to not empty.
    waiting_since: Option<Instant>,
    /// The oldest `waiting_since` among the rounds in flight.
    in_flight_since: Option<Instant>,
}

impl DirtyQueue {
    /// Since when the oldest write not yet persisted, queued or in flight,
    /// has waited.
    fn oldest(&self) -> Option<Instant> {
        earliest(self.waiting_since, self.in_flight_since)
    }

    fn push(&mut self, key: Key) {
        if self.keys.is_empty() && self.waiting_since.is_none() {
            self.waiting_since = Some(Instant::now());
        }
        self.keys.push(key);
    }
}

/// The earlier of two optional instants; `None` only when both are.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// What a lookup found.
pub(crate) enum Lookup {
    /// The cache knows the answer (`None`: known absent).
    Hit(Option<Stored>),
    /// Not cached; read the backend, then offer the result to [`Cache::fill`].
    Miss(FillTicket),
}

/// Proof of when a read (or a write outside the flusher) began, for
/// invariants 4, 7 and 8.
pub(crate) struct FillTicket {
    stripe: usize,
    stamp: u64,
    /// The key was not unsettled when the read began (invariant 8).
    settled: bool,
}

/// Why [`Cache::stage`] did not take a write.
#[derive(Debug)]
pub(crate) enum StageError {
    /// No room for a new dirty key within the put timeout.
    Full,
    /// A `compare_and_put` or `put_batch` holds the key (see `holds.rs`):
    /// wait for it, then stage the write, handed back here, again.
    Held(Option<Stored>),
}

/// Where one write (a key and the version `stage` gave it) stands.
pub(crate) enum WriteStatus {
    /// It, or a newer write of the key, is committed.
    Durable,
    /// The server refused it, or a newer write of the key (invariant 5).
    Refused(Arc<str>),
    /// Queued, in flight, or waiting for a retry after a failed batch.
    Pending,
}

/// The keys a new round takes.
pub(crate) struct TakenRound {
    pub number: u64,
    /// Queued keys, in queue order.
    pub keys: Vec<Key>,
    /// Parked keys due for their retry, each to be written alone.
    pub retries: Vec<Key>,
    /// Since when the oldest of these keys has waited.
    pub since: Option<Instant>,
}

/// One key's write as the flusher takes it.
pub(crate) struct DirtyEntry {
    pub version: u64,
    pub value: Option<Stored>,
}

impl DirtyEntry {
    /// Encoded size of the write, key included, for batch bounds.
    pub(crate) fn bytes(&self, key: &str) -> usize {
        key.len() + self.value.as_deref().map_or(0, str::len)
    }
}

/// A write the cache accepted.
pub(crate) struct Staged {
    /// It replaced a not-yet-persisted write of the same key.
    pub coalesced: bool,
    /// Identifies this write among the key's writes (larger is newer).
    pub version: u64,
}

#[derive(Debug)]
pub(crate) struct Cache {
    /// foldhash, not the standard library's SipHash: every put hashes its
    /// key at least twice (slot and stripe), and foldhash's keyed hash is
    /// several times faster on short keys while still seeded per process.
    slots: DashMap<Key, Slot, foldhash::fast::RandomState>,
    write_stamps: Box<[AtomicU64]>,
    queue: Mutex<DirtyQueue>,
    /// Parked keys (invariant 5).
    refusals: Mutex<HashMap<Key, Refusal>>,
    /// Clean keys in the order they became clean, oldest first, with the
    /// stamp of that clean period; stale pairs are skipped.
    clean_order: Mutex<VecDeque<(Key, u64)>>,
    clean_count: AtomicUsize,
    dirty_count: AtomicUsize,
    next_version: AtomicU64,
    /// One permit per dirty key that may still be added (`max_pending`).
    room: Semaphore,
    capacity: usize,
    /// Keys no write may be staged for (see `holds.rs`).
    holds: Holds,
    /// Clean entries may be served (see `changes.rs`, invariant 1); always
    /// true for a store that does not listen for changes.
    vouched: std::sync::atomic::AtomicBool,
    /// Invariant 8: unsettled keys, each until when.
    unsettled: Mutex<HashMap<Key, Instant>>,
    /// `unsettled.len()`, read without the lock on every miss.
    unsettled_count: AtomicUsize,
}

impl Cache {
    pub(crate) fn new(max_pending: usize, capacity: usize) -> Self {
        Self {
            slots: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            write_stamps: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            queue: Mutex::default(),
            refusals: Mutex::default(),
            clean_order: Mutex::default(),
            clean_count: AtomicUsize::new(0),
            dirty_count: AtomicUsize::new(0),
            next_version: AtomicU64::new(1),
            room: Semaphore::new(max_pending.min(Semaphore::MAX_PERMITS)),
            capacity,
            holds: Holds::default(),
            vouched: std::sync::atomic::AtomicBool::new(true),
            unsettled: Mutex::default(),
            unsettled_count: AtomicUsize::new(0),
        }
    }

    pub(crate) fn dirty_len(&self) -> usize {
        self.dirty_count.load(Ordering::SeqCst)
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(crate) fn rounds_started(&self) -> u64 {
        lock(&self.queue).rounds_started
    }

    pub(crate) fn lookup(&self, key: &str, counters: &Counters) -> Lookup {
        // The stamp is read before the slot is looked up: a write that
        // creates the slot after the lookup missed it has then moved the
        // stamp, and `fill` will not cache the read (invariant 4).
        let stripe = self.stripe_of(key);
        let stamp = self.write_stamps[stripe].load(Ordering::SeqCst);
        #[cfg(test)]
        crate::test_hooks::reached("lookup: between the stamp and the slot");
        if let Some(slot) = self.slots.get(key)
            && (matches!(slot.state, SlotState::Dirty { .. }) || self.is_vouched())
        {
            counters.hit();
            return Lookup::Hit(slot.value.clone());
        }
        counters.miss();
        Lookup::Miss(FillTicket {
            stripe,
            stamp,
            settled: self.is_settled(key),
        })
    }

    /// Caches a value read from the backend, unless a write raced with the
    /// read (invariant 4) or the key got cached meanwhile.
    pub(crate) fn fill(
        &self,
        key: &str,
        value: Option<Stored>,
        ticket: FillTicket,
        counters: &Counters,
    ) {
        if self.capacity == 0 || !self.is_vouched() || !ticket.settled {
            return;
        }
        let stamp = self.next_stamp();
        let inserted = match self.slots.entry(Key::from(key)) {
            Entry::Vacant(vacant)
                if self.write_stamps[ticket.stripe].load(Ordering::SeqCst) == ticket.stamp =>
            {
                let key = vacant.key().clone();
                vacant.insert(Slot {
                    value,
                    state: SlotState::Clean { stamp },
                    refused: Refused::No,
                    persisted: stamp,
                    doubted: false,
                });
                Some(key)
            }
            _ => None,
        };
        if let Some(key) = inserted {
            self.clean_count.fetch_add(1, Ordering::SeqCst);
            self.remember_clean(key, stamp, counters);
        }
    }

    /// Records a write (a value's stored text, or `None` for a delete) as
    /// dirty. Waits up to `wait` for room when `max_pending` keys are dirty;
    /// refuses a held key at once.
    pub(crate) async fn stage(
        &self,
        key: &str,
        value: Option<Stored>,
        wait: Duration,
    ) -> Result<Staged, StageError> {
        if let Some(mut slot) = self.slots.get_mut(key)
            && matches!(slot.state, SlotState::Dirty { .. })
        {
            if self.holds.is_held(key) {
                return Err(StageError::Held(value));
            }
            let version = self.next_stamp();
            slot.value = value;
            slot.state = SlotState::Dirty { version };
            if slot.refused != Refused::No {
                let key = slot.key().clone();
                self.replace_refused(&key, &mut slot.refused);
            }
            // Before the slot is released: invariant 4 needs the stamp to
            // move before anything can make this key clean and evictable.
            self.bump_stripe(key);
            drop(slot);
            return Ok(Staged {
                coalesced: true,
                version,
            });
        }
        let permit = match self.room.try_acquire() {
            Ok(permit) => permit,
            Err(_) => match tokio::time::timeout(wait, self.room.acquire()).await {
                Ok(Ok(permit)) => permit,
                // The semaphore is never closed; a timeout means no room.
                _ => return Err(StageError::Full),
            },
        };
        let version = self.next_stamp();
        // Refused here, under the slot's lock, the permit goes back unused.
        let (key, previous) = self.replace_slot(key, value, SlotState::Dirty { version }, false)?;
        if matches!(previous, Some(SlotState::Clean { .. })) {
            self.clean_count.fetch_sub(1, Ordering::SeqCst);
        }
        // Another write may have made the key dirty while this one waited.
        let newly_dirty = !matches!(previous, Some(SlotState::Dirty { .. }));
        if newly_dirty {
            // The permit now belongs to this dirty key; `committed` returns it.
            permit.forget();
            self.dirty_count.fetch_add(1, Ordering::SeqCst);
            lock(&self.queue).push(key);
        }
        Ok(Staged {
            coalesced: !newly_dirty,
            version,
        })
    }

    /// A newer write replaces a refused one (invariant 5): its record goes,
    /// and a parked key is queued again. Called under the slot's lock.
    fn replace_refused(&self, key: &Key, refused: &mut Refused) {
        match std::mem::replace(refused, Refused::No) {
            Refused::No => {}
            Refused::Retrying => {
                lock(&self.refusals).remove(key);
            }
            Refused::Parked => {
                lock(&self.refusals).remove(key);
                lock(&self.queue).push(key.clone());
            }
        }
    }

    /// Takes every queued key for a new flush round.
    ///
    /// Parked keys whose retry time has come are returned apart: each is
    /// written alone, so a write refused again blocks no other key.
    pub(crate) fn take_round(&self) -> TakenRound {
        let retries = self.take_due_retries();
        let mut queue = lock(&self.queue);
        queue.rounds_started += 1;
        let since = queue.waiting_since.take();
        queue.in_flight_since = earliest(queue.in_flight_since, since);
        TakenRound {
            number: queue.rounds_started,
            keys: std::mem::take(&mut queue.keys),
            retries,
            since,
        }
    }

    fn take_due_retries(&self) -> Vec<Key> {
        let now = Instant::now();
        let due: Vec<Key> = lock(&self.refusals)
            .iter()
            .filter(|(_, refusal)| refusal.retry_at <= now)
            .map(|(key, _)| key.clone())
            .collect();
        due.into_iter()
            .filter(|key| {
                let Some(mut slot) = self.slots.get_mut(key) else {
                    return false;
                };
                if slot.refused != Refused::Parked {
                    return false;
                }
                slot.refused = Refused::Retrying;
                if let Some(refusal) = lock(&self.refusals).get_mut(key) {
                    // In flight: not due again until it is refused again.
                    refusal.retry_at = now + Duration::from_secs(365 * 24 * 3600);
                }
                true
            })
            .collect()
    }

    /// Keys waiting in the queue (not in flight, not parked).
    pub(crate) fn queued_len(&self) -> usize {
        lock(&self.queue).keys.len()
    }

    /// When the next parked key is due to be retried, if any is parked.
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        lock(&self.refusals)
            .values()
            .map(|refusal| refusal.retry_at)
            .min()
    }

    /// The server refused `version` of `key`: unless a newer write arrived
    /// meanwhile (then the key is queued again, as in [`committed`](Self::committed)),
    /// the key is parked until `retry_at`. Returns whether it was parked.
    pub(crate) fn refused(
        &self,
        key: &Key,
        version: u64,
        reason: Arc<str>,
        retry_at: Instant,
    ) -> bool {
        match self.slots.get_mut(key) {
            Some(mut slot) if slot.state == (SlotState::Dirty { version }) => {
                slot.refused = Refused::Parked;
                lock(&self.refusals).insert(key.clone(), Refusal { reason, retry_at });
                true
            }
            _ => {
                lock(&self.queue).push(key.clone());
                false
            }
        }
    }

    /// Where the write `version` of `key` stands (invariants 5 and 6).
    pub(crate) fn write_status(&self, key: &str, version: u64) -> WriteStatus {
        let Some(slot) = self.slots.get(key) else {
            return WriteStatus::Durable;
        };
        if slot.persisted >= version {
            return WriteStatus::Durable;
        }
        match slot.state {
            SlotState::Clean { .. } => WriteStatus::Durable,
            SlotState::Dirty { .. } if slot.refused != Refused::No => {
                match lock(&self.refusals).get(key) {
                    Some(refusal) => WriteStatus::Refused(refusal.reason.clone()),
                    None => WriteStatus::Pending,
                }
            }
            SlotState::Dirty { .. } => WriteStatus::Pending,
        }
    }

    /// The dirty keys starting with `prefix`, each with whether its pending
    /// write is a put (`true`) or a delete. Dirty slots are never evicted
    /// (invariant 1), so this is every write not yet known to be persisted.
    pub(crate) fn dirty_under(&self, prefix: &str) -> Vec<(Key, bool)> {
        self.slots
            .iter()
            .filter(|slot| {
                matches!(slot.state, SlotState::Dirty { .. }) && slot.key().starts_with(prefix)
            })
            .map(|slot| (slot.key().clone(), slot.value.is_some()))
            .collect()
    }

    /// Every write the server refused that no newer write has replaced, in
    /// key order.
    pub(crate) fn refused_writes(&self) -> Vec<RefusedKey> {
        let mut refused: Vec<RefusedKey> = lock(&self.refusals)
            .iter()
            .map(|(key, refusal)| RefusedKey {
                key: key.clone(),
                reason: refusal.reason.clone(),
            })
            .collect();
        refused.sort_unstable_by(|a, b| a.key.cmp(&b.key));
        refused
    }

    /// The rounds in flight changed: `since` is the oldest `since` of those
    /// still in flight ([`TakenRound::since`]), `None` when none is.
    pub(crate) fn set_in_flight_since(&self, since: Option<Instant>) {
        lock(&self.queue).in_flight_since = since;
    }

    /// Since when the oldest write not yet persisted has waited, if any.
    pub(crate) fn oldest_pending(&self) -> Option<Instant> {
        lock(&self.queue).oldest()
    }

    /// The newest write of a queued key.
    pub(crate) fn dirty_entry(&self, key: &str) -> Option<DirtyEntry> {
        let slot = self.slots.get(key)?;
        match slot.state {
            SlotState::Dirty { version } => Some(DirtyEntry {
                version,
                value: slot.value.clone(),
            }),
            SlotState::Clean { .. } => None,
        }
    }

    /// The flusher committed `version` of `key`: the slot turns clean, or, if
    /// a newer write arrived meanwhile, the key is queued again (invariant 3).
    ///
    /// A doubted slot (invariant 7) is dropped instead: the write is
    /// durable, but another writer's change may have committed after it.
    pub(crate) fn committed(&self, key: &Key, version: u64, counters: &Counters) {
        let stamp = self.next_stamp();
        let cleaned = match self.slots.get_mut(key) {
            Some(mut slot) if slot.state == (SlotState::Dirty { version }) => {
                slot.state = SlotState::Clean { stamp };
                slot.persisted = version;
                if std::mem::replace(&mut slot.refused, Refused::No) != Refused::No {
                    lock(&self.refusals).remove(key);
                }
                Some(!slot.doubted)
            }
            Some(mut slot) => {
                slot.persisted = slot.persisted.max(version);
                None
            }
            None => None,
        };
        let Some(trusted) = cleaned else {
            lock(&self.queue).push(key.clone());
            return;
        };
        let trusted = trusted && self.is_settled(key);
        self.dirty_count.fetch_sub(1, Ordering::SeqCst);
        self.room.add_permits(1);
        self.clean_count.fetch_add(1, Ordering::SeqCst);
        if trusted {
            self.remember_clean(key.clone(), stamp, counters);
        } else {
            self.invalidate(key);
        }
    }

    /// Puts keys whose batch failed back on the queue; they are still dirty.
    pub(crate) fn requeue(&self, keys: impl IntoIterator<Item = Key>) {
        let mut queue = lock(&self.queue);
        // The requeued keys have waited since their round's queue began.
        queue.waiting_since = queue.oldest();
        queue.keys.extend(keys);
    }

    /// A ticket to take before sending a write outside the flusher, for
    /// [`store_clean`](Self::store_clean) (invariant 7).
    pub(crate) fn write_ticket(&self, key: &str) -> FillTicket {
        let stripe = self.stripe_of(key);
        let stamp = self.write_stamps[stripe].load(Ordering::SeqCst);
        FillTicket {
            stripe,
            stamp,
            settled: self.is_settled(key),
        }
    }

    /// A write of `key` outside the flusher was given up with its outcome
    /// unknown, and may commit until `until` (invariant 8): the cached
    /// entry goes, and nothing is cached for the key until then.
    pub(crate) fn unsettle(&self, key: &str, until: Instant) {
        {
            let mut unsettled = lock(&self.unsettled);
            let at = unsettled.entry(Key::from(key)).or_insert(until);
            *at = (*at).max(until);
            self.unsettled_count
                .store(unsettled.len(), Ordering::SeqCst);
        }
        self.invalidate(key);
    }

    /// Whether no write of `key` given up with an unknown outcome may still
    /// commit (invariant 8); forgets the keys whose time has passed.
    fn is_settled(&self, key: &str) -> bool {
        if self.unsettled_count.load(Ordering::SeqCst) == 0 {
            return true;
        }
        let mut unsettled = lock(&self.unsettled);
        let now = Instant::now();
        unsettled.retain(|_, until| *until > now);
        self.unsettled_count
            .store(unsettled.len(), Ordering::SeqCst);
        !unsettled.contains_key(key)
    }

    /// The backend committed `value` for `key` outside the flusher (a
    /// write-through write, or a held key's `compare_and_put`/`put_batch`),
    /// with the statement sent after `ticket` was taken. The key has no
    /// dirty write: write-through stages none, and a holder made its pending
    /// write durable first. If anything moved the key's stripe meanwhile (a
    /// change reported by the feed, among others), the value is not cached
    /// and any cached one is dropped (invariant 7).
    pub(crate) fn store_clean(
        &self,
        key: &str,
        value: Option<Stored>,
        ticket: FillTicket,
        counters: &Counters,
    ) {
        if !ticket.settled
            || self.write_stamps[ticket.stripe].load(Ordering::SeqCst) != ticket.stamp
            || !self.is_settled(key)
        {
            self.invalidate(key);
            return;
        }
        let stamp = self.next_stamp();
        let Ok((key, previous)) = self.replace_slot(key, value, SlotState::Clean { stamp }, true)
        else {
            unreachable!("a holder's write is never refused for its own hold");
        };
        debug_assert!(!matches!(previous, Some(SlotState::Dirty { .. })));
        let newly_cached = previous.is_none();
        if newly_cached {
            self.clean_count.fetch_add(1, Ordering::SeqCst);
        }
        self.remember_clean(key, stamp, counters);
    }

    /// Sets a key's value and state, creating its slot if needed, and moves
    /// the key's write stamp while the slot is still locked (invariant 4: a
    /// read that began before this write must not be cached, even if the
    /// slot is evicted right after it is released). Returns the slot's key
    /// (shared, so that the queues hold no copy of it) and previous state.
    /// A refused write it replaces is handled as in `stage` (invariant 5).
    /// Unless `holder` (the caller holds the key), a held key is refused
    /// under the slot's lock (see `holds.rs`).
    fn replace_slot(
        &self,
        key: &str,
        value: Option<Stored>,
        state: SlotState,
        holder: bool,
    ) -> Result<(Key, Option<SlotState>), StageError> {
        let held = |key: &str| !holder && self.holds.is_held(key);
        if let Some(mut slot) = self.slots.get_mut(key) {
            if held(key) {
                return Err(StageError::Held(value));
            }
            let previous = slot.state;
            slot.value = value;
            slot.state = state;
            let key = slot.key().clone();
            self.replace_refused(&key, &mut slot.refused);
            self.bump_stripe(&key);
            return Ok((key, Some(previous)));
        }
        let entry = self.slots.entry(Key::from(key));
        if held(key) {
            return Err(StageError::Held(value));
        }
        match entry {
            // Created by another write since the lookup above.
            Entry::Occupied(mut occupied) => {
                let key = occupied.key().clone();
                let slot = occupied.get_mut();
                let previous = slot.state;
                slot.value = value;
                slot.state = state;
                self.replace_refused(&key, &mut slot.refused);
                self.bump_stripe(&key);
                Ok((key, Some(previous)))
            }
            Entry::Vacant(vacant) => {
                let key = vacant.key().clone();
                // Invariant 6: with no slot, every earlier write is durable.
                let persisted = match state {
                    SlotState::Dirty { version } => version - 1,
                    SlotState::Clean { stamp } => stamp,
                };
                let _locked = vacant.insert(Slot {
                    value,
                    state,
                    refused: Refused::No,
                    persisted,
                    doubted: false,
                });
                self.bump_stripe(&key);
                Ok((key, None))
            }
        }
    }

    /// Holds `key` against writes until [`release`](Self::release) (see
    /// `holds.rs`). Returns the version of the key's pending write, if it
    /// has one: with the hold in place, it is the newest write this store
    /// will make of the key until the release.
    pub(crate) fn hold(&self, key: &str) -> Option<u64> {
        self.holds.hold(Key::from(key));
        // Looked at after the hold: a write that did not see the hold has
        // finished with the slot before this look.
        match self.slots.get(key)?.state {
            SlotState::Dirty { version } => Some(version),
            SlotState::Clean { .. } => None,
        }
    }

    pub(crate) fn release(&self, key: &str) {
        self.holds.release(key);
    }

    /// A write failed and may or may not have committed (write-through, or
    /// a held key's `compare_and_put`/`put_batch`), or the table disagreed
    /// with the cache: the cached value can no longer be trusted.
    pub(crate) fn invalidate(&self, key: &str) {
        // Stamp first, so that a read begun before this point cannot cache
        // what it read once the slot is gone.
        self.bump_stripe(key);
        let removed = self
            .slots
            .remove_if(key, |_, slot| matches!(slot.state, SlotState::Clean { .. }));
        if removed.is_some() {
            self.clean_count.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Another writer changed `key` (a notification): a clean entry is
    /// dropped, a dirty one is doubted (invariant 7).
    pub(crate) fn changed_elsewhere(&self, key: &str) {
        self.bump_stripe(key);
        if let Some(mut slot) = self.slots.get_mut(key)
            && matches!(slot.state, SlotState::Dirty { .. })
        {
            slot.doubted = true;
            return;
        }
        self.invalidate(key);
    }

    /// Any key may have changed elsewhere (a truncate, too many keys to
    /// name, or changes missed while not listening): every clean entry is
    /// dropped and every dirty one doubted (invariant 7).
    pub(crate) fn everything_changed_elsewhere(&self) {
        self.drop_clean_entries_and(|slot| slot.doubted = true);
    }

    /// Whether clean entries may be served (see `changes.rs`).
    pub(crate) fn set_vouched(&self, vouched: bool) {
        self.vouched.store(vouched, Ordering::SeqCst);
    }

    pub(crate) fn is_vouched(&self) -> bool {
        self.vouched.load(Ordering::SeqCst)
    }

    /// Drops every clean entry. Every stripe's stamp moves first, so that no
    /// read begun before this point caches what it read (invariant 4).
    pub(crate) fn drop_clean_entries(&self) {
        self.drop_clean_entries_and(|_| {});
    }

    /// [`drop_clean_entries`](Self::drop_clean_entries), applying `to_dirty`
    /// to every dirty slot it keeps.
    fn drop_clean_entries_and(&self, mut to_dirty: impl FnMut(&mut Slot)) {
        for stamp in self.write_stamps.iter() {
            stamp.fetch_add(1, Ordering::SeqCst);
        }
        let mut dropped = 0;
        self.slots.retain(|_, slot| {
            let clean = matches!(slot.state, SlotState::Clean { .. });
            dropped += usize::from(clean);
            if !clean {
                to_dirty(slot);
            }
            !clean
        });
        self.clean_count.fetch_sub(dropped, Ordering::SeqCst);
    }

    /// Queues a clean key for eviction and evicts the oldest clean entries
    /// while there are more than `capacity`.
    fn remember_clean(&self, key: Key, stamp: u64, counters: &Counters) {
        {
            let mut order = lock(&self.clean_order);
            order.push_back((key, stamp));
            // Keys that turned clean many times leave stale pairs behind;
            // drop them before the queue outgrows the cache it describes.
            if order.len() > self.capacity.saturating_mul(2).saturating_add(1024) {
                order.retain(|(key, stamp)| self.is_clean_with(key, *stamp));
            }
        }
        while self.clean_count.load(Ordering::SeqCst) > self.capacity {
            let Some((key, stamp)) = lock(&self.clean_order).pop_front() else {
                break;
            };
            let evicted = self
                .slots
                .remove_if(&key, |_, slot| slot.state == SlotState::Clean { stamp });
            if evicted.is_some() {
                self.clean_count.fetch_sub(1, Ordering::SeqCst);
                counters.eviction();
            }
        }
    }

    fn is_clean_with(&self, key: &str, stamp: u64) -> bool {
        self.slots
            .get(key)
            .is_some_and(|slot| slot.state == SlotState::Clean { stamp })
    }

    fn next_stamp(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn stripe_of(&self, key: &str) -> usize {
        self.slots.hash_usize(&key) % STRIPES
    }

    fn bump_stripe(&self, key: &str) {
        self.write_stamps[self.stripe_of(key)].fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_hooks;

    fn stage_now(cache: &Cache, key: &str, value: serde_json::Value) -> u64 {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
            .block_on(cache.stage(key, Some(Stored::from(value.to_string())), Duration::ZERO))
            .unwrap()
            .version
    }

    /// Regression: `lookup` read the stripe's stamp after finding no slot. A
    /// write that created the slot in between, then was flushed and evicted
    /// before the slow read returned, let the read cache the pre-write value
    /// for good.
    #[test]
    fn a_write_landing_inside_a_lookup_never_lets_a_stale_read_be_cached() {
        let cache = Arc::new(Cache::new(10, 1));
        let counters = Arc::new(Counters::new("test"));
        test_hooks::once("lookup: between the stamp and the slot", {
            let (cache, counters) = (cache.clone(), counters.clone());
            move || {
                let version = stage_now(&cache, "k", serde_json::json!("new"));
                cache.committed(&Key::from("k"), version, &counters);
                // Capacity 1: a second clean key evicts "k".
                let other = stage_now(&cache, "other", serde_json::json!(0));
                cache.committed(&Key::from("other"), other, &counters);
            }
        });
        let Lookup::Miss(ticket) = cache.lookup("k", &counters) else {
            panic!("k was evicted before the lookup looked for it");
        };
        // The read began before the write and returns what it saw then.
        cache.fill("k", Some(Stored::from("\"old\"")), ticket, &counters);
        match cache.lookup("k", &counters) {
            Lookup::Hit(Some(value)) => {
                assert_ne!(&*value, "\"old\"", "a stale read was cached")
            }
            Lookup::Hit(None) | Lookup::Miss(_) => {}
        }
    }
}
