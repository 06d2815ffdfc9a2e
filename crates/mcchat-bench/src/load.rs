//! The load tools: a paced sender, a counting receiver with a latency histogram, and relay
//! subscribers. Plain blocking sockets on their own threads: the tools must not be what
//! limits the figures.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use hdrhistogram::Histogram;
use mcchat_core::socket::{self, MulticastConfig};
use mcchat_core::wire::{self, Header, InstanceId, Kind, Meta};

/// The room every benchmark uses.
pub(crate) const ROOM: &str = "room1";

/// Wall-clock nanoseconds: sender and receiver are on one host, so their clocks agree.
pub(crate) fn now_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
        .map(|t| (t.tv_sec() as u64).saturating_mul(1_000_000_000) + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// One benchmark datagram of exactly `size` bytes: `room1|b|SEQ NS xxxx`.
pub(crate) fn message(seq: u64, size: usize, out: &mut Vec<u8>) {
    message_after("", seq, size, out);
}

/// [`message`] after `prefix` (a sender's `@cookie=.. `), `size` bytes in all.
fn message_after(prefix: &str, seq: u64, size: usize, out: &mut Vec<u8>) {
    use std::io::Write as _;
    out.clear();
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{prefix}{ROOM}|b|{seq:012} {:020} ", now_ns());
    out.resize(size.max(out.len()), b'x');
}

/// A tagged datagram as `mcchat join` sends it (`@id=..;seq=..;ts=..;kind=.. room1|NAME|TEXT`,
/// `ts` now), through mcchat-core's own encoder, so a receiver takes it as a peer's.
pub(crate) fn tagged(
    instance: InstanceId,
    seq: u64,
    kind: Kind,
    sender: &str,
    text: &str,
    out: &mut String,
) -> Result<()> {
    let header = Header {
        meta: Meta {
            instance: Some(instance),
            seq: Some(seq),
            ts_ms: Some(wire::now_ms()),
            kind,
        },
        extra: &[],
    };
    wire::encode(&header, ROOM, sender, text, out).context("encode a tagged datagram")
}

fn parse(d: &[u8]) -> Option<(u64, u64)> {
    let text = d.splitn(3, |b| *b == b'|').nth(2)?;
    let seq = std::str::from_utf8(text.get(..12)?).ok()?.parse().ok()?;
    let ns = std::str::from_utf8(text.get(13..33)?).ok()?.parse().ok()?;
    Some((seq, ns))
}

/// What a sender did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sent {
    pub(crate) count: u64,
    pub(crate) secs: f64,
}

/// Sends to `to` at `rate` datagrams a second (0: flat out) for `secs`; with `prove`, to
/// mcchatd, first gets a cookie for its address and puts it on every datagram.
///
/// Between datagrams it sleeps (with a timer slack of 1 µs) rather than spins, unless the
/// next is due within [`SPIN`]: a pacer that spins holds a core for the whole trial, and on a
/// two-core machine the relay under test then waits behind it for a scheduler time slice
/// (about 4 ms, seen with `perf sched`), which is the load's cost, not the relay's. Each
/// datagram carries the time it was sent, so waking late moves no latency figure.
pub(crate) fn send(to: SocketAddr, rate: u64, secs: f64, size: usize, prove: bool) -> Result<Sent> {
    /// Waits shorter than this are spun.
    const SPIN: Duration = Duration::from_micros(10);
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("bind the sender")?;
    sock.set_multicast_ttl_v4(1)?;
    let prefix = if prove {
        format!("@cookie={} ", cookie(&sock, to)?)
    } else {
        String::new()
    };
    // Best effort: with the default slack of 50 µs the pacing is coarser, no worse.
    let _ = nix::sys::prctl::set_timerslack(1_000);
    let mut buf = Vec::with_capacity(size);
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut seq = 0u64;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if rate > 0 {
            let due = start + Duration::from_secs_f64(seq as f64 / rate as f64);
            if due > now {
                let wait = due - now;
                if wait > SPIN {
                    std::thread::sleep(wait - SPIN / 2);
                }
                continue;
            }
        }
        seq += 1;
        message_after(&prefix, seq, size, &mut buf);
        // A full socket buffer (ENOBUFS/EAGAIN) is loss the receiver will count.
        let _ = sock.send_to(&buf, to);
    }
    Ok(Sent {
        count: seq,
        secs: start.elapsed().as_secs_f64(),
    })
}

