//! The real-time driver: one task per emulated expert owns its [`TokenSchedule`], enqueues
//! arrivals at their arrival times and sends every token to its request's response at the
//! time the engine's step model produces it.
//!
//! Emulator time is `(now - start) / time_scale` engine seconds, on the Tokio clock (so
//! `#[tokio::test(start_paused = true)]` drives it deterministically). The task sleeps until
//! the next due token; tokens that fall due while it sleeps past them (Tokio timers have
//! millisecond resolution) go out together, each as its own server-sent event.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::schedule::{Delivery, EngineLoad, Finished, RequestKey, TokenSchedule};
use crate::wire::CounterValues;

/// Maps the Tokio clock to engine seconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EmulatorClock {
    start: Instant,
    time_scale: f64,
}

impl EmulatorClock {
    pub fn new(start: Instant, time_scale: f64) -> Self {
        Self { start, time_scale }
    }

    pub fn time_scale(&self) -> f64 {
        self.time_scale
    }

    /// Engine seconds at `at`.
    pub fn engine_s(&self, at: Instant) -> f64 {
        at.saturating_duration_since(self.start).as_secs_f64() / self.time_scale
    }

    /// The instant at which engine time `engine_s` is reached; far in the future when it
    /// cannot be represented.
    pub fn instant_of(&self, engine_s: f64) -> Instant {
        Duration::try_from_secs_f64((engine_s * self.time_scale).max(0.0))
            .ok()
            .and_then(|d| self.start.checked_add(d))
            .unwrap_or_else(far_future)
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// What the engine tells a request's response.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Progress {
    /// Tokens produced so far (cumulative).
    Tokens(u32),
    /// The request is complete: every token is out.
    Finished(Finished),
}

/// A request handed to the engine.
#[derive(Debug)]
pub(crate) struct Submission {
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    /// When the request arrived (its arrival time on the engine).
    pub received_at: Instant,
    /// Where its progress goes. Unbounded: at most one message per token of the answer.
    pub progress: mpsc::UnboundedSender<Progress>,
}

/// Counters shared by the engine task and the HTTP handlers.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub received: AtomicU64,
    pub success_stop: AtomicU64,
    pub success_length: AtomicU64,
    pub invalid: AtomicU64,
    pub injected_errors: AtomicU64,
    pub dropped: AtomicU64,
    pub hung: AtomicU64,
    pub disconnected: AtomicU64,
    pub engine_completed: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

impl Counters {
    pub fn values(&self) -> CounterValues {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterValues {
            received: v(&self.received),
            success_stop: v(&self.success_stop),
            success_length: v(&self.success_length),
            invalid: v(&self.invalid),
            injected_errors: v(&self.injected_errors),
            dropped: v(&self.dropped),
            hung: v(&self.hung),
            disconnected: v(&self.disconnected),
            engine_completed: v(&self.engine_completed),
            prompt_tokens: v(&self.prompt_tokens),
            generation_tokens: v(&self.generation_tokens),
        }
    }
}

/// The engine task of one expert. Runs until `stop` is cancelled or every submission sender
/// is gone; on return, every response still in flight sees its progress channel close.
pub(crate) async fn run_engine(
    mut schedule: TokenSchedule,
    clock: EmulatorClock,
    mut submissions: mpsc::Receiver<Submission>,
    stop: CancellationToken,
    load: watch::Sender<EngineLoad>,
    counters: Arc<Counters>,
) {
    let mut responses: HashMap<RequestKey, mpsc::UnboundedSender<Progress>> = HashMap::new();
    let mut due = Vec::new();
    loop {
        let next_due = schedule.next_due_s();
        let wake = next_due.map(|t| clock.instant_of(t));
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            submission = submissions.recv() => {
                let Some(s) = submission else { break };
                let now_s = clock.engine_s(s.received_at);
                match schedule.arrive(now_s, s.prompt_tokens, s.output_tokens, &mut due) {
                    Ok(key) => {
                        tracing::debug!(
                            expert = %schedule.profile().name, request = key, at_s = schedule.now_s(),
                            prompt_tokens = s.prompt_tokens, output_tokens = s.output_tokens,
                            "request arrived"
                        );
                        responses.insert(key, s.progress);
                    }
                    // The handler checks first; dropping the sender closes the response.
                    Err(error) => tracing::warn!(
                        expert = %schedule.profile().name, %error, "request refused by the engine"
                    ),
                }
            }
            () = tokio::time::sleep_until(wake.unwrap_or_else(far_future)), if wake.is_some() => {
                // Woken for `next_due`: it has been reached, whatever float rounding says.
                let now_s = clock.engine_s(Instant::now()).max(next_due.unwrap_or(0.0));
                schedule.advance(now_s, &mut due);
            }
        }
        dispatch(&mut due, &mut responses, &counters);
        load.send_replace(schedule.load());
    }
    tracing::debug!(
        expert = %schedule.profile().name,
        in_flight = schedule.in_flight(),
        "engine stopped"
    );
}

fn dispatch(
    due: &mut Vec<Delivery>,
    responses: &mut HashMap<RequestKey, mpsc::UnboundedSender<Progress>>,
    counters: &Counters,
) {
    for delivery in due.drain(..) {
        let message = match delivery.finished {
            Some(finished) => {
                bump(&counters.engine_completed, 1);
                bump(&counters.prompt_tokens, u64::from(finished.prompt_tokens));
                bump(
                    &counters.generation_tokens,
                    u64::from(finished.output_tokens),
                );
                Progress::Finished(finished)
            }
            None => Progress::Tokens(delivery.tokens),
        };
        let gone = match responses.get(&delivery.request) {
            Some(response) => response.send(message).is_err(),
            None => false,
        };
        if gone || delivery.finished.is_some() {
            responses.remove(&delivery.request);
        }
        if gone {
            // The response went away; like vLLM without abort, the engine finishes the request.
            tracing::debug!(
                request = delivery.request,
                "response gone; the request keeps its slot"
            );
        }
    }
}
