//! Quality of service of one request and the reward of one routing decision (DESIGN §1).

/// Per-token latency of a finished request: `(t_finish - t_arrival) / output_tokens`
/// (queueing + prefill + decode, spread over the tokens produced).
pub fn per_token_latency_s(arrival_s: f64, finish_s: f64, output_tokens: u32) -> f64 {
    (finish_s - arrival_s) / f64::from(output_tokens.max(1))
}

/// Whether a per-token latency meets its SLO: strictly under it (at the SLO is a miss).
pub fn slo_met(per_token_latency_s: f64, slo_s_per_token: f64) -> bool {
    per_token_latency_s < slo_s_per_token
}

/// QoS of a served request: its answer quality if the per-token latency is under the SLO
/// ([`slo_met`]), else 0. A rejected request earns 0 and is not passed here.
pub fn qos(quality: f64, per_token_latency_s: f64, slo_s_per_token: f64) -> f64 {
    if slo_met(per_token_latency_s, slo_s_per_token) {
        quality
    } else {
        0.0
    }
}

/// The reward of one decision: the QoS of every request completed since the previous
/// decision, minus the QoS this action is predicted to destroy on the chosen expert.
pub fn reward(qos_completed_since_last_decision: f64, predicted_qos_destroyed: f64) -> f64 {
    qos_completed_since_last_decision - predicted_qos_destroyed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos_is_quality_under_the_slo_and_zero_at_or_over_it() {
        assert_eq!(qos(0.8, 0.029, 0.03), 0.8);
        assert_eq!(qos(0.8, 0.03, 0.03), 0.0, "the SLO is a strict bound");
        assert_eq!(qos(0.8, 0.5, 0.03), 0.0);
        assert!(slo_met(0.029, 0.03) && !slo_met(0.03, 0.03));
        assert!(!slo_met(f64::NAN, 0.03), "an unknown latency is no success");
    }

    #[test]
    fn per_token_latency_counts_everything_since_arrival() {
        assert!((per_token_latency_s(10.0, 13.0, 100) - 0.03).abs() < 1e-12);
        assert_eq!(per_token_latency_s(1.0, 2.0, 0), 1.0);
    }

    #[test]
    fn reward_subtracts_predicted_destruction() {
        assert_eq!(reward(1.5, 0.5), 1.0);
    }
}
