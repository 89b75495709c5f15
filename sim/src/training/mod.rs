//! Training environments for the learned router: scenarios sampled across varied conditions
//! ([`sampler`]), and a vectorised environment that steps K simulations at once and batches
//! their encoded states (padded to the largest graph in the batch) for the network.
//!
//! Actions index the padded expert axis: `a < E_k` routes to expert `a` of env k, `a == E`
//! (the last column of the batch) rejects. The action mask marks the allowed ones.
//!
//! Two teachers label every state: `qos-greedy` always, and `qos-planner` when the
//! environment is given a planner spec ([`VecEnv::set_planner`]): its choice and, for every
//! candidate action, its estimated gain over `qos-greedy`'s choice. Rewards are credited to the
//! decision that caused them: at an episode's end the environment returns the realised QoS of
//! every request, in decision order ([`VecStep::credits`]).

mod sampler;

use std::sync::Arc;

pub use sampler::{
    Scenario, ScenarioConfig, ScenarioSampler, TRAINING_TRACE_UNTIL_S, capacity_rps,
};

use qosroute_core::baselines::QosGreedy;
use qosroute_core::{
    ArrivingRequest, ClusterState, Decision, EncodedState, Observed, QosPlanner, SimRng,
    encode_state,
    encoder::{EXPERT_FEATURES, IN_FLIGHT_FEATURES, REQUEST_FEATURES},
};

use crate::error::SimError;
use crate::quality::QualityTable;
use crate::simulation::Simulation;

/// Where each environment slot gets its episodes.
#[derive(Debug, Clone)]
pub enum ScenarioSource {
    /// A fresh sampled scenario at every reset (training).
    Sampled(ScenarioSampler),
    /// Slot i plays scenario i once, then stays finished (evaluation).
    Fixed {
        /// The scenarios.
        scenarios: Vec<Scenario>,
        /// The quality table they were drawn from.
        quality: Arc<QualityTable>,
    },
}

/// One batch of observations: every tensor padded to the largest graph of the batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ObservationBatch {
    /// Environments K.
    pub envs: usize,
    /// Expert nodes E (max over the batch); actions are `0..=E`, `E` = reject.
    pub experts: usize,
    /// Running nodes R (max over the batch).
    pub running: usize,
    /// Waiting nodes W (max over the batch).
    pub waiting: usize,
    /// `[K, REQUEST_FEATURES]`.
    pub request: Vec<f32>,
    /// `[K, E, EXPERT_FEATURES]`.
    pub expert: Vec<f32>,
    /// `[K, R, IN_FLIGHT_FEATURES]`.
    pub running_nodes: Vec<f32>,
    /// `[K, W, IN_FLIGHT_FEATURES]`.
    pub waiting_nodes: Vec<f32>,
    /// `[K, E, R]`.
    pub running_adj: Vec<f32>,
    /// `[K, E, W]`.
    pub waiting_adj: Vec<f32>,
    /// `[K, E]`: 1 for a real expert node, 0 for padding.
    pub expert_valid: Vec<f32>,
    /// `[K, E + 1]`: 1 where the action is allowed.
    pub action_mask: Vec<f32>,
    /// `[K]`: the action `qos-greedy` takes in this state (a teacher for warm starts).
    pub qos_greedy_action: Vec<i64>,
    /// `[K]`: the action `qos-planner` takes (`qos_greedy_action` without a planner).
    pub planner_action: Vec<i64>,
    /// `[K, E + 1]`: the planner's mean paired gain of each action over `qos-greedy`'s
    /// choice (0 for that choice), NaN for actions it did not value (not candidates, or no
    /// planner).
    pub planner_gain: Vec<f32>,
}

/// What one vectorised step returned.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VecStep {
    /// Reward per env: QoS completed since its previous decision minus the QoS its action is
    /// predicted to destroy (DESIGN §1); at an episode's end it also holds the QoS of the
    /// requests that completed after the last decision.
    pub rewards: Vec<f32>,
    /// Whether the env's episode ended with this step (it then restarts, or finishes).
    pub dones: Vec<bool>,
    /// Average QoS of the episode that ended, NaN where none ended.
    pub episode_avg_qos: Vec<f32>,
    /// Whether the action named an expert that could not take the request.
    pub invalid: Vec<bool>,
    /// The penalty part of the reward: QoS the action is predicted to destroy.
    pub predicted_qos_destroyed: Vec<f32>,
    /// For an env whose episode ended: the realised QoS of each of its requests, in decision
    /// order (decision t routed request t), so that each decision can be credited with its
    /// own request's outcome.
    pub credits: Vec<Option<Vec<f32>>>,
}

