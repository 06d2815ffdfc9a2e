//! The receiving half of loss repair: for every sender heard, which of its messages are
//! missing, which are held until a gap closes, when to NACK, and when to give up.
//!
//! **Hostile input costs little.** Anyone on the LAN can make up instance ids and sequence
//! numbers, so every cost is bounded by [`RepairConfig`], per sender and in total:
//! - Timers are kept in ordered indexes of `(due, sender)`: [`Receiver::next_deadline`] is
//!   O(log n) and [`Receiver::poll`] visits only senders that are due. A sender's NACK key is
//!   a lower bound (opening a gap lowers it; a repair or suppression leaves it), made exact
//!   when the sender is polled, so the common paths never scan a sender's gaps.
//! - A sender heard only through presence (join, heartbeat) may open at most
//!   `presence_window` missing numbers until one of its messages arrives; then `window`, the
//!   number of messages a sender keeps for repair.
//! - In total at most `max_missing` missing numbers and `max_held_bytes` of held messages
//!   (weighed by their size); past either, the oldest gap is given up and reported, those of
//!   senders never heard to send a message first. At most `nacks_per_second` NACK datagrams
//!   go out, senders heard to send messages served first, and of them at most
//!   `presence_nacks_per_second` for senders heard only through presence.
//! - A datagram that jumps beyond the window is a **claim**, not a fact: it changes nothing
//!   until a later datagram of the same sender confirms it, and one below it (the real
//!   sender, carrying on) cancels it. A jump confirmed anyway (by a second forgery), and a
//!   position learned from history, stay **tentative**: a new (not repaired) message below
//!   them that was never delivered is taken as the sender's, and followed from.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::followed::{Claim, Held, Keys, Sender, Tentative, collect_due, revert, take_in_window};
use super::{Jitter, Nack};
use crate::wire::InstanceId;

/// The knobs of repair. The defaults repair a loss within about 50 ms when one round
/// suffices, and give up after 30 tries or 4 s.
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
    /// The span of sequence numbers followed per sender (missing and held): what senders
    /// keep for repair. A datagram beyond it is a claim (see the module docs).
    pub window: u64,
    /// The span for a sender heard only through presence so far.
    pub presence_window: u64,
    /// Senders tracked; beyond it the quietest is forgotten.
    pub max_senders: usize,
    /// Missing numbers over all senders.
    pub max_missing: usize,
    /// Bytes of held messages over all senders.
    pub max_held_bytes: usize,
    /// NACK datagrams per second over all senders (and the burst).
    pub nacks_per_second: u32,
    /// Of those, at most this many for senders heard only through presence: made-up ids
    /// cost the LAN a fraction of the budget.
    pub presence_nacks_per_second: u32,
    /// How long a claim waits for a datagram that confirms it.
    pub claim_ttl: Duration,
}

impl Default for RepairConfig {
    fn default() -> Self {
        Self {
            backoff_max: Duration::from_millis(30),
            retry: Duration::from_millis(100),
            max_attempts: 30,
            hold_max: Duration::from_secs(4),
            window: 1024,
            presence_window: 64,
            max_senders: 4096,
            max_missing: 65_536,
            max_held_bytes: 8 << 20,
            nacks_per_second: 256,
            presence_nacks_per_second: 64,
            // Longer than a heartbeat interval, so an idle sender's next heartbeat confirms
            // a real jump (after a long partition).
            claim_ttl: Duration::from_secs(20),
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
        /// Whether messages of this sender had arrived before; `false` for a sender heard
        /// only through presence (perhaps one made up by a flood), whose notices a front end
        /// may sum.
        heard: bool,
    },
}

/// Counters, for `/stats`, the tests and the benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RepairStats {
    /// Datagrams seen before (or already given up).
    pub duplicates: u64,
    /// NACK datagrams this receiver produced.
    pub nacks_sent: u64,
    /// Missing numbers whose NACK was put off because another receiver asked first.
    pub nacks_suppressed: u64,
    /// Times the NACK budget was spent while a sender was due.
    pub nacks_deferred: u64,
    /// Messages given up.
    pub lost: u64,
    /// Messages that arrived after being found missing.
    pub repaired: u64,
    /// Entries visited by timers and NACK handling: the work hostile input can cause.
    pub visited: u64,
    /// Jumps beyond the window, held as claims.
    pub claims: u64,
    /// Claims contradicted by the sender or never confirmed.
    pub claims_rejected: u64,
    /// Tentative positions undone by the sender's own messages.
    pub reverts: u64,
    /// The sender's own new messages from just below a tentative position, shown as they
    /// came.
    pub extras: u64,
    /// Gaps given up early because a global budget was full.
    pub budget_give_ups: u64,
    /// Senders forgotten to make room for new ones.
    pub evicted: u64,
    /// Repairs of senders not followed (history to this receiver), and `seq` 2^64-1.
    pub ignored: u64,
}

/// A token bucket for NACK datagrams, refilled from the times passed in.
#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let add = now.saturating_duration_since(at).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + add).min(self.rate);
        }
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
    }

    /// Whether a token is there. Within [`TOKEN_SLACK`] of one counts, so that the time
    /// [`Bucket::ready_at`] names is never a moment when the token is still a rounding error
    /// away (the driver would wake for nothing, again and again).
    fn has_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= 1.0 - TOKEN_SLACK
    }

    fn spend(&mut self) {
        self.tokens = (self.tokens - 1.0).max(0.0);
    }

    /// When the next token is there (`None`: now), rounded up to the microsecond.
    fn ready_at(&self) -> Option<Instant> {
        let at = self.at?;
        (self.tokens < 1.0 - TOKEN_SLACK).then(|| {
            let wait = Duration::from_secs_f64((1.0 - self.tokens) / self.rate);
            at + wait + Duration::from_micros(1)
        })
    }
}

