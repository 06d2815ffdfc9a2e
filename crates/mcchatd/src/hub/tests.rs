//! Hub unit tests: no sockets, injected time. Each names the rule of docs/PROTOCOL.md it pins.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use mcchat_core::peer::Now;
use mcchat_core::room::RoomName;
use mcchat_core::wire::{self, Kind};

use super::*;
use crate::test_support::settings;

pub(super) const ROOMS: &str = r#"
[daemon]
allow = ["loopback", "connected"]
lease_secs = 60

[rooms.room1]
group = "239.255.77.1"
port = 5555

[rooms.history]
group = "239.255.77.2"
port = 5556
history_count = 100

[rooms.kept]
group = "239.255.77.3"
port = 5557
keep = true
"#;

/// The daemon's host address that clients reach it on (one of two).
pub(super) const LOCAL_A: &str = "192.0.2.1";
const LOCAL_B: &str = "192.0.2.2";
/// The relay id the tests' hub uses.
const ID: u32 = 0x0a0b_0c0d;

pub(super) fn sa(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// The datagrams `out` sends to groups, as text.
pub(super) fn to_group_text(out: &[Output]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToGroup { data, .. } => Some(String::from_utf8_lossy(data).into_owned()),
            _ => None,
        })
        .collect()
}

pub(super) fn room(s: &str) -> RoomName {
    RoomName::new(s).expect("room")
}

/// A hub on injected time, and what it said.
pub(super) struct T {
    pub(super) hub: Hub,
    t0: Instant,
    unix0: u64,
    now: Duration,
}

impl T {
    pub(super) fn new(text: &str, recording: bool) -> Self {
        let t0 = Instant::now();
        let unix0 = 1_800_000_000_000;
        let seed = Seed {
            cookie_key: [7; 64],
            relay_id: ID,
            web: 11,
            epoch: 5,
        };
        let journal = recording.then_some(crate::history::Journal {
            epoch: 5,
            last_id: 0,
        });
        let hub = Hub::new(
            settings(text),
            journal,
            vec!["192.0.2.0/24".parse().expect("net")],
            seed,
            Now {
                mono: t0,
                unix_ms: unix0,
            },
        );
        let mut t = Self {
            hub,
            t0,
            unix0,
            now: Duration::ZERO,
        };
        // The groups kept joined from the start (keep, history).
        let joins = t.drain();
        t.finish_joins(&joins);
        t
    }

    pub(super) fn at(&mut self, d: Duration) -> Now {
        self.now = d;
        self.now()
    }

    pub(super) fn now(&self) -> Now {
        Now {
            mono: self.t0 + self.now,
            unix_ms: self.unix0 + u64::try_from(self.now.as_millis()).expect("ms"),
        }
    }

    /// What the hub put out; a room view's request for history is answered at once, with
    /// nothing (as a fresh database would), so what it held comes out too.
    pub(super) fn drain(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some(o) = self.hub.poll_output() {
            if let Output::WebPreload { room } = &o {
                let now = self.now();
                let preload = web::WebInput::Preload {
                    room: room.clone(),
                    records: Vec::new(),
                };
                self.hub.on_web(0, preload, now);
            }
            out.push(o);
        }
        out
    }

    /// A datagram at the relay port from `from`, sent to `local`.
    pub(super) fn unicast(&mut self, from: &str, local: &str, data: &[u8]) -> Vec<Output> {
        let now = self.now();
        self.hub.on_input(
            Port::Relay {
                local: Some(ip(local)),
                unicast: true,
            },
            sa(from),
            data,
            now,
        );
        self.drain()
    }

    pub(super) fn group(&mut self, name: &str, from: &str, data: &[u8]) -> Vec<Output> {
        let now = self.now();
        let r = room(name);
        let generation = self.hub.groups.generation(&r).expect("joined");
        self.hub.on_input(
            Port::Group {
                room: r,
                generation,
            },
            sa(from),
            data,
            now,
        );
        self.drain()
    }

    pub(super) fn poll(&mut self, d: Duration) -> Vec<Output> {
        let now = self.at(d);
        self.hub.poll(now);
        self.drain()
    }

    /// Subscribes `from` to `name` the way a client does (challenge, then sub with the
    /// cookie); returns the cookie from `subok`.
    pub(super) fn subscribe(&mut self, name: &str, from: &str, local: &str) -> String {
        let sub = request(Kind::Subscribe, name, None);
        let out = self.unicast(from, local, sub.as_bytes());
        let cookie = reply_tag(&out, Kind::Challenge, "cookie").expect("a challenge");
        let sub = request(Kind::Subscribe, name, Some(&cookie));
        let out = self.unicast(from, local, sub.as_bytes());
        self.finish_joins(&out);
        reply_tag(&out, Kind::Subscribed, "cookie").expect("subok with a cookie")
    }

    /// Reports every join in `out` as done.
    pub(super) fn finish_joins(&mut self, out: &[Output]) {
        for o in out {
            if let Output::Join {
                room, generation, ..
            } = o
            {
                self.hub.join_done(room, *generation, Ok(()));
            }
        }
    }

    pub(super) fn counter(&self, reason: &str) -> u64 {
        self.hub.counters.dropped.get(reason).copied().unwrap_or(0)
    }
}

