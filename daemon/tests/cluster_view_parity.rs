//! One cluster view for the simulator and the gateway: the same requests in flight, put
//! through the simulator's path (`Simulation::next_decision`) and through the daemon's ledger
//! (`Ledger::cluster_state`), give an identical `ClusterState` and bit-identical encoder
//! tensors. This checks that both paths build the view with the same code from the same
//! observations (dispatches, tokens streamed back, completions); it says nothing about how
//! well the view predicts a real engine.
//!
//! Times are multiples of 1/8 s (prefill 1,024 tokens/s on prompts of 128-token multiples,
//! 125 ms decode steps), exact both as f64 seconds and as the daemon's nanosecond instants.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use qosroute_core::{
    ArrivingRequest, ClusterState, Decision, EncodedState, ExpertProfile, LatencyModel, Observed,
    Policy, SloTable, Task, encode_state,
};
use qosroute_daemon::ledger::{Dispatched, Ledger};
use qosroute_sim::workload::WorkloadRequest;
use qosroute_sim::{Catalogue, QualityTable, Simulation, Workload};
use tokio::time::Instant;

fn profile(name: &str, slots: u32) -> ExpertProfile {
    ExpertProfile {
        name: name.into(),
        model: "qwen25_7b".into(),
        hardware: String::new(),
        source: String::new(),
        max_slots: slots,
        kv_tokens: 1 << 20,
        latency: LatencyModel {
            prefill_tok_s: 1024.0,
            prefill_overhead_s: 0.0,
            decode_t0_s: 0.125,
            decode_d_s_per_seq: 0.0,
            decode_e_s_per_ctx_token: 0.0,
        },
    }
}

/// Routes request i to `routes[i]`.
struct Scripted(Vec<usize>);

impl Policy for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }
    fn decide(
        &mut self,
        _state: &ClusterState,
        arriving: &ArrivingRequest,
        _observed: &Observed<'_>,
    ) -> Decision {
        Decision::Route(self.0[arriving.request.id as usize])
    }
}

