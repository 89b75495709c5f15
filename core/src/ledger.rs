//! The router's book of the requests it has sent to one expert, and the one function that
//! turns it into the [`ExpertState`] a policy reads.
//!
//! The simulator and the daemon both keep an [`ExpertLedger`] per expert and feed it the same
//! events: a dispatch, tokens streamed back, a completion. Both build their
//! [`ClusterState`](crate::ClusterState) with [`ExpertLedger::expert_state`], so a policy
//! trained in simulation is served exactly the features it was trained on. Times are seconds
//! on the router's clock (the daemon counts from its start).
//!
//! # What every field of the view means
//!
//! An engine's internal queue is not visible from outside, so the ledger takes requests as
//! the engine model ([`crate::engine`]) runs them: first come, first served; the first
//! `max_slots` requests in dispatch order hold the expert's slots (they are *running*), the
//! rest *wait*. A request takes a slot when it is dispatched with a slot free, or when a
//! request ahead of it finishes; [`InFlight::slot_elapsed_s`] counts from then. The KV
//! cache is not modelled here: the router does not know true output lengths, so it cannot
//! know which reservation an engine would refuse.
//!
//! - [`ExpertState::running`] / [`ExpertState::waiting`]: the ledger's requests in dispatch
//!   order, then requests of other clients the engine reports (`foreign`, as typical-size
//!   requests), split at `max_slots`.
//! - [`InFlight::elapsed_s`]: now minus the request's arrival at the router.
//! - [`InFlight::generated_tokens`]: tokens streamed back so far.
//! - [`ExpertState::utilisation`]: the share of recent time during which this router had at
//!   least one request on the expert, exponentially weighted with a time constant of
//!   [`UTILISATION_TIME_CONSTANT_S`] (1 − e^(−t/τ) after t seconds busy from idle).
//!
//! # What online calibration reads from it
//!
//! - [`ExpertLedger::mean_running_since_first_token`]: the batch (requests holding a slot)
//!   and its context, averaged over time from a request's first token to now, leaving out
//!   the time a prefill was pending (a request holding a slot without its first token), as
//!   the daemon leaves those stalls out of the answer's mean step. A request's mean time
//!   between tokens is a decode step at the batch it *lived* with, not at the batch left
//!   when it ends.
//! - [`ExpertLedger::own_prefill_since_s`]: when a request's own prefill started: when it took
//!   its slot, or when the last request ahead of it that was still prefilling then got its
//!   first token (the latency model's time to first token is the prefill ahead, then its
//!   own). From then to its first token is its own prefill.

use std::sync::Arc;

use crate::expert::ExpertProfile;
use crate::request::RequestId;
use crate::state::{ExpertState, InFlight};
use crate::task::Task;

/// Time constant of [`ExpertState::utilisation`], seconds.
pub const UTILISATION_TIME_CONSTANT_S: f64 = 30.0;
/// Prompt tokens of a request of another client (its size is unknown: a typical one).
pub const FOREIGN_PROMPT_TOKENS: u32 = 512;
/// Output tokens of a request of another client.
pub const FOREIGN_OUTPUT_TOKENS: f64 = 256.0;
/// SLO of a request of another client: unknown, taken as loose (its QoS is not ours to
/// protect), finite so that every feature stays finite.
pub const FOREIGN_SLO_S_PER_TOKEN: f64 = 1e3;

/// One request the router has sent to an expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LedgerEntry {
    /// Request id (unique among the router's requests in flight).
    pub id: RequestId,
    /// Task class.
    pub task: Task,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens predicted at the decision.
    pub predicted_output_tokens: f64,
    /// Answer quality predicted at the decision.
    pub predicted_quality: f64,
    /// The request's SLO, seconds per output token.
    pub slo_s_per_token: f64,
    /// Its `max_tokens`, if bounded.
    pub max_output_tokens: Option<u32>,
    /// When it arrived at the router.
    pub arrived_s: f64,
    /// When it was sent to the expert.
    pub dispatched_s: f64,
    /// Since when it has held a slot in the ledger's view (`None` while it waits).
    pub slot_since_s: Option<f64>,
    /// When its first token came back.
    pub first_token_s: Option<f64>,
    /// Tokens streamed back so far.
    pub generated_tokens: u32,
}

