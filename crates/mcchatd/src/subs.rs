//! Who is subscribed to which room, and until when: the daemon's core state machine.
//!
//! Pure: time is passed in, and the answers say what the I/O layer must do (answer, tell a
//! subscriber, join or leave a group). Bounded by [`Limits`]: over all rooms, per source (this
//! host counting as one), and for rooms not in the file, whose names anyone can make up.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcchat_core::room::RoomName;

use crate::config::DaemonSettings;
use crate::hub::UdpDest;
use crate::hub::admission::{NET_SHARE, net_key, source_key};

/// One subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sub {
    /// The name the client gave (for status).
    pub(crate) name: String,
    /// The local address its requests arrived on: everything for it is sent from there, or
    /// its connected socket would drop it (hosts with several addresses).
    pub(crate) src: Option<IpAddr>,
    /// When it lapses unless renewed.
    pub(crate) expires: Instant,
    /// The nonce of its latest request, echoed in everything the daemon tells it
    /// (PROTOCOL.md 4.2), so that its client can tell the daemon's answers from forgeries.
    pub(crate) nonce: Option<Box<str>>,
}

/// A subscriber to tell something (`closed`): where, and the nonce to echo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Member {
    pub(crate) dest: UdpDest,
    pub(crate) nonce: Option<Box<str>>,
}

/// The answer to a subscribe request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Subscribed {
    /// A new subscriber; `first` if the room had none.
    Added { first: bool },
    /// An existing subscription, renewed.
    Renewed,
    /// Refused: the daemon has `max_subscribers`.
    TooManySubscribers,
    /// Refused: `max_rooms` rooms already have subscribers.
    TooManyRooms,
    /// Refused: this source (an IPv4 address, an IPv6 /64) holds its share already.
    TooManyFromSource,
}

/// The caps on subscriptions (`[daemon]`, PROTOCOL.md 4.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Subscriptions over all rooms (`max_subscribers`).
    pub(crate) subscribers: usize,
    /// Rooms not in the file with subscribers at once (`max_rooms`); rooms in the file do
    /// not count, so they can always be subscribed to.
    pub(crate) adhoc_rooms: usize,
    /// Subscriptions one source holds (`max_subscriptions_per_source`); an IPv6 /64 holds
    /// [`NET_SHARE`] times that together.
    pub(crate) per_source: usize,
    /// Rooms not in the file one source holds subscriptions in
    /// (`max_adhoc_rooms_per_source`).
    pub(crate) adhoc_per_source: usize,
}

impl Limits {
    pub(crate) fn new(d: &DaemonSettings) -> Self {
        Self {
            subscribers: d.max_subscribers,
            adhoc_rooms: d.max_rooms,
            per_source: d.max_subscriptions_per_source,
            adhoc_per_source: d.max_adhoc_rooms_per_source,
        }
    }
}

/// What one source is for the caps: an IPv4 address, an IPv6 address (and its /64), and
/// this host as one, whichever loopback address it sends from (a local user has 2^24 of them).
fn cap_key(ip: IpAddr) -> IpAddr {
    let key = source_key(ip);
    if key.is_loopback() {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        key
    }
}

/// A subscription that ended on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lapsed {
    pub(crate) room: RoomName,
    pub(crate) addr: SocketAddr,
    pub(crate) name: String,
}

/// One room's subscribers, with the fan-out list built once per change (not per datagram).
#[derive(Debug, Default)]
struct RoomSubs {
    subs: HashMap<SocketAddr, Sub>,
    /// Not in the file when its first subscriber came: counted against the ad-hoc caps.
    adhoc: bool,
    list: Option<Arc<[UdpDest]>>,
}

/// All subscriptions.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    rooms: HashMap<RoomName, RoomSubs>,
    per_source: HashMap<IpAddr, usize>,
    per_net: HashMap<IpAddr, usize>,
    /// Subscriptions of a source in an ad-hoc room, and how many such rooms it is in.
    adhoc_held: HashMap<(IpAddr, RoomName), usize>,
    adhoc_per_source: HashMap<IpAddr, usize>,
    adhoc_rooms: usize,
    total: usize,
    limits: Limits,
}

impl Subscriptions {
    pub(crate) fn new(limits: Limits) -> Self {
        Self {
            rooms: HashMap::new(),
            per_source: HashMap::new(),
            per_net: HashMap::new(),
            adhoc_held: HashMap::new(),
            adhoc_per_source: HashMap::new(),
            adhoc_rooms: 0,
            total: 0,
            limits,
        }
    }

