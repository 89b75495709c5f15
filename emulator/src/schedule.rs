//! [`TokenSchedule`]: the simulator's [`ExpertEngine`] read out token by token, with no I/O
//! and no clock of its own. The real-time driver feeds it arrivals at their times and asks
//! it, at any time, which tokens of which requests are due.
//!
//! The engine reports phases (a prefill, a decode run of `n` steps); inside a decode run step
//! `k` ends at `start + k*a + g*k*(k-1)/2` ([`qosroute_sim::engine::DecodeRun::step_end_s`])
//! and every decoding request gains one token then. So a request's first token is due at the
//! end of its prefill, and its later tokens at the ends of the decode steps, exactly when the
//! step-by-step engine model produces them.

use std::collections::BTreeMap;
use std::sync::Arc;

use qosroute_core::ExpertProfile;
use qosroute_sim::engine::{EngineEvent, ExpertEngine, Job};

/// Identifies a request on one [`TokenSchedule`] (the engine's `Job::idx`).
pub type RequestKey = usize;

/// Something due for one request: its tokens so far, and the end when it is complete.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Delivery {
    /// The request.
    pub request: RequestKey,
    /// Tokens produced so far (cumulative; never decreases for a request).
    pub tokens: u32,
    /// When the latest of these tokens was produced, engine seconds.
    pub at_s: f64,
    /// Set on the request's last delivery.
    pub finished: Option<Finished>,
}

/// The life of a completed request on the engine, engine seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Finished {
    /// When it arrived.
    pub arrival_s: f64,
    /// When the engine admitted it (start of its prefill).
    pub admitted_s: f64,
    /// When its first token was produced (end of its prefill).
    pub first_token_s: f64,
    /// When its last token was produced.
    pub finish_s: f64,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens produced.
    pub output_tokens: u32,
}

/// The load of the engine, as a vLLM server reports it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineLoad {
    /// Requests admitted (prefilling or decoding).
    pub running: usize,
    /// Requests queued, not yet admitted.
    pub waiting: usize,
    /// KV tokens reserved by admitted requests (prompt plus full output each).
    pub kv_reserved: u64,
}

#[derive(Debug, Clone, Copy)]
struct Progress {
    arrival_s: f64,
    admitted_s: Option<f64>,
    first_token_s: Option<f64>,
    prompt_tokens: u32,
}

/// Why a request cannot be put on the engine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unservable {
    /// The prompt leaves no room for one output token in the KV cache.
    #[error("the prompt ({prompt_tokens} tokens) does not fit the KV cache ({kv_tokens} tokens)")]
    PromptTooLong {
        /// Prompt tokens asked for.
        prompt_tokens: u32,
        /// The expert's KV capacity.
        kv_tokens: u64,
    },
    /// Zero output tokens.
    #[error("a request must produce at least one output token")]
    NoOutput,
}

/// The output tokens an expert produces for a request that asks for `output_tokens`: at most
/// what its KV cache leaves beside the prompt (as the simulator limits it).
pub fn servable_output(
    profile: &ExpertProfile,
    prompt_tokens: u32,
    output_tokens: u32,
) -> Result<u32, Unservable> {
    let kv_tokens = profile.kv_tokens;
    if !profile.fits_prompt(prompt_tokens) {
        return Err(Unservable::PromptTooLong {
            prompt_tokens,
            kv_tokens,
        });
    }
    if output_tokens == 0 {
        return Err(Unservable::NoOutput);
    }
    let room = kv_tokens - u64::from(prompt_tokens);
    Ok(u32::try_from(u64::from(output_tokens).min(room)).unwrap_or(u32::MAX))
}

/// The engine of one expert read out token by token (see the module docs).
#[derive(Debug, Clone)]
pub struct TokenSchedule {
    engine: ExpertEngine,
    requests: BTreeMap<RequestKey, Progress>,
    next_key: RequestKey,
    /// Steps of the current decode run already delivered (the last step of a run is delivered
    /// with the phase end).
    run_steps_delivered: u64,
    /// Everything up to this time has been delivered.
    now_s: f64,
    events: Vec<EngineEvent>,
}

