//! One expert as a continuous-batching engine (vLLM-style, prefill-prioritised).
//!
//! The engine runs *phases*, and admits requests only at phase (iteration) boundaries:
//! - **admission**: from the head of the FCFS queue while a slot is free and the KV cache can
//!   reserve the request's prompt plus output (the engine knows its own request's length
//!   limit; the router does not), stopping at the first request that does not fit;
//! - **prefill**: all newly admitted prompts in one iteration of
//!   `prefill_overhead_s + sum(p) / prefill_tok_s` seconds, during which running requests are
//!   stalled; each prompt yields its first token;
//! - **decode**: every running request gains one token per step; a step over `b` requests
//!   holding `C` context tokens takes `t0 + d*(b-1) + e*C`.
//!
//! Between two events (a completion, or an admissible arrival) the batch is fixed, so step
//! `k` of a decode run takes `a + g*k` with `a = step(b, C0)` and `g = e*b`: the engine jumps
//! over `n` steps at once in closed form, `n*a + g*n*(n-1)/2`. An admissible arrival cuts the
//! run at the first step boundary at or after it. This is exact for the step model, with one
//! event per phase instead of one per token.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::expert::ExpertProfile;

/// A request on an engine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Job {
    /// Index of the request in the simulation's request table.
    pub idx: usize,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// True output tokens (already limited to what the KV cache can hold).
    pub output_tokens: u32,
    /// Tokens generated at the start of the current phase.
    pub generated_tokens: u32,
}

impl Job {
    fn kv_reservation(&self) -> u64 {
        u64::from(self.prompt_tokens) + u64::from(self.output_tokens)
    }
}

/// What the engine reports when a phase ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EngineEvent {
    /// The request's first token was delivered (end of its prefill).
    FirstToken {
        /// Request index.
        idx: usize,
        /// Time of the first token.
        at_s: f64,
    },
    /// The request's last token was delivered.
    Completed {
        /// Request index.
        idx: usize,
        /// Time of the last token.
        at_s: f64,
        /// Output tokens delivered.
        output_tokens: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Idle,
    Prefill {
        start_s: f64,
        end_s: f64,
    },
    /// `steps` decode steps from `start_s`; step k takes `first_step_s + growth_s * k`.
    Decode {
        start_s: f64,
        steps: u64,
        first_step_s: f64,
        growth_s: f64,
    },
}

/// A read-only view of the engine's current decode run (see [`ExpertEngine::decode_run`]):
/// `steps` decode steps from `start_s`; step `k` (1-based) takes `first_step_s + growth_s * (k-1)`,
/// so it ends at [`DecodeRun::step_end_s`]`(k)`. Every request of
/// [`ExpertEngine::decoding_jobs`] gains one token at the end of each step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeRun {
    /// When the run started.
    pub start_s: f64,
    /// Steps in the run (it ends at the end of the last one, an engine event).
    pub steps: u64,
    /// Duration of the first step.
    pub first_step_s: f64,
    /// How much longer each step is than the one before (the context grows by one token per
    /// running request per step).
    pub growth_s: f64,
}

impl DecodeRun {
    /// When step `k` of the run ends (`start_s` for `k = 0`): `start_s + k*a + g*k*(k-1)/2`,
    /// the same arithmetic as [`ExpertEngine::next_event_s`] for the run's last step.
    pub fn step_end_s(&self, k: u64) -> f64 {
        self.start_s + decode_run_s(k, self.first_step_s, self.growth_s)
    }
}

fn decode_run_s(steps: u64, first_step_s: f64, growth_s: f64) -> f64 {
    let n = steps as f64;
    n * first_step_s + growth_s * n * (n - 1.0) / 2.0
}

/// Number of whole decode steps completed by `elapsed` seconds into a run (the largest `k`
/// with `decode_run_s(k) <= elapsed`), capped at `max_steps`.
fn steps_done_by(elapsed: f64, max_steps: u64, first_step_s: f64, growth_s: f64) -> u64 {
    if elapsed <= 0.0 {
        return 0;
    }
    let guess = if growth_s > 0.0 {
        // Solve g/2 k^2 + (a - g/2) k - elapsed = 0 for the positive root.
        let b = first_step_s - growth_s / 2.0;
        (-b + (b * b + 2.0 * growth_s * elapsed).sqrt()) / growth_s
    } else {
        elapsed / first_step_s
    };
    let mut k = (guess.max(0.0).floor() as u64).min(max_steps);
    while k > 0 && decode_run_s(k, first_step_s, growth_s) > elapsed {
        k -= 1;
    }
    while k < max_steps && decode_run_s(k + 1, first_step_s, growth_s) <= elapsed {
        k += 1;
    }
    k
}

