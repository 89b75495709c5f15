//! The daemon's Prometheus metrics: counters and histograms in atomics, rendered as the text
//! exposition format on `GET /metrics` by a minimal HTTP/1.1 responder.

use qosroute_telemetry::HostSample;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered in full.
    Completed,
    /// The policy found no expert that could serve it well (explicit reply).
    Rejected,
    /// Shed: the daemon was at its in-flight bound (explicit reply).
    Shed,
    /// The device exceeded its rate (explicit reply).
    RateLimited,
    /// The payload could not be decoded or was invalid (error reply where possible).
    Malformed,
    /// The expert failed after tokens were delivered, or every retry failed.
    ExpertFailed,
    /// The deadline or message expiry had passed.
    Expired,
    /// Refused or cut while draining.
    ShuttingDown,
}

impl Outcome {
    /// Every outcome, in exposition order.
    pub const ALL: [Outcome; 8] = [
        Outcome::Completed,
        Outcome::Rejected,
        Outcome::Shed,
        Outcome::RateLimited,
        Outcome::Malformed,
        Outcome::ExpertFailed,
        Outcome::Expired,
        Outcome::ShuttingDown,
    ];

    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Rejected => "rejected",
            Outcome::Shed => "shed",
            Outcome::RateLimited => "rate_limited",
            Outcome::Malformed => "malformed",
            Outcome::ExpertFailed => "expert_failed",
            Outcome::Expired => "expired",
            Outcome::ShuttingDown => "shutting_down",
        }
    }
}

/// Upper bounds of the decision-latency histogram, seconds.
pub const DECISION_BUCKETS_S: [f64; 16] = [
    25e-6, 50e-6, 100e-6, 150e-6, 200e-6, 300e-6, 400e-6, 600e-6, 800e-6, 1.2e-3, 1.6e-3, 3.2e-3,
    6.4e-3, 12.8e-3, 25.6e-3, 51.2e-3,
];

