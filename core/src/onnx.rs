//! The learned router run from ONNX by tract (`onnx` feature).
//!
//! The model reads the tensors of [`encode_state`](crate::encode_state) with batch 1 and
//! returns `logits [1, E + 1]` (last = reject). It is loaded and optimised once, with symbolic
//! node counts, so one plan serves every graph size. A decision takes the best allowed action;
//! if inference fails the policy falls back to `qos-greedy` and counts the fallback.

use std::path::Path;

use tract_onnx::prelude::*;

use crate::baselines::QosGreedy;
use crate::encoder::{
    EXPERT_FEATURES, EncodedState, IN_FLIGHT_FEATURES, REQUEST_FEATURES, encode_state,
};
use crate::policy::{Decision, Policy};
use crate::request::ArrivingRequest;
use crate::state::ClusterState;

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

type Plan = std::sync::Arc<TypedSimplePlan>;
type RunState = TypedSimpleState;

/// The learned router.
#[derive(Debug)]
pub struct OnnxPolicy {
    name: String,
    /// The optimised plan; kept so the model outlives its run state.
    _plan: Plan,
    /// One run state reused across decisions (no per-decision set-up).
    state: RunState,
    encoded: EncodedState,
    fallback: QosGreedy,
    fallbacks: u64,
}

fn tensor(shape: &[usize], data: &[f32]) -> Result<Tensor, OnnxError> {
    Tensor::from_shape(shape, data).map_err(model_error)
}

impl OnnxPolicy {
    /// Loads and optimises a model from ONNX bytes; `name` is how the policy reports itself.
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self, OnnxError> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut std::io::Cursor::new(bytes))
            .map_err(model_error)?;
        let plan = model
            .into_optimized()
            .map_err(model_error)?
            .into_runnable()
            .map_err(model_error)?;
        let state = plan.spawn().map_err(model_error)?;
        Ok(Self {
            name: name.to_owned(),
            _plan: plan,
            state,
            encoded: EncodedState::default(),
            fallback: QosGreedy,
            fallbacks: 0,
        })
    }

    /// Loads a model file; the policy is named `han:PATH`.
    pub fn load(path: &Path) -> Result<Self, OnnxError> {
        let bytes = std::fs::read(path).map_err(|source| OnnxError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&format!("han:{}", path.display()), &bytes)
    }

    /// Decisions that fell back to `qos-greedy` because inference failed.
    pub fn fallbacks(&self) -> u64 {
        self.fallbacks
    }

    /// Logits `[E + 1]` of an encoded state (batch 1).
    pub fn logits_of(&mut self, s: &EncodedState) -> Result<Vec<f32>, OnnxError> {
        let (e, r, w) = (s.experts, s.running, s.waiting);
        let inputs: TVec<TValue> = tvec![
            tensor(&[1, REQUEST_FEATURES], &s.request)?.into(),
            tensor(&[1, e, EXPERT_FEATURES], &s.expert)?.into(),
            tensor(&[1, r, IN_FLIGHT_FEATURES], &s.running_nodes)?.into(),
            tensor(&[1, w, IN_FLIGHT_FEATURES], &s.waiting_nodes)?.into(),
            tensor(&[1, e, r], &s.running_adj)?.into(),
            tensor(&[1, e, w], &s.waiting_adj)?.into(),
            tensor(&[1, e], &vec![1.0; e])?.into(),
            tensor(&[1, e + 1], &s.action_mask)?.into(),
        ];
        let outputs = self.state.run(inputs).map_err(model_error)?;
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

/// The best allowed action of `logits` under `mask` (`[E + 1]`, last = reject).
pub fn best_action(logits: &[f32], mask: &[f32]) -> Decision {
    let mut best: Option<(usize, f32)> = None;
    for (i, (&l, &m)) in logits.iter().zip(mask).enumerate() {
        if m > 0.5 && best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    match best {
        Some((i, _)) if i + 1 < logits.len() => Decision::Route(i),
        _ => Decision::Reject,
    }
}

impl Policy for OnnxPolicy {
    fn name(&self) -> &str {
        &self.name
    }

    fn decide(&mut self, state: &ClusterState, arriving: &ArrivingRequest) -> Decision {
        match self.logits(state, arriving) {
            Ok(logits) => best_action(&logits, &self.encoded.action_mask),
            Err(_) => {
                self.fallbacks += 1;
                self.fallback.decide(state, arriving)
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
            Decision::Route(1)
        );
        assert_eq!(
            best_action(&[3.0, 1.0, 5.0], &[1.0, 1.0, 1.0]),
            Decision::Reject
        );
        assert_eq!(
            best_action(&[3.0, 1.0, 5.0], &[0.0, 0.0, 0.0]),
            Decision::Reject
        );
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
