//! What a scenario reports: figures and checks.

use std::fmt::{self, Display, Write as _};

use qosroute_swarm::SwarmSummary;
use serde::Serialize;

use crate::Scale;

/// One measured figure.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figure {
    /// What it is (`requests`, `e2e p99 ms`, ...).
    pub name: String,
    /// Its value, formatted.
    pub value: String,
}

/// One check: what must hold, whether it did, and what was measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// What must hold.
    pub what: String,
    /// Whether it held.
    pub passed: bool,
    /// The values behind the verdict.
    pub detail: String,
}

/// The result of one scenario run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario number.
    pub number: u8,
    /// Scenario name.
    pub name: &'static str,
    /// The scale it ran at.
    pub scale: Scale,
    /// Wall-clock seconds of the whole scenario (setup included).
    pub wall_s: f64,
    /// Figures, in order.
    pub figures: Vec<Figure>,
    /// Checks, in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// An empty report.
    pub fn new(number: u8, name: &'static str, scale: Scale) -> Self {
        Self {
            number,
            name,
            scale,
            wall_s: 0.0,
            figures: Vec::new(),
            checks: Vec::new(),
        }
    }

    /// Whether every check held (and there was at least one).
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.passed)
    }

    /// The checks that failed.
    pub fn failures(&self) -> Vec<&Check> {
        self.checks.iter().filter(|c| !c.passed).collect()
    }

    /// Records a figure.
    pub fn figure(&mut self, name: impl Into<String>, value: impl Display) {
        self.figures.push(Figure {
            name: name.into(),
            value: value.to_string(),
        });
    }

    /// Records a check.
    pub fn check(&mut self, what: impl Into<String>, passed: bool, detail: impl Display) {
        self.checks.push(Check {
            what: what.into(),
            passed,
            detail: detail.to_string(),
        });
    }

    /// The value of a figure, by name.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value.as_str())
    }

    /// Checks that the daemon's peak resident memory stayed within `bound_kib` of its level at
    /// the start (all in KiB).
    pub fn check_memory_bounded(&mut self, start_kib: u64, peak_kib: u64, bound_kib: u64) {
        self.check(
            "daemon memory bounded",
            peak_kib <= start_kib + bound_kib,
            format!(
                "peak VmRSS {} <= {} at start + {}",
                mib(peak_kib),
                mib(start_kib),
                mib(bound_kib)
            ),
        );
    }

    /// The usual figures of a swarm run, prefixed with `prefix` (empty for the main run).
    pub fn swarm_figures(&mut self, prefix: &str, s: &SwarmSummary) {
        let p = |n: &str| {
            if prefix.is_empty() {
                n.to_owned()
            } else {
                format!("{prefix} {n}")
            }
        };
        self.figure(p("requests"), s.requests);
        self.figure(p("published"), s.published);
        self.figure(p("completed"), s.completed);
        let errors = if s.errors_by_code.is_empty() {
            "0".to_owned()
        } else {
            let by: Vec<String> = s
                .errors_by_code
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect();
            format!("{} ({})", s.errors, by.join(", "))
        };
        self.figure(p("errors"), errors);
        self.figure(p("lost"), s.lost);
        self.figure(p("duplicated"), s.duplicated);
        self.figure(
            p("redelivered copies of a final (same message)"),
            s.redelivered_ends,
        );
        self.figure(p("not sent"), s.not_sent);
        self.figure(p("offered req/s"), format!("{:.1}", s.requests_per_s));
        self.figure(p("completed req/s"), format!("{:.1}", s.completed_per_s));
        self.figure(
            p("e2e p50/p99 ms"),
            format!("{} / {}", ms(s.e2e_s.p50), ms(s.e2e_s.p99)),
        );
        self.figure(
            p("ttft p50/p99 ms"),
            format!("{} / {}", ms(s.ttft_s.p50), ms(s.ttft_s.p99)),
        );
        self.figure(
            p("per-token p50/p99 ms"),
            format!(
                "{:.2} / {:.2}",
                s.per_token_s.p50 * 1e3,
                s.per_token_s.p99 * 1e3
            ),
        );
        self.figure(
            p("SLO met (completed)"),
            percent(1.0 - s.slo_violation_rate),
        );
        self.figure(p("chunk gaps"), s.chunk_gaps);
        self.figure(p("unexpected replies"), s.unexpected.total());
    }

    /// The checks every swarm run must pass: every request accounted for, published, and
    /// ended exactly once (no loss, no duplicate), and every reply attributable.
    pub fn swarm_checks(&mut self, prefix: &str, s: &SwarmSummary) {
        self.swarm_checks_allowing(prefix, s, 0, "");
    }

    /// [`Report::swarm_checks`] allowing up to `duplicates` duplicated final replies, for the
    /// reason given.
    pub fn swarm_checks_allowing(
        &mut self,
        prefix: &str,
        s: &SwarmSummary,
        duplicates: u64,
        why: &str,
    ) {
        let p = |n: &str| {
            if prefix.is_empty() {
                n.to_owned()
            } else {
                format!("{prefix}: {n}")
            }
        };
        self.check(
            p("every request accounted for once"),
            s.accounted,
            format!(
                "{} requests = {} completed + {} errors + {} lost + {} not sent",
                s.requests, s.completed, s.errors, s.lost, s.not_sent
            ),
        );
        self.check(
            p("every request published"),
            s.not_sent == 0 && s.published == s.requests,
            format!("{} of {} published", s.published, s.requests),
        );
        self.check(
            p("no request lost"),
            s.lost == 0,
            format!("{} lost", s.lost),
        );
        if duplicates == 0 {
            self.check(
                p("no duplicated final reply"),
                s.duplicated == 0,
                format!("{} duplicated ({} extra ends)", s.duplicated, s.extra_ends),
            );
        } else {
            self.check(
                p(&format!(
                    "at most {duplicates} duplicated final replies ({why})"
                )),
                s.duplicated <= duplicates,
                format!("{} duplicated ({} extra ends)", s.duplicated, s.extra_ends),
            );
        }
        self.check(
            p("every reply attributable"),
            s.unexpected.total() == 0,
            format!("{:?}", s.unexpected),
        );
    }

    /// The report as text: a header, the figures, the checks.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let verdict = if self.passed() { "PASSED" } else { "FAILED" };
        let _ = writeln!(
            out,
            "== scenario {} {} ({} scale): {verdict} in {:.1} s",
            self.number,
            self.name,
            self.scale.name(),
            self.wall_s
        );
        let width = self.figures.iter().map(|f| f.name.len()).max().unwrap_or(0);
        for f in &self.figures {
            let _ = writeln!(out, "   {:<width$}  {}", f.name, f.value);
        }
        for c in &self.checks {
            let mark = if c.passed { "ok  " } else { "FAIL" };
            let _ = writeln!(out, "   [{mark}] {}: {}", c.what, c.detail);
        }
        out
    }
}

impl Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.render())
    }
}

/// Milliseconds, rounded, or `-` for NaN.
pub fn ms(seconds: f64) -> String {
    if seconds.is_finite() {
        format!("{:.0}", seconds * 1e3)
    } else {
        "-".into()
    }
}

/// A fraction as a percentage with one decimal, or `-` for NaN.
pub fn percent(fraction: f64) -> String {
    if fraction.is_finite() {
        format!("{:.1} %", fraction * 100.0)
    } else {
        "-".into()
    }
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
