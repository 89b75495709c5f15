//! The daemon's tasks and their lifetimes: who starts what, who stops it.
//!
//! `run` owns every task in one `JoinSet`: the MQTT event loop, the dispatcher (which owns the
//! request tasks in a `JoinSet` of its own), the expert health checker, the metrics endpoint
//! and the systemd watchdog. Signals: SIGHUP reloads the configuration through the same
//! validation as at start (a bad file changes nothing); SIGTERM or SIGINT drain: new requests
//! get a `shutting_down` reply, in-flight ones get `shutdown.drain_deadline_s` to finish, then
//! the rest are cut with an error reply, and the link is closed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context;
use qosroute_core::OnnxPolicy;
use qosroute_expert_client::{ExpertClient, ExpertEndpoint, Timeouts};
use qosroute_proto::{self as proto, Encoding, ErrorCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::{DeviceRateLimiter, RecentAnswers, RecentRequests, Seen};
use crate::config::Config;
use crate::link::{self, Incoming, Lane};
use crate::metrics::{Metrics, Outcome};
use crate::router::Router;
use crate::router_thread::RouterThread;
use crate::serve::{self, ReplyRoute};
use crate::shared::Shared;
use crate::topics::{self, TopicKind};

mod watch;
use watch::{check_experts, check_round, sample_host};

/// Done requests remembered (duplicate suppression) and answers remembered (for feedback):
/// far more than the broker can redeliver (its receive maximum is at most 65,535, twice
/// `max_in_flight` by default) at a few MB.
const REMEMBERED_REQUESTS: usize = 65_536;

fn timeouts(config: &Config) -> Timeouts {
    let t = &config.timeouts;
    Timeouts {
        connect: Duration::from_secs_f64(t.connect_s),
        first_token: Duration::from_secs_f64(t.first_token_s),
        between_tokens: Duration::from_secs_f64(t.between_tokens_s),
        total: Duration::from_secs_f64(t.total_s),
    }
}

fn build_clients(config: &Config) -> anyhow::Result<HashMap<String, ExpertClient>> {
    let mut out = HashMap::new();
    for e in &config.experts {
        let api_key = e.api_key_env.as_ref().and_then(|v| std::env::var(v).ok());
        let mut endpoint = ExpertEndpoint::new(&e.name, &e.base_url, &e.model, e.kind);
        endpoint.api_key = api_key;
        endpoint.timeouts = timeouts(config);
        // Validated within (0, 3600] s.
        endpoint.probe_timeout = Duration::try_from_secs_f64(e.health_timeout_s.min(3600.0))
            .unwrap_or(Duration::from_secs(2));
        if let Some(m) = &e.metrics {
            let mut names = e.kind.default_metric_names();
            if let Some(x) = &m.running {
                names.running = Some(x.clone());
            }
            if let Some(x) = &m.waiting {
                names.waiting = Some(x.clone());
            }
            if let Some(x) = &m.kv_usage {
                names.kv_usage = Some(x.clone());
            }
            endpoint.metric_names = names;
        }
        let client = ExpertClient::new(endpoint).with_context(|| format!("expert `{}`", e.name))?;
        out.insert(e.name.clone(), client);
    }
    Ok(out)
}

fn load_model(config: &Config) -> Option<OnnxPolicy> {
    let file = config.model_file()?;
    match OnnxPolicy::load(&file) {
        Ok(mut m) => {
            // Compile the plans of the likely graph sizes now rather than in the first
            // decisions (each costs tens of milliseconds once).
            let started = std::time::Instant::now();
            let slots: usize = config.experts.iter().map(|e| e.max_slots as usize).sum();
            let prepared = m.prepare(config.experts.len(), slots);
            tracing::info!(
                model = %file.display(),
                plans = prepared.as_ref().ok(),
                ms = started.elapsed().as_secs_f64() * 1e3,
                "learned router loaded"
            );
            if let Err(error) = prepared {
                tracing::warn!(%error, "plans could not be compiled ahead; they compile on first use");
            }
            Some(m)
        }
        Err(error) => {
            tracing::warn!(model = %file.display(), %error, fallback = %config.policy.fallback, "learned router unusable; routing with the fallback");
            None
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT and the drain that follows.
pub async fn run(path: PathBuf, config: Config) -> anyhow::Result<()> {
    let epoch = Instant::now();
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::default());
    let router = Router::new(&config, load_model(&config), epoch)?;
    tracing::info!(policy = router.policy_name(), experts = config.experts.len(), site = %config.site, "starting");
    let parts = link::connect(
        &config.broker,
        link::receive_maximum(config.admission.max_in_flight),
        metrics.clone(),
    )
    .context("broker")?;
    let link = parts.link;
    let shared = Arc::new(Shared {
        config: RwLock::new(config.clone()),
        router: RouterThread::start(router).context("the router thread")?,
        clients: RwLock::new(build_clients(&config)?),
        link: link.clone(),
        metrics: metrics.clone(),
        cut: CancellationToken::new(),
        next_key: AtomicU64::new(1),
        answered: std::sync::Mutex::new(RecentAnswers::new(REMEMBERED_REQUESTS)),
        host: std::sync::Mutex::new(None),
        recent: std::sync::Mutex::new(RecentRequests::new(
            Duration::from_secs(600),
            REMEMBERED_REQUESTS,
        )),
        serving: AtomicUsize::new(0),
    });

    let stop_link = CancellationToken::new();
    let stop_dispatch = CancellationToken::new();
    let stop_background = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let (incoming_tx, incoming_rx) = mpsc::channel(1024);
    // Know which experts are up before connecting: the broker hands over what waited in the
    // session at once, and requests decided before the first health round would all be
    // rejected (an expert never checked is not up). Bounded by the health probe timeout.
    check_round(&shared).await;
    tasks.spawn(parts.publisher);
    // Held apart from the other tasks: the drain waits for it to end after the DISCONNECT.
    let mut event_loop = tokio::spawn(link::run_event_loop(
        parts.eventloop,
        parts.subscriber,
        parts.acks,
        vec![config.request_filter(), config.feedback_filter()],
        incoming_tx,
        metrics.clone(),
        (
            Duration::from_secs_f64(config.broker.reconnect_min_s),
            Duration::from_secs_f64(config.broker.reconnect_max_s),
        ),
        stop_link.clone(),
    ));
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel();
    let mut dispatcher = tokio::spawn(dispatch(
        shared.clone(),
        incoming_rx,
        stop_dispatch.clone(),
        drained_tx,
    ));
    tasks.spawn(check_experts(shared.clone(), stop_background.clone()));
    tasks.spawn(sample_host(shared.clone(), stop_background.clone()));
    if let Some(addr) = config.metrics.listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics.listen {addr}"))?;
        // The bound address, for `listen = "...:0"` (any free port).
        let addr = listener.local_addr().unwrap_or(addr);
        tracing::info!(%addr, "metrics endpoint");
        tasks.spawn(serve_metrics(
            shared.clone(),
            listener,
            stop_background.clone(),
        ));
    }
    tasks.spawn(watchdog(stop_background.clone()));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => reload(&shared, &path).await,
            _ = terminate.recv() => break,
            r = tokio::signal::ctrl_c() => { r?; break; }
        }
    }

    // Drain.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let deadline = Duration::from_secs_f64(shared.config().shutdown.drain_deadline_s);
    tracing::info!(
        in_flight = shared
            .router
            .ask(|r| r.ledger.in_flight())
            .await
            .unwrap_or(0),
        deadline_s = deadline.as_secs_f64(),
        "draining"
    );
    stop_dispatch.cancel();
    let cut = shared.cut.clone();
    let cutter = tokio::spawn(async move {
        tokio::time::sleep(deadline).await;
        cut.cancel();
    });
    // The requests in flight finish (or are cut at the deadline); meanwhile, and until the
    // link closes, what still arrives is answered `shutting_down`.
    let _ = drained_rx.await;
    cutter.abort();
    let mut dispatched = None;
    if config.broker.session_expiry_s == 0 {
        // A clean session: nothing may arrive after the DISCONNECT, where it could not be
        // answered. UNSUBSCRIBE first; at the UNSUBACK (after every delivery the broker made)
        // the event loop closes the dispatcher's input, and the dispatcher ends once what came
        // before is answered `shutting_down`. (A persistent session keeps its subscription:
        // the broker holds what comes next for the daemon's return.)
        let filters = vec![config.request_filter(), config.feedback_filter()];
        if link.unsubscribe(filters).await.is_ok() {
            dispatched = tokio::time::timeout(Duration::from_secs(2), &mut dispatcher)
                .await
                .ok();
        }
    }
    let _ = link.disconnect().await;
    // The event loop polls on until the broker closes the connection after the DISCONNECT,
    // so the last replies and acks go out; then it ends, and with it the dispatcher's input.
    if tokio::time::timeout(Duration::from_secs(2), &mut event_loop)
        .await
        .is_err()
    {
        stop_link.cancel();
        let _ = event_loop.await;
    }
    let dispatched = match dispatched {
        Some(result) => result,
        None => dispatcher.await,
    };
    if let Err(e) = dispatched {
        tracing::error!(error = %e, "dispatcher task failed");
    }
    stop_link.cancel();
    stop_background.cancel();
    while let Some(r) = tasks.join_next().await {
        if let Err(e) = r {
            tracing::error!(error = %e, "task failed");
        }
    }
    shared.router.stop().await;
    tracing::info!(completed = metrics.outcomes(Outcome::Completed), "stopped");
    Ok(())
}

