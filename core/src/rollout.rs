//! Sampled futures of a cluster, played forward by the engine model: what the planner
//! ([`crate::planner`]) compares its candidate actions on.
//!
//! A [`Rollouts`] is built from what a policy sees (the cluster view, the arriving request,
//! the router's length distributions, quality estimates and recent arrivals), never from the
//! truth. For each sampled future it rebuilds every expert as an [`ExpertEngine`] (the
//! simulator's engine, not a second model) with sampled lengths, applies one candidate action
//! for the new request, routes the sampled arrivals with `qos-greedy` and drains. A future's
//! score is the QoS, at the router's predicted quality, of every request in the window: those
//! in flight, the new one and the sampled arrivals.
//!
//! What a future samples (one [`SimRng`] stream per future, shared by every action, so the
//! actions are compared on the same futures):
//! - each request in flight: its total length, drawn from the length distribution of its
//!   task on its expert conditioned on the tokens it has generated, capped at its
//!   `max_tokens` and at what the KV cache can hold beside its prompt;
//! - the new request: one uniform draw mapped through each expert's distribution (the same
//!   quantile wherever it goes), capped likewise;
//! - the next `horizon` arrivals: gaps bootstrapped from the gaps between recent arrivals,
//!   task, prompt, SLO and `max_tokens` from a recent arrival, and one uniform draw for the
//!   length on whichever expert `qos-greedy` gives it. Their predictions are the router's
//!   (mean length and quality of the task on each expert).

use crate::baselines::QosGreedy;
use crate::engine::{EngineEvent, ExpertEngine, Job};
use crate::forecast::remaining_prefill_s;
use crate::knowledge::Observed;
use crate::policy::Decision;
use crate::request::{ArrivingRequest, Prediction, Request};
use crate::rng::SimRng;
use crate::state::{ClusterState, ExpertState, InFlight};
use crate::task::Task;

/// One request of a rollout: what the router knows of it, and where it sits.
#[derive(Debug, Clone, Copy)]
struct Entry {
    arrival_s: f64,
    task: Task,
    prompt_tokens: u32,
    slo_s_per_token: f64,
    max_output_tokens: Option<u32>,
    /// The router's predicted length on its expert (what `qos-greedy` reads).
    predicted_output_tokens: f64,
    /// The router's predicted quality on its expert: what the request is worth if served
    /// within its SLO.
    quality: f64,
    /// Whether its QoS counts in the score (requests of other clients do not).
    counts: bool,
}

/// A request in flight at the decision, as the rollouts rebuild it.
#[derive(Debug, Clone, Copy)]
struct InFlightRef {
    expert: usize,
    entry: usize,
    running: bool,
    request: InFlight,
}

/// A sampled arrival: when, which recent arrival it copies, and the draw of its length.
#[derive(Debug, Clone, Copy)]
struct SampledArrival {
    at_s: f64,
    template: usize,
    length_draw: u64,
}

/// Per-decision tables and per-rollout buffers (reused between decisions).
#[derive(Debug, Default)]
pub struct Rollouts {
    entries: Vec<Entry>,
    in_flight: Vec<InFlightRef>,
    new_entry: usize,
    now_s: f64,
    /// Recent arrivals the future is bootstrapped from.
    templates: Vec<Request>,
    gaps: Vec<f64>,
    /// `[task][expert]`: the router's prediction for a sampled arrival.
    predictions: Vec<Vec<Prediction>>,
    // One future.
    base: Vec<ExpertEngine>,
    totals: Vec<u32>,
    new_draw: u64,
    arrivals: Vec<SampledArrival>,
    // One rollout.
    engines: Vec<ExpertEngine>,
    /// When each engine's current phase ends (infinity when idle), kept in step with
    /// `engines`.
    next_s: Vec<f64>,
    finish: Vec<(f64, u32)>,
    events: Vec<EngineEvent>,
    greedy: QosGreedy,
    view: ClusterState,
    arriving: ArrivingRequest,
    jobs: [Vec<Job>; 3],
}

/// Decode-state of one engine job at the decision: prefilling, decoding or waiting.
const PREFILLING: usize = 0;
const DECODING: usize = 1;
const WAITING: usize = 2;

