//! Admission: whether a datagram from a source may be handled at all, and its share of the
//! relay. Source sanity, the allow list, and per-source token buckets, at two levels for
//! IPv6: each address has the configured share, and each /64 together [`NET_SHARE`] times
//! that, since one host can have any number of addresses in its prefix, while the hosts of
//! one LAN usually share one /64 and must not share one bucket.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use crate::config::{Allow, DaemonSettings};
use ipnet::IpNet;

use crate::counters::Drop;
use crate::limiter::Limiter;

/// The key of the one bucket all unproven sources share.
const ALL_UNPROVEN: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// How many sources' shares one IPv6 /64 has together.
pub(crate) const NET_SHARE: u32 = 16;

/// What counts as one source: an IPv4 address (IPv4-mapped IPv6 included) or an IPv6 address.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The IPv6 /64 `ip` is in, for the second level of limits; `None` for IPv4.
pub(crate) fn net_key(ip: IpAddr) -> Option<IpAddr> {
    match source_key(ip) {
        IpAddr::V6(v6) => Some(IpAddr::V6(Ipv6Addr::from(
            u128::from(v6) & !0xffff_ffff_ffff_ffff,
        ))),
        IpAddr::V4(_) => None,
    }
}

/// One bucket per source and, for IPv6, one per /64 with [`NET_SHARE`] times the rate.
#[derive(Debug)]
struct TwoLevel {
    source: Limiter,
    net: Limiter,
}

impl TwoLevel {
    fn new(rate: u32, burst: u32) -> Self {
        Self {
            source: Limiter::new(rate, burst),
            net: Limiter::new(
                rate.saturating_mul(NET_SHARE),
                burst.saturating_mul(NET_SHARE),
            ),
        }
    }

    fn set_rate(&mut self, rate: u32, burst: u32) {
        self.source.set_rate(rate, burst);
        self.net.set_rate(
            rate.saturating_mul(NET_SHARE),
            burst.saturating_mul(NET_SHARE),
        );
    }

    fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.source.allow(source_key(ip), now) && net_key(ip).is_none_or(|n| self.net.allow(n, now))
    }

    fn forget_idle(&mut self, now: Instant) {
        self.source.forget_idle(now);
        self.net.forget_idle(now);
    }
}

/// Whether the allow list admits `ip`, given the host's subnets: the one rule for the relay
/// port and the status port.
pub(crate) fn allows(allow: &[Allow], connected: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    allow.iter().any(|a| a.matches(ip, connected))
}

/// Which bucket a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bucket {
    /// Chat datagrams to relay from a source that proved its address (a valid cookie): only
    /// the address itself can send these, so a spoofer cannot drain its share.
    Relay,
    /// `sub` without a valid cookie: anyone can forge these in anyone's name.
    Unverified,
    /// `sub` and `unsub` with a valid cookie: only the address itself can send these, so a
    /// spoofer cannot drain them and lapse a victim's subscription.
    Verified,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct Admission {
    allow: Vec<Allow>,
    connected: Vec<IpNet>,
    relay: TwoLevel,
    unproven: TwoLevel,
    /// The one budget of all unproven sources together (one key).
    unproven_all: Limiter,
    unverified: TwoLevel,
    verified: TwoLevel,
}

impl Admission {
    pub(crate) fn new(d: &DaemonSettings, connected: Vec<IpNet>) -> Self {
        Self {
            allow: d.allow.clone(),
            connected,
            relay: TwoLevel::new(d.relay_rate, d.relay_burst),
            unproven: TwoLevel::new(d.relay_rate, d.relay_burst),
            unproven_all: Limiter::new(d.unproven_rate, d.unproven_burst),
            unverified: TwoLevel::new(d.subscribe_rate, d.subscribe_burst),
            verified: TwoLevel::new(d.subscribe_rate, d.subscribe_burst),
        }
    }

    /// New rules (on reload); the buckets keep their state.
    pub(crate) fn reconfigure(&mut self, d: &DaemonSettings) {
        self.allow.clone_from(&d.allow);
        self.relay.set_rate(d.relay_rate, d.relay_burst);
        self.unproven.set_rate(d.relay_rate, d.relay_burst);
        self.unproven_all
            .set_rate(d.unproven_rate, d.unproven_burst);
        self.unverified
            .set_rate(d.subscribe_rate, d.subscribe_burst);
        self.verified.set_rate(d.subscribe_rate, d.subscribe_burst);
    }

    /// The host's subnets changed (DHCP, Wi-Fi, VPN): `connected` follows.
    pub(crate) fn set_connected(&mut self, connected: Vec<IpNet>) {
        self.connected = connected;
    }

    pub(crate) fn connected(&self) -> &[IpNet] {
        &self.connected
    }

    /// Whether `ip` may use the relay (and its status port).
    pub(crate) fn allowed(&self, ip: IpAddr) -> bool {
        allows(&self.allow, &self.connected, ip)
    }

