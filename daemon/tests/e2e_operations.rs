//! End to end, operations: the real `qosrouted` binary against a real mosquitto broker under
//! the conditions of a deployment: overload, reload under load, crashes and redeliveries with
//! persistent sessions, TLS with passwords, shared subscriptions, message expiry.
//!
//! Every test watches what the devices receive (one `Final` or one `Error` per request, counted
//! per id) and checks it against the daemon's `/metrics` outcome counters.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use qosroute_core::{ExpertProfile, LatencyModel};
use qosroute_emulator::{EmulatedExpert, EmulatorOptions};
use qosroute_proto::{self as proto, Encoding, ErrorCode, Reply, Task};
use rumqttc::v5::mqttbytes::v5::{Publish, PublishProperties};
use support::{
    Broker, BrokerOptions, Daemon, Device, DeviceOptions, Pki, start_daemon, start_daemon_with_env,
};

const SITE: &str = "ops";

fn profile(name: &str) -> Arc<ExpertProfile> {
    Arc::new(ExpertProfile {
        name: name.into(),
        model: "qwen25_7b".into(),
        hardware: String::new(),
        source: String::new(),
        max_slots: 8,
        kv_tokens: 100_000,
        latency: LatencyModel {
            prefill_tok_s: 20_000.0,
            prefill_overhead_s: 0.0,
            decode_t0_s: 0.005,
            decode_d_s_per_seq: 0.0002,
            decode_e_s_per_ctx_token: 1e-8,
        },
    })
}

/// An emulated expert whose every duration is `time_scale` times the profile's (a decode step
/// is 5 ms × `time_scale`).
async fn expert(name: &str, time_scale: f64) -> EmulatedExpert {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut options = EmulatorOptions::for_profile(&profile(name));
    options.time_scale = time_scale;
    EmulatedExpert::serve(profile(name), options, listener).unwrap()
}

/// A daemon configuration. `broker_extra` goes at the end of `[broker]` (it may open
/// `[broker.tls]`); `extra` adds sections. Routing is by the `qos-greedy` fallback alone, so
/// which expert serves is known: the best quality prior. The SLO is loose (5 s per token):
/// the policy's own load shedding (`no_expert`) is not what these tests are about.
fn config(
    broker_url: &str,
    client_id: &str,
    broker_extra: &str,
    experts: &[(&EmulatedExpert, &str, f64)],
    extra: &str,
) -> String {
    let mut c = format!(
        r#"
site = "{SITE}"
[broker]
url = "{broker_url}"
client_id = "{client_id}"
reconnect_min_s = 0.1
reconnect_max_s = 0.5
{broker_extra}
[policy]
fallback = "qos-greedy"
[slo]
default_s_per_token = 5.0
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[telemetry]
scrape_interval_s = 0.2
stale_after_s = 2.0
[shutdown]
drain_deadline_s = 3.0
{extra}
"#
    );
    for (e, name, quality) in experts {
        c.push_str(&format!(
            r#"
[[expert]]
name = "{name}"
base_url = "{url}"
model = "qwen25_7b"
kind = "vllm"
max_slots = 8
kv_tokens = 100000
[expert.latency]
prefill_tok_s = 20000.0
decode_t0_s = 0.005
decode_d_s_per_seq = 0.0002
decode_e_s_per_ctx_token = 1e-8
[expert.quality]
default = {quality}
"#,
            url = e.base_url()
        ));
    }
    c
}

/// No per-device rate limit in the way of a test's bursts.
const NO_RATE_LIMIT: &str = "[admission]\ndevice_rate_per_s = 1000.0\ndevice_burst = 1000.0\n";

/// Waits until the daemon reports every named expert up and has subscribed to its request and
/// feedback filters (a first connection without a session).
async fn until_ready(daemon: &Daemon, names: &[&str]) {
    until_up(daemon, names).await;
    daemon
        .wait_log("subscribed", 2, Duration::from_secs(10))
        .await;
}

