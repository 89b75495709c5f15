//! The results pipeline in CI: every committed table, plot and doc region must be what its kept
//! JSON gives (`qosroute report check`: no hand edits), and the reduced form of every fast
//! experiment must still run (`qosroute report smoke`, a few seconds).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn qosroute(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_qosroute"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("qosroute runs")
}

#[test]
fn committed_tables_match_their_kept_json() {
    let out = qosroute(&["report", "check"]);
    assert!(
        out.status.success(),
        "generated tables drifted from their kept JSON (regenerate with `qosroute report tables`, never edit by hand):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_fast_experiment_runs_in_its_reduced_form() {
    let scratch = std::env::temp_dir().join(format!("qosroute-report-test-{}", std::process::id()));
    let out = qosroute(&["report", "smoke", "--out", scratch.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "report smoke failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Every fast experiment drew its table from what its commands wrote.
    let list = std::fs::read_to_string(repo().join("docs/results/experiments.toml")).unwrap();
    let fast: Vec<&str> = list
        .split("[[experiment]]")
        .filter(|block| block.contains("kind = \"fast\""))
        .filter_map(|block| block.lines().find_map(|l| l.strip_prefix("name = \"")))
        .map(|n| n.trim_end_matches('"'))
        .collect();
    assert!(!fast.is_empty());
    for name in fast {
        let table = std::fs::read_to_string(scratch.join(format!("{name}.md"))).unwrap();
        assert!(table.contains("| qos-greedy |"), "{name}: {table}");
    }
    let _ = std::fs::remove_dir_all(&scratch);
}
