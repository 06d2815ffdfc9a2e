//! One sender as a receiver follows it: where it stands, what is missing and held, the claim
//! of a jump not yet believed, and a position not proven by the sender itself. The
//! [`super::Receiver`] files each sender in its indexes; the mutations here keep the
//! invariant that every number in `next..=highest` is either missing or held.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;
use std::time::Instant;

use super::receiver::{Delivery, RepairConfig, RepairStats};
use super::{MAX_NACK_RANGES, MAX_RANGE};
use crate::wire::InstanceId;

#[derive(Debug, Clone, Copy)]
pub(super) struct Missing {
    pub(super) since: Instant,
    pub(super) due: Instant,
    pub(super) attempts: u32,
}

#[derive(Debug)]
pub(super) struct Held<M> {
    pub(super) msg: M,
    pub(super) bytes: usize,
}

/// A jump beyond the window, not yet believed.
#[derive(Debug)]
pub(super) struct Claim<M> {
    pub(super) top: u64,
    pub(super) floor: u64,
    /// The message that claimed it, if a message did.
    pub(super) msg: Option<Held<M>>,
    pub(super) expires: Instant,
}

/// A position not proven by the sender itself (learned from a first heartbeat, a first
/// message, history, or a jump confirmed by datagrams that anyone could forge). Until a new
/// message of the sender at or above `top` proves it, a new message below `top` that was
/// never delivered moves the sender back there.
#[derive(Debug)]
pub(super) struct Tentative {
    /// Where the sender stood before (for the loss to report on a move back).
    pub(super) back_to: u64,
    /// The position: `next` when it was set.
    pub(super) top: u64,
    /// The numbers below `top` that were delivered.
    pub(super) seen: BTreeSet<u64>,
    /// Whether what was never delivered between `back_to` and a move back is reported
    /// lost: not for a first contact, which owed nothing before it.
    pub(super) report_loss: bool,
}

impl Tentative {
    /// A first contact at `top`: nothing was owed before it.
    pub(super) fn first_contact(top: u64) -> Self {
        Self {
            back_to: top,
            top,
            seen: BTreeSet::new(),
            report_loss: false,
        }
    }

    /// Whether a new message `seq` moves the sender back.
    pub(super) fn undone_by(&self, seq: u64) -> bool {
        seq < self.top && !self.seen.contains(&seq)
    }
}

/// The index keys a sender is filed under, so they can be removed exactly.
#[derive(Debug, Default)]
pub(super) struct Keys {
    pub(super) nack: Option<(bool, Instant)>,
    pub(super) giveup: Option<Instant>,
    pub(super) age: Option<(bool, Instant)>,
    pub(super) quiet: Option<(bool, Instant)>,
    /// Missing numbers and held bytes counted in the receiver's totals.
    pub(super) missing: usize,
    pub(super) held_bytes: usize,
}

#[derive(Debug)]
pub(super) struct Sender<M> {
    /// The next sequence number to deliver.
    pub(super) next: u64,
    /// The highest sequence number known to exist. Every number in `next..=highest` is
    /// either missing or held.
    pub(super) highest: u64,
    pub(super) held: BTreeMap<u64, Held<M>>,
    pub(super) held_bytes: usize,
    pub(super) missing: BTreeMap<u64, Missing>,
    /// A lower bound on the earliest NACK due (see the module docs).
    pub(super) nack_due: Option<Instant>,
    pub(super) last_heard: Instant,
    /// A message of this sender has arrived: it gets the full window and priority.
    pub(super) heard_message: bool,
    /// It said goodbye (or went silent): forgotten once nothing is open.
    pub(super) departed: bool,
    pub(super) claim: Option<Claim<M>>,
    pub(super) tentative: Option<Tentative>,
    pub(super) keys: Keys,
}

impl<M> Sender<M> {
    pub(super) fn new(next: u64, now: Instant) -> Self {
        Self {
            next,
            highest: next.saturating_sub(1),
            held: BTreeMap::new(),
            held_bytes: 0,
            missing: BTreeMap::new(),
            nack_due: None,
            last_heard: now,
            heard_message: false,
            departed: false,
            claim: None,
            tentative: None,
            keys: Keys::default(),
        }
    }

    /// A datagram of this sender came at `now`: it is here (not departed), and a claim past
    /// its time is dropped. Returns whether one was.
    pub(super) fn heard_at(&mut self, now: Instant) -> bool {
        self.last_heard = now;
        self.departed = false;
        let expired = self.claim.as_ref().is_some_and(|c| c.expires <= now);
        if expired {
            self.claim = None;
        }
        expired
    }

    pub(super) fn window(&self, config: &RepairConfig) -> u64 {
        if self.heard_message {
            config.window
        } else {
            config.presence_window
        }
    }

    pub(super) fn is_open(&self) -> bool {
        !self.missing.is_empty() || !self.held.is_empty()
    }

    /// When the first gap is given up: at its hold time, or once out of tries.
    pub(super) fn giveup_at(&self, config: &RepairConfig) -> Option<Instant> {
        let (_, m) = self.missing.first_key_value()?;
        let old = m.since + config.hold_max;
        Some(if m.attempts >= config.max_attempts {
            m.due.min(old)
        } else {
            old
        })
    }

    /// Marks `from..=to` missing (those not held), due at `due`.
    pub(super) fn open(&mut self, from: u64, to: u64, now: Instant, due: Instant) {
        if from > to {
            return;
        }
        for seq in from..=to {
            if !self.held.contains_key(&seq) {
                self.missing.entry(seq).or_insert(Missing {
                    since: now,
                    due,
                    attempts: 0,
                });
            }
        }
        self.nack_due = Some(self.nack_due.map_or(due, |d| d.min(due)));
        self.highest = self.highest.max(to);
    }