/// A continuous-batching engine for one expert.
#[derive(Debug, Clone)]
pub struct ExpertEngine {
    profile: Arc<ExpertProfile>,
    waiting: VecDeque<Job>,
    prefilling: Vec<Job>,
    decoding: Vec<Job>,
    /// KV tokens reserved by admitted requests (prompt + output each).
    kv_reserved: u64,
    /// Context tokens held by `decoding` at the start of the current phase.
    decode_context: u64,
    phase: Phase,
    busy_s: f64,
}

impl ExpertEngine {
    /// An idle engine.
    pub fn new(profile: Arc<ExpertProfile>) -> Self {
        Self {
            profile,
            waiting: VecDeque::new(),
            prefilling: Vec::new(),
            decoding: Vec::new(),
            kv_reserved: 0,
            decode_context: 0,
            phase: Phase::Idle,
            busy_s: 0.0,
        }
    }

    /// The expert's profile.
    pub fn profile(&self) -> &Arc<ExpertProfile> {
        &self.profile
    }

    /// Runs on `profile` from now on: phases that start from now take its latencies (the
    /// phase in progress keeps its end). The simulator slows an expert down this way (a
    /// profile whose latency model is [`LatencyModel::slowed`](crate::LatencyModel::slowed)).
    pub fn set_profile(&mut self, profile: Arc<ExpertProfile>) {
        self.profile = profile;
    }

    /// When the current phase ends, if the engine is busy.
    pub fn next_event_s(&self) -> Option<f64> {
        match self.phase {
            Phase::Idle => None,
            Phase::Prefill { end_s, .. } => Some(end_s),
            Phase::Decode {
                start_s,
                steps,
                first_step_s,
                growth_s,
            } => Some(start_s + decode_run_s(steps, first_step_s, growth_s)),
        }
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        matches!(self.phase, Phase::Idle) && self.waiting.is_empty()
    }

    /// Requests admitted (prefilling or decoding) plus queued.
    pub fn in_flight(&self) -> usize {
        self.waiting.len() + self.prefilling.len() + self.decoding.len()
    }

    /// Seconds the engine has spent in prefill or decode, up to `now_s`.
    pub fn busy_s(&self, now_s: f64) -> f64 {
        let current = match self.phase {
            Phase::Idle => 0.0,
            Phase::Prefill { start_s, .. } | Phase::Decode { start_s, .. } => {
                (now_s - start_s).max(0.0)
            }
        };
        self.busy_s + current
    }

    /// KV tokens reserved by admitted requests.
    pub fn kv_reserved(&self) -> u64 {
        self.kv_reserved
    }

    /// Requests admitted by the engine (prefilling or decoding).
    pub fn admitted(&self) -> usize {
        self.prefilling.len() + self.decoding.len()
    }

    /// The current decode run, if the engine is decoding (read-only).
    pub fn decode_run(&self) -> Option<DecodeRun> {
        match self.phase {
            Phase::Decode {
                start_s,
                steps,
                first_step_s,
                growth_s,
            } => Some(DecodeRun {
                start_s,
                steps,
                first_step_s,
                growth_s,
            }),
            Phase::Idle | Phase::Prefill { .. } => None,
        }
    }

    /// Requests admitted and prefilling in the current phase (generated tokens 0).
    pub fn prefilling_jobs(&self) -> &[Job] {
        &self.prefilling
    }

    /// Requests admitted and decoding, with their generated tokens as of the start of the
    /// current phase (during a decode run, each gains one token per step of [`Self::decode_run`]).
    pub fn decoding_jobs(&self) -> &[Job] {
        &self.decoding
    }

