//! The running swarm: one polling task per device, one scheduler publishing the workload, and
//! the shared records they fill in.
//!
//! rumqttc's rule (never await a publish from the task that polls the event loop) holds by
//! construction: the scheduler and the pollers only use the `try_*` calls, so a device whose
//! connection is down can never stall the others; what does not fit its queue is `not_sent`.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use qosroute_proto::{self as proto, Encoding, Reply};
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::SwarmConfig;
use crate::record::{Outcome, RequestRecord, SwarmRequest, UnexpectedReplies};
use crate::report::SwarmReport;
use crate::truth::QualityTruth;
use crate::{MAX_PROMPT_TOKENS, SwarmError};

/// Distinct expert names recorded at most (more are not attributed).
const MAX_EXPERTS: usize = 1024;
/// How often the finishing run checks whether every request has ended.
const DONE_CHECK: Duration = Duration::from_millis(20);
/// How long a device gets to send DISCONNECT at the end.
const DISCONNECT_GRACE: Duration = Duration::from_millis(500);

/// Live counters of a running swarm (see [`Swarm::progress`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SwarmProgress {
    /// Seconds since the first request was due.
    pub elapsed_s: f64,
    /// When the last request is due, seconds after the first.
    pub planned_s: f64,
    /// Requests in the workload.
    pub requests: u64,
    /// Requests published so far.
    pub published: u64,
    /// Requests that could not be published (queue full or stopped).
    pub not_sent: u64,
    /// Requests that got their final or error reply.
    pub ended: u64,
    /// Of those, completed (final reply).
    pub completed: u64,
    /// Of those, errors.
    pub errors: u64,
    /// Completed requests that missed their SLO.
    pub slo_violations: u64,
    /// Sum of the realised QoS of ended requests whose QoS is known (errors earn 0).
    pub qos_sum: f64,
    /// Ended requests whose QoS is known.
    pub qos_count: u64,
    /// Requests with more than one final-or-error reply.
    pub duplicated: u64,
    /// Replies not attributable to a request (or misaddressed).
    pub unexpected: u64,
    /// Device connections established (reconnects included).
    pub connections: u64,
    /// Failed polls of device connections.
    pub connection_errors: u64,
    /// The run is over (the report is ready).
    pub finished: bool,
}

impl SwarmProgress {
    /// Published requests still waiting for their end.
    pub fn in_flight(&self) -> u64 {
        self.published.saturating_sub(self.ended)
    }

    /// Mean realised QoS of the ended requests so far (NaN before any).
    pub fn avg_qos(&self) -> f64 {
        if self.qos_count == 0 {
            f64::NAN
        } else {
            self.qos_sum / self.qos_count as f64
        }
    }
}

/// Mutable state shared by the scheduler and the pollers.
#[derive(Debug)]
struct State {
    /// When the first request was due (set when publishing starts).
    epoch: Option<Instant>,
    records: Vec<RequestRecord>,
    experts: Vec<String>,
    unexpected: UnexpectedReplies,
    progress: SwarmProgress,
    feedback_sent: u64,
    feedback_dropped: u64,
    last_error: String,
}

#[derive(Debug)]
struct Shared {
    config: SwarmConfig,
    tag: String,
    /// `{tag}-`: the prefix of every request id of this run.
    id_prefix: String,
    truth: Option<QualityTruth>,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a panic elsewhere; the counters are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One simulated device: its MQTT client and topics.
#[derive(Debug)]
struct Device {
    client: AsyncClient,
    request_topic: String,
    feedback_topic: String,
    response_topic: String,
}

/// A running swarm. Dropping it without [`Swarm::finish`] stops it at once.
#[derive(Debug)]
pub struct Swarm {
    shared: Arc<Shared>,
    stop_publishing: CancellationToken,
    stop_now: CancellationToken,
    task: Option<JoinHandle<SwarmReport>>,
}

/// The prompt text devices send: filler words, sliced to the request's length (ASCII, so any
/// byte length is a valid UTF-8 string).
fn prompt_text() -> String {
    const FILLER: &str =
        "the quick brown fox jumps over the lazy dog and asks the edge a question ";
    FILLER
        .chars()
        .cycle()
        .take(proto::MAX_PROMPT_BYTES)
        .collect()
}

fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // splitmix64 of the time and the process id: distinct runs get distinct tags.
    let mut z = nanos ^ (u64::from(std::process::id()) << 32);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    format!("{:08x}", (z ^ (z >> 31)) as u32)
}

