//! The learned router run from ONNX by tract (`onnx` feature).
//!
//! The model reads the tensors of [`encode_state`](crate::encode_state) with batch 1 and
//! returns `logits [1, E + 1]` (last = reject). It is loaded, checked and decluttered once with
//! symbolic node counts; decisions then run on plans optimised for concrete sizes, which tract
//! runs 1.3-3x faster than the symbolic plan (measured, `policy-model/models/README.md`).
//!
//! Sizes are bucketed so few plans serve every graph: the expert count is exact (it is the
//! action space), the running and waiting node counts are padded up to the next bucket
//! (8, 16, 32, 64, ...: powers of two) with zero-feature nodes that
//! have no edge, which the network's masks make exactly inert. Plans are compiled on first use
//! (tens of ms) and kept in a small least-recently-used cache. If inference fails the policy
//! falls back to `qos-greedy` and counts the fallback.

use std::collections::HashMap;
use std::path::Path;

use tract_onnx::prelude::*;

use crate::baselines::QosGreedy;
use crate::encoder::{
    EXPERT_FEATURES, EncodedState, IN_FLIGHT_FEATURES, REQUEST_FEATURES, encode_state,
};
use crate::knowledge::Observed;
use crate::policy::{Decision, Policy};
use crate::request::ArrivingRequest;
use crate::state::ClusterState;

/// Concrete plans kept at once.
pub const MAX_CACHED_PLANS: usize = 16;

/// Why a model cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// tract rejected the model or failed to run it.
    #[error("onnx model: {0}")]
    Model(String),
    /// The model's output does not have the expected shape.
    #[error("onnx model: expected logits for {expected} actions, got {got}")]
    Shape {
        /// Experts + 1.
        expected: usize,
        /// Values returned.
        got: usize,
    },
}

fn model_error(e: impl std::fmt::Display) -> OnnxError {
    OnnxError::Model(format!("{e:#}"))
}

fn tensor(shape: &[usize], data: &[f32]) -> Result<Tensor, OnnxError> {
    Tensor::from_shape(shape, data).map_err(model_error)
}

/// The padded size of a node set of `n` nodes: the smallest power of two, at least 8, that
/// holds it. Every distinct size is a plan to compile (tens of milliseconds) and to keep
/// (about 2 MB), so buckets are coarse: the gateway sees a handful of sizes, all compiled at
/// load by [`OnnxPolicy::prepare`]. (Buckets at 1.5x steps made decisions at most ~20 % faster
/// but tripled the sizes seen, which overflowed the plan cache.)
pub fn node_bucket(n: usize) -> usize {
    n.max(8).next_power_of_two()
}

/// Graph sizes a plan is compiled for: experts (exact), running and waiting nodes (bucketed).
type PlanSize = (usize, usize, usize);

#[derive(Debug)]
struct SizedPlan {
    /// The plan, kept so it outlives its run state.
    _plan: std::sync::Arc<TypedSimplePlan>,
    /// One run state reused across decisions (no per-decision set-up).
    state: TypedSimpleState,
    last_used: u64,
}

/// The learned router.
#[derive(Debug)]
pub struct OnnxPolicy {
    name: String,
    /// The checked, decluttered model with symbolic node counts.
    model: TypedModel,
    plans: HashMap<PlanSize, SizedPlan>,
    plans_compiled: u64,
    decisions: u64,
    encoded: EncodedState,
    fallback: QosGreedy,
    fallbacks: u64,
}

/// Copies the `[rows, n]` matrix `src` into a zeroed `[rows, padded]` one.
fn pad_columns(src: &[f32], rows: usize, n: usize, padded: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * padded];
    if n > 0 {
        for (dst, row) in out.chunks_exact_mut(padded).zip(src.chunks_exact(n)) {
            dst[..n].copy_from_slice(row);
        }
    }
    out
}

/// `data` followed by zeros up to `len`.
fn pad_rows(data: &[f32], len: usize) -> Vec<f32> {
    let mut out = data.to_vec();
    out.resize(len, 0.0);
    out
}

