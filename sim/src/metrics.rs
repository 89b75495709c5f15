//! Metrics of one run: average QoS, SLO violations, rejections, latency percentiles,
//! throughput, utilisation and resource efficiency, per expert and per task.

use std::sync::Arc;

use qosroute_core::{ExpertProfile, Task};
use serde::Serialize;

use crate::record::RequestRecord;

/// Nearest-rank percentiles (NaN, written as `null`, when there is no sample).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Percentiles {
    /// Percentiles of `values` (sorted in place).
    pub fn of(values: &mut [f64]) -> Self {
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if values.is_empty() {
                return f64::NAN;
            }
            let rank = (q * values.len() as f64).ceil() as usize;
            values[rank.clamp(1, values.len()) - 1]
        };
        Self {
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
        }
    }
}

/// One expert's share of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertReport {
    /// Expert name.
    pub name: String,
    /// Model served.
    pub model: String,
    /// Requests routed to it.
    pub routed: u64,
    /// Fraction of all requests routed to it.
    pub share: f64,
    /// Seconds it spent in prefill or decode.
    pub busy_s: f64,
    /// `busy_s` over the run's makespan.
    pub utilisation: f64,
    /// Mean QoS of the requests it served.
    pub avg_qos: f64,
    /// Fraction of its served requests that missed their SLO.
    pub slo_violation_rate: f64,
}

/// One task's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskReport {
    /// Task name.
    pub task: String,
    /// Requests of this task.
    pub requests: u64,
    /// Mean QoS over all of them (rejected count as 0).
    pub avg_qos: f64,
    /// Fraction of the served ones that missed their SLO.
    pub slo_violation_rate: f64,
    /// Fraction rejected.
    pub reject_rate: f64,
}

/// Everything measured in one run. Deterministic: no wall-clock figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunReport {
    /// Policy name.
    pub policy: String,
    /// Seed of the workload and of randomised policies.
    pub seed: u64,
    /// Expert catalogue name.
    pub catalogue: String,
    /// Workload spec.
    pub workload: String,
    /// Requests in the workload.
    pub requests: u64,
    /// Requests served to completion.
    pub completed: u64,
    /// Requests rejected (by the policy, or by an invalid decision).
    pub rejected: u64,
    /// Decisions that named an expert unable to take the request.
    pub invalid_decisions: u64,
    /// Mean QoS over all requests: the headline metric.
    pub avg_qos: f64,
    /// Fraction of served requests whose per-token latency reached the SLO.
    pub slo_violation_rate: f64,
    /// Fraction of requests rejected.
    pub reject_rate: f64,
    /// Mean true quality of the served answers, regardless of latency.
    pub avg_quality_served: f64,
    /// Per-token latency of served requests, seconds.
    pub per_token_latency_s: Percentiles,
    /// Time to first token of served requests, seconds.
    pub ttft_s: Percentiles,
    /// From the first arrival (t = 0) to the last completion, seconds.
    pub makespan_s: f64,
    /// Completed requests per second of makespan.
    pub throughput_requests_s: f64,
    /// Output tokens per second of makespan.
    pub throughput_tokens_s: f64,
    /// Sum of every expert's busy seconds.
    pub busy_s_total: f64,
    /// Resource efficiency: QoS earned per expert-busy-second.
    pub efficiency_qos_per_busy_s: f64,
    /// Per expert, in catalogue order.
    pub experts: Vec<ExpertReport>,
    /// Per task that occurred, in task order.
    pub per_task: Vec<TaskReport>,
}

