//! [`ChatRequest`]: what is asked of an expert, and the JSON body it becomes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "user".to_owned(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "system".to_owned(),
            content: content.into(),
        }
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatMessage {
            role: "assistant".to_owned(),
            content: content.into(),
        }
    }
}

/// A chat completion request. The client always streams, whatever `extra` says.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ChatRequest {
    /// The conversation; a device's prompt is one `user` message.
    pub messages: Vec<ChatMessage>,
    /// Most tokens of the answer (`max_tokens`); the server's default when `None`.
    pub max_tokens: Option<u32>,
    /// Sampling temperature; the server's default when `None`.
    pub temperature: Option<f64>,
    /// Further fields merged into the body last: they override the fields above (and
    /// `stream_options`), a `null` removes a field (e.g. `"stream_options": null` for a server
    /// that rejects it), but `stream` stays `true`. The test emulator reads its extension fields
    /// from here.
    pub extra: Map<String, Value>,
}

impl ChatRequest {
    /// One `user` message.
    pub fn from_prompt(prompt: impl Into<String>, max_tokens: impl Into<Option<u32>>) -> Self {
        ChatRequest {
            messages: vec![ChatMessage::user(prompt)],
            max_tokens: max_tokens.into(),
            temperature: None,
            extra: Map::new(),
        }
    }

    /// Adds one field to [`ChatRequest::extra`].
    pub fn with_extra(mut self, key: impl Into<String>, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }

    /// The JSON body sent to `POST /v1/chat/completions` for `model`.
    pub fn to_body(&self, model: &str) -> Map<String, Value> {
        let mut body = Map::new();
        body.insert("model".to_owned(), Value::from(model));
        let messages = self
            .messages
            .iter()
            .map(|m| {
                let mut o = Map::new();
                o.insert("role".to_owned(), Value::from(m.role.as_str()));
                o.insert("content".to_owned(), Value::from(m.content.as_str()));
                Value::Object(o)
            })
            .collect();
        body.insert("messages".to_owned(), Value::Array(messages));
        let mut options = Map::new();
        options.insert("include_usage".to_owned(), Value::Bool(true));
        body.insert("stream_options".to_owned(), Value::Object(options));
        if let Some(n) = self.max_tokens {
            body.insert("max_tokens".to_owned(), Value::from(n));
        }
        if let Some(t) = self.temperature {
            // A non-finite temperature has no JSON form; leave it to the server's default.
            if let Some(n) = serde_json::Number::from_f64(t) {
                body.insert("temperature".to_owned(), Value::Number(n));
            }
        }
        for (key, value) in &self.extra {
            if value.is_null() {
                body.remove(key);
            } else {
                body.insert(key.clone(), value.clone());
            }
        }
        body.insert("stream".to_owned(), Value::Bool(true));
        body
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_body_streams_with_usage_and_carries_the_fields() {
        let mut r = ChatRequest::from_prompt("hi", 16);
        r.temperature = Some(0.5);
        let body = Value::Object(r.to_body("m"));
        assert_eq!(
            body,
            json!({
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                "stream": true,
                "stream_options": {"include_usage": true},
                "max_tokens": 16,
                "temperature": 0.5,
            })
        );
    }

    #[test]
    fn extra_overrides_removes_with_null_but_never_turns_streaming_off() {
        let r = ChatRequest::from_prompt("hi", None)
            .with_extra("qosroute", json!({"quality": 0.9}))
            .with_extra("stream_options", Value::Null)
            .with_extra("stream", json!(false))
            .with_extra("model", json!("other"));
        let body = r.to_body("m");
        assert_eq!(body.get("qosroute"), Some(&json!({"quality": 0.9})));
        assert_eq!(body.get("stream_options"), None);
        assert_eq!(body.get("stream"), Some(&json!(true)));
        assert_eq!(body.get("model"), Some(&json!("other")));
        assert_eq!(body.get("max_tokens"), None);
    }
}