/// Whether request `i` is sent in postcard: `share` of the requests, spread evenly.
fn is_postcard(i: usize, share: f64) -> bool {
    ((i + 1) as f64 * share).floor() > (i as f64 * share).floor()
}

fn encoding_topic(base: &str, encoding: Encoding) -> String {
    match encoding {
        Encoding::Postcard => format!("{base}/pc"),
        Encoding::Json => base.to_owned(),
    }
}

impl Swarm {
    /// Connects the devices (each subscribed to its response topic, within
    /// `config.connect_timeout`), then starts publishing `requests` in real time; the first
    /// request is due at once if its arrival is 0. Must run inside a Tokio runtime.
    pub async fn start(
        config: SwarmConfig,
        requests: &[SwarmRequest],
        truth: Option<QualityTruth>,
    ) -> Result<Swarm, SwarmError> {
        config.validate()?;
        tokio::runtime::Handle::try_current().map_err(|_| SwarmError::NoRuntime)?;
        if u32::try_from(requests.len()).is_err() {
            return Err(SwarmError::TooManyRequests(requests.len()));
        }
        let tag = run_tag();
        let records: Vec<RequestRecord> = requests
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let encoding = if is_postcard(i, config.postcard_share) {
                    Encoding::Postcard
                } else {
                    Encoding::Json
                };
                let mut record =
                    RequestRecord::new(i as u32, (i % config.devices) as u32, encoding, r);
                record.scheduled_s = (r.arrival_s / config.speed).max(0.0);
                record.slo_s_per_token = config.judging_slo(r.task);
                record
            })
            .collect();
        let planned_s = records.iter().map(|r| r.scheduled_s).fold(0.0, f64::max);
        let progress = SwarmProgress {
            planned_s,
            requests: records.len() as u64,
            ..SwarmProgress::default()
        };
        let shared = Arc::new(Shared {
            id_prefix: format!("{tag}-"),
            tag,
            truth,
            state: Mutex::new(State {
                epoch: None,
                records,
                experts: Vec::new(),
                unexpected: UnexpectedReplies::default(),
                progress,
                feedback_sent: 0,
                feedback_dropped: 0,
                last_error: "none".into(),
            }),
            config,
        });
        let stop_now = CancellationToken::new();
        let stop_pollers = CancellationToken::new();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
        let mut devices = Vec::with_capacity(shared.config.devices);
        let mut pollers = Vec::with_capacity(shared.config.devices);
        for k in 0..shared.config.devices {
            let name = format!("{}-{}-{k}", shared.config.device_prefix, shared.tag);
            let options = match shared.config.mqtt_options(&name) {
                Ok(o) => o,
                Err(e) => {
                    stop_pollers.cancel();
                    return Err(e);
                }
            };
            let (client, eventloop) = AsyncClient::new(options, shared.config.queue_capacity);
            let site = &shared.config.site;
            let device = Arc::new(Device {
                client,
                request_topic: format!("qosroute/v1/{site}/req/{name}"),
                feedback_topic: format!("qosroute/v1/{site}/feedback/{name}"),
                response_topic: format!("qosroute-swarm/{site}/{}/{name}", shared.tag),
            });
            pollers.push(tokio::spawn(poll_device(
                shared.clone(),
                k,
                device.clone(),
                eventloop,
                ready_tx.clone(),
                stop_pollers.clone(),
            )));
            devices.push(device);
        }
        drop(ready_tx);
        let deadline = Instant::now() + shared.config.connect_timeout;
        let mut ready = 0;
        while ready < devices.len() {
            match tokio::time::timeout_at(deadline, ready_rx.recv()).await {
                Ok(Some(_)) => ready += 1,
                Ok(None) | Err(_) => break,
            }
        }
        if ready < devices.len() {
            stop_pollers.cancel();
            for p in pollers {
                let _ = p.await;
            }
            return Err(SwarmError::Connect {
                ready,
                devices: devices.len(),
                within_s: shared.config.connect_timeout.as_secs_f64(),
                last_error: shared.lock().last_error.clone(),
            });
        }
        let stop_publishing = CancellationToken::new();
        let task = tokio::spawn(run(
            shared.clone(),
            devices,
            pollers,
            stop_publishing.clone(),
            stop_now.clone(),
            stop_pollers,
        ));
        Ok(Swarm {
            shared,
            stop_publishing,
            stop_now,
            task: Some(task),
        })
    }

    /// Starts, then finishes: the whole run.
    pub async fn run(
        config: SwarmConfig,
        requests: &[SwarmRequest],
        truth: Option<QualityTruth>,
    ) -> Result<SwarmReport, SwarmError> {
        Swarm::start(config, requests, truth).await?.finish().await
    }

    /// The run's tag: in every request id (`{tag}-{index}`) and device name.
    pub fn run_tag(&self) -> &str {
        &self.shared.tag
    }

    /// A snapshot of the live counters.
    pub fn progress(&self) -> SwarmProgress {
        let state = self.shared.lock();
        let mut p = state.progress;
        if !p.finished {
            p.elapsed_s = state.epoch.map_or(0.0, |e| e.elapsed().as_secs_f64());
        }
        p
    }

    /// Publishes no more requests; those in flight still get until their reply timeout.
    pub fn stop_publishing(&self) {
        self.stop_publishing.cancel();
    }

    /// Stops at once: no more publishing, no more waiting (requests in flight count as lost).
    pub fn stop(&self) {
        self.stop_publishing.cancel();
        self.stop_now.cancel();
    }

    /// Waits for the end of the run (every request ended or timed out, then the linger) and
    /// returns its report.
    pub async fn finish(mut self) -> Result<SwarmReport, SwarmError> {
        let Some(task) = self.task.take() else {
            return Err(SwarmError::Task("already finished".into()));
        };
        task.await.map_err(|e| SwarmError::Task(e.to_string()))
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if self.task.is_some() {
            self.stop();
        }
    }
}

