//! Who is subscribed to which room, and until when: the daemon's core state machine.
//!
//! Pure: time is passed in, and the answers say what the I/O layer must do (answer, tell a
//! subscriber, join or leave a group). Bounded by `max_subscribers` over all rooms and
//! `max_rooms` rooms with subscribers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcchat_core::room::RoomName;

use crate::hub::UdpDest;
use crate::hub::admission::{net_key, source_key};

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

/// Subscriptions one source (an address) may hold: enough for a host with many users and
/// rooms, far too few for one host to take the daemon's caps for itself.
pub(crate) const MAX_PER_SOURCE: usize = 64;
/// Subscriptions one IPv6 /64 may hold together: the hosts of a LAN share one, and one host
/// may use any number of its addresses.
pub(crate) const MAX_PER_NET: usize = 1024;

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
    list: Option<Arc<[UdpDest]>>,
}

/// All subscriptions.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    rooms: HashMap<RoomName, RoomSubs>,
    per_source: HashMap<IpAddr, usize>,
    per_net: HashMap<IpAddr, usize>,
    total: usize,
    max_subscribers: usize,
    max_rooms: usize,
}

impl Subscriptions {
    pub(crate) fn new(max_subscribers: usize, max_rooms: usize) -> Self {
        Self {
            rooms: HashMap::new(),
            per_source: HashMap::new(),
            per_net: HashMap::new(),
            total: 0,
            max_subscribers,
            max_rooms,
        }
    }

    /// New limits (on reload); existing subscriptions stay.
    pub(crate) fn set_limits(&mut self, max_subscribers: usize, max_rooms: usize) {
        self.max_subscribers = max_subscribers;
        self.max_rooms = max_rooms;
    }

    /// Adds or renews `addr`'s subscription to `room` for `lease`; `src` is the local
    /// address the request arrived on.
    pub(crate) fn subscribe(
        &mut self,
        room: &RoomName,
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
        if self.total >= self.max_subscribers {
            return Subscribed::TooManySubscribers;
        }
        let key = source_key(addr.ip());
        let net = net_key(addr.ip());
        if self.per_source.get(&key).copied().unwrap_or(0) >= MAX_PER_SOURCE
            || net.is_some_and(|n| self.per_net.get(&n).copied().unwrap_or(0) >= MAX_PER_NET)
        {
            return Subscribed::TooManyFromSource;
        }
        let first = !self.rooms.contains_key(room);
        if first && self.rooms.len() >= self.max_rooms {
            return Subscribed::TooManyRooms;
        }
        let r = self.rooms.entry(room.clone()).or_default();
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
        if removed {
            r.list = None;
            self.total -= 1;
            Self::release(&mut self.per_source, &mut self.per_net, addr);
        }
        if r.subs.is_empty() {
            self.rooms.remove(room);
        }
        removed
    }

    fn release(
        per_source: &mut HashMap<IpAddr, usize>,
        per_net: &mut HashMap<IpAddr, usize>,
        addr: SocketAddr,
    ) {
        let keys = [
            Some((source_key(addr.ip()), &mut *per_source)),
            net_key(addr.ip()).map(|n| (n, &mut *per_net)),
        ];
        for (key, map) in keys.into_iter().flatten() {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }

    /// Removes subscriptions whose lease has run out.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Lapsed> {
        let mut lapsed = Vec::new();
        self.rooms.retain(|room, r| {
            r.subs.retain(|addr, sub| {
                let keep = sub.expires > now;
                if !keep {
                    r.list = None;
                    lapsed.push(Lapsed {
                        room: room.clone(),
                        addr: *addr,
                        name: std::mem::take(&mut sub.name),
                    });
                }
                keep
            });
            !r.subs.is_empty()
        });
        self.total -= lapsed.len();
        for l in &lapsed {
            Self::release(&mut self.per_source, &mut self.per_net, l.addr);
        }
        lapsed
    }

