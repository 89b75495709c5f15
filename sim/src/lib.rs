//! qosroute-sim: a discrete-event simulator of heterogeneous LLM experts at the edge.
//!
//! A [`Catalogue`] names the experts; a [`Workload`] (Poisson, bursty or an Azure trace)
//! brings requests whose true quality comes from the [`QualityTable`]; a [`Simulation`]
//! runs them through one [`ExpertEngine`] per expert under any `qosroute_core::Policy` and
//! ends in a [`RunReport`].

pub mod catalogue;
mod csv;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod predict;
pub mod quality;
pub mod record;
pub mod simulation;
pub mod slowdown;
pub mod trace;
pub mod training;
pub mod workload;

pub use catalogue::Catalogue;
pub use engine::ExpertEngine;
pub use error::SimError;
pub use metrics::{ExpertReport, Percentiles, RunReport, TaskReport};
pub use quality::QualityTable;
pub use simulation::{RequestRecord, Simulation, Slowdown, Step};
pub use slowdown::{SlowdownRun, slowdown_reference};
pub use workload::{Workload, WorkloadSpec, generate, with_param};
