//! The action impact estimator (DESIGN §1): what putting a new request on an expert does to
//! the new request itself and to every request already there.
//!
//! The paper's increase of running request j's per-token latency when a request with prompt
//! `p` and output `d` joins is `dl_j = (k1*p + k2*sum_{k=1}^{m_j-1}(p+k)) / D_j` with
//! `m_j = min(D_j - d_j, d)`. Generalised to the step model of [`LatencyModel`]: the new
//! prompt's prefill stalls j once (`prefill_overhead_s + p / prefill_tok_s`), then each of the
//! `m_j - 1` decode steps they share grows by `d_s_per_seq + e_s_per_ctx_token * (p + k)`.
//! With `d_s_per_seq = 0`, `e_s_per_ctx_token = k2` and no prefill overhead this is exactly
//! the paper's formula.
//!
//! What each request would see without the action, and when the new request would start,
//! come from the expert's [`Forecast`]: the prefill still ahead of requests that have no
//! token yet, the queue admitted first come first served with each admission's prefill
//! stalling the batch. The requests affected are those still on the expert when the new one
//! is admitted, waiting ones included (they run beside it once admitted ahead of it).
//!
//! All lengths here are *predicted* (the router never knows true output lengths).

use crate::expert::LatencyModel;
use crate::forecast::Forecast;
pub use crate::forecast::{remaining_prefill_s, remaining_steps};
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
    /// Queueing until the engine admits it (the prefill in progress, and the requests ahead
    /// of it that must finish to free a slot or KV room).
    pub wait_s: f64,
    /// Its prefill.
    pub prefill_s: f64,
    /// Prefill of requests queued ahead of it that the engine admits with it: one iteration
    /// prefills them together, so its first token waits for them.
    pub queued_prefill_s: f64,
    /// Its decode steps.
    pub decode_s: f64,
    /// `(wait + prefill + queued prefill + decode) / output tokens`.
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
    /// Predicted quality of the requests on the expert this action pushes over their SLO.
    pub predicted_qos_destroyed: f64,
    /// How many requests it pushes over their SLO.
    pub pushed_over_slo: u32,
    /// Largest predicted per-token latency increase among the requests there, seconds.
    pub max_increase_s_per_token: f64,
    /// Sum of the predicted per-token latency increases of the requests there, seconds.
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

/// Predicted final per-token latency of a running request if nothing else joins and nothing
/// queued is admitted: the time so far, the prefill still ahead of it, and its remaining
/// decode steps at the current step time, over its predicted output.
pub fn predicted_per_token_latency_s(
    request: &InFlight,
    latency: &LatencyModel,
    step_s: f64,
) -> f64 {
    let total = request.expected_output_tokens();
    (request.elapsed_s
        + remaining_prefill_s(latency, request, true)
        + remaining_steps(request) * step_s)
        / total
}

/// Predicted queueing time of a new request at `expert` before the engine admits it (see
/// [`Forecast`]).
pub fn predicted_wait_s(expert: &ExpertState, prompt_tokens: u32, output_tokens: f64) -> f64 {
    Forecast::of(expert, prompt_tokens, output_tokens).new_admit_s
}

fn own_latency(expert: &ExpertState, candidate: &Candidate, forecast: &Forecast) -> OwnLatency {
    let latency = &expert.profile.latency;
    let p = f64::from(candidate.prompt_tokens);
    let d = candidate.predicted_output_tokens.max(1.0);
    let wait_s = forecast.new_admit_s;
    let prefill_s = latency.prefill_s(p);
    let queued_prefill_s = forecast.new_batched_prefill_s;
    // The batch's context now plus the new request's context half-way through its answer.
    let context = expert.kv_used_tokens() as f64 + p + d / 2.0;
    let decode_s = (d - 1.0) * latency.decode_step_s(forecast.new_batch as f64, context);
    OwnLatency {
        wait_s,
        prefill_s,
        queued_prefill_s,
        decode_s,
        per_token_s: (wait_s + prefill_s + queued_prefill_s + decode_s) / d,
    }
}

/// Predicted latency of the new request itself on `expert`.
pub fn predicted_own_latency(expert: &ExpertState, candidate: &Candidate) -> OwnLatency {
    let forecast = Forecast::of(
        expert,
        candidate.prompt_tokens,
        candidate.predicted_output_tokens.max(1.0),
    );
    own_latency(expert, candidate, &forecast)
}

