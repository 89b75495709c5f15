//! Output-length distributions: a bounded log-spaced histogram sketch per task (and per
//! expert), learned from completions only, and weighted mixtures of them.
//!
//! # Bin layout
//!
//! A [`LengthHistogram`] has [`BINS`] = 112 bins covering `1..=MAX_TOKENS` (65,536) output
//! tokens, with exact integer edges (log-linear, as in HDR histograms):
//!
//! - tokens `1..=15`: one bin per value (bins 0-14);
//! - from 16 on, each power-of-two octave `[2^k, 2^(k+1))` (`k` = 4..=15) is cut into 8 equal
//!   bins of width `2^(k-3)`: `[16, 17]`, `[18, 19]`, ..., `[30, 31]`, `[32, 35]`, ...,
//!   `[61_440, 65_535]` (bins 15-110);
//! - the last bin (111) holds 65,536 alone.
//!
//! Relative resolution: a bin is at most 1/8 of its lower edge wide, so a value is known to
//! within 12.5 % (and to within 6.25 % of the bin's middle); below 16 it is exact.
//!
//! A count of 0 tokens is binned as 1 and a count above 65,536 as 65,536 (the bins only); the
//! exact sum and count (`sum`, `n`) that give the mean keep the true values.
//!
//! # Mass inside a bin
//!
//! Inside a bin, the mass is taken as spread uniformly over the bin's integer values: a bin
//! `[lo, hi]` holding mass `m` gives `m / (hi - lo + 1)` to each of `lo, lo + 1, ..., hi`.
//! Quantiles and draws are integers read from that spread. So 100 observations of 100 tokens
//! (bin `[96, 103]`) have a median of 99 and draws spread over 96..=103.
//!
//! # Memory and cost
//!
//! A histogram is a fixed array of cumulative masses (no allocation, no growth with
//! observations): `observe` costs one pass over the bins above the observed one; the mass at
//! or below a value is read in O(1). A [`LengthMixture`] borrows up to [`MIXTURE_CAPACITY`]
//! components and allocates nothing: a conditioned draw ([`LengthMixture::sample_above`]) is
//! one O(1) pass over the components, one uniform draw and two binary searches over the
//! chosen histogram's 112 bins (measured at about 0.1 us with an optimised build on x86-64,
//! building the 4-component mixture of an (expert, task) included); a quantile is a binary
//! search over `1..=MAX_TOKENS` (17 steps, about 0.4 us).

use crate::rng::SimRng;

/// Largest output length the bins resolve (larger counts are binned here).
pub const MAX_TOKENS: u32 = 65_536;
/// Number of bins of a [`LengthHistogram`].
pub const BINS: usize = 112;
/// Sub-bins per power-of-two octave, as a power of two (8 sub-bins).
const SUB_BITS: u32 = 3;
/// Values below this have a bin each.
const EXACT_BELOW: u32 = 16;

/// Components a [`LengthMixture`] holds at most.
pub const MIXTURE_CAPACITY: usize = 4;

/// The quantile levels of [`LengthMixture::prediction_quantiles`] (and of
/// `Prediction::output_quantiles`): p10, p50, p90.
pub const PREDICTION_QUANTILE_LEVELS: [f64; 3] = [0.1, 0.5, 0.9];

/// Tail rule: the smallest mean of the remaining tokens drawn when nothing seen was longer.
pub const TAIL_MIN_MEAN_TOKENS: f64 = 16.0;
/// Tail rule: the mean of the remaining tokens as a fraction of the tokens already generated.
pub const TAIL_MEAN_FRACTION: f64 = 0.25;

/// The bin holding `tokens` (0 is binned as 1, anything above [`MAX_TOKENS`] as
/// [`MAX_TOKENS`]).
pub fn bin_of(tokens: u32) -> usize {
    let v = tokens.clamp(1, MAX_TOKENS);
    if v < EXACT_BELOW {
        return (v - 1) as usize;
    }
    let shift = (31 - v.leading_zeros()) - SUB_BITS; // octave 2^k: shift k - 3 >= 1
    ((shift << SUB_BITS) + (v >> shift) - 1) as usize
}

