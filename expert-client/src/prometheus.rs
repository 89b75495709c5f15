//! A small parser of the Prometheus text exposition format (version 0.0.4, plus the parts of
//! OpenMetrics and Prometheus 3 that engines emit): what `/metrics` of vLLM, SGLang and
//! llama.cpp return.
//!
//! Understood: `# HELP`/`# TYPE`/other comments (skipped), metric names with `:`, label sets
//! with escaped `\\`, `\"`, `\n` in values and a trailing comma, quoted UTF-8 metric and label
//! names (`{"my.metric", "a.b"="x"}`), values including `+Inf`, `-Inf`, `NaN`, an optional
//! timestamp (integer milliseconds, or float seconds as in OpenMetrics), a trailing exemplar
//! (`# {...} 1.0`), CRLF line ends. A malformed line is recorded and skipped; the rest of the
//! text is still read. Pure: never panics.

/// One sample: a metric name, its labels, a value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name, e.g. `vllm:num_requests_running`.
    pub name: String,
    /// The labels in the order written.
    pub labels: Vec<(String, String)>,
    /// The value (may be infinite or NaN).
    pub value: f64,
    /// The timestamp, milliseconds since the Unix epoch, if written.
    pub timestamp_ms: Option<i64>,
}

impl Sample {
    /// The value of a label, if present.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A line that is not a sample, a comment or blank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedLine {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Most malformed lines recorded in [`Exposition::malformed`] (the count goes on).
pub const MAX_MALFORMED_RECORDED: usize = 16;

/// The parsed text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// The first [`MAX_MALFORMED_RECORDED`] malformed lines.
    pub malformed: Vec<MalformedLine>,
    /// How many lines were malformed in all.
    pub malformed_count: usize,
}

impl Exposition {
    /// The samples of one metric.
    pub fn series<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }
}

/// Parses a whole exposition.
pub fn parse_exposition(text: &str) -> Exposition {
    let mut out = Exposition::default();
    for (i, line) in text.split('\n').enumerate() {
        match parse_line(line) {
            Ok(Some(sample)) => out.samples.push(sample),
            Ok(None) => {}
            Err(reason) => {
                out.malformed_count += 1;
                if out.malformed.len() < MAX_MALFORMED_RECORDED {
                    out.malformed.push(MalformedLine {
                        line: i + 1,
                        reason,
                    });
                }
            }
        }
    }
    out
}

/// Parses one line: `Ok(None)` for a blank line or a comment.
pub fn parse_line(line: &str) -> Result<Option<Sample>, &'static str> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut c = Cursor {
        rest: line.trim_start_matches([' ', '\t']),
    };
    if c.rest.is_empty() || c.rest.starts_with('#') {
        return Ok(None);
    }
    let mut name = if c.rest.starts_with('{') {
        None
    } else {
        Some(c.name()?.to_owned())
    };
    let mut blank_before_value = c.skip_blank();
    let mut labels = Vec::new();
    if c.eat('{') {
        blank_before_value = false;
        loop {
            c.skip_blank();
            if c.eat('}') {
                break;
            }
            let label = if c.rest.starts_with('"') {
                c.quoted()?
            } else {
                c.label_name()?.to_owned()
            };
            c.skip_blank();
            if c.eat('=') {
                c.skip_blank();
                if !c.rest.starts_with('"') {
                    return Err("a label value must be quoted");
                }
                let value = c.quoted()?;
                labels.push((label, value));
            } else if name.is_none() && labels.is_empty() {
                // Prometheus 3: `{"metric.name", label="v"}`.
                name = Some(label);
            } else {
                return Err("a label needs `=` and a value");
            }
            c.skip_blank();
            if c.eat(',') {
                continue;
            }
            if c.eat('}') {
                break;
            }
            return Err("expected `,` or `}` in the label set");
        }
    }
    let name = name.ok_or("a sample needs a metric name")?;
    if c.skip_blank() {
        blank_before_value = true;
    }
    if !blank_before_value {
        return Err("expected whitespace before the value");
    }
    let value = parse_value(c.word()).ok_or("the value is not a number")?;
    c.skip_blank();
    let mut timestamp_ms = None;
    if !c.rest.is_empty() && !c.rest.starts_with('#') {
        timestamp_ms = Some(parse_timestamp(c.word()).ok_or("the timestamp is not a number")?);
        c.skip_blank();
    }
    if !c.rest.is_empty() && !c.rest.starts_with('#') {
        return Err("unexpected text after the sample");
    }
    Ok(Some(Sample {
        name,
        labels,
        value,
        timestamp_ms,
    }))
}

