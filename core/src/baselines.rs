//! Hand-made routers: the baselines the learned policy is measured against.
//!
//! Every baseline only considers eligible experts (up, prompt fits) and breaks ties by the
//! lowest expert index, so runs are deterministic for a seed.

use crate::impact::{ActionImpact, Candidate, ImpactScratch, impact_of_with};
use crate::knowledge::Observed;
use crate::planner::{InvalidPlannerSpec, PLANNER_NAME, QosPlanner};
use crate::policy::{Decision, Policy};
use crate::request::{ArrivingRequest, Prediction};
use crate::rng::SimRng;
use crate::state::ClusterState;

/// Names of the baselines, in the order the CLI lists them.
pub const BASELINE_NAMES: [&str; 7] = [
    "random",
    "round-robin",
    "least-loaded",
    "p2c",
    "quality-greedy",
    "latency-greedy",
    "qos-greedy",
];

/// A policy specification nobody can build.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnknownPolicy {
    /// No policy has this name.
    #[error(
        "unknown policy `{0}` (known: random, round-robin, least-loaded, p2c, quality-greedy, latency-greedy, qos-greedy, qos-planner[:k=16,h=20,window=256,z=1,budget_ms=0,min_futures=4,drop_z=2,miss=0.2])"
    )]
    Name(String),
    /// `qos-planner` with parameters that cannot be used.
    #[error(transparent)]
    Planner(#[from] InvalidPlannerSpec),
}

/// Whether `spec` names the planner (`qos-planner` or `qos-planner:...`).
pub fn is_planner(spec: &str) -> bool {
    spec == PLANNER_NAME || spec.starts_with("qos-planner:")
}

/// The hand-made policy `name` (a baseline, or `qos-planner` with its parameters);
/// randomised ones draw from a stream seeded by `seed`.
pub fn baseline(name: &str, seed: u64) -> Result<Box<dyn Policy + Send>, UnknownPolicy> {
    if is_planner(name) {
        return Ok(Box::new(QosPlanner::from_spec(name, seed)?));
    }
    Ok(match name {
        "random" => Box::new(RandomPolicy::new(seed)),
        "round-robin" => Box::new(RoundRobin::default()),
        "least-loaded" => Box::new(LeastLoaded),
        "p2c" => Box::new(PowerOfTwoChoices::new(seed)),
        "quality-greedy" => Box::new(QualityGreedy),
        "latency-greedy" => Box::new(LatencyGreedy::default()),
        "qos-greedy" => Box::new(QosGreedy::default()),
        other => return Err(UnknownPolicy::Name(other.to_owned())),
    })
}

fn candidate(arriving: &ArrivingRequest, e: usize) -> Candidate {
    let p = arriving
        .predictions
        .get(e)
        .copied()
        .unwrap_or(Prediction::point(1.0, 0.0));
    Candidate {
        prompt_tokens: arriving.request.prompt_tokens,
        predicted_output_tokens: p.output_tokens,
        predicted_quality: p.quality,
        slo_s_per_token: arriving.request.slo_s_per_token,
    }
}

/// The eligible expert with the highest score (ties: lowest index), as a decision.
fn best_by(
    state: &ClusterState,
    arriving: &ArrivingRequest,
    mut score: impl FnMut(usize) -> f64,
) -> Option<(usize, f64)> {
    let mut best: Option<(usize, f64)> = None;
    for e in state.eligible(arriving.request.prompt_tokens) {
        let s = score(e);
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((e, s));
        }
    }
    best
}

fn route(best: Option<(usize, f64)>) -> Decision {
    best.map_or(Decision::Reject, |(e, _)| Decision::Route(e))
}

/// `random`: a uniformly random eligible expert.
#[derive(Debug, Clone)]
pub struct RandomPolicy {
    rng: SimRng,
    scratch: Vec<usize>,
}

impl RandomPolicy {
    /// Seeded random router.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SimRng::derive(seed, 0x5EED_0001),
            scratch: Vec::new(),
        }
    }
}

impl Policy for RandomPolicy {
    fn name(&self) -> &str {
        "random"
    }
    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        _observed: &Observed<'_>,
    ) -> Decision {
        self.scratch.clear();
        self.scratch
            .extend(state.eligible(arriving.request.prompt_tokens));
        let i = self.rng.below(self.scratch.len() as u64) as usize;
        self.scratch
            .get(i)
            .map_or(Decision::Reject, |&e| Decision::Route(e))
    }
}

/// `round-robin`: the next eligible expert after the one chosen last.
#[derive(Debug, Clone, Default)]
pub struct RoundRobin {
    next: usize,
}

impl Policy for RoundRobin {
    fn name(&self) -> &str {
        "round-robin"
    }
    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        _observed: &Observed<'_>,
    ) -> Decision {
        let n = state.experts.len();
        for k in 0..n {
            let e = (self.next + k) % n;
            if state.is_eligible(e, arriving.request.prompt_tokens) {
                self.next = (e + 1) % n;
                return Decision::Route(e);
            }
        }
        Decision::Reject
    }
}