/// Polls one device's event loop until `stop`: reconnects with back-off, (re)subscribes its
/// response topic after every session-less CONNACK, records replies, sends feedback.
async fn poll_device(
    shared: Arc<Shared>,
    k: usize,
    device: Arc<Device>,
    mut eventloop: EventLoop,
    ready: mpsc::UnboundedSender<usize>,
    stop: CancellationToken,
) {
    let config = &shared.config;
    let mut delay = config.reconnect_min;
    let mut subscribe = false;
    let mut announced = false;
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                delay = config.reconnect_min;
                shared.lock().progress.connections += 1;
                if !ack.session_present || !announced {
                    subscribe = true;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = ack
                    .return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_)));
                if granted && !announced {
                    announced = true;
                    let _ = ready.send(k);
                } else if !granted {
                    shared.lock().last_error = format!(
                        "the broker refused the subscription to {}: {:?}",
                        device.response_topic, ack.return_codes
                    );
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if let Some(feedback) = on_reply(&shared, k, &publish) {
                    send_feedback(&shared, &device, feedback);
                }
            }
            Ok(_) => {}
            Err(error) => {
                {
                    let mut state = shared.lock();
                    state.progress.connection_errors += 1;
                    state.last_error = error.to_string();
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(config.reconnect_max);
            }
        }
        if subscribe
            && device
                .client
                .try_subscribe(device.response_topic.clone(), QoS::AtLeastOnce)
                .is_ok()
        {
            subscribe = false;
        }
    }
    // Say goodbye: DISCONNECT, polled out within a grace period.
    if device.client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let _ = on_reply(&shared, k, &publish);
                    }
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// A rating to send after a final reply.
struct FeedbackToSend {
    id: String,
    score: f32,
    encoding: Encoding,
}

fn decode(publish: &Publish) -> Option<Reply> {
    let announced = publish
        .properties
        .as_ref()
        .and_then(|p| p.content_type.as_deref())
        .and_then(Encoding::from_content_type);
    match announced {
        Some(e) => proto::decode_reply(&publish.payload, e).ok(),
        None => proto::decode_reply(&publish.payload, Encoding::Json)
            .or_else(|_| proto::decode_reply(&publish.payload, Encoding::Postcard))
            .ok(),
    }
}

