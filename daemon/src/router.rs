//! Where a request is decided: the policy (the learned router, the Monte-Carlo planner, or
//! the hand-made fallback) over the ledger's cluster state and the online predictions, plus
//! what is learned back from every completed request.

use std::sync::Arc;
use std::time::Duration;

use qosroute_core::{
    ArrivalWindow, ArrivingRequest, Decision, ExpertOutputLengths, ExpertProfile,
    InvalidQualityPrior, LatencyCalibrator, Observed, OnnxPolicy, PREFILL_MIN_SHARE_OF_PREDICTED,
    PlannerConfig, PlannerStats, Policy, Prediction, QosPlanner, QualityBook, Request, Task,
    UnknownPolicy, baselines::QosGreedy,
};
use tokio::time::Instant;

use crate::config::Config;
use crate::ledger::{Dispatched, Ledger, TokenCount};
use crate::prediction_error::PredictedLatency;

/// Consecutive decisions over the time budget that switch the model off.
const SLOW_DECISIONS_TO_DISABLE: u32 = 3;
/// How long the model stays off after it was too slow.
const SLOW_MODEL_PAUSE: Duration = Duration::from_secs(60);
/// Quality prior of a task the config gives no number for.
pub const DEFAULT_QUALITY_PRIOR: f64 = 0.5;

/// Why a router cannot be built from a configuration.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// `policy.fallback` names no hand-made policy.
    #[error("policy.fallback: {0}")]
    Fallback(#[from] UnknownPolicy),
    /// A quality prior is out of range.
    #[error(transparent)]
    QualityPrior(#[from] InvalidQualityPrior),
    /// `policy.shadow` names no usable policy.
    #[error("policy.shadow: {0}")]
    Shadow(String),
}

/// What the shadow policy decided for one request, beside the serving decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShadowDecision {
    /// Its decision (a route to an ineligible expert counts as a rejection, as for the
    /// serving policy).
    pub decision: Decision,
    /// The impact estimator's one-step predicted QoS of its decision minus that of the
    /// serving decision (`QosGreedy::score`; a rejection scores 0).
    pub predicted_qos_gain: f64,
}

/// Counts of the shadow policy's decisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShadowStats {
    /// Decisions equal to the serving policy's.
    pub agreements: u64,
    /// Decisions that differ.
    pub disagreements: u64,
    /// Per expert the shadow chose when it disagreed (policy order; reject last): how many
    /// times, and the sum of its predicted QoS gains there.
    pub by_choice: Vec<(u64, f64)>,
}

/// The shadow policy of `config`, if `[policy] shadow` names one.
fn shadow_of(config: &Config) -> Result<Option<Box<dyn Policy + Send>>, RouterError> {
    let Some(spec) = &config.policy.shadow else {
        return Ok(None);
    };
    if let Some(dir) = spec.strip_prefix("han:") {
        let file = std::path::Path::new(dir).join("router-f32.onnx");
        return OnnxPolicy::load(&file)
            .map(|m| Some(Box::new(m) as Box<dyn Policy + Send>))
            .map_err(|e| RouterError::Shadow(format!("{}: {e}", file.display())));
    }
    qosroute_core::baseline(spec, 0)
        .map(Some)
        .map_err(|e| RouterError::Shadow(e.to_string()))
}

/// What the router decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// The decision.
    pub decision: Decision,
    /// The predictions it was made with (per expert).
    pub predictions: Vec<Prediction>,
    /// Time spent deciding.
    pub took: Duration,
    /// Whether the fallback policy decided (for the planner: whether its time budget ran out
    /// before it had played enough futures, so `qos-greedy` decided).
    pub fell_back: bool,
    /// Whether the planner's time budget ran out (it decided on the futures played so far,
    /// or fell back).
    pub budget_exhausted: bool,
    /// The shadow policy's decision, when one is configured.
    pub shadow: Option<ShadowDecision>,
    /// The impact estimator's latency prediction on the chosen expert, for the live
    /// prediction error (`None` for a rejection).
    pub predicted: Option<PredictedLatency>,
}

/// The planner of `config`, if `[policy] planner` names one; its budget is `max_decision_ms`
/// unless the spec sets `budget_ms`.
fn planner_of(config: &Config) -> Result<Option<QosPlanner>, RouterError> {
    let Some(spec) = &config.policy.planner else {
        return Ok(None);
    };
    let mut planner_config = PlannerConfig::parse(spec).map_err(UnknownPolicy::from)?;
    if planner_config.budget.is_none() {
        planner_config.budget = Some(Duration::from_secs_f64(config.policy.max_decision_ms / 1e3));
    }
    Ok(Some(QosPlanner::new(planner_config, 0)))
}