    /// Ends the current phase at its end time, reports what happened in `events`, and starts
    /// the next phase. Does nothing when idle.
    pub fn complete_phase(&mut self, events: &mut Vec<EngineEvent>) {
        let Some(end_s) = self.next_event_s() else {
            return;
        };
        match self.phase {
            Phase::Idle => return,
            Phase::Prefill { start_s, .. } => {
                self.busy_s += end_s - start_s;
                for mut job in self.prefilling.drain(..) {
                    job.generated_tokens = 1;
                    events.push(EngineEvent::FirstToken {
                        idx: job.idx,
                        at_s: end_s,
                    });
                    if job.output_tokens <= 1 {
                        self.kv_reserved -= job.kv_reservation();
                        events.push(EngineEvent::Completed {
                            idx: job.idx,
                            at_s: end_s,
                            output_tokens: job.output_tokens,
                        });
                    } else {
                        self.decode_context += u64::from(job.prompt_tokens) + 1;
                        self.decoding.push(job);
                    }
                }
            }
            Phase::Decode { start_s, steps, .. } => {
                self.busy_s += end_s - start_s;
                let steps32 = u32::try_from(steps).unwrap_or(u32::MAX);
                self.decode_context += steps * self.decoding.len() as u64;
                let mut i = 0;
                while i < self.decoding.len() {
                    let job = &mut self.decoding[i];
                    job.generated_tokens += steps32;
                    if job.generated_tokens >= job.output_tokens {
                        let job = self.decoding.remove(i);
                        self.kv_reserved -= job.kv_reservation();
                        self.decode_context -=
                            u64::from(job.prompt_tokens) + u64::from(job.generated_tokens);
                        events.push(EngineEvent::Completed {
                            idx: job.idx,
                            at_s: end_s,
                            output_tokens: job.output_tokens,
                        });
                    } else {
                        i += 1;
                    }
                }
            }
        }
        self.start_next_phase(end_s);
    }

    /// Queues a request that arrives at `now_s`. Every phase ending at or before `now_s` must
    /// have been completed first.
    pub fn enqueue(&mut self, job: Job, now_s: f64) {
        self.waiting.push_back(job);
        match self.phase {
            Phase::Idle => self.start_next_phase(now_s),
            Phase::Decode {
                start_s,
                steps,
                first_step_s,
                growth_s,
            } if self.waiting.len() == 1 && self.can_admit(&job) => {
                // Cut the run at the first step boundary at or after the arrival.
                let done = steps_done_by(now_s - start_s, steps, first_step_s, growth_s);
                let boundary = if start_s + decode_run_s(done, first_step_s, growth_s) >= now_s {
                    done
                } else {
                    done + 1
                };
                self.phase = Phase::Decode {
                    start_s,
                    steps: boundary.min(steps),
                    first_step_s,
                    growth_s,
                };
            }
            // Arrived at the very boundary where a prefill began: it joins that prefill.
            Phase::Prefill { start_s, end_s }
                if start_s == now_s && self.waiting.len() == 1 && self.can_admit(&job) =>
            {
                self.waiting.pop_back();
                self.kv_reserved += job.kv_reservation();
                self.prefilling.push(job);
                self.phase = Phase::Prefill {
                    start_s,
                    end_s: end_s
                        + self
                            .profile
                            .latency
                            .prefill_tokens_s(f64::from(job.prompt_tokens)),
                };
            }
            _ => {}
        }
    }

    fn can_admit(&self, job: &Job) -> bool {
        self.admitted() < self.profile.max_slots as usize
            && self.kv_reserved + job.kv_reservation() <= self.profile.kv_tokens
    }

    fn start_next_phase(&mut self, now_s: f64) {
        while let Some(job) = self.waiting.front().copied() {
            if !self.can_admit(&job) {
                break;
            }
            self.waiting.pop_front();
            self.kv_reserved += job.kv_reservation();
            self.prefilling.push(job);
        }
        let latency = &self.profile.latency;
        self.phase = if !self.prefilling.is_empty() {
            let prompt: u64 = self
                .prefilling
                .iter()
                .map(|j| u64::from(j.prompt_tokens))
                .sum();
            Phase::Prefill {
                start_s: now_s,
                end_s: now_s + latency.prefill_s(prompt as f64),
            }
        } else if let Some(steps) = self
            .decoding
            .iter()
            .map(|j| u64::from(j.output_tokens - j.generated_tokens))
            .min()
        {
            let b = self.decoding.len() as f64;
            Phase::Decode {
                start_s: now_s,
                steps,
                first_step_s: latency.decode_step_s(b, self.decode_context as f64),
                growth_s: latency.decode_e_s_per_ctx_token * b,
            }
        } else {
            Phase::Idle
        };
    }

