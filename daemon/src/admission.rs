//! Admission control: per-device token buckets and duplicate suppression.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Per-device token buckets (`rate` per second, `burst` deep). Idle devices are forgotten.
#[derive(Debug)]
pub struct DeviceRateLimiter {
    rate: f64,
    burst: f64,
    buckets: HashMap<String, (f64, Instant)>,
    last_sweep: Option<Instant>,
}

impl DeviceRateLimiter {
    /// A limiter of `rate` requests per second with bursts of `burst`.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            buckets: HashMap::new(),
            last_sweep: None,
        }
    }

    /// Takes one request's token for `device` at `now`; false when the device is over its rate.
    pub fn allow(&mut self, device: &str, now: Instant) -> bool {
        self.sweep(now);
        let (rate, burst) = (self.rate, self.burst);
        let (tokens, at) = self
            .buckets
            .entry(device.to_owned())
            .or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Devices currently tracked.
    pub fn devices(&self) -> usize {
        self.buckets.len()
    }

    fn sweep(&mut self, now: Instant) {
        let every = Duration::from_secs(60);
        if self
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < every)
        {
            return;
        }
        self.last_sweep = Some(now);
        let full_after = Duration::from_secs_f64(self.burst / self.rate);
        self.buckets
            .retain(|_, (_, at)| now.saturating_duration_since(*at) <= full_after);
    }
}

/// Requests seen recently, by (device, request id): a redelivered request (the broker resends
/// what was not yet acknowledged after a reconnect) is not served twice.
#[derive(Debug)]
pub struct RecentRequests {
    ttl: Duration,
    seen: HashMap<(String, String), Instant>,
    last_sweep: Option<Instant>,
}

impl RecentRequests {
    /// Remembers requests for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            seen: HashMap::new(),
            last_sweep: None,
        }
    }

    /// Records the request; false when it was already seen within the ttl.
    pub fn first_time(&mut self, device: &str, id: &str, now: Instant) -> bool {
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= self.ttl / 4)
        {
            let ttl = self.ttl;
            self.seen
                .retain(|_, at| now.saturating_duration_since(*at) < ttl);
            self.last_sweep = Some(now);
        }
        let key = (device.to_owned(), id.to_owned());
        match self.seen.get(&key) {
            Some(at) if now.saturating_duration_since(*at) < self.ttl => false,
            _ => {
                self.seen.insert(key, now);
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn buckets_allow_bursts_then_the_rate() {
        let mut l = DeviceRateLimiter::new(2.0, 3.0);
        let now = Instant::now();
        assert!((0..3).all(|_| l.allow("a", now)));
        assert!(!l.allow("a", now));
        assert!(l.allow("b", now), "devices are independent");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(l.allow("a", Instant::now()));
        assert!(!l.allow("a", Instant::now()));
        tokio::time::advance(Duration::from_secs(120)).await;
        l.allow("c", Instant::now());
        assert_eq!(l.devices(), 1, "idle devices are forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn redeliveries_are_recognised_until_the_ttl() {
        let mut r = RecentRequests::new(Duration::from_secs(10));
        let now = Instant::now();
        assert!(r.first_time("d", "1", now));
        assert!(!r.first_time("d", "1", now));
        assert!(r.first_time("d", "2", now));
        assert!(r.first_time("e", "1", now));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(r.first_time("d", "1", Instant::now()));
    }
}
