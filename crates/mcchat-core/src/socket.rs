//! Multicast socket setup, one small function per address family.
//!
//! Options fall into three classes, on purpose:
//! - **required**: creating the socket, `SO_REUSEADDR`/`SO_REUSEPORT` (several peers on one
//!   host), binding, joining, the TTL / hop limit, loopback and the outgoing interface. A
//!   failure stops start-up with an error naming the group and interface.
//! - **best effort**: the receive buffer size. A failure is logged by the caller and ignored.
//! - **probed**: `IP_MULTICAST_ALL` / `IPV6_MULTICAST_ALL` (Linux, see `ip(7)`). Cleared so a
//!   socket hears only the groups it joined; where the kernel lacks it, [`Capabilities`] says
//!   so and the room-name check in the wire codec still keeps other rooms out.
//!
//! On Linux the socket is bound to the group address itself, so the kernel delivers only
//! datagrams sent to that group (not other groups or unicast on the same port). Closing the
//! socket drops the membership (the kernel sends the IGMP/MLD leave).
//!
//! socket2 types stay inside this module: callers get a non-blocking `std::net::UdpSocket`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};

/// The default TTL / hop limit: 1 keeps chat on the local network segment.
pub const DEFAULT_TTL: u32 = 1;

/// Receive buffer asked for, so a burst of datagrams waits in the kernel rather than being
/// dropped while the process is busy.
pub const RECV_BUFFER: usize = 1 << 20;

/// The interface to join and send on.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Iface {
    /// What to call it in messages.
    pub label: String,
    /// Interface index; 0 lets the kernel choose from the routing table.
    pub index: u32,
    /// The interface's first IPv4 address, needed to send IPv4 multicast on it.
    pub ipv4: Option<Ipv4Addr>,
}

impl Iface {
    /// The kernel's choice, by the multicast route.
    pub fn system_default() -> Self {
        Self {
            label: "the default interface".to_owned(),
            index: 0,
            ipv4: None,
        }
    }

    /// Resolves an interface name (`eth0`) or one of its addresses (`192.0.2.7`, `fe80::1`).
    pub fn resolve(spec: &str) -> Result<Self, SocketError> {
        let addrs = nix::ifaddrs::getifaddrs().map_err(|e| SocketError::Interface {
            spec: spec.to_owned(),
            reason: format!("cannot list interfaces: {e}"),
        })?;
        let addrs: Vec<_> = addrs.collect();
        let wanted_ip: Option<IpAddr> = spec.parse().ok();
        let ip_of = |a: &nix::ifaddrs::InterfaceAddress| -> Option<IpAddr> {
            let sa = a.address.as_ref()?;
            if let Some(v4) = sa.as_sockaddr_in() {
                return Some(IpAddr::V4(v4.ip()));
            }
            sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
        };
        let name = match wanted_ip {
            Some(ip) => addrs
                .iter()
                .find(|a| ip_of(a) == Some(ip))
                .map(|a| a.interface_name.clone())
                .ok_or_else(|| SocketError::Interface {
                    spec: spec.to_owned(),
                    reason: "no interface has this address; list them with `ip addr`".to_owned(),
                })?,
            None => spec.to_owned(),
        };
        let index =
            nix::net::if_::if_nametoindex(name.as_str()).map_err(|_| SocketError::Interface {
                spec: spec.to_owned(),
                reason: "no such interface; list them with `ip link`".to_owned(),
            })?;
        let ipv4 = match wanted_ip {
            Some(IpAddr::V4(v4)) => Some(v4),
            _ => addrs
                .iter()
                .filter(|a| a.interface_name == name)
                .find_map(|a| match ip_of(a) {
                    Some(IpAddr::V4(v4)) => Some(v4),
                    _ => None,
                }),
        };
        Ok(Self {
            label: name,
            index,
            ipv4,
        })
    }
}

/// How to set up a room's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MulticastConfig {
    /// TTL / hop limit of sent datagrams.
    pub ttl: u32,
    /// Whether this host's other sockets (and this one) hear what it sends.
    pub loopback: bool,
    /// The interface to join and send on.
    pub iface: Iface,
}

impl Default for MulticastConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_TTL,
            loopback: true,
            iface: Iface::system_default(),
        }
    }
}

