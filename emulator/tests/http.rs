//! The HTTP contract of an emulated expert through a real client on loopback: streamed and
//! whole answers, usage, the quality extension, models, health, errors, disconnects and
//! graceful shutdown.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use qosroute_core::Task;
use qosroute_emulator::DEFAULT_OUTPUT_TOKENS;
use qosroute_sim::QualityTable;
use serde_json::{Value, json};
use tokio::task::JoinSet;

#[tokio::test(start_paused = true)]
async fn a_streamed_answer_has_role_tokens_finish_usage_extension_and_done() {
    let table = Arc::new(QualityTable::embedded().unwrap());
    let p = profile(4, 20_000, slow_latency());
    let mut o = options(&p);
    o.quality = Some(table.clone());
    let expert = start(p.clone(), o).await;
    let row = table.rows.iter().find(|r| r.task == Task::Gsm8k).unwrap();
    let col = table.model_index("qwen25_7b").unwrap();
    let mut body = chat(77, 5, true);
    body["qosroute"]["task"] = json!("gsm8k");
    body["qosroute"]["prompt_id"] = json!(row.id);
    let answer = stream_chat(&client(), &expert.base_url(), &body).await;
    assert_eq!(answer.status, 200);
    assert!(answer.done && answer.body_error.is_none(), "{answer:?}");
    let texts: Vec<&str> = answer.tokens.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(texts, ["tok0 ", "tok1 ", "tok2 ", "tok3 ", "tok4 "]);
    let first = &answer.chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["model"], "qwen25_7b");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let id = first["id"].as_str().unwrap();
    assert!(answer.chunks.iter().all(|c| c["id"] == id));
    assert_eq!(answer.finish_reason().as_deref(), Some("stop"));
    let usage = answer.usage().unwrap();
    assert_eq!(usage["prompt_tokens"], 77);
    assert_eq!(usage["completion_tokens"], 5);
    assert_eq!(usage["total_tokens"], 82);
    let last = answer.chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "usage comes in a final chunk");
    let x = answer.extension().unwrap();
    assert_eq!(x["quality"].as_f64().unwrap(), f64::from(row.quality[col]));
    assert_eq!(x["expert"], "test-expert");
    assert_eq!(x["prompt_tokens"], 77);
    assert_eq!(x["output_tokens"], 5);
    assert!(x["queue_s"].is_number() && x["ttft_s"].is_number());
    // The chunk with the finish reason carries the extension too.
    let finish_chunk = answer
        .chunks
        .iter()
        .find(|c| c["choices"][0]["finish_reason"].is_string())
        .unwrap();
    assert_eq!(finish_chunk["qosroute"], *x);

    // Without include_usage: no usage chunk, the extension still ends the stream.
    let mut body = chat(10, 2, true);
    body["stream_options"] = Value::Null;
    body["qosroute"]["task"] = json!("mmlu");
    let answer = stream_chat(&client(), &expert.base_url(), &body).await;
    assert!(answer.done);
    assert!(answer.usage().is_none());
    let mmlu: Vec<f64> = table
        .rows
        .iter()
        .filter(|r| r.task == Task::Mmlu)
        .map(|r| f64::from(r.quality[col]))
        .collect();
    let mean = mmlu.iter().sum::<f64>() / mmlu.len() as f64;
    let q = answer.extension().unwrap()["quality"].as_f64().unwrap();
    assert!((q - mean).abs() < 1e-9, "task mean {mean}, got {q}");
    expert.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_whole_answer_is_one_completion_with_usage_and_extension() {
    let p = profile(4, 20_000, slow_latency());
    let expert = start(p.clone(), options(&p)).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", expert.base_url());
    let v: Value = c
        .post(&url)
        .json(&chat(30, 4, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "tok0 tok1 tok2 tok3 "
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 30);
    assert_eq!(v["usage"]["completion_tokens"], 4);
    let x = &v["qosroute"];
    assert!(x.get("quality").is_none(), "no quality table: no quality");
    assert_eq!(x["output_tokens"], 4);

    // No extension: prompt estimated from the text (ceil(chars / 4)), default length capped
    // by max_tokens.
    let v: Value = c
        .post(&url)
        .json(&json!({"messages": [{"role": "user", "content": "x".repeat(41)}], "max_tokens": 7}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["prompt_tokens"], 11);
    assert_eq!(v["usage"]["completion_tokens"], 7);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let v: Value = c
        .post(&url)
        .json(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], DEFAULT_OUTPUT_TOKENS);
    // The KV cache limits the answer beside a long prompt.
    let v: Value = c
        .post(&url)
        .json(&chat(19_990, 50, false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 10);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    expert.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_site_that_knows_its_answers_gets_them_whole_up_to_max_tokens() {
    let p = profile(4, 20_000, slow_latency());
    let mut o = options(&p);
    // The answer to a prompt starting with `long` is 40 tokens, to `short` 3; others unknown.
    o.answer_tokens = Some(Arc::new(|head: &str| {
        if head.starts_with("long") {
            Some(40)
        } else if head.starts_with("short") {
            Some(3)
        } else {
            None
        }
    }));
    let expert = start(p.clone(), o).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", expert.base_url());
    let ask = |prompt: &str, max_tokens: u32| json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens});
    for (prompt, max_tokens, tokens, finish) in [
        ("short question", 30, 3, "stop"),
        ("long question", 30, 30, "length"),
        ("long question", 40, 40, "stop"),
        ("other", 200, DEFAULT_OUTPUT_TOKENS, "stop"),
    ] {
        let v: Value = c
            .post(&url)
            .json(&ask(prompt, max_tokens))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            v["usage"]["completion_tokens"], tokens,
            "{prompt} {max_tokens}"
        );
        assert_eq!(
            v["choices"][0]["finish_reason"], finish,
            "{prompt} {max_tokens}"
        );
    }
    expert.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn models_and_health_answer() {
    let p = profile(4, 20_000, slow_latency());
    let mut o = options(&p);
    o.model_name = "Qwen/Qwen2.5-7B-Instruct-AWQ".into();
    let expert = start(p.clone(), o).await;
    let c = client();
    let models: Value = c
        .get(format!("{}/v1/models", expert.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["data"][0]["id"], "Qwen/Qwen2.5-7B-Instruct-AWQ");
    assert_eq!(models["data"][0]["max_model_len"], 20_000);
    let health = c
        .get(format!("{}/health", expert.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    // The served name is the one requests must use.
    let mut body = chat(5, 1, false);
    body["model"] = json!("Qwen/Qwen2.5-7B-Instruct-AWQ");
    let ok = c
        .post(format!("{}/v1/chat/completions", expert.base_url()))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    expert.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let p = profile(4, 2_000, slow_latency());
    let mut o = options(&p);
    o.max_body_bytes = 4096;
    let expert = start(p.clone(), o).await;
    let c = client();
    let url = format!("{}/v1/chat/completions", expert.base_url());
    let cases: Vec<(Vec<u8>, u16, Option<&str>)> = vec![
        (b"".to_vec(), 400, None),
        (b"{not json".to_vec(), 400, None),
        (b"[1,2]".to_vec(), 400, None),
        (b"{}".to_vec(), 400, Some("messages")),
        (br#"{"messages":"hello"}"#.to_vec(), 400, Some("messages")),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"max_tokens":"9"}"#.to_vec(),
            400,
            Some("max_tokens"),
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"stream":1}"#.to_vec(),
            400,
            Some("stream"),
        ),
        (
            br#"{"messages":[{"role":"user","content":"x"}],"qosroute":{"task":"poetry"}}"#
                .to_vec(),
            400,
            Some("qosroute.task"),
        ),
        // The prompt leaves no room in the KV cache.
        (
            br#"{"messages":[{"role":"user","content":"x"}],"qosroute":{"prompt_tokens":2000}}"#
                .to_vec(),
            400,
            Some("messages"),
        ),
        (
            br#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
            Some("model"),
        ),
        // Over the body limit.
        (
            format!(
                r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(5000)
            )
            .into_bytes(),
            413,
            None,
        ),
        (vec![0xff, 0xfe, 0x00], 400, None),
    ];
    for (body, status, param) in &cases {
        let response = c
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let shown = String::from_utf8_lossy(body);
        assert_eq!(response.status().as_u16(), *status, "{shown}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], *status, "{shown}");
        assert!(
            error["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
        assert_eq!(error["error"]["param"].as_str(), *param, "{shown}: {error}");
    }
    let missing = c
        .get(format!("{}/v2/nothing", expert.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    // Still serving.
    let answer = stream_chat(&c, &expert.base_url(), &chat(10, 3, true)).await;
    assert!(answer.done);
    let text = metrics_text(&c, &expert.base_url()).await;
    assert_eq!(
        metric(
            &text,
            "qosroute_emulator_requests_failed_total",
            "reason=\"invalid\""
        ),
        cases.len() as f64
    );
    expert.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_client_gone_mid_stream_keeps_its_slot_until_the_engine_finishes_it() {
    let p = profile(4, 20_000, slow_latency());
    let expert = start(p.clone(), options(&p)).await;
    let c = client();
    let (prompt, output) = (100u32, 20u32);
    let answer =
        stream_chat_upto(&c, &expert.base_url(), &chat(prompt, output, true), Some(2)).await;
    assert_eq!(answer.tokens.len(), 2);
    let sent = answer.sent_at;
    drop(answer); // the response is dropped: the connection closes
    let l = p.latency;
    let finish_s = l.prefill_s(f64::from(prompt))
        + (1..output)
            .map(|k| l.decode_step_s(1.0, f64::from(prompt + k)))
            .sum::<f64>();
    tokio::time::sleep_until(sent + Duration::from_secs_f64(finish_s - 0.05)).await;
    assert_eq!(
        expert.load().running,
        1,
        "still running just before its end"
    );
    tokio::time::sleep_until(sent + Duration::from_secs_f64(finish_s + 0.01)).await;
    assert_eq!(expert.load().running, 0, "finished at its end");
    let counters = expert.counters();
    assert_eq!(counters.disconnected, 1);
    assert_eq!(counters.engine_completed, 1);
    assert_eq!(counters.generation_tokens, u64::from(output));
    assert_eq!(counters.success_stop, 0, "not delivered in full");
    expert.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_completes_answers_in_flight_then_stops() {
    let p = profile(4, 20_000, slow_latency());
    let expert = start(p.clone(), options(&p)).await;
    let base = expert.base_url();
    let mut clients = JoinSet::new();
    for _ in 0..3 {
        let base = base.clone();
        clients.spawn(async move { stream_chat(&client(), &base, &chat(100, 10, true)).await });
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(expert.load().running, 3);
    expert.shutdown().await.unwrap();
    while let Some(answer) = clients.join_next().await {
        let answer = answer.unwrap();
        assert!(answer.done, "completed during the grace period: {answer:?}");
        assert_eq!(answer.tokens.len(), 10);
    }
    // Nothing listens any more.
    assert!(client().get(format!("{base}/health")).send().await.is_err());
}

#[tokio::test(start_paused = true)]
async fn shutdown_ends_answers_longer_than_the_grace_with_an_error_event() {
    let p = profile(4, 20_000, slow_latency());
    let mut o = options(&p);
    o.shutdown_grace = Duration::from_secs(1);
    let expert = start(p.clone(), o).await;
    let base = expert.base_url();
    let mut streamed = JoinSet::new();
    {
        let base = base.clone();
        streamed.spawn(async move { stream_chat(&client(), &base, &chat(100, 1000, true)).await });
    }
    let whole = {
        let base = base.clone();
        tokio::spawn(async move {
            client()
                .post(format!("{base}/v1/chat/completions"))
                .json(&chat(100, 1000, false))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let began = tokio::time::Instant::now();
    expert.shutdown().await.unwrap();
    assert!(
        began.elapsed() <= Duration::from_millis(1100),
        "{:?}",
        began.elapsed()
    );
    let answer = streamed.join_next().await.unwrap().unwrap();
    assert!(!answer.done);
    assert!(answer.body_error.is_none(), "a clean end: {answer:?}");
    assert!(!answer.tokens.is_empty());
    let last = answer.chunks.last().unwrap();
    assert_eq!(last["error"]["code"], 503, "{last}");
    assert_eq!(whole.await.unwrap(), 503);
}
