//! Router-side bookkeeping of every request in flight on every expert: exactly the state the
//! policy was trained on (`qosroute_core::ClusterState`), built from what this daemon sent and
//! saw stream back.
//!
//! Each expert's requests are kept in `qosroute_core::ExpertLedger`, the book the simulator
//! keeps too, and turned into the policy's view by the same function
//! (`ExpertLedger::fill_expert_state`): first come, first served, the first `max_slots`
//! running and the rest waiting (see `qosroute_core::ledger` for the meaning of every field).
//! Times go into it as seconds since the daemon's epoch. Scraped engine metrics (other
//! clients' load) and health decide whether the expert is usable: an expert whose signals are
//! unknown or stale is not up.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use qosroute_core::{ClusterState, ExpertLedger, ExpertProfile, ExpertState, LedgerEntry, Task};
use tokio::time::Instant;

use crate::config::HostDevice;

/// A request this daemon dispatched to an expert.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatched {
    /// The daemon's own id of the request.
    pub key: u64,
    /// Task class.
    pub task: Task,
    /// Prompt tokens (estimated from the text).
    pub prompt_tokens: u32,
    /// Output tokens predicted at the decision.
    pub predicted_output_tokens: f64,
    /// Quality predicted at the decision.
    pub predicted_quality: f64,
    /// The request's SLO.
    pub slo_s_per_token: f64,
    /// Its `max_tokens`.
    pub max_output_tokens: Option<u32>,
    /// When the request arrived at the daemon.
    pub arrived_at: Instant,
    /// When it was sent to the expert.
    pub dispatched_at: Instant,
}

/// What the daemon knows about one expert besides its requests.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertHealth {
    /// Last successful health check or scrape.
    pub last_ok: Option<Instant>,
    /// Consecutive failed requests or checks.
    pub consecutive_failures: u32,
    /// The circuit is open (no traffic) until then.
    pub open_until: Option<Instant>,
}

/// Load an engine reports on its metrics endpoint (all clients, not only this daemon).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReportedLoad {
    /// Requests running.
    pub running: u32,
    /// Requests waiting.
    pub waiting: u32,
    /// When it was scraped.
    pub at: Instant,
}

/// One expert's book.
#[derive(Debug, Clone)]
pub struct ExpertBook {
    /// Profile the policy reasons with (its latency model is refitted online).
    pub profile: Arc<ExpertProfile>,
    /// Requests in flight, in dispatch order, with the slot each holds in the daemon's view.
    pub in_flight: ExpertLedger,
    /// Health.
    pub health: ExpertHealth,
    /// Whether the engine exposes load metrics (vLLM, SGLang, llama.cpp do; Ollama does not).
    pub reports_load: bool,
    /// The last load it reported.
    pub reported: Option<ReportedLoad>,
    /// Requests of this daemon in flight on it when that load was recorded: the report
    /// counts them, not the ones in flight now.
    pub reported_ours: usize,
    /// The latency model as configured (the profile's is refitted online).
    pub configured_latency: qosroute_core::LatencyModel,
    /// For an expert on this host, the device whose load host telemetry reports.
    pub host_device: Option<HostDevice>,
    /// Tokens streamed back per request in flight, counted without the router's lock by the
    /// task that streams the answer; copied into the book before every read of it.
    pub token_counts: HashMap<u64, TokenCount>,
}

/// Tokens streamed back for one request, shared by the ledger and the task streaming its
/// answer: the task adds to it on every token without taking the router's lock.
#[derive(Debug, Clone, Default)]
pub struct TokenCount(Arc<AtomicU32>);

impl TokenCount {
    /// Counts `tokens` more.
    pub fn add(&self, tokens: u32) {
        self.0.fetch_add(tokens, Ordering::Relaxed);
    }

