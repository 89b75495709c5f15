//! Training environments for the learned router: scenarios sampled across varied conditions,
//! and a vectorised environment that steps K simulations at once and batches their encoded
//! states (padded to the largest graph in the batch) for the network.
//!
//! Actions index the padded expert axis: `a < E_k` routes to expert `a` of env k, `a == E`
//! (the last column of the batch) rejects. The action mask marks the allowed ones.

use std::sync::Arc;

use qosroute_core::baselines::QosGreedy;
use qosroute_core::{
    Decision, EncodedState, ExpertProfile, SimRng, encode_state,
    encoder::{EXPERT_FEATURES, IN_FLIGHT_FEATURES, REQUEST_FEATURES},
};

use crate::catalogue::Catalogue;
use crate::error::SimError;
use crate::quality::QualityTable;
use crate::simulation::Simulation;
use crate::trace::{TraceRow, embedded_conv_trace};
use crate::workload::{Workload, WorkloadSources, WorkloadSpec, synthesize};

/// How training scenarios vary.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioConfig {
    /// Requests per episode.
    pub episode_requests: usize,
    /// Offered load relative to the cluster's estimated capacity: drawn log-uniformly from
    /// `[load_min, load_max]`.
    pub load_min: f64,
    /// See `load_min`.
    pub load_max: f64,
    /// Fewest experts in a sampled subset of a catalogue.
    pub min_experts: usize,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        Self {
            episode_requests: 256,
            load_min: 0.3,
            load_max: 3.0,
            min_experts: 2,
        }
    }
}

/// One episode's cluster and workload.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The experts (a subset of a catalogue, in random order) and SLOs.
    pub catalogue: Catalogue,
    /// The requests.
    pub workload: Workload,
    /// Seed of the simulation.
    pub seed: u64,
    /// Offered load relative to estimated capacity.
    pub load: f64,
}

/// A rough capacity of one expert in requests/s for a workload with these mean lengths: a
/// batch of up to 16 sequences decoding at the step model's speed, plus each prompt's prefill.
/// Only used to scale training loads; the simulator itself is exact.
pub fn capacity_rps(expert: &ExpertProfile, prompt_tokens: f64, output_tokens: f64) -> f64 {
    let l = &expert.latency;
    let b = f64::from(expert.max_slots.min(16));
    let step = l.decode_step_s(b, b * (prompt_tokens + output_tokens / 2.0));
    let decode_s_per_request = output_tokens * step / b;
    1.0 / (decode_s_per_request + l.prefill_s(prompt_tokens))
}

/// Draws training scenarios: a random subset of a random catalogue, and a Poisson, bursty or
/// conv-trace-segment workload at a random load.
#[derive(Debug, Clone)]
pub struct ScenarioSampler {
    catalogues: Vec<Catalogue>,
    quality: Arc<QualityTable>,
    output_lengths: Vec<u32>,
    trace: Vec<TraceRow>,
    config: ScenarioConfig,
}

impl ScenarioSampler {
    /// A sampler over `catalogues`, with the embedded conversation trace.
    pub fn new(
        catalogues: Vec<Catalogue>,
        quality: Arc<QualityTable>,
        config: ScenarioConfig,
    ) -> Result<Self, SimError> {
        if catalogues.is_empty() {
            return Err(SimError::Protocol("no catalogue to sample scenarios from"));
        }
        if config.episode_requests == 0
            || !(config.load_min > 0.0 && config.load_max >= config.load_min)
        {
            return Err(SimError::Protocol(
                "scenario config needs requests > 0 and 0 < load_min <= load_max",
            ));
        }
        let trace = embedded_conv_trace()?;
        Ok(Self {
            catalogues,
            quality,
            output_lengths: trace.iter().map(|r| r.output_tokens).collect(),
            trace,
            config,
        })
    }

    /// The quality table scenarios draw from.
    pub fn quality(&self) -> &Arc<QualityTable> {
        &self.quality
    }

