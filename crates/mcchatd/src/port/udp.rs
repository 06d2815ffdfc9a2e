//! The relay's UDP socket: batched receives that say which local address each datagram was
//! sent to, and sends that leave from a chosen local address.
//!
//! Why: a relay socket is bound to a wildcard address (`0.0.0.0:5554`, `[::]:5554`), and a
//! plain `send_to` leaves from the kernel's choice of source. On a host with several
//! addresses, a client whose socket is `connect()`ed to a secondary IPv4 address, or to one of
//! several IPv6 addresses, drops a reply from any other address. So every datagram here comes
//! with the address it was sent to ([`Received::local`], from `IP_PKTINFO` /
//! `IPV6_PKTINFO`), and a reply names that address as its source ([`RelaySocket::send`]'s
//! `src`, an `IP_PKTINFO` / `IPV6_PKTINFO` control message). See
//! [ip(7)](https://man7.org/linux/man-pages/man7/ip.7.html),
//! [ipv6(7)](https://man7.org/linux/man-pages/man7/ipv6.7.html) and RFC 3542 §6.
//!
//! quinn-udp makes the system calls (`recvmmsg(2)`, `sendmsg(2)` with control messages), so
//! this crate stays free of `unsafe`. The socket options, by class:
//! - **required**: all that `mcchat_core::socket::open_relay` sets (bind, `IPV6_V6ONLY`, the
//!   multicast TTL, loopback and interface), the packet-info options quinn-udp turns on, and
//!   `UDP_GRO` turned back *off* where quinn-udp turned it on (below).
//! - **best effort**: `SO_TIMESTAMPNS` off (quinn-udp turns it on; nothing here reads it).
//! - **left as quinn-udp sets them**: `IP_RECVTOS` / `IPV6_RECVTCLASS` (ECN, unused), and
//!   `IP_MTU_DISCOVER` / `IPV6_MTU_DISCOVER` = probe with `IPV6_DONTFRAG`: datagrams go out
//!   with DF and are never fragmented here. mcchat's are at most 1,200 bytes.
//!
//! **No GRO.** With `UDP_GRO` on, the kernel may hand over several datagrams of one flow in one
//! buffer, cut at a stride. Into a buffer of `MAX_DATAGRAM + 1` bytes that would cut the last
//! of them to a shorter, valid-looking datagram; buffers that hold a whole GRO train (64 KiB
//! each) would cost 2 MiB per socket for nothing, since clients' datagrams are small and seldom
//! share a flow. Without GRO every buffer holds one datagram, and one longer than
//! [`MAX_DATAGRAM`] is cut to exactly `MAX_DATAGRAM + 1` bytes (quinn-udp's `recvmmsg` ignores
//! `MSG_TRUNC` and reports the bytes copied), which the codec rejects as too long.
//! [`RecvBatch::iter`] still splits by stride, should a kernel coalesce anyway, and drops a
//! segment that may have been cut.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use nix::sys::socket::{MsgFlags, SockaddrStorage, sendto, setsockopt, sockopt};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use mcchat_core::socket::{self, MulticastConfig, canonical};
use mcchat_core::wire::MAX_DATAGRAM;

use super::fanout::{FanOut, SPLIT_AT};
use super::mmsg;

/// How many datagrams one receive reads at most: quinn-udp's `recvmmsg` batch.
pub const BATCH: usize = quinn_udp::BATCH_SIZE;

/// One buffer: a byte more than the longest valid datagram, so a longer one shows as too long.
const BUF_LEN: usize = MAX_DATAGRAM + 1;

/// How many ICMP errors in a row [`RelaySocket::try_recv`] skips before it says `WouldBlock`
/// (the socket stays readable, so the caller's next [`RelaySocket::recv`] tries again).
const SKIP_LIMIT: usize = BATCH;
/// How long a send buffer may stay full before a send (and the rest of its fan-out) is given
/// up, in ms: here and in the fan-out thread.
pub(super) const STALL_MS: u8 = 100;
const STALL: Duration = Duration::from_millis(STALL_MS as u64);

/// The error of a send given up after [`STALL_MS`].
pub(super) fn stalled() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the send buffer stayed full")
}

/// One datagram as received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received<'a> {
    /// The sender. An IPv4-mapped IPv6 address is shown as IPv4; an IPv6 one keeps its scope
    /// id, which a reply to a link-local address needs.
    pub from: SocketAddr,
    /// The local address the datagram was sent to: the source for a reply. `None` when the
    /// kernel did not say, or when it is no unicast address (multicast, 255.255.255.255).
    pub local: Option<IpAddr>,
    /// False when the datagram was sent to a group or to the limited broadcast address (which
    /// a wildcard socket can receive): nothing sent there is the daemon's to answer.
    pub unicast: bool,
    /// The payload: at most `MAX_DATAGRAM + 1` bytes, and that many only if it was longer
    /// than [`MAX_DATAGRAM`] (cut).
    pub data: &'a [u8],
}

