//! `qosroute top`: a live terminal view of a running gateway, read from its Prometheus
//! endpoint (`GET /metrics` of `qosrouted`): decisions per second, outcomes, QoS, SLO misses,
//! and per expert its load, whether it takes traffic and what it completes. Rates come from two
//! scrapes; the screen is redrawn in place with plain ANSI codes.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

#[derive(Debug, Args)]
pub struct TopArgs {
    /// The gateway's metrics endpoint (`[metrics] listen` of its config).
    #[arg(long, default_value = "http://127.0.0.1:9464/metrics")]
    url: String,
    /// Seconds between refreshes (and between the two scrapes of `--once`).
    #[arg(long, default_value_t = 2.0)]
    interval: f64,
    /// Print one frame (rates over two scrapes `--interval` apart) and exit.
    #[arg(long)]
    once: bool,
}

pub fn run(args: &TopArgs) -> anyhow::Result<()> {
    if !(args.interval.is_finite() && args.interval > 0.0) {
        bail!("--interval must be a positive number of seconds");
    }
    let interval = Duration::from_secs_f64(args.interval);
    let mut out = std::io::stdout().lock();
    if args.once {
        let first = Scrape::fetch(&args.url)?;
        std::thread::sleep(interval);
        let second = Scrape::fetch(&args.url)?;
        let dt = second.at.duration_since(first.at).as_secs_f64();
        for line in frame(&args.url, Some((&first, dt)), &second) {
            writeln!(out, "{line}")?;
        }
        return Ok(());
    }
    // Live: clear the screen once, then redraw from the top-left corner.
    write!(out, "\x1b[2J")?;
    let mut previous: Option<Scrape> = None;
    loop {
        let lines = match Scrape::fetch(&args.url) {
            Ok(now) => {
                let before = previous
                    .as_ref()
                    .map(|p| (p, now.at.duration_since(p.at).as_secs_f64()));
                let lines = frame(&args.url, before, &now);
                previous = Some(now);
                lines
            }
            // The gateway may be restarting: say so and keep trying.
            Err(e) => vec![format!("qosroute top  {}  (no answer: {e:#})", args.url)],
        };
        write!(out, "\x1b[H")?;
        for line in &lines {
            writeln!(out, "{line}\x1b[K")?;
        }
        write!(out, "\x1b[J")?;
        out.flush()?;
        std::thread::sleep(interval);
    }
}

/// One sample line: the metric name, its labels and its value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One scrape of the exposition text.
#[derive(Debug, Clone)]
struct Scrape {
    at: Instant,
    samples: Vec<Sample>,
}

impl Scrape {
    /// `GET url` (plain HTTP/1.1) within a few seconds; a non-200 answer is an error.
    fn fetch(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .with_context(|| format!("{url}: only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/metrics"),
        };
        let addr = if authority.contains(':') {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let socket = addr
            .to_socket_addrs()
            .with_context(|| format!("{url}: cannot resolve {addr}"))?
            .next()
            .with_context(|| format!("{url}: no address for {addr}"))?;
        let timeout = Duration::from_secs(5);
        let mut stream = TcpStream::connect_timeout(&socket, timeout)
            .with_context(|| format!("{url}: cannot connect"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        // One write: the daemon reads the request line from the first segment.
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .with_context(|| format!("{url}: sending the request"))?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .with_context(|| format!("{url}: reading the answer"))?;
        let at = Instant::now();
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .with_context(|| format!("{url}: not an HTTP answer"))?;
        let status = head.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("200") {
            bail!("{url}: {status}");
        }
        Ok(Scrape {
            at,
            samples: parse(body),
        })
    }

    /// The sum of every series of `name` whose labels include `matching`.
    fn sum(&self, name: &str, matching: &[(&str, &str)]) -> Option<f64> {
        let mut found = None;
        for s in self.samples.iter().filter(|s| s.name == name) {
            if matching
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            {
                *found.get_or_insert(0.0) += s.value;
            }
        }
        found
    }

    /// The series of `name` with `matching` labels, keyed by the value of `label`.
    fn by(&self, name: &str, label: &str, matching: &[(&str, &str)]) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            let matches = matching
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v));
            if let (true, Some(key)) = (matches, s.labels.get(label)) {
                *out.entry(key.clone()).or_insert(0.0) += s.value;
            }
        }
        out
    }
}

