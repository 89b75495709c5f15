//! Simulated MQTT devices that replay a workload against the gateway in real time and account
//! for every request.
//!
//! A [`Swarm`] connects `devices` MQTT 5 clients to the broker, then publishes the requests of a
//! workload ([`SwarmRequest`], e.g. [`SwarmRequest::from_workload`] of a `qosroute_sim`
//! workload) at their arrival times divided by the replay speed, each from device
//! `i % devices`, on `qosroute/v1/{site}/req/{device}` (`/pc` for postcard), with an MQTT 5
//! response topic of the device's own and the request id as correlation data. It records per
//! request ([`RequestRecord`]) when it was published, when its first chunk and its last token
//! came, how it ended (final, or error with its code), the expert, tokens, seconds per token
//! and the SLO verdicts (the gateway's, and the device's own when it has a latency target:
//! [`SwarmConfig::device_slo`]),
//! and how many final-or-error replies came (exactly one is right: more are duplicates, none is
//! lost). Replies it cannot attribute are counted ([`UnexpectedReplies`]), never fatal.
//!
//! ```no_run
//! # async fn demo(workload: &qosroute_sim::Workload) -> Result<(), qosroute_swarm::SwarmError> {
//! use qosroute_swarm::{Swarm, SwarmConfig, SwarmRequest};
//!
//! let mut config = SwarmConfig::new("mqtt://127.0.0.1:1883", "lab");
//! config.speed = 10.0; // ten times faster than the workload's clock
//! let swarm = Swarm::start(config, &SwarmRequest::from_workload(workload), None).await?;
//! let live = swarm.progress(); // any time: published, ended, in flight, ...
//! let report = swarm.finish().await?;
//! let summary = report.summary();
//! assert!(summary.accounted);
//! # let _ = live;
//! # Ok(())
//! # }
//! ```
//!
//! Memory is one fixed-size record per request (192 bytes) plus the interned expert
//! names; nothing is printed. [`probe_gateway`] waits until a gateway answers on a site.

mod config;
mod record;
mod report;
mod swarm;
mod truth;

pub use config::{SwarmConfig, parse_broker_url};
pub use record::{Outcome, RequestRecord, SwarmRequest, UnexpectedReplies};
pub use report::{ExpertShare, Percentiles, SwarmReport, SwarmSummary, TimelinePoint};
pub use swarm::{Swarm, SwarmProgress, probe_gateway, request_index, unique_prompt};
pub use truth::QualityTruth;

/// Largest prompt a device sends, in tokens: prompts are about four bytes per token (as the
/// gateway and the emulator estimate them) and at most [`qosroute_proto::MAX_PROMPT_BYTES`].
pub const MAX_PROMPT_TOKENS: u32 = (qosroute_proto::MAX_PROMPT_BYTES / 4) as u32;

/// Why a swarm cannot start or run.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// A configuration value is out of range.
    #[error("swarm config {field}: {message}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The broker URL is unusable.
    #[error("broker url `{0}`: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")]
    BrokerUrl(String),
    /// The CA file could not be read.
    #[error("{path}: cannot read: {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// Not every device connected and subscribed in time.
    #[error(
        "{ready} of {devices} devices connected and subscribed within {within_s} s (last error: {last_error})"
    )]
    Connect {
        /// Devices ready.
        ready: usize,
        /// Devices wanted.
        devices: usize,
        /// The time allowed, seconds.
        within_s: f64,
        /// The last connection error seen, if any.
        last_error: String,
    },
    /// No gateway answered a probe.
    #[error(
        "no gateway answered on site `{site}` within {within_s} s (broker reachable: {connected})"
    )]
    GatewayNotAnswering {
        /// The site probed.
        site: String,
        /// The time allowed, seconds.
        within_s: f64,
        /// Whether the probe connected to the broker at all.
        connected: bool,
    },
    /// Too many requests for one run.
    #[error("{0} requests: at most u32::MAX per run")]
    TooManyRequests(usize),
    /// A request of the workload does not fit the wire format.
    #[error("request {index} does not encode: {message}")]
    Request {
        /// Its index in the workload.
        index: usize,
        /// Why.
        message: String,
    },
    /// Not called inside a Tokio runtime.
    #[error("the swarm must be started inside a Tokio runtime")]
    NoRuntime,
    /// The swarm's task panicked or was cancelled.
    #[error("swarm task failed: {0}")]
    Task(String),
}
