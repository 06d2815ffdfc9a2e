//! Loss repair, the receiver's and the sender's halves, as pure state machines (NORM, RFC 5740,
//! and PGM, RFC 3208, work the same way): receivers detect gaps in each sender's sequence
//! numbers, wait a short random back-off, and multicast a NACK unless another receiver has
//! already NACKed the same numbers; the sender retransmits from a bounded buffer.
//!
//! Everything here takes the time (and, where it draws back-offs, a random source) as
//! arguments, so the tests drive it deterministically with a seeded loss, duplication and
//! reordering injector. The I/O layer feeds it datagrams and timer ticks and sends what it
//! returns.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::time::{Duration, Instant};

use crate::wire::{Frame, InstanceId};

/// The knobs of repair. The defaults repair a loss within about 50 ms when one round
/// suffices, and give up after about 3 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairConfig {
    /// The first NACK for a gap waits a random time up to this, so that of many receivers
    /// behind one loss, one NACKs first and the others see it and stay quiet.
    pub backoff_max: Duration,
    /// The wait before asking again. Linear, not exponential: a lossy link needs many quick
    /// rounds (at 30% loss each way a round succeeds about half the time), and suppression
    /// and the sender's repair interval keep the rounds cheap.
    pub retry: Duration,
    /// Tries before a gap is given up as lost.
    pub max_attempts: u32,
    /// How long a gap may hold back a sender's later messages before it is given up.
    pub hold_max: Duration,
    /// Messages held per sender while a gap is open; beyond it the oldest gap is given up.
    pub max_held: usize,
    /// Senders tracked; beyond it the quietest is forgotten.
    pub max_senders: usize,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            backoff_max: Duration::from_millis(30),
            retry: Duration::from_millis(100),
            max_attempts: 30,
            hold_max: Duration::from_secs(4),
            max_held: 2048,
            max_senders: 4096,
        }
    }
}

/// What the receiver hands to the user, in each sender's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery<M> {
    /// A message, in order.
    Message(M),
    /// `count` messages of `instance` could not be repaired.
    Lost {
        /// The sender.
        instance: InstanceId,
        /// How many.
        count: u64,
    },
}

/// A NACK to multicast: the sequence numbers of `instance` this receiver is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// Whose messages.
    pub instance: InstanceId,
    /// Which, as sorted, disjoint ranges.
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

#[derive(Debug, Clone, Copy)]
struct Missing {
    since: Instant,
    due: Instant,
    attempts: u32,
}

#[derive(Debug)]
struct Sender<M> {
    /// The next sequence number to deliver.
    next: u64,
    /// The highest sequence number known to exist (seen or announced by a heartbeat).
    highest: u64,
    held: BTreeMap<u64, M>,
    missing: BTreeMap<u64, Missing>,
    last_heard: Instant,
}

/// Counters, for `/stats` and the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairStats {
    /// Datagrams seen before (or already given up).
    pub duplicates: u64,
    /// NACKs this receiver sent.
    pub nacks_sent: u64,
    /// NACK rounds skipped because another receiver asked first.
    pub nacks_suppressed: u64,
    /// Messages given up.
    pub lost: u64,
    /// Messages that arrived after being found missing.
    pub repaired: u64,
}

