//! Parsing and validation of the configuration: every problem, each with its key.

use std::path::Path;

use super::*;

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
}
