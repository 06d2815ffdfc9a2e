//! The engine driven by hand: times are one `Instant` plus offsets, datagrams are built and
//! read with `wire`, and a tiny in-memory network moves one engine's sends to the others.
//! No sockets, no sleeping.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::*;
use crate::presence::Change;

const ROOM: &str = "room1";
/// The wall clock at the base instant (ms since the epoch).
const UNIX0: u64 = 1_763_900_000_000;
const ALICE: InstanceId = InstanceId(0xa11c_e000_0000_0001);
const BOB: InstanceId = InstanceId(0xb0b0_0000_0000_0002);
const CAROL: InstanceId = InstanceId(0xca20_1000_0000_0003);

fn group() -> SocketAddr {
    "239.255.77.1:5555".parse().unwrap()
}

fn daemon() -> SocketAddr {
    "192.0.2.1:5554".parse().unwrap()
}

fn host(last: u8) -> SocketAddr {
    SocketAddr::from(([192, 0, 2, last], 5555))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------------------
// Datagrams

fn encode(meta: Meta, extra: &[(&str, &str)], sender: &str, text: &str) -> Vec<u8> {
    let mut out = String::new();
    wire::encode(&Header { meta, extra }, ROOM, sender, text, &mut out).unwrap();
    out.into_bytes()
}

fn tagged(id: InstanceId, seq: u64, ts: u64, kind: Kind) -> Meta {
    Meta {
        instance: Some(id),
        seq: Some(seq),
        ts_ms: Some(ts),
        kind,
    }
}

fn msg(id: InstanceId, sender: &str, seq: u64, ts: u64) -> Vec<u8> {
    encode(
        tagged(id, seq, ts, Kind::Message),
        &[],
        sender,
        &format!("m{seq}"),
    )
}

fn repair_of(id: InstanceId, sender: &str, seq: u64, ts: u64) -> Vec<u8> {
    encode(
        tagged(id, seq, ts, Kind::Message),
        &[repair::REPAIR_TAG],
        sender,
        &format!("m{seq}"),
    )
}

fn control(id: InstanceId, sender: &str, kind: Kind, latest: u64, ts: u64) -> Vec<u8> {
    encode(tagged(id, latest, ts, kind), &[], sender, "")
}

fn nack(from: InstanceId, sender: &str, of: InstanceId, seqs: &str, ts: u64) -> Vec<u8> {
    let of = of.to_string();
    encode(
        tagged(from, 0, ts, Kind::Nack),
        &[("for", &of), ("seqs", seqs)],
        sender,
        "",
    )
}

fn relay_control(kind: Kind, tags: &[(&str, &str)], text: &str) -> Vec<u8> {
    encode(
        Meta {
            kind,
            ..Meta::default()
        },
        tags,
        "mcchatd",
        text,
    )
}

/// A datagram as the tests read it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dg {
    kind: Kind,
    id: Option<InstanceId>,
    seq: Option<u64>,
    ts: Option<u64>,
    sender: String,
    text: String,
    tags: BTreeMap<String, String>,
    len: usize,
}

impl Dg {
    fn parse(bytes: &[u8]) -> Self {
        let f = wire::decode(bytes).unwrap();
        assert_eq!(f.room, ROOM);
        Self {
            kind: f.meta.kind,
            id: f.meta.instance,
            seq: f.meta.seq,
            ts: f.meta.ts_ms,
            sender: f.sender.to_owned(),
            text: f.text.to_owned(),
            tags: f
                .tags
                .iter()
                .map(|(k, v)| (k.to_owned(), v.into_owned()))
                .collect(),
            len: bytes.len(),
        }
    }

    fn tag(&self, key: &str) -> Option<&str> {
        self.tags.get(key).map(String::as_str)
    }

    fn is_repair(&self) -> bool {
        self.tag("repair") == Some("1")
    }
}

// ---------------------------------------------------------------------------------------
// One engine driven by hand

/// An engine, its clock and everything it did, with the time it did it.
struct Rig {
    base: Instant,
    now: Instant,
    e: PeerEngine,
    log: Vec<(Instant, Effect)>,
    wakeups: u64,
}

impl Rig {
    fn new(config: PeerConfig, id: InstanceId) -> Self {
        let base = Instant::now();
        let e = PeerEngine::new(config, id, id.0 ^ 0x5eed, now_at(base, base));
        Self {
            base,
            now: base,
            e,
            log: Vec::new(),
            wakeups: 0,
        }
    }

    fn peer(name: &str, id: InstanceId) -> Self {
        Self::new(PeerConfig::new(ROOM, name, group()), id)
    }

    fn t(&self, at_ms: u64) -> Instant {
        self.base + ms(at_ms)
    }

    /// The wall clock at `at` (for the `ts` tags of datagrams made up then).
    fn unix(&self, at: Instant) -> u64 {
        now_at(self.base, at).unix_ms
    }

    fn since(&self, at: Instant) -> Duration {
        at - self.base
    }

    fn collect(&mut self) {
        while let Some(effect) = self.e.poll_effect() {
            self.log.push((self.now, effect));
        }
    }

    /// Polls at every deadline up to `until` (inclusive), then stands at `until`.
    fn run_until(&mut self, until: Instant) {
        let mut at_same = 0;
        while let Some(due) = self.e.next_deadline() {
            if due > until {
                break;
            }
            let due = due.max(self.now);
            at_same = if due == self.now { at_same + 1 } else { 0 };
            assert!(at_same < 100, "the engine spins at {:?}", self.since(due));
            self.now = due;
            self.e.poll(now_at(self.base, due));
            self.wakeups += 1;
            self.collect();
        }
        self.now = self.now.max(until);
    }

    fn run_to(&mut self, at_ms: u64) {
        self.run_until(self.t(at_ms));
    }

    fn enter(&mut self, at_ms: u64) {
        self.run_to(at_ms);
        self.e.enter(now_at(self.base, self.now));
        self.collect();
    }

    fn leave(&mut self, at_ms: u64) {
        self.run_to(at_ms);
        self.e.leave(now_at(self.base, self.now));
        self.collect();
    }

    fn say(&mut self, at_ms: u64, kind: Kind, text: &str) {
        self.run_to(at_ms);
        self.e.say(kind, text, now_at(self.base, self.now)).unwrap();
        self.collect();
    }

    fn hear_at(&mut self, at: Instant, bytes: &[u8], from: SocketAddr) {
        self.run_until(at);
        self.e.on_datagram(bytes, from, now_at(self.base, self.now));
        self.collect();
    }

    fn hear(&mut self, at_ms: u64, bytes: &[u8], from: SocketAddr) {
        self.hear_at(self.t(at_ms), bytes, from);
    }

    fn take(&mut self) -> Vec<(Instant, Effect)> {
        std::mem::take(&mut self.log)
    }
}

fn now_at(base: Instant, at: Instant) -> Now {
    let offset = at - base;
    Now {
        mono: at,
        unix_ms: UNIX0 + offset.as_millis() as u64,
    }
}

fn sends(log: &[(Instant, Effect)]) -> Vec<(Instant, SocketAddr, Dg)> {
    log.iter()
        .filter_map(|(t, e)| match e {
            Effect::Send { to, bytes } => Some((*t, *to, Dg::parse(bytes))),
            Effect::Show(_) => None,
        })
        .collect()
}

fn sends_of(log: &[(Instant, Effect)], kind: Kind) -> Vec<(Instant, SocketAddr, Dg)> {
    sends(log)
        .into_iter()
        .filter(|(_, _, d)| d.kind == kind)
        .collect()
}

fn shown(log: &[(Instant, Effect)]) -> Vec<(Instant, Event)> {
    log.iter()
        .filter_map(|(t, e)| match e {
            Effect::Show(ev) => Some((*t, ev.clone())),
            Effect::Send { .. } => None,
        })
        .collect()
}

fn events(log: &[(Instant, Effect)]) -> Vec<Event> {
    shown(log).into_iter().map(|(_, e)| e).collect()
}

/// The sequence numbers of the messages of `id` shown.
fn shown_seqs(log: &[(Instant, Effect)], id: InstanceId) -> Vec<u64> {
    events(log)
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.instance == Some(id) => m.seq,
            _ => None,
        })
        .collect()
}

/// Shown events other than presence changes, with messages as `(seq, repair)`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Msg(u64, bool),
    Lost(String, u64),
}

fn seen(log: &[(Instant, Effect)]) -> Vec<Seen> {
    events(log)
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(Seen::Msg(m.seq.unwrap(), m.repair)),
            Event::Lost { sender, count } => Some(Seen::Lost(sender, count)),
            _ => None,
        })
        .collect()
}

fn times_ms(rig: &Rig, sent: &[(Instant, SocketAddr, Dg)]) -> Vec<u64> {
    sent.iter()
        .map(|(t, _, _)| rig.since(*t).as_millis() as u64)
        .collect()
}

// ---------------------------------------------------------------------------------------
// 1. Heartbeats and tail probes

/// PROTOCOL 5: after a message at t, t+0.2, 0.6, 1.4 s, then every second to 11.4 s.
const PROBES: [u64; 13] = [
    200, 600, 1400, 2400, 3400, 4400, 5400, 6400, 7400, 8400, 9400, 10_400, 11_400,
];

#[test]
fn heartbeats_every_15_s_and_tail_probes_after_a_message() {
    let mut r = Rig::peer("alice", ALICE);
    r.enter(0);
    let join = sends(&r.take());
    assert_eq!(join.len(), 1);
    assert_eq!(
        (join[0].1, join[0].2.kind, join[0].2.seq),
        (group(), Kind::Join, Some(0))
    );

    // No messages: a heartbeat every 15 s after the join.
    r.run_to(61_000);
    let log = r.take();
    let hbs = sends_of(&log, Kind::Heartbeat);
    assert_eq!(times_ms(&r, &hbs), [15_000, 30_000, 45_000, 60_000]);
    assert!(
        hbs.iter()
            .all(|(_, to, d)| *to == group() && d.seq == Some(0))
    );
    assert_eq!(sends(&log).len(), 4, "nothing else goes out");

    // A message at 61 s: the tail probes, then every 15 s from the last one.
    r.say(61_000, Kind::Message, "hello");
    r.run_to(103_000);
    let log = r.take();
    let hbs = sends_of(&log, Kind::Heartbeat);
    let mut expected: Vec<u64> = PROBES.iter().map(|p| 61_000 + p).collect();
    expected.extend([61_000 + 11_400 + 15_000, 61_000 + 11_400 + 30_000]);
    assert_eq!(times_ms(&r, &hbs), expected);
    assert!(
        hbs.iter().all(|(_, _, d)| d.seq == Some(1)),
        "heartbeats carry the latest seq"
    );
    assert_eq!(r.e.stats().heartbeats, 4 + 15);
    assert_eq!(r.e.stats().sent, 1 + 4 + 1 + 15);
}

