//! Online predictors: what the router expects of a request before it runs.
//!
//! They learn only from completed requests (and, for quality, start from priors), never from
//! the request being predicted. The simulator and the edge daemon use the same code, so a
//! policy trained in simulation sees predictions made the same way in production.
//!
//! - [`OutputLengthPredictor`]: output tokens per task (what the simulator, and therefore
//!   training, uses: one prediction for every expert).
//! - [`ExpertOutputLengths`]: output tokens per (expert, task), for the daemon, where experts
//!   run different models whose answers differ in length. An expert with no history predicts
//!   exactly what [`OutputLengthPredictor`] would over all experts' completions.
//! - [`QualityPredictor`]: answer quality per (expert, task), from a prior table moved by
//!   observed quality (in the simulator: the true quality of a completed request; in the
//!   daemon: device feedback scores).
//! - [`QualityBook`]: a [`QualityPredictor`] whose experts are keyed by name, so a config
//!   reload keeps what was learned about the experts it keeps.
//! - [`Predictors`]: the simulator's pair, producing one [`Prediction`] per expert.
//!
//! # Shrinkage
//!
//! Every estimate is a running mean shrunk toward a more general one by a fixed number of
//! pseudo-observations: `(sum + general * weight) / (n + weight)`. With no data it is the
//! general estimate; with `n >> weight` it is the plain mean.
//!
//! # Length distributions
//!
//! Beside the means, the output-length predictors keep [`LengthHistogram`]s of the
//! completions, and their distributions ([`LengthMixture`]: quantiles, draws conditioned on the
//! tokens generated so far) mirror the shrinkage of the means:
//!
//! - global = all completions, plus a point mass at [`PRIOR_OUTPUT_TOKENS`] of weight 1;
//! - per task = the task's histogram with weight `n_task` and the global distribution with
//!   weight [`OUTPUT_PRIOR_WEIGHT`] (normalised: `n_task / (n_task + 4)` and
//!   `4 / (n_task + 4)`);
//! - per (expert, task) = the expert's own histogram of the task with weight `n_expert` and
//!   the pooled per-task distribution with weight [`OUTPUT_PRIOR_WEIGHT`].
//!
//! So the mean of each distribution is the mean predicted (before the floor at 1 token), and
//! with no data every distribution is the point mass at [`PRIOR_OUTPUT_TOKENS`].
//!
//! # In the daemon
//!
//! Keep one [`ExpertOutputLengths`] and one [`QualityBook`] with the experts in policy order
//! (the order of `ClusterState::experts`); build each arriving request's predictions as
//! `Prediction { output_tokens: lengths.predict(e, task), output_quantiles:
//! lengths.quantiles(e, task), quality: book.predict(e, task) }`;
//! feed completions to [`ExpertOutputLengths::observe`] and feedback scores to
//! [`QualityBook::observe`]; on a config reload call `reconfigure` on both with the new
//! expert list.

use std::collections::HashMap;

use crate::knowledge::{OutputLengthModel, QualityModel};
use crate::lengths::{LengthHistogram, LengthMixture};
use crate::request::Prediction;
use crate::rng::SimRng;
use crate::task::Task;

/// Output length prior before anything completed: a common `max_tokens` default.
pub const PRIOR_OUTPUT_TOKENS: f64 = 256.0;
/// Pseudo-observations a more general output-length mean is worth against a more specific
/// running mean (per-task mean toward the global mean; per-expert mean toward the per-task
/// mean).
pub const OUTPUT_PRIOR_WEIGHT: f64 = 4.0;
/// Pseudo-observations the prior of quality is worth against observed quality.
pub const QUALITY_PRIOR_WEIGHT: f64 = 20.0;

