//! The processes and servers around a demo run, shared with the bench and the validation:
//! the scratch folder, child processes stopped in order, the MQTT broker (embedded rumqttd or
//! mosquitto), the generated daemon configuration's common sections, the `qosrouted` process
//! and its `/metrics`.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{DemoArgs, Router};

/// SIGINT (Ctrl-C) or SIGTERM cancels `interrupt`.
pub(crate) fn watch_signals(interrupt: CancellationToken) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            eprintln!(
                "\nstopping: shutting down the devices, the daemon, the experts and the broker"
            );
            interrupt.cancel();
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            interrupt.cancel();
        }
    });
    Ok(())
}

/// A scratch folder for the generated configs and logs, removed on drop unless kept.
#[derive(Debug)]
pub(crate) struct Scratch(pub(crate) PathBuf, bool);

impl Scratch {
    pub(crate) fn new(keep: bool) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("qosroute-demo-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        Ok(Self(dir, keep))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if self.1 {
            eprintln!("kept the daemon configs and logs in {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")
        .context("cannot find a free port")?
        .local_addr()?
        .port())
}

pub(crate) async fn wait_for_port(port: u16, what: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("{what} did not listen on 127.0.0.1:{port} within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Sends SIGTERM to a child (on Unix; elsewhere it is killed).
fn terminate(child: &mut Child) {
    #[cfg(unix)]
    {
        let pid = rustix::process::Pid::from_child(child);
        if rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_err() {
            let _ = child.kill();
        }
    }
    #[cfg(not(unix))]
    {
        let _ = child.kill();
    }
}

/// Waits for a child to exit, up to `within`; kills it after that. Returns its exit code.
fn reap(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.code(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            _ => {
                let _ = child.kill();
                return child.wait().ok().and_then(|s| s.code());
            }
        }
    }
}

/// A child process in its own process group (so a terminal's Ctrl-C reaches only the demo,
/// which then stops it in order): SIGTERM, then kill, when dropped.
#[derive(Debug)]
pub(crate) struct ChildGuard {
    pub(crate) child: Option<Child>,
    grace: Duration,
}

impl ChildGuard {
    pub(crate) fn spawn(command: &mut Command, grace: Duration) -> std::io::Result<Self> {
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(command, 0);
        Ok(Self {
            child: Some(command.spawn()?),
            grace,
        })
    }

    pub(crate) fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, wait (off the async threads), kill after the grace period.
    pub(crate) async fn stop(mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let grace = self.grace;
        tokio::task::spawn_blocking(move || {
            if child.try_wait().ok().flatten().is_none() {
                terminate(&mut child);
            }
            reap(&mut child, grace)
        })
        .await
        .ok()
        .flatten()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                terminate(&mut child);
            }
            reap(&mut child, self.grace);
        }
    }
}

/// The MQTT broker of the demo.
pub(super) enum Broker {
    External(String),
    /// rumqttd in this process (it has no stop: it ends with the process).
    Embedded(String),
    Mosquitto {
        url: String,
        child: ChildGuard,
    },
}

impl Broker {
    pub(super) fn url(&self) -> &str {
        match self {
            Broker::External(url) | Broker::Embedded(url) | Broker::Mosquitto { url, .. } => url,
        }
    }

    pub(super) fn describe(&self) -> String {
        match self {
            Broker::External(url) => format!("broker {url}"),
            Broker::Embedded(url) => {
                format!("embedded rumqttd at {url}")
            }
            Broker::Mosquitto { url, .. } => format!("mosquitto at {url}"),
        }
    }

    pub(super) fn stop(&mut self) {
        if let Broker::Mosquitto { child, .. } = self
            && let Some(mut c) = child.child.take()
        {
            terminate(&mut c);
            reap(&mut c, Duration::from_secs(5));
        }
    }
}

pub(crate) fn find_mosquitto() -> Option<&'static str> {
    [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "mosquitto",
    ]
    .into_iter()
    .find(|p| {
        Command::new(p)
            .arg("-h")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    })
}

pub(super) async fn start_broker(args: &DemoArgs, scratch: &Scratch) -> anyhow::Result<Broker> {
    let choice = args.broker.as_str();
    if !matches!(choice, "mosquitto" | "embedded") {
        qosroute_swarm::parse_broker_url(choice)
            .map_err(|e| anyhow::anyhow!("--broker: {e} (or embedded, mosquitto)"))?;
        return Ok(Broker::External(choice.to_owned()));
    }
    let port = free_port()?;
    let url = format!("mqtt://127.0.0.1:{port}");
    if choice == "embedded" {
        start_rumqttd(port)?;
        wait_for_port(
            port,
            "the embedded broker (rumqttd)",
            Duration::from_secs(10),
        )
        .await?;
        return Ok(Broker::Embedded(url));
    }
    let child = start_mosquitto(
        port,
        &scratch.0,
        "--broker mosquitto: mosquitto is not installed (e.g. `apt-get install mosquitto`); \
         the default, --broker embedded, needs nothing",
    )
    .await?;
    Ok(Broker::Mosquitto { url, child })
}