fn intern(experts: &mut Vec<String>, name: &str) -> Option<u16> {
    if let Some(i) = experts.iter().position(|e| e == name) {
        return u16::try_from(i).ok();
    }
    if experts.len() >= MAX_EXPERTS {
        return None;
    }
    experts.push(name.to_owned());
    u16::try_from(experts.len() - 1).ok()
}

/// Records one reply received by device `device`; returns the feedback to send, if any.
fn on_reply(shared: &Shared, device: usize, publish: &Publish) -> Option<FeedbackToSend> {
    let reply = decode(publish);
    let digest = fnv1a(&publish.payload);
    let mut guard = shared.lock();
    let State {
        epoch,
        records,
        experts,
        unexpected,
        progress,
        ..
    } = &mut *guard;
    let Some(reply) = reply else {
        unexpected.undecodable += 1;
        progress.unexpected += 1;
        return None;
    };
    let id = reply.id().as_str();
    if id.is_empty() {
        unexpected.no_id += 1;
        progress.unexpected += 1;
        return None;
    }
    let index = id
        .strip_prefix(&shared.id_prefix)
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&i| i < records.len() && id == format!("{}{i}", shared.id_prefix));
    let Some(index) = index else {
        unexpected.unknown_id += 1;
        progress.unexpected += 1;
        return None;
    };
    let (Some(epoch), Some(_)) = (*epoch, records[index].published_s) else {
        unexpected.before_publish += 1;
        progress.unexpected += 1;
        return None;
    };
    let now = epoch.elapsed().as_secs_f64();
    let correlation = publish
        .properties
        .as_ref()
        .and_then(|p| p.correlation_data.as_deref());
    if correlation != Some(id.as_bytes()) {
        unexpected.correlation_mismatch += 1;
        progress.unexpected += 1;
    }
    let r = &mut records[index];
    if r.device as usize != device {
        unexpected.wrong_device += 1;
        progress.unexpected += 1;
    }
    match &reply {
        Reply::Chunk(c) => {
            if r.ends > 0 {
                r.replies_after_end = r.replies_after_end.saturating_add(1);
                return None;
            }
            if c.seq != r.chunks {
                r.chunk_gaps = r.chunk_gaps.saturating_add(1);
            }
            r.chunks = r.chunks.saturating_add(1);
            r.first_chunk_s.get_or_insert(now);
            if !c.text.is_empty() {
                r.last_token_s = Some(now);
            }
            if r.expert.is_none() {
                r.expert = intern(experts, c.expert.as_str());
            }
            None
        }
        Reply::Final(f) => {
            if !r.end_arrived(digest) {
                return None;
            }
            if r.ends > 1 {
                if r.ends == 2 {
                    progress.duplicated += 1;
                }
                return None;
            }
            r.ended_s = Some(now);
            r.outcome = Outcome::Completed;
            r.expert = intern(experts, f.expert.as_str()).or(r.expert);
            r.output_tokens = Some(f.output_tokens);
            r.gateway_ttft_ms = Some(f.ttft_ms);
            r.gateway_total_ms = Some(f.total_ms);
            r.s_per_token = Some(f.s_per_token);
            r.gateway_slo_met = Some(f.slo_met);
            r.judge();
            r.quality = match (&shared.truth, r.quality_row) {
                (Some(truth), Some(row)) => truth.quality(row, f.expert.as_str()),
                _ => None,
            };
            progress.ended += 1;
            progress.completed += 1;
            if r.slo_met != Some(true) {
                progress.slo_violations += 1;
            }
            if let Some(qos) = r.qos() {
                progress.qos_sum += qos;
                progress.qos_count += 1;
            }
            match r.quality {
                Some(score) if shared.config.feedback => Some(FeedbackToSend {
                    id: id.to_owned(),
                    score,
                    encoding: r.encoding,
                }),
                _ => None,
            }
        }
        Reply::Error(e) => {
            if !r.end_arrived(digest) {
                return None;
            }
            if r.ends > 1 {
                if r.ends == 2 {
                    progress.duplicated += 1;
                }
                return None;
            }
            r.ended_s = Some(now);
            r.outcome = Outcome::Error(e.code);
            progress.ended += 1;
            progress.errors += 1;
            if shared.truth.is_some() {
                progress.qos_count += 1;
            }
            None
        }
    }
}

