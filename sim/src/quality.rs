//! The per-prompt quality table (`data/quality/llmrouter-9llm-quality.csv`): for each prompt,
//! its task, its length and the quality each model got on it.
//!
//! Rows are split in two by a fixed rule, independent of any seed: rows whose id ends in an
//! even hex digit are the **calibration** half (they set the quality priors a deployer would
//! have from benchmarks), the others are the **workload** half that requests are drawn from.
//! So predicted quality never comes from the prompt being scored.

use std::path::Path;
use std::str::FromStr;

use qosroute_core::Task;

use crate::csv::{CsvText, parse_error};
use crate::error::{SimError, read_file};

/// The quality table shipped in the repository.
pub const EMBEDDED_QUALITY_CSV: &str =
    include_str!("../../data/quality/llmrouter-9llm-quality.csv");
/// Name under which the embedded table is reported.
pub const EMBEDDED_QUALITY_NAME: &str = "data/quality/llmrouter-9llm-quality.csv";

/// One prompt of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityRow {
    /// Stable prompt id (`llmr-` + 12 hex digits).
    pub id: String,
    /// Task class.
    pub task: Task,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Quality in [0, 1] per model, in the order of [`QualityTable::models`].
    pub quality: Vec<f32>,
}

impl QualityRow {
    /// Whether the row belongs to the calibration half (id ends in an even hex digit).
    pub fn is_calibration(&self) -> bool {
        self.id
            .chars()
            .last()
            .and_then(|c| c.to_digit(16))
            .is_some_and(|d| d % 2 == 0)
    }
}

/// The whole table.
#[derive(Debug, Clone, PartialEq)]
pub struct QualityTable {
    /// Where it was read from.
    pub source: String,
    /// Model columns (header names without the `_quality` suffix).
    pub models: Vec<String>,
    /// All rows, in file order.
    pub rows: Vec<QualityRow>,
}

impl QualityTable {
    /// The table shipped in the repository (compiled in).
    pub fn embedded() -> Result<Self, SimError> {
        Self::parse(EMBEDDED_QUALITY_CSV, EMBEDDED_QUALITY_NAME)
    }

    /// Reads a table from a CSV file.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        Self::parse(&read_file(path)?, &path.display().to_string())
    }

    /// Parses a table; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, SimError> {
        let csv = CsvText::parse(text, source)?;
        let (id_col, task_col, prompt_col) = (
            csv.column("id")?,
            csv.column("task")?,
            csv.column("prompt_tokens")?,
        );
        let model_cols: Vec<(usize, String)> = csv
            .columns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.strip_suffix("_quality").map(|m| (i, m.to_owned())))
            .collect();
        if model_cols.is_empty() {
            return Err(parse_error(
                source,
                1,
                "<model>_quality",
                "no model columns",
            ));
        }
        let mut rows = Vec::with_capacity(csv.rows.len());
        for (line_no, cells) in &csv.rows {
            let line_no = *line_no;
            let task = Task::from_str(cells[task_col])
                .map_err(|e| parse_error(source, line_no, "task", e.to_string()))?;
            let prompt_tokens = cells[prompt_col].parse::<u32>().map_err(|e| {
                parse_error(
                    source,
                    line_no,
                    "prompt_tokens",
                    format!("`{}`: {e}", cells[prompt_col]),
                )
            })?;
            let mut quality = Vec::with_capacity(model_cols.len());
            for (col, model) in &model_cols {
                let q = cells[*col]
                    .parse::<f32>()
                    .ok()
                    .filter(|q| (0.0..=1.0).contains(q));
                let q = q.ok_or_else(|| {
                    parse_error(
                        source,
                        line_no,
                        &format!("{model}_quality"),
                        format!("`{}` is not a number in [0, 1]", cells[*col]),
                    )
                })?;
                quality.push(q);
            }
            rows.push(QualityRow {
                id: cells[id_col].to_owned(),
                task,
                prompt_tokens,
                quality,
            });
        }
        let table = Self {
            source: source.to_owned(),
            models: model_cols.into_iter().map(|(_, m)| m).collect(),
            rows,
        };
        if table.workload_rows().next().is_none() || table.calibration_rows().next().is_none() {
            return Err(SimError::Invalid {
                path: source.into(),
                message: "needs rows in both the calibration and the workload half".into(),
            });
        }
        Ok(table)
    }

    /// Index of a model column.
    pub fn model_index(&self, model: &str) -> Option<usize> {
        self.models.iter().position(|m| m == model)
    }

    /// Rows of the calibration half.
    pub fn calibration_rows(&self) -> impl Iterator<Item = &QualityRow> {
        self.rows.iter().filter(|r| r.is_calibration())
    }

    /// Rows of the workload half.
    pub fn workload_rows(&self) -> impl Iterator<Item = &QualityRow> {
        self.rows.iter().filter(|r| !r.is_calibration())
    }

    /// Quality priors of one model from the calibration half: mean per task, and the model's
    /// overall mean for tasks with no calibration rows (e.g. `chat`).
    pub fn calibration_priors(&self, model: usize) -> [f64; Task::COUNT] {
        let mut sum = [0.0f64; Task::COUNT];
        let mut n = [0u32; Task::COUNT];
        for row in self.calibration_rows() {
            sum[row.task.index()] += f64::from(row.quality[model]);
            n[row.task.index()] += 1;
        }
        let total_n: u32 = n.iter().sum();
        let overall = sum.iter().sum::<f64>() / f64::from(total_n.max(1));
        let mut priors = [overall; Task::COUNT];
        for t in 0..Task::COUNT {
            if n[t] > 0 {
                priors[t] = sum[t] / f64::from(n[t]);
            }
        }
        priors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_table_loads_with_nine_models_and_both_halves() {
        let t = QualityTable::embedded().unwrap();
        assert_eq!(t.models.len(), 9);
        assert_eq!(t.models[0], "qwen25_7b");
        assert_eq!(t.rows.len(), 4791);
        let cal = t.calibration_rows().count();
        assert!((2000..2800).contains(&cal), "{cal}");
        let p = t.calibration_priors(t.model_index("gemma2_9b").unwrap());
        // README: mmlu gives gemma2_9b ~0.81.
        assert!(
            (p[Task::Mmlu.index()] - 0.81).abs() < 0.05,
            "{}",
            p[Task::Mmlu.index()]
        );
    }

    #[test]
    fn malformed_rows_name_the_line_and_field() {
        let head = "id,task,prompt_tokens,a_quality,b_quality\n";
        let err = QualityTable::parse(
            &format!("{head}llmr-0,mmlu,12,0.5,1\nllmr-1,mmlu,x,0,1\n"),
            "q.csv",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "q.csv:3: prompt_tokens: `x`: invalid digit found in string"
        );
        let err = QualityTable::parse(&format!("{head}llmr-0,mmlu,12,0.5,1.5\n"), "q.csv")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "q.csv:2: b_quality: `1.5` is not a number in [0, 1]");
        let err = QualityTable::parse(&format!("{head}llmr-0,poetry,12,0.5,1\n"), "q.csv")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("q.csv:2: task: unknown task `poetry`"),
            "{err}"
        );
        let err = QualityTable::parse("id,task\n", "q.csv")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "q.csv:1: prompt_tokens: missing column");
    }
}