/// How close to a whole token counts as one (see [`Bucket::has_token`]).
const TOKEN_SLACK: f64 = 1e-6;

/// Senders forgotten lately, with where they stood, so a sender that speaks after its
/// `leave` is followed on from there (no repairs of what was delivered, no false gaps).
const FORGOTTEN_MEMORY: usize = 256;
/// Of a forgotten sender's tentative position, the delivered numbers kept.
const FORGOTTEN_SEEN: usize = 64;

/// The receiving half: one state per sender instance, and the indexes over them.
#[derive(Debug)]
pub struct Receiver<M> {
    config: RepairConfig,
    senders: HashMap<InstanceId, Sender<M>>,
    /// NACK lower bounds by (due, sender): `[0]` senders heard only through presence, `[1]`
    /// senders heard to send messages (served first).
    nacks: [BTreeSet<(Instant, InstanceId)>; 2],
    giveups: BTreeSet<(Instant, InstanceId)>,
    /// Senders with gaps, by (heard_message, when their oldest gap opened): budget victims.
    ages: BTreeSet<(bool, Instant, InstanceId)>,
    /// Every sender, by (something open, last heard): eviction victims.
    quiet: BTreeSet<(bool, Instant, InstanceId)>,
    missing_total: usize,
    held_bytes_total: usize,
    bucket: Bucket,
    presence_bucket: Bucket,
    forgotten: VecDeque<(InstanceId, u64, Option<Tentative>)>,
    stats: RepairStats,
}

