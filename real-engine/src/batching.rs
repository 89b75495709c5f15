//! The continuous-batching engine: llama.cpp's own `llama-server`, built by
//! `scripts/llama-server.sh install` from the llama.cpp source the llama-cpp-python sdist
//! carries, serving the same SmolLM2-135M GGUF. Unlike llama-cpp-python's server it decodes
//! every busy slot in one batch (`--parallel N`), and reports its load on `/metrics` and
//! `/slots`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{EngineError, LlamaServer, SERVED_MODEL, cache_dir, free_port, on_path};

/// Environment variable naming the folder `scripts/llama-server.sh` builds into.
pub const BATCHING_DIR_VAR: &str = "QOSROUTE_LLAMA_SERVER_DIR";
/// The command that builds the batching engine.
pub const BATCHING_INSTALL_COMMAND: &str = "bash scripts/llama-server.sh install";

/// A built `llama-server` and its model.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchingEngine {
    /// The folder it was built into.
    pub dir: PathBuf,
    /// `bin/llama-server`.
    pub binary: PathBuf,
    /// `model.gguf` (SmolLM2-135M-Instruct).
    pub model: PathBuf,
}

impl BatchingEngine {
    /// `$QOSROUTE_LLAMA_SERVER_DIR`, else `$HOME/.cache/qosroute-llama-server`.
    pub fn default_dir() -> PathBuf {
        cache_dir(BATCHING_DIR_VAR, "qosroute-llama-server")
    }

    /// The engine in [`BatchingEngine::default_dir`].
    pub fn find() -> Result<Self, EngineError> {
        Self::find_in(&Self::default_dir())
    }

    /// The engine built into `dir`: an executable `bin/llama-server` that answers `--version`,
    /// and a non-empty `model.gguf`.
    pub fn find_in(dir: &Path) -> Result<Self, EngineError> {
        let not_built = |reason: String| EngineError::NotBuilt {
            dir: dir.to_path_buf(),
            reason,
        };
        let binary = dir.join("bin").join("llama-server");
        let model = dir.join("model.gguf");
        if !binary.is_file() {
            return Err(not_built(format!("no {}", binary.display())));
        }
        if std::fs::metadata(&model).map_or(true, |m| m.len() == 0) {
            return Err(not_built(format!("no {}", model.display())));
        }
        let runs = Command::new(&binary)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !runs {
            return Err(not_built(format!(
                "{} does not run (built on another CPU?)",
                binary.display()
            )));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            binary,
            model,
        })
    }
}

/// How a batching server runs. Slots and threads make two servers of one model different
/// experts.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchingOptions {
    /// Requests decoded together at most (`--parallel`).
    pub slots: u32,
    /// Threads for decoding and for prompt processing.
    pub threads: u32,
    /// Context of each slot, tokens (the server's `-c` is this times `slots`).
    pub ctx_tokens_per_slot: u32,
    /// Prompt tokens processed per batch (`-b`).
    pub batch_tokens: u32,
    /// Pin the server to these CPUs (a `taskset -c` list, when `taskset` exists).
    pub cpus: Option<String>,
    /// The port; 0 picks a free one.
    pub port: u16,
}

impl BatchingOptions {
    /// `slots` slots and `threads` threads, 2,048 tokens of context per slot, batches of 512,
    /// not pinned, a free port.
    pub fn new(slots: u32, threads: u32) -> Self {
        Self {
            slots,
            threads,
            ctx_tokens_per_slot: 2048,
            batch_tokens: 512,
            cpus: None,
            port: 0,
        }
    }

    /// The two configurations the checks compare, each on one thread pinned to its own core
    /// (this is a 2-core machine: a 2-thread server beside a 1-thread one would measure the
    /// contention between them): 4 slots on CPU 0, and 2 slots with prompt batches of 64
    /// tokens (slower prefill) on CPU 1.
    pub fn configurations() -> [(&'static str, Self); 2] {
        [
            (
                "llama-4slot",
                Self {
                    cpus: Some("0".into()),
                    ..Self::new(4, 1)
                },
            ),
            (
                "llama-2slot",
                Self {
                    cpus: Some("1".into()),
                    batch_tokens: 64,
                    ..Self::new(2, 1)
                },
            ),
        ]
    }

    /// The server's arguments for `model` (everything but the binary).
    pub fn args(&self, model: &Path, port: u16) -> Vec<String> {
        let threads = self.threads.max(1).to_string();
        let slots = self.slots.max(1);
        vec![
            "--model".into(),
            model.display().to_string(),
            "--alias".into(),
            SERVED_MODEL.into(),
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--threads".into(),
            threads.clone(),
            "--threads-batch".into(),
            threads,
            "--parallel".into(),
            slots.to_string(),
            "--ctx-size".into(),
            (u64::from(self.ctx_tokens_per_slot) * u64::from(slots)).to_string(),
            "--batch-size".into(),
            self.batch_tokens.to_string(),
            // Load on /metrics (requests processing and deferred) and busy slots on /slots.
            "--metrics".into(),
            "--slots".into(),
            "--no-webui".into(),
            // No prompt cache: the simulator's latency model has none, and reusing the chat
            // template's KV across requests made the prefill fit's overhead negative.
            "--no-cache-prompt".into(),
        ]
    }
}

impl LlamaServer {
    /// Starts a batching `llama-server` with `options`, its output in `log` (created or
    /// truncated). Returns at once: [`LlamaServer::wait_ready`] waits until it serves.
    pub fn start_batching(
        engine: &BatchingEngine,
        options: &BatchingOptions,
        log: &Path,
    ) -> Result<Self, EngineError> {
        let spawn_error = |what: &str, source| EngineError::Spawn {
            what: what.to_owned(),
            source,
        };
        let port = if options.port == 0 {
            free_port().map_err(|e| spawn_error("llama-server (no free port)", e))?
        } else {
            options.port
        };
        let args = options.args(&engine.model, port);
        let mut command = match options.cpus.as_deref().filter(|_| on_path("taskset")) {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpus).arg(&engine.binary);
                c
            }
            None => Command::new(&engine.binary),
        };
        command.args(&args);
        Self::spawn(command, port, log, "llama-server")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_missing_build_says_how_to_build() {
        let dir = std::env::temp_dir().join("qosroute-no-such-llama-server");
        let text = BatchingEngine::find_in(&dir).unwrap_err().to_string();
        assert!(text.contains(BATCHING_INSTALL_COMMAND), "{text}");
        assert!(text.contains(BATCHING_DIR_VAR), "{text}");
        assert!(text.contains("bin/llama-server"), "{text}");
    }

    #[test]
    fn the_server_gets_slots_times_the_context_and_reports_its_load() {
        let args = BatchingOptions::new(4, 2).args(Path::new("/m.gguf"), 8080);
        let value = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(value("--parallel"), "4");
        assert_eq!(value("--ctx-size"), "8192");
        assert_eq!(value("--threads"), "2");
        assert_eq!(value("--threads-batch"), "2");
        assert_eq!(value("--alias"), SERVED_MODEL);
        assert!(args.iter().any(|a| a == "--metrics"));
        assert!(args.iter().any(|a| a == "--slots"));
        assert!(args.iter().any(|a| a == "--no-cache-prompt"));
        let [(_, four), (_, two)] = BatchingOptions::configurations();
        assert_ne!(
            (four.slots, four.batch_tokens),
            (two.slots, two.batch_tokens)
        );
        assert_ne!(four.cpus, two.cpus, "one core each");
    }
}
