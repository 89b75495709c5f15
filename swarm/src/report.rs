//! The result of a swarm run ([`SwarmReport`]: every request's record) and its statistics
//! ([`SwarmSummary`], [`TimelinePoint`]).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::record::{Outcome, RequestRecord, UnexpectedReplies};

/// Everything a swarm run saw: one record per request of the workload, plus what could not be
/// attributed to any request.
#[derive(Debug, Clone, Serialize)]
pub struct SwarmReport {
    /// The site the requests went to.
    pub site: String,
    /// The run's tag (in every request id and device name).
    pub run_tag: String,
    /// Devices used.
    pub devices: usize,
    /// Replay speed.
    pub speed: f64,
    /// Seconds from the start to the end of the run (after the linger).
    pub duration_s: f64,
    /// Whether the run was stopped before every request was published or answered.
    pub stopped_early: bool,
    /// Expert names, in order of first appearance; records refer to them by index.
    pub experts: Vec<String>,
    /// One record per request, in workload order.
    pub records: Vec<RequestRecord>,
    /// Replies not attributable to a request.
    pub unexpected: UnexpectedReplies,
    /// Connections established by the devices (CONNACKs; reconnects included).
    pub connections: u64,
    /// Failed polls of the devices' connections (each one a drop or a failed reconnect).
    pub connection_errors: u64,
    /// Feedback messages sent.
    pub feedback_sent: u64,
    /// Feedback messages not sent (the device's queue was full).
    pub feedback_dropped: u64,
}

/// Percentiles of a sample (NaN when it is empty; JSON `null`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Percentiles {
    /// Sample size.
    pub n: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest value.
    pub max: f64,
}

impl Percentiles {
    /// Percentiles of `values` (non-finite values are ignored), nearest rank.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let at = |p: f64| {
            if n == 0 {
                f64::NAN
            } else {
                // Nearest rank: the smallest value with at least p of the sample at or below it.
                let rank = (p * n as f64).ceil() as usize;
                v[rank.clamp(1, n) - 1]
            }
        };
        Self {
            n,
            mean: if n == 0 {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / n as f64
            },
            p50: at(0.50),
            p90: at(0.90),
            p95: at(0.95),
            p99: at(0.99),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// One expert's part of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExpertShare {
    /// Expert name.
    pub name: String,
    /// Requests it completed.
    pub completed: u64,
    /// Its fraction of all completed requests.
    pub share: f64,
    /// Fraction of its completed requests that missed their SLO.
    pub slo_violation_rate: f64,
    /// Mean realised QoS of its completed requests (NaN when no quality is known).
    pub avg_qos: f64,
    /// Median seconds per output token (gateway-measured).
    pub per_token_p50_s: f64,
}

/// Summary statistics of a run. Rates are NaN (JSON `null`) when their denominator is 0.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SwarmSummary {
    /// Requests in the workload.
    pub requests: u64,
    /// Requests published.
    pub published: u64,
    /// Requests never published.
    pub not_sent: u64,
    /// Requests whose first end was a final reply.
    pub completed: u64,
    /// Requests whose first end was an error reply.
    pub errors: u64,
    /// Error replies by code name.
    pub errors_by_code: BTreeMap<String, u64>,
    /// Published requests with neither a final nor an error reply.
    pub lost: u64,
    /// Requests with more than one final-or-error reply.
    pub duplicated: u64,
    /// Final-or-error replies beyond the first, over all requests.
    pub extra_ends: u64,
    /// Byte-identical copies of a request's end (MQTT at-least-once redeliveries), over all
    /// requests; not answers, so not in `duplicated`.
    pub redelivered_ends: u64,
    /// `not_sent + completed + errors + lost == requests` (every request accounted for once).
    pub accounted: bool,
    /// Chunks with an unexpected `seq`.
    pub chunk_gaps: u64,
    /// Chunks that arrived after their request's end.
    pub replies_after_end: u64,
    /// Replies not attributable to a request.
    pub unexpected: UnexpectedReplies,
    /// Seconds of the run.
    pub duration_s: f64,
    /// Seconds from the first to the last publish.
    pub publish_span_s: f64,
    /// Published requests per second over the publish span.
    pub requests_per_s: f64,
    /// Completed requests per second over the whole run.
    pub completed_per_s: f64,
    /// Largest delay of a publish behind its schedule, seconds.
    pub max_publish_lag_s: f64,
    /// Fraction of completed requests that missed their SLO (the verdict QoS uses: the
    /// devices' own when they have targets, see `slo_judged_by`).
    pub slo_violation_rate: f64,
    /// Who judged the SLOs of the completed requests: `device` (each device, by the
    /// simulator's rule, from its publish to the last token), `gateway` (the gateway's verdict
    /// in its final reply), `mixed`, or `none` (nothing completed).
    pub slo_judged_by: &'static str,
    /// Fraction of completed requests the gateway says missed their SLO (its own clock, from
    /// when it received the request to its final reply).
    pub gateway_slo_violation_rate: f64,
    /// Mean realised QoS over published requests (errors and lost requests earn 0); NaN when
    /// a completed request's quality is unknown.
    pub avg_qos: f64,
    /// Mean quality of the answers delivered (SLO met or not); NaN when unknown.
    pub avg_quality_served: f64,
    /// Time to the first chunk as the devices saw it (completed requests), seconds.
    pub ttft_s: Percentiles,
    /// The gateway's time to first token (completed requests), seconds.
    pub gateway_ttft_s: Percentiles,
    /// Publish to final reply as the devices saw it (completed requests), seconds.
    pub e2e_s: Percentiles,
    /// Seconds per output token as the gateway measured it (completed requests).
    pub per_token_s: Percentiles,
    /// Seconds per output token as the devices saw it (completed requests).
    pub device_per_token_s: Percentiles,
    /// Per expert, in order of first appearance.
    pub experts: Vec<ExpertShare>,
    /// Device connections (reconnects included) and failed polls.
    pub connections: u64,
    /// Failed polls of the devices' connections.
    pub connection_errors: u64,
}

