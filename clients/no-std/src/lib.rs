//! A microcontroller-side example of [`qosroute_proto`]: `no_std`, no allocator, postcard.
//!
//! A device builds a [`RequestRef`] (borrowing its id and prompt), encodes it into a fixed
//! buffer with [`encode_request`] and publishes the bytes on `qosroute/v1/{site}/req/{device}/pc`;
//! each reply payload it receives decodes with [`decode_reply`] into a [`ReplyView`] that borrows
//! the payload (no copy of the text).
//!
//! proto's own API needs no allocator either ([`qosroute_proto::encode_request`],
//! [`qosroute_proto::decode_reply`]), but its owned types are sized for the largest message: a
//! `Request` holds an 8 KiB prompt buffer (8.3 KB on the stack), a `Reply` a 2 KiB chunk text.
//! The borrowed types here cost a few dozen bytes, and [`request_frame_bytes`] and
//! [`MAX_REPLY_BYTES`] size the buffers. They encode exactly proto's bytes and accept exactly
//! what proto's decoder accepts (the tests check both against proto, over generated messages
//! and generated garbage).
#![no_std]
#![forbid(unsafe_code)]

use postcard::Error as PostcardError;
use qosroute_proto::{
    DecodeError, EncodeError, ErrorCode, MAX_CHUNK_BYTES, MAX_FRAME_BYTES, MAX_ID_BYTES,
    MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_PRIORITY, MAX_PROMPT_BYTES, MAX_TOKENS_LIMIT,
    PROTOCOL_VERSION, Task,
};
use serde::{Deserialize, Serialize};

pub use qosroute_proto;

/// Bytes of a LEB128 varint holding `n` (postcard's encoding of `u16`/`u32`/`u64`/`usize`).
const fn varint_bytes(mut n: usize) -> usize {
    let mut bytes = 1;
    while n >= 0x80 {
        n >>= 7;
        bytes += 1;
    }
    bytes
}

/// The longest postcard request whose id and prompt are at most `id_bytes` and `prompt_bytes`
/// long (UTF-8 bytes): a buffer of this size always holds it. The fixed fields at their widest:
/// `v` 1, task 1, `max_tokens` 3 (a varint up to 16384), `Some(slo)` 5, `Some(deadline)` 11,
/// `stream` 1, `priority` 1.
pub const fn request_frame_bytes(id_bytes: usize, prompt_bytes: usize) -> usize {
    1 + varint_bytes(id_bytes)
        + id_bytes
        + 1
        + varint_bytes(prompt_bytes)
        + prompt_bytes
        + varint_bytes(MAX_TOKENS_LIMIT as usize)
        + (1 + 4)
        + (1 + 10)
        + 1
        + 1
}

/// The longest postcard request of all (id and prompt at their bounds): 8258 bytes.
pub const MAX_REQUEST_BYTES: usize = request_frame_bytes(MAX_ID_BYTES, MAX_PROMPT_BYTES);

/// The longest postcard reply (a chunk with every string at its bound): 2164 bytes. A receive
/// buffer of this size holds every reply the gateway sends in postcard.
pub const MAX_REPLY_BYTES: usize = 1 // variant index
    + 1 // v
    + varint_bytes(MAX_ID_BYTES) + MAX_ID_BYTES
    + 5 // seq, u32 varint
    + varint_bytes(MAX_CHUNK_BYTES) + MAX_CHUNK_BYTES
    + 1 // done
    + varint_bytes(MAX_NAME_BYTES) + MAX_NAME_BYTES;

/// A request that borrows its id and prompt; the fields and their wire order are
/// [`qosroute_proto::Request`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RequestRef<'a> {
    v: u8,
    /// The device's id for this request: 1 to [`MAX_ID_BYTES`] bytes, new for each request.
    pub id: &'a str,
    /// What kind of work it is.
    pub task: Task,
    /// The prompt: 1 to [`MAX_PROMPT_BYTES`] bytes.
    pub prompt: &'a str,
    /// Most output tokens wanted, `1..=`[`MAX_TOKENS_LIMIT`].
    pub max_tokens: u32,
    /// Latency target in seconds per output token (finite, positive); `None`: the gateway's.
    pub slo_s_per_token: Option<f32>,
    /// Wall-clock deadline (Unix milliseconds).
    pub deadline_unix_ms: Option<u64>,
    /// Stream chunks as they are generated.
    pub stream: bool,
    /// Scheduling priority, `0..=`[`MAX_PRIORITY`].
    pub priority: u8,
}