async fn reload(shared: &Shared, path: &std::path::Path) {
    let config = match Config::load(path) {
        Ok(c) => Arc::new(c),
        Err(error) => {
            tracing::error!(%error, "reload refused: the configuration in force stays");
            return;
        }
    };
    let old = shared.config();
    if config.broker != old.broker || config.site != old.site {
        tracing::warn!("broker and site changes need a restart; applying the rest");
    }
    let clients = match build_clients(&config) {
        Ok(c) => c,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "reload refused");
            return;
        }
    };
    // A new model loads (and compiles its plans) before the router is locked.
    let model = if config.policy == old.policy {
        None
    } else {
        let c = config.clone();
        tokio::task::spawn_blocking(move || load_model(&c))
            .await
            .ok()
            .flatten()
    };
    let replace_model = config.policy != old.policy;
    let c = config.clone();
    let reconfigured = shared
        .router
        .ask(move |router| router.reconfigure(&c, model, replace_model))
        .await;
    match reconfigured {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::error!(%error, "reload refused");
            return;
        }
        Err(error) => {
            tracing::error!(%error, "reload refused");
            return;
        }
    }
    if let Ok(mut c) = shared.clients.write() {
        *c = clients;
    }
    if let Ok(mut c) = shared.config.write() {
        *c = config.clone();
    }
    tracing::info!(experts = config.experts.len(), "configuration reloaded");
}

