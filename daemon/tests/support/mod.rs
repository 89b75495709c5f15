//! Test support: the shared test kit (`qosroute-testkit`: a real mosquitto broker, the real
//! `qosrouted` binary, MQTT 5 test devices), pointed at this package's own `qosrouted` build.

// Each test file uses a part of it.
#![allow(dead_code, unused_imports)]

pub mod site;

pub use qosroute_testkit::{Broker, BrokerOptions, Daemon, Device, DeviceOptions, Pki, Scratch};

/// The `qosrouted` binary Cargo built for these tests.
pub const QOSROUTED: &str = env!("CARGO_BIN_EXE_qosrouted");

/// Starts this build's `qosrouted` with `config` (TOML text; `{metrics_port}` is substituted).
pub fn start_daemon(config: &str) -> Daemon {
    Daemon::start_binary(QOSROUTED, config, &[])
}

/// [`start_daemon`] with extra environment variables for the process.
pub fn start_daemon_with_env(config: &str, env: &[(&str, &str)]) -> Daemon {
    Daemon::start_binary(QOSROUTED, config, env)
}
