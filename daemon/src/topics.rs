//! The topic layout (`qosroute/v1/{site}/...`) and where replies go.
//!
//! - requests: `qosroute/v1/{site}/req/{device}`, optionally suffixed `/pc` (postcard) or
//!   `/json`; an MQTT 5 content type overrides the suffix; JSON when neither says;
//! - replies: the request's MQTT 5 response topic with its correlation data when given, else
//!   `qosroute/v1/{site}/resp/{device}`, in the request's encoding;
//! - feedback: `qosroute/v1/{site}/feedback/{device}` (same suffix rule).

use qosroute_proto::Encoding;

/// What a topic is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicKind {
    /// A request from `device`.
    Request {
        /// The device segment.
        device: String,
    },
    /// Feedback from `device`.
    Feedback {
        /// The device segment.
        device: String,
    },
}

/// Parses an incoming topic of `site`; `None` for topics that are not ours.
/// Returns the kind and the encoding its suffix names, if any.
pub fn parse_topic(site: &str, topic: &str) -> Option<(TopicKind, Option<Encoding>)> {
    let rest = topic
        .strip_prefix("qosroute/v1/")?
        .strip_prefix(site)?
        .strip_prefix('/')?;
    let (kind, rest) = rest.split_once('/')?;
    let mut parts = rest.split('/');
    let device = parts.next().filter(|d| !d.is_empty())?.to_owned();
    let encoding = match parts.next() {
        None => None,
        Some(suffix) => Some(Encoding::from_topic_suffix(suffix)?),
    };
    if parts.next().is_some() {
        return None;
    }
    let kind = match kind {
        "req" => TopicKind::Request { device },
        "feedback" => TopicKind::Feedback { device },
        _ => return None,
    };
    Some((kind, encoding))
}

/// The default reply topic of a device.
pub fn reply_topic(site: &str, device: &str) -> String {
    format!("qosroute/v1/{site}/resp/{device}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_of_the_site_parse_and_others_do_not() {
        assert_eq!(
            parse_topic("lab", "qosroute/v1/lab/req/dev-1"),
            Some((
                TopicKind::Request {
                    device: "dev-1".into()
                },
                None
            ))
        );
        assert_eq!(
            parse_topic("lab", "qosroute/v1/lab/req/dev-1/pc"),
            Some((
                TopicKind::Request {
                    device: "dev-1".into()
                },
                Some(Encoding::Postcard)
            ))
        );
        assert_eq!(
            parse_topic("lab", "qosroute/v1/lab/feedback/d/json"),
            Some((
                TopicKind::Feedback { device: "d".into() },
                Some(Encoding::Json)
            ))
        );
        for other in [
            "qosroute/v1/other/req/d",
            "qosroute/v1/lab/resp/d",
            "qosroute/v1/lab/req/",
            "qosroute/v1/lab/req/d/xml",
            "qosroute/v1/lab/req/d/pc/more",
            "qosroute/v2/lab/req/d",
        ] {
            assert_eq!(parse_topic("lab", other), None, "{other}");
        }
        assert_eq!(reply_topic("lab", "d"), "qosroute/v1/lab/resp/d");
    }
}