impl TokenSchedule {
    /// An idle engine for `profile` at time 0.
    pub fn new(profile: Arc<ExpertProfile>) -> Self {
        Self {
            engine: ExpertEngine::new(profile),
            requests: BTreeMap::new(),
            next_key: 0,
            run_steps_delivered: 0,
            now_s: 0.0,
            events: Vec::new(),
        }
    }

    /// The expert's profile.
    pub fn profile(&self) -> &Arc<ExpertProfile> {
        self.engine.profile()
    }

    /// The time up to which everything has been delivered.
    pub fn now_s(&self) -> f64 {
        self.now_s
    }

    /// A request arrives at `now_s` (clamped to [`Self::now_s`] if earlier): everything due
    /// before it is delivered to `out` first, then it is queued. `output_tokens` is limited
    /// as by [`servable_output`].
    pub fn arrive(
        &mut self,
        now_s: f64,
        prompt_tokens: u32,
        output_tokens: u32,
        out: &mut Vec<Delivery>,
    ) -> Result<RequestKey, Unservable> {
        let output_tokens = servable_output(self.profile(), prompt_tokens, output_tokens)?;
        self.advance(now_s, out);
        let key = self.next_key;
        self.next_key += 1;
        self.requests.insert(
            key,
            Progress {
                arrival_s: self.now_s,
                admitted_s: None,
                first_token_s: None,
                prompt_tokens,
            },
        );
        self.engine.enqueue(
            Job {
                idx: key,
                prompt_tokens,
                output_tokens,
                generated_tokens: 0,
            },
            self.now_s,
        );
        self.note_admissions();
        Ok(key)
    }

    /// When the next token (or phase end) is due, if anything runs.
    pub fn next_due_s(&self) -> Option<f64> {
        let next_step = self
            .engine
            .decode_run()
            .filter(|run| self.run_steps_delivered + 1 < run.steps)
            .map(|run| run.step_end_s(self.run_steps_delivered + 1));
        next_step.or_else(|| self.engine.next_event_s())
    }

    /// Delivers to `out` every token due at or before `now_s`, in time order, completing the
    /// engine's phases as they end. Times earlier than [`Self::now_s`] change nothing.
    pub fn advance(&mut self, now_s: f64, out: &mut Vec<Delivery>) {
        let now_s = if now_s.is_nan() {
            self.now_s
        } else {
            now_s.max(self.now_s)
        };
        loop {
            // Intermediate steps of the current decode run (all before its end).
            if let Some(run) = self.engine.decode_run() {
                let mut k = self.run_steps_delivered;
                while k + 1 < run.steps && run.step_end_s(k + 1) <= now_s {
                    k += 1;
                }
                if k > self.run_steps_delivered {
                    self.run_steps_delivered = k;
                    let steps = u32::try_from(k).unwrap_or(u32::MAX);
                    let at_s = run.step_end_s(k);
                    for job in self.engine.decoding_jobs() {
                        out.push(Delivery {
                            request: job.idx,
                            tokens: job.generated_tokens.saturating_add(steps),
                            at_s,
                            finished: None,
                        });
                    }
                }
            }
            match self.engine.next_event_s() {
                Some(end_s) if end_s <= now_s => self.complete_phase(end_s, out),
                _ => break,
            }
        }
        self.now_s = now_s;
    }

