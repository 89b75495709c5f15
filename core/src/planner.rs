//! `qos-planner`: a non-clairvoyant Monte-Carlo router that looks ahead.
//!
//! `qos-greedy` scores each expert by the impact estimator's one-step prediction. The planner
//! compares the actions by their consequences instead: for each eligible expert and for
//! reject, it plays `futures` sampled futures forward with the engine model
//! ([`crate::rollout`]): the lengths of the requests in flight drawn from the router's length
//! distributions (conditioned on the tokens they have generated), the next `horizon` arrivals
//! bootstrapped from the last `window` observed, each routed by `qos-greedy`, then a drain.
//! Every action is played on the same futures (common random numbers), and scored by the QoS
//! of the requests in the window.
//!
//! The rule: take the action with the best mean score, but only where its paired gain over
//! `qos-greedy`'s own choice is larger than `noise_z` standard errors of that gain; ties and
//! differences within the sampling noise go to `qos-greedy`. With few futures a planner that
//! took the raw best mean was worse than `qos-greedy` (sampling noise); this rule keeps it at
//! `qos-greedy` unless the evidence says otherwise.
//!
//! It reads only what every policy reads ([`ClusterState`], [`ArrivingRequest`],
//! [`Observed`]); nothing of the truth. A run is deterministic for a seed unless a time
//! budget is set: then the number of futures depends on the machine's speed. When the budget
//! runs out it decides on the futures played so far if there are at least `min_futures`,
//! else falls back to `qos-greedy`; [`PlannerStats`] counts both.
//!
//! Racing keeps the cost down: once every action has played `min_futures` futures, an action
//! whose paired gain over `qos-greedy` is below zero by more than `drop_z` standard errors
//! stops playing (it could not be chosen but by a long streak of luck).
//!
//! As a teacher (the learned router's expert iteration), [`QosPlanner::evaluate`] gives the
//! value of every action, not only the choice.

use std::time::{Duration, Instant};

use crate::baselines::QosGreedy;
use crate::knowledge::Observed;
use crate::policy::{Decision, Policy};
use crate::request::ArrivingRequest;
use crate::rng::SimRng;
use crate::rollout::Rollouts;
use crate::state::ClusterState;

/// The planner's name, as the CLI and the daemon's config spell it.
pub const PLANNER_NAME: &str = "qos-planner";

/// Every parameter of the planner, in one place.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannerConfig {
    /// Futures sampled per decision (`k`).
    pub futures: usize,
    /// Arrivals sampled into each future (`h`); 0 looks at the requests in flight only.
    pub horizon: usize,
    /// Recent arrivals the futures are bootstrapped from (`window`).
    pub window: usize,
    /// Standard errors by which an action's paired gain over `qos-greedy` must exceed zero
    /// for the planner to leave `qos-greedy`'s choice (`z`).
    pub noise_z: f64,
    /// Wall-clock budget of one decision (`budget_ms`); `None`: no budget, deterministic.
    pub budget: Option<Duration>,
    /// Futures needed to decide when the budget runs out; fewer: `qos-greedy` decides
    /// (`min_futures`). Also the futures every action plays before it may be dropped.
    pub min_futures: usize,
    /// Racing: once an action has played `min_futures` futures, it stops playing when its
    /// paired gain over `qos-greedy`'s choice is below zero by more than `drop_z` standard
    /// errors (it could no longer be chosen but by a long streak of luck); 0 plays every
    /// action to the end (`drop_z`).
    pub drop_z: f64,
    /// What serving a request over its SLO costs in the score, in QoS units (`miss`). With 0
    /// (QoS alone) the planner, under overload, served requests with a fair chance of missing:
    /// more SLO violations than `qos-greedy` (paper-3x7b at 4 req/s: 48 % against 44 %) and
    /// queues that starved a few requests for minutes. A request served late holds capacity
    /// that the rollouts' horizon does not fully charge for. 0.2 was chosen on workload seeds
    /// 4-6 (the evaluation uses 1-3): it gave the most QoS on the two heaviest scenarios and
    /// the fewest violations (`docs/planner.md`).
    pub miss_cost: f64,
}

impl Default for PlannerConfig {
    fn default() -> Self {
        Self {
            futures: 16,
            horizon: 20,
            window: 256,
            noise_z: 1.0,
            budget: None,
            min_futures: 4,
            drop_z: 2.0,
            miss_cost: 0.2,
        }
    }
}

