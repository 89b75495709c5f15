//! qosroute-core: the routing brain, with no I/O.
//!
//! Follow the names: a request ([`Request`]) arrives with predictions per expert
//! ([`ArrivingRequest`]); a [`Policy`] looks at the [`ClusterState`] (every [`ExpertState`]
//! with its running and waiting [`InFlight`] requests) and returns a [`Decision`]. The
//! [`impact_of`] estimator predicts what an action does to the new request and to the
//! requests already on the expert; [`qos`] scores a finished request.

pub mod baselines;
pub mod calibration;
pub mod encoder;
pub mod engine;
pub mod expert;
pub mod forecast;
pub mod impact;
pub mod knowledge;
pub mod ledger;
pub mod lengths;
#[cfg(feature = "onnx")]
pub mod onnx;
pub mod planner;
pub mod policy;
pub mod predict;
pub mod qos;
pub mod request;
pub mod rng;
pub mod rollout;
pub mod state;
pub mod task;
#[cfg(test)]
mod testing;

pub use baselines::{BASELINE_NAMES, UnknownPolicy, baseline, is_planner};
pub use calibration::{
    CalibrationAccuracy, CalibrationCounts, CalibratorSettings, InvalidCalibrator,
    LatencyCalibrator, PREFILL_MIN_SHARE_OF_PREDICTED, RejectedObservation,
};
pub use encoder::{EncodedState, encode_state};
pub use engine::{EngineEvent, ExpertEngine, Job};
pub use expert::{ExpertProfile, InvalidProfile, LatencyModel};
pub use impact::{ActionImpact, Candidate, impact_of};
pub use knowledge::{ArrivalWindow, NothingLearned, Observed, OutputLengthModel, QualityModel};
pub use ledger::{ExpertLedger, LedgerEntry};
#[cfg(feature = "onnx")]
pub use onnx::{OnnxError, OnnxPolicy};
pub use planner::{PLANNER_NAME, PlanEvaluation, PlannerConfig, PlannerStats, QosPlanner};
pub use policy::{Decision, Policy};
pub use predict::{
    ExpertOutputLengths, InvalidQualityPrior, OutputLengthPredictor, Predictors, QualityBook,
    QualityPredictor,
};
pub use qos::{per_token_latency_s, qos, reward, slo_met};
pub use request::{ArrivingRequest, Prediction, Request, RequestId};
pub use rng::SimRng;
pub use state::{ClusterState, ExpertState, InFlight};
pub use task::{InvalidSlo, PAPER_SLO_S_PER_TOKEN, SloTable, Task, UnknownTask};
