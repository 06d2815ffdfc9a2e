//! mcchatd: relays mcchat rooms between unicast clients and their multicast groups, so hosts
//! that cannot use multicast (Wi-Fi that drops it, VPN clients, containers) take part.
//!
//! - [`cli`]: flags; each one that shadows a `[daemon]` key overrides the file.
//! - `settings`: the file and the flags settled into one value ([`relay::check_config`],
//!   start-up and reload share it).
//! - `subs`: who subscribes to which room until when (pure state machine).
//! - `cookie`: stateless return-routability cookies (pure).
//! - `limiter`: per-source token buckets (pure).
//! - `counters`: what was relayed and dropped, by reason.
//! - `cache`: recent messages, to repair for senders that have gone (pure).
//! - [`history`]: room history in SQLite, written on its own thread (public for its
//!   benchmark).
//! - [`relay`]: the loop that owns the state and does the I/O.
//! - [`port`]: thin I/O layers; [`port::udp`] is the relay's UDP socket with batched
//!   receives and replies from the address asked (public for its benchmark; not yet wired
//!   into `relay`).
//! - `status`: the status document, served on TCP and a Unix socket.
//! - `notify`: systemd readiness, reload, stop and watchdog notifications.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod cache;
pub mod cli;
mod cookie;
mod counters;
pub mod history;
mod limiter;
mod notify;
pub mod port;
pub mod relay;
mod settings;
mod status;
mod subs;
