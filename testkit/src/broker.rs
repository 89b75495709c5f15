//! A real mosquitto broker on a free loopback port.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pki::{TlsFiles, readable_by_all};
use crate::{Scratch, free_port, signal, wait_for_port};

/// How a test broker runs.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// Keep sessions, subscriptions and queued messages in `mosquitto.db` in the broker's
    /// scratch folder (saved when it stops gracefully, loaded when it starts).
    pub persistence: bool,
    /// Serve MQTT over TLS (on `port`) with these files.
    pub tls: Option<TlsFiles>,
    /// When not empty: anonymous clients are refused and these (user, password) pairs are
    /// accepted (a `password_file` made with `mosquitto_passwd`).
    pub users: Vec<(String, String)>,
    /// Log every packet (`log_type all`) to the broker log.
    pub verbose: bool,
}

/// A mosquitto broker on a free port, killed on drop. Needs `mosquitto` on PATH or in
/// /usr/sbin (`.ci/run` installs it with apt).
#[derive(Debug)]
pub struct Broker {
    /// The loopback port it listens on (kept across restarts).
    pub port: u16,
    child: Child,
    exe: &'static str,
    conf: PathBuf,
    log: PathBuf,
    options: BrokerOptions,
    dir: Scratch,
}

impl Broker {
    /// A broker with the default options (no persistence, no TLS, anonymous clients).
    pub fn start() -> Self {
        Self::start_with(BrokerOptions::default())
    }

    /// A broker with `options`.
    pub fn start_with(options: BrokerOptions) -> Self {
        let dir = Scratch::new("mosquitto");
        // mosquitto started as root drops to the `mosquitto` user: it must be able to write
        // its persistence file and read its password file here.
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port();
        let conf = dir.path("mosquitto.conf");
        // TCP_NODELAY as the README recommends for gateways: without it a reply that follows
        // the broker's PUBACK to the same device waits for that device's delayed ACK (~40 ms).
        let mut text = format!(
            "listener {port} 127.0.0.1\nmax_queued_messages 100000\nset_tcp_nodelay true\n"
        );
        if let Some(tls) = &options.tls {
            text.push_str(&format!(
                "cafile {}\ncertfile {}\nkeyfile {}\n",
                tls.ca.display(),
                tls.cert.display(),
                tls.key.display()
            ));
        }
        if options.users.is_empty() {
            text.push_str("allow_anonymous true\n");
        } else {
            text.push_str(&format!(
                "allow_anonymous false\npassword_file {}\n",
                dir.path("passwords").display()
            ));
        }
        if options.persistence {
            text.push_str(&format!(
                "persistence true\npersistence_location {}/\n",
                dir.0.display()
            ));
        } else {
            text.push_str("persistence false\n");
        }
        if options.verbose {
            text.push_str("log_type all\n");
        }
        std::fs::write(&conf, text).unwrap();
        let exe = ["/usr/sbin/mosquitto", "mosquitto"]
            .into_iter()
            .find(|p| {
                Command::new(p)
                    .arg("-h")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect("mosquitto is not installed (apt-get install -y mosquitto)");
        write_password_file(&dir.path("passwords"), &options.users);
        let log = dir.path("mosquitto.log");
        let child = spawn_broker(exe, &conf, &log);
        wait_for_port(port, "mosquitto");
        Broker {
            port,
            child,
            exe,
            conf,
            log,
            options,
            dir,
        }
    }

    /// Rewrites the password file; [`Broker::reload`] applies it.
    pub fn set_users(&mut self, users: &[(String, String)]) {
        write_password_file(&self.dir.path("passwords"), users);
        self.options.users = users.to_vec();
    }

    /// SIGHUP: mosquitto reloads its password file.
    pub fn reload(&self) {
        signal(self.child.id(), "HUP");
    }

    /// Kills the broker (no persistence: sessions and subscriptions are lost), waits
    /// `down_for`, and starts it again on the same port.
    pub fn restart(&mut self, down_for: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        self.start_again();
    }

    /// Stops the broker with SIGTERM (with persistence it saves its sessions and queued
    /// messages) and waits for it to exit.
    pub fn stop_gracefully(&mut self) {
        signal(self.child.id(), "TERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "mosquitto ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the broker again on the same port, with the same configuration.
    pub fn start_again(&mut self) {
        self.child = spawn_broker(self.exe, &self.conf, &self.log);
        wait_for_port(self.port, "mosquitto (restarted)");
    }

    /// `mqtt://127.0.0.1:{port}` (also for a TLS listener: swap the scheme for `mqtts`).
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// The broker's log so far (all its runs).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id of the running broker.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_broker(exe: &str, conf: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(exe)
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Writes a mosquitto password file (`mosquitto_passwd -b`) accepting `users`.
fn write_password_file(file: &Path, users: &[(String, String)]) {
    if users.is_empty() {
        return;
    }
    std::fs::write(file, "").unwrap();
    for (user, password) in users {
        let out = Command::new("mosquitto_passwd")
            .arg("-b")
            .arg(file)
            .arg(user)
            .arg(password)
            .output()
            .expect("mosquitto_passwd is not installed (it comes with mosquitto)");
        assert!(
            out.status.success(),
            "mosquitto_passwd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    readable_by_all(file);
}