#[test]
fn a_second_message_restarts_the_tail_probes() {
    let mut r = Rig::peer("alice", ALICE);
    r.enter(0);
    r.say(0, Kind::Message, "one");
    r.say(1000, Kind::Action, "two");
    r.run_to(28_000);
    let hbs = sends_of(&r.take(), Kind::Heartbeat);
    let mut expected = vec![200, 600];
    expected.extend(PROBES.iter().map(|p| 1000 + p));
    expected.push(1000 + 11_400 + 15_000);
    assert_eq!(times_ms(&r, &hbs), expected);
    let seqs: Vec<u64> = hbs.iter().map(|(_, _, d)| d.seq.unwrap()).collect();
    let mut want = vec![1, 1];
    want.extend([2; 14]);
    assert_eq!(seqs, want);
}

// ---------------------------------------------------------------------------------------
// 2. NACKs: back-off, retries, suppression, giving up

/// Bob has heard alice's join and message 1; message 3 arrives at 1 s: 2 is missing.
fn bob_with_a_gap(config: PeerConfig) -> Rig {
    let mut r = Rig::new(config, BOB);
    r.enter(0);
    r.hear(0, &control(ALICE, "alice", Kind::Join, 0, UNIX0), host(1));
    r.hear(100, &msg(ALICE, "alice", 1, UNIX0 + 100), host(1));
    r.hear(1000, &msg(ALICE, "alice", 3, UNIX0 + 1000), host(1));
    let log = r.take();
    assert_eq!(seen(&log), [Seen::Msg(1, false)], "3 is held");
    assert!(
        sends_of(&log, Kind::Nack).is_empty(),
        "the first NACK waits"
    );
    r
}

fn assert_nack_for_2(nacks: &[(Instant, SocketAddr, Dg)]) {
    assert!(!nacks.is_empty());
    for (_, to, d) in nacks {
        assert_eq!(*to, group());
        assert_eq!(d.id, Some(BOB));
        assert_eq!(d.sender, "bob");
        assert_eq!(d.text, "");
        assert_eq!(d.tag("for"), Some("a11ce00000000001"));
        assert_eq!(d.tag("seqs"), Some("2"));
    }
}

#[test]
fn nacks_back_off_retry_and_give_up_after_30_tries() {
    let mut r = bob_with_a_gap(PeerConfig::new(ROOM, "bob", group()));
    let gap = r.t(1000);
    r.run_to(6000);
    let log = r.take();
    let nacks = sends_of(&log, Kind::Nack);
    assert_nack_for_2(&nacks);
    assert_eq!(nacks.len(), 30, "30 tries");
    let first = nacks[0].0 - gap;
    assert!(first <= ms(30), "first NACK {first:?} after the gap");
    for w in nacks.windows(2) {
        let d = w[1].0 - w[0].0;
        assert!(d >= ms(100) && d <= ms(130), "retry after {d:?}");
    }
    let shown = shown(&log);
    assert_eq!(
        seen(&log),
        [Seen::Lost("alice".into(), 1), Seen::Msg(3, false)]
    );
    // Given up when the 30th try's wait is over, within the 4 s.
    let lost_at = shown
        .iter()
        .find(|(_, e)| matches!(e, Event::Lost { .. }))
        .unwrap()
        .0;
    let wait = lost_at - nacks[29].0;
    assert!(
        wait >= ms(100) && wait <= ms(130),
        "given up {wait:?} after the last try"
    );
    assert!(lost_at - gap < ms(4000));
    let s = r.e.repair_stats();
    assert_eq!((s.nacks_sent, s.lost, s.nacks_suppressed), (30, 1, 0));
}

#[test]
fn a_gap_is_given_up_after_4_s_with_tries_left() {
    let mut config = PeerConfig::new(ROOM, "bob", group());
    config.repair.retry = Duration::from_secs(1);
    let mut r = bob_with_a_gap(config);
    r.run_to(10_000);
    let log = r.take();
    let nacks = sends_of(&log, Kind::Nack);
    assert_nack_for_2(&nacks);
    assert_eq!(nacks.len(), 4, "about one a second for 4 s");
    let lost: Vec<(Instant, Event)> = shown(&log)
        .into_iter()
        .filter(|(_, e)| !matches!(e, Event::Presence(_)))
        .collect();
    assert_eq!(lost.len(), 2);
    assert_eq!(lost[0].0, r.t(5000), "exactly 4 s after the gap opened");
    assert_eq!(
        seen(&log),
        [Seen::Lost("alice".into(), 1), Seen::Msg(3, false)]
    );
}

#[test]
fn a_nack_heard_from_another_receiver_puts_ours_off_without_using_up_tries() {
    let mut r = bob_with_a_gap(PeerConfig::new(ROOM, "bob", group()));
    // Carol asks for other numbers, and for another sender's: nothing changes.
    r.hear(
        1000,
        &nack(CAROL, "carol", ALICE, "7-9", UNIX0 + 1000),
        host(3),
    );
    r.hear(
        1000,
        &nack(CAROL, "carol", CAROL, "2", UNIX0 + 1000),
        host(3),
    );
    assert_eq!(r.e.repair_stats().nacks_suppressed, 0);
    // Carol asks for 2 at once: ours is put off by 100 ms + 0-30 ms.
    r.hear(
        1000,
        &nack(CAROL, "carol", ALICE, "1-5", UNIX0 + 1000),
        host(3),
    );
    assert_eq!(r.e.repair_stats().nacks_suppressed, 1);
    r.run_to(1099);
    assert!(sends_of(&r.log, Kind::Nack).is_empty(), "put off");
    r.run_to(1131);
    let first = sends_of(&r.log, Kind::Nack);
    assert_eq!(first.len(), 1);
    let first_at = first[0].0;
    assert!(first_at >= r.t(1100) && first_at <= r.t(1130));
    // Carol asks again 50 ms after our first: our retry is put off again.
    let heard = first_at + ms(50);
    r.hear_at(
        heard,
        &nack(CAROL, "carol", ALICE, "2", r.unix(heard)),
        host(3),
    );
    assert_eq!(r.e.repair_stats().nacks_suppressed, 2);
    r.run_until(heard + ms(99));
    assert_eq!(sends_of(&r.log, Kind::Nack).len(), 1);
    r.run_until(heard + ms(131));
    let two = sends_of(&r.log, Kind::Nack);
    assert_eq!(two.len(), 2);
    assert!(two[1].0 >= heard + ms(100) && two[1].0 <= heard + ms(130));
    // Hearing carol did not use up our tries: still 30 of our own, then the loss.
    r.run_to(8000);
    let log = r.take();
    let nacks = sends_of(&log, Kind::Nack);
    assert_nack_for_2(&nacks);
    assert_eq!(nacks.len(), 30);
    assert_eq!(
        seen(&log),
        [Seen::Lost("alice".into(), 1), Seen::Msg(3, false)]
    );
    assert_eq!(r.e.repair_stats().nacks_sent, 30);
}

// ---------------------------------------------------------------------------------------
// 3. Where a receiver starts following a sender

/// An unknown alice's first datagram, message `seq` sent `age_ms` before it arrives at 10 s:
/// what is shown at once, and the `seqs` of the NACKs of the next second.
fn first_message(seq: u64, age_ms: i64) -> (Rig, Vec<u64>, Vec<String>) {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    let ts = (UNIX0 as i64 + 10_000 - age_ms) as u64;
    r.hear(10_000, &msg(ALICE, "alice", seq, ts), host(1));
    let at_once = shown_seqs(&r.log, ALICE);
    r.run_to(11_000);
    let nacks = sends_of(&r.take(), Kind::Nack)
        .into_iter()
        .map(|(_, _, d)| d.tag("seqs").unwrap().to_owned())
        .collect();
    (r, at_once, nacks)
}

#[test]
fn a_new_sender_with_a_low_seq_sent_moments_ago_is_followed_from_1() {
    let (mut r, at_once, nacks) = first_message(5, 1000);
    assert_eq!(at_once, [] as [u64; 0], "5 is held for 1-4");
    assert!(
        (8..=10).contains(&nacks.len()),
        "asked every 100-130 ms: {nacks:?}"
    );
    assert!(nacks.iter().all(|s| s == "1-4"), "{nacks:?}");
    // The repairs come: everything, in order, once.
    for seq in [2, 1, 4, 3] {
        r.hear(
            11_000,
            &repair_of(ALICE, "alice", seq, UNIX0 + 9000),
            host(1),
        );
    }
    assert_eq!(shown_seqs(&r.log, ALICE), [1, 2, 3, 4, 5]);

    let (_, at_once, nacks) = first_message(64, 0);
    assert!(at_once.is_empty());
    assert_eq!(nacks[0], "1-63");
    let (_, at_once, nacks) = first_message(5, 3999);
    assert!(at_once.is_empty());
    assert_eq!(nacks[0], "1-4");
    let (_, at_once, nacks) = first_message(5, -3999);
    assert!(at_once.is_empty(), "a clock a little ahead");
    assert_eq!(nacks[0], "1-4");
}

#[test]
fn a_new_sender_with_seq_65_or_an_old_ts_is_followed_from_there() {
    for (seq, age) in [(65, 0), (5, 4000), (5, 60_000), (5, -4000), (1000, 0)] {
        let (r, at_once, nacks) = first_message(seq, age);
        assert_eq!(at_once, [seq], "seq {seq}, {age} ms old");
        assert!(nacks.is_empty(), "seq {seq}, {age} ms old: {nacks:?}");
        assert_eq!(r.e.receiver_load().1, 0);
    }
}

