//! Opening the daemon's sockets, before it runs: the relay sockets (UDP), the status
//! listeners on the same ports (TCP) and the local status socket.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, Result};
use mcchat_core::socket::{self, Iface, MulticastConfig};
use tokio::net::{TcpListener, UnixListener};

use crate::port::udp::RelaySocket;
use crate::settings::Settings;
use crate::status;

/// Every socket the daemon serves on, opened before it runs.
pub(crate) struct Bound {
    pub(super) relay: Vec<RelaySocket>,
    pub(super) tcp: Vec<TcpListener>,
    pub(super) unix: Option<(UnixListener, PathBuf)>,
    /// The web gateway's listeners (`--web`), if any.
    pub(super) web: Vec<TcpListener>,
}

impl Bound {
    /// The relay sockets' addresses (with the ports the system chose for port 0).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn relay_addrs(&self) -> Vec<SocketAddr> {
        self.relay.iter().map(RelaySocket::local_addr).collect()
    }

    /// The web listeners' addresses.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn web_addrs(&self) -> Vec<SocketAddr> {
        self.web
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
}

/// The multicast settings every send and join uses.
pub(super) fn multicast_config(settings: &Settings) -> Result<MulticastConfig> {
    let iface = match &settings.daemon.iface {
        Some(spec) => Iface::resolve(spec)?,
        None => Iface::system_default(),
    };
    Ok(MulticastConfig {
        ttl: settings.daemon.ttl,
        loopback: true,
        iface,
    })
}

/// Whether a room the daemon may join has its group on `port` (then the relay socket must
/// let the group's socket bind the port too).
fn shares_port(settings: &Settings, port: u16) -> bool {
    use mcchat_core::room::{DERIVED_PORT_BASE, DERIVED_PORT_SPAN};
    let derived = settings.daemon.adhoc_rooms
        && (DERIVED_PORT_BASE..DERIVED_PORT_BASE.saturating_add(DERIVED_PORT_SPAN)).contains(&port);
    derived || settings.registry.rooms().any(|r| r.group().port() == port)
}

/// Opens the relay sockets (UDP), the status listeners on the same ports (TCP) and the
/// local status socket.
pub(crate) fn bind(settings: &Settings) -> Result<Bound> {
    let mcast = multicast_config(settings)?;
    let mut relay: Vec<RelaySocket> = Vec::new();
    let mut tcp = Vec::new();
    for addr in &settings.daemon.listen {
        if relay
            .iter()
            .any(|r| r.local_addr().is_ipv4() == addr.is_ipv4())
        {
            anyhow::bail!(
                "two listen addresses of one family ({addr}); give one IPv4 and one IPv6 address"
            );
        }
        let tcp_listen = |at: SocketAddr| {
            socket::tcp_listener(at)
                .and_then(TcpListener::from_std)
                .with_context(|| {
                    format!("failed to listen for status on TCP {at} (is another mcchatd running?)")
                })
        };
        // The TCP listener first where the port is given: it refuses a second daemon before
        // that one's UDP socket (SO_REUSEADDR, for rooms on the relay port) could take
        // datagrams meant for the first.
        let early = if addr.port() == 0 {
            None
        } else {
            Some(tcp_listen(*addr)?)
        };
        let share = shares_port(settings, addr.port());
        if share {
            tracing::warn!(
                port = addr.port(),
                "a room uses the relay port: the relay socket allows port sharing (SO_REUSEADDR) so that room's group can be joined; on a multi-user host give the room another port"
            );
        }
        let (sock, listener) = match early {
            Some(l) => (RelaySocket::open(*addr, &mcast, share)?, l),
            // Port 0: the system picks the UDP port, and TCP must have the same one free;
            // when a TCP socket holds it already (busy hosts, parallel tests), pick again.
            None => {
                let mut tries = 0;
                loop {
                    let sock = RelaySocket::open(*addr, &mcast, share)?;
                    match tcp_listen(sock.local_addr()) {
                        Ok(l) => break (sock, l),
                        Err(e) if tries < 16 => {
                            tries += 1;
                            tracing::debug!(error = %e, "port taken on TCP; another");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        };
        let bound = sock.local_addr();
        tracing::info!(%bound, "relaying on UDP, status on TCP");
        relay.push(sock);
        tcp.push(listener);
    }
    let unix = match &settings.daemon.status_socket {
        None => None,
        Some(path) => match status::bind_unix(path) {
            Ok(listener) => {
                tracing::info!(path = %path.display(), "status on Unix socket");
                Some((listener, path.clone()))
            }
            Err(error) => {
                tracing::warn!(
                    path = %path.display(),
                    %error,
                    "status socket not available; use `mcchat status --via HOST` or set status_socket"
                );
                None
            }
        },
    };
    let mut web = Vec::new();
    for at in &settings.web.listen {
        let l = socket::tcp_listener(*at)
            .and_then(TcpListener::from_std)
            .with_context(|| {
                format!("failed to serve the web page on TCP {at} (is the port in use?)")
            })?;
        tracing::info!(bound = %l.local_addr().map_or(*at, |a| a), "web page and WebSocket on HTTP");
        web.push(l);
    }
    Ok(Bound {
        relay,
        tcp,
        unix,
        web,
    })
}
