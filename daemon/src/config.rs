//! The daemon's one configuration file (TOML), and its validation.
//!
//! [`Config::load`] parses and validates; [`Config::validate`] returns *every* problem, each
//! with the key it is about, so `qosrouted --check-config FILE` can print them all at once.
//! The same path runs at start and on SIGHUP: a reload that fails validation changes nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use qosroute_core::{ExpertProfile, LatencyModel, SloTable, Task};
use qosroute_expert_client::ExpertKind;
use serde::Deserialize;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The file parsed but some values are unusable.
    #[error("{path}: {} problem(s):\n{}", problems.len(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// The file.
        path: String,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

/// One problem of a configuration: the key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `expert[2].base_url`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The site name: the `{site}` segment of every topic (`qosroute/v1/{site}/...`).
    pub site: String,
    /// The MQTT broker.
    pub broker: BrokerConfig,
    /// The routing policy.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Latency targets per task, seconds per output token (a request may carry its own).
    #[serde(default)]
    pub slo: SloTable,
    /// Admission control.
    #[serde(default)]
    pub admission: AdmissionConfig,
    /// Timeouts towards the experts.
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    /// The Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Host telemetry and load scraping.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Logging.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Draining on SIGTERM.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Online calibration of the experts' latency models.
    #[serde(default)]
    pub calibration: CalibrationConfig,
    /// The experts, in the order the policy indexes them.
    #[serde(rename = "expert", default)]
    pub experts: Vec<ExpertConfig>,
}

/// The broker connection. The daemon speaks MQTT 5 (response topics, correlation data,
/// content types, message expiry); devices may use MQTT 3.1.1 on the same broker.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    /// `mqtt://host:port` or `mqtts://host:port` (TLS).
    pub url: String,
    /// MQTT client id; with a persistent session it must be stable across restarts.
    pub client_id: String,
    /// Keep-alive interval, seconds.
    #[serde(default = "default_keep_alive_s")]
    pub keep_alive_s: u64,
    /// Session expiry (MQTT 5) in seconds; 0 = clean session. The session keeps QoS 1
    /// requests for the daemon while it reconnects.
    #[serde(default = "default_session_expiry_s")]
    pub session_expiry_s: u32,
    /// Shared-subscription group: several gateways subscribed as `$share/{group}/...` split
    /// the requests between them. With `session_expiry_s > 0` the broker (mosquitto 2.0) keeps
    /// sending a dead member its share, held in its session until it returns (tested); with 0
    /// the survivors take everything at once, and what the dead member had in flight is lost.
    #[serde(default)]
    pub shared_group: Option<String>,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// Environment variable that holds the password (never the password itself).
    #[serde(default)]
    pub password_env: Option<String>,
    /// TLS settings (with an `mqtts://` URL).
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// First reconnect delay, seconds; doubles up to `reconnect_max_s`.
    #[serde(default = "default_reconnect_min_s")]
    pub reconnect_min_s: f64,
    /// Longest reconnect delay, seconds.
    #[serde(default = "default_reconnect_max_s")]
    pub reconnect_max_s: f64,
    /// Requests are acknowledged to the broker when their outcome is final, in the order
    /// they arrived (as MQTT requires), so a daemon that dies mid-request gets them again
    /// from its session. A request still running after this many seconds is acknowledged
    /// anyway, so that the requests after it can be (also when three quarters of the
    /// broker's window wait): a crash after that loses it rather than holding the others.
    /// Longer keeps the guarantee for longer requests; it also means more finished requests
    /// not yet acknowledged, which a crash makes the broker deliver (and the next daemon
    /// answer) again.
    #[serde(default = "default_ack_deadline_s")]
    pub ack_deadline_s: f64,
}

/// TLS towards the broker (rustls).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA(s) that sign the broker's certificate.
    pub ca_file: PathBuf,
    /// PEM client certificate (with `client_key_file`) for certificate authentication.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of the client certificate.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

/// Which ONNX variant of the learned router to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ModelVariant {
    /// f32 (the default: faster and exact here).
    #[default]
    F32,
    /// int8 (MatMul weights quantised).
    Int8,
}

