//! Per-source token buckets, so one client (or one spoofed address) cannot use the relay
//! more than its share. Pure: time is passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Sources tracked at once. Idle sources are swept once a second; if the table is still
/// full, a new source evicts an arbitrary old one rather than being refused, so a flood of
/// spoofed sources cannot lock out newcomers (it only forgets some buckets early).
pub(crate) const MAX_SOURCES: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Refills for the time since it was last used and takes a token if it has one.
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One token bucket of its own (one web connection's messages).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Single {
    bucket: Bucket,
    rate: f64,
    burst: f64,
}

impl Single {
    pub(crate) fn new(rate: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            bucket: Bucket {
                tokens: burst,
                last: now,
            },
            rate: f64::from(rate),
            burst,
        }
    }

    /// Takes one token; false if none is left.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        self.bucket.take(self.rate, self.burst, now)
    }
}

/// Token buckets keyed by source address.
#[derive(Debug)]
pub(crate) struct Limiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<IpAddr, Bucket>,
    cap: usize,
}

impl Limiter {
    /// `rate` tokens a second, at most `burst` saved up.
    pub(crate) fn new(rate: u32, burst: u32) -> Self {
        Self::with_cap(rate, burst, MAX_SOURCES)
    }

    pub(crate) fn with_cap(rate: u32, burst: u32, cap: usize) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: HashMap::new(),
            cap,
        }
    }

    /// Changes the rates (on reload), keeping the buckets.
    pub(crate) fn set_rate(&mut self, rate: u32, burst: u32) {
        self.rate = f64::from(rate);
        self.burst = f64::from(burst.max(1));
    }

    /// Takes one token for `ip`; false if it has none left.
    pub(crate) fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if !self.buckets.contains_key(&ip)
            && self.buckets.len() >= self.cap
            && let Some(victim) = self.buckets.keys().next().copied()
        {
            self.buckets.remove(&victim);
        }
        let (rate, burst) = (self.rate, self.burst);
        let b = self.buckets.entry(ip).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        b.take(rate, burst, now)
    }

    /// Drops buckets that have refilled completely: they hold no information. Called on the
    /// daemon's one-second tick.
    pub(crate) fn forget_idle(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, b| {
            let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
            b.tokens + elapsed * rate < burst
        });
    }

    /// Sources tracked now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let mut l = Limiter::new(10, 5);
        assert_eq!((0..8).filter(|_| l.allow(ip, t0)).count(), 5);
        assert!(!l.allow(ip, t0 + Duration::from_millis(50)));
        assert!(l.allow(ip, t0 + Duration::from_millis(100)));
        // Another source has its own bucket.
        assert!(l.allow("192.0.2.2".parse().unwrap(), t0));
    }

    #[test]
    fn table_is_bounded_and_forgets_idle_sources() {
        let t0 = Instant::now();
        let mut l = Limiter::with_cap(1, 2, 4);
        for i in 0..4u8 {
            assert!(l.allow(IpAddr::from([192, 0, 2, i]), t0));
        }
        assert!(
            l.allow("192.0.2.9".parse().unwrap(), t0),
            "full: a newcomer evicts someone"
        );
        assert_eq!(l.len(), 4);
        l.forget_idle(t0 + Duration::from_secs(5));
        assert_eq!(l.len(), 0, "idle ones forgotten");
    }
}
