//! When a peer says it is still there (PROTOCOL.md 2.4 and 5): every 15 s, and after a
//! message as tail probes 0.2, 0.6 and 1.4 s later, then every second up to 11.4 s, so a
//! receiver that lost the tail of a burst finds out from the `seq` a probe carries.

use std::time::{Duration, Instant};

use crate::presence::HEARTBEAT_INTERVAL;

/// The tail probes' times after the last message, in milliseconds.
pub(super) const TAIL_PROBES_MS: [u64; 13] = [
    200, 600, 1400, 2400, 3400, 4400, 5400, 6400, 7400, 8400, 9400, 10_400, 11_400,
];

/// The heartbeat schedule.
#[derive(Debug)]
pub(super) struct Heartbeat {
    due: Instant,
    /// When the last message went out, while its tail probes are still to come.
    probing: Option<Instant>,
}

impl Heartbeat {
    /// The schedule of a peer that joined at `now` (its join is sent then).
    pub(super) fn new(now: Instant) -> Self {
        Self {
            due: now + HEARTBEAT_INTERVAL,
            probing: None,
        }
    }

    pub(super) fn next(&self) -> Instant {
        self.due
    }

    pub(super) fn due(&self, now: Instant) -> bool {
        now >= self.due
    }

    /// A message went out at `now`: the tail probes start again.
    pub(super) fn after_message(&mut self, now: Instant) {
        self.probing = Some(now);
        self.soon(now + Duration::from_millis(TAIL_PROBES_MS[0]));
    }

    /// A heartbeat no later than `at` (a newcomer is answered soon).
    pub(super) fn soon(&mut self, at: Instant) {
        self.due = self.due.min(at);
    }

    /// A heartbeat went out at `now`: the next is the next tail probe, else an interval on.
    pub(super) fn fired(&mut self, now: Instant) {
        let probe = self.probing.and_then(|t| {
            TAIL_PROBES_MS
                .iter()
                .map(|ms| t + Duration::from_millis(*ms))
                .find(|at| *at > now)
        });
        match probe {
            Some(at) => self.due = at,
            None => {
                self.probing = None;
                self.due = now + HEARTBEAT_INTERVAL;
            }
        }
    }
}