async fn until_up(daemon: &Daemon, names: &[&str]) {
    for _ in 0..400 {
        if names
            .iter()
            .all(|n| daemon.metric(&format!("qosroute_expert_up{{expert=\"{n}\"}}")) == Some(1.0))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("experts not up; daemon log:\n{}", daemon.log_text());
}

/// Every `qosroute_requests_total{outcome=...}` counter of the daemon.
fn outcomes(daemon: &Daemon) -> BTreeMap<String, f64> {
    daemon
        .metrics()
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("qosroute_requests_total{outcome=\"")?;
            let (outcome, value) = rest.split_once("\"} ")?;
            Some((outcome.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

fn outcome(daemon: &Daemon, name: &str) -> f64 {
    outcomes(daemon).get(name).copied().unwrap_or(0.0)
}

/// Requests the daemon has accounted for, whatever their outcome.
fn accounted(daemon: &Daemon) -> f64 {
    outcomes(daemon).values().sum()
}

/// Waits until the daemon's `completed` counter reaches `n` (the counter moves just after the
/// final reply is published).
async fn until_completed(daemon: &Daemon, n: f64) {
    for _ in 0..400 {
        if outcome(daemon, "completed") >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "completed never reached {n}: {:?}\n{}",
        outcomes(daemon),
        daemon.log_text()
    );
}

fn reply_topic(device: &str) -> String {
    format!("qosroute/v1/{SITE}/resp/{device}")
}

/// A streamed chat request asking for `tokens` output tokens (the emulator answers
/// `min(tokens, 128)`).
fn request(id: &str, tokens: u32) -> proto::Request {
    proto::Request::new(id, Task::Chat, "Tell me a story about a lighthouse.")
        .unwrap()
        .with_max_tokens(tokens)
        .with_stream(true)
}

fn encode(r: &proto::Request) -> Vec<u8> {
    let mut buf = vec![0u8; proto::MAX_FRAME_BYTES];
    let n = proto::encode_request(r, Encoding::Json, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// Publishes `r` as device `device` (JSON, replies on the device's default topic).
async fn send(device: &Device, name: &str, r: &proto::Request, props: PublishProperties) {
    device
        .publish(&format!("qosroute/v1/{SITE}/req/{name}"), encode(r), props)
        .await;
}

/// What the devices received, per request id.
#[derive(Debug, Default)]
struct Replies {
    /// (seq, expert) of every chunk, in arrival order.
    chunks: BTreeMap<String, Vec<(u32, String)>>,
    /// The expert of every `Final`.
    finals: BTreeMap<String, Vec<String>>,
    /// The code of every `Error`.
    errors: BTreeMap<String, Vec<ErrorCode>>,
    /// The seq of every chunk the broker delivered again (DUP flag: the device had not
    /// acknowledged it when the connection dropped), also counted in `chunks`.
    redelivered: BTreeMap<String, Vec<u32>>,
}

impl Replies {
    fn absorb(&mut self, p: &Publish) {
        match proto::decode_reply(&p.payload, Encoding::Json).unwrap() {
            Reply::Chunk(c) => {
                if p.dup {
                    self.redelivered
                        .entry(c.id.as_str().to_owned())
                        .or_default()
                        .push(c.seq);
                }
                self.chunks
                    .entry(c.id.as_str().to_owned())
                    .or_default()
                    .push((c.seq, c.expert.as_str().to_owned()));
            }
            Reply::Final(f) => self
                .finals
                .entry(f.id.as_str().to_owned())
                .or_default()
                .push(f.expert.as_str().to_owned()),
            Reply::Error(e) => self
                .errors
                .entry(e.id.as_str().to_owned())
                .or_default()
                .push(e.code),
        }
    }

    /// Takes whatever has already arrived, without waiting.
    fn absorb_ready(&mut self, device: &mut Device) {
        while let Ok(p) = device.received.try_recv() {
            self.absorb(&p);
        }
    }

    fn finals(&self, id: &str) -> &[String] {
        self.finals.get(id).map_or(&[], Vec::as_slice)
    }

    fn errors(&self, id: &str) -> &[ErrorCode] {
        self.errors.get(id).map_or(&[], Vec::as_slice)
    }

    fn chunks(&self, id: &str) -> &[(u32, String)] {
        self.chunks.get(id).map_or(&[], Vec::as_slice)
    }

    /// How many times a process of the daemon started the stream of `id` (chunks with seq 0,
    /// not counting the broker's redeliveries of one it already sent).
    fn stream_starts(&self, id: &str) -> usize {
        let sent = self.chunks(id).iter().filter(|(seq, _)| *seq == 0).count();
        let again = self
            .redelivered
            .get(id)
            .map_or(0, |seqs| seqs.iter().filter(|seq| **seq == 0).count());
        sent - again
    }

    /// Final and error replies of `id`.
    fn ends(&self, id: &str) -> usize {
        self.finals(id).len() + self.errors(id).len()
    }

    fn all_ended(&self, ids: &[String]) -> bool {
        ids.iter().all(|id| self.ends(id) > 0)
    }

    /// Ids answered by `expert`, among `ids`.
    fn served_by(&self, expert: &str, ids: &[String]) -> usize {
        ids.iter()
            .filter(|id| self.finals(id).iter().any(|e| e == expert))
            .count()
    }

    /// Asserts every id of `ids` ended exactly once, with a `Final`.
    fn assert_one_final_each(&self, ids: &[String]) {
        for id in ids {
            assert_eq!(
                (self.finals(id).len(), self.errors(id)),
                (1, &[][..]),
                "{id} must end with exactly one Final; all replies: {self:?}"
            );
        }
    }
}

/// Receives on `device` until `done` holds; panics with what arrived after `within`.
async fn collect(
    device: &mut Device,
    replies: &mut Replies,
    within: Duration,
    done: impl Fn(&Replies) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !done(replies) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match device.next(left).await {
            Some(p) => replies.absorb(&p),
            None => panic!("not done within {within:?}; received: {replies:?}"),
        }
    }
}

/// Receives for a quiet period in which nothing more is expected (so that a duplicate reply
/// still on its way is seen by the assertions that follow).
async fn quiet(device: &mut Device, replies: &mut Replies, period: Duration) {
    let deadline = tokio::time::Instant::now() + period;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        if let Some(p) = device.next(left).await {
            replies.absorb(&p);
        }
    }
}

fn ids(prefix: &str, range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| format!("{prefix}{i}")).collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Admission: max_in_flight.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_in_flight_a_burst_is_shed_with_overloaded_and_every_request_ends_once() {
    let broker = Broker::start();
    // 100 tokens at 10 ms a step: an admitted request holds its place for over a second, far
    // longer than the burst takes to arrive.
    let a = expert("a", 2.0).await;
    let daemon = start_daemon(&config(
        &broker.url(),
        "qosrouted-shed",
        "",
        &[(&a, "a", 0.6)],
        "[admission]\nmax_in_flight = 2\n",
    ));
    until_ready(&daemon, &["a"]).await;
    let mut device = Device::connect(broker.port, "dev-shed", &[&reply_topic("dev-shed")]).await;
    let burst = ids("s", 0..10);
    for id in &burst {
        send(
            &device,
            "dev-shed",
            &request(id, 100),
            PublishProperties::default(),
        )
        .await;
    }
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(20), |r| {
        r.all_ended(&burst)
    })
    .await;
    // One device's QoS 1 publishes arrive in order: the first two take the two places.
    replies.assert_one_final_each(&burst[..2]);
    for id in &burst[2..] {
        assert_eq!(
            replies.errors(id),
            &[ErrorCode::Overloaded][..],
            "{id}: {replies:?}"
        );
        assert!(replies.finals(id).is_empty() && replies.chunks(id).is_empty());
    }
    until_completed(&daemon, 2.0).await;
    assert_eq!(outcome(&daemon, "shed"), 8.0, "{:?}", outcomes(&daemon));
    assert_eq!(accounted(&daemon), 10.0, "{:?}", outcomes(&daemon));

    // Shedding is transient: once the places are free a new request is served.
    send(
        &device,
        "dev-shed",
        &request("after", 20),
        PublishProperties::default(),
    )
    .await;
    collect(&mut device, &mut replies, Duration::from_secs(10), |r| {
        r.ends("after") > 0
    })
    .await;
    quiet(&mut device, &mut replies, Duration::from_millis(200)).await;
    replies.assert_one_final_each(&["after".to_owned()]);
    for id in &burst {
        assert_eq!(replies.ends(id), 1, "{id}: {replies:?}");
    }
    until_completed(&daemon, 3.0).await;
    assert_eq!(accounted(&daemon), 11.0, "{:?}", outcomes(&daemon));
}

/// The proto's contract: a request id is unique per device *while the request is in flight*,
/// and `overloaded` says "retry later". A shed request is no longer in flight once its error
/// reply is out, so a retry with the same id is a new request and must be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shed_request_retried_with_the_same_id_is_served() {
    let broker = Broker::start();
    let a = expert("a", 2.0).await;
    let daemon = start_daemon(&config(
        &broker.url(),
        "qosrouted-retry",
        "",
        &[(&a, "a", 0.6)],
        "[admission]\nmax_in_flight = 1\n",
    ));
    until_ready(&daemon, &["a"]).await;
    let mut device = Device::connect(broker.port, "dev-rt", &[&reply_topic("dev-rt")]).await;
    send(
        &device,
        "dev-rt",
        &request("long", 60),
        PublishProperties::default(),
    )
    .await;
    send(
        &device,
        "dev-rt",
        &request("x", 12),
        PublishProperties::default(),
    )
    .await;
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(10), |r| {
        r.ends("long") > 0 && r.ends("x") > 0
    })
    .await;
    assert_eq!(
        replies.errors("x"),
        &[ErrorCode::Overloaded][..],
        "{replies:?}"
    );
    until_completed(&daemon, 1.0).await;
    // The place is free again: the device retries.
    send(
        &device,
        "dev-rt",
        &request("x", 12),
        PublishProperties::default(),
    )
    .await;
    collect(&mut device, &mut replies, Duration::from_secs(5), |r| {
        r.ends("x") > 1
    })
    .await;
    assert_eq!(replies.finals("x").len(), 1, "{replies:?}");
}

/// `max_in_flight` bounds the requests being served. Malformed payloads are answered at once
/// and never served; they must not take the places of requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_do_not_take_the_places_of_requests_at_max_in_flight() {
    let broker = Broker::start();
    let a = expert("a", 1.0).await;
    let daemon = start_daemon(&config(
        &broker.url(),
        "qosrouted-places",
        "",
        &[(&a, "a", 0.6)],
        "[admission]\nmax_in_flight = 1\n",
    ));
    until_ready(&daemon, &["a"]).await;
    let mut device = Device::connect(broker.port, "dev-pl", &[&reply_topic("dev-pl")]).await;
    let topic = format!("qosroute/v1/{SITE}/req/dev-pl");
    for i in 0..20 {
        device
            .publish(
                &topic,
                format!(r#"{{"v":1,"id":"bad{i}","prompt":"hi","max_tokens":0}}"#).into_bytes(),
                PublishProperties::default(),
            )
            .await;
    }
    send(
        &device,
        "dev-pl",
        &request("good", 12),
        PublishProperties::default(),
    )
    .await;
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(10), |r| {
        r.ends("good") > 0
    })
    .await;
    replies.assert_one_final_each(&["good".to_owned()]);
    assert_eq!(outcome(&daemon, "shed"), 0.0);
}

