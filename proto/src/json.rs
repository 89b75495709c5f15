//! JSON decoding: serde-json-core into lenient mirrors of the messages, then checked conversion.
//!
//! The mirrors make every field optional, take numbers as `u64` and strings as their raw
//! escaped text, so that the parse fails only on syntax and types. The conversion then says
//! precisely what is wrong and where: a missing field, a string over its bound (measured after
//! unescaping, by our own unescaper, which also handles UTF-16 surrogate pairs such as Python's
//! `json.dumps` writes), a number out of range, an unknown task name or error code. Unknown
//! fields are ignored (forward compatibility).
//!
//! Two guards run before serde: a nesting-depth scan (serde-json-core skips unknown values
//! recursively), and, when the parse fails, a scan for the top-level `v`, so that a message of
//! another protocol version gets `unsupported_version` rather than `malformed`.

use heapless::String;
use serde::Deserialize;
use serde_json_core::str::EscapedStr;

use crate::code::ErrorCode;
use crate::error::DecodeError;
use crate::message::{ErrorReply, Feedback, FinalReply, Reply, ReplyChunk, Request, RequestId};
use crate::task::Task;
use crate::{
    MAX_CHUNK_BYTES, MAX_ID_BYTES, MAX_JSON_DEPTH, MAX_MESSAGE_BYTES, MAX_NAME_BYTES,
    PROTOCOL_VERSION,
};

#[derive(Deserialize)]
struct RequestJson<'a> {
    #[serde(default)]
    v: Option<u64>,
    #[serde(default, borrow)]
    id: Option<EscapedStr<'a>>,
    #[serde(default, borrow)]
    task: Option<EscapedStr<'a>>,
    #[serde(default, borrow)]
    prompt: Option<EscapedStr<'a>>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    slo_s_per_token: Option<f32>,
    #[serde(default)]
    deadline_unix_ms: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    priority: Option<u64>,
}

#[derive(Deserialize)]
struct ReplyJson<'a> {
    #[serde(default, borrow, rename = "type")]
    kind: Option<EscapedStr<'a>>,
    #[serde(default)]
    v: Option<u64>,
    #[serde(default, borrow)]
    id: Option<EscapedStr<'a>>,
    // chunk
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    text: Option<EscapedStr<'a>>,
    #[serde(default)]
    done: Option<bool>,
    // chunk and final
    #[serde(default, borrow)]
    expert: Option<EscapedStr<'a>>,
    // final
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    ttft_ms: Option<u64>,
    #[serde(default)]
    total_ms: Option<u64>,
    #[serde(default)]
    s_per_token: Option<f32>,
    #[serde(default)]
    slo_met: Option<bool>,
    // error
    #[serde(default)]
    code: Option<u64>,
    #[serde(default, borrow)]
    message: Option<EscapedStr<'a>>,
}

#[derive(Deserialize)]
struct FeedbackJson<'a> {
    #[serde(default)]
    v: Option<u64>,
    #[serde(default, borrow)]
    id: Option<EscapedStr<'a>>,
    #[serde(default)]
    score: Option<f32>,
}

/// Parses a mirror, with the depth guard and the version fallback.
fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    if !nesting_within(bytes, MAX_JSON_DEPTH) {
        return Err(DecodeError::malformed("JSON nested too deeply"));
    }
    if !crate::json_syntax::is_well_formed(bytes, MAX_JSON_DEPTH) {
        return Err(DecodeError::malformed("not well-formed JSON"));
    }
    match serde_json_core::from_slice::<T>(bytes) {
        Ok((value, _)) => Ok(value),
        Err(error) => {
            // A future version may change the layout: say so if its `v` is readable.
            if let Some(JsonValue::Scalar(raw)) = top_level_value(bytes, b"v")
                && let Ok(found) = raw.parse::<u64>()
                && found != u64::from(PROTOCOL_VERSION)
            {
                return Err(DecodeError::UnsupportedVersion { found });
            }
            Err(map_error(&error))
        }
    }
}

fn map_error(error: &serde_json_core::de::Error) -> DecodeError {
    use serde_json_core::de::Error as E;
    DecodeError::malformed(match error {
        E::EofWhileParsingList
        | E::EofWhileParsingObject
        | E::EofWhileParsingString
        | E::EofWhileParsingNumber
        | E::EofWhileParsingValue => "JSON ends early",
        E::InvalidNumber => "invalid or out-of-range number",
        E::InvalidType => "a value of the wrong type",
        E::InvalidUnicodeCodePoint => "a string that is not UTF-8",
        E::InvalidEscapeSequence | E::EscapedStringIsTooLong => "invalid escape sequence",
        E::TrailingCharacters => "bytes after the JSON value",
        E::CustomError => "duplicate field",
        _ => "JSON syntax error",
    })
}