/// The receiving half: one state per sender instance.
#[derive(Debug)]
pub struct Receiver<M> {
    config: RepairConfig,
    senders: HashMap<InstanceId, Sender<M>>,
    stats: RepairStats,
    /// Deliveries produced outside `on_message` (a sender evicted, a long jump announced by
    /// a heartbeat), handed out by the next `poll`.
    released: Vec<Delivery<M>>,
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

impl<M> Receiver<M> {
    /// A receiver with `config`.
    pub fn new(config: RepairConfig) -> Self {
        Self {
            config,
            senders: HashMap::new(),
            stats: RepairStats::default(),
            released: Vec::new(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> RepairStats {
        self.stats
    }

    fn first_due(&self, now: Instant, jitter: &mut impl Jitter) -> Instant {
        now + self.config.backoff_max.mul_f64(jitter.fraction())
    }

    fn sender(&mut self, instance: InstanceId, first_seq: u64, now: Instant) -> &mut Sender<M> {
        if !self.senders.contains_key(&instance) && self.senders.len() >= self.config.max_senders {
            // The quietest sender with nothing open goes first; if every one has a gap open,
            // the quietest overall, with what it held delivered and its gaps reported lost.
            let victim = self
                .senders
                .iter()
                .min_by_key(|(_, s)| (!s.held.is_empty() || !s.missing.is_empty(), s.last_heard))
                .map(|(id, _)| *id);
            if let Some(id) = victim
                && let Some(mut old) = self.senders.remove(&id)
            {
                let lost = old.missing.len() as u64;
                if lost > 0 {
                    self.stats.lost += lost;
                    self.released.push(Delivery::Lost {
                        instance: id,
                        count: lost,
                    });
                }
                let held = std::mem::take(&mut old.held);
                self.released
                    .extend(held.into_values().map(Delivery::Message));
            }
        }
        // A sender first heard mid-stream starts there: history is not repair's job.
        self.senders.entry(instance).or_insert_with(|| Sender {
            next: first_seq,
            highest: first_seq.saturating_sub(1),
            held: BTreeMap::new(),
            missing: BTreeMap::new(),
            last_heard: now,
        })
    }

    /// A message `seq` from `instance`. Returns what can be delivered now, in order.
    pub fn on_message(
        &mut self,
        instance: InstanceId,
        seq: u64,
        msg: M,
        now: Instant,
        jitter: &mut impl Jitter,
    ) -> Vec<Delivery<M>> {
        if seq == u64::MAX {
            // No sender gets there; the number can only be hostile.
            self.stats.duplicates += 1;
            return Vec::new();
        }
        let due = self.first_due(now, jitter);
        let max_held = self.config.max_held;
        let s = self.sender(instance, seq, now);
        s.last_heard = now;
        if seq < s.next || s.held.contains_key(&seq) {
            self.stats.duplicates += 1;
            return Vec::new();
        }
        let repaired = s.missing.remove(&seq).is_some();
        let mut out = Vec::new();
        let mut lost = 0;
        if seq > s.next.saturating_add(max_held as u64) {
            // A jump no gap repair could bridge (or a hostile number): what is held goes out,
            // the rest is counted lost, and the sender is followed from here.
            let jumped = resync(s, seq, &mut out);
            if jumped > 0 {
                out.push(Delivery::Lost {
                    instance,
                    count: jumped,
                });
            }
            lost += jumped;
        }
        if seq == s.next {
            out.push(Delivery::Message(msg));
            s.next = seq.saturating_add(1);
        } else {
            // A gap: hold this one and remember what is missing before it.
            for gap in s.highest.saturating_add(1).max(s.next)..seq {
                s.missing.entry(gap).or_insert(Missing {
                    since: now,
                    due,
                    attempts: 0,
                });
            }
            s.held.insert(seq, msg);
        }
        s.highest = s.highest.max(seq);
        let mut gave_up = 0;
        if s.held.len() > max_held {
            // Memory is bounded: the oldest gap is given up now.
            gave_up = give_up_first_gap(s);
        }
        let before = out.len();
        release(s, &mut out);
        if gave_up > 0 {
            // The notice stands where the gap was: before what the gap held back.
            out.insert(
                before,
                Delivery::Lost {
                    instance,
                    count: gave_up,
                },
            );
        }
        lost += gave_up;
        if repaired {
            self.stats.repaired += 1;
        }
        self.stats.lost += lost;
        out
    }

    /// A heartbeat (or any control datagram) announcing `latest`, the sender's highest
    /// sequence number: a loss at the tail of a burst shows here.
    pub fn on_latest(
        &mut self,
        instance: InstanceId,
        latest: u64,
        now: Instant,
        jitter: &mut impl Jitter,
    ) {
        let due = self.first_due(now, jitter);
        let max_held = self.config.max_held as u64;
        if !self.senders.contains_key(&instance) {
            // First heard from through a control datagram (its join, a heartbeat): follow it
            // from its next message on; nothing of its past is owed to us.
            let s = self.sender(instance, latest.saturating_add(1), now);
            s.highest = latest;
            return;
        }
        let Some(s) = self.senders.get_mut(&instance) else {
            return;
        };
        s.last_heard = now;
        if latest > s.next.saturating_add(max_held) {
            // Too far behind to ask for everything (the sender keeps only its recent
            // messages): what is held goes out, everything below the top window is given up
            // at once, and only the top window is asked for.
            let floor = latest - max_held + 1;
            let mut out = Vec::new();
            let lost = resync(s, floor, &mut out);
            if lost > 0 {
                out.push(Delivery::Lost {
                    instance,
                    count: lost,
                });
            }
            self.stats.lost += lost;
            self.released.extend(out);
        }
        let Some(s) = self.senders.get_mut(&instance) else {
            return;
        };
        for gap in s.highest.saturating_add(1).max(s.next)..=latest {
            s.missing.entry(gap).or_insert(Missing {
                since: now,
                due,
                attempts: 0,
            });
        }
        s.highest = s.highest.max(latest);
    }

    /// Another receiver NACKed these: hold back our own NACK for them for a retry interval
    /// (NACK suppression). Hearing others ask does not use up our own tries.
    pub fn on_nack_seen(&mut self, nack: &Nack, now: Instant, jitter: &mut impl Jitter) {
        let later = now + self.config.retry + self.config.backoff_max.mul_f64(jitter.fraction());
        let Some(s) = self.senders.get_mut(&nack.instance) else {
            return;
        };
        for range in &nack.ranges {
            for (_, m) in s.missing.range_mut(range.clone()) {
                if m.due > now && m.due < later {
                    m.due = later;
                    self.stats.nacks_suppressed += 1;
                }
            }
        }
    }

    /// Timer work: the NACKs due now, and what giving up on old gaps releases.
    pub fn poll(
        &mut self,
        now: Instant,
        jitter: &mut impl Jitter,
    ) -> (Vec<Nack>, Vec<Delivery<M>>) {
        let (retry, max_attempts, hold_max, backoff) = (
            self.config.retry,
            self.config.max_attempts,
            self.config.hold_max,
            self.config.backoff_max,
        );
        let mut nacks = Vec::new();
        let mut delivered = std::mem::take(&mut self.released);
        let mut lost_total = 0;
        for (instance, s) in &mut self.senders {
            // Give up, in order, on the first gap once it has had its chances.
            let mut lost = 0;
            while let Some((&seq, m)) = s.missing.first_key_value() {
                let tried_out = m.attempts >= max_attempts && m.due <= now;
                let too_old = now.saturating_duration_since(m.since) >= hold_max;
                if !(tried_out || too_old) {
                    break;
                }
                s.missing.remove(&seq);
                lost += 1;
                s.next = s.next.max(seq.saturating_add(1));
                let mut released = Vec::new();
                release(s, &mut released);
                if !released.is_empty() {
                    delivered.push(Delivery::Lost {
                        instance: *instance,
                        count: lost,
                    });
                    lost_total += lost;
                    lost = 0;
                    delivered.extend(released);
                }
            }
            if lost > 0 {
                delivered.push(Delivery::Lost {
                    instance: *instance,
                    count: lost,
                });
                lost_total += lost;
            }
            // Ask for what is due. Every round is jittered (once per sender, so what is asked
            // together stays together): receivers behind one loss do not all ask again in
            // the same millisecond, and suppression keeps working after the first round.
            let again = now + retry + backoff.mul_f64(jitter.fraction());
            let mut ranges: Vec<RangeInclusive<u64>> = Vec::new();
            for (&seq, m) in &mut s.missing {
                if m.due > now || m.attempts >= max_attempts {
                    continue;
                }
                m.attempts += 1;
                m.due = again;
                match ranges.last_mut() {
                    Some(r) if r.end().saturating_add(1) == seq && seq - r.start() < MAX_RANGE => {
                        *r = *r.start()..=seq;
                    }
                    _ => ranges.push(seq..=seq),
                }
            }
            if !ranges.is_empty() {
                nacks.push(Nack {
                    instance: *instance,
                    ranges,
                });
            }
        }
        self.stats.lost += lost_total;
        self.stats.nacks_sent += nacks.len() as u64;
        nacks.sort_by_key(|n| n.instance);
        (nacks, delivered)
    }

    /// When [`Receiver::poll`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let (hold, max_attempts) = (self.config.hold_max, self.config.max_attempts);
        if !self.released.is_empty() {
            return Some(Instant::now());
        }
        self.senders
            .values()
            .flat_map(|s| {
                s.missing.values().enumerate().map(move |(i, m)| {
                    // A gap out of tries is given up at its due time only if it is the first
                    // one; the others wait for their hold time. Anything else would wake the
                    // caller for nothing, again and again.
                    if m.attempts < max_attempts || i == 0 {
                        m.due.min(m.since + hold)
                    } else {
                        m.since + hold
                    }
                })
            })
            .min()
    }

    /// Whether `instance` is being followed.
    pub fn knows(&self, instance: InstanceId) -> bool {
        self.senders.contains_key(&instance)
    }

    /// Forgets a sender that said goodbye (or went silent): it has nothing more to repair.
    pub fn forget(&mut self, instance: InstanceId) {
        self.senders.remove(&instance);
    }
}

/// Delivers the held messages that are now in order.
fn release<M>(s: &mut Sender<M>, out: &mut Vec<Delivery<M>>) {
    while let Some(entry) = s.held.first_entry() {
        if *entry.key() != s.next {
            break;
        }
        out.push(Delivery::Message(entry.remove()));
        s.next += 1;
    }
}

/// Delivers everything held (in order), counts the rest up to `seq` as lost, and follows the
/// sender from `seq` on; returns how many were lost.
fn resync<M>(s: &mut Sender<M>, seq: u64, out: &mut Vec<Delivery<M>>) -> u64 {
    let delivered = s.held.len() as u64;
    let span = seq.saturating_sub(s.next);
    out.extend(
        std::mem::take(&mut s.held)
            .into_values()
            .map(Delivery::Message),
    );
    s.missing.clear();
    s.next = seq;
    s.highest = seq.saturating_sub(1);
    span.saturating_sub(delivered)
}

/// Gives up the missing messages before the first held one; returns how many.
fn give_up_first_gap<M>(s: &mut Sender<M>) -> u64 {
    let Some(&first_held) = s.held.keys().next() else {
        return 0;
    };
    let lost = first_held - s.next;
    let gone: Vec<u64> = s.missing.range(..first_held).map(|(k, _)| *k).collect();
    for k in gone {
        s.missing.remove(&k);
    }
    s.next = first_held;
    lost
}

/// The sending half: the last messages sent, to answer NACKs from.
#[derive(Debug)]
pub struct SendBuffer<M> {
    capacity: usize,
    max_age: Duration,
    /// (seq, message, when sent, when last repaired)
    buf: VecDeque<(u64, M, Instant, Option<Instant>)>,
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
            min_interval,
        }
    }