    fn complete_phase(&mut self, end_s: f64, out: &mut Vec<Delivery>) {
        // Tokens of requests that keep decoding after a decode run ends.
        let run_steps = self.engine.decode_run().map(|run| run.steps);
        let mut events = std::mem::take(&mut self.events);
        self.engine.complete_phase(&mut events);
        self.run_steps_delivered = 0;
        self.now_s = end_s;
        for event in events.drain(..) {
            match event {
                EngineEvent::FirstToken { idx, at_s } => {
                    if let Some(p) = self.requests.get_mut(&idx) {
                        p.first_token_s = Some(at_s);
                    }
                    out.push(Delivery {
                        request: idx,
                        tokens: 1,
                        at_s,
                        finished: None,
                    });
                }
                EngineEvent::Completed {
                    idx,
                    at_s,
                    output_tokens,
                } => {
                    let finished = self.requests.remove(&idx).map(|p| Finished {
                        arrival_s: p.arrival_s,
                        admitted_s: p.admitted_s.unwrap_or(p.arrival_s),
                        first_token_s: p.first_token_s.unwrap_or(at_s),
                        finish_s: at_s,
                        prompt_tokens: p.prompt_tokens,
                        output_tokens,
                    });
                    out.push(Delivery {
                        request: idx,
                        tokens: output_tokens,
                        at_s,
                        finished,
                    });
                }
            }
        }
        self.events = events;
        if run_steps.is_some() {
            // The run's last step also ended for the requests still decoding.
            for job in self.engine.decoding_jobs() {
                out.push(Delivery {
                    request: job.idx,
                    tokens: job.generated_tokens,
                    at_s: end_s,
                    finished: None,
                });
            }
        }
        self.note_admissions();
    }

    /// Admissions happen when a request is queued on an idle engine (or joins a prefill that
    /// starts at that instant) and at phase boundaries: the current time is the admission time.
    fn note_admissions(&mut self) {
        for job in self.engine.prefilling_jobs() {
            if let Some(p) = self.requests.get_mut(&job.idx)
                && p.admitted_s.is_none()
            {
                p.admitted_s = Some(self.now_s);
            }
        }
    }

    /// Requests running and waiting, and the KV tokens reserved.
    pub fn load(&self) -> EngineLoad {
        let running = self.engine.admitted();
        EngineLoad {
            running,
            waiting: self.engine.in_flight() - running,
            kv_reserved: self.engine.kv_reserved(),
        }
    }

    /// Requests on the engine (running or waiting).
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use proptest::prelude::*;
    use qosroute_core::LatencyModel;

    use super::*;

    fn profile(slots: u32, kv: u64, latency: LatencyModel) -> Arc<ExpertProfile> {
        Arc::new(ExpertProfile {
            name: "e".into(),
            model: "m".into(),
            hardware: String::new(),
            source: String::new(),
            max_slots: slots,
            kv_tokens: kv,
            latency,
        })
    }

    fn simple() -> Arc<ExpertProfile> {
        profile(
            4,
            10_000,
            LatencyModel {
                prefill_tok_s: 1000.0,
                prefill_overhead_s: 0.0,
                decode_t0_s: 0.02,
                decode_d_s_per_seq: 0.002,
                decode_e_s_per_ctx_token: 1e-5,
            },
        )
    }

    /// Runs `arrivals` (time, prompt, output) to the end like the real-time driver: waking at
    /// every due time, plus at the extra `polls` times (spurious wake-ups); the time of every
    /// token of every request, as delivered.
    fn token_times(
        profile: Arc<ExpertProfile>,
        arrivals: &[(f64, u32, u32)],
        polls: &[f64],
    ) -> Vec<Vec<f64>> {
        let mut s = TokenSchedule::new(profile);
        let mut times = vec![Vec::new(); arrivals.len()];
        let mut out = Vec::new();
        let mut polls = polls.to_vec();
        polls.sort_by(f64::total_cmp);
        let mut polls = polls.into_iter().peekable();
        let mut record = |out: &mut Vec<Delivery>| {
            for d in out.drain(..) {
                let t: &mut Vec<f64> = &mut times[d.request];
                assert!(d.tokens as usize >= t.len(), "tokens went backwards");
                while t.len() < d.tokens as usize {
                    t.push(d.at_s);
                }
            }
        };
        let mut next_arrival = 0;
        loop {
            let due = s.next_due_s().unwrap_or(f64::INFINITY);
            let poll = polls.peek().copied().unwrap_or(f64::INFINITY);
            let arrival = arrivals.get(next_arrival).map_or(f64::INFINITY, |a| a.0);
            if due.is_infinite() && arrival.is_infinite() {
                break;
            }
            if poll < due && poll < arrival {
                polls.next();
                s.advance(poll, &mut out);
            } else if due < arrival {
                s.advance(due, &mut out);
            } else {
                let (at, p, d) = arrivals[next_arrival];
                next_arrival += 1;
                s.arrive(at, p, d, &mut out).unwrap();
            }
            record(&mut out);
        }
        assert_eq!(s.in_flight(), 0);
        times
    }

