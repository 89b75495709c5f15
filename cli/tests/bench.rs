//! `qosroute bench e2e` with tiny settings: mosquitto, the stub experts, the real `qosrouted`;
//! the JSON must have every field with sane values (not the targets: this is not a timed test).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use serde_json::Value;

use common::{build_daemon, repo};

fn has_mosquitto() -> bool {
    [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "mosquitto",
    ]
    .iter()
    .any(|p| {
        Command::new(p)
            .arg("-h")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok()
    })
}

fn num(v: &Value, path: &str) -> f64 {
    let mut x = v;
    for key in path.split('.') {
        x = x
            .get(key)
            .unwrap_or_else(|| panic!("{path}: no `{key}` in {x}"));
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path} is not a number: {x}"))
}

fn check_stats(v: &Value, path: &str, count: f64) {
    assert!(num(v, &format!("{path}.count")) >= count, "{path}.count");
    let p50 = num(v, &format!("{path}.p50_us"));
    let p99 = num(v, &format!("{path}.p99_us"));
    let max = num(v, &format!("{path}.max_us"));
    let mean = num(v, &format!("{path}.mean_us"));
    assert!(
        p50 > 0.0 && p50 <= p99 && p99 <= max,
        "{path}: {p50} {p99} {max}"
    );
    assert!(mean > 0.0 && mean <= max, "{path}: mean {mean}");
}

#[test]
fn a_tiny_bench_reports_every_measurement() {
    if !has_mosquitto() {
        eprintln!("skipped: the bench needs mosquitto");
        return;
    }
    build_daemon();
    let dir = std::env::temp_dir().join(format!("qosroute-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_qosroute"))
        .args([
            "bench",
            "e2e",
            "--policy",
            "qos-greedy",
            "--experts",
            "2",
            "--broker-messages",
            "50",
            "--latency-requests",
            "30",
            "--devices",
            "2",
            "--window",
            "32",
            "--warmup",
            "0.3",
            "--seconds",
            "1",
            "--json",
        ])
        .arg(&json_path)
        .current_dir(repo())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("routed requests/s"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(v["bench"], "e2e");
    assert_eq!(v["policy"], "qos-greedy");
    assert_eq!(num(&v, "settings.experts"), 2.0);
    check_stats(&v, "broker_round_trip", 50.0);
    assert_eq!(num(&v, "broker_round_trip_errors"), 0.0);
    for s in [
        "publish_to_expert",
        "expert_to_first_reply",
        "expert_to_final",
        "added",
        "publish_to_final",
    ] {
        check_stats(&v, &format!("added_latency.{s}"), 30.0);
    }
    assert!(
        v["added_latency"]["errors"].as_object().unwrap().is_empty(),
        "{}",
        v["added_latency"]
    );
    assert!(num(&v, "throughput.completed") > 0.0);
    assert!(num(&v, "throughput.requests_per_s") > 0.0);
    assert!(num(&v, "throughput.published_total") >= num(&v, "throughput.completed_total"));
    assert!(v["throughput"]["errors"].is_object());
    assert!(v["throughput"]["errors_total"].is_object());
    check_stats(&v, "throughput.publish_to_final", 1.0);
    // CPU shares add up: no process used more than the machine did (one 10 ms tick of
    // rounding each).
    let machine = num(&v, "throughput.cpu.machine_busy_cores");
    let daemon = num(&v, "throughput.cpu.daemon_cores");
    let mosquitto = num(&v, "throughput.cpu.mosquitto_cores");
    assert!(daemon > 0.0, "the daemon worked");
    assert!(
        daemon + mosquitto <= machine + 0.05,
        "{daemon} + {mosquitto} > {machine}"
    );
    let served: f64 = v["throughput"]["served_by_expert"]
        .as_object()
        .unwrap()
        .values()
        .map(|x| x.as_f64().unwrap())
        .sum();
    assert!(served >= num(&v, "throughput.completed_total"));
    let idle = num(&v, "memory.idle_vmrss_kib");
    let hwm = num(&v, "memory.vmhwm_kib");
    assert!(idle > 0.0 && hwm >= idle, "{idle} {hwm}");
    assert!(num(&v, "memory.after_vmrss_kib") > 0.0);
    assert!(num(&v, "daemon.decisions") > 0.0);
    // The goals are issue 17's, and each verdict is the measured figure against its goal.
    let targets = v["targets"].as_array().unwrap();
    let goals: Vec<&str> = targets
        .iter()
        .map(|t| t["target"].as_str().unwrap())
        .collect();
    assert_eq!(goals, [">= 10000", "<= 500", "<= 32768"]);
    assert_eq!(
        num(&targets[0], "measured"),
        num(&v, "throughput.requests_per_s")
    );
    assert_eq!(
        num(&targets[1], "measured"),
        num(&v, "added_latency.added.p99_us")
    );
    assert_eq!(num(&targets[2], "measured"), num(&v, "memory.vmhwm_kib"));
    for t in targets {
        let (op, goal) = t["target"].as_str().unwrap().split_once(' ').unwrap();
        let (measured, goal) = (
            t["measured"].as_f64().unwrap(),
            goal.parse::<f64>().unwrap(),
        );
        let met = if op == ">=" {
            measured >= goal
        } else {
            measured <= goal
        };
        assert_eq!(t["met"].as_bool(), Some(met), "{t}");
    }
    // The stubs differ, so the router spreads the load over more than one of them.
    let busy = v["throughput"]["served_by_expert"]
        .as_object()
        .unwrap()
        .values()
        .filter(|x| x.as_f64().unwrap() > 0.0)
        .count();
    assert!(busy >= 2, "{}", v["throughput"]["served_by_expert"]);
    assert!(v["problem"].is_null(), "{}", v["problem"]);
    assert_eq!(v["daemon_exit_code"], 0);
}
