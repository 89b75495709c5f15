//! `qosroute demo`: the whole system on one machine. An MQTT broker (the embedded rumqttd,
//! mosquitto, or `--broker URL`), the six edge-mixed experts emulated in-process, the real
//! `qosrouted` binary with a generated config, and a swarm of simulated devices replaying a
//! slice of the Azure conversation trace; a live view while it runs, then a table, JSON and
//! SVG plots. It compares routers (by default han, qos-planner, qos-greedy and least-loaded)
//! on the same slice, each with a fresh daemon and fresh experts, over one or more workload
//! seeds (`--seeds`).
//!
//! The comparison is honest about what a router can know: the devices send a per-task
//! `max_tokens` bound, not their answer's length (`max_tokens.rs`); the emulated experts
//! generate each answer's true length up to it; each device judges its SLO itself, from its
//! publish to its last token, with the simulator's rule.
//!
//! Time is compressed by `--speed`: the experts run that many times faster than the hardware
//! they model, the daemon's latency models and SLOs (and the devices' SLOs) are scaled by the
//! same factor, and the trace is replayed that much faster. `--load` scales the trace's
//! arrival rate on top.
//!
//! `--real [N]` puts N real llama.cpp servers of SmolLM2-135M (`qosroute-real-engine`) in place
//! of the N weakest emulated experts; time then runs at 1x.

mod live;
mod max_tokens;
mod process;
mod seeds;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qosroute_core::{BASELINE_NAMES, SloTable, Task};
use qosroute_emulator::{AnswerTokens, EmulatedExpert, EmulatorOptions};
use qosroute_sim::trace::{TraceRow, embedded_conv_trace, load_azure_trace};
use qosroute_sim::workload::{WorkloadSources, synthesize};
use qosroute_sim::{Catalogue, QualityTable, WorkloadSpec};
use qosroute_swarm::{
    QualityTruth, Swarm, SwarmConfig, SwarmReport, SwarmRequest, SwarmSummary, TimelinePoint,
    probe_gateway, request_index,
};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::live::LiveView;
use self::max_tokens::MaxTokens;
use self::process::start_broker;
pub(crate) use self::process::{
    ChildGuard, DaemonMetrics, DaemonProcess, Scratch, broker_and_policy, check_config,
    find_daemon, free_port, scrape, spawn_daemon, start_mosquitto, toml_str, watch_signals,
};
pub(crate) use self::seeds::RouterSummary;
use self::seeds::RunPoint;
use crate::plot::{BarSeries, SweepCurve, grouped_bars, sweep_curves};
use crate::real_site::{RealServers, RealSite};
use crate::table;

/// The site name of the demo's topics.
const SITE: &str = "demo";

/// The routers compared without --policy or --compare.
pub(crate) const DEFAULT_ROUTERS: [&str; 4] = ["han", "qos-planner", "qos-greedy", "least-loaded"];

/// The daemon's default `[broker] ack_deadline_s`, which the demo scales by 1/speed.
const DAEMON_ACK_DEADLINE_S: f64 = 5.0;

/// The default arrival rate relative to the trace's (measured in cli/README.md).
pub(crate) const DEFAULT_LOAD: f64 = 1.0;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// One router for the gateway: `han` (the shipped learned router), `han:DIR` (a folder
    /// with router-f32.onnx), `qos-planner[:k=16,h=20,...]`, or a baseline the daemon runs as
    /// its fallback policy (random, round-robin, least-loaded, p2c, quality-greedy,
    /// latency-greedy, qos-greedy). Without --policy and --compare, the demo compares
    /// han, qos-planner, qos-greedy and least-loaded.
    #[arg(long, conflicts_with = "compare")]
    policy: Option<String>,
    /// Compare routers: run the same trace slice through each in turn (fresh daemon and
    /// experts each time), e.g. `han,qos-greedy,least-loaded`.
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
    /// Start this many minutes into the trace (default 40: after the training window, the
    /// first 40 minutes, which the devices' max_tokens bounds come from).
    #[arg(long, default_value_t = max_tokens::TRAINING_WINDOW_S / 60.0)]
    offset_minutes: f64,
    /// Arrival rate relative to the trace's (see cli/README.md for what each load does to
    /// the routers).
    #[arg(long, default_value_t = DEFAULT_LOAD)]
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
    #[arg(long, default_value_t = 1, conflicts_with = "seeds")]
    seed: u64,
    /// Several workload seeds, e.g. `1,2,3`: every router runs once per seed, and a second
    /// table gives each router's average QoS as mean ± std over the seeds, with the paired
    /// difference against qos-greedy.
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
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
    if args.seeds.as_ref().is_some_and(Vec::is_empty) {
        bail!("--seeds: no seed named");
    }
    Ok(())
}

