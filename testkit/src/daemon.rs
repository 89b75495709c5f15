//! The real `qosrouted` binary as a child process.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::{Scratch, signal};

/// Environment variable naming the `qosrouted` binary to run (overrides the search).
pub const DAEMON_BINARY_VAR: &str = "QOSROUTED_BIN";

/// The `qosrouted` binary of the current build: `$QOSROUTED_BIN` if set, else `qosrouted` in
/// the target folder of the running executable (`target/{debug,release}/`, found from a test
/// in `target/<profile>/deps/` or a binary in `target/<profile>/`). Panics with how to build
/// it when it is missing: another package's binary is not built for this package's tests
/// (`cargo build -p qosroute-daemon`, with `--release` for a release build). Warns on stderr
/// when the binary is older than the daemon's sources (a stale build).
pub fn daemon_binary() -> PathBuf {
    if let Some(path) = std::env::var_os(DAEMON_BINARY_VAR) {
        let path = PathBuf::from(path);
        assert!(
            path.exists(),
            "{DAEMON_BINARY_VAR}={} does not exist",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().unwrap();
    let name = format!("qosrouted{}", std::env::consts::EXE_SUFFIX);
    let found = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&name))
        .find(|p| p.is_file());
    let Some(path) = found else {
        // target/<profile>/deps/<test> or target/<profile>/<binary>
        let profile = exe
            .parent()
            .and_then(|d| match d.file_name()?.to_str()? {
                "deps" | "examples" => d.parent(),
                _ => Some(d),
            })
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "debug".into());
        let release = if profile == "release" {
            " --release"
        } else {
            ""
        };
        panic!(
            "the qosrouted binary is not built next to {}: build it first with \
             `cargo build -p qosroute-daemon{release}` (same CARGO_TARGET_DIR), or set \
             {DAEMON_BINARY_VAR}=/path/to/qosrouted",
            exe.display()
        );
    };
    warn_if_stale(&path);
    path
}

/// Warns when a source file of the daemon or its workspace dependencies is newer than `binary`.
fn warn_if_stale(binary: &Path) {
    let Ok(built) = binary.metadata().and_then(|m| m.modified()) else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let newest = ["daemon", "core", "proto", "expert-client", "telemetry"]
        .iter()
        .filter_map(|c| newest_file(&root.join(c).join("src")))
        .max();
    if let Some(newest) = newest
        && newest > built
    {
        eprintln!(
            "warning: {} is older than the daemon's sources: rebuild it (`cargo build -p \
             qosroute-daemon`) to test the current code",
            binary.display()
        );
    }
}

fn newest_file(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_file(&path)
        } else {
            entry.metadata().ok().and_then(|m| m.modified().ok())
        };
        newest = newest.max(t);
    }
    newest
}

/// A value in kB of `/proc/{pid}/status` (`VmRSS`, `VmHWM`, ...), if the process exists.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The real `qosrouted` binary running a config; SIGTERM then kill on drop.
#[derive(Debug)]
pub struct Daemon {
    /// The process.
    pub child: Child,
    /// Its log (stderr, `RUST_LOG=info`, or `QOSROUTE_TEST_RUST_LOG` when set, unless the
    /// environment given says otherwise).
    pub log: PathBuf,
    /// Its configuration file (rewrite it, then SIGHUP, to reload).
    pub config: PathBuf,
    /// The port its metrics endpoint bound.
    pub metrics_port: u16,
    _dir: Scratch,
}

/// The port of the daemon's metrics endpoint, read from its log once it is bound.
fn bound_metrics_port(log: &Path, pid: u32) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(port) = text
            .lines()
            .find(|l| l.contains("metrics endpoint"))
            .and_then(|l| l.split("addr=").nth(1))
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
        {
            return port;
        }
        let alive = Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(
            alive,
            "qosrouted exited before serving metrics; log:\n{text}"
        );
        assert!(
            Instant::now() < deadline,
            "qosrouted did not bind its metrics endpoint; log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Daemon {
    /// Starts [`daemon_binary`] `--config` with `config` (TOML text; `{metrics_port}` is
    /// substituted).
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    /// [`Daemon::start`] with extra environment variables for the process.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_binary(daemon_binary(), config, env)
    }

    /// Starts the binary `exe` (e.g. `env!("CARGO_BIN_EXE_qosrouted")` in the daemon's own
    /// tests) with `config` (`{metrics_port}` is substituted) and extra environment variables.
    pub fn start_binary(exe: impl AsRef<Path>, config: &str, env: &[(&str, &str)]) -> Self {
        let dir = Scratch::new("daemon");
        let path = dir.path("qosrouted.toml");
        // Port 0: the daemon binds any free port and logs it (a port picked here could be
        // taken by another test before the daemon binds it).
        std::fs::write(&path, config.replace("{metrics_port}", "0")).unwrap();
        let log = dir.path("qosrouted.log");
        let child = Command::new(exe.as_ref())
            .arg("--config")
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("QOSROUTE_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.as_ref().display()));
        let metrics_port = bound_metrics_port(&log, child.id());
        Daemon {
            child,
            log,
            config: path,
            metrics_port,
            _dir: dir,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `HUP`, ...).
    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    /// SIGKILL: the process dies at once (no drain, no DISCONNECT, no acks).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// How many times `needle` occurs in the log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// Waits until `needle` occurs at least `times` times in the log; panics with the log
    /// after `within`.
    pub async fn wait_log(&self, needle: &str, times: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.log_count(needle) < times {
            assert!(
                Instant::now() < deadline,
                "`{needle}` not logged {times} times within {within:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the process to exit (after SIGTERM) and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `GET /metrics` as text.
    pub fn metrics(&self) -> String {
        self.try_metrics().unwrap_or_else(|e| {
            panic!(
                "GET /metrics on {}: {e}; daemon log:\n{}",
                self.metrics_port,
                self.log_text()
            )
        })
    }

    /// `GET /metrics` as text, or the I/O error (e.g. the daemon is gone).
    pub fn try_metrics(&self) -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out)?;
        Ok(out)
    }

    /// The value of one metric line (exact name with labels), if present.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
    }

    /// Every `qosroute_requests_total{outcome=...}` counter (empty if the endpoint is gone).
    pub fn outcomes(&self) -> BTreeMap<String, f64> {
        self.try_metrics()
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix("qosroute_requests_total{outcome=\"")?;
                let (outcome, value) = rest.split_once("\"} ")?;
                Some((outcome.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// Resident memory now (`VmRSS`), KiB; `None` once the process is gone.
    pub fn rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.child.id(), "VmRSS")
    }

    /// Peak resident memory so far (`VmHWM`), KiB; `None` once the process is gone.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.child.id(), "VmHWM")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal("TERM");
            if self.wait_exit(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}
