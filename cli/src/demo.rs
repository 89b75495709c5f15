//! `qosroute demo`: the whole system on one machine in about a minute. An MQTT broker (the
//! embedded rumqttd, mosquitto, or `--broker URL`), the six edge-mixed experts emulated in-process, the real
//! `qosrouted` binary with a generated config, and a swarm of simulated devices replaying a
//! slice of the Azure conversation trace; a live view while it runs, then a table, JSON and SVG
//! plots. `--compare` runs the same slice through several routers, each with a fresh daemon and
//! fresh experts.
//!
//! Time is compressed by `--speed`: the experts run that many times faster than the hardware
//! they model, the daemon's latency models and SLOs are scaled by the same factor, and the
//! trace is replayed that much faster. `--load` scales the trace's arrival rate on top.
//!
//! `--real [N]` puts N real llama.cpp servers of SmolLM2-135M (`qosroute-real-engine`) in place
//! of the N weakest emulated experts; time then runs at 1x.

use std::collections::{BTreeMap, VecDeque};
use std::io::{IsTerminal, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qosroute_core::{BASELINE_NAMES, Task};
use qosroute_emulator::{EmulatedExpert, EmulatorOptions};
use qosroute_sim::trace::{TraceRow, embedded_conv_trace, load_azure_trace};
use qosroute_sim::workload::{WorkloadSources, synthesize};
use qosroute_sim::{Catalogue, QualityTable, WorkloadSpec};
use qosroute_swarm::{
    QualityTruth, Swarm, SwarmConfig, SwarmProgress, SwarmReport, SwarmRequest, SwarmSummary,
    TimelinePoint, probe_gateway,
};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::plot::{BarSeries, SweepCurve, grouped_bars, sweep_curves};
use crate::real_site::{RealServers, RealSite};
use crate::table;

/// The site name of the demo's topics.
const SITE: &str = "demo";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The gateway's router: `han` (the shipped learned router), `han:DIR` (a folder with
    /// router-f32.onnx), `qos-planner[:k=16,h=20,...]`, or a baseline the daemon runs as its
    /// fallback policy (random, round-robin, least-loaded, p2c, quality-greedy, latency-greedy,
    /// qos-greedy).
    #[arg(long, default_value = "han")]
    policy: String,
    /// Compare routers: run the same trace slice through each in turn (fresh daemon and
    /// experts each time), e.g. `han,qos-greedy,least-loaded`. Overrides --policy.
    #[arg(long, value_delimiter = ',')]
    compare: Option<Vec<String>>,
    /// The MQTT broker: `embedded` (rumqttd in this process: nothing to install), `mosquitto`
    /// (started here; Debian's `mosquitto`), or the URL of a running broker (mqtt://HOST:PORT).
    #[arg(long, default_value = "embedded")]
    broker: String,
    /// Expert catalogue (TOML) to emulate.
    #[arg(long, default_value = "configs/experts/edge-mixed.toml")]
    experts: PathBuf,
    /// Azure-format trace (TIMESTAMP,ContextTokens,GeneratedTokens); the shipped conversation
    /// trace when this file is missing.
    #[arg(long, default_value = "data/traces/azure-llm-2023-conv.csv")]
    trace: PathBuf,
    /// Quality table CSV (default: the shipped one).
    #[arg(long)]
    quality: Option<PathBuf>,
    /// Minutes of the trace to replay.
    #[arg(long, default_value_t = 3.0)]
    minutes: f64,
    /// Start this many minutes into the trace.
    #[arg(long, default_value_t = 0.0)]
    offset_minutes: f64,
    /// Arrival rate relative to the trace's (0.5: what edge-mixed is sized for; 1 overloads it).
    #[arg(long, default_value_t = 0.5)]
    load: f64,
    /// Wall-clock speed-up: experts run this many times faster than the hardware they model,
    /// latency models and SLOs are scaled to match, and the trace is replayed this much faster.
    /// Default 10; 1 with --real (a real server runs at its own speed).
    #[arg(long)]
    speed: Option<f64>,
    /// Real LLM servers in the site: N llama.cpp servers of SmolLM2-135M (default 1) replace
    /// the N weakest emulated experts. Needs the engine (`bash scripts/real-engine.sh
    /// install`); runs in real time, so use a short --minutes.
    #[arg(long, num_args = 0..=1, default_missing_value = "1", value_name = "N")]
    real: Option<usize>,
    /// Simulated devices (MQTT connections).
    #[arg(long, default_value_t = 32)]
    devices: usize,
    /// Fraction of requests sent in postcard (the rest JSON).
    #[arg(long, default_value_t = 0.25)]
    postcard_share: f64,
    /// Seed of the join of trace requests with tasks and qualities.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Folder for demo.json and the plots.
    #[arg(long, default_value = "out/demo")]
    out: PathBuf,
    /// The `qosrouted` binary (default: next to this executable).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// Folder of the shipped learned router, for `han`.
    #[arg(long, default_value = "policy-model/models/han")]
    model_dir: PathBuf,
    /// Devices do not rate answers (by default each rates every answer with its true quality,
    /// as the simulator's quality predictors learn from completed requests).
    #[arg(long)]
    no_feedback: bool,
    /// Keep the scratch folder (generated daemon configs and logs) and print where it is.
    #[arg(long)]
    keep_scratch: bool,
    /// Seconds a device waits for a request's final reply before counting it lost.
    #[arg(long, default_value_t = 30.0)]
    reply_timeout: f64,
}

/// Which router a run asks the daemon for.
#[derive(Debug, Clone)]
pub(crate) enum Router {
    /// The learned router of a model folder (fallback `qos-greedy`).
    Learned { name: String, dir: PathBuf },
    /// A baseline, run as the daemon's fallback with no model.
    Baseline(String),
    /// `qos-planner` (with its parameters), run as the daemon's `[policy] planner`.
    Planner(String),
}

impl Router {
    pub(crate) fn name(&self) -> &str {
        match self {
            Router::Learned { name, .. } | Router::Baseline(name) | Router::Planner(name) => name,
        }
    }

    pub(crate) fn describe(&self) -> String {
        match self {
            Router::Learned { dir, .. } => format!(
                "learned HAN router ({}), qos-greedy when the model is slow or fails",
                dir.join("router-f32.onnx").display()
            ),
            Router::Baseline(b) => {
                format!("baseline `{b}` (the daemon's fallback policy, no model)")
            }
            Router::Planner(spec) => format!(
                "`{spec}`, the Monte-Carlo planner (qos-greedy when its time budget runs out)"
            ),
        }
    }
}

