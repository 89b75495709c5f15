//! `qosrouted`: the edge gateway daemon. Devices publish prompts over MQTT; the daemon picks an
//! expert with the learned router and streams the answer back.
//!
//!     qosrouted --config /etc/qosroute/qosrouted.toml
//!     qosrouted --check-config /etc/qosroute/qosrouted.toml

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use qosroute_daemon::config::Config;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "qosroute edge gateway: MQTT in, learned routing, OpenAI-compatible experts out"
)]
struct Args {
    /// The configuration file to run with.
    #[arg(long, short, required_unless_present = "check_config")]
    config: Option<PathBuf>,
    /// Validate this configuration file, print every problem with its key, and exit.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Worker threads of the async runtime.
    #[arg(long, default_value_t = 2)]
    threads: usize,
}

#[allow(clippy::print_stdout)] // --check-config reports on stdout, like every config checker
fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.check_config {
        return match Config::load(path) {
            Ok(config) => {
                println!(
                    "{}: OK ({} experts, site `{}`)",
                    path.display(),
                    config.experts.len(),
                    config.site
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        };
    }
    let Some(path) = args.config else {
        eprintln!("--config FILE is required");
        return ExitCode::from(2);
    };
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    qosroute_daemon::logging::init(&config.logging);
    // TLS to the broker and to https experts uses rustls with the ring provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(qosroute_daemon::daemon::run(path, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "qosrouted stopped");
            ExitCode::FAILURE
        }
    }
}
