//! `qosroute demo --real`: real llama.cpp servers (SmolLM2-135M, `qosroute-real-engine`) in
//! place of the weakest emulated experts of the catalogue: llama.cpp's own `llama-server`
//! (continuous batching over 4 slots) when `scripts/llama-server.sh install` has built it, else
//! llama-cpp-python's server (one request at a time).

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use qosroute_core::{ExpertProfile, LatencyModel};
use qosroute_expert_client::{ChatRequest, ExpertClient, ExpertEndpoint, ExpertKind};
use qosroute_real_engine::{
    BatchingEngine, BatchingOptions, Engine, LlamaServer, SERVED_MODEL, ServerOptions,
};
use qosroute_sim::{Catalogue, QualityTable};
use tokio::time::Instant;

/// Context of each real server (of each slot of a batching one), tokens: the demo's longest
/// prompt (2,048 tokens, the wire bound) and answer (128) fit.
const CONTEXT_TOKENS: u32 = 4096;
/// Slots of a batching server.
const BATCHING_SLOTS: u32 = 4;

/// The engine the real experts run.
#[derive(Debug)]
pub(crate) enum RealEngine {
    /// llama.cpp's `llama-server`: continuous batching over [`BATCHING_SLOTS`] slots, load on
    /// `/metrics` (the daemon's `llamacpp` kind).
    Batching(BatchingEngine),
    /// llama-cpp-python's server: one request at a time.
    OneAtATime(Engine),
}

impl RealEngine {
    /// The batching engine when built, else llama-cpp-python's server when installed.
    fn find() -> anyhow::Result<Self> {
        match BatchingEngine::find() {
            Ok(engine) => Ok(Self::Batching(engine)),
            Err(batching) => match Engine::find() {
                Ok(engine) => Ok(Self::OneAtATime(engine)),
                Err(one) => bail!("no real engine: {batching}\nnor: {one}"),
            },
        }
    }

    fn slots(&self) -> u32 {
        match self {
            Self::Batching(_) => BATCHING_SLOTS,
            Self::OneAtATime(_) => 1,
        }
    }

    fn model(&self) -> &Path {
        match self {
            Self::Batching(e) => &e.model,
            Self::OneAtATime(e) => &e.model,
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Batching(_) => format!(
                "llama.cpp llama-server, {BATCHING_SLOTS} slots batched, 1 thread, {CONTEXT_TOKENS}-token context per slot"
            ),
            Self::OneAtATime(_) => format!(
                "llama-cpp-python server, one request at a time, 1 thread, {CONTEXT_TOKENS}-token context"
            ),
        }
    }

    /// The daemon's `kind` of these servers: `llamacpp` (it scrapes their load) for
    /// llama-server; `openai` for llama-cpp-python's, which has no metrics.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Batching(_) => "llamacpp",
            Self::OneAtATime(_) => "openai",
        }
    }
}
/// The prompt and answer the start-up measurement uses, tokens.
const PROBE_PROMPT: u32 = 256;
const PROBE_OUTPUT: u32 = 32;
/// How long the daemon waits for a real server's health check: its `/v1/models` does not
/// answer while it prefills, up to about 11 s for the longest prompt on one core here.
pub(crate) const HEALTH_TIMEOUT_S: f64 = 30.0;

/// The real experts of a demo, planned before any run.
#[derive(Debug)]
pub(crate) struct RealSite {
    pub(crate) engine: RealEngine,
    /// Each real expert's profile (its latency model is measured when its server starts) and
    /// the emulated expert it replaces.
    pub(crate) experts: Vec<(ExpertProfile, String)>,
}