/// Buffers and metadata for up to [`BATCH`] datagrams, reused from one receive to the next
/// so that receiving allocates nothing.
pub struct RecvBatch {
    /// `BATCH` buffers of `BUF_LEN` bytes, back to back (one allocation).
    bufs: Box<[u8]>,
    metas: [RecvMeta; BATCH],
    /// How many of `metas` the last receive filled.
    filled: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("filled", &self.filled)
            .finish_non_exhaustive()
    }
}

impl RecvBatch {
    /// Empty buffers for [`BATCH`] datagrams (about 38 KB).
    pub fn new() -> Self {
        Self {
            bufs: vec![0u8; BATCH * BUF_LEN].into_boxed_slice(),
            metas: [RecvMeta::default(); BATCH],
            filled: 0,
        }
    }

    /// The datagrams of the last receive, in the order they arrived.
    pub fn iter(&self) -> impl Iterator<Item = Received<'_>> {
        self.metas[..self.filled]
            .iter()
            .zip(self.bufs.chunks_exact(BUF_LEN))
            .flat_map(|(meta, buf)| segments(meta, buf))
    }
}

/// The datagrams in one buffer: one, unless the kernel coalesced several of a flow (GRO), at
/// `meta.stride` apart. If such a buffer is full, its last segment may have been cut short,
/// and is left out rather than passed on as a valid-looking shorter datagram.
fn segments<'a>(meta: &RecvMeta, buf: &'a [u8]) -> impl Iterator<Item = Received<'a>> + use<'a> {
    let len = meta.len.min(buf.len());
    let data = &buf[..len];
    let whole = meta.stride == 0 || meta.stride >= len;
    let stride = if whole { len.max(1) } else { meta.stride };
    let count = if whole { 1 } else { len.div_ceil(stride) };
    let cut = !whole && len == buf.len() && !len.is_multiple_of(stride);
    let count = count - usize::from(cut);
    let from = canonical(meta.addr);
    let local = meta.dst_ip.and_then(usable_source);
    let unicast = meta.dst_ip.is_none() || local.is_some();
    (0..count).map(move |i| {
        let start = i * stride;
        Received {
            from,
            local,
            unicast,
            data: &data[start..(start + stride).min(len)],
        }
    })
}

/// `ip` if a reply can be sent from it: a unicast address, not a group or the broadcast one.
fn usable_source(ip: IpAddr) -> Option<IpAddr> {
    let ip = ip.to_canonical();
    let unusable = ip.is_unspecified() || ip.is_multicast() || ip == Ipv4Addr::BROADCAST;
    (!unusable).then_some(ip)
}

/// Whether a receive error is an ICMP error for an earlier send (port or host unreachable,
/// too big, ...; the mapping is the kernel's `icmp_err_convert` / `icmpv6_err_convert`):
/// news about one peer, not about the socket, so it is skipped.
fn is_icmp_error(e: &io::Error) -> bool {
    use nix::errno::Errno;
    let Some(code) = e.raw_os_error() else {
        return false;
    };
    [
        Errno::ECONNREFUSED,
        Errno::ECONNRESET,
        Errno::EHOSTUNREACH,
        Errno::ENETUNREACH,
        Errno::EHOSTDOWN,
        Errno::ENONET,
        Errno::EMSGSIZE,
        Errno::EPROTO,
        Errno::ENOPROTOOPT,
        Errno::EOPNOTSUPP,
        Errno::EACCES,
    ]
    .iter()
    .any(|&errno| errno as i32 == code)
}

/// What [`RelaySocket::send_many`] did.
#[derive(Debug, Default)]
pub struct SendReport {
    /// Datagrams the kernel took.
    pub sent: usize,
    /// Datagrams that failed (the kernel refused them, or the address did not fit the socket).
    pub failed: usize,
    /// The first failure and its destination, for the caller to log.
    pub first_error: Option<(SocketAddr, io::Error)>,
}

