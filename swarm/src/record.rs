//! What the swarm sends ([`SwarmRequest`]) and what it records of each request
//! ([`RequestRecord`]): fixed-size, so memory grows by one record per request and no more.

use qosroute_proto::{Encoding, ErrorCode, Task};
use qosroute_sim::Workload;
use serde::{Serialize, Serializer};

/// One request to replay: when it arrives and what it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwarmRequest {
    /// Arrival time in workload seconds (published at `arrival_s / speed` after the start).
    pub arrival_s: f64,
    /// The task class.
    pub task: Task,
    /// Prompt length in tokens (the prompt is about four bytes per token, so at most
    /// [`crate::MAX_PROMPT_TOKENS`]).
    pub prompt_tokens: u32,
    /// The true length of the answer, in tokens: the workload's. Not sent (a device does not
    /// know how long its answer will be); a site that emulates its experts may use it
    /// (`qosroute_emulator::EmulatorOptions::answer_tokens`).
    pub output_tokens: u32,
    /// The request's `max_tokens`, as the device sends it.
    pub max_tokens: u32,
    /// Row of the quality table holding the true quality of every model on this request,
    /// when known (see [`crate::QualityTruth`]).
    pub quality_row: Option<u32>,
}

impl SwarmRequest {
    /// The requests of a simulator workload, in arrival order, each asking for exactly its
    /// answer's length as `max_tokens` (an oracle: a gateway that caps its predictions at
    /// `max_tokens` then knows every answer's length; set a realistic `max_tokens` for a fair
    /// comparison of routers). A task the wire format does not know becomes `chat`.
    pub fn from_workload(workload: &Workload) -> Vec<SwarmRequest> {
        workload
            .requests
            .iter()
            .map(|r| SwarmRequest {
                arrival_s: r.arrival_s,
                task: r.task.as_str().parse().unwrap_or(Task::Chat),
                prompt_tokens: r.prompt_tokens,
                output_tokens: r.output_tokens,
                max_tokens: r.output_tokens,
                quality_row: u32::try_from(r.quality_row).ok(),
            })
            .collect()
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    /// Not published: the swarm was stopped first, or the device's queue was full.
    NotSent,
    /// Published; no final or error reply yet (only while the swarm runs).
    Pending,
    /// Published; no final or error reply arrived before the swarm finished.
    Lost,
    /// A final reply arrived (first).
    Completed,
    /// An error reply arrived (first), with its code.
    Error(ErrorCode),
}

impl Outcome {
    /// `not_sent`, `pending`, `lost`, `completed`, or the error code's name
    /// (`no_expert`, `overloaded`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NotSent => "not_sent",
            Outcome::Pending => "pending",
            Outcome::Lost => "lost",
            Outcome::Completed => "completed",
            Outcome::Error(code) => code.as_str(),
        }
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

fn encoding_name<S: Serializer>(e: &Encoding, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(match e {
        Encoding::Postcard => "postcard",
        Encoding::Json => "json",
    })
}

fn task_name<S: Serializer>(t: &Task, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(t.as_str())
}

/// Everything the swarm saw of one request. Times are seconds since the swarm started.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RequestRecord {
    /// Position in the replayed workload.
    pub index: u32,
    /// The device that sent it.
    pub device: u32,
    /// Task class.
    #[serde(serialize_with = "task_name")]
    pub task: Task,
    /// Encoding of the request (and so of its replies).
    #[serde(serialize_with = "encoding_name")]
    pub encoding: Encoding,
    /// Prompt tokens as sent (after the prompt-size bound).
    pub prompt_tokens: u32,
    /// `max_tokens` as sent.
    pub max_tokens: u32,
    /// Row of the quality table, when known.
    pub quality_row: Option<u32>,
    /// When it was due.
    pub scheduled_s: f64,
    /// When it was handed to the device's MQTT client.
    pub published_s: Option<f64>,
    /// When its first reply chunk arrived.
    pub first_chunk_s: Option<f64>,
    /// When its (first) final or error reply arrived.
    pub ended_s: Option<f64>,
    /// How it ended.
    pub outcome: Outcome,
    /// The expert that answered (index into [`crate::SwarmReport::experts`]), from the first
    /// chunk or the final reply.
    pub expert: Option<u16>,
    /// Output tokens of the answer (final reply).
    pub output_tokens: Option<u32>,
    /// The gateway's time to first token, ms from when it received the request.
    pub gateway_ttft_ms: Option<u32>,
    /// The gateway's total time, ms from when it received the request.
    pub gateway_total_ms: Option<u32>,
    /// Achieved seconds per output token as the gateway measured it (final reply).
    pub s_per_token: Option<f32>,
    /// Whether the gateway says the SLO was met (final reply): its own clock, from when it
    /// received the request to when it sent the final reply.
    pub gateway_slo_met: Option<bool>,
    /// The latency target the device judges its answer by, seconds per output token
    /// ([`crate::SwarmConfig::slo_s_per_token`], else [`crate::SwarmConfig::device_slo`]);
    /// `None`: the device has none and takes the gateway's verdict.
    pub slo_s_per_token: Option<f64>,
    /// When the last token of the answer arrived (the last chunk with text; the final reply
    /// when no chunk carried text).
    pub last_token_s: Option<f64>,
    /// Whether the SLO was met, the verdict QoS uses (final reply): with a target of its own,
    /// the device's, by the simulator's rule (`qosroute_core::slo_met`: per-token latency
    /// from its publish to the last token, strictly under the target); else the gateway's.
    pub slo_met: Option<bool>,
    /// True quality of the answering expert's model on this request (from the truth).
    pub quality: Option<f32>,
    /// Reply chunks received before the end.
    pub chunks: u32,
    /// Chunks whose `seq` was not the next expected one (lost or reordered chunks).
    pub chunk_gaps: u32,
    /// Final and error replies received; exactly 1 for a well-served request. A byte-identical
    /// copy of the first end is not counted here but in `redelivered_ends`.
    pub ends: u32,
    /// Copies of the first final or error message, byte for byte: MQTT's at-least-once
    /// redelivery of the same message (a publish resent after a broker restart), not a second
    /// answer (which has its own timings).
    pub redelivered_ends: u32,
    /// FNV-1a digest of the first end's payload (0: no end yet).
    #[serde(skip)]
    pub end_digest: u64,
    /// Chunks that arrived after the request's end.
    pub replies_after_end: u32,
}

