//! The device wire format: requests, reply chunks, errors, feedback; postcard and JSON; no_std.
//!
//! IoT devices publish [`Request`]s over MQTT to the gateway daemon `qosrouted` and receive a
//! stream of [`Reply`]s: [`Reply::Chunk`]s of text, then one [`Reply::Final`] (the latency figures
//! of the finished request) or one [`Reply::Error`]. Devices may rate an answer with
//! [`Feedback`]. Every message starts with the protocol version `v` ([`PROTOCOL_VERSION`]) and the
//! request id the device chose.
//!
//! Two encodings carry the same messages ([`Encoding`]): compact binary
//! [postcard](https://docs.rs/postcard) for microcontrollers, and JSON for everything else. The
//! crate is `#![no_std]` and needs no allocator: strings are bounded ([`heapless::String`]), the
//! encoders write into a caller's buffer, and the decoders borrow the input.
//!
//! The `decode_*` functions validate what they decode (see [`DecodeError`] for what is checked
//! and the [`ErrorCode`] each failure maps to); the `encode_*` functions validate before they
//! encode, so whatever this crate encodes, it decodes. [`peek_id`] recovers the request id of a
//! payload that does not decode, so that the error reply can be addressed.
#![cfg_attr(not(test), no_std)]

mod code;
mod codec;
mod encoding;
mod error;
mod json;
mod json_syntax;
mod message;
mod postcard_wire;
mod task;
mod text;

pub use code::ErrorCode;
pub use codec::{
    decode_feedback, decode_reply, decode_request, encode_feedback, encode_reply, encode_request,
    peek_id,
};
pub use encoding::Encoding;
pub use error::{DecodeError, EncodeError, FieldTooLong, UnknownTask};
pub use heapless;
pub use message::{
    DEFAULT_MAX_TOKENS, ErrorReply, Feedback, FinalReply, MAX_PRIORITY, Reply, ReplyChunk, Request,
    RequestId,
};
pub use task::Task;
pub use text::{TextPieces, split_text};

/// The protocol version this crate speaks: the `v` every message starts with. Decoders reject
/// other versions with [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest request id in bytes (UTF-8): room for a UUID (36) or any counter.
pub const MAX_ID_BYTES: usize = 40;

/// Largest prompt of a [`Request`] in bytes (UTF-8).
pub const MAX_PROMPT_BYTES: usize = 8192;

/// Largest text of one [`ReplyChunk`] in bytes (UTF-8); longer answers come in several chunks
/// (see [`split_text`]).
pub const MAX_CHUNK_BYTES: usize = 2048;

/// Largest expert name in bytes (UTF-8).
pub const MAX_NAME_BYTES: usize = 64;

/// Largest human-readable message of an [`ErrorReply`] in bytes (UTF-8).
pub const MAX_MESSAGE_BYTES: usize = 256;

/// Largest `max_tokens` a [`Request`] may ask for.
pub const MAX_TOKENS_LIMIT: u32 = 16384;

/// Largest JSON nesting depth the JSON decoders accept (a message is one object; unknown fields
/// may nest a little). Deeper input is rejected as malformed before parsing, so hostile input
/// cannot exhaust the stack.
pub const MAX_JSON_DEPTH: usize = 16;

/// Bytes of a JSON frame that are not string contents: keys, punctuation, numbers, the `type`
/// tag. Generous; a test checks that the worst case fits.
const FRAME_OVERHEAD_BYTES: usize = 256;

/// The largest encoded message of either encoding, in bytes; decoders reject longer input up
/// front with [`ErrorCode::TooLarge`]. The worst case is a JSON [`Request`] whose id and prompt
/// are at their bounds and made entirely of control characters, each escaped as `\u00XX`
/// (6 bytes per byte). Any compact JSON encoding of a valid message fits, whatever the encoder
/// escapes (a `\uXXXX` escape or surrogate pair never takes more than 6 bytes per UTF-8 byte);
/// postcard messages are far smaller (below 8.3 KiB).
pub const MAX_FRAME_BYTES: usize = 6 * (MAX_ID_BYTES + MAX_PROMPT_BYTES) + FRAME_OVERHEAD_BYTES;