/// The decision maker and its online knowledge. It lives on the router thread
/// ([`crate::router_thread::RouterThread`]): nothing it runs (inference, plan compilation, a
/// planner's rollouts) ever runs on an async worker.
pub struct Router {
    model: Option<OnnxPolicy>,
    /// The Monte-Carlo planner, when it routes instead of a learned model.
    planner: Option<QosPlanner>,
    fallback: Box<dyn Policy + Send>,
    /// Decides beside the serving policy, without affecting it (`[policy] shadow`).
    shadow: Option<Box<dyn Policy + Send>>,
    shadow_stats: ShadowStats,
    /// The impact estimator (with reused buffers): scores the shadow comparison and predicts
    /// the chosen expert's latency.
    scorer: QosGreedy,
    max_decision: Duration,
    slow_in_a_row: u32,
    model_paused_until: Option<Instant>,
    /// In-flight bookkeeping.
    pub ledger: Ledger,
    /// Output length per (expert, task), learned from completions (the same shrinkage as the
    /// simulator's predictor the policy was trained with).
    lengths: ExpertOutputLengths,
    /// Quality per (expert, task): config priors moved by device feedback.
    quality: QualityBook,
    /// Online refit of each expert's latency model (policy order), from observed prefill and
    /// decode times; the refitted model replaces the profile's in the ledger.
    calibrators: Vec<Option<LatencyCalibrator>>,
    /// The requests this router has decided lately (what a planning policy reads as the
    /// arrival process).
    arrivals: ArrivalWindow,
    epoch: Instant,
    stale_after: Duration,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("model", &self.model.as_ref().map(|m| m.name().to_owned()))
            .field("fallback", &self.fallback.name())
            .field("in_flight", &self.ledger.in_flight())
            .finish_non_exhaustive()
    }
}

/// The quality priors of an expert, per task, from its config.
pub fn quality_priors(quality: &std::collections::BTreeMap<String, f64>) -> [f64; Task::COUNT] {
    let default = quality
        .get("default")
        .copied()
        .unwrap_or(DEFAULT_QUALITY_PRIOR);
    let mut out = [default; Task::COUNT];
    for t in Task::ALL {
        if let Some(q) = quality.get(t.as_str()) {
            out[t.index()] = *q;
        }
    }
    out
}

impl Router {
    /// A router for `config`, with `model` as the learned policy if it loaded.
    pub fn new(
        config: &Config,
        model: Option<OnnxPolicy>,
        epoch: Instant,
    ) -> Result<Self, RouterError> {
        let profiles = config.profiles();
        let mut ledger = Ledger::new(&profiles, epoch);
        ledger.host_busy_above = config.telemetry.host_busy_above;
        for (book, e) in ledger.experts.iter_mut().zip(&config.experts) {
            book.reports_load = Config::reports_load(e);
            book.host_device = e.host_device();
        }
        Ok(Self {
            model,
            planner: planner_of(config)?,
            fallback: qosroute_core::baseline(&config.policy.fallback, 0)?,
            shadow: shadow_of(config)?,
            shadow_stats: ShadowStats::default(),
            scorer: QosGreedy::default(),
            max_decision: Duration::from_secs_f64(config.policy.max_decision_ms / 1e3),
            slow_in_a_row: 0,
            model_paused_until: None,
            ledger,
            lengths: ExpertOutputLengths::new(config.experts.iter().map(|e| e.name.clone())),
            quality: QualityBook::new(
                config
                    .experts
                    .iter()
                    .map(|e| (e.name.clone(), quality_priors(&e.quality))),
            )?,
            calibrators: profiles
                .iter()
                .map(|p| LatencyCalibrator::with_settings(p, config.calibration.settings()).ok())
                .collect(),
            arrivals: ArrivalWindow::default(),
            epoch,
            stale_after: Duration::from_secs_f64(config.telemetry.stale_after_s),
        })
    }

