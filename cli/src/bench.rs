//! `qosroute bench e2e`: what the gateway costs, measured in one run on this machine.
//!
//! A mosquitto broker, `--experts` zero-latency OpenAI-compatible stub experts served by this
//! process (axum on 127.0.0.1), and the real `qosrouted` next to this executable. Four phases:
//!
//! 1. the bare broker round trip: one client publishes QoS 1 to a topic it subscribes to,
//!    sequentially; publish → receive;
//! 2. the daemon's added latency, unloaded: sequential non-streamed requests (`max_tokens` 2);
//!    (a) device publish → the request arriving at the stub expert, (b) the stub's first byte →
//!    the device receiving the first reply (the answer's one chunk, `done`), and → the final
//!    reply. Every instant is this process's monotonic clock;
//! 3. routed requests per second at saturation: closed loop, `--devices` MQTT devices each
//!    keeping `--window` requests outstanding, counted over `--seconds` after `--warmup`;
//!    every error reply is counted by code;
//! 4. the daemon's memory: VmRSS idle after start, VmHWM after the run (`/proc/PID/status`).
//!
//! Nothing is printed that was not measured: a statistic over no samples is `n/a`.

#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Router as AxumRouter;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header::CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::{Args, Subcommand};
use qosroute_proto::{self as proto, Encoding, Reply, Task};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::demo::{
    DaemonProcess, Router, Scratch, check_config, free_port, parse_router, scrape, spawn_daemon,
    toml_str, watch_signals,
};

/// The site of the bench's topics.
const SITE: &str = "bench";
/// Targets of issue 6.
const TARGET_RPS: f64 = 10_000.0;
const TARGET_ADDED_P99_US: f64 = 500.0;
/// Slots of the stub with the worst answers (the one with the best answers has 1/32 of them).
const STUB_SLOTS_MOST: u32 = 256;
/// Decode step the daemon is told the stub with the best answers takes (the worst: 1/6 of
/// it), seconds.
const STUB_STEP_S_SLOWEST: f64 = 0.006;
const TARGET_RSS_KIB: u64 = 32 * 1024;
/// Admission limits per device, set so that they never cap the bench.
const DEVICE_RATE_PER_S: f64 = 1.0e9;
const DEVICE_BURST: f64 = 1.0e9;
/// Tokens asked for (and answered by the stubs) in every bench request.
const MAX_TOKENS: u32 = 2;
/// Unmeasured round trips before each latency phase.
const WARMUP_ROUND_TRIPS: usize = 50;
/// How long one sequential round trip may take before the bench gives up on it.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// The whole path on this machine: broker round trip, the daemon's added latency with
    /// zero-latency experts, routed requests per second at saturation, the daemon's RSS.
    E2e(E2eArgs),
}

#[derive(Debug, Args)]
pub struct E2eArgs {
    /// The gateway's router: `han` (the shipped learned router), `han:DIR`, or a baseline the
    /// daemon runs as its fallback policy (e.g. qos-greedy, least-loaded).
    #[arg(long, default_value = "han")]
    policy: String,
    /// Zero-latency stub experts served by this process.
    #[arg(long, default_value_t = 6)]
    experts: usize,
    /// Seconds of the throughput phase that are counted (after --warmup).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Seconds of the throughput phase before counting starts.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// Sequential QoS 1 round trips through the bare broker.
    #[arg(long, default_value_t = 2000)]
    broker_messages: usize,
    /// Sequential requests through the daemon for the added latency.
    #[arg(long, default_value_t = 1000)]
    latency_requests: usize,
    /// MQTT devices (connections) of the throughput phase.
    #[arg(long, default_value_t = 8)]
    devices: usize,
    /// Requests each device keeps outstanding in the throughput phase.
    #[arg(long, default_value_t = 48)]
    window: usize,
    /// The daemon's `admission.max_in_flight` (default: the shipped default, 512).
    #[arg(long, default_value_t = 512)]
    max_in_flight: usize,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `qosrouted` binary (default: next to this executable).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// Folder of the shipped learned router, for `han`.
    #[arg(long, default_value = "policy-model/models/han")]
    model_dir: PathBuf,
    /// Keep the scratch folder (config, logs) and print where it is.
    #[arg(long)]
    keep_scratch: bool,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.command {
        BenchCommand::E2e(a) => run_e2e(a),
    }
}

