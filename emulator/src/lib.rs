//! An OpenAI-compatible LLM server driven in real time by the simulator's engine, for tests and demos.
//!
//! [`EmulatedExpert::serve`] puts one expert of a catalogue on a TCP listener: requests to
//! `POST /v1/chat/completions` run through the same [`qosroute_sim::ExpertEngine`] as in the
//! simulator (continuous batching, prefill stalls decode, step time `t0 + d(b-1) + e*C`, KV
//! limits, FCFS queue), in real time, and every token is streamed at the time the engine's
//! step model produces it. So a client sees the TTFT and per-token latency the simulator
//! would compute for the same arrivals. Answers are synthetic words (`tok0 tok1 ...`); the
//! quality the expert's model would have had comes back in a `"qosroute"` extension object.
//!
//! ```no_run
//! # async fn demo(profile: std::sync::Arc<qosroute_core::ExpertProfile>) -> Result<(), Box<dyn std::error::Error>> {
//! use qosroute_emulator::{EmulatedExpert, EmulatorOptions};
//!
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let expert = EmulatedExpert::serve(profile.clone(), EmulatorOptions::for_profile(&profile), listener)?;
//! println!("{} serves {} at {}", profile.name, expert.model_name(), expert.base_url());
//! // ... send requests to expert.base_url() ...
//! expert.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Who stops what: each [`EmulatedExpert`] owns two tasks, its HTTP server and its engine.
//! [`EmulatedExpert::shutdown`] stops the server accepting, lets the answers in flight finish
//! (up to [`EmulatorOptions::shutdown_grace`]), then stops the engine and waits for both tasks.
//! Dropping an [`EmulatedExpert`] without `shutdown` signals both tasks to stop at once but
//! does not wait for them.

mod driver;
pub mod faults;
pub mod quality;
pub mod request;
pub mod schedule;
mod server;
pub mod wire;

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qosroute_core::{ExpertProfile, InvalidProfile, SimRng};
use qosroute_sim::QualityTable;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use faults::{Faults, InvalidFaults};
pub use quality::AnswerQuality;
pub use request::{
    CHARS_PER_TOKEN, ChatCompletionRequest, DEFAULT_OUTPUT_TOKENS, PROMPT_HEAD_CHARS,
};
pub use schedule::{EngineLoad, TokenSchedule};
pub use wire::CounterValues;

use driver::{Counters, EmulatorClock, run_engine};
use server::{KnownLengths, Shared, router};

/// Largest request body accepted by default, bytes (larger ones get `413`).
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// How long [`EmulatedExpert::shutdown`] lets answers in flight finish by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How an expert is emulated.
#[derive(Clone)]
pub struct EmulatorOptions {
    /// The model name the server answers to (`model` in requests and responses, `/v1/models`,
    /// the `model_name` label of `/metrics`). A request naming another model gets `404`.
    pub model_name: String,
    /// Where answer quality comes from (`QualityTable::embedded()`); `None`: never reported.
    pub quality: Option<Arc<QualityTable>>,
    /// Faults in force at start (changeable at run time).
    pub faults: Faults,
    /// Wall-clock seconds per engine second: 1.0 is real time, 0.1 ten times faster (every
    /// engine duration is multiplied by it). Finite and positive.
    pub time_scale: f64,
    /// Seed of the `error_rate` fault's draws.
    pub seed: u64,
    /// Largest request body accepted, bytes (larger ones get `413`).
    pub max_body_bytes: usize,
    /// How long [`EmulatedExpert::shutdown`] lets answers in flight finish (wall clock).
    pub shutdown_grace: Duration,
    /// The true length of the answer to a prompt, for a site that knows it (the demo replays
    /// a trace whose answers have known lengths): given the prompt's head
    /// ([`ChatCompletionRequest::prompt_head`]), the answer's length in tokens, or `None`.
    /// The answer is that long, cut at the request's `max_tokens` as a real engine cuts it;
    /// a `qosroute.output_tokens` in the request wins. `None` (the default): the request's
    /// length, else [`DEFAULT_OUTPUT_TOKENS`].
    pub answer_tokens: Option<AnswerTokens>,
}

