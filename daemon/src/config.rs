//! The daemon's one configuration file (TOML), and its validation.
//!
//! [`Config::load`] parses and validates; [`Config::validate`] returns *every* problem, each
//! with the key it is about, so `qosrouted --check-config FILE` can print them all at once.
//! The same path runs at start and on SIGHUP: a reload that fails validation changes nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

/// Collects problems with their keys.
#[derive(Debug, Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
        });
    }
    fn positive(&mut self, key: &str, v: f64) {
        if !(v.is_finite() && v > 0.0) {
            self.add(key, format!("must be a positive number, got {v}"));
        }
    }
    fn non_empty(&mut self, key: &str, v: &str) {
        if v.trim().is_empty() {
            self.add(key, "must not be empty");
        }
    }
}

/// Whether `s` may be one MQTT topic level (no separators or wildcards).
fn is_topic_level(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '+', '#', '\0'])
}

impl Config {
    /// Parses a configuration from TOML text (no validation).
    pub fn parse(text: &str, path: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: shown.clone(),
            source,
        })?;
        let config = Self::parse(&text, &shown)?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid {
                path: shown,
                problems,
            })
        }
    }

    /// Every problem of this configuration (empty: usable). Checks values, not the world:
    /// files named here are checked for existence, brokers and experts are not contacted.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Problems::default();
        if !is_topic_level(&self.site) {
            p.add(
                "site",
                "must be one MQTT topic level: non-empty, without '/', '+' or '#'",
            );
        }
        self.validate_broker(&mut p);
        if let Some(dir) = &self.policy.model_dir {
            let file = self.model_file().unwrap_or_else(|| dir.clone());
            if !file.is_file() {
                p.add(
                    "policy.model_dir",
                    format!("{} does not exist", file.display()),
                );
            }
        }
        if let Some(spec) = &self.policy.planner {
            if let Err(e) = qosroute_core::PlannerConfig::parse(spec) {
                p.add("policy.planner", e.to_string());
            }
            if self.policy.model_dir.is_some() {
                p.add(
                    "policy.planner",
                    "routes instead of the learned model: remove policy.model_dir, or this",
                );
            }
        }
        if let Some(shadow) = &self.policy.shadow {
            match shadow.strip_prefix("han:") {
                Some("") => p.add("policy.shadow", "han: needs the learned router's folder"),
                Some(_) => {}
                None => {
                    if let Err(e) = qosroute_core::baseline(shadow, 0) {
                        p.add("policy.shadow", format!("{e} (or han:DIR)"));
                    }
                }
            }
        }
        if !qosroute_core::BASELINE_NAMES.contains(&self.policy.fallback.as_str()) {
            p.add(
                "policy.fallback",
                format!(
                    "unknown policy `{}` (known: {})",
                    self.policy.fallback,
                    qosroute_core::BASELINE_NAMES.join(", ")
                ),
            );
        }
        p.positive("policy.max_decision_ms", self.policy.max_decision_ms);
        if let Err(e) = self.slo.validate() {
            p.add("slo", e.to_string());
        }
        if self.admission.max_in_flight == 0 {
            p.add("admission.max_in_flight", "must be at least 1");
        }
        p.positive(
            "admission.device_rate_per_s",
            self.admission.device_rate_per_s,
        );
        if !(self.admission.device_burst.is_finite() && self.admission.device_burst >= 1.0) {
            p.add("admission.device_burst", "must be at least 1");
        }
        if self.admission.default_max_tokens == 0 {
            p.add("admission.default_max_tokens", "must be at least 1");
        }
        let t = &self.timeouts;
        for (key, v) in [
            ("timeouts.connect_s", t.connect_s),
            ("timeouts.first_token_s", t.first_token_s),
            ("timeouts.between_tokens_s", t.between_tokens_s),
            ("timeouts.total_s", t.total_s),
        ] {
            p.positive(key, v);
        }
        p.positive(
            "telemetry.scrape_interval_s",
            self.telemetry.scrape_interval_s,
        );
        p.positive("telemetry.stale_after_s", self.telemetry.stale_after_s);
        if !(self.telemetry.host_busy_above > 0.0 && self.telemetry.host_busy_above <= 1.0) {
            p.add(
                "telemetry.host_busy_above",
                format!(
                    "must be within (0, 1], got {}",
                    self.telemetry.host_busy_above
                ),
            );
        }
        if self.telemetry.stale_after_s < self.telemetry.scrape_interval_s {
            p.add(
                "telemetry.stale_after_s",
                "must be at least telemetry.scrape_interval_s (else every signal is stale)",
            );
        }
        p.positive("shutdown.drain_deadline_s", self.shutdown.drain_deadline_s);
        p.positive("calibration.prior_weight", self.calibration.prior_weight);
        let f = self.calibration.forgetting;
        if !(f.is_finite() && f > 0.0 && f <= 1.0) {
            p.add(
                "calibration.forgetting",
                format!("must be in (0, 1], got {f}"),
            );
        }
        self.validate_experts(&mut p);
        p.0
    }

    fn validate_broker(&self, p: &mut Problems) {
        let b = &self.broker;
        match b.url.split_once("://") {
            Some(("mqtt" | "mqtts", rest)) if !rest.is_empty() => {}
            _ => p.add(
                "broker.url",
                format!(
                    "must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got `{}`",
                    b.url
                ),
            ),
        }
        if b.url.starts_with("mqtts://") && b.tls.is_none() {
            p.add(
                "broker.tls",
                "an mqtts:// URL needs [broker.tls] with ca_file",
            );
        }
        p.non_empty("broker.client_id", &b.client_id);
        if b.keep_alive_s < 5 {
            p.add("broker.keep_alive_s", "must be at least 5 seconds");
        }
        if let Some(group) = &b.shared_group
            && !is_topic_level(group)
        {
            p.add(
                "broker.shared_group",
                "must be one topic level, without '/', '+' or '#'",
            );
        }
        if let Some(var) = &b.password_env {
            if b.username.is_none() {
                p.add("broker.password_env", "needs broker.username");
            }
            if std::env::var_os(var).is_none() {
                p.add(
                    "broker.password_env",
                    format!("environment variable {var} is not set"),
                );
            }
        }
        if let Some(tls) = &b.tls {
            if !tls.ca_file.is_file() {
                p.add(
                    "broker.tls.ca_file",
                    format!("{} does not exist", tls.ca_file.display()),
                );
            }
            match (&tls.client_cert_file, &tls.client_key_file) {
                (Some(c), Some(k)) => {
                    for (key, f) in [
                        ("broker.tls.client_cert_file", c),
                        ("broker.tls.client_key_file", k),
                    ] {
                        if !f.is_file() {
                            p.add(key, format!("{} does not exist", f.display()));
                        }
                    }
                }
                (None, None) => {}
                _ => p.add(
                    "broker.tls",
                    "client_cert_file and client_key_file go together",
                ),
            }
        }
        p.positive("broker.reconnect_min_s", b.reconnect_min_s);
        if !(b.reconnect_max_s.is_finite() && b.reconnect_max_s >= b.reconnect_min_s) {
            p.add(
                "broker.reconnect_max_s",
                "must be at least broker.reconnect_min_s",
            );
        }
        if !(b.ack_deadline_s.is_finite() && b.ack_deadline_s > 0.0 && b.ack_deadline_s <= 3600.0) {
            p.add(
                "broker.ack_deadline_s",
                "must be more than 0 and at most 3600 seconds",
            );
        }
    }

    fn validate_experts(&self, p: &mut Problems) {
        if self.experts.is_empty() {
            p.add("expert", "at least one [[expert]] is needed");
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, e) in self.experts.iter().enumerate() {
            let key = |field: &str| format!("expert[{i}].{field}");
            if !seen.insert(e.name.as_str()) {
                p.add(
                    key("name"),
                    format!("`{}` is used by another expert", e.name),
                );
            }
            if let Err(err) = self.profile_of(e).validate() {
                p.add(key(err.field), err.problem);
            }
            match e.base_url.split_once("://") {
                Some(("http" | "https", rest)) if !rest.is_empty() => {}
                _ => p.add(
                    key("base_url"),
                    format!(
                        "must be http://HOST[:PORT] or https://..., got `{}`",
                        e.base_url
                    ),
                ),
            }
            p.non_empty(&key("model"), &e.model);
            if !(e.health_timeout_s > 0.0 && e.health_timeout_s <= 3600.0) {
                p.add(
                    key("health_timeout_s"),
                    format!("must be within (0, 3600] s, got {}", e.health_timeout_s),
                );
            }
            if let Some(var) = &e.api_key_env
                && std::env::var_os(var).is_none()
            {
                p.add(
                    key("api_key_env"),
                    format!("environment variable {var} is not set"),
                );
            }
            if let Some(d) = &e.device {
                if !e.local {
                    p.add(key("device"), "applies only to a `local = true` expert");
                } else if HostDevice::parse(d).is_none() {
                    p.add(
                        key("device"),
                        format!("must be `cpu`, `gpu` or `gpu:NAME`, got `{d}`"),
                    );
                }
            }
            for (task, q) in &e.quality {
                if task != "default" && task.parse::<Task>().is_err() {
                    p.add(
                        key(&format!("quality.{task}")),
                        "is not a task name (or `default`)",
                    );
                }
                if !(q.is_finite() && (0.0..=1.0).contains(q)) {
                    p.add(
                        key(&format!("quality.{task}")),
                        format!("must be within 0..=1, got {q}"),
                    );
                }
            }
        }
    }

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
mod tests {
    use super::*;

