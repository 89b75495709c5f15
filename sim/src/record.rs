//! What happened to one request in a simulation: what the event loop records and the metrics
//! summarise (its own module, so that `metrics` does not depend on `simulation`).

use qosroute_core::{Request, per_token_latency_s};

/// What happened to one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestRecord {
    /// The request as the router saw it.
    pub request: Request,
    /// True output tokens.
    pub true_output_tokens: u32,
    /// `None` until decided; `Some(None)` when rejected; `Some(Some(e))` when routed to `e`.
    pub routed_to: Option<Option<usize>>,
    /// True answer quality of the expert it was routed to.
    pub quality: f64,
    /// Time of the first token (NaN until then).
    pub first_token_s: f64,
    /// Time of the last token (NaN until then).
    pub finish_s: f64,
    /// Output tokens delivered (after any KV limit).
    pub output_tokens: u32,
    /// QoS earned (0 until completed under the SLO).
    pub qos: f64,
}

impl RequestRecord {
    /// Whether the request has been completed.
    pub fn is_completed(&self) -> bool {
        !self.finish_s.is_nan()
    }

    /// Per-token latency of a completed request.
    pub fn per_token_latency_s(&self) -> f64 {
        per_token_latency_s(self.request.arrival_s, self.finish_s, self.output_tokens)
    }
}
