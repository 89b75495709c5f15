//! Azure LLM inference traces (`TIMESTAMP,ContextTokens,GeneratedTokens`).

use std::path::Path;

use crate::csv::{CsvText, parse_error};
use crate::error::{SimError, read_file};

/// The Azure conversation trace shipped in the repository (compiled in).
pub const EMBEDDED_CONV_TRACE_CSV: &str = include_str!("../../data/traces/azure-llm-2023-conv.csv");
/// Name under which the embedded trace is reported.
pub const EMBEDDED_CONV_TRACE_NAME: &str = "data/traces/azure-llm-2023-conv.csv";

/// One request of a trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TraceRow {
    /// Seconds since the trace's first request.
    pub arrival_s: f64,
    /// Prompt (context) tokens.
    pub prompt_tokens: u32,
    /// Generated (output) tokens, at least 1.
    pub output_tokens: u32,
}

/// Seconds since 1970-01-01 of `YYYY-MM-DD HH:MM:SS[.fraction]` (UTC, proleptic Gregorian).
fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once([' ', 'T'])?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    if d.next().is_some() || !(1..=12).contains(&m) || !(1..=31).contains(&day) {
        return None;
    }
    let mut t = time.split(':');
    let (hh, mm): (i64, i64) = (t.next()?.parse().ok()?, t.next()?.parse().ok()?);
    let ss: f64 = t.next()?.parse().ok()?;
    if t.next().is_some()
        || !(0..24).contains(&hh)
        || !(0..60).contains(&mm)
        || !(0.0..61.0).contains(&ss)
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3_600 + mm * 60) as f64 + ss)
}

/// Parses an Azure-format trace; arrivals become seconds since the earliest request, rows
/// are returned in arrival order (stable for equal times). `source` names it in errors.
pub fn parse_azure_trace(text: &str, source: &str) -> Result<Vec<TraceRow>, SimError> {
    let err = |line: usize, field: &str, message: String| parse_error(source, line, field, message);
    let csv = CsvText::parse(text, source)?;
    let (ts_col, ctx_col, gen_col) = (
        csv.column("TIMESTAMP")?,
        csv.column("ContextTokens")?,
        csv.column("GeneratedTokens")?,
    );
    let mut raw = Vec::with_capacity(csv.rows.len());
    for (line_no, cells) in &csv.rows {
        let line_no = *line_no;
        let ts = parse_timestamp(cells[ts_col]).ok_or_else(|| {
            err(
                line_no,
                "TIMESTAMP",
                format!("`{}` is not YYYY-MM-DD HH:MM:SS[.f]", cells[ts_col]),
            )
        })?;
        let tokens = |c: usize, name: &str| {
            cells[c]
                .trim()
                .parse::<u32>()
                .map_err(|e| err(line_no, name, format!("`{}`: {e}", cells[c])))
        };
        let prompt_tokens = tokens(ctx_col, "ContextTokens")?;
        let output_tokens = tokens(gen_col, "GeneratedTokens")?.max(1);
        raw.push((ts, prompt_tokens, output_tokens));
    }
    let Some(t0) = raw.iter().map(|r| r.0).min_by(f64::total_cmp) else {
        return Err(SimError::Invalid {
            path: source.into(),
            message: "no requests".into(),
        });
    };
    let mut rows: Vec<TraceRow> = raw
        .into_iter()
        .map(|(ts, prompt_tokens, output_tokens)| TraceRow {
            arrival_s: ts - t0,
            prompt_tokens,
            output_tokens,
        })
        .collect();
    rows.sort_by(|a, b| a.arrival_s.total_cmp(&b.arrival_s));
    Ok(rows)
}

/// Reads an Azure-format trace file.
pub fn load_azure_trace(path: &Path) -> Result<Vec<TraceRow>, SimError> {
    parse_azure_trace(&read_file(path)?, &path.display().to_string())
}

/// The embedded conversation trace.
pub fn embedded_conv_trace() -> Result<Vec<TraceRow>, SimError> {
    parse_azure_trace(EMBEDDED_CONV_TRACE_CSV, EMBEDDED_CONV_TRACE_NAME)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_across_midnight_and_months() {
        let a = parse_timestamp("2023-11-16 18:15:46.6805900").unwrap();
        let b = parse_timestamp("2023-11-16 18:15:50.9951690").unwrap();
        assert!((b - a - 4.314579).abs() < 1e-6);
        let c = parse_timestamp("2023-12-01 00:00:00").unwrap();
        let d = parse_timestamp("2023-11-30 23:59:59.5").unwrap();
        assert!((c - d - 0.5).abs() < 1e-9);
        assert_eq!(parse_timestamp("1970-01-02 00:00:00"), Some(86_400.0));
        assert!(parse_timestamp("2023-13-01 00:00:00").is_none());
        assert!(parse_timestamp("yesterday").is_none());
    }

    #[test]
    fn embedded_conv_trace_is_one_hour_of_19366_requests() {
        let rows = embedded_conv_trace().unwrap();
        assert_eq!(rows.len(), 19_366);
        assert_eq!(rows[0].arrival_s, 0.0);
        let last = rows[rows.len() - 1].arrival_s;
        assert!((3500.0..3700.0).contains(&last), "{last}");
        assert!(rows.windows(2).all(|w| w[0].arrival_s <= w[1].arrival_s));
    }

    #[test]
    fn malformed_rows_name_the_line_and_field() {
        let head = "TIMESTAMP,ContextTokens,GeneratedTokens\n";
        let e = parse_azure_trace(
            &format!("{head}2023-11-16 18:15:46.68,374,44\n2023-11-16 18:15:47,-3,5\n"),
            "t.csv",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "t.csv:3: ContextTokens: `-3`: invalid digit found in string"
        );
        let e = parse_azure_trace(&format!("{head}noon,374,44\n"), "t.csv")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t.csv:2: TIMESTAMP: `noon` is not YYYY-MM-DD HH:MM:SS[.f]"
        );
        let e = parse_azure_trace(&format!("{head}2023-11-16 18:15:46,374\n"), "t.csv")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "t.csv:2: row: 2 fields, header has 3");
        let e = parse_azure_trace(head, "t.csv").unwrap_err().to_string();
        assert_eq!(e, "t.csv: no requests");
    }
}
