//! What the hub's repairs may cost (docs/PROTOCOL.md 5.1): a NACK is small and its answer is
//! not, so every repair the daemon sends is weighed, and only a proven source is answered.
//!
//! - **Proof.** A `--via` subscriber's NACK at the relay port is answered from the cache only
//!   if it carries the subscription's cookie (a hop-by-hop tag) for its source address and
//!   that address subscribes to the room. A NACK with a forged source has no such cookie (the
//!   cookie went to the real address), so it cannot aim the cache's answer at a victim: it is
//!   passed on to the room without its cookie tag, like any NACK, where the sender and the
//!   group's caches answer on the group under their own budgets.
//! - **Per subscriber.** At most [`PER_SUBSCRIBER`] bytes of answers per repair window to one
//!   address, whatever it asks; beyond that its NACKs go on to the room.
//! - **Overall.** All repairs together, to groups and to subscribers, at most twice what the
//!   cache holds (at least [`MIN_REPAIR_BYTES`]) per repair window, and a quarter of that per
//!   second, so a stream of NACKs heard on a group costs the LAN at most that.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mcchat_core::peer::{MIN_REPAIR_BYTES, Now};
use mcchat_core::repair::{ByteBudget, Nack};
use mcchat_core::room::RoomName;
use mcchat_core::tags;
use mcchat_core::wire::Frame;

use super::{Hub, Output, UdpDest};

/// Bytes of cache answers one subscriber address gets per repair window at most.
pub(crate) const PER_SUBSCRIBER: usize = 64 * 1024;

/// The budgets.
#[derive(Debug, Default)]
pub(super) struct RepairBudgets {
    window: ByteBudget,
    second: ByteBudget,
    /// Subscribers that have been answered within the window.
    subscribers: HashMap<SocketAddr, ByteBudget>,
    /// Repairs not sent because a budget was spent.
    pub(super) refused: u64,
}

impl RepairBudgets {
    /// Whether a repair of `bytes` fits the overall budget (given what the cache holds), and
    /// if so counts it.
    pub(super) fn take(
        &mut self,
        bytes: usize,
        held: usize,
        window: Duration,
        now: Instant,
    ) -> bool {
        let cap = (2 * held).max(MIN_REPAIR_BYTES);
        let per_second = (cap / 4).max(MIN_REPAIR_BYTES);
        let second = Duration::from_secs(1);
        self.window.expire(now, window);
        self.second.expire(now, second);
        if !(self.window.fits(bytes, cap) && self.second.fits(bytes, per_second)) {
            self.refused += 1;
            return false;
        }
        self.window.spend(bytes, now, window);
        self.second.spend(bytes, now, second);
        true
    }

    /// Like [`take`](Self::take), and within `to`'s own budget too.
    pub(super) fn take_for(
        &mut self,
        to: SocketAddr,
        bytes: usize,
        held: usize,
        window: Duration,
        now: Instant,
    ) -> bool {
        let own = self.subscribers.entry(to).or_default();
        own.expire(now, window);
        if !own.fits(bytes, PER_SUBSCRIBER) {
            self.refused += 1;
            return false;
        }
        if !self.take(bytes, held, window, now) {
            return false;
        }
        // The entry exists: made above.
        if let Some(own) = self.subscribers.get_mut(&to) {
            own.spend(bytes, now, window);
        }
        true
    }

    /// Forgets subscribers with nothing spent in the window (called once a second).
    pub(super) fn forget_idle(&mut self, now: Instant, window: Duration) {
        self.subscribers.retain(|_, b| {
            b.expire(now, window);
            b.spent() > 0
        });
    }

    #[cfg(test)]
    pub(super) fn tracked(&self) -> usize {
        self.subscribers.len()
    }
}

impl Hub {
    pub(super) fn repair_window(&self) -> Duration {
        self.settings
            .daemon
            .repair_window
            .max(Duration::from_secs(1))
    }

    /// Whether a repair of `bytes` to a group fits the overall budget (counting it if so).
    pub(super) fn repair_fits(&mut self, bytes: usize, now: Instant) -> bool {
        let (held, window) = (self.cache.stats().bytes, self.repair_window());
        self.repairs.take(bytes, held, window, now)
    }

    /// A NACK from a `--via` client at the relay port: answered from the cache if the client
    /// proved its address (`cookie_ok`) and subscribes to the room (see the module docs).
    /// Returns true if the answer was all of it, so the NACK need not go on to the room.
    pub(super) fn answer_nack(
        &mut self,
        room: &RoomName,
        nack: &Nack,
        from: UdpDest,
        cookie_ok: bool,
        now: Now,
    ) -> bool {
        if !(cookie_ok && self.subs.is_subscribed(room, from.addr)) {
            self.counters.nacks_unproven += 1;
            return false;
        }
        let (found, complete) = self.cache.answer(room, nack.instance, &nack.ranges);
        let (held, window) = (self.cache.stats().bytes, self.repair_window());
        let mut all = complete;
        for data in found {
            if self
                .repairs
                .take_for(from.addr, data.len(), held, window, now.mono)
            {
                self.cache.count_sent(true);
                self.out.push_back(Output::ToUdp { to: from, data });
            } else {
                all = false;
            }
        }
        all
    }
}

/// `data` (decoded as `frame`) without its `cookie` tag: the cookie proves a source to this
/// daemon alone, and on the LAN anyone could copy it into forged NACKs. Most datagrams have
/// none, which the decoded tags tell without a second scan.
pub(super) fn without_cookie<'a>(data: &'a [u8], frame: &Frame<'_>) -> Cow<'a, [u8]> {
    if frame.tags.get(tags::COOKIE).is_none() {
        return Cow::Borrowed(data);
    }
    tags::without_hop_tag(data, tags::COOKIE)
}