impl RequestRecord {
    pub(crate) fn new(index: u32, device: u32, encoding: Encoding, r: &SwarmRequest) -> Self {
        Self {
            index,
            device,
            task: r.task,
            encoding,
            prompt_tokens: r.prompt_tokens.clamp(1, crate::MAX_PROMPT_TOKENS),
            max_tokens: r.max_tokens.clamp(1, qosroute_proto::MAX_TOKENS_LIMIT),
            quality_row: r.quality_row,
            scheduled_s: 0.0,
            published_s: None,
            first_chunk_s: None,
            ended_s: None,
            outcome: Outcome::NotSent,
            expert: None,
            output_tokens: None,
            gateway_ttft_ms: None,
            gateway_total_ms: None,
            s_per_token: None,
            gateway_slo_met: None,
            slo_s_per_token: None,
            last_token_s: None,
            slo_met: None,
            quality: None,
            chunks: 0,
            chunk_gaps: 0,
            ends: 0,
            redelivered_ends: 0,
            end_digest: 0,
            replies_after_end: 0,
        }
    }

    /// Realised QoS: the answer's quality when the SLO was met, else 0; 0 for an error or a
    /// lost request; `None` when not sent, or completed with an unknown quality.
    pub fn qos(&self) -> Option<f64> {
        match self.outcome {
            Outcome::Completed => self.quality.map(|q| {
                if self.slo_met == Some(true) {
                    f64::from(q)
                } else {
                    0.0
                }
            }),
            Outcome::Lost | Outcome::Error(_) | Outcome::Pending => Some(0.0),
            Outcome::NotSent => None,
        }
    }

    /// Time to the first chunk as the device saw it, seconds.
    pub fn ttft_s(&self) -> Option<f64> {
        Some(self.first_chunk_s? - self.published_s?)
    }

    /// Publish to end as the device saw it, seconds.
    pub fn e2e_s(&self) -> Option<f64> {
        Some(self.ended_s? - self.published_s?)
    }

    /// Seconds per output token as the device saw it: the simulator's per-token latency
    /// (`qosroute_core::per_token_latency_s`) from its publish to the last token.
    pub fn device_s_per_token(&self) -> Option<f64> {
        match self.outcome {
            Outcome::Completed => Some(qosroute_core::per_token_latency_s(
                self.published_s?,
                self.last_token_s.or(self.ended_s)?,
                self.output_tokens?,
            )),
            _ => None,
        }
    }

    /// Records the final reply's verdict: the device's own when it has a target (the
    /// simulator's rule on [`RequestRecord::device_s_per_token`]), else `gateway_slo_met`.
    pub(crate) fn judge(&mut self) {
        self.slo_met = match (self.slo_s_per_token, self.device_s_per_token()) {
            (Some(slo), Some(l)) => Some(qosroute_core::slo_met(l, slo)),
            (Some(_), None) => Some(false),
            (None, _) => self.gateway_slo_met,
        };
    }

    /// Records the end whose payload has `digest`: false when it is a redelivery of the first
    /// end (the same message again), true when it counts as an end.
    pub(crate) fn end_arrived(&mut self, digest: u64) -> bool {
        if self.ends > 0 && digest == self.end_digest {
            self.redelivered_ends = self.redelivered_ends.saturating_add(1);
            return false;
        }
        if self.ends == 0 {
            self.end_digest = digest;
        }
        self.ends = self.ends.saturating_add(1);
        true
    }

    /// Whether more than one distinct final or error reply arrived.
    pub fn duplicated(&self) -> bool {
        self.ends > 1
    }
}