    /// Remembers message `seq`, sent `now`.
    pub fn push(&mut self, seq: u64, msg: M, now: Instant) {
        if self.buf.len() == self.capacity {
            self.buf.pop_front();
        }
        self.buf.push_back((seq, msg, now, None));
    }

    /// The messages to retransmit for `ranges`, skipping those repaired within the last
    /// `min_interval` (one loss seen by many receivers is repaired once).
    pub fn repairs(&mut self, ranges: &[RangeInclusive<u64>], now: Instant) -> Vec<(u64, &M)> {
        let (min, max_age) = (self.min_interval, self.max_age);
        while self
            .buf
            .front()
            .is_some_and(|(_, _, sent, _)| now.saturating_duration_since(*sent) > max_age)
        {
            self.buf.pop_front();
        }
        let mut out = Vec::new();
        for (seq, msg, _, last) in &mut self.buf {
            if !ranges.iter().any(|r| r.contains(seq)) {
                continue;
            }
            if last.is_some_and(|t| now.saturating_duration_since(t) < min) {
                continue;
            }
            *last = Some(now);
            out.push((*seq, &*msg));
        }
        out
    }
}

/// The tag that marks a retransmission (`repair=1`). Senders leave room for it when they
/// split text, so a repair of the longest message still fits in one datagram.
pub const REPAIR_TAG: (&str, &str) = ("repair", "1");

/// The widest range a NACK carries.
pub const MAX_RANGE: u64 = 4096;

/// Parses `5-7,9` into ranges (at most 64, each no wider than 4096, ascending and
/// disjoint); anything else is refused whole.
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
        if b < a || b - a >= MAX_RANGE || out.len() >= 64 || !after_previous {
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
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use super::*;

    /// The loss injector's random source, seeded (the seed is printed).
    struct Rng(SplitMix64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0.next_u64()
        }
        fn fraction(&mut self) -> f64 {
            self.0.fraction()
        }
    }

