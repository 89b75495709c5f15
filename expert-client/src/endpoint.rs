//! Who an expert is and how patient the client is with it: [`ExpertEndpoint`], [`ExpertKind`],
//! [`Timeouts`], [`MetricNames`].

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The inference engine serving an expert. It decides which load signals can be scraped and
/// which path answers health checks; the chat API is the same OpenAI-compatible one for all.
///
/// Serialised in lowercase (`vllm`, `llamacpp`, `sglang`, `ollama`, `openai`), as in the
/// daemon's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertKind {
    /// vLLM's OpenAI-compatible server: `/metrics`, `/health`.
    Vllm,
    /// llama.cpp's `llama-server`: `/metrics` (only with `--metrics`), `/slots`, `/health`.
    #[serde(rename = "llamacpp")]
    LlamaCpp,
    /// SGLang: `/metrics` (with `--enable-metrics`), `/health`.
    #[serde(rename = "sglang")]
    SgLang,
    /// Ollama's OpenAI-compatible endpoint: no load metrics; health is `/api/tags`.
    Ollama,
    /// Any other OpenAI-compatible API (OpenAI itself, proxies): no load metrics; health is
    /// `/v1/models`.
    #[serde(rename = "openai")]
    OpenAi,
}

impl ExpertKind {
    /// Every kind, in declaration order.
    pub const ALL: [ExpertKind; 5] = [
        ExpertKind::Vllm,
        ExpertKind::LlamaCpp,
        ExpertKind::SgLang,
        ExpertKind::Ollama,
        ExpertKind::OpenAi,
    ];

    /// The configuration name of the kind (`vllm`, `llamacpp`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ExpertKind::Vllm => "vllm",
            ExpertKind::LlamaCpp => "llamacpp",
            ExpertKind::SgLang => "sglang",
            ExpertKind::Ollama => "ollama",
            ExpertKind::OpenAi => "openai",
        }
    }

    /// The metric names this kind's `/metrics` exposes by default, current and previous engine
    /// versions included as `|`-separated alternatives (see [`MetricNames`]). Kinds without
    /// metrics (Ollama, OpenAI) get all `None`.
    pub fn default_metric_names(self) -> MetricNames {
        let names = |running: &str, waiting: &str, kv: &str| MetricNames {
            running: Some(running.to_owned()),
            waiting: Some(waiting.to_owned()),
            kv_usage: Some(kv.to_owned()),
        };
        match self {
            // vLLM renamed `gpu_cache_usage_perc` to `kv_cache_usage_perc` (V1 engine); both
            // are fractions in 0..1 despite the name.
            ExpertKind::Vllm => names(
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
                "vllm:kv_cache_usage_perc|vllm:gpu_cache_usage_perc",
            ),
            ExpertKind::SgLang => names(
                "sglang:num_running_reqs|sglang_num_running_reqs",
                "sglang:num_queue_reqs|sglang_num_queue_reqs",
                "sglang:token_usage|sglang_token_usage",
            ),
            ExpertKind::LlamaCpp => names(
                "llamacpp:requests_processing",
                "llamacpp:requests_deferred",
                "llamacpp:kv_cache_usage_ratio",
            ),
            ExpertKind::Ollama | ExpertKind::OpenAi => MetricNames::default(),
        }
    }

    /// The path of the cheapest request that proves the server is up and ready.
    pub fn health_path(self) -> &'static str {
        match self {
            ExpertKind::Vllm | ExpertKind::LlamaCpp | ExpertKind::SgLang => "/health",
            ExpertKind::Ollama => "/api/tags",
            ExpertKind::OpenAi => "/v1/models",
        }
    }
}

impl fmt::Display for ExpertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An expert kind name that is not one of `vllm`, `llamacpp`, `sglang`, `ollama`, `openai`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown expert kind `{0}` (expected vllm, llamacpp, sglang, ollama or openai)")]
pub struct UnknownExpertKind(pub String);

impl FromStr for ExpertKind {
    type Err = UnknownExpertKind;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExpertKind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownExpertKind(s.to_owned()))
    }
}

/// The Prometheus metric names read by [`crate::ExpertClient::scrape_load`].
///
/// Each name may list alternatives separated by `|` (e.g.
/// `vllm:kv_cache_usage_perc|vllm:gpu_cache_usage_perc`): the first one present in the scrape is
/// used, so one configuration works across engine versions. `None` means the signal is not read
/// (it is then reported as unknown).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricNames {
    /// Gauge of requests being decoded now (summed over label sets).
    pub running: Option<String>,
    /// Gauge of requests queued, not yet admitted (summed over label sets).
    pub waiting: Option<String>,
    /// Gauge of the KV-cache fill, a fraction in 0..1 (the maximum over label sets).
    pub kv_usage: Option<String>,
}

