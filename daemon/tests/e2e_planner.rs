//! End to end with `qos-planner` routing: the real `qosrouted` binary with `[policy] planner`,
//! a real mosquitto broker, emulated experts over real HTTP and an MQTT device; the planner
//! decides within its time budget, and a budget too small to play enough futures falls back
//! to `qos-greedy` and is counted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use qosroute_emulator::Faults;
use support::site::{burst, config, expert, until_up};
use support::{Broker, start_daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_planner_routes_every_request_within_its_budget() {
    let broker = Broker::start();
    let (a, b) = (
        expert("a", Faults::default()).await,
        expert("b", Faults::default()).await,
    );
    let cfg = config(&broker, &[(&a, "a"), (&b, "b")], "")
        .replace(
            "model_dir = ",
            "planner = \"qos-planner:k=8,h=10\"\n# model_dir = ",
        )
        .replace("[slo]", "max_decision_ms = 500.0\n[slo]");
    let daemon = start_daemon(&cfg);
    until_up(&daemon, &["a", "b"]).await;
    assert!(
        daemon.log_text().contains("qos-planner"),
        "{}",
        daemon.log_text()
    );
    let ends = burst(&broker, &daemon, "dev-p", 24).await;
    assert_eq!(ends.len(), 24);
    assert!(
        ends.values().all(|&(f, e)| f == 1 && e == 0),
        "one final each: {ends:?}"
    );
    assert_eq!(
        daemon.metric("qosroute_requests_total{outcome=\"completed\"}"),
        Some(24.0)
    );
    assert_eq!(daemon.metric("qosroute_decision_seconds_count"), Some(24.0));
    assert_eq!(
        daemon.metric("qosroute_policy_fallbacks_total"),
        Some(0.0),
        "the planner decided every request"
    );
    assert_eq!(
        daemon.metric("qosroute_planner_budget_exhausted_total"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_too_small_for_enough_futures_falls_back_to_qos_greedy_and_counts_it() {
    let broker = Broker::start();
    let a = expert("a", Faults::default()).await;
    // One microsecond: the planner plays one future, fewer than min_futures = 4.
    let cfg = config(&broker, &[(&a, "a")], "").replace(
        "model_dir = ",
        "planner = \"qos-planner:k=8,h=10,budget_ms=0.001,min_futures=4\"\n# model_dir = ",
    );
    let daemon = start_daemon(&cfg);
    until_up(&daemon, &["a"]).await;
    let ends = burst(&broker, &daemon, "dev-p", 6).await;
    assert!(ends.values().all(|&(f, _)| f == 1), "{ends:?}");
    assert_eq!(daemon.metric("qosroute_policy_fallbacks_total"), Some(6.0));
    assert_eq!(
        daemon.metric("qosroute_planner_budget_exhausted_total"),
        Some(6.0)
    );
}
