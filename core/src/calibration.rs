//! Online calibration of an expert's [`LatencyModel`] from what the daemon observes.
//!
//! The configured latency model of an expert (prefill `a + p / prefill_tok_s`, with `a` the
//! fixed part `prefill_overhead_s`; decode step `t0 + d * (b - 1) + e * C`) is a guess from
//! published figures or one profiling run. A [`LatencyCalibrator`] per expert refits it from
//! two kinds of observation the gateway can make without any help from the expert:
//!
//! - **prefill**: [`LatencyCalibrator::observe_prefill`] with the prompt tokens and the time
//!   from dispatch to the first token of a request that did *not* queue (it was admitted at
//!   once, so the time is its prefill). The fit is affine, `seconds = a + p / prefill_tok_s`:
//!   the fixed part `a` takes what does not grow with the prompt (dispatch and network,
//!   scheduling, the engine iteration's own fixed cost, sampling the first token, a chat
//!   template's tokens the router does not count), so it no longer inflates
//!   `1 / prefill_tok_s` on short prompts. `a` and `prefill_tok_s` are told apart only if the
//!   prompt lengths vary; with one length only their combination is learned, which still
//!   predicts that length right.
//! - **decode step**: [`LatencyCalibrator::observe_decode_step`] with the batch `b` (running
//!   sequences) and context tokens `C` (prompt + generated tokens of the batch) the router's
//!   bookkeeping saw over an interval, and the mean time between two tokens of one request in
//!   that interval. Averages over the interval are fine (`b` and `C` are real numbers).
//!
//! # What to feed it
//!
//! - The memory is counted in *observations* (about `1 / (1 - forgetting)`, 100 at the
//!   default), so the observation rate sets how fast the model tracks and how noisy it is.
//!   One decode-step observation per expert per measurement interval (e.g. the mean over the
//!   running requests over one or a few seconds) suits the default; if you feed one per
//!   request per interval on a large batch, raise `forgetting` toward 0.999.
//! - The decode-step model has no prefill in it: an interval in which a prefill of another
//!   request stalled the batch reports longer steps than the model's. Skip those intervals, or
//!   expect `t0` and `d` to absorb the stalls (biased high by their share of the interval).
//! - `d` and `e` are told apart only if the context per sequence varies (`C` not simply
//!   proportional to `b`); otherwise only their combination is learned, which still predicts
//!   the step times right.
//!
//! # The estimator
//!
//! Two independent least-squares problems, prefill (two coefficients: `a` and
//! `1 / prefill_tok_s`) and decode step (three), each solved recursively with exponential
//! forgetting. With `theta` the normalised coefficients (below: mostly relative to the
//! prior's, so that the prior `theta_0` is 1, or 0 for a term configured as zero), the
//! estimate after `n` observations minimises
//!
//! ```text
//! sum_i lambda^(n-i) * w_i * (y_i - z_i . theta)^2  +  (theta - theta_0)' W_n (theta - theta_0)
//! ```
//!
//! where `lambda` is [`CalibratorSettings::forgetting`], `W_0 = prior_weight * S` (the
//! configured model is worth [`CalibratorSettings::prior_weight`] pseudo-observations at the
//! start, each of information `S`: the identity for the decode step, the mean `z z'` of
//! prompts spread evenly over 0-512 tokens for the prefill, below) and the prior's weight
//! decays like the data's,
//! `W_n = lambda * W_{n-1} + (1 - lambda) * floor * I`, toward
//! [`CalibratorSettings::prior_floor_weight`]. The floor keeps the system invertible and a
//! coefficient that no observation has excited exactly at its prior (e.g. `d` on an expert
//! that only ever ran one request at a time); its bias on excited coefficients is negligible
//! at the default (1e-6). The flip side of forgetting: a coefficient excited long ago and not
//! since has almost no information behind it, so the first observations that excite it again
//! re-learn it almost at once (one outlier among them can move it up to its clamp; the next
//! few put it right). The state is kept in information form (`R theta = r`) and solved after
//! each observation (a Cholesky of at most 3x3), which is numerically safer than the
//! covariance form. A coefficient configured as zero (`a` of every catalogue without a
//! measured overhead, `d` of the paper's model) starts at 0 and is held there by the prior's
//! weight like any other.
//!
//! Normalisation, so that every unknown is about 1 and the prior weight means the same for
//! every expert:
//!
//! - prefill: the unit of time is `u = 512 / prefill_tok_s_prior`, the prior's per-token time
//!   of a [`REFERENCE_PROMPT_TOKENS`] prompt: `y = seconds / u`, `z = (1, p / 512)` and
//!   `theta = (a / u, prefill_tok_s_prior / prefill_tok_s)`, so the prior is
//!   `(a_prior / u, 1)` (`(0, 1)` in every catalogue without an overhead). Both unknowns are
//!   shares of the prior's reference prefill time, so the prior weight means the same for
//!   both and every expert. A pseudo-observation is a prompt of 0 to 512 tokens taking the
//!   prior's time, spread evenly: information `S = [[1, 1/2], [1/2, 1/3]]` (the mean of
//!   `z z'`), under which the overhead's part and the per-token time are independent at the
//!   mean prompt, 256 tokens. Before (`S = I`: pseudo-observations of an empty prompt and of a
//!   512-token prompt's per-token part), a prior weight of 2 held the per-token time, given
//!   the overhead, as firmly as about 40 observations of prompts of 32 and 256 tokens (each
//!   informs it by the variance of `p / 512`, 0.048), and HIL scenario 10's calibrated time
//!   to first token stayed 28-45 % off the server's (run G's observations replayed with `S`
//!   as now: 19 %, against 38 % in the run). Measured over 1,000 random priors and
//!   truths (rate 0.2-5 times the prior's, overhead 0-4 `t0`; `experiment_prefill_prior_early`)
//!   at the default weight 10, median / p95 mean relative prefill-time error after 50
//!   observations, `I` then `S`: prompts of 16-2,016 tokens 7.1 / 33.3 % then 6.8 / 54.6 %,
//!   16-256 tokens 17.6 / 70.0 % then 10.7 / 41.8 %, 32 and 256 alternately 35.9 / 137 %
//!   then 13.1 / 63.5 %; with the prior right, 0.6-0.9 / 1.9-13.4 % then 0.6-1.1 /
//!   2.2-22.4 %. The cost: a weaker hold on the overhead where long prompts' noise moves it
//!   (the p95 of the widest mix), and on a right prior. (The decode step's
//!   convention, the overhead in units of its own reference `A` below, would give it an
//!   information of `(A / u)^2` per observation against the same prior weight, at most 0.12
//!   on the catalogues of `configs/` and 0.0004 on the slowest: with a true overhead of 30 ms,
//!   a rate of 0.8 times the prior's and +-5 ms of jitter on the Orin, L4 and paper experts,
//!   37-87 % of the overhead was still unlearned after 200 observations and a 50-token prompt
//!   31-40 % mispredicted, against 0.3-1.6 ms and 0.4-4.4 % with this unit.)
//!   Unweighted (`w = 1`): TTFT noise is mostly additive (dispatch jitter, waiting for the
//!   running step to end before the prefill iteration starts), not proportional to the time,
//!   so absolute least squares; long prompts, which pin the rate, weigh more. (Measured over
//!   1,000 observations: with 5 to 10 ms of additive jitter, relative least squares had a 3-6
//!   times larger rate error; with multiplicative noise of +-5 %, a 2 times smaller one);
//! - decode step: `z = (1, (b - 1) d_prior / t0_prior, C e_prior / t0_prior)` and
//!   `y = seconds / t0_prior`, weighted by the inverse square of the current prediction
//!   (relative least squares: a 10 ms step counts as much as a 100 ms one in relative terms,
//!   as step-time noise is about proportional to the step).

