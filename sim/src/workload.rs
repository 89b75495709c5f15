//! Workloads: when requests arrive and what they are.
//!
//! Specs (also the CLI's `--workload`):
//! - `poisson:rate=R[,n=N]`: Poisson arrivals at `R` requests/s (default `n` = 2000).
//! - `bursty:low=R1,high=R2[,dwell=S][,n=N]`: a two-state Markov-modulated Poisson process:
//!   the rate switches between `R1` and `R2`, staying in each state for an exponential time of
//!   mean `S` seconds (default 30), starting low.
//! - `trace:PATH[,speed=X][,n=N][,offset=S]`: replay of an Azure-format CSV from `S` seconds
//!   into the trace, arrivals compressed by `X` (2 = twice the load).
//!
//! Request content. Every request takes its task and per-model answer quality from a row of
//! the quality table's workload half drawn uniformly at random (seeded). Poisson and bursty
//! requests also take that row's prompt length, and an output length drawn uniformly from
//! the `GeneratedTokens` of the Azure conversation trace (the quality table has no output
//! lengths). Trace requests keep the trace's prompt and output lengths. Arrivals, rows and
//! output lengths come from three independent streams of the seed.

use std::path::Path;

use qosroute_core::{SimRng, Task};

use crate::error::SimError;
use crate::quality::QualityTable;
use crate::trace::{TraceRow, embedded_conv_trace, load_azure_trace};

/// A parsed workload spec.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkloadSpec {
    /// Poisson arrivals.
    Poisson {
        /// Requests per second.
        rate: f64,
        /// Number of requests.
        n: usize,
    },
    /// Markov-modulated Poisson arrivals switching between two rates.
    Bursty {
        /// Rate in the low state.
        low: f64,
        /// Rate in the high state.
        high: f64,
        /// Mean time in a state, seconds.
        dwell_s: f64,
        /// Number of requests.
        n: usize,
    },
    /// Replay of an Azure-format trace.
    Trace {
        /// CSV file.
        path: String,
        /// Time compression factor.
        speed: f64,
        /// At most this many requests.
        n: Option<usize>,
        /// Start this many seconds into the trace.
        offset_s: f64,
    },
}

/// One generated request with its hidden truth (the simulator's, never a policy's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkloadRequest {
    /// Arrival time, seconds.
    pub arrival_s: f64,
    /// Task class.
    pub task: Task,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// True output tokens.
    pub output_tokens: u32,
    /// Row of the quality table holding the true quality per model.
    pub quality_row: usize,
}

/// A generated workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// The spec it came from.
    pub spec: String,
    /// Requests in arrival order.
    pub requests: Vec<WorkloadRequest>,
}

fn spec_error(spec: &str, message: impl Into<String>) -> SimError {
    SimError::Workload {
        spec: spec.to_owned(),
        message: message.into(),
    }
}

struct Params<'a> {
    spec: &'a str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Params<'a> {
    fn take<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, SimError> {
        let Some(i) = self.pairs.iter().position(|(k, _)| *k == key) else {
            return Ok(None);
        };
        let (_, v) = self.pairs.remove(i);
        v.parse::<T>()
            .map(Some)
            .map_err(|_| spec_error(self.spec, format!("{key}: `{v}` is not a valid value")))
    }

    fn positive(&mut self, key: &str, default: Option<f64>) -> Result<f64, SimError> {
        let v = self.take::<f64>(key)?.or(default);
        match v {
            Some(v) if v.is_finite() && v > 0.0 => Ok(v),
            Some(v) => Err(spec_error(
                self.spec,
                format!("{key} must be positive, got {v}"),
            )),
            None => Err(spec_error(self.spec, format!("missing {key}=..."))),
        }
    }

    fn count(&mut self, key: &str) -> Result<Option<usize>, SimError> {
        match self.take::<usize>(key)? {
            Some(0) => Err(spec_error(self.spec, format!("{key} must be at least 1"))),
            v => Ok(v),
        }
    }

    fn finish(self) -> Result<(), SimError> {
        match self.pairs.first() {
            Some((k, _)) => Err(spec_error(self.spec, format!("unknown parameter `{k}`"))),
            None => Ok(()),
        }
    }
}

const DEFAULT_N: usize = 2000;

