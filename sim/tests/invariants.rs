//! Property tests of the simulator's invariants on random clusters, workloads and policies.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use proptest::prelude::*;
use qosroute_core::{BASELINE_NAMES, ExpertProfile, LatencyModel, SloTable, baseline};
use qosroute_sim::{Catalogue, QualityTable, Simulation, Workload, generate};

use common::{Recording, assert_every_request_ends_once, run_checked};

type Coefficients = (u32, u64, f64, f64, f64, f64);

fn expert(i: usize, (slots, kv, pf, t0, d, e): Coefficients, model: &str) -> ExpertProfile {
    ExpertProfile {
        name: format!("e{i}"),
        model: model.into(),
        hardware: String::new(),
        source: String::new(),
        max_slots: slots,
        kv_tokens: kv,
        latency: LatencyModel {
            prefill_tok_s: pf,
            prefill_overhead_s: 0.0,
            decode_t0_s: t0,
            decode_d_s_per_seq: d,
            decode_e_s_per_ctx_token: e,
        },
    }
}

fn catalogue_strategy() -> impl Strategy<Value = Catalogue> {
    let models = ["qwen25_7b", "llama31_8b", "mistral7b", "gemma2_9b"];
    prop::collection::vec(
        (
            1u32..8,
            200u64..20_000,
            200.0f64..8000.0,
            0.005f64..0.06,
            0.0f64..0.01,
            0.0f64..1e-5,
            0usize..4,
        ),
        1..5,
    )
    .prop_map(move |raw| Catalogue {
        name: "random".into(),
        description: String::new(),
        slo: SloTable {
            default_s_per_token: 0.08,
            per_task: Default::default(),
        },
        experts: raw
            .into_iter()
            .enumerate()
            .map(|(i, (s, kv, pf, t0, d, e, m))| expert(i, (s, kv, pf, t0, d, e), models[m]))
            .collect(),
    })
}

fn quality() -> &'static QualityTable {
    use std::sync::OnceLock;
    static Q: OnceLock<QualityTable> = OnceLock::new();
    Q.get_or_init(|| QualityTable::embedded().unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Every request ends exactly once; no expert exceeds its slots or KV (engine audits after
    /// every event); simulated time never goes back.
    #[test]
    fn simulation_invariants_hold(
        catalogue in catalogue_strategy(),
        rate in 0.2f64..20.0,
        n in 1usize..250,
        policy in 0usize..BASELINE_NAMES.len(),
        seed in 0u64..1000,
        bursty in any::<bool>(),
    ) {
        let spec = if bursty {
            format!("bursty:low={},high={},dwell=5,n={n}", rate / 4.0, rate * 2.0)
        } else {
            format!("poisson:rate={rate},n={n}")
        };
        let workload = generate(&spec, quality(), seed).unwrap();
        let mut p = baseline(BASELINE_NAMES[policy], seed).unwrap();
        let sim = Simulation::new(&catalogue, quality(), &workload, seed).unwrap();
        // Keep the records: run by hand so they can be inspected after the run.
        let mut sim = sim.with_audit(true);
        while let Some((state, arriving, observed)) = sim.next_decision().unwrap() {
            let d = p.decide(state, arriving, &observed);
            let step = sim.apply(d).unwrap();
            prop_assert!(!step.invalid, "{} made an invalid decision", BASELINE_NAMES[policy]);
        }
        sim.drain().unwrap();
        let records = sim.records().to_vec();
        let report = sim.finish(BASELINE_NAMES[policy]).unwrap();
        assert_every_request_ends_once(&records, &report);
        let qos: f64 = records.iter().map(|r| r.qos).sum();
        prop_assert!((report.avg_qos - qos / n as f64).abs() < 1e-9);
        prop_assert!(report.experts.iter().all(|e| e.utilisation <= 1.0 + 1e-9));
    }
}

/// What a policy is shown for request k never depends on request k's own truth (its output
/// length and its answer quality), nor on the truth of any request after it.
#[test]
fn predictions_never_read_the_truth() {
    let catalogue = common::catalogue("paper-3x7b");
    let q = quality();
    let base = generate("poisson:rate=3,n=400", q, 7).unwrap();
    let shown = |w: &Workload| {
        let mut p = Recording {
            inner: baseline("qos-greedy", 7).unwrap(),
            seen: Vec::new(),
        };
        run_checked(Simulation::new(&catalogue, q, w, 7).unwrap(), &mut p).unwrap();
        p.seen
    };
    let original = shown(&base);
    for k in [0usize, 57, 200, 399] {
        let mut changed = base.clone();
        for r in &mut changed.requests[k..] {
            r.output_tokens = r.output_tokens * 3 + 17;
            // Another workload row of the same task with different true quality: what the
            // policy sees of the request (task, prompt) stays, the truth changes.
            let row = &q.rows[r.quality_row];
            let other = (1..q.rows.len())
                .map(|step| (r.quality_row + step) % q.rows.len())
                .find(|&j| {
                    let c = &q.rows[j];
                    !c.is_calibration() && c.task == row.task && c.quality != row.quality
                })
                .unwrap();
            r.quality_row = other;
        }
        let altered = shown(&changed);
        for i in 0..=k {
            assert_eq!(
                original[i], altered[i],
                "request {i} saw the truth of request {k}.."
            );
        }
    }
}

#[test]
fn runs_are_deterministic_to_the_byte() {
    let catalogue = common::catalogue("edge-mixed");
    let q = quality();
    let json = |seed: u64, policy: &str| {
        let w = generate("bursty:low=0.5,high=4,dwell=20,n=600", q, seed).unwrap();
        let mut p = baseline(policy, seed).unwrap();
        let r = Simulation::new(&catalogue, q, &w, seed)
            .unwrap()
            .run(&mut p)
            .unwrap();
        serde_json::to_string(&r).unwrap()
    };
    for policy in ["p2c", "qos-greedy"] {
        assert_eq!(json(3, policy), json(3, policy));
        assert_ne!(json(3, policy), json(4, policy));
    }
}

#[test]
fn driving_out_of_order_is_an_error_not_a_panic() {
    let catalogue = common::catalogue("paper-3x7b");
    let q = quality();
    let w = generate("poisson:rate=1,n=3", q, 1).unwrap();
    let mut sim = Simulation::new(&catalogue, q, &w, 1).unwrap();
    assert!(sim.apply(qosroute_core::Decision::Reject).is_err());
    sim.next_decision().unwrap();
    // Routing to an expert that does not exist is an invalid decision, counted as a rejection.
    let step = sim.apply(qosroute_core::Decision::Route(99)).unwrap();
    assert!(step.invalid);
    let report = sim.finish("manual").unwrap();
    assert_eq!((report.rejected, report.invalid_decisions), (3, 1));
}