    /// Applies a reloaded configuration: experts are matched by name (in-flight requests and
    /// what was learned about a kept expert carry over; a removed expert's requests finish
    /// untracked); `model` replaces the learned policy when `replace_model`.
    pub fn reconfigure(
        &mut self,
        config: &Config,
        model: Option<OnnxPolicy>,
        replace_model: bool,
    ) -> Result<(), RouterError> {
        let fallback = qosroute_core::baseline(&config.policy.fallback, 0)?;
        let shadow = shadow_of(config)?;
        self.quality.reconfigure(
            config
                .experts
                .iter()
                .map(|e| (e.name.clone(), quality_priors(&e.quality))),
        )?;
        let names: Vec<&str> = config.experts.iter().map(|e| e.name.as_str()).collect();
        self.lengths.reconfigure(&names);
        let profiles = config.profiles();
        let mut ledger = Ledger::new(&profiles, self.epoch);
        // A kept expert keeps its calibration unless its configured latency model changed
        // (then, and for a new expert, calibration starts from the configuration in force).
        let mut calibrators: Vec<Option<LatencyCalibrator>> = Vec::with_capacity(profiles.len());
        for p in &profiles {
            let kept = self.ledger.index_of(&p.name).and_then(|old| {
                (self.ledger.experts[old].configured_latency == p.latency)
                    .then(|| self.calibrators.get_mut(old).and_then(Option::take))
                    .flatten()
            });
            calibrators.push(kept.or_else(|| {
                LatencyCalibrator::with_settings(p, config.calibration.settings()).ok()
            }));
        }
        ledger.host_busy_above = config.telemetry.host_busy_above;
        ledger.host = self.ledger.host.take();
        for ((new, p), e) in profiles.iter().enumerate().zip(&config.experts) {
            ledger.experts[new].reports_load = Config::reports_load(e);
            ledger.experts[new].host_device = e.host_device();
            if let Some(old) = self.ledger.index_of(&p.name) {
                let now_s = ledger.secs(Instant::now());
                ledger.experts[new]
                    .in_flight
                    .take_over(&mut self.ledger.experts[old].in_flight, now_s);
                ledger.experts[new].health = self.ledger.experts[old].health.clone();
                ledger.experts[new].reported = self.ledger.experts[old].reported;
                ledger.experts[new].reported_ours = self.ledger.experts[old].reported_ours;
                ledger.experts[new].token_counts =
                    std::mem::take(&mut self.ledger.experts[old].token_counts);
            }
        }
        self.ledger = ledger;
        self.calibrators = calibrators;
        for e in 0..self.ledger.experts.len() {
            self.apply_calibration(e);
        }
        self.fallback = fallback;
        self.shadow = shadow;
        // Per-expert shadow counts are by position, which a reload may change: they restart.
        self.shadow_stats.by_choice.clear();
        let planner = planner_of(config)?;
        // A planner whose parameters did not change keeps its random stream and counters.
        if planner.as_ref().map(QosPlanner::config) != self.planner.as_ref().map(QosPlanner::config)
        {
            self.planner = planner;
        }
        self.max_decision = Duration::from_secs_f64(config.policy.max_decision_ms / 1e3);
        self.stale_after = Duration::from_secs_f64(config.telemetry.stale_after_s);
        if replace_model {
            self.model = model;
            self.model_paused_until = None;
            self.slow_in_a_row = 0;
        }
        Ok(())
    }

    /// Inference plans the learned model has compiled (0 without a model).
    pub fn plans_compiled(&self) -> u64 {
        self.model.as_ref().map_or(0, OnnxPolicy::plans_compiled)
    }

    /// Name of the policy that decides now.
    pub fn policy_name(&self) -> &str {
        if let Some(p) = &self.planner {
            return p.name();
        }
        self.model
            .as_ref()
            .map_or(self.fallback.name(), |m| m.name())
    }

    /// The planner's counters, when it routes.
    pub fn planner_stats(&self) -> Option<PlannerStats> {
        self.planner.as_ref().map(QosPlanner::stats)
    }

    /// Profiles in policy order.
    pub fn profiles(&self) -> Vec<Arc<ExpertProfile>> {
        self.ledger
            .experts
            .iter()
            .map(|b| b.profile.clone())
            .collect()
    }

    /// Predicted output tokens of a `task` request on expert `e`: its own running mean, shrunk
    /// toward the mean of every expert on the task.
    pub fn predicted_output_tokens(&self, e: usize, task: Task) -> f64 {
        self.lengths.predict(e, task)
    }