fn version(v: Option<u64>) -> Result<(), DecodeError> {
    match v {
        None => Err(DecodeError::MissingField { field: "v" }),
        Some(found) if found != u64::from(PROTOCOL_VERSION) => {
            Err(DecodeError::UnsupportedVersion { found })
        }
        Some(_) => Ok(()),
    }
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, DecodeError> {
    value.ok_or(DecodeError::MissingField { field })
}

/// A `u64` that must fit the field's narrower type.
fn narrow<T: TryFrom<u64>>(value: u64, field: &'static str) -> Result<T, DecodeError> {
    T::try_from(value).map_err(|_| DecodeError::invalid(field, "number out of range"))
}

/// An optional string, unescaped into its bound.
fn text<const N: usize>(
    raw: Option<EscapedStr<'_>>,
    field: &'static str,
) -> Result<Option<String<N>>, DecodeError> {
    raw.map(|raw| unescape(raw.0, field)).transpose()
}

/// Unescapes the raw contents of a JSON string into a bounded string.
fn unescape<const N: usize>(raw: &str, field: &'static str) -> Result<String<N>, DecodeError> {
    const BAD_ESCAPE: DecodeError = DecodeError::malformed("invalid escape sequence");
    let too_large = DecodeError::FieldTooLarge { field, max: N };
    let mut out = String::<N>::new();
    let mut rest = raw;
    while let Some(at) = rest.find('\\') {
        let (plain, escape) = rest.split_at(at);
        out.push_str(plain).map_err(|_| too_large)?;
        let mut chars = escape.chars();
        chars.next(); // the backslash
        let c = match chars.next() {
            Some('"') => '"',
            Some('\\') => '\\',
            Some('/') => '/',
            Some('b') => '\u{8}',
            Some('f') => '\u{c}',
            Some('n') => '\n',
            Some('r') => '\r',
            Some('t') => '\t',
            Some('u') => {
                let (unit, after) = hex4(chars.as_str()).ok_or(BAD_ESCAPE)?;
                chars = after.chars();
                if (0xD800..0xDC00).contains(&unit) {
                    // A high surrogate: a low one must follow, as `\uDC00`..`\uDFFF`.
                    let low_escape = after.strip_prefix("\\u").ok_or(BAD_ESCAPE)?;
                    let (low, after) = hex4(low_escape).ok_or(BAD_ESCAPE)?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return Err(BAD_ESCAPE);
                    }
                    chars = after.chars();
                    char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))
                        .ok_or(BAD_ESCAPE)?
                } else {
                    char::from_u32(unit).ok_or(BAD_ESCAPE)?
                }
            }
            _ => return Err(BAD_ESCAPE),
        };
        out.push(c).map_err(|_| too_large)?;
        rest = chars.as_str();
    }
    out.push_str(rest).map_err(|_| too_large)?;
    Ok(out)
}

/// Four hex digits at the start of `s`, and what follows.
fn hex4(s: &str) -> Option<(u32, &str)> {
    let digits = s.get(..4)?;
    if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None; // from_str_radix would also take a leading '+'
    }
    Some((u32::from_str_radix(digits, 16).ok()?, s.get(4..)?))
}

pub(crate) fn decode_request(bytes: &[u8]) -> Result<Request, DecodeError> {
    let m: RequestJson<'_> = parse(bytes)?;
    version(m.v)?;
    // Strings first, so that an oversized string is `too_large` whatever else is wrong.
    let id = text(m.id, "id")?;
    let prompt = text(m.prompt, "prompt")?;
    let task = match text::<24>(m.task, "task") {
        Ok(None) => Task::Chat,
        Ok(Some(name)) => {
            Task::from_name(&name).ok_or(DecodeError::invalid("task", "unknown task name"))?
        }
        Err(DecodeError::FieldTooLarge { .. }) => {
            return Err(DecodeError::invalid("task", "unknown task name"));
        }
        Err(e) => return Err(e),
    };
    Ok(Request {
        v: PROTOCOL_VERSION,
        id: required(id, "id")?,
        task,
        prompt: required(prompt, "prompt")?,
        max_tokens: narrow(required(m.max_tokens, "max_tokens")?, "max_tokens")?,
        slo_s_per_token: m.slo_s_per_token,
        deadline_unix_ms: m.deadline_unix_ms,
        stream: m.stream.unwrap_or(true),
        priority: narrow(m.priority.unwrap_or(0), "priority")?,
    })
}

