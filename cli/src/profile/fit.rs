//! The fitting math of `qosroute profile`: pure functions of the measurements.

use serde::Serialize;

/// Mean absolute percentage error of `pred` against `meas` (NaN when empty).
pub(crate) fn mape(pairs: impl IntoIterator<Item = (f64, f64)>) -> f64 {
    let (mut sum, mut n) = (0.0, 0usize);
    for (pred, meas) in pairs {
        if meas.abs() > 0.0 && pred.is_finite() && meas.is_finite() {
            sum += ((pred - meas) / meas).abs();
            n += 1;
        }
    }
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

pub(crate) fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Ordinary least squares `y = a + b x`; `None` with fewer than two distinct x.
pub(crate) fn ols(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    if sxx <= f64::EPSILON * n * mx.abs().max(1.0) {
        return None;
    }
    let b = sxy / sxx;
    Some((my - b * mx, b))
}

/// Least absolute deviations `y = a + b x` (the median line): the line through two of
/// the points with distinct x that minimises the sum of absolute residuals (an L1 line fit
/// always has an optimum through two points, so trying every pair is exact; O(n^3), fine
/// for the hundreds of points a profile run makes). `None` with fewer than two distinct x.
/// Unlike least squares, one stalled measurement among the repetitions does not move it.
pub(crate) fn lad(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let mut best: Option<(f64, f64, f64)> = None;
    for (i, &(x1, y1)) in points.iter().enumerate() {
        for &(x2, y2) in &points[i + 1..] {
            if x1 == x2 {
                continue;
            }
            let b = (y2 - y1) / (x2 - x1);
            let a = y1 - b * x1;
            let cost: f64 = points.iter().map(|&(x, y)| (y - a - b * x).abs()).sum();
            if cost.is_finite() && best.is_none_or(|(_, _, c)| cost < c) {
                best = Some((a, b, cost));
            }
        }
    }
    best.map(|(a, b, _)| (a, b))
}

/// The prefill fit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct PrefillFit {
    /// The fit written, `TTFT = overhead_s + p / prefill_tok_s` (the model's form): the
    /// affine fit, or overhead 0 and the proportional fit when the affine one is unusable
    /// (`fallback` says why).
    pub(crate) overhead_s: f64,
    pub(crate) prefill_tok_s: f64,
    /// MAPE of the fit written.
    pub(crate) mape: f64,
    /// Why the affine fit was not written (`None`: it was).
    pub(crate) fallback: Option<&'static str>,
    /// The proportional fit `TTFT = p / r`: all the profiled prompt tokens over all their
    /// TTFTs, so its total prefill time of the profiled prompts is the measured one (what a
    /// queue of such prompts sees). For comparison, and the fallback.
    pub(crate) proportional_tok_s: f64,
    pub(crate) proportional_mape: f64,
    /// The same form fitted to minimise the squared relative error instead, for the record
    /// (it follows the short prompts, whose TTFT carries the fixed costs).
    pub(crate) relative_tok_s: f64,
    pub(crate) relative_mape: f64,
    /// The affine fit `TTFT = a + p / r` (least absolute deviations) as fitted, usable or
    /// not.
    pub(crate) affine_intercept_s: f64,
    pub(crate) affine_tok_s: f64,
    pub(crate) affine_mape: f64,
    pub(crate) points: usize,
}

impl PrefillFit {
    /// The prefill written, as the stalls it puts into other answers' decoding.
    pub(crate) fn stall_model(&self) -> PrefillStall {
        PrefillStall {
            overhead_s: self.overhead_s,
            tok_s: self.prefill_tok_s,
        }
    }
}