/// The integer values of bin `i` (`0..BINS`), as `(lowest, highest)`, both inclusive. `i` at
/// or past [`BINS`] is read as the last bin.
pub fn bin_bounds(i: usize) -> (u32, u32) {
    let i = i.min(BINS - 1);
    if i == BINS - 1 {
        return (MAX_TOKENS, MAX_TOKENS);
    }
    (bin_lower(i), bin_lower(i + 1) - 1)
}

/// Lowest value of bin `i` (`i < BINS`).
fn bin_lower(i: usize) -> u32 {
    let j = i as u32 + 1;
    if j < EXACT_BELOW {
        return j;
    }
    let shift = (j >> SUB_BITS) - 1;
    (j - (shift << SUB_BITS)) << shift
}

/// A bounded sketch of a distribution of output token counts: masses (counts, or pseudo-counts)
/// in [`BINS`] log-spaced bins, plus the exact sum and count of what was added. See the
/// [module docs](self) for the bin layout and how mass is spread inside a bin.
#[derive(Debug, Clone, PartialEq)]
pub struct LengthHistogram {
    /// `cum[i]`: mass in bins `0..=i`.
    cum: [f64; BINS],
    sum: f64,
    n: f64,
}

impl Default for LengthHistogram {
    fn default() -> Self {
        Self::EMPTY
    }
}

impl LengthHistogram {
    /// No mass.
    pub const EMPTY: Self = Self {
        cum: [0.0; BINS],
        sum: 0.0,
        n: 0.0,
    };

    /// No mass.
    pub fn new() -> Self {
        Self::EMPTY
    }

    /// Adds one observation of `tokens`.
    pub fn observe(&mut self, tokens: u32) {
        self.add_weighted(tokens, 1.0);
    }

    /// Adds `weight` observations of `tokens` (a pseudo-count: any finite positive weight;
    /// anything else adds nothing).
    pub fn add_weighted(&mut self, tokens: u32, weight: f64) {
        if !(weight.is_finite() && weight > 0.0) {
            return;
        }
        self.sum += f64::from(tokens) * weight;
        self.n += weight;
        for c in &mut self.cum[bin_of(tokens)..] {
            *c += weight;
        }
    }

    /// Observations added (pseudo-counts included).
    pub fn n(&self) -> f64 {
        self.n
    }

    /// Exact sum of the tokens added (each times its weight).
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Exact mean of the tokens added (`None` before any).
    pub fn mean(&self) -> Option<f64> {
        (self.n > 0.0).then(|| self.sum / self.n)
    }

    /// Mass in the bins (equals [`LengthHistogram::n`]).
    pub fn mass(&self) -> f64 {
        self.cum[BINS - 1]
    }

    /// Mass in bin `i` (0 out of range).
    pub fn bin_mass(&self, i: usize) -> f64 {
        match i {
            0 => self.cum[0],
            i if i < BINS => self.cum[i] - self.cum[i - 1],
            _ => 0.0,
        }
    }

    /// Mass at values `<= tokens`, spreading each bin uniformly over its integer values.
    pub fn mass_at_most(&self, tokens: u32) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        let i = bin_of(tokens);
        let (lo, hi) = bin_bounds(i);
        let before = if i == 0 { 0.0 } else { self.cum[i - 1] };
        if tokens >= hi {
            return self.cum[i];
        }
        let inside = f64::from(tokens - lo + 1) / f64::from(hi - lo + 1);
        before + (self.cum[i] - before) * inside
    }

    /// The `q`-quantile (see [`LengthMixture::quantile`]); `None` without mass.
    pub fn quantile(&self, q: f64) -> Option<u32> {
        LengthMixture::new().with_histogram(self, 1.0).quantile(q)
    }

    /// Draws a value from mass `pos` of the cumulative masses, conditioned on being above
    /// `generated` (`pos` is in `[mass_at_most(generated), mass())`).
    fn value_at(&self, pos: f64, generated: u32) -> u32 {
        let total = self.mass();
        let last_with_mass = self.cum.partition_point(|&c| c < total);
        let i = self.cum.partition_point(|&c| c <= pos).min(last_with_mass);
        let (lo, hi) = bin_bounds(i);
        let before = if i == 0 { 0.0 } else { self.cum[i - 1] };
        let mass = self.cum[i] - before;
        let width = f64::from(hi - lo + 1);
        let offset = if mass > 0.0 {
            ((pos - before) / mass * width)
                .floor()
                .clamp(0.0, width - 1.0) as u32
        } else {
            0
        };
        (lo + offset).max(generated.saturating_add(1))
    }
}