    /// Every token's time, one decode step at a time under the engine's rules (admission at
    /// iteration boundaries, FCFS, slots and KV reservation, prefill-prioritised iterations).
    fn reference(profile: &ExpertProfile, jobs: &[(f64, u32, u32)]) -> Vec<Vec<f64>> {
        let l = &profile.latency;
        let mut out = vec![Vec::new(); jobs.len()];
        let (mut t, mut next) = (0.0f64, 0usize);
        let mut waiting: VecDeque<usize> = VecDeque::new();
        let mut decoding: Vec<usize> = Vec::new();
        let mut kv: u64 = 0;
        let need = |i: usize| u64::from(jobs[i].1) + u64::from(jobs[i].2);
        loop {
            while next < jobs.len() && jobs[next].0 <= t {
                waiting.push_back(next);
                next += 1;
            }
            let mut prefill = Vec::new();
            while let Some(&i) = waiting.front() {
                if decoding.len() + prefill.len() < profile.max_slots as usize
                    && kv + need(i) <= profile.kv_tokens
                {
                    waiting.pop_front();
                    kv += need(i);
                    prefill.push(i);
                } else {
                    break;
                }
            }
            if !prefill.is_empty() {
                let tokens: u64 = prefill.iter().map(|&i| u64::from(jobs[i].1)).sum();
                t += l.prefill_s(tokens as f64);
                for i in prefill {
                    out[i].push(t);
                    if jobs[i].2 <= 1 {
                        kv -= need(i);
                    } else {
                        decoding.push(i);
                    }
                }
            } else if !decoding.is_empty() {
                let context: u64 = decoding
                    .iter()
                    .map(|&i| u64::from(jobs[i].1) + out[i].len() as u64)
                    .sum();
                t += l.decode_step_s(decoding.len() as f64, context as f64);
                for &i in &decoding {
                    out[i].push(t);
                }
                decoding.retain(|&i| {
                    let done = out[i].len() as u32 >= jobs[i].2;
                    if done {
                        kv -= need(i);
                    }
                    !done
                });
            } else if next < jobs.len() {
                t = jobs[next].0;
            } else {
                return out;
            }
        }
    }

    #[test]
    fn a_lone_request_gets_its_first_token_after_prefill_then_one_per_step() {
        let times = token_times(simple(), &[(0.0, 100, 4)], &[]);
        let t = &times[0];
        assert_eq!(t.len(), 4);
        assert_eq!(t[0], 0.1);
        // Steps with context 101, 102, 103: 0.02 + 1e-5 * C each.
        let mut want = 0.1;
        for (k, c) in [101.0, 102.0, 103.0].iter().enumerate() {
            want += 0.02 + 1e-5 * c;
            assert!(
                (t[k + 1] - want).abs() < 1e-12,
                "token {}: {}",
                k + 1,
                t[k + 1]
            );
        }
    }

