//! The HTTP side of an emulated expert: the OpenAI-compatible endpoints, vLLM metrics,
//! llama.cpp slots, health, and the fault switch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use qosroute_core::{ExpertProfile, SimRng};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::AnswerTokens;
use crate::driver::{Counters, Progress, Submission, bump};
use crate::faults::Faults;
use crate::quality::AnswerQuality;
use crate::request::{ChatCompletionRequest, FinishReason};
use crate::schedule::{EngineLoad, Finished, Unservable, servable_output};
use crate::wire::{
    AnswerHeader, SSE_DONE, error_body, extension, metrics_text, slots_json, sse_event, token_text,
};

/// What the handlers of one emulated expert share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub profile: Arc<ExpertProfile>,
    pub model_name: String,
    pub quality: Option<AnswerQuality>,
    pub faults: Mutex<Faults>,
    /// The engine's slowdown ([`Faults::slowdown`], 1 without it), watched by the engine task.
    pub slowdown: watch::Sender<f64>,
    /// Draws of the `error_rate` fault, one per chat completion while it is above 0.
    pub error_draws: Mutex<SimRng>,
    pub submissions: mpsc::Sender<Submission>,
    pub load: watch::Receiver<EngineLoad>,
    pub counters: Arc<Counters>,
    /// Cancelled when shutdown begins: stop accepting, release hung requests.
    pub closing: CancellationToken,
    pub next_answer: AtomicU64,
    /// The true length of the answer to a prompt, when the site knows it.
    pub answer_tokens: KnownLengths,
}

/// [`crate::EmulatorOptions::answer_tokens`], debug-printable.
pub(crate) struct KnownLengths(pub Option<AnswerTokens>);

impl std::fmt::Debug for KnownLengths {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "known" } else { "unknown" })
    }
}

impl Shared {
    pub fn faults(&self) -> Faults {
        *self.faults.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_faults(&self, faults: Faults) {
        *self.faults.lock().unwrap_or_else(PoisonError::into_inner) = faults;
        self.slowdown.send_replace(faults.engine_slowdown());
    }

    fn draw(&self) -> f64 {
        self.error_draws
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unit()
    }
}

/// The routes of one emulated expert.
pub(crate) fn router(shared: Arc<Shared>, max_body_bytes: usize) -> Router {
    let served = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/slots", get(slots))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            injected_delays,
        ));
    let admin = Router::new().route("/admin/faults", get(get_faults).post(set_faults));
    served
        .merge(admin)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(shared)
}

fn error_response(status: StatusCode, message: &str, param: Option<&str>) -> Response {
    (status, axum::Json(error_body(status, message, param))).into_response()
}

fn shutting_down() -> Response {
    error_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "the emulator is shutting down",
        None,
    )
}

/// The `hang` and `slow_start_s` faults, before any handler but `/admin/*`.
async fn injected_delays(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let faults = shared.faults();
    if faults.hang {
        bump(&shared.counters.hung, 1);
        tracing::debug!(expert = %shared.profile.name, path = %request.uri().path(), "hanging");
        shared.closing.cancelled().await;
        return shutting_down();
    }
    if faults.slow_start_s > 0.0 {
        let wait = Duration::try_from_secs_f64(faults.slow_start_s).unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shared.closing.cancelled() => return shutting_down(),
        }
    }
    next.run(request).await
}

async fn not_found(request: Request) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        &format!("no route for {} {}", request.method(), request.uri().path()),
        None,
    )
}

async fn health() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": shared.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "qosroute-emulator",
            "root": shared.model_name,
            "max_model_len": shared.profile.kv_tokens,
        }],
    }))
    .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let load = *shared.load.borrow();
    let text = metrics_text(
        &shared.model_name,
        &load,
        shared.profile.kv_tokens,
        &shared.counters.values(),
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn slots(State(shared): State<Arc<Shared>>) -> Response {
    let running = shared.load.borrow().running;
    axum::Json(slots_json(
        shared.profile.max_slots,
        running,
        shared.profile.kv_tokens,
    ))
    .into_response()
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(shared.faults()).into_response()
}

async fn set_faults(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return error_response(rejection.status(), &rejection.body_text(), None),
    };
    let faults = match serde_json::from_slice::<serde_json::Value>(&body).and_then(|v| {
        if v.is_object() {
            serde_json::from_value::<Faults>(v)
        } else {
            Err(serde::de::Error::custom("expected a JSON object"))
        }
    }) {
        Ok(f) => f,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("not a faults object: {e}"),
                None,
            );
        }
    };
    if let Err(e) = faults.validate() {
        return error_response(StatusCode::BAD_REQUEST, &e.to_string(), None);
    }
    tracing::info!(expert = %shared.profile.name, ?faults, "faults set");
    shared.set_faults(faults);
    axum::Json(faults).into_response()
}

