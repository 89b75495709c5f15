//! Experts: the static profile of one LLM server and its latency model.

use serde::{Deserialize, Serialize};

/// The latency model of one expert (DESIGN §1, hardware ANALYSIS §9).
///
/// - prefill of a `p`-token prompt takes `prefill_overhead_s + p / prefill_tok_s` seconds (one
///   engine iteration: prompts prefilled together pay the fixed part once);
/// - one decode step over `b` concurrent sequences holding `C` context tokens in total takes
///   `decode_t0_s + decode_d_s_per_seq * (b - 1) + decode_e_s_per_ctx_token * C` seconds.
///
/// The paper's constants map as `k1 = 1 / prefill_tok_s` and `k2 = decode_e_s_per_ctx_token`
/// (with `decode_d_s_per_seq = 0`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyModel {
    /// Prompt tokens processed per second.
    pub prefill_tok_s: f64,
    /// Fixed part of one prefill iteration, seconds (scheduling, sampling the first token,
    /// the chat template's work). 0 unless measured: catalogues built from published
    /// throughput figures have no source for it.
    #[serde(default)]
    pub prefill_overhead_s: f64,
    /// Decode step time of one sequence with an empty context, seconds.
    pub decode_t0_s: f64,
    /// Added step time per extra concurrent sequence, seconds.
    pub decode_d_s_per_seq: f64,
    /// Added step time per context token held by the batch, seconds.
    pub decode_e_s_per_ctx_token: f64,
}

impl LatencyModel {
    /// The paper's model: prefill `k1` s/token, interference `k2` s per context token per step.
    pub fn paper(k1: f64, k2: f64, t0: f64) -> Self {
        Self {
            prefill_tok_s: 1.0 / k1,
            prefill_overhead_s: 0.0,
            decode_t0_s: t0,
            decode_d_s_per_seq: 0.0,
            decode_e_s_per_ctx_token: k2,
        }
    }

    /// Seconds of one prefill iteration over `prompt_tokens` (all prompts admitted together):
    /// `prefill_overhead_s + prompt_tokens / prefill_tok_s`.
    pub fn prefill_s(&self, prompt_tokens: f64) -> f64 {
        self.prefill_overhead_s + self.prefill_tokens_s(prompt_tokens)
    }

    /// The per-token part of a prefill: `prompt_tokens / prefill_tok_s` (what a prompt adds to
    /// an iteration that pays the fixed part anyway).
    pub fn prefill_tokens_s(&self, prompt_tokens: f64) -> f64 {
        prompt_tokens / self.prefill_tok_s
    }

    /// Seconds of one decode step over `batch` sequences holding `context_tokens` in total.
    pub fn decode_step_s(&self, batch: f64, context_tokens: f64) -> f64 {
        self.decode_t0_s
            + self.decode_d_s_per_seq * (batch - 1.0).max(0.0)
            + self.decode_e_s_per_ctx_token * context_tokens
    }

    /// This model on hardware `factor` times slower (a throttled board, a GPU shared with
    /// another job): every prefill and decode duration `factor` times longer. A factor that is
    /// not a positive finite number leaves the model as it is.
    pub fn slowed(&self, factor: f64) -> Self {
        if !(factor.is_finite() && factor > 0.0) {
            return *self;
        }
        Self {
            prefill_tok_s: self.prefill_tok_s / factor,
            prefill_overhead_s: self.prefill_overhead_s * factor,
            decode_t0_s: self.decode_t0_s * factor,
            decode_d_s_per_seq: self.decode_d_s_per_seq * factor,
            decode_e_s_per_ctx_token: self.decode_e_s_per_ctx_token * factor,
        }
    }
}

/// Everything static about one expert: which model it serves (its column in the quality
/// table), how fast it is and how much it can hold at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertProfile {
    /// Unique name of the expert in its catalogue.
    pub name: String,
    /// The model it serves: a model column of the quality table (e.g. `qwen25_7b`).
    pub model: String,
    /// Hardware and engine, for people.
    #[serde(default)]
    pub hardware: String,
    /// Where the numbers come from (rows of `data/hardware/edge-llm-perf.csv`, papers).
    #[serde(default)]
    pub source: String,
    /// Most sequences the engine runs at once (vLLM `max_num_seqs`, llama.cpp `-np`).
    pub max_slots: u32,
    /// KV-cache capacity in tokens, shared by every running sequence (prompt + output).
    pub kv_tokens: u64,
    /// Latency model coefficients.
    pub latency: LatencyModel,
}

/// Why an expert profile cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("expert `{expert}`: {field} {problem}")]
pub struct InvalidProfile {
    /// The expert's name.
    pub expert: String,
    /// The offending field.
    pub field: &'static str,
    /// What is wrong with it.
    pub problem: String,
}