impl SendReport {
    pub(super) fn fail(&mut self, to: SocketAddr, e: io::Error) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some((to, e));
        }
    }

    /// Adds what another sender of the same fan-out did.
    fn merge(&mut self, other: Self) {
        self.sent += other.sent;
        self.failed += other.failed;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

/// A relay socket: one address family, bound (often to a wildcard address), registered with
/// the tokio reactor, with quinn-udp's state for packet info and batching.
#[derive(Debug)]
pub struct RelaySocket {
    io: UdpSocket,
    /// Shared with the fan-out thread (quinn-udp's sends take `&self`).
    state: Arc<UdpSocketState>,
    /// The bound address (port 0 resolved).
    addr: SocketAddr,
    /// ICMP errors skipped on receive.
    icmp_errors: AtomicU64,
    /// The second sender for large fan-outs, started by the first (fanout.rs); `None` if it
    /// could not be started, and every fan-out is then sent from here.
    fanout: OnceLock<Option<FanOut>>,
}

impl RelaySocket {
    /// Opens a relay socket on `addr` with `socket::open_relay`'s options (IPv6-only, no
    /// multicast heard, `mcast`'s TTL, loopback and interface), then asks for each datagram's
    /// destination and turns GRO off. Must be called within a tokio runtime.
    pub fn open(
        addr: SocketAddr,
        mcast: &MulticastConfig,
        share_port: bool,
    ) -> anyhow::Result<Self> {
        let sock = socket::open_relay(addr, mcast, share_port)?;
        let state = UdpSocketState::new((&sock).into()).with_context(|| {
            format!("failed to enable packet info (IP_PKTINFO / IPV6_RECVPKTINFO) on {addr}")
        })?;
        // quinn-udp turned GRO on only if the kernel has it; then it must go (module doc).
        if state.gro_segments() > 1 {
            setsockopt(&sock, sockopt::UdpGroSegment, &false)
                .with_context(|| format!("failed to turn UDP GRO off on {addr}"))?;
        }
        // Best effort: a receive timestamp per datagram is work for nothing.
        let _ = setsockopt(&sock, sockopt::ReceiveTimestampns, &false);
        let io = UdpSocket::from_std(sock)
            .with_context(|| format!("failed to register the relay socket {addr}"))?;
        let addr = io
            .local_addr()
            .with_context(|| format!("failed to read the bound address of {addr}"))?;
        Ok(Self {
            io,
            state: Arc::new(state),
            addr,
            icmp_errors: AtomicU64::new(0),
            fanout: OnceLock::new(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many ICMP errors (for earlier sends) receiving has skipped so far.
    pub fn icmp_errors_skipped(&self) -> u64 {
        self.icmp_errors.load(Ordering::Relaxed)
    }

    /// Waits until datagrams are queued, then reads up to [`BATCH`] of them in one system
    /// call into `batch`. Returns how many buffers it filled (at least 1); read them with
    /// [`RecvBatch::iter`]. ICMP errors for earlier sends are skipped. Cancel-safe: a
    /// datagram is only taken off the socket by a call that returns it.
    pub async fn recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        loop {
            match self
                .io
                .async_io(Interest::READABLE, || self.recv_once(batch))
                .await
            {
                Err(e) if is_icmp_error(&e) => self.skipped(),
                r => return r,
            }
        }
    }

    /// Like [`recv`](Self::recv), without waiting: `WouldBlock` if nothing is queued.
    pub fn try_recv(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        for _ in 0..SKIP_LIMIT {
            match self.io.try_io(Interest::READABLE, || self.recv_once(batch)) {
                Err(e) if is_icmp_error(&e) => self.skipped(),
                r => return r,
            }
        }
        // Readiness was not cleared (only a real WouldBlock clears it), so the next `recv`
        // reads again at once.
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn skipped(&self) {
        self.icmp_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// One `recvmmsg`. `WouldBlock` only when the kernel said so (tokio then clears the
    /// readiness it cached).
    fn recv_once(&self, batch: &mut RecvBatch) -> io::Result<usize> {
        batch.filled = 0;
        let mut bufs = batch.bufs.chunks_exact_mut(BUF_LEN);
        // `bufs` has exactly BATCH chunks, so the empty-slice default is never used.
        let mut slices: [IoSliceMut<'_>; BATCH] =
            std::array::from_fn(|_| IoSliceMut::new(bufs.next().unwrap_or_default()));
        let n = self
            .state
            .recv((&self.io).into(), &mut slices, &mut batch.metas)?;
        batch.filled = n.min(BATCH);
        Ok(batch.filled)
    }

    /// Sends one datagram to `to` from the local address `src`: the address the client's
    /// request arrived on ([`Received::local`]), so a client that `connect()`ed to it accepts
    /// the reply; `None` leaves the choice to the kernel (multicast destinations). Waits while
    /// the send buffer is full; any other failure is returned.
    pub async fn send(&self, to: SocketAddr, src: Option<IpAddr>, data: &[u8]) -> io::Result<()> {
        let transmit = self.transmit(to, src, data)?;
        loop {
            match self.try_send(&transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                r => return r,
            }
        }
    }

    /// Sends each `(to, data)` of `items` with the kernel's choice of source (multicast: a
    /// wake-up's datagrams to groups), [`mmsg::MAX`] to a system call (mmsg.rs says why).
    /// Waits while the send buffer is full, at most [`STALL`] at a time; a datagram the kernel
    /// refuses is counted and the rest still go out, in order.
    pub async fn send_batch<B: AsRef<[u8]>>(&self, items: &[(SocketAddr, B)]) -> SendReport {
        let mut report = SendReport::default();
        let mut next = 0;
        while let Some(rest) = items.get(next..).filter(|r| !r.is_empty()) {
            // A destination of the other family would fail the whole call: alone, it fails
            // alone.
            let fits = rest
                .iter()
                .take_while(|(to, _)| to.is_ipv4() == self.addr.is_ipv4())
                .count();
            if fits == 0 {
                report.fail(rest[0].0, wrong_family(rest[0].0, self.addr));
                next += 1;
                continue;
            }
            let sent = self
                .io
                .try_io(Interest::WRITABLE, || mmsg::send(&self.io, &rest[..fits]));
            match sent {
                Ok(n) => {
                    report.sent += n;
                    next += n.max(1);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match self.writable().await {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        report.fail(rest[0].0, e);
                        report.failed += rest.len() - 1;
                        return report;
                    }
                    Err(e) => {
                        report.fail(rest[0].0, e);
                        next += 1;
                    }
                },
                Err(e) => {
                    report.fail(rest[0].0, e);
                    next += 1;
                }
            }
        }
        report
    }

    /// Waits until the send buffer has room, at most [`STALL`]: a buffer that stays full
    /// (a wedged interface) fails the send, counted, rather than holding the relay loop.
    async fn writable(&self) -> io::Result<()> {
        match tokio::time::timeout(STALL, self.io.writable()).await {
            Ok(r) => r,
            Err(_) => Err(stalled()),
        }
    }

    /// Sends `data` to each `(to, src)` of `items` (fan-out: one datagram, many subscribers,
    /// each with its own source as in [`send`](Self::send)). From [`SPLIT_AT`] destinations
    /// on, a second thread sends the second half at the same time (fanout.rs); this returns
    /// when both halves are sent. A failure is counted and the rest still go out.
    ///
    /// Not `sendmmsg(2)`: quinn-udp has none, and nix 0.31's cannot say safely how many were
    /// sent; on loopback it would save about a quarter of the cost (benches/udp_port.rs).
    pub async fn send_many(
        &self,
        items: &[(SocketAddr, Option<IpAddr>)],
        data: &[u8],
    ) -> SendReport {
        let half = items.len() / 2;
        if items.len() >= SPLIT_AT
            && let Some(answer) = self.fanout().and_then(|f| f.submit(&items[half..], data))
        {
            let mut report = self.send_each(&items[..half], data).await;
            match answer.await {
                Ok(theirs) => report.merge(theirs),
                // The thread ended inside the job (it panicked): its half counts as failed.
                Err(_) => report.failed += items.len() - half,
            }
            return report;
        }
        self.send_each(items, data).await
    }

    /// Datagrams the fan-out thread has sent (0 before the first large fan-out).
    pub fn fanout_sent(&self) -> u64 {
        self.fanout
            .get()
            .and_then(Option::as_ref)
            .map_or(0, FanOut::sent)
    }

    /// The fan-out thread, started on first use.
    fn fanout(&self) -> Option<&FanOut> {
        self.fanout
            .get_or_init(|| {
                let started = self
                    .io
                    .as_fd()
                    .try_clone_to_owned()
                    .and_then(|fd| FanOut::start(fd.into(), self.addr, Arc::clone(&self.state)));
                match started {
                    Ok(f) => Some(f),
                    Err(error) => {
                        tracing::warn!(%error, addr = %self.addr, "cannot start the fan-out thread; sending every fan-out from the relay loop");
                        None
                    }
                }
            })
            .as_ref()
    }

    /// One system call per destination, in a tight loop that awaits only when the send
    /// buffer is full, and hands the runtime a turn every [`BATCH`] datagrams (tokio's
    /// cooperative budget) so a large fan-out does not starve other tasks.
    async fn send_each(&self, items: &[(SocketAddr, Option<IpAddr>)], data: &[u8]) -> SendReport {
        let mut report = SendReport::default();
        for (i, &(to, src)) in items.iter().enumerate() {
            if i % BATCH == BATCH - 1 {
                tokio::task::consume_budget().await;
            }
            let transmit = match self.transmit(to, src, data) {
                Ok(t) => t,
                Err(e) => {
                    report.fail(to, e);
                    continue;
                }
            };
            loop {
                match self.try_send(&transmit) {
                    Ok(()) => report.sent += 1,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        match self.writable().await {
                            Ok(()) => continue,
                            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                                // Stalled: the rest of this fan-out fails at once, not
                                // after a wait each.
                                report.fail(to, e);
                                report.failed += items.len() - i - 1;
                                return report;
                            }
                            Err(e) => report.fail(to, e),
                        }
                    }
                    Err(e) => report.fail(to, e),
                }
                break;
            }
        }
        report
    }

    /// One send, if the socket is writable ([`send_once`]).
    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || {
            send_once(&self.io, &self.state, transmit)
        })
    }

    /// Sets the TTL (IPv4) or hop limit (IPv6) of multicast sent from here: each room's
    /// datagrams go out with that room's TTL.
    pub fn set_multicast_ttl(&self, ttl: u32) -> io::Result<()> {
        socket::set_multicast_ttl(&self.io, self.addr.is_ipv6(), ttl)
    }

    /// A datagram for quinn-udp from this socket ([`transmit`]).
    fn transmit<'a>(
        &self,
        to: SocketAddr,
        src: Option<IpAddr>,
        data: &'a [u8],
    ) -> io::Result<Transmit<'a>> {
        transmit(self.addr, to, src, data)
    }
}

/// One send of `t` on `sock` (the relay socket or its fan-out thread's duplicate), without
/// waiting: `WouldBlock` if the send buffer is full. Without a source, a plain `sendto`:
/// quinn-udp's `sendmsg` always adds an `IP_TOS` control message, which costs about 8% per
/// datagram.
pub(super) fn send_once(
    sock: &impl AsFd,
    state: &UdpSocketState,
    t: &Transmit<'_>,
) -> io::Result<()> {
    if t.src_ip.is_none() {
        let to = SockaddrStorage::from(t.destination);
        return sendto(sock.as_fd().as_raw_fd(), t.contents, &to, MsgFlags::empty())
            .map(drop)
            .map_err(io::Error::from);
    }
    state.try_send(sock.into(), t)
}

/// The error for a destination of the other family than the socket's `bound` address.
fn wrong_family(to: SocketAddr, bound: SocketAddr) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("cannot send to {to} on the relay socket {bound}: wrong address family"),
    )
}