/// A path as given, else relative to the workspace this binary was built from.
fn locate(path: &Path) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    if path.is_relative() {
        let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
        if built.exists() {
            return Some(built);
        }
    }
    None
}

pub(crate) fn parse_router(name: &str, model_dir: &Path) -> anyhow::Result<Router> {
    let learned = |name: &str, dir: &Path| -> anyhow::Result<Router> {
        let found = locate(dir)
            .with_context(|| format!("`{name}`: model folder {} not found", dir.display()))?;
        if !found.join("router-f32.onnx").exists() {
            bail!(
                "`{name}`: {} has no router-f32.onnx (the daemon loads that file)",
                found.display()
            );
        }
        Ok(Router::Learned {
            name: name.to_owned(),
            dir: std::fs::canonicalize(&found).unwrap_or(found),
        })
    };
    if name == "han" {
        return learned(name, model_dir);
    }
    if let Some(dir) = name.strip_prefix("han:") {
        return learned(name, Path::new(dir));
    }
    if BASELINE_NAMES.contains(&name) {
        return Ok(Router::Baseline(name.to_owned()));
    }
    if qosroute_core::is_planner(name) {
        qosroute_core::PlannerConfig::parse(name)?;
        return Ok(Router::Planner(name.to_owned()));
    }
    bail!(
        "`{name}`: the daemon can run `han`, `han:DIR` (a folder with router-f32.onnx), \
         `qos-planner[:k=..,h=..]` or one of the baselines as its fallback policy: {}",
        BASELINE_NAMES.join(", ")
    )
}

fn check_args(args: &DemoArgs) -> anyhow::Result<()> {
    let positive = |name: &str, v: f64| {
        if v.is_finite() && v > 0.0 {
            Ok(())
        } else {
            Err(anyhow::anyhow!("--{name} must be positive, got {v}"))
        }
    };
    positive("minutes", args.minutes)?;
    positive("load", args.load)?;
    positive("speed", args.speed())?;
    if args.real.is_some() && args.speed() != 1.0 {
        bail!(
            "--real runs real servers, which cannot run faster than real time: leave --speed out (or 1)"
        );
    }
    positive("reply-timeout", args.reply_timeout)?;
    if !(args.offset_minutes.is_finite() && args.offset_minutes >= 0.0) {
        bail!("--offset-minutes must be 0 or more");
    }
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.postcard_share) {
        bail!("--postcard-share must be in [0, 1]");
    }
    Ok(())
}

impl DemoArgs {
    /// The wall-clock speed-up (`--speed`, else 10, or 1 with `--real`).
    fn speed(&self) -> f64 {
        self.speed
            .unwrap_or(if self.real.is_some() { 1.0 } else { 10.0 })
    }
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    check_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(demo(args))
}

/// Everything a run needs, prepared once.
struct Setup {
    catalogue: Catalogue,
    quality: Arc<QualityTable>,
    requests: Vec<SwarmRequest>,
    trace_name: String,
    daemon_exe: PathBuf,
    scratch: Scratch,
    /// Real servers in place of some emulated experts (`--real`).
    real: Option<RealSite>,
}

impl Setup {
    /// Every expert of the site, emulated then real: (name, quality-table column).
    fn site_experts(&self) -> Vec<(String, String)> {
        let emulated = self.catalogue.experts.iter();
        let real = self
            .real
            .iter()
            .flat_map(|r| r.experts.iter().map(|(p, _)| p));
        emulated
            .chain(real)
            .map(|e| (e.name.clone(), e.model.clone()))
            .collect()
    }
}

/// What the JSON says about the setup.
#[derive(Debug, Serialize)]
struct DemoSetup {
    catalogue: String,
    experts: Vec<String>,
    trace: String,
    trace_window_minutes: [f64; 2],
    load: f64,
    speed: f64,
    requests: usize,
    devices: usize,
    postcard_share: f64,
    seed: u64,
    site: &'static str,
    broker: String,
    feedback: bool,
    notes: Vec<String>,
}

/// One router's run.
#[derive(Debug, Serialize)]
struct PolicyRun {
    policy: String,
    router: String,
    /// A learned router (its fallbacks are worth showing; a baseline *is* the fallback).
    learned: bool,
    /// Wall-clock seconds of the whole run (daemon and experts up to down).
    wall_s: f64,
    summary: SwarmSummary,
    /// The daemon's own counters at the end of the run.
    daemon: Option<DaemonMetrics>,
    /// Exit code of the daemon after SIGTERM (None: killed or signalled).
    daemon_exit_code: Option<i32>,
    /// What went wrong during the run (the daemon died), if anything.
    problem: Option<String>,
    timeline: Vec<TimelinePoint>,
    report: SwarmReport,
}

#[derive(Debug, Serialize)]
struct DemoOutput<'a> {
    demo: &'a DemoSetup,
    interrupted: bool,
    runs: &'a [PolicyRun],
}

async fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    let interrupt = CancellationToken::new();
    watch_signals(interrupt.clone())?;
    let names = match &args.compare {
        // `qos-planner:k=16,h=20` was split at its commas: its `key=value` items go back to it.
        Some(list) => {
            let mut names: Vec<String> = Vec::new();
            for item in list.iter().map(|n| n.trim()) {
                match names.last_mut() {
                    Some(last)
                        if item.contains('=')
                            && !item.contains(':')
                            && qosroute_core::is_planner(last) =>
                    {
                        last.push(if last.contains(':') { ',' } else { ':' });
                        last.push_str(item);
                    }
                    _ => names.push(item.to_owned()),
                }
            }
            names
        }
        None => vec![args.policy.clone()],
    };
    let routers = names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .map(|n| parse_router(n, &args.model_dir))
        .collect::<anyhow::Result<Vec<Router>>>()?;
    if routers.is_empty() {
        bail!("--compare: no router named");
    }
    let setup = prepare(args)?;
    let mut broker = start_broker(args, &setup.scratch).await?;
    let first = args.offset_minutes;
    let mut facts = DemoSetup {
        catalogue: setup.catalogue.name.clone(),
        experts: setup.site_experts().into_iter().map(|(n, _)| n).collect(),
        trace: setup.trace_name.clone(),
        trace_window_minutes: [first, first + args.minutes],
        load: args.load,
        speed: args.speed(),
        requests: setup.requests.len(),
        devices: args.devices,
        postcard_share: args.postcard_share,
        seed: args.seed,
        site: SITE,
        broker: broker.describe(),
        feedback: !args.no_feedback,
        notes: vec![
            format!(
                "experts run {}x faster than the hardware they model; the daemon's latency models and SLOs are scaled by 1/{} to match; latencies here are wall-clock",
                args.speed(), args.speed()
            ),
            "avg_qos is computed by the devices from the quality table (the true quality of the answering expert's model on the request's row, 0 when the SLO is missed, errors and lost requests 0); the daemon's (qosroute_qos_*) from what the emulated experts report through the qosroute extension: their model's mean quality on the request's task (the daemon forwards the task, not the row)".into(),
            "answers are at most 128 tokens (the emulator's default answer length) and prompts at most 2048 tokens (8 KiB, the wire bound): the daemon does not forward the expected output length".into(),
        ],
    };
    if let Some(real) = &setup.real {
        facts.notes.push(real.note());
    }
    let planned_s = setup.requests.last().map_or(0.0, |r| r.arrival_s) / args.speed();
    eprintln!(
        "qosroute demo: {} requests of {} (minutes {:.1}-{:.1}, load {}x) on {} ({} experts) through {}, {}x faster than real time: about {:.0} s per router",
        setup.requests.len(),
        setup.trace_name,
        first,
        first + args.minutes,
        args.load,
        setup.catalogue.name,
        facts.experts.len(),
        facts.broker,
        args.speed(),
        planned_s + 5.0
    );
    let mut runs = Vec::new();
    let mut interrupted = false;
    let mut failure = None;
    for (k, router) in routers.iter().enumerate() {
        if interrupt.is_cancelled() {
            interrupted = true;
            break;
        }
        match run_router(args, &setup, router, k, broker.url(), &interrupt).await {
            Ok(run) => {
                interrupted |= run.report.stopped_early && interrupt.is_cancelled();
                let problem = run.problem.clone();
                runs.push(run);
                if let Some(p) = problem {
                    failure = Some(anyhow::anyhow!("router `{}`: {p}", router.name()));
                    break;
                }
            }
            Err(e) if interrupt.is_cancelled() => {
                eprintln!("{}: interrupted ({e:#})", router.name());
                interrupted = true;
                break;
            }
            Err(e) => {
                // The runs so far are still reported below.
                failure = Some(e.context(format!("router `{}`", router.name())));
                break;
            }
        }
    }
    broker.stop();
    if runs.iter().any(|r| r.daemon_exit_code != Some(0)) {
        facts
            .notes
            .push("a daemon did not exit with code 0 after SIGTERM (see daemon_exit_code)".into());
    }
    if !runs.is_empty() {
        table::print_demo(
            &facts_line(&facts),
            &demo_rows(&runs),
            &share_table(&facts, &runs),
        );
        write_outputs(&args.out, &facts, &runs, interrupted)?;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if interrupted {
        bail!("interrupted: everything was shut down");
    }
    Ok(())
}

fn facts_line(f: &DemoSetup) -> String {
    format!(
        "{} · {} minutes {:.1}-{:.1} · {} requests · load {}x · speed {}x · {} devices · {}",
        f.catalogue,
        f.trace,
        f.trace_window_minutes[0],
        f.trace_window_minutes[1],
        f.requests,
        f.load,
        f.speed,
        f.devices,
        f.broker
    )
}

fn demo_rows(runs: &[PolicyRun]) -> Vec<table::DemoRow> {
    runs.iter()
        .map(|r| {
            let s = &r.summary;
            table::DemoRow {
                policy: r.policy.clone(),
                requests: s.requests,
                completed: s.completed,
                errors: s.errors,
                lost: s.lost,
                not_sent: s.not_sent,
                duplicated: s.duplicated,
                avg_qos: s.avg_qos,
                slo_violation_rate: s.slo_violation_rate,
                ttft_p50_s: s.ttft_s.p50,
                ttft_p99_s: s.ttft_s.p99,
                per_token_p50_s: s.per_token_s.p50,
                per_token_p95_s: s.per_token_s.p95,
                requests_per_s: s.requests_per_s,
                fallbacks: r.daemon.as_ref().filter(|_| r.learned).map(|d| d.fallbacks),
                errors_by_code: s.errors_by_code.clone(),
            }
        })
        .collect()
}

fn share_table(facts: &DemoSetup, runs: &[PolicyRun]) -> table::ShareTable {
    table::ShareTable {
        policies: runs.iter().map(|r| r.policy.clone()).collect(),
        rows: facts
            .experts
            .iter()
            .map(|name| {
                let shares = runs
                    .iter()
                    .map(|r| {
                        r.summary
                            .experts
                            .iter()
                            .find(|e| &e.name == name)
                            .map_or(0.0, |e| e.share)
                    })
                    .collect();
                (name.clone(), shares)
            })
            .collect(),
    }
}

/// Loads the catalogue, quality table and trace, builds the workload, finds the daemon.
fn prepare(args: &DemoArgs) -> anyhow::Result<Setup> {
    let catalogue_path = locate(&args.experts)
        .with_context(|| format!("--experts {}: not found", args.experts.display()))?;
    let catalogue = Catalogue::load(&catalogue_path)?;
    let quality = Arc::new(match &args.quality {
        Some(path) => QualityTable::load(path)?,
        None => QualityTable::embedded()?,
    });
    let (rows, trace_name): (Vec<TraceRow>, String) = match locate(&args.trace) {
        Some(path) => (load_azure_trace(&path)?, args.trace.display().to_string()),
        None => (
            embedded_conv_trace()?,
            "the shipped conversation trace".into(),
        ),
    };
    let from_s = args.offset_minutes * 60.0;
    let to_s = from_s + args.minutes * 60.0;
    let window: Vec<TraceRow> = rows
        .into_iter()
        .filter(|r| r.arrival_s >= from_s && r.arrival_s < to_s)
        .collect();
    if window.is_empty() {
        bail!(
            "{trace_name} has no requests in minutes {}-{}",
            args.offset_minutes,
            args.offset_minutes + args.minutes
        );
    }
    let spec = format!(
        "trace:{},speed={},offset={from_s}",
        args.trace.display(),
        args.load
    );
    let parsed = WorkloadSpec::Trace {
        path: args.trace.display().to_string(),
        speed: args.load,
        n: None,
        offset_s: from_s,
    };
    let sources = WorkloadSources {
        quality: &quality,
        output_lengths: &[],
        trace: Some(&window),
    };
    let workload = qosroute_sim::Workload {
        requests: synthesize(&spec, &parsed, sources, args.seed)?,
        spec,
    };
    let requests = SwarmRequest::from_workload(&workload);
    let daemon_exe = find_daemon(args.daemon.as_ref())?;
    let mut catalogue = catalogue;
    let real = match args.real {
        Some(n) => Some(RealSite::plan(n, &mut catalogue, &quality)?),
        None => None,
    };
    Ok(Setup {
        real,
        catalogue,
        quality,
        requests,
        trace_name,
        daemon_exe,
        scratch: Scratch::new(args.keep_scratch)?,
    })
}