/// Running mean of output tokens per task, shrunk toward the global running mean, and the
/// matching distribution (see the [module docs](self)).
///
/// The global mean itself starts from [`PRIOR_OUTPUT_TOKENS`] worth one observation:
/// `global = (all_sum + PRIOR_OUTPUT_TOKENS) / (all_n + 1)`, and a task predicts
/// `max(1, (task_sum + global * OUTPUT_PRIOR_WEIGHT) / (task_n + OUTPUT_PRIOR_WEIGHT))`.
/// Memory is fixed: one [`LengthHistogram`] per task and one over all tasks.
#[derive(Debug, Clone, Default)]
pub struct OutputLengthPredictor {
    /// Completions per task (their exact sums and counts give the means).
    tasks: [LengthHistogram; Task::COUNT],
    /// Every completion.
    all: LengthHistogram,
    /// (p10, p50, p90) per task as of the last completion (a decision needs them; they only
    /// change when a completion is observed).
    quantile_cache: [Option<[f64; 3]>; Task::COUNT],
}

impl OutputLengthPredictor {
    /// Predicted output tokens of a request of `task` (at least 1).
    pub fn predict(&self, task: Task) -> f64 {
        let global = (self.all.sum() + PRIOR_OUTPUT_TOKENS) / (self.all.n() + 1.0);
        let own = &self.tasks[task.index()];
        ((own.sum() + global * OUTPUT_PRIOR_WEIGHT) / (own.n() + OUTPUT_PRIOR_WEIGHT)).max(1.0)
    }

    /// Learns from a completed request.
    pub fn observe(&mut self, task: Task, output_tokens: u32) {
        self.tasks[task.index()].observe(output_tokens);
        self.all.observe(output_tokens);
        self.quantile_cache = [None; Task::COUNT];
    }

    /// [`OutputLengthPredictor::quantiles`], computed once per task between completions.
    pub fn quantiles_cached(&mut self, task: Task) -> [f64; 3] {
        if let Some(q) = self.quantile_cache[task.index()] {
            return q;
        }
        let q = self.quantiles(task);
        self.quantile_cache[task.index()] = Some(q);
        q
    }

    /// Completed requests of `task` observed so far.
    pub fn observations(&self, task: Task) -> u64 {
        self.tasks[task.index()].n() as u64
    }

    /// The distribution of the output tokens of a `task` request: the task's completions
    /// (weight `n_task`) mixed with the global distribution (weight [`OUTPUT_PRIOR_WEIGHT`]),
    /// itself every completion plus a point mass at [`PRIOR_OUTPUT_TOKENS`] of weight 1.
    pub fn distribution(&self, task: Task) -> LengthMixture<'_> {
        self.add_distribution(LengthMixture::new(), task, 1.0)
    }

    /// Adds [`OutputLengthPredictor::distribution`] of `task` to `mix` with mixture weight
    /// `weight`.
    fn add_distribution<'a>(
        &'a self,
        mix: LengthMixture<'a>,
        task: Task,
        weight: f64,
    ) -> LengthMixture<'a> {
        let own = &self.tasks[task.index()];
        let shrink = weight / (own.n() + OUTPUT_PRIOR_WEIGHT);
        let global = shrink * OUTPUT_PRIOR_WEIGHT / (self.all.n() + 1.0);
        mix.with_histogram(own, shrink * own.n())
            .with_histogram(&self.all, global * self.all.n())
            .with_point(PRIOR_OUTPUT_TOKENS as u32, global)
    }

    /// The (p10, p50, p90) of the output tokens of a `task` request, each at least 1.
    pub fn quantiles(&self, task: Task) -> [f64; 3] {
        self.distribution(task).prediction_quantiles()
    }
}

/// Mean realised quality per (expert, task), starting from priors.
///
/// Expert `e` on `task` predicts
/// `(prior * QUALITY_PRIOR_WEIGHT + sum) / (QUALITY_PRIOR_WEIGHT + n)` over the `n` observed
/// qualities. Experts are indexed (`0..experts()`); predicting or observing an expert out of
/// range panics. For experts keyed by name and checked input, use [`QualityBook`].
#[derive(Debug, Clone)]
pub struct QualityPredictor {
    prior: Vec<[f64; Task::COUNT]>,
    sum: Vec<[f64; Task::COUNT]>,
    n: Vec<[f64; Task::COUNT]>,
}

