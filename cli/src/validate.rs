//! `qosroute validate`: the simulator against reality. One slice of an Azure-format trace is
//! replayed twice: through an MQTT broker and the real `qosrouted` against real
//! OpenAI-compatible servers, and in the simulator with the servers' fitted profiles (from
//! `qosroute profile`). The per-token latency, TTFT and SLO-violation rate of both are put side
//! by side with their relative error, and plotted.
//!
//! The simulator gets the same requests as the servers got: the same arrival times (the
//! measured publish times), the prompt lengths the prompts were sized for (in the servers'
//! tokens, calibrated from `usage.prompt_tokens`) and each answer's realised length (a real
//! model stops at its end-of-sequence token, which no trace knows). Two simulated columns:
//! - **replayed routing**: each request goes to the expert the daemon actually chose, so only
//!   the latency model is under test;
//! - **policy in the loop**: the daemon's router (a baseline) decides in the simulator too, so
//!   routing differences add to the latency model's.
//!
//! Devices are this command's own MQTT clients, not the swarm's: every prompt starts with a
//! unique tag (the swarm's prompts share one filler prefix, which llama.cpp's prefix cache would
//! skip, making prefill free).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qosroute_core::{
    ArrivingRequest, ClusterState, Decision, Policy, SimRng, SloTable, Task as CoreTask,
};
use qosroute_proto::{self as proto, Encoding, Reply, Task};
use qosroute_sim::trace::load_azure_trace;
use qosroute_sim::workload::{WorkloadSources, synthesize};
use qosroute_sim::{Catalogue, QualityTable, Simulation, Workload, WorkloadSpec};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bench::devices::device_options;
use crate::demo::{ChildGuard, DaemonProcess, check_config, free_port, spawn_daemon, toml_str};
use crate::plot::{BarSeries, SweepCurve, grouped_bars, sweep_curves};
use crate::profile::{Target, Tokenization, calibrate, synth_prompt};

const SITE: &str = "validate";

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Fitted profiles (one-expert catalogues written by `qosroute profile`), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    profiles: Vec<PathBuf>,
    /// Base URLs of the real servers, in the order of --profiles.
    #[arg(long, value_delimiter = ',', required = true)]
    urls: Vec<String>,
    /// The model name the servers answer to: one for all, or one per server.
    #[arg(long, value_delimiter = ',', required = true)]
    served_models: Vec<String>,
    /// Azure-format trace (TIMESTAMP,ContextTokens,GeneratedTokens).
    #[arg(long, default_value = "data/traces/azure-llm-2023-conv.csv")]
    trace: PathBuf,
    /// Start this many minutes into the trace.
    #[arg(long, default_value_t = 0.0)]
    offset_minutes: f64,
    /// Requests of the slice (the first ones from the offset).
    #[arg(long, default_value_t = 150)]
    requests: usize,
    /// Arrival rate relative to the trace's (scale it to the servers' capacity).
    #[arg(long, default_value_t = 0.05)]
    load: f64,
    /// Prompt lengths relative to the trace's.
    #[arg(long, default_value_t = 0.25)]
    prompt_scale: f64,
    /// Longest prompt, in the servers' tokens (the servers' context must hold it plus the
    /// answer).
    #[arg(long, default_value_t = 768)]
    max_prompt_tokens: u32,
    /// Longest answer (`max_tokens`): the trace's length, capped.
    #[arg(long, default_value_t = 64)]
    max_output_tokens: u32,
    /// SLO of every request, seconds per output token (the daemon's and the simulator's).
    #[arg(long, default_value_t = 0.1)]
    slo_s_per_token: f64,
    /// The daemon's router: a baseline (least-loaded, qos-greedy, round-robin, ...), also run
    /// in the simulator for the "policy in the loop" column.
    #[arg(long, default_value = "qos-greedy")]
    policy: String,
    /// `mosquitto` (started here) or the URL of a running broker (mqtt://HOST:PORT).
    #[arg(long, default_value = "mosquitto")]
    broker: String,
    /// The `qosrouted` binary (default: next to this executable).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// MQTT connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    devices: usize,
    /// Seed of the workload join and the prompt words.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds between the daemon's health checks of each server (`telemetry.scrape_interval_s`).
    /// llama-cpp-python's server does not answer them while it prefills (its event loop is
    /// blocked for seconds), and three failed checks in a row take a server out of routing:
    /// keep this above the longest prefill.
    #[arg(long, default_value_t = 5.0)]
    health_interval_s: f64,
    /// Seconds after the last good check before the daemon counts a server as down
    /// (`telemetry.stale_after_s`).
    #[arg(long, default_value_t = 60.0)]
    stale_after_s: f64,
    /// Seconds to wait for the last answers after the last request was published.
    #[arg(long, default_value_t = 600.0)]
    drain_timeout_s: f64,
    /// Folder of the results (validate.json, table.md, plots).
    #[arg(long, default_value = "out/sim-vs-real")]
    out: PathBuf,
}

