//! `qosroute emulate`: serve the experts of a catalogue as OpenAI-compatible HTTP servers driven
//! in real time by the simulator's engine (see `emulator/README.md`), until SIGINT or SIGTERM.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;
use qosroute_emulator::{EmulatedExpert, EmulatorOptions, Faults};
use qosroute_sim::{Catalogue, QualityTable};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

#[derive(Debug, Args)]
pub struct EmulateArgs {
    /// Expert catalogue (TOML), e.g. configs/experts/edge-mixed.toml.
    #[arg(long)]
    experts: PathBuf,
    /// Serve only the expert of this name.
    #[arg(long)]
    only: Option<String>,
    /// Address of the first expert; expert i listens on its port + i (port 0: any free port
    /// for each).
    #[arg(long)]
    listen: SocketAddr,
    /// Wall-clock seconds per engine second (0.1 = ten times faster than the model).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Fault: drop the connection after N tokens of every answer.
    #[arg(long)]
    fail_after_tokens: Option<u32>,
    /// Fault: answer 500 to this fraction of chat completions (0..1).
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fault: accept requests and never answer.
    #[arg(long)]
    hang: bool,
    /// Fault: wait this many seconds before the first byte of every response.
    #[arg(long, default_value_t = 0.0)]
    slow_start: f64,
    /// Fault: every expert's engine runs this many times slower (prefill and decode), from the
    /// start; `POST /admin/faults` with `{"slowdown": K}` sets it at run time, `{}` clears it.
    #[arg(long)]
    slowdown: Option<f64>,
    /// Quality table CSV for the answers' quality (default: the one shipped in data/quality/).
    #[arg(long)]
    quality: Option<PathBuf>,
    /// Seed of the error_rate draws (expert i uses seed + i).
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

pub fn run(args: &EmulateArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: &EmulateArgs) -> anyhow::Result<()> {
    let catalogue = Catalogue::load(&args.experts)?;
    let quality = Arc::new(match &args.quality {
        Some(path) => QualityTable::load(path)?,
        None => QualityTable::embedded()?,
    });
    let experts: Vec<_> = match &args.only {
        Some(name) => match catalogue.experts.iter().find(|e| &e.name == name) {
            Some(expert) => vec![expert.clone()],
            None => bail!(
                "{}: no expert named `{name}` (experts: {})",
                args.experts.display(),
                catalogue
                    .experts
                    .iter()
                    .map(|e| e.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        },
        None => catalogue.experts.clone(),
    };
    let faults = Faults {
        fail_after_tokens: args.fail_after_tokens,
        error_rate: args.error_rate,
        hang: args.hang,
        slow_start_s: args.slow_start,
        slowdown: args.slowdown,
    };
    // Before anything is announced, so that a signal sent on the ready lines is handled.
    let stop = StopSignal::install()?;
    let mut running = Vec::with_capacity(experts.len());
    for (i, profile) in experts.into_iter().enumerate() {
        let mut addr = args.listen;
        if addr.port() != 0 {
            let port = u16::try_from(usize::from(addr.port()) + i)
                .ok()
                .context("--listen: the port of an expert would be above 65535")?;
            addr.set_port(port);
        }
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("{}: cannot listen on {addr}", profile.name))?;
        let profile = Arc::new(profile);
        let mut options = EmulatorOptions::for_profile(&profile);
        options.quality = Some(quality.clone());
        options.faults = faults;
        options.time_scale = args.time_scale;
        options.seed = args.seed.wrapping_add(i as u64);
        let expert = EmulatedExpert::serve(profile.clone(), options, listener)
            .with_context(|| format!("{}: cannot start", profile.name))?;
        running.push(expert);
    }
    let mut out = std::io::stdout().lock();
    for expert in &running {
        writeln!(
            out,
            "{} {} {}",
            expert.profile().name,
            expert.model_name(),
            expert.base_url()
        )?;
    }
    out.flush()?;
    drop(out);
    let signal = stop.wait().await?;
    eprintln!("{signal}: stopping {} emulated experts", running.len());
    let mut stopping = JoinSet::new();
    for expert in running {
        stopping.spawn(expert.shutdown());
    }
    let mut result = Ok(());
    while let Some(joined) = stopping.join_next().await {
        if let Err(e) = joined.context("shutdown task").and_then(|r| Ok(r?)) {
            eprintln!("error: {e:#}");
            result = Err(e);
        }
    }
    result
}

/// SIGINT (Ctrl-C) or, on Unix, SIGTERM; handlers installed when it is made.
struct StopSignal {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignal {
    #[cfg(unix)]
    fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        })
    }

    #[cfg(not(unix))]
    fn install() -> anyhow::Result<Self> {
        Ok(Self {})
    }

    #[cfg(unix)]
    async fn wait(mut self) -> anyhow::Result<&'static str> {
        tokio::select! {
            _ = self.interrupt.recv() => Ok("SIGINT"),
            _ = self.terminate.recv() => Ok("SIGTERM"),
        }
    }

    #[cfg(not(unix))]
    async fn wait(self) -> anyhow::Result<&'static str> {
        tokio::signal::ctrl_c()
            .await
            .context("cannot handle Ctrl-C")?;
        Ok("Ctrl-C")
    }
}