    /// Predicted answer quality of expert `e` on `task`: the config prior, moved by feedback.
    pub fn predicted_quality(&self, e: usize, task: Task) -> f64 {
        self.quality.predict(e, task)
    }

    /// Decides where a request asking for at most `max_tokens` tokens goes at `now`; experts
    /// in `exclude` (already failed for this request) are not eligible. The predicted answer
    /// length is capped at `max_tokens`: no answer is longer, and a prediction above it
    /// spreads the time to first token over tokens that never come, so a per-token SLO looks
    /// met when it is not (a one-slot CPU expert with seconds of prefill met its SLO for a
    /// third of its requests in HIL scenario 9 while the length prior was 256 and the answers
    /// at most 32).
    pub fn decide(
        &mut self,
        request: &Request,
        max_tokens: u32,
        exclude: &[usize],
        now: Instant,
    ) -> Routing {
        let cap = f64::from(max_tokens.max(1));
        let predictions: Vec<Prediction> = (0..self.ledger.experts.len())
            .map(|e| Prediction {
                output_tokens: self.predicted_output_tokens(e, request.task).min(cap),
                output_quantiles: self.lengths.quantiles(e, request.task).map(|q| q.min(cap)),
                quality: self.predicted_quality(e, request.task),
            })
            .collect();
        let mut state = self.ledger.cluster_state(now, self.stale_after);
        for &e in exclude {
            if let Some(x) = state.experts.get_mut(e) {
                x.up = false;
            }
        }
        let arriving = ArrivingRequest {
            request: Request {
                arrival_s: state.now_s,
                max_output_tokens: Some(max_tokens),
                ..*request
            },
            predictions,
        };
        // A retry (some expert already excluded) is the same arrival, observed once.
        if exclude.is_empty() {
            self.arrivals.observe(&arriving.request);
        }
        let observed = Observed {
            lengths: &self.lengths,
            quality: &self.quality,
            arrivals: &self.arrivals,
        };
        let model_on = self.model.is_some() && self.model_paused_until.is_none_or(|t| now >= t);
        let started = std::time::Instant::now();
        let mut budget_exhausted = false;
        let (decision, fell_back) = match (self.planner.as_mut(), self.model.as_mut()) {
            (Some(planner), _) => {
                let eval = planner.evaluate(&state, &arriving, &observed);
                budget_exhausted = eval.budget_exhausted;
                (eval.chosen.unwrap_or(Decision::Reject), eval.fell_back)
            }
            (None, Some(model)) if model_on => {
                let before = model.fallbacks();
                let d = model.decide(&state, &arriving, &observed);
                (d, model.fallbacks() > before)
            }
            _ => (self.fallback.decide(&state, &arriving, &observed), true),
        };
        let took = started.elapsed();
        if model_on {
            if took > self.max_decision {
                self.slow_in_a_row += 1;
                if self.slow_in_a_row >= SLOW_DECISIONS_TO_DISABLE {
                    tracing::warn!(
                        took_us = took.as_micros() as u64,
                        "learned router too slow; using the fallback for a while"
                    );
                    self.model_paused_until = Some(now + SLOW_MODEL_PAUSE);
                    self.slow_in_a_row = 0;
                }
            } else {
                self.slow_in_a_row = 0;
            }
        }
        // A policy may only route to an eligible expert; anything else is a rejection.
        let eligible = |d: Decision| match d {
            Decision::Route(e) if state.is_eligible(e, request.prompt_tokens) => Decision::Route(e),
            _ => Decision::Reject,
        };
        let decision = eligible(decision);
        // The shadow decides on the same view, after the serving decision and off its clock.
        let shadow = self.shadow.as_mut().map(|shadow| {
            let theirs = eligible(shadow.decide(&state, &arriving, &observed));
            let mut score = |d: Decision| match d {
                Decision::Route(e) => self.scorer.score(&state, &arriving, e),
                Decision::Reject => 0.0,
            };
            ShadowDecision {
                decision: theirs,
                predicted_qos_gain: score(theirs) - score(decision),
            }
        });
        if let Some(s) = shadow {
            let stats = &mut self.shadow_stats;
            if s.decision == decision {
                stats.agreements += 1;
            } else {
                stats.disagreements += 1;
                let experts = state.experts.len();
                stats.by_choice.resize(experts + 1, (0, 0.0));
                let slot = match s.decision {
                    Decision::Route(e) => e.min(experts),
                    Decision::Reject => experts,
                };
                stats.by_choice[slot].0 += 1;
                stats.by_choice[slot].1 += s.predicted_qos_gain;
            }
        }
        let predicted = match decision {
            Decision::Route(e) => {
                let impact = self.scorer.impact(&state, &arriving, e);
                Some(PredictedLatency {
                    ttft_s: impact.own.wait_s + impact.own.prefill_s + impact.own.queued_prefill_s,
                    per_token_s: impact.own.per_token_s,
                })
            }
            Decision::Reject => None,
        };
        Routing {
            decision,
            predictions: arriving.predictions,
            took,
            fell_back,
            budget_exhausted,
            shadow,
            predicted,
        }
    }

