//! Summaries over seeds shared by `compare`, the demo, the tables and `report`. One
//! convention everywhere: the standard deviation is the sample one (ddof = 1, divided by n - 1;
//! 0 for a single value).

use serde::{Deserialize, Serialize};

/// Mean ± std over seeds of one policy (at one sweep value).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicySummary {
    pub policy: String,
    /// The sweep value, when sweeping.
    pub sweep_value: Option<f64>,
    pub runs: usize,
    pub avg_qos_mean: f64,
    pub avg_qos_std: f64,
    pub slo_violation_rate_mean: f64,
    pub reject_rate_mean: f64,
    pub efficiency_mean: f64,
    pub per_token_latency_p50_s_mean: f64,
    pub per_token_latency_p95_s_mean: f64,
    pub ttft_p99_s_mean: f64,
    pub throughput_requests_s_mean: f64,
    /// Paired gain in average QoS over `qos-greedy` on the same workload seeds, when it ran:
    /// mean, std over seeds, and how many seeds it won.
    pub gain_over_qos_greedy: Option<PairedGain>,
}

/// A policy's paired difference with a reference on the same workload samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PairedGain {
    pub mean: f64,
    pub std: f64,
    pub wins: usize,
    pub pairs: usize,
}

/// The paired differences `mine[i] - reference[i]` (values in seed order).
pub(crate) fn paired_gain(mine: &[f64], reference: &[f64]) -> Option<PairedGain> {
    if mine.len() != reference.len() || mine.is_empty() {
        return None;
    }
    let diffs: Vec<f64> = mine.iter().zip(reference).map(|(a, b)| a - b).collect();
    let (mean, std) = mean_std(&diffs);
    Some(PairedGain {
        mean,
        std,
        wins: diffs.iter().filter(|d| **d > 0.0).count(),
        pairs: diffs.len(),
    })
}

/// Mean and sample standard deviation (ddof = 1); NaN for no values, std 0 for one.
pub(crate) fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}