    const A: InstanceId = InstanceId(0xa);

    /// What travels in the simulated network.
    #[derive(Debug, Clone)]
    enum Packet {
        Data(u64),
        Heartbeat(u64),
        Nack(Nack),
    }

    struct Outcome {
        /// Per receiver: the messages delivered, in order, and the losses reported.
        delivered: Vec<Vec<u64>>,
        lost: Vec<u64>,
        nacks: u64,
        injected_losses: u64,
    }

    /// One sender multicasting `n` messages every `gap` to `receivers`, over links that lose
    /// (`loss`), duplicate (`dup`) and delay by up to `jitter_ms` (so reorder); NACKs and
    /// repairs are multicast over the same links. Event-driven, in virtual time.
    fn simulate(
        seed: u64,
        n: u64,
        receivers: usize,
        loss: f64,
        dup: f64,
        jitter_ms: u64,
        outage: Option<(u64, u64)>,
    ) -> Outcome {
        eprintln!("seed {seed}");
        let mut rng = Rng(SplitMix64(seed));
        let t0 = Instant::now();
        let ms = |x: u64| t0 + Duration::from_millis(x);
        let config = RepairConfig::default();
        let mut rx: Vec<Receiver<u64>> = (0..receivers).map(|_| Receiver::new(config)).collect();
        let mut tx = SendBuffer::new(4096, Duration::from_secs(3), Duration::from_millis(20));
        // Every receiver is there from the start (it has seen the sender's join).
        for r in &mut rx {
            r.on_latest(A, 0, t0, &mut || 0.0);
        }
        // (time, seq-for-ordering, destination: usize::MAX = sender, packet)
        let mut queue: BinaryHeap<Reverse<(Instant, u64, usize, u64)>> = BinaryHeap::new();
        let mut packets: Vec<Packet> = Vec::new();
        let mut order = 0u64;
        let mut injected = 0u64;
        let mut nacks = 0u64;
        let mut delivered = vec![Vec::new(); receivers];
        let mut lost = vec![0u64; receivers];
        let mut send = |queue: &mut BinaryHeap<_>,
                        packets: &mut Vec<Packet>,
                        rng: &mut Rng,
                        at: Instant,
                        from: usize,
                        p: Packet,
                        injected: &mut u64| {
            let id = packets.len() as u64;
            packets.push(p);
            for dest in (0..receivers).chain([usize::MAX]) {
                if dest == from {
                    continue;
                }
                let in_outage = outage.is_some_and(|(a, b)| at >= ms(a) && at < ms(b));
                if in_outage || rng.fraction() < loss {
                    *injected += 1;
                    continue;
                }
                let copies = if rng.fraction() < dup { 2 } else { 1 };
                for _ in 0..copies {
                    let delay = Duration::from_micros(100 + rng.next() % (jitter_ms * 1000 + 1));
                    order += 1;
                    queue.push(Reverse((at + delay, order, dest, id)));
                }
            }
        };
        for seq in 1..=n {
            send(
                &mut queue,
                &mut packets,
                &mut rng,
                ms(seq * 5),
                usize::MAX,
                Packet::Data(seq),
                &mut injected,
            );
            tx.push(seq, seq, ms(seq * 5));
        }
        // Heartbeats every 500 ms after the burst, as a peer sends them.
        for k in 0..8 {
            send(
                &mut queue,
                &mut packets,
                &mut rng,
                ms(n * 5 + 500 * (k + 1)),
                usize::MAX,
                Packet::Heartbeat(n),
                &mut injected,
            );
        }
        let mut now = t0;
        let end = ms(n * 5 + 10_000);
        while now < end {
            // Next event: a packet, or the earliest receiver timer.
            let timer = rx.iter().filter_map(Receiver::next_deadline).min();
            let packet_at = queue.peek().map(|Reverse((t, ..))| *t);
            let next = match (timer, packet_at) {
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => break,
            };
            now = next.max(now);
            if packet_at == Some(next) {
                let Some(Reverse((_, _, dest, id))) = queue.pop() else {
                    break;
                };
                let p = packets[id as usize].clone();
                if dest == usize::MAX {
                    if let Packet::Nack(nack) = p {
                        let repairs: Vec<u64> = tx
                            .repairs(&nack.ranges, now)
                            .into_iter()
                            .map(|(s, _)| s)
                            .collect();
                        for seq in repairs {
                            send(
                                &mut queue,
                                &mut packets,
                                &mut rng,
                                now,
                                usize::MAX,
                                Packet::Data(seq),
                                &mut injected,
                            );
                        }
                    }
                    continue;
                }
                let r = &mut rx[dest];
                let mut jitter = || rng.fraction();
                match p {
                    Packet::Data(seq) => {
                        for d in r.on_message(A, seq, seq, now, &mut jitter) {
                            match d {
                                Delivery::Message(m) => delivered[dest].push(m),
                                Delivery::Lost { count, .. } => lost[dest] += count,
                            }
                        }
                    }
                    Packet::Heartbeat(latest) => r.on_latest(A, latest, now, &mut jitter),
                    Packet::Nack(nack) => r.on_nack_seen(&nack, now, &mut jitter),
                }
                continue;
            }
            for i in 0..receivers {
                let (out, deliveries) = rx[i].poll(now, &mut || rng.fraction());
                for d in deliveries {
                    match d {
                        Delivery::Message(m) => delivered[i].push(m),
                        Delivery::Lost { count, .. } => lost[i] += count,
                    }
                }
                for nack in out {
                    nacks += 1;
                    send(
                        &mut queue,
                        &mut packets,
                        &mut rng,
                        now,
                        i,
                        Packet::Nack(nack),
                        &mut injected,
                    );
                }
            }
        }
        Outcome {
            delivered,
            lost,
            nacks,
            injected_losses: injected,
        }
    }