// ---------------------------------------------------------------------------------------
// 4. Duplicates

#[test]
fn a_message_is_shown_once_whatever_path_it_comes_by() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    let relay = SocketAddr::from(([192, 0, 2, 99], 5554));
    r.hear(0, &control(ALICE, "alice", Kind::Join, 0, UNIX0), host(1));
    r.hear(10, &msg(ALICE, "alice", 1, UNIX0 + 10), host(1));
    r.hear(11, &repair_of(ALICE, "alice", 1, UNIX0 + 10), host(1));
    r.hear(12, &msg(ALICE, "alice", 1, UNIX0 + 10), relay);
    // 3 before 2: 2 comes as a repair, then its original late, then copies of 3.
    r.hear(20, &msg(ALICE, "alice", 3, UNIX0 + 20), host(1));
    r.hear(21, &msg(ALICE, "alice", 3, UNIX0 + 20), relay);
    r.hear(60, &repair_of(ALICE, "alice", 2, UNIX0 + 15), host(1));
    r.hear(61, &msg(ALICE, "alice", 2, UNIX0 + 15), host(1));
    r.hear(62, &repair_of(ALICE, "alice", 3, UNIX0 + 20), relay);
    r.hear(63, &repair_of(ALICE, "alice", 2, UNIX0 + 15), relay);
    r.run_to(10_000);
    let log = r.take();
    assert_eq!(
        seen(&log),
        [Seen::Msg(1, false), Seen::Msg(2, true), Seen::Msg(3, false)]
    );
    let s = r.e.repair_stats();
    assert_eq!(s.duplicates, 6);
    assert_eq!(s.lost, 0);
    let froms: Vec<Option<SocketAddr>> = events(&log)
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.from),
            _ => None,
        })
        .collect();
    assert_eq!(froms, [Some(host(1)); 3], "the first copy is the one shown");
}

// ---------------------------------------------------------------------------------------
// 5. Repairs and their budgets

/// A forged NACK for alice's numbers, from nobody in particular.
fn forged_nack(seqs: &str, ts: u64) -> Vec<u8> {
    nack(InstanceId(0x0bad), "mallory", ALICE, seqs, ts)
}

fn repairs(log: &[(Instant, Effect)]) -> Vec<(Instant, SocketAddr, Dg)> {
    sends(log)
        .into_iter()
        .filter(|(_, _, d)| d.is_repair())
        .collect()
}

fn repair_seqs(log: &[(Instant, Effect)]) -> Vec<u64> {
    repairs(log)
        .into_iter()
        .map(|(_, _, d)| d.seq.unwrap())
        .collect()
}

fn bytes_of(log: &[(Instant, Effect)], pred: impl Fn(&Dg) -> bool) -> u64 {
    log.iter()
        .filter_map(|(_, e)| match e {
            Effect::Send { bytes, .. } if pred(&Dg::parse(bytes)) => Some(bytes.len() as u64),
            _ => None,
        })
        .sum()
}

#[test]
fn a_nack_is_answered_with_repairs_once_per_20_ms() {
    let mut r = Rig::peer("alice", ALICE);
    r.enter(0);
    r.say(10, Kind::Message, "one");
    r.say(20, Kind::Action, "waves");
    r.say(30, Kind::Message, "three");
    let originals: Vec<Vec<u8>> = r
        .take()
        .into_iter()
        .filter_map(|(_, e)| match e {
            Effect::Send { bytes, .. } => Some(bytes),
            Effect::Show(_) => None,
        })
        .filter(|b| matches!(Dg::parse(b).kind, Kind::Message | Kind::Action))
        .collect();
    assert_eq!(originals.len(), 3);

    r.hear(100, &nack(BOB, "bob", ALICE, "1-3", UNIX0 + 100), host(2));
    let log = r.take();
    let got = sends(&log);
    assert_eq!(got.len(), 3);
    for ((_, to, d), original) in got.iter().zip(&originals) {
        assert_eq!(*to, group());
        // The same datagram with `repair=1` in front of its tags (PROTOCOL 2.8), byte for byte.
        let text = std::str::from_utf8(original).unwrap();
        let want = format!("@repair=1;{}", text.strip_prefix('@').unwrap());
        assert_eq!(Dg::parse(want.as_bytes()), *d);
    }
    let raw: Vec<Vec<u8>> = log
        .iter()
        .filter_map(|(_, e)| match e {
            Effect::Send { bytes, .. } => Some(bytes.clone()),
            Effect::Show(_) => None,
        })
        .collect();
    for (repair, original) in raw.iter().zip(&originals) {
        assert!(repair.starts_with(b"@repair=1;id="));
        assert_eq!(&*tags::end_to_end(repair), &original[..]);
    }
    assert_eq!(
        got.iter()
            .map(|(_, _, d)| (d.seq.unwrap(), d.kind, d.ts.unwrap(), d.text.as_str()))
            .collect::<Vec<_>>(),
        [
            (1, Kind::Message, UNIX0 + 10, "one"),
            (2, Kind::Action, UNIX0 + 20, "waves"),
            (3, Kind::Message, UNIX0 + 30, "three"),
        ]
    );
    let bytes: u64 = got.iter().map(|(_, _, d)| d.len as u64).sum();
    assert_eq!(
        bytes,
        originals.iter().map(|o| o.len() as u64 + 9).sum::<u64>()
    );

    // Asked again within 20 ms (by anyone): nothing; at 20 ms: again.
    r.hear(
        100,
        &nack(CAROL, "carol", ALICE, "1-3", UNIX0 + 100),
        host(3),
    );
    r.hear(119, &nack(BOB, "bob", ALICE, "2", UNIX0 + 119), host(2));
    assert!(sends(&r.log).is_empty());
    r.hear(120, &nack(BOB, "bob", ALICE, "2-9", UNIX0 + 120), host(2));
    assert_eq!(repair_seqs(&r.take()), [2, 3], "1 was not asked for");
    // Numbers never sent, or another sender's: nothing.
    r.hear(200, &nack(BOB, "bob", ALICE, "4-100", UNIX0 + 200), host(2));
    r.hear(200, &nack(BOB, "bob", CAROL, "1-3", UNIX0 + 200), host(2));
    assert!(sends(&r.log).is_empty());
    let s = r.e.stats();
    assert_eq!(s.repairs_sent, 5);
    assert_eq!(
        s.repair_bytes,
        bytes + got[1].2.len as u64 + got[2].2.len as u64,
        "stats count the bytes sent"
    );
    assert_eq!(s.repairs_refused, 0);
}

#[test]
fn at_most_128_repairs_per_nack() {
    let mut r = Rig::peer("alice", ALICE);
    r.enter(0);
    for i in 0..300 {
        r.say(10, Kind::Message, &format!("message {i}"));
    }
    r.take();
    r.hear(100, &forged_nack("1-300", UNIX0 + 100), host(66));
    assert_eq!(repair_seqs(&r.take()), (1..=128).collect::<Vec<_>>());
    // The same NACK at once: those just repaired are skipped, not counted.
    r.hear(100, &forged_nack("1-300", UNIX0 + 100), host(66));
    assert_eq!(repair_seqs(&r.take()), (129..=256).collect::<Vec<_>>());
    r.hear(100, &forged_nack("1-300", UNIX0 + 100), host(66));
    assert_eq!(repair_seqs(&r.take()), (257..=300).collect::<Vec<_>>());
    r.hear(100, &forged_nack("1-300", UNIX0 + 100), host(66));
    assert!(r.take().is_empty());
    assert_eq!(r.e.stats().repairs_sent, 300);
    assert_eq!(r.e.stats().repairs_refused, 0);
}

/// Alice says 1024 long messages at once, then forged NACKs for all of them come every
/// millisecond, then every 10 ms, for 40 s.
#[test]
fn at_most_2000_repairs_a_second_and_twice_what_is_held_per_window() {
    let mut r = Rig::peer("alice", ALICE);
    r.enter(0);
    let long = "x".repeat(1100);
    for _ in 0..1024 {
        r.say(0, Kind::Message, &long);
    }
    let said = r.take();
    let held = bytes_of(&said, |d| d.kind == Kind::Message) + 9 * 1024;
    let biggest = said
        .iter()
        .filter_map(|(_, e)| match e {
            Effect::Send { bytes, .. } => Some(bytes.len() as u64 + 9),
            Effect::Show(_) => None,
        })
        .max()
        .unwrap();
    let cap = (2 * held).max(MIN_REPAIR_BYTES as u64);
    assert!(
        2000 * biggest < cap,
        "the rate binds first in the first second"
    );
    let mut t = 2000;
    while t < 40_000 {
        r.hear(t, &forged_nack("1-1024", UNIX0 + t), host(66));
        t += if t < 4000 { 1 } else { 10 };
    }
    let log = r.take();
    let sent = repairs(&log);
    let in_first_second = sent.iter().filter(|(at, ..)| *at < r.t(3000)).count();
    assert_eq!(in_first_second, REPAIRS_PER_SECOND as usize);
    let total: u64 = sent.iter().map(|(_, _, d)| d.len as u64).sum();
    assert!(
        total <= cap + biggest,
        "{total} repair bytes, budget {cap} + {biggest}"
    );
    assert!(
        total + biggest > cap,
        "the byte budget was used: {total} of {cap}"
    );
    let s = r.e.stats();
    assert_eq!(s.repairs_sent, sent.len() as u64);
    assert_eq!(s.repair_bytes, total);
    assert_eq!(s.repair_bytes, bytes_of(&log, Dg::is_repair));
    assert!(s.repairs_refused > 0);
    let probes = sends_of(&log, Kind::Heartbeat).len();
    assert_eq!(probes, 13 + 1, "the tail probes and one heartbeat");
    assert_eq!(sends(&log).len(), sent.len() + probes, "nothing else");
}

