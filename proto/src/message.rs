//! The messages: what devices send ([`Request`], [`Feedback`]) and what they get back
//! ([`Reply`]).
//!
//! Field order is wire order (postcard has no field names): never reorder fields; a new field
//! means a new protocol version.
//!
//! The serde impls are the wire layout (postcard, and JSON field names and defaults) but do not
//! validate; use the crate's `decode_*` functions, which validate and report precisely what is
//! wrong. [`Reply`] implements only `Serialize` (internally tagged for human-readable formats,
//! externally tagged for binary ones); decode it with [`crate::decode_reply`].

use heapless::String;
use serde::{Deserialize, Serialize, Serializer};

use crate::code::ErrorCode;
use crate::error::{DecodeError, FieldTooLong};
use crate::task::Task;
use crate::{
    MAX_CHUNK_BYTES, MAX_ID_BYTES, MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_PROMPT_BYTES,
    MAX_TOKENS_LIMIT, PROTOCOL_VERSION,
};

/// A request id: chosen by the device (a counter, a UUID, ...), at most [`MAX_ID_BYTES`] bytes,
/// echoed in every reply. Unique per device while the request is in flight (the gateway drops a
/// redelivered duplicate).
pub type RequestId = String<MAX_ID_BYTES>;

/// `max_tokens` of a request built with [`Request::new`].
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// Largest `priority` (0 is the default and the lowest).
pub const MAX_PRIORITY: u8 = 7;

fn default_stream() -> bool {
    true
}

/// Copies `value` into a bounded string, or says which field overflowed.
pub(crate) fn bounded<const N: usize>(
    field: &'static str,
    value: &str,
) -> Result<String<N>, FieldTooLong> {
    String::try_from(value).map_err(|_| FieldTooLong {
        field,
        len: value.len(),
        max: N,
    })
}

fn check_version(v: u8) -> Result<(), DecodeError> {
    if v == PROTOCOL_VERSION {
        Ok(())
    } else {
        Err(DecodeError::UnsupportedVersion {
            found: u64::from(v),
        })
    }
}

fn check_id(id: &RequestId) -> Result<(), DecodeError> {
    if id.is_empty() {
        Err(DecodeError::invalid("id", "must not be empty"))
    } else {
        Ok(())
    }
}

/// An LLM request from a device.
///
/// JSON: `v`, `id`, `prompt` and `max_tokens` are required; `task` defaults to `chat`, `stream`
/// to `true`, `priority` to 0; `slo_s_per_token` and `deadline_unix_ms` may be omitted or `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u8,
    /// The device's id for this request, non-empty.
    pub id: RequestId,
    /// What kind of work it is (drives which expert answers best).
    #[serde(default)]
    pub task: Task,
    /// The prompt, non-empty.
    pub prompt: String<MAX_PROMPT_BYTES>,
    /// Most output tokens wanted, `1..=`[`MAX_TOKENS_LIMIT`].
    pub max_tokens: u32,
    /// Latency target in seconds per output token (finite, positive); `None`: the gateway's
    /// per-task SLO.
    #[serde(default)]
    pub slo_s_per_token: Option<f32>,
    /// Wall-clock deadline (Unix milliseconds) after which the answer is useless; the gateway
    /// answers `expired` instead of starting late.
    #[serde(default)]
    pub deadline_unix_ms: Option<u64>,
    /// `true`: reply chunks as text is generated; `false`: the whole answer at the end (still as
    /// chunks of at most [`MAX_CHUNK_BYTES`]).
    #[serde(default = "default_stream")]
    pub stream: bool,
    /// Scheduling priority, `0..=7`, higher first.
    #[serde(default)]
    pub priority: u8,
}

impl Request {
    /// A request with the defaults: version 1, [`DEFAULT_MAX_TOKENS`], no SLO, no deadline,
    /// streamed, priority 0. Fails if `id` or `prompt` is longer than its bound.
    pub fn new(id: &str, task: Task, prompt: &str) -> Result<Request, FieldTooLong> {
        Ok(Request {
            v: PROTOCOL_VERSION,
            id: bounded("id", id)?,
            task,
            prompt: bounded("prompt", prompt)?,
            max_tokens: DEFAULT_MAX_TOKENS,
            slo_s_per_token: None,
            deadline_unix_ms: None,
            stream: true,
            priority: 0,
        })
    }

    /// Sets `max_tokens`.
    #[must_use]
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Request {
        self.max_tokens = max_tokens;
        self
    }

    /// Sets the latency target (seconds per output token).
    #[must_use]
    pub fn with_slo_s_per_token(mut self, slo_s_per_token: f32) -> Request {
        self.slo_s_per_token = Some(slo_s_per_token);
        self
    }