// ---------------------------------------------------------------------------------------------
// 2. SIGHUP under load.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_under_load_swaps_experts_and_every_request_still_ends_once() {
    let broker = Broker::start();
    let (a, b, c) = (
        expert("a", 1.0).await,
        expert("b", 1.0).await,
        expert("c", 1.0).await,
    );
    // qos-greedy takes the best quality prior: everything goes to `a` before the reload and to
    // `c` after it (`b` is the poor expert that stays).
    let before = config(
        &broker.url(),
        "qosrouted-reload",
        "",
        &[(&a, "a", 0.9), (&b, "b", 0.3)],
        NO_RATE_LIMIT,
    );
    let daemon = start_daemon(&before);
    until_ready(&daemon, &["a", "b"]).await;
    let after = config(
        &broker.url(),
        "qosrouted-reload",
        "",
        &[(&b, "b", 0.3), (&c, "c", 0.9)],
        NO_RATE_LIMIT,
    )
    .replace("{metrics_port}", &daemon.metrics_port.to_string());
    let mut device = Device::connect(broker.port, "dev-hup", &[&reply_topic("dev-hup")]).await;
    let mut replies = Replies::default();
    let all = ids("h", 0..40);
    // 60 tokens (~0.35 s) every 30 ms: about ten requests in flight at any time.
    let every = Duration::from_millis(30);
    for id in &all[..15] {
        send(
            &device,
            "dev-hup",
            &request(id, 60),
            PublishProperties::default(),
        )
        .await;
        tokio::time::sleep(every).await;
    }
    replies.absorb_ready(&mut device);
    // Requests streaming from `a` (a chunk seen, no end yet) as the reload is asked for.
    let on_a: Vec<String> = all[..15]
        .iter()
        .filter(|id| replies.ends(id) == 0 && replies.chunks(id).iter().any(|(_, e)| e == "a"))
        .cloned()
        .collect();
    assert!(!on_a.is_empty(), "nothing in flight on `a`: {replies:?}");
    assert!(
        daemon
            .metric("qosroute_expert_in_flight{expert=\"a\"}")
            .unwrap()
            >= 1.0
    );
    std::fs::write(&daemon.config, &after).unwrap();
    daemon.signal("HUP");
    for id in &all[15..30] {
        send(
            &device,
            "dev-hup",
            &request(id, 60),
            PublishProperties::default(),
        )
        .await;
        tokio::time::sleep(every).await;
    }
    daemon
        .wait_log("configuration reloaded", 1, Duration::from_secs(10))
        .await;
    // Published after the reload is in force.
    let late = &all[30..];
    for id in late {
        send(
            &device,
            "dev-hup",
            &request(id, 60),
            PublishProperties::default(),
        )
        .await;
        tokio::time::sleep(every).await;
    }
    collect(&mut device, &mut replies, Duration::from_secs(20), |r| {
        r.all_ended(&all)
    })
    .await;
    until_completed(&daemon, 40.0).await;
    quiet(&mut device, &mut replies, Duration::from_millis(200)).await;

    // No request lost or answered twice, none failed.
    replies.assert_one_final_each(&all);
    // What ran on the removed expert finished there.
    for id in &on_a {
        assert_eq!(replies.finals(id), &["a".to_owned()][..], "{id}");
    }
    // After the reload the removed expert gets nothing and the new one gets the traffic.
    assert_eq!(replies.served_by("a", late), 0, "{replies:?}");
    assert_eq!(replies.served_by("c", late), late.len(), "{replies:?}");
    // Every request reached one expert once: no retry, no double dispatch.
    let reached = |e: &EmulatedExpert| e.counters().received as usize;
    assert_eq!(reached(&a), replies.served_by("a", &all));
    assert_eq!(reached(&b), replies.served_by("b", &all));
    assert_eq!(reached(&c), replies.served_by("c", &all));
    assert_eq!(accounted(&daemon), 40.0, "{:?}", outcomes(&daemon));
    assert_eq!(daemon.metric("qosroute_expert_up{expert=\"a\"}"), None);
    assert_eq!(daemon.metric("qosroute_expert_up{expert=\"c\"}"), Some(1.0));
    assert_eq!(
        daemon.metric("qosroute_expert_in_flight{expert=\"c\"}"),
        Some(0.0)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Crashes, redeliveries and the persistent session.

/// Starts `cfg` while the broker is stopped (gracefully: with persistence it keeps every
/// session and queued message) and starts the broker once the daemon has found `experts` up:
/// a gateway that reboots while its broker is down. (A daemon that comes back while the
/// broker is up is tested by `a_restarted_daemon_routes_what_its_session_hands_over_at_connect`:
/// it checks its experts before it connects.)
async fn start_behind_a_stopped_broker(broker: &mut Broker, cfg: &str, experts: &[&str]) -> Daemon {
    broker.stop_gracefully();
    let daemon = start_daemon(cfg);
    until_up(&daemon, experts).await;
    broker.start_again();
    daemon
}

/// What the daemon guarantees across a SIGKILL. It acknowledges a request to the broker only
/// once its outcome is final, and its memory of the requests it has seen lives in the process.
/// So for a request in flight at the SIGKILL (no `Final` published yet):
/// - the broker still holds it, un-acknowledged, in the daemon's persistent session, and
///   redelivers it when the daemon comes back with the same client id;
/// - the new process has no memory of it and serves it from the start: the device, which had
///   some chunks of the first attempt, gets the stream again from `seq` 0, then exactly one
///   `Final` (at-least-once for chunks, exactly one end per request);
/// - not tested, because it cannot be made reliable: a SIGKILL that falls between the
///   publication of a `Final` and the acknowledgement that follows it makes the device get a
///   second `Final` (the request is served again by the new process).
///
/// Requests published while the daemon is down wait in the session and are served once.
async fn kill_mid_request_and_restart(broker_down_at_restart: bool) {
    let mut broker = Broker::start_with(BrokerOptions {
        persistence: true,
        ..BrokerOptions::default()
    });
    // 120 tokens at 10 ms a step: well over a second per request.
    let a = expert("a", 2.0).await;
    let cfg = config(
        &broker.url(),
        "qosrouted-crash",
        "session_expiry_s = 600",
        &[(&a, "a", 0.6)],
        "",
    );
    let mut first = start_daemon(&cfg);
    until_ready(&first, &["a"]).await;
    let mut device = Device::connect_with(
        broker.port,
        "dev-k",
        &[&reply_topic("dev-k")],
        &DeviceOptions {
            session_expiry_s: Some(600),
            ..DeviceOptions::default()
        },
    )
    .await;
    let in_flight = ids("k", 0..4);
    for id in &in_flight {
        send(
            &device,
            "dev-k",
            &request(id, 120),
            PublishProperties::default(),
        )
        .await;
    }
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(10), |r| {
        in_flight.iter().all(|id| !r.chunks(id).is_empty())
    })
    .await;
    assert!(
        in_flight.iter().all(|id| replies.ends(id) == 0),
        "a request ended before the kill: {replies:?}"
    );
    first.kill();
    let while_down = ids("q", 0..3);
    for id in &while_down {
        send(
            &device,
            "dev-k",
            &request(id, 20),
            PublishProperties::default(),
        )
        .await;
    }
    let second = if broker_down_at_restart {
        start_behind_a_stopped_broker(&mut broker, &cfg, &["a"]).await
    } else {
        start_daemon(&cfg)
    };
    let everything: Vec<String> = in_flight.iter().chain(&while_down).cloned().collect();
    collect(&mut device, &mut replies, Duration::from_secs(20), |r| {
        r.all_ended(&everything)
    })
    .await;
    replies.assert_one_final_each(&everything);
    until_completed(&second, 7.0).await;
    quiet(&mut device, &mut replies, Duration::from_millis(300)).await;
    replies.assert_one_final_each(&everything);
    // Counted without the broker's own redeliveries (DUP): a chunk the device had not yet
    // acknowledged when the broker stopped comes again after it restarts (observed once in
    // CI: k2 got seq 0 three times, one of them the broker's). That is MQTT's at-least-once,
    // not the daemon serving a request a third time.
    for id in &in_flight {
        assert_eq!(
            replies.stream_starts(id),
            2,
            "{id}: the stream starts again once: {replies:?}"
        );
    }
    for id in &while_down {
        assert_eq!(replies.stream_starts(id), 1, "{id}: {replies:?}");
    }
    // The second process served each request once, from its resumed session.
    assert_eq!(accounted(&second), 7.0, "{:?}", outcomes(&second));
    let log = second.log_text();
    assert!(log.contains("session_present=true"), "{log}");
    assert_eq!(
        second.log_count("subscribed"),
        0,
        "the session kept its subscriptions"
    );
    assert_eq!(
        a.counters().received,
        4 + 7,
        "4 first attempts, then 7 served"
    );
}

