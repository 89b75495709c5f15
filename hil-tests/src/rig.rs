//! The pieces scenarios are built from: killable emulated experts, the daemon's generated
//! configuration, the trace workload, readiness waits, memory sampling.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use qosroute_core::{ExpertProfile, LatencyModel, SloTable, Task};
use qosroute_emulator::{CounterValues, EmulatedExpert, EmulatorOptions, Faults};
use qosroute_sim::trace::load_azure_trace;
use qosroute_sim::workload::{WorkloadSources, synthesize};
use qosroute_sim::{Catalogue, QualityTable, WorkloadSpec};
use qosroute_swarm::{QualityTruth, SwarmConfig, SwarmRequest};
use qosroute_testkit::{Daemon, proc_status_kib};
use tokio::runtime::Runtime;
use tokio::time::Instant;

/// A file of the workspace, by its path from the workspace root.
pub fn workspace_file(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}

/// The six edge-mixed experts (`configs/experts/edge-mixed.toml`).
pub fn edge_mixed() -> anyhow::Result<Catalogue> {
    let path = workspace_file("configs/experts/edge-mixed.toml");
    Catalogue::load(&path).with_context(|| format!("{}", path.display()))
}

/// The shipped quality table.
pub fn quality_table() -> anyhow::Result<Arc<QualityTable>> {
    Ok(Arc::new(QualityTable::embedded()?))
}

/// Requests in the Azure conversation trace (`data/traces/azure-llm-2023-conv.csv`).
pub fn trace_len() -> anyhow::Result<usize> {
    let path = workspace_file("data/traces/azure-llm-2023-conv.csv");
    Ok(load_azure_trace(&path)?.len())
}

/// `n` requests of the Azure conversation trace (`data/traces/azure-llm-2023-conv.csv`) from
/// `offset_s` in, through the simulator's workload synthesis (the seeded join with the
/// quality table), arrivals scaled by `load` (0.5: half the trace's rate), output lengths
/// capped at `max_output` tokens (the `max_tokens` the devices ask for).
pub fn trace_requests(
    quality: &QualityTable,
    n: usize,
    offset_s: f64,
    load: f64,
    max_output: u32,
    seed: u64,
) -> anyhow::Result<Vec<SwarmRequest>> {
    let workload = trace_workload(quality, n, offset_s, load, max_output, seed)?;
    let mut plan = SwarmRequest::from_workload(&workload);
    for r in &mut plan {
        r.max_tokens = r.output_tokens;
    }
    Ok(plan)
}

/// The simulator's workload of [`trace_requests`] (the same requests, first arrival at 0,
/// outputs capped), for references computed by the simulator.
///
/// The trace holds 19,366 requests (an hour); a longer run (`--long` replays 100,000) goes
/// round it again: each further lap starts one mean inter-arrival gap after the previous lap's
/// last request and is joined with the quality table under the next seed (`seed + lap`), so
/// laps differ in their prompts' qualities, not in their timing.
pub fn trace_workload(
    quality: &QualityTable,
    n: usize,
    offset_s: f64,
    load: f64,
    max_output: u32,
    seed: u64,
) -> anyhow::Result<qosroute_sim::Workload> {
    let path = workspace_file("data/traces/azure-llm-2023-conv.csv");
    let rows = load_azure_trace(&path)?;
    let lap_spec = format!("trace:{},speed={load},offset={offset_s}", path.display());
    let parsed = WorkloadSpec::parse(&lap_spec)?;
    let mut requests = Vec::with_capacity(n);
    let mut lap = 0u64;
    let mut lap_start_s = 0.0;
    while requests.len() < n {
        let sources = WorkloadSources {
            quality,
            output_lengths: &[],
            trace: Some(&rows),
        };
        let mut lap_requests = synthesize(&lap_spec, &parsed, sources, seed + lap)?;
        if lap_requests.is_empty() {
            bail!("the trace has no request from {offset_s} s");
        }
        let first = lap_requests.first().map_or(0.0, |r| r.arrival_s);
        let last = lap_requests.last().map_or(first, |r| r.arrival_s);
        let gap = (last - first) / lap_requests.len() as f64;
        for r in &mut lap_requests {
            r.arrival_s += lap_start_s - first;
            r.output_tokens = r.output_tokens.clamp(1, max_output);
        }
        lap_start_s += last - first + gap;
        let room = n - requests.len();
        requests.extend(lap_requests.into_iter().take(room));
        lap += 1;
    }
    let spec = format!("{lap_spec},n={n},laps={lap}");
    Ok(qosroute_sim::Workload { spec, requests })
}