/// SIGINT (Ctrl-C) or SIGTERM cancels `interrupt`.
pub(crate) fn watch_signals(interrupt: CancellationToken) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!(
                "\nstopping: shutting down the devices, the daemon, the experts and the broker"
            );
            interrupt.cancel();
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            interrupt.cancel();
        }
    });
    Ok(())
}

/// A scratch folder for the generated configs and logs, removed on drop unless kept.
#[derive(Debug)]
pub(crate) struct Scratch(pub(crate) PathBuf, bool);

impl Scratch {
    pub(crate) fn new(keep: bool) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("qosroute-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        Ok(Self(dir, keep))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.1 {
            eprintln!("kept the daemon configs and logs in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free port")?
        .local_addr()?
        .port())
}

pub(crate) async fn wait_for_port(port: u16, what: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("{what} did not listen on 127.0.0.1:{port} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Sends SIGTERM to a child (on Unix; elsewhere it is killed).
fn terminate(child: &mut Child) {
    #[cfg(unix)]
    {
        let pid = rustix::process::Pid::from_child(child);
        if rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_err() {
            let _ = child.kill();
        }
    }
    #[cfg(not(unix))]
    {
        let _ = child.kill();
    }
}

/// Waits for a child to exit, up to `within`; kills it after that. Returns its exit code.
fn reap(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                return child.wait().ok().and_then(|s| s.code());
            }
        }
    }
}

/// A child process in its own process group (so a terminal's Ctrl-C reaches only the demo,
/// which then stops it in order): SIGTERM, then kill, when dropped.
#[derive(Debug)]
pub(crate) struct ChildGuard {
    pub(crate) child: Option<Child>,
    grace: Duration,
}

impl ChildGuard {
    pub(crate) fn spawn(command: &mut Command, grace: Duration) -> std::io::Result<Self> {
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(command, 0);
        Ok(Self {
            child: Some(command.spawn()?),
            grace,
        })
    }

    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, wait (off the async threads), kill after the grace period.
    pub(crate) async fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let grace = self.grace;
        tokio::task::spawn_blocking(move || {
            if child.try_wait().ok().flatten().is_none() {
                terminate(&mut child);
            }
            reap(&mut child, grace)
        })
        .await
        .ok()
        .flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                terminate(&mut child);
            }
            reap(&mut child, self.grace);
        }
    }
}

/// The MQTT broker of the demo.
enum Broker {
    External(String),
    /// rumqttd in this process (it has no stop: it ends with the process).
    Embedded(String),
    Mosquitto {
        url: String,
        child: ChildGuard,
    },
}

impl Broker {
    fn url(&self) -> &str {
        match self {
            Broker::External(url) | Broker::Embedded(url) | Broker::Mosquitto { url, .. } => url,
        }
    }

    fn describe(&self) -> String {
        match self {
            Broker::External(url) => format!("broker {url}"),
            Broker::Embedded(url) => {
                format!("embedded rumqttd at {url}")
            }
            Broker::Mosquitto { url, .. } => format!("mosquitto at {url}"),
        }
    }

    fn stop(&mut self) {
        if let Broker::Mosquitto { child, .. } = self
            && let Some(mut c) = child.child.take()
        {
            terminate(&mut c);
            reap(&mut c, Duration::from_secs(5));
        }
    }
}

pub(crate) fn find_mosquitto() -> Option<&'static str> {
    [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "mosquitto",
    ]
    .into_iter()
    .find(|p| {
        Command::new(p)
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    })
}

async fn start_broker(args: &DemoArgs, scratch: &Scratch) -> anyhow::Result<Broker> {
    let choice = args.broker.as_str();
    if !matches!(choice, "mosquitto" | "embedded") {
        qosroute_swarm::parse_broker_url(choice)
            .map_err(|e| anyhow::anyhow!("--broker: {e} (or embedded, mosquitto)"))?;
        return Ok(Broker::External(choice.to_owned()));
    }
    let port = free_port()?;
    let url = format!("mqtt://127.0.0.1:{port}");
    if choice == "embedded" {
        start_rumqttd(port)?;
        wait_for_port(
            port,
            "the embedded broker (rumqttd)",
            Duration::from_secs(10),
        )
        .await?;
        return Ok(Broker::Embedded(url));
    }
    let child = start_mosquitto(
        port,
        &scratch.0,
        "--broker mosquitto: mosquitto is not installed (e.g. `apt-get install mosquitto`); \
         the default, --broker embedded, needs nothing",
    )
    .await?;
    Ok(Broker::Mosquitto { url, child })
}

/// mosquitto on 127.0.0.1:`port` with its config in `dir`, as the demo, the bench and the
/// validation run it: anonymous, no persistence, no in-flight limit, TCP_NODELAY (without it
/// a reply waits behind the broker's PUBACK for the device's delayed ACK). Fails with
/// `missing` when mosquitto is not installed.
pub(crate) async fn start_mosquitto(
    port: u16,
    dir: &std::path::Path,
    missing: &str,
) -> anyhow::Result<ChildGuard> {
    let Some(exe) = find_mosquitto() else {
        bail!("{missing}")
    };
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nmax_inflight_messages 0\nset_tcp_nodelay true\n"
        ),
    )?;
    let child = ChildGuard::spawn(
        Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        Duration::from_secs(5),
    )
    .with_context(|| format!("cannot start {exe}"))?;
    wait_for_port(port, "mosquitto", Duration::from_secs(10)).await?;
    Ok(child)
}