/// A peer that said little: forged NACKs for 70 s, every 20 ms, while alice says a message
/// every 5 s. Within any repair window at most 64 KiB (+ one message) of repairs go out.
#[test]
fn forged_nacks_cannot_make_a_peer_send_more_than_its_byte_budget_per_window() {
    let mut r = Rig::peer("alice", ALICE);
    r.enter(0);
    let mut said = 0;
    let mut t = 0;
    while t < 70_000 {
        if t % 5000 == 0 {
            said += 1;
            r.say(t, Kind::Message, &format!("message number {said}"));
        }
        r.hear(t + 1, &forged_nack("1-100", UNIX0 + t + 1), host(66));
        t += 20;
    }
    r.run_to(70_000);
    let log = r.take();
    let sent = repairs(&log);
    let biggest = sent.iter().map(|(_, _, d)| d.len as u64).max().unwrap();
    let held_max = 7 * biggest; // what was said within the last 30 s
    let cap = (2 * held_max).max(MIN_REPAIR_BYTES as u64);
    assert_eq!(cap, MIN_REPAIR_BYTES as u64);
    let window = REPAIR_WINDOW;
    let mut worst = 0;
    for (i, (start, ..)) in sent.iter().enumerate() {
        let in_window: u64 = sent[i..]
            .iter()
            .take_while(|(at, ..)| *at - *start <= window)
            .map(|(_, _, d)| d.len as u64)
            .sum();
        worst = worst.max(in_window);
    }
    assert!(
        worst <= cap + biggest,
        "{worst} bytes of repairs within {window:?}: more than {cap} + {biggest}"
    );
    assert!(
        worst + biggest > cap,
        "the budget is there to be used: {worst}"
    );
    let total: u64 = sent.iter().map(|(_, _, d)| d.len as u64).sum();
    let s = r.e.stats();
    assert_eq!(s.repair_bytes, total);
    assert_eq!(s.repairs_sent, sent.len() as u64);
    assert!(s.repairs_refused > 0);
}

// ---------------------------------------------------------------------------------------
// 6. Presence

#[test]
fn a_forged_leave_does_not_remove_a_member_for_good() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    r.hear(0, &control(ALICE, "alice", Kind::Join, 0, UNIX0), host(1));
    assert_eq!(r.e.members(), ["alice", "bob"]);
    r.hear(
        1000,
        &control(ALICE, "alice", Kind::Leave, 0, UNIX0 + 1000),
        host(66),
    );
    assert_eq!(r.e.members(), ["bob"]);
    r.hear(2000, &msg(ALICE, "alice", 1, UNIX0 + 2000), host(1));
    assert_eq!(r.e.members(), ["alice", "bob"]);
    r.hear(
        15_000,
        &control(ALICE, "alice", Kind::Heartbeat, 1, UNIX0 + 15_000),
        host(1),
    );
    r.hear(16_000, &msg(ALICE, "alice", 2, UNIX0 + 16_000), host(1));
    r.run_to(60_000);
    let log = r.take();
    let ev: Vec<Event> = events(&log)
        .into_iter()
        .map(|e| match e {
            Event::Message(m) => Event::Message(Received { recv_ms: 0, ..m }),
            other => other,
        })
        .collect();
    let m = |seq: u64, at: u64| {
        Event::Message(Received {
            kind: Kind::Message,
            room: ROOM.into(),
            sender: "alice".into(),
            text: format!("m{seq}"),
            ts_ms: UNIX0 + at,
            recv_ms: 0,
            from: Some(host(1)),
            instance: Some(ALICE),
            seq: Some(seq),
            repair: false,
        })
    };
    assert_eq!(
        ev,
        [
            Event::Presence(Change::Joined("alice".into())),
            Event::Presence(Change::Left("alice".into())),
            Event::Presence(Change::Joined("alice".into())),
            m(1, 2000),
            m(2, 16_000),
        ]
    );
    assert_eq!(r.e.members(), ["alice", "bob"], "still there at 60 s");
    assert!(sends_of(&log, Kind::Nack).is_empty());
}

/// What a sender sent before its leave, arriving after it (a repair of its lost message 2, a
/// late copy of message 3, the daemon's repeat of the leave), is delivered but does not make
/// it a member again: one join and one leave are shown, in that order, and no second join.
#[test]
fn a_departed_sender_s_late_and_repaired_messages_do_not_bring_it_back() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    r.hear(0, &control(ALICE, "alice", Kind::Join, 0, UNIX0), host(1));
    r.hear(10, &msg(ALICE, "alice", 1, UNIX0 + 10), host(1));
    r.hear(
        30,
        &control(ALICE, "alice", Kind::Leave, 3, UNIX0 + 30),
        host(1),
    );
    assert_eq!(r.e.members(), ["bob"]);
    r.hear(40, &msg(ALICE, "alice", 3, UNIX0 + 20), host(1));
    r.hear(150, &repair_of(ALICE, "alice", 2, UNIX0 + 15), daemon());
    let leave_repeat = encode(
        tagged(ALICE, 3, UNIX0 + 30, Kind::Leave),
        &[repair::REPAIR_TAG],
        "alice",
        "",
    );
    r.hear(330, &leave_repeat, daemon());
    r.run_to(10_000);
    let log = r.take();
    let presence: Vec<Event> = events(&log)
        .into_iter()
        .filter(|e| matches!(e, Event::Presence(_)))
        .collect();
    assert_eq!(
        presence,
        [
            Event::Presence(Change::Joined("alice".into())),
            Event::Presence(Change::Left("alice".into())),
        ]
    );
    assert_eq!(
        shown_seqs(&log, ALICE),
        [1, 2, 3],
        "every message once, in order"
    );
    assert_eq!(r.e.members(), ["bob"]);
}

// ---------------------------------------------------------------------------------------
// 7. The flood of made-up senders (issue 9), at engine level

struct FloodOutcome {
    shown: Vec<u64>,
    nacks: usize,
    wakeups: u64,
    stats: RepairStats,
    load: (usize, usize, usize),
    max_load: (usize, usize),
}

fn flood(second: u64) -> FloodOutcome {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    r.hear(0, &control(ALICE, "alice", Kind::Join, 0, UNIX0), host(1));
    let mut seq = 0;
    let mut alice = |r: &mut Rig, until: u64| {
        while (seq + 1) * 5 <= until {
            seq += 1;
            let at = seq * 5;
            r.hear(at, &msg(ALICE, "alice", seq, UNIX0 + at), host(1));
        }
    };
    alice(&mut r, 1000);
    // Between two of alice's messages, 4096 made-up senders, two heartbeats each.
    r.run_to(1002);
    let wakeups_before = r.wakeups;
    let mut max_load = (0, 0);
    for i in 0..4096u64 {
        let id = InstanceId(0x1000 + i);
        for latest in [0, second] {
            r.e.on_datagram(
                &control(id, "mallory", Kind::Heartbeat, latest, UNIX0 + 1002),
                host(66),
                now_at(r.base, r.now),
            );
            let (_, missing, held) = r.e.receiver_load();
            max_load = (max_load.0.max(missing), max_load.1.max(held));
        }
        r.collect();
    }
    // One second of timers, alice going on every 5 ms.
    for step in 1..=200 {
        alice(&mut r, 1000 + step * 5);
        let (_, missing, held) = r.e.receiver_load();
        max_load = (max_load.0.max(missing), max_load.1.max(held));
    }
    r.run_to(2000);
    let log = r.take();
    FloodOutcome {
        shown: shown_seqs(&log, ALICE),
        nacks: sends_of(&log, Kind::Nack).len(),
        wakeups: r.wakeups - wakeups_before,
        stats: r.e.repair_stats(),
        load: r.e.receiver_load(),
        max_load,
    }
}

#[test]
fn a_flood_of_made_up_senders_costs_bounded_work_and_spares_a_real_one() {
    let config = RepairConfig::default();
    let o = flood(60);
    eprintln!(
        "{:?}, {} NACKs, {} wake-ups, load {:?}, max {:?}",
        o.stats, o.nacks, o.wakeups, o.load, o.max_load
    );
    assert_eq!(
        o.shown,
        (1..=400).collect::<Vec<_>>(),
        "alice: all, in order, once"
    );
    assert!(
        o.nacks <= 2 * config.presence_nacks_per_second as usize,
        "{} NACKs",
        o.nacks
    );
    assert!(
        o.nacks > 0,
        "the made-up gaps were asked for, within the budget"
    );
    assert!(
        o.stats.visited
            <= 2 * u64::from(config.presence_nacks_per_second) * config.presence_window + 10_000,
        "{} entries visited",
        o.stats.visited
    );
    assert!(
        o.max_load.0 <= config.max_missing,
        "{} missing",
        o.max_load.0
    );
    assert!(
        o.max_load.1 <= config.max_held_bytes,
        "{} bytes held",
        o.max_load.1
    );
    assert!(o.load.0 <= config.max_senders);
    assert!(
        o.wakeups <= 2 * u64::from(config.presence_nacks_per_second) + 50,
        "{} wake-ups",
        o.wakeups
    );
    assert!(
        o.wakeups <= o.nacks as u64 + 10,
        "every wake-up has work to do"
    );
}

#[test]
fn a_flood_claiming_seq_2_pow_64_minus_2_costs_no_nacks() {
    let o = flood(u64::MAX - 1);
    eprintln!("{:?}, {} wake-ups", o.stats, o.wakeups);
    assert_eq!(o.shown, (1..=400).collect::<Vec<_>>());
    assert_eq!(o.nacks, 0);
    assert_eq!(o.max_load, (0, 0));
    assert_eq!(o.stats.nacks_sent, 0);
    assert!(o.stats.visited <= 10_000, "{}", o.stats.visited);
    assert!(o.wakeups <= 50, "{} wake-ups", o.wakeups);
}

// ---------------------------------------------------------------------------------------
// 8. The relay client

fn via(name: &str) -> Rig {
    let mut config = PeerConfig::new(ROOM, name, daemon());
    config.subscribe = true;
    Rig::new(config, ALICE)
}

/// The nonce of `r`'s subscription, which mcchatd echoes.
fn nonce(r: &Rig) -> String {
    r.e.relay.as_ref().expect("a --via rig").nonce().to_owned()
}

