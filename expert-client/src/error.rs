//! [`ExpertError`]: what went wrong, phrased as what the daemon should do about it.

use std::fmt;

/// The phase of an exchange whose deadline passed (see [`crate::Timeouts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimeoutPhase {
    /// The TCP (or TLS) connection was not established in time.
    Connect,
    /// No token before the first-token deadline (the expert is queueing or stalled).
    FirstToken,
    /// The stream went quiet between two tokens (or after the last one, before its end).
    BetweenTokens,
    /// The whole exchange (an answer, a health check or a scrape) ran out of time.
    Total,
}

impl fmt::Display for TimeoutPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutPhase::Connect => "connect",
            TimeoutPhase::FirstToken => "first token",
            TimeoutPhase::BetweenTokens => "between tokens",
            TimeoutPhase::Total => "total",
        })
    }
}

/// Most bytes of an error response's body kept in [`ExpertError::Status`].
pub const STATUS_BODY_EXCERPT_BYTES: usize = 1024;

/// Why a request to an expert failed.
///
/// # The retry contract
///
/// Every error tells how many tokens the caller had already received from the same answer
/// ([`ExpertError::tokens_delivered`]; the count of [`crate::StreamEvent::Token`] events the
/// [`crate::ChatStream`] handed out before this error). When it is 0, nothing of this answer
/// can have reached the device, so the caller may retry the request on another expert without
/// the device noticing ([`ExpertError::retry_is_invisible`]). When it is above 0, the device may
/// already hold a prefix of this answer: a retry would restart the text, so the caller must
/// fail the request (or tell the device explicitly). Errors of [`crate::ExpertClient::chat`]
/// itself and of health checks and scrapes always carry 0.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExpertError {
    /// The base URL or another part of the endpoint cannot be used.
    #[error("invalid expert endpoint: {reason}")]
    InvalidEndpoint {
        /// What is wrong with it.
        reason: String,
    },
    /// The server could not be reached (refused, unreachable, DNS, TLS handshake).
    #[error("cannot connect to the expert: {message}")]
    Connect {
        /// The transport's error chain.
        message: String,
    },
    /// The server answered with a non-2xx status.
    #[error("the expert answered HTTP {code}: {body}")]
    Status {
        /// The HTTP status code.
        code: u16,
        /// The start of the response body (at most [`STATUS_BODY_EXCERPT_BYTES`] bytes, cut at
        /// a character boundary, invalid UTF-8 replaced).
        body: String,
    },
    /// A deadline passed.
    #[error("the expert timed out ({phase}) after {tokens_delivered} tokens")]
    Timeout {
        /// Which deadline.
        phase: TimeoutPhase,
        /// Tokens delivered to the caller before the deadline.
        tokens_delivered: u32,
    },
    /// The server sent something that is not a valid event stream of chat completion chunks
    /// (bad SSE, bad JSON, an error object in the stream, an unexpected content type, an
    /// oversized line or body).
    #[error("the expert broke the protocol after {tokens_delivered} tokens: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
        /// Tokens delivered to the caller before it.
        tokens_delivered: u32,
    },
    /// The stream or connection ended before the answer was finished (no `data: [DONE]` and no
    /// `finish_reason`), e.g. the server dropped the connection.
    #[error("the expert closed the stream before finishing, after {tokens_delivered} tokens")]
    Closed {
        /// Tokens delivered to the caller before the end.
        tokens_delivered: u32,
    },
}

impl ExpertError {
    /// Tokens of this answer the caller had received before the error (0 for errors that are
    /// not about a streamed answer). See the retry contract on [`ExpertError`].
    pub fn tokens_delivered(&self) -> u32 {
        match self {
            ExpertError::InvalidEndpoint { .. }
            | ExpertError::Connect { .. }
            | ExpertError::Status { .. } => 0,
            ExpertError::Timeout {
                tokens_delivered, ..
            }
            | ExpertError::Protocol {
                tokens_delivered, ..
            }
            | ExpertError::Closed { tokens_delivered } => *tokens_delivered,
        }
    }

    /// True when no token of this answer reached the caller, so a retry on another expert is
    /// invisible to the device.
    pub fn retry_is_invisible(&self) -> bool {
        self.tokens_delivered() == 0
    }

    /// The timeout phase, if this is a timeout.
    pub fn timeout_phase(&self) -> Option<TimeoutPhase> {
        match self {
            ExpertError::Timeout { phase, .. } => Some(*phase),
            _ => None,
        }
    }
}

/// The first `limit` bytes of `bytes` as text, cut at a character boundary.
pub(crate) fn excerpt(bytes: &[u8], limit: usize) -> String {
    let mut cut = bytes.get(..limit).unwrap_or(bytes);
    if cut.len() < bytes.len() {
        cut = without_split_char(cut);
    }
    String::from_utf8_lossy(cut).into_owned()
}

/// `bytes` without a trailing multi-byte UTF-8 sequence that is incomplete (cut by us).
fn without_split_char(bytes: &[u8]) -> &[u8] {
    for k in 1..=3usize.min(bytes.len()) {
        let start = bytes.len() - k;
        let Some(&lead) = bytes.get(start) else { break };
        let needed = match lead {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            0x80..=0xBF => continue,
            _ => return bytes,
        };
        return if needed > k {
            bytes.get(..start).unwrap_or(bytes)
        } else {
            bytes
        };
    }
    bytes
}

/// The error and its sources, joined by `: `.
pub(crate) fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    let mut depth = 0;
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
        depth += 1;
        if depth > 8 {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_delivered_decides_whether_a_retry_is_invisible() {
        let before = ExpertError::Timeout {
            phase: TimeoutPhase::FirstToken,
            tokens_delivered: 0,
        };
        let after = ExpertError::Closed {
            tokens_delivered: 3,
        };
        assert!(before.retry_is_invisible());
        assert!(!after.retry_is_invisible());
        assert_eq!(after.tokens_delivered(), 3);
        assert_eq!(
            ExpertError::Status {
                code: 500,
                body: String::new()
            }
            .tokens_delivered(),
            0
        );
        assert_eq!(before.timeout_phase(), Some(TimeoutPhase::FirstToken));
    }

    #[test]
    fn excerpt_is_bounded_and_cut_at_a_character_boundary() {
        assert_eq!(excerpt(b"hello", 10), "hello");
        assert_eq!(excerpt(b"hello", 3), "hel");
        // "é" is two bytes; cutting after its first byte drops it rather than showing U+FFFD.
        assert_eq!(excerpt("aé".as_bytes(), 2), "a");
        assert_eq!(excerpt("a€b".as_bytes(), 3), "a");
        assert_eq!(excerpt("a€b".as_bytes(), 4), "a€");
        // Invalid UTF-8 inside the excerpt is the server's and stays visible.
        assert_eq!(excerpt(b"a\xffb", 10), "a\u{FFFD}b");
        assert!(
            excerpt(&[b'x'; 5000], STATUS_BODY_EXCERPT_BYTES).len() <= STATUS_BODY_EXCERPT_BYTES
        );
    }
}