pub(crate) fn decode_reply(bytes: &[u8]) -> Result<Reply, DecodeError> {
    let m: ReplyJson<'_> = parse(bytes)?;
    version(m.v)?;
    let kind = text::<8>(m.kind, "type")
        .map_err(|_| DecodeError::invalid("type", "unknown reply type"))?;
    let id: Option<RequestId> = text(m.id, "id")?;
    let expert = text::<MAX_NAME_BYTES>(m.expert, "expert")?;
    match kind.as_deref() {
        None => Err(DecodeError::MissingField { field: "type" }),
        Some("chunk") => {
            let text = text::<MAX_CHUNK_BYTES>(m.text, "text")?;
            Ok(Reply::Chunk(ReplyChunk {
                v: PROTOCOL_VERSION,
                id: required(id, "id")?,
                seq: narrow(required(m.seq, "seq")?, "seq")?,
                text: required(text, "text")?,
                done: required(m.done, "done")?,
                expert: required(expert, "expert")?,
            }))
        }
        Some("final") => Ok(Reply::Final(FinalReply {
            v: PROTOCOL_VERSION,
            id: required(id, "id")?,
            expert: required(expert, "expert")?,
            output_tokens: narrow(required(m.output_tokens, "output_tokens")?, "output_tokens")?,
            ttft_ms: narrow(required(m.ttft_ms, "ttft_ms")?, "ttft_ms")?,
            total_ms: narrow(required(m.total_ms, "total_ms")?, "total_ms")?,
            s_per_token: required(m.s_per_token, "s_per_token")?,
            slo_met: required(m.slo_met, "slo_met")?,
        })),
        Some("error") => {
            let message = text::<MAX_MESSAGE_BYTES>(m.message, "message")?;
            let code = required(m.code, "code")?;
            let code = u16::try_from(code)
                .ok()
                .and_then(ErrorCode::from_u16)
                .ok_or(DecodeError::invalid("code", "unknown error code"))?;
            Ok(Reply::Error(ErrorReply {
                v: PROTOCOL_VERSION,
                id: required(id, "id")?,
                code,
                message: required(message, "message")?,
            }))
        }
        Some(_) => Err(DecodeError::invalid("type", "unknown reply type")),
    }
}

pub(crate) fn decode_feedback(bytes: &[u8]) -> Result<Feedback, DecodeError> {
    let m: FeedbackJson<'_> = parse(bytes)?;
    version(m.v)?;
    let id = text(m.id, "id")?;
    Ok(Feedback {
        v: PROTOCOL_VERSION,
        id: required(id, "id")?,
        score: required(m.score, "score")?,
    })
}

/// The request id of a JSON payload that may not decode: the top-level `id` string, found by a
/// scan that needs only the object's fields before `id` to be well-formed.
pub(crate) fn peek_id(bytes: &[u8]) -> Option<RequestId> {
    match top_level_value(bytes, b"id")? {
        JsonValue::String(raw) => unescape::<MAX_ID_BYTES>(raw, "id").ok(),
        JsonValue::Scalar(_) => None,
    }
}

/// Whether `bytes` nests arrays and objects at most `max` deep (strings are skipped properly;
/// the syntax is not otherwise checked).
fn nesting_within(bytes: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

/// A top-level value found by [`top_level_value`].
#[derive(Debug, PartialEq)]
enum JsonValue<'a> {
    /// A string's raw (still escaped) contents.
    String(&'a str),
    /// A number, `true`, `false` or `null` as written.
    Scalar(&'a str),
}

/// A cursor over JSON text for the tolerant scan. Every access is bounds-checked.
struct Scan<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn skip_blanks(&mut self) -> Option<u8> {
        while let Some(b) = self.peek() {
            if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
                return Some(b);
            }
            self.at += 1;
        }
        None
    }

    fn expect(&mut self, b: u8) -> Option<()> {
        (self.skip_blanks()? == b).then(|| self.at += 1)
    }

    /// A string starting at the cursor (`"`): its raw contents.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.expect(b'"')?;
        let start = self.at;
        let mut escaped = false;
        while let Some(b) = self.peek() {
            self.at += 1;
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                return self.bytes.get(start..self.at - 1);
            }
        }
        None
    }

    /// A number or literal: everything up to a delimiter.
    fn scalar(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        while let Some(b) = self.peek() {
            if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                break;
            }
            self.at += 1;
        }
        (self.at > start).then(|| self.bytes.get(start..self.at))?
    }

    /// Skips one value of any kind (iteratively: no recursion on hostile nesting).
    fn skip_value(&mut self) -> Option<()> {
        match self.skip_blanks()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            _ => self.scalar().map(drop),
        }
    }
}

