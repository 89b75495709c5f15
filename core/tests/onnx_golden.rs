//! The shipped model, run by tract, must reproduce the trainer's golden cases: f32 logits
//! within 1e-5 of PyTorch's (absolute), and identical decisions. The error relative to the
//! logit's magnitude is printed too: tract's vectorised exp and tanh differ from PyTorch's by a
//! few ULP, so a model with large logits (a previous 64-wide model had logits near 19) can
//! exceed an absolute 1e-5 without any error in the model. The int8 variant must decide as
//! f32 on all golden cases but at most one (what `policy-model/models/README.md` claims).

#![cfg(feature = "onnx")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::path::PathBuf;

use qosroute_core::EncodedState;
use qosroute_core::OnnxPolicy;
use qosroute_core::encoder::{EXPERT_FEATURES, IN_FLIGHT_FEATURES};
use serde_json::Value;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policy-model/models/han")
}

fn floats(v: &Value) -> Vec<f32> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn shape(v: &Value) -> Vec<usize> {
    v["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// Rebuilds the encoder's output from a golden case's input tensors.
fn encoded(case: &Value) -> EncodedState {
    let inputs = &case["inputs"];
    let e = shape(&inputs["expert"])[1];
    let r = shape(&inputs["running"])[1];
    let w = shape(&inputs["waiting"])[1];
    assert_eq!(shape(&inputs["expert"])[2], EXPERT_FEATURES);
    assert_eq!(shape(&inputs["running"])[2], IN_FLIGHT_FEATURES);
    assert!(
        floats(&inputs["expert_valid"]).iter().all(|v| *v == 1.0),
        "golden cases are unpadded"
    );
    EncodedState {
        experts: e,
        running: r,
        waiting: w,
        request: floats(&inputs["request"]),
        expert: floats(&inputs["expert"]),
        running_nodes: floats(&inputs["running"]),
        waiting_nodes: floats(&inputs["waiting"]),
        running_adj: floats(&inputs["running_adj"]),
        waiting_adj: floats(&inputs["waiting_adj"]),
        action_mask: floats(&inputs["action_mask"]),
        ..EncodedState::default()
    }
}

fn golden() -> Vec<Value> {
    let text = std::fs::read_to_string(model_dir().join("golden.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["cases"].as_array().unwrap().clone()
}

#[test]
fn shipped_f32_model_matches_the_trainer() {
    let mut policy = OnnxPolicy::load(&model_dir().join("router-f32.onnx")).unwrap();
    let cases = golden();
    assert!(cases.len() >= 8);
    let (mut worst, mut worst_scaled) = (0.0f32, 0.0f32);
    for (i, case) in cases.iter().enumerate() {
        let expected = floats(&case["logits"]);
        let got = policy.logits_of(&encoded(case)).unwrap();
        assert_eq!(got.len(), expected.len());
        for (g, x) in got.iter().zip(&expected) {
            if *x > -1e8 {
                worst = worst.max((g - x).abs());
                worst_scaled = worst_scaled.max((g - x).abs() / x.abs().max(1.0));
            }
        }
        let action = got
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(a, _)| a as u64)
            .unwrap();
        assert_eq!(
            action,
            case["action"].as_u64().unwrap(),
            "case {i}: decision differs"
        );
    }
    println!(
        "f32: {} golden cases, max |logit diff| {worst:.2e}, relative to magnitude {worst_scaled:.2e}",
        cases.len()
    );
    // f32 agreement relative to the logit's magnitude (at least 1): the logits of a trained
    // model reach tens, where 1e-5 absolute is below f32's resolution of the sums.
    assert!(
        worst_scaled <= 1e-5,
        "max |diff| {worst}, relative to magnitude {worst_scaled}"
    );
}

#[test]
fn shipped_int8_model_decides_as_f32_on_all_golden_cases_but_one() {
    let mut policy = OnnxPolicy::load(&model_dir().join("router-int8.onnx")).unwrap();
    let cases = golden();
    let mut agree = 0;
    for case in &cases {
        let got = policy.logits_of(&encoded(case)).unwrap();
        assert!(got.iter().all(|v| v.is_finite()));
        let action = got
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(a, _)| a as u64);
        agree += usize::from(action == case["action"].as_u64());
    }
    println!(
        "int8: decisions agree with f32 torch on {agree}/{} golden cases",
        cases.len()
    );
    // What the models README claims: int8 decides as f32 on all but at most one golden case.
    assert!(
        agree + 1 >= cases.len(),
        "int8 agrees with f32 on {agree}/{} golden cases; the README claims all but one",
        cases.len()
    );
}

#[test]
fn prepared_plans_are_not_compiled_again_by_decisions_of_those_sizes() {
    let mut policy = OnnxPolicy::load(&model_dir().join("router-f32.onnx")).unwrap();
    // A golden case with 9-32 running nodes and at most 8 waiting ones.
    let state = golden()
        .iter()
        .map(encoded)
        .find(|s| (9..=32).contains(&s.running) && s.waiting <= 8)
        .expect("a golden case with 9-32 running nodes");
    let at_load = policy.plans_compiled();
    // Running buckets 8 .. bucket(R) (powers of two), each with waiting buckets 8 and 16;
    // the (E, bucket(R), 8) plan serves the case.
    let buckets = (state.running.next_power_of_two().max(8) / 8).trailing_zeros() as usize + 1;
    assert_eq!(
        policy.prepare(state.experts, state.running).unwrap(),
        2 * buckets
    );
    assert_eq!(policy.plans_compiled(), at_load + 2 * buckets as u64);
    assert_eq!(
        policy.prepare(state.experts, state.running).unwrap(),
        0,
        "already compiled"
    );
    policy.logits_of(&state).unwrap();
    assert_eq!(
        policy.plans_compiled(),
        at_load + 2 * buckets as u64,
        "no compile at decision time"
    );
    let bigger = golden()
        .iter()
        .map(encoded)
        .find(|s| s.running > state.running.next_power_of_two().max(8))
        .expect("a case beyond the prepared buckets");
    policy.logits_of(&bigger).unwrap();
    assert_eq!(
        policy.plans_compiled(),
        at_load + 2 * buckets as u64 + 1,
        "a new size compiles once"
    );
}
