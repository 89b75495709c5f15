//! Scenario 6: SIGHUP swaps experts under load, then SIGTERM drains under load.

use std::time::Duration;

use qosroute_proto::ErrorCode;
use qosroute_swarm::{Outcome, Swarm};
use qosroute_testkit::BrokerOptions;
use tokio::time::Instant;

use super::{DEVICES, LOAD, MAX_OUTPUT, SPEED, Setup, probe};
use crate::Scale;
use crate::report::Report;
use crate::rig::{self, Expert};

/// The expert the reload removes (edge-mixed's first: busy, 4 slots).
const REMOVED: usize = 0;

/// The trace replay (`1,000 x scale` requests of a busy window: about 150 requests/s).
/// At 30 % of the run the daemon's configuration file is rewritten without the RTX 4090 expert
/// and with a second L4 expert (a new emulated server), and it gets SIGHUP. When the last
/// request is published (a few dozen in flight, more on their way) it gets SIGTERM: it drains
/// (what still arrives is answered `shutting_down`, what is in flight finishes, 5 s at most)
/// and exits.
///
/// Asserts: every request ends exactly once (none lost, none duplicated); errors are only
/// `shutting_down` or `no_expert` (nothing cut, nothing failed); no request published after
/// the reload was in force went to the removed expert, and what was streaming from it at the
/// reload finished there; the added expert served requests; every request streaming when
/// SIGTERM came completed; every final reply the daemon counted reached its device; it exited 0
/// within the drain deadline plus 2 s.
///
/// (Requests that keep arriving after the in-flight ones are done: scenario 8.)
pub async fn reload_and_drain(scale: Scale) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = Report::new(6, "reload-drain", scale);
    let n = scale.n(1000);
    let mut setup = Setup::edge_mixed("hil-reload", SPEED, BrokerOptions::default())?;
    // The added expert: a second L4 (edge-mixed's third expert), as fast and as good.
    let mut l4 = setup.catalogue.experts[2].clone();
    l4.name = format!("{}-b", l4.name);
    setup
        .experts
        .push(Expert::start(l4, SPEED, &setup.quality, 61)?);
    let added = setup.experts.len() - 1;
    let removed_name = setup.experts[REMOVED].name().to_owned();
    let added_name = setup.experts[added].name().to_owned();
    let before: Vec<usize> = (0..added).collect();
    let after: Vec<usize> = (0..=added).filter(|&i| i != REMOVED).collect();
    let config = setup.config("qosrouted-hil-reload", &before);
    let drain_deadline_s = config.drain_deadline_s;
    let mut daemon = setup.daemon(&config).await?;
    let plan = rig::trace_requests(
        &setup.quality,
        n,
        scale.pick(1800.0, 0.0),
        LOAD,
        MAX_OUTPUT,
        6,
    )?;
    let swarm_config = setup.swarm(DEVICES);
    probe(&swarm_config, &daemon).await?;
    let swarm = Swarm::start(swarm_config, &plan, Some(setup.truth())).await?;

    // SIGHUP at 30 %.
    while swarm.progress().published < (n * 3 / 10) as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let received_at_reload = setup.experts[REMOVED].received_total();
    let reloaded = setup
        .config("qosrouted-hil-reload", &after)
        .render()
        .replace("{metrics_port}", &daemon.metrics_port.to_string());
    std::fs::write(&daemon.config, reloaded)?;
    let hup_at = swarm.progress().elapsed_s;
    daemon.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while daemon.log_count("configuration reloaded") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reloaded_at = swarm.progress().elapsed_s;
    let reload_seen = daemon.log_count("configuration reloaded") > 0;
    report.figure(
        "SIGHUP",
        format!("at {hup_at:.2} s, in force at {reloaded_at:.2} s: -{removed_name} +{added_name}"),
    );

    // SIGTERM as the last request is published.
    while swarm.progress().published < n as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let term_at = swarm.progress().elapsed_s;
    let in_flight_at_term = swarm.progress().in_flight();
    let hwm = daemon.peak_rss_kib();
    let drain_started = Instant::now();
    daemon.signal("TERM");
    let exit = tokio::task::block_in_place(|| {
        daemon.wait_exit(Duration::from_secs_f64(drain_deadline_s + 10.0))
    });
    let drained_s = drain_started.elapsed().as_secs_f64();
    super::keep_log(&report, &daemon, "");
    // Its last words: `stopped completed=N`.
    let counted: Option<u64> = daemon
        .log_text()
        .lines()
        .rev()
        .find(|l| l.contains("stopped"))
        .and_then(|l| l.split("completed=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok());
    report.figure(
        "SIGTERM",
        format!(
            "at {term_at:.2} s with {in_flight_at_term} requests in flight; exit {exit:?} after {drained_s:.2} s"
        ),
    );
    if let Some(hwm) = hwm {
        report.figure("daemon peak RSS (VmHWM)", crate::report::mib(hwm));
    }
    let run = swarm.finish().await?;
    let s = run.summary();
    report.swarm_figures("", &s);
    let removed_received_after = setup.experts[REMOVED].received_total() - received_at_reload;
    report.figure(
        "removed expert: requests received after the SIGHUP",
        removed_received_after,
    );
    let added_served = setup.experts[added].served_total();
    report.figure("added expert: answers", added_served);

    report.swarm_checks("", &s);
    report.check(
        "errors are only shutting_down or no_expert",
        s.errors_by_code
            .keys()
            .all(|c| c == "shutting_down" || c == "no_expert"),
        format!("{:?}", s.errors_by_code),
    );
    report.check(
        "the reload was applied",
        reload_seen,
        "`configuration reloaded` logged",
    );
    let late_on_removed: Vec<u32> = run
        .records
        .iter()
        .filter(|r| r.published_s.is_some_and(|t| t > reloaded_at))
        .filter(|r| run.expert_name(r) == Some(removed_name.as_str()))
        .map(|r| r.index)
        .collect();
    report.check(
        "nothing published after the reload went to the removed expert",
        late_on_removed.is_empty(),
        format!("{late_on_removed:?}"),
    );
    let cut_on_removed = run
        .records
        .iter()
        .filter(|r| run.expert_name(r) == Some(removed_name.as_str()))
        .filter(|r| r.outcome != Outcome::Completed)
        .count();
    report.check(
        "what streamed from the removed expert finished there",
        cut_on_removed == 0,
        format!("{cut_on_removed} requests of the removed expert did not complete"),
    );
    report.check(
        "the added expert took traffic",
        added_served > 0,
        format!("{added_served} answers"),
    );
    let cut_at_term: Vec<u32> = run
        .records
        .iter()
        .filter(|r| r.first_chunk_s.is_some_and(|t| t < term_at))
        .filter(|r| r.ended_s.is_none_or(|t| t > term_at))
        .filter(|r| r.outcome != Outcome::Completed)
        .map(|r| r.index)
        .collect();
    report.check(
        "every request streaming at SIGTERM completed",
        cut_at_term.is_empty(),
        format!("{cut_at_term:?}"),
    );
    let shutting_down = run
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Error(ErrorCode::ShuttingDown))
        .count();
    report.figure("answered shutting_down", shutting_down);
    report.check(
        "the daemon drained and exited 0 in time",
        exit == Some(0) && drained_s <= drain_deadline_s + 2.0,
        format!("exit {exit:?} after {drained_s:.2} s (deadline {drain_deadline_s} s)"),
    );
    let delivered = run
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed)
        .count() as u64;
    report.figure(
        "daemon completed (its last log line)",
        counted.map_or("-".into(), |c| c.to_string()),
    );
    report.check(
        "every final reply the daemon counted reached its device",
        counted == Some(delivered),
        format!("daemon counted {counted:?}, devices got {delivered}"),
    );
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}