    /// Visits every request on the engine as of `now_s` (no phase may end before `now_s`):
    /// `(job with generated tokens as of now_s, admitted?)`, admitted ones first, then the
    /// queue in FCFS order.
    pub fn for_each_job(&self, now_s: f64, mut visit: impl FnMut(&Job, bool)) {
        let steps_now = match self.phase {
            Phase::Decode {
                start_s,
                steps,
                first_step_s,
                growth_s,
            } => steps_done_by(now_s - start_s, steps, first_step_s, growth_s),
            _ => 0,
        };
        let steps32 = u32::try_from(steps_now).unwrap_or(u32::MAX);
        for job in &self.prefilling {
            visit(job, true);
        }
        for job in &self.decoding {
            let now = Job {
                generated_tokens: job.generated_tokens + steps32,
                ..*job
            };
            visit(&now, true);
        }
        for job in &self.waiting {
            visit(job, false);
        }
    }

    /// An engine caught in the middle of its work at `now_s`, rebuilt from outside (a
    /// planner's view of an expert): `prefilling` jobs (no token yet) are in a prefill
    /// iteration that ends `prefill_left_s` from now; `decoding` jobs hold the tokens given
    /// and decode from now; `waiting` jobs are queued in this order. Reservations are taken as
    /// given even when they exceed the KV cache (a sampled future may over-commit it; nothing
    /// more is admitted until enough has left).
    pub fn resume(
        profile: Arc<ExpertProfile>,
        now_s: f64,
        prefilling: impl IntoIterator<Item = Job>,
        prefill_left_s: f64,
        decoding: impl IntoIterator<Item = Job>,
        waiting: impl IntoIterator<Item = Job>,
    ) -> Self {
        let mut engine = Self::new(profile);
        engine.resume_into(now_s, prefilling, prefill_left_s, decoding, waiting);
        engine
    }

    /// [`ExpertEngine::resume`] into this engine (same profile), reusing its buffers.
    pub fn resume_into(
        &mut self,
        now_s: f64,
        prefilling: impl IntoIterator<Item = Job>,
        prefill_left_s: f64,
        decoding: impl IntoIterator<Item = Job>,
        waiting: impl IntoIterator<Item = Job>,
    ) {
        self.prefilling.clear();
        self.decoding.clear();
        self.waiting.clear();
        self.busy_s = 0.0;
        self.prefilling.extend(prefilling.into_iter().map(|mut j| {
            j.generated_tokens = 0;
            j.output_tokens = j.output_tokens.max(1);
            j
        }));
        self.decoding.extend(decoding.into_iter().map(|mut j| {
            j.generated_tokens = j.generated_tokens.max(1);
            j.output_tokens = j.output_tokens.max(j.generated_tokens + 1);
            j
        }));
        self.waiting.extend(waiting);
        self.kv_reserved = self
            .prefilling
            .iter()
            .chain(&self.decoding)
            .map(Job::kv_reservation)
            .sum();
        self.decode_context = self
            .decoding
            .iter()
            .map(|j| u64::from(j.prompt_tokens) + u64::from(j.generated_tokens))
            .sum();
        if self.prefilling.is_empty() {
            self.start_next_phase(now_s);
        } else {
            self.phase = Phase::Prefill {
                start_s: now_s,
                end_s: now_s + prefill_left_s.max(0.0),
            };
        }
    }

    /// Makes this engine a copy of `other`, reusing this one's buffers.
    pub fn copy_from(&mut self, other: &Self) {
        if !Arc::ptr_eq(&self.profile, &other.profile) {
            self.profile = other.profile.clone();
        }
        self.waiting.clone_from(&other.waiting);
        self.prefilling.clone_from(&other.prefilling);
        self.decoding.clone_from(&other.decoding);
        self.kv_reserved = other.kv_reserved;
        self.decode_context = other.decode_context;
        self.phase = other.phase;
        self.busy_s = other.busy_s;
    }

    /// When the prefill iteration in progress started, if the engine is prefilling.
    pub fn prefill_started_s(&self) -> Option<f64> {
        match self.phase {
            Phase::Prefill { start_s, .. } => Some(start_s),
            Phase::Idle | Phase::Decode { .. } => None,
        }
    }

