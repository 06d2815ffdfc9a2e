//! The daemon's I/O ports: thin layers that only move bytes between sockets and the hub.
//! Everything they receive goes to `hub::Hub::on_input`; everything they send came out of it.
//!
//! - [`udp`]: the relay's UDP sockets, with batched receives, the local address each datagram
//!   was sent to, and replies sent from that address (quinn-udp underneath). Public only for
//!   its benchmark (`benches/udp_port.rs`).
//! - `fanout`: the relay socket's second sender, a thread that sends half of each fan-out to
//!   256 or more subscribers.
//! - `group`: one task per joined group, cancellable in its receives and sends.
//! - `mmsg`: several datagrams in one `sendmmsg(2)` (the relay socket's sends to groups).

pub(crate) mod fanout;
pub(crate) mod group;
pub(crate) mod mmsg;
pub mod udp;