impl QualityPredictor {
    /// One prior table per expert (indexed by [`Task::index`]).
    pub fn new(prior: Vec<[f64; Task::COUNT]>) -> Self {
        let experts = prior.len();
        Self {
            prior,
            sum: vec![[0.0; Task::COUNT]; experts],
            n: vec![[0.0; Task::COUNT]; experts],
        }
    }

    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.prior.len()
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

/// Both predictors of the simulator, producing one [`Prediction`] per expert.
#[derive(Debug, Clone)]
pub struct Predictors {
    /// Output length.
    pub output: OutputLengthPredictor,
    /// Quality.
    pub quality: QualityPredictor,
}

impl Predictors {
    /// Fills `out` with the prediction for each expert (the same output-length mean and
    /// (p10, p50, p90) for every expert).
    pub fn predict_into(&mut self, task: Task, out: &mut Vec<Prediction>) {
        out.clear();
        let output_tokens = self.output.predict(task);
        let output_quantiles = self.output.quantiles_cached(task);
        out.extend((0..self.quality.prior.len()).map(|e| Prediction {
            output_tokens,
            output_quantiles,
            quality: self.quality.predict(e, task),
        }));
    }
}

/// Every expert gets the per-task distribution (the expert index is ignored).
impl OutputLengthModel for OutputLengthPredictor {
    fn mean_tokens(&self, _expert: usize, task: Task) -> f64 {
        self.predict(task)
    }
    fn quantile_tokens(&self, _expert: usize, task: Task, q: f64) -> f64 {
        self.distribution(task).quantile(q).map_or(1.0, f64::from)
    }
    fn sample_remaining(
        &self,
        _expert: usize,
        task: Task,
        generated: u32,
        rng: &mut SimRng,
    ) -> u32 {
        self.distribution(task).sample_remaining(generated, rng)
    }
}

impl OutputLengthModel for ExpertOutputLengths {
    fn mean_tokens(&self, expert: usize, task: Task) -> f64 {
        self.predict(expert, task)
    }
    fn quantile_tokens(&self, expert: usize, task: Task, q: f64) -> f64 {
        self.distribution(expert, task)
            .quantile(q)
            .map_or(1.0, f64::from)
    }
    fn sample_remaining(&self, expert: usize, task: Task, generated: u32, rng: &mut SimRng) -> u32 {
        self.distribution(expert, task)
            .sample_remaining(generated, rng)
    }
}

impl QualityModel for QualityPredictor {
    fn predicted_quality(&self, expert: usize, task: Task) -> f64 {
        if expert < self.experts() {
            self.predict(expert, task)
        } else {
            0.0
        }
    }
}

impl OutputLengthModel for Predictors {
    fn mean_tokens(&self, expert: usize, task: Task) -> f64 {
        self.output.mean_tokens(expert, task)
    }
    fn quantile_tokens(&self, expert: usize, task: Task, q: f64) -> f64 {
        self.output.quantile_tokens(expert, task, q)
    }
    fn sample_remaining(&self, expert: usize, task: Task, generated: u32, rng: &mut SimRng) -> u32 {
        self.output.sample_remaining(expert, task, generated, rng)
    }
}

impl QualityModel for Predictors {
    fn predicted_quality(&self, expert: usize, task: Task) -> f64 {
        self.quality.predicted_quality(expert, task)
    }
}

/// Per-task completions of one expert (exact sums and counts, and histograms).
type TaskLengths = [LengthHistogram; Task::COUNT];

/// No completion of any task.
const NO_LENGTHS: TaskLengths = [LengthHistogram::EMPTY; Task::COUNT];

/// For each name of `new`, the history kept under that name in `old` (first match), else
/// `empty`.
fn carry_over<T: Clone>(old_names: &[String], old: &[T], new: &[String], empty: T) -> Vec<T> {
    let mut by_name: HashMap<&str, usize> = HashMap::with_capacity(old_names.len());
    for (i, name) in old_names.iter().enumerate() {
        by_name.entry(name.as_str()).or_insert(i);
    }
    new.iter()
        .map(|name| {
            by_name
                .get(name.as_str())
                .and_then(|&i| old.get(i).cloned())
                .unwrap_or_else(|| empty.clone())
        })
        .collect()
}

/// Output tokens per (expert, task), for the daemon: each expert's running mean on a task,
/// shrunk toward the per-task mean over all experts, itself shrunk toward the global mean.
///
/// Expert `e` on `task` predicts
/// `max(1, (e_sum + pooled * OUTPUT_PRIOR_WEIGHT) / (e_n + OUTPUT_PRIOR_WEIGHT))`, where
/// `pooled` is exactly what an [`OutputLengthPredictor`] fed with every completion predicts
/// for the task (same prior [`PRIOR_OUTPUT_TOKENS`], same weights). So an expert with no
/// history predicts what the others did, and an expert with many completions predicts its
/// own mean. The distribution mirrors it (see the [module docs](self)): the expert's own
/// histogram of the task (weight `e_n`) mixed with the pooled per-task distribution (weight
/// [`OUTPUT_PRIOR_WEIGHT`]). Memory per expert is fixed: one [`LengthHistogram`] per task.
///
/// # Experts are keyed by name
///
/// The experts are a list of names in policy order; indices (`e`) are positions in that list.
/// [`ExpertOutputLengths::reconfigure`] takes the new list after a config reload: an expert
/// whose name is kept keeps its own history (wherever it moved in the list), a new name starts
/// with none, a removed name's own history is dropped. The pooled per-task and global means
/// keep every completion ever observed, removed experts' included: they describe what the
/// devices ask for as much as who answered. Names are expected to be unique (as expert names
/// in a config are); if a name appears twice anyway, every new position holding it starts
/// from a copy of the history of its first position in the old list.
#[derive(Debug, Clone)]
pub struct ExpertOutputLengths {
    names: Vec<String>,
    own: Vec<TaskLengths>,
    pooled: OutputLengthPredictor,
}

impl ExpertOutputLengths {
    /// No history yet, for the experts named `names` (in policy order).
    pub fn new<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let names: Vec<String> = names.into_iter().map(Into::into).collect();
        let own = vec![NO_LENGTHS; names.len()];
        Self {
            names,
            own,
            pooled: OutputLengthPredictor::default(),
        }
    }

    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.names.len()
    }

    /// The experts' names in policy order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Position of the expert named `name`, if present.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Predicted output tokens of a `task` request on expert `e` (at least 1). An index out of
    /// range is an expert with no history: the pooled per-task prediction.
    pub fn predict(&self, e: usize, task: Task) -> f64 {
        let pooled = self.pooled.predict(task);
        let Some(own) = self.own.get(e) else {
            return pooled;
        };
        let own = &own[task.index()];
        ((own.sum() + pooled * OUTPUT_PRIOR_WEIGHT) / (own.n() + OUTPUT_PRIOR_WEIGHT)).max(1.0)
    }

    /// The distribution of the output tokens of a `task` request on expert `e`: its own
    /// completions of the task (weight `e_n`) mixed with the pooled per-task distribution
    /// (weight [`OUTPUT_PRIOR_WEIGHT`]). Out of range: the pooled distribution.
    pub fn distribution(&self, e: usize, task: Task) -> LengthMixture<'_> {
        let Some(own) = self.own.get(e) else {
            return self.pooled.distribution(task);
        };
        let own = &own[task.index()];
        let shrink = 1.0 / (own.n() + OUTPUT_PRIOR_WEIGHT);
        let mix = LengthMixture::new().with_histogram(own, shrink * own.n());
        self.pooled
            .add_distribution(mix, task, shrink * OUTPUT_PRIOR_WEIGHT)
    }

    /// The (p10, p50, p90) of the output tokens of a `task` request on expert `e`, each at
    /// least 1 (what `Prediction::output_quantiles` holds).
    pub fn quantiles(&self, e: usize, task: Task) -> [f64; 3] {
        self.distribution(e, task).prediction_quantiles()
    }

    /// The per-task prediction over all experts (what an expert with no history predicts).
    pub fn predict_pooled(&self, task: Task) -> f64 {
        self.pooled.predict(task)
    }

    /// Learns from a request of `task` that expert `e` completed with `output_tokens`
    /// completion tokens. Returns `false` (and learns nothing) if `e` is out of range.
    pub fn observe(&mut self, e: usize, task: Task, output_tokens: u32) -> bool {
        let Some(own) = self.own.get_mut(e) else {
            return false;
        };
        own[task.index()].observe(output_tokens);
        self.pooled.observe(task, output_tokens);
        true
    }

    /// Completions of `task` observed from expert `e` (0 out of range).
    pub fn observations(&self, e: usize, task: Task) -> u64 {
        self.own.get(e).map_or(0, |o| o[task.index()].n() as u64)
    }

    /// Takes the expert list of a reloaded config (names in the new policy order): kept names
    /// keep their history (means and histograms), new names start with none, removed names'
    /// own history is dropped; the pooled means and distributions are kept whole.
    pub fn reconfigure<S: AsRef<str>>(&mut self, names: &[S]) {
        let names: Vec<String> = names.iter().map(|n| n.as_ref().to_owned()).collect();
        self.own = carry_over(&self.names, &self.own, &names, NO_LENGTHS);
        self.names = names;
    }
}

