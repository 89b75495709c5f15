//! `qosroute interference`: the action impact estimator against a real continuous-batching
//! engine. Requests are decoding on a slot-batched server and a new request joins; how much
//! later does each running request reach its tokens, against what `core::impact` predicts
//! from the expert's fitted profile?
//!
//! One trial is a configuration (k running requests, the new request's prompt `p` and output
//! `d`) run twice back to back: a control (the k requests alone) and the joined run (the same
//! k requests, and the new one sent once each has `--join-after-tokens` tokens). Every answer
//! has a fixed length (`ignore_eos`), so token i of a running request is the same step in
//! both runs. For running request j with `d_j` tokens at the join and `m_j = min(D_j - d_j, d)`
//! steps shared with the new one, the measured added time is the time it took from its last
//! token before the join to `m_j` tokens later in the joined run, minus the same in the
//! control. The prediction is `latency_increase_s_per_token(p, d, D_j, d_j) * D_j` with the
//! true lengths: this checks the interference model itself, not the length predictor.
//!
//! Outputs `FILE.json` (every point, every configuration's means, the summary) and `FILE.svg`
//! (predicted against measured added time, one point per configuration). The table on standard
//! output is the command's report to people.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qosroute_core::LatencyModel;
use qosroute_core::impact::latency_increase_s_per_token;
use qosroute_expert_client::{ChatRequest, StreamEvent};
use qosroute_sim::Catalogue;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::plot::{ScatterSeries, scatter_predicted_measured};
use crate::profile::{Target, Tokenization, calibrate};

#[derive(Debug, Clone, Args)]
pub struct InterferenceArgs {
    /// Base URL of the OpenAI-compatible server (e.g. http://127.0.0.1:8080).
    #[arg(long)]
    pub url: String,
    /// The model name sent in requests.
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// The expert's fitted profile: a one-expert catalogue written by `qosroute profile`
    /// against the same server.
    #[arg(long)]
    pub profile: PathBuf,
    /// Requests decoding when the new one joins (each below the profile's `max_slots`, so the
    /// new one is admitted at once).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub running: Vec<u32>,
    /// Prompt tokens of the joining request.
    #[arg(long, value_delimiter = ',', default_value = "32,256")]
    pub new_prompt_tokens: Vec<u32>,
    /// Output tokens of the joining request.
    #[arg(long, value_delimiter = ',', default_value = "32,96")]
    pub new_output_tokens: Vec<u32>,
    /// Prompt tokens of each running request.
    #[arg(long, default_value_t = 64)]
    pub running_prompt_tokens: u32,
    /// Output tokens of each running request.
    #[arg(long, default_value_t = 160)]
    pub running_output_tokens: u32,
    /// Tokens every running request has before the new one is sent.
    #[arg(long, default_value_t = 16)]
    pub join_after_tokens: u32,
    /// Trials of every configuration.
    #[arg(long, default_value_t = 2)]
    pub repetitions: u32,
    /// Seconds a request may take to its first token, and between tokens.
    #[arg(long, default_value_t = 120.0)]
    pub timeout_s: f64,
    /// Seed of the synthetic prompts.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Writes FILE (JSON) and FILE with the extension .svg (the scatter plot).
    #[arg(long)]
    pub out: PathBuf,
}

/// One running request of one joined trial.
#[derive(Debug, Clone, Serialize)]
struct Point {
    running: u32,
    new_prompt_tokens: u32,
    new_output_tokens: u32,
    repetition: u32,
    /// Index of the running request in its trial.
    request: u32,
    /// Its output tokens `D_j`.
    output_tokens: u32,
    /// Its tokens when the new request was sent, `d_j`.
    tokens_at_join: u32,
    /// Steps it shared with the new request, `m_j`.
    shared_steps: u32,
    measured_added_s: f64,
    predicted_added_s: f64,
}