/// The action impact estimator: predicted own latency and QoS of the new request on
/// `expert`, and the QoS it is predicted to destroy among the requests there.
///
/// A request counts as destroyed when its predicted per-token latency is under its SLO
/// without the new request and at or over it with the new request. Requests predicted to
/// finish before the new one is admitted are unaffected; the others share fewer steps with
/// it the later it starts.
pub fn impact_of(expert: &ExpertState, candidate: &Candidate) -> ActionImpact {
    impact_of_with(expert, candidate, &mut ImpactScratch::default())
}

/// The estimator's per-request predictions, kept for whoever wants more than the totals (the
/// state encoder), and its buffers, reused between calls.
#[derive(Debug, Clone, Default)]
pub struct ImpactScratch {
    /// The expert's forecast.
    pub forecast: Forecast,
    /// Predicted per-token latency of each running request without the action.
    pub running_before: Vec<f64>,
    /// Its predicted increase with the action (0 if it finishes first).
    pub running_increase: Vec<f64>,
    /// Predicted per-token latency of each waiting request without the action.
    pub waiting_before: Vec<f64>,
    /// Its predicted increase with the action.
    pub waiting_increase: Vec<f64>,
    /// Whether to keep the per-request predictions above (the totals are always computed);
    /// off, they stay empty and the estimator is cheaper.
    pub per_request: bool,
}