/// Requests that ended in one time bucket.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimelinePoint {
    /// End of the bucket, seconds since the start.
    pub t_s: f64,
    /// Requests published in the bucket.
    pub published: u64,
    /// Requests that ended (final or error) in the bucket.
    pub ended: u64,
    /// Of those, completed.
    pub completed: u64,
    /// Completed ones that missed their SLO.
    pub slo_violations: u64,
    /// Mean realised QoS of the requests that ended in the bucket (NaN when none, or a
    /// quality is unknown).
    pub avg_qos: f64,
}

fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 { num / den } else { f64::NAN }
}

impl SwarmReport {
    /// The name of the expert of a record.
    pub fn expert_name(&self, record: &RequestRecord) -> Option<&str> {
        record
            .expert
            .and_then(|e| self.experts.get(usize::from(e)))
            .map(String::as_str)
    }

    /// The summary statistics.
    pub fn summary(&self) -> SwarmSummary {
        let records = &self.records;
        let count = |f: &dyn Fn(&RequestRecord) -> bool| records.iter().filter(|r| f(r)).count();
        let requests = records.len() as u64;
        let published = count(&|r| r.published_s.is_some()) as u64;
        let not_sent = count(&|r| r.outcome == Outcome::NotSent) as u64;
        let completed_records: Vec<&RequestRecord> = records
            .iter()
            .filter(|r| r.outcome == Outcome::Completed)
            .collect();
        let completed = completed_records.len() as u64;
        let mut errors_by_code = BTreeMap::new();
        for r in records {
            if let Outcome::Error(code) = r.outcome {
                *errors_by_code.entry(code.as_str().to_owned()).or_insert(0) += 1;
            }
        }
        let errors = errors_by_code.values().sum();
        let lost = count(&|r| matches!(r.outcome, Outcome::Lost | Outcome::Pending)) as u64;
        let first_publish = records
            .iter()
            .filter_map(|r| r.published_s)
            .fold(f64::INFINITY, f64::min);
        let last_publish = records
            .iter()
            .filter_map(|r| r.published_s)
            .fold(f64::NEG_INFINITY, f64::max);
        let publish_span_s = if published > 0 {
            last_publish - first_publish
        } else {
            0.0
        };
        let violations = completed_records
            .iter()
            .filter(|r| r.slo_met != Some(true))
            .count();
        let gateway_violations = completed_records
            .iter()
            .filter(|r| r.gateway_slo_met != Some(true))
            .count();
        let by_device = completed_records
            .iter()
            .filter(|r| r.slo_s_per_token.is_some())
            .count();
        let slo_judged_by = match by_device {
            _ if completed_records.is_empty() => "none",
            0 => "gateway",
            n if n == completed_records.len() => "device",
            _ => "mixed",
        };
        let sent: Vec<&RequestRecord> =
            records.iter().filter(|r| r.published_s.is_some()).collect();
        let qos: Option<Vec<f64>> = sent.iter().map(|r| r.qos()).collect();
        let avg_qos = match qos {
            Some(q) if !q.is_empty() => q.iter().sum::<f64>() / q.len() as f64,
            _ => f64::NAN,
        };
        let served: Option<Vec<f64>> = completed_records
            .iter()
            .map(|r| r.quality.map(f64::from))
            .collect();
        let avg_quality_served = match served {
            Some(q) if !q.is_empty() => q.iter().sum::<f64>() / q.len() as f64,
            _ => f64::NAN,
        };
        let of = |f: fn(&RequestRecord) -> Option<f64>| {
            Percentiles::of(completed_records.iter().filter_map(|r| f(r)))
        };
        let experts = self
            .experts
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let mine: Vec<&&RequestRecord> = completed_records
                    .iter()
                    .filter(|r| r.expert.map(usize::from) == Some(i))
                    .collect();
                let n = mine.len();
                let qos: Option<Vec<f64>> = mine.iter().map(|r| r.qos()).collect();
                ExpertShare {
                    name: name.clone(),
                    completed: n as u64,
                    share: ratio(n as f64, completed as f64),
                    slo_violation_rate: ratio(
                        mine.iter().filter(|r| r.slo_met != Some(true)).count() as f64,
                        n as f64,
                    ),
                    avg_qos: match qos {
                        Some(q) if !q.is_empty() => q.iter().sum::<f64>() / q.len() as f64,
                        _ => f64::NAN,
                    },
                    per_token_p50_s: Percentiles::of(
                        mine.iter().filter_map(|r| r.s_per_token.map(f64::from)),
                    )
                    .p50,
                }
            })
            .collect();
        SwarmSummary {
            requests,
            published,
            not_sent,
            completed,
            errors,
            errors_by_code,
            lost,
            duplicated: count(&RequestRecord::duplicated) as u64,
            extra_ends: records
                .iter()
                .map(|r| u64::from(r.ends.saturating_sub(1)))
                .sum(),
            redelivered_ends: records.iter().map(|r| u64::from(r.redelivered_ends)).sum(),
            accounted: not_sent + completed + errors + lost == requests,
            chunk_gaps: records.iter().map(|r| u64::from(r.chunk_gaps)).sum(),
            replies_after_end: records.iter().map(|r| u64::from(r.replies_after_end)).sum(),
            unexpected: self.unexpected,
            duration_s: self.duration_s,
            publish_span_s,
            requests_per_s: ratio(published as f64, publish_span_s),
            completed_per_s: ratio(completed as f64, self.duration_s),
            max_publish_lag_s: records
                .iter()
                .filter_map(|r| Some(r.published_s? - r.scheduled_s))
                .fold(0.0, f64::max),
            slo_violation_rate: ratio(violations as f64, completed as f64),
            slo_judged_by,
            gateway_slo_violation_rate: ratio(gateway_violations as f64, completed as f64),
            avg_qos,
            avg_quality_served,
            ttft_s: of(RequestRecord::ttft_s),
            gateway_ttft_s: of(|r| r.gateway_ttft_ms.map(|ms| f64::from(ms) / 1e3)),
            e2e_s: of(RequestRecord::e2e_s),
            per_token_s: of(|r| r.s_per_token.map(f64::from)),
            device_per_token_s: of(RequestRecord::device_s_per_token),
            experts,
            connections: self.connections,
            connection_errors: self.connection_errors,
        }
    }

    /// The run cut into buckets of `bucket_s` seconds (at least 1 ms): publishes by publish
    /// time, ends and QoS by end time.
    pub fn timeline(&self, bucket_s: f64) -> Vec<TimelinePoint> {
        let bucket_s = if bucket_s.is_finite() {
            bucket_s.max(1e-3)
        } else {
            1.0
        };
        let last = self
            .records
            .iter()
            .flat_map(|r| [r.published_s, r.ended_s])
            .flatten()
            .fold(0.0, f64::max);
        let buckets = (last / bucket_s).floor() as usize + 1;
        let mut points: Vec<TimelinePoint> = (0..buckets)
            .map(|i| TimelinePoint {
                t_s: (i + 1) as f64 * bucket_s,
                published: 0,
                ended: 0,
                completed: 0,
                slo_violations: 0,
                avg_qos: 0.0,
            })
            .collect();
        let slot = |t: f64| ((t / bucket_s).floor().max(0.0) as usize).min(buckets - 1);
        let mut qos_known = vec![true; buckets];
        for r in &self.records {
            if let Some(t) = r.published_s {
                points[slot(t)].published += 1;
            }
            let Some(t) = r.ended_s else { continue };
            let i = slot(t);
            let p = &mut points[i];
            p.ended += 1;
            if r.outcome == Outcome::Completed {
                p.completed += 1;
                if r.slo_met != Some(true) {
                    p.slo_violations += 1;
                }
            }
            match r.qos() {
                Some(q) => p.avg_qos += q,
                None => qos_known[i] = false,
            }
        }
        for (p, known) in points.iter_mut().zip(qos_known) {
            p.avg_qos = if known && p.ended > 0 {
                p.avg_qos / p.ended as f64
            } else {
                f64::NAN
            };
        }
        points
    }
}