/// `n` requests at a constant rate (`per_s` workload seconds), all of the same shape.
pub fn steady_requests(
    n: usize,
    per_s: f64,
    task: Task,
    prompt_tokens: u32,
    output_tokens: u32,
) -> Vec<SwarmRequest> {
    let task = task.as_str().parse().unwrap_or(qosroute_proto::Task::Chat);
    (0..n)
        .map(|i| SwarmRequest {
            arrival_s: i as f64 / per_s,
            task,
            prompt_tokens,
            output_tokens,
            max_tokens: output_tokens,
            quality_row: None,
        })
        .collect()
}

/// The truth of the quality table for `experts` (their names and model columns).
pub fn truth(quality: &Arc<QualityTable>, experts: &[&Expert]) -> QualityTruth {
    QualityTruth::new(
        quality.clone(),
        experts
            .iter()
            .map(|e| (e.profile.name.clone(), e.profile.model.clone())),
    )
}

/// An emulated expert on a Tokio runtime of its own, so that it can be killed like a process
/// ([`Expert::kill`]: every task dropped at once, every connection closed mid-stream) and
/// brought back on the same address ([`Expert::revive`]).
#[derive(Debug)]
pub struct Expert {
    /// The expert it emulates, at its hardware's speed.
    pub profile: Arc<ExpertProfile>,
    options: EmulatorOptions,
    addr: SocketAddr,
    runtime: Option<Runtime>,
    serving: Option<EmulatedExpert>,
    /// Counters of the incarnations killed so far.
    past: Vec<CounterValues>,
}

fn expert_runtime(name: &str) -> anyhow::Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("expert-{name}"))
        .enable_all()
        .build()
        .context("cannot start an expert's runtime")
}

/// Serves `profile` on `addr` inside `runtime` (SO_REUSEADDR: the address of a killed
/// incarnation is free again at once, its closed connections notwithstanding).
fn serve_on(
    runtime: &Runtime,
    profile: &Arc<ExpertProfile>,
    options: &EmulatorOptions,
    addr: SocketAddr,
) -> anyhow::Result<EmulatedExpert> {
    let _inside = runtime.enter();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket
        .bind(addr)
        .with_context(|| format!("{}: cannot bind {addr}", profile.name))?;
    let listener = socket.listen(1024)?;
    Ok(EmulatedExpert::serve(
        profile.clone(),
        options.clone(),
        listener,
    )?)
}

impl Expert {
    /// Starts emulating `profile` on a free loopback port, `speed` times faster than its
    /// hardware (the emulator's time scale is `1 / speed`), answering with the quality table's
    /// qualities.
    pub fn start(
        profile: ExpertProfile,
        speed: f64,
        quality: &Arc<QualityTable>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let profile = Arc::new(profile);
        let mut options = EmulatorOptions::for_profile(&profile);
        options.time_scale = 1.0 / speed;
        options.quality = Some(quality.clone());
        options.seed = seed;
        options.shutdown_grace = Duration::from_secs(1);
        let runtime = expert_runtime(&profile.name)?;
        let addr = SocketAddr::from(([127, 0, 0, 1], 0));
        let serving = serve_on(&runtime, &profile, &options, addr)?;
        let addr = serving.addr();
        Ok(Self {
            profile,
            options,
            addr,
            runtime: Some(runtime),
            serving: Some(serving),
            past: Vec::new(),
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.profile.name
    }

    /// `http://127.0.0.1:PORT` (the same across kills and revivals).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How much faster than its hardware it runs.
    pub fn speed(&self) -> f64 {
        1.0 / self.options.time_scale
    }

    /// Whether it is serving (not killed).
    pub fn is_up(&self) -> bool {
        self.serving.is_some()
    }

    /// Requests it runs and queues now (0 while killed).
    pub fn in_flight(&self) -> usize {
        self.serving
            .as_ref()
            .map_or(0, |s| s.load().running + s.load().waiting)
    }

    /// Sets the faults of the serving incarnation.
    pub fn set_faults(&self, faults: Faults) -> anyhow::Result<()> {
        if let Some(s) = &self.serving {
            s.set_faults(faults)?;
        }
        Ok(())
    }

    /// Kills it: its runtime is shut down without waiting, so every task (server, engine,
    /// every open stream) is dropped and every connection closed, mid-answer or not.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        if let Some(serving) = self.serving.take() {
            self.past.push(serving.counters());
        }
    }

