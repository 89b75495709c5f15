//! Stable numeric error codes of [`crate::ErrorReply`].

use core::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why the gateway refused or failed a request. The number is the wire form in both encodings
/// (a JSON number; a postcard varint) and never changes meaning; new codes are only appended.
/// A decoder that meets a number it does not know reports a decode error (it does not guess).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum ErrorCode {
    /// The payload does not parse as a message of the expected kind.
    Malformed = 1,
    /// The frame, or one of its strings, is longer than its bound.
    TooLarge = 2,
    /// The message's `v` is not [`crate::PROTOCOL_VERSION`].
    UnsupportedVersion = 3,
    /// A field is out of range (empty id or prompt, `max_tokens`, SLO, priority, score, ...).
    Invalid = 4,
    /// The device sends faster than its rate limit.
    RateLimited = 5,
    /// Shed: the gateway's queues are full; retry later.
    Overloaded = 6,
    /// No expert can meet the SLO, or the routing policy rejected the request.
    NoExpert = 7,
    /// The expert serving the request failed.
    ExpertFailed = 8,
    /// The request took longer than the gateway allows.
    Timeout = 9,
    /// The request's deadline (or the message's expiry) passed before it was served.
    Expired = 10,
    /// The gateway is shutting down and takes no new work.
    ShuttingDown = 11,
    /// A bug or unexpected condition in the gateway.
    Internal = 12,
}

impl ErrorCode {
    /// Every code, in numeric order.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::Malformed,
        ErrorCode::TooLarge,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Invalid,
        ErrorCode::RateLimited,
        ErrorCode::Overloaded,
        ErrorCode::NoExpert,
        ErrorCode::ExpertFailed,
        ErrorCode::Timeout,
        ErrorCode::Expired,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
    ];

    /// The wire number.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code numbered `n`, if it is one.
    pub fn from_u16(n: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.as_u16() == n)
    }

    /// The code's snake-case name (for logs and metrics labels; the wire carries the number).
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Invalid => "invalid",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::NoExpert => "no_expert",
            ErrorCode::ExpertFailed => "expert_failed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Expired => "expired",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u16(self.as_u16())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let n = u16::deserialize(deserializer)?;
        ErrorCode::from_u16(n).ok_or_else(|| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Unsigned(u64::from(n)),
                &"a known error code (1..=12)",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_documented_numbers() {
        let table = [
            (1, "malformed"),
            (2, "too_large"),
            (3, "unsupported_version"),
            (4, "invalid"),
            (5, "rate_limited"),
            (6, "overloaded"),
            (7, "no_expert"),
            (8, "expert_failed"),
            (9, "timeout"),
            (10, "expired"),
            (11, "shutting_down"),
            (12, "internal"),
        ];
        for (code, (n, name)) in ErrorCode::ALL.iter().zip(table) {
            assert_eq!(code.as_u16(), n);
            assert_eq!(code.as_str(), name);
            assert_eq!(ErrorCode::from_u16(n), Some(*code));
        }
        assert_eq!(ErrorCode::from_u16(0), None);
        assert_eq!(ErrorCode::from_u16(13), None);
    }
}
