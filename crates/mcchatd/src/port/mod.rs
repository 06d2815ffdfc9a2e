//! Ports: the thin I/O around the hub. They only move bytes: the relay sockets (`udp`) and
//! the joined groups (`group`). Everything they receive goes to `hub::Hub::on_input`;
//! everything they send came out of it.

pub(crate) mod group;
pub(crate) mod udp;