impl<M> Receiver<M> {
    /// A receiver with `config`.
    pub fn new(config: RepairConfig) -> Self {
        let rate = f64::from(config.nacks_per_second.max(1));
        let presence_rate = f64::from(config.presence_nacks_per_second.max(1));
        Self {
            config,
            senders: HashMap::new(),
            nacks: [BTreeSet::new(), BTreeSet::new()],
            giveups: BTreeSet::new(),
            ages: BTreeSet::new(),
            quiet: BTreeSet::new(),
            missing_total: 0,
            held_bytes_total: 0,
            bucket: Bucket {
                rate,
                tokens: rate,
                at: None,
            },
            presence_bucket: Bucket {
                rate: presence_rate,
                tokens: presence_rate,
                at: None,
            },
            forgotten: VecDeque::new(),
            stats: RepairStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> RepairStats {
        self.stats
    }

    /// Senders followed.
    pub fn senders(&self) -> usize {
        self.senders.len()
    }

    /// Missing numbers over all senders.
    pub fn missing(&self) -> usize {
        self.missing_total
    }

    /// Bytes of held messages over all senders.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes_total
    }

    /// Whether `instance` is being followed.
    pub fn knows(&self, instance: InstanceId) -> bool {
        self.senders.contains_key(&instance)
    }

    fn first_due(&self, now: Instant, jitter: &mut impl Jitter) -> Instant {
        now + self.config.backoff_max.mul_f64(jitter.fraction())
    }

    /// Files `id` in the indexes anew and keeps the totals, after any change to it; forgets
    /// it if it departed and has nothing open.
    fn settle(&mut self, id: InstanceId) {
        let Some(s) = self.senders.get_mut(&id) else {
            return;
        };
        let keys = std::mem::take(&mut s.keys);
        self.unfile(id, &keys);
        let Some(s) = self.senders.get_mut(&id) else {
            return;
        };
        if s.departed && !s.is_open() {
            let next = s.next;
            let tentative = s.tentative.take();
            self.senders.remove(&id);
            self.remember_forgotten(id, next, tentative);
            return;
        }
        if s.missing.is_empty() {
            s.nack_due = None;
        }
        self.missing_total += s.missing.len();
        self.held_bytes_total += s.held_bytes;
        s.keys.missing = s.missing.len();
        s.keys.held_bytes = s.held_bytes;
        let h = s.heard_message;
        if let Some(t) = s.nack_due {
            self.nacks[usize::from(h)].insert((t, id));
            s.keys.nack = Some((h, t));
        }
        if let Some(t) = s.giveup_at(&self.config) {
            self.giveups.insert((t, id));
            s.keys.giveup = Some(t);
        }
        if let Some((_, m)) = s.missing.first_key_value() {
            self.ages.insert((h, m.since, id));
            s.keys.age = Some((h, m.since));
        }
        let open = s.is_open();
        self.quiet.insert((open, s.last_heard, id));
        s.keys.quiet = Some((open, s.last_heard));
    }

    /// Remembers where a forgotten sender stood, and its tentative position if it was not
    /// proven (so a forged position stays undoable), with the last of what it delivered
    /// below that position.
    fn remember_forgotten(&mut self, id: InstanceId, next: u64, tentative: Option<Tentative>) {
        if self.forgotten.len() >= FORGOTTEN_MEMORY {
            self.forgotten.pop_front();
        }
        let tentative = tentative.map(|mut t| {
            while t.seen.len() > FORGOTTEN_SEEN {
                t.seen.pop_first();
            }
            t
        });
        self.forgotten.push_back((id, next, tentative));
    }

    /// Starts following `instance` at `next` (tentatively), making room if needed; or, for a
    /// sender forgotten lately, from where it stood (proven). Returns whether it was that.
    fn admit(
        &mut self,
        instance: InstanceId,
        next: u64,
        now: Instant,
        out: &mut Vec<Delivery<M>>,
    ) -> bool {
        if self.senders.len() >= self.config.max_senders
            && let Some(&(_, _, victim)) = self.quiet.first()
        {
            // The quietest sender with nothing open goes first; if every one has a gap open,
            // the quietest overall, with what it held delivered and its gaps reported lost.
            if let Some(mut old) = self.senders.remove(&victim) {
                self.unfile(victim, &old.keys);
                let lost = old.flush(victim, out);
                self.stats.lost = self.stats.lost.saturating_add(lost);
                self.stats.evicted += 1;
                // Past everything delivered or reported just now.
                let next = old.highest.saturating_add(1).max(old.next);
                let tentative = old.tentative.take();
                self.remember_forgotten(victim, next, tentative);
            }
        }
        let restored = self
            .forgotten
            .iter()
            .position(|(id, ..)| *id == instance)
            .and_then(|i| self.forgotten.remove(i));
        let was_restored = restored.is_some();
        let mut s = Sender::new(restored.as_ref().map_or(next, |(_, n, _)| *n), now);
        s.tentative = match restored {
            None => Some(Tentative::first_contact(next)),
            Some((_, _, tentative)) => tentative,
        };
        self.senders.insert(instance, s);
        was_restored
    }

    /// Removes a sender's keys from the indexes and its share of the totals.
    fn unfile(&mut self, id: InstanceId, k: &Keys) {
        if let Some((h, t)) = k.nack {
            self.nacks[usize::from(h)].remove(&(t, id));
        }
        if let Some(t) = k.giveup {
            self.giveups.remove(&(t, id));
        }
        if let Some((h, t)) = k.age {
            self.ages.remove(&(h, t, id));
        }
        if let Some((o, t)) = k.quiet {
            self.quiet.remove(&(o, t, id));
        }
        self.missing_total -= k.missing;
        self.held_bytes_total -= k.held_bytes;
    }

    /// Follows `instance` from `first_seq` (a sender that started moments ago: its first
    /// messages are still in its buffer). Does nothing for a sender already followed.
    pub fn follow_from(
        &mut self,
        instance: InstanceId,
        first_seq: u64,
        now: Instant,
    ) -> Vec<Delivery<M>> {
        let mut out = Vec::new();
        if !self.senders.contains_key(&instance) {
            self.admit(instance, first_seq.max(1), now, &mut out);
            // The first message (at most 64, sent moments ago) proves or undoes it.
            self.settle(instance);
        }
        out
    }

    /// A message `seq` from `instance`, `bytes` long, `repair` if it came as a
    /// retransmission. Returns what can be delivered now, in order.
    #[allow(clippy::too_many_arguments)]
    pub fn on_message(
        &mut self,
        instance: InstanceId,
        seq: u64,
        msg: M,
        bytes: usize,
        repair: bool,
        now: Instant,
        jitter: &mut impl Jitter,
    ) -> Vec<Delivery<M>> {
        let mut out = Vec::new();
        if seq == u64::MAX {
            // No sender gets there; the number can only be hostile.
            self.stats.ignored += 1;
            return out;
        }
        if !self.senders.contains_key(&instance) {
            if repair {
                // A repair for someone else, from a sender we have not followed: it is
                // history, not where this sender stands.
                self.stats.ignored += 1;
                return out;
            }
            if !self.admit(instance, seq, now, &mut out)
                && let Some(s) = self.senders.get_mut(&instance)
                && let Some(t) = &mut s.tentative
            {
                // This message does not prove itself; the next one does. It is delivered
                // below the position, so a copy of it undoes nothing.
                t.top = seq.saturating_add(1);
                t.seen.insert(seq);
            }
        }
        let due = self.first_due(now, jitter);
        let config = self.config;
        let Some(s) = self.senders.get_mut(&instance) else {
            return out;
        };
        if s.heard_at(now) {
            self.stats.claims_rejected += 1;
        }
        s.heard_message = true;
        // A new message at or above a tentative position proves it (not the copy of a
        // claiming message, and not one that confirms a claim: see below).
        let proves = !repair
            && s.tentative.as_ref().is_some_and(|t| seq >= t.top)
            && seq >= s.next
            && seq - s.next < s.window(&config)
            && !s.held.contains_key(&seq);
        if proves {
            s.tentative = None;
        }
        let held = Held { msg, bytes };
        if seq < s.next {
            let w = s.window(&config);
            match &mut s.tentative {
                Some(t) if !repair && t.undone_by(seq) && t.top - seq >= w => {
                    // Far below a position nothing proved: that position was forged.
                    self.stats.reverts += 1;
                    revert(s, instance, seq, held, &mut self.stats, &mut out);
                }
                Some(t) if !repair && t.undone_by(seq) => {
                    // Near below it: the sender's own message from before where we took it
                    // up (reordered, or a forged position close by). Shown once, as it
                    // comes; where the sender stands does not move.
                    self.stats.extras += 1;
                    t.seen.insert(seq);
                    while t.seen.len() > config.window as usize {
                        t.seen.pop_first();
                    }
                    out.push(Delivery::Message(held.msg));
                }
                _ => self.stats.duplicates += 1,
            }
        } else if s.held.contains_key(&seq)
            || s.claim
                .as_ref()
                .is_some_and(|c| c.top == seq && c.msg.is_some())
        {
            // Seen before; a copy of the claiming message does not confirm its claim.
            self.stats.duplicates += 1;
        } else if seq - s.next >= s.window(&config) {
            if !self.confirm_claim(instance, seq, now, due, &mut out) {
                self.stats.claims += 1;
                let Some(s) = self.senders.get_mut(&instance) else {
                    return out;
                };
                let floor = seq - (s.window(&config) - 1);
                s.claim = Some(Claim {
                    top: seq,
                    floor,
                    msg: Some(held),
                    expires: now + config.claim_ttl,
                });
                self.settle(instance);
                return out;
            }
            if let Some(s) = self.senders.get_mut(&instance) {
                if seq < s.next || s.held.contains_key(&seq) {
                    self.stats.duplicates += 1;
                } else {
                    take_in_window(s, seq, held, repair, now, due, &mut self.stats, &mut out);
                }
            }
        } else {
            if s.claim.as_ref().is_some_and(|c| seq < c.floor) {
                // The sender carries on below what was claimed in its name.
                s.claim = None;
                self.stats.claims_rejected += 1;
            }
            take_in_window(s, seq, held, repair, now, due, &mut self.stats, &mut out);
        }
        self.settle(instance);
        self.enforce_budgets(&mut out);
        out
    }

    /// If `instance` has a claim that `value` (a later sequence number) confirms, applies
    /// it; returns whether it did.
    fn confirm_claim(
        &mut self,
        instance: InstanceId,
        value: u64,
        now: Instant,
        due: Instant,
        out: &mut Vec<Delivery<M>>,
    ) -> bool {
        let config = self.config;
        let Some(s) = self.senders.get_mut(&instance) else {
            return false;
        };
        let w = s.window(&config);
        let confirms = s
            .claim
            .as_ref()
            .is_some_and(|c| value >= c.floor && value < c.top.saturating_add(w));
        if !confirms {
            return false;
        }
        let Some(claim) = s.claim.take() else {
            return false;
        };
        let top = claim.top.max(value);
        let floor = top - (w - 1);
        let old_next = s.next;
        // What is held below the new floor is delivered; what is missing there is lost.
        let below: Vec<u64> = s.held.range(..floor).map(|(k, _)| *k).collect();
        let mut seen = BTreeSet::new();
        for k in below {
            if let Some(h) = s.held.remove(&k) {
                s.held_bytes -= h.bytes;
                out.push(Delivery::Message(h.msg));
                seen.insert(k);
            }
        }
        let lost = floor
            .saturating_sub(s.next)
            .saturating_sub(seen.len() as u64);
        s.missing = s.missing.split_off(&floor);
        s.next = s.next.max(floor);
        s.highest = s.highest.max(s.next.saturating_sub(1));
        // A sender never heard to send a message owes us nothing below where it stands now
        // (as when it is first heard); one that did has its loss reported.
        if lost > 0 && s.heard_message {
            out.push(Delivery::Lost {
                instance,
                count: lost,
                heard: true,
            });
            self.stats.lost = self.stats.lost.saturating_add(lost);
        }
        let report_loss = s.heard_message;
        s.tentative = Some(Tentative {
            back_to: old_next,
            top: floor,
            seen,
            report_loss,
        });
        s.release(out);
        // The claiming message arrives now, as any message would (the window may have
        // moved up to it since it came).
        if let Some(held) = claim.msg
            && claim.top >= s.next
            && !s.held.contains_key(&claim.top)
        {
            s.missing.remove(&claim.top);
            s.open(s.highest.saturating_add(1), claim.top - 1, now, due);
            s.hold(claim.top, held);
            s.release(out);
        }
        true
    }

    /// A heartbeat (or any control datagram) announcing `latest`, the sender's highest
    /// sequence number: a loss at the tail of a burst shows here.
    pub fn on_latest(
        &mut self,
        instance: InstanceId,
        latest: u64,
        now: Instant,
        jitter: &mut impl Jitter,
    ) -> Vec<Delivery<M>> {
        let mut out = Vec::new();
        if latest == u64::MAX {
            self.stats.ignored += 1;
            return out;
        }
        if !self.senders.contains_key(&instance) {
            // First heard from through a control datagram (its join, a heartbeat): follow it
            // from its next message on; nothing of its past is owed to us. One forgotten
            // lately is followed on from where it stood, and its tail asked for below.
            if !self.admit(instance, latest.saturating_add(1), now, &mut out) {
                self.settle(instance);
                return out;
            }
        }
        let due = self.first_due(now, jitter);
        let config = self.config;
        let Some(s) = self.senders.get_mut(&instance) else {
            return out;
        };
        if s.heard_at(now) {
            self.stats.claims_rejected += 1;
        }
        if s.claim.as_ref().is_some_and(|c| latest < c.floor) {
            s.claim = None;
            self.stats.claims_rejected += 1;
        }
        if latest >= s.next {
            if latest - s.next >= s.window(&config) {
                if self.confirm_claim(instance, latest, now, due, &mut out) {
                    if let Some(s) = self.senders.get_mut(&instance)
                        && latest >= s.next
                    {
                        s.open(s.highest.saturating_add(1), latest, now, due);
                    }
                } else {
                    self.stats.claims += 1;
                    if let Some(s) = self.senders.get_mut(&instance) {
                        let floor = latest - (s.window(&config) - 1);
                        // A heartbeat's claim does not replace a message's with the same top.
                        if s.claim.as_ref().is_none_or(|c| c.top != latest) {
                            s.claim = Some(Claim {
                                top: latest,
                                floor,
                                msg: None,
                                expires: now + config.claim_ttl,
                            });
                        }
                    }
                }
            } else {
                s.open(s.highest.saturating_add(1), latest, now, due);
            }
        }
        self.settle(instance);
        self.enforce_budgets(&mut out);
        out
    }

    /// What mcchatd's history showed of `instance` (its sequence numbers), for a sender not
    /// followed yet: followed from after the last, tentatively, since a forged record could
    /// claim any number.
    pub fn on_history(
        &mut self,
        instance: InstanceId,
        seqs: &[u64],
        now: Instant,
    ) -> Vec<Delivery<M>> {
        let mut out = Vec::new();
        let valid = seqs.iter().copied().filter(|s| *s != u64::MAX);
        let seen: BTreeSet<u64> = valid.collect();
        let Some(&last) = seen.last() else {
            return out;
        };
        if self.senders.contains_key(&instance) {
            return out;
        }
        if self.admit(instance, last.saturating_add(1), now, &mut out) {
            // Forgotten lately: where it stood is proven; history below it was delivered.
            self.settle(instance);
            return out;
        }
        let window = self.config.window as usize;
        let mut seen = seen;
        while seen.len() > window {
            seen.pop_first();
        }
        if let Some(s) = self.senders.get_mut(&instance) {
            s.heard_message = true;
            s.tentative = Some(Tentative {
                back_to: seen.first().copied().unwrap_or(last),
                top: last.saturating_add(1),
                seen,
                report_loss: true,
            });
        }
        self.settle(instance);
        out
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
                self.stats.visited += 1;
                if m.due > now && m.due < later {
                    m.due = later;
                    self.stats.nacks_suppressed += 1;
                }
            }
        }
        // The NACK key stays a lower bound; the give-up key may not change.
    }

    /// `instance` left (or went silent): its state is freed once its gaps are repaired or
    /// given up, so its last messages can still be repaired.
    pub fn forget(&mut self, instance: InstanceId) {
        if let Some(s) = self.senders.get_mut(&instance) {
            s.departed = true;
            s.claim = None;
            self.settle(instance);
        }
    }

    /// Gives up gaps, oldest first (those of senders never heard to send a message before
    /// the others), until both global budgets hold.
    fn enforce_budgets(&mut self, out: &mut Vec<Delivery<M>>) {
        while self.missing_total > self.config.max_missing
            || self.held_bytes_total > self.config.max_held_bytes
        {
            let Some(&(_, _, id)) = self.ages.first() else {
                break;
            };
            let Some(s) = self.senders.get_mut(&id) else {
                break;
            };
            let lost = s.give_up_first_gap(id, out);
            self.stats.lost = self.stats.lost.saturating_add(lost);
            self.stats.budget_give_ups += 1;
            self.settle(id);
        }
    }

    /// Timer work: the NACKs due now, and what giving up on old gaps releases.
    pub fn poll(
        &mut self,
        now: Instant,
        jitter: &mut impl Jitter,
    ) -> (Vec<Nack>, Vec<Delivery<M>>) {
        let config = self.config;
        let mut nacks = Vec::new();
        let mut out = Vec::new();
        while let Some(&(t, id)) = self.giveups.first() {
            if t > now {
                break;
            }
            let Some(s) = self.senders.get_mut(&id) else {
                self.giveups.pop_first();
                continue;
            };
            // Give up, in order, on the first gap once it has had its chances.
            let mut lost = 0;
            while let Some((&seq, m)) = s.missing.first_key_value() {
                self.stats.visited += 1;
                let tried_out = m.attempts >= config.max_attempts && m.due <= now;
                let too_old = now.saturating_duration_since(m.since) >= config.hold_max;
                if !(tried_out || too_old) {
                    break;
                }
                s.missing.pop_first();
                lost += 1;
                s.next = s.next.max(seq.saturating_add(1));
                let mut released = Vec::new();
                s.release(&mut released);
                if !released.is_empty() {
                    out.push(Delivery::Lost {
                        instance: id,
                        count: lost,
                        heard: s.heard_message,
                    });
                    self.stats.lost = self.stats.lost.saturating_add(lost);
                    lost = 0;
                    out.extend(released);
                }
            }
            if lost > 0 {
                out.push(Delivery::Lost {
                    instance: id,
                    count: lost,
                    heard: s.heard_message,
                });
                self.stats.lost = self.stats.lost.saturating_add(lost);
            }
            self.settle(id);
        }
        // Ask for what is due, senders heard to send messages first, within the budget.
        'classes: for heard in [true, false] {
            let set = usize::from(heard);
            while let Some(&(t, id)) = self.nacks[set].first() {
                if t > now {
                    break;
                }
                if !self.bucket.has_token(now) {
                    self.stats.nacks_deferred += 1;
                    break 'classes;
                }
                if !heard && !self.presence_bucket.has_token(now) {
                    self.stats.nacks_deferred += 1;
                    break 'classes;
                }
                let Some(s) = self.senders.get_mut(&id) else {
                    self.nacks[set].pop_first();
                    continue;
                };
                // Every round is jittered (once per sender, so what is asked together stays
                // together): receivers behind one loss do not all ask again in the same
                // millisecond, and suppression keeps working after the first round.
                let again = now + config.retry + config.backoff_max.mul_f64(jitter.fraction());
                let (ranges, visited) = collect_due(s, now, again, config.max_attempts);
                self.stats.visited += visited;
                if !ranges.is_empty() {
                    self.bucket.spend();
                    if !heard {
                        self.presence_bucket.spend();
                    }
                    self.stats.nacks_sent += 1;
                    nacks.push(Nack {
                        instance: id,
                        ranges,
                    });
                }
                self.settle(id);
            }
        }
        nacks.sort_by_key(|n| n.instance);
        (nacks, out)
    }

    /// When [`Receiver::poll`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let giveup = self.giveups.first().map(|(t, _)| *t);
        let later = |t: Instant, b: &Bucket| b.ready_at().map_or(t, |r| r.max(t));
        let heard = self.nacks[1].first().map(|(t, _)| later(*t, &self.bucket));
        let presence = self.nacks[0]
            .first()
            .map(|(t, _)| later(later(*t, &self.bucket), &self.presence_bucket));
        [giveup, heard, presence].into_iter().flatten().min()
    }
}