#[test]
fn simulator_and_daemon_build_the_same_view_and_tensors() {
    let catalogue = Catalogue {
        name: "parity".into(),
        description: String::new(),
        slo: SloTable::default(),
        experts: vec![profile("two-slots", 2), profile("four-slots", 4)],
    };
    let quality = QualityTable::embedded().unwrap();
    let row = quality
        .rows
        .iter()
        .position(|r| !r.is_calibration())
        .unwrap();
    // 12 requests, one every 0.25 s; prompts of 128-512 tokens; answers of 6-25 tokens.
    let requests: Vec<WorkloadRequest> = (0..12u32)
        .map(|i| WorkloadRequest {
            arrival_s: 0.25 * f64::from(i),
            task: Task::ALL[i as usize % Task::COUNT],
            prompt_tokens: 128 * (1 + i % 4),
            output_tokens: 6 + (i * 7) % 20,
            quality_row: row,
        })
        .collect();
    let workload = Workload {
        spec: "parity".into(),
        requests: requests.clone(),
    };
    let routes: Vec<usize> = (0..12).map(|i| usize::from(i % 3 == 0)).collect();
    let mut policy = Scripted(routes.clone());
    let (mut handed_over, mut in_prefill) = (false, false);
    for decide_at in [4usize, 5, 9, 11] {
        // The simulator's path, up to decision `decide_at`.
        let mut sim = Simulation::new(&catalogue, &quality, &workload, 1).unwrap();
        for _ in 0..decide_at {
            let (state, arriving, observed) = sim.next_decision().unwrap().unwrap();
            let d = policy.decide(state, arriving, &observed);
            sim.apply(d).unwrap();
        }
        let (sim_state, arriving, _) = sim.next_decision().unwrap().unwrap();
        let sim_state = sim_state.clone();
        let arriving = arriving.clone();
        let now_s = sim_state.now_s;
        let records = sim.records().to_vec();

        // The daemon's ledger, fed the same dispatches and completions at the same times
        // (completions first at equal times, as the simulator processes them), then the
        // tokens each request in flight has streamed back.
        let epoch = Instant::now();
        let at = |s: f64| epoch + Duration::from_secs_f64(s);
        let profiles: Vec<Arc<ExpertProfile>> =
            catalogue.experts.iter().cloned().map(Arc::new).collect();
        let mut ledger = Ledger::new(&profiles, epoch);
        let mut events: Vec<(f64, u8, usize)> = Vec::new();
        for (i, r) in records.iter().enumerate().take(decide_at) {
            events.push((r.request.arrival_s, 1, i));
            if r.finish_s <= now_s {
                events.push((r.finish_s, 0, i));
            }
        }
        events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let shown = |i: usize| {
            sim_state
                .experts
                .iter()
                .flat_map(|x| x.running.iter().chain(&x.waiting))
                .find(|r| r.id == i as u64)
                .copied()
        };
        for (t, kind, i) in events {
            let e = routes[i];
            if kind == 0 {
                assert!(ledger.finish(e, i as u64, at(t)).is_some());
                continue;
            }
            let r = &records[i].request;
            // What the router predicted for it: the simulator shows it for those in flight.
            let (output, q) = shown(i).map_or((1.0, 0.0), |x| {
                (x.predicted_output_tokens, x.predicted_quality)
            });
            ledger.dispatch(
                e,
                Dispatched {
                    key: i as u64,
                    task: r.task,
                    prompt_tokens: r.prompt_tokens,
                    predicted_output_tokens: output,
                    predicted_quality: q,
                    slo_s_per_token: r.slo_s_per_token,
                    max_output_tokens: r.max_output_tokens,
                    arrived_at: at(r.arrival_s),
                    dispatched_at: at(r.arrival_s),
                },
            );
        }
        for x in sim_state.experts.iter().flat_map(|x| x.running.iter()) {
            let e = routes[x.id as usize];
            if x.generated_tokens > 0 {
                let first = records[x.id as usize].first_token_s;
                ledger.tokens(e, x.id, x.generated_tokens, at(first));
            }
        }
        for e in 0..profiles.len() {
            ledger.mark_ok(e, at(now_s));
        }
        let daemon_state = ledger.cluster_state(at(now_s), Duration::from_secs(5));

        let in_flight: usize = sim_state.experts.iter().map(|x| x.in_flight()).sum();
        let waiting: usize = sim_state.experts.iter().map(|x| x.waiting.len()).sum();
        assert!(
            in_flight >= 3,
            "decision {decide_at}: {in_flight} in flight"
        );
        if decide_at == 9 {
            assert!(waiting >= 1, "a queue on the two-slot expert");
        }
        let running = || sim_state.experts.iter().flat_map(|x| x.running.iter());
        handed_over |= running().any(|r| r.slot_elapsed_s < r.elapsed_s);
        in_prefill |= running().any(|r| r.generated_tokens == 0);
        assert_eq!(sim_state, daemon_state, "decision {decide_at}");
        let (mut a, mut b) = (EncodedState::default(), EncodedState::default());
        encode_state(&sim_state, &arriving, &mut a);
        encode_state(&daemon_state, &arriving, &mut b);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (x, y) in [
            (&a.request, &b.request),
            (&a.expert, &b.expert),
            (&a.running_nodes, &b.running_nodes),
            (&a.waiting_nodes, &b.waiting_nodes),
            (&a.running_adj, &b.running_adj),
            (&a.waiting_adj, &b.waiting_adj),
            (&a.action_mask, &b.action_mask),
        ] {
            assert_eq!(bits(x), bits(y), "decision {decide_at}");
        }
    }
    assert!(
        handed_over && in_prefill,
        "the views compared hold a request that waited for a slot ({handed_over}) and one \
         still in its prefill ({in_prefill})"
    );
}
