//! The continuous-batching engine of one expert lives in `qosroute_core::engine`: the
//! simulator's event loop, the planner's rollouts and the emulator all run the same engine.
//! This module re-exports it so that `qosroute_sim::engine::*` keeps working.

pub use qosroute_core::engine::{DecodeRun, EngineEvent, ExpertEngine, Job};
