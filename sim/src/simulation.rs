//! The event loop: arrivals, decisions, engines, completions, predictors.
//!
//! Drive it one decision at a time ([`Simulation::next_decision`], then
//! [`Simulation::apply`]) or run a whole policy ([`Simulation::run`]). Engine events are
//! processed in global time order (ties: lowest expert index), so predictors learn from
//! completions in the order they happen, before any later decision.

use std::sync::Arc;

use qosroute_core::{
    ArrivalWindow, ArrivingRequest, Candidate, ClusterState, Decision, ExpertLedger, ExpertProfile,
    ExpertState, LedgerEntry, Observed, Policy, Prediction, Request, impact_of, qos,
};

use crate::catalogue::Catalogue;
use crate::engine::{EngineEvent, ExpertEngine, Job};
use crate::error::SimError;
use crate::metrics::{RunReport, makespan_s, summarise};
use crate::predict::{OutputLengthPredictor, Predictors, QualityPredictor};
use crate::quality::QualityTable;
pub use crate::record::RequestRecord;
use crate::workload::Workload;

/// The fault "slow but alive": expert `expert` runs `factor` times slower (prefill and decode)
/// from `from_s` until `until_s`, health intact. Phases that start in the window take the
/// slowed latencies; the phase in progress at each change keeps its end (phases last one
/// prefill or the decode steps until the next arrival or completion: milliseconds to a
/// second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slowdown {
    /// The slowed expert (catalogue index).
    pub expert: usize,
    /// How many times slower.
    pub factor: f64,
    /// When it slows down, seconds.
    pub from_s: f64,
    /// When it is back at full speed, seconds.
    pub until_s: f64,
    /// Whether the router's state shows the slowed latency model during the window (a router
    /// whose calibration noticed at once: the reference for online calibration) or keeps the
    /// profile's (a router that never notices).
    pub router_knows: bool,
}

/// A change of an expert's speed at a time.
#[derive(Debug, Clone)]
struct SpeedChange {
    at_s: f64,
    expert: usize,
    /// The profile the engine runs from then.
    engine: Arc<ExpertProfile>,
    /// The profile the router's state shows from then, when it changes.
    state: Option<Arc<ExpertProfile>>,
}

/// What one applied decision earned: the parts of the reward.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Step {
    /// QoS of every request completed since the previous decision.
    pub qos_completed: f64,
    /// QoS the action is predicted to destroy among requests on the chosen expert.
    pub predicted_qos_destroyed: f64,
    /// Whether the decision named an expert that could not take the request.
    pub invalid: bool,
}

impl Step {
    /// `qos_completed - predicted_qos_destroyed` (DESIGN §1).
    pub fn reward(&self) -> f64 {
        qosroute_core::reward(self.qos_completed, self.predicted_qos_destroyed)
    }
}

/// One simulation run of a workload on a catalogue.
#[derive(Debug)]
pub struct Simulation {
    catalogue_name: String,
    workload_spec: String,
    seed: u64,
    engines: Vec<ExpertEngine>,
    /// True quality per (request, expert), row-major.
    true_quality: Vec<f32>,
    records: Vec<RequestRecord>,
    predicted_output: Vec<f64>,
    predicted_quality: Vec<f64>,
    predictors: Predictors,
    next_arrival: usize,
    pending: bool,
    clock_s: f64,
    qos_since_decision: f64,
    invalid_decisions: u64,
    /// The router's book of each expert (what a router could know), from which the cluster
    /// state is built exactly as the daemon builds it.
    ledgers: Vec<ExpertLedger>,
    /// The arrivals shown to the policy so far (a bounded window).
    arrivals: ArrivalWindow,
    /// Scratch: tokens generated so far per request, filled at each snapshot.
    generated_now: Vec<u32>,
    state: ClusterState,
    arriving: ArrivingRequest,
    events: Vec<EngineEvent>,
    audit: bool,
    /// Speed changes still ahead, in time order.
    speed_changes: Vec<SpeedChange>,
}

