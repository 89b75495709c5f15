//! Scenario 11: an expert slows down five times mid-run without failing (thermal throttling,
//! a neighbour's job on a shared GPU): its health checks pass, only its speed tells.

use std::time::Duration;

use anyhow::Context;
use qosroute_core::LatencyModel;
use qosroute_sim::{Slowdown, SlowdownRun, slowdown_reference};
use qosroute_swarm::{Outcome, Swarm, SwarmReport};
use qosroute_testkit::BrokerOptions;
use tokio::time::Instant;

use super::direct::exported_model;
use super::{DEVICES, LOAD, MAX_OUTPUT, SPEED, Setup, finish_daemon, probe};
use crate::Scale;
use crate::report::{Report, percent};
use crate::rig::{self, Policy};

/// The expert that slows down: the fastest of edge-mixed, the one `qos-greedy` gives the most.
const VICTIM: &str = "rtx4090-gemma2-9b";
/// How many times slower it becomes (prefill and decode).
const FACTOR: f64 = 5.0;
/// Requests at CI scale (about 27 s of the trace at 20x).
const REQUESTS: usize = 3_000;
/// The slow window, as fractions of the plan: it slows down a fifth of the way in and is
/// back at four fifths (at CI scale 5.4 s and 21.6 s into the run).
const FROM: f64 = 0.2;
const UNTIL: f64 = 0.8;
/// The target: within this many seconds of the slowdown (wall-clock, of the run), traffic to
/// the slowed expert has fallen to what it can serve within the SLO.
const SETTLE_WITHIN_S: f64 = 10.0;
/// "What it can serve within the SLO" is the simulator's reference: the same requests, the
/// same router (`qos-greedy`), told the new speed at once. The slowed expert may get this
/// many times the reference's rate (per 2 s window, plus `RATE_SLACK` requests: at 1-3
/// requests per window the reference itself is a count of a few), since the daemon learns
/// the new speed from its own observations.
const RATE_MARGIN: f64 = 1.5;
const RATE_SLACK: f64 = 3.0;
/// The windows traffic is counted in, seconds of the run.
const WINDOW_S: f64 = 2.0;
/// From `SETTLE_WITHIN_S` after the slowdown, the slowed expert's answers meet their SLO this
/// often: a floor that tells a router that learned the new speed from one that did not.
/// Measured 2026-12-07 (CI scale unless said): 5.4 % before the calibrator's regime restart
/// (the calibrated step stuck at 12-32 % of the true one; the simulator's blind router: 0 %);
/// after it 93.7 % (59 of 63), then, merged with the calibration changes of issue 18, 79.7 %
/// (51 of 64) and 77.8 % (49 of 63) in full suite runs on the shared 2-core machine, and
/// 66.6 % at `--long` on a saturated one. At 20x time compression the slowed step (2.5-4 ms)
/// leaves little room in a 5 ms/token SLO, so CPU scheduling turns into misses; the simulator
/// told the new speed at once met it for 91 %. 50 % sits 16 points under the lowest run after
/// the fix and far above every run before it.
const SETTLED_ATTAINMENT: f64 = 0.50;
/// The context the predicted decode step is compared at (a lone sequence of a typical
/// conversation turn: prompt plus answer).
const STEP_CONTEXT: f64 = 1_000.0;

/// One run (with the fault or without) and the daemon's model of the slowed expert over time.
struct Run {
    swarm: SwarmReport,
    /// `(seconds of the run, the daemon's latency model of the victim)`.
    calibration: Vec<(f64, LatencyModel)>,
    /// When the slowdown was set and cleared, seconds of the run.
    slowed: Option<(f64, f64)>,
}