fn send_feedback(shared: &Shared, device: &Device, f: FeedbackToSend) {
    let sent = proto::Feedback::new(&f.id, f.score.clamp(0.0, 1.0))
        .ok()
        .and_then(|feedback| {
            let mut buf = vec![0u8; 256];
            let n = proto::encode_feedback(&feedback, f.encoding, &mut buf).ok()?;
            buf.truncate(n);
            let properties = PublishProperties {
                content_type: Some(f.encoding.content_type().to_owned()),
                ..PublishProperties::default()
            };
            device
                .client
                .try_publish_with_properties(
                    encoding_topic(&device.feedback_topic, f.encoding),
                    QoS::AtLeastOnce,
                    false,
                    buf,
                    properties,
                )
                .ok()
        })
        .is_some();
    let mut state = shared.lock();
    if sent {
        state.feedback_sent += 1;
    } else {
        state.feedback_dropped += 1;
    }
}

/// The prompt a device sends for request `id` of `tokens` tokens with
/// [`SwarmConfig::unique_prompts`](crate::SwarmConfig::unique_prompts): the id, a colon and the
/// filler words, 4 bytes per token. For measuring a server directly with what devices send.
pub fn unique_prompt(id: &str, tokens: u32) -> String {
    prompt_of(&prompt_text(), id, tokens, true).into_owned()
}

/// The index of a request in its workload, from the head of its prompt sent with
/// [`SwarmConfig::unique_prompts`](crate::SwarmConfig::unique_prompts) (`{run tag}-{index}: ...`);
/// `None` for any other prompt. For a site that knows each request's answer (the demo's
/// emulated experts look up its length).
pub fn request_index(prompt_head: &str) -> Option<u32> {
    let (id, _) = prompt_head.split_once(": ")?;
    let (tag, index) = id.rsplit_once('-')?;
    if tag.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    index.parse().ok()
}

/// The prompt of a request of `tokens` tokens: that many 4-byte tokens of the filler text
/// `prompt`, or, `unique`, the request's id, a colon and filler up to the same length.
fn prompt_of<'a>(prompt: &'a str, id: &str, tokens: u32, unique: bool) -> Cow<'a, str> {
    let bytes = (tokens.min(MAX_PROMPT_TOKENS) as usize * 4).clamp(1, prompt.len());
    if unique {
        // ASCII filler: any cut is UTF-8.
        Cow::Owned(format!(
            "{id}: {}",
            &prompt[..bytes.saturating_sub(id.len() + 2)]
        ))
    } else {
        Cow::Borrowed(&prompt[..bytes])
    }
}

/// The wire request of record `r`.
fn request_of(shared: &Shared, r: &RequestRecord, prompt: &str) -> Result<Vec<u8>, SwarmError> {
    let failed = |message: String| SwarmError::Request {
        index: r.index as usize,
        message,
    };
    let id = format!("{}{}", shared.id_prefix, r.index);
    let text = prompt_of(prompt, &id, r.prompt_tokens, shared.config.unique_prompts);
    let mut request = proto::Request::new(&id, r.task, &text)
        .map_err(|e| failed(format!("{e:?}")))?
        .with_max_tokens(r.max_tokens)
        .with_stream(shared.config.stream);
    if let Some(slo) = shared.config.slo_s_per_token {
        request = request.with_slo_s_per_token(slo);
    }
    let mut buf = vec![0u8; proto::MAX_FRAME_BYTES];
    let n = proto::encode_request(&request, r.encoding, &mut buf)
        .map_err(|e| failed(format!("{e:?}")))?;
    buf.truncate(n);
    Ok(buf)
}

