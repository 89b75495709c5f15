//! What a router has learned, as a policy may read it: the output-length distributions and
//! quality estimates of its online predictors, and the arrivals it has observed.
//!
//! A policy decides from [`ClusterState`](crate::ClusterState),
//! [`ArrivingRequest`](crate::ArrivingRequest) and an [`Observed`]: nothing else. None of
//! them holds a true output length, a true quality or a future arrival. The simulator builds
//! its [`Observed`] from its [`Predictors`](crate::Predictors) and the requests it has shown
//! the policy; the daemon from its per-expert predictors and the requests it has decided.

use std::collections::VecDeque;

use crate::predict::PRIOR_OUTPUT_TOKENS;
use crate::request::Request;
use crate::rng::SimRng;
use crate::task::Task;

/// Output lengths as a distribution per (expert, task), learned from completions only.
pub trait OutputLengthModel {
    /// Predicted (mean) output tokens of a `task` request on expert `expert` (at least 1).
    fn mean_tokens(&self, expert: usize, task: Task) -> f64;

    /// The `q`-quantile (`q` in `[0, 1]`) of the output tokens of a `task` request on
    /// `expert` (at least 1).
    fn quantile_tokens(&self, expert: usize, task: Task, q: f64) -> f64;

    /// A draw of the tokens still to come of a `task` request on `expert` that has generated
    /// `generated` tokens so far: a total drawn from the distribution conditioned on being
    /// larger than `generated`, minus `generated`. Always at least 1.
    fn sample_remaining(&self, expert: usize, task: Task, generated: u32, rng: &mut SimRng) -> u32;
}

/// Predicted answer quality per (expert, task).
pub trait QualityModel {
    /// Predicted quality in `[0, 1]` of `expert`'s answer to a `task` request.
    fn predicted_quality(&self, expert: usize, task: Task) -> f64;
}

/// The requests a router has observed arriving, most recent last, at most `capacity` of them
/// (a bounded window: memory never grows with uptime).
#[derive(Debug, Clone, PartialEq)]
pub struct ArrivalWindow {
    capacity: usize,
    requests: VecDeque<Request>,
}

/// Requests an [`ArrivalWindow`] keeps by default.
pub const ARRIVAL_WINDOW: usize = 256;

impl Default for ArrivalWindow {
    fn default() -> Self {
        Self::new(ARRIVAL_WINDOW)
    }
}

impl ArrivalWindow {
    /// An empty window keeping the last `capacity` arrivals (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            capacity,
            requests: VecDeque::with_capacity(capacity),
        }
    }

    /// Records an arriving request; the oldest is forgotten once the window is full.
    /// Arrivals are expected in time order; one earlier than the last is recorded at the last
    /// one's time (a clock that went back must not make a negative gap).
    pub fn observe(&mut self, request: &Request) {
        let mut r = *request;
        if let Some(last) = self.requests.back() {
            r.arrival_s = r.arrival_s.max(last.arrival_s);
        }
        if self.requests.len() == self.capacity {
            self.requests.pop_front();
        }
        self.requests.push_back(r);
    }

    /// Requests in the window, oldest first.
    pub fn requests(&self) -> &VecDeque<Request> {
        &self.requests
    }

    /// Requests in the window.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// Whether nothing has been observed.
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// How many requests it keeps at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The `i`-th gap between consecutive arrivals in the window (`0..len() - 1`), seconds.
    pub fn gap_s(&self, i: usize) -> Option<f64> {
        let a = self.requests.get(i)?;
        let b = self.requests.get(i + 1)?;
        Some(b.arrival_s - a.arrival_s)
    }

    /// Mean arrival rate over the window, requests per second (`None` with fewer than two
    /// arrivals or no time between them).
    pub fn rate_per_s(&self) -> Option<f64> {
        let first = self.requests.front()?;
        let last = self.requests.back()?;
        let span = last.arrival_s - first.arrival_s;
        (self.requests.len() >= 2 && span > 0.0).then(|| (self.requests.len() - 1) as f64 / span)
    }
}

