//! One request's life: admission, decision, dispatch to the expert, streaming the answer back
//! over MQTT, learning from the outcome. Every path ends with exactly one final message to the
//! device (the answer's `Final`, or an `Error` with a stable code) and then the broker ack.

use std::sync::Arc;
use std::time::Duration;

use qosroute_core::{Decision, Request as CoreRequest, Task};
use qosroute_expert_client::{ChatRequest, ExpertError, StreamEvent};
use qosroute_proto::{self as proto, Encoding, ErrorCode};
use tokio::time::Instant;

use crate::ledger::{Dispatched, TokenCount};
use crate::link::{Delivery, Lane, Outgoing};
use crate::metrics::Outcome;
use crate::prediction_error::PredictedLatency;
use crate::router::{Router, Routing};
use crate::shared::Shared;

/// Where and how replies to one request go.
#[derive(Debug, Clone)]
pub struct ReplyRoute {
    /// Topic.
    pub topic: String,
    /// MQTT 5 correlation data to echo.
    pub correlation_data: Option<bytes::Bytes>,
    /// Encoding of the request, used for its replies.
    pub encoding: Encoding,
    /// The publisher lane of its replies: served requests first, refusals after.
    pub lane: Lane,
}

/// Tokens collected before a chunk is published (streaming), at most. The first token goes
/// out alone, at once: the device's time to first token is the expert's plus the hop, not
/// plus a batching delay (`qosroute validate` against emulated experts measured +40 ms at the
/// median when the first chunk waited for the interval).
const CHUNK_TOKENS: usize = 16;
/// A chunk is published at least this often while tokens arrive (streaming).
const CHUNK_INTERVAL: Duration = Duration::from_millis(50);
/// Experts tried for one request before the device gets an error.
const MAX_ATTEMPTS: usize = 3;
/// How long an expert's circuit stays open after repeated failures.
const CIRCUIT_OPEN: Duration = Duration::from_secs(5);

/// A gap between two tokens of one answer longer than this many times the answer's mean gap is
/// a stall, not a decode step: another request's prompt processed in the same engine
/// iteration (llama.cpp and vLLM put a joining prompt in the batch of the running sequences'
/// next tokens, so each of them waits for that prefill).
const STALL_RATIO: f64 = 3.0;
/// A long gap is a stall only if the stream resumes at its pace after it: the next gap is at
/// least this share of the answer's mean gap. A long gap followed by a gap of about nothing is
/// the reader (or the engine's sender) falling behind and catching up in a burst: those
/// tokens were due all along, and the long gap is kept (dropping it measured steps of about
/// nothing under a busy CPU: HIL scenario 11 saw five such answers in a row teach the
/// calibrator a step 20 times too short).
const RESUME_SHARE: f64 = 0.25;

/// The times between the tokens of one answer, for its decode-step observation.
#[derive(Debug, Default)]
struct TokenGaps {
    last: Option<Instant>,
    gaps: Vec<f64>,
}

impl TokenGaps {
    fn token(&mut self, at: Instant) {
        if let Some(last) = self.last {
            self.gaps
                .push(at.saturating_duration_since(last).as_secs_f64());
        }
        self.last = Some(at);
    }

    /// The answer's mean decode step without its stalls: the mean of the gaps that are not
    /// stalls, a stall being a gap over [`STALL_RATIO`] times the mean of all after which the
    /// stream resumes at its pace (the next gap, if any, at least [`RESUME_SHARE`] of the
    /// mean). The latency model's decode step has no prefill in it: a joining request's
    /// prefill is its own term, so a step observation that kept the stalls would count them
    /// twice. `None` below two gaps. The mean, not the median, is the reference: a reader that
    /// falls behind gets tokens in bursts (gaps of 0 and of several steps), which move the
    /// median but not the mean, and a burst's long gap is not a stall.
    fn step_s(&self) -> Option<f64> {
        if self.gaps.len() < 2 {
            return None;
        }
        let all = self.gaps.iter().sum::<f64>() / self.gaps.len() as f64;
        let stall = |i: usize| {
            self.gaps[i] > STALL_RATIO * all
                && self
                    .gaps
                    .get(i + 1)
                    .is_none_or(|&next| next >= RESUME_SHARE * all)
        };
        let (sum, n) = (0..self.gaps.len())
            .filter(|&i| !stall(i))
            .fold((0.0, 0usize), |(s, n), i| (s + self.gaps[i], n + 1));
        (n > 0).then(|| sum / n as f64)
    }
}

