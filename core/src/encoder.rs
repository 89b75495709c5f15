//! The state encoder: from (cluster state, arriving request) to the exact tensors the policy
//! network reads. The simulator, the trainer and the daemon all call [`encode_state`], so a
//! policy trained in simulation sees the same features in production.
//!
//! The graph (DESIGN §1) has four node types and three edge types:
//! - one **arriving request** node, linked to every expert (the edge is implicit: all ones);
//! - one **expert** node per expert, carrying the expert's static profile, its load, and the
//!   *candidate action* features of sending the arriving request there (the action impact
//!   estimator's outputs);
//! - **running** and **waiting** request nodes, each linked to its expert by the
//!   `running_adj` / `waiting_adj` masks (`[experts, nodes]`, 1 where linked).
//!
//! At most [`MAX_RUNNING_PER_EXPERT`] running and [`MAX_WAITING_PER_EXPERT`] waiting requests
//! per expert become nodes (the paper saw 10 + 10); the expert features still count all of
//! them. Node sets are never empty: when there is no running (or waiting) request at all, one
//! padding node with zero features and no edges is emitted, so every tensor has a non-zero
//! size for ONNX runtimes.
//!
//! Normalisation lives in this file only: token counts as `ln(1 + n) / 8`, times relative to
//! the arriving request's SLO (`x / slo`, clipped to [0, 10]), fractions as they are. Every
//! feature is finite and within [-10, 10].

use crate::forecast::remaining_prefill_s;
use crate::impact::{Candidate, ImpactScratch, impact_of_with};
use crate::request::ArrivingRequest;
use crate::state::{ClusterState, InFlight};
use crate::task::Task;

/// Running requests per expert that become nodes.
pub const MAX_RUNNING_PER_EXPERT: usize = 64;
/// Waiting requests per expert that become nodes.
pub const MAX_WAITING_PER_EXPERT: usize = 64;

/// Features of the arriving-request node.
pub const REQUEST_FEATURES: usize = Task::COUNT + 5;
/// Features of an expert node (static profile, load, candidate action).
pub const EXPERT_FEATURES: usize = 29;
/// Features of a running or waiting request node.
pub const IN_FLIGHT_FEATURES: usize = 12;

/// The encoded state, as flat row-major `f32` tensors.
#[derive(Debug, Clone, Default)]
pub struct EncodedState {
    /// Expert nodes `E` (also the number of route actions).
    pub experts: usize,
    /// Running-request nodes `R` (at least 1).
    pub running: usize,
    /// Waiting-request nodes `W` (at least 1).
    pub waiting: usize,
    /// `[1, REQUEST_FEATURES]`.
    pub request: Vec<f32>,
    /// `[E, EXPERT_FEATURES]`.
    pub expert: Vec<f32>,
    /// `[R, IN_FLIGHT_FEATURES]`.
    pub running_nodes: Vec<f32>,
    /// `[W, IN_FLIGHT_FEATURES]`.
    pub waiting_nodes: Vec<f32>,
    /// `[E, R]`: 1 where running node r is on expert e.
    pub running_adj: Vec<f32>,
    /// `[E, W]`: 1 where waiting node w is queued at expert e.
    pub waiting_adj: Vec<f32>,
    /// `[E + 1]`: 1 where the action is allowed; the last entry is *reject* (always allowed).
    pub action_mask: Vec<f32>,
    /// The impact estimator's buffers, reused between encodings.
    pub scratch: ImpactScratch,
}

impl PartialEq for EncodedState {
    /// Equal tensors (the estimator's scratch buffers are not part of the encoding).
    fn eq(&self, other: &Self) -> bool {
        self.experts == other.experts
            && self.running == other.running
            && self.waiting == other.waiting
            && self.request == other.request
            && self.expert == other.expert
            && self.running_nodes == other.running_nodes
            && self.waiting_nodes == other.waiting_nodes
            && self.running_adj == other.running_adj
            && self.waiting_adj == other.waiting_adj
            && self.action_mask == other.action_mask
    }
}

fn tokens(n: f64) -> f32 {
    ((n.max(0.0)).ln_1p() / 8.0) as f32
}

fn rel(seconds: f64, slo: f64) -> f32 {
    let x = seconds / slo;
    if x.is_finite() {
        x.clamp(0.0, 10.0) as f32
    } else {
        10.0
    }
}

