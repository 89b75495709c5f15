//! Task classes of requests and the per-task latency targets (SLOs).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The SLO of the paper (Yang et al.): 0.03 seconds per output token.
pub const PAPER_SLO_S_PER_TOKEN: f64 = 0.03;

/// The kind of work a request asks for: the 14 benchmark tasks of the quality table, plus
/// free-form `chat` for devices that do not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Task {
    #[serde(rename = "natural_qa")]
    NaturalQa,
    #[serde(rename = "trivia_qa")]
    TriviaQa,
    #[serde(rename = "mmlu")]
    Mmlu,
    #[serde(rename = "gsm8k")]
    Gsm8k,
    #[serde(rename = "mbpp")]
    Mbpp,
    #[serde(rename = "math")]
    Math,
    #[serde(rename = "commonsense_qa")]
    CommonsenseQa,
    #[serde(rename = "arc_challenge")]
    ArcChallenge,
    #[serde(rename = "openbook_qa")]
    OpenbookQa,
    #[serde(rename = "gpqa")]
    Gpqa,
    #[serde(rename = "agentverse-mgsm")]
    AgentverseMgsm,
    #[serde(rename = "agentverse-logicgrid")]
    AgentverseLogicgrid,
    #[serde(rename = "commongen")]
    Commongen,
    #[serde(rename = "human_eval")]
    HumanEval,
    #[serde(rename = "chat")]
    Chat,
}

impl Task {
    /// Every task, in a fixed order (the order of [`Task::index`]).
    pub const ALL: [Task; 15] = [
        Task::NaturalQa,
        Task::TriviaQa,
        Task::Mmlu,
        Task::Gsm8k,
        Task::Mbpp,
        Task::Math,
        Task::CommonsenseQa,
        Task::ArcChallenge,
        Task::OpenbookQa,
        Task::Gpqa,
        Task::AgentverseMgsm,
        Task::AgentverseLogicgrid,
        Task::Commongen,
        Task::HumanEval,
        Task::Chat,
    ];

    /// Number of task classes.
    pub const COUNT: usize = Self::ALL.len();

    /// Dense index in `0..Task::COUNT`, stable across versions (used in tables and features).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The task's name as the quality table and the wire format spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Task::NaturalQa => "natural_qa",
            Task::TriviaQa => "trivia_qa",
            Task::Mmlu => "mmlu",
            Task::Gsm8k => "gsm8k",
            Task::Mbpp => "mbpp",
            Task::Math => "math",
            Task::CommonsenseQa => "commonsense_qa",
            Task::ArcChallenge => "arc_challenge",
            Task::OpenbookQa => "openbook_qa",
            Task::Gpqa => "gpqa",
            Task::AgentverseMgsm => "agentverse-mgsm",
            Task::AgentverseLogicgrid => "agentverse-logicgrid",
            Task::Commongen => "commongen",
            Task::HumanEval => "human_eval",
            Task::Chat => "chat",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task name that is not one of [`Task::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown task `{0}` (known: natural_qa, trivia_qa, mmlu, gsm8k, mbpp, math, commonsense_qa, arc_challenge, openbook_qa, gpqa, agentverse-mgsm, agentverse-logicgrid, commongen, human_eval, chat)"
)]
pub struct UnknownTask(pub String);

impl FromStr for Task {
    type Err = UnknownTask;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Task::ALL
            .iter()
            .copied()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| UnknownTask(s.to_owned()))
    }
}

/// Latency targets per task, in seconds per output token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloTable {
    /// SLO of every task not listed in `per_task`.
    pub default_s_per_token: f64,
    /// Per-task overrides.
    #[serde(default)]
    pub per_task: BTreeMap<Task, f64>,
}

impl Default for SloTable {
    fn default() -> Self {
        Self {
            default_s_per_token: PAPER_SLO_S_PER_TOKEN,
            per_task: BTreeMap::new(),
        }
    }
}

/// An SLO that is not a positive, finite number of seconds per token.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("slo for {what} must be a positive finite number of seconds per token, got {value}")]
pub struct InvalidSlo {
    /// `default` or the task name.
    pub what: String,
    /// The offending value.
    pub value: f64,
}

impl SloTable {
    /// The SLO of `task` in seconds per output token.
    pub fn slo_s_per_token(&self, task: Task) -> f64 {
        self.per_task
            .get(&task)
            .copied()
            .unwrap_or(self.default_s_per_token)
    }

    /// Every SLO is positive and finite.
    pub fn validate(&self) -> Result<(), InvalidSlo> {
        let ok = |v: f64| v.is_finite() && v > 0.0;
        if !ok(self.default_s_per_token) {
            return Err(InvalidSlo {
                what: "default".into(),
                value: self.default_s_per_token,
            });
        }
        for (task, &value) in &self.per_task {
            if !ok(value) {
                return Err(InvalidSlo {
                    what: task.as_str().into(),
                    value,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_indices_are_dense() {
        for (i, t) in Task::ALL.iter().enumerate() {
            assert_eq!(t.index(), i);
            assert_eq!(t.as_str().parse::<Task>(), Ok(*t));
        }
        assert!("poetry".parse::<Task>().is_err());
    }

    #[test]
    fn slo_table_reads_toml_with_overrides_and_validates() {
        let t: SloTable = toml::from_str(
            "default_s_per_token = 0.1\n[per_task]\nmmlu = 0.05\n\"agentverse-mgsm\" = 0.2\n",
        )
        .unwrap();
        assert_eq!(t.slo_s_per_token(Task::Mmlu), 0.05);
        assert_eq!(t.slo_s_per_token(Task::AgentverseMgsm), 0.2);
        assert_eq!(t.slo_s_per_token(Task::Chat), 0.1);
        assert!(t.validate().is_ok());
        let bad = SloTable {
            default_s_per_token: 0.0,
            per_task: BTreeMap::new(),
        };
        assert!(bad.validate().is_err());
        assert!(
            toml::from_str::<SloTable>("default_s_per_token = 0.1\n[per_task]\npoetry = 1.0\n")
                .is_err()
        );
    }
}
