//! Scenario 9: a real LLM engine as one of the experts, beside emulated ones.

use std::time::Duration;

use anyhow::Context;
use qosroute_core::{LatencyModel, Task};
use qosroute_expert_client::{ChatRequest, ExpertClient, ExpertEndpoint, ExpertKind};
use qosroute_real_engine::{Engine, LlamaServer, SERVED_MODEL, ServerOptions};
use qosroute_swarm::{Outcome, Swarm, unique_prompt};
use qosroute_testkit::Broker;
use tokio::time::Instant;

use super::direct::{Measured, emulated, exported_model, mean, measure, relative_error};
use super::{finish_daemon, probe};
use crate::Scale;
use crate::report::{Report, percent};
use crate::rig::{self, ExpertEntry};

/// The real expert's name in the daemon's configuration.
const REAL: &str = "smollm2-local";
/// The emulated experts beside it, from edge-mixed, at their hardware's speed (real time).
const EMULATED: [&str; 2] = ["rtx4090-gemma2-9b", "rtx3090-codegemma-7b"];
/// Prompt and answer of every request, tokens (the devices send about 4 bytes per token, each
/// prompt starting with its id: no prompt is a prefix of another, so the server's prompt
/// cache cannot skip their prefill). Long prompts, because a prefill observation teaches the
/// calibrator in proportion to its length.
const PROMPT: u32 = 256;
const OUTPUT: u32 = 32;
/// Requests at CI scale, and their rate (per second): above the real server's capacity (about
/// 0.5/s: 1.4 s of prefill and 0.5 s of decode), so that the router must route around its
/// queue.
const REQUESTS: usize = 90;
const RATE: f64 = 0.8;
/// SLO, seconds per output token from receipt to the last token: the real server meets it
/// alone or behind one request, not behind two.
const SLO_S: f64 = 0.15;
/// How much faster than measured the configured prior says the real expert is (a published
/// figure for better hardware, as a user would start from): prefill and decode both.
const OPTIMISM: f64 = 2.0;
/// What the prior is worth to the calibrator (`[calibration] prior_weight`), in observations:
/// a guess, so little.
const PRIOR_WEIGHT: f64 = 2.0;
/// Direct measurements of the server (before and after the run) averaged into the reference.
const PROBES: usize = 3;
/// After the run, the calibrated model's predictions must be within these relative errors of
/// the reference: the decode step (steady) and the time to first token (noisier: HTTP, the
/// chat template, the other core's load).
const STEP_TOLERANCE: f64 = 0.15;
const TTFT_TOLERANCE: f64 = 0.25;
/// The real server meets its SLO for at least this share of the requests it completes.
/// Measured: 15-37 % in five runs before the impact estimator counted the prefill still ahead
/// of a request without a token (core/src/forecast.rs, the planner issue's corrections); after
/// them, with issue 19's calibration changes, 74.0 % (50 requests, CI scale) and 74.7 % (367
/// requests, `--long`; 72 misses in the first third, 5 in the last), 2026-12-07, release
/// build, the 2-core machine saturated by two other engineers' builds and the suite's long
/// runs; and 52.7 % (55 requests, CI scale, the debug build CI runs,
/// `scripts/real-engine.sh ci`). The floor sits above every run before the correction and
/// 12 points under the lowest after it (the server runs on one thread of the same two cores).
const REAL_SLO_FLOOR: f64 = 0.4;

/// One streamed request straight to the server, with the prompt a device sends (request
/// `tag`).
async fn measure_one(client: &ExpertClient, tag: &str) -> anyhow::Result<Measured> {
    measure(
        client,
        ChatRequest::from_prompt(unique_prompt(tag, PROMPT), OUTPUT),
        3,
    )
    .await
}

async fn measure_n(client: &ExpertClient, n: usize, tag: &str) -> anyhow::Result<Vec<Measured>> {
    let mut all = Vec::with_capacity(n);
    for i in 0..n {
        all.push(measure_one(client, &format!("{tag}-{i}")).await?);
    }
    Ok(all)
}

