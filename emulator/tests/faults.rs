//! Each fault knob, set at start or flipped at run time through `POST /admin/faults`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use qosroute_emulator::{EmulatedExpert, Faults};
use serde_json::{Value, json};

async fn set_faults(base: &str, faults: Value) -> reqwest::Response {
    client()
        .post(format!("{base}/admin/faults"))
        .json(&faults)
        .send()
        .await
        .unwrap()
}

async fn whole(base: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
    client()
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
}

#[tokio::test(start_paused = true)]
async fn fail_after_tokens_drops_the_connection_after_n_tokens() {
    let p = profile(4, 20_000, slow_latency());
    let mut o = options(&p);
    o.faults.fail_after_tokens = Some(3);
    let expert = start(p.clone(), o).await;
    let base = expert.base_url();
    let answer = stream_chat(&client(), &base, &chat(50, 10, true)).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.tokens.len(), 3);
    assert!(!answer.done);
    assert!(
        answer.body_error.is_some(),
        "dropped, not ended: {answer:?}"
    );
    // Short answers are unaffected.
    let answer = stream_chat(&client(), &base, &chat(50, 3, true)).await;
    assert!(answer.done && answer.body_error.is_none());
    // A whole answer: headers, then the connection drops.
    let body = match whole(&base, &chat(50, 10, false)).await {
        Ok(response) => response.bytes().await.map(|_| ()),
        Err(e) => Err(e),
    };
    assert!(body.is_err(), "{body:?}");
    // Zero: dropped before any token.
    let r = set_faults(&base, json!({"fail_after_tokens": 0})).await;
    assert_eq!(r.status(), 200);
    let answer = stream_chat(&client(), &base, &chat(50, 10, true)).await;
    assert!(answer.tokens.is_empty() && answer.body_error.is_some());
    // The dropped requests kept their engine slots until the engine finished them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let c = expert.counters();
    assert_eq!(c.dropped, 3);
    assert_eq!(c.engine_completed, 4);
    assert_eq!(c.success_stop, 1);
    expert.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn error_rate_answers_500_to_a_seeded_fraction() {
    let p = profile(64, 200_000, slow_latency());
    let pattern = |seed: u64, rate: f64| {
        let p = p.clone();
        async move {
            let mut o = options(&p);
            o.seed = seed;
            o.faults.error_rate = rate;
            let expert = start(p.clone(), o).await;
            let mut statuses = Vec::new();
            for _ in 0..40 {
                let r = whole(&expert.base_url(), &chat(5, 1, false)).await.unwrap();
                statuses.push(r.status().as_u16());
                if r.status() == 500 {
                    let e: Value = r.json().await.unwrap();
                    assert_eq!(e["error"]["code"], 500);
                }
            }
            expert.shutdown().await.unwrap();
            statuses
        }
    };
    let a = pattern(7, 0.5).await;
    let errors = a.iter().filter(|s| **s == 500).count();
    assert!((8..=32).contains(&errors), "{errors} of 40 at rate 0.5");
    assert!(a.iter().all(|s| *s == 200 || *s == 500));
    assert_eq!(
        a,
        pattern(7, 0.5).await,
        "the same seed, the same requests fail"
    );
    assert_ne!(a, pattern(8, 0.5).await, "another seed, other requests");
    assert!(pattern(1, 1.0).await.iter().all(|s| *s == 500));
}

#[tokio::test(start_paused = true)]
async fn hang_never_answers_until_flipped_off_or_shutdown() {
    let p = profile(4, 20_000, slow_latency());
    let expert = start(p.clone(), options(&p)).await;
    let base = expert.base_url();
    assert_eq!(set_faults(&base, json!({"hang": true})).await.status(), 200);
    let hung = {
        let base = base.clone();
        tokio::spawn(async move { whole(&base, &chat(5, 2, false)).await.map(|r| r.status()) })
    };
    let health = tokio::time::timeout(
        Duration::from_secs(60),
        client().get(format!("{base}/health")).send(),
    )
    .await;
    assert!(
        health.is_err(),
        "a hung server answers nothing, health included"
    );
    assert!(!hung.is_finished());
    // The admin endpoint still answers; new requests are served once the fault is off.
    let faults: Value = set_faults(&base, json!({})).await.json().await.unwrap();
    assert_eq!(faults["hang"], false);
    let r = whole(&base, &chat(5, 2, false)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!hung.is_finished(), "requests that hung stay hung");
    expert.shutdown().await.unwrap();
    assert_eq!(hung.await.unwrap().unwrap(), 503, "released at shutdown");
}

