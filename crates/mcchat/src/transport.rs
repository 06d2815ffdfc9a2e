//! How a peer reaches its room: joined to the group itself, or through mcchatd by unicast.
//! A transport only moves bytes; what they mean is the engine's business.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context as _, Result};
use mcchat_core::room::{Room, RoomSource};
use mcchat_core::socket::{self, Iface, MulticastConfig};
use tokio::net::UdpSocket;

use crate::cli::NetArgs;

/// A room's socket.
pub(crate) enum Transport {
    /// Joined to the group itself.
    Direct { socket: UdpSocket, iface: String },
    /// Through mcchatd, by unicast on a socket connected to it (so only its datagrams are
    /// received).
    Via {
        socket: UdpSocket,
        daemon: SocketAddr,
    },
}

impl Transport {
    /// Opens and joins `room`'s group.
    pub(crate) fn direct(room: &Room, net: &NetArgs) -> Result<Self> {
        let iface = match &net.iface {
            Some(spec) => Iface::resolve(spec)?,
            None => Iface::system_default(),
        };
        let config = MulticastConfig {
            ttl: net.ttl.or(room.ttl()).unwrap_or(socket::DEFAULT_TTL),
            loopback: true,
            iface,
        };
        let joined = socket::open(room.group(), &config)?;
        let local = joined.socket.local_addr().ok();
        tracing::debug!(
            group = %room.group(),
            local = ?local,
            iface = %config.iface.label,
            ttl = config.ttl,
            multicast_all_cleared = joined.capabilities.multicast_all_cleared,
            recv_buffer = ?joined.capabilities.recv_buffer,
            "socket ready"
        );
        if !joined.capabilities.multicast_all_cleared {
            tracing::debug!("IP_MULTICAST_ALL not supported; relying on the room-name check");
        }
        let socket = UdpSocket::from_std(joined.socket)
            .with_context(|| format!("failed to register the socket for {}", room.group()))?;
        Ok(Self::Direct {
            socket,
            iface: config.iface.label,
        })
    }

    /// A socket connected to mcchatd at `daemon`.
    pub(crate) async fn via(daemon: SocketAddr) -> Result<Self> {
        let local: SocketAddr = if daemon.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local)
            .await
            .context("failed to open a UDP socket")?;
        socket
            .connect(daemon)
            .await
            .with_context(|| format!("cannot reach mcchatd at {daemon}"))?;
        Ok(Self::Via { socket, daemon })
    }

    /// Where the engine's datagrams go.
    pub(crate) fn dest(&self, room: &Room) -> SocketAddr {
        match self {
            Self::Direct { .. } => room.group(),
            Self::Via { daemon, .. } => *daemon,
        }
    }

    /// One line saying where the peer is, for the user.
    pub(crate) fn describe(&self, room: &Room) -> String {
        match self {
            Self::Direct { iface, .. } => {
                let how = match room.source() {
                    RoomSource::Configured => "from rooms.toml",
                    RoomSource::Derived => "derived from the room name",
                };
                format!("{} on {} ({how}) via {iface}", room.name(), room.group())
            }
            Self::Via { daemon, .. } => format!("{} through mcchatd at {daemon}", room.name()),
        }
    }

    /// Waits for a datagram. Cancel-safe (a `select!` arm).
    pub(crate) async fn recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        match self {
            Self::Direct { socket, .. } => socket.recv_from(buf).await,
            Self::Via { socket, daemon } => socket.recv(buf).await.map(|n| (n, *daemon)),
        }
    }

    /// A datagram if one is queued, without waiting.
    pub(crate) fn try_recv(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        match self {
            Self::Direct { socket, .. } => socket.try_recv_from(buf),
            Self::Via { socket, daemon } => socket.try_recv(buf).map(|n| (n, *daemon)),
        }
    }

    /// Sends one datagram to `to` (the group, or the daemon a `Via` socket is connected to).
    pub(crate) async fn send(&self, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Self::Direct { socket, .. } => socket.send_to(bytes, to).await.map(|_| ()),
            Self::Via { socket, .. } => socket.send(bytes).await.map(|_| ()),
        }
    }
}