pub fn run(args: &ValidateArgs) -> anyhow::Result<()> {
    if args.profiles.len() != args.urls.len() {
        bail!("--profiles and --urls must have as many entries");
    }
    if args.served_models.len() != 1 && args.served_models.len() != args.urls.len() {
        bail!("--served-models: one name, or one per server");
    }
    if args.requests == 0 || args.devices == 0 {
        bail!("--requests and --devices must be at least 1");
    }
    for (what, v) in [
        ("--load", args.load),
        ("--prompt-scale", args.prompt_scale),
        ("--slo-s-per-token", args.slo_s_per_token),
        ("--health-interval-s", args.health_interval_s),
        ("--stale-after-s", args.stale_after_s),
    ] {
        if !(v.is_finite() && v > 0.0) {
            bail!("{what} must be positive");
        }
    }
    qosroute_core::baseline(&args.policy, args.seed)
        .map_err(|e| anyhow::anyhow!("--policy: {e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(validate(args))
}

/// The fitted experts as one catalogue with the run's SLO.
fn catalogue(args: &ValidateArgs) -> anyhow::Result<Catalogue> {
    let mut experts = Vec::new();
    for path in &args.profiles {
        let c = Catalogue::load(path)?;
        experts.extend(c.experts);
    }
    let catalogue = Catalogue {
        name: "sim-vs-real".into(),
        description: "fitted profiles of the real servers".into(),
        slo: SloTable {
            default_s_per_token: args.slo_s_per_token,
            per_task: Default::default(),
        },
        experts,
    };
    catalogue
        .validate()
        .map_err(|e| anyhow::anyhow!("the profiles: {e}"))?;
    if catalogue.experts.len() != args.urls.len() {
        bail!("each profile file must hold exactly one expert");
    }
    Ok(catalogue)
}

/// One request of the slice as sent.
#[derive(Debug, Clone, Serialize)]
struct Planned {
    index: usize,
    arrival_s: f64,
    task: String,
    /// The trace's lengths.
    trace_prompt_tokens: u32,
    trace_output_tokens: u32,
    /// Prompt words sent and the servers' tokens they make (calibrated).
    prompt_words: u32,
    prompt_tokens: u32,
    max_tokens: u32,
    quality_row: usize,
}

/// What the device saw of one request. Times are seconds since the replay started.
#[derive(Debug, Clone, Default, Serialize)]
struct Observed {
    published_s: Option<f64>,
    first_chunk_s: Option<f64>,
    ended_s: Option<f64>,
    expert: Option<String>,
    output_tokens: Option<u32>,
    gateway_ttft_s: Option<f64>,
    gateway_total_s: Option<f64>,
    gateway_slo_met: Option<bool>,
    error: Option<String>,
}

impl Observed {
    fn completed(&self) -> bool {
        self.error.is_none() && self.output_tokens.is_some() && self.ended_s.is_some()
    }
}

/// One request, measured and simulated.
#[derive(Debug, Clone, Serialize)]
struct Row {
    planned: Planned,
    observed: Observed,
    /// Measured (device side): TTFT and seconds per output token (publish to final reply).
    measured_ttft_s: Option<f64>,
    measured_per_token_s: Option<f64>,
    /// Simulated with the daemon's routing replayed.
    sim_ttft_s: Option<f64>,
    sim_per_token_s: Option<f64>,
    /// Simulated with the policy deciding.
    sim_policy_rejected: bool,
    sim_policy_expert: Option<String>,
    sim_policy_ttft_s: Option<f64>,
    sim_policy_per_token_s: Option<f64>,
}

/// Quantile and rate summary of one column.
#[derive(Debug, Clone, Copy, Serialize)]
struct Summary {
    completed: usize,
    per_token_p50_s: f64,
    per_token_p95_s: f64,
    ttft_p50_s: f64,
    ttft_p95_s: f64,
    slo_violation_rate: f64,
}

#[derive(Debug, Serialize)]
struct Output<'a> {
    command: String,
    setup: Setup,
    tokenization: Tokenization,
    experts: &'a [qosroute_core::ExpertProfile],
    measured: Summary,
    simulated_replayed_routing: Summary,
    simulated_policy: Summary,
    per_expert: Vec<ExpertSummary>,
    rows: &'a [Row],
}

#[derive(Debug, Clone, Serialize)]
struct Setup {
    trace: String,
    offset_minutes: f64,
    requests: usize,
    load: f64,
    prompt_scale: f64,
    max_prompt_tokens: u32,
    max_output_tokens: u32,
    slo_s_per_token: f64,
    policy: String,
    replay_s: f64,
    broker: String,
    urls: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct ExpertSummary {
    expert: String,
    measured: Summary,
    simulated: Summary,
}

async fn validate(args: &ValidateArgs) -> anyhow::Result<()> {
    let catalogue = catalogue(args)?;
    let quality = QualityTable::embedded()?;
    for e in &catalogue.experts {
        if quality.model_index(&e.model).is_none() {
            bail!(
                "profile `{}`: model `{}` is not a column of the quality table ({}): profile with --quality-model COLUMN",
                e.name,
                e.model,
                quality.models.join(", ")
            );
        }
    }
    // Prompts are sized in the servers' tokens: calibrate on the first server.
    let model_of = |i: usize| {
        args.served_models
            .get(i)
            .or_else(|| args.served_models.first())
            .cloned()
            .unwrap_or_default()
    };
    let target = Target::new(
        &args.urls[0],
        &model_of(0),
        None,
        Default::default(),
        1,
        120.0,
        args.seed,
    )?;
    let mut calibration_log = Vec::new();
    let tok = calibrate(&target, &mut calibration_log).await?;
    eprintln!(
        "prompts: {:.2} tokens per word + {:.0} template tokens",
        tok.tokens_per_word, tok.overhead_tokens
    );
    let planned = plan(args, &quality, &tok)?;
    let daemon_exe = crate::demo::find_daemon(args.daemon.as_ref())?;
    let scratch = crate::demo::Scratch::new(false)?;
    let interrupt = CancellationToken::new();
    crate::demo::watch_signals(interrupt.clone())?;

    let (broker_url, mosquitto) = start_broker(args, &scratch.0).await?;
    let metrics_port = free_port()?;
    let config = daemon_config(args, &catalogue, &broker_url, metrics_port, &model_of);
    let config_path = scratch.0.join("qosrouted.toml");
    std::fs::write(&config_path, &config)?;
    check_config(&daemon_exe, &config_path)?;
    let log = scratch.0.join("qosrouted.log");
    let child = spawn_daemon(
        &daemon_exe,
        &config_path,
        &log,
        "QOSROUTE_VALIDATE_DAEMON_LOG",
    )?;
    let mut daemon = DaemonProcess {
        child,
        log,
        metrics_port,
    };
    let names: Vec<String> = catalogue.experts.iter().map(|e| e.name.clone()).collect();
    daemon
        .wait_ready(&names, Duration::from_secs(30), &interrupt)
        .await?;
    let planned_span = planned.last().map_or(0.0, |p| p.arrival_s);
    eprintln!(
        "replaying {} requests over {:.0} s through qosrouted ({}) against {} servers",
        planned.len(),
        planned_span,
        args.policy,
        args.urls.len()
    );
    let started = Instant::now();
    let replay = replay(args, &broker_url, &planned, &interrupt).await;
    let replay_s = started.elapsed().as_secs_f64();
    let tail = daemon.log_tail(20);
    let _ = daemon.child.stop().await;
    if let Some(m) = mosquitto {
        let _ = m.stop().await;
    }
    let observed = replay.with_context(|| format!("daemon log ends with:\n{tail}"))?;
    if interrupt.is_cancelled() {
        bail!("interrupted");
    }

    // The simulator, on the same requests.
    let index_of: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let workload = sim_workload(&planned, &observed);
    let replayed: Vec<Replayed> = observed
        .iter()
        .map(
            |o| match o.expert.as_deref().and_then(|e| index_of.get(e).copied()) {
                Some(e) => Replayed::Route(e),
                None if o.error.is_some() => Replayed::Reject,
                None => Replayed::Unknown,
            },
        )
        .collect();
    let mut replay_policy = ReplayRouting {
        routes: replayed,
        fallback: qosroute_core::baseline(&args.policy, args.seed)?,
    };
    let sim_replayed = simulate(
        &catalogue,
        &quality,
        &workload,
        args.seed,
        &mut replay_policy,
    )?;
    let mut policy = qosroute_core::baseline(&args.policy, args.seed)?;
    let sim_policy = simulate(&catalogue, &quality, &workload, args.seed, &mut policy)?;

    let rows: Vec<Row> = planned
        .iter()
        .zip(&observed)
        .enumerate()
        .map(|(i, (p, o))| {
            let measured_ttft_s = match (o.first_chunk_s, o.published_s) {
                (Some(f), Some(s)) if o.completed() => Some(f - s),
                _ => None,
            };
            let measured_per_token_s = match (o.ended_s, o.published_s, o.output_tokens) {
                (Some(e), Some(s), Some(n)) if o.completed() => Some((e - s) / f64::from(n.max(1))),
                _ => None,
            };
            let r = &sim_replayed[i];
            let q = &sim_policy[i];
            Row {
                planned: p.clone(),
                observed: o.clone(),
                measured_ttft_s,
                measured_per_token_s,
                sim_ttft_s: r.ttft_s.filter(|_| o.completed()),
                sim_per_token_s: r.per_token_s.filter(|_| o.completed()),
                sim_policy_rejected: q.rejected,
                sim_policy_expert: q.expert.map(|e| names[e].clone()),
                sim_policy_ttft_s: q.ttft_s.filter(|_| o.completed()),
                sim_policy_per_token_s: q.per_token_s.filter(|_| o.completed()),
            }
        })
        .collect();
    let slo = args.slo_s_per_token;
    let measured = summarise(&rows, slo, |r| (r.measured_ttft_s, r.measured_per_token_s));
    let simulated = summarise(&rows, slo, |r| (r.sim_ttft_s, r.sim_per_token_s));
    let simulated_policy = summarise(&rows, slo, |r| {
        (r.sim_policy_ttft_s, r.sim_policy_per_token_s)
    });
    let per_expert: Vec<ExpertSummary> = names
        .iter()
        .map(|name| {
            let mine: Vec<Row> = rows
                .iter()
                .filter(|r| r.observed.expert.as_deref() == Some(name))
                .cloned()
                .collect();
            ExpertSummary {
                expert: name.clone(),
                measured: summarise(&mine, slo, |r| (r.measured_ttft_s, r.measured_per_token_s)),
                simulated: summarise(&mine, slo, |r| (r.sim_ttft_s, r.sim_per_token_s)),
            }
        })
        .collect();
    let setup = Setup {
        trace: args.trace.display().to_string(),
        offset_minutes: args.offset_minutes,
        requests: planned.len(),
        load: args.load,
        prompt_scale: args.prompt_scale,
        max_prompt_tokens: args.max_prompt_tokens,
        max_output_tokens: args.max_output_tokens,
        slo_s_per_token: slo,
        policy: args.policy.clone(),
        replay_s,
        broker: broker_url.clone(),
        urls: args.urls.clone(),
    };
    let table = markdown_table(&measured, &simulated, &simulated_policy, &per_expert, &rows);
    // anyhow-free printing of the table to stderr (stdout stays clean for pipes).
    eprintln!("\n{table}");
    let out = Output {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        setup,
        tokenization: tok,
        experts: &catalogue.experts,
        measured,
        simulated_replayed_routing: simulated,
        simulated_policy,
        per_expert,
        rows: &rows,
    };
    crate::write_output(
        &args.out.join("validate.json"),
        serde_json::to_string_pretty(&out)? + "\n",
    )?;
    crate::write_output(&args.out.join("table.md"), table)?;
    plots(&args.out, &rows)?;
    Ok(())
}

/// The slice: the trace's arrivals scaled by --load, its lengths scaled and capped.
fn plan(
    args: &ValidateArgs,
    quality: &QualityTable,
    tok: &Tokenization,
) -> anyhow::Result<Vec<Planned>> {
    let rows = load_azure_trace(&args.trace)?;
    let offset_s = args.offset_minutes * 60.0;
    let spec = format!(
        "trace:{},speed={},n={},offset={offset_s}",
        args.trace.display(),
        args.load,
        args.requests
    );
    let parsed = WorkloadSpec::Trace {
        path: args.trace.display().to_string(),
        speed: args.load,
        n: Some(args.requests),
        offset_s,
    };
    let sources = WorkloadSources {
        quality,
        output_lengths: &[],
        trace: Some(&rows),
    };
    let requests = synthesize(&spec, &parsed, sources, args.seed)?;
    let min_tokens = tok.overhead_tokens.ceil() as u32 + 8;
    Ok(requests
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let wanted = ((f64::from(r.prompt_tokens) * args.prompt_scale).round() as u32)
                .clamp(min_tokens, args.max_prompt_tokens.max(min_tokens));
            let words = ((f64::from(wanted) - tok.overhead_tokens) / tok.tokens_per_word)
                .round()
                .max(1.0) as u32;
            let tokens = (tok.overhead_tokens + f64::from(words) * tok.tokens_per_word).round();
            Planned {
                index,
                arrival_s: r.arrival_s,
                task: r.task.as_str().to_owned(),
                trace_prompt_tokens: r.prompt_tokens,
                trace_output_tokens: r.output_tokens,
                prompt_words: words,
                prompt_tokens: tokens as u32,
                max_tokens: r.output_tokens.clamp(1, args.max_output_tokens),
                quality_row: r.quality_row,
            }
        })
        .collect())
}

