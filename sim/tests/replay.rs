//! Replay of the checked-in Azure conversation trace (one hour, 19,366 requests) on the
//! edge-mixed catalogue, with every engine invariant audited after every event.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use qosroute_core::baseline;
use qosroute_sim::{QualityTable, Simulation, generate};

use common::{assert_every_request_ends_once, catalogue, repo};

#[test]
fn azure_conv_hour_replays_with_invariants_for_each_load_policy() {
    let q = QualityTable::embedded().unwrap();
    let c = catalogue("edge-mixed");
    let spec = format!(
        "trace:{}",
        repo("data/traces/azure-llm-2023-conv.csv").display()
    );
    let w = generate(&spec, &q, 1).unwrap();
    assert_eq!(w.requests.len(), 19_366);
    let mut avg_qos = Vec::new();
    for name in ["least-loaded", "qos-greedy"] {
        let mut p = baseline(name, 1).unwrap();
        let mut sim = Simulation::new(&c, &q, &w, 1).unwrap().with_audit(true);
        while let Some((s, a, o)) = sim.next_decision().unwrap() {
            let d = p.decide(s, a, &o);
            assert!(!sim.apply(d).unwrap().invalid);
        }
        sim.drain().unwrap();
        let records = sim.records().to_vec();
        let report = sim.finish(name).unwrap();
        assert_every_request_ends_once(&records, &report);
        assert!(report.makespan_s >= records.last().unwrap().request.arrival_s);
        avg_qos.push(report.avg_qos);
    }
    // The impact-aware rule must beat load balancing on this trace.
    assert!(
        avg_qos[1] > avg_qos[0],
        "qos-greedy {} vs least-loaded {}",
        avg_qos[1],
        avg_qos[0]
    );
}

#[test]
fn a_trace_slice_with_speed_and_offset_replays() {
    let q = QualityTable::embedded().unwrap();
    let c = catalogue("paper-3x7b");
    let spec = format!(
        "trace:{},speed=0.2,n=300,offset=600",
        repo("data/traces/azure-llm-2023-conv.csv").display()
    );
    let w = generate(&spec, &q, 2).unwrap();
    assert_eq!(w.requests.len(), 300);
    assert!(w.requests[0].arrival_s >= 0.0);
    let mut p = baseline("qos-greedy", 2).unwrap();
    let report = common::run_checked(Simulation::new(&c, &q, &w, 2).unwrap(), &mut p).unwrap();
    assert_eq!(report.requests, 300);
}