/// Decodes, admits and starts every incoming request; answers what it cannot take.
async fn dispatch(
    shared: Arc<Shared>,
    mut incoming: mpsc::Receiver<Incoming>,
    stop: CancellationToken,
    drained: tokio::sync::oneshot::Sender<()>,
) {
    let config = shared.config();
    let mut limiter = DeviceRateLimiter::new(
        config.admission.device_rate_per_s,
        config.admission.device_burst,
    );
    let mut requests: JoinSet<()> = JoinSet::new();
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => None,
            m = incoming.recv() => m,
            Some(_) = requests.join_next(), if !requests.is_empty() => continue,
        };
        let Some(message) = message else { break };
        admit(&shared, message, &mut limiter, &mut requests, false);
    }
    // Draining: in-flight requests finish (or are cut at the deadline), then `drained` is
    // told; what still arrives is answered with `shutting_down` until the link closes (the
    // daemon stays subscribed until its DISCONNECT: what the broker hands over meanwhile
    // must not go unanswered).
    let mut drained = Some(drained);
    loop {
        if requests.is_empty()
            && let Some(d) = drained.take()
        {
            let _ = d.send(());
        }
        tokio::select! {
            m = incoming.recv() => match m {
                Some(message) => admit(&shared, message, &mut limiter, &mut requests, true),
                None => break,
            },
            Some(_) = requests.join_next(), if !requests.is_empty() => {}
        }
    }
    while requests.join_next().await.is_some() {}
    if let Some(d) = drained.take() {
        let _ = d.send(());
    }
}

