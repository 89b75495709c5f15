//! The simulated side of `qosroute validate`: the replayed slice as a workload, and the
//! simulator run with the daemon's routing replayed or with the policy deciding.

use super::*;

/// The simulator's workload: measured publish times, calibrated prompt lengths, realised
/// answer lengths (the planned `max_tokens` when the request failed).
pub(super) fn sim_workload(planned: &[Planned], observed: &[Observed]) -> Workload {
    let first = observed
        .iter()
        .filter_map(|o| o.published_s)
        .fold(f64::INFINITY, f64::min);
    let first = if first.is_finite() { first } else { 0.0 };
    let requests = planned
        .iter()
        .zip(observed)
        .map(|(p, o)| qosroute_sim::workload::WorkloadRequest {
            arrival_s: o.published_s.map_or(p.arrival_s, |s| s - first),
            task: p.task.parse().unwrap_or(CoreTask::Chat),
            prompt_tokens: p.prompt_tokens,
            output_tokens: o.output_tokens.unwrap_or(p.max_tokens).max(1),
            quality_row: p.quality_row,
        })
        .collect();
    Workload {
        spec: "replayed slice (qosroute validate)".into(),
        requests,
    }
}

/// What the daemon did with a request.
#[derive(Debug, Clone, Copy)]
pub(super) enum Replayed {
    Route(usize),
    /// An error reply without an expert (`no_expert`, `overloaded`, ...).
    Reject,
    /// Lost: the fallback decides.
    Unknown,
}

/// Routes each request where the daemon sent it, rejects what it rejected (the fallback decides
/// for lost requests).
pub(super) struct ReplayRouting {
    pub(super) routes: Vec<Replayed>,
    pub(super) fallback: Box<dyn Policy + Send>,
}

impl std::fmt::Debug for ReplayRouting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayRouting")
            .field("routes", &self.routes.len())
            .finish()
    }
}

impl Policy for ReplayRouting {
    fn name(&self) -> &str {
        "replayed-routing"
    }

    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        observed: &qosroute_core::Observed<'_>,
    ) -> Decision {
        let id = arriving.request.id as usize;
        match self.routes.get(id).copied() {
            Some(Replayed::Route(e)) if state.is_eligible(e, arriving.request.prompt_tokens) => {
                Decision::Route(e)
            }
            Some(Replayed::Reject) => Decision::Reject,
            _ => self.fallback.decide(state, arriving, observed),
        }
    }
}

/// One simulated request.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Simulated {
    pub(super) rejected: bool,
    pub(super) expert: Option<usize>,
    pub(super) ttft_s: Option<f64>,
    pub(super) per_token_s: Option<f64>,
}

pub(super) fn simulate(
    catalogue: &Catalogue,
    quality: &QualityTable,
    workload: &Workload,
    seed: u64,
    policy: &mut dyn Policy,
) -> anyhow::Result<Vec<Simulated>> {
    let mut sim = Simulation::new(catalogue, quality, workload, seed)?;
    while let Some((state, arriving, observed)) = sim.next_decision()? {
        let decision = policy.decide(state, arriving, &observed);
        sim.apply(decision)?;
    }
    sim.drain()?;
    Ok(sim
        .records()
        .iter()
        .map(|r| Simulated {
            rejected: r.routed_to == Some(None),
            expert: r.routed_to.flatten(),
            ttft_s: r
                .is_completed()
                .then_some(r.first_token_s - r.request.arrival_s),
            per_token_s: r.is_completed().then(|| r.per_token_latency_s()),
        })
        .collect())
}