/// Estimated prompt tokens of a text (about four bytes per token for English, at least 1).
pub fn estimate_prompt_tokens(prompt: &str) -> u32 {
    u32::try_from(prompt.len().div_ceil(4))
        .unwrap_or(u32::MAX)
        .max(1)
}

/// Encodes one reply for `route` (the reply itself, up to a few KB of fixed-capacity fields,
/// is not kept while the publish waits: callers encode in a statement of its own).
pub fn encode(route: &ReplyRoute, reply: &proto::Reply) -> Option<Outgoing> {
    thread_local! {
        // One frame-sized scratch buffer per worker thread, instead of a zeroed 49 KB
        // allocation per reply (encoding never awaits, so the buffer is never shared).
        static SCRATCH: std::cell::RefCell<Vec<u8>> =
            std::cell::RefCell::new(vec![0u8; proto::MAX_FRAME_BYTES]);
    }
    let encoded = SCRATCH.with_borrow_mut(|buf| {
        proto::encode_reply(reply, route.encoding, buf).map(|n| buf[..n].to_vec())
    });
    let payload = match encoded {
        Ok(p) => p,
        Err(error) => {
            tracing::error!(%error, "reply does not encode");
            return None;
        }
    };
    Some(Outgoing {
        topic: route.topic.clone(),
        payload,
        correlation_data: route.correlation_data.clone(),
        content_type: Some(route.encoding.content_type().to_owned()),
        expiry_s: None,
    })
}