/// See [`kill_mid_request_and_restart`]. The gateway host reboots: the broker is down while the
/// daemon starts, and comes back with its persisted sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_request_and_restarted_with_its_session_answers_each_request_once() {
    kill_mid_request_and_restart(true).await;
}

/// The same with only the daemon restarted: the broker hands the session's backlog over the
/// moment the daemon connects, which is before the daemon's first expert health round, so
/// every expert is still "unknown, not up" and each of those requests is answered `no_expert`
/// (observed: 4 to 5 of the 7 rejected, on every run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_routes_what_its_session_hands_over_at_connect() {
    kill_mid_request_and_restart(false).await;
}

/// The daemon's in-process de-duplication: a broker (with persistence) restarted while requests
/// are in flight hands the un-acknowledged requests to the reconnected daemon again; the daemon
/// recognises them (device, id) and does not serve them a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_redelivered_after_a_broker_restart_are_not_served_twice() {
    let mut broker = Broker::start_with(BrokerOptions {
        persistence: true,
        ..BrokerOptions::default()
    });
    // 120 tokens at 15 ms a step: each request outlives the broker's restart.
    let a = expert("a", 3.0).await;
    let daemon = start_daemon(&config(
        &broker.url(),
        "qosrouted-dedup",
        "session_expiry_s = 600",
        &[(&a, "a", 0.6)],
        "",
    ));
    until_ready(&daemon, &["a"]).await;
    // The device's session (and its subscription) survives the restart too.
    let mut device = Device::connect_with(
        broker.port,
        "dev-dd",
        &[&reply_topic("dev-dd")],
        &DeviceOptions {
            session_expiry_s: Some(600),
            ..DeviceOptions::default()
        },
    )
    .await;
    let all = ids("d", 0..3);
    for id in &all {
        send(
            &device,
            "dev-dd",
            &request(id, 120),
            PublishProperties::default(),
        )
        .await;
    }
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(10), |r| {
        all.iter().all(|id| !r.chunks(id).is_empty())
    })
    .await;
    assert!(all.iter().all(|id| replies.ends(id) == 0), "{replies:?}");
    broker.stop_gracefully();
    broker.start_again();
    daemon
        .wait_log(
            "duplicate request (redelivery) ignored",
            all.len(),
            Duration::from_secs(10),
        )
        .await;
    collect(&mut device, &mut replies, Duration::from_secs(20), |r| {
        r.all_ended(&all)
    })
    .await;
    until_completed(&daemon, 3.0).await;
    quiet(&mut device, &mut replies, Duration::from_millis(300)).await;
    replies.assert_one_final_each(&all);
    assert_eq!(accounted(&daemon), 3.0, "{:?}", outcomes(&daemon));
    assert_eq!(
        a.counters().received,
        3,
        "each request reached the expert once"
    );
    assert_eq!(daemon.metric("qosroute_mqtt_connections_total"), Some(2.0));
    assert!(daemon.log_text().contains("session_present=true"));
}