/// Knowledge of a router that has learned nothing yet: every output length is the
/// [`PRIOR_OUTPUT_TOKENS`] prior and every quality is unknown (0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NothingLearned;

impl OutputLengthModel for NothingLearned {
    fn mean_tokens(&self, _expert: usize, _task: Task) -> f64 {
        PRIOR_OUTPUT_TOKENS
    }
    fn quantile_tokens(&self, _expert: usize, _task: Task, _q: f64) -> f64 {
        PRIOR_OUTPUT_TOKENS
    }
    fn sample_remaining(
        &self,
        _expert: usize,
        _task: Task,
        generated: u32,
        _rng: &mut SimRng,
    ) -> u32 {
        (PRIOR_OUTPUT_TOKENS as u32)
            .saturating_sub(generated)
            .max(1)
    }
}

impl QualityModel for NothingLearned {
    fn predicted_quality(&self, _expert: usize, _task: Task) -> f64 {
        0.0
    }
}

static NOTHING_LEARNED: NothingLearned = NothingLearned;
static NO_ARRIVALS: ArrivalWindow = ArrivalWindow {
    capacity: 1,
    requests: VecDeque::new(),
};

/// What the router has learned, as one decision reads it.
#[derive(Clone, Copy)]
pub struct Observed<'a> {
    /// Output-length distributions.
    pub lengths: &'a dyn OutputLengthModel,
    /// Quality estimates.
    pub quality: &'a dyn QualityModel,
    /// Recent arrivals, the arriving request included.
    pub arrivals: &'a ArrivalWindow,
}

impl std::fmt::Debug for Observed<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed")
            .field("arrivals", &self.arrivals.len())
            .finish_non_exhaustive()
    }
}

impl Observed<'static> {
    /// A router that has learned nothing and observed no arrival (for policies that read only
    /// the cluster state, and for tests).
    pub fn nothing() -> Self {
        Self {
            lengths: &NOTHING_LEARNED,
            quality: &NOTHING_LEARNED,
            arrivals: &NO_ARRIVALS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: u64, at: f64) -> Request {
        Request {
            id,
            arrival_s: at,
            task: Task::Chat,
            prompt_tokens: 10,
            slo_s_per_token: 0.1,
            max_output_tokens: None,
        }
    }

    #[test]
    fn the_window_keeps_the_last_arrivals_and_their_gaps() {
        let mut w = ArrivalWindow::new(3);
        assert_eq!(w.rate_per_s(), None);
        for (i, t) in [0.0, 1.0, 1.5, 3.5].into_iter().enumerate() {
            w.observe(&request(i as u64, t));
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.requests()[0].id, 1, "the oldest was forgotten");
        assert_eq!(w.gap_s(0), Some(0.5));
        assert_eq!(w.gap_s(1), Some(2.0));
        assert_eq!(w.gap_s(2), None);
        // 2 gaps over 2.5 s.
        assert!((w.rate_per_s().unwrap() - 0.8).abs() < 1e-12);
        // A clock that went back makes no negative gap.
        w.observe(&request(9, 1.0));
        assert_eq!(w.gap_s(1), Some(0.0));
    }

    #[test]
    fn nothing_learned_predicts_the_prior() {
        let o = Observed::nothing();
        assert_eq!(o.lengths.mean_tokens(3, Task::Mmlu), PRIOR_OUTPUT_TOKENS);
        let mut rng = SimRng::new(1);
        assert_eq!(o.lengths.sample_remaining(0, Task::Chat, 250, &mut rng), 6);
        assert_eq!(o.lengths.sample_remaining(0, Task::Chat, 900, &mut rng), 1);
        assert_eq!(o.quality.predicted_quality(0, Task::Chat), 0.0);
        assert!(o.arrivals.is_empty());
    }
}
