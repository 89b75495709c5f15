//! The estimator behind [`LatencyCalibrator`](super::LatencyCalibrator): recursive least
//! squares in information form with exponential forgetting toward a prior, solved by Cholesky.

use super::bounded;

/// Recursive least squares in information form with exponential forgetting toward a prior
/// (see the module documentation).
#[derive(Debug, Clone)]
pub(super) struct Rls<const N: usize> {
    /// `R`: weighted sum of `z z'` plus the prior's weight (normalised units).
    pub(super) info: [[f64; N]; N],
    /// `r`: weighted sum of `z y` plus the prior's weight times the prior.
    pub(super) info_y: [f64; N],
    /// The prior (normalised coefficients).
    pub(super) prior: [f64; N],
    /// `R^-1 r`: the current estimate (unclamped).
    pub(super) estimate: [f64; N],
}

impl<const N: usize> Rls<N> {
    /// Starts at `prior` with the information `weight * shape` (`shape`: the information
    /// one pseudo-observation carries, e.g. the identity, or the mean `z z'` of the
    /// observations it stands for).
    pub(super) fn new(prior: [f64; N], weight: f64, shape: &[[f64; N]; N]) -> Self {
        let mut info = [[0.0; N]; N];
        for (row, shape_row) in info.iter_mut().zip(shape) {
            for (cell, s) in row.iter_mut().zip(shape_row) {
                *cell = weight * s;
            }
        }
        let info_y = mat_vec(&info, &prior);
        Self {
            info,
            info_y,
            prior,
            estimate: prior,
        }
    }

    /// Forgets everything learned and starts again from `estimate`, worth `weight`
    /// pseudo-observations of information `shape` each (a change of regime: the expert's
    /// speed changed); the prior the floor pulls toward stays.
    pub(super) fn restart_at(&mut self, estimate: [f64; N], weight: f64, shape: &[[f64; N]; N]) {
        *self = Self {
            prior: self.prior,
            ..Self::new(estimate, weight, shape)
        };
    }

    /// Learns `y ~ z . theta` after discounting everything learned so far by `lambda`, with
    /// the prior's weight kept at `floor` at least; returns `false` (and changes nothing) if
    /// the result would not be finite.
    pub(super) fn update(&mut self, z: &[f64; N], y: f64, lambda: f64, floor: f64) -> bool {
        let mut info = self.info;
        let mut info_y = self.info_y;
        let keep = (1.0 - lambda) * floor;
        for i in 0..N {
            for j in 0..N {
                info[i][j] = lambda * info[i][j] + z[i] * z[j];
            }
            info[i][i] += keep;
            info_y[i] = lambda * info_y[i] + z[i] * y + keep * self.prior[i];
        }
        match solve_spd(&info, &info_y) {
            Some(estimate) => {
                self.info = info;
                self.info_y = info_y;
                self.estimate = estimate;
                true
            }
            None => false,
        }
    }
}

impl Rls<2> {
    /// The minimiser of the fit's objective `theta' R theta - 2 r' theta` within the box
    /// `bounds` (per coefficient, `lo <= hi`): the estimate if it is inside; otherwise the
    /// best of the four edges, each minimised exactly (one coefficient held at its bound, the
    /// other refitted given it and clamped). A convex quadratic's minimum over a box that
    /// does not hold the unconstrained one lies on its boundary, so this is exact.
    pub(super) fn box_optimum(&self, bounds: &[(f64, f64); 2]) -> [f64; 2] {
        let inside = |x: &[f64; 2]| {
            x.iter()
                .zip(bounds)
                .all(|(v, (lo, hi))| (lo..=hi).contains(&v))
        };
        if inside(&self.estimate) {
            return self.estimate;
        }
        let (r, ry) = (&self.info, &self.info_y);
        let objective = |x: &[f64; 2]| {
            let quadratic =
                r[0][0] * x[0] * x[0] + 2.0 * r[0][1] * x[0] * x[1] + r[1][1] * x[1] * x[1];
            quadratic - 2.0 * (ry[0] * x[0] + ry[1] * x[1])
        };
        let mut best = None::<([f64; 2], f64)>;
        for (held, free) in [(0, 1), (1, 0)] {
            for bound in [bounds[held].0, bounds[held].1] {
                let mut x = [0.0; 2];
                x[held] = bound;
                // R is positive definite, so its diagonal is positive.
                let refit = (ry[free] - r[free][held] * bound) / r[free][free];
                x[free] = bounded(refit, bounds[free], bounds[free].0);
                let j = objective(&x);
                if best.is_none_or(|(_, b)| j < b) {
                    best = Some((x, j));
                }
            }
        }
        // Unreachable fallback (four candidates always exist): the clamped estimate.
        best.map_or_else(
            || [0, 1].map(|i| bounded(self.estimate[i], bounds[i], self.prior[i])),
            |(x, _)| x,
        )
    }
}

/// Solves `a x = b` for a symmetric positive definite `a` (Cholesky); `None` if `a` is not
/// numerically positive definite or anything is not finite.
#[allow(clippy::needless_range_loop)] // the textbook index form reads best here
fn solve_spd<const N: usize>(a: &[[f64; N]; N], b: &[f64; N]) -> Option<[f64; N]> {
    let mut l = [[0.0; N]; N];
    for i in 0..N {
        for j in 0..=i {
            let mut s = a[i][j];
            for k in 0..j {
                s -= l[i][k] * l[j][k];
            }
            if i == j {
                if !(s.is_finite() && s > 0.0) {
                    return None;
                }
                l[i][i] = s.sqrt();
            } else {
                l[i][j] = s / l[j][j];
            }
        }
    }
    let mut y = [0.0; N];
    for i in 0..N {
        let mut s = b[i];
        for k in 0..i {
            s -= l[i][k] * y[k];
        }
        y[i] = s / l[i][i];
    }
    let mut x = [0.0; N];
    for i in (0..N).rev() {
        let mut s = y[i];
        for k in i + 1..N {
            s -= l[k][i] * x[k];
        }
        x[i] = s / l[i][i];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}

/// `m x`.
fn mat_vec<const N: usize>(m: &[[f64; N]; N], x: &[f64; N]) -> [f64; N] {
    let mut out = [0.0; N];
    for (o, row) in out.iter_mut().zip(m) {
        *o = row.iter().zip(x).map(|(a, b)| a * b).sum();
    }
    out
}
