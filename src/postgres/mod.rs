//! The PostgreSQL side: the plain store, every statement it sends, how it
//! connects, keeps and retries connections, and how values are encoded.

pub(crate) mod codec;
pub(crate) mod connect;
pub(crate) mod environment;
pub(crate) mod exec;
pub(crate) mod fence;
pub(crate) mod host_choice;
pub(crate) mod hosts;
pub(crate) mod notify;
pub(crate) mod pg;
pub(crate) mod pooler;
pub(crate) mod probe;
pub(crate) mod reserve;
pub(crate) mod schema;
pub(crate) mod session;
pub(crate) mod sql;