/// rumqttd on 127.0.0.1:`port`, MQTT 5 only, in background threads of this process.
fn start_rumqttd(port: u16) -> anyhow::Result<()> {
    use std::collections::HashMap;
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 1024 * 1024,
        max_inflight_count: 4096,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v5".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 4096,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: rumqttd::Strategy::RoundRobin,
        },
        v5: Some(HashMap::from([("1".to_owned(), server)])),
        ..rumqttd::Config::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            // Runs until the process ends; rumqttd has no stop.
            let _ = broker.start();
        })
        .context("cannot start the embedded broker")?;
    Ok(())
}

/// The experts of one run: emulated in-process, and the real servers of `--real`.
#[derive(Debug, Clone, Copy)]
struct RunExperts<'a> {
    emulated: &'a [EmulatedExpert],
    real: Option<&'a RealServers>,
}

/// The emulated experts of the catalogue, `speed` times faster than their hardware.
async fn start_experts(
    setup: &Setup,
    speed: f64,
    seed: u64,
) -> anyhow::Result<Vec<EmulatedExpert>> {
    let mut experts = Vec::with_capacity(setup.catalogue.experts.len());
    for (i, profile) in setup.catalogue.experts.iter().enumerate() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot listen for an emulated expert")?;
        let profile = Arc::new(profile.clone());
        let mut options = EmulatorOptions::for_profile(&profile);
        options.quality = Some(setup.quality.clone());
        options.time_scale = 1.0 / speed;
        options.seed = seed.wrapping_add(i as u64);
        options.shutdown_grace = Duration::from_secs(1);
        experts.push(
            EmulatedExpert::serve(profile.clone(), options, listener)
                .with_context(|| format!("{}: cannot start the emulated expert", profile.name))?,
        );
    }
    Ok(experts)
}

async fn stop_experts(experts: Vec<EmulatedExpert>) {
    let mut stopping = tokio::task::JoinSet::new();
    for e in experts {
        stopping.spawn(e.shutdown());
    }
    while stopping.join_next().await.is_some() {}
}

/// A TOML basic string.
pub(crate) fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `qosrouted` binary: `explicit` (`--daemon`), else the one next to this executable;
/// fails with how to build it when missing.
pub(crate) fn find_daemon(explicit: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let exe = match explicit {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .map(|d| d.join(format!("qosrouted{}", std::env::consts::EXE_SUFFIX)))
            .context("this executable has no folder")?,
    };
    if !exe.exists() {
        bail!(
            "the daemon binary {} is missing: build it next to qosroute with `cargo build --release -p qosroute-daemon -p qosroute-cli` (or pass --daemon PATH)",
            exe.display()
        );
    }
    Ok(exe)
}

/// The `[broker]` (clean session, quick reconnects) and `[policy]` sections of a generated
/// daemon configuration, as the demo and the bench run the daemon.
pub(crate) fn broker_and_policy(
    c: &mut String,
    broker_url: &str,
    client_id: &str,
    router: &Router,
) {
    use std::fmt::Write as _;
    let _ = writeln!(
        c,
        "\n[broker]\nurl = {}\nclient_id = {}\nsession_expiry_s = 0\nreconnect_min_s = 0.1\nreconnect_max_s = 2.0",
        toml_str(broker_url),
        toml_str(client_id)
    );
    let _ = writeln!(c, "\n[policy]");
    match router {
        Router::Learned { dir, .. } => {
            let _ = writeln!(
                c,
                "model_dir = {}\nvariant = \"f32\"\nfallback = \"qos-greedy\"",
                toml_str(&dir.display().to_string())
            );
        }
        Router::Baseline(b) => {
            let _ = writeln!(c, "fallback = {}", toml_str(b));
        }
        Router::Planner(spec) => {
            let _ = writeln!(c, "planner = {}\nfallback = \"qos-greedy\"", toml_str(spec));
        }
    }
}

/// The daemon's configuration for one run.
fn daemon_config(
    setup: &Setup,
    router: &Router,
    experts: RunExperts<'_>,
    broker_url: &str,
    client_id: &str,
    metrics_port: u16,
    speed: f64,
) -> String {
    use std::fmt::Write as _;
    let mut c = String::new();
    let _ = writeln!(c, "# Generated by `qosroute demo` ({}).", router.describe());
    let _ = writeln!(c, "site = {}", toml_str(SITE));
    broker_and_policy(&mut c, broker_url, client_id, router);
    let slo = &setup.catalogue.slo;
    let _ = writeln!(
        c,
        "\n[slo]\ndefault_s_per_token = {:e}\n[slo.per_task]",
        slo.default_s_per_token / speed
    );
    for (task, s) in &slo.per_task {
        let _ = writeln!(c, "{} = {:e}", task.as_str(), s / speed);
    }
    // A real server's health endpoint stalls while it prefills (up to about 11 s for the
    // longest prompt): it is not stale meanwhile.
    let RunExperts {
        emulated: experts,
        real,
    } = experts;
    let stale_after_s = if real.is_some() { 30.0 } else { 2.0 };
    let _ = writeln!(
        c,
        "\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[telemetry]\nscrape_interval_s = 0.25\nstale_after_s = {stale_after_s:?}\n\n[shutdown]\ndrain_deadline_s = 2.0"
    );
    let emulated = setup
        .catalogue
        .experts
        .iter()
        .zip(experts)
        .map(|(profile, expert)| {
            (
                profile,
                expert.base_url(),
                expert.model_name().to_owned(),
                format!(
                    "kind = \"vllm\"\nqosroute_extension = true\nhardware = {}",
                    toml_str(&format!("{} (emulated, {speed}x)", profile.hardware))
                ),
            )
        });
    let real = real
        .into_iter()
        .flat_map(|r| &r.servers)
        .map(|(profile, server)| {
            (
                profile,
                server.base_url(),
                qosroute_real_engine::SERVED_MODEL.to_owned(),
                format!(
                    "kind = \"openai\"\nhealth_timeout_s = {:?}\nhardware = {}",
                    crate::real_site::HEALTH_TIMEOUT_S,
                    toml_str(&profile.hardware)
                ),
            )
        });
    for (profile, base_url, served_model, engine) in emulated.chain(real) {
        let l = &profile.latency;
        let _ = writeln!(
            c,
            "\n[[expert]]\nname = {}\nbase_url = {}\nmodel = {}\n{engine}\nquality_model = {}\nmax_slots = {}\nkv_tokens = {}\n[expert.latency]\nprefill_tok_s = {:e}\ndecode_t0_s = {:e}\ndecode_d_s_per_seq = {:e}\ndecode_e_s_per_ctx_token = {:e}\n[expert.quality]",
            toml_str(&profile.name),
            toml_str(&base_url),
            toml_str(&served_model),
            toml_str(&profile.model),
            profile.max_slots,
            profile.kv_tokens,
            l.prefill_tok_s * speed,
            l.decode_t0_s / speed,
            l.decode_d_s_per_seq / speed,
            l.decode_e_s_per_ctx_token / speed,
        );
        // Quality priors from the table's calibration half, as the simulator's routers get.
        if let Some(m) = setup.quality.model_index(&profile.model) {
            let priors = setup.quality.calibration_priors(m);
            let mean = priors.iter().sum::<f64>() / priors.len() as f64;
            let _ = writeln!(c, "default = {mean:.4}");
            for task in Task::ALL {
                let _ = writeln!(
                    c,
                    "{} = {:.4}",
                    toml_str(task.as_str()),
                    priors[task.index()]
                );
            }
        } else {
            let _ = writeln!(c, "default = 0.5");
        }
    }
    c
}

