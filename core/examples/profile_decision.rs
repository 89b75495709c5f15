//! Where the learned router's decision time goes: runs a model through tract at one graph size,
//! symbolic plan versus concrete plan (what `OnnxPolicy` uses), and prints the time per tract op
//! type (or per node with `--per-node`).
//!
//!     cargo run --release -p qosroute-core --features onnx --example profile_decision -- \
//!         policy-model/models/han/router-f32.onnx 8 100 1 [--per-node]
//!
//! Arguments: model, experts E, running nodes R, waiting nodes W (as padded). The inputs are
//! synthetic: timing does not depend on their values. Timings are wall-clock medians on
//! whatever else the machine is doing; compare the two plans within one run.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::collections::HashMap;
use std::time::Instant;

use qosroute_core::encoder::{EXPERT_FEATURES, IN_FLIGHT_FEATURES, REQUEST_FEATURES};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::eval;

fn inputs(e: usize, r: usize, w: usize) -> TVec<TValue> {
    let filled = |shape: &[usize], f: &dyn Fn(usize) -> f32| -> TValue {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(f).collect();
        Tensor::from_shape(shape, &data).unwrap().into()
    };
    let varied = |i: usize| ((i * 7919) % 100) as f32 / 100.0;
    let edge = |i: usize| if i.is_multiple_of(3) { 1.0 } else { 0.0 };
    tvec![
        filled(&[1, REQUEST_FEATURES], &varied),
        filled(&[1, e, EXPERT_FEATURES], &varied),
        filled(&[1, r, IN_FLIGHT_FEATURES], &varied),
        filled(&[1, w, IN_FLIGHT_FEATURES], &varied),
        filled(&[1, e, r], &edge),
        filled(&[1, e, w], &edge),
        filled(&[1, e], &|_| 1.0),
        filled(&[1, e + 1], &|_| 1.0),
    ]
}

fn median_us(plan: &Arc<TypedSimplePlan>, inputs: &TVec<TValue>) -> f64 {
    let mut state = plan.spawn().unwrap();
    for _ in 0..200 {
        state.run(inputs.clone()).unwrap();
    }
    let mut times: Vec<f64> = (0..2000)
        .map(|_| {
            let t = Instant::now();
            state.run(inputs.clone()).unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let per_node = args.iter().any(|a| a == "--per-node");
    let num =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let path = args.get(1).expect("usage: MODEL [E R W] [--per-node]");
    let (e, r, w) = (num(2, 8), num(3, 100), num(4, 1));
    let typed = tract_onnx::onnx()
        .model_for_path(path)
        .unwrap()
        .into_typed()
        .unwrap()
        .into_decluttered()
        .unwrap();
    let symbolic = typed
        .clone()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let mut values = HashMap::new();
    for (name, v) in [
        ("batch", 1),
        ("experts", e),
        ("running", r),
        ("waiting", w),
        ("actions", e + 1),
    ] {
        values.insert(typed.symbols.sym(name), v.to_dim());
    }
    let t = Instant::now();
    let concrete = typed
        .set_symbols(&values)
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let x = inputs(e, r, w);
    println!("E{e} R{r} W{w}");
    println!(
        "  symbolic plan: {:4} nodes, p50 {:7.1} us",
        symbolic.model().nodes().len(),
        median_us(&symbolic, &x)
    );
    println!(
        "  concrete plan: {:4} nodes, p50 {:7.1} us (compiled in {compile_ms:.1} ms)",
        concrete.model().nodes().len(),
        median_us(&concrete, &x)
    );

    let mut state = concrete.spawn().unwrap();
    let mut spent: HashMap<String, (f64, usize)> = HashMap::new();
    let runs = 500;
    for _ in 0..runs {
        state
            .run_plan_with_eval(x.clone(), |session, op_state, node, input| {
                let t = Instant::now();
                let out = eval(session, op_state, node, input);
                let key = if per_node {
                    format!(
                        "{} {} {:?}",
                        node.op.name(),
                        node.name,
                        node.outputs[0].fact.shape
                    )
                } else {
                    node.op.name().to_string()
                };
                let entry = spent.entry(key).or_default();
                entry.0 += t.elapsed().as_secs_f64() * 1e6;
                entry.1 += 1;
                out
            })
            .unwrap();
    }
    let mut rows: Vec<_> = spent.into_iter().collect();
    rows.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    let total: f64 = rows.iter().map(|(_, (t, _))| t).sum::<f64>() / runs as f64;
    println!("  time inside ops (concrete, timed one by one): {total:.1} us");
    for (key, (t, n)) in rows.iter().take(30) {
        println!("    {:>7.1} us  x{:<3} {key}", t / runs as f64, n / runs);
    }
}