/// Go's `strconv.ParseFloat` spellings as Prometheus writes them (`+Inf`, `-Inf`, `NaN`) and
/// plain decimal floats.
fn parse_value(word: &str) -> Option<f64> {
    match word {
        "+Inf" | "Inf" | "+inf" | "inf" => Some(f64::INFINITY),
        "-Inf" | "-inf" => Some(f64::NEG_INFINITY),
        "NaN" | "nan" => Some(f64::NAN),
        _ if word
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
            && !word.is_empty() =>
        {
            word.parse().ok()
        }
        _ => None,
    }
}

fn parse_timestamp(word: &str) -> Option<i64> {
    if let Ok(ms) = word.parse::<i64>() {
        return Some(ms);
    }
    let seconds = parse_value(word)?;
    let ms = (seconds * 1000.0).round();
    // `as` saturates; only finite values in range are meaningful.
    (ms.is_finite() && ms.abs() < 9.0e18).then_some(ms as i64)
}

struct Cursor<'a> {
    rest: &'a str,
}

impl<'a> Cursor<'a> {
    /// Skips spaces and tabs; whether any were skipped.
    fn skip_blank(&mut self) -> bool {
        let before = self.rest.len();
        self.rest = self.rest.trim_start_matches([' ', '\t']);
        self.rest.len() != before
    }

    fn eat(&mut self, c: char) -> bool {
        match self.rest.strip_prefix(c) {
            Some(rest) => {
                self.rest = rest;
                true
            }
            None => false,
        }
    }

