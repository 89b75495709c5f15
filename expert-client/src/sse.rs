//! An incremental, bounded Server-Sent Events decoder ([`SseDecoder`]): bytes in, events out,
//! for any split of the byte stream.
//!
//! It follows the WHATWG `text/event-stream` parsing rules: lines end in CRLF, LF or CR
//! (a CRLF split between two pushes is still one line end), a leading UTF-8 BOM is dropped,
//! lines starting with `:` are comments (keep-alives), `data:` lines accumulate (joined by
//! `\n`), an empty line dispatches the event, an event with no `data` is not dispatched, `id`
//! sets the last event id, `retry` and unknown fields are ignored. Text is decoded as UTF-8 with
//! invalid sequences replaced (U+FFFD), per line, so a character split between pushes is intact.
//!
//! Two deliberate differences:
//! - **Bounded memory**: a line longer than [`SseDecoder::max_line_bytes`] or an event whose data
//!   exceeds [`SseDecoder::max_event_bytes`] (both 1 MiB by default) is an error, not unbounded
//!   growth. After an error the decoder stays failed.
//! - **Lenient end**: at [`SseDecoder::finish`] an unterminated last line and a last event without
//!   its closing empty line are dispatched rather than discarded, because some servers end the
//!   body right after `data: [DONE]\n`.

/// Default bound of one line, in bytes (1 MiB).
pub const DEFAULT_MAX_LINE_BYTES: usize = 1 << 20;
/// Default bound of one event's data, in bytes (1 MiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1 << 20;

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field; `None` for the default type (`message`).
    pub event: Option<String>,
    /// The `data:` lines joined by `\n`.
    pub data: String,
    /// The last event id in effect (`id:` of this or an earlier event).
    pub id: Option<String>,
}

/// A byte stream the decoder refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line exceeded the bound.
    #[error("an event-stream line is longer than {limit} bytes")]
    LineTooLong {
        /// The bound, bytes.
        limit: usize,
    },
    /// An event's data exceeded the bound.
    #[error("an event's data is longer than {limit} bytes")]
    EventTooLarge {
        /// The bound, bytes.
        limit: usize,
    },
}

/// The incremental decoder. Feed it with [`SseDecoder::push`] as bytes arrive and call
/// [`SseDecoder::finish`] at the end of the stream. Pure: no I/O, no clock, never panics.
#[derive(Debug, Clone)]
pub struct SseDecoder {
    /// Bytes of the line being read (no terminator).
    line: Vec<u8>,
    /// The previous push ended in CR: a leading LF of the next push belongs to that line end.
    after_cr: bool,
    /// No line has been completed yet (a BOM may lead the first one).
    first_line: bool,
    data: String,
    has_data: bool,
    event: Option<String>,
    last_id: Option<String>,
    max_line: usize,
    max_event: usize,
    failed: Option<SseError>,
}

impl Default for SseDecoder {
    fn default() -> Self {
        SseDecoder::new()
    }
}

impl SseDecoder {
    /// A decoder with the default bounds (1 MiB per line, 1 MiB per event).
    pub fn new() -> Self {
        SseDecoder::with_limits(DEFAULT_MAX_LINE_BYTES, DEFAULT_MAX_EVENT_BYTES)
    }

    /// A decoder with explicit bounds, in bytes.
    pub fn with_limits(max_line_bytes: usize, max_event_bytes: usize) -> Self {
        SseDecoder {
            line: Vec::new(),
            after_cr: false,
            first_line: true,
            data: String::new(),
            has_data: false,
            event: None,
            last_id: None,
            max_line: max_line_bytes,
            max_event: max_event_bytes,
            failed: None,
        }
    }

    /// The bound of one line, bytes.
    pub fn max_line_bytes(&self) -> usize {
        self.max_line
    }

