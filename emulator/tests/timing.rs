//! What an HTTP client sees of an emulated expert's timing equals what the simulator's engine
//! computes for the same arrivals. Paused Tokio time drives the emulator deterministically
//! (timers fire on millisecond ticks, so every observed time is the engine's, rounded up to
//! the next millisecond); one real-time test checks the same with generous bounds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use qosroute_core::{ExpertProfile, LatencyModel};
use qosroute_sim::engine::{EngineEvent, ExpertEngine, Job};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Timer resolution: an event due at `t` is seen in `[t, t + 1 ms]`.
const TICK_S: f64 = 0.0011;

#[tokio::test(start_paused = true)]
async fn a_lone_request_gets_prefill_ttft_and_step_model_token_gaps() {
    let p = profile(4, 20_000, slow_latency());
    let expert = start(p.clone(), options(&p)).await;
    let client = client();
    let (prompt, output) = (400u32, 12u32);
    let answer = stream_chat(&client, &expert.base_url(), &chat(prompt, output, true)).await;
    assert_eq!(answer.status, 200);
    assert!(answer.done, "{answer:?}");
    assert_eq!(answer.tokens.len(), output as usize);
    let l = p.latency;
    // TTFT = prompt / prefill_tok_s.
    assert_at(
        answer.ttft(),
        l.prefill_s(f64::from(prompt)),
        TICK_S,
        "ttft",
    );
    // Step k (k = 1..) runs over a context of prompt + k tokens: t0 + e*C (batch of one).
    let mut want = l.prefill_s(f64::from(prompt));
    for k in 1..output as usize {
        want += l.decode_step_s(1.0, f64::from(prompt) + k as f64);
        assert_at(
            answer.tokens[k].1 - answer.sent_at,
            want,
            TICK_S,
            &format!("token {k}"),
        );
    }
    let text: String = answer.tokens.iter().map(|(t, _)| t.as_str()).collect();
    assert!(text.starts_with("tok0 tok1 tok2 "), "{text}");
    let x = answer.extension().unwrap();
    assert!((x["ttft_s"].as_f64().unwrap() - l.prefill_s(f64::from(prompt))).abs() < 1e-9);
    assert_eq!(x["queue_s"].as_f64().unwrap(), 0.0);
    expert.shutdown().await.unwrap();
}

#[derive(Debug, Clone, Copy)]
struct Arrival {
    at_s: f64,
    prompt: u32,
    output: u32,
}

/// First-token and last-token times of every arrival, from `ExpertEngine` driven directly.
fn engine_times(profile: &Arc<ExpertProfile>, arrivals: &[Arrival]) -> Vec<(f64, f64)> {
    let mut engine = ExpertEngine::new(profile.clone());
    let mut out = vec![(f64::NAN, f64::NAN); arrivals.len()];
    let mut events = Vec::new();
    let mut record = |events: &mut Vec<EngineEvent>| {
        for e in events.drain(..) {
            match e {
                EngineEvent::FirstToken { idx, at_s } => out[idx].0 = at_s,
                EngineEvent::Completed { idx, at_s, .. } => out[idx].1 = at_s,
            }
        }
    };
    for (idx, a) in arrivals.iter().enumerate() {
        while engine.next_event_s().is_some_and(|t| t <= a.at_s) {
            engine.complete_phase(&mut events);
            record(&mut events);
        }
        engine.enqueue(
            Job {
                idx,
                prompt_tokens: a.prompt,
                output_tokens: a.output,
                generated_tokens: 0,
            },
            a.at_s,
        );
    }
    while engine.next_event_s().is_some() {
        engine.complete_phase(&mut events);
        record(&mut events);
    }
    out
}