/// A planner specification that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("policy `{spec}`: {problem}")]
pub struct InvalidPlannerSpec {
    /// The specification as written.
    pub spec: String,
    /// What is wrong with it.
    pub problem: String,
}

impl PlannerConfig {
    /// Parses `qos-planner` or
    /// `qos-planner:k=16,h=20,window=256,z=1,budget_ms=5,min_futures=4,drop_z=2,miss=0.2`
    /// (any subset, any order; unnamed parameters keep their defaults).
    pub fn parse(spec: &str) -> Result<Self, InvalidPlannerSpec> {
        let bad = |problem: String| InvalidPlannerSpec {
            spec: spec.to_owned(),
            problem,
        };
        let rest = spec
            .strip_prefix(PLANNER_NAME)
            .ok_or_else(|| bad(format!("must start with `{PLANNER_NAME}`")))?;
        let mut config = Self::default();
        let mut min_futures_given = false;
        let params = match rest.strip_prefix(':') {
            Some(p) => p,
            None if rest.is_empty() => "",
            None => return Err(bad(format!("parameters follow `{PLANNER_NAME}:`"))),
        };
        for kv in params.split(',').filter(|s| !s.trim().is_empty()) {
            let (key, value) = kv
                .split_once('=')
                .ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
            let (key, value) = (key.trim(), value.trim());
            let count = || {
                value
                    .parse::<usize>()
                    .map_err(|_| bad(format!("{key} must be a whole number, got `{value}`")))
            };
            let real = || {
                value
                    .parse::<f64>()
                    .ok()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .ok_or_else(|| bad(format!("{key} must be a number >= 0, got `{value}`")))
            };
            match key {
                "k" => config.futures = count()?,
                "h" => config.horizon = count()?,
                "window" => config.window = count()?,
                "z" => config.noise_z = real()?,
                "budget_ms" => {
                    let ms = real()?;
                    config.budget = (ms > 0.0).then(|| Duration::from_secs_f64(ms / 1e3));
                }
                "min_futures" => {
                    config.min_futures = count()?;
                    min_futures_given = true;
                }
                "drop_z" => config.drop_z = real()?,
                "miss" => config.miss_cost = real()?,
                other => {
                    return Err(bad(format!(
                        "unknown parameter `{other}` (known: k, h, window, z, budget_ms, min_futures, drop_z, miss)"
                    )));
                }
            }
        }
        if !min_futures_given {
            config.min_futures = config.min_futures.min(config.futures);
        }
        config.validate().map_err(bad)?;
        Ok(config)
    }

    /// Checks the parameters: at least one future; a window of at least 2 arrivals.
    pub fn validate(&self) -> Result<(), String> {
        if self.futures == 0 {
            return Err("k (futures) must be at least 1".into());
        }
        if self.window < 2 {
            return Err("window must hold at least 2 arrivals".into());
        }
        if self.min_futures == 0 || self.min_futures > self.futures {
            return Err("min_futures must be between 1 and k".into());
        }
        Ok(())
    }
}

/// The value of one candidate action, over the futures played.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActionValue {
    /// The action.
    pub decision: Decision,
    /// Mean QoS of the window (in-flight, new and sampled requests) over the futures.
    pub mean_qos: f64,
    /// Mean paired gain over `qos-greedy`'s choice (0 for that choice).
    pub gain: f64,
    /// Standard error of that gain (0 with one future).
    pub gain_std_err: f64,
    /// Futures it played (fewer than the others' when racing dropped it).
    pub futures: usize,
}

/// What the planner found for one decision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PlanEvaluation {
    /// `qos-greedy`'s choice.
    pub greedy: Option<Decision>,
    /// The planner's choice.
    pub chosen: Option<Decision>,
    /// Every candidate action (the eligible experts in index order, then reject).
    pub actions: Vec<ActionValue>,
    /// Futures played.
    pub futures: usize,
    /// Whether the time budget ran out before `futures` were played.
    pub budget_exhausted: bool,
    /// Whether `qos-greedy` decided because too few futures were played in the budget.
    pub fell_back: bool,
}

/// Counters of a planner's decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlannerStats {
    /// Decisions made.
    pub decisions: u64,
    /// Decisions where the planner left `qos-greedy`'s choice.
    pub overrode_greedy: u64,
    /// Decisions whose time budget ran out (they used the futures played so far).
    pub budget_exhausted: u64,
    /// Decisions left to `qos-greedy` because the budget ran out with too few futures.
    pub budget_fallbacks: u64,
    /// Futures played in all.
    pub futures: u64,
}

