//! The daemon's repair cache: recent messages of the rooms it relays, so it can repair for
//! senders that have gone (NORM, RFC 5740, calls this a repair server) and answer its `--via`
//! subscribers' NACKs itself, without a round trip to the sender.
//!
//! A sender that is still there repairs its own messages; the daemon stands by. For a NACK
//! about a sender it saw leave, it answers at once. For any other it waits [`STANDBY`] and
//! answers only what the sender has not repaired by then, so a sender that crashed, was
//! killed or lost its link is covered too, and a live one is not doubled.
//!
//! Pure: the relay loop passes the time in and sends what comes out. Memory is bounded by a
//! byte budget over all rooms and by age, oldest first.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mcchat_core::repair::REPAIR_TAG;
use mcchat_core::room::RoomName;
use mcchat_core::tags;
use mcchat_core::wire::{InstanceId, Kind, Meta};

/// How long a NACK about a sender not known to have left waits for that sender's own repair.
/// A live sender answers within a LAN round trip; receivers ask again every 100 ms.
pub(crate) const STANDBY: Duration = Duration::from_millis(200);
/// One message is not repaired twice within this, however many receivers ask.
const MIN_INTERVAL: Duration = Duration::from_millis(20);
/// Repairs one NACK may draw from the cache.
pub(crate) const MAX_REPAIRS_PER_NACK: usize = 128;
/// Standby repairs waiting at once; beyond it new ones are refused (a NACK flood cannot grow
/// the daemon).
const MAX_PENDING: usize = 4096;
/// After a sender's `leave`, the daemon repeats it this long after: a receiver that lost the
/// tail of the sender's messages and the leave itself learns the last sequence number from a
/// repeat and asks for the rest. Nothing else tells it (the sender is gone), so the repeats
/// are many and cheap, one datagram each, all within the repair window (6 s): at 30% loss a
/// receiver misses the last two messages, the leave and all seven repeats once in 170,000
/// departures (with four repeats, once in 4,600; a test whose repeats met 51% loss failed
/// so in 2 of 265 runs).
const LEAVE_REPEATS: [Duration; 7] = [
    Duration::from_millis(300),
    Duration::from_millis(600),
    Duration::from_millis(1000),
    Duration::from_millis(1500),
    Duration::from_millis(2500),
    Duration::from_millis(3500),
    Duration::from_millis(5000),
];
/// What one cached message costs beyond its bytes (its map entry, queue slot and their copies
/// of the room name), for the budget.
const ENTRY_OVERHEAD: usize = 160;
/// What one sender costs beyond its messages (its map entry and a message-map node), so a
/// flood of one-message senders is held to the budget too.
const SENDER_OVERHEAD: usize = 768;

/// A datagram for the relay loop to send to a room's group (and, for repeats of a leave, to
/// its subscribers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outgoing {
    pub(crate) room: RoomName,
    pub(crate) data: Bytes,
    /// Also to the room's `--via` subscribers (leave repeats), not only to the group.
    pub(crate) to_subscribers: bool,
    /// The message repaired (none for a leave repeat): marked repaired when offered, and
    /// given back with [`RepairCache::not_sent`] if the hub's budget refuses it.
    pub(crate) entry: Option<(InstanceId, u64)>,
}

#[derive(Debug)]
struct Entry {
    /// The datagram as a repair: the original bytes with the repair tag added.
    data: Bytes,
    /// When anyone (the sender or this daemon) last repaired it.
    repaired: Option<Instant>,
    /// When a NACK asked for it, if a standby repair is waiting.
    asked: Option<Instant>,
}

#[derive(Debug, Default)]
struct SenderCache {
    messages: BTreeMap<u64, Entry>,
    left: bool,
    /// The leave datagram, how many repeats have gone out, and when the next is due (also
    /// its key in `RepairCache::leaves`).
    leave: Option<(Bytes, usize, Instant)>,
}

type SenderKey = (RoomName, InstanceId);

/// Counters, for status (as [`mcchat_core::control::RepairCacheStats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CacheStats {
    /// Messages held now.
    pub(crate) messages: usize,
    /// Bytes held now, with overhead.
    pub(crate) bytes: usize,
    /// Messages evicted for the byte budget before their age ran out.
    pub(crate) evicted_for_space: u64,
    /// Repairs sent to a group for a sender that did not.
    pub(crate) repairs_to_group: u64,
    /// Repairs sent straight to a `--via` subscriber.
    pub(crate) repairs_to_subscribers: u64,
    /// Standby repairs not needed because the sender repaired first.
    pub(crate) standby_skipped: u64,
}