impl LedgerEntry {
    /// The request as a policy sees it at `now_s`.
    pub fn in_flight(&self, now_s: f64) -> InFlight {
        InFlight {
            id: self.id,
            task: self.task,
            prompt_tokens: self.prompt_tokens,
            predicted_output_tokens: self.predicted_output_tokens,
            generated_tokens: self.generated_tokens,
            elapsed_s: (now_s - self.arrived_s).max(0.0),
            slot_elapsed_s: self.slot_since_s.map_or(0.0, |s| (now_s - s).max(0.0)),
            predicted_quality: self.predicted_quality,
            slo_s_per_token: self.slo_s_per_token,
            max_output_tokens: self.max_output_tokens,
        }
    }
}

/// A request of another client on the expert, as a policy is shown it: typical size, no
/// progress seen, worth nothing to this router.
pub fn foreign_in_flight(i: usize) -> InFlight {
    InFlight {
        id: u64::MAX - i as u64,
        task: Task::Chat,
        prompt_tokens: FOREIGN_PROMPT_TOKENS,
        predicted_output_tokens: FOREIGN_OUTPUT_TOKENS,
        generated_tokens: 0,
        elapsed_s: 0.0,
        slot_elapsed_s: 0.0,
        predicted_quality: 0.0,
        slo_s_per_token: FOREIGN_SLO_S_PER_TOKEN,
        max_output_tokens: None,
    }
}

/// Time integrals of the batch decoding on the expert in the ledger's view, over the time no
/// prefill was pending (no request holding a slot was without its first token): piecewise
/// constant between the ledger's events (a dispatch, a first token, a finish).
///
/// A prefill is left out because a decode step observation leaves it out: while an engine
/// runs a prompt's prefill the running sequences stall (or decode one token in the prefill's
/// long iteration, as llama.cpp does), and the daemon takes those gaps out of an answer's
/// mean step (its stalls). Counting the prompt in the batch through its wait and prefill
/// would put a batch one larger than the one that decoded on the stall's share of the
/// answer (in HIL scenario 10 a joining prompt's prefill took 0.4-2 s, against answers of
/// 4-5 s on the 4-slot server). The flip side: a request that the engine queues
/// while the ledger counts it in a slot (a configured `max_slots` above the engine's) is a
/// pending prefill for as long as it waits, and the decode steps of that time teach nothing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RunningIntegrals {
    /// ∫ requests holding a slot dt over the time no prefill was pending, request-seconds
    /// (all of them are decoding then).
    pub requests_s: f64,
    /// ∫ their context (prompt plus tokens streamed back as last recorded) dt over the same
    /// time, token-seconds.
    pub context_s: f64,
    /// The time no prefill was pending, seconds.
    pub decoding_s: f64,
}

/// The requests a router has in flight on one expert, in dispatch order.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertLedger {
    max_slots: usize,
    entries: Vec<LedgerEntry>,
    /// Exponentially weighted busy share as of `busy_at_s`.
    busy_share: f64,
    busy_at_s: f64,
    /// [`RunningIntegrals`] as of `integrals_at_s`.
    integrals: RunningIntegrals,
    integrals_at_s: f64,
    /// The integrals at each running request's first token (removed at its finish).
    first_token_marks: Vec<(RequestId, RunningIntegrals)>,
}

impl ExpertLedger {
    /// An empty ledger for an expert with `max_slots` slots, at time `now_s`.
    pub fn new(max_slots: u32, now_s: f64) -> Self {
        Self {
            max_slots: max_slots.max(1) as usize,
            entries: Vec::new(),
            busy_share: 0.0,
            busy_at_s: now_s,
            integrals: RunningIntegrals::default(),
            integrals_at_s: now_s,
            first_token_marks: Vec::new(),
        }
    }

    /// The requests in flight, in dispatch order.
    pub fn entries(&self) -> &[LedgerEntry] {
        &self.entries
    }

    /// Mutable access to the requests in flight (to update what was streamed back).
    pub fn entries_mut(&mut self) -> &mut [LedgerEntry] {
        &mut self.entries
    }

    /// Requests in flight.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Slots of the expert.
    pub fn max_slots(&self) -> usize {
        self.max_slots
    }