/// mosquitto on a free port (its child guard), or the given broker.
async fn start_broker(
    args: &ValidateArgs,
    scratch: &Path,
) -> anyhow::Result<(String, Option<ChildGuard>)> {
    if args.broker != "mosquitto" {
        qosroute_swarm::parse_broker_url(&args.broker)
            .map_err(|e| anyhow::anyhow!("--broker: {e}"))?;
        return Ok((args.broker.clone(), None));
    }
    let port = free_port()?;
    let child = crate::demo::start_mosquitto(
        port,
        scratch,
        "mosquitto is not installed (apt-get install mosquitto), or pass --broker URL",
    )
    .await?;
    Ok((format!("mqtt://127.0.0.1:{port}"), Some(child)))
}

/// The daemon's configuration: the real servers with their fitted latency models.
fn daemon_config(
    args: &ValidateArgs,
    catalogue: &Catalogue,
    broker_url: &str,
    metrics_port: u16,
    model_of: &dyn Fn(usize) -> String,
) -> String {
    let mut c = String::new();
    let _ = writeln!(c, "# Generated by `qosroute validate`.");
    let _ = writeln!(c, "site = {}", toml_str(SITE));
    let _ = writeln!(
        c,
        "\n[broker]\nurl = {}\nclient_id = {}\nsession_expiry_s = 0\nreconnect_min_s = 0.1\nreconnect_max_s = 2.0",
        toml_str(broker_url),
        toml_str(&format!("qosrouted-validate-{}", std::process::id()))
    );
    let _ = writeln!(c, "\n[policy]\nfallback = {}", toml_str(&args.policy));
    let _ = writeln!(
        c,
        "\n[slo]\ndefault_s_per_token = {:e}",
        args.slo_s_per_token
    );
    let _ = writeln!(
        c,
        "\n[admission]\nmax_in_flight = 4096\ndevice_rate_per_s = 1000.0\ndevice_burst = 1000.0"
    );
    let timeout = args.drain_timeout_s.max(60.0);
    let _ = writeln!(
        c,
        "\n[timeouts]\nconnect_s = 5.0\nfirst_token_s = {timeout:e}\nbetween_tokens_s = 60.0\ntotal_s = {:e}",
        timeout * 2.0
    );
    let _ = writeln!(
        c,
        "\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[telemetry]\nscrape_interval_s = {:e}\nstale_after_s = {:e}\n\n[shutdown]\ndrain_deadline_s = 2.0",
        args.health_interval_s,
        args.stale_after_s.max(args.health_interval_s)
    );
    for (i, (profile, url)) in catalogue.experts.iter().zip(&args.urls).enumerate() {
        let l = &profile.latency;
        let _ = writeln!(
            c,
            "\n[[expert]]\nname = {}\nbase_url = {}\nmodel = {}\nkind = \"openai\"\nquality_model = {}\nmax_slots = {}\nkv_tokens = {}\nhardware = {}\n[expert.latency]\nprefill_tok_s = {:e}\ndecode_t0_s = {:e}\ndecode_d_s_per_seq = {:e}\ndecode_e_s_per_ctx_token = {:e}\n[expert.quality]\ndefault = 0.5",
            toml_str(&profile.name),
            toml_str(url),
            toml_str(&model_of(i)),
            toml_str(&profile.model),
            profile.max_slots,
            profile.kv_tokens,
            toml_str(&profile.hardware),
            l.prefill_tok_s,
            l.decode_t0_s,
            l.decode_d_s_per_seq,
            l.decode_e_s_per_ctx_token,
        );
    }
    c
}