fn request(kind: Kind, room: &str, cookie: Option<&str>) -> String {
    let mut out = String::new();
    wire::relay_request(
        kind,
        room,
        "alice",
        cookie,
        None,
        wire::MIN_RELAY_REQUEST,
        &mut out,
    )
    .expect("request");
    out
}

fn chat(room: &str, text: &str, seq: u64) -> String {
    format!("@id=00000000000000aa;seq={seq};ts=1 {room}|bob|{text}")
}

/// The value of `key` in the first `ToUdp` datagram of `kind`.
fn reply_tag(out: &[Output], kind: Kind, key: &str) -> Option<String> {
    out.iter().find_map(|o| match o {
        Output::ToUdp { data, .. } => {
            let f = wire::decode(data).ok()?;
            (f.meta.kind == kind).then(|| f.tags.get(key).map(|v| v.into_owned()))?
        }
        _ => None,
    })
}

fn to_group(out: &[Output]) -> Vec<Bytes> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToGroup { data, .. } => Some(data.clone()),
            _ => None,
        })
        .collect()
}

/// Every unicast destination of `out`, with the datagrams.
fn to_udp(out: &[Output]) -> Vec<(UdpDest, Bytes)> {
    let mut v = Vec::new();
    for o in out {
        match o {
            Output::ToUdp { to, data } => v.push((*to, data.clone())),
            Output::FanOut { to, except, data } => v.extend(
                to.iter()
                    .filter(|d| Some(d.addr) != *except)
                    .map(|d| (*d, data.clone())),
            ),
            _ => {}
        }
    }
    v
}

fn kinds(out: &[(UdpDest, Bytes)]) -> Vec<Kind> {
    out.iter()
        .map(|(_, d)| wire::decode(d).expect("decodes").meta.kind)
        .collect()
}

#[test]
fn a_unicast_message_goes_to_the_group_tagged_and_to_the_other_subscribers() {
    let mut t = T::new(ROOMS, false);
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    t.subscribe("room1", "192.0.2.11:4000", LOCAL_B);
    let msg = chat("room1", "hi", 1);
    let out = t.unicast("192.0.2.10:4000", LOCAL_A, msg.as_bytes());
    let group = to_group(&out);
    assert_eq!(group.len(), 1);
    let f = wire::decode(&group[0]).unwrap();
    assert_eq!(f.tags.get(RELAY_TAG).as_deref(), Some("0a0b0c0d"));
    assert_eq!(
        tags::end_to_end(&group[0]).as_ref(),
        msg.as_bytes(),
        "the sender's bytes are unchanged"
    );
    let udp = to_udp(&out);
    assert_eq!(udp.len(), 1, "not back to its source");
    assert_eq!(udp[0].0.addr, sa("192.0.2.11:4000"));
    assert_eq!(
        udp[0].0.src,
        Some(ip(LOCAL_B)),
        "from the address it subscribed on"
    );
    assert_eq!(
        udp[0].1.as_ref(),
        msg.as_bytes(),
        "subscribers get it as sent"
    );
}

#[test]
fn a_group_message_goes_to_subscribers_only() {
    let mut t = T::new(ROOMS, false);
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    let msg = chat("room1", "hi", 1);
    let out = t.group("room1", "192.0.2.50:5555", msg.as_bytes());
    assert!(to_group(&out).is_empty(), "never from a group to a group");
    let udp = to_udp(&out);
    assert_eq!(udp.len(), 1);
    assert_eq!(udp[0].1.as_ref(), msg.as_bytes());
}

#[test]
fn own_forwards_are_recognised_by_the_relay_tag_not_by_address() {
    let mut t = T::new(ROOMS, false);
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        chat("room1", "hi", 1).as_bytes(),
    );
    let forwarded = to_group(&out).remove(0);
    // Heard back through multicast loopback, from the relay socket's own address.
    let out = t.group("room1", "192.0.2.1:5554", &forwarded);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(t.hub.counters.own_forwards_ignored, 1);
    // Another daemon's forward is an ordinary group datagram.
    let other = format!("@relay=99999999;{}", &chat("room1", "other", 1)[1..]);
    let out = t.group("room1", "192.0.2.9:5554", other.as_bytes());
    assert_eq!(to_udp(&out).len(), 1);
    // A peer on this host, in a room whose port is the relay port, sends from this host's
    // address and the relay port: it is relayed like anyone.
    let out = t.group(
        "room1",
        "192.0.2.1:5554",
        chat("room1", "local peer", 2).as_bytes(),
    );
    assert_eq!(
        to_udp(&out).len(),
        1,
        "a local peer is not mistaken for the daemon"
    );
    // A daemon's forward at the relay port (another daemon's, or ours): a loop; dropped.
    let out = t.unicast("192.0.2.10:4000", LOCAL_A, other.as_bytes());
    assert!(out.is_empty());
    // Too long to take the tag: it could not go to the group without looping, so it goes
    // nowhere rather than to some members only.
    let long = format!("room1|bob|{}", "x".repeat(1190 - 10));
    let out = t.unicast("192.0.2.11:4000", LOCAL_A, long.as_bytes());
    assert!(out.is_empty());
    assert_eq!(t.counter("no_room_for_relay_tag"), 1);
    // At the limit it fits: 1184 bytes bare, 1200 with the tag.
    let fits = format!("room1|bob|{}", "x".repeat(1184 - 10));
    let out = t.unicast("192.0.2.11:4000", LOCAL_A, fits.as_bytes());
    assert_eq!(to_group(&out)[0].len(), 1200);
    let out = t.unicast("192.0.2.10:4000", LOCAL_A, &forwarded);
    assert!(out.is_empty());
    assert_eq!(t.counter("relay_tagged"), 2);
    // What the relay socket hears that was sent to a group or a broadcast address is not
    // for the daemon (a room on the relay port, a broadcast).
    let now = t.now();
    let msg = chat("room1", "to a group", 3);
    for (local, unicast) in [(None, false), (Some(ip("192.0.2.255")), true)] {
        t.hub.on_input(
            Port::Relay { local, unicast },
            sa("192.0.2.10:4000"),
            msg.as_bytes(),
            now,
        );
    }
    assert!(t.drain().is_empty());
    assert_eq!(t.counter("not_unicast"), 2);
}

