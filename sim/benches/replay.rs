//! Simulator speed: replay the whole one-hour Azure conversation trace (19,366 requests) on
//! the edge-mixed catalogue with `least-loaded` and with `qos-greedy`.
//! Target (issue 3): one replay in under 0.5 s on one core.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qosroute_core::baseline;
use qosroute_sim::{Catalogue, QualityTable, Simulation, generate};

fn replay_conv_hour(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let catalogue = Catalogue::load(&root.join("configs/experts/edge-mixed.toml")).unwrap();
    let quality = QualityTable::embedded().unwrap();
    let spec = format!(
        "trace:{}",
        root.join("data/traces/azure-llm-2023-conv.csv").display()
    );
    let workload = generate(&spec, &quality, 1).unwrap();
    let mut group = c.benchmark_group("replay_conv_hour_edge_mixed");
    group.throughput(Throughput::Elements(workload.requests.len() as u64));
    group.sample_size(20);
    for policy in ["least-loaded", "qos-greedy"] {
        group.bench_function(policy, |b| {
            b.iter(|| {
                let mut p = baseline(policy, 1).unwrap();
                Simulation::new(&catalogue, &quality, &workload, 1)
                    .unwrap()
                    .run(&mut p)
                    .unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, replay_conv_hour);
criterion_main!(benches);