fn run_e2e(args: &E2eArgs) -> anyhow::Result<()> {
    check_args(args)?;
    let router = parse_router(args.policy.trim(), &args.model_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let report = runtime.block_on(e2e(args, &router))?;
    print_report(&report);
    if let Some(path) = &args.json {
        crate::write_output(path, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    if let Some(problem) = &report.problem {
        bail!("{problem}");
    }
    Ok(())
}

fn check_args(args: &E2eArgs) -> anyhow::Result<()> {
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        bail!("--seconds must be positive");
    }
    if !(args.warmup.is_finite() && args.warmup >= 0.0) {
        bail!("--warmup must be 0 or more");
    }
    for (name, v) in [
        ("experts", args.experts),
        ("broker-messages", args.broker_messages),
        ("latency-requests", args.latency_requests),
        ("devices", args.devices),
        ("window", args.window),
        ("max-in-flight", args.max_in_flight),
    ] {
        if v == 0 {
            bail!("--{name} must be at least 1");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The report.

/// Percentiles of a set of durations, microseconds; `None` without samples.
#[derive(Debug, Clone, Serialize)]
struct Stats {
    count: usize,
    p50_us: Option<f64>,
    p99_us: Option<f64>,
    mean_us: Option<f64>,
    max_us: Option<f64>,
}

impl Stats {
    fn of(samples: &[Duration]) -> Self {
        let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let rank = |q: f64| -> Option<f64> {
            if n == 0 {
                return None;
            }
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            v.get(i).copied()
        };
        Self {
            count: n,
            p50_us: rank(0.50),
            p99_us: rank(0.99),
            mean_us: (n > 0).then(|| v.iter().sum::<f64>() / n as f64),
            max_us: v.last().copied(),
        }
    }
}

#[derive(Debug, Serialize)]
struct Settings {
    experts: usize,
    expert_kind: &'static str,
    broker: String,
    broker_messages: usize,
    latency_requests: usize,
    latency_request: &'static str,
    devices: usize,
    window: usize,
    warmup_s: f64,
    seconds: f64,
    max_in_flight: usize,
    device_rate_per_s: f64,
    device_burst: f64,
    max_tokens: u32,
    encoding: &'static str,
    cpus: usize,
}

#[derive(Debug, Serialize)]
struct AddedLatency {
    /// Requests measured (after the warm-up).
    requests: usize,
    /// Measured requests that ended in an error reply or no reply, by code (`lost`: none).
    errors: BTreeMap<String, u64>,
    /// (a) device publish → request at the expert.
    publish_to_expert: Stats,
    /// (b) expert's first byte → the device receives the first reply (the one chunk).
    expert_to_first_reply: Stats,
    /// expert's first byte → the device receives the final reply.
    expert_to_final: Stats,
    /// (a) + (b) per request: the path through the gateway both ways, broker hops included.
    added: Stats,
    /// Device publish → final reply.
    publish_to_final: Stats,
}

#[derive(Debug, Serialize)]
struct Cpu {
    /// CPU time over the counted window divided by its length (1.0 = one core busy).
    daemon_cores: Option<f64>,
    mosquitto_cores: Option<f64>,
    bench_cores: Option<f64>,
    /// All CPUs of the machine, from /proc/stat (same units).
    machine_busy_cores: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Throughput {
    devices: usize,
    window: usize,
    warmup_s: f64,
    /// Length of the counted window, seconds (measured).
    counted_s: f64,
    /// Final replies received in the counted window.
    completed: u64,
    requests_per_s: f64,
    /// Error replies received in the counted window, by code.
    errors: BTreeMap<String, u64>,
    error_replies_per_s: f64,
    /// Over the whole phase (warm-up and drain included).
    published_total: u64,
    completed_total: u64,
    errors_total: BTreeMap<String, u64>,
    /// Requests with no final or error reply within the drain after the phase.
    unanswered: u64,
    /// Device publish → final reply, completed requests in the counted window.
    publish_to_final: Stats,
    cpu: Cpu,
    /// Requests each stub expert served in the whole run.
    served_by_expert: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct Memory {
    idle_vmrss_kib: Option<u64>,
    after_vmrss_kib: Option<u64>,
    vmhwm_kib: Option<u64>,
}

#[derive(Debug, Serialize)]
struct DaemonView {
    requests_by_outcome: BTreeMap<String, f64>,
    decisions: f64,
    policy_fallbacks: f64,
}

#[derive(Debug, Serialize)]
struct Target {
    what: &'static str,
    target: String,
    measured: Option<f64>,
    unit: &'static str,
    met: Option<bool>,
}

#[derive(Debug, Serialize)]
struct E2eReport {
    bench: &'static str,
    policy: String,
    router: String,
    settings: Settings,
    broker_round_trip: Stats,
    broker_round_trip_errors: u64,
    added_latency: AddedLatency,
    throughput: Throughput,
    memory: Memory,
    daemon: Option<DaemonView>,
    daemon_exit_code: Option<i32>,
    connection_errors: u64,
    targets: Vec<Target>,
    problem: Option<String>,
}

mod stubs;
use stubs::*;

pub(crate) mod devices;
use devices::*;

// ---------------------------------------------------------------------------------------------
// /proc.

fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime of a process, seconds.
fn proc_cpu_s(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start at field 3.
    let rest = text.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_s()?)
}

/// Busy CPU seconds of the whole machine (all CPUs), from /proc/stat.
fn machine_busy_s() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy: u64 = v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4)?;
    Some(busy as f64 / ticks_per_s()?)
}

fn ticks_per_s() -> Option<f64> {
    #[cfg(unix)]
    {
        let t = rustix::param::clock_ticks_per_second();
        (t > 0).then_some(t as f64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Instant,
    daemon: Option<f64>,
    mosquitto: Option<f64>,
    bench: Option<f64>,
    machine: Option<f64>,
}

fn cpu_sample(daemon: Option<u32>, mosquitto: Option<u32>) -> CpuSample {
    CpuSample {
        at: Instant::now(),
        daemon: daemon.and_then(proc_cpu_s),
        mosquitto: mosquitto.and_then(proc_cpu_s),
        bench: proc_cpu_s(std::process::id()),
        machine: machine_busy_s(),
    }
}

fn cpu_between(a: CpuSample, b: CpuSample) -> Cpu {
    let span = b.at.saturating_duration_since(a.at).as_secs_f64();
    let rate = |x: Option<f64>, y: Option<f64>| match (x, y) {
        (Some(x), Some(y)) if span > 0.0 => Some((y - x) / span),
        _ => None,
    };
    Cpu {
        daemon_cores: rate(a.daemon, b.daemon),
        mosquitto_cores: rate(a.mosquitto, b.mosquitto),
        bench_cores: rate(a.bench, b.bench),
        machine_busy_cores: rate(a.machine, b.machine),
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

async fn e2e(args: &E2eArgs, router: &Router) -> anyhow::Result<E2eReport> {
    let interrupt = CancellationToken::new();
    watch_signals(interrupt.clone())?;
    let daemon_exe = crate::demo::find_daemon(args.daemon.as_ref())?;
    let scratch = Scratch::new(args.keep_scratch)?;
    // The broker, as `qosroute demo` runs it.
    let broker_port = free_port()?;
    let broker_url = format!("mqtt://127.0.0.1:{broker_port}");
    let mosquitto = crate::demo::start_mosquitto(
        broker_port,
        &scratch.0,
        "the bench needs mosquitto (e.g. `apt-get install mosquitto`)",
    )
    .await?;
    let mosquitto_pid = mosquitto.child.as_ref().map(std::process::Child::id);

    // The stub experts.
    let stop_stubs = CancellationToken::new();
    let times = Arc::new(StubTimes::default());
    let mut stubs = Vec::with_capacity(args.experts);
    for i in 0..args.experts {
        stubs.push(start_stub(format!("stub-{i}"), times.clone(), stop_stubs.clone()).await?);
    }

    // The daemon.
    let metrics_port = free_port()?;
    let config = daemon_config(args, router, &stubs, &broker_url, metrics_port);
    let config_path = scratch.0.join("qosrouted-bench.toml");
    std::fs::write(&config_path, &config)?;
    check_config(&daemon_exe, &config_path)?;
    let log = scratch.0.join("qosrouted-bench.log");
    let child = spawn_daemon(&daemon_exe, &config_path, &log, "QOSROUTE_BENCH_DAEMON_LOG")?;
    let daemon_pid = child.child.as_ref().map(std::process::Child::id);
    let mut daemon = DaemonProcess {
        child,
        log,
        metrics_port,
    };
    let result = measure(
        args,
        router,
        &broker_url,
        &mut daemon,
        daemon_pid,
        mosquitto_pid,
        &stubs,
        &times,
        &interrupt,
    )
    .await;
    let tail = daemon.log_tail(20);
    let exit = daemon.child.stop().await;
    stop_stubs.cancel();
    for s in stubs {
        let _ = tokio::time::timeout(Duration::from_secs(2), s.task).await;
    }
    drop(mosquitto);
    match result {
        Ok(mut report) => {
            report.daemon_exit_code = exit;
            if report.problem.is_some() && !tail.trim().is_empty() {
                report.problem = report
                    .problem
                    .map(|p| format!("{p}; the daemon's log ends with:\n{tail}"));
            }
            Ok(report)
        }
        Err(e) if tail.trim().is_empty() => Err(e),
        Err(e) => Err(e.context(format!("the daemon's log ends with:\n{tail}"))),
    }
}

/// The daemon's configuration: the stubs as vLLM experts with a fast latency model, admission
/// limits that leave the devices' rate uncapped.
fn daemon_config(
    args: &E2eArgs,
    router: &Router,
    stubs: &[StubServer],
    broker_url: &str,
    metrics_port: u16,
) -> String {
    use std::fmt::Write as _;
    const QUALITY_MODELS: [&str; 6] = [
        "gemma2_9b",
        "codegemma7b",
        "qwen25_7b",
        "llama31_8b",
        "mistral7b",
        "llama31_8b",
    ];
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Generated by `qosroute bench e2e` ({}).",
        router.describe()
    );
    let _ = writeln!(c, "site = {}", toml_str(SITE));
    crate::demo::broker_and_policy(
        &mut c,
        broker_url,
        &format!("qosrouted-bench-{}", std::process::id()),
        None,
        router,
    );
    let _ = writeln!(
        c,
        "\n[slo]\ndefault_s_per_token = 0.1\n\n[admission]\nmax_in_flight = {}\ndevice_rate_per_s = {DEVICE_RATE_PER_S:e}\ndevice_burst = {DEVICE_BURST:e}",
        args.max_in_flight
    );
    let _ = writeln!(
        c,
        "\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[shutdown]\ndrain_deadline_s = 2.0"
    );
    // The stubs answer at once, but the daemon is told they differ as a real site's experts
    // do: the better the answers, the fewer the slots and the slower the steps, so that under
    // load the router spreads requests instead of sending all of them to the best expert.
    for (i, s) in stubs.iter().enumerate() {
        let rank = (i % 6) as u32;
        let _ = writeln!(
            c,
            "\n[[expert]]\nname = {}\nbase_url = {}\nmodel = {}\nkind = \"vllm\"\nquality_model = {}\nmax_slots = {}\nkv_tokens = 1000000\nhardware = \"zero-latency stub in qosroute bench\"\n[expert.latency]\nprefill_tok_s = 1e5\ndecode_t0_s = {:e}\ndecode_d_s_per_seq = 1e-4\ndecode_e_s_per_ctx_token = 1e-9\n[expert.quality]\ndefault = {:.2}",
            toml_str(&s.stub.name),
            toml_str(&s.base_url),
            toml_str(&s.stub.model),
            toml_str(QUALITY_MODELS[i % QUALITY_MODELS.len()]),
            STUB_SLOTS_MOST >> (5 - rank),
            STUB_STEP_S_SLOWEST * f64::from(6 - rank) / 6.0,
            0.75 - 0.05 * f64::from(rank),
        );
    }
    c
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    args: &E2eArgs,
    router: &Router,
    broker_url: &str,
    daemon: &mut DaemonProcess,
    daemon_pid: Option<u32>,
    mosquitto_pid: Option<u32>,
    stubs: &[StubServer],
    times: &StubTimes,
    interrupt: &CancellationToken,
) -> anyhow::Result<E2eReport> {
    let names: Vec<String> = stubs.iter().map(|s| s.stub.name.clone()).collect();
    daemon
        .wait_ready(&names, Duration::from_secs(20), interrupt)
        .await?;
    // Idle: started, every expert up, no request yet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_vmrss_kib = daemon_pid.and_then(|p| proc_status_kib(p, "VmRSS"));
    let broker = broker_host_port(broker_url)?;
    let connection_errors = Arc::new(AtomicU64::new(0));
    let pid = std::process::id();

    // 1. The bare broker round trip.
    eprintln!(
        "bench: broker round trip ({} QoS 1 messages)",
        args.broker_messages
    );
    let topic = format!("qosroute-bench/{pid}/rtt");
    let mut dev = connect_device(
        &broker,
        &format!("qosroute-bench-rtt-{pid}"),
        &topic,
        connection_errors.clone(),
    )
    .await?;
    let mut rtt = Vec::with_capacity(args.broker_messages);
    let mut rtt_errors = 0u64;
    for i in 0..WARMUP_ROUND_TRIPS + args.broker_messages {
        if interrupt.is_cancelled() {
            bail!("interrupted");
        }
        let payload = format!("rtt {i} ................................................");
        let t0 = Instant::now();
        dev.publish(&topic, payload.clone().into_bytes()).await?;
        let mut got = None;
        while let Some((at, p)) = dev.recv(ROUND_TRIP_TIMEOUT).await {
            if p.as_ref() == payload.as_bytes() {
                got = Some(at);
                break;
            }
        }
        match got {
            Some(at) if i >= WARMUP_ROUND_TRIPS => rtt.push(at.saturating_duration_since(t0)),
            Some(_) => {}
            None => rtt_errors += 1,
        }
    }
    dev.close().await;

    // 2. The daemon's added latency, unloaded.
    eprintln!(
        "bench: added latency ({} sequential requests)",
        args.latency_requests
    );
    let req_topic = format!("qosroute/v1/{SITE}/req/lat/pc");
    let mut dev = connect_device(
        &broker,
        &format!("qosroute-bench-lat-{pid}"),
        &format!("qosroute/v1/{SITE}/resp/lat"),
        connection_errors.clone(),
    )
    .await?;
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut b_final = Vec::new();
    let mut added = Vec::new();
    let mut total = Vec::new();
    let mut lat_errors: BTreeMap<String, u64> = BTreeMap::new();
    for i in 0..WARMUP_ROUND_TRIPS + args.latency_requests {
        if interrupt.is_cancelled() {
            bail!("interrupted");
        }
        let id = format!("l{i}");
        let payload = encode(&id, false)?;
        let t0 = Instant::now();
        dev.publish(&req_topic, payload).await?;
        let mut first_reply = None;
        let mut end: Result<Instant, String> = Err("lost".into());
        while let Some((at, p)) = dev.recv(ROUND_TRIP_TIMEOUT).await {
            match proto::decode_reply(&p, Encoding::Postcard) {
                Ok(Reply::Chunk(c)) if c.id.as_str() == id => {
                    first_reply.get_or_insert(at);
                }
                Ok(Reply::Final(f)) if f.id.as_str() == id => {
                    first_reply.get_or_insert(at);
                    end = Ok(at);
                    break;
                }
                Ok(Reply::Error(e)) if e.id.as_str() == id || e.id.is_empty() => {
                    end = Err(e.code.as_str().to_owned());
                    break;
                }
                _ => {}
            }
        }
        let stub = times.take(&id);
        if i < WARMUP_ROUND_TRIPS {
            continue;
        }
        match (end, stub, first_reply) {
            (Ok(fin), Some((arrived, Some(first_byte))), Some(first)) => {
                let ai = arrived.saturating_duration_since(t0);
                let bi = first.saturating_duration_since(first_byte);
                a.push(ai);
                b.push(bi);
                b_final.push(fin.saturating_duration_since(first_byte));
                added.push(ai + bi);
                total.push(fin.saturating_duration_since(t0));
            }
            (Ok(_), _, _) => *lat_errors.entry("no_stub_record".into()).or_default() += 1,
            (Err(code), _, _) => *lat_errors.entry(code).or_default() += 1,
        }
    }
    dev.close().await;

    // 3. Throughput at saturation.
    eprintln!(
        "bench: throughput ({} devices x {} outstanding, {} s warm-up + {} s counted)",
        args.devices, args.window, args.warmup, args.seconds
    );
    let mut devices = Vec::with_capacity(args.devices);
    for k in 0..args.devices {
        devices.push(
            connect_device(
                &broker,
                &format!("qosroute-bench-d{k}-{pid}"),
                &format!("qosroute/v1/{SITE}/resp/d{k}"),
                connection_errors.clone(),
            )
            .await?,
        );
    }
    let start = Instant::now();
    let count_from = start + Duration::from_secs_f64(args.warmup);
    let count_to = count_from + Duration::from_secs_f64(args.seconds);
    let sampler = tokio::spawn(async move {
        tokio::time::sleep_until(count_from.into()).await;
        let a = cpu_sample(daemon_pid, mosquitto_pid);
        tokio::time::sleep_until(count_to.into()).await;
        let b = cpu_sample(daemon_pid, mosquitto_pid);
        cpu_between(a, b)
    });
    let mut loops = tokio::task::JoinSet::new();
    for (k, dev) in devices.into_iter().enumerate() {
        let window = args.window;
        let interrupt = interrupt.clone();
        loops.spawn(closed_loop(k, dev, window, count_from, count_to, interrupt));
    }
    let mut tally = Tally::default();
    while let Some(t) = loops.join_next().await {
        let t = t.context("a device task failed")??;
        tally.merge(t);
    }
    let cpu = sampler.await.unwrap_or(Cpu {
        daemon_cores: None,
        mosquitto_cores: None,
        bench_cores: None,
        machine_busy_cores: None,
    });
    if interrupt.is_cancelled() {
        bail!("interrupted");
    }

    // 4. Memory, and what the daemon says.
    let after_vmrss_kib = daemon_pid.and_then(|p| proc_status_kib(p, "VmRSS"));
    let vmhwm_kib = daemon_pid.and_then(|p| proc_status_kib(p, "VmHWM"));
    let metrics = scrape(daemon.metrics_port).await;
    let problem = daemon
        .child
        .exited()
        .map(|s| format!("qosrouted exited during the bench ({s})"));

    let counted_s = args.seconds;
    let requests_per_s = tally.completed as f64 / counted_s;
    let error_count: u64 = tally.errors.values().sum();
    let added_stats = Stats::of(&added);
    let targets = vec![
        Target {
            what: "routed requests/s at saturation",
            target: format!(">= {TARGET_RPS}"),
            measured: Some(requests_per_s),
            unit: "req/s",
            met: Some(requests_per_s >= TARGET_RPS),
        },
        Target {
            what: "added latency p99, (a)+(b) per request (both broker hops included)",
            target: format!("<= {TARGET_ADDED_P99_US}"),
            measured: added_stats.p99_us,
            unit: "us",
            met: added_stats.p99_us.map(|v| v <= TARGET_ADDED_P99_US),
        },
        Target {
            what: "daemon RSS, VmHWM after the run",
            target: format!("<= {TARGET_RSS_KIB}"),
            measured: vmhwm_kib.map(|v| v as f64),
            unit: "KiB",
            met: vmhwm_kib.map(|v| v <= TARGET_RSS_KIB),
        },
    ];
    Ok(E2eReport {
        bench: "e2e",
        policy: router.name().to_owned(),
        router: router.describe(),
        settings: Settings {
            experts: args.experts,
            expert_kind: "vllm (stub: /metrics running = its current count, waiting 0)",
            broker: format!("mosquitto at {broker_url}"),
            broker_messages: args.broker_messages,
            latency_requests: args.latency_requests,
            latency_request: "non-streamed (stream=false), max_tokens 2; the gateway sends one chunk (done) then the final reply",
            devices: args.devices,
            window: args.window,
            warmup_s: args.warmup,
            seconds: args.seconds,
            max_in_flight: args.max_in_flight,
            device_rate_per_s: DEVICE_RATE_PER_S,
            device_burst: DEVICE_BURST,
            max_tokens: MAX_TOKENS,
            encoding: "postcard",
            cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        },
        broker_round_trip: Stats::of(&rtt),
        broker_round_trip_errors: rtt_errors,
        added_latency: AddedLatency {
            requests: args.latency_requests,
            errors: lat_errors,
            publish_to_expert: Stats::of(&a),
            expert_to_first_reply: Stats::of(&b),
            expert_to_final: Stats::of(&b_final),
            added: added_stats,
            publish_to_final: Stats::of(&total),
        },
        throughput: Throughput {
            devices: args.devices,
            window: args.window,
            warmup_s: args.warmup,
            counted_s,
            completed: tally.completed,
            requests_per_s,
            errors: tally.errors,
            error_replies_per_s: error_count as f64 / counted_s,
            published_total: tally.published,
            completed_total: tally.completed_total,
            errors_total: tally.errors_total,
            unanswered: tally.unanswered,
            publish_to_final: Stats::of(&tally.latencies),
            cpu,
            served_by_expert: stubs
                .iter()
                .map(|s| (s.stub.name.clone(), s.stub.served.load(Ordering::Relaxed)))
                .collect(),
        },
        memory: Memory {
            idle_vmrss_kib,
            after_vmrss_kib,
            vmhwm_kib,
        },
        daemon: metrics.map(|m| DaemonView {
            requests_by_outcome: m.requests_by_outcome,
            decisions: m.decisions,
            policy_fallbacks: m.fallbacks,
        }),
        daemon_exit_code: None,
        connection_errors: connection_errors.load(Ordering::Relaxed),
        targets,
        problem,
    })
}

/// What one device of the throughput phase saw.
#[derive(Debug, Default)]
struct Tally {
    published: u64,
    completed: u64,
    completed_total: u64,
    errors: BTreeMap<String, u64>,
    errors_total: BTreeMap<String, u64>,
    unanswered: u64,
    latencies: Vec<Duration>,
}

impl Tally {
    fn merge(&mut self, o: Tally) {
        self.published += o.published;
        self.completed += o.completed;
        self.completed_total += o.completed_total;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in o.errors_total {
            *self.errors_total.entry(k).or_default() += v;
        }
        self.unanswered += o.unanswered;
        self.latencies.extend(o.latencies);
    }
}

/// One device keeping `window` requests outstanding until `count_to`, then draining.
async fn closed_loop(
    k: usize,
    mut dev: Device,
    window: usize,
    count_from: Instant,
    count_to: Instant,
    interrupt: CancellationToken,
) -> anyhow::Result<Tally> {
    let topic = format!("qosroute/v1/{SITE}/req/d{k}/pc");
    let mut outstanding: HashMap<String, Instant> = HashMap::with_capacity(window * 2);
    let mut tally = Tally::default();
    let mut seq = 0u64;
    let drain_until = count_to + Duration::from_secs(5);
    let counted = |at: Instant| at >= count_from && at < count_to;
    loop {
        let now = Instant::now();
        if now < count_to && !interrupt.is_cancelled() {
            while outstanding.len() < window {
                let id = format!("t{k}-{seq}");
                seq += 1;
                let payload = encode(&id, false)?;
                outstanding.insert(id, Instant::now());
                dev.publish(&topic, payload).await?;
                tally.published += 1;
            }
        } else if outstanding.is_empty() || now >= drain_until || interrupt.is_cancelled() {
            break;
        }
        let wait = if now < count_to {
            count_to.saturating_duration_since(now)
        } else {
            drain_until.saturating_duration_since(now)
        }
        .max(Duration::from_millis(1));
        let Some((at, p)) = dev.recv(wait).await else {
            continue;
        };
        match proto::decode_reply(&p, Encoding::Postcard) {
            Ok(Reply::Final(f)) => {
                if let Some(t0) = outstanding.remove(f.id.as_str()) {
                    tally.completed_total += 1;
                    if counted(at) {
                        tally.completed += 1;
                        tally.latencies.push(at.saturating_duration_since(t0));
                    }
                }
            }
            Ok(Reply::Error(e))
                if outstanding.remove(e.id.as_str()).is_some() || e.id.is_empty() =>
            {
                let code = e.code.as_str().to_owned();
                if counted(at) {
                    *tally.errors.entry(code.clone()).or_default() += 1;
                }
                *tally.errors_total.entry(code).or_default() += 1;
            }
            _ => {}
        }
    }
    tally.unanswered = outstanding.len() as u64;
    dev.close().await;
    Ok(tally)
}

mod table;
use table::*;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stats_use_nearest_rank_and_say_nothing_without_samples() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = Stats::of(&v);
        assert_eq!(s.p50_us, Some(50.0));
        assert_eq!(s.p99_us, Some(99.0));
        assert_eq!(s.max_us, Some(100.0));
        let e = Stats::of(&[]);
        assert!(e.p50_us.is_none() && e.p99_us.is_none() && e.count == 0);
    }

    #[test]
    fn the_stub_answers_as_vllm_streams_and_the_marker_is_found() {
        let body = json!({"messages": [{"role": "user", "content": "bench l7"}], "stream": true});
        assert_eq!(marker(&body).as_deref(), Some("l7"));
        let sse = answer("m", "l7", true, 3, 2);
        let events: Vec<&str> = sse
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap())
            .collect();
        assert_eq!(events.len(), 5);
        assert_eq!(events[4], "[DONE]");
        let last: Value = serde_json::from_str(events[2]).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        let usage: Value = serde_json::from_str(events[3]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], 2);
        let plain: Value = serde_json::from_str(&answer("m", "x", false, 3, 2)).unwrap();
        assert_eq!(plain["choices"][0]["message"]["content"], "ok ok");
    }

    #[test]
    fn proc_status_is_read() {
        assert!(proc_status_kib(std::process::id(), "VmRSS").is_some_and(|v| v > 0));
        assert!(proc_cpu_s(std::process::id()).is_some());
    }
}