    /// Ends every subscription to `room` (the room was removed); returns who they were.
    pub(crate) fn close_room(&mut self, room: &RoomName) -> Vec<Member> {
        let r = self.rooms.remove(room).unwrap_or_default();
        self.total -= r.subs.len();
        for addr in r.subs.keys() {
            Self::release(&mut self.per_source, &mut self.per_net, *addr);
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
        let mut s = Subscriptions::new(10, 10);
        let r = room("r");
        assert_eq!(
            s.subscribe(&r, d(addr(1)), "a", t0, LEASE),
            Subscribed::Added { first: true }
        );
        assert_eq!(
            s.subscribe(&r, d(addr(2)), "b", t0, LEASE),
            Subscribed::Added { first: false }
        );
        assert_eq!(
            s.subscribe(&r, d(addr(1)), "a2", t0, LEASE),
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
        let mut s = Subscriptions::new(10, 10);
        let r = room("r");
        s.subscribe(&r, d(addr(1)), "a", t0, LEASE);
        s.subscribe(&r, d(addr(2)), "b", t0, LEASE);
        s.subscribe(&r, d(addr(2)), "b", t0 + Duration::from_secs(30), LEASE);
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
        let mut s = Subscriptions::new(3, 2);
        assert_eq!(
            s.subscribe(&room("a"), d(addr(1)), "x", t0, LEASE),
            Subscribed::Added { first: true }
        );
        assert_eq!(
            s.subscribe(&room("b"), d(addr(1)), "x", t0, LEASE),
            Subscribed::Added { first: true }
        );
        assert_eq!(
            s.subscribe(&room("c"), d(addr(1)), "x", t0, LEASE),
            Subscribed::TooManyRooms
        );
        assert_eq!(
            s.subscribe(&room("a"), d(addr(2)), "x", t0, LEASE),
            Subscribed::Added { first: false }
        );
        assert_eq!(
            s.subscribe(&room("a"), d(addr(3)), "x", t0, LEASE),
            Subscribed::TooManySubscribers
        );
        assert_eq!(
            s.subscribe(&room("a"), d(addr(2)), "x", t0, LEASE),
            Subscribed::Renewed,
            "renewal at the cap"
        );
        assert_eq!(s.close_room(&room("a")).len(), 2);
        assert_eq!(s.total(), 1);
    }

    #[test]
    fn one_source_cannot_take_everything() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(10_000, 10_000);
        for port in 0..MAX_PER_SOURCE as u16 {
            assert!(matches!(
                s.subscribe(&room("r"), d(addr(port)), "x", t0, LEASE),
                Subscribed::Added { .. }
            ));
        }
        assert_eq!(
            s.subscribe(&room("r"), d(addr(9999)), "x", t0, LEASE),
            Subscribed::TooManyFromSource
        );
        // The addresses of one IPv6 /64 have their own shares, and MAX_PER_NET together.
        let v6 = |i: u32, port| {
            let [hi, lo] = [(i >> 16) as u16, i as u16];
            SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, hi, lo), port))
        };
        let mut s = Subscriptions::new(10_000, 10_000);
        for i in 0..MAX_PER_NET as u32 {
            assert!(matches!(
                s.subscribe(&room("r"), d(v6(i, 1)), "x", t0, LEASE),
                Subscribed::Added { .. }
            ));
        }
        assert_eq!(
            s.subscribe(&room("r"), d(v6(99_999, 1)), "x", t0, LEASE),
            Subscribed::TooManyFromSource
        );
        let other_net = SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1), 1));
        assert!(matches!(
            s.subscribe(&room("r"), d(other_net), "x", t0, LEASE),
            Subscribed::Added { .. }
        ));
        // Leaving frees the share.
        assert!(s.unsubscribe(&room("r"), v6(0, 1)));
        assert!(matches!(
            s.subscribe(&room("r"), d(v6(99_999, 1)), "x", t0, LEASE),
            Subscribed::Added { .. }
        ));
        assert_eq!(s.expire(t0 + LEASE).len(), MAX_PER_NET + 1);
        assert!(matches!(
            s.subscribe(&room("r"), d(v6(5, 1)), "x", t0 + LEASE, LEASE),
            Subscribed::Added { .. }
        ));
    }
}
