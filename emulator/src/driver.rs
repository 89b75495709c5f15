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

/// Maps the Tokio clock to engine seconds: `time_scale` wall-clock seconds per engine second,
/// times the slowdown in force ([`Faults::slowdown`](crate::Faults::slowdown)). Each change of
/// the slowdown starts a new segment; earlier segments stay, so that engine times of the past
/// still map to the instants they happened at.
#[derive(Debug, Clone)]
pub(crate) struct EmulatorClock {
    start: Instant,
    time_scale: f64,
    /// `(wall seconds since start, engine seconds then, wall seconds per engine second)`, in
    /// time order; the first starts at `(0, 0, time_scale)`.
    segments: Vec<(f64, f64, f64)>,
}

impl EmulatorClock {
    pub fn new(start: Instant, time_scale: f64) -> Self {
        Self {
            start,
            time_scale,
            segments: vec![(0.0, 0.0, time_scale)],
        }
    }

    /// Engine seconds at `at`.
    pub fn engine_s(&self, at: Instant) -> f64 {
        let wall_s = at.saturating_duration_since(self.start).as_secs_f64();
        let (w0, e0, rate) = self
            .segments
            .iter()
            .rev()
            .find(|(w, _, _)| *w <= wall_s)
            .copied()
            .unwrap_or((0.0, 0.0, self.time_scale));
        e0 + (wall_s - w0) / rate
    }

    /// Wall-clock seconds since the start at engine time `engine_s`.
    pub fn wall_s(&self, engine_s: f64) -> f64 {
        let (w0, e0, rate) = self
            .segments
            .iter()
            .rev()
            .find(|(_, e, _)| *e <= engine_s)
            .copied()
            .unwrap_or((0.0, 0.0, self.time_scale));
        w0 + (engine_s - e0) * rate
    }

    /// The instant at which engine time `engine_s` is reached; far in the future when it
    /// cannot be represented.
    pub fn instant_of(&self, engine_s: f64) -> Instant {
        Duration::try_from_secs_f64(self.wall_s(engine_s).max(0.0))
            .ok()
            .and_then(|d| self.start.checked_add(d))
            .unwrap_or_else(far_future)
    }

    /// From `at` on, engine time runs `slowdown` times slower than the time scale says (1: as
    /// it says). Engine time is continuous across the change.
    pub fn set_slowdown(&mut self, at: Instant, slowdown: f64) {
        let rate = self.time_scale * slowdown;
        if self.segments.last().is_some_and(|s| s.2 == rate) {
            return;
        }
        let wall_s = at.saturating_duration_since(self.start).as_secs_f64();
        let wall_s = self.segments.last().map_or(wall_s, |s| wall_s.max(s.0));
        let engine_s = self.engine_s(self.start + Duration::from_secs_f64(wall_s));
        self.segments.push((wall_s, engine_s, rate));
    }

    /// `finished` with its engine times turned into wall-clock seconds since the start.
    pub fn finished_in_wall_s(&self, finished: Finished) -> Finished {
        Finished {
            arrival_s: self.wall_s(finished.arrival_s),
            admitted_s: self.wall_s(finished.admitted_s),
            first_token_s: self.wall_s(finished.first_token_s),
            finish_s: self.wall_s(finished.finish_s),
            ..finished
        }
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
    /// The request is complete: every token is out. Its times are wall-clock seconds since the
    /// engine started ([`EmulatorClock::finished_in_wall_s`]).
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
/// `slowdown` is the slowdown in force (1: none); a change applies to the engine at once,
/// requests in flight included.
pub(crate) async fn run_engine(
    mut schedule: TokenSchedule,
    mut clock: EmulatorClock,
    mut slowdown: watch::Receiver<f64>,
    mut submissions: mpsc::Receiver<Submission>,
    stop: CancellationToken,
    load: watch::Sender<EngineLoad>,
    counters: Arc<Counters>,
) {
    let mut responses: HashMap<RequestKey, mpsc::UnboundedSender<Progress>> = HashMap::new();
    let mut due = Vec::new();
    let mut slowdown_open = true;
    clock.set_slowdown(Instant::now(), *slowdown.borrow_and_update());
    loop {
        let next_due = schedule.next_due_s();
        let wake = next_due.map(|t| clock.instant_of(t));
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            changed = slowdown.changed(), if slowdown_open => {
                if changed.is_ok() {
                    let k = *slowdown.borrow_and_update();
                    clock.set_slowdown(Instant::now(), k);
                    tracing::info!(
                        expert = %schedule.profile().name, slowdown = k, at_s = clock.engine_s(Instant::now()),
                        "engine speed changed"
                    );
                } else {
                    slowdown_open = false;
                }
            }
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
        dispatch(&mut due, &mut responses, &counters, &clock);
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
    clock: &EmulatorClock,
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
                Progress::Finished(clock.finished_in_wall_s(finished))
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