    /// Serves again on the same address, with a fresh engine (and counters).
    pub fn revive(&mut self) -> anyhow::Result<()> {
        if self.serving.is_some() {
            return Ok(());
        }
        let runtime = expert_runtime(&self.profile.name)?;
        self.serving = Some(serve_on(&runtime, &self.profile, &self.options, self.addr)?);
        self.runtime = Some(runtime);
        Ok(())
    }

    /// Counters of the serving incarnation (zero while killed).
    pub fn counters(&self) -> CounterValues {
        self.serving
            .as_ref()
            .map(EmulatedExpert::counters)
            .unwrap_or_default()
    }

    /// Answers delivered in full by the serving incarnation.
    pub fn served(&self) -> u64 {
        let c = self.counters();
        c.success_stop + c.success_length
    }

    /// Answers delivered in full by every incarnation.
    pub fn served_total(&self) -> u64 {
        self.past
            .iter()
            .map(|c| c.success_stop + c.success_length)
            .sum::<u64>()
            + self.served()
    }

    /// Chat requests received by every incarnation.
    pub fn received_total(&self) -> u64 {
        self.past.iter().map(|c| c.received).sum::<u64>() + self.counters().received
    }

    /// The `[[expert]]` section of the daemon's configuration: its latency model scaled to its
    /// speed, quality priors from the quality table's calibration half.
    pub fn entry(&self, quality: &QualityTable) -> ExpertEntry {
        let l = &self.profile.latency;
        let speed = self.speed();
        let (default_quality, per_task) = match quality.model_index(&self.profile.model) {
            Some(m) => {
                let priors = quality.calibration_priors(m);
                let mean = priors.iter().sum::<f64>() / priors.len() as f64;
                let per_task = Task::ALL
                    .iter()
                    .map(|t| (t.as_str().to_owned(), priors[t.index()]))
                    .collect();
                (mean, per_task)
            }
            None => (0.5, Vec::new()),
        };
        ExpertEntry {
            name: self.profile.name.clone(),
            base_url: self.base_url(),
            model: self.options.model_name.clone(),
            kind: "vllm".into(),
            health_timeout_s: 2.0,
            quality_model: self.profile.model.clone(),
            max_slots: self.profile.max_slots,
            kv_tokens: self.profile.kv_tokens,
            latency: LatencyModel {
                prefill_tok_s: l.prefill_tok_s * speed,
                prefill_overhead_s: 0.0,
                decode_t0_s: l.decode_t0_s / speed,
                decode_d_s_per_seq: l.decode_d_s_per_seq / speed,
                decode_e_s_per_ctx_token: l.decode_e_s_per_ctx_token / speed,
            },
            default_quality,
            per_task,
        }
    }
}