    #[test]
    fn finished_reports_queueing_admission_and_first_token() {
        let mut s = TokenSchedule::new(profile(
            1,
            10_000,
            LatencyModel {
                prefill_tok_s: 1000.0,
                prefill_overhead_s: 0.0,
                decode_t0_s: 0.02,
                decode_d_s_per_seq: 0.0,
                decode_e_s_per_ctx_token: 0.0,
            },
        ));
        let mut out = Vec::new();
        let a = s.arrive(0.0, 100, 3, &mut out).unwrap();
        let b = s.arrive(0.05, 200, 2, &mut out).unwrap();
        assert_eq!(
            s.load(),
            EngineLoad {
                running: 1,
                waiting: 1,
                kv_reserved: 103
            }
        );
        while let Some(t) = s.next_due_s() {
            s.advance(t, &mut out);
        }
        let finished: Vec<(RequestKey, Finished)> = out
            .iter()
            .filter_map(|d| d.finished.map(|f| (d.request, f)))
            .collect();
        assert_eq!(finished.len(), 2);
        let (ka, fa) = finished[0];
        assert_eq!(ka, a);
        assert_eq!(
            (fa.arrival_s, fa.admitted_s, fa.first_token_s),
            (0.0, 0.0, 0.1)
        );
        assert!((fa.finish_s - 0.14).abs() < 1e-12);
        let (kb, fb) = finished[1];
        assert_eq!(kb, b);
        assert_eq!(fb.arrival_s, 0.05);
        assert!(
            (fb.admitted_s - 0.14).abs() < 1e-12,
            "waits for the only slot"
        );
        assert!((fb.first_token_s - 0.34).abs() < 1e-12);
        assert_eq!((fb.prompt_tokens, fb.output_tokens), (200, 2));
        assert_eq!(s.load(), EngineLoad::default());
    }

    #[test]
    fn unservable_requests_are_refused_and_outputs_limited_by_the_kv_cache() {
        let p = profile(2, 1000, simple().latency);
        assert_eq!(
            servable_output(&p, 1000, 5),
            Err(Unservable::PromptTooLong {
                prompt_tokens: 1000,
                kv_tokens: 1000
            })
        );
        assert_eq!(servable_output(&p, 10, 0), Err(Unservable::NoOutput));
        assert_eq!(servable_output(&p, 900, 500), Ok(100));
        assert_eq!(servable_output(&p, 900, 50), Ok(50));
    }

    #[test]
    fn late_or_early_polls_do_not_change_token_times() {
        let arrivals = [(0.0, 50, 20), (0.03, 80, 5), (0.031, 10, 30)];
        let base = token_times(simple(), &arrivals, &[]);
        let polled = token_times(simple(), &arrivals, &[0.001, 0.07, 0.0700001, 0.2, 0.5]);
        assert_eq!(base, polled);
    }

    fn latency_strategy() -> impl Strategy<Value = LatencyModel> {
        (
            100.0f64..5000.0,
            0.005f64..0.05,
            0.0f64..0.005,
            0.0f64..1e-4,
        )
            .prop_map(|(pf, t0, d, e)| LatencyModel {
                prefill_tok_s: pf,
                prefill_overhead_s: 0.0,
                decode_t0_s: t0,
                decode_d_s_per_seq: d,
                decode_e_s_per_ctx_token: e,
            })
    }

    fn arrivals_strategy(kv: u64) -> impl Strategy<Value = Vec<(f64, u32, u32)>> {
        let gap = prop_oneof![1 => Just(0.0f64), 4 => 0.0f64..0.4];
        prop::collection::vec((gap, 1u32..250, 1u32..60), 1..25).prop_map(move |raw| {
            let mut t = 0.0;
            raw.into_iter()
                .map(|(g, p, d)| {
                    t += g;
                    let p = p.min(kv as u32 - 1);
                    let d = d.min((kv - u64::from(p)) as u32);
                    (t, p, d)
                })
                .collect()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Every token of every request is delivered at the time the step-by-step engine model
        /// produces it, however often the driver polls.
        #[test]
        fn every_token_is_due_when_the_step_model_produces_it(
            (slots, kv, latency, arrivals, polls) in (1u32..5, 300u64..3000, latency_strategy())
                .prop_flat_map(|(slots, kv, latency)| {
                    (Just(slots), Just(kv), Just(latency), arrivals_strategy(kv),
                     prop::collection::vec(0.0f64..12.0, 0..30))
                })
        ) {
            let profile = profile(slots, kv, latency);
            let want = reference(&profile, &arrivals);
            let got = token_times(profile, &arrivals, &polls);
            for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                prop_assert_eq!(w.len(), g.len(), "request {} token count", i);
                for (k, (a, b)) in w.iter().zip(g).enumerate() {
                    let tol = 1e-9 * (1.0 + a.abs());
                    prop_assert!((a - b).abs() <= tol, "request {} token {}: reference {} schedule {}", i, k, a, b);
                }
            }
        }
    }
}