/// A model's predictions for one request of the scenario's shape running alone: its time to
/// first token (prefill of the prompt as the daemon counts it) and its decode step half-way
/// through the answer.
fn predict(l: &LatencyModel) -> (f64, f64) {
    let ttft = f64::from(PROMPT) / l.prefill_tok_s;
    let context = f64::from(PROMPT) + f64::from(OUTPUT) / 2.0;
    (ttft, l.decode_t0_s + l.decode_e_s_per_ctx_token * context)
}

/// A real llama.cpp server (llama-cpp-python serving SmolLM2-135M-Instruct on one CPU core,
/// installed by `scripts/real-engine.sh install`) beside two workstation GPU experts of
/// edge-mixed emulated at their hardware's speed, behind mosquitto and the real daemon (`qos-greedy` router: it sends a
/// request where its predicted QoS is highest, so the real expert, given the highest quality
/// prior, gets every request the router predicts it serves within the SLO). The daemon starts
/// from a prior twice too fast for the real server (measured directly first) worth 2
/// observations; 90 requests (256-token prompts, each unique, 32-token answers) at 0.8/s,
/// above the real server's capacity, from 4 devices, SLO 150 ms per token (about two
/// minutes).
///
/// Asserts: every request ends exactly once; errors only `no_expert`; the real expert served a
/// real share (at least 10 requests, each streamed in chunks); the daemon's online calibration
/// of the real expert moved from the prior to the server's measured speed: after the run its
/// decode step is within 15 % and its time to first token within 25 % of direct measurements
/// (before and after the run), both at most half the prior's error (measured: 51 -> 2.4 % and
/// 49 -> 6.5 %); the trajectory of its
/// coefficients is a figure; the daemon exits 0 on SIGTERM.
pub async fn real_expert(scale: Scale) -> anyhow::Result<Report> {
    let started = Instant::now();
    let mut report = Report::new(9, "real-expert", scale);
    let engine = Engine::find().context("scenario 9 needs the real engine")?;
    let logs = std::env::temp_dir().join(format!("qosroute-hil-real-{}", std::process::id()));
    let mut server =
        LlamaServer::start(&engine, &ServerOptions::default(), &logs.join("llama.log"))?;
    tokio::task::block_in_place(|| server.wait_ready(Duration::from_secs(120)))?;
    report.figure(
        "real engine",
        format!("llama-cpp-python, {}", engine.model.display()),
    );

    // The reference: the server measured directly, alone.
    let mut endpoint =
        ExpertEndpoint::new(REAL, server.base_url(), SERVED_MODEL, ExpertKind::OpenAi);
    endpoint.timeouts.first_token = Duration::from_secs(60);
    let client = ExpertClient::new(endpoint)?;
    // The first answer after loading is slower (caches, page faults): not measured.
    measure_one(&client, "warm-up").await?;
    let before = measure_n(&client, PROBES, "probe-before").await?;

    let quality = rig::quality_table()?;
    let catalogue = rig::edge_mixed()?;
    let broker = Broker::start();
    let experts = emulated(&EMULATED, &catalogue, &quality, 90)?;

    let reference_ttft = mean(before.iter().map(|m| m.ttft_s));
    let reference_step = mean(before.iter().map(|m| m.step_s));
    let prior = LatencyModel {
        prefill_tok_s: f64::from(PROMPT) / reference_ttft * OPTIMISM,
        prefill_overhead_s: 0.0,
        decode_t0_s: reference_step / OPTIMISM,
        decode_d_s_per_seq: 0.0,
        decode_e_s_per_ctx_token: 0.0,
    };
    let real = ExpertEntry {
        name: REAL.into(),
        base_url: server.base_url(),
        model: SERVED_MODEL.into(),
        kind: "openai".into(),
        // Its /v1/models does not answer while it prefills (1.4 s here, more on a busy host).
        health_timeout_s: 30.0,
        quality_model: "llama31_8b".into(),
        max_slots: 1,
        kv_tokens: u64::from(ServerOptions::default().ctx_tokens),
        latency: prior,
        default_quality: 0.9,
        per_task: Vec::new(),
    };
    let mut entries = vec![real];
    entries.extend(experts.iter().map(|e| e.entry(&quality)));
    let site = "hil-real";
    // The server's /v1/models does not answer while it prefills: check every second (stale
    // only after 10 s without an answer).
    let config = super::direct::real_engine_daemon(
        site,
        "qosrouted-hil-real",
        &broker.url(),
        SLO_S,
        entries,
        1.0,
        PRIOR_WEIGHT,
    );
    let mut daemon = rig::start_daemon(&config);
    let mut names = vec![REAL];
    names.extend(EMULATED);
    rig::wait_up(&daemon, &names, Duration::from_secs(60)).await?;
    rig::wait_subscribed(&daemon, Duration::from_secs(10)).await?;

    // The run, with the daemon's model of the real expert sampled every second.
    let n = scale.n(REQUESTS);
    let plan = rig::steady_requests(n, RATE, Task::Chat, PROMPT, OUTPUT);
    let mut swarm_config = rig::swarm_config(&broker.url(), site, 4, 1.0);
    swarm_config.reply_timeout = Duration::from_secs(120);
    swarm_config.unique_prompts = true;
    probe(&swarm_config, &daemon).await?;
    let t0 = Instant::now();
    let mut trajectory = vec![(0.0, prior)];
    let swarm = Swarm::start(swarm_config, &plan, None).await?;
    let mut finishing = std::pin::pin!(swarm.finish());
    let run = loop {
        tokio::select! {
            run = &mut finishing => break run?,
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if let Some(m) = daemon.try_metrics().ok().as_deref().and_then(|m| exported_model(m, REAL)) {
                    trajectory.push((t0.elapsed().as_secs_f64(), m));
                }
            }
        }
    };
    let after = measure_n(&client, PROBES, "probe-after").await?;
    let calibrated = daemon
        .try_metrics()
        .ok()
        .as_deref()
        .and_then(|m| exported_model(m, REAL))
        .context("the daemon exports no latency model of the real expert")?;
    trajectory.push((t0.elapsed().as_secs_f64(), calibrated));

    let s = run.summary();
    report.swarm_figures("", &s);
    let served_real: Vec<_> = run
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed && run.expert_name(r) == Some(REAL))
        .collect();
    let streamed = served_real.iter().filter(|r| r.chunks >= 1).count();
    // Whether the router learned: the real expert's SLO misses in the first and last third.
    let third = served_real.len() / 3;
    let missed = |rs: &[&qosroute_swarm::RequestRecord]| {
        rs.iter().filter(|r| r.slo_met == Some(false)).count()
    };
    if third > 0 {
        report.figure(
            "real expert's SLO misses, first / last third of its requests",
            format!(
                "{} / {} of {third}",
                missed(&served_real[..third]),
                missed(&served_real[served_real.len() - third..])
            ),
        );
    }
    for share in &s.experts {
        report.figure(
            format!("served by {}", share.name),
            format!(
                "{} ({}), per-token p50 {:.1} ms, SLO met {}",
                share.completed,
                percent(share.share),
                share.per_token_p50_s * 1e3,
                percent(1.0 - share.slo_violation_rate)
            ),
        );
    }

    let all: Vec<Measured> = before.iter().chain(&after).copied().collect();
    let reference_ttft = mean(all.iter().map(|m| m.ttft_s));
    let reference_step = mean(all.iter().map(|m| m.step_s));
    report.figure(
        "measured directly (before / after)",
        format!(
            "TTFT {:.0} / {:.0} ms, step {:.2} / {:.2} ms ({} probes of {PROMPT}-token prompts, {}-{} tokens)",
            mean(before.iter().map(|m| m.ttft_s)) * 1e3,
            mean(after.iter().map(|m| m.ttft_s)) * 1e3,
            mean(before.iter().map(|m| m.step_s)) * 1e3,
            mean(after.iter().map(|m| m.step_s)) * 1e3,
            PROBES,
            all.iter().map(|m| m.tokens).min().unwrap_or(0),
            all.iter().map(|m| m.tokens).max().unwrap_or(0),
        ),
    );
    let points: Vec<String> = trajectory
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 == 0 || *i + 1 == trajectory.len())
        .map(|(_, (t, m))| {
            format!(
                "{t:.0}s: prefill {:.0} tok/s, t0 {:.2} ms, e {:.2e}",
                m.prefill_tok_s,
                m.decode_t0_s * 1e3,
                m.decode_e_s_per_ctx_token
            )
        })
        .collect();
    report.figure("calibration of the real expert", points.join("; "));
    let (prior_ttft, prior_step) = predict(&prior);
    let (ttft, step) = predict(&calibrated);
    let (prior_ttft_err, prior_step_err) = (
        relative_error(prior_ttft, reference_ttft),
        relative_error(prior_step, reference_step),
    );
    let (ttft_err, step_err) = (
        relative_error(ttft, reference_ttft),
        relative_error(step, reference_step),
    );
    report.figure(
        "predicted TTFT prior -> calibrated (measured)",
        format!(
            "{:.0} -> {:.0} ms ({:.0} ms): error {} -> {}",
            prior_ttft * 1e3,
            ttft * 1e3,
            reference_ttft * 1e3,
            percent(prior_ttft_err),
            percent(ttft_err)
        ),
    );
    report.figure(
        "predicted decode step prior -> calibrated (measured)",
        format!(
            "{:.2} -> {:.2} ms ({:.2} ms): error {} -> {}",
            prior_step * 1e3,
            step * 1e3,
            reference_step * 1e3,
            percent(prior_step_err),
            percent(step_err)
        ),
    );

    report.swarm_checks("", &s);
    report.check(
        "no error but explicit no_expert refusals",
        s.errors_by_code.keys().all(|code| code == "no_expert"),
        format!("{:?}", s.errors_by_code),
    );
    report.check(
        "the real expert served at least 10 requests, each streamed",
        served_real.len() >= 10 && streamed == served_real.len(),
        format!("{} served, {streamed} with chunks", served_real.len()),
    );
    let real_share = s.experts.iter().find(|e| e.name == REAL);
    report.check(
        format!(
            "the real server met its SLO for at least {} of its requests",
            percent(REAL_SLO_FLOOR)
        ),
        real_share.is_some_and(|e| 1.0 - e.slo_violation_rate >= REAL_SLO_FLOOR),
        real_share.map_or_else(
            || "it completed none".into(),
            |e| format!("{} of {}", percent(1.0 - e.slo_violation_rate), e.completed),
        ),
    );
    report.check(
        format!(
            "calibrated decode step within {} of measured",
            percent(STEP_TOLERANCE)
        ),
        step_err <= STEP_TOLERANCE && step_err <= prior_step_err / 2.0,
        format!(
            "error {} (prior {})",
            percent(step_err),
            percent(prior_step_err)
        ),
    );
    report.check(
        format!(
            "calibrated time to first token within {} of measured",
            percent(TTFT_TOLERANCE)
        ),
        ttft_err <= TTFT_TOLERANCE && ttft_err <= prior_ttft_err / 2.0,
        format!(
            "error {} (prior {})",
            percent(ttft_err),
            percent(prior_ttft_err)
        ),
    );
    finish_daemon(&mut report, &mut daemon, Some(s.completed), "").await;
    drop(experts);
    server.stop();
    if let Some(dir) = std::env::var_os(super::KEEP_LOGS_VAR) {
        let _ = std::fs::copy(
            server.log(),
            std::path::Path::new(&dir).join("9-real-expert-llama.log"),
        );
    }
    let _ = std::fs::remove_dir_all(&logs);
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}