    /// Checks the engine's invariants: slots and KV within the profile's limits, context
    /// bookkeeping consistent, no request past its output. Returns a description of the
    /// first violation.
    pub fn audit(&self) -> Result<(), String> {
        let admitted = self.admitted();
        if admitted > self.profile.max_slots as usize {
            return Err(format!(
                "{}: {admitted} admitted > {} slots",
                self.profile.name, self.profile.max_slots
            ));
        }
        let reserved: u64 = self
            .prefilling
            .iter()
            .chain(&self.decoding)
            .map(Job::kv_reservation)
            .sum();
        if reserved != self.kv_reserved || reserved > self.profile.kv_tokens {
            return Err(format!(
                "{}: kv reserved {reserved} (book {}) of {}",
                self.profile.name, self.kv_reserved, self.profile.kv_tokens
            ));
        }
        let context: u64 = self
            .decoding
            .iter()
            .map(|j| u64::from(j.prompt_tokens) + u64::from(j.generated_tokens))
            .sum();
        if context != self.decode_context {
            return Err(format!(
                "{}: decode context {context} != book {}",
                self.profile.name, self.decode_context
            ));
        }
        if let Some(j) = self
            .decoding
            .iter()
            .find(|j| j.generated_tokens >= j.output_tokens)
        {
            return Err(format!(
                "{}: request {} past its output",
                self.profile.name, j.idx
            ));
        }
        Ok(())
    }
}