#[test]
fn admission_drops_bad_sources_and_networks_not_allowed() {
    let mut t = T::new(ROOMS, false);
    let msg = chat("room1", "hi", 1);
    for from in [
        "0.0.0.0:5",
        "192.0.2.7:0",
        "239.1.1.1:5",
        "255.255.255.255:5",
        "192.0.2.255:5",
    ] {
        assert!(
            t.unicast(from, LOCAL_A, msg.as_bytes()).is_empty(),
            "{from}"
        );
    }
    assert_eq!(t.counter("bad_source"), 5);
    assert!(
        t.unicast("198.51.100.1:5", LOCAL_A, msg.as_bytes())
            .is_empty()
    );
    assert_eq!(t.counter("not_allowed"), 1);
    assert!(
        !t.unicast("127.0.0.1:5", "127.0.0.1", msg.as_bytes())
            .is_empty()
    );
}

#[test]
fn the_challenge_is_never_larger_than_the_request() {
    let mut t = T::new(ROOMS, false);
    // A bare, unpadded sub: shorter than the cookie answer.
    let out = t.unicast("192.0.2.10:4000", LOCAL_A, b"@kind=sub room1|a|");
    assert!(out.is_empty());
    assert_eq!(t.counter("request_too_small"), 1);
    for len in [120, 256, 600] {
        let sub = format!("@kind=sub;pad={} room1|a|", "x".repeat(len));
        let out = t.unicast("192.0.2.10:4000", LOCAL_A, sub.as_bytes());
        for (to, data) in to_udp(&out) {
            assert!(data.len() <= sub.len(), "{} > {}", data.len(), sub.len());
            assert_eq!(to.src, Some(ip(LOCAL_A)));
        }
    }
}

#[test]
fn subok_carries_a_fresh_cookie_and_renewals_stay_verified_past_the_first_cookie() {
    let mut t = T::new(ROOMS, false);
    let victim = "192.0.2.10:4000";
    let mut cookie = t.subscribe("room1", victim, LOCAL_A);
    let spoof = request(Kind::Subscribe, "room1", None);
    for s in (20..=130).step_by(20).chain([130]) {
        t.at(Duration::from_secs(s));
        // A spoofer floods subscribes in the victim's name: the unverified bucket drains.
        for _ in 0..50 {
            t.unicast(victim, LOCAL_A, spoof.as_bytes());
        }
        let renew = request(Kind::Subscribe, "room1", Some(&cookie));
        let out = t.unicast(victim, LOCAL_A, renew.as_bytes());
        let fresh = reply_tag(&out, Kind::Subscribed, "cookie")
            .unwrap_or_else(|| panic!("renewal at {s} s answered with subok: {out:?}"));
        assert_ne!(fresh, cookie, "a fresh cookie at {s} s");
        cookie = fresh;
    }
    assert!(t.counter("rate_limited") > 0, "the spoofer was limited");
    // t = 135 s: unsub with the cookie from the last subok works.
    t.at(Duration::from_secs(135));
    let unsub = request(Kind::Unsubscribe, "room1", Some(&cookie));
    t.unicast(victim, LOCAL_A, unsub.as_bytes());
    assert_eq!(t.hub.counters.unsubscribed, 1);
    assert_eq!(t.hub.subs.total(), 0);
}

#[test]
fn one_cookie_serves_every_room_of_a_source() {
    let mut t = T::new(ROOMS, false);
    let cookie = t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    let sub = request(Kind::Subscribe, "kept", Some(&cookie));
    let out = t.unicast("192.0.2.10:4000", LOCAL_A, sub.as_bytes());
    assert!(reply_tag(&out, Kind::Subscribed, "lease").is_some());
    // But not another port of the same host.
    let out = t.unicast("192.0.2.10:4001", LOCAL_A, sub.as_bytes());
    assert!(reply_tag(&out, Kind::Challenge, "cookie").is_some());
}

#[test]
fn unsub_without_a_valid_cookie_is_dropped() {
    let mut t = T::new(ROOMS, false);
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    let unsub = request(Kind::Unsubscribe, "room1", Some("1.00"));
    t.unicast("192.0.2.10:4000", LOCAL_A, unsub.as_bytes());
    assert_eq!(t.counter("bad_cookie"), 1);
    assert_eq!(t.hub.subs.total(), 1);
}