/// How long the client waits, per phase of a streamed answer. Every await in the client is under
/// one of these (or [`ExpertEndpoint::probe_timeout`]), so nothing hangs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing the TCP connection (and TLS), per attempt.
    pub connect: Duration,
    /// From the call of [`crate::ExpertClient::chat`] to the first token, connecting, queueing
    /// and prefill included.
    pub first_token: Duration,
    /// From one token to the next (and from the last token to the end of the stream), counted
    /// from the later of the token's arrival and the moment the caller asked for more, so a slow
    /// consumer is not blamed on the expert. Keep-alive comments do not reset it.
    pub between_tokens: Duration,
    /// The whole answer, from the call of `chat` to the end of the stream.
    pub total: Duration,
}

impl Default for Timeouts {
    /// 2 s to connect, 30 s to the first token, 10 s between tokens, 600 s in total.
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            first_token: Duration::from_secs(30),
            between_tokens: Duration::from_secs(10),
            total: Duration::from_secs(600),
        }
    }
}

/// One expert: where it is, which model it serves, what engine it runs, how patient to be.
#[derive(Clone, PartialEq, Eq)]
pub struct ExpertEndpoint {
    /// The expert's unique name (logs and metrics).
    pub name: String,
    /// Base URL of the server, e.g. `http://10.0.0.5:8000`. A trailing `/` or `/v1` is ignored
    /// (OpenAI-style base URLs often include it); any other path is kept as a prefix (reverse
    /// proxies).
    pub base_url: String,
    /// The model name sent in requests (and matched against `model_name` metric labels).
    pub model: String,
    /// Sent as `Authorization: Bearer …` when set. Never printed by `Debug`.
    pub api_key: Option<String>,
    /// The engine; decides scraping and health paths.
    pub kind: ExpertKind,
    /// Patience with streamed answers.
    pub timeouts: Timeouts,
    /// Metric names scraped for load; defaults to [`ExpertKind::default_metric_names`].
    pub metric_names: MetricNames,
    /// Deadline of a whole health check or scrape (connect, headers and body), 2 s by default.
    pub probe_timeout: Duration,
    /// Keep idle connections for the next request (HTTP/1.1 keep-alive). Off by default for
    /// llama.cpp: its server (cpp-httplib) closes the connection after every streamed answer
    /// although it advertises `Keep-Alive`, so a request sent on it at the wrong moment is lost
    /// before its first token (seen with `qosroute interference` against `llama-server`).
    pub reuse_connections: bool,
}

impl ExpertEndpoint {
    /// An endpoint with no API key, default [`Timeouts`], the kind's default metric names, a
    /// 2 s probe timeout, and connections kept for reuse unless the kind is llama.cpp.
    pub fn new(
        name: impl Into<String>,
        base_url: impl Into<String>,
        model: impl Into<String>,
        kind: ExpertKind,
    ) -> Self {
        ExpertEndpoint {
            name: name.into(),
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            kind,
            timeouts: Timeouts::default(),
            metric_names: kind.default_metric_names(),
            probe_timeout: Duration::from_secs(2),
            reuse_connections: kind != ExpertKind::LlamaCpp,
        }
    }
}

impl fmt::Debug for ExpertEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpertEndpoint")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("kind", &self.kind)
            .field("timeouts", &self.timeouts)
            .field("metric_names", &self.metric_names)
            .field("probe_timeout", &self.probe_timeout)
            .field("reuse_connections", &self.reuse_connections)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_serde_in_lowercase() {
        for kind in ExpertKind::ALL {
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
            let back: ExpertKind = serde_json::from_str(&json).unwrap();
            assert_eq!(back, kind);
            assert_eq!(kind.as_str().parse::<ExpertKind>().unwrap(), kind);
        }
        assert!(serde_json::from_str::<ExpertKind>("\"LlamaCpp\"").is_err());
        assert!("tgi".parse::<ExpertKind>().is_err());
    }

    #[test]
    fn kinds_without_metrics_have_no_metric_names() {
        assert_eq!(
            ExpertKind::Ollama.default_metric_names(),
            MetricNames::default()
        );
        assert_eq!(
            ExpertKind::OpenAi.default_metric_names(),
            MetricNames::default()
        );
        let vllm = ExpertKind::Vllm.default_metric_names();
        assert_eq!(vllm.running.as_deref(), Some("vllm:num_requests_running"));
        assert!(vllm.kv_usage.unwrap().contains("vllm:gpu_cache_usage_perc"));
    }

    #[test]
    fn debug_never_shows_the_api_key() {
        let mut e = ExpertEndpoint::new("a", "http://x", "m", ExpertKind::OpenAi);
        e.api_key = Some("sk-secret".into());
        let printed = format!("{e:?}");
        assert!(!printed.contains("sk-secret"));
        assert!(printed.contains("redacted"));
    }
}