/// From t = 0 to the last event of any request (its completion, or the arrival of one that
/// never completed).
pub(crate) fn makespan_s(records: &[RequestRecord]) -> f64 {
    records
        .iter()
        .map(|r| {
            if r.is_completed() {
                r.finish_s
            } else {
                r.request.arrival_s
            }
        })
        .fold(0.0, f64::max)
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// Summarises a finished run.
pub(crate) fn summarise(
    policy: &str,
    seed: u64,
    catalogue: &str,
    workload: &str,
    records: &[RequestRecord],
    experts: &[(Arc<ExpertProfile>, f64)],
    invalid_decisions: u64,
) -> RunReport {
    let n = records.len() as f64;
    let served: Vec<&RequestRecord> = records.iter().filter(|r| r.is_completed()).collect();
    let violated = |r: &RequestRecord| r.per_token_latency_s() >= r.request.slo_s_per_token;
    let qos_sum: f64 = records.iter().map(|r| r.qos).sum();
    let makespan_s = makespan_s(records);
    let busy_s_total: f64 = experts.iter().map(|(_, b)| b).sum();
    let mut latency: Vec<f64> = served.iter().map(|r| r.per_token_latency_s()).collect();
    let mut ttft: Vec<f64> = served
        .iter()
        .map(|r| r.first_token_s - r.request.arrival_s)
        .collect();
    let tokens: f64 = served.iter().map(|r| f64::from(r.output_tokens)).sum();
    let rejected = records
        .iter()
        .filter(|r| matches!(r.routed_to, Some(None) | None))
        .count() as u64;

    let expert_reports = experts
        .iter()
        .enumerate()
        .map(|(e, (profile, busy_s))| {
            let mine: Vec<&RequestRecord> = records
                .iter()
                .filter(|r| r.routed_to == Some(Some(e)))
                .collect();
            let done: Vec<&&RequestRecord> = mine.iter().filter(|r| r.is_completed()).collect();
            ExpertReport {
                name: profile.name.clone(),
                model: profile.model.clone(),
                routed: mine.len() as u64,
                share: ratio(mine.len() as f64, n),
                busy_s: *busy_s,
                utilisation: ratio(*busy_s, makespan_s),
                avg_qos: ratio(done.iter().map(|r| r.qos).sum(), done.len() as f64),
                slo_violation_rate: ratio(
                    done.iter().filter(|r| violated(r)).count() as f64,
                    done.len() as f64,
                ),
            }
        })
        .collect();

    let per_task = Task::ALL
        .iter()
        .filter_map(|&task| {
            let mine: Vec<&RequestRecord> =
                records.iter().filter(|r| r.request.task == task).collect();
            if mine.is_empty() {
                return None;
            }
            let done: Vec<&&RequestRecord> = mine.iter().filter(|r| r.is_completed()).collect();
            Some(TaskReport {
                task: task.as_str().to_owned(),
                requests: mine.len() as u64,
                avg_qos: ratio(mine.iter().map(|r| r.qos).sum(), mine.len() as f64),
                slo_violation_rate: ratio(
                    done.iter().filter(|r| violated(r)).count() as f64,
                    done.len() as f64,
                ),
                reject_rate: ratio(
                    mine.iter().filter(|r| !r.is_completed()).count() as f64,
                    mine.len() as f64,
                ),
            })
        })
        .collect();

    RunReport {
        policy: policy.to_owned(),
        seed,
        catalogue: catalogue.to_owned(),
        workload: workload.to_owned(),
        requests: records.len() as u64,
        completed: served.len() as u64,
        rejected,
        invalid_decisions,
        avg_qos: ratio(qos_sum, n),
        slo_violation_rate: ratio(
            served.iter().filter(|r| violated(r)).count() as f64,
            served.len() as f64,
        ),
        reject_rate: ratio(rejected as f64, n),
        avg_quality_served: ratio(served.iter().map(|r| r.quality).sum(), served.len() as f64),
        per_token_latency_s: Percentiles::of(&mut latency),
        ttft_s: Percentiles::of(&mut ttft),
        makespan_s,
        throughput_requests_s: ratio(served.len() as f64, makespan_s),
        throughput_tokens_s: ratio(tokens, makespan_s),
        busy_s_total,
        efficiency_qos_per_busy_s: ratio(qos_sum, busy_s_total),
        experts: expert_reports,
        per_task,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&mut v);
        assert_eq!((p.p50, p.p95, p.p99), (50.0, 95.0, 99.0));
        let p = Percentiles::of(&mut []);
        assert!(p.p50.is_nan());
        let p = Percentiles::of(&mut [3.0]);
        assert_eq!((p.p50, p.p99), (3.0, 3.0));
    }
}
