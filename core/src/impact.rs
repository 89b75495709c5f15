//! The action impact estimator (DESIGN §1): what putting a new request on an expert does to
//! the new request itself and to every request already running there.
//!
//! The paper's increase of running request j's per-token latency when a request with prompt
//! `p` and output `d` joins is `dl_j = (k1*p + k2*sum_{k=1}^{m_j-1}(p+k)) / D_j` with
//! `m_j = min(D_j - d_j, d)`. Generalised to the step model of [`LatencyModel`]: the new
//! prompt's prefill stalls j once (`p / prefill_tok_s`), then each of the `m_j - 1` decode
//! steps they share grows by `d_s_per_seq + e_s_per_ctx_token * (p + k)`. With
//! `d_s_per_seq = 0` and `e_s_per_ctx_token = k2` this is exactly the paper's formula.
//!
//! All lengths here are *predicted* (the router never knows true output lengths).

use crate::expert::LatencyModel;
use crate::state::{ExpertState, InFlight};

/// A candidate action: put a new request with these predictions on one expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Prompt tokens of the new request.
    pub prompt_tokens: u32,
    /// Its predicted output tokens on this expert.
    pub predicted_output_tokens: f64,
    /// Its predicted answer quality on this expert.
    pub predicted_quality: f64,
    /// Its SLO, seconds per output token.
    pub slo_s_per_token: f64,
}

/// Predicted latency of the new request on the expert, split by phase.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OwnLatency {
    /// Queueing until the engine admits it.
    pub wait_s: f64,
    /// Its prefill.
    pub prefill_s: f64,
    /// Its decode steps.
    pub decode_s: f64,
    /// `(wait + prefill + decode) / output tokens`.
    pub per_token_s: f64,
}

/// Everything the estimator predicts for one (request, expert) action.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ActionImpact {
    /// The new request's own predicted latency.
    pub own: OwnLatency,
    /// Whether its predicted per-token latency is under its SLO.
    pub own_meets_slo: bool,
    /// Predicted QoS of the new request: its predicted quality if it meets the SLO, else 0.
    pub own_predicted_qos: f64,
    /// Predicted quality of the running requests this action pushes over their SLO.
    pub predicted_qos_destroyed: f64,
    /// How many running requests it pushes over their SLO.
    pub pushed_over_slo: u32,
    /// Largest predicted per-token latency increase among running requests, seconds.
    pub max_increase_s_per_token: f64,
    /// Sum of the predicted per-token latency increases of running requests, seconds.
    pub sum_increase_s_per_token: f64,
}

/// Increase of a running request's per-token latency when a new request joins its expert
/// (the paper's formula generalised to the step model; see the module docs).
///
/// `running_output_tokens` is the running request's (predicted) total output `D_j`,
/// `running_generated_tokens` its tokens so far `d_j`.
pub fn latency_increase_s_per_token(
    model: &LatencyModel,
    new_prompt_tokens: f64,
    new_output_tokens: f64,
    running_output_tokens: f64,
    running_generated_tokens: f64,
) -> f64 {
    let shared = (running_output_tokens - running_generated_tokens)
        .min(new_output_tokens)
        .max(0.0);
    // Decode steps k = 1 ..= shared - 1; the new request's context is p + k at step k.
    let steps = (shared - 1.0).max(0.0);
    let per_step = model.decode_d_s_per_seq + model.decode_e_s_per_ctx_token * new_prompt_tokens;
    let added_s = model.prefill_s(new_prompt_tokens)
        + steps * per_step
        + model.decode_e_s_per_ctx_token * steps * (steps + 1.0) / 2.0;
    added_s / running_output_tokens.max(1.0)
}

/// Predicted final per-token latency of a running request if nothing else joins: it keeps
/// decoding at the current step time until its predicted output is reached.
pub fn predicted_per_token_latency_s(request: &InFlight, step_s: f64) -> f64 {
    let total = request.expected_output_tokens();
    let remaining = total - f64::from(request.generated_tokens);
    (request.elapsed_s + remaining * step_s) / total
}

/// Predicted queueing time of a new request at `expert` before the engine admits it.
///
/// Zero when it can start at once. Otherwise the requests already waiting go first: the new
/// one starts when the `(waiting + 1)`-th running request finishes, or, with more waiting
/// than running, after as many further rounds of typical service as the queue needs.
pub fn predicted_wait_s(expert: &ExpertState, prompt_tokens: u32, output_tokens: f64) -> f64 {
    if expert.can_admit_now(prompt_tokens, output_tokens) || expert.running.is_empty() {
        return 0.0;
    }
    let step = expert.decode_step_now_s();
    let mut remaining: Vec<f64> = expert
        .running
        .iter()
        .map(|r| (r.expected_output_tokens() - f64::from(r.generated_tokens)) * step)
        .collect();
    remaining.sort_by(f64::total_cmp);
    let ahead = expert.waiting.len();
    if let Some(&w) = remaining.get(ahead) {
        return w;
    }
    let last = remaining.last().copied().unwrap_or(0.0);
    let latency = &expert.profile.latency;
    let service: f64 = expert
        .waiting
        .iter()
        .map(|w| latency.prefill_s(f64::from(w.prompt_tokens)) + w.expected_output_tokens() * step)
        .sum::<f64>()
        / ahead.max(1) as f64;
    let rounds =
        ((ahead + 1 - remaining.len()) as f64 / f64::from(expert.profile.max_slots)).ceil();
    last + rounds * service
}