#[test]
fn leases_lapse_and_the_group_is_left() {
    let mut t = T::new(ROOMS, false);
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    assert!(t.hub.groups.is_joined(&room("room1")));
    let out = t.poll(Duration::from_secs(59));
    assert!(!out.iter().any(|o| matches!(o, Output::Leave { .. })));
    let out = t.poll(Duration::from_secs(61));
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Leave { room: r, .. } if r.as_str() == "room1"))
    );
    assert_eq!(t.hub.counters.expired, 1);
    assert!(
        t.hub.groups.is_joined(&room("kept")),
        "keep rooms stay joined"
    );
}

#[test]
fn caps_refuse_with_closed() {
    let text = format!("{ROOMS}\n").replace(
        "lease_secs = 60",
        "lease_secs = 60\nmax_subscribers = 3\nmax_rooms = 1",
    );
    let mut t = T::new(&text, false);
    t.subscribe("made-up", "192.0.2.10:4000", LOCAL_A);
    // A second room not in the file: over max_rooms.
    let c = t.subscribe_expect_closed("made-up-too", "192.0.2.11:4000");
    assert_eq!(c, "too_many_rooms");
    // Rooms in the file are not counted against it.
    t.subscribe("kept", "192.0.2.11:4000", LOCAL_A);
    t.subscribe("room1", "192.0.2.12:4000", LOCAL_A);
    let c = t.subscribe_expect_closed("room1", "192.0.2.13:4000");
    assert_eq!(c, "too_many_subscribers");
}

#[test]
fn per_source_cap_counts_one_address_whatever_its_ports() {
    let mut t = T::new(
        &ROOMS.replace("\"connected\"]", "\"connected\", \"2001:db8::/32\"]"),
        false,
    );
    let cap = t.hub.settings.daemon.max_subscriptions_per_source;
    for i in 0..cap {
        // Within the subscribe bucket's rate.
        t.at(Duration::from_millis(200 * i as u64));
        t.subscribe("room1", &format!("[2001:db8::1]:{}", 4000 + i), LOCAL_A);
    }
    t.at(Duration::from_secs(14));
    let c = t.subscribe_expect_closed("room1", "[2001:db8::1]:9999");
    assert_eq!(c, "too_many_from_source");
    // A neighbour in the same /64 is another source.
    t.subscribe("room1", "[2001:db8::2]:4000", LOCAL_A);
}

/// The first join in `out`: its room and generation.
fn first_join(out: &[Output]) -> (RoomName, u64) {
    out.iter()
        .find_map(|o| match o {
            Output::Join {
                room, generation, ..
            } => Some((room.clone(), *generation)),
            _ => None,
        })
        .expect("a join")
}

impl T {
    /// Subscribes `from` to `name` without reporting the join done: the subscribe request
    /// with the cookie (to send again), and what its answer brought.
    fn subscribe_unjoined(&mut self, name: &str, from: &str) -> (String, Vec<Output>) {
        let sub = request(Kind::Subscribe, name, None);
        let out = self.unicast(from, LOCAL_A, sub.as_bytes());
        let cookie = reply_tag(&out, Kind::Challenge, "cookie").expect("a challenge");
        let sub = request(Kind::Subscribe, name, Some(&cookie));
        let out = self.unicast(from, LOCAL_A, sub.as_bytes());
        (sub, out)
    }

    /// A subscription the hub refuses: the `closed` text.
    fn subscribe_expect_closed(&mut self, name: &str, from: &str) -> String {
        let sub = request(Kind::Subscribe, name, None);
        let out = self.unicast(from, LOCAL_A, sub.as_bytes());
        let cookie = reply_tag(&out, Kind::Challenge, "cookie").expect("a challenge");
        let sub = request(Kind::Subscribe, name, Some(&cookie));
        let out = self.unicast(from, LOCAL_A, sub.as_bytes());
        let closed: Vec<_> = to_udp(&out)
            .into_iter()
            .filter_map(|(_, d)| {
                let f = wire::decode(&d).ok()?;
                (f.meta.kind == Kind::Closed).then(|| f.text.to_owned())
            })
            .collect();
        assert_eq!(closed.len(), 1, "{out:?}");
        closed[0].clone()
    }
}

#[test]
fn a_failed_join_closes_the_room_for_its_subscribers() {
    let mut t = T::new(ROOMS, false);
    let (_, out) = t.subscribe_unjoined("room1", "192.0.2.10:4000");
    let (r, generation) = first_join(&out);
    t.hub
        .join_done(&r, generation, Err("no such device".into()));
    let out = t.drain();
    let udp = to_udp(&out);
    assert_eq!(kinds(&udp), [Kind::Closed]);
    assert!(
        wire::decode(&udp[0].1)
            .unwrap()
            .text
            .contains("cannot join the group: no such device")
    );
    assert_eq!(t.hub.subs.total(), 0);
}

#[test]
fn a_room_kept_joined_is_joined_again_at_the_next_retry() {
    let mut t = T::new(ROOMS, false);
    let kept = room("kept");
    let generation = t.hub.groups.generation(&kept).unwrap();
    t.hub
        .join_done(&kept, generation, Err("no such device".into()));
    let joins = |out: &[Output]| {
        out.iter()
            .filter(|o| matches!(o, Output::Join { room: r, .. } if r.as_str() == "kept"))
            .count()
    };
    assert_eq!(
        joins(&t.poll(Duration::from_secs(5))),
        0,
        "not before the retry"
    );
    assert_eq!(joins(&t.poll(Duration::from_secs(10))), 1, "at the retry");
}