/// The real daemon, running one generated config.
pub(crate) struct DaemonProcess {
    pub(crate) child: ChildGuard,
    pub(crate) log: PathBuf,
    pub(crate) metrics_port: u16,
}

impl DaemonProcess {
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until the metrics endpoint says every expert is up.
    pub(crate) async fn wait_ready(
        &mut self,
        experts: &[String],
        within: Duration,
        interrupt: &CancellationToken,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.exited() {
                bail!(
                    "qosrouted exited at start ({status}); its log ends with:\n{}",
                    self.log_tail(20)
                );
            }
            if let Some(m) = scrape(self.metrics_port).await
                && experts
                    .iter()
                    .all(|e| m.expert_up.get(e).is_some_and(|&up| up >= 1.0))
            {
                return Ok(());
            }
            if interrupt.is_cancelled() {
                bail!("interrupted while the daemon started");
            }
            if Instant::now() > deadline {
                bail!(
                    "qosrouted did not report every expert up within {within:?}; its log ends with:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts `qosrouted --config CONFIG` with its log (stderr) in `log`, at the level
/// `$LOG_VAR` names (default `warn`); stopped by SIGTERM, killed 10 s later if need be.
pub(crate) fn spawn_daemon(
    exe: &Path,
    config: &Path,
    log: &Path,
    log_var: &str,
) -> anyhow::Result<ChildGuard> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    ChildGuard::spawn(
        Command::new(exe)
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var(log_var).unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file),
        Duration::from_secs(10),
    )
    .with_context(|| format!("cannot start {}", exe.display()))
}

/// Runs `qosrouted --check-config`, so that a setting the daemon refuses (e.g. a policy it
/// cannot run) is reported in its own words.
pub(crate) fn check_config(exe: &Path, config: &Path) -> anyhow::Result<()> {
    let out = Command::new(exe)
        .arg("--check-config")
        .arg(config)
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if !out.status.success() {
        bail!(
            "qosrouted refuses the generated configuration:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

async fn run_router(
    args: &DemoArgs,
    setup: &Setup,
    router: &Router,
    k: usize,
    broker_url: &str,
    interrupt: &CancellationToken,
) -> anyhow::Result<PolicyRun> {
    let started = Instant::now();
    let experts = start_experts(setup, args.speed(), args.seed).await?;
    let real = match &setup.real {
        Some(site) => {
            let dir = setup.scratch.0.join(format!("run-{k}"));
            std::fs::create_dir_all(&dir)?;
            match RealServers::start(site, &dir).await {
                Ok(servers) => Some(servers),
                Err(e) => {
                    stop_experts(experts).await;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let site = RunExperts {
        emulated: &experts,
        real: real.as_ref(),
    };
    let result = run_with_experts(args, setup, router, k, broker_url, interrupt, site).await;
    stop_experts(experts).await;
    drop(real);
    let (summary_run, exit) = result?;
    Ok(PolicyRun {
        wall_s: started.elapsed().as_secs_f64(),
        daemon_exit_code: exit,
        ..summary_run
    })
}

async fn run_with_experts(
    args: &DemoArgs,
    setup: &Setup,
    router: &Router,
    k: usize,
    broker_url: &str,
    interrupt: &CancellationToken,
    experts: RunExperts<'_>,
) -> anyhow::Result<(PolicyRun, Option<i32>)> {
    let metrics_port = free_port()?;
    let client_id = format!("qosrouted-demo-{}-{k}", std::process::id());
    let config = daemon_config(
        setup,
        router,
        experts,
        broker_url,
        &client_id,
        metrics_port,
        args.speed(),
    );
    let dir = setup.scratch.0.join(format!("run-{k}"));
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("qosrouted.toml");
    std::fs::write(&config_path, &config)?;
    check_config(&setup.daemon_exe, &config_path)?;
    let log = dir.join("qosrouted.log");
    let child = spawn_daemon(
        &setup.daemon_exe,
        &config_path,
        &log,
        "QOSROUTE_DEMO_DAEMON_LOG",
    )?;
    let mut daemon = DaemonProcess {
        child,
        log,
        metrics_port,
    };
    let outcome = drive(args, setup, router, broker_url, &mut daemon, interrupt).await;
    let tail = daemon.log_tail(20);
    let exit = daemon.child.stop().await;
    match outcome {
        Ok(run) => Ok((run, exit)),
        Err(e) if tail.trim().is_empty() => Err(e),
        Err(e) => Err(e.context(format!("daemon log ends with:\n{tail}"))),
    }
}

/// With the daemon started: wait for it, run the swarm with the live view, collect.
async fn drive(
    args: &DemoArgs,
    setup: &Setup,
    router: &Router,
    broker_url: &str,
    daemon: &mut DaemonProcess,
    interrupt: &CancellationToken,
) -> anyhow::Result<PolicyRun> {
    let site = setup.site_experts();
    let names: Vec<String> = site.iter().map(|(n, _)| n.clone()).collect();
    wait_for_port(
        daemon.metrics_port,
        "qosrouted's metrics",
        Duration::from_secs(20),
    )
    .await
    .with_context(|| daemon.log_tail(20))?;
    daemon
        .wait_ready(&names, Duration::from_secs(20), interrupt)
        .await?;
    let mut config = SwarmConfig::new(broker_url, SITE);
    config.devices = args.devices;
    config.speed = args.speed();
    // Real servers cache prompts: a prompt that shares a prefix with an earlier one would skip
    // part of its prefill, which devices' prompts do not.
    config.unique_prompts = setup.real.is_some();
    config.postcard_share = args.postcard_share;
    config.feedback = !args.no_feedback;
    config.reply_timeout = Duration::from_secs_f64(args.reply_timeout);
    config.linger = Duration::from_millis(500);
    config.device_prefix = "demo".into();
    config.session_expiry_s = 0;
    tokio::select! {
        probe = probe_gateway(&config, Duration::from_secs(15)) => { probe?; }
        () = interrupt.cancelled() => bail!("interrupted while waiting for the gateway"),
    }
    let truth = QualityTruth::new(setup.quality.clone(), site);
    let swarm = Swarm::start(config, &setup.requests, Some(truth)).await?;
    let mut view = LiveView::new(router.name(), names.clone());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = interrupt.cancelled() => {
                swarm.stop();
                break;
            }
        }
        let progress = swarm.progress();
        if progress.finished {
            break;
        }
        let metrics = scrape(daemon.metrics_port).await;
        view.draw(&progress, metrics.as_ref());
        if daemon.child.exited().is_some() {
            swarm.stop();
            break;
        }
    }
    let report = swarm.finish().await?;
    let metrics = scrape(daemon.metrics_port).await;
    let summary = report.summary();
    view.finish(&summary, metrics.as_ref());
    // A daemon that died mid-run still leaves a report worth writing; the demo then fails.
    let problem = daemon.child.exited().map(|status| {
        format!(
            "qosrouted exited during the run ({status}){}",
            if status.success() {
                "; it exits 0 after SIGTERM or SIGINT, so something outside the demo stopped it"
            } else {
                ""
            }
        )
    });
    let bucket = (report.duration_s / 30.0).max(0.5);
    Ok(PolicyRun {
        policy: router.name().to_owned(),
        router: router.describe(),
        learned: matches!(router, Router::Learned { .. }),
        wall_s: 0.0,
        timeline: report.timeline(bucket),
        summary,
        daemon: metrics,
        daemon_exit_code: None,
        problem,
        report,
    })
}

/// What the daemon's `/metrics` says (the part the demo shows).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct DaemonMetrics {
    /// `qosroute_qos_sum`, `qosroute_qos_count`: realised QoS of completed requests whose
    /// expert reported a quality.
    qos_sum: f64,
    qos_count: f64,
    slo_violations: f64,
    pub(crate) fallbacks: f64,
    retries: f64,
    replies_dropped: f64,
    feedback: f64,
    pub(crate) decisions: f64,
    pub(crate) decision_seconds_sum: f64,
    pub(crate) requests_by_outcome: BTreeMap<String, f64>,
    expert_in_flight: BTreeMap<String, f64>,
    expert_up: BTreeMap<String, f64>,
}

impl DaemonMetrics {
    fn avg_qos(&self) -> f64 {
        if self.qos_count > 0.0 {
            self.qos_sum / self.qos_count
        } else {
            f64::NAN
        }
    }

    fn parse(text: &str) -> Self {
        let mut m = DaemonMetrics::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, label) = match key.split_once('{') {
                Some((n, rest)) => (
                    n,
                    rest.trim_end_matches('}')
                        .split_once("=\"")
                        .map(|(_, v)| v.trim_end_matches('"').replace("\\\"", "\"")),
                ),
                None => (key, None),
            };
            match (name, label) {
                ("qosroute_qos_sum", None) => m.qos_sum = v,
                ("qosroute_qos_count", None) => m.qos_count = v,
                ("qosroute_slo_violations_total", None) => m.slo_violations = v,
                ("qosroute_policy_fallbacks_total", None) => m.fallbacks = v,
                ("qosroute_retries_total", None) => m.retries = v,
                ("qosroute_replies_dropped_total", None) => m.replies_dropped = v,
                ("qosroute_feedback_total", None) => m.feedback = v,
                ("qosroute_decision_seconds_count", None) => m.decisions = v,
                ("qosroute_decision_seconds_sum", None) => m.decision_seconds_sum = v,
                ("qosroute_requests_total", Some(l)) => {
                    m.requests_by_outcome.insert(l, v);
                }
                ("qosroute_expert_in_flight", Some(l)) => {
                    m.expert_in_flight.insert(l, v);
                }
                ("qosroute_expert_up", Some(l)) => {
                    m.expert_up.insert(l, v);
                }
                _ => {}
            }
        }
        m
    }
}

/// `GET /metrics` of the daemon, parsed; `None` when it does not answer within a second.
pub(crate) async fn scrape(port: u16) -> Option<DaemonMetrics> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some(DaemonMetrics::parse(&body))
    };
    tokio::time::timeout(Duration::from_secs(1), fetch)
        .await
        .ok()
        .flatten()
}

/// The live view on stderr: redrawn in place on a terminal, periodic lines otherwise.
struct LiveView {
    policy: String,
    experts: Vec<String>,
    tty: bool,
    drawn: usize,
    last_line: Option<Instant>,
    samples: VecDeque<(f64, u64)>,
}

impl LiveView {
    fn new(policy: &str, experts: Vec<String>) -> Self {
        Self {
            policy: policy.to_owned(),
            experts,
            tty: std::io::stderr().is_terminal(),
            drawn: 0,
            last_line: None,
            samples: VecDeque::new(),
        }
    }

    /// Requests published per second over the last ~2 s.
    fn rate(&mut self, p: &SwarmProgress) -> f64 {
        self.samples.push_back((p.elapsed_s, p.published));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| p.elapsed_s - t > 2.0)
        {
            self.samples.pop_front();
        }
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => (n1 - n0) as f64 / (t1 - t0),
            _ => 0.0,
        }
    }