    /// Takes the requests in flight of `other` (a config reload that kept the expert), with
    /// its busy history; slots are reassigned for this ledger's slot count at `now_s`.
    pub fn take_over(&mut self, other: &mut ExpertLedger, now_s: f64) {
        other.settle_integrals(now_s);
        self.entries = std::mem::take(&mut other.entries);
        self.busy_share = other.busy_share;
        self.busy_at_s = other.busy_at_s;
        self.integrals = other.integrals;
        self.integrals_at_s = other.integrals_at_s;
        self.first_token_marks = std::mem::take(&mut other.first_token_marks);
        for (i, entry) in self.entries.iter_mut().enumerate() {
            if i < self.max_slots {
                entry.slot_since_s.get_or_insert(now_s);
            } else {
                entry.slot_since_s = None;
            }
        }
    }

    fn settle_busy(&mut self, now_s: f64) {
        self.busy_share = self.busy_share_at(now_s);
        self.busy_at_s = self.busy_at_s.max(now_s);
    }

    fn settle_integrals(&mut self, now_s: f64) {
        let dt = now_s - self.integrals_at_s;
        if dt > 0.0 {
            let running = &self.entries[..self.entries.len().min(self.max_slots)];
            if running.iter().all(|d| d.first_token_s.is_some()) {
                let context: f64 = running
                    .iter()
                    .map(|d| f64::from(d.prompt_tokens) + f64::from(d.generated_tokens))
                    .sum();
                self.integrals.requests_s += running.len() as f64 * dt;
                self.integrals.context_s += context * dt;
                self.integrals.decoding_s += dt;
            }
            self.integrals_at_s = now_s;
        }
    }

    /// The requests decoding and their context, each averaged over the time from request
    /// `id`'s first token to `now_s` during which no prefill was pending (see
    /// [`RunningIntegrals`]; this settles the integrals up to `now_s`); `None` before its
    /// first token, for an unknown request, or when no such time has passed.
    pub fn mean_running_since_first_token(
        &mut self,
        id: RequestId,
        now_s: f64,
    ) -> Option<(f64, f64)> {
        // A request has a mark from its first token to its finish.
        let mark = self.first_token_marks.iter().find(|(m, _)| *m == id)?.1;
        self.settle_integrals(now_s);
        let dt = self.integrals.decoding_s - mark.decoding_s;
        (dt > 0.0).then(|| {
            (
                (self.integrals.requests_s - mark.requests_s) / dt,
                (self.integrals.context_s - mark.context_s) / dt,
            )
        })
    }

    /// When request `id`'s own prefill started, as the ledger saw it: when it took its slot,
    /// or, if requests ahead of it held slots then without a token yet, the last first token
    /// among them that came before `id`'s (an engine prefills those first, or in the same
    /// iteration; one whose first token came after `id`'s did not hold it up). `None` for an
    /// unknown request, one without a slot or without a first token yet.
    pub fn own_prefill_since_s(&self, id: RequestId) -> Option<f64> {
        let i = self.entries.iter().position(|d| d.id == id)?;
        let since = self.entries[i].slot_since_s?;
        let first = self.entries[i].first_token_s?;
        Some(
            self.entries[..i]
                .iter()
                .filter(|o| o.slot_since_s.is_some_and(|s| s <= since))
                .filter_map(|o| o.first_token_s)
                .filter(|&f| f > since && f <= first)
                .fold(since, f64::max),
        )
    }

    fn busy_share_at(&self, now_s: f64) -> f64 {
        let busy = if self.entries.is_empty() { 0.0 } else { 1.0 };
        let dt = (now_s - self.busy_at_s).max(0.0);
        busy + (self.busy_share - busy) * (-dt / UTILISATION_TIME_CONSTANT_S).exp()
    }

    /// Records a dispatch at `now_s`: the request holds a slot at once if one is free.
    pub fn dispatch(&mut self, mut entry: LedgerEntry, now_s: f64) {
        self.settle_busy(now_s);
        self.settle_integrals(now_s);
        entry.slot_since_s = (self.entries.len() < self.max_slots).then_some(now_s);
        self.entries.push(entry);
    }

