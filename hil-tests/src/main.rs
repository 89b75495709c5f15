//! `qosroute-hil`: runs the hardware-in-loop scenarios, prints each one's figures and checks,
//! and exits non-zero when any fails.

// A command-line report: the figures go to stdout.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use qosroute_hil::{BATCHING_ENGINE_SCENARIO, REAL_ENGINE_SCENARIO, Report, SCENARIOS, Scale};

/// The hardware-in-loop suite: the real `qosrouted`, a real mosquitto, emulated experts and
/// MQTT devices, under faults and load (see hil-tests/README.md).
#[derive(Debug, Parser)]
#[command(name = "qosroute-hil")]
struct Args {
    /// Ten times the CI size (100,000 requests in scenarios 1 and 2).
    #[arg(long)]
    long: bool,
    /// Only these scenarios (repeat or comma-separate: `--scenario 1,3`); default all (9, the
    /// real engine's, only when `scripts/real-engine.sh install` has installed the engine; 10,
    /// the batching engine's, only when `scripts/llama-server.sh install` has built it).
    #[arg(long, value_delimiter = ',')]
    scenario: Vec<u8>,
    /// The `qosrouted` binary (default: next to this executable, or $QOSROUTED_BIN).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// Also write every report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Instead of the scenarios, the soak run: this many seconds of the conversation trace in
    /// real time (3600: the whole trace; 300: the five-minute form), the daemon's memory, file
    /// descriptors and threads sampled every 10 s and printed as they are taken.
    #[arg(long, value_name = "SECONDS")]
    soak: Option<f64>,
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("qosroute-hil: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<bool> {
    let args = Args::parse();
    if args.list {
        for (n, name, what) in SCENARIOS {
            println!("{n}  {name:<20} {what}");
        }
        return Ok(true);
    }
    if let Some(daemon) = args.daemon {
        anyhow::ensure!(
            daemon.exists(),
            "--daemon {}: no such file",
            daemon.display()
        );
        qosroute_hil::set_daemon_binary(daemon);
    }
    if let Some(seconds) = args.soak {
        return soak(seconds, args.json.as_deref());
    }
    let scale = if args.long { Scale::LONG } else { Scale::CI };
    let numbers: Vec<u8> = if args.scenario.is_empty() {
        let engine = qosroute_real_engine::Engine::find();
        if let Err(e) = &engine {
            println!("qosroute-hil: scenario {REAL_ENGINE_SCENARIO} left out: {e}");
        }
        let batching = qosroute_real_engine::BatchingEngine::find();
        if let Err(e) = &batching {
            println!("qosroute-hil: scenario {BATCHING_ENGINE_SCENARIO} left out: {e}");
        }
        SCENARIOS
            .iter()
            .map(|s| s.0)
            .filter(|&n| n != REAL_ENGINE_SCENARIO || engine.is_ok())
            .filter(|&n| n != BATCHING_ENGINE_SCENARIO || batching.is_ok())
            .collect()
    } else {
        args.scenario.clone()
    };
    let runtime = runtime()?;
    println!(
        "qosroute-hil: scenarios {numbers:?} at {} scale, daemon {}",
        scale.name(),
        qosroute_hil::daemon_binary().display()
    );
    let mut reports: Vec<Report> = Vec::new();
    let mut errors: Vec<(u8, String)> = Vec::new();
    let started = std::time::Instant::now();
    for n in numbers {
        match runtime.block_on(qosroute_hil::run(n, scale)) {
            Ok(report) => {
                println!("{report}");
                reports.push(report);
            }
            Err(e) => {
                println!("== scenario {n}: DID NOT RUN: {e:#}\n");
                errors.push((n, format!("{e:#}")));
            }
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    print_summary(&reports, &errors, wall_s);
    if let Some(path) = &args.json {
        let json = serde_json::json!({
            "scale": scale,
            "wall_s": wall_s,
            "reports": reports,
            "did_not_run": errors,
        });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(errors.is_empty() && reports.iter().all(Report::passed))
}

/// The suite's async runtime (two workers, as the scenarios assume).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// The soak run: every sample as it is taken, then the report.
fn soak(seconds: f64, json: Option<&std::path::Path>) -> anyhow::Result<bool> {
    let runtime = runtime()?;
    println!(
        "qosroute-hil: soak of {seconds:.0} s of the conversation trace in real time, daemon {}, a sample every {} s",
        qosroute_hil::daemon_binary().display(),
        qosroute_hil::SAMPLE_EVERY.as_secs()
    );
    println!("   t_s  VmRSS_MiB  fds  threads  published  ended");
    let started = std::time::Instant::now();
    let report = runtime.block_on(qosroute_hil::soak(seconds, |s| {
        println!(
            "{:>6.0} {:>10.1} {:>4} {:>8} {:>10} {:>6}",
            s.t_s,
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.threads,
            s.published,
            s.ended
        );
    }))?;
    println!("{report}");
    let wall_s = started.elapsed().as_secs_f64();
    println!(
        "== soak {} ({wall_s:.0} s)",
        if report.passed() { "passed" } else { "FAILED" }
    );
    if let Some(path) = json {
        let json = serde_json::json!({ "wall_s": wall_s, "reports": [&report] });
        std::fs::write(path, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("{}: cannot write", path.display()))?;
    }
    Ok(report.passed())
}

fn print_summary(reports: &[Report], errors: &[(u8, String)], wall_s: f64) {
    println!("== summary ({wall_s:.0} s)");
    println!(
        "   {:<2} {:<20} {:>7} {:>9} {:>14} {:>5} {:>5} {:>11} {:>7}  verdict",
        "#", "scenario", "reqs", "req/s", "e2e p50/p99", "lost", "dup", "peak RSS", "wall"
    );
    for r in reports {
        let get = |k: &str| r.value(k).unwrap_or("-").to_owned();
        // The largest of the daemons' peaks (`48.5 MiB`).
        let rss = r
            .figures
            .iter()
            .filter(|f| f.name.ends_with("peak RSS (VmHWM)"))
            .filter_map(|f| f.value.trim_end_matches(" MiB").parse::<f64>().ok())
            .reduce(f64::max)
            .map_or_else(|| "-".into(), |m| format!("{m:.1} MiB"));
        let (reqs, rate, e2e, lost, dup) = if r.value("requests").is_some() {
            (
                get("requests"),
                get("offered req/s"),
                get("e2e p50/p99 ms"),
                get("lost"),
                get("duplicated"),
            )
        } else {
            (
                get("valid requests"),
                get("valid offered req/s"),
                get("valid e2e p50/p99 ms"),
                get("valid lost"),
                get("valid duplicated"),
            )
        };
        let verdict = if r.passed() {
            "passed".to_owned()
        } else {
            format!("FAILED ({} checks)", r.failures().len())
        };
        println!(
            "   {:<2} {:<20} {:>7} {:>9} {:>14} {:>5} {:>5} {:>11} {:>6.1}s  {verdict}",
            r.number, r.name, reqs, rate, e2e, lost, dup, rss, r.wall_s
        );
    }
    for (n, e) in errors {
        let first = e.lines().next().unwrap_or_default();
        println!("   {n:<2} did not run: {first}");
    }
}