    /// Tokens counted so far.
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// What host telemetry last read of this host's devices (only when an expert is local).
#[derive(Debug, Clone, PartialEq)]
pub struct HostReading {
    /// When it was read.
    pub at: Instant,
    /// Busy fraction of all CPUs; `None`: unknown.
    pub cpu_utilisation: Option<f64>,
    /// Busy fraction of each GPU by its telemetry name; `None`: unknown.
    pub gpu_utilisation: Vec<(String, Option<f64>)>,
    /// The board runs below its full clock now (thermal or power throttling, as the Raspberry
    /// Pi firmware's flags say); `false` when not or unknown.
    pub throttled: bool,
}

impl HostReading {
    /// The busy fraction of `device`, if known: a GPU is matched by name prefix (an empty
    /// prefix is the first GPU).
    pub fn utilisation_of(&self, device: &HostDevice) -> Option<f64> {
        match device {
            HostDevice::Cpu => self.cpu_utilisation,
            HostDevice::Gpu(prefix) => self
                .gpu_utilisation
                .iter()
                .find(|(name, _)| name.starts_with(prefix.as_str()))
                .and_then(|(_, u)| *u),
        }
    }
}

/// How many times slower a local expert counts while its host reports throttling: its latency
/// model (as calibrated) is [`qosroute_core::LatencyModel::slowed`] by this factor, prefill and
/// decode alike, at once, before calibration can see it.
///
/// Where it comes from: the Raspberry Pi 5 runs its Cortex-A76 cores at 2.4 GHz and its
/// firmware's thermal throttling brings them down to 1.5 GHz while the soft limit holds
/// (Raspberry Pi documentation, "Frequency management and thermal control"), 2.4 / 1.5 = 1.6.
/// CPU inference (llama.cpp) slows about in proportion to the clock while it is compute bound
/// (prefill) and less while memory bound (decode), so 1.6 is the upper end for a CPU expert.
/// The only provider that reads throttling flags is the Pi's (`get_throttled` bits 1-3); the
/// Jetson providers read clocks and loads but no throttling flag.
pub const THROTTLED_SLOWDOWN: f64 = 1.6;

/// Failures in a row that open an expert's circuit.
pub const FAILURES_TO_OPEN: u32 = 3;

/// The books of every expert, indexed as the policy indexes experts.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// Experts in policy order.
    pub experts: Vec<ExpertBook>,
    /// The last host telemetry reading (for experts on this host).
    pub host: Option<HostReading>,
    /// A local expert's device busier than this with none of our requests on it is taken.
    pub host_busy_above: f64,
    /// The daemon's clock starts here: the books count seconds from it.
    epoch: Instant,
}

impl Ledger {
    /// Books for these experts, none checked yet (so none up until a check succeeds); times
    /// are counted from `epoch`.
    pub fn new(profiles: &[Arc<ExpertProfile>], epoch: Instant) -> Self {
        Self {
            experts: profiles
                .iter()
                .map(|p| ExpertBook {
                    profile: p.clone(),
                    in_flight: ExpertLedger::new(p.max_slots, 0.0),
                    health: ExpertHealth {
                        last_ok: None,
                        consecutive_failures: 0,
                        open_until: None,
                    },
                    reports_load: false,
                    reported: None,
                    reported_ours: 0,
                    configured_latency: p.latency,
                    host_device: None,
                    token_counts: HashMap::new(),
                })
                .collect(),
            host: None,
            host_busy_above: 1.0,
            epoch,
        }
    }

