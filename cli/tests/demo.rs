//! End-to-end tests of `qosroute demo` with tiny settings: the embedded broker, the emulated
//! experts, the real `qosrouted` and the device swarm; every request must be accounted for in
//! the JSON it writes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{build_daemon, repo, scratch};

fn demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qosroute"))
        .arg("demo")
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn check_svg(path: &Path) {
    let s = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(s.starts_with("<svg"), "{}", path.display());
}

#[test]
fn a_tiny_demo_accounts_for_every_request_of_every_router_and_seed() {
    build_daemon();
    let out_dir = scratch("demo", "tiny");
    let out = demo(&[
        "--compare",
        "han,least-loaded",
        "--seeds",
        "1,2",
        "--minutes",
        "0.25",
        "--speed",
        "20",
        "--devices",
        "6",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains("han") && stdout.contains("least-loaded"),
        "{stdout}"
    );
    assert!(stdout.contains("share of completed"), "{stdout}");
    assert!(
        stdout.contains("avg QoS ± std"),
        "the per-router table over seeds: {stdout}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("demo.json")).unwrap()).unwrap();
    let requests = json["demo"]["requests"].as_u64().unwrap();
    assert!(requests > 20, "{requests}");
    assert_eq!(json["interrupted"], false);
    // The devices send a per-task bound as max_tokens, from the trace's first 40 minutes,
    // and replay minutes after them.
    assert_eq!(json["demo"]["trace_window_minutes"][0].as_f64(), Some(40.0));
    let workloads = json["demo"]["workloads"].as_array().unwrap();
    assert_eq!(workloads.len(), 2);
    for w in workloads {
        let bounds = w["max_tokens"]["per_task"].as_array().unwrap();
        assert!(!bounds.is_empty(), "{w}");
        assert!(
            bounds
                .iter()
                .all(|b| b["max_tokens"].as_u64().unwrap() > 300),
            "{w}"
        );
    }
    let summary = json["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 2);
    for s in summary {
        assert_eq!(s["seeds"], serde_json::json!([1, 2]), "{s}");
        assert!(
            s["avg_qos_mean"].is_number() && s["avg_qos_std"].is_number(),
            "{s}"
        );
    }
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 4);
    for run in runs {
        let policy = run["policy"].as_str().unwrap();
        let seed = run["seed"].as_u64().unwrap();
        assert!(seed == 1 || seed == 2, "{policy}: seed {seed}");
        let s = &run["summary"];
        let n = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{policy}: {k}"));
        assert_eq!(n("requests"), requests, "{policy}");
        assert_eq!(
            n("completed") + n("errors") + n("lost") + n("not_sent"),
            requests,
            "{policy}: {s}"
        );
        assert_eq!(s["accounted"], true, "{policy}");
        assert_eq!(
            (n("lost"), n("not_sent"), n("duplicated")),
            (0, 0, 0),
            "{policy}: {s}"
        );
        assert!(n("completed") > 0, "{policy}: {s}");
        assert_eq!(s["slo_judged_by"], "device", "{policy}: {s}");
        let records = run["report"]["records"].as_array().unwrap();
        assert_eq!(records.len() as u64, requests);
        let mut answer_not_max = 0;
        for (i, r) in records.iter().enumerate() {
            assert_eq!(r["index"].as_u64(), Some(i as u64));
            assert_eq!(r["ends"].as_u64(), Some(1), "{policy}: {r}");
            assert!(r["published_s"].is_number(), "{policy}: {r}");
            if r["outcome"] == "completed" {
                // Answers are at most max_tokens long, and most are shorter (their true
                // length), not max_tokens.
                let (n, max) = (r["output_tokens"].as_u64(), r["max_tokens"].as_u64());
                assert!(n <= max, "{policy}: {r}");
                answer_not_max += usize::from(n < max);
                assert!(r["slo_s_per_token"].is_number(), "{policy}: {r}");
                assert!(r["last_token_s"].is_number(), "{policy}: {r}");
            }
        }
        assert!(
            answer_not_max * 10 >= n("completed") as usize * 9,
            "{policy}: {s}"
        );
        assert!(s["avg_qos"].is_number(), "{policy}: {s}");
        assert_eq!(run["daemon_exit_code"].as_i64(), Some(0), "{policy}");
        let daemon = &run["daemon"];
        assert_eq!(
            daemon["requests_by_outcome"]["completed"].as_f64(),
            Some(n("completed") as f64),
            "{policy}: {daemon}"
        );
    }
    for svg in ["qos-over-time.svg", "latency.svg", "expert-share.svg"] {
        check_svg(&out_dir.join(svg));
    }
    let _ = std::fs::remove_dir_all(&out_dir);
}

#[test]
fn a_router_the_daemon_cannot_run_is_refused_precisely() {
    let out = demo(&["--policy", "oracle"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("`oracle`") && err.contains("qos-greedy") && err.contains("han:DIR"),
        "{err}"
    );
}

#[test]
fn a_missing_daemon_binary_says_how_to_build_it() {
    let out = demo(&["--policy", "least-loaded", "--daemon", "/no/such/qosrouted"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("cargo build --release -p qosroute-daemon -p qosroute-cli"),
        "{err}"
    );
}