    fn exactly_once_in_order(o: &Outcome, n: u64) {
        for (i, d) in o.delivered.iter().enumerate() {
            assert!(
                d.windows(2).all(|w| w[0] < w[1]),
                "receiver {i}: out of order or duplicated"
            );
            assert_eq!(
                d.len() as u64 + o.lost[i],
                n,
                "receiver {i}: {} delivered, {} lost",
                d.len(),
                o.lost[i]
            );
        }
    }

    #[test]
    fn ten_and_thirty_percent_loss_are_fully_repaired() {
        for (seed, loss) in [(1, 0.10), (2, 0.30), (3, 0.30)] {
            let o = simulate(seed, 1000, 4, loss, 0.02, 8, None);
            assert!(
                o.injected_losses > 100,
                "loss really happened: {}",
                o.injected_losses
            );
            exactly_once_in_order(&o, 1000);
            assert_eq!(o.lost, vec![0; 4], "seed {seed}, loss {loss}");
        }
    }

    #[test]
    fn thirty_percent_loss_is_repaired_for_many_seeds() {
        let mut bad = 0;
        for seed in 100..130 {
            let o = simulate(seed, 1000, 4, 0.30, 0.02, 8, None);
            exactly_once_in_order(&o, 1000);
            if o.lost.iter().any(|l| *l > 0) {
                bad += 1;
            }
        }
        assert_eq!(bad, 0);
    }

