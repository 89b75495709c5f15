//! Scenario 8: a drain under load with a clean session.

use std::time::Duration;

use qosroute_swarm::{Outcome, Swarm};
use qosroute_testkit::BrokerOptions;
use tokio::time::Instant;

use super::{DEVICES, LOAD, MAX_OUTPUT, SPEED, Setup, keep_log, probe};
use crate::Scale;
use crate::report::Report;
use crate::rig;

/// The daemon as `qosroute demo` runs it (`session_expiry_s = 0`: no session to hand
/// anything to a successor) replaying `1,200 x scale` trace requests (a busy window: about 150
/// requests/s); SIGTERM at 40 % of the run while the devices keep publishing; no second
/// daemon.
///
/// Asserts what the drain promises (daemon/README.md: new requests get `shutting_down`,
/// in-flight ones get the drain deadline): every final reply the daemon counts as
/// `completed` reaches its device, every request it started streaming ends, every request
/// published while it was connected (up to 100 ms before it exited: it cannot answer what
/// arrives after its DISCONNECT) ends; it exits 0 within the deadline.
///
/// This scenario found a bug of the daemon's drain (fixed): the dispatcher stopped reading
/// requests as soon as the requests in flight were done while the daemon stayed subscribed
/// until its DISCONNECT, so what the broker delivered meanwhile went unanswered (27-39 requests
/// lost per drain at ~150 requests/s); and the MQTT event loop could end before the last
/// replies, acknowledgements and the DISCONNECT left the process. The daemon now answers
/// `shutting_down` until its link closes and polls the event loop until the broker closes the
/// connection after the DISCONNECT (daemon/src/daemon.rs, `run`).
pub async fn drain_clean_session(scale: Scale) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = Report::new(8, "drain-clean-session", scale);
    let n = scale.n(1200);
    let setup = Setup::edge_mixed("hil-drain", SPEED, BrokerOptions::default())?;
    let mut config = setup.config("qosrouted-hil-drain", &setup.all());
    config.session_expiry_s = 0;
    let drain_deadline_s = config.drain_deadline_s;
    let mut daemon = setup.daemon(&config).await?;
    let plan = rig::trace_requests(
        &setup.quality,
        n,
        scale.pick(1800.0, 0.0),
        LOAD,
        MAX_OUTPUT,
        8,
    )?;
    let mut swarm_config = setup.swarm(DEVICES);
    swarm_config.reply_timeout = Duration::from_secs(5);
    probe(&swarm_config, &daemon).await?;
    let swarm = Swarm::start(swarm_config, &plan, Some(setup.truth())).await?;
    while swarm.progress().published < (n * 2 / 5) as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let term_at = swarm.progress().elapsed_s;
    let in_flight = swarm.progress().in_flight();
    let drain_started = Instant::now();
    daemon.signal("TERM");
    let exit = tokio::task::block_in_place(|| {
        daemon.wait_exit(Duration::from_secs_f64(drain_deadline_s + 10.0))
    });
    let drained_s = drain_started.elapsed().as_secs_f64();
    let exit_at = swarm.progress().elapsed_s;
    // Nobody answers from now on: stop, and let what is in flight end or time out.
    swarm.stop_publishing();
    keep_log(&report, &daemon, "");
    let counted: Option<u64> = daemon
        .log_text()
        .lines()
        .rev()
        .find(|l| l.contains("stopped"))
        .and_then(|l| l.split("completed=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    let run = swarm.finish().await?;
    let s = run.summary();
    report.figure(
        "SIGTERM",
        format!(
            "at {term_at:.2} s with {in_flight} requests in flight; exit {exit:?} after {drained_s:.2} s"
        ),
    );
    report.swarm_figures("", &s);
    report.figure(
        "daemon completed (its last log line)",
        counted.map_or("-".into(), |c| c.to_string()),
    );
    let delivered = run
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed)
        .count() as u64;
    report.check(
        "every final reply the daemon counted reached its device",
        counted == Some(delivered),
        format!("daemon counted {counted:?}, devices got {delivered}"),
    );
    let started_not_ended: Vec<u32> = run
        .records
        .iter()
        .filter(|r| r.chunks > 0 && r.ends == 0)
        .map(|r| r.index)
        .collect();
    report.check(
        "every request the daemon started streaming ended",
        started_not_ended.is_empty(),
        format!("streamed without an end: {started_not_ended:?}"),
    );
    let early_lost: Vec<u32> = run
        .records
        .iter()
        .filter(|r| r.published_s.is_some_and(|t| t < term_at - 0.2) && r.ends == 0)
        .map(|r| r.index)
        .collect();
    report.check(
        "every request published 200 ms before the SIGTERM ended",
        early_lost.is_empty(),
        format!("without an end: {early_lost:?}"),
    );
    // The daemon stays subscribed until its DISCONNECT, just before it exits: what the broker
    // hands it until then must be answered (`shutting_down` during the drain). What arrives
    // after the DISCONNECT went out cannot be: 100 ms before the exit are left out for that
    // (closing that window needs an UNSUBSCRIBE before the DISCONNECT: hil-tests/README.md).
    let unanswered: Vec<u32> = run
        .records
        .iter()
        .filter(|r| r.published_s.is_some_and(|t| t < exit_at - 0.1) && r.ends == 0)
        .map(|r| r.index)
        .collect();
    report.check(
        "every request published while the daemon was connected ended",
        unanswered.is_empty(),
        format!(
            "{} without an end, published before {:.2} s: {:?}",
            unanswered.len(),
            exit_at - 0.1,
            unanswered.iter().take(20).collect::<Vec<_>>()
        ),
    );
    let after_exit = run
        .records
        .iter()
        .filter(|r| r.published_s.is_some_and(|t| t > exit_at))
        .count();
    report.figure(
        "published after the daemon exited (no gateway: unanswered)",
        after_exit,
    );
    report.check(
        "the daemon drained and exited 0 in time",
        exit == Some(0) && drained_s <= drain_deadline_s + 2.0,
        format!("exit {exit:?} after {drained_s:.2} s (deadline {drain_deadline_s} s)"),
    );
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}