/// The engine whose phase ends first at or before `until_s`, and when (ties: the lowest
/// index): the next event of a set of engines run in global time order.
pub fn next_event(engines: &[ExpertEngine], until_s: f64) -> Option<(usize, f64)> {
    let mut best: Option<(usize, f64)> = None;
    for (e, engine) in engines.iter().enumerate() {
        if let Some(t) = engine.next_event_s()
            && t <= until_s
            && best.is_none_or(|(_, b)| t < b)
        {
            best = Some((e, t));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use crate::expert::LatencyModel;

    use super::*;

    pub(crate) fn profile(slots: u32, kv: u64) -> Arc<ExpertProfile> {
        Arc::new(ExpertProfile {
            name: "e".into(),
            model: "m".into(),
            hardware: String::new(),
            source: String::new(),
            max_slots: slots,
            kv_tokens: kv,
            latency: LatencyModel {
                prefill_tok_s: 1000.0,
                prefill_overhead_s: 0.0,
                decode_t0_s: 0.02,
                decode_d_s_per_seq: 0.002,
                decode_e_s_per_ctx_token: 1e-5,
            },
        })
    }

    fn job(idx: usize, p: u32, d: u32) -> Job {
        Job {
            idx,
            prompt_tokens: p,
            output_tokens: d,
            generated_tokens: 0,
        }
    }

    fn drain(e: &mut ExpertEngine) -> Vec<EngineEvent> {
        let mut ev = Vec::new();
        while e.next_event_s().is_some() {
            e.complete_phase(&mut ev);
            e.audit().unwrap();
        }
        ev
    }

    #[test]
    fn single_request_takes_prefill_plus_growing_decode_steps() {
        let mut e = ExpertEngine::new(profile(4, 10_000));
        e.enqueue(job(0, 100, 4), 0.0);
        let ev = drain(&mut e);
        // Prefill 0.1 s; then 3 steps with context 101, 102, 103:
        // 3 * 0.02 + 1e-5 * (101 + 102 + 103) = 0.06306.
        let expected = 0.1 + 0.06 + 1e-5 * 306.0;
        assert_eq!(ev[0], EngineEvent::FirstToken { idx: 0, at_s: 0.1 });
        match ev[1] {
            EngineEvent::Completed {
                at_s,
                output_tokens,
                ..
            } => {
                assert!((at_s - expected).abs() < 1e-12, "{at_s}");
                assert_eq!(output_tokens, 4);
            }
            other => panic!("{other:?}"),
        }
        assert!((e.busy_s(1.0) - expected).abs() < 1e-12);
    }

    #[test]
    fn a_slowed_profile_makes_the_phases_that_start_after_it_k_times_longer() {
        let base = profile(4, 10_000);
        let mut slow = (*base).clone();
        slow.latency = slow.latency.slowed(5.0);
        let mut e = ExpertEngine::new(base.clone());
        e.enqueue(job(0, 100, 4), 0.0);
        // The prefill in progress keeps its end; the decode run after it is 5x slower.
        e.set_profile(Arc::new(slow));
        let ev = drain(&mut e);
        let expected = 0.1 + 5.0 * (0.06 + 1e-5 * 306.0);
        match ev[1] {
            EngineEvent::Completed { at_s, .. } => {
                assert!((at_s - expected).abs() < 1e-12, "{at_s}");
            }
            other => panic!("{other:?}"),
        }
        // And back at full speed.
        e.set_profile(base);
        e.enqueue(job(1, 100, 4), 10.0);
        let ev = drain(&mut e);
        assert_eq!(ev[0], EngineEvent::FirstToken { idx: 1, at_s: 10.1 });
    }

    #[test]
    fn an_arrival_cuts_the_decode_run_at_the_next_step_boundary() {
        let mut e = ExpertEngine::new(profile(4, 10_000));
        e.enqueue(job(0, 100, 50), 0.0);
        let mut ev = Vec::new();
        e.complete_phase(&mut ev); // prefill ends at 0.1
        // Steps: 0.02101, 0.02102, ... An arrival at 0.13 lands in the second step
        // (0.12101 .. 0.14203): the run is cut after 2 steps.
        e.enqueue(job(1, 10, 5), 0.13);
        let cut = e.next_event_s().unwrap();
        assert!((cut - (0.1 + 0.02101 + 0.02102)).abs() < 1e-12, "{cut}");
        e.complete_phase(&mut ev);
        // Now request 1 prefills for 0.01 s.
        assert!((e.next_event_s().unwrap() - (cut + 0.01)).abs() < 1e-12);
        let mut seen = Vec::new();
        e.for_each_job(cut + 0.005, |j, admitted| {
            seen.push((j.idx, j.generated_tokens, admitted))
        });
        assert_eq!(seen, vec![(1, 0, true), (0, 3, true)]);
        let ev = drain(&mut e);
        assert_eq!(
            ev.iter()
                .filter(|x| matches!(x, EngineEvent::Completed { .. }))
                .count(),
            2
        );
    }

    #[test]
    fn slots_and_kv_hold_requests_back_in_fcfs_order() {
        let mut e = ExpertEngine::new(profile(2, 1_000));
        e.enqueue(job(0, 100, 10), 0.0);
        // Same instant as the prefill start: joins it (0.1 s + 0.1 s of prefill).
        e.enqueue(job(1, 100, 10), 0.0);
        e.enqueue(job(2, 100, 10), 0.0); // no third slot: waits
        assert_eq!(e.admitted(), 2);
        assert_eq!(e.in_flight(), 3);
        assert!((e.next_event_s().unwrap() - 0.2).abs() < 1e-12);
        // Arriving later, during the prefill: waits for the next boundary.
        let mut e2 = ExpertEngine::new(profile(4, 10_000));
        e2.enqueue(job(0, 100, 10), 0.0);
        e2.enqueue(job(1, 100, 10), 0.05);
        assert_eq!(e2.admitted(), 1);
        let mut ev = Vec::new();
        e2.complete_phase(&mut ev);
        assert_eq!(e2.admitted(), 2);
        // KV: a 900-token request does not fit beside two 110-token reservations.
        let mut e = ExpertEngine::new(profile(4, 1_000));
        e.enqueue(job(0, 100, 10), 0.0);
        e.enqueue(job(1, 800, 100), 0.0);
        e.enqueue(job(2, 10, 10), 0.0);
        e.complete_phase(&mut ev);
        assert_eq!(e.admitted(), 1, "head of line blocks the queue");
        drain(&mut e);
        assert!(e.is_idle());
        assert_eq!(e.kv_reserved(), 0);
    }

    #[test]
    fn the_read_only_views_show_the_phase_and_its_jobs() {
        let mut e = ExpertEngine::new(profile(4, 10_000));
        e.enqueue(job(0, 100, 4), 0.0);
        assert_eq!(e.decode_run(), None);
        assert_eq!(e.prefilling_jobs(), &[job(0, 100, 4)]);
        let mut ev = Vec::new();
        e.complete_phase(&mut ev);
        assert!(e.prefilling_jobs().is_empty());
        assert_eq!(e.decoding_jobs()[0].generated_tokens, 1);
        let run = e.decode_run().unwrap();
        assert_eq!(run.steps, 3);
        assert_eq!(run.step_end_s(0), 0.1);
        assert_eq!(Some(run.step_end_s(run.steps)), e.next_event_s());
        assert!((run.step_end_s(1) - (0.1 + 0.02 + 1e-5 * 101.0)).abs() < 1e-12);
    }

    #[test]
    fn steps_done_by_inverts_the_run_length() {
        for &(a, g) in &[(0.02, 0.0), (0.02, 1e-5), (0.013, 3e-4)] {
            for k in [0u64, 1, 2, 7, 100, 1234] {
                let t = decode_run_s(k, a, g);
                assert_eq!(steps_done_by(t, 10_000, a, g), k, "a {a} g {g} k {k}");
                if k > 0 {
                    assert_eq!(steps_done_by(t - 1e-9, 10_000, a, g), k - 1);
                }
            }
            assert_eq!(steps_done_by(1e9, 5, a, g), 5);
        }
    }
}
