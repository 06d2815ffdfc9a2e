//! Integration tests: the real `mcchat` binary over real sockets, in the network namespace
//! made by `scripts/test.sh` (and the LAN of namespaces made by `scripts/lan.sh`).

#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)]

mod attacks;
mod browser;
mod chat;
mod cli;
mod handmade;
mod history;
mod hostile;
mod lan;
mod multihome;
mod pty;
mod relay;
mod sites;
mod util;
mod web;