impl Rollouts {
    /// Sets up the rollouts of one decision. `window` caps the recent arrivals the futures
    /// are bootstrapped from.
    pub fn prepare(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        observed: &Observed<'_>,
        window: usize,
    ) {
        self.now_s = state.now_s;
        self.entries.clear();
        self.in_flight.clear();
        for (e, expert) in state.experts.iter().enumerate() {
            let running = expert.running.iter().map(|r| (r, true));
            for (r, is_running) in running.chain(expert.waiting.iter().map(|w| (w, false))) {
                self.in_flight.push(InFlightRef {
                    expert: e,
                    entry: self.entries.len(),
                    running: is_running,
                    request: *r,
                });
                self.entries.push(Entry {
                    arrival_s: state.now_s - r.elapsed_s,
                    task: r.task,
                    prompt_tokens: r.prompt_tokens,
                    slo_s_per_token: r.slo_s_per_token,
                    max_output_tokens: r.max_output_tokens,
                    predicted_output_tokens: r.predicted_output_tokens,
                    quality: r.predicted_quality,
                    // Requests of other clients are shown with no quality: not ours to count.
                    counts: r.predicted_quality > 0.0,
                });
            }
        }
        let request = &arriving.request;
        self.new_entry = self.entries.len();
        self.entries.push(Entry {
            arrival_s: state.now_s,
            task: request.task,
            prompt_tokens: request.prompt_tokens,
            slo_s_per_token: request.slo_s_per_token,
            max_output_tokens: request.max_output_tokens,
            predicted_output_tokens: 1.0,
            quality: 0.0,
            counts: true,
        });
        let recent = observed.arrivals.requests();
        let skip = recent.len().saturating_sub(window.max(1));
        self.templates.clear();
        self.templates.extend(recent.iter().skip(skip).copied());
        self.gaps.clear();
        self.gaps.extend(
            self.templates
                .windows(2)
                .map(|w| (w[1].arrival_s - w[0].arrival_s).max(0.0)),
        );
        let experts = state.experts.len();
        self.predictions.resize_with(Task::COUNT, Vec::new);
        for task in Task::ALL {
            let row = &mut self.predictions[task.index()];
            row.clear();
            row.extend((0..experts).map(|e| {
                let mean = observed.lengths.mean_tokens(e, task);
                Prediction::point(mean, observed.quality.predicted_quality(e, task))
            }));
        }
        self.base.clear();
        self.base.extend(
            state
                .experts
                .iter()
                .map(|x| ExpertEngine::new(x.profile.clone())),
        );
        self.engines.clear();
        self.engines.extend(
            state
                .experts
                .iter()
                .map(|x| ExpertEngine::new(x.profile.clone())),
        );
        self.view.experts.clone_from(&state.experts);
        self.arriving.predictions.clear();
    }

    /// Arrivals a future can bootstrap (0 when fewer than two arrivals were observed).
    pub fn horizon_available(&self, horizon: usize) -> usize {
        if self.gaps.is_empty() { 0 } else { horizon }
    }

    /// Samples one future: the lengths of what is in flight and of the new request, and the
    /// next `horizon` arrivals.
    pub fn sample_future(
        &mut self,
        state: &ClusterState,
        observed: &Observed<'_>,
        horizon: usize,
        rng: &mut SimRng,
    ) {
        self.totals.clear();
        for r in &self.in_flight {
            let entry = &self.entries[r.entry];
            let generated = r.request.generated_tokens;
            let remaining = observed
                .lengths
                .sample_remaining(r.expert, entry.task, generated, rng);
            let total = generated.saturating_add(remaining);
            let kv_tokens = state.experts[r.expert].profile.kv_tokens;
            self.totals
                .push(cap_length(total, entry, kv_tokens).max(generated + 1));
        }
        self.new_draw = rng.next_u64();
        self.arrivals.clear();
        let horizon = self.horizon_available(horizon);
        let mut at = self.now_s;
        for _ in 0..horizon {
            at += self.gaps[rng.below(self.gaps.len() as u64) as usize];
            let template = rng.below(self.templates.len() as u64) as usize;
            self.arrivals.push(SampledArrival {
                at_s: at,
                template,
                length_draw: rng.next_u64(),
            });
        }
        for (e, base) in self.base.iter_mut().enumerate() {
            let expert = &state.experts[e];
            let latency = &expert.profile.latency;
            for jobs in &mut self.jobs {
                jobs.clear();
            }
            let mut prefill_left = 0.0;
            for (i, r) in self.in_flight.iter().enumerate() {
                if r.expert != e {
                    continue;
                }
                let entry = &self.entries[r.entry];
                let job = Job {
                    idx: r.entry,
                    prompt_tokens: entry.prompt_tokens,
                    output_tokens: self.totals[i],
                    generated_tokens: r.request.generated_tokens,
                };
                let kind = if !r.running {
                    WAITING
                } else if r.request.generated_tokens == 0 {
                    // The same prefill still ahead as the impact estimator's forecast counts.
                    prefill_left += remaining_prefill_s(latency, &r.request, true);
                    PREFILLING
                } else {
                    DECODING
                };
                self.jobs[kind].push(job);
            }
            let [prefilling, decoding, waiting] = &self.jobs;
            base.resume_into(
                self.now_s,
                prefilling.iter().copied(),
                prefill_left,
                decoding.iter().copied(),
                waiting.iter().copied(),
            );
        }
    }

