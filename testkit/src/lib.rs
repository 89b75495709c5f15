//! The shared test kit of qosroute: what end-to-end tests need to run the real system on one
//! machine.
//!
//! - [`Broker`]: a real mosquitto on a free loopback port ([`BrokerOptions`]: persistence, TLS,
//!   users; restart, graceful stop and start again), killed on drop.
//! - [`Pki`]: a throw-away CA and server certificate made with the `openssl` CLI.
//! - [`Daemon`]: the real `qosrouted` binary running a generated config (metrics on port 0, the
//!   bound port read from its log): signals, kill, exit, log, `/metrics`, memory from
//!   `/proc`. [`daemon_binary`] finds the binary of the current build.
//! - [`Device`]: an MQTT 5 test device that publishes and collects what arrives.
//! - [`Scratch`] folders removed on drop, [`free_port`].
//!
//! Used by the daemon's end-to-end tests and the hardware-in-loop suite (`hil-tests/`).

// A test kit: its functions fail by panicking with what went wrong (and the logs), like the
// assertions of the tests that call them; a failed setup is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod broker;
mod daemon;
mod device;
mod pki;

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use broker::{Broker, BrokerOptions};
pub use daemon::{Daemon, daemon_binary, proc_status_kib};
pub use device::{Device, DeviceOptions};
pub use pki::{Pki, TlsFiles};

/// A free loopback port (bound then released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A scratch directory removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A new folder `qosroute-{tag}-{pid}-{n}` in the temporary directory.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "qosroute-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A path inside the folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `sig` (`TERM`, `HUP`, `KILL`, ...) to a process with the `kill` command.
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}
