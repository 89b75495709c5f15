//! `qosroute profile`: fits an expert's latency model from measurements of a running
//! OpenAI-compatible server, and writes it in the catalogue format (`configs/experts/*.toml`).
//!
//! Three phases, all through the daemon's own streaming client (`qosroute-expert-client`):
//! 1. **calibration**: a warm-up request, then two prompts of known word counts with
//!    `max_tokens = 1`; the server's `usage.prompt_tokens` gives tokens per word and the chat
//!    template's overhead, so later prompts can be sized in real tokens of this server;
//! 2. **prefill and decode at concurrency 1**: every `--prompt-tokens` length, `--repetitions`
//!    times, one request at a time. The time to first token against the prompt length gives
//!    `prefill_overhead_s` and `prefill_tok_s` (least absolute deviations of
//!    `TTFT = a + p / r`, robust to a stalled request; when that fit is unusable, a negative
//!    `a` or a rate that is not positive, overhead 0 and the proportional fit
//!    `TTFT = p / r`, all prompt tokens over all TTFTs, said so in the header); the mean inter-token time against the mean context (prompt + half the answer)
//!    gives `decode_t0_s` and `decode_e_s_per_ctx_token`;
//! 3. **concurrency**: every `--concurrency` level, `--repetitions` times, that many requests
//!    at once. The peak number of answers being decoded at the same moment is the concurrency
//!    limit the server shows (`max_slots`); the inter-token time of overlapping answers (with
//!    the prefill stalls of answers admitted meanwhile taken out, as the simulator adds them:
//!    the overhead once per prefill iteration, `p / r` per prompt) against the time-averaged
//!    batch size gives `decode_d_s_per_seq`.
//!
//! Every prompt starts with a unique tag, so no server can reuse a cached prefix across the
//! measurements (llama.cpp keeps the previous prompt's KV cache and would skip its prefill).
//!
//! Outputs: `FILE.toml`, a one-expert catalogue (loadable by `qosroute sim --experts`, its
//! `[[expert]]` pasteable into any catalogue or `qosrouted` config) with a comment header giving
//! the command, the fit's mean absolute percentage error per term and the throughput per
//! concurrency level; and `FILE.measurements.json` beside it, every request's raw timings.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use qosroute_core::{ExpertProfile, LatencyModel, SimRng};
use qosroute_expert_client::{
    ChatRequest, ExpertClient, ExpertEndpoint, ExpertKind, StreamEvent, Timeouts,
};
use qosroute_sim::Catalogue;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

#[derive(Debug, Clone, Args)]
pub struct ProfileArgs {
    /// Base URL of the OpenAI-compatible server (e.g. http://127.0.0.1:8080; `/v1` is optional).
    #[arg(long)]
    pub url: String,
    /// The model name sent in requests.
    #[arg(long)]
    pub model: String,
    /// Name of the expert in the profile (default: the model name).
    #[arg(long)]
    pub name: Option<String>,
    /// The quality-table column the expert's model stands for (`model` in the catalogue; the
    /// simulator needs a column of data/quality/, e.g. llama31_8b). Default: --model.
    #[arg(long)]
    pub quality_model: Option<String>,
    /// Hardware and engine, for people (`hardware` in the catalogue).
    #[arg(long, default_value = "")]
    pub hardware: String,
    /// Concurrency levels of phase 3 (simultaneous requests).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub concurrency: Vec<u32>,
    /// Prompt lengths of phase 2, in the server's tokens (chat template included).
    #[arg(long, value_delimiter = ',', default_value = "32,128,512,1024")]
    pub prompt_tokens: Vec<u32>,
    /// Prompt length of the concurrency phase (default: the smallest --prompt-tokens).
    #[arg(long)]
    pub concurrency_prompt_tokens: Option<u32>,
    /// `max_tokens` of every measured answer (answers that stop earlier still count if they
    /// have at least 4 tokens).
    #[arg(long, default_value_t = 64)]
    pub output_tokens: u32,
    /// Repetitions of every prompt length and every concurrency level.
    #[arg(long, default_value_t = 3)]
    pub repetitions: u32,
    /// KV-cache capacity in tokens (llama.cpp `-c`, vLLM's reported KV tokens): not
    /// measurable from outside. Default: the largest context served during the run (a lower
    /// bound).
    #[arg(long)]
    pub kv_tokens: Option<u64>,
    /// Environment variable holding an API key (sent as a bearer token).
    #[arg(long)]
    pub api_key_env: Option<String>,
    /// JSON object merged into every request body (e.g. '{"ignore_eos":true}' for vLLM or
    /// llama-server, '{"qosroute":{"output_tokens":64}}' for the emulator).
    #[arg(long)]
    pub extra_body: Option<String>,
    /// Seconds to wait for one answer's first token (queueing included).
    #[arg(long, default_value_t = 120.0)]
    pub timeout_s: f64,
    /// Seed of the prompt words.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The profile (catalogue TOML); raw measurements go to FILE.measurements.json beside it.
    #[arg(long, default_value = "out/profile.toml")]
    pub out: PathBuf,
}

