//! `qosroute compare`: every policy × seed (× sweep value) on the same workloads, summarised
//! as mean ± std, with JSON and SVG output.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;

use qosroute_core::{BASELINE_NAMES, OnnxPolicy, PLANNER_NAME, Policy};
use qosroute_sim::{RunReport, Simulation, Workload, generate, with_param};
use serde::Serialize;

use crate::plot::{PolicyBar, SweepCurve, policy_bars, sweep_curves};
pub(crate) use crate::stats::{PairedGain, PolicySummary, mean_std, paired_gain};
use crate::{Inputs, table};

#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    inputs: Inputs,
    /// Comma-separated policies: baselines (random, round-robin, least-loaded, p2c,
    /// quality-greedy, latency-greedy, qos-greedy), `all` for every baseline, and learned
    /// routers as `han:PATH.onnx`.
    #[arg(long, default_value = "all")]
    policies: String,
    /// Comma-separated seeds; each seed is one workload sample shared by every policy.
    #[arg(long, default_value = "1,2,3", value_delimiter = ',')]
    seeds: Vec<u64>,
    /// Write the summary and every run as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw average QoS per policy (or versus load with --sweep) as SVG to this file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Sweep one workload parameter: KEY=V1,V2,... (e.g. rate=1,2,4,8 or speed=0.5,1,2).
    #[arg(long)]
    sweep: Option<String>,
}

#[derive(Debug, Serialize)]
struct CompareOutput<'a> {
    catalogue: &'a str,
    workload: &'a str,
    seeds: &'a [u64],
    sweep: Option<SweepSpec>,
    summary: &'a [PolicySummary],
    runs: &'a [RunReport],
}

#[derive(Debug, Clone, Serialize)]
struct SweepSpec {
    key: String,
    values: Vec<f64>,
}

fn summarise(policy: &str, sweep_value: Option<f64>, runs: &[&RunReport]) -> PolicySummary {
    let of = |f: fn(&RunReport) -> f64| mean_std(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
    let (avg_qos_mean, avg_qos_std) = of(|r| r.avg_qos);
    PolicySummary {
        policy: policy.to_owned(),
        sweep_value,
        runs: runs.len(),
        avg_qos_mean,
        avg_qos_std,
        slo_violation_rate_mean: of(|r| r.slo_violation_rate).0,
        reject_rate_mean: of(|r| r.reject_rate).0,
        efficiency_mean: of(|r| r.efficiency_qos_per_busy_s).0,
        per_token_latency_p50_s_mean: of(|r| r.per_token_latency_s.p50).0,
        per_token_latency_p95_s_mean: of(|r| r.per_token_latency_s.p95).0,
        ttft_p99_s_mean: of(|r| r.ttft_s.p99).0,
        throughput_requests_s_mean: of(|r| r.throughput_requests_s).0,
        gain_over_qos_greedy: None,
    }
}

/// Policy names: `all` expands to every baseline and `qos-planner`; `han:PATH` is a learned
/// router (ONNX); `qos-planner:k=16,h=20` takes its parameters (a `key=value` item after it
/// belongs to it).
fn parse_policies(list: &str) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            names.extend(BASELINE_NAMES.iter().map(|s| (*s).to_owned()));
            names.push(PLANNER_NAME.to_owned());
        } else if name.contains('=')
            && !name.contains(':')
            && let Some(last) = names.last_mut()
            && qosroute_core::is_planner(last)
        {
            let sep = if last.contains(':') { ',' } else { ':' };
            last.push(sep);
            last.push_str(name);
        } else {
            names.push(name.to_owned());
        }
    }
    if names.is_empty() {
        bail!("--policies: no policy named");
    }
    for name in &names {
        make_policy(name, 0).map_err(|e| anyhow::anyhow!("--policies: {e:#}"))?;
    }
    Ok(names)
}

/// A baseline by name, or the learned router of `han:PATH.onnx`.
pub fn make_policy(name: &str, seed: u64) -> anyhow::Result<Box<dyn Policy + Send>> {
    if let Some(path) = name.strip_prefix("han:") {
        return Ok(Box::new(OnnxPolicy::load(Path::new(path))?));
    }
    Ok(qosroute_core::baseline(name, seed)?)
}