    /// Sets the deadline (Unix milliseconds).
    #[must_use]
    pub fn with_deadline_unix_ms(mut self, deadline_unix_ms: u64) -> Request {
        self.deadline_unix_ms = Some(deadline_unix_ms);
        self
    }

    /// Sets whether replies stream.
    #[must_use]
    pub fn with_stream(mut self, stream: bool) -> Request {
        self.stream = stream;
        self
    }

    /// Sets the priority.
    #[must_use]
    pub fn with_priority(mut self, priority: u8) -> Request {
        self.priority = priority;
        self
    }

    /// Checks what the decoder checks: version, non-empty id and prompt, `max_tokens`, SLO,
    /// priority.
    pub fn validate(&self) -> Result<(), DecodeError> {
        check_version(self.v)?;
        check_id(&self.id)?;
        if self.prompt.is_empty() {
            return Err(DecodeError::invalid("prompt", "must not be empty"));
        }
        if self.max_tokens == 0 {
            return Err(DecodeError::invalid("max_tokens", "must be at least 1"));
        }
        if self.max_tokens > MAX_TOKENS_LIMIT {
            return Err(DecodeError::invalid(
                "max_tokens",
                "must be at most MAX_TOKENS_LIMIT (16384)",
            ));
        }
        if let Some(slo) = self.slo_s_per_token
            && !(slo.is_finite() && slo > 0.0)
        {
            return Err(DecodeError::invalid(
                "slo_s_per_token",
                "must be a finite number of seconds greater than 0",
            ));
        }
        if self.priority > MAX_PRIORITY {
            return Err(DecodeError::invalid("priority", "must be at most 7"));
        }
        Ok(())
    }
}

/// A piece of the answer's text. Pieces of one request have consecutive `seq` from 0; the last
/// has `done` (its text may be empty), and a [`FinalReply`] follows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyChunk {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u8,
    /// The request's id.
    pub id: RequestId,
    /// Position of this chunk in the answer, from 0.
    pub seq: u32,
    /// The text (UTF-8, at most [`MAX_CHUNK_BYTES`]).
    pub text: String<MAX_CHUNK_BYTES>,
    /// Last chunk of the answer.
    pub done: bool,
    /// The expert generating the answer.
    pub expert: String<MAX_NAME_BYTES>,
}

impl ReplyChunk {
    /// A chunk; fails if a string is longer than its bound (split long text with
    /// [`crate::split_text`]).
    pub fn new(
        id: &str,
        seq: u32,
        text: &str,
        done: bool,
        expert: &str,
    ) -> Result<ReplyChunk, FieldTooLong> {
        Ok(ReplyChunk {
            v: PROTOCOL_VERSION,
            id: bounded("id", id)?,
            seq,
            text: bounded("text", text)?,
            done,
            expert: bounded("expert", expert)?,
        })
    }

    /// Checks what the decoder checks: version and non-empty id.
    pub fn validate(&self) -> Result<(), DecodeError> {
        check_version(self.v)?;
        check_id(&self.id)
    }
}

/// The end of a served request: how it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinalReply {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u8,
    /// The request's id.
    pub id: RequestId,
    /// The expert that answered.
    pub expert: String<MAX_NAME_BYTES>,
    /// Output tokens generated.
    pub output_tokens: u32,
    /// Time to first token, milliseconds from when the gateway received the request.
    pub ttft_ms: u32,
    /// Total time, milliseconds from when the gateway received the request.
    pub total_ms: u32,
    /// Achieved latency in seconds per output token (finite, not negative).
    pub s_per_token: f32,
    /// Whether `s_per_token` met the request's SLO.
    pub slo_met: bool,
}

impl FinalReply {
    /// A final reply; fails if a string is longer than its bound.
    pub fn new(
        id: &str,
        expert: &str,
        output_tokens: u32,
        ttft_ms: u32,
        total_ms: u32,
        s_per_token: f32,
        slo_met: bool,
    ) -> Result<FinalReply, FieldTooLong> {
        Ok(FinalReply {
            v: PROTOCOL_VERSION,
            id: bounded("id", id)?,
            expert: bounded("expert", expert)?,
            output_tokens,
            ttft_ms,
            total_ms,
            s_per_token,
            slo_met,
        })
    }