/// The connection is dropped on purpose (`fail_after_tokens`).
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by the fail_after_tokens fault")]
struct DroppedConnection;

/// A response whose body fails at once: headers go out, then the connection is dropped.
fn dropped_connection() -> Response {
    let body = futures_util::stream::once(async { Err::<Bytes, _>(DroppedConnection) });
    Response::new(Body::from_stream(body))
}

/// Everything an answer needs once the request is on the engine.
#[derive(Debug)]
struct Answer {
    shared: Arc<Shared>,
    header: AnswerHeader,
    progress: mpsc::UnboundedReceiver<Progress>,
    finish: FinishReason,
    /// Drop the connection once this many tokens were sent (below `output_tokens`).
    fail_at: Option<u32>,
    quality: Option<f64>,
}

impl Answer {
    fn extension(&self, finished: &Finished) -> serde_json::Value {
        extension(
            &self.shared.profile.name,
            &self.shared.model_name,
            self.quality,
            finished,
        )
    }

    fn count_success(&self) {
        let counter = match self.finish {
            FinishReason::Stop => &self.shared.counters.success_stop,
            FinishReason::Length => &self.shared.counters.success_length,
        };
        bump(counter, 1);
    }
}

async fn chat_completions(
    State(shared): State<Arc<Shared>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received_at = Instant::now();
    bump(&shared.counters.received, 1);
    let invalid = |status: StatusCode, message: &str, param: Option<&str>| {
        bump(&shared.counters.invalid, 1);
        tracing::debug!(expert = %shared.profile.name, %status, message, "request refused");
        error_response(status, message, param)
    };
    let body = match body {
        Ok(b) => b,
        Err(rejection) => return invalid(rejection.status(), &rejection.body_text(), None),
    };
    let faults = shared.faults();
    if faults.error_rate > 0.0 && shared.draw() < faults.error_rate {
        bump(&shared.counters.injected_errors, 1);
        return error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "injected error (error_rate fault)",
            None,
        );
    }
    let request = match ChatCompletionRequest::parse(&body) {
        Ok(r) => r,
        Err(e) => return invalid(StatusCode::BAD_REQUEST, &e.message, e.param.as_deref()),
    };
    if let Some(model) = &request.model
        && *model != shared.model_name
    {
        return invalid(
            StatusCode::NOT_FOUND,
            &format!("The model `{model}` does not exist."),
            Some("model"),
        );
    }
    let known = shared
        .answer_tokens
        .0
        .as_ref()
        .and_then(|f| f(&request.prompt_head));
    let (wanted, mut finish) = request.planned_output(known);
    let output_tokens = match servable_output(&shared.profile, request.prompt_tokens, wanted) {
        Ok(n) => n,
        Err(e @ Unservable::PromptTooLong { .. }) => {
            return invalid(
                StatusCode::BAD_REQUEST,
                &format!(
                    "This model's maximum context length is {} tokens: {e}",
                    shared.profile.kv_tokens
                ),
                Some("messages"),
            );
        }
        Err(e @ Unservable::NoOutput) => {
            return invalid(StatusCode::BAD_REQUEST, &e.to_string(), Some("max_tokens"));
        }
    };
    if output_tokens < wanted {
        finish = FinishReason::Length;
    }
    if shared.closing.is_cancelled() {
        return shutting_down();
    }
    let (progress_tx, progress) = mpsc::unbounded_channel();
    let submission = Submission {
        prompt_tokens: request.prompt_tokens,
        output_tokens,
        received_at,
        progress: progress_tx,
    };
    if shared.submissions.send(submission).await.is_err() {
        return shutting_down();
    }
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let n = shared.next_answer.fetch_add(1, Ordering::Relaxed);
    let answer = Answer {
        header: AnswerHeader {
            id: format!("chatcmpl-emu-{n}"),
            created,
            model: shared.model_name.clone(),
        },
        quality: shared
            .quality
            .as_ref()
            .and_then(|q| q.of(request.task, request.prompt_id.as_deref())),
        shared,
        progress,
        finish,
        fail_at: faults.fail_after_tokens.filter(|n| *n < output_tokens),
    };
    if request.stream {
        stream_answer(answer, request.include_usage)
    } else {
        whole_answer(answer).await
    }
}

/// Counts a response dropped before its end (the client went away) unless disarmed.
#[derive(Debug)]
struct DisconnectGuard {
    counters: Arc<Counters>,
    armed: bool,
}

impl Drop for DisconnectGuard {
    fn drop(&mut self) {
        if self.armed {
            bump(&self.counters.disconnected, 1);
        }
    }
}