/// A datagram for quinn-udp from a socket bound to `bound`, once `to` and `src` are known to
/// fit its family (an IPv6-only socket cannot send to IPv4, and a mismatch would make the
/// kernel answer `EINVAL`, which quinn-udp takes as a sign of an old kernel).
pub(super) fn transmit(
    bound: SocketAddr,
    to: SocketAddr,
    src: Option<IpAddr>,
    data: &[u8],
) -> io::Result<Transmit<'_>> {
    let to = canonical(to);
    let src = src.map(|ip| ip.to_canonical());
    let v4 = bound.is_ipv4();
    if to.is_ipv4() != v4 || src.is_some_and(|ip| ip.is_ipv4() != v4) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot send to {to}{} on the relay socket {bound}: wrong address family",
                src.map(|s| format!(" from {s}")).unwrap_or_default(),
            ),
        ));
    }
    // Bound to one address, the socket sends from it whatever `IP_PKTINFO` says: the
    // control message would only cost (the plain `sendto` of `try_send`).
    let src = src.filter(|_| bound.ip().is_unspecified());
    Ok(Transmit {
        destination: to,
        ecn: None,
        contents: data,
        segment_size: None,
        src_ip: src,
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv6Addr, SocketAddrV6};

    use super::*;

    /// Refuses to run unless inside the hermetic namespace: `MCCHAT_TEST_NETNS` set by
    /// scripts/test.sh, and no interface but `lo` in this network namespace.
    fn require_netns() {
        let flag = std::env::var_os("MCCHAT_TEST_NETNS").is_some();
        let ifaces = socket::namespace_interfaces().unwrap_or_default();
        assert!(
            flag && ifaces == ["lo"],
            "refusing to open sockets outside the test network namespace (interfaces: \
             {ifaces:?}); run scripts/test.sh"
        );
    }

    fn open(addr: &str) -> RelaySocket {
        RelaySocket::open(addr.parse().unwrap(), &MulticastConfig::default(), false).unwrap()
    }

    /// The cap on any one wait: it turns a lost datagram into a failure rather than a hang.
    const WAIT: Duration = Duration::from_secs(15);

    /// `fut`, or a panic naming `what` if it takes longer than [`WAIT`].
    async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, fut)
            .await
            .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
    }

    type Owned = (SocketAddr, Option<IpAddr>, Vec<u8>);

    /// Reads until `want` datagrams have come; returns them (owned) and the receive calls.
    async fn recv_n(port: &RelaySocket, want: usize) -> (Vec<Owned>, usize) {
        let mut batch = RecvBatch::new();
        let mut got = Vec::new();
        let mut calls = 0;
        while got.len() < want {
            let n = within("datagram", port.recv(&mut batch)).await.unwrap();
            assert!(n >= 1);
            calls += 1;
            got.extend(batch.iter().map(|r| (r.from, r.local, r.data.to_vec())));
        }
        (got, calls)
    }

    /// Reads until a datagram `end`; returns what came before it.
    async fn recv_until(port: &RelaySocket, end: &[u8]) -> Vec<Owned> {
        let mut got = Vec::new();
        loop {
            let (more, _) = recv_n(port, 1).await;
            for d in more {
                if d.2 == end {
                    return got;
                }
                got.push(d);
            }
        }
    }

    /// One datagram on `client`, within [`WAIT`].
    async fn client_recv(client: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 64];
        let n = within("reply", client.recv(&mut buf)).await.unwrap();
        buf[..n].to_vec()
    }

    /// The tests' extra addresses on lo, added by one test process at a time. nextest runs
    /// tests in parallel processes, and two `ip -6 addr add` on lo at once left one of the
    /// new addresses deaf: every datagram to it was lost for as long as the test waited
    /// (seen in CI rehearsals and reproduced, about one run in three).
    fn lo_addresses() -> bool {
        let path = std::env::temp_dir().join("mcchatd-test-lo-addresses.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap();
        let _held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .unwrap();
        ["fd6d:6363:706f:7274::2/128", "fe80::6d63:1/128"]
            .iter()
            .all(|a| add_to_lo(a))
    }

    /// Adds `addr` to lo (this namespace's only interface, so nothing can leave through it);
    /// false if `ip` refuses. An address already there is fine: tests may run in any order.
    fn add_to_lo(addr: &str) -> bool {
        let out = std::process::Command::new("ip")
            .args(["-6", "addr", "add", addr, "dev", "lo", "nodad"])
            .output();
        match out {
            Ok(o) if o.status.success() => true,
            Ok(o) if String::from_utf8_lossy(&o.stderr).contains("exists") => true,
            Ok(o) => {
                eprintln!(
                    "ip -6 addr add {addr} dev lo: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                false
            }
            Err(e) => {
                eprintln!("cannot run ip: {e}");
                false
            }
        }
    }

    /// The bug and the fix on IPv4: a client connected to the secondary loopback address
    /// 127.0.0.2 accepts only replies from 127.0.0.2.
    #[tokio::test]
    async fn a_reply_leaves_from_the_address_the_request_came_to() {
        require_netns();
        let port = open("0.0.0.0:0");
        let relay = SocketAddr::from(([127, 0, 0, 2], port.local_addr().port()));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(relay).await.unwrap();
        client.send(b"hello").await.unwrap();

        let (got, _) = recv_n(&port, 1).await;
        let (from, local, data) = &got[0];
        assert_eq!(*from, client.local_addr().unwrap());
        assert_eq!(*local, Some(IpAddr::from([127, 0, 0, 2])));
        assert_eq!(data, b"hello");

        // The bug: from the kernel's choice (127.0.0.1, the loopback route's preferred
        // source), the connected client drops it. The fix: from 127.0.0.2. Loopback delivers
        // in order, so if the first had been accepted it would be read first.
        port.send(*from, None, b"kernel's choice").await.unwrap();
        port.send(*from, *local, b"from 127.0.0.2").await.unwrap();
        assert_eq!(client_recv(&client).await, b"from 127.0.0.2");
    }

    /// IPv6 on [::1], then on a second address of lo (added here), where the bug shows too:
    /// to the client's ::1 the kernel answers from ::1, not from the address it was asked on.
    #[tokio::test]
    async fn ipv6_replies_leave_from_the_address_the_request_came_to() {
        require_netns();
        let port = open("[::]:0");
        let p = port.local_addr().port();
        let client = UdpSocket::bind("[::1]:0").await.unwrap();
        client.connect(("::1", p)).await.unwrap();
        client.send(b"on ::1").await.unwrap();
        let (got, _) = recv_n(&port, 1).await;
        let (from, local, data) = &got[0];
        assert_eq!(
            (*from, *local),
            (
                client.local_addr().unwrap(),
                Some(Ipv6Addr::LOCALHOST.into())
            )
        );
        assert_eq!(data, b"on ::1");
        port.send(*from, *local, b"reply").await.unwrap();
        assert_eq!(client_recv(&client).await, b"reply");

        let second: Ipv6Addr = "fd6d:6363:706f:7274::2".parse().unwrap();
        if !lo_addresses() {
            eprintln!("skipped the second IPv6 address: cannot add it to lo");
            return;
        }
        let client = UdpSocket::bind("[::1]:0").await.unwrap();
        client.connect((second, p)).await.unwrap();
        client.send(b"on the second").await.unwrap();
        let (got, _) = recv_n(&port, 1).await;
        let (from, local, _) = &got[0];
        assert_eq!(*local, Some(second.into()));
        port.send(*from, None, b"kernel's choice").await.unwrap();
        port.send(*from, *local, b"from the second").await.unwrap();
        assert_eq!(client_recv(&client).await, b"from the second");
    }

    /// A reply to a link-local address needs the sender's scope id, which `from` keeps.
    #[tokio::test]
    async fn link_local_replies_keep_the_scope_id() {
        require_netns();
        let ll: Ipv6Addr = "fe80::6d63:1".parse().unwrap();
        if !lo_addresses() {
            eprintln!("skipped: cannot add a link-local address to lo");
            return;
        }
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        let port = open("[::]:0");
        let relay = SocketAddrV6::new(ll, port.local_addr().port(), 0, lo);
        let client = UdpSocket::bind(SocketAddrV6::new(ll, 0, 0, lo))
            .await
            .unwrap();
        client.connect(relay).await.unwrap();
        // Sent again until it comes (UDP promises nothing, even on lo): what is checked is
        // the scope id and the reply's source, not delivery.
        let mut batch = RecvBatch::new();
        let mut got = None;
        for _ in 0..30 {
            client.send(b"link-local").await.unwrap();
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_millis(500), port.recv(&mut batch)).await
            {
                got = batch.iter().next().map(|r| (r.from, r.local));
                break;
            }
        }
        let (from, local) = got.expect("a datagram within 15 s");
        let SocketAddr::V6(from6) = from else {
            panic!("an IPv6 sender shown as {from}");
        };
        assert_eq!((from6.scope_id(), local), (lo, Some(ll.into())));
        let mut buf = [0u8; 64];
        let mut back = None;
        for _ in 0..30 {
            port.send(from, local, b"back").await.unwrap();
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(500), client.recv(&mut buf)).await
            {
                back = Some(buf[..n].to_vec());
                break;
            }
        }
        assert_eq!(back.as_deref(), Some(&b"back"[..]));
    }

    /// A burst is read in batches, not one datagram per call.
    #[tokio::test]
    async fn a_burst_is_read_in_few_calls() {
        require_netns();
        let port = open("127.0.0.1:0");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..100u8 {
            client.send_to(&[i; 100], port.local_addr()).unwrap();
        }
        let (got, calls) = recv_n(&port, 100).await;
        assert_eq!(got.len(), 100);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, (_, _, d))| d == &[i as u8; 100])
        );
        assert!(calls < 100 / 2, "{calls} receive calls for 100 datagrams");
        let mut batch = RecvBatch::new();
        let e = port.try_recv(&mut batch).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    /// A datagram longer than MAX_DATAGRAM arrives too long for the codec, and the next one
    /// whole.
    #[tokio::test]
    async fn an_oversize_datagram_arrives_too_long() {
        require_netns();
        let port = open("127.0.0.1:0");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(&[7; 1500], port.local_addr()).unwrap();
        client.send_to(b"next", port.local_addr()).unwrap();
        let (got, _) = recv_n(&port, 2).await;
        assert!(
            got[0].2.len() > MAX_DATAGRAM,
            "cut to {} bytes",
            got[0].2.len()
        );
        assert_eq!(got[1].2, b"next");
    }

    /// A GSO train (4 datagrams of 500 bytes sent in one `sendmsg`) arrives as 4 datagrams:
    /// with GRO on, it would come as one 2,000-byte buffer, cut to 1,201 bytes.
    #[tokio::test]
    async fn a_gso_train_arrives_as_separate_datagrams() {
        require_netns();
        let port = open("127.0.0.1:0");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let state = UdpSocketState::new((&client).into()).unwrap();
        if state.max_gso_segments() < 4 {
            eprintln!("skipped: this kernel has no UDP GSO");
            return;
        }
        let contents: Vec<u8> = (0..4u8).flat_map(|i| [i; 500]).collect();
        let transmit = Transmit {
            destination: port.local_addr(),
            ecn: None,
            contents: &contents,
            segment_size: Some(500),
            src_ip: None,
        };
        state.try_send((&client).into(), &transmit).unwrap();
        client.send_to(b"end", port.local_addr()).unwrap();
        let got = recv_until(&port, b"end").await;
        let lens: Vec<usize> = got.iter().map(|(_, _, d)| d.len()).collect();
        assert_eq!(lens, [500; 4]);
        assert!(
            got.iter()
                .enumerate()
                .all(|(i, (_, _, d))| d == &[i as u8; 500])
        );
    }

    /// An ICMP port unreachable for an earlier send does not end a receive.
    #[tokio::test]
    async fn an_icmp_error_is_skipped() {
        require_netns();
        let port = open("127.0.0.1:0");
        // Unconnected sockets hear ICMP errors only with IP_RECVERR; turn it on to get one.
        port.state
            .enable_transport_errors((&port.io).into())
            .unwrap();
        let closed = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        port.send(closed, None, b"to nobody").await.unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"after", port.local_addr()).unwrap();
        let (got, _) = recv_n(&port, 1).await;
        assert_eq!(got[0].2, b"after");
        assert_eq!(port.icmp_errors_skipped(), 1);
    }

    /// `n` loopback receivers, and the fan-out list for them: every other one with a source
    /// address (`IP_PKTINFO` through quinn-udp), the rest without.
    async fn fan_out_receivers(n: usize) -> (Vec<UdpSocket>, Vec<(SocketAddr, Option<IpAddr>)>) {
        let mut receivers = Vec::new();
        for _ in 0..n {
            receivers.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        }
        let src = Some(IpAddr::from([127, 0, 0, 1]));
        let items = receivers
            .iter()
            .enumerate()
            .map(|(i, r)| (r.local_addr().unwrap(), src.filter(|_| i % 2 == 0)))
            .collect();
        (receivers, items)
    }

    /// Fan-out reaches every destination, and a destination of the wrong family is counted.
    #[tokio::test]
    async fn send_many_delivers_to_all() {
        require_netns();
        let port = open("0.0.0.0:0");
        let (receivers, items) = fan_out_receivers(50).await;
        let report = port.send_many(&items, b"fan-out").await;
        assert_eq!(
            (report.sent, report.failed),
            (50, 0),
            "{:?}",
            report.first_error
        );
        let mut buf = [0u8; 64];
        for r in &receivers {
            let (n, from) = within("fan-out", r.recv_from(&mut buf)).await.unwrap();
            assert_eq!(&buf[..n], b"fan-out");
            assert_eq!(from.port(), port.local_addr().port());
        }

        let wrong = SocketAddr::from((Ipv6Addr::LOCALHOST, 9));
        let to = receivers[0].local_addr().unwrap();
        let report = port.send_many(&[(wrong, None), (to, None)], b"x").await;
        assert_eq!((report.sent, report.failed), (1, 1));
        let (at, e) = report.first_error.unwrap();
        assert_eq!((at, e.kind()), (wrong, io::ErrorKind::InvalidInput));
    }

    /// A batch longer than one `sendmmsg` reaches each destination whole and in order; a
    /// destination of the wrong family in the middle fails alone and is counted.
    #[tokio::test]
    async fn send_batch_delivers_every_datagram_in_order_and_counts_a_misfit() {
        require_netns();
        let port = open("0.0.0.0:0");
        let (receivers, dests) = fan_out_receivers(2).await;
        let wrong = SocketAddr::from((Ipv6Addr::LOCALHOST, 9));
        let n = 2 * mmsg::MAX + 3;
        let mut items: Vec<(SocketAddr, Vec<u8>)> = (0..n)
            .map(|i| (dests[i % 2].0, format!("datagram {i}").into_bytes()))
            .collect();
        items.insert(mmsg::MAX + 1, (wrong, b"misfit".to_vec()));
        let report = port.send_batch(&items).await;
        assert_eq!((report.sent, report.failed), (n, 1));
        let (at, e) = report.first_error.unwrap();
        assert_eq!((at, e.kind()), (wrong, io::ErrorKind::InvalidInput));
        let mut buf = [0u8; 64];
        for i in 0..n {
            let r = &receivers[i % 2];
            let (len, _) = within("batch", r.recv_from(&mut buf)).await.unwrap();
            assert_eq!(&buf[..len], format!("datagram {i}").as_bytes());
        }
    }

    /// From `SPLIT_AT` destinations on, a fan-out is shared with the second thread: each
    /// destination gets each datagram once and in order, the thread sends the second half,
    /// and a failure in its half is counted. Below it, the loop sends alone.
    #[tokio::test]
    async fn a_large_fan_out_is_split_between_two_senders_and_reaches_each_once_in_order() {
        require_netns();
        let port = open("0.0.0.0:0");
        let n = 2 * SPLIT_AT + 1;
        let (receivers, items) = fan_out_receivers(n).await;
        for data in [b"one", b"two", b"six"] {
            let report = port.send_many(&items, data).await;
            assert_eq!(
                (report.sent, report.failed),
                (n, 0),
                "{:?}",
                report.first_error
            );
        }
        assert_eq!(port.fanout_sent(), 3 * (n - n / 2) as u64);
        let mut buf = [0u8; 64];
        for r in &receivers {
            for want in [b"one", b"two", b"six"] {
                let (len, from) = within("fan-out", r.recv_from(&mut buf)).await.unwrap();
                assert_eq!(&buf[..len], want);
                assert_eq!(from.port(), port.local_addr().port());
            }
            let extra = r.try_recv_from(&mut buf);
            assert!(
                extra
                    .as_ref()
                    .is_err_and(|e| e.kind() == io::ErrorKind::WouldBlock),
                "a datagram twice: {extra:?}"
            );
        }

        let before = port.fanout_sent();
        let report = port.send_many(&items[..SPLIT_AT - 1], b"small").await;
        assert_eq!((report.sent, report.failed), (SPLIT_AT - 1, 0));
        assert_eq!(
            port.fanout_sent(),
            before,
            "a small fan-out went to the thread"
        );

        let wrong = SocketAddr::from((Ipv6Addr::LOCALHOST, 9));
        let mut some: Vec<_> = items[..SPLIT_AT].to_vec();
        some.push((wrong, None));
        let report = port.send_many(&some, b"x").await;
        assert_eq!((report.sent, report.failed), (SPLIT_AT, 1));
        let (at, e) = report.first_error.unwrap();
        assert_eq!((at, e.kind()), (wrong, io::ErrorKind::InvalidInput));
    }

    /// Splitting a coalesced buffer by stride, and leaving out a segment that may be cut.
    #[test]
    fn coalesced_buffers_are_split_by_stride() {
        let mut meta = RecvMeta::default();
        let buf: Vec<u8> = (0..BUF_LEN).map(|i| (i / 500) as u8).collect();
        let lens = |meta: &RecvMeta| -> Vec<usize> {
            segments(meta, &buf).map(|r| r.data.len()).collect()
        };
        meta.len = 1000;
        meta.stride = 1000;
        assert_eq!(lens(&meta), [1000]);
        meta.stride = 400;
        assert_eq!(lens(&meta), [400, 400, 200]);
        // Full buffer, not a multiple of the stride: the last 201 bytes may be a cut datagram.
        meta.len = BUF_LEN;
        meta.stride = 500;
        assert_eq!(lens(&meta), [500, 500]);
        // An empty datagram is still a datagram (for the codec to count).
        meta.len = 0;
        meta.stride = 0;
        assert_eq!(lens(&meta), [0]);
    }

    #[test]
    fn mapped_senders_show_as_ipv4_and_groups_are_no_source() {
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:5".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.1:5".parse().unwrap());
        let scoped = SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 5, 0, 3));
        assert_eq!(canonical(scoped), scoped);
        assert_eq!(usable_source("239.1.2.3".parse().unwrap()), None);
        assert_eq!(usable_source(Ipv4Addr::BROADCAST.into()), None);
        assert_eq!(
            usable_source("::ffff:10.0.0.1".parse().unwrap()),
            Some("10.0.0.1".parse().unwrap())
        );
    }
}