impl WorkloadSpec {
    /// Parses a spec string (see the module docs).
    pub fn parse(spec: &str) -> Result<Self, SimError> {
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| spec_error(spec, "expected KIND:PARAMS (poisson:, bursty:, trace:)"))?;
        let mut parts: Vec<&str> = rest.split(',').filter(|p| !p.is_empty()).collect();
        let path = if kind == "trace" {
            if parts.is_empty() || parts[0].contains('=') {
                return Err(spec_error(
                    spec,
                    "expected trace:PATH[,speed=X][,n=N][,offset=S]",
                ));
            }
            Some(parts.remove(0))
        } else {
            None
        };
        let mut pairs = Vec::new();
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| spec_error(spec, format!("`{p}` is not KEY=VALUE")))?;
            pairs.push((k.trim(), v.trim()));
        }
        let mut params = Params { spec, pairs };
        let parsed = match (kind, path) {
            ("poisson", _) => WorkloadSpec::Poisson {
                rate: params.positive("rate", None)?,
                n: params.count("n")?.unwrap_or(DEFAULT_N),
            },
            ("bursty", _) => {
                let low = params.positive("low", None)?;
                let high = params.positive("high", None)?;
                WorkloadSpec::Bursty {
                    low,
                    high,
                    dwell_s: params.positive("dwell", Some(30.0))?,
                    n: params.count("n")?.unwrap_or(DEFAULT_N),
                }
            }
            ("trace", Some(path)) => {
                let offset_s = params.take::<f64>("offset")?.unwrap_or(0.0);
                if !(offset_s.is_finite() && offset_s >= 0.0) {
                    return Err(spec_error(
                        spec,
                        "offset must be a non-negative number of seconds",
                    ));
                }
                WorkloadSpec::Trace {
                    path: path.to_owned(),
                    speed: params.positive("speed", Some(1.0))?,
                    n: params.count("n")?,
                    offset_s,
                }
            }
            (other, _) => {
                return Err(spec_error(
                    spec,
                    format!("unknown kind `{other}` (poisson, bursty, trace)"),
                ));
            }
        };
        params.finish()?;
        Ok(parsed)
    }
}

/// The spec with `key` set to `value` (replacing it, or appending it), for load sweeps.
pub fn with_param(spec: &str, key: &str, value: &str) -> String {
    let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
    let mut parts: Vec<String> = rest
        .split(',')
        .filter(|p| !p.is_empty() && p.split_once('=').is_none_or(|(k, _)| k.trim() != key))
        .map(str::to_owned)
        .collect();
    parts.push(format!("{key}={value}"));
    format!("{kind}:{}", parts.join(","))
}

/// Output lengths of the Azure conversation trace: the distribution synthetic requests draw
/// from.
pub fn conv_output_lengths() -> Result<Vec<u32>, SimError> {
    Ok(embedded_conv_trace()?
        .iter()
        .map(|r| r.output_tokens)
        .collect())
}

/// Everything a workload draws from, already loaded.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadSources<'a> {
    /// The quality table (requests draw rows of its workload half).
    pub quality: &'a QualityTable,
    /// Output lengths synthetic requests draw from.
    pub output_lengths: &'a [u32],
    /// Trace rows for `trace:` specs (their path is not read when this is given).
    pub trace: Option<&'a [TraceRow]>,
}

/// Generates the workload of `spec` against `quality`, seeded by `seed`, loading the trace
/// file of a `trace:` spec.
pub fn generate(spec: &str, quality: &QualityTable, seed: u64) -> Result<Workload, SimError> {
    let parsed = WorkloadSpec::parse(spec)?;
    let trace_rows = match &parsed {
        WorkloadSpec::Trace { path, .. } => Some(load_azure_trace(Path::new(path))?),
        _ => None,
    };
    let output_lengths = match &parsed {
        WorkloadSpec::Trace { .. } => Vec::new(),
        _ => conv_output_lengths()?,
    };
    let sources = WorkloadSources {
        quality,
        output_lengths: &output_lengths,
        trace: trace_rows.as_deref(),
    };
    Ok(Workload {
        spec: spec.to_owned(),
        requests: synthesize(spec, &parsed, sources, seed)?,
    })
}