/// A redelivered duplicate of a request that is still being served must not be acknowledged
/// before the request's outcome is final: the ack of the redelivery is the ack of the request
/// (same packet id), so a daemon that dies after it loses the request for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_of_a_request_still_in_flight_is_not_acked_before_its_answer() {
    let mut broker = Broker::start_with(BrokerOptions {
        persistence: true,
        ..BrokerOptions::default()
    });
    // 120 tokens at 25 ms a step: three seconds.
    let a = expert("a", 5.0).await;
    let cfg = config(
        &broker.url(),
        "qosrouted-early-ack",
        "session_expiry_s = 600",
        &[(&a, "a", 0.6)],
        "",
    );
    let mut first = start_daemon(&cfg);
    until_ready(&first, &["a"]).await;
    let mut device = Device::connect_with(
        broker.port,
        "dev-ea",
        &[&reply_topic("dev-ea")],
        &DeviceOptions {
            session_expiry_s: Some(600),
            ..DeviceOptions::default()
        },
    )
    .await;
    send(
        &device,
        "dev-ea",
        &request("r", 120),
        PublishProperties::default(),
    )
    .await;
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(10), |r| {
        !r.chunks("r").is_empty()
    })
    .await;
    broker.stop_gracefully();
    broker.start_again();
    first
        .wait_log(
            "duplicate request (redelivery) ignored",
            1,
            Duration::from_secs(10),
        )
        .await;
    // Leave time for an (early) ack to reach the broker: what must not happen cannot be
    // waited for.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(replies.ends("r"), 0);
    first.kill();
    let second = start_behind_a_stopped_broker(&mut broker, &cfg, &["a"]).await;
    collect(&mut device, &mut replies, Duration::from_secs(15), |r| {
        r.ends("r") > 0
    })
    .await;
    replies.assert_one_final_each(&["r".to_owned()]);
    assert_eq!(outcome(&second, "completed"), 1.0);
}

// ---------------------------------------------------------------------------------------------
// 4. TLS and passwords.

const PASSWORD_VAR: &str = "QOSROUTE_TEST_MQTT_PASSWORD";

fn tls_broker_extra(pki: &Pki, password_var: &str) -> String {
    format!(
        "username = \"qosrouted\"\npassword_env = \"{password_var}\"\n[broker.tls]\nca_file = \"{}\"\n",
        pki.files.ca.display()
    )
}

fn users(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(u, p)| ((*u).to_owned(), (*p).to_owned()))
        .collect()
}

