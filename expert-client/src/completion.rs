//! What the events of a chat-completion stream mean: the pure part of [`crate::ChatStream`].
//!
//! The dialects tolerated (all OpenAI-compatible):
//! - vLLM: a first chunk with `delta.role` and empty content, one chunk per token,
//!   `finish_reason` in the last content chunk, with `stream_options.include_usage` a final chunk
//!   with `choices: []` and `usage`, then `data: [DONE]`;
//! - llama.cpp `llama-server`: `finish_reason` and `usage` (plus `timings`) in the last chunk
//!   with an empty `delta`, then `data: [DONE]` (older versions end without `[DONE]`);
//! - Ollama `/v1/chat/completions`: chunks with `delta.role` and content, `finish_reason`
//!   in the last content chunk, usage in its own chunk when asked for, `data: [DONE]`;
//! - OpenAI: `usage: null` in every chunk, the usage chunk last, `data: [DONE]`.
//!
//! Only choice 0 (or a choice without `index`) is followed; a request never asks for more.
//! `delta.reasoning_content` (thinking) is not part of the answer and is not reported.

use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use crate::error::excerpt;
use crate::sse::SseEvent;

/// Token counts reported by the server for one answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Usage {
    /// Tokens of the prompt (0 when the server did not say).
    pub prompt_tokens: u32,
    /// Tokens of the answer.
    pub completion_tokens: u32,
}

/// One thing that happened on a chat stream.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// One content delta (usually one token) of the answer, in order. Empty deltas are skipped.
    Token {
        /// The text of the delta.
        text: String,
        /// When its bytes arrived.
        at: Instant,
    },
    /// The answer is complete; always the last event of a successful stream.
    Done {
        /// `stop`, `length`, ...; `None` when the server did not say.
        finish_reason: Option<String>,
        /// Token counts, when the server reported them.
        usage: Option<Usage>,
        /// The top-level `"qosroute"` object of the last chunk that carried one (the emulator
        /// reports the answer's quality there).
        extension: Option<Value>,
    },
}

/// Why the stream cannot go on, before the count of delivered tokens is attached.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fault {
    Protocol(String),
    Closed,
    Timeout(crate::TimeoutPhase),
}

impl Fault {
    pub(crate) fn into_error(self, tokens_delivered: u32) -> crate::ExpertError {
        match self {
            Fault::Protocol(message) => crate::ExpertError::Protocol {
                message,
                tokens_delivered,
            },
            Fault::Closed => crate::ExpertError::Closed { tokens_delivered },
            Fault::Timeout(phase) => crate::ExpertError::Timeout {
                phase,
                tokens_delivered,
            },
        }
    }
}

/// What the stream says after one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Progress {
    /// More is to come.
    Open,
    /// `data: [DONE]`: the answer is complete; nothing after it is read.
    Finished,
}

#[derive(Deserialize)]
struct RawChunk {
    #[serde(default)]
    choices: Option<Vec<RawChoice>>,
    #[serde(default)]
    usage: Option<RawUsage>,
    #[serde(default)]
    qosroute: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct RawChoice {
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    delta: Option<RawDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct RawDelta {
    #[serde(default)]
    content: Option<String>,
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

/// Most bytes of a server's payload quoted in a protocol error.
const QUOTE_BYTES: usize = 200;

/// Folds the events of one answer into [`StreamEvent`]s.
#[derive(Debug, Default)]
pub(crate) struct Assembler {
    finish_reason: Option<String>,
    usage: Option<Usage>,
    extension: Option<Value>,
}

impl Assembler {
    /// Interprets one event; tokens go to `out`.
    pub(crate) fn on_event(
        &mut self,
        event: &SseEvent,
        at: Instant,
        out: &mut Vec<StreamEvent>,
    ) -> Result<Progress, Fault> {
        match event.event.as_deref() {
            None | Some("message") => {}
            Some("error") => {
                return Err(Fault::Protocol(format!(
                    "the expert reported an error: {}",
                    excerpt(event.data.as_bytes(), QUOTE_BYTES)
                )));
            }
            Some(other) => {
                tracing::debug!(
                    event = other,
                    "ignoring a server-sent event of an unknown type"
                );
                return Ok(Progress::Open);
            }
        }
        let data = event.data.trim();
        if data == "[DONE]" {
            return Ok(Progress::Finished);
        }
        if data.is_empty() {
            return Ok(Progress::Open);
        }
        let chunk: RawChunk = serde_json::from_str(data).map_err(|e| {
            Fault::Protocol(format!(
                "not a chat completion chunk ({e}): {}",
                excerpt(data.as_bytes(), QUOTE_BYTES)
            ))
        })?;
        if let Some(error) = chunk.error.filter(|e| !e.is_null()) {
            let message = error
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| error.to_string(), str::to_owned);
            return Err(Fault::Protocol(format!(
                "the expert reported an error: {}",
                excerpt(message.as_bytes(), QUOTE_BYTES)
            )));
        }
        for choice in chunk.choices.unwrap_or_default() {
            if choice.index.is_some_and(|i| i != 0) {
                continue;
            }
            if let Some(text) = choice
                .delta
                .and_then(|d| d.content)
                .filter(|t| !t.is_empty())
            {
                out.push(StreamEvent::Token { text, at });
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason);
            }
        }
        if let Some(usage) = chunk.usage
            && let Some(completion) = usage.completion_tokens
        {
            self.usage = Some(Usage {
                prompt_tokens: saturate(usage.prompt_tokens.unwrap_or(0)),
                completion_tokens: saturate(completion),
            });
        }
        if let Some(extension) = chunk.qosroute.filter(|x| !x.is_null()) {
            self.extension = Some(extension);
        }
        Ok(Progress::Open)
    }

    /// Whether a `finish_reason` was seen: the answer is complete even without `[DONE]`.
    pub(crate) fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    /// The final event.
    pub(crate) fn done(&mut self) -> StreamEvent {
        StreamEvent::Done {
            finish_reason: self.finish_reason.take(),
            usage: self.usage.take(),
            extension: self.extension.take(),
        }
    }
}

fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(payloads: &[&str]) -> (Vec<StreamEvent>, Result<Progress, Fault>, Assembler) {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        let at = Instant::now();
        let mut last = Ok(Progress::Open);
        for p in payloads {
            last = a.on_event(
                &SseEvent {
                    data: (*p).to_owned(),
                    ..SseEvent::default()
                },
                at,
                &mut out,
            );
            if last.is_err() {
                break;
            }
        }
        (out, last, a)
    }