impl OnnxPolicy {
    /// Loads and checks a model from ONNX bytes; `name` is how the policy reports itself.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self, OnnxError> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .map_err(model_error)?
            .into_typed()
            .map_err(model_error)?
            .into_decluttered()
            .map_err(model_error)?;
        let mut policy = Self {
            name: name.to_owned(),
            model,
            plans: HashMap::new(),
            plans_compiled: 0,
            decisions: 0,
            encoded: EncodedState::default(),
            fallback: QosGreedy::default(),
            fallbacks: 0,
        };
        // Compile one small plan now, so a model tract cannot optimise fails at load.
        policy.plan_for((3, node_bucket(1), node_bucket(1)))?;
        Ok(policy)
    }

    /// Loads a model file; the policy is named `han:PATH`.
    pub fn load(path: &Path) -> Result<Self, OnnxError> {
        let bytes = std::fs::read(path).map_err(|source| OnnxError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&format!("han:{}", path.display()), &bytes)
    }

    /// Compiles ahead of time the plans that decisions over `experts` experts with up to
    /// `running` running nodes will most likely use (every running-node bucket up to
    /// `node_bucket(running)`, with the two smallest waiting buckets), so that decisions do
    /// not pay tens of milliseconds each the first time. At most [`MAX_CACHED_PLANS`] are
    /// compiled; returns how many were.
    pub fn prepare(&mut self, experts: usize, running: usize) -> Result<usize, OnnxError> {
        let top = node_bucket(running);
        let waiting = [node_bucket(0), node_bucket(node_bucket(0) + 1)];
        let mut sizes = Vec::new();
        for w in waiting {
            let mut r = node_bucket(0);
            while r <= top && sizes.len() < MAX_CACHED_PLANS {
                sizes.push((experts, r, w));
                r = node_bucket(r + 1);
            }
        }
        let before = self.plans_compiled;
        for size in sizes {
            self.plan_for(size)?;
        }
        Ok(usize::try_from(self.plans_compiled - before).unwrap_or(usize::MAX))
    }

    /// Decisions that fell back to `qos-greedy` because inference failed.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    /// Concrete plans compiled so far (each costs tens of milliseconds once).
    pub fn plans_compiled(&self) -> u64 {
        self.plans_compiled
    }

    /// The run state of the plan for `size`, compiling it (and evicting the least recently
    /// used plan when the cache is full) on first use.
    fn plan_for(&mut self, size: PlanSize) -> Result<&mut TypedSimpleState, OnnxError> {
        self.decisions += 1;
        let now = self.decisions;
        if !self.plans.contains_key(&size) {
            if self.plans.len() >= MAX_CACHED_PLANS {
                let oldest = self
                    .plans
                    .iter()
                    .min_by_key(|(_, p)| p.last_used)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    self.plans.remove(&k);
                }
            }
            let (e, r, w) = size;
            let mut values = HashMap::new();
            for (symbol, value) in [
                ("batch", 1),
                ("experts", e),
                ("running", r),
                ("waiting", w),
                ("actions", e + 1),
            ] {
                values.insert(self.model.symbols.sym(symbol), value.to_dim());
            }
            let plan = self
                .model
                .set_symbols(&values)
                .and_then(|m| m.into_optimized())
                .and_then(|m| m.into_runnable())
                .map_err(model_error)?;
            let state = plan.spawn().map_err(model_error)?;
            self.plans_compiled += 1;
            self.plans.insert(
                size,
                SizedPlan {
                    _plan: plan,
                    state,
                    last_used: now,
                },
            );
        }
        let sized = self
            .plans
            .get_mut(&size)
            .ok_or_else(|| OnnxError::Model("plan cache lost a plan".into()))?;
        sized.last_used = now;
        Ok(&mut sized.state)
    }

    /// Logits `[E + 1]` of an encoded state (batch 1).
    pub fn logits_of(&mut self, s: &EncodedState) -> Result<Vec<f32>, OnnxError> {
        let (e, r, w) = (s.experts, s.running, s.waiting);
        let (rb, wb) = (node_bucket(r), node_bucket(w));
        let inputs: TVec<TValue> = tvec![
            tensor(&[1, REQUEST_FEATURES], &s.request)?.into(),
            tensor(&[1, e, EXPERT_FEATURES], &s.expert)?.into(),
            tensor(
                &[1, rb, IN_FLIGHT_FEATURES],
                &pad_rows(&s.running_nodes, rb * IN_FLIGHT_FEATURES)
            )?
            .into(),
            tensor(
                &[1, wb, IN_FLIGHT_FEATURES],
                &pad_rows(&s.waiting_nodes, wb * IN_FLIGHT_FEATURES)
            )?
            .into(),
            tensor(&[1, e, rb], &pad_columns(&s.running_adj, e, r, rb))?.into(),
            tensor(&[1, e, wb], &pad_columns(&s.waiting_adj, e, w, wb))?.into(),
            tensor(&[1, e], &vec![1.0; e])?.into(),
            tensor(&[1, e + 1], &s.action_mask)?.into(),
        ];
        let outputs = self
            .plan_for((e, rb, wb))?
            .run(inputs)
            .map_err(model_error)?;
        let logits: Vec<f32> = outputs
            .first()
            .ok_or_else(|| OnnxError::Model("no output".into()))?
            .to_plain_array_view::<f32>()
            .map_err(model_error)?
            .iter()
            .copied()
            .collect();
        if logits.len() != e + 1 {
            return Err(OnnxError::Shape {
                expected: e + 1,
                got: logits.len(),
            });
        }
        Ok(logits)
    }

    /// Encodes the state and returns the model's logits `[E + 1]`.
    pub fn logits(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
    ) -> Result<Vec<f32>, OnnxError> {
        let mut encoded = std::mem::take(&mut self.encoded);
        encode_state(state, arriving, &mut encoded);
        let logits = self.logits_of(&encoded);
        self.encoded = encoded;
        logits
    }
}