    /// The shadow policy's counts so far (all zero without one).
    pub fn shadow_stats(&self) -> &ShadowStats {
        &self.shadow_stats
    }

    /// Whether a shadow policy decides beside the serving one.
    pub fn has_shadow(&self) -> bool {
        self.shadow.is_some()
    }

    /// Records that request `d` went to expert `e`; returns its token count, which the task
    /// streaming the answer adds to without this router's lock.
    pub fn dispatch(&mut self, e: usize, d: Dispatched) -> TokenCount {
        self.ledger.dispatch(e, d)
    }

    /// Learns a prefill time from request `key`'s first token on expert `e` at `at`: from
    /// when its own prefill started to its first token. That is when it took a slot (its
    /// dispatch, or when the request ahead of it finished; a request that still waits in the
    /// daemon's view measures nothing), or later, when the requests ahead of it that were
    /// still prefilling then had their first tokens: the latency model's time to first token
    /// is the prefill ahead, then its own. A prefill measured under
    /// [`PREFILL_MIN_SHARE_OF_PREDICTED`] of the model's was done in the same iteration as one
    /// ahead of it: nothing is learned.
    pub fn observe_first_token(&mut self, e: usize, key: u64, prompt_tokens: u32, at: Instant) {
        let (Some(since), Some(latency)) =
            (self.ledger.own_prefill_since(e, key), self.latency_model(e))
        else {
            return;
        };
        let own = at.saturating_duration_since(since).as_secs_f64();
        let predicted = latency.prefill_s(f64::from(prompt_tokens));
        let slot = self.ledger.slot_since(e, key);
        tracing::debug!(
            expert = e,
            prompt_tokens,
            own_prefill_s = own,
            predicted_s = predicted,
            ttft_from_slot_s = slot.map(|s| at.saturating_duration_since(s).as_secs_f64()),
            running = self.ledger.experts.get(e).map(|b| b.in_flight.len()),
            "prefill observed"
        );
        if own < PREFILL_MIN_SHARE_OF_PREDICTED * predicted {
            return;
        }
        self.observe_prefill(e, prompt_tokens, own);
    }

    /// Learns a prefill time of `prompt_tokens` on expert `e`.
    pub fn observe_prefill(&mut self, e: usize, prompt_tokens: u32, seconds: f64) {
        let accepted = self
            .calibrators
            .get_mut(e)
            .and_then(Option::as_mut)
            .is_some_and(|c| c.observe_prefill(f64::from(prompt_tokens), seconds).is_ok());
        if accepted {
            self.apply_calibration(e);
        }
    }

    /// Learns a decode step time: request `key`'s mean time between tokens on expert `e`,
    /// ending at `now`, at the batch and context the ledger saw on average since its first
    /// token (an answer lives through batches of several sizes; the one left at its end is
    /// not the one it decoded with).
    pub fn observe_decode_step(&mut self, e: usize, key: u64, seconds: f64, now: Instant) {
        let Some((batch, context)) = self.ledger.mean_running_since_first_token(e, key, now) else {
            return;
        };
        tracing::debug!(
            expert = e,
            step_s = seconds,
            batch,
            context,
            "decode step observed"
        );
        let accepted = self
            .calibrators
            .get_mut(e)
            .and_then(Option::as_mut)
            .is_some_and(|c| {
                c.observe_decode_step(batch.max(1.0), context, seconds)
                    .is_ok()
            });
        if accepted {
            self.apply_calibration(e);
        }
    }

    /// The latency model the policy uses for expert `e` now.
    pub fn latency_model(&self, e: usize) -> Option<qosroute_core::LatencyModel> {
        self.ledger.experts.get(e).map(|b| b.profile.latency)
    }

