//! Plain-text tables on standard output: this module is the CLI's report to people.
#![allow(clippy::print_stdout)]

use qosroute_sim::RunReport;

use crate::demo::RouterSummary;
use crate::stats::PolicySummary;

fn pct(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{:.1}%", 100.0 * v)
    }
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else {
        format!("{:.1}", 1000.0 * v)
    }
}

/// Prints one run: headline metrics, then per expert and per task.
pub fn print_run(r: &RunReport) {
    println!(
        "policy {} · {} · {} · seed {}",
        r.policy, r.catalogue, r.workload, r.seed
    );
    println!(
        "requests {}  completed {}  rejected {} ({})  invalid decisions {}",
        r.requests,
        r.completed,
        r.rejected,
        pct(r.reject_rate),
        r.invalid_decisions
    );
    println!(
        "avg QoS {:.4}  SLO violations {}  quality served {:.3}  efficiency {:.4} QoS/busy-s",
        r.avg_qos,
        pct(r.slo_violation_rate),
        r.avg_quality_served,
        r.efficiency_qos_per_busy_s
    );
    println!(
        "per-token latency p50/p95/p99 {}/{}/{} ms  TTFT p50/p99 {:.2}/{:.2} s",
        ms(r.per_token_latency_s.p50),
        ms(r.per_token_latency_s.p95),
        ms(r.per_token_latency_s.p99),
        r.ttft_s.p50,
        r.ttft_s.p99
    );
    println!(
        "makespan {:.1} s  throughput {:.2} req/s, {:.0} tok/s",
        r.makespan_s, r.throughput_requests_s, r.throughput_tokens_s
    );
    println!();
    let w = r
        .experts
        .iter()
        .map(|e| e.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<w$}  {:>6}  {:>6}  {:>6}  {:>7}  {:>7}",
        "expert", "share", "util", "QoS", "SLO miss", "routed"
    );
    for e in &r.experts {
        println!(
            "{:<w$}  {:>6}  {:>6}  {:>6.3}  {:>8}  {:>7}",
            e.name,
            pct(e.share),
            pct(e.utilisation),
            e.avg_qos,
            pct(e.slo_violation_rate),
            e.routed
        );
    }
    println!();
    println!(
        "{:<20}  {:>8}  {:>6}  {:>8}  {:>7}",
        "task", "requests", "QoS", "SLO miss", "reject"
    );
    for t in &r.per_task {
        println!(
            "{:<20}  {:>8}  {:>6.3}  {:>8}  {:>7}",
            t.task,
            t.requests,
            t.avg_qos,
            pct(t.slo_violation_rate),
            pct(t.reject_rate)
        );
    }
}

/// Prints the comparison table of one workload.
pub fn print_comparison(catalogue: &str, workload: &str, seeds: &[u64], rows: &[PolicySummary]) {
    let seeds: Vec<String> = seeds.iter().map(u64::to_string).collect();
    println!("{catalogue} · {workload} · seeds {}", seeds.join(","));
    let w = rows
        .iter()
        .map(|r| r.policy.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<w$}  {:>17}  {:>8}  {:>7}  {:>14}  {:>9}  {:>10}  {:>25}",
        "policy",
        "avg QoS ± std",
        "SLO miss",
        "reject",
        "ms/tok p50/p95",
        "TTFT p99",
        "QoS/busy-s",
        "paired vs qos-greedy"
    );
    let best = rows
        .iter()
        .map(|r| r.avg_qos_mean)
        .fold(f64::NEG_INFINITY, f64::max);
    for r in rows {
        let marker = if r.avg_qos_mean == best { " *" } else { "" };
        let paired = r.gain_over_qos_greedy.map_or(String::new(), |g| {
            format!("{:+.4} ± {:.4} ({}/{})", g.mean, g.std, g.wins, g.pairs)
        });
        println!(
            "{:<w$}  {:>17}  {:>8}  {:>7}  {:>14}  {:>8.2}s  {:>10.4}  {:>25}{marker}",
            r.policy,
            format!("{:.4} ± {:.4}", r.avg_qos_mean, r.avg_qos_std),
            pct(r.slo_violation_rate_mean),
            pct(r.reject_rate_mean),
            format!(
                "{}/{}",
                ms(r.per_token_latency_p50_s_mean),
                ms(r.per_token_latency_p95_s_mean)
            ),
            r.ttft_p99_s_mean,
            r.efficiency_mean,
            paired,
        );
    }
    println!();
}

/// One router's line of the demo table.
#[derive(Debug, Clone)]
pub struct DemoRow {
    pub policy: String,
    pub requests: u64,
    pub completed: u64,
    pub errors: u64,
    /// Published, never answered.
    pub lost: u64,
    /// Never published (the run was interrupted).
    pub not_sent: u64,
    pub duplicated: u64,
    pub avg_qos: f64,
    /// SLO misses of completed requests, judged by the devices.
    pub slo_violation_rate: f64,
    /// The same, as the gateway judged them.
    pub gateway_slo_violation_rate: f64,
    /// As the devices measured them.
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub per_token_p50_s: f64,
    pub per_token_p95_s: f64,
    pub requests_per_s: f64,
    /// Decisions the daemon's fallback made (`None`: a baseline, or metrics unavailable).
    pub fallbacks: Option<f64>,
    /// Planner decisions whose time budget ran out (`None`: not the planner).
    pub budget_exhausted: Option<f64>,
    pub errors_by_code: std::collections::BTreeMap<String, u64>,
}

