//! `--seeds`: every router over several workload seeds (each seed its own join of the trace
//! with tasks and qualities, and its own `max_tokens` bounds), summarised per router as
//! mean ± std over the seeds (sample std, as `qosroute compare` computes it), with the paired
//! difference against `qos-greedy` on the same seeds.

use serde::Serialize;

use crate::compare::{PairedGain, mean_std, paired_gain};

/// The reference of the paired differences.
pub(crate) const REFERENCE: &str = "qos-greedy";

/// What one run contributes to its router's summary.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RunPoint {
    pub(crate) policy: String,
    pub(crate) seed: u64,
    pub(crate) avg_qos: f64,
    pub(crate) slo_violation_rate: f64,
    pub(crate) gateway_slo_violation_rate: f64,
    /// Decisions the daemon made, of them by its fallback (`None` for a baseline, which is
    /// the fallback), and planner decisions whose time budget ran out (`None` but for the
    /// planner); all `None` when the daemon's metrics were not read.
    pub(crate) decisions: Option<f64>,
    pub(crate) fallbacks: Option<f64>,
    pub(crate) budget_exhausted: Option<f64>,
}

/// One router over every seed it ran.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct RouterSummary {
    pub(crate) policy: String,
    pub(crate) seeds: Vec<u64>,
    pub(crate) avg_qos_mean: f64,
    pub(crate) avg_qos_std: f64,
    /// SLO misses of completed requests, judged by the devices.
    pub(crate) slo_violation_rate_mean: f64,
    pub(crate) slo_violation_rate_std: f64,
    /// The gateway's own verdict, for comparison.
    pub(crate) gateway_slo_violation_rate_mean: f64,
    /// `avg_qos - qos-greedy's avg_qos` on each seed both ran.
    pub(crate) gain_over_qos_greedy: Option<PairedGain>,
    /// Over all its runs.
    pub(crate) decisions: Option<f64>,
    pub(crate) fallbacks: Option<f64>,
    pub(crate) budget_exhausted: Option<f64>,
}

fn total(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    values.sum()
}

/// One summary per router, in the order of their first run.
pub(crate) fn summarise(runs: &[RunPoint]) -> Vec<RouterSummary> {
    let mut policies: Vec<&str> = Vec::new();
    for r in runs {
        if !policies.contains(&r.policy.as_str()) {
            policies.push(&r.policy);
        }
    }
    let reference: Vec<&RunPoint> = runs.iter().filter(|r| r.policy == REFERENCE).collect();
    policies
        .into_iter()
        .map(|policy| {
            let mine: Vec<&RunPoint> = runs.iter().filter(|r| r.policy == policy).collect();
            let of =
                |f: fn(&RunPoint) -> f64| mean_std(&mine.iter().map(|r| f(r)).collect::<Vec<_>>());
            let (avg_qos_mean, avg_qos_std) = of(|r| r.avg_qos);
            let (slo_violation_rate_mean, slo_violation_rate_std) = of(|r| r.slo_violation_rate);
            // Pairs on the seeds both ran, in this router's seed order.
            let (a, b): (Vec<f64>, Vec<f64>) = mine
                .iter()
                .filter_map(|m| {
                    let r = reference.iter().find(|r| r.seed == m.seed)?;
                    Some((m.avg_qos, r.avg_qos))
                })
                .unzip();
            RouterSummary {
                policy: policy.to_owned(),
                seeds: mine.iter().map(|r| r.seed).collect(),
                avg_qos_mean,
                avg_qos_std,
                slo_violation_rate_mean,
                slo_violation_rate_std,
                gateway_slo_violation_rate_mean: of(|r| r.gateway_slo_violation_rate).0,
                gain_over_qos_greedy: if policy == REFERENCE {
                    None
                } else {
                    paired_gain(&a, &b)
                },
                decisions: total(mine.iter().map(|r| r.decisions)),
                fallbacks: total(mine.iter().map(|r| r.fallbacks)),
                budget_exhausted: total(mine.iter().map(|r| r.budget_exhausted)),
            }
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn point(policy: &str, seed: u64, avg_qos: f64, slo: f64) -> RunPoint {
        RunPoint {
            policy: policy.into(),
            seed,
            avg_qos,
            slo_violation_rate: slo,
            gateway_slo_violation_rate: slo / 2.0,
            decisions: Some(100.0),
            fallbacks: Some(1.0),
            budget_exhausted: None,
        }
    }

    #[test]
    fn mean_std_and_paired_gain_over_qos_greedy_by_hand() {
        let runs = vec![
            point("han", 1, 0.50, 0.10),
            point("qos-greedy", 1, 0.40, 0.20),
            point("han", 2, 0.60, 0.20),
            point("qos-greedy", 2, 0.60, 0.20),
            point("han", 3, 0.70, 0.30),
            point("qos-greedy", 3, 0.50, 0.20),
            point("least-loaded", 1, 0.30, 0.5),
        ];
        let s = summarise(&runs);
        let names: Vec<&str> = s.iter().map(|r| r.policy.as_str()).collect();
        assert_eq!(names, ["han", "qos-greedy", "least-loaded"]);
        let han = &s[0];
        assert_eq!(han.seeds, [1, 2, 3]);
        // Mean 0.6; deviations -0.1, 0, 0.1: sample variance 0.02 / 2 = 0.01, std 0.1.
        assert!((han.avg_qos_mean - 0.6).abs() < 1e-12);
        assert!((han.avg_qos_std - 0.1).abs() < 1e-12);
        assert!((han.slo_violation_rate_mean - 0.2).abs() < 1e-12);
        assert!((han.slo_violation_rate_std - 0.1).abs() < 1e-12);
        assert!((han.gateway_slo_violation_rate_mean - 0.1).abs() < 1e-12);
        // Paired: 0.5-0.4, 0.6-0.6, 0.7-0.5 = 0.1, 0, 0.2: mean 0.1, std 0.1, 2 wins of 3.
        let g = han.gain_over_qos_greedy.unwrap();
        assert!((g.mean - 0.1).abs() < 1e-12 && (g.std - 0.1).abs() < 1e-12);
        assert_eq!((g.wins, g.pairs), (2, 3));
        assert_eq!((han.decisions, han.fallbacks), (Some(300.0), Some(3.0)));
        assert_eq!(han.budget_exhausted, None);
        // The reference has no gain over itself; one seed: std 0, one pair.
        assert!(s[1].gain_over_qos_greedy.is_none());
        assert!((s[1].avg_qos_mean - 0.5).abs() < 1e-12);
        assert_eq!(s[2].avg_qos_std, 0.0);
        let ll = s[2].gain_over_qos_greedy.unwrap();
        assert!((ll.mean + 0.1).abs() < 1e-12);
        assert_eq!((ll.wins, ll.pairs), (0, 1));
    }

    #[test]
    fn without_qos_greedy_there_is_no_paired_gain() {
        let s = summarise(&[
            point("han", 1, 0.5, 0.1),
            point("least-loaded", 1, 0.4, 0.1),
        ]);
        assert!(s.iter().all(|r| r.gain_over_qos_greedy.is_none()));
        assert!(summarise(&[]).is_empty());
    }
}