    /// New limits (on reload); existing subscriptions stay.
    pub(crate) fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Adds or renews `addr`'s subscription to `room` for `lease`; `src` is the local
    /// address the request arrived on; `adhoc` says the room is not in the file.
    pub(crate) fn subscribe(
        &mut self,
        room: &RoomName,
        adhoc: bool,
        dest: UdpDest,
        name: &str,
        now: Instant,
        lease: Duration,
    ) -> Subscribed {
        let UdpDest { addr, src } = dest;
        let expires = now + lease;
        if let Some(r) = self.rooms.get_mut(room)
            && let Some(sub) = r.subs.get_mut(&addr)
        {
            sub.expires = expires;
            if sub.name != name {
                name.clone_into(&mut sub.name);
            }
            if sub.src != src {
                sub.src = src;
                r.list = None;
            }
            return Subscribed::Renewed;
        }
        let limits = self.limits;
        if self.total >= limits.subscribers {
            return Subscribed::TooManySubscribers;
        }
        let key = cap_key(addr.ip());
        let net = net_key(addr.ip());
        let per_net = limits.per_source.saturating_mul(NET_SHARE as usize);
        if self.per_source.get(&key).copied().unwrap_or(0) >= limits.per_source
            || net.is_some_and(|n| self.per_net.get(&n).copied().unwrap_or(0) >= per_net)
        {
            return Subscribed::TooManyFromSource;
        }
        let existing = self.rooms.get(room).map(|r| r.adhoc);
        let first = existing.is_none();
        let adhoc_room = existing.unwrap_or(adhoc);
        let adhoc_key = (key, room.clone());
        if adhoc_room {
            if first && self.adhoc_rooms >= limits.adhoc_rooms {
                return Subscribed::TooManyRooms;
            }
            if !self.adhoc_held.contains_key(&adhoc_key)
                && self.adhoc_per_source.get(&key).copied().unwrap_or(0) >= limits.adhoc_per_source
            {
                return Subscribed::TooManyFromSource;
            }
        }
        let r = self.rooms.entry(room.clone()).or_insert_with(|| RoomSubs {
            adhoc: adhoc_room,
            ..RoomSubs::default()
        });
        r.list = None;
        r.subs.insert(
            addr,
            Sub {
                name: name.to_owned(),
                src,
                expires,
                nonce: None,
            },
        );
        self.total += 1;
        *self.per_source.entry(key).or_insert(0) += 1;
        if let Some(n) = net {
            *self.per_net.entry(n).or_insert(0) += 1;
        }
        if adhoc_room {
            if first {
                self.adhoc_rooms += 1;
            }
            let held = self.adhoc_held.entry(adhoc_key).or_insert(0);
            if *held == 0 {
                *self.adhoc_per_source.entry(key).or_insert(0) += 1;
            }
            *held += 1;
        }
        Subscribed::Added { first }
    }

    /// Notes the nonce of `addr`'s latest request for `room` (after [`subscribe`]).
    ///
    /// [`subscribe`]: Self::subscribe
    pub(crate) fn set_nonce(&mut self, room: &RoomName, addr: SocketAddr, nonce: Option<&str>) {
        if let Some(sub) = self.rooms.get_mut(room).and_then(|r| r.subs.get_mut(&addr))
            && sub.nonce.as_deref() != nonce
        {
            sub.nonce = nonce.map(Box::from);
        }
    }

    /// Ends `addr`'s subscription to `room`; returns whether there was one.
    pub(crate) fn unsubscribe(&mut self, room: &RoomName, addr: SocketAddr) -> bool {
        let Some(r) = self.rooms.get_mut(room) else {
            return false;
        };
        let removed = r.subs.remove(&addr).is_some();
        let (adhoc, empty) = (r.adhoc, r.subs.is_empty());
        if removed {
            r.list = None;
            self.release(room, adhoc, addr);
        }
        if empty {
            self.rooms.remove(room);
            self.adhoc_rooms -= usize::from(adhoc);
        }
        removed
    }

    /// Gives back what one subscription of `addr` in `room` held of the caps.
    fn release(&mut self, room: &RoomName, adhoc: bool, addr: SocketAddr) {
        fn down<K: Eq + std::hash::Hash>(map: &mut HashMap<K, usize>, key: K) -> bool {
            let Some(n) = map.get_mut(&key) else {
                return false;
            };
            *n -= 1;
            if *n == 0 {
                map.remove(&key);
                return true;
            }
            false
        }
        self.total -= 1;
        let key = cap_key(addr.ip());
        down(&mut self.per_source, key);
        if let Some(n) = net_key(addr.ip()) {
            down(&mut self.per_net, n);
        }
        if adhoc && down(&mut self.adhoc_held, (key, room.clone())) {
            down(&mut self.adhoc_per_source, key);
        }
    }