    /// Checks what the decoder checks: version, non-empty id, `s_per_token` finite and not
    /// negative (JSON cannot carry NaN or infinities).
    pub fn validate(&self) -> Result<(), DecodeError> {
        check_version(self.v)?;
        check_id(&self.id)?;
        if !(self.s_per_token.is_finite() && self.s_per_token >= 0.0) {
            return Err(DecodeError::invalid(
                "s_per_token",
                "must be a finite number of seconds, not negative",
            ));
        }
        Ok(())
    }
}

/// The gateway refused or failed a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u8,
    /// The request's id; empty when it could not be recovered from an undecodable payload.
    pub id: RequestId,
    /// What went wrong, as a stable number.
    pub code: ErrorCode,
    /// A short human-readable explanation.
    pub message: String<MAX_MESSAGE_BYTES>,
}

impl ErrorReply {
    /// An error reply; fails if a string is longer than its bound. `id` may be empty (the
    /// request's id is unknown).
    pub fn new(id: &str, code: ErrorCode, message: &str) -> Result<ErrorReply, FieldTooLong> {
        Ok(ErrorReply {
            v: PROTOCOL_VERSION,
            id: bounded("id", id)?,
            code,
            message: bounded("message", message)?,
        })
    }

    /// Checks what the decoder checks: the version (the id may be empty).
    pub fn validate(&self) -> Result<(), DecodeError> {
        check_version(self.v)
    }
}

/// What the gateway sends back on a request's reply topic: chunks, then one final reply or one
/// error.
///
/// JSON: one object with a `type` tag (`"chunk"`, `"final"`, `"error"`) beside the variant's
/// fields. Postcard: the variant's index (0, 1, 2, varint), then its fields.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "no allocator to box the chunk; a reply lives briefly, on the stack"
)]
pub enum Reply {
    /// A piece of the answer.
    Chunk(ReplyChunk),
    /// The answer is complete.
    Final(FinalReply),
    /// The request was refused or failed.
    Error(ErrorReply),
}

impl Reply {
    /// The JSON `type` tags, in postcard index order.
    pub const TYPES: [&'static str; 3] = ["chunk", "final", "error"];

    /// The id of the request this answers.
    pub fn id(&self) -> &RequestId {
        match self {
            Reply::Chunk(c) => &c.id,
            Reply::Final(f) => &f.id,
            Reply::Error(e) => &e.id,
        }
    }

    /// The JSON `type` tag of this reply.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Chunk(_) => "chunk",
            Reply::Final(_) => "final",
            Reply::Error(_) => "error",
        }
    }

    /// Postcard variant index.
    pub(crate) fn index(&self) -> u32 {
        match self {
            Reply::Chunk(_) => 0,
            Reply::Final(_) => 1,
            Reply::Error(_) => 2,
        }
    }

    /// Checks what the decoder checks (see each variant's `validate`).
    pub fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Reply::Chunk(c) => c.validate(),
            Reply::Final(f) => f.validate(),
            Reply::Error(e) => e.validate(),
        }
    }
}

/// The JSON form of a reply: internally tagged.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum TaggedReply<'a> {
    Chunk(&'a ReplyChunk),
    Final(&'a FinalReply),
    Error(&'a ErrorReply),
}

impl Serialize for Reply {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            match self {
                Reply::Chunk(c) => TaggedReply::Chunk(c),
                Reply::Final(f) => TaggedReply::Final(f),
                Reply::Error(e) => TaggedReply::Error(e),
            }
            .serialize(serializer)
        } else {
            let (index, name) = (self.index(), self.kind());
            match self {
                Reply::Chunk(c) => serializer.serialize_newtype_variant("Reply", index, name, c),
                Reply::Final(f) => serializer.serialize_newtype_variant("Reply", index, name, f),
                Reply::Error(e) => serializer.serialize_newtype_variant("Reply", index, name, e),
            }
        }
    }
}

/// A device's rating of an answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u8,
    /// The id of the request whose answer is rated.
    pub id: RequestId,
    /// The rating, finite, `0.0` (useless) to `1.0` (perfect).
    pub score: f32,
}

impl Feedback {
    /// A rating; fails if `id` is longer than its bound.
    pub fn new(id: &str, score: f32) -> Result<Feedback, FieldTooLong> {
        Ok(Feedback {
            v: PROTOCOL_VERSION,
            id: bounded("id", id)?,
            score,
        })
    }

    /// Checks what the decoder checks: version, non-empty id, score finite in `[0, 1]`.
    pub fn validate(&self) -> Result<(), DecodeError> {
        check_version(self.v)?;
        check_id(&self.id)?;
        if !(self.score.is_finite() && (0.0..=1.0).contains(&self.score)) {
            return Err(DecodeError::invalid("score", "must be a number in [0, 1]"));
        }
        Ok(())
    }
}