impl RealSite {
    /// Plans `n` real experts: finds the engine (or says how to install it), takes the `n`
    /// emulated experts of least decode capacity (`max_slots / t0`) out of `catalogue`, and
    /// names the quality-table column the devices score the real answers with.
    pub(crate) fn plan(
        n: usize,
        catalogue: &mut Catalogue,
        quality: &QualityTable,
    ) -> anyhow::Result<Self> {
        let engine = RealEngine::find()?;
        if n == 0 || n >= catalogue.experts.len() {
            bail!(
                "--real {n}: between 1 and {} (the catalogue's experts less one)",
                catalogue.experts.len().saturating_sub(1)
            );
        }
        let stand_in = weakest_column(catalogue, quality)
            .context("no expert of the catalogue has a column in the quality table")?;
        let mut by_capacity: Vec<usize> = (0..catalogue.experts.len()).collect();
        by_capacity.sort_by(|&a, &b| {
            capacity(&catalogue.experts[a]).total_cmp(&capacity(&catalogue.experts[b]))
        });
        let mut replaced: Vec<usize> = by_capacity.into_iter().take(n).collect();
        replaced.sort_unstable_by(|a, b| b.cmp(a));
        let mut experts = Vec::with_capacity(n);
        for (i, index) in replaced.into_iter().enumerate() {
            let gone = catalogue.experts.remove(index);
            experts.push((
                ExpertProfile {
                    name: format!("smollm2-local-{i}"),
                    model: stand_in.clone(),
                    hardware: format!(
                        "SmolLM2-135M-Instruct Q4_1 ({}) on this machine's CPU: real",
                        engine.describe()
                    ),
                    source: format!("measured at start; replaces {}", gone.name),
                    max_slots: engine.slots(),
                    kv_tokens: u64::from(CONTEXT_TOKENS) * u64::from(engine.slots()),
                    // Measured when the server starts (`RealServers::start`).
                    latency: LatencyModel {
                        prefill_tok_s: 1.0,
                        prefill_overhead_s: 0.0,
                        decode_t0_s: 1.0,
                        decode_d_s_per_seq: 0.0,
                        decode_e_s_per_ctx_token: 0.0,
                    },
                },
                gone.name,
            ));
        }
        experts.reverse();
        Ok(Self { engine, experts })
    }

    /// A line for the demo's notes.
    pub(crate) fn note(&self) -> String {
        let each: Vec<String> = self
            .experts
            .iter()
            .map(|(p, gone)| format!("{} replaces {gone}", p.name))
            .collect();
        format!(
            "real experts: {} ({}); each is a llama.cpp server ({}, SmolLM2-135M-Instruct Q4_1 from {}) whose latency prior is measured at start (one {PROBE_PROMPT}-token prompt) and calibrated online by the daemon; the quality table has no SmolLM2-135M, so the devices score its answers as `{}`, the catalogue's weakest edge model (optimistic: a 135M model answers worse); time runs at 1x (real servers cannot be sped up), SLOs unscaled, and every prompt is unique (a real prompt cache would otherwise skip its prefill)",
            self.experts.len(),
            each.join(", "),
            self.engine.describe(),
            self.engine.model().display(),
            self.experts.first().map_or("", |(p, _)| p.model.as_str())
        )
    }
}

/// Decode capacity of an emulated expert, tokens per second at a full batch (roughly).
fn capacity(p: &ExpertProfile) -> f64 {
    f64::from(p.max_slots) / p.latency.decode_t0_s.max(1e-9)
}

/// The quality column, among the catalogue's experts' models, with the lowest mean prior.
fn weakest_column(catalogue: &Catalogue, quality: &QualityTable) -> Option<String> {
    catalogue
        .experts
        .iter()
        .filter_map(|e| {
            let m = quality.model_index(&e.model)?;
            let priors = quality.calibration_priors(m);
            Some((
                priors.iter().sum::<f64>() / priors.len() as f64,
                e.model.clone(),
            ))
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, m)| m)
}

/// The real servers of one run, each with the latency model measured at its start; stopped
/// on drop.
#[derive(Debug)]
pub(crate) struct RealServers {
    pub(crate) servers: Vec<(ExpertProfile, LlamaServer)>,
    /// The daemon's `kind` of these servers.
    pub(crate) kind: &'static str,
}

