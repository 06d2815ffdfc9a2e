//! mcchatd: relays mcchat rooms between unicast clients and their multicast groups, so hosts
//! that cannot use multicast (Wi-Fi that drops it, VPN clients, containers) take part.
//!
//! - [`cli`]: flags; each one that shadows a `[daemon]` key overrides the file.
//! - [`config`]: the `[daemon]` table validated into [`config::DaemonSettings`], and the
//!   checks each flag shares with the key it shadows.
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
//! - `status`: the status document, served on TCP and a Unix socket.
//! - `notify`: systemd readiness, reload, stop and watchdog notifications.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod cache;
pub mod cli;
pub mod config;
mod cookie;
pub mod driver;
mod counters;
pub mod history;
mod hub;
mod limiter;
mod notify;
mod port;
mod settings;
mod status;
mod subs;
#[cfg(test)]
mod test_support;