/// An answer from the daemon to `r`'s subscription, echoing its nonce as mcchatd does.
fn answer(r: &Rig, kind: Kind, tags: &[(&str, &str)], text: &str) -> Vec<u8> {
    let nonce = nonce(r);
    let mut all = tags.to_vec();
    all.push(("nonce", &nonce));
    relay_control(kind, &all, text)
}

/// The daemon's answers to `r`'s subscription at `at_ms`: a challenge with cookie `c.1`,
/// then (10 ms later) `subok` with a 60 s lease and cookie `c.2`.
fn subscribe_at(r: &mut Rig, at_ms: u64) {
    let challenge = answer(r, Kind::Challenge, &[("cookie", "c.1")], "");
    r.hear(at_ms, &challenge, daemon());
    let subok = answer(
        r,
        Kind::Subscribed,
        &[("lease", "60"), ("cookie", "c.2")],
        "",
    );
    r.hear(at_ms + 10, &subok, daemon());
}

fn relay_requests(log: &[(Instant, Effect)]) -> Vec<(Instant, SocketAddr, Dg)> {
    sends(log)
        .into_iter()
        .filter(|(_, _, d)| d.kind.is_relay_control())
        .collect()
}

#[test]
fn subscribing_through_the_relay_cookie_subok_renewals_and_unsub() {
    let mut r = via("alice");
    r.enter(0);
    let log = r.take();
    let all = sends(&log);
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].2.kind, Kind::Join);
    let (_, to, sub) = &all[1];
    assert_eq!(*to, daemon());
    assert_eq!(sub.kind, Kind::Subscribe);
    assert_eq!((sub.id, sub.tag("cookie")), (None, None));
    assert_eq!(sub.sender, "alice");
    assert!(sub.len >= 256, "padded: {} bytes", sub.len);
    assert!(sub.tag("pad").is_some());

    r.hear(
        50,
        &answer(&r, Kind::Challenge, &[("cookie", "6743a1f2.c1")], ""),
        daemon(),
    );
    let sub = relay_requests(&r.take());
    assert_eq!(sub.len(), 1);
    assert_eq!(sub[0].2.kind, Kind::Subscribe);
    assert_eq!(sub[0].2.tag("cookie"), Some("6743a1f2.c1"));
    assert!(sub[0].2.len >= 256);
    assert!(!r.e.subscribed());

    assert_eq!(sub[0].2.tag("nonce"), Some(nonce(&r).as_str()));
    let n = nonce(&r);
    let subok = |cookie: &str| {
        relay_control(
            Kind::Subscribed,
            &[("lease", "60"), ("cookie", cookie), ("nonce", &n)],
            "",
        )
    };
    r.hear(100, &subok("6743a1f7.x1"), daemon());
    assert_eq!(events(&r.log), [Event::Subscribed]);
    assert!(r.e.subscribed());
    r.take();
    // Renewals every 20 s (a third of the lease), each with the newest cookie.
    r.run_to(20_150);
    r.hear(20_150, &subok("6743a1f8.x2"), daemon());
    r.run_to(40_200);
    r.hear(40_200, &subok("6743a1f9.x3"), daemon());
    r.run_to(60_300);
    let log = r.take();
    let renewals = relay_requests(&log);
    assert_eq!(times_ms(&r, &renewals), [20_100, 40_150, 60_200]);
    let cookies: Vec<&str> = renewals
        .iter()
        .map(|(_, _, d)| d.tag("cookie").unwrap())
        .collect();
    assert_eq!(cookies, ["6743a1f7.x1", "6743a1f8.x2", "6743a1f9.x3"]);
    assert!(
        renewals
            .iter()
            .all(|(_, to, d)| *to == daemon() && d.kind == Kind::Subscribe && d.len >= 256)
    );
    assert!(events(&log).is_empty(), "Subscribed is shown once");

    r.leave(61_000);
    let log = r.take();
    let all = sends(&log);
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].2.kind, Kind::Leave);
    assert_eq!(all[1].1, daemon());
    assert_eq!(all[1].2.kind, Kind::Unsubscribe);
    assert_eq!(all[1].2.tag("cookie"), Some("6743a1f9.x3"));
    assert!(all[1].2.len >= 256);
    assert!(!r.e.subscribed());
}

/// PROTOCOL 5.1: through mcchatd a NACK carries the subscription's newest cookie, as the
/// first (hop-by-hop) tag, so the daemon can tell it from one with a forged source.
#[test]
fn nacks_through_the_relay_carry_the_newest_cookie() {
    let mut r = via("alice");
    r.enter(0);
    subscribe_at(&mut r, 340);
    r.hear(360, &msg(BOB, "bob", 1, UNIX0 + 360), daemon());
    r.hear(400, &msg(BOB, "bob", 6, UNIX0 + 400), daemon());
    r.run_to(700);
    let log = r.take();
    let nacks: Vec<_> = log
        .iter()
        .filter_map(|(_, e)| match e {
            Effect::Send { to, bytes } if Dg::parse(bytes).kind == Kind::Nack => {
                Some((*to, bytes.clone()))
            }
            _ => None,
        })
        .collect();
    assert!(!nacks.is_empty());
    for (to, bytes) in &nacks {
        assert_eq!(*to, daemon());
        assert!(
            bytes.starts_with(b"@cookie=c.2;"),
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
}

/// PROTOCOL 4.3: through mcchatd everything a peer sends (messages, their repairs,
/// presence) carries the cookie, so the daemon relays it under this address's own budget;
/// long text is split with room left for it, so nothing goes unproven.
#[test]
fn everything_sent_through_the_relay_carries_the_cookie_and_fits() {
    let mut r = via("alice");
    r.enter(0);
    subscribe_at(&mut r, 340);
    r.take();
    r.say(400, Kind::Message, "hello");
    let long = "x".repeat(3000);
    r.say(410, Kind::Message, &long);
    r.hear(430, &nack(BOB, "bob", ALICE, "1-4", UNIX0 + 430), daemon());
    r.run_to(20_000);
    let log = r.take();
    let mut kinds = Vec::new();
    for (_, e) in &log {
        let Effect::Send { to, bytes } = e else {
            continue;
        };
        assert_eq!(*to, daemon());
        assert!(
            bytes.starts_with(b"@cookie=c.2;"),
            "{}",
            String::from_utf8_lossy(bytes)
        );
        // With the longest cookie (49 bytes for `cookie=TIME.MAC;`) instead of "c.2" the
        // datagram would still be a writer's at most once the daemon strips it.
        assert!(bytes.len() - "cookie=c.2;".len() + 49 <= MAX_DATAGRAM);
        let d = Dg::parse(bytes);
        kinds.push((d.kind, d.tag("repair").is_some()));
    }
    let messages = kinds
        .iter()
        .filter(|k| **k == (Kind::Message, false))
        .count();
    let repairs = kinds
        .iter()
        .filter(|k| **k == (Kind::Message, true))
        .count();
    assert_eq!((messages, repairs), (4, 4), "{kinds:?}");
    assert!(kinds.iter().any(|k| k.0 == Kind::Heartbeat), "{kinds:?}");
}

/// `mcchat send --via`: one round trip for a cookie, no subscription, then the messages
/// with the cookie; a fresh cookie is asked for before the first is too old.
#[test]
fn a_one_shot_sender_proves_its_address_and_subscribes_to_nothing() {
    let mut config = PeerConfig::new(ROOM, "alice", daemon());
    config.prove = true;
    let mut r = Rig::new(config, ALICE);
    assert!(r.e.subscribes());
    r.enter(0);
    let sub = relay_requests(&r.take());
    assert_eq!(sub.len(), 1);
    assert_eq!(
        (sub[0].2.kind, sub[0].2.tag("cookie")),
        (Kind::Subscribe, None)
    );
    assert!(sub[0].2.len >= 256, "padded as any request");
    r.hear(
        50,
        &answer(&r, Kind::Challenge, &[("cookie", "6743a1f2.c1")], ""),
        daemon(),
    );
    let log = r.take();
    assert_eq!(events(&log), [Event::Subscribed]);
    assert!(relay_requests(&log).is_empty(), "no sub with the cookie");
    assert!(!r.e.subscribed());
    r.say(60, Kind::Message, "hi");
    let sent = sends(&r.take());
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].2.tag("cookie"), Some("6743a1f2.c1"));
    assert_eq!(sent[0].2.text, "hi");
    // 100 s on, a bare `sub` again (never one with the cookie, which would subscribe).
    r.run_to(100_100);
    let again = relay_requests(&r.take());
    assert_eq!(times_ms(&r, &again), [100_050]);
    assert_eq!(again[0].2.tag("cookie"), None);
    r.hear(
        100_060,
        &answer(&r, Kind::Challenge, &[("cookie", "6743a256.c2")], ""),
        daemon(),
    );
    assert!(events(&r.take()).is_empty(), "told once");
    r.say(100_070, Kind::Message, "later");
    assert_eq!(sends(&r.take())[0].2.tag("cookie"), Some("6743a256.c2"));
    // Leaving sends no unsub: there is nothing to end.
    r.leave(100_080);
    assert!(relay_requests(&r.take()).is_empty());
}

#[test]
fn no_answer_from_the_relay_in_3_tries_ends_the_engine() {
    let mut r = via("");
    r.enter(0);
    r.run_to(10_000);
    let log = r.take();
    let subs = relay_requests(&log);
    assert_eq!(times_ms(&r, &subs), [0, 1000, 2000]);
    assert!(
        subs.iter()
            .all(|(_, _, d)| d.kind == Kind::Subscribe && d.sender == "listener")
    );
    assert_eq!(sends(&log).len(), 3);
    let ended = shown(&log);
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].0, r.t(3000));
    assert!(
        matches!(&ended[0].1, Event::Ended(why) if why.starts_with("no answer from mcchatd at 192.0.2.1:5554 after 3 tries")),
        "{:?}",
        ended[0].1
    );
    assert_eq!(r.e.next_deadline(), None, "nothing more to do");
}