    fn texts(events: &[StreamEvent]) -> Vec<&str> {
        events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::Token { text, .. } => Some(text.as_str()),
                StreamEvent::Done { .. } => None,
            })
            .collect()
    }

    #[test]
    fn content_deltas_become_tokens_and_empty_ones_are_skipped() {
        let (out, last, mut a) = run(&[
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7},"qosroute":{"quality":0.8}}"#,
            "[DONE]",
        ]);
        assert_eq!(texts(&out), vec!["Hel", "lo"]);
        assert_eq!(last, Ok(Progress::Finished));
        assert_eq!(
            a.done(),
            StreamEvent::Done {
                finish_reason: Some("stop".into()),
                usage: Some(Usage {
                    prompt_tokens: 5,
                    completion_tokens: 2
                }),
                extension: Some(serde_json::json!({"quality": 0.8})),
            }
        );
    }

    #[test]
    fn nulls_and_other_choices_are_tolerated() {
        let (out, last, a) = run(&[
            r#"{"choices":[{"index":1,"delta":{"content":"other"}}],"usage":null,"qosroute":null}"#,
            r#"{"choices":null}"#,
            r#"{"choices":[{"delta":{"content":null}}]}"#,
            r#"{"choices":[{"delta":{}, "finish_reason":"length"}]}"#,
        ]);
        assert!(out.is_empty());
        assert_eq!(last, Ok(Progress::Open));
        assert!(a.finished());
    }

    #[test]
    fn garbage_and_error_objects_are_protocol_faults() {
        assert!(matches!(run(&["{not json"]).1, Err(Fault::Protocol(_))));
        assert!(matches!(run(&["[1,2]"]).1, Err(Fault::Protocol(_))));
        assert!(matches!(
            run(&[r#"{"choices":[{"delta":{"content":5}}]}"#]).1,
            Err(Fault::Protocol(_))
        ));
        let (_, last, _) = run(&[r#"{"error":{"message":"engine dead","code":500}}"#]);
        assert_eq!(
            last,
            Err(Fault::Protocol(
                "the expert reported an error: engine dead".into()
            ))
        );
    }

    #[test]
    fn an_error_event_type_is_a_protocol_fault_and_unknown_types_are_ignored() {
        let mut a = Assembler::default();
        let mut out = Vec::new();
        let ping = SseEvent {
            event: Some("ping".into()),
            data: "x".into(),
            id: None,
        };
        assert_eq!(
            a.on_event(&ping, Instant::now(), &mut out),
            Ok(Progress::Open)
        );
        let error = SseEvent {
            event: Some("error".into()),
            data: "boom".into(),
            id: None,
        };
        assert!(matches!(
            a.on_event(&error, Instant::now(), &mut out),
            Err(Fault::Protocol(_))
        ));
    }

    #[test]
    fn usage_counts_saturate_instead_of_wrapping() {
        let (_, _, mut a) = run(&[r#"{"choices":[],"usage":{"completion_tokens":99999999999}}"#]);
        let StreamEvent::Done { usage, .. } = a.done() else {
            unreachable!()
        };
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 0,
                completion_tokens: u32::MAX
            })
        );
    }
}