//! # Guards
//!
//! - An observation that is not finite, with no prompt tokens, a batch below 1, negative
//!   context, or outside the plausibility limits ([`MIN_SECONDS`], [`MAX_SECONDS`],
//!   [`MAX_PROMPT_TOKENS`], [`MAX_BATCH`], [`MAX_CONTEXT_TOKENS`]) is rejected and counted;
//!   it changes nothing.
//! - An outlier is clipped: the observed time enters the fit as at most
//!   [`CalibratorSettings::outlier_ratio`] times the current model's prediction (for prefill
//!   the whole `a + p / prefill_tok_s`; and at least the prediction divided by it), so one
//!   stalled token moves the model a little, not to the clamp. Clipped observations are
//!   counted.
//! - A change of regime is not an outlier: when [`REGIME_CHANGE_RUN`] observations of a term
//!   in a row are clipped on the same side (all more than `outlier_ratio` times the
//!   prediction, or all less than it divided by it), the expert's speed has changed (thermal
//!   throttling, a neighbour's job on a shared GPU, the end of either): the calibrator forgets
//!   what it learned of that term and starts again from its current model times the geometric
//!   mean of those observations' ratios to their predictions, worth two observations
//!   (counted in [`CalibrationCounts::regime_changes`]). One stalled token still
//!   moves the model a little; a 5x slowdown is followed within a few observations instead of
//!   the hundred or more that clipping at 2x with a memory of 100 took (the hardware-in-loop
//!   scenario 11 measured it).
//! - The model handed out is clamped term by term to `[min_ratio, max_ratio]` times the prior
//!   (defaults `[0.2, 5]`; for `prefill_tok_s` too). The prefill overhead `a` is clamped to
//!   `[0, max_ratio * A]` with the reference `A = max(a_prior, t0_prior)`: a prefill iteration
//!   is a forward pass like a decode step, so its fixed cost (weights read once, scheduling,
//!   sampling the first token) is about the decode base step `t0`, which every prior knows;
//!   `max_ratio` (5) of them leave room for dispatch and a chat template the router does not
//!   count. A configured overhead above `t0` is its own reference (as a non-zero `d` or `e`);
//!   one below it, or zero, may still grow to `max_ratio * t0`. Never negative, although an
//!   affine fit can find a negative intercept where short prompts are cheaper than
//!   proportional (a prefix cache, a chat template the router counts but the engine skips):
//!   it would predict nonsense for short prompts. The prefill pair handed out is the
//!   least-squares optimum *within* its box, not the clamped optimum: when a bound binds, the
//!   other coefficient is refitted with it held there (e.g. the rate alone when the overhead
//!   sits at 0), so an overhead estimate pushed below 0 by noise costs the rate no bias. A
//!   term whose prior is zero (`d` or `e`,
//!   as in the paper's model where `d = 0`) may grow from 0 up to `max_ratio` times a
//!   reference instead: `t0 / (max_slots - 1)` for `d` (a full batch costs at most
//!   `max_ratio` extra base steps) and `t0 / kv_tokens` for `e` (a full KV cache costs at most
//!   `max_ratio` extra base steps). Every model handed out passes
//!   [`ExpertProfile::validate`]'s checks: `prefill_tok_s > 0`, `prefill_overhead_s >= 0`,
//!   `t0 > 0`, `d >= 0`, `e >= 0`, all finite.
//!
//! # Metrics
//!
//! [`LatencyCalibrator::observations`] counts accepted, rejected and clipped observations;
//! [`LatencyCalibrator::accuracy`] gives the mean absolute percentage error of the model's
//! prediction of each accepted observation *before* it learned from it (an honest
//! out-of-sample error), over the last [`CalibratorSettings::error_window`] observations of
//! each term (prefill and decode step).
//!
//! The calibrator is pure arithmetic: no clock, no I/O; the caller measures the times.
//! On a config reload that changes an expert's configured latency model, start a new
//! calibrator from the new prior (the old fit was relative to the old prior and its clamp).

