//! The demo's live view on stderr: progress, requests/s, QoS so far, SLO misses and each
//! expert's requests in flight.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write as _};
use std::time::Duration;

use qosroute_swarm::{SwarmProgress, SwarmSummary};
use tokio::time::Instant;

use super::process::DaemonMetrics;

/// The live view on stderr: redrawn in place on a terminal, periodic lines otherwise.
pub(super) struct LiveView {
    policy: String,
    experts: Vec<String>,
    tty: bool,
    drawn: usize,
    last_line: Option<Instant>,
    samples: VecDeque<(f64, u64)>,
}

impl LiveView {
    pub(super) fn new(policy: &str, experts: Vec<String>) -> Self {
        Self {
            policy: policy.to_owned(),
            experts,
            tty: std::io::stderr().is_terminal(),
            drawn: 0,
            last_line: None,
            samples: VecDeque::new(),
        }
    }

    /// Requests published per second over the last ~2 s.
    fn rate(&mut self, p: &SwarmProgress) -> f64 {
        self.samples.push_back((p.elapsed_s, p.published));
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|(t, _)| p.elapsed_s - t > 2.0)
        {
            self.samples.pop_front();
        }
        match (self.samples.front(), self.samples.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => (n1 - n0) as f64 / (t1 - t0),
            _ => 0.0,
        }
    }

    fn lines(&mut self, p: &SwarmProgress, m: Option<&DaemonMetrics>) -> Vec<String> {
        let rate = self.rate(p);
        let width = 24usize;
        let done = if p.requests == 0 {
            width
        } else {
            (p.published as usize * width) / p.requests as usize
        };
        let bar: String = "#".repeat(done) + &"-".repeat(width - done.min(width));
        let daemon_qos = m.map_or(f64::NAN, DaemonMetrics::avg_qos);
        let mut lines = vec![
            format!(
                "[{}] {bar} {}/{} published, {} answered, {:.1}/{:.1} s, {:.1} req/s",
                self.policy, p.published, p.requests, p.ended, p.elapsed_s, p.planned_s, rate
            ),
            format!(
                "  avg QoS {} (devices) / {} (daemon)  SLO miss {} of {}  errors {}  in flight {}",
                fmt_num(p.avg_qos(), 3),
                fmt_num(daemon_qos, 3),
                fmt_pct(ratio(p.slo_violations, p.completed)),
                p.completed,
                p.errors,
                p.in_flight()
            ),
        ];
        if let Some(m) = m {
            let cells: Vec<String> = self
                .experts
                .iter()
                .map(|e| format!("{e} {}", m.expert_in_flight.get(e).copied().unwrap_or(0.0)))
                .collect();
            for chunk in cells.chunks(3) {
                lines.push(format!("  in flight: {}", chunk.join(" | ")));
            }
        }
        lines
    }

    pub(super) fn draw(&mut self, p: &SwarmProgress, m: Option<&DaemonMetrics>) {
        let lines = self.lines(p, m);
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.drawn > 0 {
                let _ = write!(err, "\x1b[{}F\x1b[J", self.drawn);
            }
            for l in &lines {
                let _ = writeln!(err, "{l}");
            }
            self.drawn = lines.len();
        } else if self
            .last_line
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            self.last_line = Some(Instant::now());
            let _ = writeln!(err, "{}", lines.join(" ;"));
        }
        let _ = err.flush();
    }

    pub(super) fn finish(&mut self, s: &SwarmSummary, m: Option<&DaemonMetrics>) {
        let mut err = std::io::stderr().lock();
        if self.tty && self.drawn > 0 {
            let _ = write!(err, "\x1b[{}F\x1b[J", self.drawn);
            self.drawn = 0;
        }
        let _ = writeln!(
            err,
            "[{}] done in {:.1} s: {} requests, {} completed, {} errors, {} lost, {} not sent, {} duplicated; avg QoS {} (daemon {}), SLO miss {}{}",
            self.policy,
            s.duration_s,
            s.requests,
            s.completed,
            s.errors,
            s.lost,
            s.not_sent,
            s.duplicated,
            fmt_num(s.avg_qos, 4),
            fmt_num(m.map_or(f64::NAN, DaemonMetrics::avg_qos), 4),
            fmt_pct(s.slo_violation_rate),
            if s.accounted {
                ""
            } else {
                " (NOT every request accounted for)"
            }
        );
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        a as f64 / b as f64
    }
}

fn fmt_num(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "n/a".into()
    }
}

fn fmt_pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1}%", 100.0 * v)
    } else {
        "-".into()
    }
}
