//! Online predictors: what the router expects of a request before it runs.
//!
//! They live in `qosroute_core::predict` (the edge daemon must make its predictions with the
//! same code the policy was trained with); this module re-exports them so that
//! `qosroute_sim::predict::*` keeps working.

pub use qosroute_core::predict::{
    OUTPUT_PRIOR_WEIGHT, OutputLengthPredictor, PRIOR_OUTPUT_TOKENS, Predictors,
    QUALITY_PRIOR_WEIGHT, QualityPredictor,
};
