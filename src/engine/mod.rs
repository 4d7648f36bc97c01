//! The write-behind engine: the cache, the flusher and the store that puts
//! them in front of any [`StateBackend`](crate::StateBackend), plus the
//! in-memory backend the engine's tests run on. Nothing here knows SQL.

pub(crate) mod atomic;
pub(crate) mod backend;
pub(crate) mod cache;
pub(crate) mod cached;
pub(crate) mod changes;
pub(crate) mod flusher;
pub(crate) mod holds;
pub(crate) mod memory;
pub(crate) mod report;
pub(crate) mod stats;