use std::collections::VecDeque;

use rls::Rls;

use crate::expert::{ExpertProfile, LatencyModel};

/// Prompt length whose prefill is the unit of the prefill fit (the prior weight counts
/// pseudo-observations of prompts this long).
pub const REFERENCE_PROMPT_TOKENS: f64 = 512.0;
/// The information one pseudo-observation of the prefill prior carries, in the normalised
/// coordinates `z = (1, p / 512)`: the mean of `z z'` over prompts spread evenly over
/// `0..=512` tokens (`E[1] = 1`, `E[p / 512] = 1 / 2`, `E[(p / 512)^2] = 1 / 3`). The prior
/// speaks of the prefill times of prompts like the ones an expert serves, not of its overhead
/// and of its per-token time one by one: it holds what the observations pin least.
const PREFILL_PSEUDO_OBSERVATION: [[f64; 2]; 2] = [[1.0, 0.5], [0.5, 1.0 / 3.0]];
/// The information one pseudo-observation of the decode prior carries: one unit on each
/// normalised coefficient.
const DECODE_PSEUDO_OBSERVATION: [[f64; 3]; 3] =
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
/// A request's own prefill measured under this share of the latency model's prediction came
/// with a first token ahead of it (the engine prefilled both in one iteration): the caller
/// learns nothing from it (the daemon's router, and the replay of its observations).
pub const PREFILL_MIN_SHARE_OF_PREDICTED: f64 = 0.25;
/// Shortest time an observation may report, seconds (100 ns); shorter is rejected as
/// implausible.
pub const MIN_SECONDS: f64 = 1.0e-7;
/// Longest time an observation may report, seconds; longer is rejected as implausible.
pub const MAX_SECONDS: f64 = 1.0e5;
/// Longest prompt an observation may report, tokens.
pub const MAX_PROMPT_TOKENS: f64 = 1.0e9;
/// Largest batch an observation may report, sequences.
pub const MAX_BATCH: f64 = 1.0e6;
/// Most context tokens an observation may report.
pub const MAX_CONTEXT_TOKENS: f64 = 1.0e12;