/// The planner's labels of one state.
#[derive(Debug, Clone, Default)]
struct PlannerLabel {
    action: Option<Decision>,
    /// `(expert index or None for reject, mean gain)` per valued action.
    gains: Vec<(Option<usize>, f32)>,
}

impl PlannerLabel {
    fn fill(
        &mut self,
        planner: &mut QosPlanner,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        observed: &Observed<'_>,
    ) {
        let eval = planner.evaluate(state, arriving, observed);
        self.action = eval.chosen;
        self.gains.clear();
        self.gains.extend(eval.actions.iter().map(|a| {
            let e = match a.decision {
                Decision::Route(e) => Some(e),
                Decision::Reject => None,
            };
            (e, a.gain as f32)
        }));
    }
}

#[derive(Debug)]
struct Slot {
    sim: Option<Simulation>,
    encoded: EncodedState,
    /// qos-greedy's decision in the current state.
    teacher: Decision,
    greedy: QosGreedy,
    planner: Option<QosPlanner>,
    label: PlannerLabel,
    /// Where this slot's scenarios are drawn from.
    rng: SimRng,
    finished: bool,
}

/// What ending an episode gave: the QoS completed after its last decision, its average QoS and
/// every request's QoS in decision order.
type Ended = (f64, f64, Vec<f32>);

impl Slot {
    fn new_episode(&mut self, source: &ScenarioSource, index: usize) -> Result<(), SimError> {
        self.sim = Some(match source {
            ScenarioSource::Sampled(sampler) => {
                let scenario = sampler.sample(&mut self.rng)?;
                start(&scenario, sampler.quality())?
            }
            ScenarioSource::Fixed { scenarios, quality } => start(&scenarios[index], quality)?,
        });
        Ok(())
    }

    /// Moves to the next decision, encoding it and labelling it; ends and restarts episodes
    /// as needed.
    fn advance(
        &mut self,
        source: &ScenarioSource,
        index: usize,
    ) -> Result<Option<Ended>, SimError> {
        let mut ended = None;
        loop {
            let Some(sim) = self.sim.as_mut() else {
                return Ok(ended);
            };
            if let Some((state, arriving, observed)) = sim.next_decision()? {
                encode_state(state, arriving, &mut self.encoded);
                self.teacher = self.greedy.choose(state, arriving).0;
                self.label.gains.clear();
                self.label.action = None;
                if let Some(planner) = self.planner.as_mut() {
                    self.label.fill(planner, state, arriving, &observed);
                }
                return Ok(ended);
            }
            let Some(mut sim) = self.sim.take() else {
                return Ok(ended);
            };
            let tail = sim.drain()?;
            let n = sim.records().len().max(1) as f64;
            let avg = sim.records().iter().map(|r| r.qos).sum::<f64>() / n;
            let credits = sim.records().iter().map(|r| r.qos as f32).collect();
            ended = Some((tail, avg, credits));
            if matches!(source, ScenarioSource::Fixed { .. }) {
                self.finished = true;
                return Ok(ended);
            }
            self.new_episode(source, index)?;
        }
    }
}

/// One env's part of a step.
#[derive(Debug, Default)]
struct SlotStep {
    reward: f32,
    done: bool,
    avg: f32,
    invalid: bool,
    destroyed: f32,
    credits: Option<Vec<f32>>,
}

/// K simulations stepped together.
#[derive(Debug)]
pub struct VecEnv {
    source: ScenarioSource,
    slots: Vec<Slot>,
    threads: usize,
}

fn start(scenario: &Scenario, quality: &QualityTable) -> Result<Simulation, SimError> {
    Simulation::new(
        &scenario.catalogue,
        quality,
        &scenario.workload,
        scenario.seed,
    )
}