fn admit(
    shared: &Arc<Shared>,
    message: Incoming,
    limiter: &mut DeviceRateLimiter,
    requests: &mut JoinSet<()>,
    draining: bool,
) {
    let now = Instant::now();
    let config = shared.config();
    let topic = message.topic();
    // What is waiting to be acknowledged holds this, not the payload.
    let delivery = message.delivery();
    let Some((kind, suffix)) = topics::parse_topic(&config.site, &topic) else {
        tracing::debug!(%topic, "not a qosroute topic");
        let s = shared.clone();
        requests.spawn(async move {
            let _ = s.link.ack(delivery, Lane::Refusals).await;
        });
        return;
    };
    let props = message.properties();
    let encoding = props
        .and_then(|p| p.content_type.as_deref())
        .and_then(Encoding::from_content_type)
        .or(suffix)
        .unwrap_or(Encoding::Json);
    let device = match &kind {
        TopicKind::Request { device } | TopicKind::Feedback { device } => device.clone(),
    };
    if let TopicKind::Feedback { .. } = kind {
        let s = shared.clone();
        requests.spawn(async move {
            apply_feedback(&s, &device, &message, encoding).await;
            drop(message);
            let _ = s.link.ack(delivery, Lane::Refusals).await;
        });
        return;
    }
    let route = ReplyRoute {
        topic: props
            .and_then(|p| p.response_topic.clone())
            .unwrap_or_else(|| topics::reply_topic(&config.site, &device)),
        correlation_data: props.and_then(|p| p.correlation_data.clone()),
        encoding,
        lane: Lane::Served,
    };
    // Refusals are published after the messages of requests being served.
    let refusal = ReplyRoute {
        lane: Lane::Refusals,
        ..route.clone()
    };
    let refuse = |code: ErrorCode,
                  text: &'static str,
                  outcome: Outcome,
                  id: String,
                  requests: &mut JoinSet<()>| {
        shared.metrics.count(outcome);
        // Refused, not served: the device may send it again (the same id is a new request).
        shared.recent().forget(&device, &id);
        let s = shared.clone();
        let route = refusal.clone();
        requests.spawn(async move {
            serve::send_error(&s, &route, &id, code, text).await;
            let _ = s.link.ack(delivery, Lane::Refusals).await;
        });
    };
    let request = match proto::decode_request(&message.publish.payload, encoding) {
        Ok(r) => r,
        Err(error) => {
            let id = proto::peek_id(&message.publish.payload, encoding)
                .map(|i| i.as_str().to_owned())
                .unwrap_or_default();
            tracing::info!(device = %device, %error, "undecodable request");
            let code = error.code();
            let s = shared.clone();
            let route = refusal.clone();
            shared.metrics.count(Outcome::Malformed);
            let text = error.to_string();
            requests.spawn(async move {
                serve::send_error(&s, &route, &id, code, &text).await;
                let _ = s.link.ack(delivery, Lane::Refusals).await;
            });
            return;
        }
    };
    let id = request.id.as_str().to_owned();
    let seen = shared.recent().admit(&device, &id, now);
    match seen {
        Seen::New => {}
        Seen::InFlight => {
            // The redelivery has the packet id of the request being served, whose ack (sent
            // when its outcome is final) covers it. Acknowledging it now would let the broker
            // forget a request that is not answered yet.
            tracing::info!(device = %device, id = %id, in_flight = true, "duplicate request (redelivery) ignored");
            return;
        }
        Seen::Done => {
            tracing::info!(device = %device, id = %id, "duplicate request (redelivery) ignored");
            let s = shared.clone();
            requests.spawn(async move {
                let _ = s.link.ack(delivery, Lane::Refusals).await;
            });
            return;
        }
    }
    // After duplicates: a redelivery of a request still being served during the drain is
    // not answered `shutting_down` (the original's answer is its one reply).
    if draining {
        return refuse(
            ErrorCode::ShuttingDown,
            "the gateway is shutting down",
            Outcome::ShuttingDown,
            id,
            requests,
        );
    }
    if request.deadline_unix_ms.is_some_and(|d| d < unix_ms_now()) {
        return refuse(
            ErrorCode::Expired,
            "the request's deadline passed before it was served",
            Outcome::Expired,
            id,
            requests,
        );
    }
    if !limiter.allow(&device, now) {
        return refuse(
            ErrorCode::RateLimited,
            "this device sends faster than its rate limit",
            Outcome::RateLimited,
            id,
            requests,
        );
    }
    if shared.serving.load(Ordering::Relaxed) >= config.admission.max_in_flight {
        return refuse(
            ErrorCode::Overloaded,
            "the gateway is at capacity; retry later",
            Outcome::Shed,
            id,
            requests,
        );
    }
    if config.logging.log_prompts {
        tracing::info!(device = %device, id = %id, prompt = %request.prompt.as_str(), "request");
    } else {
        tracing::debug!(device = %device, id = %id, "request");
    }
    let place = Place::take(shared, &device, &id);
    // The task keeps what serving needs, sized to it, not the decoded request.
    let served = serve::ServedRequest::from(&request);
    drop(request);
    let s = shared.clone();
    requests.spawn(async move {
        serve::serve_request(s, delivery, served, route, now, device).await;
        drop(place);
    });
}

