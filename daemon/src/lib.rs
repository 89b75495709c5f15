//! `qosrouted`, the edge gateway daemon, as a library: configuration, the MQTT link, the
//! router-side ledger, decisions, request serving, metrics. The binary (`src/main.rs`) only
//! parses arguments and starts [`daemon::run`].

pub mod ack_order;
pub mod admission;
pub mod config;
pub mod daemon;
pub mod ledger;
pub mod link;
pub mod logging;
pub mod metrics;
pub mod prediction_error;
pub mod router;
pub mod router_thread;
pub mod serve;
pub mod shared;
pub mod topics;