async fn tls_device(broker: &Broker, pki: &Pki, name: &str) -> Device {
    Device::connect_with(
        broker.port,
        name,
        &[&reply_topic(name)],
        &DeviceOptions {
            tls_ca: Some(pki.files.ca.clone()),
            credentials: Some((name.to_owned(), "device-secret".to_owned())),
            ..DeviceOptions::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_and_its_devices_use_a_tls_broker_with_passwords() {
    let pki = Pki::generate();
    let broker = Broker::start_with(BrokerOptions {
        tls: Some(pki.files.clone()),
        users: users(&[
            ("qosrouted", "gateway-secret"),
            ("dev-tls", "device-secret"),
        ]),
        ..BrokerOptions::default()
    });
    let a = expert("a", 1.0).await;
    let daemon = start_daemon_with_env(
        &config(
            &format!("mqtts://127.0.0.1:{}", broker.port),
            "qosrouted-tls",
            &tls_broker_extra(&pki, PASSWORD_VAR),
            &[(&a, "a", 0.6)],
            "",
        ),
        &[(PASSWORD_VAR, "gateway-secret")],
    );
    until_ready(&daemon, &["a"]).await;
    assert_eq!(daemon.metric("qosroute_mqtt_connections_total"), Some(1.0));
    let mut device = tls_device(&broker, &pki, "dev-tls").await;
    send(
        &device,
        "dev-tls",
        &request("t1", 12),
        PublishProperties::default(),
    )
    .await;
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(10), |r| {
        r.ends("t1") > 0
    })
    .await;
    replies.assert_one_final_each(&["t1".to_owned()]);
    // The broker saw the daemon log in as its user (over the TLS listener: the only one).
    let log = broker.log_text();
    assert!(
        log.contains("as qosrouted-tls") && log.contains("u'qosrouted'"),
        "{log}"
    );
    assert!(!daemon.log_text().contains("broker connection lost"));
}

/// A refused password does not stop the daemon: it logs the refusal and keeps retrying with
/// back-off. Broker settings are not reloaded by SIGHUP (documented: "broker and site changes
/// need a restart"), so a corrected `[broker]` section is only noted; the daemon connects as
/// soon as the broker accepts the credentials it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_broker_password_is_logged_and_retried_until_the_broker_accepts_it() {
    let pki = Pki::generate();
    let mut broker = Broker::start_with(BrokerOptions {
        tls: Some(pki.files.clone()),
        users: users(&[("qosrouted", "gateway-secret"), ("dev-pw", "device-secret")]),
        ..BrokerOptions::default()
    });
    let a = expert("a", 1.0).await;
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let wrong = config(
        &url,
        "qosrouted-pw",
        &tls_broker_extra(&pki, PASSWORD_VAR),
        &[(&a, "a", 0.6)],
        "",
    );
    let right_var = "QOSROUTE_TEST_MQTT_PASSWORD_RIGHT";
    let mut daemon = start_daemon_with_env(
        &wrong,
        &[
            (PASSWORD_VAR, "not-the-password"),
            (right_var, "gateway-secret"),
        ],
    );
    until_up(&daemon, &["a"]).await;
    let refusal = "broker connection lost";
    daemon.wait_log(refusal, 3, Duration::from_secs(10)).await;
    let log = daemon.log_text();
    assert!(log.contains("NotAuthorized"), "the refusal says why: {log}");
    assert!(daemon.is_running());
    assert_eq!(daemon.metric("qosroute_mqtt_connections_total"), Some(0.0));

    // A corrected [broker] by SIGHUP: noted, not applied (the rest of the file is).
    let corrected = config(
        &url,
        "qosrouted-pw",
        &tls_broker_extra(&pki, right_var),
        &[(&a, "a", 0.6)],
        "",
    )
    .replace("{metrics_port}", &daemon.metrics_port.to_string());
    std::fs::write(&daemon.config, corrected).unwrap();
    daemon.signal("HUP");
    daemon
        .wait_log(
            "broker and site changes need a restart",
            1,
            Duration::from_secs(5),
        )
        .await;
    daemon
        .wait_log("configuration reloaded", 1, Duration::from_secs(5))
        .await;
    let refused = daemon.log_count(refusal);
    daemon
        .wait_log(refusal, refused + 2, Duration::from_secs(5))
        .await;
    assert!(daemon.is_running());
    assert_eq!(daemon.metric("qosroute_mqtt_connections_total"), Some(0.0));

    // The broker now accepts the password the daemon has: its next retry gets in.
    broker.set_users(&users(&[
        ("qosrouted", "not-the-password"),
        ("dev-pw", "device-secret"),
    ]));
    broker.reload();
    daemon
        .wait_log("subscribed", 2, Duration::from_secs(10))
        .await;
    assert_eq!(daemon.metric("qosroute_mqtt_connections_total"), Some(1.0));
    let mut device = tls_device(&broker, &pki, "dev-pw").await;
    send(
        &device,
        "dev-pw",
        &request("p1", 12),
        PublishProperties::default(),
    )
    .await;
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(10), |r| {
        r.ends("p1") > 0
    })
    .await;
    replies.assert_one_final_each(&["p1".to_owned()]);
}

// ---------------------------------------------------------------------------------------------
// 5. Shared subscriptions.

async fn shared_group_devices(
    broker: &Broker,
    n: usize,
    options: &DeviceOptions,
) -> Vec<(String, Device)> {
    let mut out = Vec::new();
    for i in 0..n {
        let name = format!("dev-g{i}");
        let device =
            Device::connect_with(broker.port, &name, &[&reply_topic(&name)], options).await;
        out.push((name, device));
    }
    out
}

/// Sends `per_device` requests from every device (ids `{prefix}{device}-{k}`) in waves of one
/// per device, each wave answered before the next; returns the ids and replies per device.
async fn round(
    devices: &mut [(String, Device)],
    prefix: &str,
    per_device: usize,
) -> Vec<(Vec<String>, Replies)> {
    let mut out: Vec<(Vec<String>, Replies)> = devices
        .iter()
        .map(|_| (Vec::new(), Replies::default()))
        .collect();
    for k in 0..per_device {
        for (d, (name, device)) in devices.iter().enumerate() {
            let id = format!("{prefix}{d}-{k}");
            send(device, name, &request(&id, 8), PublishProperties::default()).await;
            out[d].0.push(id);
        }
        for ((_, device), (these, replies)) in devices.iter_mut().zip(out.iter_mut()) {
            collect(device, replies, Duration::from_secs(15), |r| {
                r.all_ended(these)
            })
            .await;
        }
    }
    out
}

/// Waits until the broker has seen `client` go (its socket closed).
async fn until_broker_dropped(broker: &Broker, client: &str) {
    for _ in 0..500 {
        let log = broker.log_text();
        if log.contains(&format!("Client {client} closed its connection"))
            || log.contains(&format!("Socket error on client {client}"))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "the broker did not notice {client} go:\n{}",
        broker.log_text()
    );
}

