//! End to end with a shadow policy: the real `qosrouted` binary with `[policy] shadow`, a real
//! mosquitto broker, emulated experts over real HTTP and an MQTT device. The shadow decides
//! beside the serving policy on every request without affecting it: every request is served
//! once, every decision is counted as an agreement or a disagreement, and disagreements are
//! logged (a sample).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use qosroute_emulator::{EmulatedExpert, Faults};
use support::site::{burst, config, expert, until_up};
use support::{Broker, Daemon, start_daemon};

/// The site's config served by `qos-greedy` (no model) with this shadow policy.
fn shadowed(broker: &Broker, experts: &[(&EmulatedExpert, &str)], shadow: &str) -> String {
    config(broker, experts, "").replace(
        "model_dir = ",
        &format!("shadow = \"{shadow}\"\n# model_dir = "),
    )
}

fn shadow_counts(daemon: &Daemon) -> (f64, f64) {
    (
        daemon
            .metric("qosroute_shadow_decisions_total{agreement=\"agree\"}")
            .unwrap(),
        daemon
            .metric("qosroute_shadow_decisions_total{agreement=\"disagree\"}")
            .unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_robin_shadow_is_counted_and_logged_and_never_serves() {
    let broker = Broker::start();
    let (a, b) = (
        expert("a", Faults::default()).await,
        expert("b", Faults::default()).await,
    );
    let daemon = start_daemon(&shadowed(&broker, &[(&a, "a"), (&b, "b")], "round-robin"));
    until_up(&daemon, &["a", "b"]).await;
    let ends = burst(&broker, &daemon, "dev-s", 24).await;
    assert!(
        ends.values().all(|&(f, e)| f == 1 && e == 0),
        "one final each: {ends:?}"
    );
    assert_eq!(
        daemon.metric("qosroute_requests_total{outcome=\"completed\"}"),
        Some(24.0)
    );
    let (agree, disagree) = shadow_counts(&daemon);
    assert_eq!(agree + disagree, 24.0, "every decision is compared once");
    assert!(disagree >= 1.0, "round-robin leaves qos-greedy somewhere");
    let by_choice = daemon
        .metric("qosroute_shadow_disagreements_total{choice=\"a\"}")
        .unwrap_or(0.0)
        + daemon
            .metric("qosroute_shadow_disagreements_total{choice=\"b\"}")
            .unwrap_or(0.0)
        + daemon
            .metric("qosroute_shadow_disagreements_total{choice=\"reject\"}")
            .unwrap_or(0.0);
    assert_eq!(by_choice, disagree);
    let log = daemon.log_text();
    assert!(
        log.contains("shadow policy disagrees")
            && log.contains("serving")
            && log.contains("shadow"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_learned_router_can_shadow_the_rule_that_serves() {
    let broker = Broker::start();
    let (a, b) = (
        expert("a", Faults::default()).await,
        expert("b", Faults::default()).await,
    );
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy-model/models/han");
    let daemon = start_daemon(&shadowed(
        &broker,
        &[(&a, "a"), (&b, "b")],
        &format!("han:{model}"),
    ));
    until_up(&daemon, &["a", "b"]).await;
    let ends = burst(&broker, &daemon, "dev-s", 16).await;
    assert!(ends.values().all(|&(f, _)| f == 1), "{ends:?}");
    let (agree, disagree) = shadow_counts(&daemon);
    assert_eq!(agree + disagree, 16.0);
    assert_eq!(
        daemon.metric("qosroute_policy_fallbacks_total"),
        Some(16.0),
        "qos-greedy (the fallback, no model) serves"
    );
}