/// The routing policy.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Folder of the learned router (`router-f32.onnx`, `router-int8.onnx`), or none to route
    /// with `fallback` only.
    #[serde(default)]
    pub model_dir: Option<PathBuf>,
    /// Which variant to load.
    #[serde(default)]
    pub variant: ModelVariant,
    /// Route with the Monte-Carlo planner instead of a learned model:
    /// `"qos-planner"` or `"qos-planner:k=16,h=20,window=256,z=1,budget_ms=5"` (see
    /// `qosroute_core::planner`). Without `budget_ms` its time budget per decision is
    /// `max_decision_ms`. Exclusive with `model_dir`.
    #[serde(default)]
    pub planner: Option<String>,
    /// A policy that decides beside the serving one on every request, without affecting it,
    /// so that operators can see how a model would route before adopting it: a hand-made
    /// policy's name, a planner spec, or `han:DIR` (a learned router's folder, its
    /// `router-f32.onnx`). Agreements, disagreements and the predicted QoS difference are in
    /// the metrics; a sample of disagreements is logged.
    #[serde(default)]
    pub shadow: Option<String>,
    /// The hand-made policy used when the model is missing, invalid or too slow.
    #[serde(default = "default_fallback")]
    pub fallback: String,
    /// A decision slower than this falls back (and is counted), milliseconds.
    #[serde(default = "default_max_decision_ms")]
    pub max_decision_ms: f64,
}

/// Admission control.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Requests admitted and not yet answered, at most; beyond, requests are shed with an
    /// explicit `overloaded` reply.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Sustained requests per second per device.
    #[serde(default = "default_device_rate")]
    pub device_rate_per_s: f64,
    /// Burst allowance per device.
    #[serde(default = "default_device_burst")]
    pub device_burst: f64,
    /// Tokens a request may ask for when it gives no `max_tokens` of its own.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
}

/// Timeouts towards the experts, seconds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutConfig {
    /// TCP (and TLS) connect.
    #[serde(default = "default_connect_s")]
    pub connect_s: f64,
    /// From the request to the first token.
    #[serde(default = "default_first_token_s")]
    pub first_token_s: f64,
    /// Between two tokens.
    #[serde(default = "default_between_tokens_s")]
    pub between_tokens_s: f64,
    /// A whole request.
    #[serde(default = "default_total_s")]
    pub total_s: f64,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of `GET /metrics`; none disables it.
    #[serde(default = "default_metrics_listen")]
    pub listen: Option<SocketAddr>,
}

/// Host telemetry and expert load scraping.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// How often experts are scraped and health-checked, seconds.
    #[serde(default = "default_scrape_interval_s")]
    pub scrape_interval_s: f64,
    /// Signals older than this are stale: the expert counts as saturated, never idle.
    #[serde(default = "default_stale_after_s")]
    pub stale_after_s: f64,
    /// A local expert's device (CPU or GPU) busier than this fraction while none of this
    /// daemon's requests run on it is taken by another process: the expert counts as saturated.
    #[serde(default = "default_host_busy_above")]
    pub host_busy_above: f64,
    /// Which host telemetry providers may be used (`[telemetry.host]`: `sysfs_root`,
    /// `enable_nvml`, `enable_jetson`, `enable_rpi`). Host telemetry runs only when an expert is
    /// `local`.
    #[serde(default)]
    pub host: qosroute_telemetry::TelemetryOptions,
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LoggingConfig {
    /// Log prompts and answers (off: they never reach the logs).
    #[serde(default)]
    pub log_prompts: bool,
    /// Log as JSON lines instead of text.
    #[serde(default)]
    pub json: bool,
}

/// Draining on SIGTERM.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// In-flight requests get this long to finish; the rest get an error reply.
    #[serde(default = "default_drain_s")]
    pub drain_deadline_s: f64,
}

/// Online calibration of every expert's latency model from the times the daemon observes
/// (`qosroute_core::calibration`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationConfig {
    /// What an expert's configured `[expert.latency]` is worth, in observations of 512-token
    /// prompts (prefill) and of decode steps, when the daemon starts: 10 (the default) suits a
    /// model measured on that expert (`qosroute profile`); a guess from published figures
    /// deserves 1 or 2, so that the expert's real speed takes over within tens of requests
    /// (a prefill observation of a `p`-token prompt counts `(p / 512)^2` of one).
    #[serde(default = "default_prior_weight")]
    pub prior_weight: f64,
    /// Forgetting per observation, in (0, 1]: the memory is about `1 / (1 - forgetting)`
    /// observations (100 at the default 0.99); 1 never forgets.
    #[serde(default = "default_forgetting")]
    pub forgetting: f64,
}

