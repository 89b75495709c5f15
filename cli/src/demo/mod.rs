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

mod live;
mod process;

use std::path::{Path, PathBuf};
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
    QualityTruth, Swarm, SwarmConfig, SwarmReport, SwarmRequest, SwarmSummary, TimelinePoint,
    probe_gateway,
};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::live::LiveView;
use self::process::start_broker;
pub(crate) use self::process::{
    ChildGuard, DaemonMetrics, DaemonProcess, Scratch, broker_and_policy, check_config,
    find_daemon, free_port, scrape, spawn_daemon, start_mosquitto, toml_str, wait_for_port,
    watch_signals,
};
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
}
