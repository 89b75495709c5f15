//! The scenarios, in order of priority, and what they share.

mod batching_expert;
mod broker_restart;
mod direct;
mod drain_clean;
mod expert_kill;
mod malformed;
mod overload;
mod real_expert;
mod reload_drain;
mod replay;
mod shared_group;
mod slow_expert;
mod soak;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use qosroute_sim::{Catalogue, QualityTable};
use qosroute_swarm::{QualityTruth, SwarmConfig, probe_gateway};
use qosroute_testkit::{Broker, BrokerOptions, Daemon};

use crate::report::{Report, mib};
use crate::rig::{self, DaemonConfig, Expert};

pub use batching_expert::batching_expert;
pub use broker_restart::broker_restart;
pub use drain_clean::drain_clean_session;
pub use expert_kill::expert_kill;
pub use malformed::malformed;
pub use overload::overload;
pub use real_expert::real_expert;
pub use reload_drain::reload_and_drain;
pub use replay::replay;
pub use shared_group::shared_group;
pub use slow_expert::slow_expert;
pub use soak::{SAMPLE_EVERY, SoakSample, soak};

/// Time compression of the trace scenarios: experts run this much faster than the hardware
/// they model (their latency models and the SLOs are scaled to match), and the trace is
/// replayed this much faster.
const SPEED: f64 = 20.0;
/// Arrival rate relative to the trace's (with answers capped at `MAX_OUTPUT` tokens, edge-mixed
/// keeps up with the full rate).
const LOAD: f64 = 1.0;
/// Answers are at most this many tokens (the devices' `max_tokens`): enough for real
/// streaming (several chunks), few enough that 2 cores keep up in a debug build.
const MAX_OUTPUT: u32 = 48;
/// Devices of the trace scenarios.
const DEVICES: usize = 32;

/// A broker and the edge-mixed experts, emulated `speed` times faster than their hardware.
struct Setup {
    quality: Arc<QualityTable>,
    catalogue: Catalogue,
    broker: Broker,
    experts: Vec<Expert>,
    site: &'static str,
    speed: f64,
}

impl Setup {
    fn edge_mixed(site: &'static str, speed: f64, broker: BrokerOptions) -> anyhow::Result<Self> {
        let quality = rig::quality_table()?;
        let catalogue = rig::edge_mixed()?;
        let experts = rig::start_experts(&catalogue, speed, &quality)?;
        Ok(Self {
            quality,
            catalogue,
            broker: Broker::start_with(broker),
            experts,
            site,
            speed,
        })
    }

    /// The daemon configuration for the experts of `which` (indices).
    fn config(&self, client_id: &str, which: &[usize]) -> DaemonConfig {
        DaemonConfig::new(
            self.site,
            &self.broker.url(),
            client_id,
            &self.catalogue.slo,
            self.speed,
            which
                .iter()
                .filter_map(|&i| self.experts.get(i))
                .map(|e| e.entry(&self.quality))
                .collect(),
        )
    }

    fn all(&self) -> Vec<usize> {
        (0..self.experts.len()).collect()
    }

    /// Starts a daemon and waits until it has every expert of `config` up and has subscribed.
    async fn daemon(&self, config: &DaemonConfig) -> anyhow::Result<Daemon> {
        let daemon = rig::start_daemon(config);
        let names: Vec<&str> = config.experts.iter().map(|e| e.name.as_str()).collect();
        rig::wait_up(&daemon, &names, Duration::from_secs(60)).await?;
        rig::wait_subscribed(&daemon, Duration::from_secs(10)).await?;
        Ok(daemon)
    }

    fn truth(&self) -> QualityTruth {
        let all: Vec<&Expert> = self.experts.iter().collect();
        rig::truth(&self.quality, &all)
    }

    fn swarm(&self, devices: usize) -> SwarmConfig {
        rig::swarm_config(&self.broker.url(), self.site, devices, self.speed)
    }
}

/// Waits until a gateway answers on the swarm's site.
async fn probe(config: &SwarmConfig, daemon: &Daemon) -> anyhow::Result<()> {
    probe_gateway(config, Duration::from_secs(20))
        .await
        .with_context(|| format!("daemon log ends with:\n{}", daemon.log_tail(30)))?;
    Ok(())
}

/// Figures and checks of the daemon at the end of a run: its peak memory, that its
/// `completed` counter matches what the devices got, and a clean exit on SIGTERM.
async fn finish_daemon(
    report: &mut Report,
    daemon: &mut Daemon,
    swarm_completed: Option<u64>,
    label: &str,
) {
    let tag = |n: &str| {
        if label.is_empty() {
            n.to_owned()
        } else {
            format!("{label}: {n}")
        }
    };
    if let Some(completed) = swarm_completed {
        // The counter moves right after the final reply is published.
        let mut counted = 0.0;
        for _ in 0..100 {
            counted = daemon.outcomes().get("completed").copied().unwrap_or(0.0);
            if counted >= completed as f64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report.check(
            tag("the daemon counted what the devices got"),
            counted == completed as f64,
            format!("daemon completed {counted}, devices {completed}"),
        );
    }
    let outcomes: Vec<String> = daemon
        .outcomes()
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    report.figure(tag("daemon outcomes"), outcomes.join(", "));
    if let Some(hwm) = daemon.peak_rss_kib() {
        report.figure(tag("daemon peak RSS (VmHWM)"), mib(hwm));
    }
    daemon.signal("TERM");
    let exit = daemon.wait_exit(Duration::from_secs(15));
    keep_log(report, daemon, label);
    report.check(
        tag("the daemon exits 0 on SIGTERM"),
        exit == Some(0),
        format!("exit code {exit:?}"),
    );
}

/// Environment variable naming a folder where every daemon's log is copied at its end.
pub const KEEP_LOGS_VAR: &str = "QOSROUTE_HIL_LOGS";

/// Copies the daemon's log to `$QOSROUTE_HIL_LOGS/{scenario}-{name}{label}.log` when that is set.
fn keep_log(report: &Report, daemon: &Daemon, label: &str) {
    let Some(dir) = std::env::var_os(KEEP_LOGS_VAR) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let label = if label.is_empty() {
        String::new()
    } else {
        format!("-{}", label.replace(' ', "-"))
    };
    let file = dir.join(format!("{}-{}{label}.log", report.number, report.name));
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::copy(&daemon.log, file);
    }
}