#[cfg(test)]
mod tests {
    use qosroute_proto::{Encoding, ErrorCode, Task};

    use super::*;
    use crate::record::SwarmRequest;

    fn record(index: u32) -> RequestRecord {
        let r = SwarmRequest {
            arrival_s: 0.0,
            task: Task::Mmlu,
            prompt_tokens: 100,
            output_tokens: 10,
            max_tokens: 10,
            quality_row: Some(index),
        };
        let mut rec = RequestRecord::new(index, 0, Encoding::Json, &r);
        rec.scheduled_s = f64::from(index);
        rec
    }

    fn completed(index: u32, expert: u16, slo_met: bool, quality: f32, spt: f32) -> RequestRecord {
        RequestRecord {
            published_s: Some(f64::from(index) + 0.5),
            first_chunk_s: Some(f64::from(index) + 0.6),
            ended_s: Some(f64::from(index) + 1.5),
            outcome: Outcome::Completed,
            expert: Some(expert),
            output_tokens: Some(10),
            gateway_ttft_ms: Some(50),
            gateway_total_ms: Some(900),
            s_per_token: Some(spt),
            gateway_slo_met: Some(slo_met),
            slo_met: Some(slo_met),
            quality: Some(quality),
            chunks: 2,
            ends: 1,
            ..record(index)
        }
    }

