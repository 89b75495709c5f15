//! The `max_tokens` the demo's devices send: a per-task bound that a device (its app's
//! developer) sets without knowing the answer, not the answer's length.
//!
//! The rule, in this one place: for each task, the 99th percentile (nearest rank, as
//! [`qosroute_swarm::Percentiles`] computes it) of the output lengths of the trace's requests
//! of that task in the *training window*, the trace's first 40 minutes (arrival before
//! [`TRAINING_WINDOW_S`]), whose tasks come from the simulator's seeded join with the quality
//! table (the run's seed). A task with fewer than [`MIN_SAMPLES`] requests there takes the
//! bound of every task together. Nothing after the training window is read, and the demo
//! replays minutes after it by default.
//!
//! The answer itself keeps its true length (the trace's), cut at the bound as a real engine
//! cuts an answer at `max_tokens`. The gateway caps its length predictions at `max_tokens`,
//! so with the true length as `max_tokens` (what the devices sent before) every router knew
//! every answer's length.

use std::collections::BTreeMap;

use anyhow::bail;
use qosroute_core::Task;
use qosroute_sim::trace::TraceRow;
use qosroute_sim::workload::{WorkloadSources, synthesize};
use qosroute_sim::{QualityTable, WorkloadSpec};
use qosroute_swarm::Percentiles;
use serde::Serialize;

/// The end of the training window, seconds: the trace's first 40 minutes, the part the
/// learned router's training may see (the rest is held out for evaluation).
pub(crate) const TRAINING_WINDOW_S: f64 = qosroute_sim::training::TRAINING_TRACE_UNTIL_S;
/// Fewest requests of a task in the training window for a bound of its own.
pub(crate) const MIN_SAMPLES: usize = 100;

/// One task's bound.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub(crate) struct TaskBound {
    pub(crate) task: Task,
    pub(crate) max_tokens: u32,
    /// Requests of the task in the training window.
    pub(crate) samples: usize,
    /// Whether the task had too few requests and took the all-task bound.
    pub(crate) pooled: bool,
}

/// The `max_tokens` of every task.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct MaxTokens {
    /// The rule, for demo.json.
    pub(crate) rule: &'static str,
    /// The bound of every task together (a task with too few samples, or one absent from
    /// the quality table, such as `chat`).
    pub(crate) all_tasks: u32,
    /// Requests in the training window.
    pub(crate) samples: usize,
    pub(crate) per_task: Vec<TaskBound>,
}

/// The 99th percentile of `lengths`, nearest rank, within the wire bound.
fn p99(lengths: &[u32]) -> u32 {
    let p = Percentiles::of(lengths.iter().map(|&n| f64::from(n))).p99;
    if p.is_finite() {
        (p as u32).clamp(1, qosroute_proto::MAX_TOKENS_LIMIT)
    } else {
        qosroute_proto::MAX_TOKENS_LIMIT
    }
}

impl MaxTokens {
    /// The bounds from the training window of `rows` (a whole trace, arrivals in seconds
    /// since its first request), tasks joined by `seed`.
    pub(crate) fn from_training(
        rows: &[TraceRow],
        quality: &QualityTable,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let training: Vec<TraceRow> = rows
            .iter()
            .copied()
            .filter(|r| r.arrival_s < TRAINING_WINDOW_S)
            .collect();
        if training.is_empty() {
            bail!("the trace has no requests in its first 40 minutes to bound max_tokens by");
        }
        let spec = "trace:training-window,speed=1";
        let parsed = WorkloadSpec::Trace {
            path: "training-window".into(),
            speed: 1.0,
            n: None,
            offset_s: 0.0,
        };
        let sources = WorkloadSources {
            quality,
            output_lengths: &[],
            trace: Some(&training),
        };
        let requests = synthesize(spec, &parsed, sources, seed)?;
        let mut by_task: BTreeMap<Task, Vec<u32>> = BTreeMap::new();
        for r in &requests {
            by_task.entry(r.task).or_default().push(r.output_tokens);
        }
        let everything: Vec<u32> = requests.iter().map(|r| r.output_tokens).collect();
        let all_tasks = p99(&everything);
        let per_task = Task::ALL
            .iter()
            .map(|&task| {
                let lengths = by_task.get(&task).map_or(&[][..], Vec::as_slice);
                let pooled = lengths.len() < MIN_SAMPLES;
                TaskBound {
                    task,
                    max_tokens: if pooled { all_tasks } else { p99(lengths) },
                    samples: lengths.len(),
                    pooled,
                }
            })
            .collect();
        Ok(Self {
            rule: "per task: p99 (nearest rank) of the output lengths of the trace's requests of the task in its first 40 minutes (tasks by the seeded join with the quality table, the run's seed); a task with fewer than 100 of them takes the p99 of all tasks; answers longer than max_tokens are cut there",
            all_tasks,
            samples: requests.len(),
            per_task,
        })
    }

    /// The `max_tokens` of a `task` request.
    pub(crate) fn of(&self, task: Task) -> u32 {
        self.per_task
            .iter()
            .find(|b| b.task == task)
            .map_or(self.all_tasks, |b| b.max_tokens)
    }

