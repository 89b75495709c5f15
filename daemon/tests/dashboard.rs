//! The Grafana dashboard (`deploy/grafana/qosroute.json`) against a running daemon: every
//! metric its PromQL names (panels and template variables) is one the real `qosrouted`
//! exports, with the labels and label values the expressions match on. The daemon runs with
//! a mosquitto broker, two emulated experts (one `local`, on a fake Jetson GPU so that every
//! host gauge is exported) and answers a burst of requests before it is scraped.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use qosroute_emulator::Faults;
use support::site::{burst, config, expert, expert_section, until_up};
use support::{Broker, Scratch, start_daemon};

/// A metric a PromQL expression names, with the label matchers applied to it.
#[derive(Debug, Clone, PartialEq)]
struct Selector {
    metric: String,
    /// (label, operator, value) of each matcher inside `{...}`.
    matchers: Vec<(String, String, String)>,
}

/// PromQL words that are not metric names.
const KEYWORDS: [&str; 16] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "inf",
    "nan",
    "Inf",
    "NaN",
];

/// The selectors of one PromQL expression (Grafana's `$variables` are skipped): identifiers
/// outside strings, label lists, ranges and function calls. Label lists after `by`,
/// `without`, `on`, `ignoring`, `group_left` and `group_right` name labels, not metrics.
fn selectors(expr: &str) -> Vec<Selector> {
    let chars: Vec<char> = expr.chars().collect();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out: Vec<Selector> = Vec::new();
    let mut i = 0;
    let mut label_list_next = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i);
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '$' {
            i += 1;
            while i < chars.len() && (ident(chars[i]) || chars[i] == '{' || chars[i] == '}') {
                i += 1;
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            while i < chars.len() && (ident(chars[i]) || chars[i] == '.') {
                i += 1;
            }
        } else if c == '(' && label_list_next {
            while i < chars.len() && chars[i] != ')' {
                i += 1;
            }
            label_list_next = false;
        } else if c == '{' {
            // A selector without a name (`{__name__=...}`) is not used here.
            let (matchers, end) = matchers(&chars, i);
            if let Some(last) = out.last_mut().filter(|_| braces_follow_name(&chars, i)) {
                last.matchers = matchers;
            }
            i = end;
        } else if ident(c) {
            let start = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut next = i;
            while next < chars.len() && chars[next].is_whitespace() {
                next += 1;
            }
            // A function call, or an aggregation with its grouping first (`sum by (x) (...)`).
            let rest: String = chars[next..].iter().take(8).collect();
            let grouping = ["by", "without"].iter().any(|g| {
                rest.strip_prefix(g)
                    .is_some_and(|r| r.starts_with(|c: char| !ident(c)))
            });
            let call = chars.get(next) == Some(&'(') || grouping;
            if matches!(
                word.as_str(),
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) {
                label_list_next = true;
            } else if !call && !KEYWORDS.contains(&word.as_str()) {
                out.push(Selector {
                    metric: word,
                    matchers: Vec::new(),
                });
            }
        } else {
            i += 1;
        }
    }
    out
}

fn skip_string(chars: &[char], start: usize) -> usize {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() && chars[i] != quote {
        i += if chars[i] == '\\' { 2 } else { 1 };
    }
    i + 1
}

/// Whether the `{` at `i` directly follows a metric name (`name{...}`).
fn braces_follow_name(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_')
}

/// The matchers of the label list starting at `chars[open] == '{'`, and the index after it.
fn matchers(chars: &[char], open: usize) -> (Vec<(String, String, String)>, usize) {
    let mut out = Vec::new();
    let mut i = open + 1;
    loop {
        while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
            i += 1;
        }
        if i >= chars.len() || chars[i] == '}' {
            return (out, i + 1);
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let label: String = chars[start..i].iter().collect();
        let op_start = i;
        while i < chars.len() && matches!(chars[i], '=' | '!' | '~') {
            i += 1;
        }
        let op: String = chars[op_start..i].iter().collect();
        let end = skip_string(chars, i);
        let value: String = chars[i + 1..end - 1].iter().collect();
        assert!(
            !label.is_empty() && !op.is_empty(),
            "bad matcher near {start}"
        );
        out.push((label, op, value));
        i = end;
    }
}