/// The 3,000 first requests of the conversation trace (x scale; 20x faster than real time,
/// answers capped at 48 tokens) through the daemon running `qos-greedy` (the simulator's
/// reference runs the same router) to the six edge-mixed experts, twice: once without fault,
/// once with the RTX 4090 expert five times slower (prefill and decode, the emulator's
/// `slowdown` fault) from a fifth of the run to four fifths. Its health checks keep passing.
///
/// Measures: requests routed to the slowed expert per second against the run without the fault
/// and the simulator's reference (the same requests, told the new speed at once); the daemon's
/// calibrated decode step of the slowed expert over time against the true one; QoS lost
/// against the run without the fault (devices' measure) and the simulator's.
///
/// Asserts: every request of both runs ends exactly once, errors only `no_expert`; within 10 s
/// of the slowdown, traffic to the slowed expert stays at most 1.5x the reference's rate per
/// 2 s (+3 requests) until it is back; the answers it gave from 10 s after the slowdown meet
/// their SLO at least 50 % of the time; the daemon's calibrated decode step reached half the true slowed step;
/// the daemon counted what the devices got; it exits 0 on SIGTERM.
pub async fn slow_expert(scale: Scale) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = Report::new(11, "slow-expert", scale);
    let n = scale.n(REQUESTS);
    let setup = Setup::edge_mixed("hil-slow", SPEED, BrokerOptions::default())?;
    let victim = setup
        .experts
        .iter()
        .position(|e| e.name() == VICTIM)
        .context("edge-mixed has no RTX 4090 expert")?;
    let workload = rig::trace_workload(&setup.quality, n, 0.0, LOAD, MAX_OUTPUT, 1)?;
    let plan = rig::trace_requests(&setup.quality, n, 0.0, LOAD, MAX_OUTPUT, 1)?;
    let span_s = workload.requests.last().map_or(0.0, |r| r.arrival_s);
    // Trace seconds; the run's seconds are these over SPEED.
    let (from_s, until_s) = (FROM * span_s, UNTIL * span_s);
    let reference = slowdown_reference(
        &setup.catalogue,
        &setup.quality,
        &workload,
        Slowdown {
            expert: victim,
            factor: FACTOR,
            from_s,
            until_s,
            router_knows: true,
        },
        "qos-greedy",
        1,
        WINDOW_S * SPEED,
    )?;
    let [sim_none, sim_knows, sim_blind] = [&reference[0], &reference[1], &reference[2]];

    let clean = run_once(&mut report, &setup, &plan, victim, None, "clean").await?;
    let faulty = run_once(
        &mut report,
        &setup,
        &plan,
        victim,
        Some((from_s / SPEED, until_s / SPEED)),
        "slowed",
    )
    .await?;
    let (t_slow, t_back) = faulty.slowed.context("the slowdown was never set")?;

    // Traffic to the victim per window of the run.
    let windows = (span_s / SPEED / WINDOW_S).ceil() as usize + 1;
    let per_window = |run: &SwarmReport| -> Vec<u64> {
        let mut counts = vec![0u64; windows];
        for r in &run.records {
            if run.expert_name(r) == Some(VICTIM)
                && let Some(at) = r.published_s
            {
                let w = ((at / WINDOW_S) as usize).min(windows - 1);
                counts[w] += 1;
            }
        }
        counts
    };
    let clean_counts = per_window(&clean.swarm);
    let faulty_counts = per_window(&faulty.swarm);
    let reference_rate = window_rate(sim_knows, from_s, until_s);
    let allowed = RATE_MARGIN * reference_rate * WINDOW_S + RATE_SLACK;
    // Settled: at the start of the first window after the slowdown from which every window's
    // count up to the restoration stays within the allowance.
    let first = ((t_slow / WINDOW_S).ceil() as usize).min(windows);
    let last = ((t_back / WINDOW_S).floor() as usize).clamp(first, windows);
    let settled_window =
        (first..last).find(|&w| faulty_counts[w..last].iter().all(|&c| c as f64 <= allowed));
    let settled_after_s = settled_window.map(|w| (w as f64 * WINDOW_S - t_slow).max(0.0));

    report.swarm_figures("clean", &clean.swarm.summary());
    report.swarm_figures("slowed", &faulty.swarm.summary());
    report.figure(
        "slowdown",
        format!(
            "{VICTIM} {FACTOR}x slower from {t_slow:.1} s to {t_back:.1} s of the run ({:.0}-{:.0} s of the trace)",
            from_s, until_s
        ),
    );
    report.figure(
        format!("to {VICTIM} per {WINDOW_S:.0} s, clean run"),
        format!("{clean_counts:?}"),
    );
    report.figure(
        format!("to {VICTIM} per {WINDOW_S:.0} s, slowed run"),
        format!("{faulty_counts:?}"),
    );
    report.figure(
        format!("to {VICTIM} per {WINDOW_S:.0} s, simulator (none / knows / blind)"),
        format!(
            "{:?} / {:?} / {:?}",
            sim_none.routed_to_victim, sim_knows.routed_to_victim, sim_blind.routed_to_victim
        ),
    );
    report.figure(
        "what the slowed expert can serve within the SLO (simulator, told at once)",
        format!(
            "{reference_rate:.1} requests/s of the run ({} of {} in the window met the SLO); allowed {allowed:.1} per {WINDOW_S:.0} s",
            sim_knows.window_victim_met, sim_knows.window_victim_routed
        ),
    );
    report.figure(
        "traffic settled after the slowdown",
        settled_after_s.map_or_else(|| "never".into(), |s| format!("{s:.1} s")),
    );
    let shown = |a: Option<(u64, u64)>| {
        a.map_or_else(
            || "none".into(),
            |(met, of)| format!("{} ({met} of {of})", percent(met as f64 / of.max(1) as f64)),
        )
    };
    let since_settled =
        settled_attainment(&faulty.swarm, settled_after_s.map(|s| t_slow + s), t_back);
    report.figure(
        "slowed expert's answers after the traffic settled that met the SLO",
        shown(since_settled),
    );
    // The target's window: from 10 s after the slowdown to its end.
    let attainment = settled_attainment(&faulty.swarm, Some(t_slow + SETTLE_WITHIN_S), t_back);
    report.figure(
        format!("slowed expert's answers from {SETTLE_WITHIN_S:.0} s after the slowdown that met the SLO"),
        shown(attainment),
    );
    let clean_attainment =
        settled_attainment(&clean.swarm, settled_after_s.map(|s| t_slow + s), t_back);
    report.figure(
        "the same expert's answers in the same window of the clean run that met the SLO",
        clean_attainment.map_or_else(
            || "none".into(),
            |(met, of)| format!("{} ({met} of {of})", percent(met as f64 / of.max(1) as f64)),
        ),
    );
    calibration_figures(&mut report, &faulty, &setup, victim, t_slow, t_back);
    let qos = |run: &SwarmReport, window: Option<(f64, f64)>| -> f64 {
        let (sum, count) = run
            .records
            .iter()
            .filter(|r| match (window, r.published_s) {
                (Some((a, b)), Some(t)) => (a..b).contains(&t),
                (Some(_), None) => false,
                (None, _) => true,
            })
            .filter_map(|r| r.qos())
            .fold((0.0, 0usize), |(s, c), q| (s + q, c + 1));
        sum / count.max(1) as f64
    };
    let window = Some((t_slow, t_back));
    report.figure(
        "QoS clean -> slowed, whole run (devices)",
        format!(
            "{:.4} -> {:.4}",
            qos(&clean.swarm, None),
            qos(&faulty.swarm, None)
        ),
    );
    report.figure(
        "QoS clean -> slowed, in the slow window (devices)",
        format!(
            "{:.4} -> {:.4} (lost {:.4})",
            qos(&clean.swarm, window),
            qos(&faulty.swarm, window),
            qos(&clean.swarm, window) - qos(&faulty.swarm, window)
        ),
    );
    report.figure(
        "QoS in the slow window, simulator none / knows / blind",
        format!(
            "{:.4} / {:.4} / {:.4}",
            sim_none.window_qos, sim_knows.window_qos, sim_blind.window_qos
        ),
    );

    for (label, run) in [("clean", &clean), ("slowed", &faulty)] {
        let s = run.swarm.summary();
        report.swarm_checks(label, &s);
        report.check(
            format!("{label}: no error but explicit no_expert refusals"),
            s.errors_by_code.keys().all(|code| code == "no_expert"),
            format!("{:?}", s.errors_by_code),
        );
    }
    report.check(
        format!(
            "traffic to the slowed expert falls to what it can serve within the SLO within {SETTLE_WITHIN_S:.0} s"
        ),
        settled_after_s.is_some_and(|s| s <= SETTLE_WITHIN_S),
        format!(
            "settled after {}; allowed {allowed:.1} per {WINDOW_S:.0} s (reference {reference_rate:.1}/s x {RATE_MARGIN} + {RATE_SLACK})",
            settled_after_s.map_or_else(|| "never".into(), |s| format!("{s:.1} s"))
        ),
    );
    report.check(
        format!(
            "from {SETTLE_WITHIN_S:.0} s after the slowdown, the slowed expert's answers meet their SLO at least {:.0} % of the time",
            SETTLED_ATTAINMENT * 100.0
        ),
        attainment.is_none_or(|(met, of)| met as f64 >= SETTLED_ATTAINMENT * of as f64),
        attainment.map_or_else(
            || "it answered none".into(),
            |(met, of)| format!("{met} of {of}"),
        ),
    );
    let true_step = setup.experts[victim]
        .entry(&setup.quality)
        .latency
        .slowed(FACTOR)
        .decode_step_s(1.0, STEP_CONTEXT);
    let noticed = first_reaching(&faulty.calibration, t_slow, t_back, 0.5 * true_step);
    report.check(
        "the daemon's calibration noticed: its decode step reached half the true slowed one",
        noticed.is_some(),
        noticed.map_or_else(
            || "never within the slow window".into(),
            |t| format!("after {:.1} s", t - t_slow),
        ),
    );
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Runs the plan through a fresh daemon; with `slow = Some((T, T2))` the victim is slowed
/// from T to T2 seconds of the run.
async fn run_once(
    report: &mut Report,
    setup: &Setup,
    plan: &[qosroute_swarm::SwarmRequest],
    victim: usize,
    slow: Option<(f64, f64)>,
    label: &str,
) -> anyhow::Result<Run> {
    let mut config = setup.config(&format!("qosrouted-hil-slow-{label}"), &setup.all());
    config.policy = Policy::Baseline("qos-greedy");
    config.session_expiry_s = 0;
    let mut daemon = setup.daemon(&config).await?;
    let swarm_config = setup.swarm(DEVICES);
    probe(&swarm_config, &daemon).await?;
    let swarm = Swarm::start(swarm_config, plan, Some(setup.truth())).await?;
    let requests = plan.len() as u64;
    let mut calibration = Vec::new();
    let (mut set_at, mut cleared_at) = (None, None);
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let p = swarm.progress();
        if let Some((from, until)) = slow {
            if set_at.is_none() && p.elapsed_s >= from {
                setup.experts[victim].set_faults(qosroute_emulator::Faults {
                    slowdown: Some(FACTOR),
                    ..Default::default()
                })?;
                set_at = Some(swarm.progress().elapsed_s);
            }
            if set_at.is_some() && cleared_at.is_none() && p.elapsed_s >= until {
                setup.experts[victim].set_faults(qosroute_emulator::Faults::default())?;
                cleared_at = Some(swarm.progress().elapsed_s);
            }
        }
        if let Some(m) = daemon
            .try_metrics()
            .ok()
            .as_deref()
            .and_then(|m| exported_model(m, VICTIM))
        {
            calibration.push((p.elapsed_s, m));
        }
        if p.finished || (p.published + p.not_sent >= requests && p.in_flight() == 0) {
            break;
        }
    }
    // A run shorter than the window (it cannot be at these sizes) leaves no fault behind.
    setup.experts[victim].set_faults(qosroute_emulator::Faults::default())?;
    let run = swarm.finish().await?;
    finish_daemon(report, &mut daemon, Some(run.summary().completed), label).await;
    Ok(Run {
        swarm: run,
        calibration,
        slowed: set_at.map(|t| (t, cleared_at.unwrap_or(f64::INFINITY))),
    })
}