#[test]
fn a_first_subscriber_gets_a_join_attempt_at_once_even_in_backoff() {
    let mut t = T::new(ROOMS, false);
    let (sub, out) = t.subscribe_unjoined("room1", "192.0.2.10:4000");
    let (r, generation) = first_join(&out);
    t.hub.join_done(&r, generation, Err("down".into()));
    t.drain();
    // Subscribing again at once: a join is attempted, not a silent subok.
    t.at(Duration::from_secs(1));
    let out = t.unicast("192.0.2.10:4000", LOCAL_A, sub.as_bytes());
    assert!(
        out.iter().any(|o| matches!(o, Output::Join { .. })),
        "{out:?}"
    );
}

#[test]
fn datagrams_of_an_old_membership_are_dropped() {
    let mut t = T::new(ROOMS, false);
    // Joined, left (the lease lapsed), joined again: the first membership's datagrams,
    // still queued in its port, are told apart.
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    let r = room("room1");
    let old = t.hub.groups.generation(&r).unwrap();
    t.poll(Duration::from_secs(61));
    assert_eq!(t.hub.groups.generation(&r), None);
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    assert_ne!(t.hub.groups.generation(&r), Some(old));
    let now = t.now();
    t.hub.on_input(
        Port::Group {
            room: r,
            generation: old,
        },
        sa("192.0.2.50:5"),
        b"room1|a|x",
        now,
    );
    assert!(t.drain().is_empty());
    assert_eq!(t.counter("stale_group"), 1);
}

#[test]
fn reload_adds_removes_and_refuses() {
    let mut t = T::new(ROOMS, false);
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    t.hub.settings.daemon.adhoc_rooms = true;
    let text = ROOMS
        .replace("[rooms.room1]\ngroup = \"239.255.77.1\"\nport = 5555\n", "")
        .replace(
            "lease_secs = 60",
            "lease_secs = 60\nadhoc_rooms = false\nttl = 4",
        )
        + "\n[rooms.added]\ngroup = \"239.255.77.9\"\nport = 5559\nkeep = true\n";
    let changed = t.hub.reconfigure(settings(&text), t.now().mono);
    assert!(
        changed.need_restart.is_empty(),
        "{:?}",
        changed.need_restart
    );
    assert_eq!(t.hub.settings().daemon.ttl, 4, "the TTL applies at once");
    let out = t.drain();
    let udp = to_udp(&out);
    assert_eq!(kinds(&udp), [Kind::Closed], "room1's subscriber is told");
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Join { room: r, .. } if r.as_str() == "added"))
    );
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Leave { room: r, .. } if r.as_str() == "room1"))
    );
    // room1 is gone now that ad-hoc rooms are off.
    t.unicast("192.0.2.10:4000", LOCAL_A, chat("room1", "x", 1).as_bytes());
    assert_eq!(t.counter("unknown_room"), 1);
}

#[test]
fn history_records_configured_rooms_and_adhoc_ones_only_while_subscribed() {
    let mut t = T::new(
        &ROOMS.replace("lease_secs = 60", "lease_secs = 60\nhistory_count = 0"),
        true,
    );
    assert!(
        t.hub.groups.is_joined(&room("history")),
        "history rooms stay joined"
    );
    let out = t.group(
        "history",
        "192.0.2.50:5",
        chat("history", "a", 1).as_bytes(),
    );
    assert!(out.iter().any(|o| matches!(o, Output::Record { .. })));
    // room1 keeps none (the default here is 0).
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    let out = t.unicast("192.0.2.10:4000", LOCAL_A, chat("room1", "b", 1).as_bytes());
    assert!(!out.iter().any(|o| matches!(o, Output::Record { .. })));
}

#[test]
fn adhoc_rooms_are_recorded_only_while_someone_subscribes() {
    let text = ROOMS.replace("lease_secs = 60", "lease_secs = 60\nadhoc_rooms = true");
    let mut t = T::new(&text, true);
    let recorded = |out: &[Output]| out.iter().any(|o| matches!(o, Output::Record { .. }));
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        chat("adhoc", "nobody here", 1).as_bytes(),
    );
    assert!(
        !recorded(&out),
        "an ad-hoc room nobody subscribes to is not stored"
    );
    t.subscribe("adhoc", "192.0.2.11:4000", LOCAL_A);
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        chat("adhoc", "someone", 2).as_bytes(),
    );
    assert!(recorded(&out));
    // The subscription lapses: the room's view (opened for its history) goes with it, and
    // nothing more is stored.
    t.poll(Duration::from_secs(120));
    t.poll(Duration::from_secs(122));
    assert_eq!(t.hub.subscribers(), 0);
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        chat("adhoc", "nobody again", 3).as_bytes(),
    );
    assert!(!recorded(&out), "stored after its last subscriber went");
}

#[test]
fn narrowing_the_allow_list_ends_subscriptions_it_no_longer_admits() {
    let mut t = T::new(ROOMS, false);
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    t.subscribe("room1", "127.0.0.1:4000", "127.0.0.1");
    t.hub.set_connected(Vec::new());
    let out = t.drain();
    let udp = to_udp(&out);
    assert_eq!(kinds(&udp), [Kind::Closed]);
    assert_eq!(udp[0].0.addr, sa("192.0.2.10:4000"));
    assert_eq!(t.hub.subs.total(), 1, "loopback is still allowed");
}