/// Waits until the daemon's last scrape of expert `a` shows no load but its own.
async fn until_no_foreign_load(daemon: &Daemon) {
    for _ in 0..500 {
        if daemon.metric("qosroute_expert_foreign_requests{expert=\"a\"}") == Some(0.0) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("expert `a` never looked idle:\n{}", daemon.metrics());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_group_splits_requests_and_the_survivor_takes_them_all_after_a_kill() {
    let broker = Broker::start();
    let a = expert("a", 1.0).await;
    // Members of a group that must fail over at once keep no session: mosquitto keeps handing a
    // disconnected member with a persistent session its share of the group's messages (see the
    // next test).
    let url = broker.url();
    let member = |id: &str| {
        config(
            &url,
            id,
            "shared_group = \"gateways\"\nsession_expiry_s = 0",
            &[(&a, "a", 0.6)],
            NO_RATE_LIMIT,
        )
    };
    let mut one = start_daemon(&member("qosrouted-g1"));
    let two = start_daemon(&member("qosrouted-g2"));
    until_ready(&one, &["a"]).await;
    until_ready(&two, &["a"]).await;
    let mut devices = shared_group_devices(&broker, 4, &DeviceOptions::default()).await;
    for (these, replies) in round(&mut devices, "x", 10).await {
        replies.assert_one_final_each(&these);
    }
    let (by_one, by_two) = (outcome(&one, "completed"), outcome(&two, "completed"));
    assert_eq!(
        by_one + by_two,
        40.0,
        "one {:?}, two {:?}",
        outcomes(&one),
        outcomes(&two)
    );
    assert!(by_one > 0.0 && by_two > 0.0, "one {by_one}, two {by_two}");
    assert_eq!(accounted(&one) + accounted(&two), 40.0);

    one.kill();
    // A request the broker hands to the dead member before it notices the closed socket is
    // lost with the member's (expiry 0) session.
    until_broker_dropped(&broker, "qosrouted-g1").await;
    // The survivor's last scrape counted the other member's requests (its own are subtracted
    // as they were at the scrape: `finished_requests_are_not_foreign_load`).
    until_no_foreign_load(&two).await;
    for (these, replies) in round(&mut devices, "y", 5).await {
        replies.assert_one_final_each(&these);
    }
    until_completed(&two, by_two + 20.0).await;
    assert_eq!(accounted(&two), by_two + 20.0, "{:?}", outcomes(&two));
}

/// With persistent sessions (the default `session_expiry_s`), mosquitto 2.0 keeps handing a
/// killed member its share of the group's requests: they wait in its session until it comes
/// back with the same client id (or the session expires). Nothing is lost and nothing is served
/// twice, but that share waits for the member's restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_shared_group_a_killed_members_session_holds_its_share_until_it_returns() {
    let mut broker = Broker::start_with(BrokerOptions {
        persistence: true,
        ..BrokerOptions::default()
    });
    let a = expert("a", 1.0).await;
    let url = broker.url();
    let member = |id: &str| {
        config(
            &url,
            id,
            "shared_group = \"gateways\"",
            &[(&a, "a", 0.6)],
            NO_RATE_LIMIT,
        )
    };
    let mut one = start_daemon(&member("qosrouted-p1"));
    let two = start_daemon(&member("qosrouted-p2"));
    until_ready(&one, &["a"]).await;
    until_ready(&two, &["a"]).await;
    // The devices keep their sessions across the broker restart below.
    let devices_keep_sessions = DeviceOptions {
        session_expiry_s: Some(600),
        ..DeviceOptions::default()
    };
    let mut devices = shared_group_devices(&broker, 2, &devices_keep_sessions).await;
    for (these, replies) in round(&mut devices, "x", 10).await {
        replies.assert_one_final_each(&these);
    }
    let by_two = outcome(&two, "completed");
    assert!(by_two > 0.0 && outcome(&one, "completed") > 0.0);

    one.kill();
    let mut sent = Vec::new();
    for (d, (name, device)) in devices.iter().enumerate() {
        let these: Vec<String> = (0..10).map(|k| format!("y{d}-{k}")).collect();
        for id in &these {
            send(device, name, &request(id, 8), PublishProperties::default()).await;
        }
        sent.push(these);
    }
    // The survivor serves its share at once; the rest waits for the dead member. Wait until
    // the survivor has been idle for a while.
    let mut served = -1.0;
    let mut idle_since = tokio::time::Instant::now();
    while idle_since.elapsed() < Duration::from_millis(500) {
        let now = outcome(&two, "completed") - by_two;
        if now != served {
            served = now;
            idle_since = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        served > 0.0 && served < 20.0,
        "the survivor served {served} of 20: the dead member's share must wait for it"
    );
    // The counter moves when the final is published; the final may still be on its way.
    let mut replies: Vec<Replies> = devices.iter().map(|_| Replies::default()).collect();
    let mut answered = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        for (r, (_, device)) in replies.iter_mut().zip(devices.iter_mut()) {
            r.absorb_ready(device);
        }
        answered = replies.iter().map(|r| r.finals.len()).sum::<usize>();
        if answered as f64 >= served {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        answered as f64, served,
        "the devices got what the survivor served"
    );

    // The member comes back with its client id: its session hands it the held requests.
    let back = start_behind_a_stopped_broker(&mut broker, &member("qosrouted-p1"), &["a"]).await;
    for ((_, device), (these, r)) in devices.iter_mut().zip(sent.iter().zip(replies.iter_mut())) {
        collect(device, r, Duration::from_secs(15), |r| r.all_ended(these)).await;
    }
    until_completed(&back, 20.0 - served).await;
    for ((_, device), (these, r)) in devices.iter_mut().zip(sent.iter().zip(replies.iter_mut())) {
        quiet(device, r, Duration::from_millis(100)).await;
        r.assert_one_final_each(these);
    }
    assert_eq!(accounted(&back), 20.0 - served, "{:?}", outcomes(&back));
    assert_eq!(accounted(&two), by_two + served, "{:?}", outcomes(&two));
}

/// The load an engine reports includes this daemon's own requests *at the time of the scrape*;
/// what the policy counts as foreign is that report minus the daemon's requests *now*. So the
/// daemon's own requests that finished since the last scrape count as other clients' load
/// until the next scrape: right after a burst, an idle expert looks busy. (Seen first in the
/// shared-group test with a 0.5 s/token SLO: right after a wave, 25 requests counted on an
/// idle expert, the dead member's and the survivor's own, all finished, and `qos-greedy`
/// answered every request of the next wave `no_expert`. The other member's part is the
/// scrape's ordinary staleness; the own part is this bug.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_requests_are_not_foreign_load() {
    let broker = Broker::start();
    // 40 tokens at about 26 ms a step with 8 running: the wave lasts about a second, so several
    // scrapes (every 0.2 s) see it.
    let a = expert("a", 4.0).await;
    let daemon = start_daemon(&config(
        &broker.url(),
        "qosrouted-foreign",
        "",
        &[(&a, "a", 0.6)],
        NO_RATE_LIMIT,
    ));
    until_ready(&daemon, &["a"]).await;
    until_no_foreign_load(&daemon).await;
    let mut device = Device::connect(broker.port, "dev-fl", &[&reply_topic("dev-fl")]).await;
    let wave = ids("w", 0..8);
    for id in &wave {
        send(
            &device,
            "dev-fl",
            &request(id, 40),
            PublishProperties::default(),
        )
        .await;
    }
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(15), |r| {
        r.all_ended(&wave)
    })
    .await;
    replies.assert_one_final_each(&wave);
    // The expert now runs nothing, and nobody else uses it.
    let foreign = daemon
        .metric("qosroute_expert_foreign_requests{expert=\"a\"}")
        .unwrap();
    assert_eq!(a.load().running + a.load().waiting, 0);
    assert_eq!(foreign, 0.0, "requests of other clients on an idle expert");
}