/// The run: publish on schedule, wait for the ends, linger, disconnect, report.
async fn run(
    shared: Arc<Shared>,
    devices: Vec<Arc<Device>>,
    pollers: Vec<JoinHandle<()>>,
    stop_publishing: CancellationToken,
    stop_now: CancellationToken,
    stop_pollers: CancellationToken,
) -> SwarmReport {
    let prompt = prompt_text();
    let epoch = Instant::now();
    let plan: Vec<RequestRecord> = {
        let mut state = shared.lock();
        state.epoch = Some(epoch);
        state.records.clone()
    };
    for r in &plan {
        let due = epoch + Duration::from_secs_f64(r.scheduled_s);
        tokio::select! {
            () = stop_publishing.cancelled() => break,
            () = tokio::time::sleep_until(due) => {}
        }
        let device = &devices[r.device as usize];
        // Requests are validated before encoding; one that does not encode is not sent.
        let Ok(payload) = request_of(&shared, r, &prompt) else {
            shared.lock().progress.not_sent += 1;
            continue;
        };
        let id = format!("{}{}", shared.id_prefix, r.index);
        let properties = PublishProperties {
            response_topic: Some(device.response_topic.clone()),
            correlation_data: Some(Bytes::from(id.into_bytes())),
            content_type: Some(r.encoding.content_type().to_owned()),
            ..PublishProperties::default()
        };
        let i = r.index as usize;
        {
            // Marked before the publish, so that no reply can find it unpublished.
            let mut state = shared.lock();
            state.records[i].published_s = Some(epoch.elapsed().as_secs_f64());
            state.records[i].outcome = Outcome::Pending;
            state.progress.published += 1;
        }
        let topic = encoding_topic(&device.request_topic, r.encoding);
        if device
            .client
            .try_publish_with_properties(topic, QoS::AtLeastOnce, false, payload, properties)
            .is_err()
        {
            let mut state = shared.lock();
            state.records[i].published_s = None;
            state.records[i].outcome = Outcome::NotSent;
            state.progress.published -= 1;
            state.progress.not_sent += 1;
        }
    }
    // Wait until every published request ended or passed its reply timeout.
    let timeout = shared.config.reply_timeout.as_secs_f64();
    while !stop_now.is_cancelled() {
        let waiting_until = {
            let state = shared.lock();
            if state.progress.ended >= state.progress.published {
                None
            } else {
                state
                    .records
                    .iter()
                    .filter(|r| r.outcome == Outcome::Pending)
                    .filter_map(|r| r.published_s)
                    .map(|t| t + timeout)
                    .reduce(f64::max)
            }
        };
        match waiting_until {
            Some(t) if t > epoch.elapsed().as_secs_f64() => {}
            _ => break,
        }
        tokio::select! {
            () = stop_now.cancelled() => break,
            () = tokio::time::sleep(DONE_CHECK) => {}
        }
    }
    if !stop_now.is_cancelled() {
        tokio::select! {
            () = stop_now.cancelled() => {}
            () = tokio::time::sleep(shared.config.linger) => {}
        }
    }
    stop_pollers.cancel();
    for p in pollers {
        let _ = p.await;
    }
    let duration_s = epoch.elapsed().as_secs_f64();
    let mut state = shared.lock();
    let unsent = state
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::NotSent)
        .count() as u64;
    for r in &mut state.records {
        if r.outcome == Outcome::Pending {
            r.outcome = Outcome::Lost;
        }
    }
    state.progress.not_sent = unsent;
    state.progress.elapsed_s = duration_s;
    state.progress.finished = true;
    SwarmReport {
        site: shared.config.site.clone(),
        run_tag: shared.tag.clone(),
        devices: shared.config.devices,
        speed: shared.config.speed,
        duration_s,
        stopped_early: stop_publishing.is_cancelled() || stop_now.is_cancelled(),
        experts: state.experts.clone(),
        records: std::mem::take(&mut state.records),
        unexpected: state.unexpected,
        connections: state.progress.connections,
        connection_errors: state.progress.connection_errors,
        feedback_sent: state.feedback_sent,
        feedback_dropped: state.feedback_dropped,
    }
}