impl Simulation {
    /// Sets up a run. Every expert's model must be a column of the quality table.
    pub fn new(
        catalogue: &Catalogue,
        quality: &QualityTable,
        workload: &Workload,
        seed: u64,
    ) -> Result<Self, SimError> {
        let mut model_cols = Vec::with_capacity(catalogue.experts.len());
        for e in &catalogue.experts {
            let col = quality.model_index(&e.model).ok_or_else(|| SimError::Invalid {
                path: quality.source.clone(),
                message: format!(
                    "expert `{}` serves model `{}`, which is not a column of the table (columns: {})",
                    e.name,
                    e.model,
                    quality.models.join(", ")
                ),
            })?;
            model_cols.push(col);
        }
        let n_experts = model_cols.len();
        let mut true_quality = Vec::with_capacity(workload.requests.len() * n_experts);
        let mut records = Vec::with_capacity(workload.requests.len());
        for (i, w) in workload.requests.iter().enumerate() {
            let row = quality.rows.get(w.quality_row).ok_or(SimError::Protocol(
                "workload refers to a row the quality table does not have",
            ))?;
            true_quality.extend(model_cols.iter().map(|&c| row.quality[c]));
            records.push(RequestRecord {
                request: Request {
                    id: i as u64,
                    arrival_s: w.arrival_s,
                    task: w.task,
                    prompt_tokens: w.prompt_tokens,
                    slo_s_per_token: catalogue.slo.slo_s_per_token(w.task),
                    max_output_tokens: None,
                },
                true_output_tokens: w.output_tokens.max(1),
                routed_to: None,
                quality: 0.0,
                first_token_s: f64::NAN,
                finish_s: f64::NAN,
                output_tokens: 0,
                qos: 0.0,
            });
        }
        let profiles: Vec<Arc<_>> = catalogue.experts.iter().cloned().map(Arc::new).collect();
        let priors = model_cols
            .iter()
            .map(|&c| quality.calibration_priors(c))
            .collect();
        Ok(Self {
            catalogue_name: catalogue.name.clone(),
            workload_spec: workload.spec.clone(),
            seed,
            engines: profiles.iter().cloned().map(ExpertEngine::new).collect(),
            ledgers: profiles
                .iter()
                .map(|p| ExpertLedger::new(p.max_slots, 0.0))
                .collect(),
            arrivals: ArrivalWindow::default(),
            generated_now: vec![0; records.len()],
            true_quality,
            predicted_output: vec![0.0; records.len()],
            predicted_quality: vec![0.0; records.len()],
            records,
            predictors: Predictors {
                output: OutputLengthPredictor::default(),
                quality: QualityPredictor::new(priors),
            },
            next_arrival: 0,
            pending: false,
            clock_s: 0.0,
            qos_since_decision: 0.0,
            invalid_decisions: 0,
            state: ClusterState {
                now_s: 0.0,
                experts: profiles.into_iter().map(ExpertState::idle).collect(),
            },
            arriving: ArrivingRequest {
                request: Request {
                    id: 0,
                    arrival_s: 0.0,
                    task: qosroute_core::Task::Chat,
                    prompt_tokens: 0,
                    slo_s_per_token: 1.0,
                    max_output_tokens: None,
                },
                predictions: Vec::with_capacity(n_experts),
            },
            events: Vec::new(),
            audit: false,
            speed_changes: Vec::new(),
        })
    }

    /// Slows an expert down for a while ([`Slowdown`]). Several may be given, for different
    /// experts or windows that do not overlap.
    pub fn with_slowdown(mut self, slowdown: Slowdown) -> Result<Self, SimError> {
        let Slowdown {
            expert,
            factor,
            from_s,
            until_s,
            router_knows,
        } = slowdown;
        let engine = self.engines.get(expert).ok_or(SimError::Protocol(
            "slowdown of an expert not in the catalogue",
        ))?;
        if !(factor.is_finite() && factor > 0.0 && from_s.is_finite() && until_s >= from_s) {
            return Err(SimError::Protocol(
                "slowdown: factor must be positive, from_s finite and until_s at least from_s",
            ));
        }
        let full = engine.profile().clone();
        let mut slow = (*full).clone();
        slow.latency = slow.latency.slowed(factor);
        let slow = Arc::new(slow);
        self.speed_changes.push(SpeedChange {
            at_s: from_s,
            expert,
            engine: slow.clone(),
            state: router_knows.then_some(slow),
        });
        self.speed_changes.push(SpeedChange {
            at_s: until_s,
            expert,
            engine: full.clone(),
            state: router_knows.then_some(full),
        });
        self.speed_changes.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        Ok(self)
    }