fn parse_sweep(sweep: &str) -> anyhow::Result<SweepSpec> {
    let (key, values) = sweep
        .split_once('=')
        .with_context(|| format!("--sweep `{sweep}`: expected KEY=V1,V2,..."))?;
    let values = values
        .split(',')
        .map(|v| {
            v.trim()
                .parse::<f64>()
                .with_context(|| format!("--sweep `{sweep}`: `{v}` is not a number"))
        })
        .collect::<anyhow::Result<Vec<f64>>>()?;
    if values.is_empty() {
        bail!("--sweep `{sweep}`: no values");
    }
    Ok(SweepSpec {
        key: key.trim().to_owned(),
        values,
    })
}

/// A spinner for work of unknown length (hidden when stderr is not a terminal).
pub fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

fn progress(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} runs {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}

struct Job {
    sweep: usize,
    seed: usize,
    policy: usize,
}

pub fn run(args: &CompareArgs) -> anyhow::Result<()> {
    if args.seeds.is_empty() {
        bail!("--seeds: no seed given");
    }
    let policies = parse_policies(&args.policies)?;
    let sweep = args.sweep.as_deref().map(parse_sweep).transpose()?;
    let (catalogue, quality) = args.inputs.load()?;
    let specs: Vec<(Option<f64>, String)> = match &sweep {
        None => vec![(None, args.inputs.workload.clone())],
        Some(s) => s
            .values
            .iter()
            .map(|v| {
                (
                    Some(*v),
                    with_param(&args.inputs.workload, &s.key, &v.to_string()),
                )
            })
            .collect(),
    };
    // One workload per (sweep value, seed), shared by every policy.
    let mut workloads: Vec<Vec<Workload>> = Vec::new();
    for (_, spec) in &specs {
        let mut per_seed = Vec::new();
        for &seed in &args.seeds {
            per_seed.push(generate(spec, &quality, seed)?);
        }
        workloads.push(per_seed);
    }
    let (n_seeds, n_policies) = (args.seeds.len(), policies.len());
    let jobs: Vec<Job> = (0..specs.len())
        .flat_map(|sweep| {
            (0..n_seeds).flat_map(move |seed| {
                (0..n_policies).map(move |policy| Job {
                    sweep,
                    seed,
                    policy,
                })
            })
        })
        .collect();
    let bar = progress(jobs.len() as u64);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<anyhow::Result<RunReport>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(jobs.len());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(job) = jobs.get(i) else { break };
                    let seed = args.seeds[job.seed];
                    let name = &policies[job.policy];
                    let outcome = (|| -> anyhow::Result<RunReport> {
                        let mut policy = make_policy(name, seed)?;
                        let workload = &workloads[job.sweep][job.seed];
                        Ok(Simulation::new(&catalogue, &quality, workload, seed)?
                            .run(&mut policy)?)
                    })();
                    bar.set_message(format!("{name} seed {seed}"));
                    bar.inc(1);
                    let mut slots = results.lock().unwrap_or_else(|e| e.into_inner());
                    slots[i] = Some(outcome);
                }
            });
        }
    });
    bar.finish_and_clear();
    let mut runs = Vec::with_capacity(jobs.len());
    for (i, slot) in results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .enumerate()
    {
        match slot {
            Some(Ok(report)) => runs.push(report),
            Some(Err(e)) => return Err(e),
            None => bail!("run {i} did not complete"),
        }
    }
    let mut summary = Vec::new();
    for (s, (value, spec)) in specs.iter().enumerate() {
        let start = summary.len();
        // Jobs run seed by seed, so each policy's runs come in seed order.
        let runs_of = |p: usize| -> Vec<&RunReport> {
            jobs.iter()
                .zip(&runs)
                .filter(|(j, _)| j.sweep == s && j.policy == p)
                .map(|(_, r)| r)
                .collect()
        };
        let avg_qos = |runs: &[&RunReport]| runs.iter().map(|r| r.avg_qos).collect::<Vec<_>>();
        let reference = policies
            .iter()
            .position(|n| n == "qos-greedy")
            .map(|p| avg_qos(&runs_of(p)));
        for (p, name) in policies.iter().enumerate() {
            let mine = runs_of(p);
            let mut row = summarise(name, *value, &mine);
            row.gain_over_qos_greedy = reference
                .as_ref()
                .and_then(|r| paired_gain(&avg_qos(&mine), r));
            summary.push(row);
        }
        table::print_comparison(&catalogue.name, spec, &args.seeds, &summary[start..]);
    }
    if let Some(path) = &args.json {
        let out = CompareOutput {
            catalogue: &catalogue.name,
            workload: &args.inputs.workload,
            seeds: &args.seeds,
            sweep: sweep.clone(),
            summary: &summary,
            runs: &runs,
        };
        crate::write_output(path, serde_json::to_string_pretty(&out)? + "\n")?;
    }
    if let Some(path) = &args.plot {
        crate::prepare_output(path)?;
        draw(
            path,
            &catalogue.name,
            &args.inputs.workload,
            sweep.as_ref(),
            &policies,
            &summary,
        )?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn draw(
    path: &std::path::Path,
    catalogue: &str,
    workload: &str,
    sweep: Option<&SweepSpec>,
    policies: &[String],
    summary: &[PolicySummary],
) -> anyhow::Result<()> {
    match sweep {
        None => {
            let bars: Vec<PolicyBar> = summary
                .iter()
                .map(|s| PolicyBar {
                    policy: s.policy.clone(),
                    mean: s.avg_qos_mean,
                    std: s.avg_qos_std,
                })
                .collect();
            policy_bars(
                path,
                &format!("{catalogue} · {workload}"),
                "average QoS",
                &bars,
            )?;
        }
        Some(sweep) => {
            let curves: Vec<SweepCurve> = policies
                .iter()
                .map(|p| SweepCurve {
                    policy: p.clone(),
                    points: summary
                        .iter()
                        .filter(|s| &s.policy == p)
                        .filter_map(|s| s.sweep_value.map(|v| (v, s.avg_qos_mean, s.avg_qos_std)))
                        .collect(),
                })
                .collect();
            sweep_curves(
                path,
                &format!("{catalogue} · {workload}"),
                &sweep.key,
                "average QoS",
                &curves,
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!((m, s), (2.0, 1.0));
        assert_eq!(mean_std(&[4.0]), (4.0, 0.0));
    }

    #[test]
    fn paired_gain_counts_each_seed_against_its_own_reference_run() {
        let g = paired_gain(&[0.5, 0.3, 0.6], &[0.4, 0.35, 0.6]).unwrap();
        // Differences +0.1, -0.05, 0.
        assert!((g.mean - 0.05 / 3.0).abs() < 1e-12);
        assert_eq!((g.wins, g.pairs), (1, 3));
        assert!(paired_gain(&[0.5], &[0.4, 0.35]).is_none());
    }

    #[test]
    fn policy_and_sweep_arguments_are_checked() {
        let all = parse_policies("all").unwrap();
        assert_eq!(all.len(), 8);
        assert_eq!(all.last().map(String::as_str), Some("qos-planner"));
        assert_eq!(
            parse_policies("qos-greedy,qos-planner:k=4,h=0,z=2,p2c").unwrap(),
            vec!["qos-greedy", "qos-planner:k=4,h=0,z=2", "p2c"]
        );
        assert_eq!(
            parse_policies("qos-planner,k=8").unwrap(),
            vec!["qos-planner:k=8"]
        );
        assert!(
            parse_policies("qos-planner:k=0")
                .unwrap_err()
                .to_string()
                .contains("k (futures) must be at least 1")
        );
        assert_eq!(
            parse_policies("p2c, qos-greedy").unwrap(),
            vec!["p2c", "qos-greedy"]
        );
        assert!(
            parse_policies("p2c,nope")
                .unwrap_err()
                .to_string()
                .contains("unknown policy `nope`")
        );
        let s = parse_sweep("rate=1,2.5").unwrap();
        assert_eq!(
            (s.key.as_str(), s.values.as_slice()),
            ("rate", &[1.0, 2.5][..])
        );
        assert!(parse_sweep("rate").is_err());
        assert!(parse_sweep("rate=1,x").is_err());
    }
}