/// mosquitto on 127.0.0.1:`port` with its config in `dir`, as the demo, the bench and the
/// validation run it: anonymous, no persistence, no in-flight limit, TCP_NODELAY (without it
/// a reply waits behind the broker's PUBACK for the device's delayed ACK). Fails with
/// `missing` when mosquitto is not installed.
pub(crate) async fn start_mosquitto(
    port: u16,
    dir: &std::path::Path,
    missing: &str,
) -> anyhow::Result<ChildGuard> {
    let Some(exe) = find_mosquitto() else {
        bail!("{missing}")
    };
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\nmax_inflight_messages 0\nset_tcp_nodelay true\n"
        ),
    )?;
    let child = ChildGuard::spawn(
        Command::new(exe)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        Duration::from_secs(5),
    )
    .with_context(|| format!("cannot start {exe}"))?;
    wait_for_port(port, "mosquitto", Duration::from_secs(10)).await?;
    Ok(child)
}

/// rumqttd on 127.0.0.1:`port`, MQTT 5 only, in background threads of this process.
fn start_rumqttd(port: u16) -> anyhow::Result<()> {
    use std::collections::HashMap;
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 60_000,
        max_payload_size: 1024 * 1024,
        max_inflight_count: 4096,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "v5".into(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 4096,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: rumqttd::Strategy::RoundRobin,
        },
        v5: Some(HashMap::from([("1".to_owned(), server)])),
        ..rumqttd::Config::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            // Runs until the process ends; rumqttd has no stop.
            let _ = broker.start();
        })
        .context("cannot start the embedded broker")?;
    Ok(())
}

/// A TOML basic string.
pub(crate) fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `qosrouted` binary: `explicit` (`--daemon`), else the one next to this executable;
/// fails with how to build it when missing.
pub(crate) fn find_daemon(explicit: Option<&PathBuf>) -> anyhow::Result<PathBuf> {
    let exe = match explicit {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .map(|d| d.join(format!("qosrouted{}", std::env::consts::EXE_SUFFIX)))
            .context("this executable has no folder")?,
    };
    if !exe.exists() {
        bail!(
            "the daemon binary {} is missing: build it next to qosroute with `cargo build --release -p qosroute-daemon -p qosroute-cli` (or pass --daemon PATH)",
            exe.display()
        );
    }
    Ok(exe)
}

/// The `[broker]` (clean session, quick reconnects, and `ack_deadline_s` when given) and
/// `[policy]` sections of a generated daemon configuration, as the demo and the bench run the
/// daemon.
pub(crate) fn broker_and_policy(
    c: &mut String,
    broker_url: &str,
    client_id: &str,
    ack_deadline_s: Option<f64>,
    router: &Router,
) {
    use std::fmt::Write as _;
    let _ = writeln!(
        c,
        "\n[broker]\nurl = {}\nclient_id = {}\nsession_expiry_s = 0\nreconnect_min_s = 0.1\nreconnect_max_s = 2.0",
        toml_str(broker_url),
        toml_str(client_id)
    );
    if let Some(deadline) = ack_deadline_s {
        let _ = writeln!(c, "ack_deadline_s = {deadline:?}");
    }
    let _ = writeln!(c, "\n[policy]");
    match router {
        Router::Learned { dir, .. } => {
            let _ = writeln!(
                c,
                "model_dir = {}\nvariant = \"f32\"\nfallback = \"qos-greedy\"",
                toml_str(&dir.display().to_string())
            );
        }
        Router::Baseline(b) => {
            let _ = writeln!(c, "fallback = {}", toml_str(b));
        }
        Router::Planner(spec) => {
            let _ = writeln!(c, "planner = {}\nfallback = \"qos-greedy\"", toml_str(spec));
        }
    }
}

/// The real daemon, running one generated config.
pub(crate) struct DaemonProcess {
    pub(crate) child: ChildGuard,
    pub(crate) log: PathBuf,
    pub(crate) metrics_port: u16,
}

