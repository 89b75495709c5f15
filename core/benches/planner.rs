//! One decision of `qos-planner` for E experts and R requests in flight, K = 16 futures and
//! H = 20 sampled arrivals (the defaults). Target (issue 15): <= 5 ms at E = 8, R = 100 on one
//! core. Also the settings of the planner's cost/benefit table: K in {4, 16, 64} and
//! H in {0, 20, 100} at E = 8, R = 100.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use qosroute_core::{
    ArrivalWindow, Observed, OutputLengthPredictor, PlannerConfig, Policy, QosPlanner,
    QualityPredictor, Request, SimRng, Task,
};

mod common;
use common::state;

/// What a router has learned after a while: 2,000 completions with lengths spread like a
/// chat workload (log-uniform 10-600 tokens), quality priors per expert, and the last 256
/// arrivals of a Poisson stream at 2 requests/s.
struct Learned {
    lengths: OutputLengthPredictor,
    quality: QualityPredictor,
    arrivals: ArrivalWindow,
}

fn learned(experts: usize) -> Learned {
    let mut rng = SimRng::new(7);
    let mut lengths = OutputLengthPredictor::default();
    for i in 0..2000 {
        let tokens = (10.0 * 60f64.powf(rng.unit())) as u32;
        lengths.observe(Task::ALL[i % Task::COUNT], tokens);
    }
    let quality = QualityPredictor::new(
        (0..experts)
            .map(|e| [0.3 + 0.05 * e as f64; Task::COUNT])
            .collect(),
    );
    let mut arrivals = ArrivalWindow::default();
    let mut t = 0.0;
    for i in 0..256u64 {
        t += rng.exponential(2.0);
        arrivals.observe(&Request {
            id: i,
            arrival_s: t,
            task: Task::ALL[i as usize % Task::COUNT],
            prompt_tokens: 100 + (i as u32 * 53) % 900,
            slo_s_per_token: 0.1,
            max_output_tokens: None,
        });
    }
    Learned {
        lengths,
        quality,
        arrivals,
    }
}

fn planner(c: &mut Criterion) {
    let mut group = c.benchmark_group("planner_decision");
    group.sample_size(20);
    for experts in [3usize, 8] {
        let known = learned(experts);
        let observed = Observed {
            lengths: &known.lengths,
            quality: &known.quality,
            arrivals: &known.arrivals,
        };
        for in_flight in [10usize, 100] {
            let (s, a) = state(experts, in_flight);
            let mut p = QosPlanner::new(PlannerConfig::default(), 1);
            p.decide(&s, &a, &observed);
            group.bench_with_input(
                BenchmarkId::new(format!("E{experts}"), in_flight),
                &(s, a),
                |b, (s, a)| b.iter(|| p.decide(s, a, &observed)),
            );
        }
    }
    group.finish();

    let mut group = c.benchmark_group("planner_settings_E8_R100");
    group.sample_size(10);
    let known = learned(8);
    let observed = Observed {
        lengths: &known.lengths,
        quality: &known.quality,
        arrivals: &known.arrivals,
    };
    let (s, a) = state(8, 100);
    for k in [4usize, 16, 64] {
        for h in [0usize, 20, 100] {
            let config = PlannerConfig {
                futures: k,
                horizon: h,
                ..PlannerConfig::default()
            };
            let mut p = QosPlanner::new(config, 1);
            group.bench_function(BenchmarkId::new(format!("k{k}"), h), |b| {
                b.iter(|| p.decide(&s, &a, &observed))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, planner);
criterion_main!(benches);
