//! The public decode and encode functions.

use serde::Serialize;

use crate::MAX_FRAME_BYTES;
use crate::encoding::Encoding;
use crate::error::{DecodeError, EncodeError};
use crate::message::{Feedback, Reply, Request, RequestId};
use crate::{json, postcard_wire};

fn check_frame(bytes: &[u8]) -> Result<(), DecodeError> {
    if bytes.len() > MAX_FRAME_BYTES {
        Err(DecodeError::FrameTooLarge { len: bytes.len() })
    } else {
        Ok(())
    }
}

/// Decodes and validates a device's request.
pub fn decode_request(bytes: &[u8], encoding: Encoding) -> Result<Request, DecodeError> {
    check_frame(bytes)?;
    let request = match encoding {
        Encoding::Postcard => postcard_wire::decode_request(bytes)?,
        Encoding::Json => json::decode_request(bytes)?,
    };
    request.validate()?;
    Ok(request)
}

/// Decodes and validates a reply (what a device does with the gateway's answers).
pub fn decode_reply(bytes: &[u8], encoding: Encoding) -> Result<Reply, DecodeError> {
    check_frame(bytes)?;
    let reply = match encoding {
        Encoding::Postcard => postcard_wire::decode_reply(bytes)?,
        Encoding::Json => json::decode_reply(bytes)?,
    };
    reply.validate()?;
    Ok(reply)
}

/// Decodes and validates a device's feedback.
pub fn decode_feedback(bytes: &[u8], encoding: Encoding) -> Result<Feedback, DecodeError> {
    check_frame(bytes)?;
    let feedback = match encoding {
        Encoding::Postcard => postcard_wire::decode_feedback(bytes)?,
        Encoding::Json => json::decode_feedback(bytes)?,
    };
    feedback.validate()?;
    Ok(feedback)
}

/// Best-effort recovery of the request id from a request (or feedback) payload that failed to
/// decode, so that the error reply can carry it. Postcard: decodes just the `(v, id)` prefix.
/// JSON: scans the top-level object for `"id"`; only the fields before it must be well-formed,
/// and the frame may be of any length. `None` if no non-empty id within its bound is found.
/// Never panics.
pub fn peek_id(bytes: &[u8], encoding: Encoding) -> Option<RequestId> {
    match encoding {
        Encoding::Postcard => postcard_wire::peek_id(bytes),
        Encoding::Json => json::peek_id(bytes),
    }
    .filter(|id| !id.is_empty())
}

fn encode<T: Serialize>(
    message: &T,
    encoding: Encoding,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    match encoding {
        Encoding::Postcard => postcard::to_slice(message, buf)
            .map(|out| out.len())
            .map_err(|e| match e {
                postcard::Error::SerializeBufferFull => EncodeError::BufferTooSmall,
                _ => EncodeError::Serializer {
                    reason: "postcard serializer error",
                },
            }),
        Encoding::Json => serde_json_core::to_slice(message, buf).map_err(|e| match e {
            serde_json_core::ser::Error::BufferFull => EncodeError::BufferTooSmall,
            _ => EncodeError::Serializer {
                reason: "JSON serializer error",
            },
        }),
    }
}

/// Validates `request` (as the decoder would) and encodes it into `buf`; returns the number of
/// bytes written. A buffer of [`MAX_FRAME_BYTES`] always suffices.
pub fn encode_request(
    request: &Request,
    encoding: Encoding,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    request.validate().map_err(EncodeError::Invalid)?;
    encode(request, encoding, buf)
}

/// Validates `reply` (as the decoder would) and encodes it into `buf`; returns the number of
/// bytes written. A buffer of [`MAX_FRAME_BYTES`] always suffices.
pub fn encode_reply(
    reply: &Reply,
    encoding: Encoding,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    reply.validate().map_err(EncodeError::Invalid)?;
    encode(reply, encoding, buf)
}

/// Validates `feedback` (as the decoder would) and encodes it into `buf`; returns the number of
/// bytes written. A buffer of [`MAX_FRAME_BYTES`] always suffices.
pub fn encode_feedback(
    feedback: &Feedback,
    encoding: Encoding,
    buf: &mut [u8],
) -> Result<usize, EncodeError> {
    feedback.validate().map_err(EncodeError::Invalid)?;
    encode(feedback, encoding, buf)
}
