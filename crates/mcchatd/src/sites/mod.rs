//! The bridge to other sites over NATS (docs/PROTOCOL.md 8): its configuration, the
//! subjects of rooms, and the link task (the NATS port). The rules of what crosses are the
//! hub's (hub/site.rs).

pub(crate) mod config;
pub(crate) mod link;
mod publish;
mod room;
pub(crate) mod subject;
