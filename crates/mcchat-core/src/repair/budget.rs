//! The byte budget of repairs: what was sent in the last window, so forged NACKs cannot make
//! a peer or a daemon send many times what it holds (PROTOCOL.md 5). Peers weigh their
//! repairs with it, and mcchatd its repairs to groups and to each subscriber.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The repair bytes sent within the last repair window, weighed against what is held: at
/// most the cap within any window. (A token bucket of the cap refilled over the window would
/// allow twice that: a full bucket, then a window of refill.)
#[derive(Debug, Default)]
pub struct ByteBudget {
    /// `(first, last, bytes)` of the repairs sent, oldest first; one entry covers at most a
    /// 64th of the window, so there are few.
    spent: VecDeque<(Instant, Instant, usize)>,
    /// The sum of the bytes in `spent`.
    total: usize,
}

impl ByteBudget {
    /// Forgets what went out more than `window` before `now`.
    pub fn expire(&mut self, now: Instant, window: Duration) {
        while let Some(&(_, last, bytes)) = self.spent.front() {
            if now.saturating_duration_since(last) <= window {
                break;
            }
            self.spent.pop_front();
            self.total -= bytes;
        }
    }

    /// Bytes sent within the window (as of the last [`expire`](Self::expire)).
    pub fn spent(&self) -> usize {
        self.total
    }

    /// Whether `bytes` more keep the window's total within `cap`.
    pub fn fits(&self, bytes: usize, cap: usize) -> bool {
        self.total + bytes <= cap
    }

    /// Counts `bytes` as sent at `now`.
    pub fn spend(&mut self, bytes: usize, now: Instant, window: Duration) {
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