    fn lines(&mut self, p: &SwarmProgress, m: Option<&DaemonMetrics>) -> Vec<String> {
        let rate = self.rate(p);
        let width = 24usize;
        let done = if p.requests == 0 {
            width
        } else {
            (p.published as usize * width) / p.requests as usize
        };
        let bar: String = "#".repeat(done) + &"-".repeat(width - done.min(width));
        let daemon_qos = m.map_or(f64::NAN, DaemonMetrics::avg_qos);
        let mut lines = vec![
            format!(
                "[{}] {bar} {}/{} published, {} answered, {:.1}/{:.1} s, {:.1} req/s",
                self.policy, p.published, p.requests, p.ended, p.elapsed_s, p.planned_s, rate
            ),
            format!(
                "  avg QoS {} (devices) / {} (daemon)  SLO miss {} of {}  errors {}  in flight {}",
                fmt_num(p.avg_qos(), 3),
                fmt_num(daemon_qos, 3),
                fmt_pct(ratio(p.slo_violations, p.completed)),
                p.completed,
                p.errors,
                p.in_flight()
            ),
        ];
        if let Some(m) = m {
            let cells: Vec<String> = self
                .experts
                .iter()
                .map(|e| format!("{e} {}", m.expert_in_flight.get(e).copied().unwrap_or(0.0)))
                .collect();
            for chunk in cells.chunks(3) {
                lines.push(format!("  in flight: {}", chunk.join(" | ")));
            }
        }
        lines
    }

