//! Plain-text tables on standard output: this module is the CLI's report to people.
#![allow(clippy::print_stdout)]

use qosroute_sim::RunReport;

use crate::compare::PolicySummary;

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
        "{:<w$}  {:>17}  {:>8}  {:>7}  {:>14}  {:>9}  {:>10}",
        "policy", "avg QoS ± std", "SLO miss", "reject", "ms/tok p50/p95", "TTFT p99", "QoS/busy-s"
    );
    let best = rows
        .iter()
        .map(|r| r.avg_qos_mean)
        .fold(f64::NEG_INFINITY, f64::max);
    for r in rows {
        let marker = if r.avg_qos_mean == best { " *" } else { "" };
        println!(
            "{:<w$}  {:>17}  {:>8}  {:>7}  {:>14}  {:>8.2}s  {:>10.4}{marker}",
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
        );
    }
    println!();
}
