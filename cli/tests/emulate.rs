//! `qosroute emulate` end to end: the real binary serves a catalogue, announces each expert on
//! stdout, answers over HTTP, and stops cleanly on SIGTERM.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// One HTTP/1.1 request with `Connection: close`; the whole response as text.
fn http(addr: &str, method: &str, path: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// Kills the child if the test fails before it stops it.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn emulate_announces_every_expert_serves_and_stops_on_sigterm() {
    let child = Command::new(env!("CARGO_BIN_EXE_qosroute"))
        .args([
            "emulate",
            "--experts",
            "configs/experts/edge-mixed.toml",
            "--listen",
            "127.0.0.1:0",
            "--time-scale",
            "0.01",
        ])
        .current_dir(repo())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = Guard(child);
    let stdout = guard.0.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let mut ready = Vec::new();
    for _ in 0..6 {
        ready.push(lines.recv_timeout(Duration::from_secs(120)).unwrap());
    }
    let names: Vec<&str> = ready.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(
        names,
        [
            "rtx4090-gemma2-9b",
            "rtx3090-codegemma-7b",
            "l4-qwen25-7b-awq",
            "a10g-llama31-8b-fp16",
            "agx-orin-mistral-7b-int4",
            "orin-nano-llama31-8b-int4"
        ]
    );
    let mut ports = Vec::new();
    for line in &ready {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 3, "`name model url`: {line}");
        let addr = fields[2].strip_prefix("http://").unwrap();
        ports.push(addr.to_owned());
        let health = http(addr, "GET", "/health", "");
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    }
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 6, "one port each");
    // The first expert answers a chat completion with its quality.
    let addr = ready[0]
        .split(' ')
        .nth(2)
        .unwrap()
        .strip_prefix("http://")
        .unwrap();
    let model = ready[0].split(' ').nth(1).unwrap();
    assert_eq!(model, "gemma2_9b");
    let answer = http(
        addr,
        "POST",
        "/v1/chat/completions",
        &format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}],"qosroute":{{"output_tokens":3,"task":"mmlu"}}}}"#
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains(r#""completion_tokens":3"#), "{answer}");
    assert!(answer.contains(r#""quality":"#), "{answer}");

    let status = Command::new("kill")
        .args(["-TERM", &guard.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(exit) = guard.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "still running 60 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    guard
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(exit.success(), "{exit:?}: {stderr}");
    assert!(stderr.contains("SIGTERM"), "{stderr}");
    reader.join().unwrap();
}

#[test]
fn emulate_refuses_an_unknown_expert_name() {
    let out = Command::new(env!("CARGO_BIN_EXE_qosroute"))
        .args([
            "emulate",
            "--experts",
            "configs/experts/edge-mixed.toml",
            "--listen",
            "127.0.0.1:0",
            "--only",
            "nope",
        ])
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no expert named `nope`"), "{stderr}");
    assert!(stderr.contains("rtx4090-gemma2-9b"), "{stderr}");
}
