//! Errors of the simulator: every one names the file (or spec), and where it can the line
//! and field.

/// What went wrong loading inputs or running a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A file could not be read.
    #[error("{path}: cannot read")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A row or key of an input file is malformed.
    #[error("{path}:{line}: {field}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The column or key.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// An input file is well-formed but unusable.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A workload spec is malformed.
    #[error("workload `{spec}`: {message}")]
    Workload {
        /// The spec as given.
        spec: String,
        /// What is wrong.
        message: String,
    },
    /// The simulation was driven out of order.
    #[error("simulation: {0}")]
    Protocol(&'static str),
}

pub(crate) fn read_file(path: &std::path::Path) -> Result<String, SimError> {
    std::fs::read_to_string(path).map_err(|source| SimError::Io {
        path: path.display().to_string(),
        source,
    })
}
