//! What the learned router costs in memory: the process's resident set after loading the model
//! and after preparing each inference plan, as the daemon does at start.
//!
//!     cargo run --release -p qosroute-core --features onnx --example plan_memory -- \
//!         policy-model/models/han/router-f32.onnx 6 128
//!
//! Arguments: model, experts E, running nodes R (plans for every running bucket up to R, with
//! the two smallest waiting buckets). Linux only (reads /proc/self/status).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

use std::path::PathBuf;

use qosroute_core::OnnxPolicy;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn rss_kib() -> u64 {
    status_kib("VmRSS:")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = PathBuf::from(&args[0]);
    let experts: usize = args[1].parse().unwrap();
    let running: usize = args[2].parse().unwrap();
    let start = rss_kib();
    println!(
        "before the model: {start} KiB (anonymous {} KiB)",
        status_kib("RssAnon:")
    );
    let mut policy = OnnxPolicy::load(&model).unwrap();
    let loaded = rss_kib();
    println!(
        "model loaded ({} plan): {loaded} KiB (+{} KiB; anonymous {} KiB)",
        policy.plans_compiled(),
        loaded - start,
        status_kib("RssAnon:")
    );
    let mut previous = loaded;
    let mut r = 1;
    while r <= running {
        policy.prepare(experts, r).unwrap();
        let now = rss_kib();
        println!(
            "plans for up to {r:>4} running nodes: {} plans, {now} KiB (+{} KiB)",
            policy.plans_compiled(),
            now - previous
        );
        previous = now;
        r = qosroute_core::onnx::node_bucket(r) + 1;
    }
    println!(
        "total for the router: +{} KiB (now anonymous {} KiB, file-backed {} KiB: code and \
         read-only data of the binary)",
        previous - start,
        status_kib("RssAnon:"),
        status_kib("RssFile:")
    );
}