    /// The bound of one event's data, bytes.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event
    }

    /// Decodes the next bytes of the stream and returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut out = Vec::new();
        self.push_into(bytes, &mut out)?;
        Ok(out)
    }

    /// Like [`SseDecoder::push`], appending to `out`; on error, `out` holds the events completed
    /// before the offending byte.
    pub fn push_into(&mut self, bytes: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.push_inner(bytes, out);
        if let Err(e) = &result {
            self.failed = Some(e.clone());
            self.line = Vec::new();
            self.data = String::new();
        }
        result
    }

    fn push_inner(&mut self, mut rest: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        while let Some((&first, tail)) = rest.split_first() {
            if self.after_cr {
                self.after_cr = false;
                if first == b'\n' {
                    rest = tail;
                    continue;
                }
            }
            match rest.iter().position(|&b| b == b'\n' || b == b'\r') {
                Some(at) => {
                    let (line, tail) = rest.split_at(at);
                    self.extend_line(line)?;
                    if let Some((&terminator, tail)) = tail.split_first() {
                        self.after_cr = terminator == b'\r';
                        rest = tail;
                    } else {
                        rest = tail;
                    }
                    self.end_line(out)?;
                }
                None => {
                    self.extend_line(rest)?;
                    rest = &[];
                }
            }
        }
        Ok(())
    }

    /// Ends the stream: a pending unterminated line is taken as complete and a pending event is
    /// dispatched (the lenient end, see the module docs). The decoder is then reset, except for
    /// the last event id.
    pub fn finish(&mut self) -> Result<Option<SseEvent>, SseError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let mut out = Vec::new();
        if !self.line.is_empty()
            && let Err(e) = self.end_line(&mut out)
        {
            self.failed = Some(e.clone());
            return Err(e);
        }
        self.after_cr = false;
        self.dispatch(&mut out);
        Ok(out.pop())
    }

    fn extend_line(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len().saturating_add(bytes.len()) > self.max_line {
            return Err(SseError::LineTooLong {
                limit: self.max_line,
            });
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn end_line(&mut self, out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let raw = std::mem::take(&mut self.line);
        let mut bytes = raw.as_slice();
        if self.first_line {
            self.first_line = false;
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        if bytes.is_empty() {
            self.dispatch(out);
        } else {
            let text = String::from_utf8_lossy(bytes);
            self.field(&text)?;
        }
        // Reuse the allocation for the next line unless it grew large.
        if raw.capacity() <= 4096 {
            let mut raw = raw;
            raw.clear();
            self.line = raw;
        }
        Ok(())
    }

    fn field(&mut self, line: &str) -> Result<(), SseError> {
        if line.starts_with(':') {
            return Ok(());
        }
        let (name, value) = match line.split_once(':') {
            Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match name {
            "data" => {
                let grown = self
                    .data
                    .len()
                    .saturating_add(value.len())
                    .saturating_add(1);
                if grown > self.max_event.saturating_add(1) {
                    return Err(SseError::EventTooLarge {
                        limit: self.max_event,
                    });
                }
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        let event = self.event.take();
        if !self.has_data {
            return;
        }
        self.has_data = false;
        let mut data = std::mem::take(&mut self.data);
        if data.ends_with('\n') {
            data.pop();
        }
        out.push(SseEvent {
            event: event.filter(|e| !e.is_empty()),
            data,
            id: self.last_id.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn decode_all(chunks: &[&[u8]]) -> Result<Vec<SseEvent>, SseError> {
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(d.push(c)?);
        }
        out.extend(d.finish()?);
        Ok(out)
    }

    fn data(s: &str) -> SseEvent {
        SseEvent {
            data: s.to_owned(),
            ..SseEvent::default()
        }
    }

    #[test]
    fn data_lines_are_joined_and_dispatched_on_an_empty_line() {
        let events = decode_all(&[b"data: a\ndata:b\n\ndata:  c\n\n"]).unwrap();
        assert_eq!(events, vec![data("a\nb"), data(" c")]);
    }

    #[test]
    fn crlf_cr_and_lf_all_end_lines_even_when_split() {
        let events =
            decode_all(&[b"data: a\r", b"\ndata: b\r", b"\r", b"data: c\r\n\r\n"]).unwrap();
        assert_eq!(events, vec![data("a\nb"), data("c")]);
    }

    #[test]
    fn comments_and_unknown_fields_are_ignored() {
        let events = decode_all(&[b": ping\n\nretry: 10\nfoo: bar\ndata: x\n\n"]).unwrap();
        assert_eq!(events, vec![data("x")]);
    }

    #[test]
    fn event_type_and_last_id_are_reported() {
        let events = decode_all(&[b"event: error\nid: 7\ndata: x\n\ndata: y\n\n"]).unwrap();
        assert_eq!(events[0].event.as_deref(), Some("error"));
        assert_eq!(events[0].id.as_deref(), Some("7"));
        assert_eq!(events[1].event, None);
        assert_eq!(events[1].id.as_deref(), Some("7"));
    }

    #[test]
    fn an_event_without_data_is_not_dispatched_but_empty_data_is() {
        assert_eq!(decode_all(&[b"event: x\n\n"]).unwrap(), vec![]);
        assert_eq!(decode_all(&[b"data\n\n"]).unwrap(), vec![data("")]);
    }

    #[test]
    fn a_bom_is_dropped_even_when_split() {
        let events = decode_all(&[b"\xEF", b"\xBB", b"\xBFdata: x\n\n"]).unwrap();
        assert_eq!(events, vec![data("x")]);
    }

    #[test]
    fn a_utf8_character_split_between_pushes_stays_intact() {
        let bytes = "data: héllo €\n\n".as_bytes();
        let chunks: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(decode_all(&chunks).unwrap(), vec![data("héllo €")]);
    }

    #[test]
    fn the_end_is_lenient_about_a_missing_final_empty_line() {
        assert_eq!(
            decode_all(&[b"data: [DONE]\n"]).unwrap(),
            vec![data("[DONE]")]
        );
        assert_eq!(
            decode_all(&[b"data: [DONE]"]).unwrap(),
            vec![data("[DONE]")]
        );
    }

    #[test]
    fn an_overlong_line_is_an_error_and_the_decoder_stays_failed() {
        let mut d = SseDecoder::with_limits(8, 64);
        assert_eq!(d.push(b"data: 12").unwrap(), vec![]);
        assert_eq!(d.push(b"3"), Err(SseError::LineTooLong { limit: 8 }));
        assert_eq!(d.push(b"\n\n"), Err(SseError::LineTooLong { limit: 8 }));
        assert!(d.finish().is_err());
    }

    #[test]
    fn an_overlarge_event_is_an_error_but_earlier_events_are_kept() {
        let mut d = SseDecoder::with_limits(64, 4);
        let mut out = Vec::new();
        let r = d.push_into(b"data: ab\n\ndata: abc\ndata: d\n", &mut out);
        assert_eq!(r, Err(SseError::EventTooLarge { limit: 4 }));
        assert_eq!(out, vec![data("ab")]);
        // Exactly at the bound is fine.
        let mut d = SseDecoder::with_limits(64, 4);
        assert_eq!(
            d.push(b"data: ab\ndata: c\n\n").unwrap(),
            vec![data("ab\nc")]
        );
    }

    #[test]
    fn invalid_utf8_is_replaced_not_fatal() {
        assert_eq!(
            decode_all(&[b"data: a\xffb\n\n"]).unwrap(),
            vec![data("a\u{FFFD}b")]
        );
    }

    /// One event as a generator sees it: optional type, id, data lines; plus comments.
    #[derive(Debug, Clone)]
    struct Spec {
        event: Option<String>,
        id: Option<String>,
        lines: Vec<String>,
        comment: bool,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        let text = "[a-zA-Z0-9 :{}\"é€😀\\[\\]]{0,12}";
        (
            proptest::option::of("[a-z]{1,6}"),
            proptest::option::of("[0-9]{1,3}"),
            proptest::collection::vec(text, 1..4),
            any::<bool>(),
        )
            .prop_map(|(event, id, lines, comment)| Spec {
                event,
                id,
                lines,
                comment,
            })
    }

    fn encode(specs: &[Spec], eols: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut k = 0usize;
        let mut eol = |out: &mut Vec<u8>| {
            match eols.get(k % eols.len().max(1)).copied().unwrap_or(0) % 3 {
                // An LF right after a CR line end would merge with it into one CRLF.
                0 if out.ends_with(b"\r") => out.extend_from_slice(b"\r\n"),
                0 => out.extend_from_slice(b"\n"),
                1 => out.extend_from_slice(b"\r\n"),
                _ => out.extend_from_slice(b"\r"),
            }
            k += 1;
        };
        for s in specs {
            if s.comment {
                out.extend_from_slice(b": keep-alive");
                eol(&mut out);
            }
            if let Some(e) = &s.event {
                out.extend_from_slice(format!("event: {e}").as_bytes());
                eol(&mut out);
            }
            if let Some(id) = &s.id {
                out.extend_from_slice(format!("id: {id}").as_bytes());
                eol(&mut out);
            }
            for l in &s.lines {
                out.extend_from_slice(format!("data: {l}").as_bytes());
                eol(&mut out);
            }
            eol(&mut out);
        }
        out
    }

    fn expected(specs: &[Spec]) -> Vec<SseEvent> {
        let mut last_id = None;
        specs
            .iter()
            .map(|s| {
                if s.id.is_some() {
                    last_id.clone_from(&s.id);
                }
                SseEvent {
                    event: s.event.clone(),
                    data: s.lines.join("\n"),
                    id: last_id.clone(),
                }
            })
            .collect()
    }

    proptest! {
        #[test]
        fn any_chunking_of_a_valid_stream_yields_the_same_events(
            specs in proptest::collection::vec(spec(), 0..8),
            eols in proptest::collection::vec(any::<u8>(), 1..16),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..24),
        ) {
            let bytes = encode(&specs, &eols);
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            cuts.sort_unstable();
            let mut chunks = Vec::new();
            let mut from = 0;
            for c in cuts {
                chunks.push(&bytes[from..c]);
                from = c;
            }
            chunks.push(&bytes[from..]);
            let whole = decode_all(&[&bytes]).unwrap();
            prop_assert_eq!(&whole, &expected(&specs));
            prop_assert_eq!(decode_all(&chunks).unwrap(), whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_respect_the_bounds(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            split in any::<prop::sample::Index>(),
        ) {
            let mut d = SseDecoder::with_limits(32, 48);
            let at = split.index(bytes.len() + 1);
            let mut events = Vec::new();
            let (a, b) = bytes.split_at(at);
            if d.push_into(a, &mut events).is_ok() && d.push_into(b, &mut events).is_ok() {
                events.extend(d.finish().ok().flatten());
            }
            for e in events {
                prop_assert!(e.data.len() <= 48);
            }
            prop_assert!(d.line.len() <= 32);
        }
    }
}
