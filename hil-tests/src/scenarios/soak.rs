//! The soak run: the conversation trace in real time through the real daemon, its resident
//! memory, open file descriptors and threads sampled every 10 s.
//!
//! Not a scenario of the CI suite (an hour is too long for CI): `qosroute-hil --soak 3600`
//! runs the whole hour, `qosroute-hil --soak 300` the five minutes a developer runs by hand.

use std::time::Duration;

use qosroute_swarm::Swarm;
use qosroute_testkit::{BrokerOptions, proc_status_kib};
use serde::Serialize;
use tokio::time::Instant;

use super::{DEVICES, LOAD, MAX_OUTPUT, Setup, finish_daemon, probe};
use crate::Scale;
use crate::report::{Report, mib};

/// How often the daemon's process is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// The warm-up whose peaks are the baseline: the first five minutes, or the first fifth of a
/// shorter run (a minute of the five-minute form).
const WARM_UP_S: f64 = 300.0;
/// Growth allowed after the warm-up over the warm-up's peak (the target: flat memory,
/// no growth beyond the first five minutes' peak + 10 %).
const GROWTH: f64 = 0.10;
/// File descriptors and threads: how many more the idle daemon may hold after the run than
/// before its first request (a connection to an expert kept alive, a blocking-pool thread).
/// Their peaks follow the load (a connection per answer streaming from an expert; the trace's
/// busiest minutes have the most), so their leak check compares the idle daemon before and
/// after, not peaks: the one-hour run's peak rose from 43 in the warm-up to 48 in the trace's
/// busiest ten minutes and was 19 at the end, as at the start.
const SMALL_COUNT_SLACK: u64 = 2;
/// How long the daemon is left idle after the run before its idle sample.
const IDLE_AFTER: Duration = Duration::from_secs(2);

/// One quantity of a sample.
type Quantity = fn(&SoakSample) -> u64;

/// One sample of the daemon's process and of the devices' progress.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SoakSample {
    /// Seconds since the first request was due.
    pub t_s: f64,
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// Entries of `/proc/PID/fd`.
    pub fds: u64,
    /// Entries of `/proc/PID/task` (threads).
    pub threads: u64,
    /// Requests published so far.
    pub published: u64,
    /// Requests that got their final or error reply so far.
    pub ended: u64,
}

fn dir_entries(path: &str) -> Option<u64> {
    std::fs::read_dir(path).ok().map(|d| d.count() as u64)
}

fn sample(pid: u32, t_s: f64, published: u64, ended: u64) -> Option<SoakSample> {
    Some(SoakSample {
        t_s,
        rss_kib: proc_status_kib(pid, "VmRSS")?,
        fds: dir_entries(&format!("/proc/{pid}/fd"))?,
        threads: dir_entries(&format!("/proc/{pid}/task"))?,
        published,
        ended,
    })
}

/// The warm-up of a run of `seconds`: five minutes, or a fifth of a shorter run.
fn warm_up_s(seconds: f64) -> f64 {
    WARM_UP_S.min(seconds / 5.0)
}

/// Growth of one quantity: the warm-up's peak, the peak after it and whether the latter stays
/// within the allowance. `None` without a sample on each side of the warm-up.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Growth {
    warm_up_peak: u64,
    later_peak: u64,
    allowed: u64,
}

impl Growth {
    fn of(samples: &[SoakSample], warm_up_s: f64, slack: u64, value: Quantity) -> Option<Self> {
        let warm_up_peak = samples
            .iter()
            .filter(|s| s.t_s <= warm_up_s)
            .map(value)
            .max()?;
        let later_peak = samples
            .iter()
            .filter(|s| s.t_s > warm_up_s)
            .map(value)
            .max()?;
        let by_share = (warm_up_peak as f64 * (1.0 + GROWTH)).floor() as u64;
        let allowed = by_share.max(warm_up_peak + slack);
        Some(Self {
            warm_up_peak,
            later_peak,
            allowed,
        })
    }