/// A subscriber's NACK for sender `aa`'s `seqs`, with `cookie` as a hop-by-hop tag if given.
fn nack(seqs: &str, cookie: Option<&str>) -> String {
    let cookie = cookie.map(|c| format!("cookie={c};")).unwrap_or_default();
    format!(
        "@{cookie}kind=nack;id=00000000000000cc;seq=1;for=00000000000000aa;seqs={seqs} room1|alice|"
    )
}

#[test]
fn subscriber_nacks_are_answered_from_the_cache_only_with_the_subscriptions_cookie() {
    let mut t = T::new(ROOMS, false);
    let cookie = t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    t.group("room1", "192.0.2.50:5", chat("room1", "one", 1).as_bytes());
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        nack("1", Some(&cookie)).as_bytes(),
    );
    let udp = to_udp(&out);
    assert_eq!(udp.len(), 1);
    assert_eq!(udp[0].0.src, Some(ip(LOCAL_A)));
    let f = wire::decode(&udp[0].1).unwrap();
    assert_eq!(f.text, "one");
    assert!(f.tags.get("repair").is_some());
    assert!(to_group(&out).is_empty(), "held whole: it goes no further");
    assert_eq!(t.hub.cache.stats().repairs_to_subscribers, 1);
    // The same NACK without the cookie, from the subscriber's address (a forger's) or from
    // one that is not subscribed: never answered, only passed on.
    for from in ["192.0.2.10:4000", "192.0.2.99:4000"] {
        let out = t.unicast(from, LOCAL_A, nack("1", None).as_bytes());
        let udp = to_udp(&out);
        assert!(
            udp.iter()
                .all(|(_, d)| wire::decode(d).unwrap().meta.kind == Kind::Nack)
        );
        assert_eq!(to_group(&out).len(), 1);
    }
    assert_eq!(t.hub.counters.nacks_unproven, 2);
    // A cookie for another address proves nothing.
    let other = t.subscribe("room1", "192.0.2.11:4000", LOCAL_A);
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        nack("1", Some(&other)).as_bytes(),
    );
    assert!(
        to_udp(&out)
            .iter()
            .all(|(_, d)| wire::decode(d).unwrap().meta.kind == Kind::Nack)
    );
    assert_eq!(t.hub.counters.nacks_unproven, 3);
}

#[test]
fn a_nack_passed_on_to_the_room_loses_its_cookie() {
    let mut t = T::new(ROOMS, false);
    let cookie = t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    t.subscribe("room1", "192.0.2.11:4000", LOCAL_A);
    t.group("room1", "192.0.2.50:5", chat("room1", "one", 1).as_bytes());
    // 1 is held, 2 is not: the answer is partial, so the NACK goes on to the sender.
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        nack("1-2", Some(&cookie)).as_bytes(),
    );
    let answered: Vec<_> = to_udp(&out)
        .into_iter()
        .filter(|(to, _)| to.addr == sa("192.0.2.10:4000"))
        .collect();
    assert_eq!(answered.len(), 1, "what is held is answered");
    let passed_on: Vec<Bytes> = to_group(&out)
        .into_iter()
        .chain(
            to_udp(&out)
                .into_iter()
                .filter(|(to, _)| to.addr == sa("192.0.2.11:4000"))
                .map(|(_, d)| d),
        )
        .collect();
    assert_eq!(
        passed_on.len(),
        2,
        "to the group and to the other subscriber"
    );
    for d in passed_on {
        let f = wire::decode(&d).unwrap();
        assert_eq!(f.meta.kind, Kind::Nack);
        assert!(
            f.tags.get("cookie").is_none(),
            "{}",
            String::from_utf8_lossy(&d)
        );
        assert_eq!(
            tags::end_to_end(&d),
            tags::end_to_end(nack("1-2", None).as_bytes())
        );
    }
}

/// A 1,000-byte message from sender `aa` with `seq`.
fn long_chat(seq: u64) -> String {
    chat("room1", &"x".repeat(1000), seq)
}

#[test]
fn a_subscribers_cache_answers_stop_at_its_budget_until_the_window_passes() {
    let mut t = T::new(ROOMS, false);
    let cookie = t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    for seq in 1..=100 {
        t.group("room1", "192.0.2.50:5", long_chat(seq).as_bytes());
    }
    let answered = |out: &[Output]| -> usize {
        to_udp(out)
            .iter()
            .filter(|(to, d)| {
                to.addr == sa("192.0.2.10:4000")
                    && wire::decode(d).unwrap().meta.kind == Kind::Message
            })
            .map(|(_, d)| d.len())
            .sum()
    };
    // NACKs for all 100 (about 100 KB) again and again within one window.
    let mut bytes = 0;
    for i in 0..20 {
        t.at(Duration::from_millis(100 * i));
        let out = t.unicast(
            "192.0.2.10:4000",
            LOCAL_A,
            nack("1-100", Some(&cookie)).as_bytes(),
        );
        bytes += answered(&out);
    }
    assert!(bytes <= repairs::PER_SUBSCRIBER, "{bytes} bytes answered");
    assert!(
        bytes > repairs::PER_SUBSCRIBER - 2000,
        "the budget is used: {bytes}"
    );
    assert!(t.hub.repairs.refused > 0);
    // A window later the subscriber is answered again; a second subscriber has its own.
    let window = t.hub.settings.daemon.repair_window;
    assert_eq!(t.hub.repairs.tracked(), 1);
    t.poll(window + Duration::from_secs(3));
    assert_eq!(
        t.hub.repairs.tracked(),
        0,
        "an idle subscriber's budget is forgotten"
    );
    // (The cache has let the old messages go with the window: new ones.)
    for seq in 101..=110 {
        t.group("room1", "192.0.2.50:5", long_chat(seq).as_bytes());
    }
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        nack("101-110", Some(&cookie)).as_bytes(),
    );
    let again = answered(&out);
    assert!(
        (10 * 1000..11 * 1100).contains(&again),
        "all ten again: {again} bytes"
    );
}

