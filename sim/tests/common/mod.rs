//! Helpers shared by the simulator's integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::path::PathBuf;

use qosroute_core::{ArrivingRequest, ClusterState, Decision, Observed, Policy};
use qosroute_sim::{Catalogue, RunReport, SimError, Simulation};

pub fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

pub fn catalogue(name: &str) -> Catalogue {
    Catalogue::load(&repo(&format!("configs/experts/{name}.toml"))).unwrap()
}

/// Runs a simulation with engine audits on, checking after every decision that time never
/// goes back and that no prediction or decision ever names the truth.
pub fn run_checked(sim: Simulation, policy: &mut dyn Policy) -> Result<RunReport, SimError> {
    let mut sim = sim.with_audit(true);
    let mut last_now = f64::NEG_INFINITY;
    while let Some((state, arriving, observed)) = sim.next_decision()? {
        assert!(
            state.now_s >= last_now,
            "time went back: {} < {last_now}",
            state.now_s
        );
        last_now = state.now_s;
        assert_eq!(arriving.predictions.len(), state.experts.len());
        for e in &state.experts {
            assert!(e.running.len() <= e.profile.max_slots as usize);
            assert!(e.kv_used_tokens() <= e.profile.kv_tokens);
        }
        let decision = policy.decide(state, arriving, &observed);
        sim.apply(decision)?;
    }
    sim.finish(policy.name())
}

/// Every request ends exactly once: completed (first token, then finish, after arrival,
/// with at most its true output) or rejected; the report's counts agree.
pub fn assert_every_request_ends_once(
    sim_records: &[qosroute_sim::RequestRecord],
    report: &RunReport,
) {
    let mut completed = 0;
    let mut rejected = 0;
    for r in sim_records {
        match r.routed_to {
            Some(Some(_)) => {
                assert!(
                    r.is_completed(),
                    "request {} routed but never completed",
                    r.request.id
                );
                assert!(r.first_token_s >= r.request.arrival_s);
                assert!(r.finish_s >= r.first_token_s);
                assert!(r.output_tokens >= 1 && r.output_tokens <= r.true_output_tokens);
                completed += 1;
            }
            Some(None) => {
                assert!(!r.is_completed() && r.first_token_s.is_nan());
                assert_eq!(r.qos, 0.0);
                rejected += 1;
            }
            None => panic!("request {} never decided", r.request.id),
        }
    }
    assert_eq!(completed + rejected, sim_records.len());
    assert_eq!(report.completed as usize, completed);
    assert_eq!(report.rejected as usize, rejected);
}

/// Records every arriving request a policy is shown, then delegates.
pub struct Recording<P> {
    pub inner: P,
    pub seen: Vec<ArrivingRequest>,
}

impl<P: Policy> Policy for Recording<P> {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        observed: &Observed<'_>,
    ) -> Decision {
        self.seen.push(arriving.clone());
        self.inner.decide(state, arriving, observed)
    }
}
