//! The daemon's I/O ports: thin layers that only move bytes between sockets and the hub.
//!
//! - [`udp`]: the relay's UDP sockets, with batched receives, the local address each datagram
//!   was sent to, and replies sent from that address (quinn-udp underneath). Public only for
//!   its benchmark (`benches/udp_port.rs`).

pub mod udp;