    /// Records `tokens` more tokens of request `id` at `now_s`; returns whether they were its
    /// first.
    pub fn tokens(&mut self, id: RequestId, tokens: u32, now_s: f64) -> bool {
        self.settle_integrals(now_s);
        let Some(entry) = self.entries.iter_mut().find(|d| d.id == id) else {
            return false;
        };
        entry.generated_tokens = entry.generated_tokens.saturating_add(tokens);
        let first = entry.first_token_s.is_none();
        if first {
            entry.first_token_s = Some(now_s);
            self.first_token_marks.push((id, self.integrals));
        }
        first
    }

    /// Removes a finished (or failed) request at `now_s` and returns its entry; the first
    /// waiting request takes the slot it frees.
    pub fn finish(&mut self, id: RequestId, now_s: f64) -> Option<LedgerEntry> {
        let i = self.entries.iter().position(|d| d.id == id)?;
        self.settle_busy(now_s);
        self.settle_integrals(now_s);
        self.first_token_marks.retain(|(m, _)| *m != id);
        let done = self.entries.remove(i);
        if i < self.max_slots
            && let Some(next) = self.entries.get_mut(self.max_slots - 1)
            && next.slot_since_s.is_none()
        {
            next.slot_since_s = Some(now_s);
        }
        Some(done)
    }

    /// The share of recent time this router had at least one request on the expert, at
    /// `now_s` (see the module docs).
    pub fn utilisation(&self, now_s: f64) -> f64 {
        self.busy_share_at(now_s).clamp(0.0, 1.0)
    }

    /// The expert as a policy sees it at `now_s`: the ledger's requests then `foreign`
    /// requests of other clients, the first `max_slots` running and the rest waiting (the one
    /// definition of the view; see the module docs).
    pub fn expert_state(
        &self,
        profile: Arc<ExpertProfile>,
        up: bool,
        now_s: f64,
        foreign: usize,
    ) -> ExpertState {
        let mut state = ExpertState::idle(profile);
        self.fill_expert_state(&mut state, up, now_s, foreign);
        state
    }