/// The means of one configuration over its repetitions and running requests.
#[derive(Debug, Clone, Serialize)]
struct Configuration {
    running: u32,
    new_prompt_tokens: u32,
    new_output_tokens: u32,
    points: usize,
    measured_added_s: f64,
    predicted_added_s: f64,
    /// `predicted / measured - 1`.
    relative_error: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Summary {
    /// Mean of |relative error| over the configurations (the goal: <= 20 %).
    mape_configurations: f64,
    /// Mean of |relative error| over single points (noisier: one trial each).
    mape_points: f64,
    /// `sum predicted / sum measured - 1` over the configurations.
    bias: f64,
    configurations: usize,
    points: usize,
    /// Trials whose points could not be used, and why.
    dropped: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    command: String,
    url: &'a str,
    profile: String,
    latency: LatencyModel,
    max_slots: u32,
    tokenization: Tokenization,
    summary: Summary,
    configurations: Vec<Configuration>,
    points: Vec<Point>,
}

/// One streamed answer: when it was sent, when each token arrived.
#[derive(Debug, Default)]
struct Answer {
    tokens: Vec<Instant>,
    prompt_tokens: Option<u32>,
    error: Option<String>,
}

pub fn run(args: &InterferenceArgs) -> anyhow::Result<()> {
    check_args(args)?;
    let catalogue = Catalogue::load(&args.profile)
        .with_context(|| format!("--profile {}", args.profile.display()))?;
    let Some(expert) = catalogue.experts.first() else {
        bail!("--profile {}: no [[expert]]", args.profile.display());
    };
    let (latency, max_slots) = (expert.latency, expert.max_slots);
    let too_many: Vec<u32> = args
        .running
        .iter()
        .copied()
        .filter(|&k| k >= max_slots)
        .collect();
    if !too_many.is_empty() {
        bail!(
            "--running {too_many:?}: the profile has {max_slots} slots, so the new request would queue; give fewer than {max_slots} running requests"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut extra = Map::new();
    // Fixed lengths: token i is the same step in the control and the joined run.
    extra.insert("ignore_eos".into(), Value::Bool(true));
    let target = Target::new(
        &args.url,
        &args.model,
        None,
        extra,
        args.running_output_tokens,
        args.timeout_s,
        args.seed,
    )?;
    let (tokenization, points, dropped) = runtime.block_on(measure(args, &target, &latency))?;
    let configurations = configurations(&points);
    if configurations.is_empty() {
        bail!("no usable trial: {dropped:?}");
    }
    let summary = summarise(&configurations, &points, dropped);
    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        url: &args.url,
        profile: args.profile.display().to_string(),
        latency,
        max_slots,
        tokenization,
        summary,
        configurations,
        points,
    };
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let svg = args.out.with_extension("svg");
    let series: Vec<ScatterSeries> = args
        .running
        .iter()
        .map(|&k| ScatterSeries {
            label: format!("{k} running"),
            points: report
                .configurations
                .iter()
                .filter(|c| c.running == k)
                .map(|c| (c.measured_added_s * 1e3, c.predicted_added_s * 1e3))
                .collect(),
        })
        .collect();
    scatter_predicted_measured(
        &svg,
        "A new request joins: added time of the running ones",
        "measured added time (ms)",
        "predicted by core::impact (ms)",
        &series,
    )?;
    print_report(&report);
    eprintln!("wrote {} and {}", args.out.display(), svg.display());
    Ok(())
}

fn check_args(args: &InterferenceArgs) -> anyhow::Result<()> {
    if args.running.is_empty() || args.running.contains(&0) {
        bail!("--running: give one or more counts, each at least 1");
    }
    if args.new_prompt_tokens.is_empty() || args.new_prompt_tokens.contains(&0) {
        bail!("--new-prompt-tokens: give one or more lengths, each at least 1");
    }
    if args.new_output_tokens.is_empty() || args.new_output_tokens.iter().any(|&d| d < 2) {
        bail!("--new-output-tokens: give one or more lengths, each at least 2");
    }
    if args.join_after_tokens == 0 || args.join_after_tokens + 2 >= args.running_output_tokens {
        bail!(
            "--join-after-tokens must be at least 1 and leave the running requests 2 tokens more"
        );
    }
    if args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    if !(args.timeout_s.is_finite() && args.timeout_s > 0.0) {
        bail!("--timeout-s must be positive");
    }
    Ok(())
}

async fn measure(
    args: &InterferenceArgs,
    target: &Target,
    latency: &LatencyModel,
) -> anyhow::Result<(Tokenization, Vec<Point>, Vec<String>)> {
    let tokenization = calibrate(target, &mut Vec::new()).await?;
    let running_words = tokenization.words_for(args.running_prompt_tokens);
    let mut points = Vec::new();
    let mut dropped = Vec::new();
    for &k in &args.running {
        for &p in &args.new_prompt_tokens {
            for &d in &args.new_output_tokens {
                for rep in 0..args.repetitions {
                    let label = format!("k={k} p={p} d={d} rep={rep}");
                    eprintln!("  trial {label}");
                    let control = trial(target, args, k, running_words, None).await;
                    let joined = trial(
                        target,
                        args,
                        k,
                        running_words,
                        Some((tokenization.words_for(p), d)),
                    )
                    .await;
                    match compare(latency, &tokenization, p, &control, &joined) {
                        Ok(found) => points.extend(found.into_iter().map(|mut pt| {
                            pt.running = k;
                            pt.new_output_tokens = d;
                            pt.repetition = rep;
                            pt
                        })),
                        Err(why) => {
                            eprintln!("  {label}: dropped: {why}");
                            dropped.push(format!("{label}: {why}"));
                        }
                    }
                }
            }
        }
    }
    Ok((tokenization, points, dropped))
}

/// What one run gave: the running requests' answers, and the joining one with when it was
/// sent.
struct Trial {
    running: Vec<Answer>,
    joined: Option<(Instant, Answer)>,
}

/// `k` running requests; with `join = Some((words, d))`, a request of that prompt and output
/// is sent once each running one has `--join-after-tokens` tokens.
async fn trial(
    target: &Target,
    args: &InterferenceArgs,
    k: u32,
    running_words: u32,
    join: Option<(u32, u32)>,
) -> Trial {
    let progress: Vec<AtomicU32> = (0..k).map(|_| AtomicU32::new(0)).collect();
    let ended = AtomicU32::new(0);
    let running = futures_util::future::join_all(progress.iter().map(|count| async {
        let answer = stream(target, running_words, args.running_output_tokens, count).await;
        ended.fetch_add(1, Ordering::Relaxed);
        answer
    }));
    let joiner = async {
        let (words, d) = join?;
        loop {
            let ready = progress
                .iter()
                .all(|c| c.load(Ordering::Relaxed) >= args.join_after_tokens);
            if ready {
                break;
            }
            if ended.load(Ordering::Relaxed) > 0 {
                // A running request ended before the join: the trial is unusable.
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let at = Instant::now();
        let unused = AtomicU32::new(0);
        Some((at, stream(target, words, d, &unused).await))
    };
    let (running, joined) = tokio::join!(running, joiner);
    Trial { running, joined }
}

/// One streamed request of `words` prompt words and exactly `max_tokens` output tokens;
/// `progress` counts its tokens as they arrive.
async fn stream(target: &Target, words: u32, max_tokens: u32, progress: &AtomicU32) -> Answer {
    let mut request = ChatRequest::from_prompt(target.prompt(words), max_tokens);
    request.temperature = Some(0.0);
    request.extra = target.extra().clone();
    let mut answer = Answer::default();
    let mut stream = match target.client().chat(request).await {
        Ok(s) => s,
        Err(e) => {
            answer.error = Some(e.to_string());
            return answer;
        }
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(StreamEvent::Token { at, .. }) => {
                answer.tokens.push(at);
                progress.fetch_add(1, Ordering::Relaxed);
            }
            Ok(StreamEvent::Done { usage, .. }) => {
                answer.prompt_tokens = usage.map(|u| u.prompt_tokens).filter(|&n| n > 0);
                break;
            }
            Err(e) => {
                answer.error = Some(e.to_string());
                break;
            }
        }
    }
    answer
}

/// The points of one (control, joined) pair, or why there are none.
fn compare(
    latency: &LatencyModel,
    tokenization: &Tokenization,
    target_prompt_tokens: u32,
    control: &Trial,
    joined: &Trial,
) -> Result<Vec<Point>, String> {
    let Some((join_at, new)) = &joined.joined else {
        let ends: Vec<String> = joined
            .running
            .iter()
            .map(|a| match &a.error {
                Some(e) => format!("failed after {} tokens: {e}", a.tokens.len()),
                None => format!("{} tokens", a.tokens.len()),
            })
            .collect();
        return Err(format!(
            "a running request ended before the join ({})",
            ends.join("; ")
        ));
    };
    if let Some(e) = control
        .running
        .iter()
        .chain(&joined.running)
        .chain(std::iter::once(new))
        .find_map(|a| a.error.clone())
    {
        return Err(format!("a request failed: {e}"));
    }
    let new_output = new.tokens.len() as u32;
    if new_output < 2 {
        return Err("the new request gave fewer than 2 tokens".into());
    }
    let new_prompt = new
        .prompt_tokens
        .unwrap_or_else(|| tokenization.tokens_of(tokenization.words_for(target_prompt_tokens)));
    let mut points = Vec::new();
    for (j, (with, alone)) in joined.running.iter().zip(&control.running).enumerate() {
        let total = with.tokens.len();
        if total != alone.tokens.len() {
            return Err(format!(
                "request {j} gave {total} tokens with the join and {} alone (ignore_eos not honoured?)",
                alone.tokens.len()
            ));
        }
        let at_join = with.tokens.iter().filter(|t| **t <= *join_at).count();
        let shared = (total - at_join).min(new_output as usize);
        if at_join == 0 || shared < 2 {
            continue;
        }
        let anchor = at_join - 1;
        let span = |a: &Answer| {
            a.tokens[anchor + shared]
                .saturating_duration_since(a.tokens[anchor])
                .as_secs_f64()
        };
        let measured = span(with) - span(alone);
        let predicted = latency_increase_s_per_token(
            latency,
            f64::from(new_prompt),
            f64::from(new_output),
            total as f64,
            at_join as f64,
        ) * total as f64;
        points.push(Point {
            running: 0,
            new_prompt_tokens: new_prompt,
            new_output_tokens: new_output,
            repetition: 0,
            request: j as u32,
            output_tokens: total as u32,
            tokens_at_join: at_join as u32,
            shared_steps: shared as u32,
            measured_added_s: measured,
            predicted_added_s: predicted,
        });
    }
    if points.is_empty() {
        return Err("no running request shared 2 steps with the new one".into());
    }
    Ok(points)
}

/// The points grouped by configuration (running, target new prompt, new output), in order.
fn configurations(points: &[Point]) -> Vec<Configuration> {
    let mut out: Vec<Configuration> = Vec::new();
    for p in points {
        let key = (p.running, p.new_output_tokens);
        // The measured prompt varies by a token or two between trials of one target length:
        // group by the nearest configuration already seen within 10 %.
        let found = out.iter_mut().find(|c| {
            (c.running, c.new_output_tokens) == key
                && (f64::from(c.new_prompt_tokens) - f64::from(p.new_prompt_tokens)).abs()
                    <= 0.1 * f64::from(c.new_prompt_tokens)
        });
        match found {
            Some(c) => {
                c.points += 1;
                c.measured_added_s += p.measured_added_s;
                c.predicted_added_s += p.predicted_added_s;
            }
            None => out.push(Configuration {
                running: p.running,
                new_prompt_tokens: p.new_prompt_tokens,
                new_output_tokens: p.new_output_tokens,
                points: 1,
                measured_added_s: p.measured_added_s,
                predicted_added_s: p.predicted_added_s,
                relative_error: 0.0,
            }),
        }
    }
    for c in &mut out {
        let n = c.points as f64;
        c.measured_added_s /= n;
        c.predicted_added_s /= n;
        c.relative_error = relative_error(c.predicted_added_s, c.measured_added_s);
    }
    out
}

fn relative_error(predicted: f64, measured: f64) -> f64 {
    if measured.abs() > 0.0 {
        predicted / measured - 1.0
    } else {
        f64::NAN
    }
}

fn summarise(configurations: &[Configuration], points: &[Point], dropped: Vec<String>) -> Summary {
    let mean_abs = |v: &mut dyn Iterator<Item = f64>| {
        let (s, n) = v
            .filter(|x| x.is_finite())
            .fold((0.0, 0usize), |(s, n), x| (s + x.abs(), n + 1));
        if n == 0 { f64::NAN } else { s / n as f64 }
    };
    let sum = |f: fn(&Configuration) -> f64| configurations.iter().map(f).sum::<f64>();
    Summary {
        mape_configurations: mean_abs(&mut configurations.iter().map(|c| c.relative_error)),
        mape_points: mean_abs(
            &mut points
                .iter()
                .map(|p| relative_error(p.predicted_added_s, p.measured_added_s)),
        ),
        bias: relative_error(sum(|c| c.predicted_added_s), sum(|c| c.measured_added_s)),
        configurations: configurations.len(),
        points: points.len(),
        dropped,
    }
}

fn print_report(report: &Report<'_>) {
    println!(
        "\nqosroute interference: {} ({} slots; profile {})",
        report.url, report.max_slots, report.profile
    );
    println!(
        "{:>8} {:>9} {:>9} {:>7} {:>14} {:>14} {:>8}",
        "running", "new p", "new d", "points", "measured ms", "predicted ms", "error"
    );
    for c in &report.configurations {
        println!(
            "{:>8} {:>9} {:>9} {:>7} {:>14.1} {:>14.1} {:>7.1}%",
            c.running,
            c.new_prompt_tokens,
            c.new_output_tokens,
            c.points,
            c.measured_added_s * 1e3,
            c.predicted_added_s * 1e3,
            c.relative_error * 100.0
        );
    }
    let s = &report.summary;
    println!(
        "mean |error| over configurations {:.1}% (goal <= 20 %), over points {:.1}%; bias {:+.1}%; {} dropped trials",
        s.mape_configurations * 100.0,
        s.mape_points * 100.0,
        s.bias * 100.0,
        s.dropped.len()
    );
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn model() -> LatencyModel {
        LatencyModel {
            prefill_overhead_s: 0.010,
            prefill_tok_s: 1000.0,
            decode_t0_s: 0.020,
            decode_d_s_per_seq: 0.002,
            decode_e_s_per_ctx_token: 0.0,
        }
    }

    /// Token times: `n` tokens at `step` seconds, from `start`, plus `extra` seconds added to
    /// every gap from token `from` on (for `span` gaps).
    fn answer(start: Instant, n: usize, step: f64, from: usize, span: usize, extra: f64) -> Answer {
        let mut t = start;
        let mut tokens = Vec::new();
        for i in 0..n {
            tokens.push(t);
            let gap = if i >= from && i < from + span {
                step + extra
            } else {
                step
            };
            t += Duration::from_secs_f64(gap);
        }
        Answer {
            tokens,
            prompt_tokens: Some(64),
            error: None,
        }
    }

    #[test]
    fn the_measured_added_time_is_the_joined_run_minus_the_control_over_the_shared_steps() {
        let t0 = Instant::now();
        let tok = Tokenization {
            tokens_per_word: 1.0,
            overhead_tokens: 0.0,
            from_usage: true,
        };
        // 100 tokens at 20 ms; the join comes after token 10 (at 0.205 s): 10 tokens before.
        let control = Trial {
            running: vec![answer(t0, 100, 0.020, 0, 0, 0.0)],
            joined: None,
        };
        // With the join, the 30 gaps from token 9 on are 5 ms longer: 150 ms added.
        let new = Answer {
            tokens: (0..30)
                .map(|i| t0 + Duration::from_millis(300 + 25 * i))
                .collect(),
            prompt_tokens: Some(100),
            error: None,
        };
        let joined = Trial {
            running: vec![answer(t0, 100, 0.020, 9, 30, 0.005)],
            joined: Some((t0 + Duration::from_millis(195), new)),
        };
        let points = compare(&model(), &tok, 100, &control, &joined).unwrap();
        assert_eq!(points.len(), 1);
        let p = &points[0];
        assert_eq!(
            (p.tokens_at_join, p.shared_steps, p.output_tokens),
            (10, 30, 100)
        );
        assert!(
            (p.measured_added_s - 0.150).abs() < 1e-6,
            "{}",
            p.measured_added_s
        );
        // Prefill 10 ms + 100 / 1000 s, then 29 shared steps at +2 ms: 0.168 s.
        assert!(
            (p.predicted_added_s - 0.168).abs() < 1e-9,
            "{}",
            p.predicted_added_s
        );
    }

    #[test]
    fn answers_of_different_lengths_are_refused() {
        let t0 = Instant::now();
        let tok = Tokenization {
            tokens_per_word: 1.0,
            overhead_tokens: 0.0,
            from_usage: true,
        };
        let control = Trial {
            running: vec![answer(t0, 90, 0.020, 0, 0, 0.0)],
            joined: None,
        };
        let joined = Trial {
            running: vec![answer(t0, 100, 0.020, 0, 0, 0.0)],
            joined: Some((
                t0 + Duration::from_millis(195),
                answer(t0, 30, 0.02, 0, 0, 0.0),
            )),
        };
        let why = compare(&model(), &tok, 100, &control, &joined).unwrap_err();
        assert!(why.contains("ignore_eos"), "{why}");
    }

    #[test]
    fn configurations_average_their_points_and_the_summary_weighs_each_once() {
        let point = |k, measured, predicted| Point {
            running: k,
            new_prompt_tokens: 100,
            new_output_tokens: 32,
            repetition: 0,
            request: 0,
            output_tokens: 160,
            tokens_at_join: 16,
            shared_steps: 32,
            measured_added_s: measured,
            predicted_added_s: predicted,
        };
        let points = vec![point(1, 0.1, 0.1), point(1, 0.3, 0.1), point(2, 0.2, 0.3)];
        let c = configurations(&points);
        assert_eq!(c.len(), 2);
        assert!((c[0].measured_added_s - 0.2).abs() < 1e-12);
        assert!((c[0].relative_error + 0.5).abs() < 1e-12);
        assert!((c[1].relative_error - 0.5).abs() < 1e-12);
        let s = summarise(&c, &points, Vec::new());
        assert!((s.mape_configurations - 0.5).abs() < 1e-12);
        // Points: 0 %, -66.7 %, +50 %.
        assert!((s.mape_points - (0.0 + 2.0 / 3.0 + 0.5) / 3.0).abs() < 1e-12);
        // Sums: predicted 0.4, measured 0.4.
        assert!(s.bias.abs() < 1e-12);
    }
}