#[tokio::test(start_paused = true)]
async fn slow_start_delays_the_first_byte_of_every_response() {
    let p = profile(4, 20_000, slow_latency());
    let mut o = options(&p);
    o.faults.slow_start_s = 2.5;
    // Faults are wall-clock seconds, whatever the time scale.
    o.time_scale = 0.5;
    let expert = start(p.clone(), o).await;
    let base = expert.base_url();
    let answer = stream_chat(&client(), &base, &chat(400, 3, true)).await;
    assert!(answer.done);
    assert_at(
        answer.headers_at - answer.sent_at,
        2.5,
        0.0011,
        "first byte",
    );
    let ttft = 2.5 + p.latency.prefill_s(400.0) * 0.5;
    assert_at(answer.ttft(), ttft, 0.0011, "ttft after the delay");
    let began = tokio::time::Instant::now();
    let r = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_at(began.elapsed(), 2.5, 0.0011, "metrics too");
    let began = tokio::time::Instant::now();
    set_faults(&base, json!({"slow_start_s": 0.0})).await;
    assert!(
        began.elapsed() < Duration::from_millis(2),
        "admin is never delayed"
    );
    let began = tokio::time::Instant::now();
    client().get(format!("{base}/health")).send().await.unwrap();
    assert!(began.elapsed() < Duration::from_millis(2));
    expert.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn faults_are_validated_and_readable() {
    let p = profile(4, 20_000, slow_latency());
    let expert = start(p.clone(), options(&p)).await;
    let base = expert.base_url();
    for bad in [
        json!({"error_rate": 2.0}),
        json!({"slow_start_s": -1}),
        json!({"hang": "yes"}),
        json!({"explode": true}),
        json!([1]),
    ] {
        let r = set_faults(&base, bad.clone()).await;
        assert_eq!(r.status(), 400, "{bad}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"]["message"].is_string());
    }
    set_faults(&base, json!({"error_rate": 0.25, "fail_after_tokens": 4})).await;
    let got: Value = client()
        .get(format!("{base}/admin/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["error_rate"], 0.25);
    assert_eq!(got["fail_after_tokens"], 4);
    assert_eq!(
        expert.faults(),
        Faults {
            error_rate: 0.25,
            fail_after_tokens: Some(4),
            ..Faults::default()
        }
    );
    assert!(
        expert
            .set_faults(Faults {
                error_rate: -0.1,
                ..Faults::default()
            })
            .is_err()
    );
    expert.shutdown().await.unwrap();
    // Bad options are refused at start.
    let mut o = options(&p);
    o.time_scale = 0.0;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    assert!(EmulatedExpert::serve(p.clone(), o, listener).is_err());
}

/// Unslowed step `k` (1-based) of a lone answer to a prompt of `prompt` tokens, seconds.
fn lone_step_s(prompt: u32, k: usize) -> f64 {
    slow_latency().decode_step_s(1.0, f64::from(prompt) + k as f64)
}

#[tokio::test(start_paused = true)]
async fn slowdown_from_the_start_makes_prefill_and_every_step_k_times_longer() {
    let p = profile(4, 20_000, slow_latency());
    let mut o = options(&p);
    o.faults.slowdown = Some(5.0);
    let expert = start(p.clone(), o).await;
    let (prompt, output) = (400u32, 8u32);
    let answer = stream_chat(&client(), &expert.base_url(), &chat(prompt, output, true)).await;
    assert!(answer.done, "{answer:?}");
    let mut want = 5.0 * slow_latency().prefill_s(f64::from(prompt));
    assert_at(answer.ttft(), want, 0.0011, "ttft");
    for k in 1..output as usize {
        want += 5.0 * lone_step_s(prompt, k);
        assert_at(
            answer.tokens[k].1 - answer.sent_at,
            want,
            0.0011,
            &format!("token {k}"),
        );
    }
    // The extension reports wall-clock times, the slowdown included.
    let x = answer.extension().unwrap();
    assert!((x["e2e_s"].as_f64().unwrap() - want).abs() < 1e-6, "{x}");
    // /health still answers at once: slow but alive.
    let before = tokio::time::Instant::now();
    let health = client()
        .get(format!("{}/health", expert.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(before.elapsed() < Duration::from_millis(5));
    expert.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn slowdown_set_at_run_time_slows_the_answer_in_flight_and_clearing_it_restores_the_speed() {
    let p = profile(4, 20_000, slow_latency());
    let expert = start(p.clone(), options(&p)).await;
    let base = expert.base_url();
    let (prompt, output) = (400u32, 40u32);
    let body = chat(prompt, output, true);
    let answer = tokio::spawn({
        let base = base.clone();
        async move { stream_chat(&client(), &base, &body).await }
    });
    // T: after the prefill and about five steps; T2 two seconds later.
    let started = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(0.5)).await;
    assert_eq!(
        set_faults(&base, json!({"slowdown": 5})).await.status(),
        200
    );
    let t = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(set_faults(&base, json!({})).await.status(), 200);
    let t2 = started.elapsed().as_secs_f64();
    let answer = answer.await.unwrap();
    assert!(answer.done, "{answer:?}");
    assert_eq!(answer.tokens.len(), output as usize);
    let at = |k: usize| (answer.tokens[k].1 - answer.sent_at).as_secs_f64();
    let (mut slowed, mut restored) = (0, 0);
    for k in 1..output as usize {
        let gap = at(k) - at(k - 1);
        let step = lone_step_s(prompt, k);
        if at(k - 1) > t + 0.002 && at(k) < t2 - 0.002 {
            assert!(
                (gap - 5.0 * step).abs() < 0.0022,
                "token {k}: gap {gap}, step {step}"
            );
            slowed += 1;
        } else if at(k - 1) > t2 + 0.002 {
            assert!(
                (gap - step).abs() < 0.0022,
                "token {k}: gap {gap}, step {step}"
            );
            restored += 1;
        }
    }
    // About 2 s / (5 x 58 ms) steps slowed, the rest at full speed again.
    assert!(
        slowed >= 5 && restored >= 10,
        "{slowed} slowed, {restored} restored"
    );
    expert.shutdown().await.unwrap();
}