impl<'a> RequestRef<'a> {
    /// A request with [`qosroute_proto::Request::new`]'s defaults: version 1,
    /// [`qosroute_proto::DEFAULT_MAX_TOKENS`], no SLO, no deadline, streamed, priority 0.
    pub const fn new(id: &'a str, task: Task, prompt: &'a str) -> Self {
        RequestRef {
            v: PROTOCOL_VERSION,
            id,
            task,
            prompt,
            max_tokens: qosroute_proto::DEFAULT_MAX_TOKENS,
            slo_s_per_token: None,
            deadline_unix_ms: None,
            stream: true,
            priority: 0,
        }
    }

    /// Sets `max_tokens`.
    #[must_use]
    pub const fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = max_tokens;
        self
    }

    /// Sets the latency target (seconds per output token).
    #[must_use]
    pub const fn with_slo_s_per_token(mut self, slo_s_per_token: f32) -> Self {
        self.slo_s_per_token = Some(slo_s_per_token);
        self
    }

    /// Sets the deadline (Unix milliseconds).
    #[must_use]
    pub const fn with_deadline_unix_ms(mut self, deadline_unix_ms: u64) -> Self {
        self.deadline_unix_ms = Some(deadline_unix_ms);
        self
    }

    /// Sets whether replies stream.
    #[must_use]
    pub const fn with_stream(mut self, stream: bool) -> Self {
        self.stream = stream;
        self
    }

    /// Sets the priority.
    #[must_use]
    pub const fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Checks what the gateway's decoder checks, with the errors
    /// [`qosroute_proto::Request::validate`] gives (and the string bounds, which proto's owned
    /// strings enforce on construction).
    pub fn validate(&self) -> Result<(), DecodeError> {
        check_len("id", self.id, MAX_ID_BYTES)?;
        check_len("prompt", self.prompt, MAX_PROMPT_BYTES)?;
        if self.id.is_empty() {
            return Err(invalid("id", "must not be empty"));
        }
        if self.prompt.is_empty() {
            return Err(invalid("prompt", "must not be empty"));
        }
        if self.max_tokens == 0 {
            return Err(invalid("max_tokens", "must be at least 1"));
        }
        if self.max_tokens > MAX_TOKENS_LIMIT {
            return Err(invalid(
                "max_tokens",
                "must be at most MAX_TOKENS_LIMIT (16384)",
            ));
        }
        if let Some(slo) = self.slo_s_per_token
            && !(slo.is_finite() && slo > 0.0)
        {
            return Err(invalid(
                "slo_s_per_token",
                "must be a finite number of seconds greater than 0",
            ));
        }
        if self.priority > MAX_PRIORITY {
            return Err(invalid("priority", "must be at most 7"));
        }
        Ok(())
    }
}

/// Validates `request` and encodes it in postcard into `buf`; returns the frame to publish
/// (the front of `buf`). A buffer of [`request_frame_bytes`] for the device's longest id and
/// prompt always suffices.
pub fn encode_request<'b>(
    request: &RequestRef<'_>,
    buf: &'b mut [u8],
) -> Result<&'b [u8], EncodeError> {
    request.validate().map_err(EncodeError::Invalid)?;
    match postcard::to_slice(request, buf) {
        Ok(frame) => Ok(frame),
        Err(PostcardError::SerializeBufferFull) => Err(EncodeError::BufferTooSmall),
        Err(_) => Err(EncodeError::Serializer {
            reason: "postcard serializer error",
        }),
    }
}

/// A piece of the answer; borrows the payload. See [`qosroute_proto::ReplyChunk`].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct ChunkView<'a> {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u8,
    /// The request's id.
    pub id: &'a str,
    /// Position of this chunk in the answer, from 0.
    pub seq: u32,
    /// The text (at most [`MAX_CHUNK_BYTES`]).
    pub text: &'a str,
    /// Last chunk of the answer.
    pub done: bool,
    /// The expert generating the answer.
    pub expert: &'a str,
}

/// The end of a served request; borrows the payload. See [`qosroute_proto::FinalReply`].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct FinalView<'a> {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u8,
    /// The request's id.
    pub id: &'a str,
    /// The expert that answered.
    pub expert: &'a str,
    /// Output tokens generated.
    pub output_tokens: u32,
    /// Time to first token, milliseconds from when the gateway received the request.
    pub ttft_ms: u32,
    /// Total time, milliseconds from when the gateway received the request.
    pub total_ms: u32,
    /// Achieved latency in seconds per output token.
    pub s_per_token: f32,
    /// Whether `s_per_token` met the request's SLO.
    pub slo_met: bool,
}

/// The gateway refused or failed a request; borrows the payload. See
/// [`qosroute_proto::ErrorReply`].
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct ErrorView<'a> {
    /// Protocol version, [`PROTOCOL_VERSION`].
    pub v: u8,
    /// The request's id; empty when the gateway could not read it.
    pub id: &'a str,
    /// What went wrong, as a stable number.
    pub code: ErrorCode,
    /// A short human-readable explanation.
    pub message: &'a str,
}

