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

/// How a request stands in [`RecentRequests`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not seen within the ttl (or forgotten after a refusal): a new request, now recorded as
    /// in flight.
    New,
    /// Being served. A redelivery of it must not be acknowledged now: the acknowledgement the
    /// request gets when its outcome is final has the same packet id and covers it, while an
    /// acknowledgement now would make the broker forget a request that is not answered yet.
    InFlight,
    /// Its outcome is final: a redelivery of it is acknowledged and dropped.
    Done,
}

/// Requests seen recently, by (device, request id): a redelivered request (the broker resends
/// what was not yet acknowledged after a reconnect) is not served twice.
///
/// An entry lives `ttl` from its last change, whether the request is in flight or done (the
/// ttl must exceed the longest a request can be served).
#[derive(Debug)]
pub struct RecentRequests {
    ttl: Duration,
    /// When each request was last recorded, and whether its outcome is final.
    seen: HashMap<(String, String), (Instant, bool)>,
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

    /// Records the request; false when it was already seen within the ttl (in flight or done).
    pub fn first_time(&mut self, device: &str, id: &str, now: Instant) -> bool {
        self.admit(device, id, now) == Seen::New
    }

    /// Records a new request as in flight, or tells how a known one stands.
    pub fn admit(&mut self, device: &str, id: &str, now: Instant) -> Seen {
        self.sweep(now);
        let key = (device.to_owned(), id.to_owned());
        match self.seen.get(&key) {
            Some((at, done)) if now.saturating_duration_since(*at) < self.ttl => {
                if *done {
                    Seen::Done
                } else {
                    Seen::InFlight
                }
            }
            _ => {
                self.seen.insert(key, (now, false));
                Seen::New
            }
        }
    }

    /// The request's outcome is final (its answer or error reply is out): from now on a
    /// redelivery of it is [`Seen::Done`].
    pub fn finished(&mut self, device: &str, id: &str, now: Instant) {
        self.seen
            .insert((device.to_owned(), id.to_owned()), (now, true));
    }

    /// Forgets a request that was refused without being served (rate limited, shed): the
    /// device may send it again with the same id, and that is a new request.
    pub fn forget(&mut self, device: &str, id: &str) {
        self.seen.remove(&(device.to_owned(), id.to_owned()));
    }

    /// Requests remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no request is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= self.ttl / 4)
        {
            let ttl = self.ttl;
            self.seen
                .retain(|_, (at, _)| now.saturating_duration_since(*at) < ttl);
            self.last_sweep = Some(now);
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

    #[tokio::test(start_paused = true)]
    async fn a_request_is_in_flight_then_done_and_a_refused_one_can_come_again() {
        let mut r = RecentRequests::new(Duration::from_secs(10));
        let now = Instant::now();
        assert_eq!(r.admit("d", "1", now), Seen::New);
        assert_eq!(r.admit("d", "1", now), Seen::InFlight);
        r.finished("d", "1", now);
        assert_eq!(r.admit("d", "1", now), Seen::Done);
        assert_eq!(r.admit("d", "2", now), Seen::New);
        r.forget("d", "2");
        assert_eq!(
            r.admit("d", "2", now),
            Seen::New,
            "a refused request may be retried"
        );
        // The ttl runs from the last change.
        tokio::time::advance(Duration::from_secs(8)).await;
        r.finished("d", "2", Instant::now());
        tokio::time::advance(Duration::from_secs(8)).await;
        let now = Instant::now();
        assert_eq!(r.admit("d", "2", now), Seen::Done);
        assert_eq!(r.admit("d", "1", now), Seen::New, "expired");
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(r.admit("e", "1", Instant::now()), Seen::New);
        assert_eq!(r.len(), 1, "old entries are swept");
        assert!(!r.is_empty());
    }
}
