//! What can go wrong decoding, validating, encoding and building messages.

use crate::code::ErrorCode;
use crate::{MAX_FRAME_BYTES, PROTOCOL_VERSION};

/// Why a payload is not an acceptable message. [`DecodeError::code`] is the [`ErrorCode`] the
/// gateway answers with; [`DecodeError::field`] names the field at fault when the decoder can
/// tell (it cannot for some syntax errors).
///
/// Checked, in this order: the frame length ([`MAX_FRAME_BYTES`]); the syntax; the version `v`
/// (looked for even when the rest does not parse, so a message of a future version gets
/// `unsupported_version`, not `malformed`); every string against its bound; required fields
/// (JSON); then the ranges: id non-empty (except in an [`crate::ErrorReply`], whose id is empty
/// when the request's could not be recovered), prompt non-empty, `1 <= max_tokens <=`
/// [`crate::MAX_TOKENS_LIMIT`], SLO finite and positive, priority at most 7, score finite in
/// `[0, 1]`, a final reply's `s_per_token` finite and not negative, known task names and error
/// codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The whole frame is longer than [`MAX_FRAME_BYTES`] (rejected before parsing).
    #[error("frame of {len} bytes is longer than the {max}-byte limit", max = MAX_FRAME_BYTES)]
    FrameTooLarge {
        /// Length of the frame in bytes.
        len: usize,
    },
    /// A string is longer than its bound (JSON: after unescaping; postcard: its length prefix).
    #[error("`{field}` is longer than its bound of {max} bytes")]
    FieldTooLarge {
        /// The field.
        field: &'static str,
        /// Its bound in bytes.
        max: usize,
    },
    /// The message's `v` is not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version {found} (this gateway speaks {ours})", ours = PROTOCOL_VERSION)]
    UnsupportedVersion {
        /// The version the message claims.
        found: u64,
    },
    /// A required field is absent (JSON; a truncated postcard message is `Malformed`).
    #[error("`{field}` is missing")]
    MissingField {
        /// The field.
        field: &'static str,
    },
    /// A field is present but out of range.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The payload does not parse (or has bytes after the message).
    #[error("malformed payload: {reason}")]
    Malformed {
        /// What the parser tripped on.
        reason: &'static str,
    },
}

impl DecodeError {
    /// The error code of the reply to a device that sent this.
    pub const fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } | DecodeError::FieldTooLarge { .. } => {
                ErrorCode::TooLarge
            }
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            DecodeError::Invalid { .. } => ErrorCode::Invalid,
            DecodeError::MissingField { .. } | DecodeError::Malformed { .. } => {
                ErrorCode::Malformed
            }
        }
    }

    /// The field at fault, when known.
    pub const fn field(&self) -> Option<&'static str> {
        match self {
            DecodeError::FieldTooLarge { field, .. }
            | DecodeError::MissingField { field }
            | DecodeError::Invalid { field, .. } => Some(field),
            DecodeError::UnsupportedVersion { .. } => Some("v"),
            DecodeError::FrameTooLarge { .. } | DecodeError::Malformed { .. } => None,
        }
    }

    /// A short static reason (no numbers; for logs and metrics labels).
    pub const fn reason(&self) -> &'static str {
        match self {
            DecodeError::FrameTooLarge { .. } => "frame too large",
            DecodeError::FieldTooLarge { .. } => "field longer than its bound",
            DecodeError::UnsupportedVersion { .. } => "unsupported protocol version",
            DecodeError::MissingField { .. } => "missing field",
            DecodeError::Invalid { reason, .. } | DecodeError::Malformed { reason } => reason,
        }
    }

    pub(crate) const fn invalid(field: &'static str, reason: &'static str) -> Self {
        DecodeError::Invalid { field, reason }
    }

    pub(crate) const fn malformed(reason: &'static str) -> Self {
        DecodeError::Malformed { reason }
    }
}

/// Why a message was not encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The message would not pass the decoder's validation; nothing was written that a peer
    /// should see.
    #[error("message is not valid: {0}")]
    Invalid(DecodeError),
    /// The caller's buffer is too small; a buffer of [`MAX_FRAME_BYTES`] always suffices.
    #[error("output buffer too small (a {max}-byte buffer always suffices)", max = MAX_FRAME_BYTES)]
    BufferTooSmall,
    /// The serializer failed for another reason (not expected for these message types).
    #[error("serializer failed: {reason}")]
    Serializer {
        /// What it said.
        reason: &'static str,
    },
}

/// A string given to a constructor is longer than the field's bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` is {len} bytes, longer than its bound of {max}")]
pub struct FieldTooLong {
    /// The field.
    pub field: &'static str,
    /// The string's length in bytes.
    pub len: usize,
    /// The bound in bytes.
    pub max: usize,
}

/// A name that is not one of [`crate::Task::ALL`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown task name")]
pub struct UnknownTask;