/// The `qos-planner` router (see the module docs).
#[derive(Debug)]
pub struct QosPlanner {
    /// `qos-planner`, or the specification it was built from (so that runs of different
    /// settings are told apart in reports).
    name: String,
    config: PlannerConfig,
    rng: SimRng,
    greedy: QosGreedy,
    rollouts: Rollouts,
    scores: Vec<Vec<f64>>,
    evaluation: PlanEvaluation,
    stats: PlannerStats,
}

impl QosPlanner {
    /// A planner with these parameters, its futures drawn from a stream seeded by `seed`.
    pub fn new(config: PlannerConfig, seed: u64) -> Self {
        Self {
            name: PLANNER_NAME.to_owned(),
            config,
            rng: SimRng::derive(seed, 0x5EED_0003),
            greedy: QosGreedy::default(),
            rollouts: Rollouts::default(),
            scores: Vec::new(),
            evaluation: PlanEvaluation::default(),
            stats: PlannerStats::default(),
        }
    }

    /// A planner from its specification (`qos-planner:k=16,h=20`, see
    /// [`PlannerConfig::parse`]).
    pub fn from_spec(spec: &str, seed: u64) -> Result<Self, InvalidPlannerSpec> {
        let mut planner = Self::new(PlannerConfig::parse(spec)?, seed);
        planner.name = spec.to_owned();
        Ok(planner)
    }

    /// Its parameters.
    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// Its counters so far.
    pub fn stats(&self) -> PlannerStats {
        self.stats
    }

    /// Plays the futures and values every candidate action (see the module docs).
    pub fn evaluate(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        observed: &Observed<'_>,
    ) -> &PlanEvaluation {
        let started = Instant::now();
        let (greedy, _) = self.greedy.choose(state, arriving);
        let eval = &mut self.evaluation;
        eval.greedy = Some(greedy);
        eval.actions.clear();
        eval.futures = 0;
        eval.budget_exhausted = false;
        eval.fell_back = false;
        eval.actions.extend(
            state
                .eligible(arriving.request.prompt_tokens)
                .map(Decision::Route)
                .chain(std::iter::once(Decision::Reject))
                .map(|decision| ActionValue {
                    decision,
                    mean_qos: 0.0,
                    gain: 0.0,
                    gain_std_err: 0.0,
                    futures: 0,
                }),
        );
        self.stats.decisions += 1;
        if eval.actions.len() <= 1 {
            eval.chosen = Some(Decision::Reject);
            return &self.evaluation;
        }
        let n_actions = eval.actions.len();
        self.scores.resize_with(n_actions, Vec::new);
        for s in &mut self.scores {
            s.clear();
        }
        self.rollouts
            .prepare(state, arriving, observed, self.config.window);
        let g = self
            .evaluation
            .actions
            .iter()
            .position(|a| a.decision == greedy)
            .unwrap_or(n_actions - 1);
        let mut live: Vec<bool> = vec![true; n_actions];
        for k in 0..self.config.futures {
            if let Some(budget) = self.config.budget
                && k > 0
                && started.elapsed() >= budget
            {
                self.evaluation.budget_exhausted = true;
                break;
            }
            self.rollouts
                .sample_future(state, observed, self.config.horizon, &mut self.rng);
            for (a, action) in self.evaluation.actions.iter().enumerate() {
                if live[a] {
                    let score = self.rollouts.play(
                        state,
                        arriving,
                        observed,
                        action.decision,
                        self.config.miss_cost,
                    );
                    self.scores[a].push(score);
                }
            }
            self.evaluation.futures = k + 1;
            if self.config.drop_z > 0.0 && k + 1 >= self.config.min_futures {
                for (a, alive) in live.iter_mut().enumerate() {
                    if a == g || !*alive {
                        continue;
                    }
                    let (_, gain, se) = paired(&self.scores[a], &self.scores[g]);
                    if gain + self.config.drop_z * se < 0.0 {
                        *alive = false;
                    }
                }
            }
        }
        self.stats.futures += self.evaluation.futures as u64;
        let eval = &mut self.evaluation;
        if eval.budget_exhausted {
            self.stats.budget_exhausted += 1;
        }
        if eval.futures < self.config.min_futures {
            self.stats.budget_fallbacks += 1;
            eval.fell_back = true;
            eval.chosen = Some(greedy);
            return &self.evaluation;
        }
        let mut best: Option<(usize, f64)> = None;
        for (a, action) in eval.actions.iter_mut().enumerate() {
            let (mean, gain, se) = paired(&self.scores[a], &self.scores[g]);
            action.mean_qos = mean;
            action.gain = gain;
            action.gain_std_err = se;
            action.futures = self.scores[a].len();
            let clears_noise = a != g
                && live[a]
                && gain > 1e-9
                && gain > self.config.noise_z * action.gain_std_err;
            if clears_noise && best.is_none_or(|(_, m)| action.mean_qos > m) {
                best = Some((a, action.mean_qos));
            }
        }
        let chosen = best.map_or(greedy, |(a, _)| eval.actions[a].decision);
        if chosen != greedy {
            self.stats.overrode_greedy += 1;
        }
        eval.chosen = Some(chosen);
        &self.evaluation
    }
}