#[test]
fn repairs_to_groups_are_bounded_overall_whatever_the_nacks() {
    let mut t = T::new(ROOMS, false);
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    for seq in 1..=50 {
        t.group("room1", "192.0.2.50:5", long_chat(seq).as_bytes());
    }
    // The sender has left: the daemon answers for it on the group at once.
    t.group(
        "room1",
        "192.0.2.50:5",
        b"@id=00000000000000aa;seq=51;ts=1;kind=leave room1|bob|",
    );
    let held = t.hub.cache.stats().bytes;
    let cap = (2 * held).max(mcchat_core::peer::MIN_REPAIR_BYTES);
    let per_second = (cap / 4).max(mcchat_core::peer::MIN_REPAIR_BYTES);
    let nack = "@kind=nack;id=00000000000000dd;seq=1;for=00000000000000aa;seqs=1-50 room1|eve|";
    let repair_bytes = |out: &[Output]| -> usize {
        to_group(out)
            .iter()
            .filter(|d| wire::decode(d).unwrap().meta.kind == Kind::Message)
            .map(|d| d.len())
            .sum()
    };
    // A forged NACK every 25 ms for 30 s (each entry may be repaired every 20 ms): about
    // 60 MB asked for.
    let (mut first_second, mut total) = (0, 0);
    for i in 0..1200u64 {
        t.at(Duration::from_millis(25 * i));
        let out = t.group("room1", "192.0.2.66:5", nack.as_bytes());
        let b = repair_bytes(&out);
        total += b;
        if i < 40 {
            first_second += b;
        }
    }
    assert!(
        first_second <= per_second,
        "{first_second} > {per_second} in one second"
    );
    assert!(total <= cap, "{total} bytes in a window (cap {cap})");
    assert!(
        total >= cap / 2,
        "the budget is used, not shut: {total} of {cap}"
    );
    assert!(
        t.hub
            .snapshot(t.now().mono)
            .repair_cache
            .repairs_over_budget
            > 0
    );
}

#[test]
fn shutdown_tells_every_subscriber_and_leaves_every_group() {
    let mut t = T::new(ROOMS, false);
    t.subscribe("room1", "192.0.2.10:4000", LOCAL_A);
    t.subscribe("room1", "[::1]:4000", "::1");
    let now = t.now();
    t.hub.shutdown(now);
    let out = t.drain();
    let udp = to_udp(&out);
    assert_eq!(kinds(&udp), [Kind::Closed, Kind::Closed]);
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, Output::Leave { .. }))
            .count(),
        2,
        "room1 and kept"
    );
}

/// PROTOCOL 4.2: the client's nonce comes back in the challenge, in `subok` and in every
/// `closed` it is sent later (here at shutdown), each subscriber with its own; a renewal with
/// a new nonce (a restarted client on the same port) replaces it; a malformed one is not echoed.
#[test]
fn answers_echo_the_clients_nonce() {
    let mut t = T::new(ROOMS, false);
    let sub = |cookie: Option<&str>, nonce: &str| {
        let mut out = String::new();
        wire::relay_request(
            Kind::Subscribe,
            "room1",
            "alice",
            cookie,
            Some(nonce),
            wire::MIN_RELAY_REQUEST,
            &mut out,
        )
        .expect("request");
        out
    };
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        sub(None, "aaaaaaaaaaaaaaaa").as_bytes(),
    );
    assert_eq!(
        reply_tag(&out, Kind::Challenge, "nonce").as_deref(),
        Some("aaaaaaaaaaaaaaaa")
    );
    let cookie = reply_tag(&out, Kind::Challenge, "cookie").unwrap();
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        sub(Some(&cookie), "aaaaaaaaaaaaaaaa").as_bytes(),
    );
    t.finish_joins(&out);
    assert_eq!(
        reply_tag(&out, Kind::Subscribed, "nonce").as_deref(),
        Some("aaaaaaaaaaaaaaaa")
    );
    let out = t.unicast(
        "192.0.2.10:4000",
        LOCAL_A,
        sub(Some(&cookie), "bbbbbbbbbbbbbbbb").as_bytes(),
    );
    assert_eq!(
        reply_tag(&out, Kind::Subscribed, "nonce").as_deref(),
        Some("bbbbbbbbbbbbbbbb")
    );
    // Another subscriber with its own, and one with a malformed nonce.
    let other = |from: &str, nonce: &str, t: &mut T| {
        let out = t.unicast(from, LOCAL_A, sub(None, nonce).as_bytes());
        let cookie = reply_tag(&out, Kind::Challenge, "cookie").unwrap();
        let out = t.unicast(from, LOCAL_A, sub(Some(&cookie), nonce).as_bytes());
        reply_tag(&out, Kind::Subscribed, "nonce")
    };
    assert_eq!(
        other("192.0.2.11:4000", "cccccccccccccccc", &mut t).as_deref(),
        Some("cccccccccccccccc")
    );
    assert_eq!(other("192.0.2.12:4000", "no;", &mut t), None);
    let now = t.now();
    t.hub.shutdown(now);
    let mut closed: Vec<(SocketAddr, Option<String>)> = to_udp(&t.drain())
        .into_iter()
        .map(|(to, d)| {
            let f = wire::decode(&d).unwrap();
            assert_eq!(f.meta.kind, Kind::Closed);
            (to.addr, f.tags.get("nonce").map(|n| n.into_owned()))
        })
        .collect();
    closed.sort();
    assert_eq!(
        closed,
        [
            (sa("192.0.2.10:4000"), Some("bbbbbbbbbbbbbbbb".into())),
            (sa("192.0.2.11:4000"), Some("cccccccccccccccc".into())),
            (sa("192.0.2.12:4000"), None),
        ]
    );
}

