//! The task class of a request.

use core::fmt;
use core::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::UnknownTask;

/// The kind of work a request asks for: the 14 benchmark tasks of the quality table, plus
/// free-form `chat` (the JSON default when a device does not say).
///
/// JSON carries the name ([`Task::as_str`]); postcard carries the position in [`Task::ALL`]
/// (a varint). The names and the order are those of `qosroute_core::Task`, so the daemon maps
/// one onto the other by name. New tasks are only ever appended.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum Task {
    /// Natural Questions (open-domain QA).
    #[serde(rename = "natural_qa")]
    NaturalQa,
    /// TriviaQA.
    #[serde(rename = "trivia_qa")]
    TriviaQa,
    /// MMLU (multiple-choice knowledge).
    #[serde(rename = "mmlu")]
    Mmlu,
    /// GSM8K (grade-school maths).
    #[serde(rename = "gsm8k")]
    Gsm8k,
    /// MBPP (Python programming).
    #[serde(rename = "mbpp")]
    Mbpp,
    /// MATH (competition maths).
    #[serde(rename = "math")]
    Math,
    /// CommonsenseQA.
    #[serde(rename = "commonsense_qa")]
    CommonsenseQa,
    /// ARC-Challenge.
    #[serde(rename = "arc_challenge")]
    ArcChallenge,
    /// OpenBookQA.
    #[serde(rename = "openbook_qa")]
    OpenbookQa,
    /// GPQA.
    #[serde(rename = "gpqa")]
    Gpqa,
    /// AgentVerse multilingual grade-school maths.
    #[serde(rename = "agentverse-mgsm")]
    AgentverseMgsm,
    /// AgentVerse logic-grid puzzles.
    #[serde(rename = "agentverse-logicgrid")]
    AgentverseLogicgrid,
    /// CommonGen (constrained text generation).
    #[serde(rename = "commongen")]
    Commongen,
    /// HumanEval (Python programming).
    #[serde(rename = "human_eval")]
    HumanEval,
    /// Free-form chat (the default).
    #[default]
    #[serde(rename = "chat")]
    Chat,
}

impl Task {
    /// Every task, in wire order (the postcard index is the position here).
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

    /// The task's wire name (JSON), the same as `qosroute_core::Task::as_str`.
    pub const fn as_str(self) -> &'static str {
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

    /// The task called `name` (exact, case-sensitive wire name), if any.
    pub fn from_name(name: &str) -> Option<Task> {
        Task::ALL.iter().copied().find(|t| t.as_str() == name)
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Task {
    type Err = UnknownTask;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Task::from_name(s).ok_or(UnknownTask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_and_the_order_is_the_wire_order() {
        for (i, t) in Task::ALL.iter().enumerate() {
            assert_eq!(t.as_str().parse::<Task>(), Ok(*t));
            assert_eq!(
                *t as usize, i,
                "ALL must list the variants in declaration order"
            );
        }
        assert_eq!("poetry".parse::<Task>(), Err(UnknownTask));
        assert_eq!(
            "Chat".parse::<Task>(),
            Err(UnknownTask),
            "names are case-sensitive"
        );
        assert_eq!(Task::default(), Task::Chat);
    }

    #[test]
    fn names_match_the_core_crate() {
        // The list of core/src/task.rs, written out: the daemon maps tasks by these names.
        let core_names = [
            "natural_qa",
            "trivia_qa",
            "mmlu",
            "gsm8k",
            "mbpp",
            "math",
            "commonsense_qa",
            "arc_challenge",
            "openbook_qa",
            "gpqa",
            "agentverse-mgsm",
            "agentverse-logicgrid",
            "commongen",
            "human_eval",
            "chat",
        ];
        let ours: Vec<&str> = Task::ALL.iter().map(|t| t.as_str()).collect();
        assert_eq!(ours, core_names);
    }
}