    fn holds(&self) -> bool {
        self.later_peak <= self.allowed
    }
}

/// Replays the requests of the first `seconds` of the Azure conversation trace (the whole
/// trace, 19,365 requests over 58 minutes, from `--soak 3600`) in real time: the six edge-mixed
/// experts emulated at their hardware's speed, the catalogue's SLOs, answers capped at 48
/// tokens as in the other trace scenarios, 32 devices, through mosquitto and the real daemon.
/// `on_sample` sees every sample (every 10 s) as it is taken.
///
/// Asserts: every request ends exactly once (none lost, none duplicated); the daemon's
/// `VmRSS` after the warm-up (the first five minutes, or the first fifth of a shorter run)
/// never exceeds the warm-up's peak by more than 10 %; idle 2 s after the run, it holds at most
/// 2 more file descriptors and threads than before its first request (their peaks follow the
/// load and are figures); the daemon counted what the devices got; it exits 0 on SIGTERM.
pub async fn soak(seconds: f64, mut on_sample: impl FnMut(&SoakSample)) -> anyhow::Result<Report> {
    anyhow::ensure!(
        seconds >= 60.0,
        "a soak run lasts at least 60 s, not {seconds}"
    );
    let started = Instant::now();
    let mut report = Report::new(
        0,
        "soak",
        Scale {
            factor: seconds / 3600.0,
        },
    );
    // Real time: experts at their hardware's speed, the devices at the trace's clock.
    let setup = Setup::edge_mixed("hil-soak", 1.0, BrokerOptions::default())?;
    let config = setup.config("qosrouted-hil-soak", &setup.all());
    let mut daemon = setup.daemon(&config).await?;
    let pid = daemon.pid();
    let mut plan = crate::rig::trace_requests(
        &setup.quality,
        crate::rig::trace_len()?,
        0.0,
        LOAD,
        MAX_OUTPUT,
        1,
    )?;
    plan.retain(|r| r.arrival_s < seconds);
    let swarm_config = setup.swarm(DEVICES);
    probe(&swarm_config, &daemon).await?;
    let mut samples: Vec<SoakSample> = Vec::new();
    if let Some(s) = sample(pid, 0.0, 0, 0) {
        on_sample(&s);
        samples.push(s);
    }
    let swarm = Swarm::start(swarm_config, &plan, Some(setup.truth())).await?;
    let requests = plan.len() as u64;
    let mut next = Instant::now() + SAMPLE_EVERY;
    loop {
        tokio::time::sleep_until(next).await;
        next += SAMPLE_EVERY;
        let p = swarm.progress();
        if let Some(s) = sample(pid, p.elapsed_s, p.published, p.ended) {
            on_sample(&s);
            samples.push(s);
        }
        let all_out = p.published + p.not_sent >= requests;
        if p.finished || (all_out && p.in_flight() == 0) {
            break;
        }
        // Past the plan and the reply timeout: what is still out is lost (the report says so).
        if p.elapsed_s > seconds + 120.0 {
            break;
        }
    }
    let run = swarm.finish().await?;
    tokio::time::sleep(IDLE_AFTER).await;
    let idle_after = sample(pid, f64::NAN, 0, 0);
    let s = run.summary();
    report.swarm_figures("", &s);
    report.figure("QoS (devices)", format!("{:.3}", s.avg_qos));
    let warm_up = warm_up_s(seconds);
    report.figure("samples (every 10 s)", samples.len());
    report.figure("warm-up (baseline peaks)", format!("first {warm_up:.0} s"));
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        report.figure(
            "daemon VmRSS first / last sample",
            format!("{} / {}", mib(first.rss_kib), mib(last.rss_kib)),
        );
        report.figure(
            "daemon fds first / last sample",
            format!("{} / {}", first.fds, last.fds),
        );
        report.figure(
            "daemon threads first / last sample",
            format!("{} / {}", first.threads, last.threads),
        );
    }
    report.swarm_checks("", &s);
    match Growth::of(&samples, warm_up, 0, |s| s.rss_kib) {
        Some(g) => {
            report.figure(
                "daemon VmRSS warm-up peak / later peak",
                format!("{} / {}", mib(g.warm_up_peak), mib(g.later_peak)),
            );
            report.check(
                "daemon VmRSS flat after the warm-up",
                g.holds(),
                format!(
                    "later peak {} <= {} (warm-up peak {} + 10 %)",
                    mib(g.later_peak),
                    mib(g.allowed),
                    mib(g.warm_up_peak)
                ),
            );
        }
        None => report.check(
            "daemon VmRSS flat after the warm-up",
            false,
            "no samples on both sides of the warm-up",
        ),
    }
    let counts: [(&str, Quantity); 2] = [("open fds", |s| s.fds), ("threads", |s| s.threads)];
    for (what, value) in counts {
        if let Some(g) = Growth::of(&samples, warm_up, SMALL_COUNT_SLACK, value) {
            report.figure(
                format!("daemon {what} warm-up peak / later peak (follow the load)"),
                format!("{} / {}", g.warm_up_peak, g.later_peak),
            );
        }
        let before = samples.first().map(value);
        let after = idle_after.as_ref().map(value);
        report.check(
            format!("daemon {what} idle after the run as before it (no leak)"),
            matches!((before, after), (Some(b), Some(a)) if a <= b + SMALL_COUNT_SLACK),
            format!(
                "idle before the first request {}, {} s after the last {} (slack {SMALL_COUNT_SLACK})",
                before.map_or_else(|| "unknown".into(), |n| n.to_string()),
                IDLE_AFTER.as_secs(),
                after.map_or_else(|| "unknown".into(), |n| n.to_string()),
            ),
        );
    }
    finish_daemon(&mut report, &mut daemon, Some(s.completed), "").await;
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t_s: f64, rss_kib: u64) -> SoakSample {
        SoakSample {
            t_s,
            rss_kib,
            fds: 40,
            threads: 10,
            published: 0,
            ended: 0,
        }
    }

    #[test]
    fn growth_past_ten_percent_of_the_warm_up_peak_fails_and_within_it_holds() {
        let mut samples = vec![at(0.0, 20_000), at(150.0, 30_000), at(300.0, 25_000)];
        samples.push(at(600.0, 33_000));
        let g = Growth::of(&samples, 300.0, 0, |s| s.rss_kib);
        assert_eq!(g.map(|g| g.holds()), Some(true));
        samples.push(at(900.0, 33_001));
        let g = Growth::of(&samples, 300.0, 0, |s| s.rss_kib);
        assert_eq!(g.map(|g| (g.later_peak, g.holds())), Some((33_001, false)));
    }

    #[test]
    fn small_counts_may_grow_by_the_slack() {
        // 10 threads: 10 % is one, the slack two.
        let mut samples = vec![at(0.0, 1), at(400.0, 1)];
        samples[1].threads = 12;
        assert_eq!(
            Growth::of(&samples, 300.0, 2, |s| s.threads).map(|g| g.holds()),
            Some(true)
        );
        samples[1].threads = 13;
        assert_eq!(
            Growth::of(&samples, 300.0, 2, |s| s.threads).map(|g| g.holds()),
            Some(false)
        );
        // 40 descriptors: 10 % (44) is more than the slack.
        samples[1].fds = 44;
        assert_eq!(
            Growth::of(&samples, 300.0, 2, |s| s.fds).map(|g| g.holds()),
            Some(true)
        );
        samples[1].fds = 45;
        assert_eq!(
            Growth::of(&samples, 300.0, 2, |s| s.fds).map(|g| g.holds()),
            Some(false)
        );
    }

    #[test]
    fn no_verdict_without_samples_after_the_warm_up() {
        let samples = vec![at(0.0, 1), at(100.0, 2)];
        assert_eq!(Growth::of(&samples, 300.0, 0, |s| s.rss_kib), None);
        assert_eq!(warm_up_s(300.0), 60.0);
        assert_eq!(warm_up_s(3600.0), 300.0);
    }
}