pub fn run(args: &ProfileArgs) -> anyhow::Result<()> {
    check_args(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = runtime.block_on(profile(args))?;
    write_profile(args, &outcome)?;
    print_summary(&outcome);
    Ok(())
}

fn check_args(args: &ProfileArgs) -> anyhow::Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency: give one or more levels, each at least 1");
    }
    if args.prompt_tokens.len() < 2 || args.prompt_tokens.contains(&0) {
        bail!("--prompt-tokens: give at least two distinct lengths, each at least 1");
    }
    let mut distinct = args.prompt_tokens.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < 2 {
        bail!("--prompt-tokens: give at least two distinct lengths");
    }
    if args.output_tokens < 4 {
        bail!("--output-tokens must be at least 4 (decode needs inter-token times)");
    }
    if args.repetitions == 0 {
        bail!("--repetitions must be at least 1");
    }
    if !(args.timeout_s.is_finite() && args.timeout_s > 0.0) {
        bail!("--timeout-s must be positive");
    }
    if args.model.trim().is_empty() {
        bail!("--model must not be empty");
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Measurements.

/// Which phase a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Phase {
    Calibration,
    Prefill,
    Concurrency,
}

/// One measured request. Times are seconds since the start of its batch (the requests of a
/// batch are sent together).
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Measurement {
    pub(crate) phase: Phase,
    /// Requests sent together (1 in the calibration and prefill phases).
    pub(crate) concurrency: u32,
    /// Index of the batch in its phase.
    pub(crate) batch: u32,
    /// Prompt tokens aimed at.
    pub(crate) target_prompt_tokens: u32,
    /// Words in the synthesised prompt.
    pub(crate) prompt_words: u32,
    /// `usage.prompt_tokens`, else estimated from the calibration (see
    /// `prompt_tokens_estimated`).
    pub(crate) prompt_tokens: u32,
    /// The server reported no usage: `prompt_tokens` is the calibration's estimate.
    pub(crate) prompt_tokens_estimated: bool,
    /// `usage.completion_tokens`, else the number of content deltas.
    pub(crate) completion_tokens: u32,
    /// Content deltas received (several tokens may share one delta).
    pub(crate) deltas: u32,
    pub(crate) sent_s: f64,
    pub(crate) first_token_s: Option<f64>,
    pub(crate) last_token_s: Option<f64>,
    pub(crate) finish_reason: Option<String>,
    /// Gaps between consecutive deltas, seconds.
    pub(crate) inter_delta_s: Vec<f64>,
    /// What went wrong, when the answer failed.
    pub(crate) error: Option<String>,
}

impl Measurement {
    fn ok(&self) -> bool {
        self.error.is_none() && self.first_token_s.is_some()
    }

    fn ttft_s(&self) -> Option<f64> {
        Some(self.first_token_s? - self.sent_s)
    }

    /// Decode interval and mean inter-token time, when the answer has at least 4 tokens.
    fn decode(&self) -> Option<(f64, f64, f64)> {
        let (f, l) = (self.first_token_s?, self.last_token_s?);
        let n = self.completion_tokens;
        if !self.ok() || n < 4 || l <= f {
            return None;
        }
        Some((f, l, (l - f) / f64::from(n - 1)))
    }
}

/// How prompts are sized in this server's tokens.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Tokenization {
    /// Tokens per prompt word.
    pub(crate) tokens_per_word: f64,
    /// Tokens of the chat template and the instruction around the words.
    pub(crate) overhead_tokens: f64,
    /// Whether the server reported `usage.prompt_tokens` (else 4 characters per token).
    pub(crate) from_usage: bool,
}

impl Tokenization {
    /// The prompt tokens of `words` words.
    pub(crate) fn tokens_of(&self, words: u32) -> u32 {
        (self.overhead_tokens + f64::from(words) * self.tokens_per_word).round() as u32
    }

