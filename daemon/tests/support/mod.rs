//! Test support: a real mosquitto broker on a free loopback port, the real `qosrouted` binary
//! with a generated config, and an MQTT 5 test device.

#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "qosroute-{tag}-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
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

/// TLS files of a test PKI: a CA and a server certificate for `127.0.0.1` and `localhost`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate of the CA.
    pub ca: PathBuf,
    /// PEM server certificate, signed by the CA.
    pub cert: PathBuf,
    /// PEM private key of the server certificate.
    pub key: PathBuf,
}

/// A throw-away PKI made with the `openssl` CLI: a P-256 CA and a server certificate with the
/// subject alternative names `IP:127.0.0.1` and `DNS:localhost` (rustls checks them).
#[derive(Debug)]
pub struct Pki {
    pub files: TlsFiles,
    _dir: Scratch,
}

impl Pki {
    pub fn generate() -> Self {
        let dir = Scratch::new("pki");
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir.0)
                .output()
                .expect("the openssl CLI is not installed");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=qosroute test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(&csr);
        std::fs::write(
            dir.path("server.ext"),
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        // mosquitto started as root reads its files after dropping to the `mosquitto` user.
        readable_by_all(&dir.path("server.key"));
        Pki {
            files: TlsFiles {
                ca: dir.path("ca.pem"),
                cert: dir.path("server.pem"),
                key: dir.path("server.key"),
            },
            _dir: dir,
        }
    }
}

fn readable_by_all(file: &Path) {
    std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).unwrap();
}

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
    pub port: u16,
    child: Child,
    exe: &'static str,
    conf: PathBuf,
    log: PathBuf,
    options: BrokerOptions,
    dir: Scratch,
}

impl Broker {
    pub fn start() -> Self {
        Self::start_with(BrokerOptions::default())
    }

    pub fn start_with(options: BrokerOptions) -> Self {
        let dir = Scratch::new("mosquitto");
        // mosquitto started as root drops to the `mosquitto` user: it must be able to write
        // its persistence file and read its password file here.
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
        let port = free_port();
        let conf = dir.path("mosquitto.conf");
        let mut text = format!("listener {port} 127.0.0.1\nmax_queued_messages 100000\n");
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

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
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

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

/// The real `qosrouted` binary running a config; SIGTERM then kill on drop.
#[derive(Debug)]
pub struct Daemon {
    pub child: Child,
    pub log: PathBuf,
    pub config: PathBuf,
    pub metrics_port: u16,
    _dir: Scratch,
}

/// The port of the daemon's metrics endpoint, read from its log once it is bound.
fn bound_metrics_port(log: &std::path::Path, pid: u32) -> u16 {
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
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
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
    /// Starts `qosrouted --config` with `config` (TOML text; `{metrics_port}` is substituted).
    pub fn start(config: &str) -> Self {
        Self::start_with_env(config, &[])
    }

    /// [`Daemon::start`] with extra environment variables for the process.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Self {
        let dir = Scratch::new("daemon");
        let path = dir.path("qosrouted.toml");
        // Port 0: the daemon binds any free port and logs it (a port picked here could be
        // taken by another test before the daemon binds it).
        std::fs::write(&path, config.replace("{metrics_port}", "0")).unwrap();
        let log = dir.path("qosrouted.log");
        let child = Command::new(env!("CARGO_BIN_EXE_qosrouted"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let metrics_port = bound_metrics_port(&log, child.id());
        Daemon {
            child,
            log,
            config: path,
            metrics_port,
            _dir: dir,
        }
    }

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

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /metrics` as text.
    pub fn metrics(&self) -> String {
        let get = || -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
            let mut out = String::new();
            std::io::Read::read_to_string(&mut s, &mut out)?;
            Ok(out)
        };
        get().unwrap_or_else(|e| {
            panic!(
                "GET /metrics on {}: {e}; daemon log:\n{}",
                self.metrics_port,
                self.log_text()
            )
        })
    }

    /// The value of one metric line (exact name with labels), if present.
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
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

/// How a test device connects.
#[derive(Debug, Clone, Default)]
pub struct DeviceOptions {
    /// A persistent session (clean start off) that the broker keeps this long after a
    /// disconnection.
    pub session_expiry_s: Option<u32>,
    /// Connect over TLS, trusting this CA (PEM).
    pub tls_ca: Option<PathBuf>,
    /// User name and password.
    pub credentials: Option<(String, String)>,
}

/// An MQTT 5 device: publishes requests and collects what arrives on its subscriptions.
pub struct Device {
    pub client: rumqttc::v5::AsyncClient,
    pub received: tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
    poller: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Connects as `id` and subscribes to `filters` (waits for the SUBACKs).
    pub async fn connect(port: u16, id: &str, filters: &[&str]) -> Self {
        Self::connect_with(port, id, filters, &DeviceOptions::default()).await
    }

    /// [`Device::connect`] with a persistent session, TLS or credentials.
    pub async fn connect_with(
        port: u16,
        id: &str,
        filters: &[&str],
        device: &DeviceOptions,
    ) -> Self {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(10));
        options.set_max_packet_size(Some(1024 * 1024));
        if let Some(expiry) = device.session_expiry_s {
            options.set_clean_start(false);
            options.set_session_expiry_interval(Some(expiry));
        }
        if let Some((user, password)) = &device.credentials {
            options.set_credentials(user.clone(), password.clone());
        }
        if let Some(ca) = &device.tls_ca {
            let _ = rustls::crypto::ring::default_provider().install_default();
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Simple {
                    ca: std::fs::read(ca).unwrap(),
                    alpn: None,
                    client_auth: None,
                },
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
        let poller = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = acked_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        for f in filters {
            client
                .subscribe(*f, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), acked_rx.recv())
                .await
                .expect("no SUBACK");
        }
        Device {
            client,
            received,
            poller,
        }
    }

    /// Publishes `payload` at QoS 1 with MQTT 5 properties.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        properties: rumqttc::v5::mqttbytes::v5::PublishProperties,
    ) {
        self.client
            .publish_with_properties(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload,
                properties,
            )
            .await
            .unwrap();
    }

    /// The next publish received, within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<rumqttc::v5::mqttbytes::v5::Publish> {
        tokio::time::timeout(within, self.received.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.poller.abort();
    }
}