    /// Check every engine's invariants after each event (for tests; slows the run).
    pub fn with_audit(mut self, audit: bool) -> Self {
        self.audit = audit;
        self
    }

    /// Simulated time of the last processed event or arrival.
    pub fn clock_s(&self) -> f64 {
        self.clock_s
    }

    /// Every request's record so far.
    pub fn records(&self) -> &[RequestRecord] {
        &self.records
    }

    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.engines.len()
    }

    /// Processes every engine event up to and including `until_s`, in time order.
    fn advance_to(&mut self, until_s: f64) -> Result<(), SimError> {
        loop {
            let change_at = self
                .speed_changes
                .first()
                .map(|c| c.at_s)
                .filter(|&t| t <= until_s);
            let Some((e, t)) =
                qosroute_core::engine::next_event(&self.engines, change_at.unwrap_or(until_s))
            else {
                if change_at.is_none() {
                    return Ok(());
                }
                let change = self.speed_changes.remove(0);
                self.engines[change.expert].set_profile(change.engine);
                if let Some(profile) = change.state {
                    self.state.experts[change.expert].profile = profile;
                }
                continue;
            };
            if t < self.clock_s {
                return Err(SimError::Protocol("an engine event went back in time"));
            }
            self.clock_s = t;
            self.events.clear();
            self.engines[e].complete_phase(&mut self.events);
            for ev in std::mem::take(&mut self.events) {
                self.on_engine_event(e, ev);
            }
            if self.audit {
                self.engines[e]
                    .audit()
                    .map_err(|_| SimError::Protocol("engine invariant broken"))?;
            }
        }
    }

    fn on_engine_event(&mut self, e: usize, event: EngineEvent) {
        match event {
            EngineEvent::FirstToken { idx, at_s } => self.records[idx].first_token_s = at_s,
            EngineEvent::Completed {
                idx,
                at_s,
                output_tokens,
            } => {
                let r = &mut self.records[idx];
                r.finish_s = at_s;
                r.output_tokens = output_tokens;
                r.qos = qos(
                    r.quality,
                    r.per_token_latency_s(),
                    r.request.slo_s_per_token,
                );
                self.qos_since_decision += r.qos;
                let (task, quality) = (r.request.task, r.quality);
                self.predictors.output.observe(task, output_tokens);
                self.predictors.quality.observe(e, task, quality);
                self.ledgers[e].finish(idx as u64, at_s);
            }
        }
    }

    /// Advances to the next arrival and returns the state, the request to decide on and what
    /// the router has observed, or `None` when every request has been decided.
    #[allow(clippy::type_complexity)]
    pub fn next_decision(
        &mut self,
    ) -> Result<Option<(&ClusterState, &ArrivingRequest, Observed<'_>)>, SimError> {
        if self.pending {
            return Ok(Some((&self.state, &self.arriving, self.observed())));
        }
        let Some(record) = self.records.get(self.next_arrival) else {
            return Ok(None);
        };
        let request = record.request;
        self.advance_to(request.arrival_s)?;
        self.clock_s = self.clock_s.max(request.arrival_s);
        self.snapshot(request.arrival_s);
        self.arriving.request = request;
        self.predictors
            .predict_into(request.task, &mut self.arriving.predictions);
        self.arrivals.observe(&request);
        self.pending = true;
        Ok(Some((&self.state, &self.arriving, self.observed())))
    }

    /// What the router has observed: its predictors and the arrivals so far.
    fn observed(&self) -> Observed<'_> {
        Observed {
            lengths: &self.predictors,
            quality: &self.predictors,
            arrivals: &self.arrivals,
        }
    }

    /// Rebuilds the cluster state as of `now_s` (no engine event pending before it): the
    /// tokens each request has streamed back so far go into the router's ledgers, and the
    /// ledgers give the state ([`ExpertLedger::fill_expert_state`], as in the daemon).
    fn snapshot(&mut self, now_s: f64) {
        self.state.now_s = now_s;
        for ((engine, ledger), expert) in self
            .engines
            .iter()
            .zip(&mut self.ledgers)
            .zip(&mut self.state.experts)
        {
            let generated = &mut self.generated_now;
            engine.for_each_job(now_s, |job: &Job, _admitted| {
                generated[job.idx] = job.generated_tokens;
            });
            for entry in ledger.entries_mut() {
                entry.generated_tokens = generated[entry.id as usize];
            }
            ledger.fill_expert_state(expert, true, now_s, 0);
        }
    }

    /// Applies the decision for the request returned by the last `next_decision`. A route to
    /// an expert that cannot take the request counts as a rejection and is flagged invalid.
    pub fn apply(&mut self, decision: Decision) -> Result<Step, SimError> {
        if !self.pending {
            return Err(SimError::Protocol(
                "apply called without a pending decision",
            ));
        }
        self.pending = false;
        let idx = self.next_arrival;
        self.next_arrival += 1;
        let request = self.arriving.request;
        let mut step = Step {
            qos_completed: std::mem::take(&mut self.qos_since_decision),
            ..Step::default()
        };
        let target = match decision {
            Decision::Route(e) if self.state.is_eligible(e, request.prompt_tokens) => Some(e),
            Decision::Route(_) => {
                step.invalid = true;
                self.invalid_decisions += 1;
                None
            }
            Decision::Reject => None,
        };
        self.records[idx].routed_to = Some(target);
        let Some(e) = target else {
            return Ok(step);
        };
        let prediction: Prediction = self.arriving.predictions[e];
        step.predicted_qos_destroyed = impact_of(
            &self.state.experts[e],
            &Candidate {
                prompt_tokens: request.prompt_tokens,
                predicted_output_tokens: prediction.output_tokens,
                predicted_quality: prediction.quality,
                slo_s_per_token: request.slo_s_per_token,
            },
        )
        .predicted_qos_destroyed;
        self.predicted_output[idx] = prediction.output_tokens;
        self.predicted_quality[idx] = prediction.quality;
        self.ledgers[e].dispatch(
            LedgerEntry {
                id: request.id,
                task: request.task,
                prompt_tokens: request.prompt_tokens,
                predicted_output_tokens: prediction.output_tokens,
                predicted_quality: prediction.quality,
                slo_s_per_token: request.slo_s_per_token,
                max_output_tokens: request.max_output_tokens,
                arrived_s: request.arrival_s,
                dispatched_s: request.arrival_s,
                slot_since_s: None,
                first_token_s: None,
                generated_tokens: 0,
            },
            request.arrival_s,
        );
        let n_experts = self.engines.len();
        let record = &mut self.records[idx];
        record.quality = f64::from(self.true_quality[idx * n_experts + e]);
        // The engine cannot produce more tokens than its KV cache holds beside the prompt.
        let kv_room = self.engines[e].profile().kv_tokens - u64::from(request.prompt_tokens);
        let output_tokens = u64::from(record.true_output_tokens).min(kv_room) as u32;
        self.engines[e].enqueue(
            Job {
                idx,
                prompt_tokens: request.prompt_tokens,
                output_tokens,
                generated_tokens: 0,
            },
            request.arrival_s,
        );
        Ok(step)
    }

    /// Runs every remaining request through `policy` and drains the experts.
    pub fn run(mut self, policy: &mut dyn Policy) -> Result<RunReport, SimError> {
        while let Some((state, arriving, observed)) = self.next_decision()? {
            let decision = policy.decide(state, arriving, &observed);
            self.apply(decision)?;
        }
        self.finish(policy.name())
    }

    /// Lets every expert finish what it holds; requests not yet decided count as rejected.
    /// Afterwards [`Simulation::records`] are final. Returns the QoS of the requests completed
    /// since the last decision (the tail of the episode's reward).
    pub fn drain(&mut self) -> Result<f64, SimError> {
        if self.pending {
            return Err(SimError::Protocol("drain called with a decision pending"));
        }
        self.advance_to(f64::INFINITY)?;
        for r in &mut self.records[self.next_arrival..] {
            r.routed_to = Some(None);
        }
        self.next_arrival = self.records.len();
        Ok(std::mem::take(&mut self.qos_since_decision))
    }

    /// Drains the experts ([`Simulation::drain`]) and summarises the run.
    pub fn finish(mut self, policy: &str) -> Result<RunReport, SimError> {
        self.drain()?;
        let end_s = makespan_s(&self.records);
        let experts: Vec<_> = self
            .engines
            .iter()
            .map(|eng| (eng.profile().clone(), eng.busy_s(end_s)))
            .collect();
        Ok(summarise(
            policy,
            self.seed,
            &self.catalogue_name,
            &self.workload_spec,
            &self.records,
            &experts,
            self.invalid_decisions,
        ))
    }
}