/// One component of a [`LengthMixture`].
#[derive(Debug, Clone, Copy)]
enum Part<'a> {
    /// A histogram's mass times `scale` (the component's weight over the histogram's mass).
    Histogram {
        histogram: &'a LengthHistogram,
        scale: f64,
    },
    /// `weight` at the single value `tokens`.
    Point { tokens: u32, weight: f64 },
}

impl Part<'_> {
    const NONE: Self = Self::Point {
        tokens: 1,
        weight: 0.0,
    };

    fn mass_at_most(&self, tokens: u32) -> f64 {
        match *self {
            Part::Histogram { histogram, scale } => scale * histogram.mass_at_most(tokens),
            Part::Point { tokens: t, weight } => {
                if t <= tokens {
                    weight
                } else {
                    0.0
                }
            }
        }
    }
}

/// A weighted mixture of up to [`MIXTURE_CAPACITY`] components (histograms, each as its
/// normalised distribution, and point masses), borrowing the histograms: building one and
/// reading it allocates nothing.
///
/// A component's weight is its share of the mixture before normalisation: a histogram added
/// with weight `w` contributes `w` of mass spread like its own, whatever its count. Components
/// with a weight that is not finite and positive, and histograms without mass, are left out;
/// so is any component past [`MIXTURE_CAPACITY`].
#[derive(Debug, Clone, Copy)]
pub struct LengthMixture<'a> {
    parts: [Part<'a>; MIXTURE_CAPACITY],
    len: usize,
}

