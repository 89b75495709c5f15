//! The simulator's reference for an expert that becomes five times slower mid-run (the
//! hardware-in-loop suite's slow-expert scenario): the conversation trace's first 3,000
//! requests (answers capped at 48 tokens, as the suite replays them) on edge-mixed under
//! `qos-greedy`, without the fault, with it and a router that knows at once, with it and a
//! router that never learns. `cargo test -p qosroute-sim --test slowdown -- --nocapture`
//! prints the reference.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod common;

use qosroute_sim::{QualityTable, Simulation, Slowdown, Workload, generate, slowdown_reference};

use common::{catalogue, repo};

/// The slowed expert, the window and the factor, in trace seconds (the suite runs 20 times
/// faster: 1 s there is 20 s here).
const VICTIM: &str = "rtx4090-gemma2-9b";
const FROM_S: f64 = 120.0;
const UNTIL_S: f64 = 440.0;
const FACTOR: f64 = 5.0;
const BIN_S: f64 = 20.0;

fn workload() -> Workload {
    let q = QualityTable::embedded().unwrap();
    let spec = format!(
        "trace:{},n=3000",
        repo("data/traces/azure-llm-2023-conv.csv").display()
    );
    let mut w = generate(&spec, &q, 1).unwrap();
    for r in &mut w.requests {
        r.output_tokens = r.output_tokens.clamp(1, 48);
    }
    w
}

#[test]
fn a_router_that_knows_the_slowdown_moves_traffic_off_the_slowed_expert_and_keeps_qos() {
    let q = QualityTable::embedded().unwrap();
    let c = catalogue("edge-mixed");
    let victim = c.experts.iter().position(|e| e.name == VICTIM).unwrap();
    let w = workload();
    let slowdown = Slowdown {
        expert: victim,
        factor: FACTOR,
        from_s: FROM_S,
        until_s: UNTIL_S,
        router_knows: true,
    };
    let runs = slowdown_reference(&c, &q, &w, slowdown, "qos-greedy", 1, BIN_S).unwrap();
    println!(
        "reference: {VICTIM} {FACTOR}x slower from {FROM_S} s to {UNTIL_S} s of the trace (bins of {BIN_S} s)"
    );
    for r in &runs {
        println!(
            "{:<6} QoS {:.4} (window {:.4}), completed {} rejected {} of {}; to the slowed expert in the window {} ({:.1} % met the SLO); per bin {:?}",
            r.variant,
            r.avg_qos,
            r.window_qos,
            r.completed,
            r.rejected,
            r.requests,
            r.window_victim_routed,
            r.window_victim_attainment() * 100.0,
            r.routed_to_victim
        );
    }
    let [none, knows, blind] = [&runs[0], &runs[1], &runs[2]];
    for r in &runs {
        assert_eq!(
            r.completed + r.rejected,
            r.requests,
            "{}: a request was lost",
            r.variant
        );
    }
    // Before the fault the three runs route alike.
    let before = (FROM_S / BIN_S) as usize;
    assert_eq!(
        knows.routed_to_victim[..before],
        none.routed_to_victim[..before]
    );
    // With the fault known, the slowed expert gets less, and what it gets meets the SLO.
    assert!(
        knows.window_victim_routed * 2 < none.window_victim_routed,
        "{} vs {} without the fault",
        knows.window_victim_routed,
        none.window_victim_routed
    );
    assert!(knows.window_victim_attainment() >= 0.9, "{knows:?}");
    // A router that never learns keeps sending it more, and loses more QoS.
    assert!(blind.window_victim_routed > knows.window_victim_routed);
    assert!(
        blind.window_qos < knows.window_qos,
        "{blind:?} vs {knows:?}"
    );
    assert!(knows.window_qos <= none.window_qos + 1e-9);
}

#[test]
fn a_slowdown_is_checked_and_changes_nothing_outside_its_window() {
    let q = QualityTable::embedded().unwrap();
    let c = catalogue("edge-mixed");
    let w = workload();
    let bad = Slowdown {
        expert: 99,
        factor: 5.0,
        from_s: 0.0,
        until_s: 1.0,
        router_knows: true,
    };
    assert!(
        Simulation::new(&c, &q, &w, 1)
            .unwrap()
            .with_slowdown(bad)
            .is_err()
    );
    let backwards = Slowdown {
        expert: 0,
        until_s: -1.0,
        ..bad
    };
    assert!(
        Simulation::new(&c, &q, &w, 1)
            .unwrap()
            .with_slowdown(backwards)
            .is_err()
    );
    // A window after the last arrival changes no decision.
    let late = Slowdown {
        expert: 0,
        from_s: 1e9,
        until_s: 2e9,
        ..bad
    };
    let runs = slowdown_reference(&c, &q, &w, late, "qos-greedy", 1, 60.0).unwrap();
    assert_eq!(runs[0].routed_to_victim, runs[1].routed_to_victim);
    assert_eq!(runs[0].avg_qos, runs[1].avg_qos);
}
