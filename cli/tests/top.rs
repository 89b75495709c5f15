//! `qosroute top --once` against a running gateway: mosquitto, two emulated experts, the real
//! `qosrouted`, and a device publishing requests while `top` takes its two scrapes. The frame
//! must show both experts up and the decisions and completions of that traffic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qosroute_core::{ExpertProfile, LatencyModel};
use qosroute_emulator::{EmulatedExpert, EmulatorOptions};
use qosroute_testkit::{Broker, Daemon, free_port};

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn profile(name: &str) -> Arc<ExpertProfile> {
    Arc::new(ExpertProfile {
        name: name.into(),
        model: "qwen25_7b".into(),
        hardware: String::new(),
        source: String::new(),
        max_slots: 8,
        kv_tokens: 100_000,
        latency: LatencyModel {
            prefill_tok_s: 20_000.0,
            prefill_overhead_s: 0.0,
            decode_t0_s: 0.02,
            decode_d_s_per_seq: 0.0002,
            decode_e_s_per_ctx_token: 1e-8,
        },
    })
}

async fn expert(name: &str) -> EmulatedExpert {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = EmulatorOptions::for_profile(&profile(name));
    EmulatedExpert::serve(profile(name), options, listener).unwrap()
}

fn daemon_config(broker_port: u16, experts: &[(&EmulatedExpert, &str)]) -> String {
    let model = common::repo().join("policy-model/models/han");
    let mut c = format!(
        "site = \"top\"\n[broker]\nurl = \"mqtt://127.0.0.1:{broker_port}\"\nclient_id = \"qosrouted-top-{broker_port}\"\n\
         [policy]\nmodel_dir = \"{}\"\n[slo]\ndefault_s_per_token = 0.5\n[metrics]\nlisten = \"127.0.0.1:{{metrics_port}}\"\n\
         [telemetry]\nscrape_interval_s = 0.2\nstale_after_s = 2.0\n",
        model.display()
    );
    for (e, name) in experts {
        c.push_str(&format!(
            "[[expert]]\nname = \"{name}\"\nbase_url = \"{}\"\nmodel = \"qwen25_7b\"\nkind = \"vllm\"\n\
             max_slots = 8\nkv_tokens = 100000\n[expert.latency]\nprefill_tok_s = 20000.0\n\
             decode_t0_s = 0.02\ndecode_d_s_per_seq = 0.0002\ndecode_e_s_per_ctx_token = 1e-8\n\
             [expert.quality]\ndefault = 0.6\n",
            e.base_url()
        ));
    }
    c
}

fn top(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qosroute"))
        .arg("top")
        .args(args)
        .output()
        .unwrap()
}

/// The number before `/s` after `label` in `line`.
fn rate_after(text: &str, label: &str) -> f64 {
    let rest = text
        .split(label)
        .nth(1)
        .unwrap_or_else(|| panic!("no `{label}` in\n{text}"));
    let value = rest.split_whitespace().next().unwrap();
    value
        .trim_end_matches("/s")
        .parse()
        .unwrap_or_else(|_| panic!("`{label}` {value} in\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_once_shows_a_running_gateways_experts_and_rates() {
    common::build_daemon();
    let broker = Broker::start();
    let broker_port = broker.port;
    let (a, b) = (expert("a").await, expert("b").await);
    let qosrouted = PathBuf::from(env!("CARGO_BIN_EXE_qosroute")).with_file_name("qosrouted");
    let daemon = Daemon::start_binary(
        qosrouted,
        &daemon_config(broker_port, &[(&a, "a"), (&b, "b")]),
        &[],
    );
    let port = daemon.metrics_port;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(daemon
        .metrics()
        .contains("qosroute_expert_up{expert=\"a\"} 1")
        && daemon
            .metrics()
            .contains("qosroute_expert_up{expert=\"b\"} 1"))
    {
        assert!(Instant::now() < deadline, "experts not up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A device sends 10 requests a second while `top` scrapes twice, a second apart.
    let mut device = Process(
        Command::new("mosquitto_pub")
            .args([
                "-p",
                &broker_port.to_string(),
                "-q",
                "1",
                "-t",
                "qosroute/v1/top/req/dev-1",
                "-l",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("mosquitto_pub (apt-get install -y mosquitto-clients)"),
    );
    let mut stdin = device.0.stdin.take().unwrap();
    let publisher = std::thread::spawn(move || {
        for i in 0..40 {
            let line = format!(
                "{{\"v\":1,\"id\":\"t{i}\",\"task\":\"mmlu\",\"prompt\":\"What is the capital of France?\",\"max_tokens\":8}}\n"
            );
            if stdin.write_all(line.as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let url = format!("http://127.0.0.1:{port}/metrics");
    let out = top(&["--once", "--interval", "1", "--url", &url]);
    publisher.join().unwrap();
    let frame = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{frame}");
    assert!(
        out.status.success(),
        "{frame}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(frame.contains("rates over 1.0 s"), "{frame}");
    let decisions = rate_after(&frame, "decisions ");
    assert!(
        (3.0..=20.0).contains(&decisions),
        "10 requests/s sent, {decisions} decided/s:\n{frame}"
    );
    assert!(rate_after(&frame, "completed ") > 0.0, "{frame}");
    let rows: Vec<Vec<&str>> = frame
        .lines()
        .filter(|l| l.starts_with("a ") || l.starts_with("b "))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "one row per expert:\n{frame}");
    assert!(
        rows.iter().all(|r| r[1] == "yes"),
        "both experts up:\n{frame}"
    );
    let completed: f64 = rows
        .iter()
        .map(|r| r[4].parse::<f64>().unwrap_or(0.0))
        .sum();
    assert!(completed > 0.0, "the experts' completions add up:\n{frame}");

    // A gateway that does not answer: one error line and a failure exit.
    let dead = top(&[
        "--once",
        "--interval",
        "0.1",
        "--url",
        &format!("http://127.0.0.1:{}/metrics", free_port()),
    ]);
    assert!(!dead.status.success());
    assert!(
        String::from_utf8_lossy(&dead.stderr).contains("cannot connect"),
        "{dead:?}"
    );
}
