//! Which of the two encodings a payload uses.

use core::fmt;

/// The encoding of a payload.
///
/// How the gateway tells (see the daemon's README for the topics):
/// - an MQTT 5 content type, when the publisher sets one ([`Encoding::from_content_type`]);
/// - else the last topic level: a topic ending in `/pc` carries postcard, one ending in `/json`
///   carries JSON ([`Encoding::from_topic_suffix`]);
/// - else JSON.
///
/// Replies use the encoding of the request they answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Compact binary [postcard](https://docs.rs/postcard) (`application/x-postcard`, topic
    /// suffix `/pc`): fields in declaration order, integers as varints (`u8` as one raw byte),
    /// strings as varint length + UTF-8, enums as a varint index.
    Postcard,
    /// JSON (`application/json`, topic suffix `/json`).
    Json,
}

impl Encoding {
    /// The MIME type of this encoding.
    pub const fn content_type(self) -> &'static str {
        match self {
            Encoding::Postcard => "application/x-postcard",
            Encoding::Json => "application/json",
        }
    }

    /// The topic level that names this encoding (without the slash).
    pub const fn topic_suffix(self) -> &'static str {
        match self {
            Encoding::Postcard => "pc",
            Encoding::Json => "json",
        }
    }

    /// The encoding of an MIME content type: `application/x-postcard` or `application/json`,
    /// case-insensitive, ignoring surrounding blanks and parameters (`; charset=utf-8`).
    pub fn from_content_type(content_type: &str) -> Option<Encoding> {
        let media_type = content_type
            .split(';')
            .next()
            .unwrap_or(content_type)
            .trim();
        [Encoding::Postcard, Encoding::Json]
            .into_iter()
            .find(|e| e.content_type().eq_ignore_ascii_case(media_type))
    }

    /// The encoding a topic's suffix names: the last level of `topic` (or `topic` itself when it
    /// has no `/`), so `"pc"`, `"/pc"` and `"qosroute/v1/lab/req/dev-1/pc"` all give postcard.
    /// Exact and case-sensitive, like MQTT topics. `None` when the last level names neither;
    /// the gateway then assumes JSON.
    pub fn from_topic_suffix(topic: &str) -> Option<Encoding> {
        let last = topic.rsplit('/').next().unwrap_or(topic);
        [Encoding::Postcard, Encoding::Json]
            .into_iter()
            .find(|e| e.topic_suffix() == last)
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::Postcard => "postcard",
            Encoding::Json => "json",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_map_with_parameters_and_case() {
        for (ct, want) in [
            ("application/x-postcard", Some(Encoding::Postcard)),
            ("application/json", Some(Encoding::Json)),
            ("application/json; charset=utf-8", Some(Encoding::Json)),
            ("  Application/JSON ;charset=UTF-8", Some(Encoding::Json)),
            ("application/x-postcard;v=1", Some(Encoding::Postcard)),
            ("application/postcard", None),
            ("text/plain", None),
            ("application/jsonx", None),
            ("", None),
            (";", None),
        ] {
            assert_eq!(Encoding::from_content_type(ct), want, "{ct:?}");
        }
        for e in [Encoding::Postcard, Encoding::Json] {
            assert_eq!(Encoding::from_content_type(e.content_type()), Some(e));
        }
    }

    #[test]
    fn topic_suffixes_map_by_last_level() {
        for (topic, want) in [
            ("pc", Some(Encoding::Postcard)),
            ("json", Some(Encoding::Json)),
            ("/pc", Some(Encoding::Postcard)),
            ("/json", Some(Encoding::Json)),
            ("qosroute/v1/lab/req/dev-1/pc", Some(Encoding::Postcard)),
            ("qosroute/v1/lab/req/dev-1/json", Some(Encoding::Json)),
            ("qosroute/v1/lab/req/dev-1", None),
            ("qosroute/v1/lab/req/dev-1/", None),
            ("qosroute/v1/lab/req/dev-1/PC", None),
            ("qosroute/v1/lab/req/dev-1/xml", None),
            ("qosroute/v1/lab/req/dev-1/pcx", None),
            ("", None),
        ] {
            assert_eq!(Encoding::from_topic_suffix(topic), want, "{topic:?}");
        }
    }
}
