//! Splitting an answer into chunk-sized pieces.

/// Splits `text` into pieces of at most `max_bytes` bytes each, on character boundaries, in
/// order; concatenated they give `text` back. An empty text gives no pieces. Every piece is
/// non-empty; a `max_bytes` below 4 still makes progress (a piece then holds one character,
/// which may be longer than `max_bytes`).
///
/// Use [`crate::MAX_CHUNK_BYTES`] to fill [`crate::ReplyChunk`]s.
pub fn split_text(text: &str, max_bytes: usize) -> TextPieces<'_> {
    TextPieces {
        rest: text,
        max_bytes,
    }
}

/// The pieces of [`split_text`]; knows its exact length.
#[derive(Debug, Clone)]
pub struct TextPieces<'a> {
    rest: &'a str,
    max_bytes: usize,
}

impl<'a> TextPieces<'a> {
    /// Where the next piece ends, or `None` when nothing is left.
    fn next_end(&self) -> Option<usize> {
        let first_char = self.rest.chars().next()?.len_utf8();
        let mut end = self.max_bytes.min(self.rest.len());
        while !self.rest.is_char_boundary(end) {
            end -= 1;
        }
        Some(end.max(first_char))
    }
}

impl<'a> Iterator for TextPieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let end = self.next_end()?;
        let (piece, rest) = self.rest.split_at_checked(end)?;
        self.rest = rest;
        Some(piece)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let mut copy = self.clone();
        let mut n = 0;
        while let Some(end) = copy.next_end() {
            copy.rest = copy.rest.get(end..).unwrap_or_default();
            n += 1;
        }
        (n, Some(n))
    }
}

impl ExactSizeIterator for TextPieces<'_> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_respect_the_bound_and_char_boundaries() {
        let text = "aé😀bc€";
        for max in 0..=text.len() + 1 {
            let pieces: Vec<&str> = split_text(text, max).collect();
            assert_eq!(pieces.concat(), text, "max {max}");
            assert_eq!(split_text(text, max).len(), pieces.len());
            for p in &pieces {
                assert!(!p.is_empty());
                assert!(p.len() <= max.max(4), "max {max}: {p:?}");
            }
        }
        assert_eq!(split_text("", 10).len(), 0);
        assert_eq!(split_text("abcdef", 4).collect::<Vec<_>>(), ["abcd", "ef"]);
        assert_eq!(split_text("ab😀", 4).collect::<Vec<_>>(), ["ab", "😀"]);
    }
}