/// A quality prior that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("quality prior of expert `{expert}` on `{task}` must be in [0, 1], got {value}")]
pub struct InvalidQualityPrior {
    /// The expert's name.
    pub expert: String,
    /// The task.
    pub task: Task,
    /// The offending value.
    pub value: f64,
}

/// Quality per (expert, task) for the daemon: a [`QualityPredictor`] (same formula, same
/// [`QUALITY_PRIOR_WEIGHT`]) whose experts are keyed by name, with checked input.
///
/// Priors come from the config (one table per expert, by [`Task::index`]); observations are
/// device feedback scores in `[0, 1]`. [`QualityBook::reconfigure`] takes the reloaded
/// config's experts and priors: a kept name keeps its feedback (sum and count per task) and
/// takes the *new* prior; a new name starts from its prior with no feedback; a removed name's
/// feedback is dropped. Indices (`e`) are positions in the current list (policy order).
#[derive(Debug, Clone)]
pub struct QualityBook {
    names: Vec<String>,
    predictor: QualityPredictor,
}

impl QualityModel for QualityBook {
    fn predicted_quality(&self, expert: usize, task: Task) -> f64 {
        self.predict(expert, task)
    }
}

/// Checks one expert's priors.
fn check_priors(name: &str, prior: &[f64; Task::COUNT]) -> Result<(), InvalidQualityPrior> {
    for task in Task::ALL {
        let value = prior[task.index()];
        if !(value.is_finite() && (0.0..=1.0).contains(&value)) {
            return Err(InvalidQualityPrior {
                expert: name.to_owned(),
                task,
                value,
            });
        }
    }
    Ok(())
}

