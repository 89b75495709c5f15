//! The plain CSV files the simulator reads (no quoting): header lookup and rows with their
//! 1-based line numbers, every error naming file, line and field.

use crate::error::SimError;

/// A parse error at `line` of `source`, in `field`.
pub(crate) fn parse_error(
    source: &str,
    line: usize,
    field: &str,
    message: impl Into<String>,
) -> SimError {
    SimError::Parse {
        path: source.to_owned(),
        line,
        field: field.to_owned(),
        message: message.into(),
    }
}

/// A CSV text split into its header and rows.
pub(crate) struct CsvText<'a> {
    source: &'a str,
    /// Header cells.
    pub columns: Vec<&'a str>,
    /// `(line number, cells)` of every non-empty row; each has as many cells as the header.
    pub rows: Vec<(usize, Vec<&'a str>)>,
}

impl<'a> CsvText<'a> {
    /// Splits `text`; a row with the wrong number of fields is an error.
    pub fn parse(text: &'a str, source: &'a str) -> Result<Self, SimError> {
        let mut lines = text.lines().enumerate();
        let columns: Vec<&str> = lines
            .next()
            .map(|(_, h)| h.trim_end_matches('\r').split(',').collect())
            .unwrap_or_default();
        let mut rows = Vec::new();
        for (i, line) in lines {
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                continue;
            }
            let cells: Vec<&str> = line.split(',').collect();
            if cells.len() != columns.len() {
                return Err(parse_error(
                    source,
                    i + 1,
                    "row",
                    format!("{} fields, header has {}", cells.len(), columns.len()),
                ));
            }
            rows.push((i + 1, cells));
        }
        Ok(Self {
            source,
            columns,
            rows,
        })
    }

    /// Index of the column called `name`.
    pub fn column(&self, name: &str) -> Result<usize, SimError> {
        self.columns
            .iter()
            .position(|c| *c == name)
            .ok_or_else(|| parse_error(self.source, 1, name, "missing column"))
    }
}