/// Waits until a gateway answers on `config`'s site: publishes an invalid request (empty
/// prompt) every 250 ms from a probe device and returns once its error reply arrives, with
/// the time it took. The gateway counts each probe as a malformed request.
pub async fn probe_gateway(config: &SwarmConfig, within: Duration) -> Result<Duration, SwarmError> {
    config.validate()?;
    let tag = run_tag();
    let name = format!("{}-probe-{tag}", config.device_prefix);
    let mut options = config.mqtt_options(&name)?;
    options
        .set_clean_start(true)
        .set_session_expiry_interval(Some(0));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let site = &config.site;
    let response_topic = format!("qosroute-swarm/{site}/{tag}/{name}");
    let request_topic = format!("qosroute/v1/{site}/req/{name}");
    let started = Instant::now();
    let deadline = started + within;
    let mut subscribed = false;
    let mut connected = false;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut sent = 0u32;
    let answered = loop {
        let event = tokio::select! {
            () = tokio::time::sleep_until(deadline) => break false,
            _ = tick.tick(), if subscribed => {
                sent += 1;
                let payload = format!(r#"{{"v":1,"id":"probe-{sent}","prompt":"","max_tokens":1}}"#);
                let properties = PublishProperties {
                    response_topic: Some(response_topic.clone()),
                    content_type: Some(Encoding::Json.content_type().to_owned()),
                    ..PublishProperties::default()
                };
                let _ = client.try_publish_with_properties(
                    request_topic.clone(), QoS::AtLeastOnce, false, payload.into_bytes(), properties,
                );
                continue;
            }
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                let _ = client.try_subscribe(response_topic.clone(), QoS::AtLeastOnce);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => subscribed = true,
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(Reply::Error(e)) = decode(&p)
                    && e.id.as_str().starts_with("probe-")
                {
                    break true;
                }
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let took = started.elapsed();
    if client.try_disconnect().is_ok() {
        let _ = tokio::time::timeout(DISCONNECT_GRACE, async {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
    if answered {
        Ok(took)
    } else {
        Err(SwarmError::GatewayNotAnswering {
            site: config.site.clone(),
            within_s: within.as_secs_f64(),
            connected,
        })
    }
}

/// FNV-1a, 64 bits: tells a byte-identical redelivery of a reply from a second reply.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postcard_share_is_spread_evenly() {
        let count = |share: f64, n: usize| (0..n).filter(|&i| is_postcard(i, share)).count();
        assert_eq!(count(0.0, 100), 0);
        assert_eq!(count(1.0, 100), 100);
        assert_eq!(count(0.25, 100), 25);
        assert_eq!(
            (0..8).map(|i| is_postcard(i, 0.25)).collect::<Vec<_>>(),
            [false, false, false, true, false, false, false, true]
        );
    }

    #[test]
    fn prompts_are_ascii_and_long_enough() {
        let p = prompt_text();
        assert_eq!(p.len(), proto::MAX_PROMPT_BYTES);
        assert!(p.is_ascii());
    }

    #[test]
    fn unique_prompts_differ_from_their_first_byte_and_keep_their_length() {
        let filler = prompt_text();
        let shared = prompt_of(&filler, "ab-7", 20, false);
        assert_eq!(shared.len(), 80);
        assert!(filler.starts_with(shared.as_ref()));
        let a = prompt_of(&filler, "ab-7", 20, true);
        let b = prompt_of(&filler, "ab-8", 20, true);
        assert_eq!((a.len(), b.len()), (80, 80));
        assert!(a.starts_with("ab-7: the quick"), "{a}");
        assert_ne!(a.as_bytes()[3], b.as_bytes()[3]);
        // Shorter than its id: the id and nothing else is cut.
        assert_eq!(prompt_of(&filler, "ab-7", 1, true), "ab-7: ");
    }

    #[test]
    fn a_unique_prompt_names_its_request() {
        let filler = prompt_text();
        let p = prompt_of(&filler, "0badc0de-1234", 30, true);
        assert_eq!(request_index(&p), Some(1234));
        assert_eq!(request_index(&unique_prompt("a-b-7", 10)), Some(7));
        for other in [
            "the quick brown fox",
            "0badc0de-12x: q",
            "-5: q",
            "7: q",
            "",
        ] {
            assert_eq!(request_index(other), None, "{other}");
        }
    }

    #[test]
    fn run_tags_are_short_hex() {
        let t = run_tag();
        assert_eq!(t.len(), 8);
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn experts_are_interned_up_to_the_bound() {
        let mut e = Vec::new();
        assert_eq!(intern(&mut e, "a"), Some(0));
        assert_eq!(intern(&mut e, "b"), Some(1));
        assert_eq!(intern(&mut e, "a"), Some(0));
        for i in 2..MAX_EXPERTS {
            intern(&mut e, &format!("x{i}"));
        }
        assert_eq!(intern(&mut e, "one-too-many"), None);
        assert_eq!(intern(&mut e, "b"), Some(1));
    }
}
