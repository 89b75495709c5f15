//! One decision of the learned router (encode + tract inference + argmax) for E experts and
//! R requests in flight, f32 and int8. Target (issue 4): p50 <= 100 us at E = 8, R = 100.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use qosroute_core::{EncodedState, Observed, OnnxPolicy, Policy, encode_state};

mod common;
use common::state;

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