/// Sends one datagram to `to`; returns when it was stamped (wall-clock ns).
pub(crate) fn single(to: SocketAddr, size: usize) -> Result<u64> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).context("bind the sender")?;
    sock.set_multicast_ttl_v4(1)?;
    let mut buf = Vec::with_capacity(size);
    let ns = now_ns();
    message(0, size, &mut buf);
    sock.send_to(&buf, to)?;
    Ok(ns)
}

/// What a receiver saw.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub(crate) count: u64,
    /// Datagrams whose sequence number had been seen already.
    pub(crate) duplicates: u64,
    /// Datagrams that arrived after a later one.
    pub(crate) reordered: u64,
    pub(crate) latency_us: Histogram<u64>,
}

/// A receiver joined to `group`, counting until `stop` is set and it has been idle for
/// `idle`.
pub(crate) struct Receiver {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<Received>>,
}

impl Receiver {
    /// Joins `group` (returns once joined) and counts in a thread.
    pub(crate) fn start(group: SocketAddr, idle: Duration) -> Result<Self> {
        let joined = socket::open(group, &MulticastConfig::default())?;
        let sock: UdpSocket = joined.socket;
        sock.set_nonblocking(false)?;
        sock.set_read_timeout(Some(Duration::from_millis(20)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = std::thread::spawn(move || {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut buf = [0u8; 2048];
            let mut count = 0u64;
            let mut duplicates = 0u64;
            let mut reordered = 0u64;
            let mut highest = 0u64;
            // One bit per sequence number seen.
            let mut seen: Vec<u64> = Vec::new();
            let mut last = Instant::now();
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        last = Instant::now();
                        if let Some((seq, ns)) = parse(&buf[..n]) {
                            let (word, bit) = ((seq / 64) as usize, 1u64 << (seq % 64));
                            if seen.len() <= word {
                                seen.resize(word + 1, 0);
                            }
                            if seen[word] & bit != 0 {
                                duplicates += 1;
                                continue;
                            }
                            seen[word] |= bit;
                            if seq < highest {
                                reordered += 1;
                            }
                            highest = highest.max(seq);
                            count += 1;
                            let lat = now_ns().saturating_sub(ns) / 1000;
                            let _ = hist.record(lat.max(1));
                        }
                    }
                    Err(_) => {
                        if flag.load(Ordering::Relaxed) && last.elapsed() >= idle {
                            break;
                        }
                    }
                }
            }
            Ok(Received {
                count,
                duplicates,
                reordered,
                latency_us: hist,
            })
        });
        Ok(Self { stop, handle })
    }

    /// Stops once idle and returns the counts.
    pub(crate) fn finish(self) -> Result<Received> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok(r) => r,
            Err(_) => bail!("receiver thread panicked"),
        }
    }
}

/// A hand-driven relay subscriber.
pub(crate) struct Subscriber {
    sock: UdpSocket,
}

fn request(kind: Kind, cookie: Option<&str>) -> Vec<u8> {
    let mut out = String::new();
    let _ = wire::relay_request(
        kind,
        ROOM,
        "bench",
        cookie,
        None,
        wire::MIN_RELAY_REQUEST,
        &mut out,
    );
    out.into_bytes()
}

/// The cookie mcchatd at `daemon` issues to `sock`'s address: one `sub` without a cookie,
/// answered with a challenge (and nothing subscribed).
fn cookie(sock: &UdpSocket, daemon: SocketAddr) -> Result<String> {
    let mut buf = [0u8; 2048];
    sock.set_read_timeout(Some(Duration::from_secs(5)))?;
    sock.send_to(&request(Kind::Subscribe, None), daemon)?;
    let n = sock.recv(&mut buf).context("no challenge from mcchatd")?;
    sock.set_read_timeout(None)?;
    let f = wire::decode(&buf[..n]).map_err(|r| anyhow::anyhow!("bad challenge: {r}"))?;
    f.tags
        .get("cookie")
        .map(|c| c.into_owned())
        .context("a challenge without a cookie")
}