    fn take_while(&mut self, ok: impl Fn(usize, char) -> bool) -> &'a str {
        let end = self
            .rest
            .char_indices()
            .enumerate()
            .find(|&(i, (_, ch))| !ok(i, ch))
            .map_or(self.rest.len(), |(_, (at, _))| at);
        let (taken, rest) = self.rest.split_at(end);
        self.rest = rest;
        taken
    }

    fn name(&mut self) -> Result<&'a str, &'static str> {
        let name = self.take_while(|i, ch| {
            ch.is_ascii_alphabetic() || ch == '_' || ch == ':' || (i > 0 && ch.is_ascii_digit())
        });
        if name.is_empty() {
            Err("expected a metric name")
        } else {
            Ok(name)
        }
    }

    fn label_name(&mut self) -> Result<&'a str, &'static str> {
        let name = self.take_while(|i, ch| {
            ch.is_ascii_alphabetic() || ch == '_' || (i > 0 && ch.is_ascii_digit())
        });
        if name.is_empty() {
            Err("expected a label name")
        } else {
            Ok(name)
        }
    }

    /// A double-quoted string with `\\`, `\"`, `\n` escapes (others kept as written).
    fn quoted(&mut self) -> Result<String, &'static str> {
        if !self.eat('"') {
            return Err("expected `\"`");
        }
        let mut out = String::new();
        let mut chars = self.rest.char_indices();
        while let Some((at, ch)) = chars.next() {
            match ch {
                '"' => {
                    self.rest = self.rest.get(at + 1..).unwrap_or("");
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, '\\')) => out.push('\\'),
                    Some((_, '"')) => out.push('"'),
                    Some((_, other)) => {
                        out.push('\\');
                        out.push(other);
                    }
                    None => return Err("unterminated escape"),
                },
                other => out.push(other),
            }
        }
        Err("unterminated quoted string")
    }

    /// Up to the next blank.
    fn word(&mut self) -> &'a str {
        self.take_while(|_, ch| ch != ' ' && ch != '\t')
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn one(line: &str) -> Sample {
        parse_line(line).unwrap().unwrap()
    }

    #[test]
    fn plain_samples_with_and_without_labels() {
        let s = one("vllm:num_requests_running{engine=\"0\",model_name=\"qwen\"} 3.0");
        assert_eq!(s.name, "vllm:num_requests_running");
        assert_eq!(s.label("model_name"), Some("qwen"));
        assert_eq!(s.label("engine"), Some("0"));
        assert_eq!(s.value, 3.0);
        let s = one("llamacpp:requests_processing 1");
        assert!(s.labels.is_empty());
        assert_eq!(s.value, 1.0);
        assert_eq!(one("x{} 2").value, 2.0);
        assert_eq!(one("  x {a=\"b\",} 2\r").label("a"), Some("b"));
    }

    #[test]
    fn comments_and_blank_lines_are_not_samples() {
        assert_eq!(parse_line("# HELP x The help"), Ok(None));
        assert_eq!(parse_line("# TYPE x gauge"), Ok(None));
        assert_eq!(parse_line(""), Ok(None));
        assert_eq!(parse_line("   \r"), Ok(None));
    }

    #[test]
    fn escaped_label_values_are_unescaped() {
        let s = one(r#"m{path="C:\\dir",msg="say \"hi\"\nbye",odd="a\tb"} 1"#);
        assert_eq!(s.label("path"), Some("C:\\dir"));
        assert_eq!(s.label("msg"), Some("say \"hi\"\nbye"));
        assert_eq!(s.label("odd"), Some("a\\tb"));
        // A `}` or `,` inside a quoted value is text.
        assert_eq!(one(r#"m{a="x}, y"} 1"#).label("a"), Some("x}, y"));
    }

    #[test]
    fn special_values_timestamps_and_exemplars() {
        assert_eq!(one("h_bucket{le=\"+Inf\"} +Inf").value, f64::INFINITY);
        assert_eq!(one("m -Inf").value, f64::NEG_INFINITY);
        assert!(one("m NaN").value.is_nan());
        assert_eq!(one("m 1.5e3").value, 1500.0);
        let s = one("m 1 1700000000000");
        assert_eq!(s.timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(
            one("m 1 1700000000.5").timestamp_ms,
            Some(1_700_000_000_500)
        );
        let s = one("h_bucket{le=\"0.5\"} 12 # {trace_id=\"abc\"} 0.3 1700000000.1");
        assert_eq!(s.value, 12.0);
        assert_eq!(s.timestamp_ms, None);
    }

    #[test]
    fn quoted_utf8_names() {
        let s = one(r#"{"vllm.requests.running", "model.name"="m"} 4"#);
        assert_eq!(s.name, "vllm.requests.running");
        assert_eq!(s.label("model.name"), Some("m"));
    }

    #[test]
    fn malformed_lines_are_skipped_and_counted() {
        let text = "good 1\nbad{a=b} 1\nx\ny{a=\"1\"\nz 1 2 3\n{} 1\ngood 2\n";
        let e = parse_exposition(text);
        assert_eq!(
            e.samples.iter().map(|s| s.value).collect::<Vec<_>>(),
            vec![1.0, 2.0]
        );
        assert_eq!(e.malformed_count, 5);
        assert_eq!(e.malformed.first().map(|m| m.line), Some(2));
        assert!(parse_line("m 0x10").is_err());
        assert!(parse_line("m{a=\"\\").is_err());
    }

    proptest! {
        #[test]
        fn parsing_never_panics(text in "\\PC{0,200}") {
            let _ = parse_exposition(&text);
        }

        #[test]
        fn parsing_never_panics_on_metric_like_text(
            text in "[a-z_:{}=\",# \\\\\n0-9.+eEInfNa-]{0,200}"
        ) {
            let e = parse_exposition(&text);
            prop_assert!(e.malformed.len() <= MAX_MALFORMED_RECORDED);
        }

        #[test]
        fn written_samples_parse_back(
            name in "[a-zA-Z_:][a-zA-Z0-9_:]{0,20}",
            labels in proptest::collection::vec(("[a-zA-Z_][a-zA-Z0-9_]{0,8}", "\\PC{0,10}"), 0..4),
            value in proptest::num::f64::NORMAL | proptest::num::f64::ZERO,
        ) {
            let escaped: Vec<String> = labels
                .iter()
                .map(|(k, v)| {
                    let v = v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
                    format!("{k}=\"{v}\"")
                })
                .collect();
            let line = format!("{name}{{{}}} {value:e}", escaped.join(","));
            let s = parse_line(&line).unwrap().unwrap();
            prop_assert_eq!(s.name, name);
            prop_assert_eq!(s.labels, labels);
            prop_assert_eq!(s.value, value);
        }
    }
}
