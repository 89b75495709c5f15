//! Scenario 7: two daemons share the requests; one is killed and comes back.

use std::time::Duration;

use qosroute_swarm::Swarm;
use qosroute_testkit::{BrokerOptions, Daemon};
use tokio::time::Instant;

use super::{DEVICES, LOAD, MAX_OUTPUT, SPEED, Setup, finish_daemon, probe};
use crate::Scale;
use crate::report::Report;
use crate::rig;

/// How long the killed member stays dead.
const DEAD_FOR: Duration = Duration::from_secs(2);

/// Requests a daemon has in flight, by its per-expert gauges.
fn in_flight(daemon: &Daemon) -> f64 {
    daemon
        .try_metrics()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("qosroute_expert_in_flight{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn completed(daemon: &Daemon) -> f64 {
    daemon.outcomes().get("completed").copied().unwrap_or(0.0)
}

/// Two daemons (`shared_group = "gateways"`, persistent sessions of 600 s, the default) on one
/// broker in front of the same six experts, and the trace replay (`1,200 x scale` requests;
/// the trace from 40 minutes in at CI scale, from its start at the long one).
/// At 40 % of the run the first member is SIGKILLed; two seconds later it starts again with
/// its client id. mosquitto keeps handing the dead member its share of the group's requests,
/// held in its session with the requests it had not acknowledged (daemon/src/config.rs,
/// `shared_group`: with `session_expiry_s = 0` the survivor would take everything at once
/// but what the dead member had in flight would be lost; this scenario takes the side that
/// loses nothing).
///
/// Asserts: nothing is lost (every request ends); duplicated final replies at most the
/// requests the killed member had in flight (a SIGKILL between a final reply's publication
/// and its acknowledgement makes the restarted member answer again: at-least-once, as the
/// daemon documents); errors only `no_expert`; before the kill both members served at least
/// a fifth of the requests (the load splits); the survivor served while the other was dead;
/// the restarted member resumed its session and served what it held; both exit 0.
pub async fn shared_group(scale: Scale) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = Report::new(7, "shared-group", scale);
    let n = scale.n(1200);
    let setup = Setup::edge_mixed("hil-group", SPEED, BrokerOptions::default())?;
    let member = |id: &str| {
        let mut c = setup.config(id, &setup.all());
        c.shared_group = Some("gateways".into());
        c
    };
    let (one_config, two_config) = (member("qosrouted-hil-g1"), member("qosrouted-hil-g2"));
    let mut one = setup.daemon(&one_config).await?;
    let mut two = setup.daemon(&two_config).await?;
    let plan = rig::trace_requests(
        &setup.quality,
        n,
        scale.pick(2400.0, 0.0),
        LOAD,
        MAX_OUTPUT,
        7,
    )?;
    let swarm_config = setup.swarm(DEVICES);
    probe(&swarm_config, &one).await?;
    let swarm = Swarm::start(swarm_config, &plan, Some(setup.truth())).await?;
    while swarm.progress().published < (n * 2 / 5) as u64 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (one_before, two_before) = (completed(&one), completed(&two));
    let one_in_flight = in_flight(&one);
    let kill_at = swarm.progress().elapsed_s;
    one.kill();
    report.figure(
        "before the kill",
        format!("member 1 completed {one_before}, member 2 {two_before}"),
    );
    report.figure(
        "member 1 SIGKILLed",
        format!("at {kill_at:.2} s with {one_in_flight} requests in flight"),
    );
    tokio::time::sleep(DEAD_FOR).await;
    let two_while_dead = completed(&two) - two_before;
    let mut back = setup.daemon(&one_config).await?;
    let back_at = swarm.progress().elapsed_s;
    report.figure(
        "member 1 back",
        format!("serving at {back_at:.2} s; member 2 completed {two_while_dead} meanwhile"),
    );
    let run = swarm.finish().await?;
    let s = run.summary();
    report.swarm_figures("", &s);
    let back_completed = completed(&back);
    report.figure(
        "after the restart",
        format!(
            "member 1 completed {back_completed}, member 2 {} in all",
            completed(&two)
        ),
    );
    let allowed = one_in_flight.round() as u64;
    report.swarm_checks_allowing(
        "",
        &s,
        allowed.max(1),
        "a SIGKILL between a final reply and its ack",
    );
    report.check(
        "errors are only no_expert",
        s.errors_by_code.keys().all(|c| c == "no_expert"),
        format!("{:?}", s.errors_by_code),
    );
    let total_before = one_before + two_before;
    report.check(
        "the load splits: each member served at least a fifth before the kill",
        total_before > 0.0 && one_before >= 0.2 * total_before && two_before >= 0.2 * total_before,
        format!("member 1 {one_before}, member 2 {two_before}"),
    );
    report.check(
        "the survivor served while the other was dead",
        two_while_dead > 0.0,
        format!("{two_while_dead} completed in {DEAD_FOR:?}"),
    );
    report.check(
        "the restarted member resumed its session and served",
        back.log_text().contains("session_present=true") && back_completed > 0.0,
        format!("session_present=true logged; {back_completed} completed"),
    );
    finish_daemon(&mut report, &mut back, None, "member 1").await;
    finish_daemon(&mut report, &mut two, None, "member 2").await;
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}
