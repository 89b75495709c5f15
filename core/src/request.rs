//! Requests as a router sees them: what the device said, and what predictors expect.

use serde::{Deserialize, Serialize};

use crate::task::Task;

/// Identifier of a request, unique within one run.
pub type RequestId = u64;

/// A request as it arrives at the router. It carries no true output length and no true
/// answer quality: those are unknown until the request completes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Unique id.
    pub id: RequestId,
    /// Arrival time at the router, seconds.
    pub arrival_s: f64,
    /// Task class.
    pub task: Task,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Latency target, seconds per output token.
    pub slo_s_per_token: f64,
}

/// What the router's predictors expect of a request on one expert.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Predicted number of output tokens (at least 1).
    pub output_tokens: f64,
    /// Predicted answer quality in [0, 1].
    pub quality: f64,
}

/// The request to decide on, with one prediction per expert (indexed like the cluster's
/// experts).
#[derive(Debug, Clone, PartialEq)]
pub struct ArrivingRequest {
    /// The request.
    pub request: Request,
    /// `predictions[e]` is the prediction for expert `e`.
    pub predictions: Vec<Prediction>,
}
