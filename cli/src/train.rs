//! `qosroute train`: runs the trainer of `policy-model/` (Python + PyTorch, driving the Rust
//! simulator through its extension) from the repository root, streaming its progress.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::Args;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TOML file of hyper-parameters (keys as in `policy-model/qosroute_policy/train.py` Args).
    #[arg(long)]
    config: Option<PathBuf>,
    /// PPO fine-tuning steps after the DAgger iterations (overrides the config).
    #[arg(long)]
    steps: Option<u64>,
    /// Output folder for the model, golden cases and report.
    #[arg(long, default_value = "policy-model/models/han")]
    out: PathBuf,
    /// Seed (overrides the config).
    #[arg(long)]
    seed: Option<u64>,
    /// Python interpreter with the requirements and the extension installed (default: the
    /// venv `scripts/python-env.sh` prepares).
    #[arg(long, env = "QOSROUTE_PYTHON")]
    python: Option<PathBuf>,
    /// Further trainer flags, after `--` (e.g. `-- --arch mlp --impact-penalty false`).
    #[arg(last = true)]
    extra: Vec<String>,
}

fn default_python() -> PathBuf {
    let venv = std::env::var_os("QOSROUTE_VENV")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/qosroute-venv"))
        });
    match venv.map(|v| v.join("bin/python")) {
        Some(p) if p.exists() => p,
        _ => PathBuf::from("python3"),
    }
}

pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    if !Path::new("policy-model/qosroute_policy/train.py").exists() {
        bail!("run `qosroute train` from the repository root (policy-model/ not found here)");
    }
    let python = args.python.clone().unwrap_or_else(default_python);
    let check = Command::new(&python)
        .args(["-c", "import torch, qosroute_simenv"])
        .env("PYTHONPATH", "policy-model")
        .output()
        .with_context(|| format!("{}: cannot run", python.display()))?;
    if !check.status.success() {
        bail!(
            "{} lacks torch or the simulator extension: run `bash scripts/python-env.sh` first",
            python.display()
        );
    }
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "qosroute_policy.train", "--out"])
        .arg(&args.out)
        .env("PYTHONPATH", "policy-model")
        .env("OMP_NUM_THREADS", "1");
    if let Some(config) = &args.config {
        cmd.arg("--config").arg(config);
    }
    if let Some(steps) = args.steps {
        cmd.args(["--total-steps", &steps.to_string()]);
    }
    if let Some(seed) = args.seed {
        cmd.args(["--seed", &seed.to_string()]);
    }
    cmd.args(&args.extra);
    let status = cmd
        .status()
        .with_context(|| format!("{}: cannot run", python.display()))?;
    if !status.success() {
        bail!("training failed ({status})");
    }
    Ok(())
}