impl DaemonProcess {
    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits for the metrics endpoint (20 s at most), then until it says every expert is up.
    pub(crate) async fn wait_ready(
        &mut self,
        experts: &[String],
        within: Duration,
        interrupt: &CancellationToken,
    ) -> anyhow::Result<()> {
        wait_for_port(
            self.metrics_port,
            "qosrouted's metrics",
            Duration::from_secs(20),
        )
        .await
        .with_context(|| self.log_tail(20))?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.exited() {
                bail!(
                    "qosrouted exited at start ({status}); its log ends with:\n{}",
                    self.log_tail(20)
                );
            }
            if let Some(m) = scrape(self.metrics_port).await
                && experts
                    .iter()
                    .all(|e| m.expert_up.get(e).is_some_and(|&up| up >= 1.0))
            {
                return Ok(());
            }
            if interrupt.is_cancelled() {
                bail!("interrupted while the daemon started");
            }
            if Instant::now() > deadline {
                bail!(
                    "qosrouted did not report every expert up within {within:?}; its log ends with:\n{}",
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Starts `qosrouted --config CONFIG` with its log (stderr) in `log`, at the level
/// `$LOG_VAR` names (default `warn`); stopped by SIGTERM, killed 10 s later if need be.
pub(crate) fn spawn_daemon(
    exe: &Path,
    config: &Path,
    log: &Path,
    log_var: &str,
) -> anyhow::Result<ChildGuard> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    ChildGuard::spawn(
        Command::new(exe)
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var(log_var).unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file),
        Duration::from_secs(10),
    )
    .with_context(|| format!("cannot start {}", exe.display()))
}

/// Runs `qosrouted --check-config`, so that a setting the daemon refuses (e.g. a policy it
/// cannot run) is reported in its own words.
pub(crate) fn check_config(exe: &Path, config: &Path) -> anyhow::Result<()> {
    let out = Command::new(exe)
        .arg("--check-config")
        .arg(config)
        .output()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if !out.status.success() {
        bail!(
            "qosrouted refuses the generated configuration:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What the daemon's `/metrics` says (the part the demo shows).
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct DaemonMetrics {
    /// `qosroute_qos_sum`, `qosroute_qos_count`: realised QoS of completed requests whose
    /// expert reported a quality.
    qos_sum: f64,
    qos_count: f64,
    slo_violations: f64,
    pub(crate) fallbacks: f64,
    /// `qosroute_planner_budget_exhausted_total`: planner decisions whose time budget ran
    /// out before every future was played.
    pub(crate) planner_budget_exhausted: f64,
    retries: f64,
    replies_dropped: f64,
    feedback: f64,
    pub(crate) decisions: f64,
    pub(crate) decision_seconds_sum: f64,
    pub(crate) requests_by_outcome: BTreeMap<String, f64>,
    pub(super) expert_in_flight: BTreeMap<String, f64>,
    expert_up: BTreeMap<String, f64>,
}

impl DaemonMetrics {
    pub(super) fn avg_qos(&self) -> f64 {
        if self.qos_count > 0.0 {
            self.qos_sum / self.qos_count
        } else {
            f64::NAN
        }
    }

    fn parse(text: &str) -> Self {
        let mut m = DaemonMetrics::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.trim().parse::<f64>() else {
                continue;
            };
            let (name, label) = match key.split_once('{') {
                Some((n, rest)) => (
                    n,
                    rest.trim_end_matches('}')
                        .split_once("=\"")
                        .map(|(_, v)| v.trim_end_matches('"').replace("\\\"", "\"")),
                ),
                None => (key, None),
            };
            match (name, label) {
                ("qosroute_qos_sum", None) => m.qos_sum = v,
                ("qosroute_qos_count", None) => m.qos_count = v,
                ("qosroute_slo_violations_total", None) => m.slo_violations = v,
                ("qosroute_policy_fallbacks_total", None) => m.fallbacks = v,
                ("qosroute_planner_budget_exhausted_total", None) => {
                    m.planner_budget_exhausted = v;
                }
                ("qosroute_retries_total", None) => m.retries = v,
                ("qosroute_replies_dropped_total", None) => m.replies_dropped = v,
                ("qosroute_feedback_total", None) => m.feedback = v,
                ("qosroute_decision_seconds_count", None) => m.decisions = v,
                ("qosroute_decision_seconds_sum", None) => m.decision_seconds_sum = v,
                ("qosroute_requests_total", Some(l)) => {
                    m.requests_by_outcome.insert(l, v);
                }
                ("qosroute_expert_in_flight", Some(l)) => {
                    m.expert_in_flight.insert(l, v);
                }
                ("qosroute_expert_up", Some(l)) => {
                    m.expert_up.insert(l, v);
                }
                _ => {}
            }
        }
        m
    }
}

/// `GET /metrics` of the daemon, parsed; `None` when it does not answer within a second.
pub(crate) async fn scrape(port: u16) -> Option<DaemonMetrics> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some(DaemonMetrics::parse(&body))
    };
    tokio::time::timeout(Duration::from_secs(1), fetch)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn metrics_parse_with_labels() {
        let m = DaemonMetrics::parse(
            "# HELP x\nqosroute_qos_sum 1.5\nqosroute_qos_count 3\nqosroute_planner_budget_exhausted_total 4\nqosroute_expert_in_flight{expert=\"a\"} 2\nqosroute_requests_total{outcome=\"completed\"} 7\nqosroute_expert_up{expert=\"a\"} 1\n",
        );
        assert_eq!(m.avg_qos(), 0.5);
        assert_eq!(m.planner_budget_exhausted, 4.0);
        assert_eq!(m.expert_in_flight.get("a"), Some(&2.0));
        assert_eq!(m.requests_by_outcome.get("completed"), Some(&7.0));
        assert!(DaemonMetrics::default().avg_qos().is_nan());
    }

    #[test]
    fn toml_strings_escape() {
        assert_eq!(toml_str(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(toml_str("x\ny"), "\"x\\u000Ay\"");
    }
}