    /// Plays the current future with `action` for the new request; returns the QoS of the
    /// window, minus `miss_cost` for each of its requests served over its SLO.
    pub fn play(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        observed: &Observed<'_>,
        action: Decision,
        miss_cost: f64,
    ) -> f64 {
        self.next_s.clear();
        for (engine, base) in self.engines.iter_mut().zip(&self.base) {
            engine.copy_from(base);
            self.next_s
                .push(engine.next_event_s().unwrap_or(f64::INFINITY));
        }
        self.finish.clear();
        self.finish
            .resize(self.entries.len() + self.arrivals.len(), (f64::NAN, 0));
        let n_fixed = self.entries.len();
        if let Decision::Route(e) = action
            && state.is_eligible(e, arriving.request.prompt_tokens)
        {
            let prediction = arriving.predictions.get(e).copied();
            let entry = &mut self.entries[self.new_entry];
            entry.predicted_output_tokens = prediction.map_or(1.0, |p| p.output_tokens);
            entry.quality = prediction.map_or(0.0, |p| p.quality);
            let total = draw_length(observed, e, entry, state, self.new_draw);
            self.engines[e].enqueue(
                Job {
                    idx: self.new_entry,
                    prompt_tokens: entry.prompt_tokens,
                    output_tokens: total,
                    generated_tokens: 0,
                },
                self.now_s,
            );
            self.next_s[e] = self.engines[e].next_event_s().unwrap_or(f64::INFINITY);
        } else {
            self.entries[self.new_entry].quality = 0.0;
        }
        // A rejected arrival earns nothing: only routed ones join the entries.
        for h in 0..self.arrivals.len() {
            let arrival = self.arrivals[h];
            self.advance_to(arrival.at_s);
            let template = self.templates[arrival.template];
            self.fill_view(arrival.at_s, state);
            self.arriving.request = Request {
                id: (n_fixed + h) as u64,
                arrival_s: arrival.at_s,
                ..template
            };
            self.arriving.predictions.clear();
            let cap = template
                .max_output_tokens
                .map_or(f64::INFINITY, |m| f64::from(m.max(1)));
            self.arriving.predictions.extend(
                self.predictions[template.task.index()]
                    .iter()
                    .map(|p| Prediction::point(p.output_tokens.min(cap), p.quality)),
            );
            let (decision, _) = self.greedy.choose(&self.view, &self.arriving);
            let Decision::Route(e) = decision else {
                continue;
            };
            let entry = Entry {
                arrival_s: arrival.at_s,
                task: template.task,
                prompt_tokens: template.prompt_tokens,
                slo_s_per_token: template.slo_s_per_token,
                max_output_tokens: template.max_output_tokens,
                predicted_output_tokens: self.arriving.predictions[e].output_tokens,
                quality: self.arriving.predictions[e].quality,
                counts: true,
            };
            let total = draw_length(observed, e, &entry, state, arrival.length_draw);
            self.entries.push(entry);
            let idx = self.entries.len() - 1;
            self.engines[e].enqueue(
                Job {
                    idx,
                    prompt_tokens: entry.prompt_tokens,
                    output_tokens: total,
                    generated_tokens: 0,
                },
                arrival.at_s,
            );
            self.next_s[e] = self.engines[e].next_event_s().unwrap_or(f64::INFINITY);
        }
        self.advance_to(f64::INFINITY);
        let mut score = 0.0;
        for (entry, &(finish_s, tokens)) in self.entries.iter().zip(&self.finish) {
            if entry.counts && !finish_s.is_nan() {
                let per_token = (finish_s - entry.arrival_s) / f64::from(tokens.max(1));
                if per_token < entry.slo_s_per_token {
                    score += entry.quality;
                } else {
                    score -= miss_cost;
                }
            }
        }
        self.entries.truncate(n_fixed);
        score
    }