impl CalibrationConfig {
    /// The calibrator's settings: these two, the rest at their defaults.
    pub fn settings(&self) -> qosroute_core::CalibratorSettings {
        qosroute_core::CalibratorSettings {
            prior_weight: self.prior_weight,
            forgetting: self.forgetting,
            ..qosroute_core::CalibratorSettings::default()
        }
    }
}

impl Default for CalibrationConfig {
    fn default() -> Self {
        Self {
            prior_weight: default_prior_weight(),
            forgetting: default_forgetting(),
        }
    }
}

fn default_prior_weight() -> f64 {
    qosroute_core::CalibratorSettings::default().prior_weight
}

fn default_forgetting() -> f64 {
    qosroute_core::CalibratorSettings::default().forgetting
}

/// One expert: where it is, what it serves, and the profile the policy reasons with.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertConfig {
    /// Unique name (metrics, logs, replies).
    pub name: String,
    /// Base URL of the OpenAI-compatible API, e.g. `http://10.0.0.5:8000`.
    pub base_url: String,
    /// The model name the server expects in requests.
    pub model: String,
    /// Which engine serves it (decides which metrics are scraped).
    pub kind: ExpertKind,
    /// Environment variable holding the API key, if the server wants one.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The quality-table column of this model, for quality priors (e.g. `llama31_8b`);
    /// defaults to `model`.
    #[serde(default)]
    pub quality_model: Option<String>,
    /// Quality prior per task (0..1); `default` for tasks not listed.
    #[serde(default)]
    pub quality: BTreeMap<String, f64>,
    /// Most sequences the engine runs at once.
    pub max_slots: u32,
    /// KV-cache capacity in tokens.
    pub kv_tokens: u64,
    /// Latency model of this expert on its hardware (refitted online).
    pub latency: LatencyModel,
    /// Hardware description, for people.
    #[serde(default)]
    pub hardware: String,
    /// Metric names to scrape, overriding the kind's defaults.
    #[serde(default)]
    pub metrics: Option<MetricNamesConfig>,
    /// The expert runs on this host, so host telemetry (CPU, GPU) applies to it.
    #[serde(default)]
    pub local: bool,
    /// For a local expert, the device it computes on: `cpu` (the default), `gpu` (the first
    /// GPU host telemetry finds) or `gpu:NAME` (the GPU whose telemetry name starts with
    /// NAME, e.g. `gpu:nvml1` or `gpu:tegra`). Its load unknown or stale counts as saturated.
    #[serde(default)]
    pub device: Option<String>,
    /// Send the `qosroute` extension object (the request's task) with each chat completion:
    /// for experts that understand it (`qosroute emulate` answers with the quality its model
    /// has on the task, which feeds `qosroute_qos_*`). Real servers may refuse unknown fields.
    #[serde(default)]
    pub qosroute_extension: bool,
    /// Deadline of one health check or load scrape, seconds (default 2). A server whose health
    /// endpoint does not answer while it computes (llama-cpp-python's stalls for the whole
    /// prefill of a prompt) needs about its longest prefill here, or it is taken for down
    /// while it works.
    #[serde(default = "default_health_timeout_s")]
    pub health_timeout_s: f64,
}

fn default_health_timeout_s() -> f64 {
    2.0
}

/// The device a local expert computes on, as host telemetry names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostDevice {
    /// The host's CPUs.
    Cpu,
    /// A GPU whose telemetry name starts with this prefix (empty: the first GPU).
    Gpu(String),
}

impl HostDevice {
    /// Parses `cpu`, `gpu` or `gpu:NAME`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Self::Cpu),
            "gpu" => Some(Self::Gpu(String::new())),
            _ => s
                .strip_prefix("gpu:")
                .filter(|n| !n.is_empty())
                .map(|n| Self::Gpu(n.to_owned())),
        }
    }
}

impl ExpertConfig {
    /// The host device whose load applies to this expert: `None` unless it is local.
    pub fn host_device(&self) -> Option<HostDevice> {
        if !self.local {
            return None;
        }
        match &self.device {
            None => Some(HostDevice::Cpu),
            Some(d) => HostDevice::parse(d),
        }
    }
}

/// Metric names of an engine's `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricNamesConfig {
    /// Requests running.
    pub running: Option<String>,
    /// Requests waiting.
    pub waiting: Option<String>,
    /// KV-cache usage, 0..1.
    pub kv_usage: Option<String>,
}