/// Every PromQL expression of the dashboard: panel targets' `expr`, and the queries of
/// template variables (`label_values(EXPR, label)`, `query_result(EXPR)`).
fn expressions(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value.as_str()) {
                    ("expr", Some(e)) => out.push(e.to_owned()),
                    ("query" | "definition", Some(q)) => {
                        for f in ["label_values(", "query_result("] {
                            if let Some(inner) = q.trim().strip_prefix(f) {
                                let inner = inner.trim_end().trim_end_matches(')');
                                let inner = match (f, inner.rsplit_once(',')) {
                                    ("label_values(", Some((metric, _label))) => metric,
                                    _ => inner,
                                };
                                out.push(inner.to_owned());
                            }
                        }
                    }
                    _ => expressions(value, out),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|i| expressions(i, out)),
        _ => {}
    }
}

/// What a scrape says: each metric family's type, and each sample name's label values.
struct Exposition {
    types: BTreeMap<String, String>,
    /// Sample name → label → values seen.
    series: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

fn exposition(text: &str) -> Exposition {
    let mut types = BTreeMap::new();
    let mut series: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() || !line.starts_with("qosroute_") {
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        let name_end = line.find(['{', ' ']).unwrap();
        let labels = series.entry(line[..name_end].to_owned()).or_default();
        if chars[name_end] == '{' {
            for (label, _, value) in matchers(&chars, name_end).0 {
                labels.entry(label).or_default().insert(value);
            }
        }
    }
    Exposition { types, series }
}

impl Exposition {
    /// Why `metric` is not something the daemon exports, if it is not.
    fn problem(&self, metric: &str) -> Option<String> {
        if self.types.get(metric).is_some_and(|t| t == "histogram") {
            return Some(
                "a histogram has no series of its own name (_bucket, _sum, _count)".into(),
            );
        }
        if !self.series.contains_key(metric) {
            return Some("no such series in the scrape".into());
        }
        // A sample named like a histogram's parts must belong to a histogram (the counters
        // qosroute_qos_sum and qosroute_qos_count are families of their own).
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| metric.strip_suffix(s))
            .filter(|f| self.types.get(*f).is_some_and(|t| t == "histogram"));
        match (family, self.types.get(metric)) {
            (None, None) => Some("not declared by a # TYPE line".into()),
            _ => None,
        }
    }
}