#[cfg(test)]
#[path = "receiver_review.rs"]
mod review_tests;

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use super::super::{SendBuffer, SplitMix64};
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
        Data(u64, bool),
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
            let _ = r.on_latest(A, 0, t0, &mut || 0.0);
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
                Packet::Data(seq, false),
                &mut injected,
            );
            tx.push(seq, seq, 8, ms(seq * 5));
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
                            .repairs(&nack.ranges, now, 128, |_| true)
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
                                Packet::Data(seq, true),
                                &mut injected,
                            );
                        }
                    }
                    continue;
                }
                let r = &mut rx[dest];
                let mut jitter = || rng.fraction();
                let out = match p {
                    Packet::Data(seq, repair) => {
                        r.on_message(A, seq, seq, 8, repair, now, &mut jitter)
                    }
                    Packet::Heartbeat(latest) => r.on_latest(A, latest, now, &mut jitter),
                    Packet::Nack(nack) => {
                        r.on_nack_seen(&nack, now, &mut jitter);
                        Vec::new()
                    }
                };
                for d in out {
                    match d {
                        Delivery::Message(m) => delivered[dest].push(m),
                        Delivery::Lost { count, .. } => lost[dest] += count,
                    }
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

    pub(super) fn msgs(out: &[Delivery<u64>]) -> Vec<u64> {
        out.iter()
            .filter_map(|d| match d {
                Delivery::Message(m) => Some(*m),
                Delivery::Lost { .. } => None,
            })
            .collect()
    }

    pub(super) fn lost(out: &[Delivery<u64>]) -> u64 {
        out.iter()
            .map(|d| match d {
                Delivery::Lost { count, .. } => *count,
                Delivery::Message(_) => 0,
            })
            .sum()
    }

    /// The attack of issue 9: made-up instance ids, two heartbeats each, then one second of
    /// timers. The work done stays within the budgets whatever the second heartbeat claims.
    #[test]
    fn issue_9_presence_flood_costs_bounded_work() {
        let config = RepairConfig::default();
        for second in [60u64, 2048, u64::MAX - 1] {
            let t0 = Instant::now();
            let mut r: Receiver<u64> = Receiver::new(config);
            let mut j = SplitMix64(9);
            let real = InstanceId(u64::MAX);
            let _ = r.on_message(real, 1, 1, 100, false, t0, &mut j);
            for i in 0..4096u64 {
                let _ = r.on_latest(InstanceId(i), 0, t0, &mut j);
                let _ = r.on_latest(InstanceId(i), second, t0, &mut j);
            }
            assert!(r.missing() <= config.max_missing, "{}", r.missing());
            assert!(r.senders() <= config.max_senders);
            let mut now = t0;
            let mut nacks = 0;
            let mut wakeups = 0;
            let end = t0 + Duration::from_secs(1);
            // The real sender keeps talking while the timers run: every message delivered.
            let mut seq = 1;
            let mut delivered = vec![1];
            while let Some(next) = r.next_deadline() {
                if next > end {
                    break;
                }
                assert!(next >= now, "a deadline in the past would spin");
                now = next;
                let (n, _) = r.poll(now, &mut j);
                nacks += n.len();
                wakeups += 1;
                seq += 1;
                delivered.extend(msgs(&r.on_message(real, seq, seq, 100, false, now, &mut j)));
            }
            assert_eq!(delivered, (1..=seq).collect::<Vec<_>>());
            let s = r.stats();
            eprintln!("second={second}: {s:?}, {wakeups} wake-ups, {nacks} NACKs");
            assert!(
                nacks <= 2 * config.presence_nacks_per_second as usize,
                "{nacks} NACKs"
            );
            assert!(
                s.visited
                    <= 2 * u64::from(config.presence_nacks_per_second) * config.presence_window
                        + 10_000,
                "{} entries visited",
                s.visited
            );
            if second > config.presence_window {
                assert_eq!(r.missing(), 0, "a jump beyond the window costs nothing");
                assert_eq!(nacks, 0);
            }
        }
    }

    /// Under a flood of made-up senders that spends the presence share of the NACK budget,
    /// a real sender's gap is still asked for at once: it is served first, from the rest.
    #[test]
    fn a_real_gap_is_nacked_at_once_during_a_presence_flood() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.0;
        for i in 0..2000u64 {
            let _ = r.on_latest(InstanceId(i), 0, t0, &mut j);
            let _ = r.on_latest(InstanceId(i), 10, t0, &mut j);
        }
        let real = InstanceId(u64::MAX);
        let t1 = t0 + Duration::from_millis(500);
        let (flood, _) = r.poll(t1, &mut j);
        assert!(flood.len() <= 64, "the presence share: {}", flood.len());
        let _ = r.on_message(real, 1, 1, 8, false, t1, &mut j);
        let _ = r.on_message(real, 3, 3, 8, false, t1, &mut j);
        let due = r.next_deadline().unwrap();
        assert!(due <= t1 + Duration::from_millis(30), "{:?}", due - t1);
        let (nacks, _) = r.poll(due, &mut j);
        assert!(
            nacks
                .iter()
                .any(|n| n.instance == real && n.ranges == [2..=2]),
            "{nacks:?}"
        );
    }

    #[test]
    fn a_forged_jump_does_not_silence_a_sender() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.5;
        assert_eq!(msgs(&r.on_message(A, 1, 1, 8, false, t0, &mut j)), [1]);
        // One heartbeat in A's name claiming 2^64-2: a claim, nothing else.
        assert!(r.on_latest(A, u64::MAX - 1, t0, &mut j).is_empty());
        assert_eq!(r.missing(), 0);
        // A goes on: its next message is delivered and the claim is gone.
        assert_eq!(msgs(&r.on_message(A, 2, 2, 8, false, t0, &mut j)), [2]);
        assert_eq!(r.stats().claims_rejected, 1);
        // Two forged datagrams confirm a jump; A's own next message undoes it.
        let _ = r.on_latest(A, 1 << 40, t0, &mut j);
        let out = r.on_latest(A, 1 << 40, t0, &mut j);
        assert!(lost(&out) > 0, "a confirmed jump reports the loss");
        assert!(r.missing() <= 1024);
        let out = r.on_message(A, 3, 3, 8, false, t0, &mut j);
        assert_eq!(msgs(&out), [3]);
        assert_eq!(lost(&out), 0);
        assert_eq!(r.missing(), 0, "the forged window is dropped");
        assert_eq!(msgs(&r.on_message(A, 4, 4, 8, false, t0, &mut j)), [4]);
        assert_eq!(r.stats().reverts, 1);
    }

    #[test]
    fn a_real_jump_beyond_the_window_asks_for_the_top_window() {
        let t0 = Instant::now();
        let config = RepairConfig::default();
        let mut r: Receiver<u64> = Receiver::new(config);
        let mut j = || 0.0;
        let _ = r.on_message(A, 1, 1, 8, false, t0, &mut j);
        // A long partition: 5000 messages later the sender is heard again.
        assert!(r.on_message(A, 5001, 5001, 8, false, t0, &mut j).is_empty());
        let out = r.on_message(A, 5002, 5002, 8, false, t0, &mut j);
        // The window ends at the confirming message, 5002: 3979..=5000 are asked for.
        assert_eq!(lost(&out), 3979 - 2, "below the window: reported at once");
        assert_eq!(r.missing(), 1022, "the top window is asked for");
        let (nacks, _) = r.poll(t0 + Duration::from_millis(40), &mut j);
        let asked: u64 = nacks
            .iter()
            .flat_map(|n| n.ranges.iter())
            .map(|r| r.end() - r.start() + 1)
            .sum();
        assert_eq!(asked, 1022);
        assert_eq!(nacks[0].ranges[0], 3979..=5000);
    }

    #[test]
    fn a_forged_history_record_is_undone_by_the_sender() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.5;
        let _ = r.on_history(A, &[1, 2, 3, u64::MAX - 5], t0);
        assert!(
            r.on_message(A, 3, 3, 8, false, t0, &mut j).is_empty(),
            "shown from history"
        );
        let out = r.on_message(A, 4, 4, 8, false, t0, &mut j);
        assert_eq!(msgs(&out), [4]);
        assert_eq!(lost(&out), 0);
        assert_eq!(msgs(&r.on_message(A, 5, 5, 8, false, t0, &mut j)), [5]);
    }

    #[test]
    fn presence_alone_opens_a_small_window() {
        let t0 = Instant::now();
        let config = RepairConfig::default();
        let mut r: Receiver<u64> = Receiver::new(config);
        let mut j = || 0.5;
        let _ = r.on_latest(A, 10, t0, &mut j);
        let _ = r.on_latest(A, 10 + config.presence_window, t0, &mut j);
        assert_eq!(r.missing(), config.presence_window as usize);
        let b = InstanceId(0xb);
        let _ = r.on_latest(b, 10, t0, &mut j);
        let _ = r.on_latest(b, 11 + config.presence_window, t0, &mut j);
        assert_eq!(
            r.missing(),
            config.presence_window as usize,
            "beyond it: a claim"
        );
        // A message makes the sender a full one.
        let _ = r.on_message(b, 500, 500, 8, false, t0, &mut j);
        assert_eq!(r.missing(), config.presence_window as usize + 489);
    }

    #[test]
    fn global_budgets_give_up_the_oldest_gaps_first() {
        let t0 = Instant::now();
        let config = RepairConfig {
            max_missing: 100,
            max_held_bytes: 1000,
            ..RepairConfig::default()
        };
        let mut r: Receiver<u64> = Receiver::new(config);
        let mut j = || 0.5;
        let b = InstanceId(0xb);
        let _ = r.on_message(A, 1, 1, 8, false, t0, &mut j);
        let _ = r.on_message(A, 60, 60, 8, false, t0, &mut j);
        let _ = r.on_message(b, 1, 1, 8, false, t0, &mut j);
        let t1 = t0 + Duration::from_millis(1);
        let out = r.on_message(b, 60, 60, 8, false, t1, &mut j);
        assert!(r.missing() <= 100);
        assert_eq!(
            out,
            vec![
                Delivery::Lost {
                    instance: A,
                    count: 58,
                    heard: true
                },
                Delivery::Message(60)
            ],
            "A's gap was older"
        );
        // Held bytes are weighed, not counted.
        let _ = r.on_message(b, 61, 61, 600, false, t1, &mut j);
        let out = r.on_message(b, 62, 62, 600, false, t1, &mut j);
        assert!(r.held_bytes() <= 1000);
        assert!(lost(&out) > 0);
    }

    #[test]
    fn departed_senders_are_forgotten_and_followed_on_when_they_speak() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.5;
        let _ = r.on_message(A, 1, 1, 8, false, t0, &mut j);
        // The leave announces 2, lost: kept until repaired.
        let _ = r.on_latest(A, 2, t0, &mut j);
        r.forget(A);
        assert!(r.knows(A));
        assert_eq!(msgs(&r.on_message(A, 2, 2, 8, true, t0, &mut j)), [2]);
        r.forget(A);
        assert!(!r.knows(A), "state freed");
        assert!(
            r.on_message(A, 2, 2, 8, true, t0, &mut j).is_empty(),
            "a late repair is history"
        );
        // It speaks again: followed on from where it stood, no false gap, no repeat.
        assert!(r.on_message(A, 2, 2, 8, false, t0, &mut j).is_empty());
        assert_eq!(msgs(&r.on_message(A, 3, 3, 8, false, t0, &mut j)), [3]);
        assert_eq!(r.missing(), 0);
    }

    #[test]
    fn hostile_sequence_numbers_are_bounded() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.5;
        assert_eq!(msgs(&r.on_message(A, 1, 1, 8, false, t0, &mut j)), [1]);
        let _ = r.on_message(A, u64::MAX - 1, 9, 8, false, t0, &mut j);
        let _ = r.on_latest(A, u64::MAX, t0, &mut j);
        let _ = r.on_latest(A, u64::MAX - 1, t0, &mut j);
        assert!(r.missing() <= 1024);
        assert!(
            r.on_message(A, u64::MAX, 9, 8, false, t0, &mut j)
                .is_empty(),
            "never valid"
        );
    }

    #[test]
    fn hearing_others_does_not_use_up_our_tries_and_timers_do_not_spin() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.5;
        let _ = r.on_message(A, 1, 1, 8, false, t0, &mut j);
        let _ = r.on_message(A, 5, 5, 8, false, t0, &mut j);
        let nack = Nack {
            instance: A,
            ranges: vec![2..=4],
        };
        for _ in 0..100 {
            r.on_nack_seen(&nack, t0, &mut j);
        }
        assert!(r.senders[&A].missing.values().all(|m| m.attempts == 0));
        let mut now = t0;
        let mut released = Vec::new();
        let mut wakeups = 0;
        let mut nacks = 0;
        while let Some(next) = r.next_deadline() {
            assert!(next >= now, "a deadline in the past would spin");
            now = next;
            let (n, out) = r.poll(now, &mut j);
            nacks += n.len();
            released.extend(out);
            wakeups += 1;
            assert!(wakeups < 200, "too many wake-ups");
        }
        assert_eq!(nacks, 30, "30 tries");
        assert_eq!(
            released,
            vec![
                Delivery::Lost {
                    instance: A,
                    count: 3,
                    heard: true
                },
                Delivery::Message(5)
            ]
        );
    }

    #[test]
    fn a_gap_is_given_up_after_4_s_even_with_tries_left() {
        let t0 = Instant::now();
        let config = RepairConfig {
            retry: Duration::from_secs(1),
            ..RepairConfig::default()
        };
        let mut r: Receiver<u64> = Receiver::new(config);
        let mut j = || 0.0;
        let _ = r.on_message(A, 1, 1, 8, false, t0, &mut j);
        let _ = r.on_message(A, 3, 3, 8, false, t0, &mut j);
        let mut now = t0;
        let mut released = Vec::new();
        while let Some(next) = r.next_deadline() {
            now = next;
            released.extend(r.poll(now, &mut j).1);
        }
        assert_eq!(now, t0 + Duration::from_secs(4));
        assert_eq!(msgs(&released), [3]);
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
        let _ = r.on_message(A, 1, 1, 8, false, t0, &mut j);
        let _ = r.on_message(A, 3, 3, 8, false, t0, &mut j);
        let b = InstanceId(0xb);
        assert_eq!(
            r.on_message(b, 1, 100, 8, false, t0, &mut j),
            vec![
                Delivery::Lost {
                    instance: A,
                    count: 1,
                    heard: true
                },
                Delivery::Message(3),
                Delivery::Message(100)
            ]
        );
    }

    #[test]
    fn restarted_sender_is_a_new_instance() {
        let t0 = Instant::now();
        let mut r: Receiver<u64> = Receiver::new(RepairConfig::default());
        let mut j = || 0.0;
        for s in 1..=5 {
            let _ = r.on_message(A, s, s, 8, false, t0, &mut j);
        }
        let b = InstanceId(0xb);
        assert_eq!(msgs(&r.on_message(b, 1, 100, 8, false, t0, &mut j)), [100]);
        assert_eq!(r.stats().duplicates, 0);
    }

    #[test]
    fn the_nack_budget_defers_and_never_spins() {
        let t0 = Instant::now();
        let config = RepairConfig {
            nacks_per_second: 10,
            ..RepairConfig::default()
        };
        let mut r: Receiver<u64> = Receiver::new(config);
        let mut j = || 0.0;
        for i in 0..50 {
            let id = InstanceId(i);
            let _ = r.on_message(id, 1, 1, 8, false, t0, &mut j);
            let _ = r.on_message(id, 3, 3, 8, false, t0, &mut j);
        }
        let mut now = t0;
        let mut nacks = 0;
        let mut wakeups = 0;
        while let Some(next) = r.next_deadline() {
            assert!(next >= now);
            if next > t0 + Duration::from_secs(1) {
                break;
            }
            now = next;
            nacks += r.poll(now, &mut j).0.len();
            wakeups += 1;
        }
        assert!(nacks <= 20, "{nacks}");
        assert!(wakeups <= 40, "{wakeups}");
    }
}