/// The reference's rate of requests to the slowed expert in the window, per second of the run.
fn window_rate(run: &SlowdownRun, from_s: f64, until_s: f64) -> f64 {
    run.window_victim_routed as f64 / ((until_s - from_s) / SPEED).max(1e-9)
}

/// Of the victim's answers to requests published from `from` to `until`, how many met their
/// SLO, and of how many.
fn settled_attainment(run: &SwarmReport, from: Option<f64>, until: f64) -> Option<(u64, u64)> {
    let from = from?;
    let served: Vec<_> = run
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed && run.expert_name(r) == Some(VICTIM))
        .filter(|r| r.published_s.is_some_and(|t| (from..until).contains(&t)))
        .collect();
    if served.is_empty() {
        return None;
    }
    let met = served.iter().filter(|r| r.slo_met == Some(true)).count() as u64;
    Some((met, served.len() as u64))
}

/// The first time in `[from, until)` the calibrated decode step reaches `step_s`.
fn first_reaching(
    calibration: &[(f64, LatencyModel)],
    from: f64,
    until: f64,
    step_s: f64,
) -> Option<f64> {
    calibration
        .iter()
        .filter(|(t, _)| (from..until).contains(t))
        .find(|(_, m)| m.decode_step_s(1.0, STEP_CONTEXT) >= step_s)
        .map(|(t, _)| *t)
}