    pub(super) fn hold(&mut self, seq: u64, held: Held<M>) {
        self.held_bytes += held.bytes;
        self.held.insert(seq, held);
        self.highest = self.highest.max(seq);
    }

    /// Delivers the held messages that are now in order.
    pub(super) fn release(&mut self, out: &mut Vec<Delivery<M>>) {
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() != self.next {
                break;
            }
            let held = entry.remove();
            self.held_bytes -= held.bytes;
            out.push(Delivery::Message(held.msg));
            self.next += 1;
        }
    }

    /// Gives up the missing numbers before the first held message (all of them if nothing
    /// is held) and delivers what that releases; returns how many were given up.
    pub(super) fn give_up_first_gap(
        &mut self,
        instance: InstanceId,
        out: &mut Vec<Delivery<M>>,
    ) -> u64 {
        let end = self
            .held
            .first_key_value()
            .map_or(self.highest.saturating_add(1), |(k, _)| *k);
        let lost = self.missing.range(..end).count() as u64;
        self.missing = self.missing.split_off(&end);
        self.next = self.next.max(end);
        if lost > 0 {
            out.push(Delivery::Lost {
                instance,
                count: lost,
                heard: self.heard_message,
            });
        }
        self.release(out);
        if self.missing.is_empty() {
            self.nack_due = None;
        }
        lost
    }

    /// Delivers everything held and gives up everything missing (the sender is forgotten).
    pub(super) fn flush(&mut self, instance: InstanceId, out: &mut Vec<Delivery<M>>) -> u64 {
        let lost = self.missing.len() as u64;
        if lost > 0 {
            out.push(Delivery::Lost {
                instance,
                count: lost,
                heard: self.heard_message,
            });
        }
        self.missing.clear();
        self.nack_due = None;
        self.held_bytes = 0;
        out.extend(
            std::mem::take(&mut self.held)
                .into_values()
                .map(|h| Delivery::Message(h.msg)),
        );
        lost
    }
}

/// Takes message `seq`, within the window of `s`: delivered if it is next, else held with
/// the numbers before it marked missing.
#[allow(clippy::too_many_arguments)]
pub(super) fn take_in_window<M>(
    s: &mut Sender<M>,
    seq: u64,
    held: Held<M>,
    repair: bool,
    now: Instant,
    due: Instant,
    stats: &mut RepairStats,
    out: &mut Vec<Delivery<M>>,
) {
    if s.missing.remove(&seq).is_some() && repair {
        stats.repaired += 1;
    }
    if seq == s.next {
        out.push(Delivery::Message(held.msg));
        s.next = seq + 1;
        s.highest = s.highest.max(seq);
        s.release(out);
    } else {
        s.open(s.highest.saturating_add(1).max(s.next), seq - 1, now, due);
        s.hold(seq, held);
    }
}

/// The sender's own new message `seq` arrived below a tentative position that never
/// delivered it: the position was forged. What was followed above is dropped (it came from
/// the forger), what was never delivered between is reported lost (unless the position was a
/// first contact), and the sender is followed from this message on.
pub(super) fn revert<M>(
    s: &mut Sender<M>,
    instance: InstanceId,
    seq: u64,
    held: Held<M>,
    stats: &mut RepairStats,
    out: &mut Vec<Delivery<M>>,
) {
    let Some(t) = s.tentative.take() else {
        return;
    };
    let lost = if t.report_loss && seq > t.back_to {
        let delivered = t.seen.range(t.back_to..seq).count() as u64;
        (seq - t.back_to).saturating_sub(delivered)
    } else {
        0
    };
    if lost > 0 {
        out.push(Delivery::Lost {
            instance,
            count: lost,
            heard: true,
        });
        stats.lost = stats.lost.saturating_add(lost);
    }
    // What the forger's position held is dropped: it came after it, not from the sender.
    stats.ignored = stats.ignored.saturating_add(s.held.len() as u64);
    s.held.clear();
    s.held_bytes = 0;
    s.missing.clear();
    s.nack_due = None;
    s.claim = None;
    out.push(Delivery::Message(held.msg));
    s.next = seq + 1;
    s.highest = seq;
}

/// The missing numbers of `s` that are due, as at most [`MAX_NACK_RANGES`] ranges; marks
/// them asked (again at `again`) and makes the sender's NACK key exact. Returns the ranges
/// and the entries visited.
pub(super) fn collect_due<M>(
    s: &mut Sender<M>,
    now: Instant,
    again: Instant,
    max_attempts: u32,
) -> (Vec<RangeInclusive<u64>>, u64) {
    let mut ranges: Vec<RangeInclusive<u64>> = Vec::new();
    let mut next_due: Option<Instant> = None;
    let mut visited = 0;
    for (&seq, m) in &mut s.missing {
        visited += 1;
        if m.attempts >= max_attempts {
            continue;
        }
        if m.due > now {
            next_due = Some(next_due.map_or(m.due, |d| d.min(m.due)));
            continue;
        }
        let extends = ranges
            .last()
            .is_some_and(|r| r.end().saturating_add(1) == seq && seq - r.start() < MAX_RANGE);
        if extends {
            if let Some(r) = ranges.last_mut() {
                *r = *r.start()..=seq;
            }
        } else if ranges.len() == MAX_NACK_RANGES {
            // The rest goes in the next datagram: still due.
            next_due = Some(m.due);
            break;
        } else {
            ranges.push(seq..=seq);
        }
        m.attempts += 1;
        m.due = again;
        next_due = Some(next_due.map_or(again, |d| d.min(again)));
    }
    s.nack_due = next_due;
    (ranges, visited)
}