/// The true length of the answer to a prompt, from its head (see
/// [`EmulatorOptions::answer_tokens`]).
pub type AnswerTokens = Arc<dyn Fn(&str) -> Option<u32> + Send + Sync>;

impl std::fmt::Debug for EmulatorOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorOptions")
            .field("model_name", &self.model_name)
            .field("quality", &self.quality.as_ref().map(|q| q.source.as_str()))
            .field("faults", &self.faults)
            .field("time_scale", &self.time_scale)
            .field("seed", &self.seed)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("answer_tokens", &self.answer_tokens.is_some())
            .finish()
    }
}

impl EmulatorOptions {
    /// Real time, no faults, no quality table, seed 1, and the profile's `model` as model name.
    pub fn for_profile(profile: &ExpertProfile) -> Self {
        Self {
            model_name: profile.model.clone(),
            quality: None,
            faults: Faults::default(),
            time_scale: 1.0,
            seed: 1,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            answer_tokens: None,
        }
    }

    fn validate(&self) -> Result<(), EmulatorError> {
        let invalid = |m: String| Err(EmulatorError::InvalidOptions(m));
        if self.model_name.trim().is_empty() {
            return invalid("model_name must not be empty".into());
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return invalid(format!(
                "time_scale must be positive and finite, got {}",
                self.time_scale
            ));
        }
        if self.max_body_bytes == 0 {
            return invalid("max_body_bytes must be at least 1".into());
        }
        self.faults.validate()?;
        Ok(())
    }
}