    fn example() -> String {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        std::fs::read_to_string(format!("{root}/configs/qosrouted.example.toml"))
            .unwrap()
            .replace(
                "model_dir = \"policy-model/models/han\"",
                &format!("model_dir = \"{root}/policy-model/models/han\""),
            )
    }

    #[test]
    fn the_example_config_is_valid() {
        let c = Config::parse(&example(), "example").unwrap();
        assert_eq!(c.validate(), Vec::new());
        assert_eq!(c.experts.len(), 2);
        assert_eq!(c.request_filter(), "qosroute/v1/lab/req/#");
        assert!(c.model_file().unwrap().ends_with("router-f32.onnx"));
        assert_eq!(c.profiles()[1].model, "qwen25_7b");
        assert_eq!(c.calibration, CalibrationConfig::default());
        assert_eq!(
            c.calibration.settings(),
            qosroute_core::CalibratorSettings::default()
        );
    }

    #[test]
    fn the_planner_is_checked_and_excludes_a_learned_model() {
        let with = |line: &str| {
            let text = example().replace("fallback = \"qos-greedy\"", line);
            Config::parse(&text, "planner").unwrap().validate()
        };
        // The example has a model_dir: a planner beside it is refused.
        let problems = with("planner = \"qos-planner\"\nfallback = \"qos-greedy\"");
        assert!(
            problems
                .iter()
                .any(|p| p.key == "policy.planner" && p.message.contains("model_dir")),
            "{problems:?}"
        );
        let without_model = || {
            example()
                .lines()
                .filter(|l| !l.starts_with("model_dir"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let text = without_model().replace(
            "fallback = \"qos-greedy\"",
            "planner = \"qos-planner:k=0\"\nfallback = \"qos-planner\"",
        );
        let problems = Config::parse(&text, "planner").unwrap().validate();
        let said = |key: &str, what: &str| {
            problems
                .iter()
                .any(|p| p.key == key && p.message.contains(what))
        };
        assert!(
            said("policy.planner", "k (futures) must be at least 1"),
            "{problems:?}"
        );
        assert!(
            said("policy.fallback", "unknown policy"),
            "the planner is no fallback"
        );
        let text = without_model().replace(
            "fallback = \"qos-greedy\"",
            "planner = \"qos-planner:k=16,h=20\"\nfallback = \"qos-greedy\"",
        );
        let config = Config::parse(&text, "planner").unwrap();
        assert_eq!(config.validate(), Vec::new());
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = example()
            .replace("site = \"lab\"", "site = \"a/b\"")
            .replace("url = \"mqtt://127.0.0.1:1883\"", "url = \"tcp://x\"")
            .replace("fallback = \"qos-greedy\"", "fallback = \"magic\"")
            .replace("max_in_flight = 512", "max_in_flight = 0")
            .replace("name = \"l4-qwen\"", "name = \"jetson-orin-llama\"")
            .replace(
                "base_url = \"http://10.0.0.20:8000\"",
                "base_url = \"10.0.0.20:8000\"",
            )
            .replace("prefill_tok_s = 5500.0", "prefill_tok_s = -1.0")
            .replace("mmlu = 0.71", "mmlu = 1.5")
            .replace("prior_weight = 10.0", "prior_weight = 0.0")
            .replace("kind = \"vllm\"", "kind = \"vllm\"\nhealth_timeout_s = 0.0")
            .replace("forgetting = 0.99", "forgetting = 1.5");
        let problems = Config::parse(&text, "bad").unwrap().validate();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "site",
            "broker.url",
            "policy.fallback",
            "admission.max_in_flight",
            "expert[1].name",
            "expert[1].base_url",
            "expert[1].latency.prefill_tok_s",
            "expert[1].quality.mmlu",
            "calibration.prior_weight",
            "calibration.forgetting",
            "expert[1].health_timeout_s",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        assert_eq!(problems.len(), 11, "{problems:?}");
    }

    #[test]
    fn unknown_keys_and_type_errors_fail_the_parse_with_a_location() {
        let err = Config::parse(
            &example().replace("[admission]", "[admission]\nmax_inflight = 3"),
            "x",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_inflight"), "{err}");
        let err = Config::parse(
            &example().replace("max_slots = 4", "max_slots = \"four\""),
            "x",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_slots") || err.contains("line"), "{err}");
        assert!(
            Config::parse("site = \"x\"", "x").is_err(),
            "broker is required"
        );
    }

    #[test]
    fn missing_model_and_unset_variables_are_problems() {
        let text = example().replace(
            "# username = \"qosrouted\"\n# password_env = \"QOSROUTE_MQTT_PASSWORD\"",
            "username = \"u\"\npassword_env = \"QOSROUTE_TEST_SURELY_UNSET_VARIABLE\"",
        );
        let mut c = Config::parse(&text, "x").unwrap();
        c.policy.model_dir = Some(PathBuf::from("/nonexistent"));
        let keys: Vec<String> = c.validate().into_iter().map(|p| p.key).collect();
        assert!(keys.contains(&"policy.model_dir".to_owned()), "{keys:?}");
        assert!(keys.contains(&"broker.password_env".to_owned()), "{keys:?}");
    }

    #[test]
    fn a_local_experts_device_is_checked_and_resolved() {
        let c = Config::parse(&example(), "x").unwrap();
        assert_eq!(
            c.experts[0].host_device(),
            Some(HostDevice::Gpu(String::new()))
        );
        assert_eq!(c.experts[1].host_device(), None, "not local");
        let text = example()
            .replace("device = \"gpu\"", "device = \"tpu\"")
            .replace("host_busy_above = 0.9", "host_busy_above = 1.5");
        let keys: Vec<String> = Config::parse(&text, "x")
            .unwrap()
            .validate()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert!(keys.contains(&"expert[0].device".to_owned()), "{keys:?}");
        assert!(
            keys.contains(&"telemetry.host_busy_above".to_owned()),
            "{keys:?}"
        );
        let text = example().replace("local = true\n", "");
        let keys: Vec<String> = Config::parse(&text, "x")
            .unwrap()
            .validate()
            .into_iter()
            .map(|p| p.key)
            .collect();
        assert_eq!(
            keys,
            vec!["expert[0].device".to_owned()],
            "device needs local"
        );
        assert_eq!(
            HostDevice::parse("gpu:nvml1"),
            Some(HostDevice::Gpu("nvml1".into()))
        );
        assert_eq!(HostDevice::parse("cpu"), Some(HostDevice::Cpu));
        assert_eq!(HostDevice::parse("gpu:"), None);
    }

    #[test]
    fn a_shadow_policy_must_name_a_policy() {
        let with = |shadow: &str| {
            let text = example().replace(
                "fallback = \"qos-greedy\"",
                &format!("shadow = \"{shadow}\"\nfallback = \"qos-greedy\""),
            );
            Config::parse(&text, "shadow")
                .unwrap()
                .validate()
                .into_iter()
                .filter(|p| p.key == "policy.shadow")
                .map(|p| p.message)
                .collect::<Vec<_>>()
        };
        assert!(with("least-loaded").is_empty());
        assert!(with("qos-planner:k=8").is_empty());
        assert!(with("han:/opt/models/candidate").is_empty());
        assert_eq!(with("nonsense").len(), 1, "{:?}", with("nonsense"));
        assert!(with("han:")[0].contains("folder"), "{:?}", with("han:"));
        assert!(
            with("qos-planner:k=0")[0].contains("k"),
            "{:?}",
            with("qos-planner:k=0")
        );
    }
}
