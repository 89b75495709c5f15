//! Scenario 5: offered load at five times the site's capacity.

use std::time::Duration;

use qosroute_core::{ExpertProfile, LatencyModel, SloTable, Task};
use qosroute_swarm::{Outcome, Swarm};
use qosroute_testkit::Broker;
use tokio::time::Instant;

use super::{finish_daemon, probe};
use crate::Scale;
use crate::report::{Report, mib, percent};
use crate::rig::{self, DaemonConfig, Expert, RssSampler};

/// Experts run this much faster than the hardware of their profile.
const SPEED: f64 = 4.0;
/// Prompt and answer of every request, tokens.
const PROMPT: u32 = 100;
const OUTPUT: u32 = 32;
/// SLO, seconds per output token on the profile's hardware (16 ms wall-clock at 4x): a full
/// batch makes about 12 ms per token (15 ms as the gateway measures it, from receipt to the
/// last token), a request that waits for a slot 20 ms or more.
const SLO_S: f64 = 0.064;
/// Offered load over capacity.
const OVERLOAD: f64 = 5.0;
/// Seconds of overload at CI scale.
const SECONDS: f64 = 5.0;
/// Admitted requests must meet their SLO at least this often...
const ATTAINMENT: f64 = 0.80;
/// ... and come within 10 % of it this often (the router's latency prediction is that good).
const NEAR_ATTAINMENT: f64 = 0.98;
/// Allowed growth of the daemon's resident memory over its level at the start: twice the
/// largest growth measured, rounded up to a MiB (twice, not 1.5 times: at a few MiB the
/// allocator's per-thread arenas move it by a MiB or two). Measured (VmRSS at the start ->
/// peak): 3.5, 3.7 and 3.6 MiB at CI scale (debug build, 2026-12-07, machine shared with other
/// builds and the suite's long runs), 3.8 MiB on 2026-11-24, 2.7 MiB at `--long` (50 s of
/// overload, release build). `max_in_flight = 12` bounds what requests hold; at `--long` ten
/// times the requests gave less growth, not more. It was 48 MiB.
const RSS_BOUND_KIB: u64 = 8 * 1024;
/// Completed throughput must be at least this share of the capacity. What the policy
/// promises: it admits a request whenever a slot is free and the request would meet its SLO
/// (a full batch does), and at 5x overload the next request arrives about 10 ms after a slot
/// frees (1 / 103 req/s) against a service of about 0.4 s, so the slots stay busy over 97 %
/// of the time; the capacity formula itself (every other prefill stalling the batch once) is
/// within a few % of what the experts do. Measured: 106, 107, 107 % at CI scale (debug,
/// 2026-12-07, machine shared), 107 % on 2026-11-24, 103 % at `--long` (release). 0.9 leaves
/// 13 points below the lowest measurement for a busier machine. It was 0.5 (no collapse).
const GOODPUT_FLOOR: f64 = 0.9;

/// A 7B-class expert on a mid-range GPU: 4 slots, 25 steps/s alone.
fn profile(name: &str) -> ExpertProfile {
    ExpertProfile {
        name: name.into(),
        model: "qwen25_7b".into(),
        hardware: "hil overload profile".into(),
        source: String::new(),
        max_slots: 4,
        kv_tokens: 100_000,
        latency: LatencyModel {
            prefill_tok_s: 5_000.0,
            prefill_overhead_s: 0.0,
            decode_t0_s: 0.04,
            decode_d_s_per_seq: 0.002,
            decode_e_s_per_ctx_token: 4e-8,
        },
    }
}

/// Requests per second one expert completes with every slot busy (wall-clock at `SPEED`):
/// `slots / (prefill + OUTPUT decode steps at a full batch)`, every other request's prefill
/// stalling the batch once (ignored context growth: `e` is tiny).
fn capacity_per_s(p: &ExpertProfile) -> f64 {
    let l = &p.latency;
    let b = f64::from(p.max_slots);
    let prefill = f64::from(PROMPT) / l.prefill_tok_s;
    let step = l.decode_t0_s + l.decode_d_s_per_seq * (b - 1.0);
    let service = prefill * b + f64::from(OUTPUT) * step;
    b / service * SPEED
}