/// Mean of `scores`, and the mean and standard error of its paired differences with the
/// same futures of `baseline` (the first `scores.len()` of them).
fn paired(scores: &[f64], baseline: &[f64]) -> (f64, f64, f64) {
    let n = scores.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let nf = n as f64;
    let mean = scores.iter().sum::<f64>() / nf;
    let diffs = || scores.iter().zip(baseline).map(|(x, y)| x - y);
    let gain = diffs().sum::<f64>() / nf;
    let var = if n > 1 {
        diffs().map(|d| (d - gain) * (d - gain)).sum::<f64>() / (nf - 1.0)
    } else {
        0.0
    };
    (mean, gain, (var / nf).sqrt())
}

impl Policy for QosPlanner {
    fn name(&self) -> &str {
        &self.name
    }

    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        observed: &Observed<'_>,
    ) -> Decision {
        self.evaluate(state, arriving, observed)
            .chosen
            .unwrap_or(Decision::Reject)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::request::{Prediction, Request};
    use crate::state::ExpertState;
    use crate::task::Task;

    fn expert(name: &str, slots: u32) -> ExpertState {
        crate::testing::expert_10ms(name, slots, 100_000)
    }

    fn arriving(slo: f64, quality: &[f64]) -> ArrivingRequest {
        ArrivingRequest {
            request: Request {
                id: 1,
                arrival_s: 10.0,
                task: Task::Chat,
                prompt_tokens: 100,
                slo_s_per_token: slo,
                max_output_tokens: None,
            },
            predictions: quality
                .iter()
                .map(|&q| Prediction::point(256.0, q))
                .collect(),
        }
    }

    #[test]
    fn a_future_is_scored_by_the_qos_of_its_window_and_a_miss_costs() {
        // Nothing learned: every answer is 256 tokens, no arrival is sampled. Alone on the
        // expert the new request takes 0.1 s of prefill and 255 steps of 10 ms: 2.65 s, or
        // 10.35 ms per token.
        let state = ClusterState {
            now_s: 10.0,
            experts: vec![expert("a", 4)],
        };
        let observed = Observed::nothing();
        let mut rollouts = Rollouts::default();
        let met = arriving(0.011, &[0.8]);
        rollouts.prepare(&state, &met, &observed, 256);
        rollouts.sample_future(&state, &observed, 20, &mut SimRng::new(1));
        assert_eq!(
            rollouts.play(&state, &met, &observed, Decision::Route(0), 0.2),
            0.8
        );
        assert_eq!(
            rollouts.play(&state, &met, &observed, Decision::Reject, 0.2),
            0.0
        );
        let missed = arriving(0.010, &[0.8]);
        rollouts.prepare(&state, &missed, &observed, 256);
        rollouts.sample_future(&state, &observed, 20, &mut SimRng::new(1));
        assert_eq!(
            rollouts.play(&state, &missed, &observed, Decision::Route(0), 0.2),
            -0.2
        );
    }

    #[test]
    fn every_candidate_is_valued_and_a_run_repeats_for_its_seed() {
        let mut state = ClusterState {
            now_s: 10.0,
            experts: vec![expert("a", 1), expert("b", 4), expert("c", 4)],
        };
        state.experts[2].up = false;
        // Expert a's only slot is busy with a request 100 tokens from its end.
        state.experts[0].running.push(crate::state::InFlight {
            id: 7,
            task: Task::Chat,
            prompt_tokens: 100,
            predicted_output_tokens: 256.0,
            generated_tokens: 156,
            elapsed_s: 2.0,
            slot_elapsed_s: 2.0,
            max_output_tokens: None,
            predicted_quality: 0.5,
            slo_s_per_token: 0.1,
        });
        let a = arriving(0.012, &[0.9, 0.6, 1.0]);
        let observed = Observed::nothing();
        let mut p = QosPlanner::new(PlannerConfig::default(), 3);
        let eval = p.evaluate(&state, &a, &observed).clone();
        let decisions: Vec<Decision> = eval.actions.iter().map(|x| x.decision).collect();
        assert_eq!(
            decisions,
            [Decision::Route(0), Decision::Route(1), Decision::Reject],
            "the eligible experts, then reject"
        );
        // On a it waits 1 s for the slot: (1 + 0.1 + 2.55) / 256 = 14.3 ms per token, over
        // the 12 ms SLO; on b 10.35 ms. qos-greedy takes b.
        assert_eq!(eval.greedy, Some(Decision::Route(1)));
        let own = eval
            .actions
            .iter()
            .find(|x| x.decision == Decision::Route(1))
            .unwrap();
        assert_eq!((own.gain, own.gain_std_err), (0.0, 0.0));
        assert_eq!(own.futures, 16);
        // Nothing learned, so every future is the prediction: b earns 0.6 where a misses
        // (-0.2), and a's own request earns 0.5 either way. a's gain is -0.8 and it is dropped
        // after min_futures; reject's is -0.6.
        let slow = eval.actions[0];
        assert_eq!(slow.futures, 4);
        assert!((slow.gain + 0.8).abs() < 1e-12, "{slow:?}");
        assert!((eval.actions[2].gain + 0.6).abs() < 1e-12);
        assert_eq!(eval.chosen, Some(Decision::Route(1)));
        let mut again = QosPlanner::new(PlannerConfig::default(), 3);
        assert_eq!(again.evaluate(&state, &a, &observed), &eval);
        assert_eq!(p.stats().decisions, 1);
    }

    #[test]
    fn out_of_budget_with_too_few_futures_it_is_qos_greedy_and_says_so() {
        let state = ClusterState {
            now_s: 10.0,
            experts: vec![expert("a", 4), expert("b", 4)],
        };
        let a = arriving(0.02, &[0.5, 0.7]);
        let config = PlannerConfig {
            budget: Some(Duration::from_nanos(1)),
            ..PlannerConfig::default()
        };
        let mut p = QosPlanner::new(config, 1);
        let eval = p.evaluate(&state, &a, &Observed::nothing()).clone();
        assert!(eval.budget_exhausted && eval.fell_back);
        assert_eq!(eval.futures, 1);
        assert_eq!(eval.chosen, eval.greedy);
        let stats = p.stats();
        assert_eq!((stats.budget_exhausted, stats.budget_fallbacks), (1, 1));
    }

    #[test]
    fn specs_parse_with_defaults_and_name_what_is_wrong() {
        assert_eq!(
            PlannerConfig::parse("qos-planner").unwrap(),
            PlannerConfig::default()
        );
        let c = PlannerConfig::parse("qos-planner:k=64,h=0,z=2,budget_ms=5").unwrap();
        assert_eq!((c.futures, c.horizon, c.window), (64, 0, 256));
        assert_eq!(c.noise_z, 2.0);
        assert_eq!(c.budget, Some(Duration::from_millis(5)));
        // A small k lowers the default min_futures with it.
        assert_eq!(
            PlannerConfig::parse("qos-planner:k=2").unwrap().min_futures,
            2
        );
        for (spec, says) in [
            ("qos-planner:k=0", "at least 1"),
            ("qos-planner:q=3", "unknown parameter `q`"),
            ("qos-planner:k", "not key=value"),
            ("qos-planner:z=-1", "number >= 0"),
            ("qos-plannerx", "parameters follow"),
            ("qos-greedy", "must start with"),
            ("qos-planner:k=2,min_futures=3", "between 1 and k"),
            ("qos-planner:k=8,drop_z=x", "number >= 0"),
        ] {
            let e = PlannerConfig::parse(spec).unwrap_err();
            assert!(e.to_string().contains(says), "{spec}: {e}");
        }
    }
}