    fn apply_calibration(&mut self, e: usize) {
        let (Some(Some(c)), Some(book)) = (self.calibrators.get(e), self.ledger.experts.get_mut(e))
        else {
            return;
        };
        let latency = c.model();
        if latency != book.profile.latency {
            book.profile = Arc::new(ExpertProfile {
                latency,
                ..(*book.profile).clone()
            });
        }
    }

    /// Learns from a completed request on expert `e`.
    pub fn learn_completion(&mut self, e: usize, task: Task, output_tokens: u32) {
        self.lengths.observe(e, task, output_tokens);
    }

    /// Learns a quality score (device feedback) of expert `e`; scores outside 0..=1 are
    /// ignored.
    pub fn learn_quality(&mut self, e: usize, task: Task, quality: f64) {
        self.quality.observe(e, task, quality);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::ledger::tests::dispatched;
    use qosroute_core::Task;

    fn config() -> Config {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let text = std::fs::read_to_string(format!("{root}/configs/qosrouted.example.toml"))
            .unwrap()
            .replace(
                "model_dir = \"policy-model/models/han\"",
                &format!("model_dir = \"{root}/policy-model/models/han\""),
            );
        Config::parse(&text, "example").unwrap()
    }

    /// A request that took its slot while another was still prefilling learns its own
    /// prefill, from the other's first token to its own: exactly what the same request alone
    /// would have taught.
    #[tokio::test(start_paused = true)]
    async fn a_prefill_behind_another_teaches_what_it_would_alone() {
        let epoch = Instant::now();
        let ms = Duration::from_millis;
        let (mut behind, mut alone) = (
            Router::new(&config(), None, epoch).unwrap(),
            Router::new(&config(), None, epoch).unwrap(),
        );
        let prior = behind.latency_model(0).unwrap();
        let own = Duration::from_secs_f64(prior.prefill_s(100.0) * 1.5);
        // Request 1 takes a slot at 0, request 2 at 50 ms; 1's first token comes at 400 ms,
        // 2's when its own prefill is done.
        behind.dispatch(0, dispatched(1, epoch));
        behind.dispatch(0, dispatched(2, epoch + ms(50)));
        behind.ledger.tokens(0, 1, 1, epoch + ms(400));
        behind.ledger.tokens(0, 2, 1, epoch + ms(400) + own);
        behind.observe_first_token(0, 2, 100, epoch + ms(400) + own);
        alone.dispatch(0, dispatched(2, epoch + ms(50)));
        alone.ledger.tokens(0, 2, 1, epoch + ms(50) + own);
        alone.observe_first_token(0, 2, 100, epoch + ms(50) + own);
        let (b, a) = (
            behind.latency_model(0).unwrap(),
            alone.latency_model(0).unwrap(),
        );
        assert_ne!(a, prior, "the observation was learned");
        assert_eq!(b, a);
    }

    /// Two prompts prefilled in one iteration: the second's first token comes right after the
    /// first's, which says nothing about its own prefill.
    #[tokio::test(start_paused = true)]
    async fn a_prefill_done_with_the_one_ahead_teaches_nothing() {
        let epoch = Instant::now();
        let mut router = Router::new(&config(), None, epoch).unwrap();
        let prior = router.latency_model(0).unwrap();
        let together = epoch + Duration::from_secs_f64(prior.prefill_s(200.0));
        router.dispatch(0, dispatched(1, epoch));
        router.dispatch(0, dispatched(2, epoch));
        router.ledger.tokens(0, 1, 1, together);
        router
            .ledger
            .tokens(0, 2, 1, together + Duration::from_millis(2));
        router.observe_first_token(0, 2, 100, together + Duration::from_millis(2));
        assert_eq!(router.latency_model(0).unwrap(), prior);
    }

    /// A decode step is learned at the batch the answer lived with: one answer that decoded
    /// alone for 3 s and beside another for 1 s (after the other's prefill, left out) is a
    /// step at a batch of 1.25.
    #[tokio::test(start_paused = true)]
    async fn a_decode_step_is_learned_at_the_batch_averaged_over_the_answer() {
        let epoch = Instant::now();
        let s = Duration::from_secs;
        let (mut lived, mut averaged) = (
            Router::new(&config(), None, epoch).unwrap(),
            Router::new(&config(), None, epoch).unwrap(),
        );
        lived.dispatch(0, dispatched(1, epoch));
        lived.ledger.tokens(0, 1, 1, epoch + s(1));
        lived.dispatch(0, dispatched(2, epoch + s(4)));
        lived.ledger.tokens(0, 2, 1, epoch + s(5));
        lived.observe_decode_step(0, 1, 0.03, epoch + s(6));
        let model = lived.latency_model(0).unwrap();
        let (batch, _) = lived
            .ledger
            .mean_running_since_first_token(0, 1, epoch + s(6))
            .unwrap();
        assert!((batch - 1.25).abs() < 1e-12, "{batch}");
        // The same step observed at the batch left at the end (2) teaches something else.
        averaged.dispatch(0, dispatched(1, epoch));
        averaged.dispatch(0, dispatched(2, epoch));
        averaged.ledger.tokens(0, 1, 1, epoch + s(1));
        averaged.ledger.tokens(0, 2, 1, epoch + s(1));
        averaged.observe_decode_step(0, 1, 0.03, epoch + s(5));
        assert_ne!(model, averaged.latency_model(0).unwrap());
        assert_ne!(model, config().profiles()[0].latency, "learned");
    }

    #[tokio::test(start_paused = true)]
    async fn predicted_answers_are_no_longer_than_max_tokens() {
        let epoch = Instant::now();
        let mut router = Router::new(&config(), None, epoch).unwrap();
        let request = Request {
            id: 1,
            arrival_s: 0.0,
            task: Task::Chat,
            prompt_tokens: 100,
            slo_s_per_token: 0.1,
            max_output_tokens: None,
        };
        let uncapped = router.predicted_output_tokens(0, Task::Chat);
        assert!(
            uncapped > 32.0,
            "the prior is longer than the cap: {uncapped}"
        );
        let routing = router.decide(&request, 32, &[], epoch);
        assert!(routing.predictions.iter().all(|p| p.output_tokens == 32.0));
        let routing = router.decide(&request, 4096, &[], epoch);
        assert!(
            routing
                .predictions
                .iter()
                .all(|p| p.output_tokens == uncapped)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_shadow_policy_never_changes_the_serving_decision_and_is_counted() {
        let epoch = Instant::now();
        let plain = config();
        let mut shadowed = config();
        shadowed.policy.shadow = Some("round-robin".into());
        let mut a = Router::new(&plain, None, epoch).unwrap();
        let mut b = Router::new(&shadowed, None, epoch).unwrap();
        assert!(!a.has_shadow() && b.has_shadow());
        for r in [&mut a, &mut b] {
            for e in 0..r.ledger.experts.len() {
                r.ledger.mark_ok(e, epoch);
            }
        }
        let mut disagreements = 0;
        for id in 0..40u64 {
            let request = Request {
                id,
                arrival_s: 0.0,
                task: Task::ALL[id as usize % Task::COUNT],
                prompt_tokens: 100 + 50 * id as u32,
                slo_s_per_token: 0.1,
                max_output_tokens: None,
            };
            let now = epoch + Duration::from_millis(10 * id);
            let (x, y) = (
                a.decide(&request, 256, &[], now),
                b.decide(&request, 256, &[], now),
            );
            assert_eq!(
                x.decision, y.decision,
                "request {id}: the shadow changed the decision"
            );
            assert!(x.shadow.is_none());
            let shadow = y.shadow.unwrap();
            if shadow.decision != y.decision {
                disagreements += 1;
            } else {
                assert_eq!(shadow.predicted_qos_gain, 0.0);
            }
            // Both dispatch the serving decision, so both views stay the same.
            if let Decision::Route(e) = x.decision {
                for r in [&mut a, &mut b] {
                    let _count = r.dispatch(
                        e,
                        Dispatched {
                            key: id,
                            task: request.task,
                            prompt_tokens: request.prompt_tokens,
                            predicted_output_tokens: 100.0,
                            predicted_quality: 0.5,
                            slo_s_per_token: 0.1,
                            max_output_tokens: Some(256),
                            arrived_at: now,
                            dispatched_at: now,
                        },
                    );
                }
            }
        }
        let stats = b.shadow_stats();
        assert_eq!(stats.agreements + stats.disagreements, 40);
        assert_eq!(stats.disagreements, disagreements);
        assert!(
            disagreements > 0,
            "round-robin differs from qos-greedy somewhere"
        );
        assert_eq!(
            stats.by_choice.iter().map(|(n, _)| n).sum::<u64>(),
            disagreements
        );
    }
}