    fn draw(&mut self, p: &SwarmProgress, m: Option<&DaemonMetrics>) {
        let lines = self.lines(p, m);
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.drawn > 0 {
                let _ = write!(err, "\x1b[{}F\x1b[J", self.drawn);
            }
            for l in &lines {
                let _ = writeln!(err, "{l}");
            }
            self.drawn = lines.len();
        } else if self
            .last_line
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            self.last_line = Some(Instant::now());
            let _ = writeln!(err, "{}", lines.join(" ;"));
        }
        let _ = err.flush();
    }

    fn finish(&mut self, s: &SwarmSummary, m: Option<&DaemonMetrics>) {
        let mut err = std::io::stderr().lock();
        if self.tty && self.drawn > 0 {
            let _ = write!(err, "\x1b[{}F\x1b[J", self.drawn);
            self.drawn = 0;
        }
        let _ = writeln!(
            err,
            "[{}] done in {:.1} s: {} requests, {} completed, {} errors, {} lost, {} not sent, {} duplicated; avg QoS {} (daemon {}), SLO miss {}{}",
            self.policy,
            s.duration_s,
            s.requests,
            s.completed,
            s.errors,
            s.lost,
            s.not_sent,
            s.duplicated,
            fmt_num(s.avg_qos, 4),
            fmt_num(m.map_or(f64::NAN, DaemonMetrics::avg_qos), 4),
            fmt_pct(s.slo_violation_rate),
            if s.accounted {
                ""
            } else {
                " (NOT every request accounted for)"
            }
        );
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        a as f64 / b as f64
    }
}

fn fmt_num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "n/a".into()
    }
}

fn fmt_pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1}%", 100.0 * v)
    } else {
        "-".into()
    }
}

/// demo.json and the SVG plots.
fn write_outputs(
    out: &Path,
    facts: &DemoSetup,
    runs: &[PolicyRun],
    interrupted: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let json = serde_json::to_string(&DemoOutput {
        demo: facts,
        interrupted,
        runs,
    })?;
    crate::write_output(&out.join("demo.json"), json + "\n")?;
    let qos: Vec<SweepCurve> = runs
        .iter()
        .map(|r| SweepCurve {
            policy: r.policy.clone(),
            points: r.timeline.iter().map(|p| (p.t_s, p.avg_qos, 0.0)).collect(),
        })
        .collect();
    let path = out.join("qos-over-time.svg");
    sweep_curves(
        &path,
        "Average QoS of the requests ending in each interval",
        "seconds since the first request (wall clock)",
        "average QoS",
        &qos,
    )?;
    eprintln!("wrote {}", path.display());
    let cdf: Vec<SweepCurve> = runs
        .iter()
        .map(|r| SweepCurve {
            policy: r.policy.clone(),
            points: latency_cdf(&r.report),
        })
        .collect();
    let path = out.join("latency.svg");
    sweep_curves(
        &path,
        "Per-token latency of completed requests (gateway-measured), CDF",
        "ms per output token (wall clock)",
        "fraction of completed requests",
        &cdf,
    )?;
    eprintln!("wrote {}", path.display());
    let series: Vec<BarSeries> = runs
        .iter()
        .map(|r| BarSeries {
            name: r.policy.clone(),
            values: facts
                .experts
                .iter()
                .map(|e| {
                    r.summary
                        .experts
                        .iter()
                        .find(|x| &x.name == e)
                        .map_or(0.0, |x| x.share)
                })
                .collect(),
        })
        .collect();
    let path = out.join("expert-share.svg");
    grouped_bars(
        &path,
        "Share of completed requests per expert",
        "share",
        &facts.experts,
        &series,
    )?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// (ms per token, fraction at or below) at 40 quantiles of the completed requests.
fn latency_cdf(report: &SwarmReport) -> Vec<(f64, f64, f64)> {
    let mut v: Vec<f64> = report
        .records
        .iter()
        .filter_map(|r| r.s_per_token.map(|s| f64::from(s) * 1e3))
        .filter(|x| x.is_finite())
        .collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Vec::new();
    }
    let n = v.len();
    (1..=40)
        .map(|k| {
            let q = k as f64 / 40.0;
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            (v[i], (i + 1) as f64 / n as f64, 0.0)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn routers_parse_or_say_what_the_daemon_can_run() {
        assert!(matches!(
            parse_router("qos-greedy", Path::new("x")).unwrap(),
            Router::Baseline(b) if b == "qos-greedy"
        ));
        assert!(matches!(
            parse_router("qos-planner:k=8", Path::new("x")).unwrap(),
            Router::Planner(p) if p == "qos-planner:k=8"
        ));
        assert!(parse_router("qos-planner:k=0", Path::new("x")).is_err());
        let e = parse_router("oracle", Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("least-loaded") && e.contains("han:DIR"), "{e}");
        let e = parse_router("han", Path::new("/no/such/dir")).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
        assert!(matches!(
            parse_router("han", Path::new("policy-model/models/han")).unwrap(),
            Router::Learned { .. }
        ));
    }

    #[test]
    fn metrics_parse_with_labels() {
        let m = DaemonMetrics::parse(
            "# HELP x\nqosroute_qos_sum 1.5\nqosroute_qos_count 3\nqosroute_expert_in_flight{expert=\"a\"} 2\nqosroute_requests_total{outcome=\"completed\"} 7\nqosroute_expert_up{expert=\"a\"} 1\n",
        );
        assert_eq!(m.avg_qos(), 0.5);
        assert_eq!(m.expert_in_flight.get("a"), Some(&2.0));
        assert_eq!(m.requests_by_outcome.get("completed"), Some(&7.0));
        assert!(DaemonMetrics::default().avg_qos().is_nan());
    }

    #[test]
    fn toml_strings_escape() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_str("x\ny"), "\"x\\u000Ay\"");
    }
}
