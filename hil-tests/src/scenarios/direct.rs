//! What the real-engine scenarios (9 and 10) share: a real server measured directly, with the
//! prompt a device sends, and the daemon's latency model of it as exported on `/metrics`.

use std::sync::Arc;

use anyhow::{Context, bail};
use qosroute_core::LatencyModel;
use qosroute_expert_client::{ChatRequest, ExpertClient};
use qosroute_sim::{Catalogue, QualityTable};
use tokio::time::Instant;

use crate::rig::{self, DaemonConfig, Expert, ExpertEntry};

/// The emulated experts `names` of `catalogue` beside the real one, at their hardware's speed
/// (real time), seeded from `seed`.
pub(super) fn emulated(
    names: &[&str],
    catalogue: &Catalogue,
    quality: &Arc<QualityTable>,
    seed: u64,
) -> anyhow::Result<Vec<Expert>> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let profile = catalogue
                .experts
                .iter()
                .find(|p| p.name == *name)
                .cloned()
                .with_context(|| format!("{name} is not in edge-mixed"))?;
            Expert::start(profile, 1.0, quality, seed + i as u64)
        })
        .collect()
}

/// What one direct request to the server measured.
#[derive(Debug, Clone, Copy)]
pub(super) struct Measured {
    pub(super) ttft_s: f64,
    pub(super) step_s: f64,
    pub(super) tokens: u32,
}

/// One streamed `request` straight to the server: time to first token and mean time between
/// tokens; an answer of fewer than `min_tokens` tokens, or without text, is an error. Tokens
/// are the server's `usage.completion_tokens` when it reports them: a content delta may carry
/// several tokens (llama-server merges the tokens of one multi-byte character, e.g. an emoji),
/// so counting deltas would make the step too long and the answer look short.
pub(super) async fn measure(
    client: &ExpertClient,
    request: ChatRequest,
    min_tokens: u32,
) -> anyhow::Result<Measured> {
    let sent = Instant::now();
    let answer = client
        .chat(request)
        .await
        .context("direct request")?
        .read_to_end()
        .await
        .context("direct stream")?;
    let tokens = answer
        .usage
        .map(|u| u.completion_tokens)
        .filter(|&n| n >= answer.tokens)
        .unwrap_or(answer.tokens);
    let (Some(first), Some(last)) = (answer.first_token_at, answer.last_token_at) else {
        bail!("the server answered no token");
    };
    if tokens < min_tokens.max(3) || answer.text.trim().is_empty() {
        bail!(
            "the server answered {tokens} tokens ({:?}), fewer than {min_tokens}: too short to measure",
            answer.text
        );
    }
    Ok(Measured {
        ttft_s: first.saturating_duration_since(sent).as_secs_f64(),
        step_s: last.saturating_duration_since(first).as_secs_f64() / f64::from(tokens - 1),
        tokens,
    })
}

pub(super) fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

pub(super) fn relative_error(predicted: f64, reference: f64) -> f64 {
    (predicted - reference).abs() / reference.abs().max(1e-12)
}

/// The latency model of `expert` as the daemon exports it on `/metrics` (`None` until every
/// term but the prefill's fixed part is there).
pub(super) fn exported_model(metrics: &str, expert: &str) -> Option<LatencyModel> {
    let value = |name: &str| {
        let prefix = format!("{name}{{expert=\"{expert}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(LatencyModel {
        prefill_tok_s: value("qosroute_expert_prefill_tokens_per_second")?,
        prefill_overhead_s: value("qosroute_expert_prefill_overhead_seconds").unwrap_or(0.0),
        decode_t0_s: value("qosroute_expert_decode_t0_seconds")?,
        decode_d_s_per_seq: value("qosroute_expert_decode_d_seconds_per_sequence")?,
        decode_e_s_per_ctx_token: value("qosroute_expert_decode_e_seconds_per_context_token")?,
    })
}

/// The daemon of a scenario with a real engine (9 and 10): `qos-greedy` (the learned router is
/// not what these check), one SLO for every task, a clean session, generous token timeouts (a
/// CPU engine's prefill takes seconds), experts stale after 10 s without an answer, and the
/// calibrator's prior worth `prior_weight` observations.
pub(crate) fn real_engine_daemon(
    site: &str,
    client_id: &str,
    broker_url: &str,
    slo_s_per_token: f64,
    entries: Vec<ExpertEntry>,
    scrape_interval_s: f64,
    prior_weight: f64,
) -> DaemonConfig {
    let mut config = DaemonConfig::new(
        site,
        broker_url,
        client_id,
        &qosroute_core::SloTable {
            default_s_per_token: slo_s_per_token,
            per_task: Default::default(),
        },
        1.0,
        entries,
    );
    config.session_expiry_s = 0;
    config.policy = rig::Policy::Baseline("qos-greedy");
    config.scrape_interval_s = scrape_interval_s;
    config.stale_after_s = 10.0;
    config.first_token_s = 30.0;
    config.between_tokens_s = 10.0;
    config.calibration_prior_weight = prior_weight;
    config
}
