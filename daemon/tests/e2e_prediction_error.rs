//! End to end, the live prediction error: the real `qosrouted` binary, a real mosquitto
//! broker and emulated experts over real HTTP. Every completed request adds its time to
//! first token and per-token latency, predicted at its decision, against the measured ones to
//! its expert's histograms, and the windowed mean absolute percentage error follows.
//!
//! The emulated experts run the very latency model the daemon is configured with, so this
//! checks the plumbing (every completion is compared once, on the expert that served it), not
//! the model: the error it reports is the daemon's and the host's timing on top of that model.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use qosroute_emulator::Faults;
use support::site::{burst, config, expert, until_up};
use support::{Broker, start_daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_completed_request_is_compared_with_its_prediction() {
    let broker = Broker::start();
    let (a, b) = (
        expert("a", Faults::default()).await,
        expert("b", Faults::default()).await,
    );
    let daemon = start_daemon(&config(&broker, &[(&a, "a"), (&b, "b")], ""));
    until_up(&daemon, &["a", "b"]).await;
    let ends = burst(&broker, &daemon, "dev-e", 20).await;
    assert!(ends.values().all(|&(f, e)| f == 1 && e == 0), "{ends:?}");
    let count = |expert: &str, quantity: &str| {
        daemon
            .metric(&format!(
                "qosroute_prediction_relative_error_count{{expert=\"{expert}\",quantity=\"{quantity}\"}}"
            ))
            .unwrap_or(0.0)
    };
    for quantity in ["ttft", "per_token"] {
        assert_eq!(
            count("a", quantity) + count("b", quantity),
            20.0,
            "{quantity}: one comparison per completed request"
        );
    }
    for expert in ["a", "b"] {
        if count(expert, "per_token") == 0.0 {
            continue;
        }
        // The +Inf bucket holds every comparison of the expert.
        assert_eq!(
            daemon.metric(&format!(
                "qosroute_prediction_relative_error_bucket{{expert=\"{expert}\",quantity=\"per_token\",le=\"+Inf\"}}"
            )),
            Some(count(expert, "per_token"))
        );
        let mape = daemon
            .metric(&format!(
                "qosroute_prediction_mape{{expert=\"{expert}\",quantity=\"per_token\"}}"
            ))
            .unwrap();
        assert!(mape.is_finite() && mape >= 0.0, "{mape}");
    }
}
