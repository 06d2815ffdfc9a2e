//! Who is subscribed to which room, and until when: the daemon's core state machine.
//!
//! Pure: time is passed in, and the answers say what the I/O layer must do (answer, tell a
//! subscriber, join or leave a group). Bounded by `max_subscribers` over all rooms and
//! `max_rooms` rooms with subscribers.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use mcchat_core::room::RoomName;

/// One subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sub {
    /// The name the client gave (for status).
    pub(crate) name: String,
    /// When it lapses unless renewed.
    pub(crate) expires: Instant,
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

/// Subscriptions one source may hold: enough for a host with many users and rooms, far too
/// few for one host to take the daemon's caps for itself.
pub(crate) const MAX_PER_SOURCE: usize = 64;

/// What counts as one source: an IPv4 address, or an IPv6 /64 (one host can have many
/// addresses in its prefix).
fn source_key(addr: SocketAddr) -> IpAddr {
    match addr.ip() {
        IpAddr::V4(ip) => IpAddr::V4(ip),
        IpAddr::V6(ip) => IpAddr::V6(Ipv6Addr::from(u128::from(ip) & !0xffff_ffff_ffff_ffff)),
    }
}

/// A subscription that ended on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lapsed {
    pub(crate) room: RoomName,
    pub(crate) addr: SocketAddr,
    pub(crate) name: String,
}

/// All subscriptions.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    rooms: HashMap<RoomName, HashMap<SocketAddr, Sub>>,
    per_source: HashMap<IpAddr, usize>,
    total: usize,
    max_subscribers: usize,
    max_rooms: usize,
}

impl Subscriptions {
    pub(crate) fn new(max_subscribers: usize, max_rooms: usize) -> Self {
        Self {
            rooms: HashMap::new(),
            per_source: HashMap::new(),
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

    /// Adds or renews `addr`'s subscription to `room` for `lease`.
    pub(crate) fn subscribe(
        &mut self,
        room: &RoomName,
        addr: SocketAddr,
        name: &str,
        now: Instant,
        lease: Duration,
    ) -> Subscribed {
        let expires = now + lease;
        if let Some(sub) = self.rooms.get_mut(room).and_then(|s| s.get_mut(&addr)) {
            sub.expires = expires;
            if sub.name != name {
                name.clone_into(&mut sub.name);
            }
            return Subscribed::Renewed;
        }
        if self.total >= self.max_subscribers {
            return Subscribed::TooManySubscribers;
        }
        let key = source_key(addr);
        if self.per_source.get(&key).copied().unwrap_or(0) >= MAX_PER_SOURCE {
            return Subscribed::TooManyFromSource;
        }
        let first = !self.rooms.contains_key(room);
        if first && self.rooms.len() >= self.max_rooms {
            return Subscribed::TooManyRooms;
        }
        self.rooms.entry(room.clone()).or_default().insert(
            addr,
            Sub {
                name: name.to_owned(),
                expires,
            },
        );
        self.total += 1;
        *self.per_source.entry(key).or_insert(0) += 1;
        Subscribed::Added { first }
    }

    /// Ends `addr`'s subscription to `room`; returns whether there was one.
    pub(crate) fn unsubscribe(&mut self, room: &RoomName, addr: SocketAddr) -> bool {
        let Some(subs) = self.rooms.get_mut(room) else {
            return false;
        };
        let removed = subs.remove(&addr).is_some();
        if removed {
            self.total -= 1;
            Self::release(&mut self.per_source, addr);
        }
        if subs.is_empty() {
            self.rooms.remove(room);
        }
        removed
    }

    fn release(per_source: &mut HashMap<IpAddr, usize>, addr: SocketAddr) {
        let key = source_key(addr);
        if let Some(n) = per_source.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                per_source.remove(&key);
            }
        }
    }