/// Fits `ttft = a + p / r` to `(p, ttft)` points (least absolute deviations: the TTFT a
/// typical request sees, which one stalled request does not move; least squares on the
/// emulator's 8 points, of which one was 92 ms late, gave `a` = 22 ms instead of 2.5 ms
/// and a rate 20 % high) and writes it unless `a < 0` or the rate is not positive and finite
/// (then overhead 0 and the proportional fit `r = sum p / sum ttft`); also the
/// relative-error fit through the origin (minimising `sum ((p k - y) / y)^2`), for the
/// record.
pub(crate) fn prefill(points: &[(f64, f64)]) -> Option<PrefillFit> {
    let usable: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|&(p, y)| p > 0.0 && y > 0.0 && p.is_finite() && y.is_finite())
        .collect();
    if usable.is_empty() {
        return None;
    }
    let num: f64 = usable.iter().map(|&(p, y)| p / y).sum();
    let den: f64 = usable.iter().map(|&(p, y)| (p / y).powi(2)).sum();
    let k_relative = num / den;
    let k = usable.iter().map(|p| p.1).sum::<f64>() / usable.iter().map(|p| p.0).sum::<f64>();
    if !(k.is_finite() && k > 0.0 && k_relative.is_finite() && k_relative > 0.0) {
        return None;
    }
    let mape_k = mape(usable.iter().map(|&(p, y)| (p * k, y)));
    let affine = lad(&usable);
    let (a, b) = affine.unwrap_or((0.0, k));
    let affine_mape = mape(usable.iter().map(|&(p, y)| (a + b * p, y)));
    let affine_tok_s = if b > 0.0 { 1.0 / b } else { f64::INFINITY };
    let fallback = if affine.is_none() {
        Some("one prompt length only")
    } else if !(a.is_finite() && affine_tok_s.is_finite() && affine_tok_s > 0.0) {
        Some("its rate is not positive and finite")
    } else if a < 0.0 {
        Some("its overhead is negative")
    } else {
        None
    };
    let (overhead_s, prefill_tok_s, written_mape) = match fallback {
        None => (a, affine_tok_s, affine_mape),
        Some(_) => (0.0, 1.0 / k, mape_k),
    };
    Some(PrefillFit {
        overhead_s,
        prefill_tok_s,
        mape: written_mape,
        fallback,
        proportional_tok_s: 1.0 / k,
        proportional_mape: mape_k,
        relative_tok_s: 1.0 / k_relative,
        relative_mape: mape(usable.iter().map(|&(p, y)| (p * k_relative, y))),
        affine_intercept_s: a,
        affine_tok_s,
        affine_mape,
        points: usable.len(),
    })
}

/// The decode fit at concurrency 1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct DecodeFit {
    pub(crate) t0_s: f64,
    pub(crate) e_s_per_ctx_token: f64,
    pub(crate) mape: f64,
    /// The least-squares slope was negative and was replaced by 0.
    pub(crate) e_clamped: bool,
    pub(crate) points: usize,
}

/// Fits `itl = t0 + e * context` to `(context, itl)` points.
pub(crate) fn decode(points: &[(f64, f64)]) -> Option<DecodeFit> {
    let usable: Vec<(f64, f64)> = points
        .iter()
        .copied()
        .filter(|&(c, y)| c >= 0.0 && y > 0.0 && c.is_finite() && y.is_finite())
        .collect();
    if usable.is_empty() {
        return None;
    }
    let mean_y = usable.iter().map(|p| p.1).sum::<f64>() / usable.len() as f64;
    let (t0, e, clamped) = match ols(&usable) {
        Some((a, b)) if b >= 0.0 && a > 0.0 => (a, b, false),
        Some((_, b)) if b >= 0.0 => {
            // A non-positive intercept: keep the slope through the origin, t0 tiny.
            let sxy: f64 = usable.iter().map(|p| p.0 * p.1).sum();
            let sxx: f64 = usable.iter().map(|p| p.0 * p.0).sum();
            let e = if sxx > 0.0 { sxy / sxx } else { 0.0 };
            (mean_y * 1e-3, e, false)
        }
        Some(_) => (mean_y, 0.0, true),
        None => (mean_y, 0.0, false),
    };
    let m = mape(usable.iter().map(|&(c, y)| (t0 + e * c, y)));
    Some(DecodeFit {
        t0_s: t0,
        e_s_per_ctx_token: e,
        mape: m,
        e_clamped: clamped,
        points: usable.len(),
    })
}

/// One answer's decode: from its first to its last token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DecodeInterval {
    pub(crate) first_s: f64,
    pub(crate) last_s: f64,
    pub(crate) prompt_tokens: f64,
    pub(crate) output_tokens: f64,
    /// Mean inter-token time over the interval.
    pub(crate) inter_token_s: f64,
}

/// Most intervals open at the same moment (an interval is open in `[first, last)`).
pub(crate) fn peak_overlap(intervals: &[DecodeInterval]) -> u32 {
    let mut events: Vec<(f64, i32)> = Vec::with_capacity(intervals.len() * 2);
    for i in intervals {
        events.push((i.first_s, 1));
        events.push((i.last_s, -1));
    }
    // Closings before openings at the same instant.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut open, mut peak) = (0i32, 0i32);
    for (_, delta) in events {
        open += delta;
        peak = peak.max(open);
    }
    peak.max(0) as u32
}

