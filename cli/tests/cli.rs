//! End-to-end tests of the `qosroute` binary: real files in, table, JSON and SVG out; bad
//! input gives one clear error line and a non-zero exit, never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

fn qosroute(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qosroute"))
        .args(args)
        .current_dir(repo(""))
        .output()
        .unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qosroute-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn compare_prints_a_table_and_writes_json_and_svg() {
    let dir = scratch("compare");
    let json = dir.join("out/compare.json");
    let svg = dir.join("out/compare.svg");
    let out = qosroute(&[
        "compare",
        "--experts",
        "configs/experts/paper-3x7b.toml",
        "--workload",
        "poisson:rate=1.5,n=400",
        "--policies",
        "all",
        "--seeds",
        "1,2",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        svg.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    for policy in qosroute_core::BASELINE_NAMES
        .iter()
        .chain(&[qosroute_core::PLANNER_NAME])
    {
        assert!(stdout.contains(policy), "{policy} missing from\n{stdout}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let summary = v["summary"].as_array().unwrap();
    assert_eq!(summary.len(), 8, "every baseline and qos-planner");
    // The paired difference with qos-greedy: 0 for itself, over both seeds for the others.
    for s in summary {
        let gain = &s["gain_over_qos_greedy"];
        assert_eq!(gain["pairs"].as_u64(), Some(2), "{s}");
        if s["policy"] == "qos-greedy" {
            assert_eq!(gain["mean"].as_f64(), Some(0.0));
        }
    }
    for s in summary {
        for key in [
            "policy",
            "avg_qos_mean",
            "avg_qos_std",
            "slo_violation_rate_mean",
            "reject_rate_mean",
            "efficiency_mean",
        ] {
            assert!(!s[key].is_null(), "{key} missing in {s}");
        }
    }
    assert_eq!(v["runs"].as_array().unwrap().len(), 16);
    let qos = |p: &str| {
        summary.iter().find(|s| s["policy"] == p).unwrap()["avg_qos_mean"]
            .as_f64()
            .unwrap()
    };
    assert!(
        qos("qos-greedy") > qos("random"),
        "qos-greedy must beat random here"
    );
    let svg_text = std::fs::read_to_string(&svg).unwrap();
    assert!(svg_text.contains("<svg") && svg_text.contains("qos-greedy"));
}

#[test]
fn compare_sweep_draws_a_curve_per_policy() {
    let dir = scratch("sweep");
    let svg = dir.join("sweep.svg");
    let json = dir.join("sweep.json");
    let out = qosroute(&[
        "compare",
        "--experts",
        "configs/experts/paper-3x7b.toml",
        "--workload",
        "poisson:rate=1,n=200",
        "--policies",
        "least-loaded,qos-greedy",
        "--seeds",
        "1",
        "--sweep",
        "rate=0.5,2",
        "--plot",
        svg.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let values: Vec<f64> = v["summary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["sweep_value"].as_f64().unwrap())
        .collect();
    assert_eq!(values, vec![0.5, 0.5, 2.0, 2.0]);
    assert!(
        std::fs::read_to_string(&svg)
            .unwrap()
            .contains("least-loaded")
    );
}

#[test]
fn sim_writes_identical_json_for_the_same_seed() {
    let dir = scratch("sim");
    let run = |name: &str| {
        let path = dir.join(name);
        let out = qosroute(&[
            "sim",
            "--experts",
            "configs/experts/edge-mixed.toml",
            "--workload",
            "trace:data/traces/azure-llm-2023-conv.csv,speed=0.5,n=1500",
            "--policy",
            "p2c",
            "--seed",
            "9",
            "--json",
            path.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "stderr: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("avg QoS"));
        std::fs::read(&path).unwrap()
    };
    assert_eq!(run("a.json"), run("b.json"));
}

fn assert_one_line_error(out: &Output, expected: &str) {
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    assert!(
        lines[0].contains(expected),
        "expected `{expected}` in `{}`",
        lines[0]
    );
}

#[test]
fn bad_input_gives_one_clear_error_line() {
    let dir = scratch("bad");
    let catalogue = dir.join("bad.toml");
    std::fs::write(
        &catalogue,
        "name = \"x\"\n[[expert]]\nname = \"a\"\nmodel = \"qwen25_7b\"\nmax_slots = -1\n",
    )
    .unwrap();
    let trace = dir.join("bad.csv");
    std::fs::write(&trace, "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47,12,lots\n").unwrap();
    let cases: Vec<(Vec<String>, String)> = vec![
        (
            vec![
                "sim".into(),
                "--experts".into(),
                "configs/experts/none.toml".into(),
                "--workload".into(),
                "poisson:rate=1".into(),
            ],
            "configs/experts/none.toml: cannot read".into(),
        ),
        (
            vec![
                "sim".into(),
                "--experts".into(),
                catalogue.display().to_string(),
                "--workload".into(),
                "poisson:rate=1".into(),
            ],
            format!("{}:5: -1: invalid value", catalogue.display()),
        ),
        (
            vec![
                "sim".into(),
                "--experts".into(),
                "configs/experts/paper-3x7b.toml".into(),
                "--workload".into(),
                format!("trace:{}", trace.display()),
            ],
            format!("{}:3: GeneratedTokens: `lots`", trace.display()),
        ),
        (
            vec![
                "sim".into(),
                "--experts".into(),
                "configs/experts/paper-3x7b.toml".into(),
                "--workload".into(),
                "poisson:rate=-2".into(),
            ],
            "workload `poisson:rate=-2`: rate must be positive".into(),
        ),
        (
            vec![
                "compare".into(),
                "--experts".into(),
                "configs/experts/paper-3x7b.toml".into(),
                "--workload".into(),
                "poisson:rate=1".into(),
                "--policies".into(),
                "oracle".into(),
            ],
            "unknown policy `oracle`".into(),
        ),
        (
            vec![
                "sim".into(),
                "--experts".into(),
                "configs/experts/paper-3x7b.toml".into(),
                "--workload".into(),
                "poisson:rate=1".into(),
                "--quality".into(),
                trace.display().to_string(),
            ],
            format!("{}:1: id: missing column", trace.display()),
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_line_error(&qosroute(&args), &expected);
    }
    // Unknown flags are clap's: a usage error, exit code 2, no panic.
    let out = qosroute(&["sim", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!text(&out.stderr).contains("panicked"));
    let _ = Path::new(&dir);
}