/// Predicted latency of the new request itself on `expert`.
pub fn predicted_own_latency(expert: &ExpertState, candidate: &Candidate) -> OwnLatency {
    let latency = &expert.profile.latency;
    let p = f64::from(candidate.prompt_tokens);
    let d = candidate.predicted_output_tokens.max(1.0);
    let wait_s = predicted_wait_s(expert, candidate.prompt_tokens, d);
    let prefill_s = latency.prefill_s(p);
    let batch = (expert.running.len() + 1).min(expert.profile.max_slots as usize) as f64;
    // The batch's context now plus the new request's context half-way through its answer.
    let context = expert.kv_used_tokens() as f64 + p + d / 2.0;
    let decode_s = (d - 1.0) * latency.decode_step_s(batch, context);
    OwnLatency {
        wait_s,
        prefill_s,
        decode_s,
        per_token_s: (wait_s + prefill_s + decode_s) / d,
    }
}

/// The action impact estimator: predicted own latency and QoS of the new request on
/// `expert`, and the QoS it is predicted to destroy among the requests running there.
///
/// A running request counts as destroyed when its predicted per-token latency is under its
/// SLO without the new request and at or over it with the new request. When the new request
/// must queue first, running requests predicted to finish during the wait are unaffected and
/// the others share fewer steps with it.
pub fn impact_of(expert: &ExpertState, candidate: &Candidate) -> ActionImpact {
    let own = predicted_own_latency(expert, candidate);
    let own_meets_slo = own.per_token_s < candidate.slo_s_per_token;
    let mut impact = ActionImpact {
        own,
        own_meets_slo,
        own_predicted_qos: if own_meets_slo {
            candidate.predicted_quality
        } else {
            0.0
        },
        ..ActionImpact::default()
    };
    let latency = &expert.profile.latency;
    let step = expert.decode_step_now_s();
    let steps_waited = if step > 0.0 { own.wait_s / step } else { 0.0 };
    let p = f64::from(candidate.prompt_tokens);
    let d = candidate.predicted_output_tokens.max(1.0);
    for running in &expert.running {
        let total = running.expected_output_tokens();
        let generated_at_join = f64::from(running.generated_tokens) + steps_waited;
        if generated_at_join >= total {
            continue;
        }
        let increase = latency_increase_s_per_token(latency, p, d, total, generated_at_join);
        let before = predicted_per_token_latency_s(running, step);
        impact.max_increase_s_per_token = impact.max_increase_s_per_token.max(increase);
        impact.sum_increase_s_per_token += increase;
        if before < running.slo_s_per_token && before + increase >= running.slo_s_per_token {
            impact.predicted_qos_destroyed += running.predicted_quality;
            impact.pushed_over_slo += 1;
        }
    }
    impact
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::expert::ExpertProfile;
    use crate::task::Task;

    fn paper_expert() -> ExpertProfile {
        ExpertProfile {
            name: "paper".into(),
            model: "qwen25_7b".into(),
            hardware: String::new(),
            source: String::new(),
            max_slots: 8,
            kv_tokens: 100_000,
            latency: LatencyModel::paper(7.2e-5, 2.5e-5, 0.0124),
        }
    }

    fn running(generated: u32, predicted_output: f64, elapsed: f64, slo: f64) -> InFlight {
        InFlight {
            id: 1,
            task: Task::Chat,
            prompt_tokens: 100,
            predicted_output_tokens: predicted_output,
            generated_tokens: generated,
            elapsed_s: elapsed,
            predicted_quality: 0.7,
            slo_s_per_token: slo,
        }
    }

    #[test]
    fn paper_worked_case_gives_3_3_ms_per_token() {
        // k1 = 7.2e-5, k2 = 2.5e-5, p = 100, d = 200, D_j = 300, d_j = 50:
        // m = 200; (7.2e-3 + 2.5e-5 * sum_{k=1}^{199} (100 + k)) / 300
        //   = (7.2e-3 + 2.5e-5 * 39_800) / 300 = 1.0022 / 300 = 3.3407e-3.
        let l = paper_expert().latency;
        let dl = latency_increase_s_per_token(&l, 100.0, 200.0, 300.0, 50.0);
        assert!((dl - 1.0022 / 300.0).abs() < 1e-12, "{dl}");
        assert!((dl - 3.3e-3).abs() < 0.05e-3);
    }

    #[test]
    fn increase_uses_the_shorter_overlap_and_the_per_sequence_term() {
        let l = LatencyModel {
            prefill_tok_s: 1000.0,
            decode_t0_s: 0.02,
            decode_d_s_per_seq: 0.001,
            decode_e_s_per_ctx_token: 1e-6,
        };
        // Running request has 10 tokens left, the new one wants 100: overlap m = 10,
        // steps k = 1..=9: 0.1 (prefill of 100) + 9*(0.001 + 1e-4) + 1e-6*45 = 0.109945.
        let dl = latency_increase_s_per_token(&l, 100.0, 100.0, 40.0, 30.0);
        assert!((dl - 0.109_945 / 40.0).abs() < 1e-12, "{dl}");
        // Nothing left to share: only the prefill stall counts.
        let dl = latency_increase_s_per_token(&l, 100.0, 100.0, 40.0, 39.0);
        assert!((dl - 0.1 / 40.0).abs() < 1e-12, "{dl}");
    }

    #[test]
    fn own_latency_on_an_idle_expert_is_prefill_plus_decode() {
        let e = ExpertState::idle(Arc::new(paper_expert()));
        let c = Candidate {
            prompt_tokens: 100,
            predicted_output_tokens: 200.0,
            predicted_quality: 0.9,
            slo_s_per_token: 0.03,
        };
        let own = predicted_own_latency(&e, &c);
        assert_eq!(own.wait_s, 0.0);
        assert!((own.prefill_s - 7.2e-3).abs() < 1e-12);
        // 199 steps of t0 + k2 * (100 + 100): 199 * (0.0124 + 0.005)
        assert!((own.decode_s - 199.0 * 0.0174).abs() < 1e-9);
        let impact = impact_of(&e, &c);
        assert!(impact.own_meets_slo);
        assert_eq!(impact.own_predicted_qos, 0.9);
        assert_eq!(impact.predicted_qos_destroyed, 0.0);
    }

    #[test]
    fn a_request_near_its_slo_is_destroyed_and_one_far_from_it_is_not() {
        let mut e = ExpertState::idle(Arc::new(paper_expert()));
        // Three running requests, each p = 100, D = 300, d = 50, elapsed 1.25 s.
        // Batch context 3 * 150 = 450: step = 0.0124 + 2.5e-5 * 450 = 0.02365 s.
        // Before: (1.25 + 250 * 0.02365) / 300 = 0.023875 s/token.
        // Increase (paper case): 1.0022 / 300 = 0.0033407; after: 0.0272157 s/token.
        e.running.push(running(50, 300.0, 1.25, 0.03)); // stays under 0.03
        e.running.push(InFlight {
            id: 2,
            ..running(50, 300.0, 1.25, 0.025)
        }); // pushed over
        e.running.push(InFlight {
            id: 3,
            ..running(50, 300.0, 1.25, 0.02)
        }); // already over
        let step = e.decode_step_now_s();
        assert!((step - 0.02365).abs() < 1e-12);
        let before = predicted_per_token_latency_s(&e.running[0], step);
        assert!((before - 0.023875).abs() < 1e-12);
        let c = Candidate {
            prompt_tokens: 100,
            predicted_output_tokens: 200.0,
            predicted_quality: 0.5,
            slo_s_per_token: 0.03,
        };
        let impact = impact_of(&e, &c);
        let dl = 1.0022 / 300.0;
        assert_eq!(impact.pushed_over_slo, 1);
        assert!((impact.predicted_qos_destroyed - 0.7).abs() < 1e-12);
        assert!((impact.max_increase_s_per_token - dl).abs() < 1e-12);
        assert!((impact.sum_increase_s_per_token - 3.0 * dl).abs() < 1e-12);
    }

    #[test]
    fn a_full_expert_makes_the_new_request_wait_for_the_first_finisher() {
        let mut profile = paper_expert();
        profile.max_slots = 2;
        let mut e = ExpertState::idle(Arc::new(profile));
        e.running.push(running(90, 100.0, 1.0, 0.1)); // 10 tokens left
        e.running.push(running(10, 100.0, 1.0, 0.1)); // 90 tokens left
        let step = e.decode_step_now_s();
        let wait = predicted_wait_s(&e, 50, 20.0);
        assert!((wait - 10.0 * step).abs() < 1e-12);
        // With one request already waiting the new one waits for the second finisher.
        e.waiting.push(running(0, 100.0, 0.1, 0.1));
        let wait = predicted_wait_s(&e, 50, 20.0);
        assert!((wait - 90.0 * step).abs() < 1e-12);
        // The request that finishes during the wait is not slowed at all.
        let impact = impact_of(
            &e,
            &Candidate {
                prompt_tokens: 50,
                predicted_output_tokens: 20.0,
                predicted_quality: 0.5,
                slo_s_per_token: 1.0,
            },
        );
        assert_eq!(impact.sum_increase_s_per_token, 0.0);
    }
}
