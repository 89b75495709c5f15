//! The daemon's HTTP side: streaming chat completions to OpenAI-compatible experts (vLLM,
//! llama.cpp, SGLang, Ollama, OpenAI), load scraping from their metrics, health checks.
//!
//! ```no_run
//! # async fn demo() -> Result<(), qosroute_expert_client::ExpertError> {
//! use qosroute_expert_client::{ChatRequest, ExpertClient, ExpertEndpoint, ExpertKind, StreamEvent};
//!
//! let endpoint = ExpertEndpoint::new("gpu0", "http://10.0.0.5:8000", "qwen2.5-7b", ExpertKind::Vllm);
//! let client = ExpertClient::new(endpoint)?;
//! let mut answer = client.chat(ChatRequest::from_prompt("Why is the sky blue?", 128)).await?;
//! while let Some(event) = answer.next().await {
//!     match event? {
//!         StreamEvent::Token { text, .. } => print!("{text}"),
//!         StreamEvent::Done { usage, .. } => println!("\n{usage:?}"),
//!     }
//! }
//! let load = client.scrape_load().await?; // running, waiting, kv_cache_usage: None = unknown
//! # let _ = load;
//! # Ok(())
//! # }
//! ```
//!
//! The pieces: [`ExpertClient`] (the pool and the requests), [`ChatStream`] and
//! [`StreamEvent`] (one answer), [`ExpertError`] (with the retry contract: retrying on
//! another expert is invisible to the device only while no token was delivered),
//! [`SseDecoder`] (the pure, bounded event-stream decoder), [`prometheus`] (the pure metrics
//! parser) and [`EngineLoad`] (unknown is never idle).

mod client;
mod completion;
mod endpoint;
mod error;
mod load;
pub mod prometheus;
mod request;
pub mod sse;
mod stream;

pub use client::{ExpertClient, MAX_SCRAPE_BYTES, POOL_IDLE_TIMEOUT, POOL_MAX_IDLE};
pub use completion::{StreamEvent, Usage};
pub use endpoint::{ExpertEndpoint, ExpertKind, MetricNames, Timeouts, UnknownExpertKind};
pub use error::{ExpertError, STATUS_BODY_EXCERPT_BYTES, TimeoutPhase};
pub use load::{EngineLoad, busy_slots};
pub use request::{ChatMessage, ChatRequest};
pub use sse::{SseDecoder, SseError, SseEvent};
pub use stream::{ChatStream, DRAIN_GRACE, ReadAnswer};