/// What the kernel turned out to support, for the caller to log or branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `IP_MULTICAST_ALL` was cleared: only joined groups are delivered.
    pub multicast_all_cleared: bool,
    /// The receive buffer the kernel granted (it doubles the request for bookkeeping).
    pub recv_buffer: Option<usize>,
}

/// A joined multicast socket.
#[derive(Debug)]
pub struct MulticastSocket {
    /// Non-blocking, bound, joined; ready for `tokio::net::UdpSocket::from_std`.
    pub socket: UdpSocket,
    /// The group and port joined.
    pub group: SocketAddr,
    /// What the kernel supported.
    pub capabilities: Capabilities,
}

/// Setting up a multicast socket failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SocketError {
    /// The address is not a multicast group.
    #[error("{0} is not a multicast address")]
    NotMulticast(SocketAddr),
    /// `--iface` could not be resolved.
    #[error("interface {spec:?}: {reason}")]
    Interface {
        /// What was given.
        spec: String,
        /// Why it failed, with a remedy.
        reason: String,
    },
    /// A link-scoped IPv6 group without `--iface`.
    #[error("{0} is a link-local group: pick the link with --iface NAME")]
    NeedsInterface(SocketAddr),
    /// An IPv4 room on an interface without an IPv4 address.
    #[error("cannot send to {group} on {iface}: the interface has no IPv4 address")]
    NoIpv4 {
        /// The group.
        group: SocketAddr,
        /// The interface.
        iface: String,
    },
    /// A required socket call failed.
    #[error("failed to {action} for {group} on {iface}: {cause}{hint}")]
    Setup {
        /// What was being done.
        action: &'static str,
        /// The group.
        group: SocketAddr,
        /// The interface.
        iface: String,
        /// The OS error (in the message, so the error is one line).
        cause: io::Error,
        /// A remedy, if one is known (starts with "; ").
        hint: &'static str,
    },
}

/// Opens, binds and joins a socket for `group` (IPv4 or IPv6).
pub fn open(group: SocketAddr, config: &MulticastConfig) -> Result<MulticastSocket, SocketError> {
    if !group.ip().is_multicast() {
        return Err(SocketError::NotMulticast(group));
    }
    let fail = failer(group, config);
    let socket = udp_socket(group).map_err(fail("create a UDP socket"))?;
    socket
        .set_reuse_address(true)
        .map_err(fail("set SO_REUSEADDR"))?;
    socket
        .set_reuse_port(true)
        .map_err(fail("set SO_REUSEPORT"))?;
    let recv_buffer = socket
        .set_recv_buffer_size(RECV_BUFFER)
        .and_then(|()| socket.recv_buffer_size())
        .ok();

    let multicast_all_cleared = match group.ip() {
        IpAddr::V4(ip) => setup_v4(&socket, ip, group, config, &fail)?,
        IpAddr::V6(ip) => setup_v6(&socket, ip, group, config, &fail)?,
    };
    socket
        .set_nonblocking(true)
        .map_err(fail("set non-blocking mode"))?;
    Ok(MulticastSocket {
        socket: socket.into(),
        group,
        capabilities: Capabilities {
            multicast_all_cleared,
            recv_buffer,
        },
    })
}

