//! What a `POST /v1/chat/completions` body asks for, read strictly: every field the emulator
//! uses is type-checked, anything wrong is a [`BadRequest`] naming the field, and no body
//! makes it panic. Fields it does not use (`temperature`, `top_p`, ...) are ignored.

use std::str::FromStr;

use qosroute_core::Task;
use serde_json::{Map, Value};

/// Output tokens of an answer when the request does not say (`"qosroute": {"output_tokens"}`),
/// before the `max_tokens` cap.
pub const DEFAULT_OUTPUT_TOKENS: u32 = 128;

/// Characters of message text per estimated prompt token.
pub const CHARS_PER_TOKEN: usize = 4;

/// Characters of the first message's text kept in [`ChatCompletionRequest::prompt_head`].
pub const PROMPT_HEAD_CHARS: usize = 64;

/// A chat completion request, as far as the emulator is concerned.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatCompletionRequest {
    /// `model`, when given.
    pub model: Option<String>,
    /// `stream` (default false).
    pub stream: bool,
    /// `stream_options.include_usage` (default false).
    pub include_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_tokens: Option<u32>,
    /// `qosroute.prompt_tokens`, else `ceil(chars / 4)` of the text of every message (at least 1).
    pub prompt_tokens: u32,
    /// `qosroute.output_tokens`: the answer's length before the caps.
    pub output_tokens: Option<u32>,
    /// `qosroute.task`.
    pub task: Option<Task>,
    /// `qosroute.prompt_id`: a row of the quality table.
    pub prompt_id: Option<String>,
    /// The first [`PROMPT_HEAD_CHARS`] characters of the first message's text: where a site
    /// that knows its answers' lengths ([`crate::EmulatorOptions::answer_tokens`]) finds the
    /// request (the demo's devices put the request's id first).
    pub prompt_head: String,
}

/// Why a request body is refused (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BadRequest {
    /// What is wrong.
    pub message: String,
    /// The offending field, when there is one.
    pub param: Option<String>,
}

fn bad(param: &str, message: impl Into<String>) -> BadRequest {
    BadRequest {
        message: message.into(),
        param: Some(param.to_owned()),
    }
}

/// How an answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The answer has the length it wanted.
    Stop,
    /// Cut by `max_tokens` or by the KV cache.
    Length,
}

impl FinishReason {
    /// As the OpenAI API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl ChatCompletionRequest {
    /// Reads a request body.
    pub fn parse(body: &[u8]) -> Result<Self, BadRequest> {
        let value: Value = serde_json::from_slice(body).map_err(|e| BadRequest {
            message: format!("the body is not valid JSON: {e}"),
            param: None,
        })?;
        let Value::Object(body) = value else {
            return Err(BadRequest {
                message: "the body must be a JSON object".into(),
                param: None,
            });
        };
        let model = optional(
            &body,
            "model",
            |v| v.as_str().map(str::to_owned),
            "a string",
        )?;
        let stream = optional(&body, "stream", Value::as_bool, "a boolean")?.unwrap_or(false);
        let include_usage = match body.get("stream_options") {
            None | Some(Value::Null) => false,
            Some(Value::Object(options)) => {
                optional(options, "include_usage", Value::as_bool, "a boolean")
                    .map_err(|e| bad("stream_options.include_usage", e.message))?
                    .unwrap_or(false)
            }
            Some(_) => return Err(bad("stream_options", "`stream_options` must be an object")),
        };
        let max_tokens = match optional(&body, "max_completion_tokens", positive, POSITIVE)? {
            Some(n) => Some(n),
            None => optional(&body, "max_tokens", positive, POSITIVE)?,
        };
        if let Some(n) = optional(&body, "n", Value::as_u64, "an integer")?
            && n != 1
        {
            return Err(bad("n", "only `n = 1` is supported"));
        }
        let (chars, prompt_head) = message_chars(&body)?;
        let extension = match body.get("qosroute") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(x)) => x.clone(),
            Some(_) => return Err(bad("qosroute", "`qosroute` must be an object")),
        };
        let in_extension = |e: BadRequest| BadRequest {
            param: e.param.map(|p| format!("qosroute.{p}")),
            message: e.message,
        };
        let prompt_tokens = optional(&extension, "prompt_tokens", positive, POSITIVE)
            .map_err(in_extension)?
            .unwrap_or_else(|| estimate_prompt_tokens(chars));
        let output_tokens =
            optional(&extension, "output_tokens", positive, POSITIVE).map_err(in_extension)?;
        let task = optional(
            &extension,
            "task",
            |v| v.as_str().map(str::to_owned),
            "a string",
        )
        .map_err(in_extension)?
        .map(|t| Task::from_str(&t).map_err(|e| bad("qosroute.task", e.to_string())))
        .transpose()?;
        let prompt_id = optional(
            &extension,
            "prompt_id",
            |v| v.as_str().map(str::to_owned),
            "a string",
        )
        .map_err(in_extension)?;
        Ok(Self {
            model,
            stream,
            include_usage,
            max_tokens,
            prompt_tokens,
            output_tokens,
            task,
            prompt_id,
            prompt_head,
        })
    }

    /// The answer's length before the engine's KV limit, and how it ends: the length the
    /// request asks for (`qosroute.output_tokens`), else `known` (the answer's true length,
    /// when the site knows it), else [`DEFAULT_OUTPUT_TOKENS`]; capped at `max_tokens`, as a
    /// real engine cuts an answer at `max_tokens` (finish reason `length`).
    pub fn planned_output(&self, known: Option<u32>) -> (u32, FinishReason) {
        let wanted = self
            .output_tokens
            .or(known.filter(|n| *n >= 1))
            .unwrap_or(DEFAULT_OUTPUT_TOKENS);
        match self.max_tokens {
            Some(cap) if cap < wanted => (cap, FinishReason::Length),
            _ => (wanted, FinishReason::Stop),
        }
    }
}

