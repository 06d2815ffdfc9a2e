//! Hand-made traffic for the protocol and attack tests: a relay client driven by hand
//! ([`Raw`]), datagrams with forged sources (raw sockets), and threads inside one of
//! scripts/lan.sh's namespaces.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use mcchat_core::wire::{self, Kind};

use crate::util::WAIT;

/// A hand-driven relay client, to test the protocol itself.
pub struct Raw {
    pub sock: UdpSocket,
    pub daemon: SocketAddr,
    pub cookie: Option<String>,
}

impl Raw {
    pub fn new(bind: &str, daemon: SocketAddr) -> Self {
        let sock = UdpSocket::bind((bind.parse::<IpAddr>().unwrap(), 0)).unwrap();
        sock.set_read_timeout(Some(WAIT)).unwrap();
        Self {
            sock,
            daemon,
            cookie: None,
        }
    }

    /// A request padded to `pad_to` bytes (0: none).
    pub fn request(&self, kind: Kind, room: &str, pad_to: usize) -> Vec<u8> {
        let mut out = String::new();
        wire::relay_request(
            kind,
            room,
            "raw",
            self.cookie.as_deref(),
            None,
            pad_to,
            &mut out,
        )
        .unwrap();
        out.into_bytes()
    }

    pub fn send(&self, bytes: &[u8]) {
        self.sock.send_to(bytes, self.daemon).unwrap();
    }

    pub fn recv(&self) -> Vec<u8> {
        let mut buf = [0u8; 2048];
        let (n, from) = match self.sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => panic!("no answer from mcchatd at {}: {e}", self.daemon),
        };
        assert_eq!(from, self.daemon);
        buf[..n].to_vec()
    }

    /// The chat datagrams (`msg`, `me`) waiting to be read; presence, such as the daemon's
    /// repeats of a sender's `leave`, is skipped.
    pub fn chat_queued(&self) -> Vec<Vec<u8>> {
        self.sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        let mut chat = Vec::new();
        while let Ok(n) = self.sock.recv(&mut buf) {
            if wire::decode(&buf[..n])
                .is_ok_and(|f| matches!(f.meta.kind, Kind::Message | Kind::Action))
            {
                chat.push(buf[..n].to_vec());
            }
        }
        self.sock.set_nonblocking(false).unwrap();
        chat
    }

    /// The next chat datagram (presence skipped).
    pub fn recv_chat(&self) -> Vec<u8> {
        loop {
            let d = self.recv();
            if wire::decode(&d).is_ok_and(|f| matches!(f.meta.kind, Kind::Message | Kind::Action)) {
                return d;
            }
        }
    }

    /// Nothing is waiting to be read.
    pub fn nothing_queued(&self) -> bool {
        self.sock.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 2048];
        let empty = self.sock.recv_from(&mut buf).is_err();
        self.sock.set_nonblocking(false).unwrap();
        empty
    }

    pub fn expect(&self, kind: Kind) -> Vec<u8> {
        let d = self.recv();
        let f = wire::decode(&d).unwrap();
        assert_eq!(f.meta.kind, kind, "{}", String::from_utf8_lossy(&d));
        d
    }

    /// The handshake to a `sub` the daemon refuses: its `closed`.
    pub fn refused(&mut self, room: &str) -> Vec<u8> {
        self.send(&self.request(Kind::Subscribe, room, wire::MIN_RELAY_REQUEST));
        let challenge = self.expect(Kind::Challenge);
        let f = wire::decode(&challenge).unwrap();
        self.cookie = Some(f.tags.get("cookie").unwrap().into_owned());
        self.send(&self.request(Kind::Subscribe, room, 0));
        self.expect(Kind::Closed)
    }

    /// A subscription to `room` with the cookie this client holds (the handshake first, if
    /// it holds none or the daemon challenges it): the daemon's final answer, `subok` or
    /// `closed`. A request the daemon's rate limits drop unanswered is sent again after
    /// 150 ms, as a client that wants the slot would (within `WAIT`).
    pub fn try_subscribe(&mut self, room: &str) -> Kind {
        let pad = if self.cookie.is_some() {
            0
        } else {
            wire::MIN_RELAY_REQUEST
        };
        let mut request = self.request(Kind::Subscribe, room, pad);
        let deadline = std::time::Instant::now() + WAIT;
        self.sock
            .set_read_timeout(Some(std::time::Duration::from_millis(150)))
            .unwrap();
        self.send(&request);
        let mut buf = [0u8; 2048];
        let kind = loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no answer from mcchatd at {} to a sub for {room}",
                self.daemon
            );
            let Ok((n, from)) = self.sock.recv_from(&mut buf) else {
                self.send(&request);
                continue;
            };
            assert_eq!(from, self.daemon);
            let f = wire::decode(&buf[..n]).unwrap();
            match f.meta.kind {
                Kind::Challenge => {
                    self.cookie = Some(f.tags.get("cookie").unwrap().into_owned());
                    request = self.request(Kind::Subscribe, room, 0);
                    self.send(&request);
                }
                Kind::Subscribed | Kind::Closed if f.room == room => {
                    if let Some(c) = f.tags.get("cookie") {
                        self.cookie = Some(c.into_owned());
                    }
                    break f.meta.kind;
                }
                // Chat of a room subscribed before.
                _ => {}
            }
        };
        self.sock.set_read_timeout(Some(WAIT)).unwrap();
        kind
    }

    /// The full handshake: padded request, challenge, request with the cookie, confirmation.
    pub fn subscribe(&mut self, room: &str) {
        self.send(&self.request(Kind::Subscribe, room, wire::MIN_RELAY_REQUEST));
        let challenge = self.expect(Kind::Challenge);
        let f = wire::decode(&challenge).unwrap();
        self.cookie = Some(f.tags.get("cookie").unwrap().into_owned());
        self.send(&self.request(Kind::Subscribe, room, 0));
        self.expect(Kind::Subscribed);
    }
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it creates stay there).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
    })
}