impl RealServers {
    /// Starts one server per planned expert (logs in `dir`), waits until each serves, and
    /// measures each: one streamed request of a unique 256-token prompt after a warm-up one.
    pub(crate) async fn start(site: &RealSite, dir: &Path) -> anyhow::Result<Self> {
        let mut servers = Vec::with_capacity(site.experts.len());
        for (profile, _) in &site.experts {
            let log = dir.join(format!("{}.log", profile.name));
            let mut server = match &site.engine {
                RealEngine::Batching(engine) => {
                    let options = BatchingOptions {
                        ctx_tokens_per_slot: CONTEXT_TOKENS,
                        ..BatchingOptions::new(BATCHING_SLOTS, 1)
                    };
                    LlamaServer::start_batching(engine, &options, &log)?
                }
                RealEngine::OneAtATime(engine) => {
                    let options = ServerOptions {
                        ctx_tokens: CONTEXT_TOKENS,
                        ..ServerOptions::default()
                    };
                    LlamaServer::start(engine, &options, &log)?
                }
            };
            tokio::task::block_in_place(|| server.wait_ready(Duration::from_secs(120)))?;
            let latency = measure(&profile.name, &server.base_url())
                .await
                .with_context(|| format!("{}: measuring the real server", profile.name))?;
            eprintln!(
                "{}: real server on {} (log {}): prefill {:.0} tok/s, decode step {:.1} ms",
                profile.name,
                server.base_url(),
                log.display(),
                latency.prefill_tok_s,
                latency.decode_t0_s * 1e3
            );
            servers.push((
                ExpertProfile {
                    latency,
                    ..profile.clone()
                },
                server,
            ));
        }
        Ok(Self {
            servers,
            kind: site.engine.kind(),
        })
    }
}

/// The latency model of a real server from one request: prefill = prompt tokens (as the
/// daemon counts them: 4 bytes each) over the time to first token, decode step = the mean
/// time between tokens.
async fn measure(name: &str, base_url: &str) -> anyhow::Result<LatencyModel> {
    let mut endpoint = ExpertEndpoint::new(name, base_url, SERVED_MODEL, ExpertKind::OpenAi);
    // llama-server closes a connection after each streamed answer: one connection a request.
    endpoint.reuse_connections = false;
    let client = ExpertClient::new(endpoint)?;
    let _warm_up = one_request(&client, "warm-up").await?;
    let (ttft, step) = one_request(&client, "measure").await?;
    Ok(LatencyModel {
        prefill_tok_s: f64::from(PROBE_PROMPT) / ttft.max(1e-3),
        prefill_overhead_s: 0.0,
        decode_t0_s: step.max(1e-4),
        decode_d_s_per_seq: 0.0,
        decode_e_s_per_ctx_token: 0.0,
    })
}

/// Time to first token and mean time between tokens of one streamed answer.
async fn one_request(client: &ExpertClient, tag: &str) -> anyhow::Result<(f64, f64)> {
    let prompt =
        qosroute_swarm::unique_prompt(&format!("{tag}-{}", std::process::id()), PROBE_PROMPT);
    // SmolLM2's special tokens banned (0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>): the
    // answer runs to its 32 tokens, so the decode step is measured on all of them.
    let request = ChatRequest::from_prompt(prompt, PROBE_OUTPUT).with_extra(
        "logit_bias",
        serde_json::json!({"0": -100, "1": -100, "2": -100}),
    );
    let sent = Instant::now();
    let answer = client.chat(request).await?.read_to_end().await?;
    let (Some(first), Some(step)) = (answer.first_token_at, answer.mean_step_s()) else {
        bail!(
            "{} token in the answer: too short to measure a decode step",
            answer.tokens
        );
    };
    Ok((first.saturating_duration_since(sent).as_secs_f64(), step))
}