/// The best allowed action of `logits` under `mask` (`[E + 1]`, last = reject), or `None`
/// when an allowed action's logit is not finite (a failed inference).
pub fn best_action(logits: &[f32], mask: &[f32]) -> Option<Decision> {
    let mut best: Option<(usize, f32)> = None;
    for (i, (&l, &m)) in logits.iter().zip(mask).enumerate() {
        if m > 0.5 {
            if !l.is_finite() {
                return None;
            }
            if best.is_none_or(|(_, b)| l > b) {
                best = Some((i, l));
            }
        }
    }
    Some(match best {
        Some((i, _)) if i + 1 < logits.len() => Decision::Route(i),
        _ => Decision::Reject,
    })
}

impl Policy for OnnxPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn decide(
        &mut self,
        state: &ClusterState,
        arriving: &ArrivingRequest,
        observed: &Observed<'_>,
    ) -> Decision {
        // A failed inference, or a non-finite logit among the allowed actions (which would
        // otherwise win or lose every comparison), falls back to qos-greedy and is counted.
        let decision = self
            .logits(state, arriving)
            .ok()
            .and_then(|logits| best_action(&logits, &self.encoded.action_mask));
        match decision {
            Some(d) => d,
            None => {
                self.fallbacks += 1;
                self.fallback.decide(state, arriving, observed)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_action_respects_the_mask_and_maps_the_last_column_to_reject() {
        assert_eq!(
            best_action(&[3.0, 1.0, 0.0], &[0.0, 1.0, 1.0]),
            Some(Decision::Route(1))
        );
        assert_eq!(
            best_action(&[3.0, 1.0, 5.0], &[1.0, 1.0, 1.0]),
            Some(Decision::Reject)
        );
        assert_eq!(
            best_action(&[3.0, 1.0, 5.0], &[0.0, 0.0, 0.0]),
            Some(Decision::Reject)
        );
    }

    #[test]
    fn a_non_finite_allowed_logit_is_a_failed_inference() {
        // A NaN first would otherwise win: no later logit compares greater than NaN.
        assert_eq!(best_action(&[f32::NAN, 1.0, 0.0], &[1.0, 1.0, 1.0]), None);
        assert_eq!(
            best_action(&[0.0, f32::INFINITY, 0.0], &[1.0, 1.0, 1.0]),
            None
        );
        assert_eq!(
            best_action(&[0.0, 1.0, f32::NEG_INFINITY], &[1.0, 1.0, 1.0]),
            None
        );
        // A masked-out action's logit does not matter, whatever it is.
        assert_eq!(
            best_action(&[f32::NAN, 1.0, 0.0], &[0.0, 1.0, 1.0]),
            Some(Decision::Route(1))
        );
    }

    #[test]
    fn node_buckets_are_powers_of_two_from_8_that_hold_the_nodes() {
        assert_eq!(node_bucket(0), 8);
        assert_eq!(node_bucket(8), 8);
        assert_eq!(node_bucket(9), 16);
        assert_eq!(node_bucket(100), 128);
        for n in 0..5000 {
            let b = node_bucket(n);
            assert!(b >= n && b.is_power_of_two() && b >= 8, "n {n} bucket {b}");
            assert!(n <= 8 || b < 2 * n, "n {n} bucket {b}: at most double");
        }
    }

    #[test]
    fn padding_keeps_rows_and_zeroes_the_rest() {
        assert_eq!(
            pad_columns(&[1.0, 2.0, 3.0, 4.0], 2, 2, 3),
            vec![1.0, 2.0, 0.0, 3.0, 4.0, 0.0]
        );
        assert_eq!(pad_rows(&[1.0], 3), vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(OnnxPolicy::from_bytes("x", b"not a model").is_err());
        assert!(matches!(
            OnnxPolicy::load(Path::new("/nonexistent.onnx")),
            Err(OnnxError::Io { .. })
        ));
    }
}