impl QualityBook {
    /// No feedback yet; `experts` are (name, prior per task) in policy order. Every prior must
    /// be finite and in `[0, 1]`.
    pub fn new<S: Into<String>>(
        experts: impl IntoIterator<Item = (S, [f64; Task::COUNT])>,
    ) -> Result<Self, InvalidQualityPrior> {
        let (names, priors) = Self::checked(experts)?;
        Ok(Self {
            names,
            predictor: QualityPredictor::new(priors),
        })
    }

    fn checked<S: Into<String>>(
        experts: impl IntoIterator<Item = (S, [f64; Task::COUNT])>,
    ) -> Result<(Vec<String>, Vec<[f64; Task::COUNT]>), InvalidQualityPrior> {
        let mut names = Vec::new();
        let mut priors = Vec::new();
        for (name, prior) in experts {
            let name: String = name.into();
            check_priors(&name, &prior)?;
            names.push(name);
            priors.push(prior);
        }
        Ok((names, priors))
    }

    /// Number of experts.
    pub fn experts(&self) -> usize {
        self.names.len()
    }

    /// The experts' names in policy order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Position of the expert named `name`, if present.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Predicted quality of expert `e` on `task`, in `[0, 1]`; 0 for an index out of range
    /// (an unknown expert is never worth routing to for its quality).
    pub fn predict(&self, e: usize, task: Task) -> f64 {
        if e < self.predictor.experts() {
            self.predictor.predict(e, task)
        } else {
            0.0
        }
    }

    /// Learns a feedback score of expert `e` on a request of `task`. Returns `false` (and
    /// learns nothing) if `e` is out of range or `quality` is not a finite number in `[0, 1]`.
    pub fn observe(&mut self, e: usize, task: Task, quality: f64) -> bool {
        if e >= self.predictor.experts() || !(quality.is_finite() && (0.0..=1.0).contains(&quality))
        {
            return false;
        }
        self.predictor.observe(e, task, quality);
        true
    }