/// PROTOCOL 4.2: answers that do not echo the subscription's nonce are forgeries (anyone on
/// the LAN can send from the daemon's address): a `closed` does not end the engine, a `subok`
/// with a long lease does not stop its renewals, a `cookie` does not replace its cookie.
#[test]
fn relay_answers_without_the_nonce_are_ignored() {
    let mut r = via("alice");
    r.enter(0);
    let forged_challenge = relay_control(Kind::Challenge, &[("cookie", "f.0")], "");
    r.hear(5, &forged_challenge, daemon());
    subscribe_at(&mut r, 10);
    r.take();
    let wrong = [("nonce", "ffffffffffffffff")];
    for (at, bytes) in [
        (1000, relay_control(Kind::Closed, &[], "forged")),
        (1100, relay_control(Kind::Closed, &wrong, "forged")),
        (
            1200,
            relay_control(
                Kind::Subscribed,
                &[("lease", "3600"), ("cookie", "f.1")],
                "",
            ),
        ),
        (
            1300,
            relay_control(Kind::Challenge, &[("cookie", "f.2"), wrong[0]], ""),
        ),
    ] {
        r.hear(at, &bytes, daemon());
    }
    assert_eq!(
        r.e.relay.as_ref().unwrap().ignored,
        5,
        "one forged challenge, then four"
    );
    r.run_to(20_100);
    let log = r.take();
    assert!(events(&log).is_empty(), "not ended");
    assert!(r.e.subscribed());
    let renewals = relay_requests(&log);
    assert_eq!(renewals.len(), 1, "renewed at 20 s, the real lease's third");
    assert_eq!(
        renewals[0].2.tag("cookie"),
        Some("c.2"),
        "the daemon's cookie"
    );
}

/// PROTOCOL 4.2: with a long lease, renewals still come at least every 100 s, so the cookie
/// from the last `subok` (valid 120 s) is always fresh for NACKs and renewals.
#[test]
fn renewals_come_at_least_every_100_s_whatever_the_lease() {
    let mut r = via("alice");
    r.enter(0);
    let challenge = answer(&r, Kind::Challenge, &[("cookie", "c.1")], "");
    r.hear(10, &challenge, daemon());
    let subok = answer(
        &r,
        Kind::Subscribed,
        &[("lease", "3600"), ("cookie", "c.2")],
        "",
    );
    r.hear(20, &subok, daemon());
    r.take();
    r.run_to(300_100);
    let renewals = relay_requests(&r.take());
    assert_eq!(times_ms(&r, &renewals), [100_020, 200_020, 300_020]);
}

#[test]
fn closed_from_the_relay_ends_the_engine() {
    let mut r = via("");
    r.enter(0);
    subscribe_at(&mut r, 10);
    r.hear(
        5000,
        &answer(&r, Kind::Closed, &[], "mcchatd is stopping"),
        daemon(),
    );
    r.run_to(100_000);
    r.leave(100_000);
    let log = r.take();
    assert_eq!(
        events(&log),
        [
            Event::Subscribed,
            Event::Ended(
                "mcchatd at 192.0.2.1:5554 ended the subscription to room1: mcchatd is stopping"
                    .into()
            )
        ]
    );
    assert_eq!(sends(&log).len(), 2, "the two subs; no renewal, no unsub");
    assert!(!r.e.subscribed());
}

// ---------------------------------------------------------------------------------------
// 9. A listener

#[test]
fn a_listener_sends_no_presence_but_nacks_as_listener() {
    let config = PeerConfig::new(ROOM, "", group());
    assert!(!config.presence);
    let mut r = Rig::new(config, CAROL);
    r.enter(0);
    r.run_to(30_000);
    assert!(r.log.is_empty(), "no join, no heartbeat");
    assert_eq!(r.e.next_deadline(), None);
    r.hear(30_000, &msg(ALICE, "alice", 1, UNIX0 + 30_000), host(1));
    r.hear(30_010, &msg(ALICE, "alice", 3, UNIX0 + 30_010), host(1));
    r.run_to(30_050);
    let nacks = sends_of(&r.log, Kind::Nack);
    assert_eq!(nacks.len(), 1);
    let (_, to, d) = &nacks[0];
    assert_eq!(*to, group());
    assert_eq!(d.sender, "listener");
    assert_eq!((d.id, d.seq), (Some(CAROL), Some(0)));
    assert_eq!(
        (d.tag("for"), d.tag("seqs")),
        (Some("a11ce00000000001"), Some("2"))
    );
    r.hear(
        30_060,
        &repair_of(ALICE, "alice", 2, UNIX0 + 30_005),
        host(1),
    );
    r.run_to(120_000);
    r.leave(120_000);
    let log = r.take();
    assert_eq!(sends(&log).len(), 1, "only the NACK, ever");
    assert_eq!(
        seen(&log),
        [Seen::Msg(1, false), Seen::Msg(2, true), Seen::Msg(3, false)]
    );
    assert_eq!(
        r.e.members(),
        [] as [String; 0],
        "alice timed out; a listener is no member"
    );
    assert_eq!(r.e.stats().heartbeats, 0);
}

// ---------------------------------------------------------------------------------------
// Several engines on a tiny network

/// Engines on one multicast group: what one sends reaches the others 1 ms later, unless
/// `drop` says it is lost on the way.
struct Net {
    base: Instant,
    now: Instant,
    peers: Vec<(PeerEngine, SocketAddr)>,
    /// (arrival, destination, source, datagram), in arrival order.
    queue: VecDeque<(Instant, usize, SocketAddr, Vec<u8>)>,
    /// What each peer showed.
    shown: Vec<Vec<Event>>,
    /// Every datagram sent: (sender index, datagram).
    wire: Vec<(usize, Dg)>,
}

impl Net {
    fn new(names: &[(&str, InstanceId)]) -> Self {
        let base = Instant::now();
        let peers = names
            .iter()
            .enumerate()
            .map(|(i, (name, id))| {
                let e = PeerEngine::new(
                    PeerConfig::new(ROOM, name, group()),
                    *id,
                    id.0,
                    now_at(base, base),
                );
                (e, host(u8::try_from(i + 1).unwrap()))
            })
            .collect();
        Self {
            base,
            now: base,
            peers,
            queue: VecDeque::new(),
            shown: vec![Vec::new(); names.len()],
            wire: Vec::new(),
        }
    }

    fn collect(&mut self, i: usize, drop: &impl Fn(usize, usize, &Dg) -> bool) {
        while let Some(effect) = self.peers[i].0.poll_effect() {
            match effect {
                Effect::Show(e) => self.shown[i].push(e),
                Effect::Send { to, bytes } => {
                    assert_eq!(to, group());
                    let d = Dg::parse(&bytes);
                    for dest in 0..self.peers.len() {
                        if dest != i && !drop(i, dest, &d) {
                            let from = self.peers[i].1;
                            self.queue
                                .push_back((self.now + ms(1), dest, from, bytes.clone()));
                        }
                    }
                    self.wire.push((i, d));
                }
            }
        }
    }

    fn act(
        &mut self,
        i: usize,
        drop: &impl Fn(usize, usize, &Dg) -> bool,
        f: impl FnOnce(&mut PeerEngine, Now),
    ) {
        let now = now_at(self.base, self.now);
        f(&mut self.peers[i].0, now);
        self.collect(i, drop);
    }

    /// Runs timers and deliveries up to `until`.
    fn run(&mut self, until: Instant, drop: &impl Fn(usize, usize, &Dg) -> bool) {
        loop {
            let timer = self
                .peers
                .iter()
                .enumerate()
                .filter_map(|(i, (e, _))| e.next_deadline().map(|t| (t, i)))
                .min();
            let packet = self.queue.front().map(|(t, ..)| *t);
            let next = [timer.map(|(t, _)| t), packet].into_iter().flatten().min();
            let Some(next) = next.filter(|t| *t <= until) else {
                break;
            };
            self.now = next.max(self.now);
            if packet == Some(next) {
                let Some((_, dest, from, bytes)) = self.queue.pop_front() else {
                    break;
                };
                self.act(dest, drop, |e, now| e.on_datagram(&bytes, from, now));
            } else if let Some((_, i)) = timer {
                self.act(i, drop, |e, now| e.poll(now));
            }
        }
        self.now = self.now.max(until);
    }
}

