//! The hardware-in-loop suite of qosroute: the system under faults and load.
//!
//! Every scenario runs the real `qosrouted` binary (found by [`qosroute_testkit::daemon_binary`]
//! unless [`set_daemon_binary`] names one), a real mosquitto broker, emulated experts over real
//! HTTP streaming (each on its own Tokio runtime, so it can be killed like a process) and real
//! MQTT clients (the `qosroute-swarm` devices, the test kit's devices, `mosquitto_pub`). Each
//! returns a [`Report`]: its figures (requests, rates, latency percentiles, losses, duplicates,
//! the daemon's peak memory) and its checks; a scenario passes when every check holds.
//!
//! Scenarios take a [`Scale`]: [`Scale::CI`] is the size `cargo nextest` runs,
//! [`Scale::LONG`] ten times more (`qosroute-hil --long`).

pub mod report;
pub mod rig;
mod scenarios;

use std::path::PathBuf;
use std::sync::OnceLock;

pub use report::{Check, Figure, Report};
pub use scenarios::{
    KEEP_LOGS_VAR, SAMPLE_EVERY, SoakSample, batching_expert, broker_restart, drain_clean_session,
    expert_kill, malformed, overload, real_expert, reload_and_drain, replay, shared_group,
    slow_expert, soak,
};

/// How big a run is: [`Scale::CI`] (factor 1) or [`Scale::LONG`] (factor 10). Counts of
/// requests and payloads scale with the factor; durations of faults do not.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Scale {
    /// Multiplies every count of the CI size.
    pub factor: f64,
}

impl Scale {
    /// The size the test suite runs (about 20 s a scenario on 2 cores, debug build).
    pub const CI: Scale = Scale { factor: 1.0 };
    /// Ten times the CI size (`qosroute-hil --long`).
    pub const LONG: Scale = Scale { factor: 10.0 };

    /// `ci` scaled (at least 1).
    pub fn n(self, ci: usize) -> usize {
        ((ci as f64 * self.factor).round() as usize).max(1)
    }

    /// `ci` or `long`, whichever this scale is closer to.
    pub fn pick<T>(self, ci: T, long: T) -> T {
        if self.factor >= 3.0 { long } else { ci }
    }

    /// `ci` for the CI scale, `long` for the long one.
    pub fn name(self) -> &'static str {
        self.pick("ci", "long")
    }
}

/// The scenarios, by number: (number, name, what it asserts).
pub const SCENARIOS: [(u8, &str, &str); 11] = [
    (
        1,
        "replay",
        "the conversation trace replayed: every request ends exactly once",
    ),
    (
        2,
        "broker-restart",
        "mosquitto restarted (persistence) mid-replay: 0 lost, 0 duplicated",
    ),
    (
        3,
        "expert-kill",
        "an expert killed mid-stream and revived: retried or a clear error, none hangs, traffic returns",
    ),
    (
        4,
        "malformed",
        "malformed, oversized and wrong-typed payloads mixed with traffic: each answered, memory bounded",
    ),
    (
        5,
        "overload",
        "5x capacity: explicit refusals, memory bounded, admitted requests meet their SLO",
    ),
    (
        6,
        "reload-drain",
        "SIGHUP swaps an expert under load, SIGTERM drains under load: exactly one end each",
    ),
    (
        7,
        "shared-group",
        "two daemons share the requests; one killed and restarted: load split, nothing lost",
    ),
    (
        8,
        "drain-clean-session",
        "SIGTERM under load with a clean session: every final reply the daemon counts reaches its device",
    ),
    (
        9,
        "real-expert",
        "a real llama.cpp server (SmolLM2) beside emulated experts: served, streamed, calibrated to its measured speed (needs scripts/real-engine.sh install)",
    ),
    (
        10,
        "batching-expert",
        "a continuous-batching llama-server (4 slots) beside emulated experts: batched, every request once, calibrated (prefill, t0, d; e reported) from a prior 2x off (needs scripts/llama-server.sh install)",
    ),
    (
        11,
        "slow-expert",
        "one of six experts 5x slower mid-run, health intact: traffic falls to what it can serve within the SLO within 10 s, nothing lost",
    ),
];

/// The scenario that needs the real LLM engine (`scripts/real-engine.sh install`); the
/// others need only mosquitto.
pub const REAL_ENGINE_SCENARIO: u8 = 9;

/// The scenario that needs the continuous-batching engine (`scripts/llama-server.sh
/// install`).
pub const BATCHING_ENGINE_SCENARIO: u8 = 10;

static DAEMON_BINARY: OnceLock<PathBuf> = OnceLock::new();

/// Runs this `qosrouted` binary rather than the one found next to the running executable.
/// Only the first call counts.
pub fn set_daemon_binary(path: PathBuf) {
    let _ = DAEMON_BINARY.set(path);
}

/// The `qosrouted` binary scenarios run.
pub fn daemon_binary() -> PathBuf {
    DAEMON_BINARY
        .get()
        .cloned()
        .unwrap_or_else(qosroute_testkit::daemon_binary)
}

/// Runs scenario `number` at `scale`. An error means the scenario could not run (or its
/// harness panicked, e.g. mosquitto missing); a [`Report`] that did not pass means a check
/// failed.
pub async fn run(number: u8, scale: Scale) -> anyhow::Result<Report> {
    // A task of its own: a panic of the test kit (a failed setup) becomes an error here.
    let task = tokio::spawn(async move {
        match number {
            1 => replay(scale).await,
            2 => broker_restart(scale).await,
            3 => expert_kill(scale).await,
            4 => malformed(scale).await,
            5 => overload(scale).await,
            6 => reload_and_drain(scale).await,
            7 => shared_group(scale).await,
            8 => drain_clean_session(scale).await,
            9 => real_expert(scale).await,
            10 => batching_expert(scale).await,
            11 => slow_expert(scale).await,
            n => Err(anyhow::anyhow!(
                "no scenario {n}: they are numbered 1 to {}",
                SCENARIOS.len()
            )),
        }
    });
    match task.await {
        Ok(result) => result,
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "(no message)".into());
            Err(anyhow::anyhow!("scenario {number} panicked: {message}"))
        }
        Err(e) => Err(anyhow::anyhow!("scenario {number} was cancelled: {e}")),
    }
}