    /// Feedback scores of `task` observed for expert `e` (0 out of range).
    pub fn observations(&self, e: usize, task: Task) -> u64 {
        self.predictor
            .n
            .get(e)
            .map_or(0, |n| n[task.index()] as u64)
    }

    /// Takes the experts of a reloaded config (name, prior per task, in the new policy order).
    /// Kept names keep their feedback and take the new prior; new names start from their
    /// prior; removed names' feedback is dropped. On an invalid prior nothing changes.
    pub fn reconfigure<S: Into<String>>(
        &mut self,
        experts: impl IntoIterator<Item = (S, [f64; Task::COUNT])>,
    ) -> Result<(), InvalidQualityPrior> {
        let (names, prior) = Self::checked(experts)?;
        let p = &self.predictor;
        let sums = carry_over(&self.names, &p.sum, &names, [0.0; Task::COUNT]);
        let ns = carry_over(&self.names, &p.n, &names, [0.0; Task::COUNT]);
        self.predictor = QualityPredictor {
            prior,
            sum: sums,
            n: ns,
        };
        self.names = names;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        assert_eq!(p.observations(Task::Math), 1000);
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

    #[test]
    fn predictors_give_one_prediction_per_expert() {
        let mut p = Predictors {
            output: OutputLengthPredictor::default(),
            quality: QualityPredictor::new(vec![[0.3; Task::COUNT], [0.7; Task::COUNT]]),
        };
        let mut out = vec![Prediction::point(9.0, 9.0)];
        p.predict_into(Task::Chat, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].output_tokens, PRIOR_OUTPUT_TOKENS);
        assert_eq!(out[0].output_quantiles, [PRIOR_OUTPUT_TOKENS; 3]);
        assert_eq!(out[1].quality, 0.7);
        for tokens in [10, 20, 30, 40, 50, 60, 70, 80, 90] {
            p.output.observe(Task::Chat, tokens);
        }
        p.predict_into(Task::Chat, &mut out);
        assert_eq!(out[1].output_quantiles, p.output.quantiles(Task::Chat));
        let [p10, p50, p90] = out[1].output_quantiles;
        assert!(10.0 <= p10 && p10 < p50 && p50 < p90 && p90 <= PRIOR_OUTPUT_TOKENS);
    }

    #[test]
    fn expert_lengths_start_from_the_prior_and_match_the_pooled_predictor() {
        let mut lengths = ExpertOutputLengths::new(["a", "b", "c"]);
        let mut pooled = OutputLengthPredictor::default();
        for e in 0..3 {
            assert_eq!(lengths.predict(e, Task::Chat), PRIOR_OUTPUT_TOKENS);
        }
        for (i, tokens) in [10u32, 500, 40, 7, 300, 120].into_iter().enumerate() {
            let task = if i % 2 == 0 { Task::Math } else { Task::Chat };
            assert!(lengths.observe(i % 2, task, tokens));
            pooled.observe(task, tokens);
        }
        // Expert 2 saw nothing: exactly the per-task predictor over everyone's completions.
        for task in Task::ALL {
            assert_eq!(lengths.predict(2, task), pooled.predict(task));
            assert_eq!(lengths.predict_pooled(task), pooled.predict(task));
            assert_eq!(lengths.predict(99, task), pooled.predict(task));
        }
        assert!(!lengths.observe(3, Task::Chat, 5));
        assert_eq!(lengths.observations(0, Task::Math), 3);
        assert_eq!(lengths.observations(1, Task::Math), 0);
    }

    #[test]
    fn expert_lengths_are_shrunk_toward_the_task_mean() {
        let mut lengths = ExpertOutputLengths::new(["a", "b"]);
        lengths.observe(0, Task::Gsm8k, 100);
        // Pooled: global = (100 + 256) / 2 = 178; task = (100 + 178*4) / 5 = 162.4.
        let task_mean = (100.0 + 178.0 * 4.0) / 5.0;
        assert!((lengths.predict_pooled(Task::Gsm8k) - task_mean).abs() < 1e-12);
        let own = (100.0 + task_mean * 4.0) / 5.0;
        assert!((lengths.predict(0, Task::Gsm8k) - own).abs() < 1e-12);
        assert!((lengths.predict(1, Task::Gsm8k) - task_mean).abs() < 1e-12);
    }