    /// Draws one scenario.
    pub fn sample(&self, rng: &mut SimRng) -> Result<Scenario, SimError> {
        let base = &self.catalogues[rng.below(self.catalogues.len() as u64) as usize];
        let n = base.experts.len();
        let lo = self.config.min_experts.clamp(1, n);
        let k = lo + rng.below((n - lo + 1) as u64) as usize;
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let catalogue = Catalogue {
            experts: order[..k]
                .iter()
                .map(|&i| base.experts[i].clone())
                .collect(),
            ..base.clone()
        };
        let load = (self.config.load_min.ln()
            + rng.unit() * (self.config.load_max / self.config.load_min).ln())
        .exp();
        let seed = rng.next_u64();
        let n_req = self.config.episode_requests;
        let kind = rng.below(10);
        let (spec, parsed) = if kind < 3 {
            // A segment of the conv trace, sped up or slowed down to the target load.
            let capacity: f64 = catalogue
                .experts
                .iter()
                .map(|e| capacity_rps(e, 1155.0, 211.0))
                .sum();
            let last = self.trace.last().map_or(0.0, |r| r.arrival_s);
            let offset_s = rng.unit() * (last - 600.0).max(0.0);
            let trace_rate = self.trace.len() as f64 / last.max(1.0);
            let speed = (load * capacity / trace_rate).max(1e-3);
            let parsed = WorkloadSpec::Trace {
                path: "embedded-conv".into(),
                speed,
                n: Some(n_req),
                offset_s,
            };
            (
                format!("trace:embedded-conv,speed={speed:.4},n={n_req},offset={offset_s:.1}"),
                parsed,
            )
        } else {
            let capacity: f64 = catalogue
                .experts
                .iter()
                .map(|e| capacity_rps(e, 82.0, 211.0))
                .sum();
            let rate = load * capacity;
            if kind < 7 {
                (
                    format!("poisson:rate={rate:.4},n={n_req}"),
                    WorkloadSpec::Poisson { rate, n: n_req },
                )
            } else {
                let dwell_s = 5.0 + rng.unit() * 55.0;
                let (low, high) = (rate * 0.3, rate * 2.0);
                (
                    format!("bursty:low={low:.4},high={high:.4},dwell={dwell_s:.1},n={n_req}"),
                    WorkloadSpec::Bursty {
                        low,
                        high,
                        dwell_s,
                        n: n_req,
                    },
                )
            }
        };
        let sources = WorkloadSources {
            quality: &self.quality,
            output_lengths: &self.output_lengths,
            trace: Some(&self.trace),
        };
        let requests = synthesize(&spec, &parsed, sources, seed)?;
        Ok(Scenario {
            catalogue,
            workload: Workload { spec, requests },
            seed,
            load,
        })
    }
}

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
}

#[derive(Debug)]
struct Slot {
    sim: Option<Simulation>,
    encoded: EncodedState,
    /// qos-greedy's decision in the current state.
    teacher: Decision,
    greedy: QosGreedy,
    finished: bool,
}

/// K simulations stepped together.
#[derive(Debug)]
pub struct VecEnv {
    source: ScenarioSource,
    rng: SimRng,
    slots: Vec<Slot>,
}

fn start(scenario: &Scenario, quality: &QualityTable) -> Result<Simulation, SimError> {
    Simulation::new(
        &scenario.catalogue,
        quality,
        &scenario.workload,
        scenario.seed,
    )
}

impl VecEnv {
    /// `envs` environments fed by `source` (for `Fixed`, one per scenario), seeded by `seed`.
    pub fn new(source: ScenarioSource, envs: usize, seed: u64) -> Result<Self, SimError> {
        let mut env = Self {
            rng: SimRng::derive(seed, 0xE7_0001),
            slots: Vec::new(),
            source,
        };
        let envs = match &env.source {
            ScenarioSource::Sampled(_) => envs,
            ScenarioSource::Fixed { scenarios, .. } => scenarios.len(),
        };
        if envs == 0 {
            return Err(SimError::Protocol(
                "a vectorised environment needs at least one env",
            ));
        }
        for i in 0..envs {
            let sim = env.new_episode(i)?;
            env.slots.push(Slot {
                sim,
                encoded: EncodedState::default(),
                teacher: Decision::Reject,
                greedy: QosGreedy::default(),
                finished: false,
            });
        }
        for i in 0..envs {
            env.advance(i)?;
        }
        Ok(env)
    }

