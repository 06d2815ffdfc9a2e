//! What every mcchat binary shares.
//!
//! - [`wire`]: the datagram format, `[@tags ]room|sender|text` (pure).
//! - [`tags`]: end-to-end and hop-by-hop tags: adding a hop-by-hop tag, the end-to-end part
//!   (pure, on raw bytes).
//! - [`room`]: room names, derived groups and the validated [`room::Registry`] (pure).
//! - [`control`]: mcchatd's control contract: the request line and the JSON answers (status,
//!   history, errors), shared by the daemon and the CLI (pure).
//! - [`config`]: where `rooms.toml` is looked for, and reading it; TOML tables into serde
//!   structs with errors that name the key. (The `[daemon]` table's keys are mcchatd's.)
//! - [`presence`]: who is in a room, from join/leave/heartbeat datagrams (pure, time passed in).
//! - [`sanitize`]: network text made safe for a terminal (pure).
//! - [`repair`]: gap detection, NACKs with suppression, in-order release and the sender's
//!   repair buffer, under per-sender and global budgets (pure, time passed in).
//! - [`peer`]: one peer in one room as a pure engine (datagrams, lines and time in; datagrams
//!   to send and events to show out), built on the modules above.
//! - [`ratelimit`]: a limiter for log lines about bad input (pure, time passed in).
//! - [`socket`]: multicast socket setup with socket2, the only module here that does I/O on
//!   the network. It hands out std sockets; async runtimes are the binaries' business.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod config;
pub mod control;
pub mod peer;
pub mod presence;
pub mod ratelimit;
pub mod repair;
pub mod room;
pub mod sanitize;
pub mod socket;
pub mod tags;
pub mod wire;