impl DemoArgs {
    /// The wall-clock speed-up (`--speed`, else 10, or 1 with `--real`).
    fn speed(&self) -> f64 {
        self.speed
            .unwrap_or(if self.real.is_some() { 1.0 } else { 10.0 })
    }

    /// The workload seeds (`--seeds`, else `--seed`), without repeats.
    fn seeds(&self) -> Vec<u64> {
        let mut seeds: Vec<u64> = Vec::new();
        for s in self.seeds.clone().unwrap_or_else(|| vec![self.seed]) {
            if !seeds.contains(&s) {
                seeds.push(s);
            }
        }
        seeds
    }

    /// The router names asked for (`--compare`, `--policy`, else [`DEFAULT_ROUTERS`]);
    /// `qos-planner:k=16,h=20` was split at its commas by `--compare`: its `key=value` items
    /// go back to it.
    fn router_names(&self) -> Vec<String> {
        let list: Vec<String> = match (&self.compare, &self.policy) {
            (Some(list), _) => list.clone(),
            (None, Some(p)) => return vec![p.trim().to_owned()],
            (None, None) => DEFAULT_ROUTERS.iter().map(|&n| n.to_owned()).collect(),
        };
        let mut names: Vec<String> = Vec::new();
        for item in list.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
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
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    check_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(demo(args))
}

/// One workload seed's requests: the same trace slice, its own join with tasks and
/// qualities, its own `max_tokens` bounds.
struct SeedWorkload {
    seed: u64,
    requests: Vec<SwarmRequest>,
    /// The true answer lengths, by request index (the emulated experts' truth).
    answer_tokens: Arc<Vec<u32>>,
    max_tokens: MaxTokens,
}

impl SeedWorkload {
    /// Requests whose answer is longer than their `max_tokens` (cut there).
    fn answers_cut(&self) -> usize {
        self.requests
            .iter()
            .filter(|r| r.output_tokens > r.max_tokens)
            .count()
    }
}

/// Everything a run needs, prepared once.
struct Setup {
    catalogue: Catalogue,
    quality: Arc<QualityTable>,
    workloads: Vec<SeedWorkload>,
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

/// The catalogue's SLOs on the wall clock of a run `speed` times faster than real time: what
/// the daemon routes by and what the devices judge their answers by.
fn wall_clock_slo(slo: &SloTable, speed: f64) -> SloTable {
    SloTable {
        default_s_per_token: slo.default_s_per_token / speed,
        per_task: slo.per_task.iter().map(|(t, s)| (*t, s / speed)).collect(),
    }
}

/// What the JSON says about one seed's workload.
#[derive(Debug, Serialize)]
struct WorkloadFacts {
    seed: u64,
    requests: usize,
    /// Answers longer than their request's max_tokens, cut there.
    answers_cut: usize,
    max_tokens: MaxTokens,
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
    seeds: Vec<u64>,
    routers: Vec<String>,
    workloads: Vec<WorkloadFacts>,
    site: &'static str,
    broker: String,
    feedback: bool,
    notes: Vec<String>,
}

/// One router's run on one seed.
#[derive(Debug, Serialize)]
struct PolicyRun {
    policy: String,
    seed: u64,
    router: String,
    /// A learned router or the planner (their fallbacks are worth showing; a baseline *is*
    /// the fallback).
    has_fallback: bool,
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

impl PolicyRun {
    fn point(&self) -> RunPoint {
        let daemon = self.daemon.as_ref();
        RunPoint {
            policy: self.policy.clone(),
            seed: self.seed,
            avg_qos: self.summary.avg_qos,
            slo_violation_rate: self.summary.slo_violation_rate,
            gateway_slo_violation_rate: self.summary.gateway_slo_violation_rate,
            decisions: daemon.map(|d| d.decisions),
            fallbacks: daemon.filter(|_| self.has_fallback).map(|d| d.fallbacks),
            budget_exhausted: daemon
                .filter(|_| qosroute_core::is_planner(&self.policy))
                .map(|d| d.planner_budget_exhausted),
        }
    }
}

#[derive(Debug, Serialize)]
struct DemoOutput<'a> {
    demo: &'a DemoSetup,
    interrupted: bool,
    /// Per router over the seeds.
    summary: &'a [RouterSummary],
    runs: &'a [PolicyRun],
}

async fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    let interrupt = CancellationToken::new();
    watch_signals(interrupt.clone())?;
    let routers = args
        .router_names()
        .iter()
        .map(|n| parse_router(n, &args.model_dir))
        .collect::<anyhow::Result<Vec<Router>>>()?;
    if routers.is_empty() {
        bail!("--compare: no router named");
    }
    let seeds = args.seeds();
    let setup = prepare(args, &seeds)?;
    let mut broker = start_broker(args, &setup.scratch).await?;
    let first = args.offset_minutes;
    let requests = setup.workloads.first().map_or(0, |w| w.requests.len());
    let mut facts = DemoSetup {
        catalogue: setup.catalogue.name.clone(),
        experts: setup.site_experts().into_iter().map(|(n, _)| n).collect(),
        trace: setup.trace_name.clone(),
        trace_window_minutes: [first, first + args.minutes],
        load: args.load,
        speed: args.speed(),
        requests,
        devices: args.devices,
        postcard_share: args.postcard_share,
        seeds: seeds.clone(),
        routers: routers.iter().map(|r| r.name().to_owned()).collect(),
        workloads: setup
            .workloads
            .iter()
            .map(|w| WorkloadFacts {
                seed: w.seed,
                requests: w.requests.len(),
                answers_cut: w.answers_cut(),
                max_tokens: w.max_tokens.clone(),
            })
            .collect(),
        site: SITE,
        broker: broker.describe(),
        feedback: !args.no_feedback,
        notes: vec![
            format!(
                "experts run {}x faster than the hardware they model; the daemon's latency models and SLOs are scaled by 1/{} to match; latencies here are wall-clock",
                args.speed(), args.speed()
            ),
            "avg_qos is computed by the devices: the true quality of the answering expert's model on the request's quality-table row when the SLO was met, else 0; errors and lost requests 0. Each device judges the SLO itself with the simulator's rule (qosroute_core::slo_met): per-token latency from its publish to its receipt of the last token, over the answer's tokens, strictly under its task's SLO (the catalogue's, scaled to the wall clock); slo_violation_rate is that verdict, gateway_slo_violation_rate the gateway's own (its clock, from when it received the request)".into(),
            "the devices send max_tokens = a per-task bound (workloads[].max_tokens: the p99 of the task's answer lengths in the trace's first 40 minutes), not the answer's length; the emulated experts generate each answer's true length (the trace's) up to max_tokens and cut it there, as a real engine does (workloads[].answers_cut); the daemon learns lengths from completed answers and never sees the truth".into(),
            "the daemon's qosroute_qos_* come from what the emulated experts report: their model's mean quality on the request's task (the daemon forwards the task, not the quality-table row), judged by the gateway's clock".into(),
            "prompts are at most 2048 tokens (8 KiB, the wire bound) and start with the request's id".into(),
        ],
    };
    if let Some(real) = &setup.real {
        facts.notes.push(real.note());
    }
    let planned_s = setup
        .workloads
        .first()
        .and_then(|w| w.requests.last())
        .map_or(0.0, |r| r.arrival_s)
        / args.speed();
    let max_tokens = setup
        .workloads
        .first()
        .map_or(String::new(), |w| w.max_tokens.describe());
    eprintln!(
        "qosroute demo: {} requests of {} (minutes {:.1}-{:.1}, load {}x, {max_tokens}) on {} ({} experts) through {}, {}x faster than real time; {} router(s) x {} seed(s), about {:.0} s each",
        requests,
        setup.trace_name,
        first,
        first + args.minutes,
        args.load,
        setup.catalogue.name,
        facts.experts.len(),
        facts.broker,
        args.speed(),
        routers.len(),
        seeds.len(),
        planned_s + 10.0
    );
    let mut runs = Vec::new();
    let mut interrupted = false;
    let mut failure = None;
    // Seed by seed, every router on it: a router's paired runs are close in time.
    'seeds: for (i, workload) in setup.workloads.iter().enumerate() {
        for (j, router) in routers.iter().enumerate() {
            if interrupt.is_cancelled() {
                interrupted = true;
                break 'seeds;
            }
            let k = i * routers.len() + j;
            match run_router(args, &setup, workload, router, k, broker.url(), &interrupt).await {
                Ok(run) => {
                    interrupted |= run.report.stopped_early && interrupt.is_cancelled();
                    let problem = run.problem.clone();
                    runs.push(run);
                    if let Some(p) = problem {
                        failure = Some(anyhow::anyhow!("router `{}`: {p}", router.name()));
                        break 'seeds;
                    }
                }
                Err(e) if interrupt.is_cancelled() => {
                    eprintln!("{}: interrupted ({e:#})", router.name());
                    interrupted = true;
                    break 'seeds;
                }
                Err(e) => {
                    // The runs so far are still reported below.
                    failure = Some(e.context(format!(
                        "router `{}`, seed {}",
                        router.name(),
                        workload.seed
                    )));
                    break 'seeds;
                }
            }
        }
    }
    broker.stop();
    if runs.iter().any(|r| r.daemon_exit_code != Some(0)) {
        facts
            .notes
            .push("a daemon did not exit with code 0 after SIGTERM (see daemon_exit_code)".into());
    }
    let points: Vec<RunPoint> = runs.iter().map(PolicyRun::point).collect();
    let summary = seeds::summarise(&points);
    if !runs.is_empty() {
        table::print_demo(
            &facts_line(&facts),
            &demo_rows(&runs, seeds.len() > 1),
            &share_table(&facts, &runs),
        );
        if seeds.len() > 1 {
            table::print_demo_seeds(&summary);
        }
        write_outputs(&args.out, &facts, &summary, &runs, interrupted)?;
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
    let seeds: Vec<String> = f.seeds.iter().map(u64::to_string).collect();
    let max_tokens = f
        .workloads
        .first()
        .map_or(String::new(), |w| w.max_tokens.describe());
    let cut: usize = f.workloads.iter().map(|w| w.answers_cut).sum();
    let answers: usize = f.workloads.iter().map(|w| w.requests).sum();
    format!(
        "{} · {} minutes {:.1}-{:.1} · {} requests · load {}x · speed {}x · {} devices · {} · seed {} · {max_tokens}, {cut} of {answers} answers cut · SLO judged by the devices",
        f.catalogue,
        f.trace,
        f.trace_window_minutes[0],
        f.trace_window_minutes[1],
        f.requests,
        f.load,
        f.speed,
        f.devices,
        f.broker,
        seeds.join(","),
    )
}

fn demo_rows(runs: &[PolicyRun], label_seeds: bool) -> Vec<table::DemoRow> {
    runs.iter()
        .map(|r| {
            let s = &r.summary;
            let daemon = r.daemon.as_ref().filter(|_| r.has_fallback);
            table::DemoRow {
                policy: if label_seeds {
                    format!("{} s{}", r.policy, r.seed)
                } else {
                    r.policy.clone()
                },
                requests: s.requests,
                completed: s.completed,
                errors: s.errors,
                lost: s.lost,
                not_sent: s.not_sent,
                duplicated: s.duplicated,
                avg_qos: s.avg_qos,
                slo_violation_rate: s.slo_violation_rate,
                gateway_slo_violation_rate: s.gateway_slo_violation_rate,
                ttft_p50_s: s.ttft_s.p50,
                ttft_p99_s: s.ttft_s.p99,
                per_token_p50_s: s.device_per_token_s.p50,
                per_token_p95_s: s.device_per_token_s.p95,
                requests_per_s: s.requests_per_s,
                fallbacks: daemon.map(|d| d.fallbacks),
                budget_exhausted: daemon
                    .filter(|_| qosroute_core::is_planner(&r.policy))
                    .map(|d| d.planner_budget_exhausted),
                errors_by_code: s.errors_by_code.clone(),
            }
        })
        .collect()
}

/// Each router's share of the completed requests per expert, averaged over its seeds.
fn share_table(facts: &DemoSetup, runs: &[PolicyRun]) -> table::ShareTable {
    table::ShareTable {
        policies: facts.routers.clone(),
        rows: facts
            .experts
            .iter()
            .map(|name| {
                let shares = facts
                    .routers
                    .iter()
                    .map(|policy| mean_share(runs, policy, name))
                    .collect();
                (name.clone(), shares)
            })
            .collect(),
    }
}

/// A router's share of completed requests on `expert`, the mean over its runs.
fn mean_share(runs: &[PolicyRun], policy: &str, expert: &str) -> f64 {
    let shares: Vec<f64> = runs
        .iter()
        .filter(|r| r.policy == policy)
        .map(|r| {
            r.summary
                .experts
                .iter()
                .find(|e| e.name == expert)
                .map_or(0.0, |e| e.share)
        })
        .collect();
    if shares.is_empty() {
        0.0
    } else {
        shares.iter().sum::<f64>() / shares.len() as f64
    }
}

/// Loads the catalogue, quality table and trace, builds each seed's workload with its
/// `max_tokens` bounds, finds the daemon.
fn prepare(args: &DemoArgs, seeds: &[u64]) -> anyhow::Result<Setup> {
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
        .iter()
        .copied()
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
    let mut workloads = Vec::with_capacity(seeds.len());
    for &seed in seeds {
        let workload = qosroute_sim::Workload {
            requests: synthesize(&spec, &parsed, sources, seed)?,
            spec: spec.clone(),
        };
        let max_tokens = MaxTokens::from_training(&rows, &quality, seed)?;
        let mut requests = SwarmRequest::from_workload(&workload);
        for r in &mut requests {
            r.max_tokens = max_tokens.of_wire(r.task);
        }
        workloads.push(SeedWorkload {
            seed,
            answer_tokens: Arc::new(requests.iter().map(|r| r.output_tokens).collect()),
            requests,
            max_tokens,
        });
    }
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
        workloads,
        trace_name,
        daemon_exe,
        scratch: Scratch::new(args.keep_scratch)?,
    })
}