    /// Whether `from` can be a real sender at all: not port 0, not an unspecified, multicast
    /// or broadcast address (the limited broadcast, or the broadcast address of one of this
    /// host's subnets), which no host sends from; then the allow list.
    pub(crate) fn check_source(&self, from: SocketAddr) -> Result<(), Drop> {
        let ip = from.ip();
        if from.port() == 0 || ip.is_unspecified() || ip.is_multicast() || self.is_broadcast(ip) {
            return Err(Drop::BadSource);
        }
        if !self.allowed(ip) {
            return Err(Drop::NotAllowed);
        }
        Ok(())
    }

    /// Whether `ip` is the limited broadcast or a broadcast address of one of the subnets.
    pub(crate) fn is_broadcast(&self, ip: IpAddr) -> bool {
        let IpAddr::V4(v4) = ip else {
            return false;
        };
        v4 == Ipv4Addr::BROADCAST
            || self.connected.iter().any(|n| match n {
                // /31 and /32 have no broadcast address (RFC 3021).
                IpNet::V4(n) => n.prefix_len() < 31 && n.broadcast() == v4,
                IpNet::V6(_) => false,
            })
    }

    /// Takes a token from `ip`'s share of `bucket` (and of its /64's).
    pub(crate) fn take(&mut self, bucket: Bucket, ip: IpAddr, now: Instant) -> bool {
        match bucket {
            Bucket::Relay => self.relay.allow(ip, now),
            Bucket::Unverified => self.unverified.allow(ip, now),
            Bucket::Verified => self.verified.allow(ip, now),
        }
    }

    /// Takes a token for a chat datagram to relay with no proof of its source (`nc`, scripts):
    /// anyone can forge these from any address, so besides the source's own share (apart
    /// from its proven one, which forgeries in its name must not drain) they draw on one
    /// small budget of all such sources together (`unproven_rate`), which forged sources
    /// cannot multiply. The source's share is taken first, so a source over it does not
    /// spend the common budget.
    pub(crate) fn take_unproven(&mut self, ip: IpAddr, now: Instant) -> Result<(), Drop> {
        if !self.unproven.allow(ip, now) {
            return Err(Drop::RateLimited);
        }
        if !self.unproven_all.allow(ALL_UNPROVEN, now) {
            return Err(Drop::UnprovenOverBudget);
        }
        Ok(())
    }

    /// Forgets buckets that hold no information (full ones); once a second.
    pub(crate) fn forget_idle(&mut self, now: Instant) {
        self.relay.forget_idle(now);
        self.unproven.forget_idle(now);
        self.unproven_all.forget_idle(now);
        self.unverified.forget_idle(now);
        self.verified.forget_idle(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission() -> Admission {
        let d = DaemonSettings {
            allow: vec![Allow::Loopback, Allow::Connected],
            ..DaemonSettings::default()
        };
        Admission::new(
            &d,
            vec![
                "192.0.2.0/24".parse().unwrap(),
                "2001:db8::/64".parse().unwrap(),
            ],
        )
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_no_host_sends_from_are_dropped() {
        let a = admission();
        for bad in [
            "192.0.2.7:0",
            "0.0.0.0:5",
            "239.1.2.3:5",
            "255.255.255.255:5",
            "192.0.2.255:5",
            "[::]:5",
            "[ff02::1]:5",
        ] {
            assert_eq!(a.check_source(sa(bad)), Err(Drop::BadSource), "{bad}");
        }
        assert_eq!(a.check_source(sa("198.51.100.1:5")), Err(Drop::NotAllowed));
        assert_eq!(a.check_source(sa("192.0.2.7:5")), Ok(()));
        assert_eq!(a.check_source(sa("127.0.0.1:5")), Ok(()));
        assert_eq!(a.check_source(sa("[2001:db8::9]:5")), Ok(()));
        assert_eq!(
            a.check_source(sa("[::ffff:127.0.0.1]:5")),
            Ok(()),
            "mapped IPv4"
        );
    }

    #[test]
    fn one_bucket_per_address_and_one_per_ipv6_64_for_many() {
        let d = DaemonSettings {
            relay_rate: 1,
            relay_burst: 3,
            ..DaemonSettings::default()
        };
        let mut a = Admission::new(&d, Vec::new());
        let t = Instant::now();
        let v6 = |i: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0xaaaa, 0, 0, i));
        // One address has its burst.
        assert_eq!(
            (0..10).filter(|_| a.take(Bucket::Relay, v6(1), t)).count(),
            3
        );
        // Neighbours in the /64 have theirs, until the /64's share (16 bursts) is spent,
        // however many addresses one host uses.
        let neighbours: usize = (2..200u16)
            .map(|i| (0..3).filter(|_| a.take(Bucket::Relay, v6(i), t)).count())
            .sum();
        assert_eq!(3 + neighbours, 16 * 3);
        // Another /64 has its own; so does every IPv4 address.
        assert!(a.take(Bucket::Relay, "2001:db8:0:1::1".parse().unwrap(), t));
        assert!(a.take(Bucket::Relay, "192.0.2.1".parse().unwrap(), t));
        assert!(a.take(Bucket::Relay, "192.0.2.2".parse().unwrap(), t));
        // The buckets are separate per purpose.
        assert!(a.take(Bucket::Verified, "2001:db8::1".parse().unwrap(), t));
    }
}