/// [`impact_of`], reusing `scratch`'s buffers and leaving the per-request predictions in it.
pub fn impact_of_with(
    expert: &ExpertState,
    candidate: &Candidate,
    scratch: &mut ImpactScratch,
) -> ActionImpact {
    let p = f64::from(candidate.prompt_tokens);
    let d = candidate.predicted_output_tokens.max(1.0);
    scratch.forecast.compute(expert, candidate.prompt_tokens, d);
    let forecast = &scratch.forecast;
    let own = own_latency(expert, candidate, forecast);
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
    let step = forecast.step_s;
    let join = forecast.new_admit_s;
    let mut consider = |r: &InFlight, finish_s: f64, decoding_from_s: f64| -> (f64, f64) {
        let total = r.expected_output_tokens();
        let before = (r.elapsed_s + finish_s) / total;
        if finish_s <= join {
            return (before, 0.0);
        }
        let steps_by_join = if step > 0.0 {
            ((join - decoding_from_s) / step).max(0.0)
        } else {
            0.0
        };
        let generated_at_join = f64::from(r.generated_tokens.max(1)) + steps_by_join;
        if generated_at_join >= total {
            return (before, 0.0);
        }
        let increase = latency_increase_s_per_token(latency, p, d, total, generated_at_join);
        impact.max_increase_s_per_token = impact.max_increase_s_per_token.max(increase);
        impact.sum_increase_s_per_token += increase;
        if before < r.slo_s_per_token && before + increase >= r.slo_s_per_token {
            impact.predicted_qos_destroyed += r.predicted_quality;
            impact.pushed_over_slo += 1;
        }
        (before, increase)
    };
    let keep = scratch.per_request;
    scratch.running_before.clear();
    scratch.running_increase.clear();
    for (r, &finish) in expert.running.iter().zip(&forecast.running_finish_s) {
        let (before, increase) = consider(r, finish, forecast.running_prefill_s);
        if keep {
            scratch.running_before.push(before);
            scratch.running_increase.push(increase);
        }
    }
    scratch.waiting_before.clear();
    scratch.waiting_increase.clear();
    for ((w, &finish), &admit) in expert
        .waiting
        .iter()
        .zip(&forecast.waiting_finish_s)
        .zip(&forecast.waiting_admit_s)
    {
        let prefill = latency.prefill_s(f64::from(w.prompt_tokens));
        let (before, increase) = consider(w, finish, admit + prefill);
        if keep {
            scratch.waiting_before.push(before);
            scratch.waiting_increase.push(increase);
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
            slot_elapsed_s: 0.0,
            max_output_tokens: None,
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
            prefill_overhead_s: 0.0,
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
        let before = predicted_per_token_latency_s(&e.running[0], &e.profile.latency, step);
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
        // With one request already waiting the new one waits for the second finisher, and
        // the waiting request's prefill (100 tokens: 7.2 ms), admitted at the first finish,
        // stalls the second one first.
        e.waiting.push(running(0, 100.0, 0.1, 0.1));
        let wait = predicted_wait_s(&e, 50, 20.0);
        assert!((wait - (90.0 * step + 7.2e-3)).abs() < 1e-12, "{wait}");
        // The request that finishes during the wait is not slowed at all; nor is the one
        // that frees the slot; the waiting one, admitted ahead, runs beside the new one.
        let mut scratch = ImpactScratch {
            per_request: true,
            ..ImpactScratch::default()
        };
        let impact = impact_of_with(
            &e,
            &Candidate {
                prompt_tokens: 50,
                predicted_output_tokens: 20.0,
                predicted_quality: 0.5,
                slo_s_per_token: 1.0,
            },
            &mut scratch,
        );
        assert_eq!(scratch.running_increase, vec![0.0, 0.0]);
        assert!(scratch.waiting_increase[0] > 0.0);
        assert_eq!(impact.sum_increase_s_per_token, scratch.waiting_increase[0]);
    }

    fn expert_10ms(slots: u32) -> ExpertState {
        crate::testing::expert_10ms("paper", slots, 100_000)
    }

    #[test]
    fn a_request_in_prefill_still_has_its_prefill_ahead() {
        // 400-token prompt at 1,000 tokens/s: 0.4 s of prefill, 0.1 s done; 50 tokens
        // predicted, so 49 steps of 10 ms after the prefill; 0.5 s since it arrived.
        let e = expert_10ms(4);
        let mut r = running(0, 50.0, 0.5, 0.1);
        r.prompt_tokens = 400;
        r.slot_elapsed_s = 0.1;
        let l = e.profile.latency;
        let before = predicted_per_token_latency_s(&r, &l, 0.01);
        assert!(
            (before - (0.5 + 0.3 + 0.49) / 50.0).abs() < 1e-12,
            "{before}"
        );
        // A prefill overhead is part of what is ahead.
        let mut with_overhead = l;
        with_overhead.prefill_overhead_s = 0.05;
        let before = predicted_per_token_latency_s(&r, &with_overhead, 0.01);
        assert!(
            (before - (0.5 + 0.35 + 0.49) / 50.0).abs() < 1e-12,
            "{before}"
        );
        // A new request arriving now waits for that prefill to end before its own.
        let mut e = e;
        e.running.push(r);
        assert!((predicted_wait_s(&e, 100, 10.0) - 0.3).abs() < 1e-12);
        let own = predicted_own_latency(
            &e,
            &Candidate {
                prompt_tokens: 100,
                predicted_output_tokens: 10.0,
                predicted_quality: 0.9,
                slo_s_per_token: 1.0,
            },
        );
        // 0.3 s wait, 0.1 s prefill, 9 steps of 10 ms, over 10 tokens.
        assert!((own.per_token_s - (0.3 + 0.1 + 0.09) / 10.0).abs() < 1e-12);
    }

    #[test]
    fn a_queue_on_an_idle_expert_delays_the_new_request() {
        // One slot, nothing running, one request waiting (100-token prompt, 11 tokens): it
        // is admitted first, prefills for 0.1 s and decodes 10 steps (0.1 s); the new request
        // starts at 0.2 s.
        let mut e = expert_10ms(1);
        e.waiting.push(running(0, 11.0, 0.0, 1.0));
        assert!((predicted_wait_s(&e, 100, 10.0) - 0.2).abs() < 1e-12);
        // With a second slot it is admitted with the queued one: their prompts are one prefill
        // iteration, so the queued prefill delays its first token.
        let e2 = expert_10ms(2);
        let mut e2 = e2;
        e2.waiting.push(running(0, 11.0, 0.0, 1.0));
        let c = Candidate {
            prompt_tokens: 200,
            predicted_output_tokens: 10.0,
            predicted_quality: 0.9,
            slo_s_per_token: 1.0,
        };
        let own = predicted_own_latency(&e2, &c);
        assert_eq!(own.wait_s, 0.0);
        assert!((own.queued_prefill_s - 0.1).abs() < 1e-12);
        assert!((own.prefill_s - 0.2).abs() < 1e-12);
        assert!((own.per_token_s - (0.1 + 0.2 + 0.09) / 10.0).abs() < 1e-12);
    }

    #[test]
    fn the_new_prompts_prefill_overhead_stalls_the_running_requests() {
        // The increase of the paper's worked case, plus a 20 ms overhead over 300 tokens.
        let mut l = paper_expert().latency;
        l.prefill_overhead_s = 0.02;
        let dl = latency_increase_s_per_token(&l, 100.0, 200.0, 300.0, 50.0);
        assert!((dl - (1.0022 + 0.02) / 300.0).abs() < 1e-12, "{dl}");
    }
}