/// A place among `admission.max_in_flight`, held while a request is served. Dropping it (also
/// when the task panics) frees the place and records the request as done, so that a
/// redelivery from then on is acknowledged and dropped.
struct Place {
    shared: Arc<Shared>,
    device: String,
    id: String,
}

impl Place {
    fn take(shared: &Arc<Shared>, device: &str, id: &str) -> Self {
        shared.serving.fetch_add(1, Ordering::Relaxed);
        Place {
            shared: shared.clone(),
            device: device.to_owned(),
            id: id.to_owned(),
        }
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.shared.serving.fetch_sub(1, Ordering::Relaxed);
        self.shared
            .recent()
            .finished(&self.device, &self.id, Instant::now());
    }
}

fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn apply_feedback(shared: &Shared, device: &str, message: &Incoming, encoding: Encoding) {
    let feedback = match proto::decode_feedback(&message.publish.payload, encoding) {
        Ok(f) => f,
        Err(error) => {
            tracing::info!(device = %device, %error, "undecodable feedback ignored");
            return;
        }
    };
    let known = shared
        .answered
        .lock()
        .ok()
        .and_then(|a| a.expert_of(device, feedback.id.as_str()));
    let Some((expert, task)) = known else {
        tracing::info!(device = %device, id = %feedback.id.as_str(), "feedback for an unknown or old request ignored");
        return;
    };
    let score = f64::from(feedback.score);
    let learned = shared
        .router
        .ask(move |router| {
            router
                .ledger
                .index_of(&expert)
                .map(|e| router.learn_quality(e, task, score))
                .is_some()
        })
        .await;
    if learned == Ok(true) {
        shared.metrics.feedback.fetch_add(1, Ordering::Relaxed);
    }
}

/// `GET /metrics` on a plain HTTP/1.1 listener.
async fn serve_metrics(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => break,
            a = listener.accept() => a,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok((mut socket, _)) = accepted else {
            continue;
        };
        let s = shared.clone();
        connections.spawn(async move {
            let mut head = vec![0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(2), socket.read(&mut head)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let line = String::from_utf8_lossy(&head[..n]);
            let response = if line.starts_with("GET /metrics") {
                let stale = Duration::from_secs_f64(s.config().telemetry.stale_after_s);
                let read = s.router.ask(move |router| {
                    let plans_compiled = router.plans_compiled();
                    let shadow = router.has_shadow().then(|| {
                        let names: Vec<String> =
                            router.ledger.experts.iter().map(|b| b.profile.name.clone()).collect();
                        crate::metrics::render_shadow(router.shadow_stats(), &names)
                    });
                    let now = Instant::now();
                    let experts: Vec<crate::metrics::ExpertGauges> = router
                        .ledger
                        .experts
                        .iter()
                        .enumerate()
                        .map(|(e, b)| crate::metrics::ExpertGauges {
                            name: b.profile.name.clone(),
                            in_flight: b.in_flight.len(),
                            up: router.ledger.is_up(e, now, stale),
                            foreign: router.ledger.foreign_requests(e, now, stale),
                            latency: b.profile.latency,
                        })
                        .collect();
                    (plans_compiled, shadow, experts)
                });
                let Ok((plans_compiled, shadow, experts)) = read.await else {
                    let _ = socket
                        .write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    return;
                };
                let host = s.host.lock().ok().and_then(|h| h.clone());
                let mut body = s.metrics.render(&experts, host.as_ref());
                body.push_str(&format!(
                    "# HELP qosroute_policy_plans_compiled Inference plans the learned router has compiled (each takes tens of ms, once per graph size).\n# TYPE qosroute_policy_plans_compiled counter\nqosroute_policy_plans_compiled {plans_compiled}\n"
                ));
                if let Some(text) = shadow {
                    body.push_str(&text);
                }
                format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            };
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
    connections.shutdown().await;
}

/// Pings the systemd watchdog at half its period when one is configured.
async fn watchdog(stop: CancellationToken) {
    let Some(timeout) = sd_notify::watchdog_enabled().filter(|t| !t.is_zero()) else {
        return;
    };
    let period = timeout / 2;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(period) => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
        }
    }
}