    #[test]
    fn fifty_percent_loss_is_repaired_or_reported_never_silent() {
        let o = simulate(4, 500, 4, 0.5, 0.0, 5, None);
        assert!(o.injected_losses > 500);
        exactly_once_in_order(&o, 500);
    }

    #[test]
    fn duplicates_and_reordering_are_shown_once_in_order() {
        let o = simulate(5, 500, 3, 0.0, 0.5, 40, None);
        exactly_once_in_order(&o, 500);
        assert_eq!(o.lost, vec![0; 3]);
        // Reordering beyond the back-off costs NACKs (and repairs), never a wrong delivery.
        eprintln!("{} NACKs for reordering", o.nacks);
    }

    #[test]
    fn a_burst_outage_is_repaired_and_a_long_partition_reported_once() {
        // 1 s outage in the middle of a 5 s stream: repaired after it ends.
        let o = simulate(6, 1000, 2, 0.0, 0.0, 2, Some((2000, 3000)));
        assert!(o.injected_losses > 100);
        exactly_once_in_order(&o, 1000);
        assert_eq!(o.lost, vec![0; 2]);
        // An outage longer than the repair window: the loss is reported, and NACKs stop.
        let o = simulate(7, 1000, 2, 0.0, 0.0, 2, Some((1000, 6000)));
        exactly_once_in_order(&o, 1000);
        assert!(o.lost.iter().all(|l| *l > 0));
        assert!(o.nacks < 200, "NACKs stop after the window: {}", o.nacks);
    }

