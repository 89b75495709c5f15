//! One decision of the learned router (encode + tract inference + argmax) for E experts and
//! R requests in flight, f32 and int8. Target (issue 4): p50 <= 100 us at E = 8, R = 100.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use qosroute_core::{
    ArrivingRequest, ClusterState, EncodedState, ExpertProfile, ExpertState, InFlight,
    LatencyModel, Observed, OnnxPolicy, Policy, Prediction, Request, Task, encode_state,
};

fn state(experts: usize, in_flight: usize) -> (ClusterState, ArrivingRequest) {
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

fn decision(c: &mut Criterion) {
    // QOSROUTE_MODEL_DIR benchmarks another export (e.g. to compare two in one run).
    let dir = std::env::var_os("QOSROUTE_MODEL_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policy-model/models/han"),
        PathBuf::from,
    );
    for variant in ["f32", "int8"] {
        let mut policy = OnnxPolicy::load(&dir.join(format!("router-{variant}.onnx"))).unwrap();
        let mut group = c.benchmark_group(format!("decision_{variant}"));
        group.sample_size(30);
        for experts in [3usize, 8, 16] {
            for in_flight in [10usize, 100, 400] {
                let (s, a) = state(experts, in_flight);
                policy.decide(&s, &a, &Observed::nothing());
                assert_eq!(
                    policy.fallbacks(),
                    0,
                    "inference failed at E={experts} R={in_flight}"
                );
                group.bench_with_input(
                    BenchmarkId::new(format!("E{experts}"), in_flight),
                    &(s, a),
                    |b, (s, a)| b.iter(|| policy.decide(s, a, &Observed::nothing())),
                );
            }
        }
        group.finish();
    }
}

/// The encoder alone (state -> tensors), to tell its share of a decision from tract's.
fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.sample_size(30);
    let mut out = EncodedState::default();
    for experts in [3usize, 8, 16] {
        for in_flight in [10usize, 100, 400] {
            let (s, a) = state(experts, in_flight);
            group.bench_with_input(
                BenchmarkId::new(format!("E{experts}"), in_flight),
                &(s, a),
                |b, (s, a)| b.iter(|| encode_state(s, a, &mut out)),
            );
        }
    }
    group.finish();
}

criterion_group!(benches, decision, encode);
criterion_main!(benches);
