//! [`AnswerQuality`]: the quality an expert's model would have had on a request, from the
//! per-prompt quality table (`QualityTable::embedded()`).

use std::collections::HashMap;
use std::sync::Arc;

use qosroute_core::Task;
use qosroute_sim::QualityTable;

/// The quality column of one model, indexed for lookups by prompt id and task.
#[derive(Debug, Clone)]
pub struct AnswerQuality {
    by_prompt: HashMap<String, f64>,
    task_mean: [Option<f64>; Task::COUNT],
}

impl AnswerQuality {
    /// The scores of `model` in `table`; `None` when the table has no such model column.
    pub fn new(table: &Arc<QualityTable>, model: &str) -> Option<Self> {
        let column = table.model_index(model)?;
        let mut by_prompt = HashMap::with_capacity(table.rows.len());
        let mut sum = [0.0f64; Task::COUNT];
        let mut n = [0u32; Task::COUNT];
        for row in &table.rows {
            let q = f64::from(row.quality.get(column).copied().unwrap_or(0.0));
            by_prompt.insert(row.id.clone(), q);
            sum[row.task.index()] += q;
            n[row.task.index()] += 1;
        }
        let mut task_mean = [None; Task::COUNT];
        for (t, mean) in task_mean.iter_mut().enumerate() {
            if n[t] > 0 {
                *mean = Some(sum[t] / f64::from(n[t]));
            }
        }
        Some(Self {
            by_prompt,
            task_mean,
        })
    }

    /// The score on `prompt_id` when the table has that prompt; else the model's mean over
    /// every row of `task` (both halves of the table); else `None` (no task given, or a task
    /// with no rows such as `chat`).
    pub fn of(&self, task: Option<Task>, prompt_id: Option<&str>) -> Option<f64> {
        prompt_id
            .and_then(|id| self.by_prompt.get(id).copied())
            .or_else(|| task.and_then(|t| self.task_mean[t.index()]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_scores_then_task_means_then_nothing() {
        let table = Arc::new(QualityTable::embedded().unwrap());
        let col = table.model_index("gemma2_9b").unwrap();
        let q = AnswerQuality::new(&table, "gemma2_9b").unwrap();
        let row = &table.rows[17];
        assert_eq!(
            q.of(Some(Task::Chat), Some(&row.id)),
            Some(f64::from(row.quality[col])),
            "the prompt's own score, whatever the task says"
        );
        let mmlu: Vec<f64> = table
            .rows
            .iter()
            .filter(|r| r.task == Task::Mmlu)
            .map(|r| f64::from(r.quality[col]))
            .collect();
        let mean = mmlu.iter().sum::<f64>() / mmlu.len() as f64;
        let got = q.of(Some(Task::Mmlu), Some("llmr-unknown")).unwrap();
        assert!((got - mean).abs() < 1e-12);
        assert!(
            (got - 0.81).abs() < 0.05,
            "README: gemma2_9b ~0.81 on mmlu, got {got}"
        );
        assert_eq!(q.of(Some(Task::Chat), None), None, "no chat rows");
        assert_eq!(q.of(None, None), None);
        assert!(AnswerQuality::new(&table, "gpt-17").is_none());
    }
}