impl From<CacheStats> for mcchat_core::control::RepairCacheStats {
    fn from(s: CacheStats) -> Self {
        // usize is at most 64 bits on every platform mcchat builds for.
        Self {
            messages: s.messages as u64,
            bytes: s.bytes as u64,
            evicted_for_space: s.evicted_for_space,
            repairs_to_group: s.repairs_to_group,
            repairs_to_subscribers: s.repairs_to_subscribers,
            standby_skipped: s.standby_skipped,
            // The hub's budgets, not the cache, refuse repairs: it fills this in.
            repairs_over_budget: 0,
        }
    }
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct RepairCache {
    max_bytes: usize,
    max_age: Duration,
    senders: HashMap<SenderKey, SenderCache>,
    /// Every cached message in the order stored, for eviction.
    order: VecDeque<(SenderKey, u64, Instant)>,
    /// Standby repairs: when due, which message. Always due `STANDBY` after they were asked
    /// for, so in order of due time.
    pending: VecDeque<(Instant, SenderKey, u64)>,
    /// Leave repeats, by due time.
    leaves: BTreeSet<(Instant, SenderKey)>,
    stats: CacheStats,
}

/// `data` as a repair: its end-to-end part (hop-by-hop tags another hop added, such as
/// another daemon's `relay`, are not ours to repeat; a message from another site keeps its
/// `site` and `hops`, so that no daemon of the LAN takes it for its own site's) with the
/// repair tag in front; without the tag when it would make it longer than a datagram may be.
fn as_repair(data: &[u8]) -> Bytes {
    let e2e = crate::hub::site::strip_foreign_hops(data);
    let mut out = Vec::with_capacity(e2e.len() + 16);
    match tags::add_hop_tag(&e2e, REPAIR_TAG.0, REPAIR_TAG.1, &mut out) {
        Ok(()) => out.into(),
        Err(_) => Bytes::copy_from_slice(&e2e),
    }
}

impl RepairCache {
    /// A cache of at most `max_bytes`, each message kept at most `max_age` (0 bytes: off).
    pub(crate) fn new(max_bytes: usize, max_age: Duration) -> Self {
        Self {
            max_bytes,
            max_age,
            senders: HashMap::new(),
            order: VecDeque::new(),
            pending: VecDeque::new(),
            leaves: BTreeSet::new(),
            stats: CacheStats::default(),
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Changes the bounds (on reload); evicts what no longer fits.
    pub(crate) fn set_bounds(&mut self, max_bytes: usize, max_age: Duration, now: Instant) {
        self.max_bytes = max_bytes;
        self.max_age = max_age;
        self.evict(now);
    }

    /// Takes note of a datagram the daemon relayed or heard in `room`: caches messages,
    /// notes repairs and leaves. `is_repair` says whether it carried the repair tag.
    pub(crate) fn observe(
        &mut self,
        room: &RoomName,
        meta: &Meta,
        is_repair: bool,
        data: &[u8],
        now: Instant,
    ) {
        let Some(instance) = meta.instance else {
            return;
        };
        match (meta.kind, meta.seq) {
            (Kind::Message | Kind::Action, Some(seq)) if self.max_bytes > 0 => {
                let key = (room.clone(), instance);
                if let Some(entry) = self
                    .senders
                    .get_mut(&key)
                    .and_then(|s| s.messages.get_mut(&seq))
                {
                    if is_repair {
                        entry.repaired = Some(now);
                    }
                    return;
                }
                let data = as_repair(data);
                self.stats.bytes += data.len() + ENTRY_OVERHEAD;
                self.stats.messages += 1;
                let sender = self.senders.entry(key.clone()).or_insert_with(|| {
                    self.stats.bytes += SENDER_OVERHEAD;
                    SenderCache::default()
                });
                // A new message after a `leave` (a forged one, or the sender is back): it is
                // a member again, so the daemon stands by for it rather than answering at once,
                // and repeats no leave for it.
                if !is_repair && sender.left {
                    sender.left = false;
                    if let Some((_, _, due)) = sender.leave.take() {
                        self.leaves.remove(&(due, key.clone()));
                    }
                }
                sender.messages.insert(
                    seq,
                    Entry {
                        data,
                        repaired: is_repair.then_some(now),
                        asked: None,
                    },
                );
                self.order.push_back((key, seq, now));
                self.evict(now);
            }
            (Kind::Leave, _) => {
                let key = (room.clone(), instance);
                if let Some(sender) = self.senders.get_mut(&key)
                    && !sender.left
                {
                    sender.left = true;
                    let due = now + LEAVE_REPEATS[0];
                    sender.leave = Some((as_repair(data), 0, due));
                    self.leaves.insert((due, key));
                }
            }
            _ => {}
        }
    }

    /// A NACK heard on a group: repairs to send now (the sender has left), while the rest wait
    /// for the sender in standby.
    pub(crate) fn on_nack(
        &mut self,
        room: &RoomName,
        instance: InstanceId,
        ranges: &[RangeInclusive<u64>],
        now: Instant,
    ) -> Vec<Outgoing> {
        let key = (room.clone(), instance);
        let Some(sender) = self.senders.get_mut(&key) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut taken = 0;
        for range in ranges {
            for (seq, entry) in sender.messages.range_mut(range.clone()) {
                if taken == MAX_REPAIRS_PER_NACK {
                    return out;
                }
                taken += 1;
                if entry
                    .repaired
                    .is_some_and(|t| now.saturating_duration_since(t) < MIN_INTERVAL)
                {
                    continue;
                }
                if sender.left {
                    entry.repaired = Some(now);
                    out.push(Outgoing {
                        room: room.clone(),
                        data: entry.data.clone(),
                        to_subscribers: false,
                        entry: Some((instance, *seq)),
                    });
                } else if entry.asked.is_none() && self.pending.len() < MAX_PENDING {
                    entry.asked = Some(now);
                    self.pending.push_back((now + STANDBY, key.clone(), *seq));
                }
            }
        }
        out
    }

    /// A repair this cache offered was not sent (a budget refused it): it is not marked as
    /// repaired, so the next NACK for it is answered rather than skipped for the interval.
    pub(crate) fn not_sent(&mut self, o: &Outgoing) {
        let Some((instance, seq)) = o.entry else {
            return;
        };
        if let Some(entry) = self
            .senders
            .get_mut(&(o.room.clone(), instance))
            .and_then(|s| s.messages.get_mut(&seq))
        {
            entry.repaired = None;
        }
    }

    /// Counts a repair the hub sent, to a group or to one subscriber: what this cache offers
    /// is weighed against the hub's budgets first, and some may not go.
    pub(crate) fn count_sent(&mut self, to_subscriber: bool) {
        if to_subscriber {
            self.stats.repairs_to_subscribers += 1;
        } else {
            self.stats.repairs_to_group += 1;
        }
    }

    /// A NACK from a `--via` subscriber: what the cache holds of it (to send to that
    /// subscriber alone), and whether that is all of it. Not limited by the repair
    /// interval: each subscriber's loss is its own.
    pub(crate) fn answer(
        &mut self,
        room: &RoomName,
        instance: InstanceId,
        ranges: &[RangeInclusive<u64>],
    ) -> (Vec<Bytes>, bool) {
        let wanted: u64 = ranges
            .iter()
            .map(|r| r.end().saturating_sub(*r.start()).saturating_add(1))
            .sum();
        let Some(sender) = self.senders.get(&(room.clone(), instance)) else {
            return (Vec::new(), false);
        };
        let found: Vec<Bytes> = ranges
            .iter()
            .flat_map(|r| sender.messages.range(r.clone()))
            .take(MAX_REPAIRS_PER_NACK)
            .map(|(_, e)| e.data.clone())
            .collect();
        let complete = found.len() as u64 == wanted;
        (found, complete)
    }

    /// Standby repairs and leave repeats that are due.
    pub(crate) fn poll(&mut self, now: Instant) -> Vec<Outgoing> {
        let mut out = Vec::new();
        while self.pending.front().is_some_and(|p| p.0 <= now) {
            let Some((_, key, seq)) = self.pending.pop_front() else {
                break;
            };
            let Some(entry) = self
                .senders
                .get_mut(&key)
                .and_then(|s| s.messages.get_mut(&seq))
            else {
                continue;
            };
            // An entry cached again since it was asked for has no standby of its own.
            let Some(asked) = entry.asked.take() else {
                continue;
            };
            if entry.repaired.is_some_and(|t| t >= asked) {
                self.stats.standby_skipped += 1;
                continue;
            }
            entry.repaired = Some(now);
            out.push(Outgoing {
                room: key.0.clone(),
                data: entry.data.clone(),
                to_subscribers: false,
                entry: Some((key.1, seq)),
            });
        }
        while self.leaves.first().is_some_and(|l| l.0 <= now) {
            let Some((due, key)) = self.leaves.pop_first() else {
                break;
            };
            let Some(sender) = self.senders.get_mut(&key) else {
                continue;
            };
            let Some((data, n, next)) = &mut sender.leave else {
                continue;
            };
            out.push(Outgoing {
                room: key.0.clone(),
                data: data.clone(),
                to_subscribers: true,
                entry: None,
            });
            *n += 1;
            if let Some(after) = LEAVE_REPEATS.get(*n) {
                *next = due - LEAVE_REPEATS[*n - 1] + *after;
                self.leaves.insert((*next, key));
            } else {
                sender.leave = None;
                if sender.messages.is_empty() {
                    self.senders.remove(&key);
                    self.stats.bytes -= SENDER_OVERHEAD;
                }
            }
        }
        self.evict(now);
        out
    }

    /// Evicts what has outlived the repair window (the relay loop calls this every second,
    /// so a quiet room's messages go too).
    pub(crate) fn expire(&mut self, now: Instant) {
        self.evict(now);
    }

    /// When [`RepairCache::poll`] next has something to do.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let standby = self.pending.front().map(|p| p.0);
        let leaves = self.leaves.first().map(|l| l.0);
        standby.into_iter().chain(leaves).min()
    }

    /// Drops everything of `room` (it was removed or left).
    pub(crate) fn forget_room(&mut self, room: &RoomName) {
        self.senders.retain(|(r, _), _| r != room);
        self.order.retain(|((r, _), _, _)| r != room);
        self.pending.retain(|(_, (r, _), _)| r != room);
        self.leaves.retain(|(_, (r, _))| r != room);
        self.recount();
    }

    fn recount(&mut self) {
        let mut stats = self.stats;
        stats.messages = 0;
        stats.bytes = 0;
        for s in self.senders.values() {
            stats.bytes += SENDER_OVERHEAD;
            for e in s.messages.values() {
                stats.messages += 1;
                stats.bytes += e.data.len() + ENTRY_OVERHEAD;
            }
        }
        self.stats = stats;
    }

    /// Evicts messages older than the age limit, then the oldest until the budget holds.
    fn evict(&mut self, now: Instant) {
        while let Some((_, _, stored)) = self.order.front() {
            let old = now.saturating_duration_since(*stored) > self.max_age;
            let over = self.stats.bytes > self.max_bytes;
            if !old && !over {
                break;
            }
            if over && !old {
                self.stats.evicted_for_space += 1;
            }
            let Some((key, seq, _)) = self.order.pop_front() else {
                break;
            };
            let Some(sender) = self.senders.get_mut(&key) else {
                continue;
            };
            if let Some(e) = sender.messages.remove(&seq) {
                self.stats.messages -= 1;
                self.stats.bytes -= e.data.len() + ENTRY_OVERHEAD;
            }
            if sender.messages.is_empty() {
                // Its leave repeats go with it: nothing is left to repair after them.
                if let Some((_, _, due)) = sender.leave {
                    self.leaves.remove(&(due, key.clone()));
                }
                self.senders.remove(&key);
                self.stats.bytes -= SENDER_OVERHEAD;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use mcchat_core::wire::{self, Header};

    use super::*;

    fn room() -> RoomName {
        RoomName::new("room1").unwrap()
    }

    fn datagram(kind: Kind, seq: u64, text: &str) -> (Meta, Vec<u8>) {
        let meta = Meta {
            instance: Some(InstanceId(7)),
            seq: Some(seq),
            ts_ms: Some(1),
            kind,
        };
        let mut out = String::new();
        wire::encode(
            &Header { meta, extra: &[] },
            "room1",
            "alice",
            text,
            &mut out,
        )
        .unwrap();
        (meta, out.into_bytes())
    }

    fn filled(n: u64, now: Instant) -> RepairCache {
        let mut c = RepairCache::new(1 << 20, Duration::from_secs(30));
        for seq in 1..=n {
            let (meta, data) = datagram(Kind::Message, seq, &format!("m{seq}"));
            c.observe(&room(), &meta, false, &data, now);
        }
        c
    }

    #[test]
    fn repairs_decode_as_the_original_with_the_repair_tag() {
        let now = Instant::now();
        let mut c = filled(3, now);
        let (meta, data) = datagram(Kind::Leave, 3, "");
        c.observe(&room(), &meta, false, &data, now);
        let out = c.on_nack(&room(), InstanceId(7), &[2..=2], now);
        assert_eq!(out.len(), 1, "the sender left: answered at once");
        let f = wire::decode(&out[0].data).unwrap();
        assert_eq!((f.meta.seq, f.text), (Some(2), "m2"));
        assert_eq!(f.tags.get("repair").as_deref(), Some("1"));
        // Nothing is known of another sender.
        assert!(c.on_nack(&room(), InstanceId(8), &[1..=1], now).is_empty());
    }

    #[test]
    fn a_live_sender_is_given_time_to_repair_itself() {
        let t0 = Instant::now();
        let mut c = filled(5, t0);
        assert!(c.on_nack(&room(), InstanceId(7), &[2..=3], t0).is_empty());
        assert_eq!(c.next_deadline(), Some(t0 + STANDBY));
        // The sender repairs 2; the daemon sends only 3.
        let (meta, data) = datagram(Kind::Message, 2, "m2");
        c.observe(&room(), &meta, true, &data, t0 + STANDBY / 2);
        assert!(c.poll(t0 + STANDBY / 2).is_empty(), "not due yet");
        let out = c.poll(t0 + STANDBY);
        assert_eq!(out.len(), 1);
        assert_eq!(wire::decode(&out[0].data).unwrap().meta.seq, Some(3));
        assert_eq!(c.stats().standby_skipped, 1);
        assert_eq!(c.next_deadline(), None);
    }

    /// A repair the hub's budget refused was not sent: the next NACK for it is answered,
    /// not skipped as repaired moments ago.
    #[test]
    fn a_repair_not_sent_is_not_counted_as_repaired() {
        let now = Instant::now();
        let mut c = filled(3, now);
        let (meta, data) = datagram(Kind::Leave, 3, "");
        c.observe(&room(), &meta, false, &data, now);
        let out = c.on_nack(&room(), InstanceId(7), &[2..=2], now);
        assert_eq!(out[0].entry, Some((InstanceId(7), 2)));
        assert!(
            c.on_nack(&room(), InstanceId(7), &[2..=2], now).is_empty(),
            "sent: not again within the interval"
        );
        c.not_sent(&out[0]);
        assert_eq!(c.on_nack(&room(), InstanceId(7), &[2..=2], now).len(), 1);
    }

    #[test]
    fn many_nacks_for_one_loss_make_one_repair() {
        let t0 = Instant::now();
        let mut c = filled(5, t0);
        for i in 0..20 {
            c.on_nack(
                &room(),
                InstanceId(7),
                &[4..=4],
                t0 + Duration::from_millis(i),
            );
        }
        assert_eq!(c.poll(t0 + STANDBY * 2).len(), 1);
    }

    #[test]
    fn leave_is_repeated_seven_times_then_stops() {
        let t0 = Instant::now();
        let mut c = filled(2, t0);
        let (meta, data) = datagram(Kind::Leave, 2, "");
        c.observe(&room(), &meta, false, &data, t0);
        let mut repeats = 0;
        let mut now = t0;
        while let Some(due) = c.next_deadline() {
            assert!(due > now || repeats == 0);
            now = due;
            repeats += c.poll(now).len();
            assert!(repeats <= LEAVE_REPEATS.len());
        }
        assert_eq!(repeats, 7);
        assert_eq!(now, t0 + Duration::from_millis(5000));
    }

    #[test]
    fn a_message_after_a_leave_makes_the_sender_a_member_again() {
        let t0 = Instant::now();
        let mut c = filled(2, t0);
        // A forged leave, then the sender's next message.
        let (meta, data) = datagram(Kind::Leave, 2, "");
        c.observe(&room(), &meta, false, &data, t0);
        let (meta, data) = datagram(Kind::Message, 3, "m3");
        c.observe(&room(), &meta, false, &data, t0);
        // No leave repeats, and a NACK waits on standby for the live sender.
        assert!(c.poll(t0 + Duration::from_secs(6)).is_empty());
        let now = t0 + Duration::from_secs(6);
        assert!(c.on_nack(&room(), InstanceId(7), &[1..=3], now).is_empty());
        assert_eq!(
            c.poll(now + STANDBY).len(),
            3,
            "then repaired, the sender not having"
        );
    }

    #[test]
    fn via_subscribers_are_answered_from_the_cache() {
        let now = Instant::now();
        let mut c = filled(10, now);
        let (found, complete) = c.answer(&room(), InstanceId(7), &[2..=4, 9..=9]);
        assert_eq!((found.len(), complete), (4, true));
        let (found, complete) = c.answer(&room(), InstanceId(7), &[9..=12]);
        assert_eq!(
            (found.len(), complete),
            (2, false),
            "11 and 12 were never seen"
        );
        let (found, complete) = c.answer(&RoomName::new("x").unwrap(), InstanceId(7), &[1..=1]);
        assert_eq!((found.len(), complete), (0, false));
    }

    #[test]
    fn memory_stays_within_the_budget_and_age() {
        let t0 = Instant::now();
        let budget = 64 * 1024;
        let mut c = RepairCache::new(budget, Duration::from_secs(30));
        let text = "x".repeat(1000);
        for seq in 1..=10_000 {
            let (meta, data) = datagram(Kind::Message, seq, &text);
            c.observe(&room(), &meta, false, &data, t0);
            assert!(c.stats().bytes <= budget);
        }
        assert!(c.stats().messages > 30, "{:?}", c.stats());
        assert!(c.stats().evicted_for_space > 9000);
        // Hostile NACKs for everything cost a bounded number of lookups and pending slots.
        let out = c.on_nack(&room(), InstanceId(7), &[1..=4096], t0);
        assert!(out.is_empty());
        assert!(c.pending.len() <= MAX_REPAIRS_PER_NACK);
        c.poll(t0 + Duration::from_secs(31));
        assert_eq!(c.stats().messages, 0, "aged out");
        assert!(c.senders.is_empty());
    }

    #[test]
    fn a_flood_of_one_message_senders_stays_within_the_budget() {
        let t0 = Instant::now();
        let budget = 256 * 1024;
        let mut c = RepairCache::new(budget, Duration::from_secs(30));
        for i in 0..100_000u64 {
            let (mut meta, data) = datagram(Kind::Message, 1, "x");
            meta.instance = Some(InstanceId(i));
            c.observe(&room(), &meta, false, &data, t0);
            let (mut meta, data) = datagram(Kind::Leave, 1, "");
            meta.instance = Some(InstanceId(i));
            c.observe(&room(), &meta, false, &data, t0);
        }
        assert!(c.stats().bytes <= budget, "{:?}", c.stats());
        assert!(c.senders.len() <= budget / SENDER_OVERHEAD);
        // Evicted senders take their leave repeats with them.
        assert!(c.leaves.len() <= c.senders.len(), "{}", c.leaves.len());
        let out = c.poll(t0 + Duration::from_secs(10));
        assert!(
            out.len() <= LEAVE_REPEATS.len() * c.senders.len(),
            "{}",
            out.len()
        );
        c.expire(t0 + Duration::from_secs(60));
        assert_eq!((c.stats().messages, c.stats().bytes), (0, 0));
    }

    #[test]
    fn a_tag_that_would_not_fit_leaves_the_original() {
        let long = vec![b'x'; wire::MAX_DATAGRAM];
        assert_eq!(&*as_repair(&long), &long[..]);
        // Another hop's tags are not kept; the sender's are, in order.
        assert_eq!(
            &*as_repair(b"@relay=0a0b0c0d;id=1;seq=2 a|b|c"),
            b"@repair=1;id=1;seq=2 a|b|c"
        );
        assert_eq!(
            &*as_repair(b"@repair=1;id=1 a|b|c"),
            b"@repair=1;id=1 a|b|c"
        );
        assert_eq!(&*as_repair(b"a|b|c"), b"@repair=1 a|b|c");
        assert_eq!(&*as_repair(b"@id=1 a|b|c"), b"@repair=1;id=1 a|b|c");
    }
}
