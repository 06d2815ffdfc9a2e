//! Rate limiting for log lines about hostile or broken input, so a flood of bad datagrams
//! cannot turn into a flood of log lines.

use std::time::{Duration, Instant};

/// Allows `burst` events per `interval` and counts the rest.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    interval: Duration,
    burst: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter for `burst` lines per `interval`.
    pub fn new(burst: u32, interval: Duration) -> Self {
        Self {
            interval,
            burst,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)` if this event may be logged, where `n` events were suppressed since the last
    /// one logged; `None` if it must be suppressed.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.interval);
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

impl Default for LogLimiter {
    /// Ten lines a second.
    fn default() -> Self {
        Self::new(10, Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_and_reports_suppressed() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(2, Duration::from_secs(1));
        assert_eq!(l.check(t0), Some(0));
        assert_eq!(l.check(t0), Some(0));
        assert_eq!(l.check(t0), None);
        assert_eq!(l.check(t0 + Duration::from_millis(999)), None);
        assert_eq!(l.check(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(l.check(t0 + Duration::from_secs(1)), Some(0));
    }
}