    fn report(records: Vec<RequestRecord>) -> SwarmReport {
        SwarmReport {
            site: "lab".into(),
            run_tag: "t".into(),
            devices: 1,
            speed: 1.0,
            duration_s: 10.0,
            stopped_early: false,
            experts: vec!["a".into(), "b".into()],
            records,
            unexpected: UnexpectedReplies {
                undecodable: 2,
                ..UnexpectedReplies::default()
            },
            connections: 1,
            connection_errors: 0,
            feedback_sent: 0,
            feedback_dropped: 0,
        }
    }

    #[test]
    fn percentiles_use_nearest_rank_and_ignore_non_finite() {
        let p = Percentiles::of((1..=100).map(f64::from).chain([f64::NAN, f64::INFINITY]));
        assert_eq!(p.n, 100);
        assert_eq!(
            (p.p50, p.p90, p.p95, p.p99, p.max),
            (50.0, 90.0, 95.0, 99.0, 100.0)
        );
        assert!((p.mean - 50.5).abs() < 1e-12);
        let one = Percentiles::of([3.0]);
        assert_eq!((one.p50, one.p99, one.max), (3.0, 3.0, 3.0));
        let none = Percentiles::of([]);
        assert_eq!(none.n, 0);
        assert!(none.p50.is_nan() && none.mean.is_nan() && none.max.is_nan());
    }

