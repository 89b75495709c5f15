//! `qosroute`: the workstation tool. Simulate one routing policy, or compare several; run the
//! whole system as a demo.

mod bench;
mod compare;
mod demo;
mod emulate;
mod interference;
mod plot;
mod profile;
mod real_site;
mod report;
mod stats;
mod table;
mod top;
mod train;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use qosroute_sim::{Catalogue, QualityTable};

/// Route LLM requests to edge experts: simulate and compare routing policies.
#[derive(Debug, Parser)]
#[command(name = "qosroute", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one policy on one workload and print its metrics.
    Sim(SimArgs),
    /// Run several policies over several seeds (optionally a load sweep) and compare them.
    Compare(compare::CompareArgs),
    /// Train the learned router (PyTorch, against this simulator) and export it to ONNX.
    Train(train::TrainArgs),
    /// The whole system on this machine in about a minute: a broker, the emulated edge-mixed
    /// experts, the real qosrouted and a swarm of devices replaying the Azure conversation
    /// trace; a live view, then a table, JSON and plots.
    Demo(demo::DemoArgs),
    /// Serve the experts of a catalogue as OpenAI-compatible servers driven by the simulator's
    /// engine in real time, until SIGINT or SIGTERM.
    Emulate(emulate::EmulateArgs),
    /// Benchmarks of the real system on this machine (`bench e2e`: broker round trip, the
    /// daemon's added latency with zero-latency experts, routed requests/s at saturation, RSS).
    Bench(bench::BenchArgs),
    /// Measure a running OpenAI-compatible server (TTFT and inter-token times over prompt
    /// lengths and concurrency levels), fit its latency model and write it as a catalogue
    /// profile, with the fit's error and the raw measurements beside it.
    Profile(profile::ProfileArgs),
    /// The impact estimator against a real batching server: requests decode, a new one joins;
    /// the running ones' measured added time against `core::impact`'s prediction from the
    /// server's fitted profile (JSON and a scatter plot).
    Interference(interference::InterferenceArgs),
    /// The simulator against reality: replay a trace slice through qosrouted against real
    /// servers and in the simulator with their fitted profiles (`qosroute profile`); compare
    /// per-token latency, TTFT and SLO violations side by side, with plots.
    Validate(validate::ValidateArgs),
    /// A live terminal view of a running gateway from its metrics endpoint: decisions per
    /// second, outcomes, QoS, SLO misses and each expert's load (`--once`: one frame).
    Top(top::TopArgs),
    /// Every published number from one list (docs/results/experiments.toml): run the
    /// experiments and keep their JSON, redraw the tables from it, check that the committed
    /// tables match, or run each fast experiment's reduced form.
    Report(report::ReportArgs),
}

/// Inputs every simulation needs.
#[derive(Debug, Args)]
struct Inputs {
    /// Expert catalogue (TOML), e.g. configs/experts/edge-mixed.toml.
    #[arg(long)]
    experts: PathBuf,
    /// Workload: poisson:rate=R[,n=N] | bursty:low=R1,high=R2[,dwell=S][,n=N] |
    /// trace:PATH[,speed=X][,n=N][,offset=S].
    #[arg(long)]
    workload: String,
    /// Quality table CSV (default: the one shipped in data/quality/).
    #[arg(long)]
    quality: Option<PathBuf>,
}

impl Inputs {
    fn load(&self) -> anyhow::Result<(Catalogue, QualityTable)> {
        let catalogue = Catalogue::load(&self.experts)?;
        let quality = match &self.quality {
            Some(path) => QualityTable::load(path)?,
            None => QualityTable::embedded()?,
        };
        Ok((catalogue, quality))
    }
}

#[derive(Debug, Args)]
struct SimArgs {
    #[command(flatten)]
    inputs: Inputs,
    /// Routing policy: a baseline (see `compare --policies`) or `han:PATH.onnx`.
    #[arg(long, default_value = "qos-greedy")]
    policy: String,
    /// Seed of the workload and of randomised policies.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the full run report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn run_sim(args: &SimArgs) -> anyhow::Result<()> {
    let (catalogue, quality) = args.inputs.load()?;
    let workload = qosroute_sim::generate(&args.inputs.workload, &quality, args.seed)?;
    let mut policy = compare::make_policy(&args.policy, args.seed)?;
    let progress = compare::spinner(&format!("simulating {}", args.policy));
    let report = qosroute_sim::Simulation::new(&catalogue, &quality, &workload, args.seed)?
        .run(&mut policy)?;
    progress.finish_and_clear();
    table::print_run(&report);
    if let Some(path) = &args.json {
        write_output(path, serde_json::to_string_pretty(&report)? + "\n")?;
    }
    Ok(())
}

/// Creates the parent folder if needed; the path is named in the error.
fn prepare_output(path: &std::path::Path) -> anyhow::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create folder", dir.display())),
        _ => Ok(()),
    }
}

/// Writes an output file (creating its folder) and says so on stderr.
fn write_output(path: &std::path::Path, contents: String) -> anyhow::Result<()> {
    prepare_output(path)?;
    std::fs::write(path, contents).with_context(|| format!("{}: cannot write", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Sim(args) => run_sim(args),
        Command::Compare(args) => compare::run(args),
        Command::Train(args) => train::run(args),
        Command::Emulate(args) => emulate::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Profile(args) => profile::run(args),
        Command::Interference(args) => interference::run(args),
        Command::Validate(args) => validate::run(args),
        Command::Top(args) => top::run(args),
        Command::Report(args) => report::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