/// An IPv4/UDP packet with a forged source, for a raw socket.
pub fn spoofed(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (SocketAddr::V4(src), SocketAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only")
    };
    let udp_len = 8 + payload.len();
    let mut p = Vec::with_capacity(20 + udp_len);
    // Version/IHL, TOS, total length, id, DF, TTL, UDP, checksum (the kernel fills length,
    // id and checksum with IP_HDRINCL).
    p.extend_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    p.extend_from_slice(payload);
    p
}

/// `data` as a UDP datagram from `from` to `to`, sent through a raw socket: the source port
/// is written by hand, as an attacker forging another host's address and port does (the
/// kernel writes the IP header, from `from`'s address, which is local here).
pub fn forge(from: SocketAddr, to: SocketAddr, data: &[u8]) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::UDP)).expect("a raw socket");
    raw.bind(&SockAddr::from(SocketAddr::new(from.ip(), 0)))
        .expect("bind the raw socket");
    let len = u16::try_from(8 + data.len()).unwrap();
    let mut packet = Vec::with_capacity(8 + data.len());
    packet.extend_from_slice(&from.port().to_be_bytes());
    packet.extend_from_slice(&to.port().to_be_bytes());
    packet.extend_from_slice(&len.to_be_bytes());
    // No checksum (allowed over IPv4).
    packet.extend_from_slice(&[0, 0]);
    packet.extend_from_slice(data);
    raw.send_to(&packet, &SockAddr::from(to))
        .expect("send the forged datagram");
}

/// A UDP socket joined to IPv4 `group` the way a peer joins (bound to the group,
/// `IP_MULTICAST_ALL` off), with a receive buffer of `rcvbuf` bytes and reads that time out
/// after 50 ms, in the calling thread's namespace.
pub fn group_socket(group: SocketAddr, rcvbuf: usize) -> UdpSocket {
    let SocketAddr::V4(g) = group else {
        panic!("{group}")
    };
    let s = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_reuse_port(true).unwrap();
    let _ = s.set_recv_buffer_size(rcvbuf);
    s.bind(&group.into()).unwrap();
    s.set_multicast_all_v4(false).unwrap();
    s.join_multicast_v4(g.ip(), &std::net::Ipv4Addr::UNSPECIFIED)
        .unwrap();
    let sock: UdpSocket = s.into();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .unwrap();
    sock
}