/// A fixed-bucket histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; DECISION_BUCKETS_S.len() + 1],
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one observation in seconds.
    pub fn observe(&self, seconds: f64) {
        let i = DECISION_BUCKETS_S
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(DECISION_BUCKETS_S.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add((seconds.max(0.0) * 1e9) as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, out: &mut String) {
        let mut cumulative = 0;
        for (i, bound) in DECISION_BUCKETS_S.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.counts[DECISION_BUCKETS_S.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// The shadow policy's counts in Prometheus text: decisions by agreement with the serving
/// policy, and per expert the shadow chose when it disagreed (`reject` for a rejection) the
/// count and the sum of its one-step predicted QoS gain over the serving decision.
pub fn render_shadow(stats: &crate::router::ShadowStats, experts: &[String]) -> String {
    let mut out = String::new();
    out.push_str("# HELP qosroute_shadow_decisions_total Decisions of the shadow policy, by agreement with the serving policy.\n# TYPE qosroute_shadow_decisions_total counter\n");
    out.push_str(&format!(
        "qosroute_shadow_decisions_total{{agreement=\"agree\"}} {}\nqosroute_shadow_decisions_total{{agreement=\"disagree\"}} {}\n",
        stats.agreements, stats.disagreements
    ));
    out.push_str("# HELP qosroute_shadow_disagreements_total Disagreements, by the shadow policy's choice.\n# TYPE qosroute_shadow_disagreements_total counter\n");
    let mut gains = String::from(
        "# HELP qosroute_shadow_predicted_qos_gain_sum Sum over disagreements of the shadow choice's predicted QoS minus the serving choice's (one-step impact estimate), by the shadow policy's choice.\n# TYPE qosroute_shadow_predicted_qos_gain_sum counter\n",
    );
    for (i, (count, gain)) in stats.by_choice.iter().enumerate() {
        let label = experts.get(i).map_or("reject", String::as_str);
        let label = escape(label);
        out.push_str(&format!(
            "qosroute_shadow_disagreements_total{{choice=\"{label}\"}} {count}\n"
        ));
        gains.push_str(&format!(
            "qosroute_shadow_predicted_qos_gain_sum{{choice=\"{label}\"}} {gain}\n"
        ));
    }
    out + &gains
}

/// Every metric of the daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    outcomes: [AtomicU64; Outcome::ALL.len()],
    /// Time to decide (encode + policy), seconds.
    pub decision_seconds: Histogram,
    /// Decisions that fell back to the hand-made policy.
    pub fallbacks: AtomicU64,
    /// Planner decisions whose time budget ran out (decided on the futures played so far, or
    /// fell back when they were too few).
    pub planner_budget_exhausted: AtomicU64,
    /// Requests retried on another expert before any token reached the device.
    pub retries: AtomicU64,
    /// Completed requests whose per-token latency missed their SLO.
    pub slo_violations: AtomicU64,
    /// Sum of realised QoS (quality when the SLO was met, else 0) over completed requests
    /// whose expert reported a quality, in millionths.
    qos_sum_micro: AtomicU64,
    /// Completed requests whose expert reported a quality.
    pub qos_count: AtomicU64,
    /// Connections (re)established to the broker.
    pub mqtt_connections: AtomicU64,
    /// Replies that could not be published (the broker link was gone for good).
    pub replies_dropped: AtomicU64,
    /// Requests acknowledged to the broker before their outcome was final (the ack deadline,
    /// or the broker's window nearly full: see `broker.ack_deadline_s`).
    pub acks_early: AtomicU64,
    /// Device feedback messages applied.
    pub feedback: AtomicU64,
    /// The router's predictions against what completed requests measured.
    pub prediction_errors: crate::prediction_error::PredictionErrors,
    /// Completed requests, SLO misses and realised QoS per expert (by name: a reload that
    /// keeps an expert keeps its counts).
    per_expert: std::sync::Mutex<std::collections::BTreeMap<String, ExpertOutcomes>>,
}

/// What the completed requests of one expert gave.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct ExpertOutcomes {
    completed: u64,
    slo_violations: u64,
    /// Sum of realised QoS over the completed requests whose expert reported a quality.
    qos_sum: f64,
    /// Those requests.
    qos_answers: u64,
}

impl Metrics {
    /// Counts a request's outcome.
    pub fn count(&self, outcome: Outcome) {
        if let Some(i) = Outcome::ALL.iter().position(|o| *o == outcome) {
            self.outcomes[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests with this outcome so far.
    pub fn outcomes(&self, outcome: Outcome) -> u64 {
        Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .map_or(0, |i| self.outcomes[i].load(Ordering::Relaxed))
    }

    /// Records the realised QoS of a completed request.
    pub fn qos(&self, qos: f64) {
        self.qos_sum_micro
            .fetch_add((qos.clamp(0.0, 1.0) * 1e6) as u64, Ordering::Relaxed);
        self.qos_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a completed request of `expert`: whether it met its SLO, and its realised QoS
    /// when the expert reported a quality.
    pub fn expert_completed(&self, expert: &str, slo_met: bool, qos: Option<f64>) {
        let Ok(mut books) = self.per_expert.lock() else {
            return;
        };
        let book = match books.get_mut(expert) {
            Some(b) => b,
            None => books.entry(expert.to_owned()).or_default(),
        };
        book.completed += 1;
        if !slo_met {
            book.slo_violations += 1;
        }
        if let Some(q) = qos {
            book.qos_sum += q.clamp(0.0, 1.0);
            book.qos_answers += 1;
        }
    }

    fn render_per_expert(&self, out: &mut String) {
        let Ok(books) = self.per_expert.lock() else {
            return;
        };
        type Counter = (&'static str, &'static str, fn(&ExpertOutcomes) -> f64);
        let counters: [Counter; 4] = [
            (
                "qosroute_expert_completed_total",
                "Requests completed by the expert.",
                |b| b.completed as f64,
            ),
            (
                "qosroute_expert_slo_violations_total",
                "Completed requests of the expert whose per-token latency missed their SLO.",
                |b| b.slo_violations as f64,
            ),
            (
                "qosroute_expert_qos_total",
                "Sum of realised QoS (quality if the SLO was met, else 0) over the expert's completed requests with a reported quality.",
                |b| b.qos_sum,
            ),
            (
                "qosroute_expert_qos_answers_total",
                "The expert's completed requests with a reported quality (the QoS sum's count).",
                |b| b.qos_answers as f64,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (expert, book) in books.iter() {
                let _ = writeln!(
                    out,
                    "{name}{{expert=\"{}\"}} {}",
                    escape(expert),
                    value(book)
                );
            }
        }
    }

    /// The Prometheus text exposition, with per-expert gauges from `experts`.
    pub fn render(&self, experts: &[ExpertGauges], host: Option<&HostSample>) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP qosroute_requests_total Requests by how they ended.\n");
        out.push_str("# TYPE qosroute_requests_total counter\n");
        for (i, o) in Outcome::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "qosroute_requests_total{{outcome=\"{}\"}} {}",
                o.as_str(),
                self.outcomes[i].load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP qosroute_decision_seconds Time to decide one request.\n");
        out.push_str("# TYPE qosroute_decision_seconds histogram\n");
        self.decision_seconds
            .render("qosroute_decision_seconds", &mut out);
        let counters = [
            (
                "qosroute_policy_fallbacks_total",
                "Decisions made by the fallback policy.",
                &self.fallbacks,
            ),
            (
                "qosroute_planner_budget_exhausted_total",
                "Planner decisions whose time budget ran out before all futures were played.",
                &self.planner_budget_exhausted,
            ),
            (
                "qosroute_retries_total",
                "Requests retried on another expert before their first token.",
                &self.retries,
            ),
            (
                "qosroute_slo_violations_total",
                "Completed requests that missed their SLO.",
                &self.slo_violations,
            ),
            (
                "qosroute_qos_count",
                "Completed requests with a reported quality.",
                &self.qos_count,
            ),
            (
                "qosroute_mqtt_connections_total",
                "Broker connections established (1 + reconnects).",
                &self.mqtt_connections,
            ),
            (
                "qosroute_replies_dropped_total",
                "Replies that could not be published.",
                &self.replies_dropped,
            ),
            (
                "qosroute_acks_early_total",
                "Requests acknowledged to the broker before their outcome was final.",
                &self.acks_early,
            ),
            (
                "qosroute_feedback_total",
                "Device feedback messages applied.",
                &self.feedback,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
        }
        let _ = writeln!(
            out,
            "# HELP qosroute_qos_sum Sum of realised QoS of completed requests.\n# TYPE qosroute_qos_sum counter\nqosroute_qos_sum {}",
            self.qos_sum_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
        type Gauge = fn(&ExpertGauges) -> f64;
        let gauges: [(&str, &str, Gauge); 8] = [
            (
                "qosroute_expert_in_flight",
                "Requests in flight per expert.",
                |g| g.in_flight as f64,
            ),
            (
                "qosroute_expert_foreign_requests",
                "Requests the policy counts on the expert beyond this daemon's: reported by the engine, or every free slot while its load (or its host device's) is unknown, stale or taken.",
                |g| g.foreign as f64,
            ),
            (
                "qosroute_expert_up",
                "Whether the expert takes traffic (checked, not stale, circuit closed).",
                |g| f64::from(u8::from(g.up)),
            ),
            (
                "qosroute_expert_prefill_tokens_per_second",
                "Latency model in use (refitted online): prefill speed.",
                |g| g.latency.prefill_tok_s,
            ),
            (
                "qosroute_expert_prefill_overhead_seconds",
                "Latency model in use: fixed part of one prefill iteration.",
                |g| g.latency.prefill_overhead_s,
            ),
            (
                "qosroute_expert_decode_t0_seconds",
                "Latency model in use: decode step of one sequence.",
                |g| g.latency.decode_t0_s,
            ),
            (
                "qosroute_expert_decode_d_seconds_per_sequence",
                "Latency model in use: step time per extra sequence.",
                |g| g.latency.decode_d_s_per_seq,
            ),
            (
                "qosroute_expert_decode_e_seconds_per_context_token",
                "Latency model in use: step time per context token.",
                |g| g.latency.decode_e_s_per_ctx_token,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for g in experts {
                let _ = writeln!(out, "{name}{{expert=\"{}\"}} {}", escape(&g.name), value(g));
            }
        }
        if let Some(h) = host {
            render_host(&mut out, h);
        }
        out.push_str(&self.prediction_errors.render(escape));
        self.render_per_expert(&mut out);
        out
    }
}

/// Host telemetry gauges: only what is known (an unknown value is absent, never 0).
fn render_host(out: &mut String, h: &HostSample) {
    let mut gauge = |name: &str, help: &str, rows: Vec<(String, f64)>| {
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in rows {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let plain = |v: Option<f64>| {
        v.map(|v| (String::new(), v))
            .into_iter()
            .collect::<Vec<_>>()
    };
    gauge(
        "qosroute_host_cpu_utilisation",
        "Busy fraction of the host's CPUs.",
        plain(h.cpu_utilisation),
    );
    gauge(
        "qosroute_host_memory_used",
        "Fraction of the host's RAM in use.",
        plain(h.memory_used),
    );
    gauge(
        "qosroute_host_throttled",
        "1 while the board runs below its full clock (its local experts count as slower).",
        plain(h.throttled.map(|t| if t { 1.0 } else { 0.0 })),
    );
    gauge(
        "qosroute_host_temperature_celsius",
        "Host temperature sensors.",
        h.temperatures_c
            .iter()
            .map(|(s, t)| (format!("{{sensor=\"{}\"}}", escape(s)), *t))
            .collect(),
    );
    type Field = fn(&qosroute_telemetry::GpuSample) -> Option<f64>;
    let gpu_fields: [(&str, &str, Field); 4] = [
        (
            "qosroute_host_gpu_utilisation",
            "Busy fraction of each GPU.",
            |g| g.utilisation,
        ),
        (
            "qosroute_host_gpu_memory_used",
            "Fraction of each GPU's memory in use.",
            |g| g.memory_used,
        ),
        (
            "qosroute_host_gpu_temperature_celsius",
            "GPU die temperature.",
            |g| g.temperature_c,
        ),
        ("qosroute_host_gpu_frequency_mhz", "GPU clock.", |g| {
            g.frequency_mhz
        }),
    ];
    for (name, help, field) in gpu_fields {
        gauge(
            name,
            help,
            h.gpus
                .iter()
                .filter_map(|g| field(g).map(|v| (format!("{{gpu=\"{}\"}}", escape(&g.name)), v)))
                .collect(),
        );
    }
}

/// What `/metrics` shows of one expert.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertGauges {
    /// Name.
    pub name: String,
    /// Requests in flight.
    pub in_flight: usize,
    /// Takes traffic.
    pub up: bool,
    /// Requests the policy is shown beyond this daemon's own (other clients' reported load,
    /// or every free slot while the expert's load is unknown or stale).
    pub foreign: usize,
    /// The latency model in use (refitted online).
    pub latency: qosroute_core::LatencyModel,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for s in [10e-6, 60e-6, 60e-6, 1.0] {
            h.observe(s);
        }
        let mut out = String::new();
        h.render("x", &mut out);
        assert!(out.contains("x_bucket{le=\"0.000025\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.0001\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count 4\n"));
    }

    #[test]
    fn per_expert_counts_split_completions_misses_and_qos() {
        let m = Metrics::default();
        m.expert_completed("a", true, Some(0.75));
        m.expert_completed("a", false, Some(0.0));
        m.expert_completed("a", true, None);
        m.expert_completed("b", false, None);
        let text = m.render(&[], None);
        for line in [
            "qosroute_expert_completed_total{expert=\"a\"} 3\n",
            "qosroute_expert_slo_violations_total{expert=\"a\"} 1\n",
            "qosroute_expert_qos_total{expert=\"a\"} 0.75\n",
            "qosroute_expert_qos_answers_total{expert=\"a\"} 2\n",
            "qosroute_expert_completed_total{expert=\"b\"} 1\n",
            "qosroute_expert_slo_violations_total{expert=\"b\"} 1\n",
            "qosroute_expert_qos_answers_total{expert=\"b\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
    }

    #[test]
    fn exposition_names_every_outcome_and_expert() {
        let m = Metrics::default();
        m.count(Outcome::Shed);
        m.count(Outcome::Shed);
        m.qos(0.5);
        let text = m.render(
            &[ExpertGauges {
                name: "a\"b".into(),
                in_flight: 3,
                up: true,
                foreign: 2,
                latency: qosroute_core::LatencyModel::paper(1e-4, 1e-7, 0.02),
            }],
            None,
        );
        assert!(text.contains("qosroute_requests_total{outcome=\"shed\"} 2\n"));
        assert!(text.contains("qosroute_requests_total{outcome=\"completed\"} 0\n"));
        assert!(text.contains("qosroute_expert_in_flight{expert=\"a\\\"b\"} 3\n"));
        assert!(text.contains("qosroute_expert_foreign_requests{expert=\"a\\\"b\"} 2\n"));
        assert!(text.contains("qosroute_qos_sum 0.5\n"));
        assert!(
            text.contains("qosroute_expert_decode_t0_seconds{expert=\"a\\\"b\"} 0.02\n"),
            "{text}"
        );
        assert!(
            text.contains("qosroute_expert_prefill_overhead_seconds{expert=\"a\\\"b\"} 0\n"),
            "{text}"
        );
        assert_eq!(m.outcomes(Outcome::Shed), 2);
        assert!(
            !text.contains("qosroute_host_"),
            "no telemetry, no host gauges"
        );
    }

    #[test]
    fn host_gauges_show_what_is_known_and_leave_out_what_is_not() {
        let mut host = HostSample::unknown(std::time::Instant::now());
        host.memory_used = Some(0.25);
        host.temperatures_c = vec![("cpu-thermal".into(), 51.5)];
        host.gpus = vec![
            qosroute_telemetry::GpuSample {
                utilisation: Some(0.75),
                ..qosroute_telemetry::GpuSample::unknown("tegra:17000000.gpu")
            },
            qosroute_telemetry::GpuSample::unknown("nvml0:X"),
        ];
        let text = Metrics::default().render(&[], Some(&host));
        assert!(text.contains("qosroute_host_memory_used 0.25\n"), "{text}");
        assert!(text.contains("qosroute_host_temperature_celsius{sensor=\"cpu-thermal\"} 51.5\n"));
        assert!(text.contains("qosroute_host_gpu_utilisation{gpu=\"tegra:17000000.gpu\"} 0.75\n"));
        assert!(
            !text.contains("qosroute_host_cpu_utilisation"),
            "unknown CPU is absent, not 0"
        );
        assert!(
            !text.contains("nvml0:X"),
            "a GPU of which nothing is known has no values"
        );
        assert!(
            !text.contains("qosroute_host_throttled"),
            "unknown throttling is absent"
        );
        host.throttled = Some(true);
        let text = Metrics::default().render(&[], Some(&host));
        assert!(text.contains("qosroute_host_throttled 1\n"), "{text}");
    }
}