/// The value of the first top-level `key` of the JSON object in `bytes`. Tolerant: only the
/// fields before `key` must be well-formed; keys are compared as written (not unescaped), as
/// serde-json-core does.
fn top_level_value<'a>(bytes: &'a [u8], key: &[u8]) -> Option<JsonValue<'a>> {
    let mut scan = Scan { bytes, at: 0 };
    scan.expect(b'{')?;
    loop {
        if scan.skip_blanks()? == b'}' {
            return None;
        }
        let name = scan.string()?;
        scan.expect(b':')?;
        if name == key {
            let value = if scan.skip_blanks()? == b'"' {
                JsonValue::String(core::str::from_utf8(scan.string()?).ok()?)
            } else {
                JsonValue::Scalar(core::str::from_utf8(scan.scalar()?).ok()?)
            };
            return Some(value);
        }
        scan.skip_value()?;
        match scan.skip_blanks()? {
            b',' => scan.at += 1,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_handles_every_escape_and_surrogate_pairs() {
        let s: String<64> =
            unescape(r#"a\"b\\c\/d\b\f\n\r\t\u0041\u00e9\ud83d\ude00z"#, "f").unwrap();
        assert_eq!(s.as_str(), "a\"b\\c/d\u{8}\u{c}\n\r\tAé😀z");
        let plain: String<8> = unescape("héllo", "f").unwrap();
        assert_eq!(plain.as_str(), "héllo");
        for bad in [
            r"\x",
            r"\u12",
            r"\u12G4",
            r"\u+123",
            r"\ud83d",
            r"\ud83dx",
            r"\ud83d\u0041",
            r"\ude00",
            "\\",
        ] {
            assert_eq!(
                unescape::<64>(bad, "f"),
                Err(DecodeError::malformed("invalid escape sequence")),
                "{bad}"
            );
        }
    }

    #[test]
    fn unescape_measures_the_bound_after_unescaping() {
        // 4 escaped bytes fit a 4-byte bound although the raw text is 24 bytes.
        assert!(unescape::<4>(r"\u0041\u0042\u0043\u0044", "f").is_ok());
        assert_eq!(
            unescape::<4>(r"\u0041\u0042\u0043\u0044\u0045", "f"),
            Err(DecodeError::FieldTooLarge { field: "f", max: 4 })
        );
        assert_eq!(
            unescape::<4>("abcde", "f"),
            Err(DecodeError::FieldTooLarge { field: "f", max: 4 })
        );
        // A multi-byte character that would straddle the bound does not fit.
        assert!(unescape::<4>("abcé", "f").is_err());
    }

    #[test]
    fn nesting_guard_counts_only_structure_outside_strings() {
        assert!(nesting_within(br#"{"a":[[1]]}"#, 3));
        assert!(!nesting_within(br#"{"a":[[1]]}"#, 2));
        assert!(nesting_within(br#"{"a":"[[[[\"[[[["}"#, 1));
        assert!(!nesting_within(&[b'['; 100_000], MAX_JSON_DEPTH));
    }

    #[test]
    fn top_level_scan_finds_keys_and_skips_anything_before() {
        let doc = br#" { "x" : {"id":"inner","a":[1,{"b":"}]"}]}, "n": -1.5e3, "s":"q\"}", "id" : "dev\"7" , "prompt": broken"#;
        assert_eq!(
            top_level_value(doc, b"id"),
            Some(JsonValue::String(r#"dev\"7"#))
        );
        assert_eq!(
            top_level_value(doc, b"n"),
            Some(JsonValue::Scalar("-1.5e3"))
        );
        assert_eq!(top_level_value(doc, b"nope"), None);
        assert_eq!(
            top_level_value(br#"{"v":2}"#, b"v"),
            Some(JsonValue::Scalar("2"))
        );
        for bad in [
            &b""[..],
            b"[",
            b"{",
            b"{\"id\"",
            b"{\"id\":",
            b"{\"a\" 1,\"id\":\"x\"}",
            b"\"id\"",
        ] {
            assert_eq!(
                top_level_value(bad, b"id"),
                None,
                "{:?}",
                core::str::from_utf8(bad)
            );
        }
    }
}