/// The samples of a Prometheus text exposition (comments and unparsable lines skipped).
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let mut labels = BTreeMap::new();
    let mut rest = rest;
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                other => value.push(other),
                            },
                            other => value.push(other),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                other => key.push(other),
            }
        };
        rest = &inner[end + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Per second between two readings of a counter; a counter that went down was reset (the
/// daemon restarted) and counts from zero, as Prometheus' `rate` does.
fn rate(before: Option<f64>, now: Option<f64>, dt_s: f64) -> Option<f64> {
    let now = now?;
    let increase = match before {
        Some(b) if now >= b => now - b,
        Some(_) => now,
        None => return None,
    };
    (dt_s > 0.0).then(|| increase / dt_s)
}

fn delta(before: Option<f64>, now: Option<f64>) -> Option<f64> {
    match (before, now) {
        (Some(b), Some(n)) if n >= b => Some(n - b),
        (Some(_), Some(n)) => Some(n),
        _ => None,
    }
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn num(v: Option<f64>, digits: usize) -> String {
    v.filter(|v| v.is_finite())
        .map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

fn pct(v: Option<f64>) -> String {
    v.filter(|v| v.is_finite())
        .map_or_else(|| "-".to_owned(), |v| format!("{:.1} %", v * 100.0))
}

/// Outcomes that refused a request (an explicit error reply instead of an answer).
const REFUSED: [&str; 3] = ["rejected", "shed", "rate_limited"];

/// The lines of one frame: `now`, with rates since `before` (scrape and seconds elapsed).
fn frame(url: &str, before: Option<(&Scrape, f64)>, now: &Scrape) -> Vec<String> {
    let dt = before.map_or(0.0, |(_, dt)| dt);
    let prev = |name: &str, m: &[(&str, &str)]| before.and_then(|(b, _)| b.sum(name, m));
    let per_s = |name: &str, m: &[(&str, &str)]| rate(prev(name, m), now.sum(name, m), dt);
    let change = |name: &str, m: &[(&str, &str)]| delta(prev(name, m), now.sum(name, m));

    let decisions = "qosroute_decision_seconds_count";
    let decision_ms = ratio(
        change("qosroute_decision_seconds_sum", &[]),
        change(decisions, &[]),
    )
    .map(|s| s * 1e3);
    let completed = [("outcome", "completed")];
    let refused = REFUSED
        .iter()
        .filter_map(|o| per_s("qosroute_requests_total", &[("outcome", o)]))
        .reduce(|a, b| a + b);
    let all = per_s("qosroute_requests_total", &[]);
    let errors = match (all, per_s("qosroute_requests_total", &completed), refused) {
        (Some(a), Some(c), Some(r)) => Some((a - c - r).max(0.0)),
        _ => None,
    };
    let connections = now.sum("qosroute_mqtt_connections_total", &[]);
    let mut lines = vec![
        format!(
            "qosroute top  {url}  {}",
            if before.is_some() {
                format!("rates over {dt:.1} s")
            } else {
                "rates from the next refresh".to_owned()
            }
        ),
        format!(
            "decisions {}/s (mean {} ms)   completed {}/s   refused {}/s   failed {}/s",
            num(per_s(decisions, &[]), 1),
            num(decision_ms, 2),
            num(per_s("qosroute_requests_total", &completed), 1),
            num(refused, 1),
            num(errors, 1),
        ),
        format!(
            "QoS {} now, {} since start   SLO misses {}/s, {} of completed now, {} since start",
            num(
                ratio(
                    change("qosroute_qos_sum", &[]),
                    change("qosroute_qos_count", &[])
                ),
                3
            ),
            num(
                ratio(
                    now.sum("qosroute_qos_sum", &[]),
                    now.sum("qosroute_qos_count", &[])
                ),
                3
            ),
            num(per_s("qosroute_slo_violations_total", &[]), 1),
            pct(ratio(
                change("qosroute_slo_violations_total", &[]),
                change("qosroute_requests_total", &completed)
            )),
            pct(ratio(
                now.sum("qosroute_slo_violations_total", &[]),
                now.sum("qosroute_requests_total", &completed)
            )),
        ),
        format!(
            "fallbacks {}/s   retries {}/s   replies dropped {}   broker reconnects {}",
            num(per_s("qosroute_policy_fallbacks_total", &[]), 1),
            num(per_s("qosroute_retries_total", &[]), 1),
            num(now.sum("qosroute_replies_dropped_total", &[]), 0),
            num(connections.map(|c| (c - 1.0).max(0.0)), 0),
        ),
    ];
    let cpu = now.sum("qosroute_host_cpu_utilisation", &[]);
    let memory = now.sum("qosroute_host_memory_used", &[]);
    if cpu.is_some() || memory.is_some() {
        let gpus = now.by("qosroute_host_gpu_utilisation", "gpu", &[]);
        let gpus: String = gpus
            .iter()
            .map(|(g, u)| format!("   {g} {}", pct(Some(*u))))
            .collect();
        lines.push(format!(
            "host cpu {}   memory {}{gpus}",
            pct(cpu),
            pct(memory)
        ));
    }
    lines.push(String::new());
    let in_flight = now.by("qosroute_expert_in_flight", "expert", &[]);
    let w = in_flight
        .keys()
        .map(|e| e.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    lines.push(format!(
        "{:<w$} {:>4} {:>9} {:>8} {:>12} {:>6} {:>9} {:>15}",
        "expert", "up", "in flight", "foreign", "completed/s", "QoS", "SLO miss", "per-token MAPE"
    ));
    let up = now.by("qosroute_expert_up", "expert", &[]);
    let foreign = now.by("qosroute_expert_foreign_requests", "expert", &[]);
    let per_token = [("quantity", "per_token")];
    let done_now = now.by("qosroute_expert_completed_total", "expert", &[]);
    let done_before = before.map(|(b, _)| b.by("qosroute_expert_completed_total", "expert", &[]));
    // QoS and SLO misses per expert since the daemon started.
    let qos_sum = now.by("qosroute_expert_qos_total", "expert", &[]);
    let qos_answers = now.by("qosroute_expert_qos_answers_total", "expert", &[]);
    let misses = now.by("qosroute_expert_slo_violations_total", "expert", &[]);
    let ratio = |num: Option<f64>, den: Option<f64>| match (num, den) {
        (Some(n), Some(d)) if d > 0.0 => Some(n / d),
        _ => None,
    };
    let mape = now.by("qosroute_prediction_mape", "expert", &per_token);
    for (expert, load) in &in_flight {
        // A completion counter appears with the expert's first completed request.
        let done = done_before.as_ref().and_then(|b| {
            rate(
                Some(b.get(expert).copied().unwrap_or(0.0)),
                Some(done_now.get(expert).copied().unwrap_or(0.0)),
                dt,
            )
        });
        lines.push(format!(
            "{:<w$} {:>4} {:>9} {:>8} {:>12} {:>6} {:>9} {:>15}",
            expert,
            match up.get(expert) {
                Some(v) if *v > 0.0 => "yes",
                Some(_) => "NO",
                None => "?",
            },
            num(Some(*load), 0),
            num(foreign.get(expert).copied(), 0),
            num(done, 1),
            num(
                ratio(
                    qos_sum.get(expert).copied(),
                    qos_answers.get(expert).copied()
                ),
                3
            ),
            pct(ratio(
                misses.get(expert).copied(),
                done_now.get(expert).copied()
            )),
            pct(mape.get(expert).copied()),
        ));
    }
    lines
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# HELP qosroute_requests_total Requests by how they ended.
# TYPE qosroute_requests_total counter
qosroute_requests_total{outcome="completed"} 100
qosroute_requests_total{outcome="rejected"} 4
qosroute_requests_total{outcome="shed"} 0
qosroute_requests_total{outcome="expert_failed"} 1
qosroute_decision_seconds_bucket{le="+Inf"} 104
qosroute_decision_seconds_sum 0.052
qosroute_decision_seconds_count 104
qosroute_slo_violations_total 10
qosroute_qos_sum 50
qosroute_qos_count 100
qosroute_policy_fallbacks_total 2
qosroute_mqtt_connections_total 1
qosroute_expert_in_flight{expert="a \"big\" one"} 3
qosroute_expert_in_flight{expert="b"} 0
qosroute_expert_up{expert="a \"big\" one"} 1
qosroute_expert_up{expert="b"} 0
qosroute_prediction_relative_error_count{expert="a \"big\" one",quantity="per_token"} 60
qosroute_prediction_relative_error_count{expert="a \"big\" one",quantity="ttft"} 60
qosroute_expert_completed_total{expert="a \"big\" one"} 60
"#;

    const AFTER: &str = r#"qosroute_requests_total{outcome="completed"} 120
qosroute_requests_total{outcome="rejected"} 8
qosroute_requests_total{outcome="shed"} 0
qosroute_requests_total{outcome="expert_failed"} 1
qosroute_decision_seconds_sum 0.064
qosroute_decision_seconds_count 128
qosroute_slo_violations_total 15
qosroute_qos_sum 58
qosroute_qos_count 120
qosroute_policy_fallbacks_total 2
qosroute_mqtt_connections_total 3
qosroute_host_cpu_utilisation 0.25
qosroute_expert_in_flight{expert="a \"big\" one"} 5
qosroute_expert_in_flight{expert="b"} 0
qosroute_expert_up{expert="a \"big\" one"} 1
qosroute_expert_up{expert="b"} 0
qosroute_expert_foreign_requests{expert="b"} 8
qosroute_prediction_relative_error_count{expert="a \"big\" one",quantity="per_token"} 76
qosroute_prediction_relative_error_count{expert="a \"big\" one",quantity="ttft"} 76
qosroute_prediction_relative_error_count{expert="b",quantity="per_token"} 4
qosroute_prediction_mape{expert="b",quantity="per_token"} 0.125
qosroute_expert_completed_total{expert="a \"big\" one"} 76
qosroute_expert_completed_total{expert="b"} 4
qosroute_expert_qos_total{expert="a \"big\" one"} 38
qosroute_expert_qos_answers_total{expert="a \"big\" one"} 76
qosroute_expert_slo_violations_total{expert="a \"big\" one"} 19
qosroute_expert_qos_total{expert="b"} 1
qosroute_expert_qos_answers_total{expert="b"} 4
qosroute_expert_slo_violations_total{expert="b"} 2
"#;

    fn scrape(text: &str) -> Scrape {
        Scrape {
            at: Instant::now(),
            samples: parse(text),
        }
    }

    #[test]
    fn labels_with_escapes_and_special_values_parse() {
        let s = parse("x{a=\"q\\\"u,o}te\",b=\"2\"} +Inf\ny 1.5e-3\nbroken{a=\"1\" 2\n");
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[0].labels["a"], "q\"u,o}te");
        assert_eq!(s[0].labels["b"], "2");
        assert_eq!(s[0].value, f64::INFINITY);
        assert_eq!((s[1].name.as_str(), s[1].value), ("y", 1.5e-3));
    }

    /// Rates by hand over 4 s: decisions (128 - 104) / 4 = 6/s at (0.064 - 0.052) / 24 =
    /// 0.5 ms; completed 20 / 4 = 5/s; refused (rejected) 4 / 4 = 1/s; failed 0; QoS of the
    /// interval (58 - 50) / (120 - 100) = 0.4, since start 58 / 120 = 0.483; SLO misses
    /// 5 / 4 = 1.25/s, 5 of 20 completed = 25 %, since start 15 / 120 = 12.5 %; two
    /// reconnects; expert a completed (76 - 60) / 4 = 4/s, QoS 38 / 76 = 0.5, SLO misses
    /// 19 / 76 = 25 %; expert b 4 / 4 = 1/s (its counter appeared in the interval), QoS
    /// 1 / 4 = 0.25, SLO misses 2 / 4 = 50 %.
    #[test]
    fn a_frame_shows_rates_from_two_scrapes() {
        let lines = frame("u", Some((&scrape(BEFORE), 4.0)), &scrape(AFTER));
        let text = lines.join("\n");
        assert!(text.contains("rates over 4.0 s"), "{text}");
        assert!(
            text.contains(
                "decisions 6.0/s (mean 0.50 ms)   completed 5.0/s   refused 1.0/s   failed 0.0/s"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "QoS 0.400 now, 0.483 since start   SLO misses 1.2/s, 25.0 % of completed now, 12.5 % since start"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "fallbacks 0.0/s   retries -/s   replies dropped -   broker reconnects 2"
            ),
            "{text}"
        );
        assert!(text.contains("host cpu 25.0 %   memory -"), "{text}");
        let row = |name: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(name))
                .unwrap()
                .split_whitespace()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
        };
        // From the right: MAPE and SLO misses (two tokens each when known), QoS, completed/s,
        // foreign, in flight, up.
        assert_eq!(
            row("a \"big\" one"),
            [
                "-", "%", "25.0", "0.500", "4.0", "-", "5", "yes", "one", "\"big\""
            ]
        );
        assert_eq!(
            row("b "),
            [
                "%", "12.5", "%", "50.0", "0.250", "1.0", "8", "0", "NO", "b"
            ]
        );
    }

    #[test]
    fn the_first_frame_has_levels_but_no_rates_and_a_reset_counts_from_zero() {
        let text = frame("u", None, &scrape(AFTER)).join("\n");
        assert!(text.contains("decisions -/s"), "{text}");
        assert!(text.contains("QoS - now, 0.483 since start"), "{text}");
        assert_eq!(rate(Some(10.0), Some(4.0), 2.0), Some(2.0));
        assert_eq!(rate(None, Some(4.0), 2.0), None);
    }
}