    /// Removes subscriptions whose lease has run out.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<Lapsed> {
        let mut lapsed = Vec::new();
        self.rooms.retain(|room, subs| {
            subs.retain(|addr, sub| {
                let keep = sub.expires > now;
                if !keep {
                    lapsed.push(Lapsed {
                        room: room.clone(),
                        addr: *addr,
                        name: std::mem::take(&mut sub.name),
                    });
                }
                keep
            });
            !subs.is_empty()
        });
        self.total -= lapsed.len();
        for l in &lapsed {
            Self::release(&mut self.per_source, l.addr);
        }
        lapsed
    }

    /// Ends every subscription to `room` (the room was removed); returns the addresses.
    pub(crate) fn close_room(&mut self, room: &RoomName) -> Vec<SocketAddr> {
        let subs = self.rooms.remove(room).unwrap_or_default();
        self.total -= subs.len();
        for addr in subs.keys() {
            Self::release(&mut self.per_source, *addr);
        }
        subs.into_keys().collect()
    }

    /// The subscribers of `room`.
    pub(crate) fn subscribers(&self, room: &RoomName) -> impl Iterator<Item = SocketAddr> + '_ {
        self.rooms
            .get(room)
            .into_iter()
            .flat_map(|s| s.keys().copied())
    }

    /// Subscriptions of `room`, for status.
    pub(crate) fn subs(&self, room: &RoomName) -> impl Iterator<Item = (&SocketAddr, &Sub)> {
        self.rooms.get(room).into_iter().flat_map(|s| s.iter())
    }

    /// Rooms that have subscribers.
    pub(crate) fn rooms(&self) -> impl Iterator<Item = &RoomName> {
        self.rooms.keys()
    }

    /// Whether `room` has subscribers.
    #[cfg(test)]
    pub(crate) fn has_room(&self, room: &RoomName) -> bool {
        self.rooms.contains_key(room)
    }

    /// Every subscription, over all rooms.
    pub(crate) fn total(&self) -> usize {
        self.total
    }

    /// Every subscriber address of every room (for telling them all something).
    pub(crate) fn all(&self) -> impl Iterator<Item = (&RoomName, SocketAddr)> {
        self.rooms
            .iter()
            .flat_map(|(room, subs)| subs.keys().map(move |a| (room, *a)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(60);

    fn room(s: &str) -> RoomName {
        RoomName::new(s).unwrap()
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
            s.subscribe(&r, addr(1), "a", t0, LEASE),
            Subscribed::Added { first: true }
        );
        assert_eq!(
            s.subscribe(&r, addr(2), "b", t0, LEASE),
            Subscribed::Added { first: false }
        );
        assert_eq!(
            s.subscribe(&r, addr(1), "a2", t0, LEASE),
            Subscribed::Renewed
        );
        assert_eq!(s.total(), 2);
        let mut subs: Vec<_> = s.subscribers(&r).collect();
        subs.sort();
        assert_eq!(subs, [addr(1), addr(2)]);
        assert!(s.unsubscribe(&r, addr(1)));
        assert!(!s.unsubscribe(&r, addr(1)));
        assert!(s.has_room(&r));
        assert!(s.unsubscribe(&r, addr(2)));
        assert!(!s.has_room(&r), "an empty room is gone");
        assert_eq!(s.total(), 0);
    }

    #[test]
    fn leases_lapse_unless_renewed() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(10, 10);
        let r = room("r");
        s.subscribe(&r, addr(1), "a", t0, LEASE);
        s.subscribe(&r, addr(2), "b", t0, LEASE);
        s.subscribe(&r, addr(2), "b", t0 + Duration::from_secs(30), LEASE);
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
        assert!(!s.has_room(&r));
    }

    #[test]
    fn limits_hold() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(3, 2);
        assert_eq!(
            s.subscribe(&room("a"), addr(1), "x", t0, LEASE),
            Subscribed::Added { first: true }
        );
        assert_eq!(
            s.subscribe(&room("b"), addr(1), "x", t0, LEASE),
            Subscribed::Added { first: true }
        );
        assert_eq!(
            s.subscribe(&room("c"), addr(1), "x", t0, LEASE),
            Subscribed::TooManyRooms
        );
        assert_eq!(
            s.subscribe(&room("a"), addr(2), "x", t0, LEASE),
            Subscribed::Added { first: false }
        );
        assert_eq!(
            s.subscribe(&room("a"), addr(3), "x", t0, LEASE),
            Subscribed::TooManySubscribers
        );
        assert_eq!(
            s.subscribe(&room("a"), addr(2), "x", t0, LEASE),
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
                s.subscribe(&room("r"), addr(port), "x", t0, LEASE),
                Subscribed::Added { .. }
            ));
        }
        assert_eq!(
            s.subscribe(&room("r"), addr(9999), "x", t0, LEASE),
            Subscribed::TooManyFromSource
        );
        // Another address in the same IPv6 /64 is the same source.
        let v6 = |last: u16, port| {
            SocketAddr::from((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last), port))
        };
        let mut s = Subscriptions::new(10_000, 10_000);
        for i in 0..MAX_PER_SOURCE as u16 {
            s.subscribe(&room("r"), v6(i, 1), "x", t0, LEASE);
        }
        assert_eq!(
            s.subscribe(&room("r"), v6(999, 1), "x", t0, LEASE),
            Subscribed::TooManyFromSource
        );
        // Leaving frees the share.
        assert!(s.unsubscribe(&room("r"), v6(0, 1)));
        assert!(matches!(
            s.subscribe(&room("r"), v6(999, 1), "x", t0, LEASE),
            Subscribed::Added { .. }
        ));
        assert_eq!(s.expire(t0 + LEASE).len(), MAX_PER_SOURCE);
        assert!(matches!(
            s.subscribe(&room("r"), v6(5, 1), "x", t0 + LEASE, LEASE),
            Subscribed::Added { .. }
        ));
    }
}
