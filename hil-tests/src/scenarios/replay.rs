//! Scenario 1: the conversation trace replayed through the whole system.

use std::time::Duration;

use qosroute_swarm::Swarm;
use qosroute_testkit::BrokerOptions;
use tokio::time::Instant;

use super::{DEVICES, LOAD, MAX_OUTPUT, SPEED, Setup, finish_daemon, probe};
use crate::Scale;
use crate::report::Report;
use crate::rig::{self, RssSampler};

/// Replays `10,000 x scale` requests of the Azure conversation trace (`data/traces/`, through
/// the simulator's workload synthesis, at the trace's rate, 20x faster than real time: about
/// 110 requests/s, answers capped at 48 tokens)
/// from 32 devices through mosquitto and the real daemon to the six edge-mixed experts.
///
/// Asserts: every request is published and ends exactly once (one final or one error reply:
/// none lost, none duplicated, every reply attributable); at least 80 % of them complete and
/// the rest are only explicit `no_expert` refusals (the site keeps up with this rate: 99.6 %
/// complete on an idle machine, 92 % with another scenario on the other core, the router
/// refusing what it predicts would miss the SLO); the
/// daemon counted what the devices received; it exits 0 on SIGTERM.
pub async fn replay(scale: Scale) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = Report::new(1, "replay", scale);
    let n = scale.n(10_000);
    let setup = Setup::edge_mixed("hil-replay", SPEED, BrokerOptions::default())?;
    let mut config = setup.config("qosrouted-hil-replay", &setup.all());
    config.session_expiry_s = 0;
    let mut daemon = setup.daemon(&config).await?;
    let sampler = RssSampler::start(daemon.pid(), Duration::from_millis(100));
    let plan = rig::trace_requests(&setup.quality, n, 0.0, LOAD, MAX_OUTPUT, 1)?;
    let swarm_config = setup.swarm(DEVICES);
    probe(&swarm_config, &daemon).await?;
    let run = Swarm::start(swarm_config, &plan, Some(setup.truth()))
        .await?
        .finish()
        .await?;
    let s = run.summary();
    report.swarm_figures("", &s);
    report.figure("QoS (devices)", format!("{:.3}", s.avg_qos));
    report.figure(
        "daemon peak RSS sampled (VmRSS)",
        crate::report::mib(sampler.peak_kib()),
    );
    report.swarm_checks("", &s);
    let completed_share = s.completed as f64 / s.requests.max(1) as f64;
    report.check(
        "at least 80 % completed",
        completed_share >= 0.80,
        format!(
            "{:.1} % completed; errors {:?}",
            completed_share * 100.0,
            s.errors_by_code
        ),
    );
    let only_refusals = s.errors_by_code.keys().all(|code| code == "no_expert");
    report.check(
        "no error but explicit no_expert refusals",
        only_refusals,
        format!("{:?}", s.errors_by_code),
    );
    finish_daemon(&mut report, &mut daemon, Some(s.completed), "").await;
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}