#[test]
fn the_verified_bucket_is_per_source_with_the_subscribe_rate() {
    let mut t = T::new(ROOMS, false);
    let a = "192.0.2.10:4000";
    let cookie = t.subscribe("room1", a, LOCAL_A);
    let b = "192.0.2.11:4000";
    let cookie_b = t.subscribe("room1", b, LOCAL_A);
    // The subscribe above took one token; the burst is 20, the rate 10/s.
    let renew = request(Kind::Subscribe, "room1", Some(&cookie));
    let answered = (0..30)
        .filter(|_| {
            let out = t.unicast(a, LOCAL_A, renew.as_bytes());
            reply_tag(&out, Kind::Subscribed, "lease").is_some()
        })
        .count();
    assert_eq!(answered, 19);
    // Another source is not affected.
    let renew_b = request(Kind::Subscribe, "room1", Some(&cookie_b));
    let out = t.unicast(b, LOCAL_A, renew_b.as_bytes());
    assert!(reply_tag(&out, Kind::Subscribed, "lease").is_some());
    // 100 ms later one more token.
    t.at(Duration::from_millis(100));
    let out = t.unicast(a, LOCAL_A, renew.as_bytes());
    assert!(reply_tag(&out, Kind::Subscribed, "lease").is_some());
}

/// `data` with a `cookie` hop-by-hop tag in front.
pub(super) fn with_cookie(data: &str, cookie: &str) -> Vec<u8> {
    let mut out = Vec::new();
    tags::add_hop_tag(data.as_bytes(), "cookie", cookie, &mut out).expect("tag");
    out
}

#[test]
fn unproven_sources_share_one_small_budget_that_forgeries_cannot_multiply() {
    let text = ROOMS.replace(
        "lease_secs = 60",
        "lease_secs = 60\nunproven_rate = 5\nunproven_burst = 10",
    );
    let mut t = T::new(&text, false);
    // A thousand forged sources, one datagram each: the budget of all of them together.
    let relayed: usize = (0..1000u32)
        .map(|i| {
            let from = format!("192.0.2.{}:{}", 3 + i % 200, 1000 + i);
            to_group(&t.unicast(
                &from,
                LOCAL_A,
                chat("room1", "forged", u64::from(i) + 1).as_bytes(),
            ))
            .len()
        })
        .sum();
    assert_eq!(relayed, 10);
    assert_eq!(t.hub.counters.relayed_unproven, 10);
    assert_eq!(t.counter("unproven_over_budget"), 990);
    // A source that proved its address (a cookie, as `mcchat send --via` gets with one round
    // trip) has its own share, however many forgeries were sent in its name.
    let cookie = t.subscribe("room1", "192.0.2.50:4000", LOCAL_A);
    for i in 0..100 {
        t.unicast(
            "192.0.2.50:4000",
            LOCAL_A,
            chat("room1", "forged", 5000 + i).as_bytes(),
        );
    }
    for seq in 1..=50 {
        let out = t.unicast(
            "192.0.2.50:4000",
            LOCAL_A,
            &with_cookie(&chat("room1", "proven", seq), &cookie),
        );
        let sent = to_group(&out);
        assert_eq!(sent.len(), 1, "message {seq}");
        // The cookie ends at this hop: the group gets the sender's datagram.
        let f = wire::decode(&sent[0]).expect("decodes");
        assert!(f.tags.get("cookie").is_none());
        assert_eq!(f.text, "proven");
    }
    // Cookies are remembered for what senders relay, not for requests (a listening
    // subscriber would hold an entry for nothing).
    assert_eq!(t.hub.cookies.remembered(), 1);
    t.subscribe("room1", "192.0.2.60:4000", LOCAL_A);
    assert_eq!(t.hub.cookies.remembered(), 1);
    // The cookie of another address proves nothing.
    let out = t.unicast(
        "192.0.2.51:4000",
        LOCAL_A,
        &with_cookie(&chat("room1", "stolen", 1), &cookie),
    );
    assert!(to_group(&out).is_empty());
    // The budget refills with time: `nc` still reaches the room.
    t.at(Duration::from_secs(1));
    let out = t.unicast("192.0.2.9:1234", LOCAL_A, b"room1|nc|hello");
    assert_eq!(to_group(&out).len(), 1);
}