impl Default for LengthMixture<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> LengthMixture<'a> {
    /// No component (no mass).
    pub fn new() -> Self {
        Self {
            parts: [Part::NONE; MIXTURE_CAPACITY],
            len: 0,
        }
    }

    fn with(mut self, part: Part<'a>) -> Self {
        if let Some(slot) = self.parts.get_mut(self.len) {
            *slot = part;
            self.len += 1;
        }
        self
    }

    /// Adds `histogram`'s distribution with mixture weight `weight`.
    pub fn with_histogram(self, histogram: &'a LengthHistogram, weight: f64) -> Self {
        let mass = histogram.mass();
        if !(weight.is_finite() && weight > 0.0 && mass > 0.0) {
            return self;
        }
        self.with(Part::Histogram {
            histogram,
            scale: weight / mass,
        })
    }

    /// Adds a point mass of `weight` at `tokens` (clamped to `1..=MAX_TOKENS`).
    pub fn with_point(self, tokens: u32, weight: f64) -> Self {
        if !(weight.is_finite() && weight > 0.0) {
            return self;
        }
        self.with(Part::Point {
            tokens: tokens.clamp(1, MAX_TOKENS),
            weight,
        })
    }

    /// Components kept.
    pub fn components(&self) -> usize {
        self.len
    }

    fn parts(&self) -> &[Part<'a>] {
        &self.parts[..self.len]
    }

    /// Total mass (the sum of the kept components' weights).
    pub fn mass(&self) -> f64 {
        self.mass_at_most(MAX_TOKENS)
    }

    /// Mass at values `<= tokens`.
    pub fn mass_at_most(&self, tokens: u32) -> f64 {
        self.parts().iter().map(|p| p.mass_at_most(tokens)).sum()
    }

    /// Mean of the mixture, from the histograms' exact means (`None` without mass).
    pub fn mean(&self) -> Option<f64> {
        let mass = self.mass();
        let weighted: f64 = self
            .parts()
            .iter()
            .map(|p| match *p {
                Part::Histogram { histogram, scale } => scale * histogram.sum(),
                Part::Point { tokens, weight } => weight * f64::from(tokens),
            })
            .sum();
        (mass > 0.0).then(|| weighted / mass)
    }

    /// The `q`-quantile: the smallest integer `x` in `1..=MAX_TOKENS` whose mass at or below
    /// it is positive and at least `q` times the total (`q` is clamped to `[0, 1]`, NaN read
    /// as 0; so `q = 0` gives the smallest value with mass). `None` without mass.
    pub fn quantile(&self, q: f64) -> Option<u32> {
        let mass = self.mass();
        if mass.is_nan() || mass <= 0.0 {
            return None;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let target = q * mass;
        let reached = |x: u32| {
            let m = self.mass_at_most(x);
            m >= target && m > 0.0
        };
        let (mut lo, mut hi) = (1u32, MAX_TOKENS);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if reached(mid) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Some(lo)
    }

    /// p10, p50 and p90 ([`PREDICTION_QUANTILE_LEVELS`]) as `Prediction::output_quantiles`
    /// holds them, each at least 1 (all 1 without mass).
    pub fn prediction_quantiles(&self) -> [f64; 3] {
        PREDICTION_QUANTILE_LEVELS.map(|q| self.quantile(q).map_or(1.0, f64::from))
    }

    /// A draw of a total `T > generated` from the mixture conditioned on exceeding
    /// `generated`; `None` when no mass lies above `generated`. Consumes one
    /// [`SimRng::unit`] when it returns a value, nothing otherwise.
    pub fn sample_above(&self, generated: u32, rng: &mut SimRng) -> Option<u32> {
        let mut below = [0.0; MIXTURE_CAPACITY];
        let mut above = [0.0; MIXTURE_CAPACITY];
        let mut total = 0.0;
        for (i, p) in self.parts().iter().enumerate() {
            above[i] = match *p {
                Part::Histogram { histogram, scale } => {
                    below[i] = histogram.mass_at_most(generated);
                    (histogram.mass() - below[i]).max(0.0) * scale
                }
                Part::Point { tokens, weight } if tokens > generated => weight,
                Part::Point { .. } => 0.0,
            };
            total += above[i];
        }
        if total.is_nan() || total <= 0.0 {
            return None;
        }
        let mut u = rng.unit() * total;
        // The component holding `u`; rounding past the end falls on the last one with mass.
        let mut chosen = None;
        for (i, &a) in above.iter().enumerate().take(self.len) {
            if a > 0.0 {
                chosen = Some(i);
                if u < a {
                    break;
                }
                u -= a;
            }
        }
        let i = chosen?;
        Some(match self.parts[i] {
            Part::Histogram { histogram, scale } => {
                histogram.value_at(below[i] + (u / scale).max(0.0), generated)
            }
            Part::Point { tokens, .. } => tokens,
        })
    }

    /// A draw of the tokens still to come of a request that has generated `generated`: a
    /// total from [`LengthMixture::sample_above`] minus `generated`, or, when no mass lies
    /// above `generated`, [`tail_remaining`]. Always at least 1.
    pub fn sample_remaining(&self, generated: u32, rng: &mut SimRng) -> u32 {
        match self.sample_above(generated, rng) {
            Some(total) => total.saturating_sub(generated).max(1),
            None => tail_remaining(generated, rng),
        }
    }
}

