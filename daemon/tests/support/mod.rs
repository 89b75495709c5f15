//! Test support: a real mosquitto broker on a free loopback port, the real `qosrouted` binary
//! with a generated config, and an MQTT 5 test device.

#![allow(dead_code)]

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
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

/// A mosquitto broker on a free port, killed on drop. Needs `mosquitto` on PATH or in
/// /usr/sbin (`.ci/run` installs it with apt).
#[derive(Debug)]
pub struct Broker {
    pub port: u16,
    child: Child,
    exe: &'static str,
    conf: PathBuf,
    _dir: Scratch,
}

impl Broker {
    pub fn start() -> Self {
        let dir = Scratch::new("mosquitto");
        let port = free_port();
        let conf = dir.path("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n"
            ),
        )
        .unwrap();
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
        let child = Self::spawn(exe, &conf);
        wait_for_port(port, "mosquitto");
        Broker {
            port,
            child,
            exe,
            conf,
            _dir: dir,
        }
    }

    fn spawn(exe: &str, conf: &std::path::Path) -> Child {
        Command::new(exe)
            .arg("-c")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Kills the broker (no persistence: sessions and subscriptions are lost), waits
    /// `down_for`, and starts it again on the same port.
    pub fn restart(&mut self, down_for: Duration) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(down_for);
        self.child = Self::spawn(self.exe, &self.conf);
        wait_for_port(self.port, "mosquitto (restarted)");
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

impl Daemon {
    /// Starts `qosrouted --config` with `config` (TOML text; `{metrics_port}` is substituted).
    pub fn start(config: &str) -> Self {
        let dir = Scratch::new("daemon");
        let metrics_port = free_port();
        let path = dir.path("qosrouted.toml");
        std::fs::write(
            &path,
            config.replace("{metrics_port}", &metrics_port.to_string()),
        )
        .unwrap();
        let log = dir.path("qosrouted.log");
        let child = Command::new(env!("CARGO_BIN_EXE_qosrouted"))
            .arg("--config")
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        wait_for_port(metrics_port, "qosrouted metrics");
        Daemon {
            child,
            log,
            config: path,
            metrics_port,
            _dir: dir,
        }
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
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
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
        out
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

/// An MQTT 5 device: publishes requests and collects what arrives on its subscriptions.
pub struct Device {
    pub client: rumqttc::v5::AsyncClient,
    pub received: tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
    poller: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Connects as `id` and subscribes to `filters` (waits for the SUBACKs).
    pub async fn connect(port: u16, id: &str, filters: &[&str]) -> Self {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(10));
        options.set_max_packet_size(Some(1024 * 1024));
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
