//! Online predictors: what the router expects of a request before it runs. They learn only
//! from completed requests (and, for quality, start from priors of the calibration half of
//! the quality table), never from the request being predicted.

use qosroute_core::{Prediction, Task};

/// Output length prior before anything completed: a common `max_tokens` default.
pub const PRIOR_OUTPUT_TOKENS: f64 = 256.0;
/// Pseudo-observations the per-task output mean gives to the global mean.
const OUTPUT_PRIOR_WEIGHT: f64 = 4.0;
/// Pseudo-observations the calibration prior of quality is worth.
const QUALITY_PRIOR_WEIGHT: f64 = 20.0;

/// Running mean of output tokens per task, shrunk toward the global running mean.
#[derive(Debug, Clone)]
pub struct OutputLengthPredictor {
    sum: [f64; Task::COUNT],
    n: [f64; Task::COUNT],
    all_sum: f64,
    all_n: f64,
}

impl Default for OutputLengthPredictor {
    fn default() -> Self {
        Self {
            sum: [0.0; Task::COUNT],
            n: [0.0; Task::COUNT],
            all_sum: 0.0,
            all_n: 0.0,
        }
    }
}

impl OutputLengthPredictor {
    /// Predicted output tokens of a request of `task`.
    pub fn predict(&self, task: Task) -> f64 {
        let global = (self.all_sum + PRIOR_OUTPUT_TOKENS) / (self.all_n + 1.0);
        let t = task.index();
        ((self.sum[t] + global * OUTPUT_PRIOR_WEIGHT) / (self.n[t] + OUTPUT_PRIOR_WEIGHT)).max(1.0)
    }

    /// Learns from a completed request.
    pub fn observe(&mut self, task: Task, output_tokens: u32) {
        let t = task.index();
        self.sum[t] += f64::from(output_tokens);
        self.n[t] += 1.0;
        self.all_sum += f64::from(output_tokens);
        self.all_n += 1.0;
    }
}

/// Mean realised quality per (expert, task), starting from calibration priors.
#[derive(Debug, Clone)]
pub struct QualityPredictor {
    prior: Vec<[f64; Task::COUNT]>,
    sum: Vec<[f64; Task::COUNT]>,
    n: Vec<[f64; Task::COUNT]>,
}

impl QualityPredictor {
    /// One prior table per expert.
    pub fn new(prior: Vec<[f64; Task::COUNT]>) -> Self {
        let experts = prior.len();
        Self {
            prior,
            sum: vec![[0.0; Task::COUNT]; experts],
            n: vec![[0.0; Task::COUNT]; experts],
        }
    }

    /// Predicted quality of expert `e` on `task`.
    pub fn predict(&self, e: usize, task: Task) -> f64 {
        let t = task.index();
        (self.prior[e][t] * QUALITY_PRIOR_WEIGHT + self.sum[e][t])
            / (QUALITY_PRIOR_WEIGHT + self.n[e][t])
    }

    /// Learns the quality expert `e` delivered on a completed request of `task`.
    pub fn observe(&mut self, e: usize, task: Task, quality: f64) {
        let t = task.index();
        self.sum[e][t] += quality;
        self.n[e][t] += 1.0;
    }
}

/// Both predictors, producing one [`Prediction`] per expert.
#[derive(Debug, Clone)]
pub struct Predictors {
    /// Output length.
    pub output: OutputLengthPredictor,
    /// Quality.
    pub quality: QualityPredictor,
}

impl Predictors {
    /// Fills `out` with the prediction for each expert.
    pub fn predict_into(&self, task: Task, out: &mut Vec<Prediction>) {
        out.clear();
        let output_tokens = self.output.predict(task);
        out.extend((0..self.quality.prior.len()).map(|e| Prediction {
            output_tokens,
            quality: self.quality.predict(e, task),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_prediction_moves_from_prior_to_observed_mean() {
        let mut p = OutputLengthPredictor::default();
        assert_eq!(p.predict(Task::Chat), PRIOR_OUTPUT_TOKENS);
        for _ in 0..1000 {
            p.observe(Task::Math, 100);
        }
        assert!((p.predict(Task::Math) - 100.0).abs() < 1.0);
        // Unseen task falls back on the global mean.
        assert!((p.predict(Task::Chat) - 100.0).abs() < 1.0);
    }

    #[test]
    fn quality_prediction_blends_prior_and_observations() {
        let mut prior = [0.5; Task::COUNT];
        prior[Task::Mmlu.index()] = 0.8;
        let mut q = QualityPredictor::new(vec![prior]);
        assert_eq!(q.predict(0, Task::Mmlu), 0.8);
        for _ in 0..20 {
            q.observe(0, Task::Mmlu, 0.0);
        }
        assert!((q.predict(0, Task::Mmlu) - 0.4).abs() < 1e-12);
    }
}
