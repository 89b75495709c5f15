//! Helpers of the integration tests: emulated experts on 127.0.0.1:0, a reqwest client that
//! timestamps every server-sent event, and a reader of Prometheus text.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use qosroute_core::{ExpertProfile, LatencyModel};
use qosroute_emulator::{EmulatedExpert, EmulatorOptions};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;

pub fn profile(slots: u32, kv_tokens: u64, latency: LatencyModel) -> Arc<ExpertProfile> {
    Arc::new(ExpertProfile {
        name: "test-expert".into(),
        model: "qwen25_7b".into(),
        hardware: String::new(),
        source: String::new(),
        max_slots: slots,
        kv_tokens,
        latency,
    })
}

/// A slow expert: steps of 50+ ms, so that timer granularity (1 ms) is small beside them.
pub fn slow_latency() -> LatencyModel {
    LatencyModel {
        prefill_tok_s: 2000.0,
        prefill_overhead_s: 0.0,
        decode_t0_s: 0.05,
        decode_d_s_per_seq: 0.004,
        decode_e_s_per_ctx_token: 2e-5,
    }
}

pub fn options(profile: &ExpertProfile) -> EmulatorOptions {
    EmulatorOptions::for_profile(profile)
}

pub async fn start(profile: Arc<ExpertProfile>, options: EmulatorOptions) -> EmulatedExpert {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    EmulatedExpert::serve(profile, options, listener).unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A chat request with the emulator's extension fixing the lengths.
pub fn chat(prompt_tokens: u32, output_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "qwen25_7b",
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "stream": stream,
        "stream_options": {"include_usage": true},
        "qosroute": {"prompt_tokens": prompt_tokens, "output_tokens": output_tokens},
    })
}

/// One streamed answer as the client saw it.
#[derive(Debug)]
pub struct Streamed {
    pub status: u16,
    pub sent_at: Instant,
    pub headers_at: Instant,
    /// The content of every non-empty delta, with the arrival of its bytes.
    pub tokens: Vec<(String, Instant)>,
    /// Every `data:` payload that was JSON.
    pub chunks: Vec<Value>,
    /// `data: [DONE]` was seen.
    pub done: bool,
    /// The body ended with a transport error (connection dropped).
    pub body_error: Option<String>,
    /// Every `data:` payload that was not JSON nor `[DONE]`.
    pub other: Vec<String>,
}

impl Streamed {
    pub fn finish_reason(&self) -> Option<String> {
        self.chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str().map(str::to_owned))
    }

    pub fn usage(&self) -> Option<&Value> {
        self.chunks
            .iter()
            .rev()
            .find_map(|c| c.get("usage").filter(|u| !u.is_null()))
    }

    pub fn extension(&self) -> Option<&Value> {
        self.chunks
            .iter()
            .rev()
            .find_map(|c| c.get("qosroute").filter(|u| !u.is_null()))
    }

    pub fn ttft(&self) -> Duration {
        self.tokens[0].1 - self.sent_at
    }

    pub fn last_token(&self) -> Duration {
        self.tokens.last().unwrap().1 - self.sent_at
    }
}

/// Reads a whole streamed answer; at most `max_tokens_read` tokens when given (then drops it).
pub async fn stream_chat_upto(
    client: &reqwest::Client,
    base: &str,
    body: &Value,
    max_tokens_read: Option<usize>,
) -> Streamed {
    let sent_at = Instant::now();
    let mut response = client
        .post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    let mut answer = Streamed {
        status: response.status().as_u16(),
        sent_at,
        headers_at: Instant::now(),
        tokens: Vec::new(),
        chunks: Vec::new(),
        done: false,
        body_error: None,
        other: Vec::new(),
    };
    let mut buffer = String::new();
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => {
                let at = Instant::now();
                buffer.push_str(std::str::from_utf8(&bytes).unwrap());
                while let Some(end) = buffer.find("\n\n") {
                    let event: String = buffer.drain(..end + 2).collect();
                    for line in event.lines() {
                        let Some(data) = line.strip_prefix("data: ") else {
                            continue;
                        };
                        if data == "[DONE]" {
                            answer.done = true;
                        } else if let Ok(chunk) = serde_json::from_str::<Value>(data) {
                            if let Some(text) = chunk["choices"][0]["delta"]["content"].as_str()
                                && !text.is_empty()
                            {
                                answer.tokens.push((text.to_owned(), at));
                            }
                            answer.chunks.push(chunk);
                        } else {
                            answer.other.push(data.to_owned());
                        }
                    }
                }
                if max_tokens_read.is_some_and(|n| answer.tokens.len() >= n) {
                    return answer;
                }
            }
            Ok(None) => return answer,
            Err(e) => {
                answer.body_error = Some(format!("{e:?}"));
                return answer;
            }
        }
    }
}

pub async fn stream_chat(client: &reqwest::Client, base: &str, body: &Value) -> Streamed {
    stream_chat_upto(client, base, body, None).await
}

/// `GET /metrics` as text.
pub async fn metrics_text(client: &reqwest::Client, base: &str) -> String {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the series `name{labels}` whose labels contain `label_part`.
pub fn metric(text: &str, name: &str, label_part: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label_part))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or_else(|| panic!("no {name} {label_part} in\n{text}"))
        .parse()
        .unwrap()
}

/// Asserts `got` is within `[want, want + slack]` (tokens are never early; timers may fire
/// up to a millisecond late).
pub fn assert_at(got: Duration, want_s: f64, slack_s: f64, what: &str) {
    let g = got.as_secs_f64();
    assert!(
        g >= want_s - 1e-6 && g <= want_s + slack_s,
        "{what}: observed {g:.6} s, engine says {want_s:.6} s"
    );
}
