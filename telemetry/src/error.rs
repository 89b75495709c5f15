//! Errors of the telemetry providers and of the `tegrastats` parser.

use std::path::PathBuf;
use std::time::Duration;

/// Why a provider could not be set up or could not produce a sample.
///
/// None of these is fatal to the daemon: a provider that fails is skipped at detection, and a
/// sample that fails makes that provider's values unknown (`None`) for that round.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A file could not be read (missing, permission denied, I/O error).
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// sysinfo does not support this platform.
    #[error("sysinfo does not support this platform")]
    SysinfoUnsupported,
    /// NVML could not be loaded or queried (no `libnvidia-ml.so`, no driver, no permission).
    #[error("NVML: {0}")]
    Nvml(#[from] nvml_wrapper::error::NvmlError),
    /// A `tegrastats` line could not be parsed.
    #[error("tegrastats: {0}")]
    Tegrastats(#[from] TegrastatsError),
    /// The `tegrastats` process could not be started.
    #[error("starting {program}: {source}")]
    Spawn {
        /// The program.
        program: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The `tegrastats` process has not printed a line yet.
    #[error("tegrastats has not reported yet")]
    NoDataYet,
    /// The last `tegrastats` line is too old to be trusted (the process stalled or died).
    #[error("tegrastats output is stale ({age:?} old)")]
    Stale {
        /// Age of the last line.
        age: Duration,
    },
    /// The `tegrastats` process exited.
    #[error("tegrastats exited")]
    Exited,
    /// A file or a program's output did not have the expected form (e.g. the Raspberry Pi
    /// throttling flags).
    #[error("{path}: unexpected contents {excerpt:?}")]
    Unparsable {
        /// The file or program.
        path: PathBuf,
        /// The start of what was read (at most 64 characters).
        excerpt: String,
    },
}

/// Why one `tegrastats` line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TegrastatsError {
    /// The line is empty or blank.
    #[error("empty line")]
    Empty,
    /// The line is longer than any real `tegrastats` line.
    #[error("line of {len} bytes is too long")]
    TooLong {
        /// Length in bytes.
        len: usize,
    },
    /// No known field (RAM, CPU, GR3D_FREQ, temperatures) was found.
    #[error("no tegrastats field recognised in {excerpt:?}")]
    Unrecognised {
        /// The start of the line (at most 64 characters).
        excerpt: String,
    },
}