/// Replies the swarm could not attribute to one of its requests, by reason. Counted, never
/// fatal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UnexpectedReplies {
    /// The payload decodes as no reply (in the announced encoding, or either when none is
    /// announced).
    pub undecodable: u64,
    /// An error reply without a request id (the gateway could not read the request).
    pub no_id: u64,
    /// An id this swarm run never sent (another run's, or garbage).
    pub unknown_id: u64,
    /// A reply for a request not published yet.
    pub before_publish: u64,
    /// MQTT 5 correlation data missing or not the request's (the reply is still counted).
    pub correlation_mismatch: u64,
    /// Delivered to another device than the one that sent the request (still counted).
    pub wrong_device: u64,
}

impl UnexpectedReplies {
    /// Replies dropped as unattributable (`correlation_mismatch` and `wrong_device` replies
    /// were still attributed).
    pub fn dropped(&self) -> u64 {
        self.undecodable + self.no_id + self.unknown_id + self.before_publish
    }

    /// Every anomaly counted.
    pub fn total(&self) -> u64 {
        self.dropped() + self.correlation_mismatch + self.wrong_device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_small_and_fixed_size() {
        let size = std::mem::size_of::<RequestRecord>();
        assert!(size <= 192, "{size} bytes");
    }

    #[test]
    fn qos_is_quality_when_the_slo_is_met_else_zero() {
        let r = SwarmRequest {
            arrival_s: 0.0,
            task: Task::Gsm8k,
            prompt_tokens: 0,
            output_tokens: 0,
            max_tokens: 0,
            quality_row: Some(1),
        };
        let base = RequestRecord::new(0, 0, Encoding::Json, &r);
        assert_eq!((base.prompt_tokens, base.max_tokens), (1, 1));
        assert_eq!(base.qos(), None);
        let done = RequestRecord {
            outcome: Outcome::Completed,
            quality: Some(0.5),
            slo_met: Some(true),
            ..base
        };
        assert_eq!(done.qos(), Some(0.5));
        let late = RequestRecord {
            slo_met: Some(false),
            ..done
        };
        assert_eq!(late.qos(), Some(0.0));
        let unknown = RequestRecord {
            quality: None,
            ..done
        };
        assert_eq!(unknown.qos(), None);
        for outcome in [Outcome::Lost, Outcome::Error(ErrorCode::Timeout)] {
            assert_eq!(RequestRecord { outcome, ..base }.qos(), Some(0.0));
        }
        assert_eq!(Outcome::Error(ErrorCode::NoExpert).as_str(), "no_expert");
    }

    #[test]
    fn the_device_judges_from_its_publish_to_the_last_token_strictly_under_its_target() {
        let r = SwarmRequest {
            arrival_s: 0.0,
            task: Task::Mmlu,
            prompt_tokens: 100,
            output_tokens: 300,
            max_tokens: 600,
            quality_row: Some(1),
        };
        // Published at 1 s, last token at 26 s, final reply at 26.5 s, 200 tokens: the device
        // sees (26 - 1) / 200 = 0.125 s per token. The gateway (its own clock, from receipt
        // to its final reply) said the SLO was met.
        let done = RequestRecord {
            published_s: Some(1.0),
            first_chunk_s: Some(2.0),
            last_token_s: Some(26.0),
            ended_s: Some(26.5),
            outcome: Outcome::Completed,
            output_tokens: Some(200),
            gateway_slo_met: Some(true),
            quality: Some(0.75),
            ..RequestRecord::new(0, 0, Encoding::Json, &r)
        };
        assert_eq!(
            done.max_tokens, 600,
            "max_tokens as sent, not the answer's length"
        );
        assert_eq!(done.device_s_per_token(), Some(0.125));
        let judged = |slo: Option<f64>| {
            let mut x = RequestRecord {
                slo_s_per_token: slo,
                ..done
            };
            x.judge();
            (x.slo_met, x.qos())
        };
        // At the target is a miss (the simulator's strict <), whatever the gateway says.
        assert_eq!(judged(Some(0.125)), (Some(false), Some(0.0)));
        assert_eq!(judged(Some(0.124)), (Some(false), Some(0.0)));
        assert_eq!(judged(Some(0.126)), (Some(true), Some(0.75)));
        // Without a target of its own, the device takes the gateway's verdict.
        assert_eq!(judged(None), (Some(true), Some(0.75)));
        // No chunk with text: the last token came with the final reply, (26.5 - 1) / 200.
        let no_chunks = RequestRecord {
            last_token_s: None,
            ..done
        };
        assert_eq!(no_chunks.device_s_per_token(), Some(0.1275));
    }

    #[test]
    fn a_byte_identical_copy_of_the_end_is_a_redelivery_and_a_different_one_a_duplicate() {
        let req = SwarmRequest {
            arrival_s: 0.0,
            task: Task::Chat,
            prompt_tokens: 10,
            output_tokens: 5,
            max_tokens: 5,
            quality_row: None,
        };
        let mut r = RequestRecord::new(0, 0, Encoding::Json, &req);
        assert!(r.end_arrived(42));
        assert!(!r.end_arrived(42), "the same message again");
        assert!(!r.duplicated());
        assert_eq!((r.ends, r.redelivered_ends), (1, 1));
        assert!(r.end_arrived(43), "a second answer");
        assert!(r.duplicated());
        assert_eq!((r.ends, r.redelivered_ends), (2, 1));
    }
}
