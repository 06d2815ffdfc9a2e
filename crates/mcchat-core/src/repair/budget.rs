//! The byte budget of a peer's repairs: what it sent in the last repair window, so forged
//! NACKs cannot make it multicast many times what it said (PROTOCOL.md 5).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The repair bytes sent within the last repair window, weighed against what is held: at
/// most the cap within any window. (A token bucket of the cap refilled over the window would
/// allow twice that: a full bucket, then a window of refill.)
#[derive(Debug, Default)]
pub(super) struct ByteBudget {
    /// `(first, last, bytes)` of the repairs sent, oldest first; one entry covers at most a
    /// 64th of the window, so there are few.
    spent: VecDeque<(Instant, Instant, usize)>,
    /// The sum of the bytes in `spent`.
    total: usize,
}

impl ByteBudget {
    /// Forgets what went out more than `window` before `now`.
    pub(super) fn expire(&mut self, now: Instant, window: Duration) {
        while let Some(&(_, last, bytes)) = self.spent.front() {
            if now.saturating_duration_since(last) <= window {
                break;
            }
            self.spent.pop_front();
            self.total -= bytes;
        }
    }

    /// Whether `bytes` more keep the window's total within `cap`.
    pub(super) fn fits(&self, bytes: usize, cap: usize) -> bool {
        self.total + bytes <= cap
    }

    pub(super) fn spend(&mut self, bytes: usize, now: Instant, window: Duration) {
        self.total += bytes;
        match self.spent.back_mut() {
            Some((first, last, b)) if now.saturating_duration_since(*first) < window / 64 => {
                *last = now;
                *b += bytes;
            }
            _ => self.spent.push_back((now, now, bytes)),
        }
    }
}