impl ExpertProfile {
    /// Checks that every coefficient is usable: positive speeds and capacities, non-negative
    /// interference terms, all finite.
    pub fn validate(&self) -> Result<(), InvalidProfile> {
        let err = |field: &'static str, problem: String| InvalidProfile {
            expert: self.name.clone(),
            field,
            problem,
        };
        if self.name.trim().is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        if self.model.trim().is_empty() {
            return Err(err(
                "model",
                "must name a quality-table model column".into(),
            ));
        }
        let l = &self.latency;
        let positive = [
            ("latency.prefill_tok_s", l.prefill_tok_s),
            ("latency.decode_t0_s", l.decode_t0_s),
        ];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(err(field, format!("must be positive and finite, got {v}")));
            }
        }
        let non_negative = [
            ("latency.prefill_overhead_s", l.prefill_overhead_s),
            ("latency.decode_d_s_per_seq", l.decode_d_s_per_seq),
            (
                "latency.decode_e_s_per_ctx_token",
                l.decode_e_s_per_ctx_token,
            ),
        ];
        for (field, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(err(
                    field,
                    format!("must be non-negative and finite, got {v}"),
                ));
            }
        }
        if self.max_slots == 0 {
            return Err(err("max_slots", "must be at least 1".into()));
        }
        if self.kv_tokens < 2 {
            return Err(err("kv_tokens", "must be at least 2".into()));
        }
        Ok(())
    }

    /// Whether a prompt of this length can ever be admitted (it must leave room for at least
    /// one output token in the KV cache).
    pub fn fits_prompt(&self, prompt_tokens: u32) -> bool {
        u64::from(prompt_tokens) < self.kv_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slowed_model_takes_factor_times_longer_for_every_prefill_and_step() {
        let m = LatencyModel {
            prefill_tok_s: 2000.0,
            prefill_overhead_s: 0.01,
            decode_t0_s: 0.02,
            decode_d_s_per_seq: 0.001,
            decode_e_s_per_ctx_token: 1e-6,
        };
        let slow = m.slowed(5.0);
        for p in [1.0, 300.0, 4000.0] {
            assert!((slow.prefill_s(p) - 5.0 * m.prefill_s(p)).abs() < 1e-12);
        }
        for (b, c) in [(1.0, 0.0), (4.0, 2000.0), (32.0, 50_000.0)] {
            assert!((slow.decode_step_s(b, c) - 5.0 * m.decode_step_s(b, c)).abs() < 1e-12);
        }
        assert_eq!(m.slowed(f64::NAN), m);
        assert_eq!(m.slowed(0.0), m);
    }

    pub(crate) fn profile() -> ExpertProfile {
        ExpertProfile {
            name: "x".into(),
            model: "qwen25_7b".into(),
            hardware: String::new(),
            source: String::new(),
            max_slots: 4,
            kv_tokens: 1000,
            latency: LatencyModel {
                prefill_tok_s: 1000.0,
                prefill_overhead_s: 0.0,
                decode_t0_s: 0.02,
                decode_d_s_per_seq: 0.001,
                decode_e_s_per_ctx_token: 1e-6,
            },
        }
    }

    #[test]
    fn step_and_prefill_follow_the_formula() {
        let l = profile().latency;
        assert!((l.prefill_s(500.0) - 0.5).abs() < 1e-12);
        // t0 + d*(3-1) + e*2000
        assert!((l.decode_step_s(3.0, 2000.0) - (0.02 + 0.002 + 0.002)).abs() < 1e-12);
        // A batch of one pays no per-sequence term.
        assert!((l.decode_step_s(1.0, 0.0) - 0.02).abs() < 1e-12);
    }

    #[test]
    fn paper_constants_map_to_the_model() {
        let l = LatencyModel::paper(7.2e-5, 2.5e-5, 0.0124);
        assert!((l.prefill_s(100.0) - 7.2e-3).abs() < 1e-12);
        assert_eq!(l.decode_e_s_per_ctx_token, 2.5e-5);
    }

    #[test]
    fn validation_names_the_field() {
        assert!(profile().validate().is_ok());
        let mut p = profile();
        p.latency.prefill_tok_s = 0.0;
        let e = p.validate().unwrap_err();
        assert_eq!(e.field, "latency.prefill_tok_s");
        let mut p = profile();
        p.latency.decode_e_s_per_ctx_token = f64::NAN;
        assert_eq!(
            p.validate().unwrap_err().field,
            "latency.decode_e_s_per_ctx_token"
        );
        let mut p = profile();
        p.max_slots = 0;
        assert_eq!(p.validate().unwrap_err().field, "max_slots");
        assert!(profile().fits_prompt(999));
        assert!(!profile().fits_prompt(1000));
    }
}