#[test]
fn a_loss_seen_by_two_receivers_costs_one_nack_and_one_repair() {
    let mut net = Net::new(&[("alice", ALICE), ("bob", BOB), ("carol", CAROL)]);
    // Alice's message 2 is lost on its way to both bob and carol.
    let drop = |from: usize, _: usize, d: &Dg| {
        from == 0 && d.seq == Some(2) && !d.is_repair() && d.kind == Kind::Message
    };
    for i in 0..3 {
        net.act(i, &drop, |e, now| e.enter(now));
    }
    net.run(net.base + ms(1000), &drop);
    for (k, text) in ["one", "two", "three"].into_iter().enumerate() {
        net.run(net.base + ms(1000 + 10 * k as u64), &drop);
        net.act(0, &drop, |e, now| e.say(Kind::Message, text, now).unwrap());
    }
    net.run(net.base + ms(10_000), &drop);
    for i in 1..3 {
        let texts: Vec<&str> = net.shown[i]
            .iter()
            .filter_map(|e| match e {
                Event::Message(m) => Some(m.text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(texts, ["one", "two", "three"], "peer {i}");
        assert!(!net.shown[i].iter().any(|e| matches!(e, Event::Lost { .. })));
    }
    let nacks = net
        .wire
        .iter()
        .filter(|(_, d)| d.kind == Kind::Nack)
        .count();
    assert_eq!(nacks, 1, "the other receiver heard it and held back");
    assert_eq!(net.peers[0].0.stats().repairs_sent, 1);
    let s = net.peers[1].0.repair_stats().nacks_sent + net.peers[2].0.repair_stats().nacks_sent;
    assert_eq!(s, 1);
    assert_eq!(net.peers[1].0.members(), ["alice", "bob", "carol"]);
}

/// Loss notices of senders heard only through presence (a flood of made-up ids given up
/// over time) are one line per 10 s, summed, not one per sender; a real sender's loss is
/// still named at once.
#[test]
fn loss_notices_of_presence_only_senders_are_summed() {
    let mut bob = Rig::peer("bob", BOB);
    bob.enter(0);
    let attacker = host(66);
    // 300 made-up ids, 10 a second, each claiming 5 messages we never saw.
    for i in 0..300u64 {
        let at = i * 100;
        let id = InstanceId(0xf00d_0000_0000_0000 + i);
        let ts = bob.unix(bob.t(at));
        bob.hear(at, &control(id, "x", Kind::Heartbeat, 0, ts), attacker);
        bob.hear(at, &control(id, "x", Kind::Heartbeat, 5, ts), attacker);
    }
    // Alice, whose messages did arrive, loses one: named at once.
    let ts = bob.unix(bob.t(30_000));
    bob.hear(30_000, &msg(ALICE, "alice", 1, ts), host(2));
    bob.hear(30_000, &msg(ALICE, "alice", 3, ts), host(2));
    bob.run_to(60_000);
    let lost: Vec<(Duration, String, u64)> = shown(&bob.take())
        .into_iter()
        .filter_map(|(at, e)| match e {
            Event::Lost { sender, count } => Some((bob.since(at), sender, count)),
            _ => None,
        })
        .collect();
    let (alice, others): (Vec<_>, Vec<_>) = lost.iter().partition(|(_, s, _)| s == "alice");
    assert_eq!(alice.len(), 1, "{lost:?}");
    assert_eq!(alice[0].2, 1);
    let total: u64 = others.iter().map(|(_, _, c)| c).sum();
    assert_eq!(total, 300 * 5, "every made-up loss is counted: {others:?}");
    // About 34 s of give-ups: a notice at the first, then at most one per 10 s.
    assert!(others.len() <= 5, "{others:?}");
    for pair in others.windows(2) {
        assert!(pair[1].0 - pair[0].0 >= UNHEARD_LOST_EVERY, "{others:?}");
    }
    assert!(
        others
            .iter()
            .skip(1)
            .all(|(_, s, _)| s.ends_with("senders heard only through presence")),
        "{others:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Regressions from the review of the engine.

/// Alice's messages `seqs` as mcchatd's history returns them.
fn alice_history(seqs: std::ops::RangeInclusive<u64>) -> Vec<Received> {
    seqs.map(|s| Received {
        kind: Kind::Message,
        room: ROOM.into(),
        sender: "alice".into(),
        text: format!("m{s}"),
        ts_ms: UNIX0,
        recv_ms: UNIX0,
        from: None,
        instance: Some(ALICE),
        seq: Some(s),
        repair: false,
    })
    .collect()
}

/// Forged jumps towards 2^64 count losses that do not overflow (debug builds panicked).
#[test]
fn forged_jumps_towards_2_pow_64_do_not_overflow_the_counters() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    for id in [InstanceId(0x1111), InstanceId(0x2222)] {
        let ts = r.unix(r.t(10));
        r.hear(10, &msg(id, "x", 100, ts - 60_000), host(9));
        r.hear(
            10,
            &control(id, "x", Kind::Heartbeat, u64::MAX - 1, ts),
            host(9),
        );
        r.hear(
            10,
            &control(id, "x", Kind::Heartbeat, u64::MAX - 1, ts),
            host(9),
        );
    }
    assert!(r.e.repair_stats().lost > 0);
}

/// One heartbeat in alice's name before bob has heard her does not silence her.
#[test]
fn a_forged_first_heartbeat_does_not_silence_a_sender() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    let ts = r.unix(r.t(10));
    r.hear(
        10,
        &control(ALICE, "alice", Kind::Heartbeat, 1 << 40, ts),
        host(66),
    );
    for s in 1..=5u64 {
        let ts = r.unix(r.t(100 * s));
        r.hear(100 * s, &msg(ALICE, "alice", s, ts), host(2));
    }
    r.run_to(20_000);
    assert_eq!(shown_seqs(&r.take(), ALICE), [1, 2, 3, 4, 5]);
}

/// After history, a replayed (or duplicated) live message is not shown twice.
#[test]
fn a_replay_after_history_is_shown_once() {
    let mut r = Rig::peer("bob", BOB);
    let hist = alice_history(1..=20);
    r.e.preload(hist, now_at(r.base, r.base));
    r.collect();
    r.enter(0);
    for s in 21..=23u64 {
        let ts = r.unix(r.t(100 * s));
        r.hear(100 * s, &msg(ALICE, "alice", s, ts), host(2));
    }
    let ts = r.unix(r.t(2100));
    r.hear(2400, &msg(ALICE, "alice", 21, ts), host(2));
    let ts = r.unix(r.t(2500));
    r.hear(2500, &msg(ALICE, "alice", 24, ts), host(2));
    r.run_to(10_000);
    let seqs = shown_seqs(&r.take(), ALICE);
    assert_eq!(seqs, (1..=24).collect::<Vec<_>>());
}

/// History for a sender already followed (heard while subscribing) goes through the
/// receiver: nothing shown twice, in order.
#[test]
fn history_of_a_sender_already_followed_is_not_shown_twice() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    let ts = r.unix(r.t(10));
    r.hear(10, &msg(ALICE, "alice", 19, ts - 60_000), host(2));
    r.hear(10, &msg(ALICE, "alice", 20, ts), host(2));
    let hist = alice_history(15..=20);
    r.e.preload(hist, now_at(r.base, r.t(20)));
    r.collect();
    r.run_to(5_000);
    let seqs = shown_seqs(&r.take(), ALICE);
    assert_eq!(
        seqs,
        [19, 20],
        "history below where alice was taken up is not shown again"
    );
}

/// Forged joins cannot make a peer heartbeat at their rate: one early heartbeat a second.
#[test]
fn forged_joins_bring_heartbeats_forward_at_most_once_a_second() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    r.take();
    for i in 0..200u64 {
        let at = 1000 + i * 10;
        let ts = r.unix(r.t(at));
        r.hear(
            at,
            &control(InstanceId(0x1000 + i), "x", Kind::Join, 0, ts),
            host(66),
        );
    }
    r.run_to(3000);
    let hbs = sends_of(&r.take(), Kind::Heartbeat);
    assert!(
        hbs.len() <= 3,
        "{} heartbeats in 2 s for 200 forged joins",
        hbs.len()
    );
    assert!(!hbs.is_empty(), "a newcomer is still answered soon");
}

// ---------------------------------------------------------------------------------------
// 10. Hop-by-hop tags (PROTOCOL 2.8)

/// `data` with the hop-by-hop tag `key=value` in front, as a relay or cache adds it.
fn with_hop_tag(data: &[u8], key: &str, value: &str) -> Vec<u8> {
    let mut out = Vec::new();
    tags::add_hop_tag(data, key, value, &mut out).unwrap();
    out
}

/// A daemon's `relay=ID` on what a peer hears changes nothing it does or shows: the same
/// conversation (presence, a gap and its NACK, a repair, a NACK for the peer's own message,
/// a leave) heard with and without the tag gives the same effects at the same times.
#[test]
fn a_relay_tag_changes_nothing_for_a_peer() {
    let script = |r: &Rig| -> Vec<(u64, Vec<u8>)> {
        let ts = |at: u64| r.unix(r.t(at));
        vec![
            (10, control(ALICE, "alice", Kind::Join, 0, ts(10))),
            (100, msg(ALICE, "alice", 1, ts(100))),
            (300, msg(ALICE, "alice", 3, ts(300))),
            (400, repair_of(ALICE, "alice", 2, ts(200))),
            (600, nack(CAROL, "carol", BOB, "1", ts(600))),
            (800, msg(ALICE, "alice", 5, ts(800))),
            (5000, control(ALICE, "alice", Kind::Leave, 5, ts(5000))),
        ]
    };
    let run = |relay: Option<&str>| {
        let mut r = Rig::peer("bob", BOB);
        r.enter(0);
        r.say(500, Kind::Message, "hello");
        for (at, data) in script(&r) {
            let data = relay.map_or_else(|| data.clone(), |id| with_hop_tag(&data, "relay", id));
            r.hear(at, &data, host(2));
        }
        r.run_to(30_000);
        let log = r.take();
        let at: Vec<Duration> = log.iter().map(|(t, _)| r.since(*t)).collect();
        (log, at)
    };
    let (plain, plain_at) = run(None);
    let (relayed, relayed_at) = run(Some("0123abcd"));
    assert_eq!(shown_seqs(&plain, ALICE), [1, 2, 3, 5]);
    assert!(
        !sends_of(&plain, Kind::Nack).is_empty(),
        "the gap at 4 was asked for"
    );
    assert_eq!(
        sends(&plain)
            .iter()
            .filter(|(_, _, d)| d.is_repair())
            .count(),
        1,
        "carol's NACK was answered"
    );
    assert_eq!(plain_at, relayed_at);
    let effects =
        |log: &[(Instant, Effect)]| log.iter().map(|(_, e)| e.clone()).collect::<Vec<_>>();
    let (plain, relayed) = (effects(&plain), effects(&relayed));
    assert_eq!(plain.len(), relayed.len());
    for (i, (a, b)) in plain.iter().zip(&relayed).enumerate() {
        assert_eq!(a, b, "effect {i}");
    }
}

/// Long text: every datagram is at most 1164 bytes (1200 less the hop-by-hop reserve), each
/// piece measured against its own header, so a fresh sender's full pieces are exactly that,
/// also once `seq` gains a digit; its repairs and a relay's tag on top still fit.
#[test]
fn long_text_is_split_within_the_hop_reserve() {
    let mut r = Rig::peer("alice", ALICE);
    r.enter(0);
    r.take();
    let text = "x".repeat(12_000);
    r.say(10, Kind::Message, &text);
    let log = r.take();
    let raw: Vec<Vec<u8>> = log
        .iter()
        .filter_map(|(_, e)| match e {
            Effect::Send { bytes, .. } => Some(bytes.clone()),
            Effect::Show(_) => None,
        })
        .collect();
    assert_eq!(raw.len(), 11);
    let lens: Vec<usize> = raw.iter().map(Vec::len).collect();
    assert!(
        lens[..10].iter().all(|n| *n == tags::MAX_WRITTEN),
        "{lens:?}"
    );
    assert_eq!(tags::MAX_WRITTEN, 1164);
    let got: String = raw.iter().map(|b| Dg::parse(b).text).collect();
    assert_eq!(got, text);

    r.hear(100, &nack(BOB, "bob", ALICE, "1-11", UNIX0 + 100), host(2));
    let repairs: Vec<Vec<u8>> = r
        .take()
        .into_iter()
        .filter_map(|(_, e)| match e {
            Effect::Send { bytes, .. } => Some(bytes),
            Effect::Show(_) => None,
        })
        .collect();
    assert_eq!(repairs.len(), 11);
    for (repair, original) in repairs.iter().zip(&raw) {
        assert_eq!(repair.len(), original.len() + "repair=1;".len());
        assert!(with_hop_tag(repair, "relay", "0123abcd").len() <= MAX_DATAGRAM);
    }
}

// ---------------------------------------------------------------------------------------
// 11. Rules PROTOCOL.md states for a second implementation

fn meta_of(id: Option<InstanceId>, seq: Option<u64>, ts: Option<u64>, kind: Kind) -> Meta {
    Meta {
        instance: id,
        seq,
        ts_ms: ts,
        kind,
    }
}

/// PROTOCOL 5: a NACK carries the NACKer's latest `seq` (like `hb`) and takes no number;
/// its `for` and `seqs` name what it asks for.
#[test]
fn a_nack_carries_the_latest_seq_and_takes_no_number() {
    let mut r = Rig::peer("alice", ALICE);
    r.enter(0);
    r.say(10, Kind::Message, "one");
    r.say(20, Kind::Message, "two");
    r.take();
    r.hear(100, &msg(BOB, "bob", 1, UNIX0 + 100), host(2));
    r.hear(110, &msg(BOB, "bob", 3, UNIX0 + 110), host(2));
    r.run_to(200);
    let nacks = sends_of(&r.take(), Kind::Nack);
    assert_eq!(nacks.len(), 1);
    let d = &nacks[0].2;
    assert_eq!(
        (d.id, d.seq, d.sender.as_str()),
        (Some(ALICE), Some(2), "alice")
    );
    assert_eq!(
        (d.tag("for"), d.tag("seqs")),
        (Some("b0b0000000000002"), Some("2"))
    );
    r.say(300, Kind::Message, "three");
    let next = sends_of(&r.take(), Kind::Message);
    assert_eq!(next[0].2.seq, Some(3), "the NACK took no number");
}

/// PROTOCOL 5: a sender's repairs go where it sends everything: the group, or the daemon
/// with `--via` (which relays them); `repair=1` is the first tag.
#[test]
fn repairs_go_to_the_daemon_with_via() {
    let mut r = Rig::new(PeerConfig::new(ROOM, "alice", daemon()), ALICE);
    r.say(10, Kind::Message, "one");
    r.take();
    r.hear(100, &nack(BOB, "bob", ALICE, "1", UNIX0 + 100), daemon());
    let log = r.take();
    let repairs: Vec<(SocketAddr, Vec<u8>)> = log
        .into_iter()
        .filter_map(|(_, e)| match e {
            Effect::Send { to, bytes } => Some((to, bytes)),
            Effect::Show(_) => None,
        })
        .collect();
    assert_eq!(repairs.len(), 1);
    assert_eq!(repairs[0].0, daemon());
    assert!(
        repairs[0]
            .1
            .starts_with(b"@repair=1;id=a11ce00000000001;seq=1;")
    );
}

/// PROTOCOL 2.4: only a `join` from an instance not in the roster is shown; one first heard
/// through a heartbeat or a message is a member without an announcement (it was there
/// before), and a later `join` from it is not shown either.
#[test]
fn a_join_from_an_instance_already_heard_is_not_shown() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    r.hear(
        100,
        &control(ALICE, "alice", Kind::Heartbeat, 0, UNIX0 + 100),
        host(1),
    );
    r.hear(
        200,
        &control(ALICE, "alice", Kind::Join, 0, UNIX0 + 200),
        host(1),
    );
    r.hear(
        300,
        &control(CAROL, "carol", Kind::Join, 0, UNIX0 + 300),
        host(3),
    );
    r.hear(
        400,
        &control(CAROL, "carol", Kind::Join, 0, UNIX0 + 400),
        host(3),
    );
    assert_eq!(r.e.members(), ["alice", "bob", "carol"]);
    let presence: Vec<Event> = events(&r.take())
        .into_iter()
        .filter(|e| matches!(e, Event::Presence(_)))
        .collect();
    assert_eq!(presence, [Event::Presence(Change::Joined("carol".into()))]);
}