async fn whole_answer(mut answer: Answer) -> Response {
    let mut guard = DisconnectGuard {
        counters: answer.shared.counters.clone(),
        armed: true,
    };
    let response = loop {
        match answer.progress.recv().await {
            Some(Progress::Tokens(tokens)) => {
                if answer.fail_at.is_some_and(|n| tokens >= n) {
                    bump(&answer.shared.counters.dropped, 1);
                    break dropped_connection();
                }
            }
            Some(Progress::Finished(finished)) => {
                if answer.fail_at.is_some() {
                    bump(&answer.shared.counters.dropped, 1);
                    break dropped_connection();
                }
                let text: String = (0..finished.output_tokens).map(token_text).collect();
                let body = answer.header.completion(
                    text,
                    answer.finish,
                    finished.prompt_tokens,
                    finished.output_tokens,
                    answer.extension(&finished),
                );
                answer.count_success();
                break axum::Json(body).into_response();
            }
            None => break shutting_down(),
        }
    };
    guard.armed = false;
    response
}

fn stream_answer(answer: Answer, include_usage: bool) -> Response {
    let stream = AnswerStream {
        answer,
        include_usage,
        sent: 0,
        role_sent: false,
        state: StreamState::Open,
    };
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        s.next_frame().await.map(|frame| (frame, s))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Open,
    /// The fault point was reached: the next frame drops the connection.
    Failing,
    Ended,
}

/// The server-sent events of one streamed answer.
#[derive(Debug)]
struct AnswerStream {
    answer: Answer,
    include_usage: bool,
    sent: u32,
    role_sent: bool,
    state: StreamState,
}

impl Drop for AnswerStream {
    fn drop(&mut self) {
        if self.state == StreamState::Open {
            bump(&self.answer.shared.counters.disconnected, 1);
        }
    }
}

impl AnswerStream {
    /// The next body frame: every event due now, each token its own event.
    async fn next_frame(&mut self) -> Option<Result<Bytes, DroppedConnection>> {
        let mut frame = String::new();
        loop {
            match self.state {
                StreamState::Ended => return None,
                StreamState::Failing => {
                    // Drop when the next token is due: until then the body is pending, so
                    // hyper flushes the tokens already sent.
                    let _ = self.answer.progress.recv().await;
                    self.state = StreamState::Ended;
                    bump(&self.answer.shared.counters.dropped, 1);
                    tracing::debug!(id = %self.answer.header.id, sent = self.sent, "dropping the connection");
                    return Some(Err(DroppedConnection));
                }
                StreamState::Open if self.answer.fail_at == Some(self.sent) => {
                    self.state = StreamState::Failing;
                    continue;
                }
                StreamState::Open => {}
            }
            let mut message = self.answer.progress.recv().await;
            loop {
                self.on_progress(message, &mut frame);
                if self.state != StreamState::Open {
                    break;
                }
                match self.answer.progress.try_recv() {
                    Ok(next) => message = Some(next),
                    Err(_) => break,
                }
            }
            if !frame.is_empty() {
                return Some(Ok(Bytes::from(frame)));
            }
        }
    }

    fn on_progress(&mut self, message: Option<Progress>, frame: &mut String) {
        match message {
            Some(Progress::Tokens(tokens)) => self.emit_tokens(tokens, frame),
            Some(Progress::Finished(finished)) => {
                self.emit_tokens(finished.output_tokens, frame);
                if self.state == StreamState::Open {
                    self.emit_end(&finished, frame);
                }
            }
            None => {
                let error = error_body(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the emulator shut down before the answer was complete",
                    None,
                );
                if let serde_json::Value::Object(error) = error {
                    sse_event(frame, &error);
                }
                self.state = StreamState::Ended;
            }
        }
    }

    fn emit_tokens(&mut self, tokens: u32, frame: &mut String) {
        let limit = self.answer.fail_at.map_or(tokens, |n| tokens.min(n));
        while self.sent < limit {
            if !self.role_sent {
                sse_event(
                    frame,
                    &self
                        .answer
                        .header
                        .chunk(json!({"role": "assistant", "content": ""}), None),
                );
                self.role_sent = true;
            }
            sse_event(
                frame,
                &self
                    .answer
                    .header
                    .chunk(json!({"content": token_text(self.sent)}), None),
            );
            self.sent += 1;
        }
        if self.answer.fail_at == Some(self.sent) {
            self.state = StreamState::Failing;
        }
    }

    fn emit_end(&mut self, finished: &Finished, frame: &mut String) {
        let extension = self.answer.extension(finished);
        let mut last = self
            .answer
            .header
            .chunk(json!({}), Some(self.answer.finish));
        last.insert("qosroute".into(), extension.clone());
        sse_event(frame, &last);
        if self.include_usage {
            let mut usage = self
                .answer
                .header
                .usage_chunk(finished.prompt_tokens, finished.output_tokens);
            usage.insert("qosroute".into(), extension);
            sse_event(frame, &usage);
        }
        frame.push_str(SSE_DONE);
        self.answer.count_success();
        self.state = StreamState::Ended;
    }
}