/// `least-loaded`: the eligible expert with the fewest requests in flight (running + waiting).
#[derive(Debug, Clone, Copy, Default)]
pub struct LeastLoaded;

impl Policy for LeastLoaded {
    fn name(&self) -> &str {
        "least-loaded"
    }
    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        _observed: &Observed<'_>,
    ) -> Decision {
        route(best_by(state, arriving, |e| {
            -(state.experts[e].in_flight() as f64)
        }))
    }
}

/// `p2c`: power of two choices: two distinct random eligible experts, the one with fewer
/// requests in flight.
#[derive(Debug, Clone)]
pub struct PowerOfTwoChoices {
    rng: SimRng,
    scratch: Vec<usize>,
}

impl PowerOfTwoChoices {
    /// Seeded power-of-two-choices router.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SimRng::derive(seed, 0x5EED_0002),
            scratch: Vec::new(),
        }
    }
}

impl Policy for PowerOfTwoChoices {
    fn name(&self) -> &str {
        "p2c"
    }
    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        _observed: &Observed<'_>,
    ) -> Decision {
        self.scratch.clear();
        self.scratch
            .extend(state.eligible(arriving.request.prompt_tokens));
        let n = self.scratch.len() as u64;
        if n == 0 {
            return Decision::Reject;
        }
        let i = self.rng.below(n) as usize;
        if n == 1 {
            return Decision::Route(self.scratch[i]);
        }
        // A second, distinct choice: skip over the first.
        let j = (i + 1 + self.rng.below(n - 1) as usize) % n as usize;
        let (a, b) = (self.scratch[i], self.scratch[j]);
        if state.experts[b].in_flight() < state.experts[a].in_flight() {
            Decision::Route(b)
        } else {
            Decision::Route(a)
        }
    }
}

/// `quality-greedy`: the highest predicted quality for the request, ignoring load (the
/// Hybrid-LLM / RouteLLM family).
#[derive(Debug, Clone, Copy, Default)]
pub struct QualityGreedy;

impl Policy for QualityGreedy {
    fn name(&self) -> &str {
        "quality-greedy"
    }
    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        _observed: &Observed<'_>,
    ) -> Decision {
        route(best_by(state, arriving, |e| {
            candidate(arriving, e).predicted_quality
        }))
    }
}

/// `latency-greedy`: the lowest predicted per-token latency for the request itself.
#[derive(Debug, Clone, Default)]
pub struct LatencyGreedy {
    scratch: ImpactScratch,
}

impl Policy for LatencyGreedy {
    fn name(&self) -> &str {
        "latency-greedy"
    }
    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        _observed: &Observed<'_>,
    ) -> Decision {
        let scratch = &mut self.scratch;
        route(best_by(state, arriving, |e| {
            -impact_of_with(&state.experts[e], &candidate(arriving, e), scratch)
                .own
                .per_token_s
        }))
    }
}

/// `qos-greedy`: maximise predicted own QoS minus predicted QoS destroyed (the action impact
/// estimator); reject when no expert scores above zero.
#[derive(Debug, Clone, Default)]
pub struct QosGreedy {
    scratch: ImpactScratch,
}

impl QosGreedy {
    /// The one-step score of routing `arriving` to expert `e`: predicted own QoS minus
    /// predicted QoS destroyed.
    pub fn score(&mut self, state: &ClusterState, arriving: &ArrivingRequest, e: usize) -> f64 {
        let impact = self.impact(state, arriving, e);
        impact.own_predicted_qos - impact.predicted_qos_destroyed
    }

    /// The impact estimator's prediction of routing `arriving` to expert `e` (its buffers
    /// reused between calls).
    pub fn impact(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        e: usize,
    ) -> ActionImpact {
        impact_of_with(
            &state.experts[e],
            &candidate(arriving, e),
            &mut self.scratch,
        )
    }

    /// The decision and the best score (`None` when no expert is eligible).
    pub fn choose(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
    ) -> (Decision, Option<f64>) {
        let mut best: Option<(usize, f64)> = None;
        for e in state.eligible(arriving.request.prompt_tokens) {
            let s = self.score(state, arriving, e);
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((e, s));
            }
        }
        match best {
            Some((e, score)) if score > 0.0 => (Decision::Route(e), Some(score)),
            other => (Decision::Reject, other.map(|(_, s)| s)),
        }
    }
}