/// How a [`LatencyCalibrator`] learns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CalibratorSettings {
    /// Exponential forgetting factor `lambda` in `(0, 1]`, per observation: an observation
    /// `k` observations old weighs `lambda^k`; the memory is about `1 / (1 - lambda)`
    /// observations (100 at the default 0.99). 1 means no forgetting.
    pub forgetting: f64,
    /// Pseudo-observations the configured model is worth at the start (default 10).
    pub prior_weight: f64,
    /// Pseudo-observations the configured model keeps for ever (default 1e-6): the floor its
    /// weight decays to. It keeps the information matrix invertible and a coefficient that no
    /// observation has ever excited exactly at its prior.
    pub prior_floor_weight: f64,
    /// Lowest multiple of the prior a coefficient may take (default 0.2), in `(0, 1]`.
    pub min_ratio: f64,
    /// Highest multiple of the prior a coefficient may take (default 5), at least 1.
    pub max_ratio: f64,
    /// An observed time enters the fit clipped to `[prediction / outlier_ratio, prediction *
    /// outlier_ratio]` (default 2); must be above 1; infinity disables clipping.
    pub outlier_ratio: f64,
    /// Observations of each term the relative error is averaged over (default 64), at least 1.
    pub error_window: usize,
}

impl Default for CalibratorSettings {
    fn default() -> Self {
        Self {
            forgetting: 0.99,
            prior_weight: 10.0,
            prior_floor_weight: 1e-6,
            min_ratio: 0.2,
            max_ratio: 5.0,
            outlier_ratio: 2.0,
            error_window: 64,
        }
    }
}

/// Why a calibrator cannot be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidCalibrator {
    /// The configured model (or the profile's capacities) cannot serve as a prior.
    #[error("latency prior of expert `{expert}`: {field} must be {requirement}, got {value}")]
    Prior {
        /// The expert's name.
        expert: String,
        /// The offending field.
        field: &'static str,
        /// What it must be.
        requirement: &'static str,
        /// Its value.
        value: f64,
    },
    /// A setting is out of its range.
    #[error("calibrator setting {field} must be {requirement}, got {value}")]
    Setting {
        /// The offending setting.
        field: &'static str,
        /// What it must be.
        requirement: &'static str,
        /// Its value.
        value: f64,
    },
}

/// Why an observation was not learned from (it is counted in
/// [`CalibrationCounts::rejected`] and changes nothing else).
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum RejectedObservation {
    /// A value is NaN or infinite.
    #[error("{what} is not a finite number: {value}")]
    NotFinite {
        /// Which value.
        what: &'static str,
        /// The value.
        value: f64,
    },
    /// A value is outside its physical or plausible range.
    #[error("{what} must be {range}, got {value}")]
    OutOfRange {
        /// Which value.
        what: &'static str,
        /// The range it must be in.
        range: &'static str,
        /// The value.
        value: f64,
    },
    /// The values are finite but so extreme relative to the model that the update would not
    /// be (a safety net; not expected with values inside the limits).
    #[error("observation is numerically unusable")]
    Numerical,
}

/// How many observations a calibrator has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CalibrationCounts {
    /// Prefill observations learned from.
    pub prefill: u64,
    /// Decode-step observations learned from.
    pub decode_steps: u64,
    /// Observations rejected (of either kind).
    pub rejected: u64,
    /// Accepted observations whose time was clipped as an outlier (of either kind).
    pub clipped: u64,
    /// Changes of regime detected (of either kind): runs of [`REGIME_CHANGE_RUN`] observations
    /// clipped on the same side, after which the term was learned anew.
    pub regime_changes: u64,
}

/// Observations of one term in a row clipped on the same side that make a change of regime
/// (see the module documentation). A stall or a burst of foreign load on one request is one
/// or two clipped observations; five in a row, each more than `outlier_ratio` (2) times off,
/// is a different expert.
pub const REGIME_CHANGE_RUN: u32 = 5;

/// What the model a change of regime starts again from is worth, in observations: little, as
/// the run's first observations straddle the change (answers that began before it report a
/// mix of both speeds, so the run's mean ratio falls short of the new speed: 77 % of it in HIL
/// scenario 11 with a restart worth `prior_weight` = 10, which then took 13 s to reach 90 %),
/// so that the observations after it correct it quickly.
const REGIME_RESTART_WEIGHT: f64 = 2.0;

/// The current run of observations of one term clipped on the same side.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct ClippedRun {
    /// +1: above the prediction; -1: below; 0: no run.
    side: i8,
    /// Observations in the run.
    len: u32,
    /// Sum of `ln(observed / predicted)` over the run.
    log_ratio_sum: f64,
}

impl ClippedRun {
    /// Adds an observation `ratio` times its prediction (`clipped`: whether it was); returns
    /// the run's geometric mean ratio when the run makes a change of regime (and starts over).
    fn push(&mut self, ratio: f64, clipped: bool) -> Option<f64> {
        let side = if !clipped || !ratio.is_finite() || ratio <= 0.0 {
            0
        } else if ratio > 1.0 {
            1
        } else {
            -1
        };
        if side == 0 {
            *self = Self::default();
            return None;
        }
        if side != self.side {
            *self = Self {
                side,
                ..Self::default()
            };
        }
        self.len += 1;
        self.log_ratio_sum += ratio.ln();
        if self.len < REGIME_CHANGE_RUN {
            return None;
        }
        let factor = (self.log_ratio_sum / f64::from(self.len)).exp();
        *self = Self::default();
        Some(factor)
    }
}