#[tokio::test(start_paused = true)]
async fn concurrent_requests_slow_each_other_and_queue_as_the_engine_says() {
    // Two slots: arrivals beyond them queue; batching stretches every step.
    let p = profile(2, 6_000, slow_latency());
    let time_scale = 0.5;
    let mut o = options(&p);
    o.time_scale = time_scale;
    let expert = start(p.clone(), o).await;
    let arrivals = [
        Arrival {
            at_s: 0.0,
            prompt: 300,
            output: 20,
        },
        Arrival {
            at_s: 0.1,
            prompt: 100,
            output: 6,
        },
        Arrival {
            at_s: 0.152,
            prompt: 800,
            output: 30,
        },
        Arrival {
            at_s: 0.4,
            prompt: 50,
            output: 12,
        },
        Arrival {
            at_s: 0.402,
            prompt: 2_000,
            output: 9,
        },
        Arrival {
            at_s: 1.0,
            prompt: 10,
            output: 3,
        },
        Arrival {
            at_s: 2.5,
            prompt: 120,
            output: 1,
        },
    ];
    let base = expert.base_url();
    let start_at = Instant::now();
    let mut clients = JoinSet::new();
    for (i, a) in arrivals.iter().copied().enumerate() {
        let base = base.clone();
        clients.spawn(async move {
            // Engine seconds are wall seconds / time_scale.
            tokio::time::sleep_until(start_at + Duration::from_secs_f64(a.at_s * time_scale)).await;
            (
                i,
                stream_chat(&client(), &base, &chat(a.prompt, a.output, true)).await,
            )
        });
    }
    let mut answers: Vec<Option<common::Streamed>> = (0..arrivals.len()).map(|_| None).collect();
    while let Some(joined) = clients.join_next().await {
        let (i, answer) = joined.unwrap();
        answers[i] = Some(answer);
    }
    let answers: Vec<common::Streamed> = answers.into_iter().map(Option::unwrap).collect();
    // The engine, driven directly, on the arrival times the requests were actually sent at.
    let sent: Vec<Arrival> = arrivals
        .iter()
        .zip(&answers)
        .map(|(a, answer)| {
            let at_s = (answer.sent_at - start_at).as_secs_f64() / time_scale;
            assert!(
                (at_s - a.at_s).abs() < 0.002,
                "sent at {at_s}, planned {}",
                a.at_s
            );
            Arrival { at_s, ..*a }
        })
        .collect();
    let want = engine_times(&p, &sent);
    let mut slowed = false;
    for (i, (a, answer)) in sent.iter().zip(&answers).enumerate() {
        assert!(answer.done, "request {i}: {answer:?}");
        assert_eq!(answer.tokens.len(), a.output as usize, "request {i}");
        let (first, last) = want[i];
        let ttft = (first - a.at_s) * time_scale;
        let e2e = (last - a.at_s) * time_scale;
        assert_at(answer.ttft(), ttft, TICK_S, &format!("request {i} ttft"));
        assert_at(
            answer.last_token(),
            e2e,
            TICK_S,
            &format!("request {i} last token"),
        );
        // Per-token latency as the simulator scores it: (finish - arrival) / output tokens.
        let per_token = answer.last_token().as_secs_f64() / f64::from(a.output);
        assert!((per_token - e2e / f64::from(a.output)).abs() <= TICK_S / f64::from(a.output));
        let x = answer.extension().unwrap();
        assert!(
            (x["ttft_s"].as_f64().unwrap() - ttft).abs() < 1e-6,
            "request {i}: {x}"
        );
        assert!(
            (x["e2e_s"].as_f64().unwrap() - e2e).abs() < 1e-6,
            "request {i}: {x}"
        );
        // Alone, the request would take its prefill plus one step per token at batch 1.
        let alone = p.latency.prefill_s(f64::from(a.prompt))
            + (1..a.output)
                .map(|k| p.latency.decode_step_s(1.0, f64::from(a.prompt + k)))
                .sum::<f64>();
        slowed |= e2e > alone * time_scale + 0.05;
    }
    assert!(
        slowed,
        "the workload must make requests slow each other down"
    );
    // The third request waited for a slot.
    let queued = answers[2].extension().unwrap()["queue_s"].as_f64().unwrap();
    assert!(queued > 0.0, "{queued}");
    expert.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn requests_beyond_the_slots_wait_and_metrics_and_slots_show_it() {
    let p = profile(2, 10_000, slow_latency());
    let expert = start(p.clone(), options(&p)).await;
    let base = expert.base_url();
    let mut clients = JoinSet::new();
    for _ in 0..3 {
        let base = base.clone();
        clients.spawn(async move { stream_chat(&client(), &base, &chat(200, 40, true)).await });
    }
    // Two prefill together (0.2 s), then decode 39 steps of ~0.06 s; the third waits.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = client();
    let text = metrics_text(&c, &base).await;
    assert_eq!(metric(&text, "vllm:num_requests_running", "qwen25_7b"), 2.0);
    assert_eq!(metric(&text, "vllm:num_requests_waiting", "qwen25_7b"), 1.0);
    let kv = 2.0 * 240.0 / 10_000.0;
    assert_eq!(metric(&text, "vllm:kv_cache_usage_perc", "model_name"), kv);
    assert_eq!(metric(&text, "vllm:gpu_cache_usage_perc", "model_name"), kv);
    let slots: serde_json::Value = c
        .get(format!("{base}/slots"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let busy: Vec<bool> = slots
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["is_processing"].as_bool().unwrap())
        .collect();
    assert_eq!(busy, [true, true]);
    assert_eq!(slots[0]["n_ctx"], 5_000);
    let load = expert.load();
    assert_eq!((load.running, load.waiting), (2, 1));
    while let Some(answer) = clients.join_next().await {
        assert!(answer.unwrap().done);
    }
    let text = metrics_text(&c, &base).await;
    assert_eq!(
        metric(&text, "vllm:num_requests_running", "model_name"),
        0.0
    );
    assert_eq!(
        metric(&text, "vllm:num_requests_waiting", "model_name"),
        0.0
    );
    assert_eq!(metric(&text, "vllm:kv_cache_usage_perc", "model_name"), 0.0);
    assert_eq!(
        metric(
            &text,
            "vllm:request_success_total",
            "finished_reason=\"stop\""
        ),
        3.0
    );
    assert_eq!(
        metric(&text, "vllm:generation_tokens_total", "model_name"),
        120.0
    );
    assert_eq!(
        metric(&text, "vllm:prompt_tokens_total", "model_name"),
        600.0
    );
    assert_eq!(
        metric(
            &text,
            "qosroute_emulator_requests_received_total",
            "model_name"
        ),
        3.0
    );
    expert.shutdown().await.unwrap();
}

/// Real time, ten times faster than the model: tokens are never early, and not much late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_real_time_tokens_come_at_the_scaled_engine_times() {
    let p = profile(
        4,
        20_000,
        LatencyModel {
            prefill_tok_s: 1000.0,
            prefill_overhead_s: 0.0,
            decode_t0_s: 0.2,
            decode_d_s_per_seq: 0.0,
            decode_e_s_per_ctx_token: 1e-4,
        },
    );
    let time_scale = 0.1;
    let mut o = options(&p);
    o.time_scale = time_scale;
    let expert = start(p.clone(), o).await;
    let answer = stream_chat(&client(), &expert.base_url(), &chat(500, 6, true)).await;
    assert!(answer.done);
    let l = p.latency;
    // 50 ms to the first token, then steps of 25.01, 25.02, ... ms.
    let mut want = l.prefill_s(500.0);
    let slack_s = 0.5; // a loaded shared machine: early would be a bug, late is noise
    assert_at(answer.ttft(), want * time_scale, slack_s, "ttft");
    for k in 1..6 {
        want += l.decode_step_s(1.0, 500.0 + k as f64);
        let got = answer.tokens[k].1 - answer.sent_at;
        // Sent no earlier than due (the request reached the server after `sent_at`).
        assert_at(got, want * time_scale, slack_s, &format!("token {k}"));
    }
    expert.shutdown().await.unwrap();
}
