#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `qosroute validate` end to end against servers whose latency model is known: two emulated
//! experts (the emulator runs the simulator's engine in real time), their exact profiles, a
//! trace slice through mosquitto and the real `qosrouted`. Measured and simulated latencies
//! must then agree closely: what is left is the gateway's and the network's overhead, so a
//! large error here is a bug of the replay, the bookkeeping or the comparison, not of a model.
//! Measured (idle machine, debug build): per-token p50/p95 -0.8 %/-0.8 %, TTFT p50/p95
//! -4.6 %/-1.5 %. It found the daemon holding the first chunk up to 50 ms (TTFT p50 -32 %).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use qosroute_core::{ExpertProfile, LatencyModel};
use qosroute_emulator::{EmulatedExpert, EmulatorOptions};

use common::{build_daemon, repo, scratch};

/// A known expert: slow enough that milliseconds of MQTT and gateway overhead are small
/// beside its times (a 300-token prompt prefills in 150 ms, a token takes 20-30 ms).
fn known(name: &str, slots: u32, t0: f64) -> ExpertProfile {
    ExpertProfile {
        name: name.into(),
        model: "qwen25_7b".into(),
        hardware: "emulated".into(),
        source: "known".into(),
        max_slots: slots,
        kv_tokens: 100_000,
        latency: LatencyModel {
            prefill_tok_s: 2_000.0,
            prefill_overhead_s: 0.0,
            decode_t0_s: t0,
            decode_d_s_per_seq: 0.002,
            decode_e_s_per_ctx_token: 1e-6,
        },
    }
}

/// A one-expert catalogue, as `qosroute profile` writes it.
fn profile_file(p: &ExpertProfile, path: &PathBuf) {
    let l = &p.latency;
    let text = format!(
        "name = \"{n}\"\ndescription = \"known\"\n\n[[expert]]\nname = \"{n}\"\nmodel = \"{m}\"\nhardware = \"emulated\"\nsource = \"known\"\nmax_slots = {s}\nkv_tokens = {kv}\n\n[expert.latency]\nprefill_tok_s = {pf:e}\ndecode_t0_s = {t0:e}\ndecode_d_s_per_seq = {d:e}\ndecode_e_s_per_ctx_token = {e:e}\n",
        n = p.name,
        m = p.model,
        s = p.max_slots,
        kv = p.kv_tokens,
        pf = l.prefill_tok_s,
        t0 = l.decode_t0_s,
        d = l.decode_d_s_per_seq,
        e = l.decode_e_s_per_ctx_token,
    );
    std::fs::write(path, text).unwrap();
}

fn rel(sim: f64, real: f64) -> f64 {
    (sim / real - 1.0).abs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_against_known_servers_agrees_with_the_simulator() {
    build_daemon();
    let dir = scratch("validate", "known");
    let profiles = [known("fast", 4, 0.020), known("slow", 2, 0.030)];
    let mut experts = Vec::new();
    let mut files = Vec::new();
    for p in &profiles {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let profile = Arc::new(p.clone());
        experts.push(
            EmulatedExpert::serve(
                profile.clone(),
                EmulatorOptions::for_profile(&profile),
                listener,
            )
            .unwrap(),
        );
        let file = dir.join(format!("{}.toml", p.name));
        profile_file(p, &file);
        files.push(file.display().to_string());
    }
    let urls: Vec<String> = experts.iter().map(EmulatedExpert::base_url).collect();
    let out = dir.join("run");
    let args = vec![
        "validate".to_owned(),
        "--profiles".into(),
        files.join(","),
        "--urls".into(),
        urls.join(","),
        "--served-models".into(),
        experts[0].model_name().to_owned(),
        "--requests".into(),
        "40".into(),
        "--load".into(),
        "0.5".into(),
        "--prompt-scale".into(),
        "0.25".into(),
        "--max-prompt-tokens".into(),
        "512".into(),
        "--max-output-tokens".into(),
        "24".into(),
        "--slo-s-per-token".into(),
        "0.1".into(),
        "--policy".into(),
        "least-loaded".into(),
        "--health-interval-s".into(),
        "0.5".into(),
        "--stale-after-s".into(),
        "5".into(),
        "--drain-timeout-s".into(),
        "60".into(),
        "--out".into(),
        out.display().to_string(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_qosroute"))
            .args(&args)
            .current_dir(repo())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "validate failed:\n{stderr}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("validate.json")).unwrap()).unwrap();
    let table = std::fs::read_to_string(out.join("table.md")).unwrap();
    eprintln!("{table}");
    let measured = &json["measured"];
    let simulated = &json["simulated_replayed_routing"];
    assert_eq!(
        measured["completed"], 40,
        "every request measured: {measured}"
    );
    assert_eq!(
        simulated["completed"], 40,
        "every request simulated: {simulated}"
    );
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 40);
    assert!(
        rows.iter().all(|r| r["observed"]["expert"].is_string()),
        "every request was answered by a named expert"
    );
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
    for (key, tolerance) in [
        ("per_token_p50_s", 0.15),
        ("per_token_p95_s", 0.25),
        ("ttft_p50_s", 0.25),
        ("ttft_p95_s", 0.25),
    ] {
        let (s, m) = (f(simulated, key), f(measured, key));
        assert!(
            rel(s, m) <= tolerance,
            "{key}: simulated {s:.4} s against measured {m:.4} s (error {:.1} %, allowed {:.0} %)\n{table}",
            rel(s, m) * 100.0,
            tolerance * 100.0
        );
    }
    for e in experts {
        e.shutdown().await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