    /// The bound of a request's wire task (by name; one the core does not know takes the
    /// all-task bound).
    pub(crate) fn of_wire(&self, task: qosroute_proto::Task) -> u32 {
        task.as_str()
            .parse::<Task>()
            .map_or(self.all_tasks, |t| self.of(t))
    }

    /// One line for the header: the range of the per-task bounds.
    pub(crate) fn describe(&self) -> String {
        let (lo, hi) = self
            .per_task
            .iter()
            .filter(|b| !b.pooled)
            .map(|b| b.max_tokens)
            .fold((u32::MAX, 0), |(lo, hi), n| (lo.min(n), hi.max(n)));
        if lo > hi {
            format!("max_tokens {} (p99 of minutes 0-40)", self.all_tasks)
        } else {
            format!(
                "max_tokens {lo}-{hi} per task, {} pooled (p99 of minutes 0-40)",
                self.all_tasks
            )
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn row(arrival_s: f64, output_tokens: u32) -> TraceRow {
        TraceRow {
            arrival_s,
            prompt_tokens: 100,
            output_tokens,
        }
    }

    #[test]
    fn the_window_is_the_first_40_minutes() {
        assert_eq!(TRAINING_WINDOW_S, 2400.0);
    }

    #[test]
    fn few_requests_per_task_pool_into_the_p99_of_all() {
        let quality = QualityTable::embedded().unwrap();
        // 200 requests of 1..=200 tokens in the window: p99 by nearest rank is the
        // ceil(0.99 * 200) = 198th smallest, 198. No task has 100 of them.
        let rows: Vec<TraceRow> = (1..=200).map(|n| row(f64::from(n), n)).collect();
        let m = MaxTokens::from_training(&rows, &quality, 1).unwrap();
        assert_eq!((m.all_tasks, m.samples), (198, 200));
        assert!(m.per_task.iter().all(|b| b.pooled && b.max_tokens == 198));
        assert_eq!(m.of(Task::Chat), 198);
        assert_eq!(m.of_wire(qosroute_proto::Task::Gsm8k), 198);
    }

    #[test]
    fn only_the_first_40_minutes_count() {
        let quality = QualityTable::embedded().unwrap();
        let mut rows: Vec<TraceRow> = (0..2400).map(|t| row(f64::from(t), 1 + t % 500)).collect();
        let before = MaxTokens::from_training(&rows, &quality, 3).unwrap();
        // Requests at and after 40 minutes, however long, change nothing.
        rows.extend((2400..3600).map(|t| row(f64::from(t), 16_000)));
        assert_eq!(
            MaxTokens::from_training(&rows, &quality, 3).unwrap(),
            before
        );
        // Requests inside it do: 30 answers of 9,000 tokens among 2,400 take the ranks
        // 2,371-2,400, so the p99 of all (rank ceil(0.99 * 2400) = 2,376) becomes 9,000.
        for r in &mut rows[..30] {
            r.output_tokens = 9_000;
        }
        let after = MaxTokens::from_training(&rows, &quality, 3).unwrap();
        assert_eq!(after.all_tasks, 9_000);
        // 2,400 requests of 1..=500 tokens (values 1-400 five times, 401-500 four times): the
        // p99 of all is rank 2,376, the 94th of the four-times block from rank 2,001: 494.
        assert_eq!((before.samples, before.all_tasks), (2400, 494));
        for b in &before.per_task {
            assert_eq!(b.pooled, b.samples < MIN_SAMPLES, "{b:?}");
            assert!(b.max_tokens <= 500, "{b:?}");
            if b.pooled {
                assert_eq!(b.max_tokens, 494, "{b:?}");
            }
        }
        assert!(before.per_task.iter().filter(|b| !b.pooled).count() >= 10);
        assert!(MaxTokens::from_training(&rows[2400..], &quality, 3).is_err());
    }

    #[test]
    fn the_bound_is_not_the_answers_length() {
        let quality = QualityTable::embedded().unwrap();
        let rows = qosroute_sim::trace::embedded_conv_trace().unwrap();
        let m = MaxTokens::from_training(&rows, &quality, 1).unwrap();
        // The requests the demo replays by default (minutes 40-43): one bound per task,
        // whatever each answer's length, equal to it only by chance.
        let window: Vec<TraceRow> = rows
            .iter()
            .copied()
            .filter(|r| (2400.0..2580.0).contains(&r.arrival_s))
            .collect();
        let parsed = WorkloadSpec::Trace {
            path: "w".into(),
            speed: 1.0,
            n: None,
            offset_s: 2400.0,
        };
        let sources = WorkloadSources {
            quality: &quality,
            output_lengths: &[],
            trace: Some(&window),
        };
        let requests = synthesize("trace:w", &parsed, sources, 1).unwrap();
        let equal = requests
            .iter()
            .filter(|r| m.of(r.task) == r.output_tokens)
            .count();
        assert!(
            equal * 100 < requests.len(),
            "{equal} of {}",
            requests.len()
        );
        let cut = requests
            .iter()
            .filter(|r| r.output_tokens > m.of(r.task))
            .count();
        assert!(cut * 20 < requests.len(), "{cut} of {} cut", requests.len());
        // The trace's p99 is a few hundred tokens, far above most answers.
        assert!((400..1000).contains(&m.all_tasks), "{}", m.all_tasks);
    }
}