/// How well the calibrated model predicted recent observations, before learning from them.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CalibrationAccuracy {
    /// Mean absolute percentage error (as a fraction: 0.05 is 5 %) of the predicted prefill
    /// time over the last `error_window` prefill observations; `None` before the first.
    pub prefill_mape: Option<f64>,
    /// The same for the decode step time.
    pub decode_step_mape: Option<f64>,
}

/// Recent relative errors of one term.
#[derive(Debug, Clone)]
struct ErrorWindow {
    errors: VecDeque<f64>,
    capacity: usize,
}

impl ErrorWindow {
    fn new(capacity: usize) -> Self {
        Self {
            errors: VecDeque::with_capacity(capacity.min(4096)),
            capacity,
        }
    }

    fn push(&mut self, relative_error: f64) {
        if self.errors.len() == self.capacity {
            self.errors.pop_front();
        }
        self.errors.push_back(relative_error);
    }

    fn mean(&self) -> Option<f64> {
        (!self.errors.is_empty())
            .then(|| self.errors.iter().sum::<f64>() / self.errors.len() as f64)
    }
}

/// Refits one expert's [`LatencyModel`] online from observed prefill and decode-step times,
/// starting from its configured model (see the module documentation for the method, the
/// guards and the meaning of every setting).
///
/// ```
/// use qosroute_core::{ExpertProfile, LatencyCalibrator, LatencyModel};
///
/// let profile = ExpertProfile {
///     name: "orin".into(),
///     model: "llama31_8b".into(),
///     hardware: String::new(),
///     source: String::new(),
///     max_slots: 8,
///     kv_tokens: 100_000,
///     latency: LatencyModel {
///         prefill_tok_s: 1700.0,
///         prefill_overhead_s: 0.0,
///         decode_t0_s: 0.028,
///         decode_d_s_per_seq: 0.0035,
///         decode_e_s_per_ctx_token: 8.9e-7,
///     },
/// };
/// let mut calibrator = LatencyCalibrator::new(&profile).unwrap();
/// // The expert really prefills 1,360 tokens/s, not the configured 1,700, after a fixed
/// // 40 ms per request the configuration does not know of.
/// for p in [200.0, 800.0, 1500.0, 400.0].repeat(100) {
///     calibrator.observe_prefill(p, 0.04 + p / 1360.0).unwrap();
/// }
/// let model = calibrator.model();
/// assert!((model.prefill_tok_s - 1360.0).abs() < 5.0);
/// assert!((model.prefill_overhead_s - 0.04).abs() < 0.001);
/// assert!(calibrator.observe_decode_step(f64::NAN, 10.0, 0.03).is_err());
/// assert_eq!(calibrator.observations().rejected, 1);
/// ```
#[derive(Debug, Clone)]
pub struct LatencyCalibrator {
    prior: LatencyModel,
    settings: CalibratorSettings,
    /// `u`, the unit of the prefill fit: the prior's per-token time of a
    /// [`REFERENCE_PROMPT_TOKENS`] prompt (`512 / prefill_tok_s`), seconds.
    prefill_unit: f64,
    /// Bounds of the normalised prefill coefficients (`a / u`: `[0, max_ratio * A / u]`;
    /// `k1 / k1_prior`).
    prefill_bounds: [(f64, f64); 2],
    /// Coefficient = normalised coefficient * scale, for `t0`, `d`, `e`.
    decode_scale: [f64; 3],
    /// Bounds of the normalised decode coefficients.
    decode_bounds: [(f64, f64); 3],
    /// The prior's normalised decode coefficients (1, or 0 for a term configured as zero).
    decode_prior: [f64; 3],
    prefill: Rls<2>,
    decode: Rls<3>,
    prefill_run: ClippedRun,
    decode_run: ClippedRun,
    counts: CalibrationCounts,
    prefill_errors: ErrorWindow,
    decode_errors: ErrorWindow,
}

/// A positive, finite, normal number (not so small that dividing by it overflows).
fn usable(x: f64) -> bool {
    x.is_normal() && x > 0.0
}

/// `x` clamped to `bounds`; `fallback` if `x` is NaN.
fn bounded(x: f64, (lo, hi): (f64, f64), fallback: f64) -> f64 {
    if x.is_nan() {
        fallback
    } else {
        x.clamp(lo, hi)
    }
}

impl LatencyCalibrator {
    /// A calibrator for `profile` with the default [`CalibratorSettings`], starting from its
    /// configured latency model.
    pub fn new(profile: &ExpertProfile) -> Result<Self, InvalidCalibrator> {
        Self::with_settings(profile, CalibratorSettings::default())
    }

