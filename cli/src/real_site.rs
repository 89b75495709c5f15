//! `qosroute demo --real`: real llama.cpp servers (SmolLM2-135M, `qosroute-real-engine`) in
//! place of the weakest emulated experts of the catalogue.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use qosroute_core::{ExpertProfile, LatencyModel};
use qosroute_expert_client::{ChatRequest, ExpertClient, ExpertEndpoint, ExpertKind};
use qosroute_real_engine::{Engine, LlamaServer, SERVED_MODEL, ServerOptions};
use qosroute_sim::{Catalogue, QualityTable};
use tokio::time::Instant;

/// Context of each real server, tokens: the demo's longest prompt (2,048 tokens, the wire
/// bound) and answer (128) fit.
const CONTEXT_TOKENS: u32 = 4096;
/// The prompt and answer the start-up measurement uses, tokens.
const PROBE_PROMPT: u32 = 256;
const PROBE_OUTPUT: u32 = 32;
/// How long the daemon waits for a real server's health check: its `/v1/models` does not
/// answer while it prefills, up to about 11 s for the longest prompt on one core here.
pub(crate) const HEALTH_TIMEOUT_S: f64 = 30.0;

/// The real experts of a demo, planned before any run.
#[derive(Debug)]
pub(crate) struct RealSite {
    pub(crate) engine: Engine,
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
        let engine = Engine::find()?;
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
                        "SmolLM2-135M-Instruct Q4_1 (llama-cpp-python server, 1 thread, {CONTEXT_TOKENS}-token context) on this machine's CPU: real"
                    ),
                    source: format!("measured at start; replaces {}", gone.name),
                    max_slots: 1,
                    kv_tokens: u64::from(CONTEXT_TOKENS),
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
            "real experts: {} ({}); each is a llama.cpp server (llama-cpp-python, SmolLM2-135M-Instruct Q4_1 from {}, one thread) whose latency prior is measured at start (one {PROBE_PROMPT}-token prompt) and calibrated online by the daemon; the quality table has no SmolLM2-135M, so the devices score its answers as `{}`, the catalogue's weakest edge model (optimistic: a 135M model answers worse); time runs at 1x (real servers cannot be sped up), SLOs unscaled, and every prompt is unique (a real prompt cache would otherwise skip its prefill)",
            self.experts.len(),
            each.join(", "),
            self.engine.model.display(),
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
}

impl RealServers {
    /// Starts one server per planned expert (logs in `dir`), waits until each serves, and
    /// measures each: one streamed request of a unique 256-token prompt after a warm-up one.
    pub(crate) async fn start(site: &RealSite, dir: &Path) -> anyhow::Result<Self> {
        let mut servers = Vec::with_capacity(site.experts.len());
        for (profile, _) in &site.experts {
            let options = ServerOptions {
                ctx_tokens: CONTEXT_TOKENS,
                ..ServerOptions::default()
            };
            let log = dir.join(format!("{}.log", profile.name));
            let mut server = LlamaServer::start(&site.engine, &options, &log)?;
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
        Ok(Self { servers })
    }
}

/// The latency model of a real server from one request: prefill = prompt tokens (as the
/// daemon counts them: 4 bytes each) over the time to first token, decode step = the mean
/// time between tokens.
async fn measure(name: &str, base_url: &str) -> anyhow::Result<LatencyModel> {
    let endpoint = ExpertEndpoint::new(name, base_url, SERVED_MODEL, ExpertKind::OpenAi);
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