fn clip(x: f64) -> f32 {
    if x.is_finite() {
        x.clamp(-10.0, 10.0) as f32
    } else {
        0.0
    }
}

fn flag(b: bool) -> f32 {
    if b { 1.0 } else { 0.0 }
}

/// Encodes `state` and `arriving` into `out`, reusing its buffers.
pub fn encode_state(state: &ClusterState, arriving: &ArrivingRequest, out: &mut EncodedState) {
    let request = &arriving.request;
    let slo = request.slo_s_per_token.max(1e-6);
    let e_count = state.experts.len();
    let n_predictions = arriving.predictions.len().max(1) as f64;
    let mean_of = |f: &dyn Fn(&crate::Prediction) -> f64| {
        if arriving.predictions.is_empty() {
            1.0
        } else {
            arriving.predictions.iter().map(f).sum::<f64>() / n_predictions
        }
    };
    let mean_output = mean_of(&|p| p.output_tokens);
    let mean_p10 = mean_of(&|p| p.output_quantiles[0]);
    let mean_p90 = mean_of(&|p| p.output_quantiles[2]);

    out.request.clear();
    out.request
        .extend(Task::ALL.iter().map(|t| flag(*t == request.task)));
    out.request.push(tokens(f64::from(request.prompt_tokens)));
    out.request.push(tokens(mean_output));
    out.request.push(tokens(mean_p10));
    out.request.push(tokens(mean_p90));
    out.request.push(clip(slo / 0.1));

    let running_nodes: Vec<usize> = state
        .experts
        .iter()
        .map(|x| x.running.len().min(MAX_RUNNING_PER_EXPERT))
        .collect();
    let waiting_nodes: Vec<usize> = state
        .experts
        .iter()
        .map(|x| x.waiting.len().min(MAX_WAITING_PER_EXPERT))
        .collect();
    let r_total = running_nodes.iter().sum::<usize>().max(1);
    let w_total = waiting_nodes.iter().sum::<usize>().max(1);
    out.experts = e_count;
    out.running = r_total;
    out.waiting = w_total;
    out.expert.clear();
    out.running_nodes.clear();
    out.waiting_nodes.clear();
    out.running_adj.clear();
    out.running_adj.resize(e_count * r_total, 0.0);
    out.waiting_adj.clear();
    out.waiting_adj.resize(e_count * w_total, 0.0);
    out.action_mask.clear();

    let (mut r_at, mut w_at) = (0usize, 0usize);
    for (e, expert) in state.experts.iter().enumerate() {
        let profile = &expert.profile;
        let latency = &profile.latency;
        let prediction = arriving
            .predictions
            .get(e)
            .copied()
            .unwrap_or(crate::Prediction::point(mean_output, 0.0));
        let [p10, p50, p90] = prediction.output_quantiles;
        let candidate = Candidate {
            prompt_tokens: request.prompt_tokens,
            predicted_output_tokens: prediction.output_tokens,
            predicted_quality: prediction.quality,
            slo_s_per_token: request.slo_s_per_token,
        };
        out.scratch.per_request = true;
        let impact = impact_of_with(expert, &candidate, &mut out.scratch);
        let eligible = state.is_eligible(e, request.prompt_tokens);
        let step = out.scratch.forecast.step_s;
        let d = prediction.output_tokens.max(1.0);
        out.expert.extend_from_slice(&[
            // Static profile.
            rel(latency.decode_t0_s, slo),
            rel(latency.decode_d_s_per_seq * 10.0, slo),
            rel(latency.decode_e_s_per_ctx_token * 1000.0, slo),
            rel(latency.prefill_s(1000.0) / 1000.0 * 100.0, slo),
            tokens(f64::from(profile.max_slots)),
            tokens(profile.kv_tokens as f64) / 2.0,
            // Load.
            flag(expert.up),
            clip(expert.running.len() as f64 / f64::from(profile.max_slots)),
            tokens(expert.running.len() as f64),
            tokens(expert.waiting.len() as f64),
            clip(expert.kv_usage()),
            clip(expert.utilisation),
            rel(step, slo),
            rel(out.scratch.forecast.running_prefill_s / d, slo),
            // Candidate action: the impact estimator.
            clip(prediction.quality),
            tokens(p10),
            tokens(p50),
            tokens(p90),
            rel(impact.own.per_token_s, slo),
            rel(impact.own.wait_s / d, slo),
            rel(impact.own.prefill_s / d, slo),
            rel(impact.own.queued_prefill_s / d, slo),
            flag(impact.own_meets_slo),
            clip(impact.own_predicted_qos),
            clip(impact.predicted_qos_destroyed),
            tokens(f64::from(impact.pushed_over_slo)),
            rel(impact.max_increase_s_per_token, slo),
            clip(impact.own_predicted_qos - impact.predicted_qos_destroyed),
            flag(eligible),
        ]);
        out.action_mask.push(flag(eligible));

        let node = |r: &InFlight, running: bool, before: f64, increase: f64| {
            let own_slo = r.slo_s_per_token.max(1e-6);
            let total = r.expected_output_tokens();
            [
                tokens(f64::from(r.prompt_tokens)),
                tokens(total),
                clip(f64::from(r.generated_tokens) / total),
                rel(r.elapsed_s / total, own_slo),
                rel(r.per_token_latency_s(), own_slo),
                rel(remaining_prefill_s(latency, r, running) / total, own_slo),
                rel(before, own_slo),
                rel(increase, own_slo),
                flag(before < own_slo && before + increase >= own_slo),
                clip(r.predicted_quality),
                clip(own_slo / slo),
                flag(running),
            ]
        };
        let scratch = &out.scratch;
        for (i, r) in expert.running.iter().take(running_nodes[e]).enumerate() {
            let (before, increase) = (scratch.running_before[i], scratch.running_increase[i]);
            out.running_nodes
                .extend_from_slice(&node(r, true, before, increase));
            out.running_adj[e * r_total + r_at] = 1.0;
            r_at += 1;
        }
        for (j, w) in expert.waiting.iter().take(waiting_nodes[e]).enumerate() {
            let (before, increase) = (scratch.waiting_before[j], scratch.waiting_increase[j]);
            out.waiting_nodes
                .extend_from_slice(&node(w, false, before, increase));
            out.waiting_adj[e * w_total + w_at] = 1.0;
            w_at += 1;
        }
    }
    out.action_mask.push(1.0);
    // Padding nodes: zero features, no edges.
    out.running_nodes.resize(r_total * IN_FLIGHT_FEATURES, 0.0);
    out.waiting_nodes.resize(w_total * IN_FLIGHT_FEATURES, 0.0);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::expert::{ExpertProfile, LatencyModel};
    use crate::request::{Prediction, Request};
    use crate::state::ExpertState;

    fn profile(name: &str, slots: u32) -> Arc<ExpertProfile> {
        Arc::new(ExpertProfile {
            name: name.into(),
            model: "m".into(),
            hardware: String::new(),
            source: String::new(),
            max_slots: slots,
            kv_tokens: 10_000,
            latency: LatencyModel {
                prefill_tok_s: 2000.0,
                prefill_overhead_s: 0.0,
                decode_t0_s: 0.02,
                decode_d_s_per_seq: 0.001,
                decode_e_s_per_ctx_token: 1e-6,
            },
        })
    }

    fn in_flight(id: u64, generated: u32) -> InFlight {
        InFlight {
            id,
            task: Task::Mmlu,
            prompt_tokens: 100,
            predicted_output_tokens: 200.0,
            generated_tokens: generated,
            elapsed_s: 1.0,
            slot_elapsed_s: 0.0,
            max_output_tokens: None,
            predicted_quality: 0.6,
            slo_s_per_token: 0.05,
        }
    }

    fn arriving(experts: usize) -> ArrivingRequest {
        ArrivingRequest {
            request: Request {
                id: 1,
                arrival_s: 3.0,
                task: Task::Gsm8k,
                prompt_tokens: 300,
                slo_s_per_token: 0.1,
                max_output_tokens: None,
            },
            predictions: (0..experts)
                .map(|e| Prediction {
                    output_tokens: 150.0,
                    output_quantiles: [50.0, 120.0, 400.0],
                    quality: 0.1 * e as f64,
                })
                .collect(),
        }
    }

    fn check_shapes(s: &EncodedState) {
        assert_eq!(s.request.len(), REQUEST_FEATURES);
        assert_eq!(s.expert.len(), s.experts * EXPERT_FEATURES);
        assert_eq!(s.running_nodes.len(), s.running * IN_FLIGHT_FEATURES);
        assert_eq!(s.waiting_nodes.len(), s.waiting * IN_FLIGHT_FEATURES);
        assert_eq!(s.running_adj.len(), s.experts * s.running);
        assert_eq!(s.waiting_adj.len(), s.experts * s.waiting);
        assert_eq!(s.action_mask.len(), s.experts + 1);
        let all = [&s.request, &s.expert, &s.running_nodes, &s.waiting_nodes];
        for v in all.into_iter().flatten() {
            assert!(v.is_finite() && v.abs() <= 10.0, "feature {v}");
        }
    }

    #[test]
    fn adjacency_links_each_request_to_its_expert() {
        let mut a = ExpertState::idle(profile("a", 8));
        let mut b = ExpertState::idle(profile("b", 8));
        a.running = vec![in_flight(1, 10), in_flight(2, 20)];
        b.running = vec![in_flight(3, 5)];
        b.waiting = vec![in_flight(4, 0)];
        b.up = false;
        let state = ClusterState {
            now_s: 3.0,
            experts: vec![a, b],
        };
        let mut s = EncodedState::default();
        encode_state(&state, &arriving(2), &mut s);
        check_shapes(&s);
        assert_eq!((s.experts, s.running, s.waiting), (2, 3, 1));
        assert_eq!(s.running_adj, vec![1.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
        assert_eq!(s.waiting_adj, vec![0.0, 1.0]);
        assert_eq!(
            s.action_mask,
            vec![1.0, 0.0, 1.0],
            "expert b is down; reject always allowed"
        );
        // Task one-hot of the arriving request.
        assert_eq!(s.request[Task::Gsm8k.index()], 1.0);
        assert_eq!(s.request.iter().take(Task::COUNT).sum::<f32>(), 1.0);
        // Predicted quality is expert feature 14, the length quantiles follow it.
        assert!((s.expert[EXPERT_FEATURES + 14] - 0.1).abs() < 1e-6);
        let ln = |x: f64| (x.ln_1p() / 8.0) as f32;
        assert_eq!(
            s.expert[EXPERT_FEATURES + 15..EXPERT_FEATURES + 18],
            [ln(50.0), ln(120.0), ln(400.0)]
        );
        // The request node carries the mean p10 and p90 over experts.
        assert_eq!(
            s.request[Task::COUNT + 2..Task::COUNT + 4],
            [ln(50.0), ln(400.0)]
        );
    }

    #[test]
    fn empty_node_sets_get_one_padding_node_and_large_sets_are_bounded() {
        let idle = ClusterState {
            now_s: 0.0,
            experts: vec![ExpertState::idle(profile("a", 8))],
        };
        let mut s = EncodedState::default();
        encode_state(&idle, &arriving(1), &mut s);
        check_shapes(&s);
        assert_eq!((s.running, s.waiting), (1, 1));
        assert_eq!(s.running_adj, vec![0.0]);
        assert!(s.running_nodes.iter().all(|v| *v == 0.0));

        let mut busy = ExpertState::idle(profile("a", 500));
        busy.running = (0..300).map(|i| in_flight(i, 1 + i as u32 % 150)).collect();
        busy.waiting = (0..100).map(|i| in_flight(1000 + i, 0)).collect();
        let state = ClusterState {
            now_s: 9.0,
            experts: vec![busy],
        };
        encode_state(&state, &arriving(1), &mut s);
        check_shapes(&s);
        assert_eq!(
            (s.running, s.waiting),
            (MAX_RUNNING_PER_EXPERT, MAX_WAITING_PER_EXPERT)
        );
        // The expert still counts all of them.
        assert!((s.expert[8] - (301f64.ln() / 8.0) as f32).abs() < 1e-6);
    }

    #[test]
    fn encoding_reuses_buffers_and_is_deterministic() {
        let mut a = ExpertState::idle(profile("a", 8));
        a.running = vec![in_flight(1, 10)];
        let state = ClusterState {
            now_s: 1.0,
            experts: vec![a],
        };
        let (mut x, mut y) = (EncodedState::default(), EncodedState::default());
        encode_state(&state, &arriving(1), &mut x);
        encode_state(
            &ClusterState {
                now_s: 0.0,
                experts: vec![],
            },
            &arriving(0),
            &mut y,
        );
        encode_state(&state, &arriving(1), &mut y);
        assert_eq!(x, y);
    }
}
