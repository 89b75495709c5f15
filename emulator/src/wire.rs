//! The bytes an emulated expert sends: chat completion chunks and objects (OpenAI / vLLM
//! dialect), the `qosroute` extension, OpenAI-style errors, Prometheus text, llama.cpp slots.

use std::fmt::Write as _;

use axum::http::StatusCode;
use serde_json::{Map, Value, json};

use crate::request::FinishReason;
use crate::schedule::{EngineLoad, Finished};

/// The text of token `k` (0-based) of every answer: a synthetic, deterministic word.
pub fn token_text(k: u32) -> String {
    format!("tok{k} ")
}

/// What every chunk of one answer shares.
#[derive(Debug, Clone)]
pub(crate) struct AnswerHeader {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl AnswerHeader {
    fn object(&self, kind: &str) -> Map<String, Value> {
        let mut o = Map::new();
        o.insert("id".into(), Value::from(self.id.as_str()));
        o.insert("object".into(), Value::from(kind));
        o.insert("created".into(), Value::from(self.created));
        o.insert("model".into(), Value::from(self.model.as_str()));
        o
    }

    /// A `chat.completion.chunk` with one choice.
    pub fn chunk(&self, delta: Value, finish: Option<FinishReason>) -> Map<String, Value> {
        let mut o = self.object("chat.completion.chunk");
        o.insert(
            "choices".into(),
            json!([{
                "index": 0,
                "delta": delta,
                "logprobs": null,
                "finish_reason": finish.map(FinishReason::as_str),
            }]),
        );
        o
    }

    /// The final `chat.completion.chunk` with no choice and the usage.
    pub fn usage_chunk(&self, prompt_tokens: u32, completion_tokens: u32) -> Map<String, Value> {
        let mut o = self.object("chat.completion.chunk");
        o.insert("choices".into(), json!([]));
        o.insert("usage".into(), usage(prompt_tokens, completion_tokens));
        o
    }

    /// A whole `chat.completion` (stream false).
    pub fn completion(
        &self,
        text: String,
        finish: FinishReason,
        prompt_tokens: u32,
        completion_tokens: u32,
        extension: Value,
    ) -> Value {
        let mut o = self.object("chat.completion");
        o.insert(
            "choices".into(),
            json!([{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": finish.as_str(),
            }]),
        );
        o.insert("usage".into(), usage(prompt_tokens, completion_tokens));
        o.insert("qosroute".into(), extension);
        Value::Object(o)
    }
}

fn usage(prompt_tokens: u32, completion_tokens: u32) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": u64::from(prompt_tokens) + u64::from(completion_tokens),
    })
}

/// The `"qosroute"` extension of a finished answer; times in wall-clock seconds from the
/// request's arrival on the engine (`finished` holds wall-clock times).
pub(crate) fn extension(
    expert: &str,
    model: &str,
    quality: Option<f64>,
    finished: &Finished,
) -> Value {
    let mut o = Map::new();
    if let Some(q) = quality.and_then(serde_json::Number::from_f64) {
        o.insert("quality".into(), Value::Number(q));
    }
    o.insert("expert".into(), Value::from(expert));
    o.insert("model".into(), Value::from(model));
    o.insert("prompt_tokens".into(), Value::from(finished.prompt_tokens));
    o.insert("output_tokens".into(), Value::from(finished.output_tokens));
    let seconds = |s: f64| serde_json::Number::from_f64(s).map_or(Value::Null, Value::Number);
    o.insert(
        "queue_s".into(),
        seconds(finished.admitted_s - finished.arrival_s),
    );
    o.insert(
        "ttft_s".into(),
        seconds(finished.first_token_s - finished.arrival_s),
    );
    o.insert(
        "e2e_s".into(),
        seconds(finished.finish_s - finished.arrival_s),
    );
    Value::Object(o)
}

/// One server-sent event carrying `data`.
pub(crate) fn sse_event(frame: &mut String, data: &Map<String, Value>) {
    frame.push_str("data: ");
    frame.push_str(&Value::Object(data.clone()).to_string());
    frame.push_str("\n\n");
}

/// The end of a stream.
pub(crate) const SSE_DONE: &str = "data: [DONE]\n\n";

/// An OpenAI-style error body.
pub(crate) fn error_body(status: StatusCode, message: &str, param: Option<&str>) -> Value {
    let kind = match status.as_u16() {
        400 | 413 => "invalid_request_error",
        404 => "not_found_error",
        503 => "service_unavailable",
        _ => "server_error",
    };
    json!({
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": status.as_u16(),
        }
    })
}

