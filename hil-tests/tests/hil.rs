//! Every scenario of the hardware-in-loop suite at CI scale (hil-tests/README.md): the real
//! `qosrouted` (the build's `target/<profile>/qosrouted`: `cargo build -p qosroute-daemon`
//! first when running this package alone), mosquitto, emulated experts, MQTT devices. Each
//! test prints its scenario's figures and fails on any failed check.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use qosroute_hil::{Scale, run};

async fn scenario(number: u8) {
    let report = run(number, Scale::CI)
        .await
        .unwrap_or_else(|e| panic!("scenario {number} did not run: {e:#}"));
    eprintln!("{report}");
    assert!(report.passed(), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_replay_every_request_ends_exactly_once() {
    scenario(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_broker_restart_loses_and_duplicates_nothing() {
    scenario(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_killed_expert_fails_clearly_and_gets_traffic_back() {
    scenario(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_bad_payloads_are_answered_and_memory_stays_bounded() {
    scenario(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_overload_is_refused_explicitly_and_admitted_requests_meet_their_slo() {
    scenario(5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_sighup_and_sigterm_under_load_leave_exactly_one_end_each() {
    scenario(6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s7_a_shared_group_splits_the_load_and_loses_nothing_when_a_member_dies() {
    scenario(7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s8_a_drain_under_load_delivers_every_final_reply_it_counts() {
    scenario(8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s11_traffic_leaves_an_expert_that_slows_down_and_nothing_is_lost() {
    scenario(11).await;
}

/// Needs the real LLM engine: `bash scripts/real-engine.sh install`, then
/// `cargo nextest run -p qosroute-hil --run-ignored only` (or `bash scripts/real-engine.sh
/// test`, which CI runs as `scripts/real-engine.sh ci` decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the real LLM engine: bash scripts/real-engine.sh install"]
async fn s9_a_real_llm_engine_serves_streams_and_is_calibrated_to_its_measured_speed() {
    scenario(9).await;
}

/// Needs the continuous-batching engine: `bash scripts/llama-server.sh install`, then
/// `cargo nextest run -p qosroute-hil --run-ignored only` (or `bash scripts/llama-server.sh
/// test`, which CI runs as `scripts/llama-server.sh ci` decides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the batching engine: bash scripts/llama-server.sh install"]
async fn s10_a_batching_engine_gets_several_requests_at_once_and_is_calibrated() {
    scenario(10).await;
}