impl Drop for Expert {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Starts every expert of a catalogue, `speed` times faster than its hardware.
pub fn start_experts(
    catalogue: &Catalogue,
    speed: f64,
    quality: &Arc<QualityTable>,
) -> anyhow::Result<Vec<Expert>> {
    catalogue
        .experts
        .iter()
        .enumerate()
        .map(|(i, p)| Expert::start(p.clone(), speed, quality, 1 + i as u64))
        .collect()
}

/// One `[[expert]]` of the daemon's configuration.
#[derive(Debug, Clone)]
pub struct ExpertEntry {
    /// Name.
    pub name: String,
    /// Base URL.
    pub base_url: String,
    /// Served model name.
    pub model: String,
    /// The engine (`[[expert]] kind`: `vllm` for the emulator, which serves vLLM's metrics).
    pub kind: String,
    /// `[[expert]] health_timeout_s`.
    pub health_timeout_s: f64,
    /// Quality-table column.
    pub quality_model: String,
    /// Slots.
    pub max_slots: u32,
    /// KV tokens.
    pub kv_tokens: u64,
    /// Latency model, wall-clock.
    pub latency: LatencyModel,
    /// Quality prior of tasks not listed.
    pub default_quality: f64,
    /// Quality prior per task.
    pub per_task: Vec<(String, f64)>,
}

/// Which router the daemon runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// The shipped learned router (`policy-model/models/han`), `qos-greedy` as its fallback.
    Learned,
    /// A baseline, as the daemon's fallback with no model.
    Baseline(&'static str),
}

/// The daemon's configuration, rendered to TOML by [`DaemonConfig::render`].
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// `{site}` of the topics.
    pub site: String,
    /// Broker URL.
    pub broker_url: String,
    /// MQTT client id.
    pub client_id: String,
    /// MQTT session expiry (0: clean sessions).
    pub session_expiry_s: u32,
    /// Shared-subscription group.
    pub shared_group: Option<String>,
    /// The router.
    pub policy: Policy,
    /// SLOs, wall-clock seconds per token.
    pub slo: SloTable,
    /// `admission.max_in_flight`.
    pub max_in_flight: usize,
    /// `admission.device_rate_per_s`.
    pub device_rate_per_s: f64,
    /// `admission.device_burst`.
    pub device_burst: f64,
    /// `shutdown.drain_deadline_s`.
    pub drain_deadline_s: f64,
    /// `telemetry.scrape_interval_s`.
    pub scrape_interval_s: f64,
    /// `telemetry.stale_after_s`.
    pub stale_after_s: f64,
    /// `timeouts.first_token_s`.
    pub first_token_s: f64,
    /// `timeouts.between_tokens_s`.
    pub between_tokens_s: f64,
    /// `calibration.prior_weight`.
    pub calibration_prior_weight: f64,
    /// `logging.log_prompts` (every admitted request is logged with its id).
    pub log_prompts: bool,
    /// The experts.
    pub experts: Vec<ExpertEntry>,
}

impl DaemonConfig {
    /// The defaults of the suite for `site` on `broker_url`: persistent session (600 s), the
    /// learned router, the catalogue's SLOs divided by `speed`, 512 places, no per-device limit
    /// in the way (1000/s), 5 s drain, scrapes every 0.2 s, expert timeouts of 5 s.
    pub fn new(
        site: &str,
        broker_url: &str,
        client_id: &str,
        slo: &SloTable,
        speed: f64,
        experts: Vec<ExpertEntry>,
    ) -> Self {
        Self {
            site: site.into(),
            broker_url: broker_url.into(),
            client_id: client_id.into(),
            session_expiry_s: 600,
            shared_group: None,
            policy: Policy::Learned,
            slo: SloTable {
                default_s_per_token: slo.default_s_per_token / speed,
                per_task: slo.per_task.iter().map(|(t, s)| (*t, s / speed)).collect(),
            },
            max_in_flight: 512,
            device_rate_per_s: 1000.0,
            device_burst: 1000.0,
            drain_deadline_s: 5.0,
            scrape_interval_s: 0.2,
            stale_after_s: 2.0,
            first_token_s: 5.0,
            between_tokens_s: 5.0,
            calibration_prior_weight: 10.0,
            log_prompts: false,
            experts,
        }
    }