/// Runs `f` on every slot, on up to `threads` threads (contiguous chunks), in slot order.
fn for_slots<T: Send>(
    slots: &mut [Slot],
    threads: usize,
    f: impl Fn(usize, &mut Slot) -> Result<T, SimError> + Sync,
) -> Result<Vec<T>, SimError> {
    if threads <= 1 || slots.len() <= 1 {
        return slots.iter_mut().enumerate().map(|(i, s)| f(i, s)).collect();
    }
    let chunk = slots.len().div_ceil(threads);
    let f = &f;
    let results: Vec<Result<Vec<T>, SimError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = slots
            .chunks_mut(chunk)
            .enumerate()
            .map(|(c, part)| {
                scope.spawn(move || {
                    part.iter_mut()
                        .enumerate()
                        .map(|(j, s)| f(c * chunk + j, s))
                        .collect::<Result<Vec<T>, SimError>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or(Err(SimError::Protocol("an environment thread panicked")))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(slots.len());
    for part in results {
        out.extend(part?);
    }
    Ok(out)
}

impl VecEnv {
    /// `envs` environments fed by `source` (for `Fixed`, one per scenario), seeded by `seed`
    /// (each slot draws its scenarios from its own stream).
    pub fn new(source: ScenarioSource, envs: usize, seed: u64) -> Result<Self, SimError> {
        let envs = match &source {
            ScenarioSource::Sampled(_) => envs,
            ScenarioSource::Fixed { scenarios, .. } => scenarios.len(),
        };
        if envs == 0 {
            return Err(SimError::Protocol(
                "a vectorised environment needs at least one env",
            ));
        }
        let mut env = Self {
            slots: Vec::with_capacity(envs),
            source,
            threads: 1,
        };
        for i in 0..envs {
            let mut slot = Slot {
                sim: None,
                encoded: EncodedState::default(),
                teacher: Decision::Reject,
                greedy: QosGreedy::default(),
                planner: None,
                label: PlannerLabel::default(),
                rng: SimRng::derive(seed, 0xE7_0001 + i as u64),
                finished: false,
            };
            slot.new_episode(&env.source, i)?;
            slot.advance(&env.source, i)?;
            env.slots.push(slot);
        }
        Ok(env)
    }

    /// Steps the envs on up to `threads` threads (default 1).
    pub fn set_threads(&mut self, threads: usize) {
        self.threads = threads.max(1);
    }

    /// Labels every state with `qos-planner` built from `spec` (seeded per env from `seed`),
    /// or stops labelling with `None`. The current states are labelled at once.
    pub fn set_planner(&mut self, spec: Option<&str>, seed: u64) -> Result<(), SimError> {
        for (i, slot) in self.slots.iter_mut().enumerate() {
            slot.planner = match spec {
                Some(spec) => Some(
                    QosPlanner::from_spec(spec, seed.wrapping_add(i as u64)).map_err(|e| {
                        SimError::Invalid {
                            path: "planner spec".into(),
                            message: e.to_string(),
                        }
                    })?,
                ),
                None => None,
            };
            slot.label = PlannerLabel::default();
            if let Some(planner) = slot.planner.as_mut()
                && let Some(sim) = slot.sim.as_mut()
                && let Some((state, arriving, observed)) = sim.next_decision()?
            {
                slot.label.fill(planner, state, arriving, &observed);
            }
        }
        Ok(())
    }

    /// Number of environments.
    pub fn envs(&self) -> usize {
        self.slots.len()
    }

    /// Whether every slot has finished (only with `Fixed` scenarios).
    pub fn all_finished(&self) -> bool {
        self.slots.iter().all(|s| s.finished)
    }

    /// The current observations of every env, padded into one batch.
    pub fn observe(&self, out: &mut ObservationBatch) {
        let k = self.slots.len();
        let e = self
            .slots
            .iter()
            .map(|s| s.encoded.experts)
            .max()
            .unwrap_or(0);
        let r = self
            .slots
            .iter()
            .map(|s| s.encoded.running)
            .max()
            .unwrap_or(1)
            .max(1);
        let w = self
            .slots
            .iter()
            .map(|s| s.encoded.waiting)
            .max()
            .unwrap_or(1)
            .max(1);
        *out = ObservationBatch {
            envs: k,
            experts: e,
            running: r,
            waiting: w,
            request: vec![0.0; k * REQUEST_FEATURES],
            expert: vec![0.0; k * e * EXPERT_FEATURES],
            running_nodes: vec![0.0; k * r * IN_FLIGHT_FEATURES],
            waiting_nodes: vec![0.0; k * w * IN_FLIGHT_FEATURES],
            running_adj: vec![0.0; k * e * r],
            waiting_adj: vec![0.0; k * e * w],
            expert_valid: vec![0.0; k * e],
            action_mask: vec![0.0; k * (e + 1)],
            qos_greedy_action: vec![e as i64; k],
            planner_action: vec![e as i64; k],
            planner_gain: vec![f32::NAN; k * (e + 1)],
        };
        for (i, slot) in self.slots.iter().enumerate() {
            let s = &slot.encoded;
            out.request[i * REQUEST_FEATURES..(i + 1) * REQUEST_FEATURES]
                .copy_from_slice(&s.request);
            let at = i * e * EXPERT_FEATURES;
            out.expert[at..at + s.expert.len()].copy_from_slice(&s.expert);
            let at = i * r * IN_FLIGHT_FEATURES;
            out.running_nodes[at..at + s.running_nodes.len()].copy_from_slice(&s.running_nodes);
            let at = i * w * IN_FLIGHT_FEATURES;
            out.waiting_nodes[at..at + s.waiting_nodes.len()].copy_from_slice(&s.waiting_nodes);
            for x in 0..s.experts {
                let src = &s.running_adj[x * s.running..(x + 1) * s.running];
                let dst = i * e * r + x * r;
                out.running_adj[dst..dst + s.running].copy_from_slice(src);
                let src = &s.waiting_adj[x * s.waiting..(x + 1) * s.waiting];
                let dst = i * e * w + x * w;
                out.waiting_adj[dst..dst + s.waiting].copy_from_slice(src);
                out.expert_valid[i * e + x] = 1.0;
                out.action_mask[i * (e + 1) + x] = s.action_mask[x];
            }
            // Reject (last column) is always allowed, even for a finished slot.
            out.action_mask[i * (e + 1) + e] = 1.0;
            if let Decision::Route(x) = slot.teacher {
                out.qos_greedy_action[i] = x as i64;
            }
            let planner = slot.label.action.unwrap_or(slot.teacher);
            if let Decision::Route(x) = planner {
                out.planner_action[i] = x as i64;
            }
            for &(x, gain) in &slot.label.gains {
                out.planner_gain[i * (e + 1) + x.unwrap_or(e)] = gain;
            }
        }
    }

    /// Applies one action per env (indices into the padded batch of the last `observe`; the
    /// batch's expert count `experts` means reject) and moves every env to its next decision.
    pub fn step(&mut self, actions: &[i64], experts: usize) -> Result<VecStep, SimError> {
        if actions.len() != self.slots.len() {
            return Err(SimError::Protocol("one action per environment is needed"));
        }
        let source = &self.source;
        let parts = for_slots(&mut self.slots, self.threads, |i, slot| {
            let mut part = SlotStep {
                avg: f32::NAN,
                ..SlotStep::default()
            };
            let own = slot.encoded.experts;
            let Some(sim) = slot.sim.as_mut() else {
                return Ok(part);
            };
            let decision = match usize::try_from(actions[i]) {
                Ok(a) if a == experts => Decision::Reject,
                Ok(a) if a < own => Decision::Route(a),
                _ => {
                    part.invalid = true;
                    Decision::Reject
                }
            };
            let step = sim.apply(decision)?;
            part.invalid |= step.invalid;
            part.destroyed = step.predicted_qos_destroyed as f32;
            let mut reward = step.reward();
            if let Some((tail, avg, credits)) = slot.advance(source, i)? {
                reward += tail;
                part.done = true;
                part.avg = avg as f32;
                part.credits = Some(credits);
            }
            part.reward = reward as f32;
            Ok(part)
        })?;
        let mut out = VecStep::default();
        for p in parts {
            out.rewards.push(p.reward);
            out.dones.push(p.done);
            out.episode_avg_qos.push(p.avg);
            out.invalid.push(p.invalid);
            out.predicted_qos_destroyed.push(p.destroyed);
            out.credits.push(p.credits);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Catalogue;

    fn catalogue(name: &str) -> Catalogue {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(format!("configs/experts/{name}.toml"));
        Catalogue::load(&path).unwrap()
    }

    fn sampler(requests: usize) -> ScenarioSampler {
        ScenarioSampler::new(
            vec![catalogue("paper-3x7b"), catalogue("edge-mixed")],
            Arc::new(QualityTable::embedded().unwrap()),
            ScenarioConfig {
                episode_requests: requests,
                ..ScenarioConfig::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn sampled_scenarios_vary_in_cluster_kind_and_load() {
        let s = sampler(50);
        let mut rng = SimRng::new(1);
        let scenarios: Vec<Scenario> = (0..60).map(|_| s.sample(&mut rng).unwrap()).collect();
        let sizes: std::collections::BTreeSet<usize> = scenarios
            .iter()
            .map(|x| x.catalogue.experts.len())
            .collect();
        assert!(sizes.len() >= 4, "{sizes:?}");
        for kind in ["poisson:", "bursty:", "trace:"] {
            assert!(
                scenarios.iter().any(|x| x.workload.spec.starts_with(kind)),
                "{kind}"
            );
        }
        assert!(scenarios.iter().all(|x| x.workload.requests.len() == 50));
        assert!(scenarios.iter().all(|x| (0.2..=3.0).contains(&x.load)));
        // Capacity estimates are positive and the faster expert has more.
        let c = catalogue("edge-mixed");
        let rps: Vec<f64> = c
            .experts
            .iter()
            .map(|e| capacity_rps(e, 82.0, 211.0))
            .collect();
        assert!(rps.iter().all(|r| *r > 0.0));
        assert!(rps[2] > rps[5], "L4 must out-serve the Orin Nano: {rps:?}");
    }

    #[test]
    fn rewards_of_an_episode_add_up_to_its_qos_minus_predicted_destruction() {
        let quality = Arc::new(QualityTable::embedded().unwrap());
        let scenario = sampler(120).sample(&mut SimRng::new(5)).unwrap();
        // The same scenario twice: once through the env, once run directly.
        let mut env = VecEnv::new(
            ScenarioSource::Fixed {
                scenarios: vec![scenario.clone()],
                quality: quality.clone(),
            },
            1,
            0,
        )
        .unwrap();
        let mut obs = ObservationBatch::default();
        let mut total = 0.0f64;
        let mut destroyed = 0.0f64;
        let mut direct = start(&scenario, &quality).unwrap();
        let mut policy = qosroute_core::baseline("qos-greedy", 0).unwrap();
        let mut steps = 0;
        while !env.all_finished() {
            env.observe(&mut obs);
            let (state, arriving, observed) = direct.next_decision().unwrap().unwrap();
            let d = qosroute_core::Policy::decide(&mut policy, state, arriving, &observed);
            let action = match d {
                Decision::Route(e) => e as i64,
                Decision::Reject => obs.experts as i64,
            };
            assert_eq!(obs.action_mask[obs.action_mask.len() - 1], 1.0);
            assert_eq!(
                obs.qos_greedy_action[0], action,
                "the teacher is qos-greedy"
            );
            let s = direct.apply(d).unwrap();
            destroyed += s.predicted_qos_destroyed;
            let out = env.step(&[action], obs.experts).unwrap();
            assert!(!out.invalid[0]);
            total += f64::from(out.rewards[0]);
            steps += 1;
            if out.dones[0] {
                direct.drain().unwrap();
                let avg = direct.records().iter().map(|r| r.qos).sum::<f64>() / 120.0;
                assert!((f64::from(out.episode_avg_qos[0]) - avg).abs() < 1e-5);
                assert!(
                    (total - (avg * 120.0 - destroyed)).abs() < 1e-3,
                    "{total} vs {}",
                    avg * 120.0 - destroyed
                );
            }
        }
        assert_eq!(steps, 120);
    }

    #[test]
    fn random_catalogues_span_two_to_twelve_pooled_experts() {
        let s = sampler(20);
        let mut rng = SimRng::new(2);
        let pool: Vec<String> = ["paper-3x7b", "edge-mixed"]
            .iter()
            .flat_map(|c| catalogue(c).experts)
            .map(|e| e.name)
            .collect();
        let random: Vec<Scenario> = (0..400)
            .map(|_| s.sample(&mut rng).unwrap())
            .filter(|x| x.catalogue.name.starts_with("random-"))
            .collect();
        assert!((150..250).contains(&random.len()), "{}", random.len());
        let sizes: Vec<usize> = random.iter().map(|x| x.catalogue.experts.len()).collect();
        assert_eq!(sizes.iter().min(), Some(&2));
        assert_eq!(sizes.iter().max(), Some(&12));
        for x in &random {
            for e in &x.catalogue.experts {
                assert!(
                    pool.iter().any(|p| e.name.starts_with(p.as_str())),
                    "{} is not a pooled profile",
                    e.name
                );
                assert!(e.name.ends_with(e.model.as_str()));
            }
        }
        // Models are reassigned: some expert serves a model its profile's catalogue did not
        // give it.
        let reassigned = random.iter().flat_map(|x| &x.catalogue.experts).any(|e| {
            let home = ["paper-3x7b", "edge-mixed"]
                .iter()
                .flat_map(|c| catalogue(c).experts)
                .find(|p| e.name.starts_with(p.name.as_str()))
                .unwrap();
            home.model != e.model
        });
        assert!(reassigned);
    }

    #[test]
    fn trace_segments_come_only_from_the_first_forty_minutes() {
        let s = sampler(256);
        assert!(
            s.trace()
                .iter()
                .all(|r| r.arrival_s < TRAINING_TRACE_UNTIL_S)
        );
        let full = crate::trace::embedded_conv_trace().unwrap();
        assert!(
            full.len() > s.trace().len() + 5000,
            "the last 20 minutes are cut"
        );
        let mut rng = SimRng::new(3);
        let mut segments = 0;
        let mut latest = 0.0f64;
        for _ in 0..300 {
            let x = s.sample(&mut rng).unwrap();
            let Ok(crate::WorkloadSpec::Trace {
                speed, offset_s, ..
            }) = crate::WorkloadSpec::parse(&x.workload.spec)
            else {
                continue;
            };
            segments += 1;
            for r in &x.workload.requests {
                // Back to trace time: the printed spec rounds speed and offset, so allow a
                // relative millisecond.
                let at = r.arrival_s * speed + offset_s;
                latest = latest.max(at);
                assert!(at < TRAINING_TRACE_UNTIL_S + 1.0, "{at}");
            }
        }
        assert!(segments > 50, "{segments}");
        assert!(
            latest > 2000.0,
            "segments reach late into the training part: {latest}"
        );
    }

    #[test]
    fn credits_are_each_requests_realised_qos_in_decision_order() {
        let quality = Arc::new(QualityTable::embedded().unwrap());
        let scenario = sampler(80).sample(&mut SimRng::new(9)).unwrap();
        let mut env = VecEnv::new(
            ScenarioSource::Fixed {
                scenarios: vec![scenario.clone()],
                quality: quality.clone(),
            },
            1,
            0,
        )
        .unwrap();
        let mut direct = start(&scenario, &quality).unwrap();
        let mut policy = qosroute_core::baseline("least-loaded", 0).unwrap();
        let mut obs = ObservationBatch::default();
        let mut credits = None;
        while !env.all_finished() {
            env.observe(&mut obs);
            let (state, arriving, observed) = direct.next_decision().unwrap().unwrap();
            let d = qosroute_core::Policy::decide(&mut policy, state, arriving, &observed);
            direct.apply(d).unwrap();
            let action = match d {
                Decision::Route(e) => e as i64,
                Decision::Reject => obs.experts as i64,
            };
            let out = env.step(&[action], obs.experts).unwrap();
            assert_eq!(out.credits[0].is_some(), out.dones[0]);
            credits = out.credits[0].clone().or(credits);
        }
        direct.drain().unwrap();
        let credits = credits.unwrap();
        let truth: Vec<f32> = direct.records().iter().map(|r| r.qos as f32).collect();
        assert_eq!(credits, truth);
        assert!(credits.iter().any(|&q| q > 0.0) && credits.contains(&0.0));
    }

    #[test]
    fn planner_labels_are_the_planners_decisions_and_threads_change_nothing() {
        let spec = "qos-planner:k=4,h=5,min_futures=1";
        let run = |threads: usize| {
            let mut env = VecEnv::new(ScenarioSource::Sampled(sampler(30)), 4, 11).unwrap();
            env.set_threads(threads);
            env.set_planner(Some(spec), 5).unwrap();
            let mut obs = ObservationBatch::default();
            let mut seen = Vec::new();
            for _ in 0..60 {
                env.observe(&mut obs);
                seen.push(obs.clone());
                let out = env.step(&obs.planner_action.clone(), obs.experts).unwrap();
                assert!(out.invalid.iter().all(|x| !x));
            }
            seen
        };
        let one = run(1);
        // Debug strings compare NaN (not valued) as equal to itself.
        assert!(
            format!("{one:?}") == format!("{:?}", run(2)),
            "two threads step the same envs the same way"
        );
        let mut overrides = 0;
        for obs in &one {
            let e = obs.experts;
            for i in 0..obs.envs {
                let gains = &obs.planner_gain[i * (e + 1)..(i + 1) * (e + 1)];
                let greedy = obs.qos_greedy_action[i] as usize;
                let chosen = obs.planner_action[i] as usize;
                // qos-greedy's choice is the reference of the gains; the chosen action was
                // valued, and allowed.
                assert_eq!(gains[greedy], 0.0);
                assert!(!gains[chosen].is_nan());
                assert_eq!(obs.action_mask[i * (e + 1) + chosen], 1.0);
                for (a, g) in gains.iter().enumerate() {
                    if !g.is_nan() && a < e {
                        assert_eq!(obs.action_mask[i * (e + 1) + a], 1.0, "valued => allowed");
                    }
                }
                if chosen != greedy {
                    overrides += 1;
                    assert!(gains[chosen] > 0.0, "it leaves qos-greedy only for a gain");
                }
            }
        }
        assert!(
            overrides > 0,
            "the planner disagreed with qos-greedy somewhere"
        );
    }

    #[test]
    fn batches_pad_to_the_largest_graph_and_mask_the_padding() {
        let mut env = VecEnv::new(ScenarioSource::Sampled(sampler(40)), 6, 3).unwrap();
        let mut obs = ObservationBatch::default();
        for _ in 0..200 {
            env.observe(&mut obs);
            let (k, e, r, w) = (obs.envs, obs.experts, obs.running, obs.waiting);
            assert_eq!(obs.expert.len(), k * e * EXPERT_FEATURES);
            assert_eq!(obs.running_nodes.len(), k * r * IN_FLIGHT_FEATURES);
            assert_eq!(obs.waiting_adj.len(), k * e * w);
            assert_eq!(obs.action_mask.len(), k * (e + 1));
            for i in 0..k {
                for x in 0..e {
                    let allowed = obs.action_mask[i * (e + 1) + x];
                    assert!(
                        allowed <= obs.expert_valid[i * e + x],
                        "padding must not be allowed"
                    );
                }
            }
            // Pick the first allowed expert, else reject; step all envs.
            let actions: Vec<i64> = (0..k)
                .map(|i| {
                    (0..e)
                        .find(|&x| obs.action_mask[i * (e + 1) + x] == 1.0)
                        .unwrap_or(e) as i64
                })
                .collect();
            let out = env.step(&actions, e).unwrap();
            assert!(out.invalid.iter().all(|x| !x));
            for (done, avg) in out.dones.iter().zip(&out.episode_avg_qos) {
                assert_eq!(*done, !avg.is_nan());
            }
        }
        // An action beyond the env's own experts is invalid and counts as a rejection.
        env.observe(&mut obs);
        let bad = vec![obs.experts as i64 + 5; env.envs()];
        let out = env.step(&bad, obs.experts).unwrap();
        assert!(out.invalid.iter().all(|x| *x));
    }
}