fn setup_v4<F, E>(
    socket: &Socket,
    ip: Ipv4Addr,
    group: SocketAddr,
    config: &MulticastConfig,
    fail: &F,
) -> Result<bool, SocketError>
where
    F: Fn(&'static str) -> E,
    E: FnOnce(io::Error) -> SocketError,
{
    let bind_ip = if cfg!(target_os = "linux") {
        ip
    } else {
        Ipv4Addr::UNSPECIFIED
    };
    socket
        .bind(&SockAddr::from(SocketAddr::new(
            bind_ip.into(),
            group.port(),
        )))
        .map_err(fail("bind"))?;
    let cleared = socket.set_multicast_all_v4(false).is_ok();
    let iface = &config.iface;
    if iface.index == 0 {
        socket
            .join_multicast_v4(&ip, &Ipv4Addr::UNSPECIFIED)
            .map_err(fail("join the group"))?;
    } else {
        socket
            .join_multicast_v4_n(&ip, &InterfaceIndexOrAddress::Index(iface.index))
            .map_err(fail("join the group"))?;
    }
    set_send_options(socket, group, config, fail)?;
    Ok(cleared)
}

/// The options of what a socket sends to groups: outgoing interface, TTL / hop limit,
/// loopback. Shared by room sockets and mcchatd's relay sockets.
fn set_send_options<F, E>(
    socket: &Socket,
    addr: SocketAddr,
    config: &MulticastConfig,
    fail: &F,
) -> Result<(), SocketError>
where
    F: Fn(&'static str) -> E,
    E: FnOnce(io::Error) -> SocketError,
{
    let iface = &config.iface;
    if addr.is_ipv4() {
        if iface.index != 0 {
            let Some(ip) = iface.ipv4 else {
                return Err(SocketError::NoIpv4 {
                    group: addr,
                    iface: iface.label.clone(),
                });
            };
            socket
                .set_multicast_if_v4(&ip)
                .map_err(fail("set the outgoing interface"))?;
        }
        socket
            .set_multicast_ttl_v4(config.ttl)
            .map_err(fail("set the TTL"))?;
        socket
            .set_multicast_loop_v4(config.loopback)
            .map_err(fail("set multicast loopback"))?;
    } else {
        if iface.index != 0 {
            socket
                .set_multicast_if_v6(iface.index)
                .map_err(fail("set the outgoing interface"))?;
        }
        socket
            .set_multicast_hops_v6(config.ttl)
            .map_err(fail("set the hop limit"))?;
        socket
            .set_multicast_loop_v6(config.loopback)
            .map_err(fail("set multicast loopback"))?;
    }
    Ok(())
}

fn setup_v6<F, E>(
    socket: &Socket,
    ip: Ipv6Addr,
    group: SocketAddr,
    config: &MulticastConfig,
    fail: &F,
) -> Result<bool, SocketError>
where
    F: Fn(&'static str) -> E,
    E: FnOnce(io::Error) -> SocketError,
{
    socket.set_only_v6(true).map_err(fail("set IPV6_V6ONLY"))?;
    let index = config.iface.index;
    // Interface- and link-local groups (ffx1::, ffx2::) exist per link: the kernel needs the
    // interface as the bind scope, and there is no sensible default.
    let link_scoped = matches!(ip.segments()[0] & 0x000f, 1 | 2);
    if link_scoped && index == 0 {
        return Err(SocketError::NeedsInterface(group));
    }
    let scope = if link_scoped { index } else { 0 };
    let bind_ip = if cfg!(target_os = "linux") {
        ip
    } else {
        Ipv6Addr::UNSPECIFIED
    };
    let bind = SocketAddrV6::new(bind_ip, group.port(), 0, scope);
    socket.bind(&SockAddr::from(bind)).map_err(fail("bind"))?;
    let cleared = socket.set_multicast_all_v6(false).is_ok();
    socket
        .join_multicast_v6(&ip, index)
        .map_err(fail("join the group"))?;
    set_send_options(socket, group, config, fail)?;
    Ok(cleared)
}

/// Opens a unicast UDP socket bound to `addr` that can also send to multicast groups with
/// `config`'s TTL, loopback and interface: mcchatd's relay socket. IPv6 sockets are IPv6-only,
/// so an IPv4 and an IPv6 socket can share a port.
pub fn open_relay(
    addr: SocketAddr,
    config: &MulticastConfig,
    share_port: bool,
) -> Result<UdpSocket, SocketError> {
    let fail = failer(addr, config);
    let socket = udp_socket(addr).map_err(fail("create a UDP socket"))?;
    // Best effort: a larger buffer rides out bursts.
    let _ = socket.set_recv_buffer_size(4 * RECV_BUFFER);
    let _ = socket.set_send_buffer_size(4 * RECV_BUFFER);
    if addr.is_ipv6() {
        socket.set_only_v6(true).map_err(fail("set IPV6_V6ONLY"))?;
    }
    // `share_port`: a room whose port is the relay port has its group socket bound to the
    // group address and that port, beside this one, and both need SO_REUSEADDR. Only then:
    // with it, any local process could bind the port too and take unicast meant for the
    // daemon. (Never SO_REUSEPORT, which would share the port's datagrams out.)
    if share_port {
        socket
            .set_reuse_address(true)
            .map_err(fail("set SO_REUSEADDR"))?;
    }
    socket.bind(&SockAddr::from(addr)).map_err(fail("bind"))?;
    // It joins no group, so with IP_MULTICAST_ALL off it hears no multicast at all: a room
    // whose port equals the relay port cannot feed the daemon its own forwards.
    let _ = if addr.is_ipv4() {
        socket.set_multicast_all_v4(false)
    } else {
        socket.set_multicast_all_v6(false)
    };
    set_send_options(&socket, addr, config, &fail)?;
    socket
        .set_nonblocking(true)
        .map_err(fail("set non-blocking mode"))?;
    Ok(socket.into())
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is; any other address unchanged (an
/// IPv6 one keeps its scope id and flow label). Dual-stack sockets report IPv4 peers this
/// way; limits, cookies and subscriptions must see one address per host.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Sets the TTL (IPv4) or hop limit (IPv6) of multicast sent from `socket`: mcchatd sends
/// each room's datagrams with that room's TTL.
pub fn set_multicast_ttl(socket: &impl std::os::fd::AsFd, ipv6: bool, ttl: u32) -> io::Result<()> {
    let s = socket2::SockRef::from(socket);
    if ipv6 {
        s.set_multicast_hops_v6(ttl)
    } else {
        s.set_multicast_ttl_v4(ttl)
    }
}

/// A TCP listener on `addr` (mcchatd's status port). IPv6 listeners are IPv6-only, so an
/// IPv4 and an IPv6 listener can share a port, as the relay's UDP sockets do.
pub fn tcp_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&SockAddr::from(addr))?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// This host's addresses and the subnets they are on, from `getifaddrs(3)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalNetworks {
    /// Every address of every interface.
    pub addresses: Vec<IpAddr>,
    /// The subnets of those addresses (address and netmask), host bits cleared.
    pub subnets: Vec<ipnet::IpNet>,
}

/// The network interfaces of this process's network namespace, from `/proc/self/net/dev`
/// (per namespace, unlike `/sys/class/net`). The tests and benchmarks refuse to open a socket
/// unless this is exactly `["lo"]`.
pub fn namespace_interfaces() -> io::Result<Vec<String>> {
    let dev = std::fs::read_to_string("/proc/self/net/dev")?;
    Ok(dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(|name| name.trim().to_owned())
        .collect())
}

/// Reads this host's addresses and subnets.
pub fn local_networks() -> io::Result<LocalNetworks> {
    let mut out = LocalNetworks::default();
    for a in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
            continue;
        };
        let (ip, prefix) =
            if let (Some(ip), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
                (IpAddr::V4(ip.ip()), u32::from(m.ip()).count_ones())
            } else if let (Some(ip), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) {
                (IpAddr::V6(ip.ip()), u128::from(m.ip()).count_ones())
            } else {
                continue;
            };
        out.addresses.push(ip);
        // The prefix is at most 32 or 128 by construction, so this cannot fail.
        if let Ok(net) = ipnet::IpNet::new(ip, prefix as u8) {
            out.subnets.push(net.trunc());
        }
    }
    Ok(out)
}

/// A UDP socket of `addr`'s family.
fn udp_socket(addr: SocketAddr) -> io::Result<Socket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))
}

/// Makes `SocketError::Setup`s for one socket: `fail("bind")` is a `map_err` argument that
/// names the action, the address and the interface, with a remedy where one is known.
fn failer(
    addr: SocketAddr,
    config: &MulticastConfig,
) -> impl Fn(&'static str) -> Box<dyn FnOnce(io::Error) -> SocketError> + '_ {
    move |action| {
        let iface = config.iface.label.clone();
        Box::new(move |cause: io::Error| {
            let hint = hint_for(&cause);
            SocketError::Setup {
                action,
                group: addr,
                iface,
                cause,
                hint,
            }
        })
    }
}

/// Remedies for the errors people meet in practice.
fn hint_for(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(n) if n == nix::errno::Errno::ENODEV as i32 => {
            "; no route for multicast: connect to a network, add a route for 224.0.0.0/4 \
             (ff00::/8), or pick one with --iface"
        }
        Some(n) if n == nix::errno::Errno::EADDRNOTAVAIL as i32 => {
            "; the interface has no address for this family: pick another with --iface"
        }
        Some(n) if n == nix::errno::Errno::ENOBUFS as i32 => {
            "; the kernel's per-socket group limit (net.ipv4.igmp_max_memberships) is reached"
        }
        _ => "",
    }
}