    /// Removes subscriptions whose lease has run out.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Lapsed> {
        let mut lapsed = Vec::new();
        let mut released = Vec::new();
        let mut adhoc_gone = 0;
        self.rooms.retain(|room, r| {
            r.subs.retain(|addr, sub| {
                let keep = sub.expires > now;
                if !keep {
                    r.list = None;
                    released.push((room.clone(), r.adhoc, *addr));
                    lapsed.push(Lapsed {
                        room: room.clone(),
                        addr: *addr,
                        name: std::mem::take(&mut sub.name),
                    });
                }
                keep
            });
            let keep = !r.subs.is_empty();
            adhoc_gone += usize::from(!keep && r.adhoc);
            keep
        });
        self.adhoc_rooms -= adhoc_gone;
        for (room, adhoc, addr) in released {
            self.release(&room, adhoc, addr);
        }
        lapsed
    }

    /// Ends every subscription to `room` (the room was removed); returns who they were.
    pub(crate) fn close_room(&mut self, room: &RoomName) -> Vec<Member> {
        let r = self.rooms.remove(room).unwrap_or_default();
        if !r.subs.is_empty() {
            self.adhoc_rooms -= usize::from(r.adhoc);
        }
        for addr in r.subs.keys() {
            self.release(room, r.adhoc, *addr);
        }
        r.subs
            .into_iter()
            .map(|(addr, sub)| Member {
                dest: UdpDest { addr, src: sub.src },
                nonce: sub.nonce,
            })
            .collect()
    }

    /// The subscribers of `room`, as one shared list (built once per change, so a datagram
    /// to a room of 10,000 costs no copy of it).
    pub(crate) fn fanout(&mut self, room: &RoomName) -> Option<Arc<[UdpDest]>> {
        let r = self.rooms.get_mut(room)?;
        let list = r.list.get_or_insert_with(|| {
            r.subs
                .iter()
                .map(|(addr, sub)| UdpDest {
                    addr: *addr,
                    src: sub.src,
                })
                .collect()
        });
        Some(Arc::clone(list))
    }

    /// Whether `addr` subscribes to `room`.
    pub(crate) fn is_subscribed(&self, room: &RoomName, addr: SocketAddr) -> bool {
        self.rooms
            .get(room)
            .is_some_and(|r| r.subs.contains_key(&addr))
    }

    /// Subscriptions of `room`, for status.
    pub(crate) fn subs(&self, room: &RoomName) -> impl Iterator<Item = (&SocketAddr, &Sub)> {
        self.rooms.get(room).into_iter().flat_map(|r| r.subs.iter())
    }

    /// Rooms that have subscribers.
    pub(crate) fn rooms(&self) -> impl Iterator<Item = &RoomName> {
        self.rooms.keys()
    }

    /// Whether `room` has subscribers.
    pub(crate) fn has_subscribers(&self, room: &RoomName) -> bool {
        self.rooms.contains_key(room)
    }

    /// Every subscription, over all rooms.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Every subscriber of every room (for telling them all something).
    pub(crate) fn all(&self) -> impl Iterator<Item = (&RoomName, Member)> {
        self.rooms.iter().flat_map(|(room, r)| {
            r.subs.iter().map(move |(addr, sub)| {
                (
                    room,
                    Member {
                        dest: UdpDest {
                            addr: *addr,
                            src: sub.src,
                        },
                        nonce: sub.nonce.clone(),
                    },
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    const LEASE: Duration = Duration::from_secs(60);
    const PER_SOURCE: usize = 64;
    const PER_NET: usize = PER_SOURCE * NET_SHARE as usize;

    /// `addr` subscribes to `r` (ad-hoc or not) at `at`.
    fn sub(
        s: &mut Subscriptions,
        r: &RoomName,
        adhoc: bool,
        addr: SocketAddr,
        at: Instant,
    ) -> Subscribed {
        s.subscribe(r, adhoc, d(addr), "x", at, LEASE)
    }

    fn limits(subscribers: usize, adhoc_rooms: usize) -> Limits {
        Limits {
            subscribers,
            adhoc_rooms,
            per_source: PER_SOURCE,
            adhoc_per_source: 16,
        }
    }

    fn room(s: &str) -> RoomName {
        RoomName::new(s).unwrap()
    }

    fn d(addr: SocketAddr) -> UdpDest {
        UdpDest { addr, src: None }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 1], port))
    }

    #[test]
    fn first_subscriber_and_renewal() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(limits(10, 10));
        let r = room("r");
        assert_eq!(
            s.subscribe(&r, true, d(addr(1)), "a", t0, LEASE),
            Subscribed::Added { first: true }
        );
        assert_eq!(
            s.subscribe(&r, true, d(addr(2)), "b", t0, LEASE),
            Subscribed::Added { first: false }
        );
        assert_eq!(
            s.subscribe(&r, true, d(addr(1)), "a2", t0, LEASE),
            Subscribed::Renewed
        );
        assert_eq!(s.total(), 2);
        let mut subs: Vec<_> = s.fanout(&r).unwrap().iter().map(|d| d.addr).collect();
        subs.sort();
        assert_eq!(subs, [addr(1), addr(2)]);
        assert!(s.unsubscribe(&r, addr(1)));
        assert!(!s.unsubscribe(&r, addr(1)));
        assert!(s.has_subscribers(&r));
        assert!(s.unsubscribe(&r, addr(2)));
        assert!(!s.has_subscribers(&r), "an empty room is gone");
        assert_eq!(s.total(), 0);
    }

    #[test]
    fn leases_lapse_unless_renewed() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(limits(10, 10));
        let r = room("r");
        s.subscribe(&r, true, d(addr(1)), "a", t0, LEASE);
        s.subscribe(&r, true, d(addr(2)), "b", t0, LEASE);
        s.subscribe(
            &r,
            true,
            d(addr(2)),
            "b",
            t0 + Duration::from_secs(30),
            LEASE,
        );
        assert!(s.expire(t0 + Duration::from_secs(59)).is_empty());
        let lapsed = s.expire(t0 + Duration::from_secs(60));
        assert_eq!(
            lapsed,
            [Lapsed {
                room: r.clone(),
                addr: addr(1),
                name: "a".into()
            }]
        );
        assert_eq!(s.total(), 1);
        assert_eq!(s.expire(t0 + Duration::from_secs(90)).len(), 1);
        assert!(!s.has_subscribers(&r));
    }

    #[test]
    fn limits_hold() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(limits(3, 2));
        assert_eq!(
            s.subscribe(&room("a"), true, d(addr(1)), "x", t0, LEASE),
            Subscribed::Added { first: true }
        );
        assert_eq!(
            s.subscribe(&room("b"), true, d(addr(1)), "x", t0, LEASE),
            Subscribed::Added { first: true }
        );
        assert_eq!(
            s.subscribe(&room("c"), true, d(addr(1)), "x", t0, LEASE),
            Subscribed::TooManyRooms
        );
        assert_eq!(
            s.subscribe(&room("a"), true, d(addr(2)), "x", t0, LEASE),
            Subscribed::Added { first: false }
        );
        assert_eq!(
            s.subscribe(&room("a"), true, d(addr(3)), "x", t0, LEASE),
            Subscribed::TooManySubscribers
        );
        assert_eq!(
            s.subscribe(&room("a"), true, d(addr(2)), "x", t0, LEASE),
            Subscribed::Renewed,
            "renewal at the cap"
        );
        assert_eq!(s.close_room(&room("a")).len(), 2);
        assert_eq!(s.total(), 1);
    }

    #[test]
    fn one_source_cannot_take_everything() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(limits(10_000, 10_000));
        for port in 0..PER_SOURCE as u16 {
            assert!(matches!(
                s.subscribe(&room("r"), true, d(addr(port)), "x", t0, LEASE),
                Subscribed::Added { .. }
            ));
        }
        assert_eq!(
            s.subscribe(&room("r"), true, d(addr(9999)), "x", t0, LEASE),
            Subscribed::TooManyFromSource
        );
        // The addresses of one IPv6 /64 have their own shares, and PER_NET together.
        let v6 = |i: u32, port| {
            let [hi, lo] = [(i >> 16) as u16, i as u16];
            SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, hi, lo), port))
        };
        let mut s = Subscriptions::new(limits(10_000, 10_000));
        for i in 0..PER_NET as u32 {
            assert!(matches!(
                s.subscribe(&room("r"), true, d(v6(i, 1)), "x", t0, LEASE),
                Subscribed::Added { .. }
            ));
        }
        assert_eq!(
            s.subscribe(&room("r"), true, d(v6(99_999, 1)), "x", t0, LEASE),
            Subscribed::TooManyFromSource
        );
        let other_net = SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1), 1));
        assert!(matches!(
            s.subscribe(&room("r"), true, d(other_net), "x", t0, LEASE),
            Subscribed::Added { .. }
        ));
        // Leaving frees the share.
        assert!(s.unsubscribe(&room("r"), v6(0, 1)));
        assert!(matches!(
            s.subscribe(&room("r"), true, d(v6(99_999, 1)), "x", t0, LEASE),
            Subscribed::Added { .. }
        ));
        assert_eq!(s.expire(t0 + LEASE).len(), PER_NET + 1);
        assert!(matches!(
            s.subscribe(&room("r"), true, d(v6(5, 1)), "x", t0 + LEASE, LEASE),
            Subscribed::Added { .. }
        ));
    }

    #[test]
    fn rooms_in_the_file_can_always_be_subscribed() {
        let t0 = Instant::now();
        // One ad-hoc room allowed, and it is taken.
        let mut s = Subscriptions::new(limits(100, 1));
        let added = |o| matches!(o, Subscribed::Added { .. });
        assert!(added(sub(&mut s, &room("made-up"), true, addr(1), t0)));
        assert_eq!(
            sub(&mut s, &room("other"), true, addr(2), t0),
            Subscribed::TooManyRooms
        );
        // Rooms in the file do not count against max_rooms.
        for (i, name) in ["room1", "room2", "room3"].into_iter().enumerate() {
            assert!(added(sub(
                &mut s,
                &room(name),
                false,
                addr(10 + i as u16),
                t0
            )));
        }
        // Their going frees nothing of the ad-hoc cap; the ad-hoc room's going does.
        assert_eq!(s.close_room(&room("room1")).len(), 1);
        assert_eq!(
            sub(&mut s, &room("other"), true, addr(2), t0),
            Subscribed::TooManyRooms
        );
        assert!(s.unsubscribe(&room("made-up"), addr(1)));
        assert!(added(sub(&mut s, &room("other"), true, addr(2), t0)));
        // Lapsing frees it too.
        assert_eq!(s.expire(t0 + LEASE).len(), 3);
        assert!(added(sub(
            &mut s,
            &room("third"),
            true,
            addr(3),
            t0 + LEASE
        )));
    }

    #[test]
    fn ad_hoc_rooms_are_capped_per_source() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(limits(10_000, 10_000));
        let added = |o| matches!(o, Subscribed::Added { .. });
        for i in 0..16 {
            let r = room(&format!("adhoc{i}"));
            // Two subscriptions of one source in one room count as one room.
            assert!(added(sub(&mut s, &r, true, addr(2 * i), t0)));
            assert!(added(sub(&mut s, &r, true, addr(2 * i + 1), t0)));
        }
        let seventeenth = room("adhoc16");
        assert_eq!(
            sub(&mut s, &seventeenth, true, addr(100), t0),
            Subscribed::TooManyFromSource
        );
        // Other sources have their own share, and this one can still join its rooms, and
        // rooms in the file.
        let other = SocketAddr::from(([198, 51, 100, 2], 1));
        assert!(added(sub(&mut s, &seventeenth, true, other, t0)));
        assert!(added(sub(&mut s, &room("adhoc3"), true, addr(200), t0)));
        assert!(added(sub(&mut s, &room("room1"), false, addr(201), t0)));
        // A room is given back only when the source's last subscription in it goes.
        assert!(s.unsubscribe(&room("adhoc0"), addr(0)));
        assert_eq!(
            sub(&mut s, &seventeenth, true, addr(100), t0),
            Subscribed::TooManyFromSource
        );
        assert!(s.unsubscribe(&room("adhoc0"), addr(1)));
        assert!(added(sub(&mut s, &seventeenth, true, addr(100), t0)));
    }

    #[test]
    fn this_host_counts_as_one_source_whatever_loopback_address_it_uses() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(limits(10_000, 10_000));
        let local = |i: u32| SocketAddr::from((Ipv4Addr::from(0x7f00_0000 + i), 40_000));
        for i in 0..PER_SOURCE as u32 {
            assert!(matches!(
                sub(&mut s, &room("r"), false, local(i + 1), t0),
                Subscribed::Added { .. }
            ));
        }
        assert_eq!(
            sub(&mut s, &room("r"), false, local(9999), t0),
            Subscribed::TooManyFromSource
        );
        let v6_local = SocketAddr::from((Ipv6Addr::LOCALHOST, 1));
        assert_eq!(
            sub(&mut s, &room("r"), false, v6_local, t0),
            Subscribed::TooManyFromSource
        );
        assert_eq!(s.total(), PER_SOURCE);
    }
}