    #[test]
    fn expert_lengths_follow_names_across_a_reload() {
        let mut lengths = ExpertOutputLengths::new(["a", "b", "c"]);
        for _ in 0..50 {
            lengths.observe(0, Task::Mbpp, 40);
            lengths.observe(1, Task::Mbpp, 400);
            lengths.observe(2, Task::Mbpp, 900);
        }
        let a = lengths.predict(0, Task::Mbpp);
        let b = lengths.predict(1, Task::Mbpp);
        let pooled = lengths.predict_pooled(Task::Mbpp);
        let (qa, qb, qpooled) = (
            lengths.quantiles(0, Task::Mbpp),
            lengths.quantiles(1, Task::Mbpp),
            lengths.quantiles(7, Task::Mbpp),
        );
        // "c" removed, "b" moved first, "d" added.
        lengths.reconfigure(&["b", "d", "a"]);
        assert_eq!(lengths.names(), ["b", "d", "a"]);
        assert_eq!(lengths.index_of("a"), Some(2));
        assert_eq!(lengths.index_of("c"), None);
        assert_eq!(lengths.predict(0, Task::Mbpp), b);
        assert_eq!(lengths.predict(2, Task::Mbpp), a);
        // The newcomer predicts the pooled mean, which still counts the removed expert.
        assert_eq!(lengths.predict_pooled(Task::Mbpp), pooled);
        assert_eq!(lengths.predict(1, Task::Mbpp), pooled);
        assert_eq!(lengths.observations(1, Task::Mbpp), 0);
        // The distributions follow the names too.
        assert_eq!(lengths.quantiles(0, Task::Mbpp), qb);
        assert_eq!(lengths.quantiles(2, Task::Mbpp), qa);
        assert_eq!(lengths.quantiles(1, Task::Mbpp), qpooled);
        // A removed then re-added name starts afresh.
        lengths.reconfigure(&["c"]);
        assert_eq!(lengths.observations(0, Task::Mbpp), 0);
        assert_eq!(lengths.experts(), 1);
    }

    #[test]
    fn expert_lengths_memory_does_not_grow_with_observations() {
        let mut lengths = ExpertOutputLengths::new(["a", "b"]);
        let capacity = lengths.own.capacity();
        let per_expert = std::mem::size_of_val(&lengths.own[0]);
        for i in 0..100_000u32 {
            lengths.observe(
                (i % 2) as usize,
                Task::ALL[i as usize % Task::COUNT],
                i % 9000,
            );
        }
        assert_eq!(lengths.own.capacity(), capacity);
        assert_eq!(std::mem::size_of_val(&lengths.own[0]), per_expert);
        assert_eq!(lengths.observations(0, Task::ALL[0]), 3334);
    }

    #[test]
    fn quality_book_checks_input_and_follows_names() {
        let mut prior_a = [0.5; Task::COUNT];
        prior_a[Task::Mmlu.index()] = 0.8;
        let mut book = QualityBook::new([("a", prior_a), ("b", [0.2; Task::COUNT])]).unwrap();
        assert_eq!(book.predict(0, Task::Mmlu), 0.8);
        assert_eq!(book.predict(2, Task::Mmlu), 0.0);
        for _ in 0..20 {
            assert!(book.observe(0, Task::Mmlu, 0.0));
        }
        assert!(!book.observe(0, Task::Mmlu, f64::NAN));
        assert!(!book.observe(0, Task::Mmlu, 1.5));
        assert!(!book.observe(0, Task::Mmlu, -0.1));
        assert!(!book.observe(7, Task::Mmlu, 0.5));
        assert_eq!(book.observations(0, Task::Mmlu), 20);
        assert!((book.predict(0, Task::Mmlu) - 0.4).abs() < 1e-12);

        // Reload: "a" moves to position 1 with a new prior and keeps its feedback; "b" goes;
        // "c" arrives.
        let mut new_prior_a = [0.5; Task::COUNT];
        new_prior_a[Task::Mmlu.index()] = 0.6;
        book.reconfigure([("c", [0.9; Task::COUNT]), ("a", new_prior_a)])
            .unwrap();
        assert_eq!(book.names(), ["c", "a"]);
        assert_eq!(book.index_of("a"), Some(1));
        assert!((book.predict(1, Task::Mmlu) - 0.3).abs() < 1e-12);
        assert_eq!(book.predict(0, Task::Mmlu), 0.9);
        assert_eq!(book.observations(0, Task::Mmlu), 0);

        // A bad prior is refused and changes nothing.
        let mut bad = [0.5; Task::COUNT];
        bad[Task::Chat.index()] = f64::INFINITY;
        let err = book.reconfigure([("a", bad)]).unwrap_err();
        assert_eq!(err.expert, "a");
        assert_eq!(err.task, Task::Chat);
        assert_eq!(book.experts(), 2);
        assert!(QualityBook::new([("x", [1.1; Task::COUNT])]).is_err());
    }