/// Labels Prometheus adds to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// A minimal Jetson root (`[telemetry.host] sysfs_root`): one iGPU with load and clock, a
/// GPU thermal zone and `proc/meminfo`, so that every host gauge the daemon has is exported.
fn fake_jetson(root: &Path) {
    let write = |rel: &str, text: &str| {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("etc/nv_tegra_release", "# R36 (release), REVISION: 4.4\n");
    write("sys/devices/platform/17000000.gpu/load", "100\n");
    write(
        "sys/devices/platform/17000000.gpu/devfreq/17000000.gpu/cur_freq",
        "918000000\n",
    );
    write("sys/class/thermal/thermal_zone0/type", "gpu-thermal\n");
    write("sys/class/thermal/thermal_zone0/temp", "42500\n");
    write(
        "proc/meminfo",
        "MemTotal:       8000000 kB\nMemFree:         1000 kB\nMemAvailable:   6000000 kB\n",
    );
}

#[test]
fn promql_names_are_found_outside_strings_ranges_calls_and_label_lists() {
    let s = selectors(
        r#"histogram_quantile(0.99, sum by (le) (rate(a_bucket{instance=~"$instance",x="y|z"}[$__rate_interval]))) / on(job) group_left(k) b_total offset 5m + 1e-3 * ${var} - max without(k) (c:total)"#,
    );
    let names: Vec<&str> = s.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(names, ["a_bucket", "b_total", "c:total"]);
    assert_eq!(
        s[0].matchers,
        [
            ("instance".into(), "=~".into(), "$instance".into()),
            ("x".into(), "=".into(), "y|z".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_expression_names_an_exported_metric() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/grafana/qosroute.json"
    );
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    expressions(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "{exprs:?}");

    let root = Scratch::new("dashboard-sysfs");
    fake_jetson(&root.0);
    let broker = Broker::start();
    let (a, b) = (
        expert("a", Faults::default()).await,
        expert("b", Faults::default()).await,
    );
    let host = format!(
        "[telemetry.host]\nsysfs_root = \"{}\"\nenable_nvml = false\nenable_jetson = true\nenable_rpi = false\n",
        root.0.display()
    );
    let mut text = config(&broker, &[(&b, "b")], &host);
    // Expert a runs on this host's (fake) GPU: host telemetry runs for it.
    text.push_str(&expert_section(&a, "a").replacen(
        "kv_tokens = 100000\n",
        "kv_tokens = 100000\nlocal = true\ndevice = \"gpu\"\n",
        1,
    ));
    let daemon = start_daemon(&text);
    until_up(&daemon, &["a", "b"]).await;
    let ends = burst(&broker, &daemon, "dash-1", 12).await;
    assert!(ends.values().all(|(f, e)| f + e == 1), "{ends:?}");
    // Host gauges appear with the first telemetry samples.
    let mut scrape = daemon.metrics();
    for _ in 0..100 {
        if scrape.contains("qosroute_host_gpu_frequency_mhz")
            && scrape.contains("qosroute_host_cpu_utilisation")
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        scrape = daemon.metrics();
    }
    let exported = exposition(&scrape);

    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for expr in &exprs {
        for s in selectors(expr) {
            used.insert(s.metric.clone());
            if let Some(p) = exported.problem(&s.metric) {
                problems.push(format!("{}: {p} (in `{expr}`)", s.metric));
                continue;
            }
            let labels = &exported.series[&s.metric];
            for (label, op, value) in &s.matchers {
                if TARGET_LABELS.contains(&label.as_str()) {
                    continue;
                }
                let Some(values) = labels.get(label) else {
                    problems.push(format!("{}: no label `{label}` (in `{expr}`)", s.metric));
                    continue;
                };
                // Literal values and alternatives must exist (a typo matches nothing).
                let literal = value
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '|'));
                if matches!(op.as_str(), "=" | "=~") && literal {
                    for v in value.split('|').filter(|v| !values.contains(*v)) {
                        problems.push(format!(
                            "{}: `{label}` never is `{v}` (seen {values:?}; in `{expr}`)",
                            s.metric
                        ));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the dashboard names what the daemon does not export:\n{}\n\nscrape:\n{scrape}",
        problems.join("\n")
    );
    // The panels the operators need are there.
    for needed in [
        "qosroute_requests_total",
        "qosroute_decision_seconds_bucket",
        "qosroute_expert_in_flight",
        "qosroute_qos_sum",
        "qosroute_slo_violations_total",
        "qosroute_policy_fallbacks_total",
        "qosroute_mqtt_connections_total",
        "qosroute_host_cpu_utilisation",
        "qosroute_host_gpu_utilisation",
    ] {
        assert!(used.contains(needed), "no panel shows {needed}");
    }
    let unshown: Vec<&String> = exported
        .types
        .keys()
        .filter(|f| !used.iter().any(|u| u.starts_with(f.as_str())))
        .collect();
    eprintln!(
        "{} expressions, {} metrics checked; exported but not on the dashboard: {unshown:?}",
        exprs.len(),
        used.len()
    );
}