/// Why an emulator cannot start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The expert profile is unusable.
    #[error(transparent)]
    InvalidProfile(#[from] InvalidProfile),
    /// An option is out of range.
    #[error("emulator options: {0}")]
    InvalidOptions(String),
    /// A fault setting is out of range.
    #[error(transparent)]
    InvalidFaults(#[from] InvalidFaults),
    /// `serve` was called outside a Tokio runtime.
    #[error("the emulator must be started inside a Tokio runtime")]
    NoRuntime,
    /// The listener failed.
    #[error("emulator I/O: {0}")]
    Io(#[from] std::io::Error),
    /// One of its tasks panicked or was cancelled.
    #[error("emulator task {task} failed: {message}")]
    Task {
        /// `server` or `engine`.
        task: &'static str,
        /// What happened.
        message: String,
    },
}

/// One expert served over HTTP, driven in real time by the simulator's engine. The handle
/// owns the server and engine tasks (see the crate docs for who stops what).
#[derive(Debug)]
pub struct EmulatedExpert {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop_engine: CancellationToken,
    server: Option<JoinHandle<std::io::Result<()>>>,
    engine: Option<JoinHandle<()>>,
    shutdown_grace: Duration,
}

impl EmulatedExpert {
    /// Starts serving `profile` on `listener` (must be called inside a Tokio runtime). Engine
    /// time starts now.
    pub fn serve(
        profile: Arc<ExpertProfile>,
        options: EmulatorOptions,
        listener: TcpListener,
    ) -> Result<Self, EmulatorError> {
        profile.validate()?;
        options.validate()?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| EmulatorError::NoRuntime)?;
        let addr = listener.local_addr()?;
        let clock = EmulatorClock::new(Instant::now(), options.time_scale);
        let (submit, submissions) = mpsc::channel(1024);
        let (load_tx, load_rx) = watch::channel(EngineLoad::default());
        let (slowdown_tx, slowdown_rx) = watch::channel(options.faults.engine_slowdown());
        let counters = Arc::new(Counters::default());
        let quality = options
            .quality
            .as_ref()
            .and_then(|table| AnswerQuality::new(table, &profile.model));
        if options.quality.is_some() && quality.is_none() {
            tracing::warn!(
                expert = %profile.name, model = %profile.model,
                "the quality table has no column for this model: no quality reported"
            );
        }
        let shared = Arc::new(Shared {
            profile: profile.clone(),
            model_name: options.model_name.clone(),
            quality,
            faults: Mutex::new(options.faults),
            slowdown: slowdown_tx,
            error_draws: Mutex::new(SimRng::new(options.seed)),
            submissions: submit,
            load: load_rx,
            counters: counters.clone(),
            closing: CancellationToken::new(),
            next_answer: AtomicU64::new(0),
            answer_tokens: KnownLengths(options.answer_tokens.clone()),
        });
        let stop_engine = CancellationToken::new();
        let engine = runtime.spawn(run_engine(
            TokenSchedule::new(profile.clone()),
            clock,
            slowdown_rx,
            submissions,
            stop_engine.clone(),
            load_tx,
            counters,
        ));
        let app = router(shared.clone(), options.max_body_bytes);
        let closing = shared.closing.clone();
        let server = runtime.spawn(async move {
            // Small SSE writes go out at once (Nagle's algorithm against the client's delayed
            // ACKs stalled each answer by about 40 ms).
            let listener = axum::serve::ListenerExt::tap_io(listener, |s| {
                let _ = s.set_nodelay(true);
            });
            axum::serve(listener, app)
                .with_graceful_shutdown(closing.cancelled_owned())
                .await
        });
        tracing::info!(
            expert = %profile.name, model = %options.model_name, %addr,
            time_scale = options.time_scale, "emulated expert serving"
        );
        Ok(Self {
            addr,
            shared,
            stop_engine,
            server: Some(server),
            engine: Some(engine),
            shutdown_grace: options.shutdown_grace,
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, the base URL of its OpenAI-compatible API (`/v1/...`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The expert it emulates.
    pub fn profile(&self) -> &Arc<ExpertProfile> {
        &self.shared.profile
    }

    /// The model name it answers to.
    pub fn model_name(&self) -> &str {
        &self.shared.model_name
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Sets the faults (as `POST /admin/faults` does); requests arriving from now on see them.
    pub fn set_faults(&self, faults: Faults) -> Result<(), InvalidFaults> {
        faults.validate()?;
        self.shared.set_faults(faults);
        Ok(())
    }

    /// The engine's load as `/metrics` reports it.
    pub fn load(&self) -> EngineLoad {
        *self.shared.load.borrow()
    }

    /// The counters `/metrics` reports.
    pub fn counters(&self) -> CounterValues {
        self.shared.counters.values()
    }

    /// Stops serving: no new connections or requests (hung requests get `503`); answers in
    /// flight run to their end for up to the shutdown grace, after which the engine stops and
    /// the streams still open end with an error event (non-streamed ones get `503`).
    /// Returns once both tasks have ended; a connection still open a further grace period
    /// later is cut.
    pub async fn shutdown(mut self) -> Result<(), EmulatorError> {
        tracing::info!(expert = %self.shared.profile.name, "emulated expert shutting down");
        self.shared.closing.cancel();
        let mut result = Ok(());
        if let Some(mut server) = self.server.take() {
            let joined = match tokio::time::timeout(self.shutdown_grace, &mut server).await {
                Ok(joined) => Some(joined),
                Err(_) => {
                    self.stop_engine.cancel();
                    match tokio::time::timeout(self.shutdown_grace, &mut server).await {
                        Ok(joined) => Some(joined),
                        Err(_) => {
                            tracing::warn!(
                                expert = %self.shared.profile.name,
                                "connections still open after the grace period: cut"
                            );
                            server.abort();
                            let _ = server.await;
                            None
                        }
                    }
                }
            };
            result = match joined {
                Some(Ok(Ok(()))) | None => Ok(()),
                Some(Ok(Err(e))) => Err(EmulatorError::Io(e)),
                Some(Err(e)) => Err(EmulatorError::Task {
                    task: "server",
                    message: e.to_string(),
                }),
            };
        }
        self.stop_engine.cancel();
        if let Some(engine) = self.engine.take()
            && let Err(e) = engine.await
        {
            result = result.and(Err(EmulatorError::Task {
                task: "engine",
                message: e.to_string(),
            }));
        }
        result
    }
}

impl Drop for EmulatedExpert {
    fn drop(&mut self) {
        self.shared.closing.cancel();
        self.stop_engine.cancel();
    }
}