/// Each expert's share of the completed requests, per router.
#[derive(Debug, Clone)]
pub struct ShareTable {
    pub policies: Vec<String>,
    /// (expert, share per policy in `policies` order).
    pub rows: Vec<(String, Vec<f64>)>,
}

/// Prints the demo's comparison: one line per router, the errors, each expert's share.
pub fn print_demo(header: &str, rows: &[DemoRow], shares: &ShareTable) {
    println!("{header}");
    let w = rows
        .iter()
        .map(|r| r.policy.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<w$}  {:>8}  {:>9}  {:>6}  {:>5}  {:>6}  {:>4}  {:>7}  {:>8}  {:>7}  {:>15}  {:>14}  {:>6}  {:>9}  {:>10}",
        "policy",
        "requests",
        "completed",
        "errors",
        "lost",
        "unsent",
        "dup",
        "avg QoS",
        "SLO miss",
        "gw miss",
        "TTFT p50/p99 ms",
        "ms/tok p50/p95",
        "req/s",
        "fallbacks",
        "budget out"
    );
    let markers = best_markers(&rows.iter().map(|r| r.avg_qos).collect::<Vec<_>>());
    for (r, marker) in rows.iter().zip(markers) {
        println!(
            "{:<w$}  {:>8}  {:>9}  {:>6}  {:>5}  {:>6}  {:>4}  {:>7}  {:>8}  {:>7}  {:>15}  {:>14}  {:>6.1}  {:>9}  {:>10}{marker}",
            r.policy,
            r.requests,
            r.completed,
            r.errors,
            r.lost,
            r.not_sent,
            r.duplicated,
            if r.avg_qos.is_finite() {
                format!("{:.4}", r.avg_qos)
            } else {
                "-".into()
            },
            pct(r.slo_violation_rate),
            pct(r.gateway_slo_violation_rate),
            format!("{}/{}", ms(r.ttft_p50_s), ms(r.ttft_p99_s)),
            format!("{}/{}", ms(r.per_token_p50_s), ms(r.per_token_p95_s)),
            r.requests_per_s,
            r.fallbacks.map_or("-".into(), |f| format!("{f:.0}")),
            r.budget_exhausted.map_or("-".into(), |f| format!("{f:.0}")),
        );
    }
    for r in rows.iter().filter(|r| !r.errors_by_code.is_empty()) {
        let codes: Vec<String> = r
            .errors_by_code
            .iter()
            .map(|(code, n)| format!("{code} {n}"))
            .collect();
        println!("  {} errors: {}", r.policy, codes.join(", "));
    }
    println!();
    let w = shares
        .rows
        .iter()
        .map(|(e, _)| e.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mut head = format!("{:<w$}", "share of completed");
    for p in &shares.policies {
        head.push_str(&format!("  {:>12}", p));
    }
    println!("{head}");
    for (expert, values) in &shares.rows {
        let mut line = format!("{expert:<w$}");
        for v in values {
            line.push_str(&format!("  {:>12}", pct(*v)));
        }
        println!("{line}");
    }
    println!();
}

/// Prints the demo's routers over their seeds: average QoS mean ± std, SLO misses (the
/// devices' verdict, then the gateway's), the paired difference against qos-greedy, and the
/// daemon's counters over all runs: fallback decisions (learned router and planner) and
/// planner decisions whose time budget ran out, of all decisions.
pub fn print_demo_seeds(rows: &[RouterSummary]) {
    let w = rows
        .iter()
        .map(|r| r.policy.len())
        .max()
        .unwrap_or(6)
        .max(6);
    println!(
        "{:<w$}  {:>5}  {:>17}  {:>15}  {:>7}  {:>25}  {:>9}  {:>16}",
        "policy",
        "seeds",
        "avg QoS ± std",
        "SLO miss ± std",
        "gw miss",
        "paired vs qos-greedy",
        "fallbacks",
        "budget out/dec."
    );
    let markers = best_markers(&rows.iter().map(|r| r.avg_qos_mean).collect::<Vec<_>>());
    for (r, marker) in rows.iter().zip(markers) {
        let paired = r.gain_over_qos_greedy.map_or(String::new(), |g| {
            format!("{:+.4} ± {:.4} ({}/{})", g.mean, g.std, g.wins, g.pairs)
        });
        let budget = match (r.budget_exhausted, r.decisions) {
            (Some(b), Some(d)) => format!("{b:.0}/{d:.0}"),
            _ => "-".into(),
        };
        let fallbacks = r.fallbacks.map_or("-".into(), |f| format!("{f:.0}"));
        println!(
            "{:<w$}  {:>5}  {:>17}  {:>15}  {:>7}  {:>25}  {:>9}  {:>16}{marker}",
            r.policy,
            r.seeds.len(),
            format!("{:.4} ± {:.4}", r.avg_qos_mean, r.avg_qos_std),
            format!(
                "{} ± {}",
                pct(r.slo_violation_rate_mean),
                pct(r.slo_violation_rate_std)
            ),
            pct(r.gateway_slo_violation_rate_mean),
            paired,
            fallbacks,
            budget,
        );
    }
    println!();
}

/// `" *"` beside the best of several rows' average QoS (every row that ties it), `""` elsewhere.
fn best_markers(qos: &[f64]) -> Vec<&'static str> {
    let best = qos
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(f64::NEG_INFINITY, f64::max);
    qos.iter()
        .map(|&q| if qos.len() > 1 && q == best { " *" } else { "" })
        .collect()
}