    /// The words of a prompt of `tokens` tokens.
    pub(crate) fn words_for(&self, tokens: u32) -> u32 {
        let w = (f64::from(tokens) - self.overhead_tokens) / self.tokens_per_word;
        w.round().max(1.0) as u32
    }
}

/// The body of a `Transfer-Encoding: chunked` response.
fn dechunk(mut raw: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = raw.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&raw[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        raw = &raw[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(raw.get(..size)?);
        raw = raw.get(size + 2..)?;
    }
}

const WORDS: [&str; 48] = [
    "river", "mountain", "engine", "signal", "garden", "winter", "copper", "lantern", "harbor",
    "meadow", "circuit", "orchard", "thunder", "village", "compass", "glacier", "market", "bridge",
    "forest", "planet", "silver", "window", "canyon", "battery", "island", "library", "rocket",
    "valley", "marble", "pocket", "desert", "candle", "tunnel", "falcon", "meteor", "violin",
    "harvest", "station", "needle", "ocean", "pillow", "saddle", "timber", "voyage", "anchor",
    "basket", "cactus", "dragon",
];

/// A prompt of `words` pseudo-random words after a unique tag, then the instruction (two
/// prompts share no prefix beyond the chat template, so no server skips their prefill).
pub(crate) fn synth_prompt(tag: &str, words: u32, rng: &mut SimRng) -> String {
    let mut s = format!("[{tag}]");
    for _ in 0..words {
        s.push(' ');
        s.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
    }
    s.push_str(". Write a long story that uses the words above.");
    s
}

/// The server under measurement.
pub(crate) struct Target {
    client: ExpertClient,
    url: String,
    model: String,
    api_key: Option<String>,
    extra: Map<String, Value>,
    output_tokens: u32,
    run_tag: String,
    rng: std::sync::Mutex<SimRng>,
    counter: std::sync::atomic::AtomicU64,
}

impl Target {
    pub(crate) fn new(
        url: &str,
        model: &str,
        api_key: Option<String>,
        extra: Map<String, Value>,
        output_tokens: u32,
        timeout_s: f64,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let mut endpoint = ExpertEndpoint::new("profiled", url, model, ExpertKind::OpenAi);
        endpoint.api_key = api_key.clone();
        // A fresh connection per request: a measurement must not lose a request to a server
        // that closes kept-alive connections (llama-server does after each streamed answer).
        endpoint.reuse_connections = false;
        endpoint.timeouts = Timeouts {
            connect: Duration::from_secs(5),
            first_token: Duration::from_secs_f64(timeout_s),
            between_tokens: Duration::from_secs_f64(timeout_s),
            total: Duration::from_secs_f64(timeout_s * 4.0),
        };
        let client = ExpertClient::new(endpoint).context("--url")?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Ok(Self {
            client,
            url: url.to_owned(),
            model: model.to_owned(),
            api_key,
            extra,
            output_tokens,
            run_tag: format!("{:x}-{}", nanos % 0xFFFF_FFFF, std::process::id()),
            rng: std::sync::Mutex::new(SimRng::derive(seed, 7)),
            counter: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The streaming client of the server.
    pub(crate) fn client(&self) -> &ExpertClient {
        &self.client
    }

    /// The extra request fields sent with every request.
    pub(crate) fn extra(&self) -> &Map<String, Value> {
        &self.extra
    }

    /// A prompt of `words` words that shares no prefix with any other of this run.
    pub(crate) fn prompt(&self, words: u32) -> String {
        let k = self
            .counter
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tag = format!("{}-{k}", self.run_tag);
        match self.rng.lock() {
            Ok(mut rng) => synth_prompt(&tag, words, &mut rng),
            Err(poisoned) => synth_prompt(&tag, words, &mut poisoned.into_inner()),
        }
    }

    /// `usage.prompt_tokens` of a non-streamed request of `words` words with `max_tokens = 1`
    /// (every OpenAI-compatible server reports usage there; some, like llama-cpp-python, not
    /// in streams). Plain `http://` only: a minimal HTTP/1.1 exchange on a fresh connection.
    async fn plain_prompt_tokens(&self, words: u32) -> Option<u32> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let rest = self.url.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let prefix = path.strip_suffix("/v1").unwrap_or(path);
        let mut body = ChatRequest::from_prompt(self.prompt(words), 1).to_body(&self.model);
        for (k, v) in &self.extra {
            body.insert(k.clone(), v.clone());
        }
        body.insert("stream".into(), Value::Bool(false));
        body.remove("stream_options");
        let body = serde_json::to_vec(&Value::Object(body)).ok()?;
        let auth = self
            .api_key
            .as_ref()
            .map(|k| format!("Authorization: Bearer {k}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "POST {prefix}/v1/chat/completions HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nAccept: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(authority).await.ok()?;
            stream.write_all(head.as_bytes()).await.ok()?;
            stream.write_all(&body).await.ok()?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await.ok()?;
            Some(response)
        };
        let response = tokio::time::timeout(Duration::from_secs(120), exchange)
            .await
            .ok()??;
        let split = response.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
        let raw = &response[split + 4..];
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(raw)?
        } else {
            raw.to_vec()
        };
        let json: Value = serde_json::from_slice(&body).ok()?;
        let n = json.get("usage")?.get("prompt_tokens")?.as_u64()?;
        u32::try_from(n).ok().filter(|&n| n > 0)
    }

    /// One streamed request; never fails (a failure is recorded in the measurement).
    async fn measure(
        &self,
        origin: Instant,
        words: u32,
        max_tokens: u32,
        mut m: Measurement,
    ) -> Measurement {
        let mut request = ChatRequest::from_prompt(self.prompt(words), max_tokens);
        request.temperature = Some(0.0);
        request.extra = self.extra.clone();
        m.prompt_words = words;
        m.sent_s = origin.elapsed().as_secs_f64();
        let mut stream = match self.client.chat(request).await {
            Ok(s) => s,
            Err(e) => {
                m.error = Some(e.to_string());
                return m;
            }
        };
        let mut previous: Option<Instant> = None;
        while let Some(event) = stream.next().await {
            match event {
                Ok(StreamEvent::Token { at, .. }) => {
                    let t = at.saturating_duration_since(origin).as_secs_f64();
                    if let Some(p) = previous {
                        m.inter_delta_s
                            .push(at.saturating_duration_since(p).as_secs_f64());
                    }
                    previous = Some(at);
                    m.first_token_s.get_or_insert(t);
                    m.last_token_s = Some(t);
                    m.deltas += 1;
                }
                Ok(StreamEvent::Done {
                    finish_reason,
                    usage,
                    ..
                }) => {
                    m.finish_reason = finish_reason;
                    if let Some(u) = usage {
                        m.prompt_tokens = u.prompt_tokens;
                        m.completion_tokens = u.completion_tokens;
                    }
                    break;
                }
                Err(e) => {
                    m.error = Some(e.to_string());
                    break;
                }
            }
        }
        if m.completion_tokens == 0 {
            m.completion_tokens = m.deltas;
        }
        if m.error.is_none() && m.first_token_s.is_none() {
            m.error = Some("the answer had no content".into());
        }
        m
    }

    /// `n` requests sent at once.
    async fn batch(
        &self,
        phase: Phase,
        batch: u32,
        n: u32,
        target_tokens: u32,
        words: u32,
        max_tokens: u32,
    ) -> Vec<Measurement> {
        let origin = Instant::now();
        let template = Measurement {
            phase,
            concurrency: n,
            batch,
            target_prompt_tokens: target_tokens,
            prompt_words: words,
            prompt_tokens: 0,
            prompt_tokens_estimated: false,
            completion_tokens: 0,
            deltas: 0,
            sent_s: 0.0,
            first_token_s: None,
            last_token_s: None,
            finish_reason: None,
            inter_delta_s: Vec::new(),
            error: None,
        };
        let requests = (0..n).map(|_| self.measure(origin, words, max_tokens, template.clone()));
        futures_util::future::join_all(requests).await
    }
}

/// Learns tokens per word from `usage.prompt_tokens` (after one warm-up request).
pub(crate) async fn calibrate(
    target: &Target,
    log: &mut Vec<Measurement>,
) -> anyhow::Result<Tokenization> {
    let warm = target.batch(Phase::Calibration, 0, 1, 0, 8, 2).await;
    if let Some(e) = warm.iter().find_map(|m| m.error.clone()) {
        bail!("the server did not answer a first request: {e}");
    }
    log.extend(warm);
    let (short_words, long_words) = (16u32, 256u32);
    let short = target
        .batch(Phase::Calibration, 1, 1, 0, short_words, 1)
        .await;
    let long = target
        .batch(Phase::Calibration, 2, 1, 0, long_words, 1)
        .await;
    let tokens = |b: &[Measurement]| b.first().filter(|m| m.ok()).map(|m| m.prompt_tokens);
    let (mut a, mut b) = (tokens(&short), tokens(&long));
    if a.unwrap_or(0) == 0 || b.unwrap_or(0) == 0 {
        // No usage in streams: ask without streaming.
        a = target.plain_prompt_tokens(short_words).await;
        b = target.plain_prompt_tokens(long_words).await;
        if a.is_some() && b.is_some() {
            eprintln!(
                "  the server reports no usage in streams: prompt tokens of later requests are estimated from a calibration without streaming"
            );
        }
    }
    let result = match (a, b) {
        (Some(a), Some(b)) if a > 0 && b > a => {
            let per_word = f64::from(b - a) / f64::from(long_words - short_words);
            Tokenization {
                tokens_per_word: per_word,
                overhead_tokens: (f64::from(a) - per_word * f64::from(short_words)).max(0.0),
                from_usage: true,
            }
        }
        _ => {
            eprintln!(
                "warning: the server reports no usage.prompt_tokens; assuming 4 characters per token"
            );
            Tokenization {
                tokens_per_word: 7.0 / 4.0,
                overhead_tokens: 12.0,
                from_usage: false,
            }
        }
    };
    log.extend(short);
    log.extend(long);
    Ok(result)
}

/// Fills in the prompt tokens the server did not report.
fn estimate_prompt_tokens(log: &mut [Measurement], tok: &Tokenization) {
    for m in log.iter_mut().filter(|m| m.prompt_tokens == 0 && m.ok()) {
        m.prompt_tokens = tok.tokens_of(m.prompt_words);
        m.prompt_tokens_estimated = true;
    }
}

/// Everything one profiling run produced.
#[derive(Debug, Serialize)]
pub(crate) struct ProfileOutcome {
    pub(crate) command: String,
    pub(crate) url: String,
    pub(crate) model: String,
    pub(crate) tokenization: Tokenization,
    pub(crate) fit: FitReport,
    pub(crate) levels: Vec<LevelStats>,
    pub(crate) profile: ExpertProfile,
    pub(crate) measurements: Vec<Measurement>,
}

/// What one concurrency level showed.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LevelStats {
    pub(crate) concurrency: u32,
    pub(crate) requests: usize,
    pub(crate) failed: usize,
    pub(crate) ttft_median_s: f64,
    pub(crate) inter_token_median_s: f64,
    /// Output tokens per second over the batch (first send to last token), mean of batches.
    pub(crate) tokens_per_s: f64,
    /// Most answers decoding at the same moment.
    pub(crate) peak_decoding: u32,
}

/// Measures the server at `args.url` and fits its profile.
pub(crate) async fn profile(args: &ProfileArgs) -> anyhow::Result<ProfileOutcome> {
    let extra = match &args.extra_body {
        None => Map::new(),
        Some(text) => match serde_json::from_str(text).context("--extra-body")? {
            Value::Object(map) => map,
            _ => bail!("--extra-body must be a JSON object"),
        },
    };
    let api_key = match &args.api_key_env {
        None => None,
        Some(var) => Some(std::env::var(var).with_context(|| format!("--api-key-env {var}"))?),
    };
    let target = Target::new(
        &args.url,
        &args.model,
        api_key,
        extra,
        args.output_tokens,
        args.timeout_s,
        args.seed,
    )?;
    let mut log = Vec::new();
    eprintln!(
        "profiling {} ({}): calibrating prompt sizes",
        args.url, args.model
    );
    let tok = calibrate(&target, &mut log).await?;
    eprintln!(
        "  {:.2} tokens per word, {:.0} tokens of template{}",
        tok.tokens_per_word,
        tok.overhead_tokens,
        if tok.from_usage { "" } else { " (assumed)" }
    );
    let mut lengths = args.prompt_tokens.clone();
    lengths.sort_unstable();
    lengths.dedup();
    let mut batch = 0;
    for rep in 0..args.repetitions {
        for &p in &lengths {
            eprintln!(
                "  phase 2 (prefill, decode): prompt {p} tokens, repetition {}/{}",
                rep + 1,
                args.repetitions
            );
            let words = tok.words_for(p);
            log.extend(
                target
                    .batch(Phase::Prefill, batch, 1, p, words, target.output_tokens)
                    .await,
            );
            batch += 1;
        }
    }
    estimate_prompt_tokens(&mut log, &tok);
    let prefill_points: Vec<(f64, f64)> = log
        .iter()
        .filter(|m| m.phase == Phase::Prefill && m.ok() && m.prompt_tokens > 0)
        .filter_map(|m| Some((f64::from(m.prompt_tokens), m.ttft_s()?)))
        .collect();
    let prefill = fit::prefill(&prefill_points).context(
        "cannot fit the prefill speed: no prefill request succeeded (see the errors in the measurements)",
    )?;
    let decode_points: Vec<(f64, f64)> = log
        .iter()
        .filter(|m| m.phase == Phase::Prefill)
        .filter_map(|m| {
            let (_, _, itl) = m.decode()?;
            let ctx = f64::from(m.prompt_tokens) + f64::from(m.completion_tokens) / 2.0;
            Some((ctx, itl))
        })
        .collect();
    let decode = fit::decode(&decode_points).context(
        "cannot fit the decode step: no answer of at least 4 tokens at concurrency 1 (raise --output-tokens, or make the server ignore end-of-sequence with --extra-body)",
    )?;
    let cp = args
        .concurrency_prompt_tokens
        .unwrap_or_else(|| lengths.first().copied().unwrap_or(32));
    let words = tok.words_for(cp);
    let mut levels_sorted = args.concurrency.clone();
    levels_sorted.sort_unstable();
    levels_sorted.dedup();
    let mut batch = 0;
    let mut batches: Vec<Vec<Measurement>> = Vec::new();
    for &c in &levels_sorted {
        for rep in 0..args.repetitions {
            eprintln!(
                "  phase 3 (concurrency): {c} at once, repetition {}/{}",
                rep + 1,
                args.repetitions
            );
            let mut measured = target
                .batch(
                    Phase::Concurrency,
                    batch,
                    c,
                    cp,
                    words,
                    target.output_tokens,
                )
                .await;
            estimate_prompt_tokens(&mut measured, &tok);
            batches.push(measured);
            batch += 1;
        }
    }
    let mut concurrency_points = Vec::new();
    let mut levels = Vec::new();
    for &c in &levels_sorted {
        let of_level: Vec<&Vec<Measurement>> = batches
            .iter()
            .filter(|b| b.first().is_some_and(|m| m.concurrency == c))
            .collect();
        let mut peak = 0;
        let mut rates = Vec::new();
        let mut ttfts = Vec::new();
        let mut itls = Vec::new();
        let (mut requests, mut failed) = (0, 0);
        for b in &of_level {
            requests += b.len();
            failed += b.iter().filter(|m| !m.ok()).count();
            let intervals: Vec<fit::DecodeInterval> = b
                .iter()
                .filter_map(|m| {
                    let (f, l, itl) = m.decode()?;
                    Some(fit::DecodeInterval {
                        first_s: f,
                        last_s: l,
                        prompt_tokens: f64::from(m.prompt_tokens),
                        output_tokens: f64::from(m.completion_tokens),
                        inter_token_s: itl,
                    })
                })
                .collect();
            peak = peak.max(fit::peak_overlap(&intervals));
            concurrency_points.extend(fit::batch_points(
                &intervals,
                prefill.stall_model(),
                decode.t0_s / 2.0,
            ));
            ttfts.extend(b.iter().filter_map(Measurement::ttft_s));
            itls.extend(intervals.iter().map(|i| i.inter_token_s));
            let tokens: f64 = b
                .iter()
                .filter(|m| m.ok())
                .map(|m| f64::from(m.completion_tokens))
                .sum();
            let end = b
                .iter()
                .filter_map(|m| m.last_token_s)
                .fold(0.0f64, f64::max);
            if end > 0.0 {
                rates.push(tokens / end);
            }
        }
        levels.push(LevelStats {
            concurrency: c,
            requests,
            failed,
            ttft_median_s: fit::median(&mut ttfts),
            inter_token_median_s: fit::median(&mut itls),
            tokens_per_s: fit::mean(&rates),
            peak_decoding: peak,
        });
    }
    for b in batches {
        log.extend(b);
    }
    let concurrency = fit::concurrency(&concurrency_points, decode.t0_s, decode.e_s_per_ctx_token);
    let observed_slots = levels
        .iter()
        .map(|l| l.peak_decoding)
        .max()
        .unwrap_or(1)
        .max(1);
    let largest_context = log
        .iter()
        .filter(|m| m.ok())
        .map(|m| u64::from(m.prompt_tokens) + u64::from(m.completion_tokens))
        .max()
        .unwrap_or(0);
    let kv_tokens = args.kv_tokens.unwrap_or(largest_context.max(2));
    let failed = log.iter().filter(|m| !m.ok()).count();
    let fit = FitReport {
        prefill,
        decode,
        concurrency,
        observed_slots,
        highest_level: levels_sorted.last().copied().unwrap_or(1),
        kv_tokens_measured: args.kv_tokens.is_none(),
        requests: log.len(),
        failed,
    };
    let name = args.name.clone().unwrap_or_else(|| args.model.clone());
    let profile = ExpertProfile {
        name: name.clone(),
        model: args
            .quality_model
            .clone()
            .unwrap_or_else(|| args.model.clone()),
        hardware: args.hardware.clone(),
        source: format!(
            "measured by `qosroute profile` at {} (model {}): {} requests; MAPE prefill {}, decode {}, concurrency {}",
            args.url,
            args.model,
            fit.requests,
            pct(fit.prefill.mape),
            pct(fit.decode.mape),
            pct(fit.concurrency.mape)
        ),
        max_slots: observed_slots,
        kv_tokens,
        latency: LatencyModel {
            prefill_tok_s: fit.prefill.prefill_tok_s,
            prefill_overhead_s: fit.prefill.overhead_s,
            decode_t0_s: fit.decode.t0_s,
            decode_d_s_per_seq: fit.concurrency.d_s_per_seq,
            decode_e_s_per_ctx_token: fit.decode.e_s_per_ctx_token,
        },
    };
    profile
        .validate()
        .context("the fitted profile is not usable")?;
    Ok(ProfileOutcome {
        command: command_line(),
        url: args.url.clone(),
        model: args.model.clone(),
        tokenization: tok,
        fit,
        levels,
        profile,
        measurements: log,
    })
}

fn command_line() -> String {
    let mut words = vec!["qosroute".to_owned()];
    words.extend(std::env::args().skip(1).map(|a| {
        if a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=.,:/".contains(c))
        {
            a
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    }));
    words.join(" ")
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.1} %", v * 100.0)
    } else {
        "n/a".into()
    }
}

/// The fit, for the header and the JSON.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FitReport {
    pub(crate) prefill: fit::PrefillFit,
    pub(crate) decode: fit::DecodeFit,
    pub(crate) concurrency: fit::ConcurrencyFit,
    /// Most answers decoded at the same moment, over every concurrency batch.
    pub(crate) observed_slots: u32,
    /// The highest concurrency level tried.
    pub(crate) highest_level: u32,
    /// Whether `kv_tokens` is the largest context served (not given by the user).
    pub(crate) kv_tokens_measured: bool,
    pub(crate) requests: usize,
    pub(crate) failed: usize,
}