    /// Seconds from the epoch to `at`.
    pub fn secs(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.epoch).as_secs_f64()
    }

    /// The instant `secs` seconds after the epoch.
    pub fn instant(&self, secs: f64) -> Instant {
        self.epoch + Duration::from_secs_f64(secs.max(0.0))
    }

    /// Whether expert `e` may take traffic at `now`: checked recently and circuit closed.
    pub fn is_up(&self, e: usize, now: Instant, stale_after: Duration) -> bool {
        self.experts.get(e).is_some_and(|b| {
            b.health
                .last_ok
                .is_some_and(|t| now.saturating_duration_since(t) <= stale_after)
                && b.health.open_until.is_none_or(|t| now >= t)
        })
    }

    /// The cluster state at `now`, as the policy reads it.
    ///
    /// Requests this daemon sent are exact. Beyond them, an engine that reports its load adds
    /// requests of other clients (the reported count minus ours, as typical-size requests); if
    /// its report is missing or stale the expert counts as saturated (every slot taken), never
    /// as idle. An expert on this host is saturated as well when host telemetry cannot tell
    /// its device's load (unknown or stale), or when the device is busier than
    /// `host_busy_above` while none of our requests run on it (another process has it).
    pub fn cluster_state(&mut self, now: Instant, stale_after: Duration) -> ClusterState {
        self.sync_token_counts();
        let now_s = self.secs(now);
        ClusterState {
            now_s,
            experts: self
                .experts
                .iter()
                .enumerate()
                .map(|(e, book)| {
                    let profile = if self.host_throttled(book, now, stale_after) {
                        let mut slowed = (*book.profile).clone();
                        slowed.latency = slowed.latency.slowed(THROTTLED_SLOWDOWN);
                        Arc::new(slowed)
                    } else {
                        book.profile.clone()
                    };
                    let mut state = ExpertState::idle(profile);
                    book.in_flight.fill_expert_state(
                        &mut state,
                        self.is_up(e, now, stale_after),
                        now_s,
                        self.foreign_requests(e, now, stale_after),
                    );
                    state
                })
                .collect(),
        }
    }

    /// Requests on expert `e` that are not this daemon's, as the policy is shown them: the
    /// engine's reported count beyond ours, or every free slot when its report is missing or
    /// stale, or when its host device is unknown, stale or taken by another process.
    pub fn foreign_requests(&self, e: usize, now: Instant, stale_after: Duration) -> usize {
        let Some(book) = self.experts.get(e) else {
            return 0;
        };
        let ours = book.in_flight.len();
        let saturated = (book.profile.max_slots as usize).max(ours);
        let mut foreign = 0;
        if book.reports_load {
            let fresh = book
                .reported
                .filter(|r| now.saturating_duration_since(r.at) <= stale_after);
            foreign = match fresh {
                // The report counted our requests of its time, not those of now: ours that
                // finished since are not someone else's, and ours started since are not in it.
                Some(r) => ((r.running + r.waiting) as usize).saturating_sub(book.reported_ours),
                None => saturated - ours,
            };
        }
        if let Some(device) = &book.host_device
            && self.host_device_taken(device, ours == 0, now, stale_after)
        {
            foreign = saturated - ours;
        }
        foreign
    }

    /// Whether a local expert's `device` is unavailable to new work at `now`: its load is
    /// unknown or stale, or it is busier than `host_busy_above` while `idle_here` (none of our
    /// requests run on it).
    fn host_device_taken(
        &self,
        device: &HostDevice,
        idle_here: bool,
        now: Instant,
        stale_after: Duration,
    ) -> bool {
        let utilisation = self
            .host
            .as_ref()
            .filter(|h| now.saturating_duration_since(h.at) <= stale_after)
            .and_then(|h| h.utilisation_of(device));
        match utilisation {
            None => true,
            Some(u) => idle_here && u > self.host_busy_above,
        }
    }

    /// Whether `book`'s expert runs on this host and a fresh host reading says the board is
    /// throttled.
    fn host_throttled(&self, book: &ExpertBook, now: Instant, stale_after: Duration) -> bool {
        book.host_device.is_some()
            && self
                .host
                .as_ref()
                .is_some_and(|h| h.throttled && now.saturating_duration_since(h.at) <= stale_after)
    }

    /// Records what host telemetry read.
    pub fn host_reading(&mut self, reading: HostReading) {
        self.host = Some(reading);
    }

    /// Records the load an engine reported.
    pub fn reported_load(&mut self, e: usize, load: ReportedLoad) {
        if let Some(b) = self.experts.get_mut(e) {
            b.reported = Some(load);
            b.reported_ours = b.in_flight.len();
        }
    }

    /// Copies every request's lock-free token count into its book entry.
    fn sync_token_counts(&mut self) {
        for book in &mut self.experts {
            if book.token_counts.is_empty() {
                continue;
            }
            for entry in book.in_flight.entries_mut() {
                if let Some(count) = book.token_counts.get(&entry.id) {
                    entry.generated_tokens = count.get();
                }
            }
        }
    }

    /// Records a dispatch; returns the request's token count, for the task that streams its
    /// answer to add to without the router's lock.
    pub fn dispatch(&mut self, e: usize, d: Dispatched) -> TokenCount {
        let count = TokenCount::default();
        if let Some(book) = self.experts.get_mut(e) {
            book.token_counts.insert(d.key, count.clone());
        }
        let (arrived_s, dispatched_s) = (self.secs(d.arrived_at), self.secs(d.dispatched_at));
        if let Some(book) = self.experts.get_mut(e) {
            book.in_flight.dispatch(
                LedgerEntry {
                    id: d.key,
                    task: d.task,
                    prompt_tokens: d.prompt_tokens,
                    predicted_output_tokens: d.predicted_output_tokens,
                    predicted_quality: d.predicted_quality,
                    slo_s_per_token: d.slo_s_per_token,
                    max_output_tokens: d.max_output_tokens,
                    arrived_s,
                    dispatched_s,
                    slot_since_s: None,
                    first_token_s: None,
                    generated_tokens: 0,
                },
                dispatched_s,
            );
        }
        count
    }

    /// Records tokens streamed back for a request; returns whether it was the first.
    pub fn tokens(&mut self, e: usize, key: u64, tokens: u32, at: Instant) -> bool {
        let at_s = self.secs(at);
        self.experts.get_mut(e).is_some_and(|b| {
            let first = b.in_flight.tokens(key, tokens, at_s);
            if let Some(count) = b.token_counts.get(&key) {
                count.add(tokens);
            }
            first
        })
    }

    /// Since when request `key` has held a slot of expert `e` in the daemon's view: its
    /// dispatch when a slot was free then, else the moment the request ahead of it finished;
    /// `None` while it waits. Its prefill is measured from then, not from its dispatch, which
    /// would count its wait as prefill.
    pub fn slot_since(&self, e: usize, key: u64) -> Option<Instant> {
        let book = self.experts.get(e)?;
        let entry = book.in_flight.entries().iter().find(|d| d.id == key)?;
        entry.slot_since_s.map(|s| self.instant(s))
    }

    /// Requests decoding on expert `e` and their context, averaged over the time from request
    /// `key`'s first token to `now` without a pending prefill (see
    /// [`ExpertLedger::mean_running_since_first_token`]).
    pub fn mean_running_since_first_token(
        &mut self,
        e: usize,
        key: u64,
        now: Instant,
    ) -> Option<(f64, f64)> {
        self.sync_token_counts();
        let now_s = self.secs(now);
        self.experts
            .get_mut(e)?
            .in_flight
            .mean_running_since_first_token(key, now_s)
    }

    /// When request `key`'s own prefill started on expert `e` (see
    /// [`ExpertLedger::own_prefill_since_s`]).
    pub fn own_prefill_since(&self, e: usize, key: u64) -> Option<Instant> {
        let s = self.experts.get(e)?.in_flight.own_prefill_since_s(key)?;
        Some(self.instant(s))
    }

    /// Removes a finished (or failed) request at `now` and returns its entry; the first
    /// waiting request takes the slot it frees.
    pub fn finish(&mut self, e: usize, key: u64, now: Instant) -> Option<LedgerEntry> {
        let now_s = self.secs(now);
        let book = self.experts.get_mut(e)?;
        let count = book.token_counts.remove(&key);
        let mut entry = book.in_flight.finish(key, now_s)?;
        if let Some(count) = count {
            entry.generated_tokens = count.get();
        }
        Some(entry)
    }

    /// A successful request, check or scrape: the expert is alive.
    pub fn mark_ok(&mut self, e: usize, now: Instant) {
        if let Some(b) = self.experts.get_mut(e) {
            b.health.last_ok = Some(now);
            b.health.consecutive_failures = 0;
            b.health.open_until = None;
        }
    }

    /// A failed request or check; opens the circuit for `open_for` after
    /// [`FAILURES_TO_OPEN`] in a row (a half-open check closes it again via `mark_ok`).
    pub fn mark_failed(&mut self, e: usize, now: Instant, open_for: Duration) {
        if let Some(b) = self.experts.get_mut(e) {
            b.health.consecutive_failures = b.health.consecutive_failures.saturating_add(1);
            if b.health.consecutive_failures >= FAILURES_TO_OPEN {
                b.health.open_until = Some(now + open_for);
            }
        }
    }

    /// The index of the expert called `name` (indices change on reload; names do not).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.experts.iter().position(|b| b.profile.name == name)
    }

    /// [`Ledger::tokens`] by expert name.
    pub fn tokens_by_name(&mut self, name: &str, key: u64, tokens: u32, at: Instant) -> bool {
        self.index_of(name)
            .is_some_and(|e| self.tokens(e, key, tokens, at))
    }

    /// [`Ledger::finish`] by expert name.
    pub fn finish_by_name(&mut self, name: &str, key: u64, now: Instant) -> Option<LedgerEntry> {
        self.index_of(name).and_then(|e| self.finish(e, key, now))
    }

    /// [`Ledger::mark_failed`] by expert name.
    pub fn mark_failed_by_name(&mut self, name: &str, now: Instant, open_for: Duration) {
        if let Some(e) = self.index_of(name) {
            self.mark_failed(e, now, open_for);
        }
    }

    /// Requests in flight on every expert.
    pub fn in_flight(&self) -> usize {
        self.experts.iter().map(|b| b.in_flight.len()).sum()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use qosroute_core::LatencyModel;

    fn profile(name: &str, slots: u32) -> Arc<ExpertProfile> {
        Arc::new(ExpertProfile {
            name: name.into(),
            model: "m".into(),
            hardware: String::new(),
            source: String::new(),
            max_slots: slots,
            kv_tokens: 10_000,
            latency: LatencyModel::paper(1e-4, 1e-7, 0.02),
        })
    }

    /// A chat request of 100 prompt tokens, dispatched when it arrived.
    pub(crate) fn dispatched(key: u64, at: Instant) -> Dispatched {
        Dispatched {
            key,
            task: Task::Chat,
            prompt_tokens: 100,
            predicted_output_tokens: 50.0,
            predicted_quality: 0.5,
            slo_s_per_token: 0.1,
            max_output_tokens: None,
            arrived_at: at,
            dispatched_at: at,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_counted_without_the_lock_reach_the_state_and_the_finished_entry() {
        let epoch = Instant::now();
        let mut ledger = Ledger::new(&[profile("a", 2)], epoch);
        ledger.mark_ok(0, epoch);
        let count = ledger.dispatch(0, dispatched(7, epoch));
        // The first token goes through the ledger (it sets the first-token time) ...
        assert!(ledger.tokens(0, 7, 1, epoch));
        // ... the next ones only through the shared count, from another task.
        let streaming = count.clone();
        std::thread::spawn(move || (0..41).for_each(|_| streaming.add(1)))
            .join()
            .unwrap();
        assert_eq!(count.get(), 42);
        let s = ledger.cluster_state(epoch, Duration::from_secs(5));
        assert_eq!(s.experts[0].running.len(), 1);
        assert_eq!(s.experts[0].running[0].generated_tokens, 42);
        count.add(8);
        let done = ledger.finish(0, 7, epoch).unwrap();
        assert_eq!(done.generated_tokens, 50);
        assert!(
            ledger.experts[0].token_counts.is_empty(),
            "its count goes with it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_beyond_the_slots_wait_and_progress_is_tracked() {
        let epoch = Instant::now();
        let mut ledger = Ledger::new(&[profile("a", 2)], epoch);
        ledger.mark_ok(0, epoch);
        for key in 0..3 {
            ledger.dispatch(0, dispatched(key, epoch));
        }
        tokio::time::advance(Duration::from_millis(500)).await;
        let now = Instant::now();
        assert!(ledger.tokens(0, 1, 3, now));
        assert!(!ledger.tokens(0, 1, 2, now));
        let s = ledger.cluster_state(now, Duration::from_secs(5));
        let x = &s.experts[0];
        assert_eq!((x.running.len(), x.waiting.len()), (2, 1));
        assert_eq!(x.running[1].generated_tokens, 5);
        assert!((x.running[1].elapsed_s - 0.5).abs() < 1e-9);
        assert!(x.up);
        assert_eq!(ledger.finish(0, 0, now).map(|d| d.id), Some(0));
        assert_eq!(ledger.in_flight(), 2);
        assert_eq!(ledger.finish(0, 0, now), None);
        // Request 2 waited for a slot from its dispatch until request 0 finished (now).
        assert_eq!(ledger.slot_since(0, 1), Some(epoch));
        assert_eq!(ledger.slot_since(0, 2), Some(now));
        ledger.dispatch(0, dispatched(3, now));
        assert_eq!(ledger.slot_since(0, 3), None, "both slots taken");
        tokio::time::advance(Duration::from_millis(100)).await;
        // A waiting request finishing frees no slot.
        ledger.dispatch(0, dispatched(4, now));
        assert!(ledger.finish(0, 4, Instant::now()).is_some());
        assert_eq!(ledger.slot_since(0, 3), None);
        assert!(ledger.finish(0, 1, Instant::now()).is_some());
        assert_eq!(ledger.slot_since(0, 3), Some(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_stale_or_failing_experts_are_not_up() {
        let epoch = Instant::now();
        let mut ledger = Ledger::new(&[profile("a", 2)], epoch);
        let stale = Duration::from_secs(5);
        assert!(!ledger.is_up(0, epoch, stale), "never checked");
        ledger.mark_ok(0, epoch);
        assert!(ledger.is_up(0, epoch, stale));
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(!ledger.is_up(0, Instant::now(), stale), "stale");
        ledger.mark_ok(0, Instant::now());
        for _ in 0..FAILURES_TO_OPEN {
            ledger.mark_failed(0, Instant::now(), Duration::from_secs(2));
        }
        assert!(!ledger.is_up(0, Instant::now(), stale), "circuit open");
        tokio::time::advance(Duration::from_secs(2)).await;
        let now = Instant::now();
        assert!(ledger.is_up(0, now, stale), "half-open after the pause");
        assert!(!ledger.is_up(7, now, stale), "no such expert");
    }

    #[tokio::test(start_paused = true)]
    async fn a_local_expert_is_saturated_when_its_device_is_unknown_stale_or_taken() {
        let epoch = Instant::now();
        let stale = Duration::from_secs(5);
        let mut ledger = Ledger::new(&[profile("cpu-expert", 4), profile("gpu-expert", 4)], epoch);
        ledger.host_busy_above = 0.9;
        ledger.experts[0].host_device = Some(HostDevice::Cpu);
        ledger.experts[1].host_device = Some(HostDevice::Gpu("nvml1".into()));
        let running = |l: &mut Ledger, now| {
            let s = l.cluster_state(now, stale);
            (s.experts[0].running.len(), s.experts[1].running.len())
        };
        assert_eq!(
            running(&mut ledger, epoch),
            (4, 4),
            "no reading yet: saturated"
        );
        let reading = |cpu, gpu1| HostReading {
            at: Instant::now(),
            cpu_utilisation: cpu,
            gpu_utilisation: vec![("nvml0:A".into(), Some(0.0)), ("nvml1:B".into(), gpu1)],
            throttled: false,
        };
        ledger.host_reading(reading(Some(0.3), None));
        assert_eq!(
            running(&mut ledger, epoch),
            (0, 4),
            "GPU load unknown: saturated"
        );
        ledger.host_reading(reading(Some(0.95), Some(0.2)));
        assert_eq!(
            running(&mut ledger, epoch),
            (4, 0),
            "CPU taken by another process"
        );
        ledger.dispatch(0, dispatched(1, epoch));
        assert_eq!(
            running(&mut ledger, epoch),
            (1, 0),
            "a busy device running our own request is ours, not taken"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            running(&mut ledger, Instant::now()),
            (4, 4),
            "stale reading: saturated"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_local_expert_on_a_throttled_host_counts_as_slower_and_a_remote_one_does_not() {
        let epoch = Instant::now();
        let stale = Duration::from_secs(5);
        let mut ledger = Ledger::new(&[profile("pi-cpu", 2), profile("remote", 2)], epoch);
        ledger.experts[0].host_device = Some(HostDevice::Cpu);
        let reading = |throttled| HostReading {
            at: Instant::now(),
            cpu_utilisation: Some(0.2),
            gpu_utilisation: Vec::new(),
            throttled,
        };
        // Predicted seconds of a 200-token prefill and of one decode step at batch 2.
        let predicted = |l: &mut Ledger, now| {
            let s = l.cluster_state(now, stale);
            let m = |e: usize| {
                let latency = &s.experts[e].profile.latency;
                (latency.prefill_s(200.0), latency.decode_step_s(2.0, 1000.0))
            };
            (m(0), m(1))
        };
        ledger.host_reading(reading(false));
        let (local, remote) = predicted(&mut ledger, epoch);
        ledger.host_reading(reading(true));
        let (throttled_local, throttled_remote) = predicted(&mut ledger, epoch);
        assert!((throttled_local.0 - THROTTLED_SLOWDOWN * local.0).abs() < 1e-12);
        assert!((throttled_local.1 - THROTTLED_SLOWDOWN * local.1).abs() < 1e-12);
        assert_eq!(
            throttled_remote, remote,
            "another host's throttling is not its"
        );
        // The books keep the calibrated model: the slowdown is applied to what the policy sees.
        assert_eq!(
            ledger.experts[0].profile.latency,
            ledger.experts[1].profile.latency
        );
        // A stale reading says nothing about throttling (it saturates the expert instead).
        tokio::time::advance(Duration::from_secs(6)).await;
        let (stale_local, _) = predicted(&mut ledger, Instant::now());
        assert_eq!(stale_local, local);
        ledger.host_reading(reading(false));
        assert_eq!(predicted(&mut ledger, Instant::now()).0, local);
    }

    #[tokio::test(start_paused = true)]
    async fn reported_load_adds_other_clients_and_silence_means_saturated() {
        let epoch = Instant::now();
        let stale = Duration::from_secs(5);
        let mut ledger = Ledger::new(&[profile("a", 4)], epoch);
        ledger.experts[0].reports_load = true;
        ledger.dispatch(0, dispatched(1, epoch));
        let s = ledger.cluster_state(epoch, stale);
        assert_eq!(s.experts[0].running.len(), 4, "no report yet: saturated");
        ledger.reported_load(
            0,
            ReportedLoad {
                running: 3,
                waiting: 2,
                at: epoch,
            },
        );
        let s = ledger.cluster_state(epoch, stale);
        assert_eq!(
            (s.experts[0].running.len(), s.experts[0].waiting.len()),
            (4, 1)
        );
        assert_eq!(s.experts[0].running[0].id, 1, "our own request first");
        tokio::time::advance(Duration::from_secs(6)).await;
        let s = ledger.cluster_state(Instant::now(), stale);
        assert_eq!(
            s.experts[0].running.len(),
            4,
            "stale report: saturated, not idle"
        );
        ledger.experts[0].reports_load = false;
        let s = ledger.cluster_state(Instant::now(), stale);
        assert_eq!(
            s.experts[0].in_flight(),
            1,
            "engines without metrics: our own requests only"
        );
    }
}
