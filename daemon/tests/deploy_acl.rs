//! The deployment quick start (`deploy/`) for real: mosquitto runs `deploy/mosquitto/qosroute.conf`
//! with its ACL file (TLS, passwords, `%u` patterns), `qosrouted` runs `deploy/qosrouted.toml`
//! pointed at this broker and an emulated expert. Each device is served on its own topics and
//! refused on another's: a request published on another device's topic never reaches the
//! gateway, and another device's replies never reach a device, even through a wildcard.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qosroute_emulator::Faults;
use qosroute_proto::{Encoding, Reply};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use support::site::{encode, expert, expert_section, request, until_up};
use support::{Device, DeviceOptions, Pki, Scratch, start_daemon_with_env};

fn deploy(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// mosquitto on `deploy/mosquitto/qosroute.conf`, with this machine's files in place of the
/// installed ones; killed on drop.
struct SiteBroker {
    port: u16,
    child: Child,
    dir: Scratch,
}

impl SiteBroker {
    fn start(pki: &Pki, users: &[(&str, &str)]) -> Self {
        let dir = Scratch::new("deploy-broker");
        // mosquitto started as root drops to the `mosquitto` user: it must read and write here.
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777)).unwrap();
        let acl = dir.path("qosroute.acl");
        std::fs::write(&acl, deploy("mosquitto/qosroute.acl")).unwrap();
        let passwords = dir.path("qosroute.passwd");
        std::fs::write(&passwords, "").unwrap();
        for (user, password) in users {
            let out = Command::new("mosquitto_passwd")
                .args([
                    "-b".as_ref(),
                    passwords.as_os_str(),
                    user.as_ref(),
                    password.as_ref(),
                ])
                .output()
                .expect("mosquitto_passwd (package mosquitto)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for f in [&acl, &passwords] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        let port = qosroute_testkit::free_port();
        let tls = &pki.files;
        let mut conf = String::new();
        for line in deploy("mosquitto/qosroute.conf").lines() {
            let key = line.split_whitespace().next().unwrap_or_default();
            let local = match key {
                "listener" => format!("listener {port} 127.0.0.1"),
                "cafile" => format!("cafile {}", tls.ca.display()),
                "certfile" => format!("certfile {}", tls.cert.display()),
                "keyfile" => format!("keyfile {}", tls.key.display()),
                "password_file" => format!("password_file {}", passwords.display()),
                "acl_file" => format!("acl_file {}", acl.display()),
                "persistence_location" => format!("persistence_location {}/", dir.0.display()),
                _ => {
                    assert!(
                        line.starts_with('#') || !line.contains(" /"),
                        "a path this test does not replace: {line}"
                    );
                    line.to_owned()
                }
            };
            conf.push_str(&local);
            conf.push('\n');
        }
        conf.push_str("log_type all\n");
        let conf_path = dir.path("mosquitto.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let log = std::fs::File::create(dir.path("mosquitto.log")).unwrap();
        let child = Command::new("/usr/sbin/mosquitto")
            .arg("-c")
            .arg(&conf_path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto (apt-get install -y mosquitto)");
        let mut broker = SiteBroker { port, child, dir };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return broker;
            }
            if broker.child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("mosquitto did not start:\n{}", broker.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for SiteBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `deploy/qosrouted.toml` with this test's broker, CA, expert and model folder.
fn daemon_config(broker: &SiteBroker, pki: &Pki, expert_toml: &str) -> String {
    let mut c: toml::Table = deploy("qosrouted.toml").parse().unwrap();
    let set = |c: &mut toml::Table, path: &[&str], v: toml::Value| {
        let (last, tables) = path.split_last().unwrap();
        let mut t = c;
        for k in tables {
            t = t.get_mut(*k).and_then(toml::Value::as_table_mut).unwrap();
        }
        assert!(
            t.contains_key(*last),
            "deploy/qosrouted.toml has no {path:?}"
        );
        t.insert((*last).to_owned(), v);
    };
    let s = |v: &str| toml::Value::String(v.to_owned());
    set(
        &mut c,
        &["broker", "url"],
        s(&format!("mqtts://127.0.0.1:{}", broker.port)),
    );
    set(
        &mut c,
        &["broker", "client_id"],
        s(&format!("qosrouted-acl-{}", broker.port)),
    );
    set(
        &mut c,
        &["broker", "tls", "ca_file"],
        s(&pki.files.ca.display().to_string()),
    );
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy-model/models/han");
    set(&mut c, &["policy", "model_dir"], s(model));
    set(
        &mut c,
        &["metrics", "listen"],
        s("127.0.0.1:{metrics_port}"),
    );
    let experts: toml::Table = expert_toml.parse().unwrap();
    set(&mut c, &["expert"], experts["expert"].clone());
    toml::to_string(&c).unwrap()
}

fn device_options(pki: &Pki, user: &str) -> DeviceOptions {
    DeviceOptions {
        session_expiry_s: None,
        tls_ca: Some(pki.files.ca.clone()),
        credentials: Some((user.to_owned(), format!("{user}-secret"))),
    }
}

/// Every reply a device receives within `within`, as (topic, request id, is final).
async fn drain(device: &mut Device, within: Duration) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    while let Some(p) = device.next(within).await {
        let reply = qosroute_proto::decode_reply(&p.payload, Encoding::Json).unwrap();
        let topic = String::from_utf8_lossy(&p.topic).into_owned();
        out.push((
            topic,
            reply.id().as_str().to_owned(),
            matches!(reply, Reply::Final(_)),
        ));
    }
    out
}

fn feedback(id: &str) -> Vec<u8> {
    let mut buf = vec![0u8; qosroute_proto::MAX_FRAME_BYTES];
    let f = qosroute_proto::Feedback::new(id, 0.25).unwrap();
    let n = qosroute_proto::encode_feedback(&f, Encoding::Json, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// Requests the daemon counted, once it has counted `expected` (an outcome is counted just
/// after its reply goes out) or after a second.
async fn requests_total(daemon: &support::Daemon, expected: f64) -> f64 {
    let total = || daemon.outcomes().values().sum::<f64>();
    for _ in 0..50 {
        if total() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    total()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_served_on_its_own_topics_and_refused_on_another_devices() {
    let pki = Pki::generate();
    let users = [
        ("qosrouted", "qosrouted-secret"),
        ("dev-a", "dev-a-secret"),
        ("dev-b", "dev-b-secret"),
    ];
    let broker = SiteBroker::start(&pki, &users);
    let lan = expert("lan", Faults::default()).await;
    let config = daemon_config(&broker, &pki, &expert_section(&lan, "lan"));
    let daemon = start_daemon_with_env(&config, &[("QOSROUTE_MQTT_PASSWORD", "qosrouted-secret")]);
    until_up(&daemon, &["lan"]).await;
    daemon
        .wait_log("connected to the broker", 1, Duration::from_secs(10))
        .await;

    let site = "qosroute/v1/lab";
    let mut a = Device::connect_with(
        broker.port,
        "dev-a",
        &[&format!("{site}/resp/dev-a")],
        &device_options(&pki, "dev-a"),
    )
    .await;
    // Device b tries to read a's replies: by name, and through a wildcard.
    let mut b = Device::connect_with(
        broker.port,
        "dev-b",
        &[&format!("{site}/resp/dev-a"), &format!("{site}/resp/#")],
        &device_options(&pki, "dev-b"),
    )
    .await;

    // a on its own topic (both suffixes): served, and b sees none of it.
    a.publish(
        &format!("{site}/req/dev-a"),
        encode(&request("a-1", false), Encoding::Json),
        PublishProperties::default(),
    )
    .await;
    a.publish(
        &format!("{site}/req/dev-a/json"),
        encode(&request("a-2", false), Encoding::Json),
        PublishProperties::default(),
    )
    .await;
    let got_a = drain(&mut a, Duration::from_secs(2)).await;
    // Served concurrently: either may finish first.
    let mut finals: Vec<&str> = got_a.iter().filter(|r| r.2).map(|r| r.1.as_str()).collect();
    finals.sort_unstable();
    assert_eq!(
        finals,
        ["a-1", "a-2"],
        "a's own requests are answered: {got_a:?}\n{}",
        daemon.log_text()
    );
    assert!(got_a.iter().all(|r| r.0 == format!("{site}/resp/dev-a")));
    assert_eq!(requests_total(&daemon, 2.0).await, 2.0);

    // b publishes on a's request topics (and a's feedback topic): the broker drops it before
    // the gateway, so nothing is served, counted or answered to a.
    for topic in ["req/dev-a", "req/dev-a/json", "req/dev-a/pc"] {
        b.publish(
            &format!("{site}/{topic}"),
            encode(&request("b-spoof", false), Encoding::Json),
            PublishProperties::default(),
        )
        .await;
    }
    b.publish(
        &format!("{site}/feedback/dev-a"),
        feedback("a-1"),
        PublishProperties::default(),
    )
    .await;
    // b on its own topic: served (so the refusal above is the ACL, not the payload).
    b.publish(
        &format!("{site}/req/dev-b"),
        encode(&request("b-1", false), Encoding::Json),
        PublishProperties::default(),
    )
    .await;
    let got_b = drain(&mut b, Duration::from_secs(2)).await;
    let got_a = drain(&mut a, Duration::from_secs(1)).await;
    assert!(
        got_a.is_empty(),
        "a got replies it did not ask for: {got_a:?}"
    );
    assert!(
        got_b
            .iter()
            .all(|r| r.0 == format!("{site}/resp/dev-b") && r.1 == "b-1"),
        "b read something not its own: {got_b:?}"
    );
    assert!(
        got_b.iter().any(|r| r.2),
        "b's own request is answered: {got_b:?}"
    );
    assert_eq!(
        requests_total(&daemon, 3.0).await,
        3.0,
        "{:?}",
        daemon.outcomes()
    );
    // a rates its own answer: that one counts, b's rating of a-1 above never arrived.
    a.publish(
        &format!("{site}/feedback/dev-a/json"),
        feedback("a-2"),
        PublishProperties::default(),
    )
    .await;
    for _ in 0..100 {
        if daemon.metric("qosroute_feedback_total") != Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(daemon.metric("qosroute_feedback_total"), Some(1.0));
    let log = broker.log();
    assert!(log.contains("Denied PUBLISH from dev-b"), "{log}");

    // No account, no session: anonymous clients are refused.
    let anonymous = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.port.to_string(),
            "--cafile",
        ])
        .arg(&pki.files.ca)
        .args(["-t", &format!("{site}/req/dev-a"), "-m", "x", "-q", "1"])
        .output()
        .unwrap();
    assert!(
        !anonymous.status.success(),
        "an anonymous client was let in"
    );
}