/// PROTOCOL 2.4: a member is gone once more than 50 s passed since its last datagram (a
/// NACK does not count), checked every second: noticed 50-51 s after it.
#[test]
fn silence_is_noticed_50_to_51_s_after_the_last_datagram() {
    let mut r = Rig::new(PeerConfig::new(ROOM, "", group()), BOB);
    let last = 1_300;
    r.hear(
        last,
        &control(ALICE, "alice", Kind::Heartbeat, 0, UNIX0 + last),
        host(1),
    );
    r.hear(
        20_000,
        &nack(ALICE, "alice", CAROL, "1", UNIX0 + 20_000),
        host(1),
    );
    r.run_to(last + 50_000);
    assert!(events(&r.log).is_empty(), "not at 50 s");
    r.run_to(120_000);
    let gone: Vec<u64> = shown(&r.take())
        .into_iter()
        .filter(|(_, e)| *e == Event::Presence(Change::TimedOut("alice".into())))
        .map(|(t, _)| r.since(t).as_millis() as u64)
        .collect();
    assert_eq!(gone.len(), 1);
    assert!(
        (last + 50_000..=last + 51_000).contains(&gone[0]),
        "noticed at {} ms",
        gone[0]
    );
}

/// PROTOCOL 2.2: `id` without `seq`: a member (presence counts it), its message shown as it
/// comes, unnumbered, never asked for. `seq` without `id`: a bare datagram (no instance to
/// number), shown as it comes, no member, no NACK whatever the number.
#[test]
fn id_without_seq_and_seq_without_id() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    r.take();
    let id_only = encode(
        meta_of(Some(ALICE), None, Some(UNIX0 + 100), Kind::Message),
        &[],
        "alice",
        "unnumbered",
    );
    let seq_only = encode(
        meta_of(None, Some(7), Some(UNIX0 + 200), Kind::Message),
        &[],
        "carol",
        "seven",
    );
    r.hear(100, &id_only, host(1));
    r.hear(200, &seq_only, host(3));
    r.hear(300, &seq_only, host(3));
    r.run_to(10_000);
    let log = r.take();
    assert!(sends_of(&log, Kind::Nack).is_empty());
    let shown: Vec<(Option<InstanceId>, Option<u64>, String)> = events(&log)
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.instance, m.seq, m.text)),
            _ => None,
        })
        .collect();
    assert_eq!(
        shown,
        [
            (Some(ALICE), None, "unnumbered".into()),
            (None, Some(7), "seven".into()),
            (None, Some(7), "seven".into()),
        ],
        "nothing without an id is a duplicate"
    );
    assert_eq!(r.e.members(), ["alice", "bob"]);
}

/// PROTOCOL 2.2 and 5: a message without `ts` counts as sent when it arrived: it is shown
/// with that time, and a low `seq` from a new instance is followed from 1 (sent moments ago).
#[test]
fn a_missing_ts_is_the_arrival_time() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    r.take();
    let no_ts = encode(
        meta_of(Some(ALICE), Some(3), None, Kind::Message),
        &[],
        "alice",
        "m3",
    );
    r.hear(5_000, &no_ts, host(1));
    r.run_to(5_100);
    let log = r.take();
    let m = events(&log).into_iter().find_map(|e| match e {
        Event::Message(m) => Some(m),
        _ => None,
    });
    assert!(m.is_none(), "held: 1 and 2 are missing");
    let nacks = sends_of(&log, Kind::Nack);
    assert_eq!(nacks[0].2.tag("seqs"), Some("1-2"));
    r.hear(5_200, &repair_of(ALICE, "alice", 1, UNIX0 + 4_000), host(1));
    r.hear(5_200, &repair_of(ALICE, "alice", 2, UNIX0 + 4_500), host(1));
    let times: Vec<(u64, u64, u64)> = events(&r.take())
        .into_iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.seq.unwrap(), m.ts_ms, m.recv_ms)),
            _ => None,
        })
        .collect();
    assert_eq!(
        times,
        [
            (1, UNIX0 + 4_000, UNIX0 + 5_200),
            (2, UNIX0 + 4_500, UNIX0 + 5_200),
            (3, UNIX0 + 5_000, UNIX0 + 5_000),
        ]
    );
}

/// PROTOCOL 2.2: an upper-case `id` is the same instance: a copy of a message with the id in
/// upper case is a duplicate, and a NACK whose `for` is upper case is answered.
#[test]
fn upper_case_ids_are_the_same_instance() {
    let mut r = Rig::peer("bob", BOB);
    r.enter(0);
    r.say(10, Kind::Message, "mine");
    r.take();
    let lower = msg(ALICE, "alice", 1, UNIX0 + 100);
    let upper = format!(
        "@id={:016X};seq=1;ts={} room1|alice|m1",
        ALICE.0,
        UNIX0 + 100
    );
    r.hear(100, &lower, host(1));
    r.hear(110, upper.as_bytes(), host(1));
    let nack_upper = format!(
        "@id={:016X};seq=0;ts={};kind=nack;for={:016X};seqs=1 room1|carol|",
        CAROL.0,
        UNIX0 + 200,
        BOB.0
    );
    r.hear(200, nack_upper.as_bytes(), host(3));
    let log = r.take();
    assert_eq!(shown_seqs(&log, ALICE), [1]);
    let repairs: Vec<Dg> = sends(&log)
        .into_iter()
        .map(|(_, _, d)| d)
        .filter(Dg::is_repair)
        .collect();
    assert_eq!(repairs.len(), 1);
    assert_eq!((repairs[0].id, repairs[0].seq), (Some(BOB), Some(1)));
}