/// Tail rule, for a request already longer than anything the distribution holds: the tokens
/// still to come are `1 + floor(X)`, `X` exponential with mean
/// `max(TAIL_MIN_MEAN_TOKENS, TAIL_MEAN_FRACTION * generated)` (16 tokens, or a quarter of
/// what it generated: a long answer is expected to go on in proportion, memorylessly). Consumes
/// one [`SimRng::exponential`] draw.
pub fn tail_remaining(generated: u32, rng: &mut SimRng) -> u32 {
    let mean = (TAIL_MEAN_FRACTION * f64::from(generated)).max(TAIL_MIN_MEAN_TOKENS);
    // `as` saturates: an astronomically long draw becomes u32::MAX.
    (1.0 + rng.exponential(1.0 / mean).floor()) as u32
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::knowledge::OutputLengthModel;
    use crate::predict::{
        ExpertOutputLengths, OUTPUT_PRIOR_WEIGHT, OutputLengthPredictor, PRIOR_OUTPUT_TOKENS,
    };
    use crate::task::Task;
    use proptest::prelude::*;

    fn histogram_of(values: &[(u32, usize)]) -> LengthHistogram {
        let mut h = LengthHistogram::new();
        for &(tokens, times) in values {
            for _ in 0..times {
                h.observe(tokens);
            }
        }
        h
    }

    /// Share of `draws` for which `pred` holds.
    fn share(draws: &[u32], pred: impl Fn(u32) -> bool) -> f64 {
        draws.iter().filter(|&&d| pred(d)).count() as f64 / draws.len() as f64
    }

    #[test]
    fn bin_edges_are_exact_contiguous_and_log_spaced() {
        assert_eq!(bin_bounds(0), (1, 1));
        assert_eq!(bin_bounds(14), (15, 15));
        assert_eq!(bin_bounds(15), (16, 17));
        assert_eq!(bin_bounds(22), (30, 31));
        assert_eq!(bin_bounds(23), (32, 35));
        assert_eq!(bin_bounds(110), (61_440, 65_535));
        assert_eq!(bin_bounds(BINS - 1), (65_536, 65_536));
        assert_eq!(BINS, 112);
        for i in 1..BINS {
            assert_eq!(bin_bounds(i).0, bin_bounds(i - 1).1 + 1, "bin {i}");
            let (lo, hi) = bin_bounds(i);
            // At most 1/8 of the lower edge wide.
            assert!(8 * (hi - lo + 1) <= lo.max(8), "bin {i}: {lo}..={hi}");
        }
        for v in 1..=MAX_TOKENS {
            let (lo, hi) = bin_bounds(bin_of(v));
            assert!(lo <= v && v <= hi, "{v} in {lo}..={hi}");
        }
        assert_eq!(bin_of(0), 0);
        assert_eq!(bin_of(u32::MAX), BINS - 1);
    }

    #[test]
    fn quantiles_of_known_observations() {
        let h = histogram_of(&(1..=10).map(|v| (v, 1)).collect::<Vec<_>>());
        assert_eq!(h.quantile(0.0), Some(1));
        assert_eq!(h.quantile(0.1), Some(1));
        assert_eq!(h.quantile(0.5), Some(5));
        assert_eq!(h.quantile(0.9), Some(9));
        assert_eq!(h.quantile(1.0), Some(10));
        assert_eq!(h.mean(), Some(5.5));
        // 100 lies in bin 96..=103, spread uniformly: the mass at or below x is (x - 95) / 8.
        let h = histogram_of(&[(100, 40)]);
        assert_eq!(h.quantile(0.1), Some(96));
        assert_eq!(h.quantile(0.5), Some(99));
        assert_eq!(h.quantile(0.9), Some(103));
        assert_eq!(h.mean(), Some(100.0), "the mean is exact");
        assert_eq!(
            (h.bin_mass(bin_of(100)), h.bin_mass(bin_of(95))),
            (40.0, 0.0)
        );
        assert_eq!((h.mass_at_most(99), h.mass_at_most(103)), (20.0, 40.0));
        assert_eq!(LengthHistogram::new().quantile(0.5), None);
        assert_eq!(LengthHistogram::new().mean(), None);
        // A pseudo-count weighs as much as that many observations.
        let mut w = histogram_of(&[(10, 1)]);
        w.add_weighted(20, 3.0);
        assert_eq!(
            (w.n(), w.sum(), w.quantile(0.25), w.quantile(0.26)),
            (4.0, 70.0, Some(10), Some(20))
        );
    }

    #[test]
    fn a_mixture_weighs_its_components() {
        let h = histogram_of(&[(10, 3)]);
        // 3/4 at 10, 1/4 at 256 (the histogram counts as its weight, not its count).
        let m = LengthMixture::new()
            .with_histogram(&h, 6.0)
            .with_point(256, 2.0);
        assert_eq!(m.quantile(0.75), Some(10));
        assert_eq!(m.quantile(0.76), Some(256));
        assert_eq!(m.mean(), Some(0.75 * 10.0 + 0.25 * 256.0));
        assert_eq!(m.prediction_quantiles(), [10.0, 10.0, 256.0]);
        assert_eq!(LengthMixture::new().prediction_quantiles(), [1.0; 3]);
        let full = (0..6).fold(LengthMixture::new(), |m, i| m.with_point(i, 1.0));
        assert_eq!(full.components(), MIXTURE_CAPACITY);
    }

    #[test]
    fn draws_are_conditioned_on_the_tokens_generated() {
        let h = histogram_of(&[(100, 1000)]);
        let m = LengthMixture::new().with_histogram(&h, 1.0);
        let mut rng = SimRng::new(11);
        // Everything above 50 is in bin 96..=103: 46 to 53 tokens to go.
        let draws: Vec<u32> = (0..10_000)
            .map(|_| m.sample_remaining(50, &mut rng))
            .collect();
        assert!(
            draws.iter().all(|d| (46..=53).contains(d)),
            "{:?}",
            &draws[..20]
        );
        // Above 99: 100..=103, a quarter each.
        let totals: Vec<u32> = (0..20_000)
            .map(|_| m.sample_above(99, &mut rng).unwrap())
            .collect();
        for v in 100..=103 {
            let s = share(&totals, |t| t == v);
            assert!((s - 0.25).abs() < 0.02, "{v}: {s}");
        }
        // Never a total at or below what was generated.
        for g in [0, 95, 96, 100, 102] {
            assert!((0..2000).all(|_| m.sample_above(g, &mut rng).unwrap() > g));
        }
        assert_eq!(m.sample_above(103, &mut rng), None);
        // The same rng state gives the same draw.
        let (mut a, mut b) = (SimRng::new(5), SimRng::new(5));
        assert_eq!(
            m.sample_remaining(97, &mut a),
            m.sample_remaining(97, &mut b)
        );
    }

    #[test]
    fn the_tail_rule_takes_over_past_everything_seen() {
        let short = histogram_of(&[(30, 9)]);
        let hundred = histogram_of(&[(100, 50)]);
        // Counted at 65,536, the end of the bins.
        let huge = histogram_of(&[(70_000, 1)]);
        // (history, generated, mean of the exponential): max(16, generated / 4).
        let cases = [
            (&short, 40u32, 16.0f64),
            (&hundred, 103, 25.75),
            (&huge, 65_536, 16_384.0),
        ];
        for (h, generated, mean) in cases {
            let m = LengthMixture::new().with_histogram(h, 1.0);
            let mut rng = SimRng::new(3);
            let draws: Vec<u32> = (0..20_000)
                .map(|_| m.sample_remaining(generated, &mut rng))
                .collect();
            assert!(draws.iter().all(|&d| d >= 1));
            // E[1 + floor(Exp(mean))] = 1 + 1 / (e^(1/mean) - 1), about mean + 1/2.
            let expected = 1.0 + 1.0 / ((1.0 / mean).exp() - 1.0);
            let got = draws.iter().map(|&d| f64::from(d)).sum::<f64>() / draws.len() as f64;
            assert!(
                (got - expected).abs() < 0.05 * mean,
                "{generated}: {got} vs {expected}"
            );
            // Exactly the tail rule's draws.
            let (mut a, mut b) = (SimRng::new(9), SimRng::new(9));
            assert_eq!(
                m.sample_remaining(generated, &mut a),
                tail_remaining(generated, &mut b)
            );
        }
    }

    #[test]
    fn draws_match_a_two_valued_history() {
        let h = histogram_of(&[(20, 300), (500, 100)]);
        let m = LengthMixture::new().with_histogram(&h, 1.0);
        let mut rng = SimRng::new(2024);
        let totals: Vec<u32> = (0..40_000)
            .map(|_| m.sample_above(0, &mut rng).unwrap())
            .collect();
        // 20 is in bin 20..=21, 500 in bin 480..=511.
        let short = share(&totals, |t| (20..=21).contains(&t));
        let long = share(&totals, |t| (480..=511).contains(&t));
        assert!((short - 0.75).abs() < 0.02, "{short}");
        assert!((short + long - 1.0).abs() < 1e-12);
        // Past 21 only the long ones remain.
        assert!((0..1000).all(|_| (480..=511).contains(&m.sample_above(21, &mut rng).unwrap())));
    }

    #[test]
    fn with_no_data_every_distribution_is_the_prior_point_mass() {
        let p = OutputLengthPredictor::default();
        let lengths = ExpertOutputLengths::new(["a"]);
        let prior = PRIOR_OUTPUT_TOKENS as u32;
        let mut rng = SimRng::new(1);
        for model in [&p as &dyn OutputLengthModel, &lengths] {
            for e in [0, 5] {
                for q in [0.0, 0.1, 0.5, 0.9, 1.0] {
                    assert_eq!(model.quantile_tokens(e, Task::Chat, q), PRIOR_OUTPUT_TOKENS);
                }
                assert_eq!(model.sample_remaining(e, Task::Chat, 0, &mut rng), prior);
                assert_eq!(
                    model.sample_remaining(e, Task::Chat, 100, &mut rng),
                    prior - 100
                );
                assert!(model.sample_remaining(e, Task::Chat, prior, &mut rng) >= 1);
            }
        }
        assert_eq!(p.quantiles(Task::Math), [PRIOR_OUTPUT_TOKENS; 3]);
        assert_eq!(lengths.quantiles(0, Task::Math), [PRIOR_OUTPUT_TOKENS; 3]);
    }

    #[test]
    fn the_task_mixture_weighs_task_global_and_prior() {
        let mut p = OutputLengthPredictor::default();
        p.observe(Task::Math, 100);
        // Math: own 1/5, global 4/5 = (1/2 the completion, 1/2 the prior): 0.6 in 96..=103,
        // so mass (x - 95) / 8 * 0.6 at or below x there, and 0.4 at 256.
        assert_eq!(p.quantiles(Task::Math), [97.0, 102.0, 256.0]);
        // Chat (no own data): the global distribution, 0.5 in 96..=103 and 0.5 at 256.
        assert_eq!(p.quantiles(Task::Chat), [97.0, 103.0, 256.0]);
        for _ in 0..10_000 {
            p.observe(Task::Math, 100);
        }
        for q in p
            .quantiles(Task::Math)
            .into_iter()
            .chain(p.quantiles(Task::Chat))
        {
            assert!((96.0..=103.0).contains(&q), "{q}");
        }
        // Draws above 50 stay in the bin (the prior point keeps a weight of about 4e-7).
        let mut rng = SimRng::new(8);
        let draws: Vec<u32> = (0..10_000)
            .map(|_| p.sample_remaining(0, Task::Math, 50, &mut rng))
            .collect();
        assert!(share(&draws, |d| (46..=53).contains(&d)) > 0.999);
        assert!(draws.iter().all(|&d| (46..=53).contains(&d) || d == 206));
    }

    #[test]
    fn the_expert_mixture_weighs_own_and_pooled() {
        let mut lengths = ExpertOutputLengths::new(["a", "b"]);
        lengths.observe(0, Task::Math, 10);
        // Pooled Math: 0.2 own task + 0.4 global completion = 0.6 at 10; 0.4 at 256.
        // Expert a: 1/5 own (at 10) + 4/5 pooled: 0.2 + 0.8 * 0.6 = 0.68 at 10.
        let q = |e, q| lengths.quantile_tokens(e, Task::Math, q);
        assert_eq!((q(0, 0.0), q(0, 0.67), q(0, 0.69)), (10.0, 10.0, 256.0));
        assert_eq!((q(1, 0.59), q(1, 0.61)), (10.0, 256.0));
        assert_eq!(
            (q(7, 0.59), q(7, 0.61)),
            (10.0, 256.0),
            "out of range: pooled"
        );
        let mut rng = SimRng::new(4);
        let draws: Vec<u32> = (0..20_000)
            .map(|_| lengths.sample_remaining(0, Task::Math, 0, &mut rng))
            .collect();
        assert!((share(&draws, |d| d == 10) - 0.68).abs() < 0.02);
        assert!(draws.iter().all(|&d| d == 10 || d == 256));
    }

    #[test]
    fn memory_does_not_grow_with_observations() {
        let mut p = OutputLengthPredictor::default();
        let mut h = LengthHistogram::new();
        let (size_p, size_h) = (std::mem::size_of_val(&p), std::mem::size_of_val(&h));
        for i in 0..100_000u32 {
            p.observe(
                Task::ALL[i as usize % Task::COUNT],
                i.wrapping_mul(7919) % 80_000,
            );
            h.observe(i);
        }
        assert_eq!(
            (std::mem::size_of_val(&p), std::mem::size_of_val(&h)),
            (size_p, size_h)
        );
        // No heap: bins, sum and count, for each task and for all of them, and the cached
        // (p10, p50, p90) per task.
        assert_eq!(size_h, (BINS + 2) * 8);
        assert_eq!(
            size_p,
            (Task::COUNT + 1) * size_h + Task::COUNT * std::mem::size_of::<Option<[f64; 3]>>()
        );
        assert_eq!(h.n(), 100_000.0);
    }

    proptest! {
        #[test]
        fn quantiles_are_monotone_and_draws_at_least_one(
            obs in prop::collection::vec((0..Task::COUNT, 0u32..100_000), 0..100),
            mut qs in prop::collection::vec(0.0f64..=1.0, 1..8),
            generated in 0u32..70_000,
            seed in any::<u64>(),
        ) {
            let mut p = OutputLengthPredictor::default();
            let mut lengths = ExpertOutputLengths::new(["a", "b"]);
            for (i, &(t, tokens)) in obs.iter().enumerate() {
                p.observe(Task::ALL[t], tokens);
                lengths.observe(i % 2, Task::ALL[t], tokens);
            }
            qs.sort_by(f64::total_cmp);
            let task = Task::ALL[obs.first().map_or(0, |o| o.0)];
            let mut rng = SimRng::new(seed);
            for model in [&p as &dyn OutputLengthModel, &lengths] {
                for e in 0..3 {
                    let values: Vec<f64> =
                        qs.iter().map(|&q| model.quantile_tokens(e, task, q)).collect();
                    prop_assert!(values[0] >= 1.0);
                    prop_assert!(values.windows(2).all(|w| w[0] <= w[1]), "{values:?}");
                    for _ in 0..10 {
                        prop_assert!(model.sample_remaining(e, task, generated, &mut rng) >= 1);
                    }
                }
            }
        }

        #[test]
        fn means_keep_their_formula_and_match_the_distributions(
            obs in prop::collection::vec((0..3usize, 1u32..5000, 0..2usize), 0..100),
        ) {
            let mut p = OutputLengthPredictor::default();
            let mut lengths = ExpertOutputLengths::new(["a", "b", "c"]);
            let (mut sum, mut n) = ([0.0; Task::COUNT], [0.0; Task::COUNT]);
            let (mut all_sum, mut all_n) = (0.0, 0.0);
            let (mut own_sum, mut own_n) = ([[0.0; Task::COUNT]; 2], [[0.0; Task::COUNT]; 2]);
            for &(t, tokens, e) in &obs {
                let task = Task::ALL[t];
                p.observe(task, tokens);
                lengths.observe(e, task, tokens);
                sum[t] += f64::from(tokens);
                n[t] += 1.0;
                all_sum += f64::from(tokens);
                all_n += 1.0;
                own_sum[e][t] += f64::from(tokens);
                own_n[e][t] += 1.0;
            }
            let w = OUTPUT_PRIOR_WEIGHT;
            for task in Task::ALL.into_iter().take(4) {
                let t = task.index();
                let global = (all_sum + PRIOR_OUTPUT_TOKENS) / (all_n + 1.0);
                let pooled = (sum[t] + global * w) / (n[t] + w);
                prop_assert_eq!(p.predict(task), pooled.max(1.0));
                let mean = p.distribution(task).mean().unwrap();
                prop_assert!((mean - pooled).abs() <= 1e-9 * pooled);
                for e in 0..3 {
                    let (s, k) = if e < 2 { (own_sum[e][t], own_n[e][t]) } else { (0.0, 0.0) };
                    let own = (s + pooled.max(1.0) * w) / (k + w);
                    prop_assert_eq!(lengths.predict(e, task), own.max(1.0));
                    let mean = lengths.distribution(e, task).mean().unwrap();
                    prop_assert!((mean - own).abs() <= 1e-9 * own);
                }
            }
        }
    }
}