/// Counters of one emulated expert, for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterValues {
    /// Chat completion requests received.
    pub received: u64,
    /// Answers delivered in full, ended by `stop`.
    pub success_stop: u64,
    /// Answers delivered in full, ended by `length`.
    pub success_length: u64,
    /// Requests refused with 400, 404 or 413.
    pub invalid: u64,
    /// Requests answered 500 by the `error_rate` fault.
    pub injected_errors: u64,
    /// Connections dropped by the `fail_after_tokens` fault.
    pub dropped: u64,
    /// Requests held by the `hang` fault.
    pub hung: u64,
    /// Answers whose client went away before the end (the engine finished them anyway).
    pub disconnected: u64,
    /// Requests the engine completed (whether or not the client was still there).
    pub engine_completed: u64,
    /// Prompt tokens of the requests the engine completed.
    pub prompt_tokens: u64,
    /// Output tokens of the requests the engine completed.
    pub generation_tokens: u64,
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// vLLM-style Prometheus text for one expert.
pub(crate) fn metrics_text(
    model: &str,
    load: &EngineLoad,
    kv_tokens: u64,
    counters: &CounterValues,
) -> String {
    let m = escape_label(model);
    let kv = if kv_tokens == 0 {
        0.0
    } else {
        load.kv_reserved as f64 / kv_tokens as f64
    };
    let mut t = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = write!(
            t,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{model_name=\"{m}\"}} {value}\n"
        );
    };
    gauge(
        "vllm:num_requests_running",
        "Requests admitted by the engine (prefilling or decoding).",
        load.running.to_string(),
    );
    gauge(
        "vllm:num_requests_waiting",
        "Requests queued, not yet admitted.",
        load.waiting.to_string(),
    );
    gauge(
        "vllm:kv_cache_usage_perc",
        "Fraction of KV-cache tokens reserved by admitted requests (prompt plus full output), 0..1.",
        kv.to_string(),
    );
    gauge(
        "vllm:gpu_cache_usage_perc",
        "Same as vllm:kv_cache_usage_perc (the older vLLM name).",
        kv.to_string(),
    );
    let mut counter = |name: &str, help: &str, series: &[(&str, u64)]| {
        let _ = writeln!(t, "# HELP {name} {help}\n# TYPE {name} counter");
        for (labels, value) in series {
            let _ = writeln!(t, "{name}{{model_name=\"{m}\"{labels}}} {value}");
        }
    };
    counter(
        "vllm:request_success_total",
        "Answers delivered in full, by finish reason.",
        &[
            (",finished_reason=\"stop\"", counters.success_stop),
            (",finished_reason=\"length\"", counters.success_length),
        ],
    );
    counter(
        "vllm:prompt_tokens_total",
        "Prompt tokens of the requests the engine completed.",
        &[("", counters.prompt_tokens)],
    );
    counter(
        "vllm:generation_tokens_total",
        "Output tokens of the requests the engine completed.",
        &[("", counters.generation_tokens)],
    );
    counter(
        "qosroute_emulator_requests_received_total",
        "Chat completion requests received.",
        &[("", counters.received)],
    );
    counter(
        "qosroute_emulator_requests_completed_total",
        "Requests the engine completed, whether or not their client was still there.",
        &[("", counters.engine_completed)],
    );
    counter(
        "qosroute_emulator_requests_failed_total",
        "Requests not answered in full, by reason.",
        &[
            (",reason=\"invalid\"", counters.invalid),
            (",reason=\"injected_error\"", counters.injected_errors),
            (",reason=\"dropped\"", counters.dropped),
            (",reason=\"hung\"", counters.hung),
            (",reason=\"disconnected\"", counters.disconnected),
        ],
    );
    t
}

/// llama.cpp-style `/slots`: one entry per slot, the first `running` of them processing;
/// `n_ctx` is the KV capacity divided among the slots.
pub(crate) fn slots_json(max_slots: u32, running: usize, kv_tokens: u64) -> Value {
    let n_ctx = kv_tokens / u64::from(max_slots.max(1));
    Value::Array(
        (0..max_slots)
            .map(|id| {
                json!({
                    "id": id,
                    "is_processing": (id as usize) < running,
                    "n_ctx": n_ctx,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_name_every_gauge_with_the_model_label() {
        let load = EngineLoad {
            running: 2,
            waiting: 3,
            kv_reserved: 250,
        };
        let text = metrics_text("we\"ird", &load, 1000, &CounterValues::default());
        assert!(text.contains("vllm:num_requests_running{model_name=\"we\\\"ird\"} 2\n"));
        assert!(text.contains("vllm:num_requests_waiting{model_name=\"we\\\"ird\"} 3\n"));
        assert!(text.contains("vllm:kv_cache_usage_perc{model_name=\"we\\\"ird\"} 0.25\n"));
        assert!(text.contains("vllm:gpu_cache_usage_perc{model_name=\"we\\\"ird\"} 0.25\n"));
        assert!(text.contains(
            "vllm:request_success_total{model_name=\"we\\\"ird\",finished_reason=\"stop\"} 0\n"
        ));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn slots_show_the_running_ones() {
        let v = slots_json(3, 2, 30_000);
        let busy: Vec<bool> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["is_processing"].as_bool().unwrap())
            .collect();
        assert_eq!(busy, [true, true, false]);
        assert_eq!(v[2]["n_ctx"], 10_000);
        assert_eq!(v[1]["id"], 1);
    }

    #[test]
    fn the_extension_reports_wall_seconds_and_omits_unknown_quality() {
        let f = Finished {
            arrival_s: 1.0,
            admitted_s: 1.5,
            first_token_s: 2.0,
            finish_s: 4.0,
            prompt_tokens: 10,
            output_tokens: 5,
        };
        let x = extension("e", "m", None, &f);
        assert!(x.get("quality").is_none());
        assert_eq!(x["queue_s"], 0.5);
        assert_eq!(x["ttft_s"], 1.0);
        assert_eq!(x["e2e_s"], 3.0);
        assert_eq!(x["output_tokens"], 5);
        let x = extension("e", "m", Some(0.75), &f);
        assert_eq!(x["quality"], 0.75);
    }
}
