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
    /// The most output tokens the device asked for (`max_tokens`), if it set a bound: no
    /// answer is longer, so every length prediction and draw is capped at it.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
}

/// What the router's predictors expect of a request on one expert.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Predicted number of output tokens: the mean of the length distribution (at least 1).
    pub output_tokens: f64,
    /// The 10th, 50th and 90th percentiles of the output tokens (each at least 1).
    pub output_quantiles: [f64; 3],
    /// Predicted answer quality in [0, 1].
    pub quality: f64,
}

impl Prediction {
    /// A prediction whose length distribution is a single value (every quantile equals the
    /// mean).
    pub fn point(output_tokens: f64, quality: f64) -> Self {
        Self {
            output_tokens,
            output_quantiles: [output_tokens; 3],
            quality,
        }
    }
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

impl Default for ArrivingRequest {
    /// A placeholder: a 0-token chat request at time 0 with a 1 s/token SLO and no
    /// predictions (for buffers that are filled before use).
    fn default() -> Self {
        Self {
            request: Request {
                id: 0,
                arrival_s: 0.0,
                task: crate::task::Task::Chat,
                prompt_tokens: 0,
                slo_s_per_token: 1.0,
                max_output_tokens: None,
            },
            predictions: Vec::new(),
        }
    }
}