    /// The TOML text (`{metrics_port}` left for the test kit).
    pub fn render(&self) -> String {
        let mut c = String::new();
        let _ = writeln!(c, "site = {}", toml_str(&self.site));
        let _ = writeln!(
            c,
            "[broker]\nurl = {}\nclient_id = {}\nsession_expiry_s = {}\nreconnect_min_s = 0.1\nreconnect_max_s = 0.5",
            toml_str(&self.broker_url),
            toml_str(&self.client_id),
            self.session_expiry_s
        );
        if let Some(group) = &self.shared_group {
            let _ = writeln!(c, "shared_group = {}", toml_str(group));
        }
        let _ = writeln!(c, "[policy]");
        match &self.policy {
            Policy::Learned => {
                let dir = workspace_file("policy-model/models/han");
                let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
                let _ = writeln!(
                    c,
                    "model_dir = {}\nfallback = \"qos-greedy\"",
                    toml_str(&dir.display().to_string())
                );
            }
            Policy::Baseline(name) => {
                let _ = writeln!(c, "fallback = {}", toml_str(name));
            }
        }
        let _ = writeln!(
            c,
            "[slo]\ndefault_s_per_token = {:e}\n[slo.per_task]",
            self.slo.default_s_per_token
        );
        for (task, s) in &self.slo.per_task {
            let _ = writeln!(c, "{} = {s:e}", task.as_str());
        }
        let _ = writeln!(
            c,
            "[admission]\nmax_in_flight = {}\ndevice_rate_per_s = {:?}\ndevice_burst = {:?}",
            self.max_in_flight, self.device_rate_per_s, self.device_burst
        );
        let _ = writeln!(
            c,
            "[timeouts]\nconnect_s = 1.0\nfirst_token_s = {:?}\nbetween_tokens_s = {:?}\ntotal_s = 120.0",
            self.first_token_s, self.between_tokens_s
        );
        let _ = writeln!(c, "[metrics]\nlisten = \"127.0.0.1:{{metrics_port}}\"");
        let _ = writeln!(
            c,
            "[telemetry]\nscrape_interval_s = {:?}\nstale_after_s = {:?}",
            self.scrape_interval_s, self.stale_after_s
        );
        let _ = writeln!(
            c,
            "[shutdown]\ndrain_deadline_s = {:?}",
            self.drain_deadline_s
        );
        let _ = writeln!(c, "[logging]\nlog_prompts = {}", self.log_prompts);
        let _ = writeln!(
            c,
            "[calibration]\nprior_weight = {:?}",
            self.calibration_prior_weight
        );
        for e in &self.experts {
            let l = &e.latency;
            let _ = writeln!(
                c,
                "\n[[expert]]\nname = {}\nbase_url = {}\nmodel = {}\nkind = {}\nhealth_timeout_s = {:?}\nquality_model = {}\nmax_slots = {}\nkv_tokens = {}\n[expert.latency]\nprefill_tok_s = {:e}\nprefill_overhead_s = {:e}\ndecode_t0_s = {:e}\ndecode_d_s_per_seq = {:e}\ndecode_e_s_per_ctx_token = {:e}\n[expert.quality]\ndefault = {:.4}",
                toml_str(&e.name),
                toml_str(&e.base_url),
                toml_str(&e.model),
                toml_str(&e.kind),
                e.health_timeout_s,
                toml_str(&e.quality_model),
                e.max_slots,
                e.kv_tokens,
                l.prefill_tok_s,
                l.prefill_overhead_s,
                l.decode_t0_s,
                l.decode_d_s_per_seq,
                l.decode_e_s_per_ctx_token,
                e.default_quality
            );
            for (task, q) in &e.per_task {
                let _ = writeln!(c, "{} = {q:.4}", toml_str(task));
            }
        }
        c
    }
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Starts the daemon on `config` (the suite's binary, see [`crate::daemon_binary`]).
pub fn start_daemon(config: &DaemonConfig) -> Daemon {
    Daemon::start_binary(crate::daemon_binary(), &config.render(), &[])
}

/// Waits until the daemon reports every named expert up (health checked), or says why not.
pub async fn wait_up(daemon: &Daemon, names: &[&str], within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let metrics = daemon.try_metrics().unwrap_or_default();
        let up = |n: &&str| {
            let line = format!("qosroute_expert_up{{expert=\"{n}\"}} 1");
            metrics.lines().any(|l| l == line)
        };
        if names.iter().all(up) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "experts {names:?} not all up within {within:?}; daemon log ends with:\n{}",
                daemon.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the daemon is connected to the broker with its subscriptions: subscribed to its
/// request and feedback filters, or connected to a session that kept them.
pub async fn wait_subscribed(daemon: &Daemon, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while daemon.log_count("subscribed") < 2 && daemon.log_count("session_present=true") == 0 {
        if Instant::now() > deadline {
            bail!(
                "the daemon did not subscribe within {within:?}; its log ends with:\n{}",
                daemon.log_tail(30)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// A swarm configuration for the suite: `devices` devices, `speed` times faster than the
/// workload's clock, a quarter postcard, persistent sessions, feedback off.
pub fn swarm_config(broker_url: &str, site: &str, devices: usize, speed: f64) -> SwarmConfig {
    let mut config = SwarmConfig::new(broker_url, site);
    config.devices = devices;
    config.speed = speed;
    config.postcard_share = 0.25;
    config.reply_timeout = Duration::from_secs(30);
    config.linger = Duration::from_millis(500);
    config.device_prefix = "hil".into();
    config
}

/// Samples a process's resident memory (`VmRSS`) every `every` in a background task; the
/// peak so far is read at any time.
#[derive(Debug)]
pub struct RssSampler {
    peak_kib: Arc<AtomicU64>,
    last_kib: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    /// Starts sampling process `pid`.
    pub fn start(pid: u32, every: Duration) -> Self {
        let peak_kib = Arc::new(AtomicU64::new(0));
        let last_kib = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, l, n, s) = (
            peak_kib.clone(),
            last_kib.clone(),
            samples.clone(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                if let Some(kib) = proc_status_kib(pid, "VmRSS") {
                    p.fetch_max(kib, Ordering::Relaxed);
                    l.store(kib, Ordering::Relaxed);
                    n.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(every).await;
            }
        });
        Self {
            peak_kib,
            last_kib,
            samples,
            stop,
            task,
        }
    }

    /// The largest `VmRSS` sampled, KiB.
    pub fn peak_kib(&self) -> u64 {
        self.peak_kib.load(Ordering::Relaxed)
    }

    /// The last `VmRSS` sampled, KiB.
    pub fn last_kib(&self) -> u64 {
        self.last_kib.load(Ordering::Relaxed)
    }

    /// Samples taken.
    pub fn samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.abort();
    }
}

/// Waits until the daemon's `qosroute_requests_total` counters add up to at least `n`.
pub async fn wait_accounted(daemon: &Daemon, n: f64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if daemon.outcomes().values().sum::<f64>() >= n {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_longer_than_the_trace_goes_round_it_again_in_time_order() {
        let quality = QualityTable::embedded().unwrap();
        let one_lap = trace_workload(&quality, 19_366, 0.0, 1.0, 48, 1).unwrap();
        let long = trace_workload(&quality, 25_000, 0.0, 1.0, 48, 1).unwrap();
        assert_eq!(long.requests.len(), 25_000);
        assert!(
            long.requests
                .windows(2)
                .all(|w| w[0].arrival_s <= w[1].arrival_s)
        );
        // The first lap is the trace itself; the second starts after it ends, with the
        // trace's timing and lengths again.
        assert_eq!(long.requests[..19_366], one_lap.requests[..]);
        let lap_end = one_lap.requests[19_365].arrival_s;
        let second = &long.requests[19_366..];
        assert!(second[0].arrival_s > lap_end);
        let shift = second[0].arrival_s - one_lap.requests[0].arrival_s;
        assert!((second[100].arrival_s - one_lap.requests[100].arrival_s - shift).abs() < 1e-6);
        assert_eq!(
            second[100].prompt_tokens,
            one_lap.requests[100].prompt_tokens
        );
        assert!(
            long.requests
                .iter()
                .all(|r| (1..=48).contains(&r.output_tokens))
        );
    }
}