    /// Processes every engine event up to `until_s` in time order (ties: the lowest expert),
    /// recording completions.
    fn advance_to(&mut self, until_s: f64) {
        loop {
            let mut next: Option<(usize, f64)> = None;
            for (e, &t) in self.next_s.iter().enumerate() {
                if t.is_finite() && t <= until_s && next.is_none_or(|(_, b)| t < b) {
                    next = Some((e, t));
                }
            }
            let Some((e, _)) = next else { return };
            self.events.clear();
            self.engines[e].complete_phase(&mut self.events);
            self.next_s[e] = self.engines[e].next_event_s().unwrap_or(f64::INFINITY);
            for event in &self.events {
                if let EngineEvent::Completed {
                    idx,
                    at_s,
                    output_tokens,
                } = *event
                    && let Some(f) = self.finish.get_mut(idx)
                {
                    *f = (at_s, output_tokens);
                }
            }
        }
    }

    /// The cluster as `qos-greedy` sees it at `now_s` in a rollout: each engine's admitted
    /// requests running, its queue waiting, with the router's predictions.
    fn fill_view(&mut self, now_s: f64, state: &ClusterState) {
        self.view.now_s = now_s;
        for ((engine, view), real) in self
            .engines
            .iter()
            .zip(&mut self.view.experts)
            .zip(&state.experts)
        {
            view.running.clear();
            view.waiting.clear();
            view.up = real.up;
            let prefill_started = engine.prefill_started_s();
            let entries = &self.entries;
            engine.for_each_job(now_s, |job, admitted| {
                let Some(entry) = entries.get(job.idx) else {
                    return;
                };
                let slot_elapsed = if admitted && job.generated_tokens == 0 {
                    prefill_started.map_or(0.0, |s| (now_s - s).max(0.0))
                } else {
                    0.0
                };
                let r = InFlight {
                    id: job.idx as u64,
                    task: entry.task,
                    prompt_tokens: entry.prompt_tokens,
                    predicted_output_tokens: entry.predicted_output_tokens,
                    generated_tokens: job.generated_tokens,
                    elapsed_s: (now_s - entry.arrival_s).max(0.0),
                    slot_elapsed_s: slot_elapsed,
                    predicted_quality: entry.quality,
                    slo_s_per_token: entry.slo_s_per_token,
                    max_output_tokens: entry.max_output_tokens,
                };
                if admitted {
                    view.running.push(r);
                } else {
                    view.waiting.push(r);
                }
            });
        }
    }
}

/// A length capped at the request's `max_tokens` and at what the KV cache holds beside its
/// prompt (as an engine would stop it), at least 1.
fn cap_length(total: u32, entry: &Entry, kv_tokens: u64) -> u32 {
    let kv_room = kv_tokens.saturating_sub(u64::from(entry.prompt_tokens));
    let mut t = u64::from(total).min(kv_room);
    if let Some(m) = entry.max_output_tokens {
        t = t.min(u64::from(m));
    }
    u32::try_from(t).unwrap_or(u32::MAX).max(1)
}

/// A request's total length on expert `e` from its own draw (the same draw maps to the same
/// quantile on every expert).
fn draw_length(
    observed: &Observed<'_>,
    e: usize,
    entry: &Entry,
    state: &ClusterState,
    draw: u64,
) -> u32 {
    let mut rng = SimRng::new(draw);
    let total = observed
        .lengths
        .sample_remaining(e, entry.task, 0, &mut rng);
    let kv_tokens = state
        .experts
        .get(e)
        .map_or(u64::MAX, |x: &ExpertState| x.profile.kv_tokens);
    cap_length(total, entry, kv_tokens)
}
