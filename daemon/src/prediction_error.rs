//! Live prediction error: for every completed request, the router's predicted time to first
//! token and per-token latency at decision time beside the measured ones, per expert, as
//! Prometheus histograms of the relative error and a gauge of the mean absolute percentage
//! error over the last [`WINDOW`] requests.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::Mutex;

/// Requests the mean absolute percentage error is taken over, per expert and quantity.
pub const WINDOW: usize = 256;

/// Upper bounds of the relative-error histogram: (predicted - measured) / measured.
pub const RELATIVE_ERROR_BUCKETS: [f64; 11] =
    [-0.75, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0];

/// What the router predicted for a request at its decision, on the expert it chose.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictedLatency {
    /// Time to first token from the decision: wait, its prefill and the prefills it shares.
    pub ttft_s: f64,
    /// Per-token latency over its predicted output length.
    pub per_token_s: f64,
}

/// The two quantities compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Quantity {
    /// Time to first token.
    Ttft,
    /// Per-token latency (arrival to last token, over the output tokens).
    PerToken,
}

impl Quantity {
    fn as_str(self) -> &'static str {
        match self {
            Quantity::Ttft => "ttft",
            Quantity::PerToken => "per_token",
        }
    }
}

/// `(predicted - measured) / measured`, or `None` when either is not a positive finite time.
pub fn relative_error(predicted: f64, measured: f64) -> Option<f64> {
    (predicted.is_finite() && measured.is_finite() && predicted >= 0.0 && measured > 0.0)
        .then(|| (predicted - measured) / measured)
}

#[derive(Debug, Default)]
struct Book {
    counts: [u64; RELATIVE_ERROR_BUCKETS.len() + 1],
    sum: f64,
    window: VecDeque<f64>,
}

impl Book {
    fn observe(&mut self, error: f64) {
        let i = RELATIVE_ERROR_BUCKETS
            .iter()
            .position(|&b| error <= b)
            .unwrap_or(RELATIVE_ERROR_BUCKETS.len());
        self.counts[i] += 1;
        self.sum += error;
        if self.window.len() == WINDOW {
            self.window.pop_front();
        }
        self.window.push_back(error.abs());
    }

    fn mape(&self) -> Option<f64> {
        (!self.window.is_empty())
            .then(|| self.window.iter().sum::<f64>() / self.window.len() as f64)
    }
}

/// Every expert's prediction errors (a short lock per completed request and per scrape).
#[derive(Debug, Default)]
pub struct PredictionErrors {
    books: Mutex<BTreeMap<(String, Quantity), Book>>,
}

impl PredictionErrors {
    /// Records one completed request on `expert`: its predictions against what was measured.
    /// Quantities that cannot be compared (no first token, a zero time) are skipped.
    pub fn observe(
        &self,
        expert: &str,
        predicted: PredictedLatency,
        measured_ttft_s: Option<f64>,
        measured_per_token_s: f64,
    ) {
        let Ok(mut books) = self.books.lock() else {
            return;
        };
        let pairs = [
            (
                Quantity::Ttft,
                measured_ttft_s.and_then(|m| relative_error(predicted.ttft_s, m)),
            ),
            (
                Quantity::PerToken,
                relative_error(predicted.per_token_s, measured_per_token_s),
            ),
        ];
        for (quantity, error) in pairs {
            if let Some(error) = error {
                books
                    .entry((expert.to_owned(), quantity))
                    .or_default()
                    .observe(error);
            }
        }
    }

    /// The mean absolute percentage error (a fraction) of `expert`'s last [`WINDOW`] requests.
    pub fn mape(&self, expert: &str, quantity: Quantity) -> Option<f64> {
        self.books
            .lock()
            .ok()?
            .get(&(expert.to_owned(), quantity))
            .and_then(Book::mape)
    }