/// A reply from the gateway, borrowing the payload it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReplyView<'a> {
    /// A piece of the answer.
    Chunk(ChunkView<'a>),
    /// The answer is complete.
    Final(FinalView<'a>),
    /// The request was refused or failed.
    Error(ErrorView<'a>),
}

impl<'a> ReplyView<'a> {
    /// The id of the request this answers (match it against the request's; an error's is
    /// empty when the gateway could not read the request's id).
    pub const fn id(&self) -> &'a str {
        match self {
            ReplyView::Chunk(c) => c.id,
            ReplyView::Final(f) => f.id,
            ReplyView::Error(e) => e.id,
        }
    }
}

/// Decodes and validates a postcard reply without copying: the strings of the result point into
/// `payload`. Accepts exactly what [`qosroute_proto::decode_reply`] accepts; a truncated or
/// garbled payload is an error (never a panic).
pub fn decode_reply(payload: &[u8]) -> Result<ReplyView<'_>, DecodeError> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::FrameTooLarge { len: payload.len() });
    }
    let (index, body) = postcard::take_from_bytes::<u32>(payload)
        .map_err(|e| map_error(&e, malformed("bad reply type")))?;
    match body.first() {
        None => return Err(malformed("empty payload")),
        Some(&v) if v != PROTOCOL_VERSION => {
            return Err(DecodeError::UnsupportedVersion {
                found: u64::from(v),
            });
        }
        Some(_) => {}
    }
    let reply = match index {
        0 => {
            let c: ChunkView<'_> = decode_all(body, NOT_CUSTOM)?;
            check_len("id", c.id, MAX_ID_BYTES)?;
            check_len("text", c.text, MAX_CHUNK_BYTES)?;
            check_len("expert", c.expert, MAX_NAME_BYTES)?;
            check_id(c.id)?;
            ReplyView::Chunk(c)
        }
        1 => {
            let f: FinalView<'_> = decode_all(body, NOT_CUSTOM)?;
            check_len("id", f.id, MAX_ID_BYTES)?;
            check_len("expert", f.expert, MAX_NAME_BYTES)?;
            check_id(f.id)?;
            if !(f.s_per_token.is_finite() && f.s_per_token >= 0.0) {
                return Err(invalid(
                    "s_per_token",
                    "must be a finite number of seconds, not negative",
                ));
            }
            ReplyView::Final(f)
        }
        2 => {
            let e: ErrorView<'_> = decode_all(body, invalid("code", "unknown error code"))?;
            check_len("id", e.id, MAX_ID_BYTES)?;
            check_len("message", e.message, MAX_MESSAGE_BYTES)?;
            ReplyView::Error(e)
        }
        _ => return Err(invalid("type", "unknown reply type")),
    };
    Ok(reply)
}

const NOT_CUSTOM: DecodeError = malformed("invalid value");

const fn malformed(reason: &'static str) -> DecodeError {
    DecodeError::Malformed { reason }
}

const fn invalid(field: &'static str, reason: &'static str) -> DecodeError {
    DecodeError::Invalid { field, reason }
}

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), DecodeError> {
    if value.len() > max {
        Err(DecodeError::FieldTooLarge { field, max })
    } else {
        Ok(())
    }
}

fn check_id(id: &str) -> Result<(), DecodeError> {
    if id.is_empty() {
        Err(invalid("id", "must not be empty"))
    } else {
        Ok(())
    }
}

/// Decodes exactly one `T` from `bytes` (no trailing bytes). `custom` is what a serde custom
/// error means for `T` (an unknown error code).
fn decode_all<'de, T: Deserialize<'de>>(
    bytes: &'de [u8],
    custom: DecodeError,
) -> Result<T, DecodeError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(|e| map_error(&e, custom))?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(malformed("bytes after the end of the message"))
    }
}

/// proto's mapping of postcard's errors.
fn map_error(error: &PostcardError, custom: DecodeError) -> DecodeError {
    use PostcardError as E;
    match error {
        E::DeserializeUnexpectedEnd => malformed("message ends early"),
        E::DeserializeBadVarint => malformed("bad varint"),
        E::DeserializeBadBool => malformed("a bool that is neither 0 nor 1"),
        E::DeserializeBadUtf8 | E::DeserializeBadChar => malformed("a string that is not UTF-8"),
        E::DeserializeBadOption => malformed("an option tag that is neither 0 nor 1"),
        E::DeserializeBadEnum | E::SerdeDeCustom => custom,
        _ => malformed("not a postcard message"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_widths() {
        for (n, bytes) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16383, 2),
            (16384, 3),
            (2_097_151, 3),
        ] {
            assert_eq!(varint_bytes(n), bytes, "{n}");
        }
        assert_eq!(MAX_REQUEST_BYTES, 8258);
        assert_eq!(MAX_REPLY_BYTES, 2164);
    }
}
