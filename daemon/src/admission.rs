//! Admission control: per-device token buckets and duplicate suppression.

use std::collections::{HashMap, VecDeque};
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

/// A request's identity, (device, request id), as a 64-bit keyed hash: what the daemon
/// remembers of a request costs the same whatever the ids' lengths (a collision, about 1 in
/// 10^9 among 65,536 remembered requests, would take a new request for a known one).
#[derive(Debug, Clone, Default)]
pub struct RequestKeys(std::hash::RandomState);

impl RequestKeys {
    /// The key of `id` from `device`.
    pub fn key(&self, device: &str, id: &str) -> u64 {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.0.build_hasher();
        device.hash(&mut h);
        id.hash(&mut h);
        h.finish()
    }
}

/// Requests seen recently, by (device, request id): a redelivered request (the broker resends
/// what was not yet acknowledged after a reconnect) or one a device sends again is not served
/// twice.
///
/// A request in flight is remembered until it is done; a done one for `ttl`, and only the
/// latest `capacity` done ones: memory stays bounded at any request rate. The broker only
/// redelivers what is not acknowledged (at most the receive maximum), so `capacity` well
/// above that keeps every redelivery recognised.
#[derive(Debug)]
pub struct RecentRequests {
    ttl: Duration,
    capacity: usize,
    keys: RequestKeys,
    /// When each request was last recorded, and whether its outcome is final.
    seen: HashMap<u64, (Instant, bool)>,
    /// Done requests in the order they were done (a key done again appears twice; only the
    /// entry that matches `seen` counts).
    done_order: VecDeque<(u64, Instant)>,
    last_sweep: Option<Instant>,
}

impl RecentRequests {
    /// Remembers done requests for `ttl`, the latest `capacity` of them.
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            keys: RequestKeys::default(),
            seen: HashMap::new(),
            done_order: VecDeque::new(),
            last_sweep: None,
        }
    }

    /// Records the request; false when it was already seen (in flight, or done within the
    /// ttl).
    pub fn first_time(&mut self, device: &str, id: &str, now: Instant) -> bool {
        self.admit(device, id, now) == Seen::New
    }

    /// Records a new request as in flight, or tells how a known one stands.
    pub fn admit(&mut self, device: &str, id: &str, now: Instant) -> Seen {
        self.sweep(now);
        let key = self.keys.key(device, id);
        match self.seen.get(&key) {
            Some((_, false)) => Seen::InFlight,
            Some((at, true)) if now.saturating_duration_since(*at) < self.ttl => Seen::Done,
            _ => {
                self.seen.insert(key, (now, false));
                Seen::New
            }
        }
    }

    /// The request's outcome is final (its answer or error reply is out): from now on a
    /// redelivery of it is [`Seen::Done`].
    pub fn finished(&mut self, device: &str, id: &str, now: Instant) {
        let key = self.keys.key(device, id);
        self.seen.insert(key, (now, true));
        self.done_order.push_back((key, now));
        while self.done_order.len() > self.capacity {
            self.evict_oldest_done();
        }
    }

    /// Forgets a request that was refused without being served (rate limited, shed): the
    /// device may send it again with the same id, and that is a new request.
    pub fn forget(&mut self, device: &str, id: &str) {
        self.seen.remove(&self.keys.key(device, id));
    }

    /// Requests remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no request is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn evict_oldest_done(&mut self) {
        if let Some((key, at)) = self.done_order.pop_front()
            && self.seen.get(&key) == Some(&(at, true))
        {
            self.seen.remove(&key);
        }
    }

    fn sweep(&mut self, now: Instant) {
        if self
            .last_sweep
            .is_none_or(|t| now.saturating_duration_since(t) >= self.ttl / 4)
        {
            while self
                .done_order
                .front()
                .is_some_and(|(_, at)| now.saturating_duration_since(*at) >= self.ttl)
            {
                self.evict_oldest_done();
            }
            self.last_sweep = Some(now);
        }
    }
}