    /// A calibrator for `profile` with `settings`. The profile's latency model is the prior
    /// (it must pass [`ExpertProfile::validate`]'s latency checks, with magnitudes that stay
    /// finite when multiplied by the clamp ratios); `max_slots` and `kv_tokens` set the
    /// reference for a `d` or `e` configured as zero.
    pub fn with_settings(
        profile: &ExpertProfile,
        settings: CalibratorSettings,
    ) -> Result<Self, InvalidCalibrator> {
        Self::check_settings(&settings)?;
        let prior = profile.latency;
        let bad_prior =
            |field: &'static str, requirement: &'static str, value: f64| InvalidCalibrator::Prior {
                expert: profile.name.clone(),
                field,
                requirement,
                value,
            };
        let CalibratorSettings {
            min_ratio,
            max_ratio,
            ..
        } = settings;
        let positive = "positive, finite and of a usable magnitude";
        let pf = prior.prefill_tok_s;
        if !(usable(pf) && usable(1.0 / pf) && usable(pf * min_ratio) && usable(pf * max_ratio)) {
            return Err(bad_prior("latency.prefill_tok_s", positive, pf));
        }
        let t0 = prior.decode_t0_s;
        if !(usable(t0) && usable(t0 * min_ratio) && usable(t0 * max_ratio)) {
            return Err(bad_prior("latency.decode_t0_s", positive, t0));
        }
        let non_negative = "non-negative, finite and of a usable magnitude";
        // The prefill fit's unit u and the overhead's reference A (module documentation).
        let a = prior.prefill_overhead_s;
        let overhead_reference = a.max(t0);
        let unit = REFERENCE_PROMPT_TOKENS / pf;
        let overhead_max = max_ratio * overhead_reference / unit;
        if !(a >= 0.0 && a.is_finite() && usable(unit) && usable(overhead_max)) {
            return Err(bad_prior("latency.prefill_overhead_s", non_negative, a));
        }
        let prefill_prior = [a / unit, 1.0];
        let slots_minus_one = f64::from(profile.max_slots.max(2) - 1);
        let kv = profile.kv_tokens.max(1) as f64;
        let mut decode_scale = [t0, 0.0, 0.0];
        let mut decode_prior = [1.0, 0.0, 0.0];
        let mut decode_bounds = [(min_ratio, max_ratio); 3];
        for (i, (field, value, zero_scale)) in [
            (
                "latency.decode_d_s_per_seq",
                prior.decode_d_s_per_seq,
                t0 / slots_minus_one,
            ),
            (
                "latency.decode_e_s_per_ctx_token",
                prior.decode_e_s_per_ctx_token,
                t0 / kv,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let i = i + 1;
            if value == 0.0 {
                decode_scale[i] = zero_scale;
                decode_bounds[i] = (0.0, max_ratio);
            } else if usable(value)
                && usable(value * min_ratio)
                && (value * max_ratio).is_finite()
                && (value / t0).is_finite()
            {
                decode_scale[i] = value;
                decode_prior[i] = 1.0;
            } else {
                return Err(bad_prior(field, non_negative, value));
            }
            if !usable(decode_scale[i]) {
                return Err(bad_prior(field, non_negative, value));
            }
        }
        Ok(Self {
            prior,
            settings,
            prefill_unit: unit,
            prefill_bounds: [(0.0, overhead_max), (1.0 / max_ratio, 1.0 / min_ratio)],
            decode_scale,
            decode_bounds,
            decode_prior,
            prefill: Rls::new(
                prefill_prior,
                settings.prior_weight,
                &PREFILL_PSEUDO_OBSERVATION,
            ),
            decode: Rls::new(
                decode_prior,
                settings.prior_weight,
                &DECODE_PSEUDO_OBSERVATION,
            ),
            prefill_run: ClippedRun::default(),
            decode_run: ClippedRun::default(),
            counts: CalibrationCounts::default(),
            prefill_errors: ErrorWindow::new(settings.error_window),
            decode_errors: ErrorWindow::new(settings.error_window),
        })
    }

    fn check_settings(s: &CalibratorSettings) -> Result<(), InvalidCalibrator> {
        let bad = |field: &'static str, requirement: &'static str, value: f64| {
            Err(InvalidCalibrator::Setting {
                field,
                requirement,
                value,
            })
        };
        if !(s.forgetting > 0.0 && s.forgetting <= 1.0) {
            return bad("forgetting", "in (0, 1]", s.forgetting);
        }
        if !(s.prior_weight.is_finite() && s.prior_weight > 0.0) {
            return bad("prior_weight", "positive and finite", s.prior_weight);
        }
        if !(s.prior_floor_weight.is_finite() && s.prior_floor_weight > 0.0) {
            return bad(
                "prior_floor_weight",
                "positive and finite",
                s.prior_floor_weight,
            );
        }
        if !(s.min_ratio > 0.0 && s.min_ratio <= 1.0) {
            return bad("min_ratio", "in (0, 1]", s.min_ratio);
        }
        if !(s.max_ratio.is_finite() && s.max_ratio >= 1.0) {
            return bad("max_ratio", "finite and at least 1", s.max_ratio);
        }
        if s.outlier_ratio.is_nan() || s.outlier_ratio <= 1.0 {
            return bad(
                "outlier_ratio",
                "above 1 (infinity allowed)",
                s.outlier_ratio,
            );
        }
        if s.error_window == 0 {
            return bad("error_window", "at least 1", 0.0);
        }
        Ok(())
    }

    /// The configured model the calibration started from.
    pub fn prior(&self) -> LatencyModel {
        self.prior
    }

    /// The settings.
    pub fn settings(&self) -> CalibratorSettings {
        self.settings
    }

    /// The calibrated model: the current fit, clamped term by term to [`Self::bounds`] (for
    /// prefill, the fit's optimum within the bounds: see the module documentation).
    pub fn model(&self) -> LatencyModel {
        let [overhead, k1] = self.prefill.box_optimum(&self.prefill_bounds);
        let coefficient = |i: usize| {
            bounded(
                self.decode.estimate[i],
                self.decode_bounds[i],
                self.decode_prior[i],
            ) * self.decode_scale[i]
        };
        LatencyModel {
            prefill_tok_s: self.prior.prefill_tok_s / k1,
            prefill_overhead_s: overhead * self.prefill_unit,
            decode_t0_s: coefficient(0),
            decode_d_s_per_seq: coefficient(1),
            decode_e_s_per_ctx_token: coefficient(2),
        }
    }

    /// The lowest and highest value every coefficient may take, as two models (the first has
    /// the slowest prefill rate and the smallest overhead and decode terms).
    pub fn bounds(&self) -> (LatencyModel, LatencyModel) {
        let [(a_lo, a_hi), (lo, hi)] = self.prefill_bounds;
        let s = &self.decode_scale;
        let b = &self.decode_bounds;
        let low = LatencyModel {
            prefill_tok_s: self.prior.prefill_tok_s / hi,
            prefill_overhead_s: a_lo * self.prefill_unit,
            decode_t0_s: b[0].0 * s[0],
            decode_d_s_per_seq: b[1].0 * s[1],
            decode_e_s_per_ctx_token: b[2].0 * s[2],
        };
        let high = LatencyModel {
            prefill_tok_s: self.prior.prefill_tok_s / lo,
            prefill_overhead_s: a_hi * self.prefill_unit,
            decode_t0_s: b[0].1 * s[0],
            decode_d_s_per_seq: b[1].1 * s[1],
            decode_e_s_per_ctx_token: b[2].1 * s[2],
        };
        (low, high)
    }

    /// How many observations were learned from, rejected and clipped.
    pub fn observations(&self) -> CalibrationCounts {
        self.counts
    }

    /// Recent relative error of the model's predictions, per term.
    pub fn accuracy(&self) -> CalibrationAccuracy {
        CalibrationAccuracy {
            prefill_mape: self.prefill_errors.mean(),
            decode_step_mape: self.decode_errors.mean(),
        }
    }

    fn reject(&mut self, why: RejectedObservation) -> Result<(), RejectedObservation> {
        self.counts.rejected += 1;
        Err(why)
    }

    /// Checks one value: finite and within `[lo, hi]` (`lo` excluded when `open_low`).
    fn check(
        what: &'static str,
        value: f64,
        (lo, hi): (f64, f64),
        open_low: bool,
        range: &'static str,
    ) -> Result<(), RejectedObservation> {
        if !value.is_finite() {
            return Err(RejectedObservation::NotFinite { what, value });
        }
        let above_low = if open_low { value > lo } else { value >= lo };
        if !(above_low && value <= hi) {
            return Err(RejectedObservation::OutOfRange { what, range, value });
        }
        Ok(())
    }

    /// `y` clipped to `[prediction / outlier_ratio, prediction * outlier_ratio]`, and whether
    /// it was.
    fn clip(&self, y: f64, prediction: f64) -> (f64, bool) {
        let r = self.settings.outlier_ratio;
        let clipped = y.clamp(prediction / r, prediction * r);
        (clipped, clipped != y)
    }

    /// Learns from a prefill: `prompt_tokens` prompt tokens took `seconds` from when the
    /// request's own prefill started (it held a slot, with no prefill ahead of it) to its
    /// first token.
    ///
    /// Rejected (counted, nothing learned) unless `prompt_tokens` is in
    /// `(0, MAX_PROMPT_TOKENS]` and `seconds` in `[MIN_SECONDS, MAX_SECONDS]`, both finite.
    pub fn observe_prefill(
        &mut self,
        prompt_tokens: f64,
        seconds: f64,
    ) -> Result<(), RejectedObservation> {
        let checked = Self::check(
            "prompt_tokens",
            prompt_tokens,
            (0.0, MAX_PROMPT_TOKENS),
            true,
            "positive and at most 1e9",
        )
        .and_then(|()| {
            Self::check(
                "seconds",
                seconds,
                (MIN_SECONDS, MAX_SECONDS),
                false,
                "between 1e-7 and 1e5",
            )
        });
        if let Err(why) = checked {
            return self.reject(why);
        }
        let predicted_s = self.model().prefill_s(prompt_tokens);
        // Normalised: z = (1, p / 512), y = seconds / u, y ~ z . theta with
        // theta = (a / u, k1 / k1_prior).
        let unit = self.prefill_unit;
        let z = [1.0, prompt_tokens / REFERENCE_PROMPT_TOKENS];
        let (y, clipped) = self.clip(seconds / unit, predicted_s / unit);
        let learned = y.is_finite()
            && z.iter().all(|v| v.is_finite())
            && self.prefill.update(
                &z,
                y,
                self.settings.forgetting,
                self.settings.prior_floor_weight,
            );
        if !learned {
            return self.reject(RejectedObservation::Numerical);
        }
        self.prefill_errors
            .push((predicted_s - seconds).abs() / seconds);
        self.counts.prefill += 1;
        self.counts.clipped += u64::from(clipped);
        if let Some(factor) = self.prefill_run.push(seconds / predicted_s, clipped) {
            // Both coefficients are times (the overhead and the time per token): a slower
            // expert takes `factor` times each, from the model handed out now.
            let current = self.prefill.box_optimum(&self.prefill_bounds);
            self.prefill.restart_at(
                current.map(|c| c * factor),
                REGIME_RESTART_WEIGHT,
                &PREFILL_PSEUDO_OBSERVATION,
            );
            self.counts.regime_changes += 1;
        }
        Ok(())
    }

    /// Learns from decoding: with `batch` sequences running and `context_tokens` tokens held
    /// by the batch in total (as the router's bookkeeping saw them; interval means are fine),
    /// one request's tokens came `seconds` apart on average.
    ///
    /// Rejected (counted, nothing learned) unless `batch` is in `[1, MAX_BATCH]`,
    /// `context_tokens` in `[0, MAX_CONTEXT_TOKENS]` and `seconds` in
    /// `[MIN_SECONDS, MAX_SECONDS]`,
    /// all finite.
    pub fn observe_decode_step(
        &mut self,
        batch: f64,
        context_tokens: f64,
        seconds: f64,
    ) -> Result<(), RejectedObservation> {
        let checked = Self::check(
            "batch",
            batch,
            (1.0, MAX_BATCH),
            false,
            "at least 1 and at most 1e6",
        )
        .and_then(|()| {
            Self::check(
                "context_tokens",
                context_tokens,
                (0.0, MAX_CONTEXT_TOKENS),
                false,
                "non-negative and at most 1e12",
            )
        })
        .and_then(|()| {
            Self::check(
                "seconds",
                seconds,
                (MIN_SECONDS, MAX_SECONDS),
                false,
                "between 1e-7 and 1e5",
            )
        });
        if let Err(why) = checked {
            return self.reject(why);
        }
        let predicted_s = self.model().decode_step_s(batch, context_tokens);
        // Normalised by the prior's t0: z = each term's contribution at unit coefficients.
        let unit = self.prior.decode_t0_s;
        let s = &self.decode_scale;
        let z = [
            1.0,
            (batch - 1.0) * (s[1] / unit),
            context_tokens * (s[2] / unit),
        ];
        let prediction = predicted_s / unit;
        let (y, clipped) = self.clip(seconds / unit, prediction);
        // Relative least squares: weigh by the inverse prediction, so that a short step counts
        // as much as a long one in relative terms (step-time noise is about proportional).
        let (z, y) = (z.map(|v| v / prediction), y / prediction);
        let learned = y.is_finite()
            && z.iter().all(|v| v.is_finite())
            && self.decode.update(
                &z,
                y,
                self.settings.forgetting,
                self.settings.prior_floor_weight,
            );
        if !learned {
            return self.reject(RejectedObservation::Numerical);
        }
        self.decode_errors
            .push((predicted_s - seconds).abs() / seconds);
        self.counts.decode_steps += 1;
        self.counts.clipped += u64::from(clipped);
        if let Some(factor) = self.decode_run.push(seconds / predicted_s, clipped) {
            // Every term of the step is a time: `factor` times each of the model handed out.
            let current = [0, 1, 2].map(|i| {
                bounded(
                    self.decode.estimate[i],
                    self.decode_bounds[i],
                    self.decode_prior[i],
                ) * factor
            });
            self.decode
                .restart_at(current, REGIME_RESTART_WEIGHT, &DECODE_PSEUDO_OBSERVATION);
            self.counts.regime_changes += 1;
        }
        Ok(())
    }
}

mod rls;
#[cfg(test)]
mod tests;