    /// [`ExpertLedger::expert_state`] into an existing state, reusing its buffers.
    pub fn fill_expert_state(&self, state: &mut ExpertState, up: bool, now_s: f64, foreign: usize) {
        state.up = up;
        state.utilisation = self.utilisation(now_s);
        state.running.clear();
        state.waiting.clear();
        let requests = self
            .entries
            .iter()
            .map(|e| e.in_flight(now_s))
            .chain((0..foreign).map(foreign_in_flight));
        for (i, r) in requests.enumerate() {
            if i < self.max_slots {
                state.running.push(r);
            } else {
                state.waiting.push(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::expert::LatencyModel;

    fn profile(slots: u32) -> Arc<ExpertProfile> {
        Arc::new(ExpertProfile {
            name: "a".into(),
            model: "m".into(),
            hardware: String::new(),
            source: String::new(),
            max_slots: slots,
            kv_tokens: 10_000,
            latency: LatencyModel::paper(1e-4, 1e-7, 0.02),
        })
    }

    fn entry(id: u64, at: f64) -> LedgerEntry {
        LedgerEntry {
            id,
            task: Task::Chat,
            prompt_tokens: 100,
            predicted_output_tokens: 50.0,
            predicted_quality: 0.5,
            slo_s_per_token: 0.1,
            max_output_tokens: Some(64),
            arrived_s: at,
            dispatched_s: at,
            slot_since_s: None,
            first_token_s: None,
            generated_tokens: 0,
        }
    }

    #[test]
    fn slots_go_first_come_first_served_and_pass_on_at_a_finish() {
        let mut l = ExpertLedger::new(2, 0.0);
        for id in 0..3 {
            l.dispatch(entry(id, 1.0), 1.0);
        }
        assert!(l.tokens(1, 3, 1.5));
        assert!(!l.tokens(1, 2, 1.6));
        assert!(!l.tokens(9, 2, 1.6), "unknown request");
        let s = l.expert_state(profile(2), true, 2.0, 0);
        assert_eq!((s.running.len(), s.waiting.len()), (2, 1));
        assert_eq!(s.running[1].generated_tokens, 5);
        assert_eq!(s.running[1].elapsed_s, 1.0);
        assert_eq!(s.running[1].slot_elapsed_s, 1.0);
        assert_eq!(s.running[1].max_output_tokens, Some(64));
        assert_eq!(s.waiting[0].slot_elapsed_s, 0.0, "waiting: no slot yet");
        // Request 0 finishes at 2.5: request 2 takes its slot then.
        assert_eq!(l.finish(0, 2.5).map(|d| d.id), Some(0));
        assert_eq!(l.finish(0, 2.5), None);
        let s = l.expert_state(profile(2), true, 3.0, 0);
        assert_eq!(s.running[1].id, 2);
        assert_eq!(s.running[1].slot_elapsed_s, 0.5);
        // A waiting request that finishes frees no slot.
        l.dispatch(entry(3, 3.0), 3.0);
        assert_eq!(l.entries()[2].slot_since_s, None);
        l.dispatch(entry(4, 3.0), 3.0);
        assert!(l.finish(4, 3.2).is_some());
        assert_eq!(l.entries()[2].slot_since_s, None);
    }

    #[test]
    fn foreign_requests_queue_behind_ours() {
        let mut l = ExpertLedger::new(4, 0.0);
        l.dispatch(entry(1, 0.0), 0.0);
        let s = l.expert_state(profile(4), false, 0.0, 5);
        assert!(!s.up);
        assert_eq!((s.running.len(), s.waiting.len()), (4, 2));
        assert_eq!(s.running[0].id, 1, "our own request first");
        assert_eq!(s.running[1], foreign_in_flight(0));
        assert_eq!(s.waiting[1].id, u64::MAX - 4);
    }

    #[test]
    fn utilisation_is_the_recent_busy_share() {
        let tau = UTILISATION_TIME_CONSTANT_S;
        let mut l = ExpertLedger::new(2, 0.0);
        assert_eq!(l.utilisation(100.0), 0.0, "never busy");
        l.dispatch(entry(1, 10.0), 10.0);
        // Busy for tau seconds from idle: 1 - e^-1.
        let u = l.utilisation(10.0 + tau);
        assert!((u - (1.0 - (-1.0f64).exp())).abs() < 1e-12, "{u}");
        l.finish(1, 10.0 + tau);
        // Then idle for tau: decays by e^-1.
        let u2 = l.utilisation(10.0 + 2.0 * tau);
        assert!((u2 - u * (-1.0f64).exp()).abs() < 1e-12, "{u2}");
        // Reading it changes nothing.
        assert_eq!(l.utilisation(10.0 + 2.0 * tau), u2);
    }

    #[test]
    fn a_decode_step_sees_the_batch_averaged_over_the_answer() {
        let mut l = ExpertLedger::new(2, 0.0);
        l.dispatch(entry(1, 0.0), 0.0);
        l.dispatch(entry(2, 1.0), 1.0);
        assert_eq!(
            l.mean_running_since_first_token(1, 2.0),
            None,
            "no token yet"
        );
        assert!(l.tokens(1, 1, 2.0));
        assert!(l.tokens(2, 1, 2.0));
        // 2..4: requests 1 and 2 (context 101 + 101); 4..5: request 1 alone (101);
        // 5..6: requests 1 and 3 (101 + 101), 3 with its first token at 5.
        assert!(l.finish(2, 4.0).is_some());
        l.dispatch(entry(3, 5.0), 5.0);
        assert!(l.tokens(3, 1, 5.0));
        let (batch, context) = l.mean_running_since_first_token(1, 6.0).unwrap();
        assert!(
            (batch - (2.0 * 2.0 + 1.0 + 2.0) / 4.0).abs() < 1e-12,
            "{batch}"
        );
        assert!(
            (context - (202.0 * 2.0 + 101.0 + 202.0) / 4.0).abs() < 1e-9,
            "{context}"
        );
        // The batch left at the end (2) is not the batch the answer lived with (1.75).
        assert_eq!(
            l.mean_running_since_first_token(1, 6.0),
            Some((batch, context))
        );
        assert_eq!(l.mean_running_since_first_token(9, 6.0), None, "unknown");
        // Requests beyond the slots do not count; a finished request's mark goes.
        l.dispatch(entry(4, 6.0), 6.0);
        let (batch, _) = l.mean_running_since_first_token(1, 7.0).unwrap();
        assert!((batch - (7.0 + 2.0) / 5.0).abs() < 1e-12, "{batch}");
        assert!(l.finish(1, 7.0).is_some());
        assert!(l.first_token_marks.iter().all(|(m, _)| *m == 3));
        assert!(l.finish(3, 7.0).is_some());
        assert!(l.first_token_marks.is_empty());
    }

    #[test]
    fn a_pending_prefill_is_left_out_of_the_decode_batch() {
        let mut l = ExpertLedger::new(4, 0.0);
        l.dispatch(entry(1, 0.0), 0.0);
        assert!(l.tokens(1, 1, 1.0));
        // 1..3: request 1 decodes alone. 3..4: request 2 holds a slot without a token (its
        // wait and prefill: request 1 stalls, and its stall is no decode step). 4..6: both
        // decode (context 101 + 101).
        l.dispatch(entry(2, 3.0), 3.0);
        assert_eq!(
            l.mean_running_since_first_token(1, 3.5),
            Some((1.0, 101.0)),
            "only the time before the prefill counts"
        );
        assert!(l.tokens(2, 1, 4.0));
        let (batch, context) = l.mean_running_since_first_token(1, 6.0).unwrap();
        // Over the 4 s without a pending prefill: 2 s at 1, 2 s at 2.
        assert!((batch - 1.5).abs() < 1e-12, "{batch}");
        assert!((context - (2.0 * 101.0 + 2.0 * 202.0) / 4.0).abs() < 1e-9);
        // A request waiting for a slot is not a pending prefill: with every slot decoding,
        // time counts.
        let mut full = ExpertLedger::new(1, 0.0);
        full.dispatch(entry(1, 0.0), 0.0);
        assert!(full.tokens(1, 1, 1.0));
        full.dispatch(entry(2, 1.0), 1.0);
        assert_eq!(
            full.mean_running_since_first_token(1, 3.0),
            Some((1.0, 101.0))
        );
        // A prefill pending since the first token: no decoding time, no observation.
        let mut busy = ExpertLedger::new(2, 0.0);
        busy.dispatch(entry(1, 0.0), 0.0);
        busy.dispatch(entry(2, 0.5), 0.5);
        assert!(busy.tokens(1, 1, 1.0));
        assert_eq!(busy.mean_running_since_first_token(1, 2.0), None);
    }

    #[test]
    fn a_prefill_starts_when_the_prefills_ahead_of_it_have_yielded_their_first_token() {
        let mut l = ExpertLedger::new(3, 0.0);
        for (id, at) in [(1, 0.0), (2, 0.1), (3, 0.12), (4, 0.13)] {
            l.dispatch(entry(id, at), at);
        }
        assert_eq!(l.own_prefill_since_s(3), None, "no first token yet");
        // 1 yields its first token at 0.2, 2 at 0.5, 3 at 0.7: 3's own prefill is 0.5..0.7.
        for (id, at) in [(1, 0.2), (2, 0.5), (3, 0.7)] {
            assert!(l.tokens(id, 1, at));
        }
        assert_eq!(l.own_prefill_since_s(1), Some(0.0));
        assert_eq!(l.own_prefill_since_s(2), Some(0.2));
        assert_eq!(l.own_prefill_since_s(3), Some(0.5));
        assert_eq!(l.own_prefill_since_s(4), None, "waiting: no slot");
        assert_eq!(l.own_prefill_since_s(9), None, "unknown");
        // A request ahead whose first token came after this one's did not hold it up; one
        // that had its token before this one took its slot did not either.
        let mut m = ExpertLedger::new(3, 0.0);
        for (id, at) in [(1, 0.0), (2, 0.0), (3, 0.3)] {
            m.dispatch(entry(id, at), at);
        }
        assert!(m.tokens(2, 1, 0.2));
        assert!(m.tokens(3, 1, 0.6));
        assert!(m.tokens(1, 1, 0.9));
        assert_eq!(m.own_prefill_since_s(3), Some(0.3));
    }

    #[test]
    fn a_reload_keeps_requests_and_reassigns_slots() {
        let mut old = ExpertLedger::new(1, 0.0);
        old.dispatch(entry(1, 0.0), 0.0);
        old.dispatch(entry(2, 0.5), 0.5);
        let mut new = ExpertLedger::new(2, 1.0);
        new.take_over(&mut old, 1.0);
        assert!(old.is_empty());
        assert_eq!(new.entries()[0].slot_since_s, Some(0.0));
        assert_eq!(
            new.entries()[1].slot_since_s,
            Some(1.0),
            "a second slot now"
        );
    }
}