/// Subscribes `n` sockets to the relay at `daemon`, in batches.
pub(crate) fn subscribe(daemon: SocketAddr, n: usize) -> Result<Vec<Subscriber>> {
    let mut subs = Vec::with_capacity(n);
    for i in 0..n {
        // Fifty subscribers per host address (the rooms file lifts mcchatd's cap of 64 per
        // source, which counts this host as one).
        let host = i / 50;
        let ip = Ipv4Addr::new(127, 1, (host / 250) as u8, (1 + host % 250) as u8);
        let sock = UdpSocket::bind((ip, 0)).context("bind a subscriber")?;
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        // The kernel stamps each datagram on arrival: the fan-out time is the daemon's, not
        // the time this process takes to read 10,000 sockets one after another.
        nix::sys::socket::setsockopt(&sock, nix::sys::socket::sockopt::ReceiveTimestampns, &true)
            .context("SO_TIMESTAMPNS")?;
        subs.push(Subscriber { sock });
    }
    let mut buf = [0u8; 2048];
    for batch in subs.chunks(100) {
        for s in batch {
            s.sock.send_to(&request(Kind::Subscribe, None), daemon)?;
        }
        let mut cookies = Vec::with_capacity(batch.len());
        for s in batch {
            let n = s.sock.recv(&mut buf).context("no challenge from mcchatd")?;
            let f = wire::decode(&buf[..n]).map_err(|r| anyhow::anyhow!("bad challenge: {r}"))?;
            cookies.push(
                f.tags
                    .get("cookie")
                    .map(|c| c.into_owned())
                    .unwrap_or_default(),
            );
        }
        for (s, c) in batch.iter().zip(&cookies) {
            s.sock.send_to(&request(Kind::Subscribe, Some(c)), daemon)?;
        }
        for s in batch {
            let n = s
                .sock
                .recv(&mut buf)
                .context("no confirmation from mcchatd")?;
            if wire::decode(&buf[..n]).map(|f| f.meta.kind) != Ok(Kind::Subscribed) {
                bail!(
                    "subscription refused: {}",
                    String::from_utf8_lossy(&buf[..n])
                );
            }
        }
    }
    Ok(subs)
}

/// Reads `per_sub` datagrams on every subscriber; returns the latest kernel arrival stamp
/// (wall-clock ns) and the number delivered.
pub(crate) fn drain(subs: &[Subscriber], per_sub: usize) -> (u64, u64) {
    use std::io::IoSliceMut;
    use std::os::fd::AsRawFd as _;

    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};

    let mut buf = [0u8; 2048];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut last = 0u64;
    let mut delivered = 0u64;
    for s in subs {
        for _ in 0..per_sub {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<()>(
                s.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            ) else {
                break;
            };
            delivered += 1;
            for c in msg.cmsgs().into_iter().flatten() {
                if let ControlMessageOwned::ScmTimestampns(ts) = c {
                    let ns =
                        (ts.tv_sec() as u64).saturating_mul(1_000_000_000) + ts.tv_nsec() as u64;
                    last = last.max(ns);
                }
            }
        }
    }
    (last, delivered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_size_and_parse_back() {
        let mut buf = Vec::new();
        message(42, 64, &mut buf);
        assert_eq!(buf.len(), 64);
        let (seq, ns) = parse(&buf).unwrap();
        assert_eq!(seq, 42);
        assert!(ns > 0);
        assert!(wire::decode(&buf).is_ok());
    }

    #[test]
    fn tagged_datagrams_decode_with_their_tags() {
        let mut out = String::new();
        tagged(InstanceId(7), 3, Kind::Heartbeat, "x", "", &mut out).unwrap();
        let f = wire::decode(out.as_bytes()).unwrap();
        assert_eq!(f.meta.instance, Some(InstanceId(7)));
        assert_eq!(f.meta.seq, Some(3));
        assert_eq!(f.meta.kind, Kind::Heartbeat);
        assert!(out.starts_with("@id=0000000000000007;seq=3;ts="), "{out}");
        assert!(out.ends_with(" room1|x|"), "{out}");
    }
}