    /// Number of environments.
    pub fn envs(&self) -> usize {
        self.slots.len()
    }

    /// Whether every slot has finished (only with `Fixed` scenarios).
    pub fn all_finished(&self) -> bool {
        self.slots.iter().all(|s| s.finished)
    }

    fn new_episode(&mut self, slot: usize) -> Result<Option<Simulation>, SimError> {
        match &self.source {
            ScenarioSource::Sampled(sampler) => {
                let scenario = sampler.sample(&mut self.rng)?;
                Ok(Some(start(&scenario, sampler.quality())?))
            }
            ScenarioSource::Fixed { scenarios, quality } => {
                Ok(Some(start(&scenarios[slot], quality)?))
            }
        }
    }

    /// Moves slot `i` to its next decision, encoding it; ends and restarts episodes as needed.
    /// Returns the QoS completed after the last decision of an episode that ended, and that
    /// episode's average QoS.
    fn advance(&mut self, i: usize) -> Result<Option<(f64, f64)>, SimError> {
        let mut ended = None;
        loop {
            let slot = &mut self.slots[i];
            let Some(sim) = slot.sim.as_mut() else {
                return Ok(ended);
            };
            if let Some((state, arriving, _observed)) = sim.next_decision()? {
                encode_state(state, arriving, &mut slot.encoded);
                slot.teacher = slot.greedy.choose(state, arriving).0;
                return Ok(ended);
            }
            let Some(mut sim) = slot.sim.take() else {
                return Ok(ended);
            };
            let tail = sim.drain()?;
            let n = sim.records().len().max(1) as f64;
            let avg = sim.records().iter().map(|r| r.qos).sum::<f64>() / n;
            ended = Some((tail, avg));
            if matches!(self.source, ScenarioSource::Fixed { .. }) {
                self.slots[i].finished = true;
                return Ok(ended);
            }
            let next = self.new_episode(i)?;
            self.slots[i].sim = next;
        }
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
        }
    }

    /// Applies one action per env (indices into the padded batch of the last `observe`; the
    /// batch's expert count `experts` means reject) and moves every env to its next decision.
    pub fn step(&mut self, actions: &[i64], experts: usize) -> Result<VecStep, SimError> {
        if actions.len() != self.slots.len() {
            return Err(SimError::Protocol("one action per environment is needed"));
        }
        let k = self.slots.len();
        let mut out = VecStep {
            rewards: vec![0.0; k],
            dones: vec![false; k],
            episode_avg_qos: vec![f32::NAN; k],
            invalid: vec![false; k],
            predicted_qos_destroyed: vec![0.0; k],
        };
        for (i, &action) in actions.iter().enumerate() {
            let own = self.slots[i].encoded.experts;
            let Some(sim) = self.slots[i].sim.as_mut() else {
                continue;
            };
            let decision = match usize::try_from(action) {
                Ok(a) if a == experts => Decision::Reject,
                Ok(a) if a < own => Decision::Route(a),
                _ => {
                    out.invalid[i] = true;
                    Decision::Reject
                }
            };
            let step = sim.apply(decision)?;
            out.invalid[i] |= step.invalid;
            out.predicted_qos_destroyed[i] = step.predicted_qos_destroyed as f32;
            let mut reward = step.reward();
            if let Some((tail, avg)) = self.advance(i)? {
                reward += tail;
                out.dones[i] = true;
                out.episode_avg_qos[i] = avg as f32;
            }
            out.rewards[i] = reward as f32;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(scenarios.iter().all(|x| (0.3..=3.0).contains(&x.load)));
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