/// Replays the plan through the broker; one record per planned request.
async fn replay(
    args: &ValidateArgs,
    broker_url: &str,
    planned: &[Planned],
    interrupt: &CancellationToken,
) -> anyhow::Result<Vec<Observed>> {
    let (host, port, tls) =
        qosroute_swarm::parse_broker_url(broker_url).map_err(|e| anyhow::anyhow!("{e}"))?;
    if tls {
        bail!("validate uses a broker without TLS");
    }
    let records: Arc<Mutex<Vec<Observed>>> =
        Arc::new(Mutex::new(vec![Observed::default(); planned.len()]));
    let origin = Instant::now();
    let stop = CancellationToken::new();
    let mut clients = Vec::new();
    let mut pollers = Vec::new();
    let tag = format!("{:x}", std::process::id());
    for k in 0..args.devices {
        let name = format!("validate-{tag}-{k}");
        let options = device_options(&name, host.clone(), port);
        let (client, mut eventloop) = AsyncClient::new(options, 4096);
        let response_topic = format!("qosroute/v1/{SITE}/resp/{name}");
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let sub = client.clone();
        let records = records.clone();
        let stop = stop.clone();
        pollers.push(tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    () = stop.cancelled() => break,
                    e = eventloop.poll() => e,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.try_subscribe(response_topic.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at = origin.elapsed().as_secs_f64();
                        if let Ok(reply) = proto::decode_reply(&p.payload, Encoding::Json)
                            .or_else(|_| proto::decode_reply(&p.payload, Encoding::Postcard))
                        {
                            on_reply(&records, &reply, at);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            let _ = sub.try_disconnect();
        }));
        match tokio::time::timeout(Duration::from_secs(10), ready_rx.recv()).await {
            Ok(Some(())) => {}
            _ => bail!("{name}: not connected and subscribed within 10 s"),
        }
        clients.push((client, format!("qosroute/v1/{SITE}/req/{name}")));
    }
    // Publish at the planned times.
    let start = Instant::now();
    let mut rng = SimRng::derive(args.seed, 11);
    for p in planned {
        let at = start + Duration::from_secs_f64(p.arrival_s);
        tokio::select! {
            () = tokio::time::sleep_until(at) => {}
            () = interrupt.cancelled() => break,
        }
        let id = format!("r{}", p.index);
        let prompt = synth_prompt(&format!("{tag}-{id}"), p.prompt_words, &mut rng);
        let request =
            proto::Request::new(&id, Task::from_name(&p.task).unwrap_or(Task::Chat), &prompt)
                .map_err(|e| anyhow::anyhow!("request {id}: {e}"))?
                .with_max_tokens(p.max_tokens)
                .with_stream(true);
        let mut buf = vec![0u8; prompt.len() + 1024];
        let n = proto::encode_request(&request, Encoding::Json, &mut buf)
            .map_err(|e| anyhow::anyhow!("request {id}: {e}"))?;
        buf.truncate(n);
        let (client, topic) = &clients[p.index % clients.len()];
        if let Ok(mut r) = records.lock() {
            r[p.index].published_s = Some(origin.elapsed().as_secs_f64());
        }
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, buf)
            .await
            .with_context(|| format!("request {id}: publish failed"))?;
    }
    // Wait for every answer.
    let deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout_s);
    let mut last_report = Instant::now();
    loop {
        let (done, total) = match records.lock() {
            Ok(r) => (
                r.iter().filter(|o| o.ended_s.is_some()).count(),
                r.iter().filter(|o| o.published_s.is_some()).count(),
            ),
            Err(_) => bail!("the replay's records are poisoned"),
        };
        if done >= total || Instant::now() > deadline || interrupt.is_cancelled() {
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("  {done}/{total} answered");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    for p in pollers {
        let _ = tokio::time::timeout(Duration::from_secs(2), p).await;
    }
    let observed = match records.lock() {
        Ok(r) => r.clone(),
        Err(_) => bail!("the replay's records are poisoned"),
    };
    Ok(observed)
}

fn on_reply(records: &Mutex<Vec<Observed>>, reply: &Reply, at: f64) {
    let Some(index) = reply
        .id()
        .as_str()
        .strip_prefix('r')
        .and_then(|n| n.parse::<usize>().ok())
    else {
        return;
    };
    let Ok(mut records) = records.lock() else {
        return;
    };
    let Some(o) = records.get_mut(index) else {
        return;
    };
    match reply {
        Reply::Chunk(c) => {
            o.first_chunk_s.get_or_insert(at);
            o.expert.get_or_insert_with(|| c.expert.as_str().to_owned());
        }
        Reply::Final(f) => {
            if o.ended_s.is_none() {
                o.ended_s = Some(at);
                o.first_chunk_s.get_or_insert(at);
                o.expert = Some(f.expert.as_str().to_owned());
                o.output_tokens = Some(f.output_tokens);
                o.gateway_ttft_s = Some(f64::from(f.ttft_ms) / 1000.0);
                o.gateway_total_s = Some(f64::from(f.total_ms) / 1000.0);
                o.gateway_slo_met = Some(f.slo_met);
            }
        }
        Reply::Error(e) => {
            if o.ended_s.is_none() {
                o.ended_s = Some(at);
                o.error = Some(format!("{}: {}", e.code.as_str(), e.message.as_str()));
            }
        }
    }
}

mod report;
mod simulated;

use report::*;
use simulated::*;