impl Policy for QosGreedy {
    fn name(&self) -> &str {
        "qos-greedy"
    }
    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        _observed: &Observed<'_>,
    ) -> Decision {
        self.choose(state, arriving).0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::expert::{ExpertProfile, LatencyModel};
    use crate::request::{Prediction, Request};
    use crate::state::{ExpertState, InFlight};
    use crate::task::Task;

    fn profile(name: &str, t0: f64, kv: u64) -> ExpertProfile {
        ExpertProfile {
            name: name.into(),
            model: "m".into(),
            hardware: String::new(),
            source: String::new(),
            max_slots: 8,
            kv_tokens: kv,
            latency: LatencyModel {
                prefill_tok_s: 1000.0,
                prefill_overhead_s: 0.0,
                decode_t0_s: t0,
                decode_d_s_per_seq: 0.001,
                decode_e_s_per_ctx_token: 1e-7,
            },
        }
    }

    fn busy(n: usize) -> Vec<InFlight> {
        (0..n)
            .map(|i| InFlight {
                id: i as u64,
                task: Task::Chat,
                prompt_tokens: 100,
                predicted_output_tokens: 100.0,
                generated_tokens: 10,
                elapsed_s: 0.5,
                slot_elapsed_s: 0.0,
                max_output_tokens: None,
                predicted_quality: 0.5,
                slo_s_per_token: 0.1,
            })
            .collect()
    }

    /// Expert 0: fast, 3 in flight, low quality; expert 1: slow, idle, high quality;
    /// expert 2: fast, 1 in flight, mid quality, tiny KV; expert 3: down.
    fn cluster() -> (ClusterState, ArrivingRequest) {
        let mut experts = vec![
            ExpertState::idle(Arc::new(profile("fast", 0.01, 100_000))),
            ExpertState::idle(Arc::new(profile("slow", 0.2, 100_000))),
            ExpertState::idle(Arc::new(profile("tiny", 0.01, 600))),
            ExpertState::idle(Arc::new(profile("down", 0.001, 100_000))),
        ];
        experts[0].running = busy(3);
        experts[2].running = busy(1);
        experts[3].up = false;
        let arriving = ArrivingRequest {
            request: Request {
                id: 99,
                arrival_s: 1.0,
                task: Task::Chat,
                prompt_tokens: 200,
                slo_s_per_token: 0.05,
                max_output_tokens: None,
            },
            predictions: vec![
                Prediction::point(100.0, 0.3),
                Prediction::point(100.0, 0.9),
                Prediction::point(100.0, 0.6),
                Prediction::point(100.0, 1.0),
            ],
        };
        (
            ClusterState {
                now_s: 1.0,
                experts,
            },
            arriving,
        )
    }

    fn decide(name: &str, seed: u64) -> Decision {
        let (s, a) = cluster();
        baseline(name, seed)
            .unwrap()
            .decide(&s, &a, &Observed::nothing())
    }

    #[test]
    fn each_baseline_makes_its_documented_choice() {
        assert_eq!(decide("least-loaded", 0), Decision::Route(1));
        assert_eq!(
            decide("quality-greedy", 0),
            Decision::Route(1),
            "down expert 3 is masked"
        );
        assert_eq!(decide("latency-greedy", 0), Decision::Route(2));
        // The slow expert misses the 0.05 s/token SLO, so qos-greedy takes the best quality
        // that meets it: expert 2 (0.6) over expert 0 (0.3).
        assert_eq!(decide("qos-greedy", 0), Decision::Route(2));
    }

    #[test]
    fn round_robin_cycles_over_eligible_experts() {
        let (s, a) = cluster();
        let mut p = baseline("round-robin", 0).unwrap();
        let picks: Vec<_> = (0..4)
            .map(|_| p.decide(&s, &a, &Observed::nothing()))
            .collect();
        use Decision::Route;
        assert_eq!(picks, vec![Route(0), Route(1), Route(2), Route(0)]);
    }

    #[test]
    fn randomised_baselines_never_pick_an_ineligible_expert() {
        let (mut s, mut a) = cluster();
        a.request.prompt_tokens = 700; // no longer fits expert 2's KV
        for name in ["random", "p2c"] {
            let mut p = baseline(name, 5).unwrap();
            let mut seen = [0u32; 4];
            for _ in 0..200 {
                match p.decide(&s, &a, &Observed::nothing()) {
                    Decision::Route(e) => seen[e] += 1,
                    Decision::Reject => panic!("{name} rejected with eligible experts"),
                }
            }
            assert_eq!(seen[2] + seen[3], 0, "{name}: {seen:?}");
            if name == "random" {
                assert!(seen[0] > 50 && seen[1] > 50, "{name}: {seen:?}");
            }
        }
        // p2c between experts 0 (3 in flight) and 1 (idle) must always pick 1.
        let mut p = baseline("p2c", 5).unwrap();
        assert!((0..50).all(|_| p.decide(&s, &a, &Observed::nothing()) == Decision::Route(1)));
        for e in &mut s.experts {
            e.up = false;
        }
        for name in BASELINE_NAMES {
            assert_eq!(
                baseline(name, 1)
                    .unwrap()
                    .decide(&s, &a, &Observed::nothing()),
                Decision::Reject,
                "{name}"
            );
        }
    }

    #[test]
    fn qos_greedy_rejects_when_nothing_scores_positive() {
        let (s, mut a) = cluster();
        a.request.slo_s_per_token = 1e-4; // unreachable everywhere
        assert_eq!(
            baseline("qos-greedy", 0)
                .unwrap()
                .decide(&s, &a, &Observed::nothing()),
            Decision::Reject
        );
        assert!(baseline("nope", 0).is_err());
    }
}