fn default_host_busy_above() -> f64 {
    0.9
}
fn default_keep_alive_s() -> u64 {
    30
}
fn default_session_expiry_s() -> u32 {
    3600
}
fn default_reconnect_min_s() -> f64 {
    0.2
}
fn default_reconnect_max_s() -> f64 {
    30.0
}
fn default_ack_deadline_s() -> f64 {
    5.0
}
fn default_fallback() -> String {
    "qos-greedy".into()
}
fn default_max_decision_ms() -> f64 {
    5.0
}
fn default_max_in_flight() -> usize {
    512
}
fn default_device_rate() -> f64 {
    20.0
}
fn default_device_burst() -> f64 {
    40.0
}
fn default_max_tokens() -> u32 {
    256
}
fn default_connect_s() -> f64 {
    2.0
}
fn default_first_token_s() -> f64 {
    30.0
}
fn default_between_tokens_s() -> f64 {
    10.0
}
fn default_total_s() -> f64 {
    300.0
}
fn default_metrics_listen() -> Option<SocketAddr> {
    Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
}
fn default_scrape_interval_s() -> f64 {
    1.0
}
fn default_stale_after_s() -> f64 {
    5.0
}
fn default_drain_s() -> f64 {
    20.0
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            model_dir: None,
            variant: ModelVariant::default(),
            planner: None,
            shadow: None,
            fallback: default_fallback(),
            max_decision_ms: default_max_decision_ms(),
        }
    }
}
impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_in_flight: default_max_in_flight(),
            device_rate_per_s: default_device_rate(),
            device_burst: default_device_burst(),
            default_max_tokens: default_max_tokens(),
        }
    }
}
impl Default for TimeoutConfig {
    fn default() -> Self {
        Self {
            connect_s: default_connect_s(),
            first_token_s: default_first_token_s(),
            between_tokens_s: default_between_tokens_s(),
            total_s: default_total_s(),
        }
    }
}
impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: default_metrics_listen(),
        }
    }
}
impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            scrape_interval_s: default_scrape_interval_s(),
            stale_after_s: default_stale_after_s(),
            host_busy_above: default_host_busy_above(),
            host: qosroute_telemetry::TelemetryOptions::default(),
        }
    }
}
impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_deadline_s: default_drain_s(),
        }
    }
}

mod validate;

impl Config {
    /// The model file the policy loads, if a model folder is configured.
    pub fn model_file(&self) -> Option<PathBuf> {
        self.policy.model_dir.as_ref().map(|d| {
            d.join(match self.policy.variant {
                ModelVariant::F32 => "router-f32.onnx",
                ModelVariant::Int8 => "router-int8.onnx",
            })
        })
    }

    /// The static profile of an expert, as the policy reasons with it.
    pub fn profile_of(&self, e: &ExpertConfig) -> ExpertProfile {
        ExpertProfile {
            name: e.name.clone(),
            model: e.quality_model.clone().unwrap_or_else(|| e.model.clone()),
            hardware: e.hardware.clone(),
            source: "config".into(),
            max_slots: e.max_slots,
            kv_tokens: e.kv_tokens,
            latency: e.latency,
        }
    }

    /// Whether an expert's engine exposes its load (running and waiting requests) to scrape:
    /// by its kind's defaults, or by configured metric names.
    pub fn reports_load(e: &ExpertConfig) -> bool {
        let defaults = e.kind.default_metric_names();
        let configured = e
            .metrics
            .as_ref()
            .is_some_and(|m| m.running.is_some() || m.waiting.is_some());
        configured || defaults.running.is_some() || defaults.waiting.is_some()
    }

    /// Profiles of every expert, in policy order.
    pub fn profiles(&self) -> Vec<Arc<ExpertProfile>> {
        self.experts
            .iter()
            .map(|e| Arc::new(self.profile_of(e)))
            .collect()
    }

    /// The topic filter the daemon subscribes to for requests.
    pub fn request_filter(&self) -> String {
        let topic = format!("qosroute/v1/{}/req/#", self.site);
        match &self.broker.shared_group {
            Some(group) => format!("$share/{group}/{topic}"),
            None => topic,
        }
    }

    /// The topic filter of device feedback.
    pub fn feedback_filter(&self) -> String {
        let topic = format!("qosroute/v1/{}/feedback/#", self.site);
        match &self.broker.shared_group {
            Some(group) => format!("$share/{group}/{topic}"),
            None => topic,
        }
    }
}

#[cfg(test)]
mod tests;
