//! The cluster the decision benchmarks decide on: E experts and R requests in flight.
#![allow(dead_code)]

use std::sync::Arc;

use qosroute_core::{
    ArrivingRequest, ClusterState, ExpertProfile, ExpertState, InFlight, LatencyModel, Prediction,
    Request, Task,
};

/// E experts of 16 slots (speeds varying with the index) and R requests in flight spread
/// over them (16 running per expert, the rest waiting), 0-180 tokens into 200-token answers;
/// the arriving request is a 300-token MMLU prompt with a 0.05 s/token SLO.
pub fn state(experts: usize, in_flight: usize) -> (ClusterState, ArrivingRequest) {
    let mut cluster = ClusterState {
        now_s: 100.0,
        experts: Vec::new(),
    };
    for e in 0..experts {
        let profile = Arc::new(ExpertProfile {
            name: format!("e{e}"),
            model: "m".into(),
            hardware: String::new(),
            source: String::new(),
            max_slots: 16,
            kv_tokens: 100_000,
            latency: LatencyModel {
                prefill_tok_s: 2000.0 + 500.0 * e as f64,
                prefill_overhead_s: 0.0,
                decode_t0_s: 0.01 + 0.002 * e as f64,
                decode_d_s_per_seq: 0.0005,
                decode_e_s_per_ctx_token: 2e-7,
            },
        });
        cluster.experts.push(ExpertState::idle(profile));
    }
    for i in 0..in_flight {
        let e = i % experts;
        let r = InFlight {
            id: i as u64,
            task: Task::ALL[i % Task::COUNT],
            prompt_tokens: 100 + (i as u32 * 37) % 900,
            predicted_output_tokens: 200.0,
            generated_tokens: (i as u32 * 13) % 180,
            elapsed_s: 1.0 + (i % 7) as f64,
            slot_elapsed_s: 0.0,
            max_output_tokens: None,
            predicted_quality: 0.5,
            slo_s_per_token: 0.1,
        };
        let x = &mut cluster.experts[e];
        if x.running.len() < 16 {
            x.running.push(r)
        } else {
            x.waiting.push(r)
        }
    }
    let arriving = ArrivingRequest {
        request: Request {
            id: 9999,
            arrival_s: 100.0,
            task: Task::Mmlu,
            prompt_tokens: 300,
            slo_s_per_token: 0.05,
            max_output_tokens: None,
        },
        predictions: (0..experts)
            .map(|e| Prediction::point(180.0, 0.3 + 0.05 * e as f64))
            .collect(),
    };
    (cluster, arriving)
}
