//! The reference for an expert that slows down without failing: the same workload run
//! without the fault, with it and a router that knows the new speed at once (perfect online
//! calibration), and with it and a router that never learns it. The hardware-in-loop suite's
//! slow-expert scenario compares the real daemon against these runs.

use qosroute_core::{baseline, per_token_latency_s};
use serde::Serialize;

use crate::catalogue::Catalogue;
use crate::error::SimError;
use crate::quality::QualityTable;
use crate::simulation::{RequestRecord, Simulation, Slowdown};
use crate::workload::Workload;

/// One run of the reference, seen through the slowed expert's window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SlowdownRun {
    /// `none` (no fault), `knows` (the router sees the slowed model at once) or `blind` (it
    /// keeps the profile's).
    pub variant: &'static str,
    /// Requests in the workload.
    pub requests: usize,
    /// Requests that completed.
    pub completed: usize,
    /// Requests rejected by the router.
    pub rejected: usize,
    /// Mean QoS over every request.
    pub avg_qos: f64,
    /// Mean QoS of the requests arriving in the slow window.
    pub window_qos: f64,
    /// Requests routed to the slowed expert per bin of `bin_s`, from time 0.
    pub routed_to_victim: Vec<u64>,
    /// Requests arriving per bin.
    pub arrived: Vec<u64>,
    /// Requests arriving in the slow window that were routed to the slowed expert.
    pub window_victim_routed: u64,
    /// Of those, the ones that met their SLO.
    pub window_victim_met: u64,
}

impl SlowdownRun {
    /// The slowed expert's SLO attainment for the requests it got in the window (NaN if none).
    pub fn window_victim_attainment(&self) -> f64 {
        self.window_victim_met as f64 / self.window_victim_routed as f64
    }
}

/// Runs `workload` on `catalogue` with `policy` (a baseline's name) three times: without the
/// fault, with `slowdown` and a router that knows the slowed model, with it and a router that
/// does not (`slowdown.router_knows` is ignored). Routing counts go in bins of `bin_s`.
pub fn slowdown_reference(
    catalogue: &Catalogue,
    quality: &QualityTable,
    workload: &Workload,
    slowdown: Slowdown,
    policy: &str,
    seed: u64,
    bin_s: f64,
) -> Result<Vec<SlowdownRun>, SimError> {
    let mut runs = Vec::with_capacity(3);
    for variant in ["none", "knows", "blind"] {
        let mut sim = Simulation::new(catalogue, quality, workload, seed)?;
        if variant != "none" {
            sim = sim.with_slowdown(Slowdown {
                router_knows: variant == "knows",
                ..slowdown
            })?;
        }
        let mut router =
            baseline(policy, seed).map_err(|_| SimError::Protocol("no such baseline policy"))?;
        while let Some((state, arriving, observed)) = sim.next_decision()? {
            let decision = router.decide(state, arriving, &observed);
            sim.apply(decision)?;
        }
        sim.drain()?;
        runs.push(summarise_run(variant, sim.records(), &slowdown, bin_s));
    }
    Ok(runs)
}

fn summarise_run(
    variant: &'static str,
    records: &[RequestRecord],
    slowdown: &Slowdown,
    bin_s: f64,
) -> SlowdownRun {
    let last = records.last().map_or(0.0, |r| r.request.arrival_s);
    let bins = (last / bin_s).floor() as usize + 1;
    let mut routed_to_victim = vec![0; bins];
    let mut arrived = vec![0; bins];
    let in_window =
        |r: &RequestRecord| (slowdown.from_s..slowdown.until_s).contains(&r.request.arrival_s);
    let (mut window_qos, mut window_n) = (0.0, 0usize);
    let (mut window_victim_routed, mut window_victim_met) = (0, 0);
    for r in records {
        let bin = ((r.request.arrival_s / bin_s).floor() as usize).min(bins - 1);
        arrived[bin] += 1;
        let to_victim = r.routed_to == Some(Some(slowdown.expert));
        if to_victim {
            routed_to_victim[bin] += 1;
        }
        if in_window(r) {
            window_qos += r.qos;
            window_n += 1;
            if to_victim {
                window_victim_routed += 1;
                let latency = per_token_latency_s(r.request.arrival_s, r.finish_s, r.output_tokens);
                if r.is_completed() && latency < r.request.slo_s_per_token {
                    window_victim_met += 1;
                }
            }
        }
    }
    SlowdownRun {
        variant,
        requests: records.len(),
        completed: records.iter().filter(|r| r.is_completed()).count(),
        rejected: records.iter().filter(|r| r.routed_to == Some(None)).count(),
        avg_qos: records.iter().map(|r| r.qos).sum::<f64>() / records.len().max(1) as f64,
        window_qos: window_qos / window_n.max(1) as f64,
        routed_to_victim,
        arrived,
        window_victim_routed,
        window_victim_met,
    }
}
