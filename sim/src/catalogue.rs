//! Expert catalogues: TOML files in `configs/experts/` naming the experts of a cluster, their
//! latency profiles, and the SLO of each task.

use std::collections::BTreeSet;
use std::path::Path;

use qosroute_core::{ExpertProfile, SloTable};
use serde::Deserialize;

use crate::error::{SimError, read_file};

/// A cluster of experts plus the latency targets of its workload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    /// Short name (e.g. `edge-mixed`).
    pub name: String,
    /// What the cluster stands for and where its numbers come from.
    #[serde(default)]
    pub description: String,
    /// SLO per task, seconds per output token.
    #[serde(default)]
    pub slo: SloTable,
    /// The experts, in decision-index order.
    #[serde(rename = "expert")]
    pub experts: Vec<ExpertProfile>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Catalogue {
    /// Reads and validates a catalogue file.
    pub fn load(path: &Path) -> Result<Self, SimError> {
        Self::parse(&read_file(path)?, &path.display().to_string())
    }

    /// Parses and validates a catalogue; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Self, SimError> {
        let catalogue: Catalogue = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            let field = e
                .span()
                .and_then(|s| text.get(s.clone()))
                .map(|s| s.lines().next().unwrap_or("").trim().to_owned())
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "toml".into());
            SimError::Parse {
                path: source.into(),
                line,
                field,
                message: e.message().trim().to_owned(),
            }
        })?;
        catalogue.validate().map_err(|message| SimError::Invalid {
            path: source.into(),
            message,
        })?;
        Ok(catalogue)
    }

    /// At least one expert, unique names, every profile and SLO usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.experts.is_empty() {
            return Err("no [[expert]] entries".into());
        }
        let mut names = BTreeSet::new();
        for expert in &self.experts {
            expert.validate().map_err(|e| e.to_string())?;
            if !names.insert(expert.name.as_str()) {
                return Err(format!("expert name `{}` appears twice", expert.name));
            }
        }
        self.slo.validate().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
[slo]
default_s_per_token = 0.05
[[expert]]
name = "a"
model = "qwen25_7b"
max_slots = 4
kv_tokens = 10000
[expert.latency]
prefill_tok_s = 1000.0
decode_t0_s = 0.02
decode_d_s_per_seq = 0.001
decode_e_s_per_ctx_token = 1e-7
"#;

    #[test]
    fn a_good_catalogue_loads() {
        let c = Catalogue::parse(GOOD, "c.toml").unwrap();
        assert_eq!(c.experts.len(), 1);
        assert_eq!(c.slo.default_s_per_token, 0.05);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let bad = GOOD.replace("max_slots = 4", "max_slots = \"four\"");
        let e = Catalogue::parse(&bad, "c.toml").unwrap_err().to_string();
        assert!(e.starts_with("c.toml:8: \"four\": invalid type"), "{e}");
        let bad = GOOD.replace("max_slots = 4", "max_slots = 4\nspeed = 3");
        let e = Catalogue::parse(&bad, "c.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("c.toml:9: speed: unknown field `speed`"),
            "{e}"
        );
        let bad = GOOD.replace("decode_t0_s = 0.02", "decode_t0_s = -1.0");
        let e = Catalogue::parse(&bad, "c.toml").unwrap_err().to_string();
        assert_eq!(
            e,
            "c.toml: expert `a`: latency.decode_t0_s must be positive and finite, got -1"
        );
        let dup = format!("{GOOD}{}", &GOOD[GOOD.find("[[expert]]").unwrap_or(0)..]);
        let e = Catalogue::parse(&dup, "c.toml").unwrap_err().to_string();
        assert_eq!(e, "c.toml: expert name `a` appears twice");
    }
}
