//! A strict JSON syntax check (RFC 8259), iterative and bounded in depth.
//!
//! serde-json-core skips the values of unknown fields loosely and ignores what follows the
//! document, so on its own it accepts some inputs that are not JSON (found by fuzzing: a
//! garbage field followed by a second object decoded as the request). Every JSON message is
//! checked here first, so that what decodes is exactly what a JSON parser would read.

/// Whether `bytes` is one well-formed JSON value (surrounding whitespace allowed) whose arrays
/// and objects nest at most `max_depth` deep.
pub(crate) fn is_well_formed(bytes: &[u8], max_depth: usize) -> bool {
    if core::str::from_utf8(bytes).is_err() {
        return false;
    }
    let mut p = Parser { bytes, at: 0 };
    p.document(max_depth).is_some()
}

/// What the innermost open container expects next.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Open {
    /// An array: after a value, `,` or `]`.
    Array,
    /// An object: after a value, `,` or `}`.
    Object,
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn eat(&mut self, b: u8) -> Option<()> {
        (self.peek()? == b).then(|| self.at += 1)
    }

    /// One value, then only blanks. Containers are tracked on a fixed stack (no recursion).
    fn document(&mut self, max_depth: usize) -> Option<()> {
        let mut stack = [Open::Array; crate::MAX_JSON_DEPTH];
        let max_depth = max_depth.min(stack.len());
        let mut depth = 0usize;
        'value: loop {
            // A value starts here.
            self.blanks();
            match self.peek()? {
                b'{' | b'[' => {
                    let open = if self.peek()? == b'{' {
                        Open::Object
                    } else {
                        Open::Array
                    };
                    self.at += 1;
                    if depth == max_depth {
                        return None;
                    }
                    *stack.get_mut(depth)? = open;
                    depth += 1;
                    self.blanks();
                    let close = if open == Open::Object { b'}' } else { b']' };
                    if self.peek()? == close {
                        self.at += 1;
                        depth -= 1;
                    } else {
                        if open == Open::Object {
                            self.member_name()?;
                        }
                        continue 'value;
                    }
                }
                b'"' => self.string()?,
                b'-' | b'0'..=b'9' => self.number()?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                _ => return None,
            }
            // A value ended: close containers or move to the next element.
            loop {
                self.blanks();
                if depth == 0 {
                    return (self.at == self.bytes.len()).then_some(());
                }
                let open = *stack.get(depth - 1)?;
                match (self.peek()?, open) {
                    (b',', Open::Array) => {
                        self.at += 1;
                        continue 'value;
                    }
                    (b',', Open::Object) => {
                        self.at += 1;
                        self.blanks();
                        self.member_name()?;
                        continue 'value;
                    }
                    (b']', Open::Array) | (b'}', Open::Object) => {
                        self.at += 1;
                        depth -= 1;
                    }
                    _ => return None,
                }
            }
        }
    }

    /// `"name"` then `:`.
    fn member_name(&mut self) -> Option<()> {
        if self.peek()? != b'"' {
            return None;
        }
        self.string()?;
        self.blanks();
        self.eat(b':')
    }

    /// A string at `"`: no raw control characters, only the escapes JSON has.
    fn string(&mut self) -> Option<()> {
        self.eat(b'"')?;
        loop {
            match self.peek()? {
                b'"' => {
                    self.at += 1;
                    return Some(());
                }
                b'\\' => {
                    self.at += 1;
                    match self.peek()? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                        b'u' => {
                            self.at += 1;
                            for _ in 0..4 {
                                if !self.peek()?.is_ascii_hexdigit() {
                                    return None;
                                }
                                self.at += 1;
                            }
                        }
                        _ => return None,
                    }
                }
                0x00..=0x1f => return None,
                _ => self.at += 1,
            }
        }
    }

    fn digits(&mut self) -> Option<()> {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        (self.at > start).then_some(())
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`
    fn number(&mut self) -> Option<()> {
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        if self.peek()? == b'0' {
            self.at += 1;
        } else {
            self.digits()?;
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.digits()?;
        }
        Some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at.checked_add(word.len())?;
        (self.bytes.get(self.at..end)? == word).then(|| self.at = end)
    }
}

#[cfg(test)]
mod tests {
    use super::is_well_formed;

    #[test]
    fn accepts_json() {
        for ok in [
            r#"{}"#,
            r#" {"a" : 1 , "b":[true,false,null,-0.5e+3,"x\"\\\/\b\f\n\r\t\u00e9"], "c":{}} "#,
            r#"[]"#,
            r#"[[1],[2,[3]]]"#,
            r#""s""#,
            "0",
            "{\"é\":\"😀\"}",
        ] {
            assert!(is_well_formed(ok.as_bytes(), 16), "{ok}");
        }
    }

    #[test]
    fn rejects_what_is_not_json() {
        for bad in [
            "",
            " ",
            r#"{"a":1}x"#,
            r#"{"a":1}{"b":2}"#,
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"{a:1}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":.5}"#,
            r#"{"a":1e}"#,
            r#"{"a":-}"#,
            r#"{"a":tru}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12g4"}"#,
            "{\"a\":\"tab\there\"}",
            r#"{"a":[1,2}"#,
            r#"{"a":{"b":1]}"#,
            r#"[1,]"#,
            r#"{"a":1"#,
            r#"{"a":"x"#,
            "{\"v\":1,\"i'sm?kd\":\u{0}\u{0}\u{0}chat\"\u{1}\u{0}\u{0}nompt\":{\"v\":1,\"id\":\"de43\"}}",
        ] {
            assert!(!is_well_formed(bad.as_bytes(), 16), "{bad:?}");
        }
        assert!(!is_well_formed(b"{\"a\":\"\xff\"}", 16), "not UTF-8");
    }

    #[test]
    fn depth_is_bounded_without_recursion() {
        assert!(is_well_formed(b"[[[1]]]", 3));
        assert!(!is_well_formed(b"[[[1]]]", 2));
        let deep = [b'['; 100_000];
        assert!(!is_well_formed(&deep, 16));
    }
}