/// One answer of a concurrency batch as a data point of the `d` fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BatchPoint {
    /// Time-averaged number of answers decoding together (itself included).
    pub(crate) batch: f64,
    /// Time-averaged context tokens of those answers.
    pub(crate) context: f64,
    /// Mean inter-token time with the prefill stalls of answers admitted meanwhile taken out.
    pub(crate) inter_token_s: f64,
}

/// How long a prefill iteration stalls the answers decoding: `overhead_s` once per
/// iteration plus `p / tok_s` per prompt in it (the simulator's model).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PrefillStall {
    pub(crate) overhead_s: f64,
    pub(crate) tok_s: f64,
}

/// Samples each interval at 64 points: mean batch and context around it, and its
/// inter-token time without the prefills of answers whose first token came inside it.
/// First tokens less than `same_iteration_s` apart count as one prefill iteration (they
/// pay `prefill.overhead_s` once): two iterations are at least a decode step apart.
pub(crate) fn batch_points(
    intervals: &[DecodeInterval],
    prefill: PrefillStall,
    same_iteration_s: f64,
) -> Vec<BatchPoint> {
    const SAMPLES: usize = 64;
    intervals
        .iter()
        .filter_map(|me| {
            let span = me.last_s - me.first_s;
            if span <= 0.0 || me.output_tokens < 2.0 {
                return None;
            }
            let (mut b_sum, mut c_sum) = (0.0, 0.0);
            for k in 0..SAMPLES {
                let t = me.first_s + span * (k as f64 + 0.5) / SAMPLES as f64;
                for other in intervals {
                    if other.first_s <= t && t < other.last_s {
                        let progress = (t - other.first_s) / (other.last_s - other.first_s);
                        b_sum += 1.0;
                        c_sum += other.prompt_tokens + other.output_tokens * progress;
                    }
                }
            }
            let mut admitted: Vec<&DecodeInterval> = intervals
                .iter()
                .filter(|o| o.first_s > me.first_s && o.first_s < me.last_s)
                .collect();
            admitted.sort_by(|a, b| a.first_s.total_cmp(&b.first_s));
            let iterations = admitted
                .windows(2)
                .filter(|w| w[1].first_s - w[0].first_s >= same_iteration_s)
                .count()
                + usize::from(!admitted.is_empty());
            let stalls = prefill.overhead_s * iterations as f64
                + admitted
                    .iter()
                    .map(|o| o.prompt_tokens / prefill.tok_s)
                    .sum::<f64>();
            let steps = me.output_tokens - 1.0;
            let clean = ((span - stalls) / steps).max(span / steps * 0.05);
            Some(BatchPoint {
                batch: b_sum / SAMPLES as f64,
                context: c_sum / SAMPLES as f64,
                inter_token_s: clean,
            })
        })
        .collect()
}

/// The per-sequence term.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct ConcurrencyFit {
    pub(crate) d_s_per_seq: f64,
    /// MAPE of the full step model on the points with batches above 1.05.
    pub(crate) mape: f64,
    pub(crate) points: usize,
}

/// Fits `d` in `itl - t0 - e C = d (b - 1)` (least squares through the origin) over the
/// points whose mean batch is above 1.05; 0 when there are none or the fit is negative.
pub(crate) fn concurrency(points: &[BatchPoint], t0: f64, e: f64) -> ConcurrencyFit {
    let usable: Vec<&BatchPoint> = points
        .iter()
        .filter(|p| p.batch > 1.05 && p.inter_token_s.is_finite())
        .collect();
    if usable.is_empty() {
        return ConcurrencyFit {
            d_s_per_seq: 0.0,
            mape: f64::NAN,
            points: 0,
        };
    }
    let num: f64 = usable
        .iter()
        .map(|p| (p.batch - 1.0) * (p.inter_token_s - t0 - e * p.context))
        .sum();
    let den: f64 = usable.iter().map(|p| (p.batch - 1.0).powi(2)).sum();
    let d = if den > 0.0 { (num / den).max(0.0) } else { 0.0 };
    let m = mape(
        usable
            .iter()
            .map(|p| (t0 + d * (p.batch - 1.0) + e * p.context, p.inter_token_s)),
    );
    ConcurrencyFit {
        d_s_per_seq: d,
        mape: m,
        points: usable.len(),
    }
}