/// The experts of one run: emulated in-process, and the real servers of `--real`.
#[derive(Debug, Clone, Copy)]
struct RunExperts<'a> {
    emulated: &'a [EmulatedExpert],
    real: Option<&'a RealServers>,
}

/// The emulated experts of the catalogue, `speed` times faster than their hardware, each
/// answering a request with its true length from `workload` (found by the request id at the
/// head of its prompt), cut at its `max_tokens`.
async fn start_experts(
    setup: &Setup,
    workload: &SeedWorkload,
    speed: f64,
) -> anyhow::Result<Vec<EmulatedExpert>> {
    let lengths = workload.answer_tokens.clone();
    let answer_tokens: AnswerTokens = Arc::new(move |head: &str| {
        let i = usize::try_from(request_index(head)?).ok()?;
        lengths.get(i).copied()
    });
    let mut experts = Vec::with_capacity(setup.catalogue.experts.len());
    for (i, profile) in setup.catalogue.experts.iter().enumerate() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("cannot listen for an emulated expert")?;
        let profile = Arc::new(profile.clone());
        let mut options = EmulatorOptions::for_profile(&profile);
        options.quality = Some(setup.quality.clone());
        options.time_scale = 1.0 / speed;
        options.seed = workload.seed.wrapping_add(i as u64);
        options.answer_tokens = Some(answer_tokens.clone());
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
    // The daemon acknowledges a request to the broker when it is served, in arrival order,
    // or at the latest `ack_deadline_s` (5 s by default) after it came. Time runs `speed`
    // times faster here, so the deadline is scaled too: unscaled, `speed` times as many
    // requests wait for their acknowledgement, and rumqttd delivers no more than 100
    // unacknowledged ones (its MAX_INFLIGHT): the rest wait in the broker, a delay the
    // devices see and the gateway's clock does not.
    broker_and_policy(
        &mut c,
        broker_url,
        client_id,
        Some(DAEMON_ACK_DEADLINE_S / speed),
        router,
    );
    let slo = wall_clock_slo(&setup.catalogue.slo, speed);
    let _ = writeln!(
        c,
        "\n[slo]\ndefault_s_per_token = {:e}\n[slo.per_task]",
        slo.default_s_per_token
    );
    for (task, s) in &slo.per_task {
        let _ = writeln!(c, "{} = {:e}", task.as_str(), s);
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
        .flat_map(|r| r.servers.iter().map(move |s| (r.kind, s)))
        .map(|(kind, (profile, server))| {
            (
                profile,
                server.base_url(),
                qosroute_real_engine::SERVED_MODEL.to_owned(),
                format!(
                    "kind = {}\nhealth_timeout_s = {:?}\nhardware = {}",
                    toml_str(kind),
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

async fn run_router(
    args: &DemoArgs,
    setup: &Setup,
    workload: &SeedWorkload,
    router: &Router,
    k: usize,
    broker_url: &str,
    interrupt: &CancellationToken,
) -> anyhow::Result<PolicyRun> {
    let started = Instant::now();
    let experts = start_experts(setup, workload, args.speed()).await?;
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
    let run = Run {
        workload,
        router,
        k,
        broker_url,
    };
    let result = run_with_experts(args, setup, run, interrupt, site).await;
    stop_experts(experts).await;
    drop(real);
    let (summary_run, exit) = result?;
    Ok(PolicyRun {
        wall_s: started.elapsed().as_secs_f64(),
        daemon_exit_code: exit,
        ..summary_run
    })
}

/// What one run is: a router on a seed's workload, the `k`-th run of the demo.
#[derive(Clone, Copy)]
struct Run<'a> {
    workload: &'a SeedWorkload,
    router: &'a Router,
    k: usize,
    broker_url: &'a str,
}

async fn run_with_experts(
    args: &DemoArgs,
    setup: &Setup,
    run: Run<'_>,
    interrupt: &CancellationToken,
    experts: RunExperts<'_>,
) -> anyhow::Result<(PolicyRun, Option<i32>)> {
    let Run {
        router,
        k,
        broker_url,
        ..
    } = run;
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
    let outcome = drive(args, setup, run, &mut daemon, interrupt).await;
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
    run: Run<'_>,
    daemon: &mut DaemonProcess,
    interrupt: &CancellationToken,
) -> anyhow::Result<PolicyRun> {
    let Run {
        workload,
        router,
        broker_url,
        ..
    } = run;
    let site = setup.site_experts();
    let names: Vec<String> = site.iter().map(|(n, _)| n.clone()).collect();
    daemon
        .wait_ready(&names, Duration::from_secs(20), interrupt)
        .await?;
    let mut config = SwarmConfig::new(broker_url, SITE);
    config.devices = args.devices;
    config.speed = args.speed();
    // Every prompt starts with its request's id: the emulated experts find the answer's
    // true length by it, and real servers, which cache prompts, find no prefix shared with an
    // earlier prompt (devices' prompts share none).
    config.unique_prompts = true;
    // Each device judges its SLO itself, by the simulator's rule, from its publish to its
    // last token, against the SLOs the daemon routes by.
    config.device_slo = Some(wall_clock_slo(&setup.catalogue.slo, args.speed()));
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
    let swarm = Swarm::start(config, &workload.requests, Some(truth)).await?;
    let label = if setup.workloads.len() > 1 {
        format!("{} s{}", router.name(), workload.seed)
    } else {
        router.name().to_owned()
    };
    let mut view = LiveView::new(&label, names.clone());
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
        seed: workload.seed,
        router: router.describe(),
        has_fallback: !matches!(router, Router::Baseline(_)),
        wall_s: 0.0,
        timeline: report.timeline(bucket),
        summary,
        daemon: metrics,
        daemon_exit_code: None,
        problem,
        report,
    })
}

/// demo.json and the SVG plots (QoS over time and the latency CDF of the first seed's runs;
/// each router's expert shares averaged over its seeds).
fn write_outputs(
    out: &Path,
    facts: &DemoSetup,
    summary: &[RouterSummary],
    runs: &[PolicyRun],
    interrupted: bool,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let json = serde_json::to_string(&DemoOutput {
        demo: facts,
        interrupted,
        summary,
        runs,
    })?;
    crate::write_output(&out.join("demo.json"), json + "\n")?;
    let first_seed = runs.first().map(|r| r.seed);
    let runs_of_first = || runs.iter().filter(move |r| Some(r.seed) == first_seed);
    let qos: Vec<SweepCurve> = runs_of_first()
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
    let cdf: Vec<SweepCurve> = runs_of_first()
        .map(|r| SweepCurve {
            policy: r.policy.clone(),
            points: latency_cdf(&r.report),
        })
        .collect();
    let path = out.join("latency.svg");
    sweep_curves(
        &path,
        "Per-token latency of completed requests (device-measured), CDF",
        "ms per output token (wall clock)",
        "fraction of completed requests",
        &cdf,
    )?;
    eprintln!("wrote {}", path.display());
    let series: Vec<BarSeries> = facts
        .routers
        .iter()
        .map(|policy| BarSeries {
            name: policy.clone(),
            values: facts
                .experts
                .iter()
                .map(|e| mean_share(runs, policy, e))
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

/// (ms per token, fraction at or below) at 40 quantiles of the completed requests, per-token
/// latency as the devices measured it.
fn latency_cdf(report: &SwarmReport) -> Vec<(f64, f64, f64)> {
    let mut v: Vec<f64> = report
        .records
        .iter()
        .filter_map(|r| r.device_s_per_token().map(|s| s * 1e3))
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

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        demo: DemoArgs,
    }

    fn parse(argv: &[&str]) -> Result<DemoArgs, clap::Error> {
        use clap::Parser as _;
        Cli::try_parse_from(std::iter::once("demo").chain(argv.iter().copied())).map(|c| c.demo)
    }

    fn args(argv: &[&str]) -> DemoArgs {
        parse(argv).unwrap()
    }

    #[test]
    fn the_default_compares_four_routers_on_held_out_minutes() {
        let a = args(&[]);
        assert_eq!(a.router_names(), DEFAULT_ROUTERS);
        assert_eq!(
            (a.offset_minutes, a.load, a.seeds()),
            (40.0, DEFAULT_LOAD, vec![1])
        );
        let a = args(&["--policy", "least-loaded"]);
        assert_eq!(a.router_names(), ["least-loaded"]);
        let a = args(&["--compare", "han,qos-planner:k=8,h=10,least-loaded"]);
        assert_eq!(
            a.router_names(),
            ["han", "qos-planner:k=8,h=10", "least-loaded"]
        );
        let a = args(&["--seeds", "3,1,3,2"]);
        assert_eq!(a.seeds(), [3, 1, 2]);
        let a = args(&["--seed", "7"]);
        assert_eq!(a.seeds(), [7]);
        assert!(parse(&["--seed", "1", "--seeds", "1,2"]).is_err());
        assert!(parse(&["--policy", "han", "--compare", "han"]).is_err());
    }

    #[test]
    fn the_devices_and_the_daemon_get_the_same_wall_clock_slos() {
        let slo = SloTable {
            default_s_per_token: 0.1,
            per_task: [(Task::Mmlu, 0.05)].into_iter().collect(),
        };
        let wall = wall_clock_slo(&slo, 10.0);
        assert!((wall.slo_s_per_token(Task::Mmlu) - 0.005).abs() < 1e-15);
        assert!((wall.slo_s_per_token(Task::Chat) - 0.01).abs() < 1e-15);
    }

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
}