    /// The Prometheus text of every expert's errors (`escape` quotes label values).
    pub fn render(&self, escape: impl Fn(&str) -> String) -> String {
        let mut out = String::new();
        let Ok(books) = self.books.lock() else {
            return out;
        };
        if books.is_empty() {
            return out;
        }
        out.push_str("# HELP qosroute_prediction_relative_error Relative error (predicted - measured) / measured of the router's prediction at decision time, per completed request.\n# TYPE qosroute_prediction_relative_error histogram\n");
        for ((expert, quantity), book) in books.iter() {
            let labels = format!(
                "expert=\"{}\",quantity=\"{}\"",
                escape(expert),
                quantity.as_str()
            );
            let mut cumulative = 0;
            for (i, bound) in RELATIVE_ERROR_BUCKETS.iter().enumerate() {
                cumulative += book.counts[i];
                let _ = writeln!(
                    out,
                    "qosroute_prediction_relative_error_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
                );
            }
            cumulative += book.counts[RELATIVE_ERROR_BUCKETS.len()];
            let _ = writeln!(
                out,
                "qosroute_prediction_relative_error_bucket{{{labels},le=\"+Inf\"}} {cumulative}"
            );
            let _ = writeln!(
                out,
                "qosroute_prediction_relative_error_sum{{{labels}}} {}",
                book.sum
            );
            let _ = writeln!(
                out,
                "qosroute_prediction_relative_error_count{{{labels}}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP qosroute_prediction_mape Mean absolute percentage error (a fraction) of the router's predictions over the last {WINDOW} completed requests.\n# TYPE qosroute_prediction_mape gauge"
        );
        for ((expert, quantity), book) in books.iter() {
            if let Some(m) = book.mape() {
                let _ = writeln!(
                    out,
                    "qosroute_prediction_mape{{expert=\"{}\",quantity=\"{}\"}} {m}",
                    escape(expert),
                    quantity.as_str()
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn relative_errors_are_signed_and_need_a_positive_measurement() {
        assert_eq!(relative_error(1.5, 1.0), Some(0.5));
        assert_eq!(relative_error(0.5, 2.0), Some(-0.75));
        assert_eq!(relative_error(1.0, 0.0), None);
        assert_eq!(relative_error(f64::NAN, 1.0), None);
        assert_eq!(relative_error(-1.0, 1.0), None);
    }

    #[test]
    fn histograms_and_the_windowed_mape_by_hand() {
        let errors = PredictionErrors::default();
        // Times exact in binary, so the errors are exact too.
        let p = PredictedLatency {
            ttft_s: 0.25,
            per_token_s: 0.625,
        };
        // TTFT errors +100 % and -50 %; per-token errors +25 % and 0 %.
        errors.observe("a", p, Some(0.125), 0.5);
        errors.observe("a", p, Some(0.5), 0.625);
        // No first token: only the per-token latency is compared (-50 %).
        errors.observe("b", p, None, 1.25);
        assert_eq!(errors.mape("a", Quantity::Ttft), Some(0.75));
        assert_eq!(errors.mape("a", Quantity::PerToken), Some(0.125));
        assert_eq!(errors.mape("b", Quantity::Ttft), None);
        assert_eq!(errors.mape("b", Quantity::PerToken), Some(0.5));
        let text = errors.render(str::to_owned);
        // -0.5 falls in le="-0.5"; +1.0 in le="1": cumulative counts 1 and 2.
        assert!(text.contains(
            "qosroute_prediction_relative_error_bucket{expert=\"a\",quantity=\"ttft\",le=\"-0.5\"} 1\n"
        ));
        assert!(text.contains(
            "qosroute_prediction_relative_error_bucket{expert=\"a\",quantity=\"ttft\",le=\"1\"} 2\n"
        ));
        assert!(text.contains(
            "qosroute_prediction_relative_error_count{expert=\"a\",quantity=\"ttft\"} 2\n"
        ));
        assert!(text.contains(
            "qosroute_prediction_relative_error_sum{expert=\"a\",quantity=\"ttft\"} 0.5\n"
        ));
        assert!(
            text.contains("qosroute_prediction_mape{expert=\"b\",quantity=\"per_token\"} 0.5\n")
        );
    }

    #[test]
    fn the_mape_forgets_beyond_its_window() {
        let errors = PredictionErrors::default();
        let p = PredictedLatency {
            ttft_s: 1.0,
            per_token_s: 1.0,
        };
        // One error of 300 %, then WINDOW errors of 0 %: the window holds only the zeros.
        errors.observe("a", p, Some(0.25), 0.25);
        for _ in 0..WINDOW {
            errors.observe("a", p, Some(1.0), 1.0);
        }
        assert_eq!(errors.mape("a", Quantity::Ttft), Some(0.0));
    }
}
