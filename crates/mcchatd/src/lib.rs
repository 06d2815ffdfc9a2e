//! mcchatd: relays mcchat rooms between unicast clients and their multicast groups, so hosts
//! that cannot use multicast (Wi-Fi that drops it, VPN clients, containers) take part.
//!
//! Built as a pure core with thin I/O around it (docs/ARCHITECTURE.md):
//! - `hub`: everything the daemon decides, with no I/O: rooms and members by port,
//!   admission, relay control, the routing table, membership, history policy, counters.
//!   Its pure parts: `subs` (who subscribes until when), `cookie` (stateless
//!   return-routability cookies), `limiter` (token buckets), `cache` (recent messages, to
//!   repair for senders that have gone), `counters`.
//! - [`port`]: the ports, which only move bytes: [`port::udp`] (the relay sockets: batched,
//!   answering from the address asked) and `port::group` (joined groups).
//! - [`driver`]: the one loop that feeds the hub and carries out what it returns; `bind` and
//!   `serve` are the seam for in-process tests.
//! - [`cli`], [`config`] and `settings`: flags, the `[daemon]` table with the checks both
//!   share, and the two settled into one value.
//! - [`history`]: room history in SQLite, written on its own thread (public for its
//!   benchmark).
//! - `status`: the status document and history, served on TCP and a Unix socket.
//! - `notify`: systemd readiness, reload, stop and watchdog notifications.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod cache;
pub mod cli;
pub mod config;
mod cookie;
mod counters;
pub mod driver;
pub mod history;
mod hub;
mod limiter;
mod notify;
pub mod port;
mod settings;
mod sites;
mod status;
mod subs;
#[cfg(test)]
mod test_support;
mod web;