/// Two 4-slot experts (capacity computed from their latency model: about 24 requests/s
/// together), a 16 ms/token SLO that a full batch meets and a request waiting for a slot does
/// not, and `admission.max_in_flight = 12` (the 8 slots and a short queue). Devices offer five
/// times the capacity, evenly spaced, for 5 s (`x scale`).
///
/// Asserts: every request ends exactly once (nothing lost, nothing duplicated); every one not
/// served got an explicit refusal, `overloaded` (shed at `max_in_flight`) or `no_expert` (the
/// policy's: it would miss its SLO), and refusals are most of the traffic; the completed
/// throughput stays at least 0.9x the capacity (the slots stay busy, `GOODPUT_FLOOR`) and under
/// 1.3x it (what the experts can do); **SLO attainment among admitted requests** (completed requests whose
/// gateway-measured seconds per token, from receipt to the last token over the tokens, met
/// the SLO) is at least 80 %, and 98 % of them come within 10 % of the SLO: the router admits
/// a request only when it predicts the SLO is met, so what it admits misses only by its
/// prediction error (measured: 87-97 % strict attainment, misses at 16-17 ms/token against
/// 16, the busier the machine the more);
/// resident memory stays within 8 MiB of its level at the start (the places bound what
/// requests hold; measured 2.7-3.8 MiB, see `RSS_BOUND_KIB`); the daemon exits 0 on SIGTERM.
pub async fn overload(scale: Scale) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = Report::new(5, "overload", scale);
    let quality = rig::quality_table()?;
    let broker = Broker::start();
    let experts = vec![
        Expert::start(profile("ovl-a"), SPEED, &quality, 51)?,
        Expert::start(profile("ovl-b"), SPEED, &quality, 52)?,
    ];
    let capacity: f64 = experts.iter().map(|e| capacity_per_s(&e.profile)).sum();
    let rate = capacity * OVERLOAD;
    let n = scale.n((rate * SECONDS).round() as usize);
    let site = "hil-overload";
    let mut config = DaemonConfig::new(
        site,
        &broker.url(),
        "qosrouted-hil-overload",
        &SloTable {
            default_s_per_token: SLO_S,
            per_task: Default::default(),
        },
        SPEED,
        experts.iter().map(|e| e.entry(&quality)).collect(),
    );
    config.session_expiry_s = 0;
    config.max_in_flight = 12;
    let mut daemon = rig::start_daemon(&config);
    rig::wait_up(&daemon, &["ovl-a", "ovl-b"], Duration::from_secs(60)).await?;
    rig::wait_subscribed(&daemon, Duration::from_secs(10)).await?;
    let rss_start = daemon.rss_kib().unwrap_or(0);
    let sampler = RssSampler::start(daemon.pid(), Duration::from_millis(50));
    // Workload seconds are wall-clock seconds here (speed 1 for the devices).
    let plan = rig::steady_requests(n, rate, Task::Chat, PROMPT, OUTPUT);
    let mut swarm_config = rig::swarm_config(&broker.url(), site, 16, 1.0);
    swarm_config.postcard_share = 0.0;
    probe(&swarm_config, &daemon).await?;
    let run = Swarm::start(swarm_config, &plan, None)
        .await?
        .finish()
        .await?;
    let s = run.summary();
    let shed = s.errors_by_code.get("overloaded").copied().unwrap_or(0);
    let rejected = s.errors_by_code.get("no_expert").copied().unwrap_or(0);
    let admitted_met = run
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed && r.slo_met == Some(true))
        .count();
    let attainment = admitted_met as f64 / s.completed.max(1) as f64;
    let slo_wall = SLO_S / SPEED;
    let admitted_near = run
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed)
        .filter(|r| {
            r.s_per_token
                .is_some_and(|x| f64::from(x) <= 1.1 * slo_wall)
        })
        .count();
    let near = admitted_near as f64 / s.completed.max(1) as f64;
    let span = s.publish_span_s.max(1e-9);
    let goodput = s.completed as f64 / span;
    report.figure(
        "capacity (latency model)",
        format!("{capacity:.1} req/s (2 experts x 4 slots, {OUTPUT} tokens)"),
    );
    report.figure("offered", format!("{rate:.1} req/s for {span:.1} s"));
    report.swarm_figures("", &s);
    report.figure(
        "completed over the offer",
        format!(
            "{goodput:.1} req/s ({:.0} % of capacity)",
            goodput / capacity * 100.0
        ),
    );
    report.figure(
        "refused explicitly",
        format!("overloaded {shed}, no_expert {rejected}"),
    );
    report.figure(
        "admitted within 1.1x the SLO",
        format!("{} ({admitted_near} of {})", percent(near), s.completed),
    );
    report.figure(
        "SLO attainment of admitted requests",
        format!(
            "{} ({admitted_met} of {}, SLO {:.0} ms/token)",
            percent(attainment),
            s.completed,
            SLO_S / SPEED * 1e3
        ),
    );
    let peak = sampler.peak_kib();
    report.figure(
        "daemon VmRSS start / peak",
        format!("{} / {}", mib(rss_start), mib(peak)),
    );
    report.swarm_checks("", &s);
    report.check(
        "every request not served was refused explicitly",
        s.errors == shed + rejected && s.completed + shed + rejected == s.requests,
        format!("{:?}", s.errors_by_code),
    );
    report.check(
        "refusals are most of a 5x overload",
        (shed + rejected) as f64 >= 0.5 * s.requests as f64,
        format!("{} refused of {}", shed + rejected, s.requests),
    );
    report.check(
        format!(
            "the slots stay busy: completed throughput at least {:.0} % of the capacity",
            GOODPUT_FLOOR * 100.0
        ),
        goodput >= GOODPUT_FLOOR * capacity,
        format!("{goodput:.1} req/s, capacity {capacity:.1}"),
    );
    report.check(
        "no more than the experts can do: completed throughput under 1.3x capacity",
        goodput <= 1.3 * capacity,
        format!("{goodput:.1} req/s, capacity {capacity:.1}"),
    );
    report.check(
        "admitted requests meet their SLO at least 80 % of the time",
        attainment >= ATTAINMENT,
        format!("{} of the completed met the SLO", percent(attainment)),
    );
    report.check(
        "98 % of admitted requests come within 10 % of their SLO",
        near >= NEAR_ATTAINMENT,
        format!(
            "{} of the completed within {:.1} ms/token",
            percent(near),
            1.1 * slo_wall * 1e3
        ),
    );
    report.check_memory_bounded(rss_start, peak, RSS_BOUND_KIB);
    drop(sampler);
    finish_daemon(&mut report, &mut daemon, Some(s.completed), "").await;
    drop(experts);
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}