    proptest! {
        /// (c) An expert with no history predicts the per-task mean over the others; with
        /// data, an expert converges to its own mean.
        #[test]
        fn expert_lengths_pool_then_converge_to_own_mean(
            means in prop::collection::vec(1u32..2000, 2..6),
            per_expert in 1usize..400,
            seed in any::<u64>(),
        ) {
            let names: Vec<String> = (0..=means.len()).map(|i| format!("e{i}")).collect();
            let mut lengths = ExpertOutputLengths::new(names.iter().cloned());
            let mut rng = crate::rng::SimRng::new(seed);
            let (mut task_sum, mut task_n) = (0.0, 0.0);
            let mut own_sum = vec![0.0; means.len()];
            for _ in 0..per_expert {
                for (e, &m) in means.iter().enumerate() {
                    // Uniform in [m/2, 3m/2]: mean m.
                    let tokens = (f64::from(m) * (0.5 + rng.unit())).round() as u32;
                    lengths.observe(e, Task::Math, tokens);
                    own_sum[e] += f64::from(tokens);
                    task_sum += f64::from(tokens);
                    task_n += 1.0;
                }
            }
            // The last expert saw nothing: the pooled per-task mean (the global mean is the
            // same data plus the 256-token prior worth one observation).
            let global = (task_sum + PRIOR_OUTPUT_TOKENS) / (task_n + 1.0);
            let pooled = (task_sum + global * OUTPUT_PRIOR_WEIGHT) / (task_n + OUTPUT_PRIOR_WEIGHT);
            let unseen = lengths.predict(means.len(), Task::Math);
            prop_assert!((unseen - pooled.max(1.0)).abs() <= 1e-9 * pooled);
            let task_mean = task_sum / task_n;
            prop_assert!((unseen - task_mean).abs()
                <= OUTPUT_PRIOR_WEIGHT / (task_n + OUTPUT_PRIOR_WEIGHT)
                    * (PRIOR_OUTPUT_TOKENS - task_mean).abs() + 1e-9 * task_mean);
            // Each expert with data: its own mean, shrunk toward the pooled one by 4/(n + 4).
            let n = per_expert as f64;
            let shrink = OUTPUT_PRIOR_WEIGHT / (n + OUTPUT_PRIOR_WEIGHT);
            for (e, &sum) in own_sum.iter().enumerate() {
                let own_mean = sum / n;
                let predicted = lengths.predict(e, Task::Math);
                prop_assert!(
                    ((predicted - own_mean).abs() - shrink * (pooled - own_mean).abs()).abs()
                        <= 1e-9 * own_mean.max(pooled)
                );
            }
        }
    }

    #[test]
    fn expert_lengths_converge_to_own_mean_with_data() {
        let mut lengths = ExpertOutputLengths::new(["short", "long"]);
        for _ in 0..4000 {
            lengths.observe(0, Task::Chat, 50);
            lengths.observe(1, Task::Chat, 800);
        }
        assert!((lengths.predict(0, Task::Chat) - 50.0).abs() < 1.0);
        assert!((lengths.predict(1, Task::Chat) - 800.0).abs() < 1.0);
        // The pooled mean is in between.
        assert!((lengths.predict_pooled(Task::Chat) - 425.0).abs() < 1.0);
    }
}