const POSITIVE: &str = "an integer from 1 to 4294967295";

fn positive(v: &Value) -> Option<u32> {
    v.as_u64()
        .filter(|n| *n >= 1)
        .and_then(|n| u32::try_from(n).ok())
}

/// A field that may be absent or `null`; present, it must convert with `read`.
fn optional<T>(
    object: &Map<String, Value>,
    field: &str,
    read: impl Fn(&Value) -> Option<T>,
    expected: &str,
) -> Result<Option<T>, BadRequest> {
    match object.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => read(v)
            .map(Some)
            .ok_or_else(|| bad(field, format!("`{field}` must be {expected}"))),
    }
}

/// Estimated prompt tokens of `chars` characters of message text: `ceil(chars / 4)`, at least 1.
pub fn estimate_prompt_tokens(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(CHARS_PER_TOKEN).max(1)).unwrap_or(u32::MAX)
}

/// Characters of text in `messages` (string contents, and the `text` of content parts), and
/// the first [`PROMPT_HEAD_CHARS`] of the first text.
fn message_chars(body: &Map<String, Value>) -> Result<(usize, String), BadRequest> {
    let messages = match body.get("messages") {
        None | Some(Value::Null) => return Err(bad("messages", "`messages` is required")),
        Some(Value::Array(m)) => m,
        Some(_) => return Err(bad("messages", "`messages` must be an array")),
    };
    if messages.is_empty() {
        return Err(bad("messages", "`messages` must not be empty"));
    }
    let mut chars = 0usize;
    let mut head: Option<String> = None;
    let mut seen = |text: &str, chars: &mut usize| {
        *chars = chars.saturating_add(text.chars().count());
        if head.is_none() {
            head = Some(text.chars().take(PROMPT_HEAD_CHARS).collect());
        }
    };
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(message) = message else {
            return Err(bad(
                "messages",
                format!("`messages[{i}]` must be an object"),
            ));
        };
        if !message.get("role").is_some_and(Value::is_string) {
            return Err(bad(
                "messages",
                format!("`messages[{i}].role` must be a string"),
            ));
        }
        match message.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(text)) => seen(text, &mut chars),
            Some(Value::Array(parts)) => {
                for part in parts {
                    match part.get("text") {
                        Some(Value::String(text)) => seen(text, &mut chars),
                        None if part.is_object() => {}
                        _ => {
                            return Err(bad(
                                "messages",
                                format!(
                                    "`messages[{i}].content` parts must be objects with a string `text`"
                                ),
                            ));
                        }
                    }
                }
            }
            Some(_) => {
                return Err(bad(
                    "messages",
                    format!("`messages[{i}].content` must be a string or an array of parts"),
                ));
            }
        }
    }
    Ok((chars, head.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn parse(s: &str) -> Result<ChatCompletionRequest, BadRequest> {
        ChatCompletionRequest::parse(s.as_bytes())
    }

    #[test]
    fn a_plain_request_gets_defaults_and_an_estimated_prompt() {
        let r =
            parse(r#"{"model":"m","messages":[{"role":"user","content":"123456789"}]}"#).unwrap();
        assert_eq!(r.model.as_deref(), Some("m"));
        assert!(!r.stream && !r.include_usage);
        assert_eq!(r.prompt_tokens, 3, "ceil(9 / 4)");
        assert_eq!(
            r.planned_output(None),
            (DEFAULT_OUTPUT_TOKENS, FinishReason::Stop)
        );
        let r = parse(r#"{"messages":[{"role":"user","content":""}],"max_tokens":5}"#).unwrap();
        assert_eq!(r.prompt_tokens, 1, "at least one token");
        assert_eq!(r.planned_output(None), (5, FinishReason::Length));
    }

    #[test]
    fn the_extension_sets_lengths_task_and_prompt() {
        let r = parse(
            r#"{"messages":[{"role":"system","content":"ab"},{"role":"user","content":[{"type":"text","text":"héllo"},{"type":"image_url","image_url":{}}]}],
                "stream":true,"stream_options":{"include_usage":true},"max_tokens":100,"max_completion_tokens":50,
                "qosroute":{"output_tokens":70,"prompt_tokens":900,"task":"mmlu","prompt_id":"llmr-1"}}"#,
        )
        .unwrap();
        assert!(r.stream && r.include_usage);
        assert_eq!(r.max_tokens, Some(50), "max_completion_tokens wins");
        assert_eq!(r.prompt_tokens, 900);
        assert_eq!(r.task, Some(Task::Mmlu));
        assert_eq!(r.prompt_id.as_deref(), Some("llmr-1"));
        assert_eq!(r.planned_output(None), (50, FinishReason::Length));
        assert_eq!(r.prompt_head, "ab", "the first message's text");
        let r = parse(r#"{"messages":[{"role":"user","content":[{"type":"text","text":"héllo"}]}],"qosroute":{"output_tokens":7}}"#).unwrap();
        assert_eq!(r.prompt_tokens, 2, "5 characters, not 6 bytes");
        assert_eq!(r.planned_output(None), (7, FinishReason::Stop));
    }

    #[test]
    fn wrong_bodies_name_the_field() {
        let cases = [
            ("", None),
            ("[1]", None),
            ("{}", Some("messages")),
            (r#"{"messages":[]}"#, Some("messages")),
            (r#"{"messages":"hi"}"#, Some("messages")),
            (r#"{"messages":[{"content":"x"}]}"#, Some("messages")),
            (
                r#"{"messages":[{"role":"user","content":5}]}"#,
                Some("messages"),
            ),
            (
                r#"{"messages":[{"role":"user","content":[5]}]}"#,
                Some("messages"),
            ),
            (
                r#"{"messages":[{"role":"user"}],"stream":"yes"}"#,
                Some("stream"),
            ),
            (r#"{"messages":[{"role":"user"}],"model":3}"#, Some("model")),
            (
                r#"{"messages":[{"role":"user"}],"max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user"}],"max_tokens":-3}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user"}],"max_tokens":1.5}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user"}],"max_tokens":4294967296}"#,
                Some("max_tokens"),
            ),
            (r#"{"messages":[{"role":"user"}],"n":2}"#, Some("n")),
            (
                r#"{"messages":[{"role":"user"}],"stream_options":1}"#,
                Some("stream_options"),
            ),
            (
                r#"{"messages":[{"role":"user"}],"stream_options":{"include_usage":"y"}}"#,
                Some("stream_options.include_usage"),
            ),
            (
                r#"{"messages":[{"role":"user"}],"qosroute":[]}"#,
                Some("qosroute"),
            ),
            (
                r#"{"messages":[{"role":"user"}],"qosroute":{"output_tokens":"9"}}"#,
                Some("qosroute.output_tokens"),
            ),
            (
                r#"{"messages":[{"role":"user"}],"qosroute":{"task":"poetry"}}"#,
                Some("qosroute.task"),
            ),
        ];
        for (body, param) in cases {
            let e = parse(body).unwrap_err();
            assert_eq!(e.param.as_deref(), param, "{body}: {e}");
            assert!(!e.message.is_empty());
        }
        // Nulls are absent fields.
        assert!(parse(r#"{"messages":[{"role":"user","content":null}],"max_tokens":null,"qosroute":null,"stream_options":null}"#).is_ok());
    }

    #[test]
    fn a_known_answer_length_is_generated_up_to_max_tokens() {
        let long = "x".repeat(3 * PROMPT_HEAD_CHARS);
        let body =
            format!(r#"{{"messages":[{{"role":"user","content":"{long}"}}],"max_tokens":600}}"#);
        let r = parse(&body).unwrap();
        assert_eq!(r.prompt_head.len(), PROMPT_HEAD_CHARS);
        // The truth under the cap is generated whole; above it, cut at the cap.
        assert_eq!(r.planned_output(Some(431)), (431, FinishReason::Stop));
        assert_eq!(r.planned_output(Some(600)), (600, FinishReason::Stop));
        assert_eq!(r.planned_output(Some(601)), (600, FinishReason::Length));
        assert_eq!(
            r.planned_output(Some(0)),
            (DEFAULT_OUTPUT_TOKENS, FinishReason::Stop)
        );
        // A length the request asks for wins over the known one.
        let r =
            parse(r#"{"messages":[{"role":"user","content":"q"}],"qosroute":{"output_tokens":9}}"#)
                .unwrap();
        assert_eq!(r.planned_output(Some(431)), (9, FinishReason::Stop));
    }

    proptest! {
        #[test]
        fn no_body_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = ChatCompletionRequest::parse(&bytes);
        }

        #[test]
        fn no_json_value_panics(text in r#"\{"messages":\[\{"role":"user","content":"[a-z]{0,9}"\}\](,"(max_tokens|n|stream|qosroute|model)":(-?[0-9]{1,12}|"x"|null|true|\{"(output_tokens|prompt_tokens|task)":(-?[0-9]{1,12}|"mmlu"|\[\])\}))*\}"#) {
            if let Ok(r) = ChatCompletionRequest::parse(text.as_bytes()) {
                prop_assert!(r.prompt_tokens >= 1);
                let (n, _) = r.planned_output(None);
                prop_assert!(n >= 1);
            }
        }
    }
}
