//! Training scenarios: a cluster and a workload per episode, drawn across the conditions the
//! router must handle, from the training part of the data only.
//!
//! - **Clusters:** either a random subset of one training catalogue, or a *random catalogue*:
//!   2-12 experts drawn with replacement from the pooled expert profiles of every training
//!   catalogue (each a row-cited profile of `data/hardware`), each given a random model of the
//!   pool, under the SLOs of one of the catalogues.
//! - **Loads:** log-uniform in `[load_min, load_max]` times the cluster's estimated capacity.
//! - **Workloads:** Poisson, bursty (two-state), or a segment of the conv trace. Trace
//!   segments and the output lengths synthetic requests draw from come only from the trace's
//!   first `trace_until_s` seconds (40 minutes): its last 20 minutes are held out for
//!   evaluation.

use std::collections::BTreeSet;
use std::sync::Arc;

use qosroute_core::{ExpertProfile, SimRng};

use crate::catalogue::Catalogue;
use crate::error::SimError;
use crate::quality::QualityTable;
use crate::trace::{TraceRow, embedded_conv_trace};
use crate::workload::{Workload, WorkloadSources, WorkloadSpec, synthesize};

/// Seconds of the conv trace training may see; the rest is held out for evaluation.
pub const TRAINING_TRACE_UNTIL_S: f64 = 2400.0;

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
    /// Fewest experts in a sampled cluster.
    pub min_experts: usize,
    /// Most experts in a random catalogue.
    pub max_experts: usize,
    /// Share of episodes played on a random catalogue (the rest: a subset of one catalogue).
    pub random_catalogue_share: f64,
    /// Trace segments and synthetic output lengths come from the trace before this time.
    pub trace_until_s: f64,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        Self {
            episode_requests: 256,
            load_min: 0.2,
            load_max: 3.0,
            min_experts: 2,
            max_experts: 12,
            random_catalogue_share: 0.5,
            trace_until_s: TRAINING_TRACE_UNTIL_S,
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

/// Draws training scenarios (see the module docs).
#[derive(Debug, Clone)]
pub struct ScenarioSampler {
    catalogues: Vec<Catalogue>,
    pool: Vec<ExpertProfile>,
    models: Vec<String>,
    quality: Arc<QualityTable>,
    output_lengths: Vec<u32>,
    trace: Vec<TraceRow>,
    config: ScenarioConfig,
}

fn shuffle<T>(items: &mut [T], rng: &mut SimRng) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.below(i as u64 + 1) as usize);
    }
}

impl ScenarioSampler {
    /// A sampler over `catalogues`, with the embedded conversation trace cut at
    /// `config.trace_until_s`.
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
        if config.min_experts == 0 || config.max_experts < config.min_experts {
            return Err(SimError::Protocol(
                "scenario config needs 1 <= min_experts <= max_experts",
            ));
        }
        if !(0.0..=1.0).contains(&config.random_catalogue_share) {
            return Err(SimError::Protocol(
                "random_catalogue_share must be in [0, 1]",
            ));
        }
        let trace: Vec<TraceRow> = embedded_conv_trace()?
            .into_iter()
            .filter(|r| r.arrival_s < config.trace_until_s)
            .collect();
        if trace.len() < config.episode_requests {
            return Err(SimError::Protocol(
                "the training part of the trace is shorter than an episode",
            ));
        }
        let pool: Vec<ExpertProfile> = catalogues
            .iter()
            .flat_map(|c| c.experts.iter().cloned())
            .collect();
        let models: Vec<String> = pool
            .iter()
            .map(|e| e.model.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        Ok(Self {
            catalogues,
            pool,
            models,
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

    /// The trace rows training may see.
    pub fn trace(&self) -> &[TraceRow] {
        &self.trace
    }

    fn subset_of_catalogue(&self, rng: &mut SimRng) -> Catalogue {
        let base = &self.catalogues[rng.below(self.catalogues.len() as u64) as usize];
        let n = base.experts.len();
        let lo = self.config.min_experts.clamp(1, n);
        let k = lo + rng.below((n - lo + 1) as u64) as usize;
        let mut order: Vec<usize> = (0..n).collect();
        shuffle(&mut order, rng);
        Catalogue {
            experts: order[..k]
                .iter()
                .map(|&i| base.experts[i].clone())
                .collect(),
            ..base.clone()
        }
    }

    fn random_catalogue(&self, rng: &mut SimRng) -> Catalogue {
        let slos = &self.catalogues[rng.below(self.catalogues.len() as u64) as usize];
        let (lo, hi) = (self.config.min_experts, self.config.max_experts);
        let k = lo + rng.below((hi - lo + 1) as u64) as usize;
        let experts = (0..k)
            .map(|i| {
                let mut e = self.pool[rng.below(self.pool.len() as u64) as usize].clone();
                e.model = self.models[rng.below(self.models.len() as u64) as usize].clone();
                e.name = format!("{}-{i}-{}", e.name, e.model);
                e
            })
            .collect();
        Catalogue {
            name: format!("random-{k}"),
            description: "random catalogue of pooled training profiles".into(),
            slo: slos.slo.clone(),
            experts,
        }
    }

    /// Draws one scenario.
    pub fn sample(&self, rng: &mut SimRng) -> Result<Scenario, SimError> {
        let catalogue = if rng.unit() < self.config.random_catalogue_share {
            self.random_catalogue(rng)
        } else {
            self.subset_of_catalogue(rng)
        };
        let load = (self.config.load_min.ln()
            + rng.unit() * (self.config.load_max / self.config.load_min).ln())
        .exp();
        let seed = rng.next_u64();
        let n_req = self.config.episode_requests;
        let kind = rng.below(10);
        let (spec, parsed) = if kind < 3 {
            // A segment of the training part of the conv trace, sped up or slowed down to the
            // target load.
            let capacity: f64 = catalogue
                .experts
                .iter()
                .map(|e| capacity_rps(e, 1155.0, 211.0))
                .sum();
            let start = rng.below((self.trace.len() - n_req + 1) as u64) as usize;
            let offset_s = self.trace[start].arrival_s;
            let span = self.trace.last().map_or(0.0, |r| r.arrival_s);
            let trace_rate = self.trace.len() as f64 / span.max(1.0);
            let speed = (load * capacity / trace_rate).max(1e-3);
            let parsed = WorkloadSpec::Trace {
                path: "embedded-conv".into(),
                speed,
                n: Some(n_req),
                offset_s,
            };
            (
                format!("trace:embedded-conv,speed={speed:.4},n={n_req},offset={offset_s:.3}"),
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