/// The daemon's predicted decode step of the victim against the true one, over time.
fn calibration_figures(
    report: &mut Report,
    run: &Run,
    setup: &Setup,
    victim: usize,
    t_slow: f64,
    t_back: f64,
) {
    let configured = setup.experts[victim].entry(&setup.quality).latency;
    let full = configured.decode_step_s(1.0, STEP_CONTEXT);
    let slow = configured.slowed(FACTOR).decode_step_s(1.0, STEP_CONTEXT);
    let model_at = |t: f64| {
        run.calibration
            .iter()
            .rev()
            .find(|(s, _)| *s <= t)
            .map(|(_, m)| *m)
    };
    let at = |t: f64| model_at(t).map(|m| m.decode_step_s(1.0, STEP_CONTEXT));
    let mut points = Vec::new();
    for (label, t, truth) in [
        ("T", t_slow, slow),
        ("T+1", t_slow + 1.0, slow),
        ("T+2", t_slow + 2.0, slow),
        ("T+5", t_slow + 5.0, slow),
        ("T+10", t_slow + 10.0, slow),
        ("T2", t_back, slow),
        ("T2+5", t_back + 5.0, full),
    ] {
        if let Some(step) = at(t) {
            points.push(format!(
                "{label} {:.2} ms ({:.0} % of true {:.2})",
                step * 1e3,
                step / truth * 100.0,
                truth * 1e3
            ));
        }
    }
    report.figure(
        format!("predicted decode step of {VICTIM} (batch 1, {STEP_CONTEXT:.0} context tokens)"),
        points.join("; "),
    );
    let prefill = |m: &LatencyModel| m.prefill_s(STEP_CONTEXT) * 1e3;
    let slow_prefill = prefill(&configured.slowed(FACTOR));
    let points: Vec<String> = [
        ("T", t_slow),
        ("T+1", t_slow + 1.0),
        ("T+5", t_slow + 5.0),
        ("T+10", t_slow + 10.0),
    ]
    .into_iter()
    .filter_map(|(label, t)| {
        model_at(t).map(|m| {
            format!(
                "{label} {:.1} ms ({:.0} % of true {slow_prefill:.1})",
                prefill(&m),
                prefill(&m) / slow_prefill * 100.0
            )
        })
    })
    .collect();
    report.figure(
        format!("predicted prefill of {STEP_CONTEXT:.0} tokens of {VICTIM}"),
        points.join("; "),
    );
    for share in [0.5, 0.9] {
        let reached = first_reaching(&run.calibration, t_slow, t_back, share * slow);
        report.figure(
            format!(
                "calibration reached {:.0} % of the true slowed step",
                share * 100.0
            ),
            reached.map_or_else(
                || "not within the window".into(),
                |t| format!("{:.1} s after the slowdown", t - t_slow),
            ),
        );
    }
}
