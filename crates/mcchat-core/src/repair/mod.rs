//! Loss repair, the receiver's and the sender's halves, as pure state machines (NORM, RFC 5740,
//! and PGM, RFC 3208, work the same way): receivers detect gaps in each sender's sequence
//! numbers, wait a short random back-off, and multicast a NACK unless another receiver has
//! already NACKed the same numbers; the sender retransmits from a bounded buffer.
//!
//! - [`Receiver`] (in `receiver.rs`): gaps, holds, NACK scheduling, suppression and giving
//!   up, for every sender heard, under per-sender and global budgets.
//! - [`SendBuffer`]: the sender's recent messages, to answer NACKs from.
//! - [`ByteBudget`]: the repair bytes sent within a window, weighed against a cap.
//! - NACK ranges on the wire: [`parse_ranges`], [`format_ranges`].
//!
//! Everything here takes the time (and, where it draws back-offs, a random source) as
//! arguments, so the tests drive it deterministically with a seeded loss, duplication and
//! reordering injector. The I/O layer feeds it datagrams and timer ticks and sends what it
//! returns.

mod budget;
mod followed;
mod receiver;

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

pub use budget::ByteBudget;
pub use receiver::{Delivery, Receiver, RepairConfig, RepairStats};

use crate::wire::{Frame, InstanceId};

/// A NACK to multicast: the sequence numbers of `instance` this receiver is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// Whose messages.
    pub instance: InstanceId,
    /// Which, as sorted, disjoint ranges (at most [`MAX_NACK_RANGES`]).
    pub ranges: Vec<RangeInclusive<u64>>,
}

impl Nack {
    /// The NACK a `kind=nack` datagram carries in its `for` and `seqs` tags; `None` if either
    /// is missing or malformed (such a NACK is ignored whole).
    pub fn from_frame(frame: &Frame<'_>) -> Option<Self> {
        let instance = frame.tags.get("for").and_then(|f| InstanceId::parse(&f))?;
        let ranges = frame.tags.get("seqs").and_then(|s| parse_ranges(&s))?;
        Some(Self { instance, ranges })
    }
}

/// splitmix64 (Steele, Lea, Flood 2014): a small, seedable generator for back-off jitter
/// (and for the tests' reproducible loss injector). Not for anything secret.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A fraction in `[0, 1)`.
    pub fn fraction(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A source of back-off jitter: a fraction in `[0, 1)`.
pub trait Jitter {
    /// The next fraction.
    fn fraction(&mut self) -> f64;
}

impl<F: FnMut() -> f64> Jitter for F {
    fn fraction(&mut self) -> f64 {
        self().clamp(0.0, 0.999_999)
    }
}

impl Jitter for SplitMix64 {
    fn fraction(&mut self) -> f64 {
        Self::fraction(self)
    }
}

/// One message kept for repair.
#[derive(Debug)]
struct Kept<M> {
    seq: u64,
    msg: M,
    /// Its size on the wire, for the byte budget of repairs.
    bytes: usize,
    sent: Instant,
    repaired: Option<Instant>,
}

/// The sending half: the last messages sent, to answer NACKs from.
#[derive(Debug)]
pub struct SendBuffer<M> {
    capacity: usize,
    max_age: Duration,
    buf: VecDeque<Kept<M>>,
    /// The sum of `Kept::bytes` in `buf`.
    bytes: usize,
    /// Repairs are not re-sent within this of the last one, however many receivers ask.
    min_interval: Duration,
}

impl<M> SendBuffer<M> {
    /// A buffer of the last `capacity` messages, each kept at most `max_age`: the repair
    /// window, after which receivers give up and report the loss.
    pub fn new(capacity: usize, max_age: Duration, min_interval: Duration) -> Self {
        Self {
            capacity,
            max_age,
            buf: VecDeque::with_capacity(capacity.min(4096)),
            bytes: 0,
            min_interval,
        }
    }

    /// Remembers message `seq` of `bytes` bytes, sent `now`.
    pub fn push(&mut self, seq: u64, msg: M, bytes: usize, now: Instant) {
        if self.buf.len() == self.capacity
            && let Some(old) = self.buf.pop_front()
        {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
        self.buf.push_back(Kept {
            seq,
            msg,
            bytes,
            sent: now,
            repaired: None,
        });
    }

    /// The bytes of the messages kept (after dropping those older than the window).
    pub fn bytes(&mut self, now: Instant) -> usize {
        self.expire(now);
        self.bytes
    }

    fn expire(&mut self, now: Instant) {
        while self
            .buf
            .front()
            .is_some_and(|k| now.saturating_duration_since(k.sent) > self.max_age)
        {
            if let Some(old) = self.buf.pop_front() {
                self.bytes -= old.bytes;
            }
        }
    }

    /// The messages to retransmit for `ranges`, at most `limit`, skipping those repaired
    /// within the last `min_interval` (one loss seen by many receivers is repaired once).
    /// `accept` is asked for each in turn (the caller's byte and rate budgets): a message
    /// it refuses ends the list, and is not marked repaired.
    pub fn repairs(
        &mut self,
        ranges: &[RangeInclusive<u64>],
        now: Instant,
        limit: usize,
        mut accept: impl FnMut(usize) -> bool,
    ) -> Vec<(u64, &M)> {
        self.expire(now);
        let min = self.min_interval;
        let mut picked = Vec::new();
        // The buffer is in sequence order, so each range is found by binary search: the
        // cost follows what is asked and held, not how often it is asked.
        'ranges: for range in ranges {
            let start = self.buf.partition_point(|k| k.seq < *range.start());
            for (j, k) in self.buf.range_mut(start..).enumerate() {
                let i = start + j;
                if k.seq > *range.end() {
                    break;
                }
                if picked.len() >= limit {
                    break 'ranges;
                }
                if k.repaired
                    .is_some_and(|t| now.saturating_duration_since(t) < min)
                {
                    continue;
                }
                if !accept(k.bytes) {
                    break 'ranges;
                }
                k.repaired = Some(now);
                picked.push(i);
            }
        }
        picked
            .into_iter()
            .map(|i| (self.buf[i].seq, &self.buf[i].msg))
            .collect()
    }
}

/// The tag that marks a retransmission (`repair=1`). Senders leave room for it when they
/// split text, so a repair of the longest message still fits in one datagram.
pub const REPAIR_TAG: (&str, &str) = ("repair", "1");

/// The widest range a NACK carries.
pub const MAX_RANGE: u64 = 4096;

/// The most ranges one NACK datagram carries (PROTOCOL.md 5).
pub const MAX_NACK_RANGES: usize = 32;

/// Parses `5-7,9` into ranges (at most [`MAX_NACK_RANGES`], each no wider than
/// [`MAX_RANGE`], ascending and disjoint); anything else is refused whole.
pub fn parse_ranges(s: &str) -> Option<Vec<RangeInclusive<u64>>> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<u64>().ok()?, b.parse::<u64>().ok()?),
            None => {
                let v = part.parse::<u64>().ok()?;
                (v, v)
            }
        };
        let after_previous = out
            .last()
            .is_none_or(|r: &RangeInclusive<u64>| a > *r.end());
        if b < a || b - a >= MAX_RANGE || out.len() >= MAX_NACK_RANGES || !after_previous {
            return None;
        }
        out.push(a..=b);
    }
    (!out.is_empty()).then_some(out)
}