/// Publishes an encoded reply in `route`'s lane; counts it as dropped if the link is gone.
pub async fn publish(shared: &Shared, route: &ReplyRoute, out: Option<Outgoing>) {
    let Some(out) = out else { return };
    if shared.link.publish(out, route.lane).await.is_err() {
        shared
            .metrics
            .replies_dropped
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Publishes an error reply for request `id`.
pub async fn send_error(
    shared: &Shared,
    route: &ReplyRoute,
    id: &str,
    code: ErrorCode,
    message: &str,
) {
    let out = match proto::ErrorReply::new(id, code, message) {
        Ok(e) => encode(route, &proto::Reply::Error(e)),
        Err(error) => {
            tracing::error!(?error, "error reply does not fit the wire format");
            None
        }
    };
    publish(shared, route, out).await;
}

/// What serving a request needs of it, sized to its content (a decoded `proto::Request` has
/// fixed-capacity fields, 8 KB for the prompt alone, and a request task holds it for its whole
/// life).
#[derive(Debug, Clone, PartialEq)]
pub struct ServedRequest {
    /// The device's request id.
    pub id: Box<str>,
    /// The task the device names (`chat` when unknown here).
    pub task: Task,
    /// The prompt.
    pub prompt: Box<str>,
    /// Most tokens of the answer.
    pub max_tokens: u32,
    /// The device's own SLO, seconds per output token, if it gave one.
    pub slo_s_per_token: Option<f32>,
    /// Whether the answer is streamed in chunks.
    pub stream: bool,
}

impl From<&proto::Request> for ServedRequest {
    fn from(r: &proto::Request) -> Self {
        Self {
            id: r.id.as_str().into(),
            task: r.task.as_str().parse().unwrap_or(Task::Chat),
            prompt: r.prompt.as_str().into(),
            max_tokens: r.max_tokens,
            slo_s_per_token: r.slo_s_per_token,
            stream: r.stream,
        }
    }
}

/// Serves one decoded request to its end and acknowledges it to the broker.
pub async fn serve_request(
    shared: Arc<Shared>,
    delivery: Delivery,
    request: ServedRequest,
    route: ReplyRoute,
    arrived_at: Instant,
    device: String,
) {
    let outcome = serve(&shared, &request, &route, arrived_at, &device).await;
    shared.metrics.count(outcome);
    if shared.link.ack(delivery, route.lane).await.is_err() {
        tracing::debug!("ack not sent: the broker link is gone (the broker will redeliver)");
    }
}

async fn serve(
    shared: &Shared,
    request: &ServedRequest,
    route: &ReplyRoute,
    arrived_at: Instant,
    device: &str,
) -> Outcome {
    let id = &*request.id;
    let task = request.task;
    let config = shared.config();
    let slo = request
        .slo_s_per_token
        .map(f64::from)
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or_else(|| config.slo.slo_s_per_token(task));
    let prompt_tokens = estimate_prompt_tokens(&request.prompt);
    let core_request = CoreRequest {
        id: shared.next_key(),
        arrival_s: 0.0,
        task,
        prompt_tokens,
        slo_s_per_token: slo,
        max_output_tokens: Some(request.max_tokens),
    };
    let mut failed: Vec<String> = Vec::new();
    for attempt in 0..MAX_ATTEMPTS {
        if shared.cut.is_cancelled() {
            return shutting_down(shared, route, id).await;
        }
        let now = Instant::now();
        let decided = {
            let failed = failed.clone();
            let max_tokens = request.max_tokens;
            let request_id: Box<str> = request.id.clone();
            shared
                .router
                .ask(move |router| {
                    decide_and_dispatch(
                        router,
                        &core_request,
                        max_tokens,
                        &failed,
                        now,
                        arrived_at,
                        &request_id,
                    )
                })
                .await
        };
        // The router thread is gone only when the daemon stops.
        let Ok((routing, dispatched)) = decided else {
            return shutting_down(shared, route, id).await;
        };
        shared
            .metrics
            .decision_seconds
            .observe(routing.took.as_secs_f64());
        if routing.budget_exhausted {
            shared
                .metrics
                .planner_budget_exhausted
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if routing.fell_back {
            shared
                .metrics
                .fallbacks
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let Some((expert, count)) = dispatched else {
            let (code, message) = if attempt == 0 {
                (
                    ErrorCode::NoExpert,
                    "no expert can serve this request within its latency target now",
                )
            } else {
                (
                    ErrorCode::ExpertFailed,
                    "every expert tried failed before answering",
                )
            };
            send_error(shared, route, id, code, message).await;
            return if attempt == 0 {
                Outcome::Rejected
            } else {
                Outcome::ExpertFailed
            };
        };
        let client = shared.client(&expert);
        let predicted = routing.predicted;
        let Some(client) = client else {
            finish(shared, &expert, core_request.id, None).await;
            failed.push(expert);
            continue;
        };
        match stream_answer(
            shared,
            request,
            route,
            &client,
            &expert,
            device,
            core_request.id,
            &count,
            predicted,
            task,
            slo,
            arrived_at,
        )
        .await
        {
            Ok(outcome) => return outcome,
            Err(Failure::BeforeFirstToken(error)) => {
                tracing::warn!(expert = %expert, %error, attempt, "expert failed before the first token; retrying elsewhere");
                shared
                    .metrics
                    .retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                finish(shared, &expert, core_request.id, Some(CIRCUIT_OPEN)).await;
                failed.push(expert);
            }
            Err(Failure::AfterTokens(error)) => {
                tracing::warn!(expert = %expert, %error, "expert failed mid-answer");
                finish(shared, &expert, core_request.id, Some(CIRCUIT_OPEN)).await;
                send_error(
                    shared,
                    route,
                    id,
                    ErrorCode::ExpertFailed,
                    "the expert failed while answering",
                )
                .await;
                return Outcome::ExpertFailed;
            }
            Err(Failure::Cut) => {
                finish(shared, &expert, core_request.id, None).await;
                send_error(
                    shared,
                    route,
                    id,
                    ErrorCode::ShuttingDown,
                    "the gateway shut down before the answer was complete",
                )
                .await;
                return Outcome::ShuttingDown;
            }
        }
    }
    send_error(
        shared,
        route,
        id,
        ErrorCode::ExpertFailed,
        "every expert tried failed before answering",
    )
    .await;
    Outcome::ExpertFailed
}

/// Answers `shutting_down` to a request the gateway will not serve because it is stopping.
async fn shutting_down(shared: &Shared, route: &ReplyRoute, id: &str) -> Outcome {
    send_error(
        shared,
        route,
        id,
        ErrorCode::ShuttingDown,
        "the gateway is shutting down",
    )
    .await;
    Outcome::ShuttingDown
}

/// On the router thread: decides where the request goes (experts named in `failed` already
/// failed it) and books it there. Returns the routing and, for a route, the expert's name and
/// the request's token count (which the streaming task adds to without the router).
fn decide_and_dispatch(
    router: &mut Router,
    request: &CoreRequest,
    max_tokens: u32,
    failed: &[String],
    now: Instant,
    arrived_at: Instant,
    request_id: &str,
) -> (Routing, Option<(String, TokenCount)>) {
    let exclude: Vec<usize> = failed
        .iter()
        .filter_map(|name| router.ledger.index_of(name))
        .collect();
    let routing = router.decide(request, max_tokens, &exclude, now);
    if let Some(shadow) = routing.shadow
        && shadow.decision != routing.decision
    {
        // A sample of the disagreements: the first ten, then one in a hundred.
        let n = router.shadow_stats().disagreements;
        if n <= 10 || n.is_multiple_of(100) {
            let name = |d: Decision| match d {
                Decision::Route(e) => router
                    .ledger
                    .experts
                    .get(e)
                    .map_or("?", |b| b.profile.name.as_str()),
                Decision::Reject => "reject",
            };
            tracing::info!(
                request = request_id,
                task = request.task.as_str(),
                serving = name(routing.decision),
                shadow = name(shadow.decision),
                predicted_qos_gain = shadow.predicted_qos_gain,
                disagreements = n,
                "shadow policy disagrees"
            );
        }
    }
    let Decision::Route(e) = routing.decision else {
        return (routing, None);
    };
    let Some(name) = router.ledger.experts.get(e).map(|b| b.profile.name.clone()) else {
        return (routing, None);
    };
    let prediction = routing.predictions.get(e).copied();
    let count = router.dispatch(
        e,
        Dispatched {
            key: request.id,
            task: request.task,
            prompt_tokens: request.prompt_tokens,
            predicted_output_tokens: prediction.map_or(1.0, |p| p.output_tokens),
            predicted_quality: prediction.map_or(0.0, |p| p.quality),
            slo_s_per_token: request.slo_s_per_token,
            max_output_tokens: Some(max_tokens),
            arrived_at,
            dispatched_at: now,
        },
    );
    (routing, Some((name, count)))
}

/// Books request `key` as done on `expert` (bookkeeping on the router thread, not awaited);
/// with `open_circuit`, the expert failed it and is not chosen for that long.
async fn finish(shared: &Shared, expert: &str, key: u64, open_circuit: Option<Duration>) {
    let expert = expert.to_owned();
    let at = Instant::now();
    shared
        .router
        .tell(move |router| {
            router.ledger.finish_by_name(&expert, key, at);
            if let Some(open) = open_circuit {
                router.ledger.mark_failed_by_name(&expert, at, open);
            }
        })
        .await;
}

enum Failure {
    BeforeFirstToken(ExpertError),
    AfterTokens(ExpertError),
    Cut,
}

#[allow(clippy::too_many_arguments)]
async fn stream_answer(
    shared: &Shared,
    request: &ServedRequest,
    route: &ReplyRoute,
    client: &qosroute_expert_client::ExpertClient,
    expert: &str,
    device: &str,
    key: u64,
    count: &TokenCount,
    predicted: Option<PredictedLatency>,
    task: Task,
    slo: f64,
    arrived_at: Instant,
) -> Result<Outcome, Failure> {
    let id = &*request.id;
    let mut chat = ChatRequest::from_prompt(&*request.prompt, request.max_tokens);
    let extension = shared
        .config()
        .experts
        .iter()
        .any(|e| e.name == expert && e.qosroute_extension);
    if extension {
        // The emulator's extension: it answers with the quality its model has on this task.
        chat.extra.insert(
            "qosroute".into(),
            serde_json::json!({ "task": task.as_str() }),
        );
    }
    let dispatched_at = Instant::now();
    let mut stream = match client.chat(chat).await {
        Ok(s) => s,
        Err(e) => return Err(Failure::BeforeFirstToken(e)),
    };
    let mut seq = 0u32;
    let mut pending = String::new();
    let mut pending_tokens = 0usize;
    let mut last_flush = Instant::now();
    let mut tokens = 0u32;
    let mut first_token_at: Option<Instant> = None;
    let mut gaps = TokenGaps::default();
    loop {
        let event = tokio::select! {
            () = shared.cut.cancelled() => return Err(Failure::Cut),
            event = stream.next() => event,
        };
        match event {
            Some(Ok(StreamEvent::Token { text, at })) => {
                tokens += 1;
                gaps.token(at);
                if first_token_at.is_some() {
                    // Every later token is counted without the router's lock: token
                    // bookkeeping never waits behind a decision.
                    count.add(1);
                } else {
                    first_token_at = Some(at);
                    let expert = expert.to_owned();
                    let prompt_tokens = estimate_prompt_tokens(&request.prompt);
                    shared
                        .router
                        .tell(move |router| {
                            router.ledger.tokens_by_name(&expert, key, 1, at);
                            if let Some(e) = router.ledger.index_of(&expert) {
                                router.observe_first_token(e, key, prompt_tokens, at);
                            }
                        })
                        .await;
                }
                pending.push_str(&text);
                pending_tokens += 1;
                if request.stream
                    && (seq == 0
                        || pending_tokens >= CHUNK_TOKENS
                        || last_flush.elapsed() >= CHUNK_INTERVAL)
                {
                    flush(shared, route, id, expert, &mut seq, &mut pending, false).await;
                    pending_tokens = 0;
                    last_flush = Instant::now();
                }
            }
            Some(Ok(StreamEvent::Done {
                usage, extension, ..
            })) => {
                flush(shared, route, id, expert, &mut seq, &mut pending, true).await;
                let now = Instant::now();
                let output_tokens = usage.map_or(tokens, |u| u.completion_tokens.max(tokens));
                let total_s = now.saturating_duration_since(arrived_at).as_secs_f64();
                let s_per_token = total_s / f64::from(output_tokens.max(1));
                // The simulator's rule: strictly under the SLO.
                let slo_met = qosroute_core::slo_met(s_per_token, slo);
                if let Some(predicted) = predicted {
                    let ttft = first_token_at
                        .map(|t| t.saturating_duration_since(arrived_at).as_secs_f64());
                    shared
                        .metrics
                        .prediction_errors
                        .observe(expert, predicted, ttft, s_per_token);
                }
                let quality = extension
                    .as_ref()
                    .and_then(|x| x.get("quality"))
                    .and_then(serde_json::Value::as_f64);
                // The request's mean time between tokens is one decode-step observation,
                // at the batch the ledger saw on average over the answer.
                let step = gaps.step_s();
                let finished = expert.to_owned();
                shared
                    .router
                    .tell(move |router| {
                        if let Some(e) = router.ledger.index_of(&finished) {
                            if let Some(step) = step {
                                router.observe_decode_step(e, key, step, now);
                            }
                            router.learn_completion(e, task, output_tokens);
                        }
                        router.ledger.finish_by_name(&finished, key, now);
                    })
                    .await;
                if !slo_met {
                    shared
                        .metrics
                        .slo_violations
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                let realised = quality.map(|q| if slo_met { q } else { 0.0 });
                if let Some(q) = realised {
                    shared.metrics.qos(q);
                }
                shared.metrics.expert_completed(expert, slo_met, realised);
                let ttft = first_token_at.map_or(0.0, |t| {
                    t.saturating_duration_since(dispatched_at).as_secs_f64()
                });
                let fin = proto::FinalReply::new(
                    id,
                    expert,
                    output_tokens,
                    ms(ttft),
                    ms(total_s),
                    s_per_token as f32,
                    slo_met,
                );
                // Recorded before the final goes out: a device may rate the answer at once.
                shared.answered(device, id, expert, task);
                let out = match fin {
                    Ok(f) => encode(route, &proto::Reply::Final(f)),
                    Err(error) => {
                        tracing::error!(?error, "final reply does not fit the wire format");
                        None
                    }
                };
                publish(shared, route, out).await;
                return Ok(Outcome::Completed);
            }
            Some(Err(e)) => {
                return Err(if tokens == 0 {
                    Failure::BeforeFirstToken(e)
                } else {
                    Failure::AfterTokens(e)
                });
            }
            None => {
                let e = ExpertError::Closed {
                    tokens_delivered: tokens,
                };
                return Err(if tokens == 0 {
                    Failure::BeforeFirstToken(e)
                } else {
                    Failure::AfterTokens(e)
                });
            }
        }
    }
}

fn ms(seconds: f64) -> u32 {
    (seconds * 1e3).round().clamp(0.0, f64::from(u32::MAX)) as u32
}

/// Publishes the collected text as one or more chunks (bounded size each); `done` marks the
/// last one.
async fn flush(
    shared: &Shared,
    route: &ReplyRoute,
    id: &str,
    expert: &str,
    seq: &mut u32,
    pending: &mut String,
    done: bool,
) {
    let text = std::mem::take(pending);
    let pieces = proto::split_text(&text, proto::MAX_CHUNK_BYTES);
    let count = pieces.len();
    for (i, piece) in pieces.into_iter().enumerate() {
        let last = done && i + 1 == count;
        let out = match proto::ReplyChunk::new(id, *seq, piece, last, expert) {
            Ok(c) => encode(route, &proto::Reply::Chunk(c)),
            Err(error) => {
                tracing::error!(?error, "chunk does not fit the wire format");
                None
            }
        };
        publish(shared, route, out).await;
        *seq += 1;
    }
    if done && count == 0 {
        let out = proto::ReplyChunk::new(id, *seq, "", true, expert)
            .ok()
            .and_then(|c| encode(route, &proto::Reply::Chunk(c)));
        publish(shared, route, out).await;
        *seq += 1;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn gaps_of(ms: &[u64]) -> TokenGaps {
        let mut t = Instant::now();
        let mut g = TokenGaps::default();
        g.token(t);
        for &m in ms {
            t += Duration::from_millis(m);
            g.token(t);
        }
        g
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn without_stalls_the_step_is_first_to_last_over_the_gaps() {
        // 10 tokens 10 ms apart: 90 ms over 9 gaps, what (last - first) / (tokens - 1) gives.
        assert!(close(gaps_of(&[10; 9]).step_s(), 0.010));
        // A reader that falls behind gets bursts (0 then 20 ms): the mean is unmoved.
        assert!(close(gaps_of(&[0, 20, 0, 20, 0, 20]).step_s(), 0.010));
        // Longer bursts too: a 40 ms wait, then three tokens that were due, at once. The long
        // gaps are not stalls (the stream does not resume at its pace after them).
        assert!(close(
            gaps_of(&[40, 0, 0, 0, 40, 0, 0, 0, 40, 0]).step_s(),
            0.012
        ));
    }

    #[test]
    fn a_joining_prefill_stall_is_left_to_the_prefill_term() {
        // 8 steps of 10 ms and one 200 ms stall: the mean of all is 31.1 ms, the stall is over
        // 3 x that, so the step is 10 ms (with the stall it would be 31.1 ms).
        let mut ms = vec![10; 8];
        ms.insert(4, 200);
        assert!(
            close(gaps_of(&ms).step_s(), 0.010),
            "{:?}",
            gaps_of(&ms).step_s()
        );
        // A gap under 3 x the mean stays: 8 x 10 ms and one 30 ms gap (mean 12.2 ms).
        let mut ms = vec![10; 8];
        ms.push(30);
        assert!(close(gaps_of(&ms).step_s(), 0.110 / 9.0));
    }

    #[test]
    fn fewer_than_two_gaps_measure_nothing() {
        assert_eq!(gaps_of(&[]).step_s(), None);
        assert_eq!(gaps_of(&[10]).step_s(), None);
        assert!(close(gaps_of(&[10, 30]).step_s(), 0.020));
    }
}