    #[test]
    fn every_request_is_accounted_for_once() {
        let mut dup = completed(1, 1, true, 0.6, 0.02);
        dup.ends = 3;
        let records = vec![
            completed(0, 0, true, 0.8, 0.01),
            dup,
            completed(2, 0, false, 0.9, 0.2),
            RequestRecord {
                published_s: Some(3.5),
                ended_s: Some(3.6),
                outcome: Outcome::Error(ErrorCode::NoExpert),
                ends: 1,
                ..record(3)
            },
            RequestRecord {
                published_s: Some(4.5),
                outcome: Outcome::Lost,
                ..record(4)
            },
            record(5), // never sent
        ];
        let s = report(records).summary();
        assert_eq!(s.requests, 6);
        assert_eq!(s.published, 5);
        assert_eq!(s.not_sent, 1);
        assert_eq!(s.completed, 3);
        assert_eq!(s.errors, 1);
        assert_eq!(s.errors_by_code.get("no_expert"), Some(&1));
        assert_eq!(s.lost, 1);
        assert_eq!(s.duplicated, 1);
        assert_eq!(s.extra_ends, 2);
        assert!(s.accounted);
        assert_eq!(s.unexpected.undecodable, 2);
        // QoS over the 5 published: 0.8 + 0.6 + 0 (SLO missed) + 0 (error) + 0 (lost).
        assert!((s.avg_qos - 1.4 / 5.0).abs() < 1e-6, "{}", s.avg_qos);
        assert!((s.avg_quality_served - (0.8 + 0.6 + 0.9) / 3.0).abs() < 1e-6);
        assert!((s.slo_violation_rate - 1.0 / 3.0).abs() < 1e-12);
        assert!((s.gateway_slo_violation_rate - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(s.slo_judged_by, "gateway");
        assert!((s.publish_span_s - 4.0).abs() < 1e-12);
        assert!((s.requests_per_s - 5.0 / 4.0).abs() < 1e-12);
        assert!((s.max_publish_lag_s - 0.5).abs() < 1e-12);
        assert_eq!(s.ttft_s.n, 3);
        assert!((s.ttft_s.p50 - 0.1).abs() < 1e-9);
        assert!((s.gateway_ttft_s.p50 - 0.05).abs() < 1e-9);
        assert!((s.device_per_token_s.p50 - 0.1).abs() < 1e-9);
        assert_eq!(s.experts.len(), 2);
        assert_eq!(s.experts[0].completed, 2);
        assert!((s.experts[0].share - 2.0 / 3.0).abs() < 1e-12);
        assert!((s.experts[0].slo_violation_rate - 0.5).abs() < 1e-12);
        assert!((s.experts[0].avg_qos - 0.4).abs() < 1e-6);
        assert!((s.experts[1].per_token_p50_s - 0.02).abs() < 1e-6);
    }

    #[test]
    fn the_devices_verdict_counts_and_the_gateways_is_kept_beside_it() {
        // Both completed, the gateway says both met their SLO; the first device saw a miss.
        let mut late = completed(0, 0, true, 0.8, 0.01);
        late.slo_s_per_token = Some(0.05);
        late.slo_met = Some(false);
        let mut fine = completed(1, 0, true, 0.6, 0.01);
        fine.slo_s_per_token = Some(0.05);
        let s = report(vec![late, fine]).summary();
        assert_eq!(s.slo_judged_by, "device");
        assert!((s.slo_violation_rate - 0.5).abs() < 1e-12);
        assert_eq!(s.gateway_slo_violation_rate, 0.0);
        assert!((s.avg_qos - 0.3).abs() < 1e-6, "{}", s.avg_qos);
        let mut gateway = completed(2, 0, true, 0.6, 0.01);
        gateway.slo_s_per_token = None;
        assert_eq!(report(vec![late, gateway]).summary().slo_judged_by, "mixed");
        assert_eq!(report(vec![]).summary().slo_judged_by, "none");
    }

    #[test]
    fn unknown_quality_makes_qos_unknown_not_zero() {
        let mut r = completed(0, 0, true, 0.5, 0.01);
        r.quality = None;
        let s = report(vec![r, completed(1, 1, true, 0.7, 0.01)]).summary();
        assert!(s.avg_qos.is_nan());
        assert!(s.experts[0].avg_qos.is_nan());
        assert!((s.experts[1].avg_qos - 0.7).abs() < 1e-6);
        let empty = report(vec![]).summary();
        assert!(empty.accounted && empty.avg_qos.is_nan() && empty.requests_per_s.is_nan());
        let json = serde_json::to_string(&empty).unwrap();
        assert!(json.contains("\"avg_qos\":null"), "{json}");
    }

    #[test]
    fn timeline_buckets_by_publish_and_end_time() {
        let records = vec![
            completed(0, 0, true, 0.8, 0.01), // published 0.5, ended 1.5
            completed(1, 0, false, 0.8, 0.2), // published 1.5, ended 2.5
            completed(2, 1, true, 0.4, 0.01), // published 2.5, ended 3.5
        ];
        let t = report(records).timeline(2.0);
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].t_s, t[0].published, t[0].ended), (2.0, 2, 1));
        assert!((t[0].avg_qos - 0.8).abs() < 1e-6);
        assert_eq!((t[1].published, t[1].ended, t[1].slo_violations), (1, 2, 1));
        assert!((t[1].avg_qos - 0.2).abs() < 1e-6);
        assert!(report(vec![]).timeline(1.0)[0].avg_qos.is_nan());
    }
}