    #[test]
    fn nacks_stay_a_small_multiple_of_losses_with_many_receivers() {
        // Loss on the sender's side (every receiver misses the same datagrams) is where
        // suppression matters: 20 receivers behind one loss.
        let o = simulate(8, 400, 20, 0.0, 0.0, 3, Some((500, 700)));
        exactly_once_in_order(&o, 400);
        let lost_datagrams = 40; // 200 ms at one message per 5 ms
        assert!(
            o.nacks < 20 * 3,
            "{} NACKs for one burst of {lost_datagrams} seen by 20",
            o.nacks
        );
    }

    #[test]
    fn hostile_sequence_numbers_are_bounded() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.5;
        assert_eq!(
            r.on_message(A, 1, 1, t0, &mut j),
            vec![Delivery::Message(1)]
        );
        let out = r.on_message(A, u64::MAX - 1, 9, t0, &mut j);
        assert_eq!(out.last(), Some(&Delivery::Message(9)));
        assert!(
            matches!(out[0], Delivery::Lost { .. }),
            "the jump is reported"
        );
        r.on_latest(A, u64::MAX, t0, &mut j);
        assert!(r.senders[&A].missing.len() <= 2048);
        assert_eq!(
            r.on_message(A, u64::MAX - 1, 9, t0, &mut j),
            vec![],
            "duplicate"
        );
        assert_eq!(
            r.on_message(A, u64::MAX, 9, t0, &mut j),
            vec![],
            "never valid"
        );
    }

    #[test]
    fn heartbeats_far_ahead_keep_memory_bounded_and_report_once() {
        let t0 = Instant::now();
        let config = RepairConfig::default();
        let mut r: Receiver<u64> = Receiver::new(config);
        let mut j = || 0.5;
        r.on_message(A, 1, 1, t0, &mut j);
        for k in 1..=100u64 {
            r.on_latest(A, k * 5000, t0, &mut j);
        }
        assert!(r.senders[&A].missing.len() <= config.max_held, "bounded");
        let (nacks, released) = r.poll(t0 + Duration::from_secs(1), &mut j);
        // Only the top window is asked for; everything below was reported lost at once.
        assert!(
            nacks
                .iter()
                .all(|n| n.ranges.iter().all(|x| x.end() - x.start() < MAX_RANGE))
        );
        assert!(matches!(released.first(), Some(Delivery::Lost { .. })));
    }

    #[test]
    fn nack_ranges_must_be_ascending_and_disjoint() {
        assert!(parse_ranges("2,2").is_none());
        assert!(parse_ranges("5-9,7").is_none());
        assert!(parse_ranges("9,5").is_none());
        assert_eq!(parse_ranges("1-3,5").unwrap(), vec![1..=3, 5..=5]);
    }

    #[test]
    fn hearing_others_does_not_use_up_our_tries_and_timers_do_not_spin() {
        let t0 = Instant::now();
        let config = RepairConfig::default();
        let mut r: Receiver<u64> = Receiver::new(config);
        let mut j = || 0.5;
        r.on_message(A, 1, 1, t0, &mut j);
        r.on_message(A, 5, 5, t0, &mut j);
        let nack = Nack {
            instance: A,
            ranges: vec![2..=4],
        };
        for _ in 0..100 {
            r.on_nack_seen(&nack, t0, &mut j);
        }
        assert!(r.senders[&A].missing.values().all(|m| m.attempts == 0));
        // Run the timers to the end: every wake-up is in the future, and the gap ends as
        // one "lost" notice followed by the held message.
        let mut now = t0;
        let mut released = Vec::new();
        let mut wakeups = 0;
        while let Some(next) = r.next_deadline() {
            assert!(next >= now, "a deadline in the past would spin");
            now = next;
            let (_, out) = r.poll(now, &mut j);
            released.extend(out);
            wakeups += 1;
            assert!(wakeups < 200, "too many wake-ups");
        }
        assert_eq!(
            released,
            vec![
                Delivery::Lost {
                    instance: A,
                    count: 3
                },
                Delivery::Message(5)
            ]
        );
    }

    #[test]
    fn evicting_a_sender_flushes_what_it_held() {
        let t0 = Instant::now();
        let config = RepairConfig {
            max_senders: 1,
            ..RepairConfig::default()
        };
        let mut r: Receiver<u64> = Receiver::new(config);
        let mut j = || 0.5;
        r.on_message(A, 1, 1, t0, &mut j);
        r.on_message(A, 3, 3, t0, &mut j);
        let b = InstanceId(0xb);
        r.on_message(b, 1, 100, t0, &mut j);
        let (_, released) = r.poll(t0, &mut j);
        assert_eq!(
            released,
            vec![
                Delivery::Lost {
                    instance: A,
                    count: 1
                },
                Delivery::Message(3)
            ]
        );
    }

    #[test]
    fn restarted_sender_is_a_new_instance() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.0;
        for s in 1..=5 {
            r.on_message(A, s, s, t0, &mut j);
        }
        let b = InstanceId(0xb);
        assert_eq!(
            r.on_message(b, 1, 100, t0, &mut j),
            vec![Delivery::Message(100)]
        );
        assert_eq!(r.stats().duplicates, 0);
    }

    #[test]
    fn send_buffer_repairs_once_per_interval() {
        let t0 = Instant::now();
        let mut b = SendBuffer::new(3, Duration::from_secs(3), Duration::from_millis(20));
        for s in 1..=5 {
            b.push(s, s, t0);
        }
        assert_eq!(
            b.repairs(&[1..=4], t0),
            vec![(3, &3), (4, &4)],
            "1 and 2 fell out of the buffer"
        );
        assert!(
            b.repairs(&[3..=3], t0 + Duration::from_millis(10))
                .is_empty()
        );
        assert_eq!(
            b.repairs(&[3..=3], t0 + Duration::from_millis(30)),
            vec![(3, &3)]
        );
        assert!(
            b.repairs(&[3..=5], t0 + Duration::from_secs(4)).is_empty(),
            "too old"
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