/// Formats ranges as `5-7,9`.
pub fn format_ranges(ranges: &[RangeInclusive<u64>]) -> String {
    ranges
        .iter()
        .map(|r| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}-{}", r.start(), r.end())
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_buffer_repairs_once_per_interval() {
        let t0 = Instant::now();
        let mut b = SendBuffer::new(3, Duration::from_secs(3), Duration::from_millis(20));
        for s in 1..=5 {
            b.push(s, s, 10, t0);
        }
        assert_eq!(b.bytes(t0), 30);
        let all = |_| true;
        assert_eq!(
            b.repairs(&[1..=4], t0, 128, all),
            vec![(3, &3), (4, &4)],
            "1 and 2 fell out of the buffer"
        );
        assert!(
            b.repairs(&[3..=3], t0 + Duration::from_millis(10), 128, all)
                .is_empty()
        );
        assert_eq!(
            b.repairs(&[3..=3], t0 + Duration::from_millis(30), 128, all),
            vec![(3, &3)]
        );
        assert!(
            b.repairs(&[3..=5], t0 + Duration::from_secs(4), 128, all)
                .is_empty(),
            "too old"
        );
        assert_eq!(b.bytes(t0 + Duration::from_secs(4)), 0);
    }

    #[test]
    fn send_buffer_honours_the_limit_and_the_budget() {
        let t0 = Instant::now();
        let mut b = SendBuffer::new(100, Duration::from_secs(3), Duration::from_millis(20));
        for s in 1..=10 {
            b.push(s, s, 100, t0);
        }
        assert_eq!(b.repairs(&[1..=10], t0, 3, |_| true).len(), 3);
        let mut budget = 250;
        let got = b.repairs(&[4..=10], t0, 128, |n| {
            let ok = budget >= n;
            budget -= n.min(budget);
            ok
        });
        assert_eq!(got, vec![(4, &4), (5, &5)]);
        // The refused one was not marked repaired: it goes out as soon as there is budget.
        assert_eq!(b.repairs(&[6..=6], t0, 128, |_| true), vec![(6, &6)]);
    }

    #[test]
    fn nack_ranges_must_be_ascending_disjoint_and_few() {
        assert!(parse_ranges("2,2").is_none());
        assert!(parse_ranges("5-9,7").is_none());
        assert!(parse_ranges("9,5").is_none());
        assert_eq!(parse_ranges("1-3,5").unwrap(), vec![1..=3, 5..=5]);
        let ranges = |n: u64| {
            (0..n)
                .map(|i| (i * 2).to_string())
                .collect::<Vec<_>>()
                .join(",")
        };
        assert!(parse_ranges(&ranges(32)).is_some());
        assert!(
            parse_ranges(&ranges(33)).is_none(),
            "PROTOCOL 5: at most 32"
        );
    }

    #[test]
    fn ranges_round_trip_and_are_bounded() {
        let r = parse_ranges("5-7,9").unwrap();
        assert_eq!(r, vec![5..=7, 9..=9]);
        assert_eq!(format_ranges(&r), "5-7,9");
        assert!(parse_ranges("7-5").is_none());
        assert!(parse_ranges("1-100000").is_none());
        assert!(parse_ranges("").is_none());
        assert!(parse_ranges("x").is_none());
    }
}
