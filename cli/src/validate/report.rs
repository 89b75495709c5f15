//! What `qosroute validate` reports: percentiles, the side-by-side Markdown table and the plots.

use super::*;

/// Nearest-rank percentile (NaN when empty).
pub(super) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(super) fn sorted(values: impl Iterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

pub(super) fn summarise(
    rows: &[Row],
    slo: f64,
    column: impl Fn(&Row) -> (Option<f64>, Option<f64>),
) -> Summary {
    let ttft = sorted(rows.iter().filter_map(|r| column(r).0));
    let per_token = sorted(rows.iter().filter_map(|r| column(r).1));
    let violations = per_token.iter().filter(|&&v| v >= slo).count();
    Summary {
        completed: per_token.len(),
        per_token_p50_s: percentile(&per_token, 50.0),
        per_token_p95_s: percentile(&per_token, 95.0),
        ttft_p50_s: percentile(&ttft, 50.0),
        ttft_p95_s: percentile(&ttft, 95.0),
        slo_violation_rate: if per_token.is_empty() {
            f64::NAN
        } else {
            violations as f64 / per_token.len() as f64
        },
    }
}

pub(super) fn rel_err(sim: f64, real: f64) -> String {
    if real.abs() > 0.0 && sim.is_finite() && real.is_finite() {
        format!("{:+.1} %", (sim / real - 1.0) * 100.0)
    } else {
        "n/a".into()
    }
}

pub(super) fn markdown_table(
    measured: &Summary,
    simulated: &Summary,
    policy: &Summary,
    per_expert: &[ExpertSummary],
    rows: &[Row],
) -> String {
    let mut t = String::new();
    let completed = rows.iter().filter(|r| r.observed.completed()).count();
    let failed = rows.len() - completed;
    let rejected = rows
        .iter()
        .filter(|r| r.observed.error.is_some() && r.observed.expert.is_none())
        .count();
    let sim_rejected = rows.iter().filter(|r| r.sim_policy_rejected).count();
    let _ = writeln!(
        t,
        "{} requests, {} completed, {} failed or lost, of which {} refused by the daemon (the policy in the simulator refused {}); the latencies compare the requests completed in reality\n",
        rows.len(),
        completed,
        failed,
        rejected,
        sim_rejected
    );
    let mut shares = String::new();
    for e in per_expert {
        let real = rows
            .iter()
            .filter(|r| r.observed.expert.as_deref() == Some(e.expert.as_str()))
            .count();
        let sim = rows
            .iter()
            .filter(|r| r.sim_policy_expert.as_deref() == Some(e.expert.as_str()))
            .count();
        let _ = write!(shares, " {}: {real} real, {sim} simulated;", e.expert);
    }
    let _ = writeln!(t, "Requests per expert (policy in the loop):{shares}\n");
    let _ = writeln!(
        t,
        "| metric | measured (qosrouted + real servers) | simulated, replayed routing | rel. error | simulated, policy in the loop | rel. error |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|");
    type Line = (&'static str, fn(&Summary) -> f64, bool);
    let lines: [Line; 5] = [
        (
            "per-token latency p50 (s/token)",
            |s| s.per_token_p50_s,
            false,
        ),
        (
            "per-token latency p95 (s/token)",
            |s| s.per_token_p95_s,
            false,
        ),
        ("TTFT p50 (s)", |s| s.ttft_p50_s, false),
        ("TTFT p95 (s)", |s| s.ttft_p95_s, false),
        ("SLO violation rate", |s| s.slo_violation_rate, true),
    ];
    for (name, f, rate) in lines {
        let fmt = |v: f64| {
            if rate {
                format!("{:.1} %", v * 100.0)
            } else {
                format!("{v:.4}")
            }
        };
        let err = |s: f64, r: f64| {
            if rate {
                format!("{:+.1} pt", (s - r) * 100.0)
            } else {
                rel_err(s, r)
            }
        };
        let _ = writeln!(
            t,
            "| {name} | {} | {} | {} | {} | {} |",
            fmt(f(measured)),
            fmt(f(simulated)),
            err(f(simulated), f(measured)),
            fmt(f(policy)),
            err(f(policy), f(measured))
        );
    }
    let _ = writeln!(
        t,
        "\nPer expert (replayed routing):\n\n| expert | requests | per-token p50 measured / simulated | per-token p95 measured / simulated | TTFT p50 measured / simulated | TTFT p95 measured / simulated |"
    );
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|");
    for e in per_expert {
        let (m, s) = (&e.measured, &e.simulated);
        let _ = writeln!(
            t,
            "| {} | {} | {:.4} / {:.4} ({}) | {:.4} / {:.4} ({}) | {:.3} / {:.3} ({}) | {:.3} / {:.3} ({}) |",
            e.expert,
            m.completed,
            m.per_token_p50_s,
            s.per_token_p50_s,
            rel_err(s.per_token_p50_s, m.per_token_p50_s),
            m.per_token_p95_s,
            s.per_token_p95_s,
            rel_err(s.per_token_p95_s, m.per_token_p95_s),
            m.ttft_p50_s,
            s.ttft_p50_s,
            rel_err(s.ttft_p50_s, m.ttft_p50_s),
            m.ttft_p95_s,
            s.ttft_p95_s,
            rel_err(s.ttft_p95_s, m.ttft_p95_s),
        );
    }
    t
}

/// Quantile curves (predicted against measured) and a bar chart of the headline numbers.
pub(super) fn plots(out: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let quantiles: Vec<f64> = (1..=19).map(|k| f64::from(k) * 5.0).chain([99.0]).collect();
    let curve = |name: &str, values: Vec<f64>| SweepCurve {
        policy: name.to_owned(),
        points: quantiles
            .iter()
            .map(|&q| (q, percentile(&values, q), 0.0))
            .collect(),
    };
    for (file, title, y, pick) in [
        (
            "per-token.svg",
            "Per-token latency: measured vs simulated (quantiles)",
            "seconds per output token",
            0usize,
        ),
        (
            "ttft.svg",
            "Time to first token: measured vs simulated (quantiles)",
            "seconds",
            1,
        ),
    ] {
        let col = |f: &dyn Fn(&Row) -> Option<f64>| sorted(rows.iter().filter_map(f));
        let (m, s, p) = if pick == 0 {
            (
                col(&|r| r.measured_per_token_s),
                col(&|r| r.sim_per_token_s),
                col(&|r| r.sim_policy_per_token_s),
            )
        } else {
            (
                col(&|r| r.measured_ttft_s),
                col(&|r| r.sim_ttft_s),
                col(&|r| r.sim_policy_ttft_s),
            )
        };
        sweep_curves(
            &out.join(file),
            title,
            "percentile",
            y,
            &[
                curve("measured (qosrouted + llama.cpp)", m),
                curve("simulated, replayed routing", s),
                curve("simulated, policy in the loop", p),
            ],
        )?;
        eprintln!("wrote {}", out.join(file).display());
    }
    // Per request: simulated against measured per-token latency, in buckets of measured.
    let mut pairs: Vec<(f64, f64)> = rows
        .iter()
        .filter_map(|r| Some((r.measured_per_token_s?, r.sim_per_token_s?)))
        .collect();
    pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
    if !pairs.is_empty() {
        let buckets = 10.min(pairs.len());
        let groups: Vec<String> = (0..buckets).map(|b| format!("decile {}", b + 1)).collect();
        let mut measured = Vec::new();
        let mut simulated = Vec::new();
        for b in 0..buckets {
            let lo = b * pairs.len() / buckets;
            let hi = ((b + 1) * pairs.len() / buckets).max(lo + 1);
            let slice = &pairs[lo..hi.min(pairs.len())];
            measured.push(slice.iter().map(|p| p.0).sum::<f64>() / slice.len() as f64);
            simulated.push(slice.iter().map(|p| p.1).sum::<f64>() / slice.len() as f64);
        }
        let path = out.join("per-request.svg");
        grouped_bars(
            &path,
            "Per request: simulated vs measured per-token latency, by decile of measured",
            "mean seconds per output token",
            &groups,
            &[
                BarSeries {
                    name: "measured".into(),
                    values: measured,
                },
                BarSeries {
                    name: "simulated (same request, same expert)".into(),
                    values: simulated,
                },
            ],
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