/// The requests of a parsed spec drawn from loaded sources (`spec` names it in errors).
pub fn synthesize(
    spec: &str,
    parsed: &WorkloadSpec,
    sources: WorkloadSources<'_>,
    seed: u64,
) -> Result<Vec<WorkloadRequest>, SimError> {
    let quality = sources.quality;
    let pool: Vec<usize> = (0..quality.rows.len())
        .filter(|&i| !quality.rows[i].is_calibration())
        .collect();
    let mut arrivals = SimRng::derive(seed, 1);
    let mut rows = SimRng::derive(seed, 2);
    let mut outputs = SimRng::derive(seed, 3);
    let mut draw_row = || pool[rows.below(pool.len() as u64) as usize];
    let lengths = sources.output_lengths;
    let mut synthetic = |times: Vec<f64>, draw_row: &mut dyn FnMut() -> usize| {
        if lengths.is_empty() {
            return Err(spec_error(spec, "no output lengths to draw from"));
        }
        Ok(times
            .into_iter()
            .map(|arrival_s| {
                let row = draw_row();
                WorkloadRequest {
                    arrival_s,
                    task: quality.rows[row].task,
                    prompt_tokens: quality.rows[row].prompt_tokens,
                    output_tokens: lengths[outputs.below(lengths.len() as u64) as usize],
                    quality_row: row,
                }
            })
            .collect::<Vec<_>>())
    };
    Ok(match *parsed {
        WorkloadSpec::Poisson { rate, n } => {
            let mut t = 0.0;
            let times = (0..n)
                .map(|_| {
                    t += arrivals.exponential(rate);
                    t
                })
                .collect();
            synthetic(times, &mut draw_row)?
        }
        WorkloadSpec::Bursty {
            low,
            high,
            dwell_s,
            n,
        } => {
            let mut t = 0.0;
            let mut high_state = false;
            let mut state_end = arrivals.exponential(1.0 / dwell_s);
            let mut times = Vec::with_capacity(n);
            while times.len() < n {
                let rate = if high_state { high } else { low };
                let next = t + arrivals.exponential(rate);
                if next < state_end {
                    t = next;
                    times.push(t);
                } else {
                    // Memoryless: restart the clock at the switch.
                    t = state_end;
                    high_state = !high_state;
                    state_end = t + arrivals.exponential(1.0 / dwell_s);
                }
            }
            synthetic(times, &mut draw_row)?
        }
        WorkloadSpec::Trace {
            speed, n, offset_s, ..
        } => {
            let trace = sources
                .trace
                .ok_or_else(|| spec_error(spec, "no trace rows loaded"))?;
            let selected: Vec<&TraceRow> = trace
                .iter()
                .filter(|r| r.arrival_s >= offset_s)
                .take(n.unwrap_or(usize::MAX))
                .collect();
            if selected.is_empty() {
                return Err(spec_error(
                    spec,
                    format!("no requests at or after offset {offset_s} s"),
                ));
            }
            selected
                .into_iter()
                .map(|r| {
                    let row = draw_row();
                    WorkloadRequest {
                        arrival_s: (r.arrival_s - offset_s) / speed,
                        task: quality.rows[row].task,
                        prompt_tokens: r.prompt_tokens,
                        output_tokens: r.output_tokens,
                        quality_row: row,
                    }
                })
                .collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_defaults_and_reject_nonsense() {
        assert_eq!(
            WorkloadSpec::parse("poisson:rate=2.5").unwrap(),
            WorkloadSpec::Poisson { rate: 2.5, n: 2000 }
        );
        assert_eq!(
            WorkloadSpec::parse("trace:data/x.csv,speed=2,n=10").unwrap(),
            WorkloadSpec::Trace {
                path: "data/x.csv".into(),
                speed: 2.0,
                n: Some(10),
                offset_s: 0.0
            }
        );
        assert!(matches!(
            WorkloadSpec::parse("bursty:low=1,high=5").unwrap(),
            WorkloadSpec::Bursty { dwell_s: 30.0, .. }
        ));
        for (bad, why) in [
            ("poisson", "expected KIND:PARAMS"),
            ("poisson:rate=0", "rate must be positive"),
            ("poisson:rate=abc", "rate: `abc` is not a valid value"),
            ("poisson:rate=1,m=3", "unknown parameter `m`"),
            ("poisson:n=3", "missing rate=..."),
            ("poisson:rate=1,n=0", "n must be at least 1"),
            ("trace:speed=2", "expected trace:PATH"),
            ("gamma:rate=1", "unknown kind `gamma`"),
        ] {
            let e = WorkloadSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn with_param_replaces_or_appends() {
        assert_eq!(
            with_param("poisson:rate=1,n=5", "rate", "4"),
            "poisson:n=5,rate=4"
        );
        assert_eq!(
            with_param("trace:a.csv", "speed", "2"),
            "trace:a.csv,speed=2"
        );
    }

    #[test]
    fn poisson_rate_and_bursty_switching_show_in_arrivals() {
        let q = QualityTable::embedded().unwrap();
        let w = generate("poisson:rate=4,n=4000", &q, 1).unwrap();
        let span = w.requests.last().unwrap().arrival_s;
        assert!(
            (span / 4000.0 - 0.25).abs() < 0.02,
            "mean gap {}",
            span / 4000.0
        );
        assert!(
            w.requests
                .iter()
                .all(|r| !q.rows[r.quality_row].is_calibration())
        );
        assert_eq!(w, generate("poisson:rate=4,n=4000", &q, 1).unwrap());
        assert_ne!(w, generate("poisson:rate=4,n=4000", &q, 2).unwrap());
        // Bursty: gaps in 10 s windows vary far more than Poisson at the mean rate would.
        let b = generate("bursty:low=1,high=20,dwell=20,n=6000", &q, 3).unwrap();
        let end = b.requests.last().unwrap().arrival_s;
        let mut counts = vec![0u32; (end / 10.0) as usize + 1];
        for r in &b.requests {
            counts[(r.arrival_s / 10.0) as usize] += 1;
        }
        let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*lo < 30 && *hi > 150, "windows {lo}..{hi}");
    }
}