// -------------------------------------------------------------------------------------------
// Output.

#[derive(Serialize)]
struct ProfileFile<'a> {
    name: String,
    description: String,
    expert: [&'a ExpertProfile; 1],
}

/// FILE.toml → FILE.measurements.json.
pub(crate) fn measurements_path(out: &Path) -> PathBuf {
    out.with_extension("measurements.json")
}

/// The catalogue text: a comment header, then a one-expert catalogue.
pub(crate) fn profile_toml(outcome: &ProfileOutcome) -> anyhow::Result<String> {
    let f = &outcome.fit;
    let p = &outcome.profile;
    let mut head = String::new();
    let _ = writeln!(head, "# Expert profile measured by `qosroute profile`.");
    let _ = writeln!(head, "#   {}", outcome.command);
    let _ = writeln!(
        head,
        "# Server {} (model {}); {} requests ({} failed); prompts sized at {:.2} tokens per word + {:.0} template tokens{}.",
        outcome.url,
        outcome.model,
        f.requests,
        f.failed,
        outcome.tokenization.tokens_per_word,
        outcome.tokenization.overhead_tokens,
        if outcome.tokenization.from_usage {
            " (from usage.prompt_tokens)"
        } else {
            " (assumed: no usage reported)"
        }
    );
    let _ = writeln!(head, "#");
    let _ = writeln!(
        head,
        "# Fit (MAPE = mean absolute percentage error of the fitted term on its own measurements):"
    );
    let pf = &f.prefill;
    let proportional = format!(
        "proportional fit p / {:.0} tok/s (all prompt tokens / all TTFTs), MAPE {}; relative-error fit p / {:.0} tok/s, MAPE {}",
        pf.proportional_tok_s,
        pct(pf.proportional_mape),
        pf.relative_tok_s,
        pct(pf.relative_mape)
    );
    match pf.fallback {
        None => {
            let _ = writeln!(
                head,
                "#   prefill_overhead_s/tok_s TTFT = a + p / r (least absolute deviations), concurrency 1, {} points: {:.4} s + p / {:.0} tok/s, MAPE {} ({proportional})",
                pf.points,
                pf.overhead_s,
                pf.prefill_tok_s,
                pct(pf.mape)
            );
        }
        Some(why) => {
            let _ = writeln!(
                head,
                "#   prefill_overhead_s/tok_s TTFT = p / r (all prompt tokens / all TTFTs), overhead 0, concurrency 1, {} points: p / {:.0} tok/s, MAPE {}: the affine fit a + p / r ({:.4} s + p / {:.0} tok/s, MAPE {}) is not written: {why} (relative-error fit p / {:.0} tok/s, MAPE {})",
                pf.points,
                pf.prefill_tok_s,
                pct(pf.mape),
                pf.affine_intercept_s,
                pf.affine_tok_s,
                pct(pf.affine_mape),
                pf.relative_tok_s,
                pct(pf.relative_mape)
            );
        }
    }
    let _ = writeln!(
        head,
        "#   decode_t0_s, decode_e    inter-token time = t0 + e * context, concurrency 1, {} points: MAPE {}{}",
        f.decode.points,
        pct(f.decode.mape),
        if f.decode.e_clamped {
            " (e fitted negative, set to 0)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        head,
        "#   decode_d_s_per_seq       inter-token time = t0 + d * (b - 1) + e * C over overlapping answers, {} points: MAPE {}{}",
        f.concurrency.points,
        pct(f.concurrency.mape),
        if f.concurrency.points == 0 {
            " (no two answers were ever decoded together: d not identifiable, set to 0)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        head,
        "#   max_slots                peak answers decoding at once: {}{}",
        f.observed_slots,
        if f.observed_slots >= f.highest_level {
            format!(
                " = the highest level tried ({}): the limit may be higher",
                f.highest_level
            )
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        head,
        "#   kv_tokens                {}",
        if f.kv_tokens_measured {
            "largest context served during profiling (a lower bound; pass --kv-tokens)"
        } else {
            "given with --kv-tokens"
        }
    );
    let _ = writeln!(head, "#");
    let _ = writeln!(
        head,
        "# concurrency  requests  failed  TTFT median s  inter-token median s  tokens/s  peak decoding"
    );
    for l in &outcome.levels {
        let _ = writeln!(
            head,
            "# {:>11}  {:>8}  {:>6}  {:>13.4}  {:>20.5}  {:>8.1}  {:>13}",
            l.concurrency,
            l.requests,
            l.failed,
            l.ttft_median_s,
            l.inter_token_median_s,
            l.tokens_per_s,
            l.peak_decoding
        );
    }
    let _ = writeln!(head, "#");
    let _ = writeln!(
        head,
        "# Raw measurements: the .measurements.json beside this file. The SLO table is the default."
    );
    let file = ProfileFile {
        name: format!("profile-{}", p.name),
        description: format!("{} as measured by qosroute profile", p.name),
        expert: [p],
    };
    let body = toml::to_string(&file).context("cannot write the profile as TOML")?;
    let text = format!("{head}\n{body}");
    // What is written must load as a catalogue.
    Catalogue::parse(&text, "the generated profile").context("the generated profile")?;
    Ok(text)
}

fn write_profile(args: &ProfileArgs, outcome: &ProfileOutcome) -> anyhow::Result<()> {
    let text = profile_toml(outcome)?;
    crate::write_output(&args.out, text)?;
    crate::write_output(
        &measurements_path(&args.out),
        serde_json::to_string_pretty(outcome)? + "\n",
    )
}

fn print_summary(outcome: &ProfileOutcome) {
    let l = &outcome.profile.latency;
    let f = &outcome.fit;
    eprintln!(
        "{}: prefill {:.4} s + p / {:.0} tok/s (MAPE {}{}), t0 {:.5} s, e {:.3e} s/token (MAPE {}), d {:.5} s/seq (MAPE {}), max_slots {}, kv_tokens {}",
        outcome.profile.name,
        l.prefill_overhead_s,
        l.prefill_tok_s,
        pct(f.prefill.mape),
        match f.prefill.fallback {
            Some(why) => format!("; affine fit not used: {why}"),
            None => String::new(),
        },
        l.decode_t0_s,
        l.decode_e_s_per_ctx_token,
        pct(f.decode.mape),
        l.decode_d_s_per_seq,
        pct(f.concurrency.mape),
        outcome.profile.max_slots,
        outcome.profile.kv_tokens
    );
}

// -------------------------------------------------------------------------------------------
// The fitting math: pure functions.

pub(crate) mod fit;

#[cfg(test)]
mod tests;