// ---------------------------------------------------------------------------------------------
// 6. Expiry.

/// MQTT 5 message expiry is the broker's business: a request whose expiry passes while it waits
/// in the (down) daemon's session is dropped by the broker and never reaches the daemon; one
/// with a long expiry is served when the daemon is back. A request whose own
/// `deadline_unix_ms` passed while it waited is answered `expired`, not started late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_expire_while_the_daemon_is_down_are_not_served() {
    let mut broker = Broker::start_with(BrokerOptions {
        persistence: true,
        ..BrokerOptions::default()
    });
    let a = expert("a", 1.0).await;
    let cfg = config(
        &broker.url(),
        "qosrouted-expiry",
        "session_expiry_s = 600",
        &[(&a, "a", 0.6)],
        // Every admitted request is logged with its id.
        "[logging]\nlog_prompts = true\n",
    );
    let mut first = start_daemon(&cfg);
    until_ready(&first, &["a"]).await;
    let mut device = Device::connect_with(
        broker.port,
        "dev-x",
        &[&reply_topic("dev-x")],
        &DeviceOptions {
            session_expiry_s: Some(600),
            ..DeviceOptions::default()
        },
    )
    .await;
    first.signal("TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(10)), Some(0));

    let expiring = PublishProperties {
        message_expiry_interval: Some(1),
        ..PublishProperties::default()
    };
    let lasting = PublishProperties {
        message_expiry_interval: Some(600),
        ..PublishProperties::default()
    };
    send(&device, "dev-x", &request("short", 12), expiring).await;
    let soon = unix_ms() + 1_000;
    send(
        &device,
        "dev-x",
        &request("deadline", 12).with_deadline_unix_ms(soon),
        lasting.clone(),
    )
    .await;
    send(&device, "dev-x", &request("long", 12), lasting).await;
    // Both the one-second expiry (mosquitto counts whole seconds) and the deadline must pass
    // while the daemon is down: there is no event to wait for but the clock.
    tokio::time::sleep(Duration::from_millis(2_100)).await;

    let second = start_behind_a_stopped_broker(&mut broker, &cfg, &["a"]).await;
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(15), |r| {
        r.ends("long") > 0 && r.ends("deadline") > 0
    })
    .await;
    replies.assert_one_final_each(&["long".to_owned()]);
    assert_eq!(replies.errors("deadline"), &[ErrorCode::Expired][..]);
    assert!(replies.finals("deadline").is_empty() && replies.chunks("deadline").is_empty());
    // `short` was published first: had the broker handed it over, the daemon would have
    // logged it before `long`.
    let log = second.log_text();
    assert!(log.contains("id=long"), "{log}");
    assert!(!log.contains("id=short"), "{log}");
    assert_eq!(replies.ends("short"), 0, "{replies:?}");
    until_completed(&second, 1.0).await;
    assert_eq!(outcome(&second, "expired"), 1.0);
    assert_eq!(accounted(&second), 2.0, "{:?}", outcomes(&second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_deadline_gets_an_expired_reply_and_one_within_it_is_served() {
    let broker = Broker::start();
    let a = expert("a", 1.0).await;
    let daemon = start_daemon(&config(
        &broker.url(),
        "qosrouted-deadline",
        "",
        &[(&a, "a", 0.6)],
        "",
    ));
    until_ready(&daemon, &["a"]).await;
    let mut device = Device::connect(broker.port, "dev-dl", &[&reply_topic("dev-dl")]).await;
    let now = unix_ms();
    send(
        &device,
        "dev-dl",
        &request("late", 12).with_deadline_unix_ms(now - 1_000),
        PublishProperties::default(),
    )
    .await;
    send(
        &device,
        "dev-dl",
        &request("in-time", 12).with_deadline_unix_ms(now + 60_000),
        PublishProperties::default(),
    )
    .await;
    let mut replies = Replies::default();
    collect(&mut device, &mut replies, Duration::from_secs(10), |r| {
        r.ends("late") > 0 && r.ends("in-time") > 0
    })
    .await;
    assert_eq!(replies.errors("late"), &[ErrorCode::Expired][..]);
    assert!(replies.finals("late").is_empty() && replies.chunks("late").is_empty());
    replies.assert_one_final_each(&["in-time".to_owned()]);
    until_completed(&daemon, 1.0).await;
    assert_eq!(outcome(&daemon, "expired"), 1.0);
    assert_eq!(accounted(&daemon), 2.0, "{:?}", outcomes(&daemon));
    assert_eq!(
        a.counters().received,
        1,
        "the late request never reached the expert"
    );
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
