//! The cluster state a policy decides on: every expert with the requests it holds.

use std::sync::Arc;

use crate::expert::ExpertProfile;
use crate::request::RequestId;
use crate::task::Task;

/// One request already on an expert (running or waiting), as the router knows it: observed
/// progress and *predicted* output length and quality, never the truth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InFlight {
    /// Request id.
    pub id: RequestId,
    /// Task class.
    pub task: Task,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Output tokens the router predicted at admission.
    pub predicted_output_tokens: f64,
    /// Output tokens delivered so far (0 while waiting or in prefill).
    pub generated_tokens: u32,
    /// Seconds since the request arrived at the router.
    pub elapsed_s: f64,
    /// Seconds since it took one of the expert's slots in the router's first-come-first-served
    /// view (0 while it waits): a running request with no token yet has spent this long of its
    /// prefill.
    pub slot_elapsed_s: f64,
    /// The most output tokens the request may produce (its `max_tokens`), if bounded.
    pub max_output_tokens: Option<u32>,
    /// Answer quality the router predicted for this expert.
    pub predicted_quality: f64,
    /// The request's SLO, seconds per output token.
    pub slo_s_per_token: f64,
}

impl InFlight {
    /// Current per-token latency: elapsed time over tokens delivered so far (elapsed time
    /// itself before the first token).
    pub fn per_token_latency_s(&self) -> f64 {
        self.elapsed_s / f64::from(self.generated_tokens.max(1))
    }

    /// Tokens this request holds in the KV cache now.
    pub fn context_tokens(&self) -> u64 {
        u64::from(self.prompt_tokens) + u64::from(self.generated_tokens)
    }

    /// Predicted total output, never less than one token beyond what is already delivered.
    pub fn expected_output_tokens(&self) -> f64 {
        self.predicted_output_tokens
            .max(f64::from(self.generated_tokens) + 1.0)
    }
}

/// One expert as the router sees it at a decision.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertState {
    /// Static profile.
    pub profile: Arc<ExpertProfile>,
    /// Whether the expert is reachable and healthy. An expert whose state is unknown or stale
    /// is not up.
    pub up: bool,
    /// Requests admitted by the engine (in prefill or decode).
    pub running: Vec<InFlight>,
    /// Requests queued at the expert, in FCFS order.
    pub waiting: Vec<InFlight>,
    /// Share of recent time the router had at least one request on the expert (0..=1),
    /// exponentially weighted (see [`crate::ledger`], which computes it).
    pub utilisation: f64,
}

impl ExpertState {
    /// An idle, healthy expert.
    pub fn idle(profile: Arc<ExpertProfile>) -> Self {
        Self {
            profile,
            up: true,
            running: Vec::new(),
            waiting: Vec::new(),
            utilisation: 0.0,
        }
    }

    /// Requests on the expert, running or waiting.
    pub fn in_flight(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    /// Context tokens held by the running batch (the KV cache in use).
    pub fn kv_used_tokens(&self) -> u64 {
        self.running.iter().map(InFlight::context_tokens).sum()
    }

    /// Fraction of the KV cache in use.
    pub fn kv_usage(&self) -> f64 {
        self.kv_used_tokens() as f64 / self.profile.kv_tokens as f64
    }

    /// Duration of the next decode step if nothing changes.
    pub fn decode_step_now_s(&self) -> f64 {
        self.profile
            .latency
            .decode_step_s(self.running.len() as f64, self.kv_used_tokens() as f64)
    }

    /// Whether a new request could start at once: nobody queued, a free slot, and KV room for
    /// its prompt and predicted output.
    pub fn can_admit_now(&self, prompt_tokens: u32, predicted_output_tokens: f64) -> bool {
        self.waiting.is_empty()
            && self.running.len() < self.profile.max_slots as usize
            && (self.kv_used_tokens() as f64 + f64::from(prompt_tokens) + predicted_output_tokens)
                <= self.profile.kv_tokens as f64
    }
}

/// The whole cluster at one decision.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ClusterState {
    /// Router clock, seconds.
    pub now_s: f64,
    /// Experts, indexed as the policy's decisions index them.
    pub experts: Vec<ExpertState>,
}

impl ClusterState {
    /// Whether expert `e` may be given this request: it is up and the prompt can ever fit.
    pub fn is_eligible(&self, e: usize, prompt_tokens: u32) -> bool {
        self.experts
            .get(e)
            .is_some_and(|x| x.up && x.profile.fits_prompt(prompt_tokens))
    }

    /// Indices of the experts that may be given this request.
    pub fn eligible(&self, prompt_tokens: u32) -> impl Iterator<Item = usize> + '_ {
        (0..self.experts.len()).filter(move |&e| self.is_eligible(e, prompt_tokens))
    }
}
