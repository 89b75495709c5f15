//! The stub experts of `qosroute bench e2e`: OpenAI-compatible servers in the bench process
//! that answer at once, with `/metrics` and `/v1/models`.

use super::*;

/// When a request reached a stub and when its answer's first byte left, by marker.
#[derive(Debug, Default)]
pub(super) struct StubTimes {
    pub(super) at: Mutex<HashMap<String, (Instant, Option<Instant>)>>,
}

impl StubTimes {
    pub(super) fn arrived(&self, marker: &str, at: Instant) {
        if let Ok(mut m) = self.at.lock() {
            m.insert(marker.to_owned(), (at, None));
        }
    }

    pub(super) fn first_byte(&self, marker: &str, at: Instant) {
        if let Ok(mut m) = self.at.lock()
            && let Some(e) = m.get_mut(marker)
        {
            e.1 = Some(at);
        }
    }

    pub(super) fn take(&self, marker: &str) -> Option<(Instant, Option<Instant>)> {
        self.at.lock().ok()?.remove(marker)
    }
}

#[derive(Debug)]
pub(super) struct Stub {
    pub(super) name: String,
    pub(super) model: String,
    pub(super) running: AtomicU64,
    pub(super) served: AtomicU64,
    pub(super) times: Arc<StubTimes>,
}

/// One zero-latency OpenAI-compatible expert (vLLM dialect) on 127.0.0.1.
pub(super) struct StubServer {
    pub(super) stub: Arc<Stub>,
    pub(super) base_url: String,
    pub(super) task: tokio::task::JoinHandle<()>,
}

pub(super) async fn start_stub(
    name: String,
    times: Arc<StubTimes>,
    stop: CancellationToken,
) -> anyhow::Result<StubServer> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen for a stub expert")?;
    let addr = listener.local_addr()?;
    let stub = Arc::new(Stub {
        model: format!("bench/{name}"),
        name,
        running: AtomicU64::new(0),
        served: AtomicU64::new(0),
        times,
    });
    let app = AxumRouter::new()
        .route("/v1/chat/completions", post(chat))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .with_state(stub.clone());
    let task = tokio::spawn(async move {
        // Small writes go out at once (Nagle's algorithm would stall each answer ~40 ms).
        let listener = axum::serve::ListenerExt::tap_io(listener, |s| {
            let _ = s.set_nodelay(true);
        });
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Ok(StubServer {
        stub,
        base_url: format!("http://{addr}"),
        task,
    })
}

pub(super) async fn models(State(stub): State<Arc<Stub>>) -> Response {
    json_response(&json!({
        "object": "list",
        "data": [{"id": stub.model, "object": "model", "created": 0, "owned_by": "qosroute-bench"}],
    }))
}

pub(super) async fn metrics(State(stub): State<Arc<Stub>>) -> Response {
    let running = stub.running.load(Ordering::Relaxed);
    let m = stub.model.replace('\\', "\\\\").replace('"', "\\\"");
    let mut text = String::new();
    for (name, value) in [
        ("vllm:num_requests_running", running.to_string()),
        ("vllm:num_requests_waiting", "0".to_owned()),
        ("vllm:kv_cache_usage_perc", "0".to_owned()),
        ("vllm:gpu_cache_usage_perc", "0".to_owned()),
    ] {
        text.push_str(&format!(
            "# TYPE {name} gauge\n{name}{{model_name=\"{m}\"}} {value}\n"
        ));
    }
    let mut r = Response::new(Body::from(text));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

pub(super) fn json_response(v: &Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// The bench's marker in a prompt: the word after `bench `.
pub(super) fn marker(body: &Value) -> Option<String> {
    let messages = body.get("messages")?.as_array()?;
    let content = messages.last()?.get("content")?.as_str()?;
    let rest = content.strip_prefix("bench ")?;
    Some(rest.split_whitespace().next()?.to_owned())
}

/// The whole answer at once: SSE as vLLM streams it (role chunk, one chunk per token with
/// `finish_reason` on the last, the usage chunk, `[DONE]`) or one JSON completion.
pub(super) fn answer(
    model: &str,
    id: &str,
    stream: bool,
    prompt_tokens: u64,
    tokens: u64,
) -> String {
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": tokens,
        "total_tokens": prompt_tokens + tokens,
    });
    let id = format!("chatcmpl-{id}");
    if !stream {
        let text = vec!["ok"; tokens as usize].join(" ");
        return json!({
            "id": id, "object": "chat.completion", "created": 0, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "length"}],
            "usage": usage,
        })
        .to_string();
    }
    let chunk = |delta: Value, finish: Value| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        })
    };
    let mut out = String::new();
    let mut event = |v: &Value| {
        out.push_str("data: ");
        out.push_str(&v.to_string());
        out.push_str("\n\n");
    };
    event(&chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    ));
    for k in 0..tokens {
        let finish = if k + 1 == tokens {
            json!("length")
        } else {
            Value::Null
        };
        event(&chunk(
            json!({"content": if k == 0 { "ok" } else { " ok" }}),
            finish,
        ));
    }
    event(&json!({
        "id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [], "usage": usage,
    }));
    out.push_str("data: [DONE]\n\n");
    out
}

pub(super) async fn chat(State(stub): State<Arc<Stub>>, body: Bytes) -> Response {
    let arrived = Instant::now();
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return (StatusCode::BAD_REQUEST, "the body is not JSON").into_response();
    };
    let mark = marker(&request);
    // Only the latency phase's requests (markers `l...`) are timed.
    let timed = mark.filter(|m| m.starts_with('l'));
    if let Some(m) = &timed {
        stub.times.arrived(m, arrived);
    }
    let stream = request
        .get("stream")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let tokens = request
        .get("max_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(u64::from(MAX_TOKENS))
        .clamp(1, 4);
    let text = answer(
        &stub.model,
        timed.as_deref().unwrap_or("x"),
        stream,
        (body.len() / 4) as u64,
        tokens,
    );
    stub.running.fetch_add(1, Ordering::Relaxed);
    let s = stub.clone();
    // The instant the first byte is handed to the server: when the body is first polled.
    let body = Body::from_stream(futures_util::stream::once(async move {
        let at = Instant::now();
        if let Some(m) = &timed {
            s.times.first_byte(m, at);
        }
        s.running.fetch_sub(1, Ordering::Relaxed);
        s.served.fetch_add(1, Ordering::Relaxed);
        Ok::<_, Infallible>(Bytes::from(text))
    }));
    let mut r = Response::new(body);
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(if stream {
            "text/event-stream"
        } else {
            "application/json"
        }),
    );
    r
}
