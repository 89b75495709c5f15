//! `qos-planner` never reads the truth: changing the true output lengths and qualities of the
//! requests in flight at a decision, and of every request still to come, leaves its decisions
//! up to that point unchanged (the baselines' version of this test is in `invariants.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use qosroute_core::{Decision, Observed, Policy, QosPlanner};
use qosroute_sim::{QualityTable, Simulation, Workload, generate};

use common::run_checked;

/// Records each decision of the planner it wraps.
struct Decisions {
    planner: QosPlanner,
    made: Vec<Decision>,
}

impl Policy for Decisions {
    fn name(&self) -> &str {
        "qos-planner"
    }
    fn decide(
        &mut self,
        state: &qosroute_core::ClusterState,
        arriving: &qosroute_core::ArrivingRequest,
        observed: &Observed<'_>,
    ) -> Decision {
        let d = self.planner.decide(state, arriving, observed);
        self.made.push(d);
        d
    }
}

fn quality() -> QualityTable {
    QualityTable::embedded().unwrap()
}

/// Another row of the same task with different true quality (what the router sees of the
/// request, its task and prompt, stays).
fn other_row(q: &QualityTable, row: usize) -> usize {
    let task = q.rows[row].task;
    (1..q.rows.len())
        .map(|step| (row + step) % q.rows.len())
        .find(|&j| {
            let c = &q.rows[j];
            !c.is_calibration() && c.task == task && c.quality != q.rows[row].quality
        })
        .unwrap()
}

#[test]
fn planner_decisions_never_move_with_the_truth() {
    let catalogue = common::catalogue("paper-3x7b");
    let q = quality();
    let base = generate("poisson:rate=3,n=300", &q, 5).unwrap();
    let run = |w: &Workload| {
        let mut p = Decisions {
            planner: QosPlanner::from_spec("qos-planner:k=4,h=6", 11).unwrap(),
            made: Vec::new(),
        };
        let mut sim = Simulation::new(&catalogue, &q, w, 5).unwrap();
        while let Some((state, arriving, observed)) = sim.next_decision().unwrap() {
            let d = p.decide(state, arriving, &observed);
            sim.apply(d).unwrap();
        }
        sim.drain().unwrap();
        let overrode = p.planner.stats().overrode_greedy;
        (p.made, sim.records().to_vec(), overrode)
    };
    let (original, records, overrode) = run(&base);
    assert!(
        overrode > 10,
        "the planner left qos-greedy's choice {overrode} times: its own choices are tested"
    );
    assert!(
        original.contains(&Decision::Reject) && original.len() == 300,
        "an overloaded run, where looking ahead matters"
    );
    for k in [40usize, 150, 299] {
        let decided_at = records[k].request.arrival_s;
        let mut changed = base.clone();
        let mut in_flight = 0;
        for (i, r) in changed.requests.iter_mut().enumerate() {
            let running_then = i < k && records[i].finish_s > decided_at;
            if i >= k || running_then {
                // Longer (so a request in flight at decision k is still in flight then), and
                // of another quality.
                r.output_tokens = r.output_tokens * 2 + 50;
                r.quality_row = other_row(&q, r.quality_row);
                in_flight += usize::from(running_then);
            }
        }
        assert!(
            in_flight > 5,
            "requests in flight at decision {k}: {in_flight}"
        );
        let (altered, _, _) = run(&changed);
        assert_eq!(
            original[..=k],
            altered[..=k],
            "decisions up to {k} moved with the truth"
        );
    }
    // And the whole run is checked like every policy's.
    let mut planner = QosPlanner::from_spec("qos-planner:k=2,h=3", 1).unwrap();
    run_checked(
        Simulation::new(&catalogue, &q, &base, 5).unwrap(),
        &mut planner,
    )
    .unwrap();
}