/// Which expert answered each recent request (and its task), for the devices' feedback: the
/// latest `capacity` answers, so memory stays bounded at any request rate.
#[derive(Debug)]
pub struct RecentAnswers {
    capacity: usize,
    keys: RequestKeys,
    by_request: HashMap<u64, (std::sync::Arc<str>, qosroute_core::Task)>,
    order: VecDeque<u64>,
}

impl RecentAnswers {
    /// Remembers the latest `capacity` answers.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            keys: RequestKeys::default(),
            by_request: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// `expert` answered `id` from `device`, a request of `task`.
    pub fn answered(
        &mut self,
        device: &str,
        id: &str,
        expert: std::sync::Arc<str>,
        task: qosroute_core::Task,
    ) {
        let key = self.keys.key(device, id);
        if self.by_request.insert(key, (expert, task)).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.by_request.remove(&old);
            }
        }
    }

    /// Who answered `id` from `device`, if it is among the latest answers.
    pub fn expert_of(
        &self,
        device: &str,
        id: &str,
    ) -> Option<(std::sync::Arc<str>, qosroute_core::Task)> {
        self.by_request.get(&self.keys.key(device, id)).cloned()
    }

    /// Answers remembered.
    pub fn len(&self) -> usize {
        self.by_request.len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.by_request.is_empty()
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
        let mut r = RecentRequests::new(Duration::from_secs(10), 1000);
        let now = Instant::now();
        assert!(r.first_time("d", "1", now));
        assert!(!r.first_time("d", "1", now));
        assert!(r.first_time("d", "2", now));
        assert!(r.first_time("e", "1", now));
        r.finished("d", "1", now);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(r.first_time("d", "1", Instant::now()), "done, then expired");
        assert!(
            !r.first_time("d", "2", Instant::now()),
            "in flight: never expires"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_is_in_flight_then_done_and_a_refused_one_can_come_again() {
        let mut r = RecentRequests::new(Duration::from_secs(10), 1000);
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
        assert_eq!(
            r.len(),
            2,
            "done entries are swept; d/1 (admitted again) is in flight"
        );
        assert!(!r.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_latest_done_requests_are_remembered_but_in_flight_ones_always() {
        let mut r = RecentRequests::new(Duration::from_secs(600), 3);
        let now = Instant::now();
        assert_eq!(r.admit("d", "long", now), Seen::New);
        for i in 0..10 {
            let id = i.to_string();
            assert_eq!(r.admit("d", &id, now), Seen::New);
            r.finished("d", &id, now);
        }
        assert_eq!(r.len(), 4, "3 done + 1 in flight");
        assert_eq!(r.admit("d", "long", now), Seen::InFlight);
        assert_eq!(r.admit("d", "9", now), Seen::Done);
        assert_eq!(r.admit("d", "0", now), Seen::New, "evicted");
        // A request done twice (served again after eviction) keeps its latest entry.
        r.finished("d", "0", now);
        r.finished("d", "0", now);
        r.finished("d", "x", now);
        assert_eq!(r.admit("d", "0", now), Seen::Done);
    }

    #[test]
    fn answers_are_remembered_for_feedback_up_to_the_capacity() {
        let mut a = RecentAnswers::new(2);
        let e: std::sync::Arc<str> = "gpu-a".into();
        a.answered("d", "1", e.clone(), qosroute_core::Task::Chat);
        a.answered("d", "2", e.clone(), qosroute_core::Task::Mmlu);
        assert_eq!(a.expert_of("d", "2").unwrap().1, qosroute_core::Task::Mmlu);
        assert!(a.expert_of("e", "2").is_none(), "devices are apart");
        a.answered("d", "3", e, qosroute_core::Task::Chat);
        assert_eq!(a.len(), 2);
        assert!(a.expert_of("d", "1").is_none(), "the oldest is forgotten");
        assert_eq!(&*a.expert_of("d", "3").unwrap().0, "gpu-a");
        assert!(!a.is_empty());
    }
}
