//! The MQTT link (rumqttc, MQTT 5): one task polls the event loop and hands incoming
//! publishes to the dispatcher; everything else publishes through cloned clients.
//!
//! The rumqttc traps, designed out:
//! - the polling task never awaits a publish, subscribe or ack (their request channel is
//!   drained by the very loop that would be waiting): it only uses `try_subscribe`, retried
//!   after every event until it goes through; replies and acks are sent from request tasks;
//! - a failed poll is retried after a capped exponential back-off (`reconnect_min_s`,
//!   doubling to `reconnect_max_s`), reset by the next CONNACK;
//! - after a CONNACK without a session (first connect, or the broker lost it) the request and
//!   feedback filters are subscribed again.
//!
//! Requests are QoS 1 with manual acks: a request is acknowledged to the broker only when its
//! outcome is final (answer or error reply published), so a daemon that dies mid-request gets
//! it again from its persistent session.
//!
//! Replies and acks go through one publisher task, in two lanes: the messages of requests
//! being served first, refusals (shed, malformed, rate limited, duplicates) after. Thousands of
//! request tasks never wait on rumqttc's own channel at once (its queue of waiting senders is
//! scanned linearly, which made a burst of 20,000 requests quadratic), and under overload the
//! answers of admitted requests do not queue behind thousands of `overloaded` replies. Within
//! a lane the order is kept, so a request's reply always precedes its ack. Acks then leave in
//! the order the requests arrived, as MQTT requires ([`crate::ack_order`]).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::ack_order::AckOrder;
use crate::config::BrokerConfig;
use crate::metrics::Metrics;

/// Capacity of rumqttc's request channel (publishes, acks, subscribes waiting for the loop).
const REQUEST_CHANNEL: usize = 4096;

/// Why the link cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The broker URL is unusable.
    #[error("broker.url `{0}`: expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")]
    Url(String),
    /// A TLS file could not be read.
    #[error("{path}: cannot read: {source}")]
    TlsFile {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The password variable is not set.
    #[error("environment variable {0} (broker.password_env) is not set")]
    Password(String),
}

/// Host, port and whether TLS is used, from `mqtt://` / `mqtts://` URLs.
pub fn parse_broker_url(url: &str) -> Result<(String, u16, bool), LinkError> {
    let bad = || LinkError::Url(url.to_owned());
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let tls = match scheme {
        "mqtt" => false,
        "mqtts" => true,
        _ => return Err(bad()),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| bad())?)
        }
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return Err(bad());
    }
    Ok((host.to_owned(), port, tls))
}

/// The MQTT 5 receive maximum for a gateway that serves at most `max_in_flight` requests at
/// once: requests are acknowledged when their outcome is final, so this bounds what the broker
/// hands over unacknowledged. Twice the places lets the gateway see (and answer `overloaded`)
/// an excess without the broker flooding it faster than it can reply; the rest waits in the
/// broker.
pub fn receive_maximum(max_in_flight: usize) -> u16 {
    u16::try_from(max_in_flight.saturating_mul(2))
        .unwrap_or(u16::MAX)
        .max(16)
}

/// Replies (QoS 1) the gateway keeps unacknowledged at the broker at most; more wait in
/// rumqttc's request channel until the broker acknowledges. rumqttc preallocates a slot per
/// possible packet id up to this bound (or the broker's receive maximum, mosquitto's is 65,535):
/// without it that table alone took 13 MB of resident memory.
pub const OUTGOING_INFLIGHT: u16 = 1024;

/// The rumqttc options of a broker configuration, receiving at most `receive_maximum`
/// unacknowledged publishes.
pub fn mqtt_options(config: &BrokerConfig, receive_maximum: u16) -> Result<MqttOptions, LinkError> {
    let (host, port, tls) = parse_broker_url(&config.url)?;
    let mut options = MqttOptions::new(config.client_id.clone(), host, port);
    options
        .set_keep_alive(Duration::from_secs(config.keep_alive_s))
        .set_clean_start(config.session_expiry_s == 0)
        .set_session_expiry_interval(Some(config.session_expiry_s))
        .set_manual_acks(true)
        .set_receive_maximum(Some(receive_maximum))
        .set_max_packet_size(Some(256 * 1024))
        .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT);
    // Replies and acks are small writes: without TCP_NODELAY, Nagle's algorithm holds each one
    // until the broker's delayed ACK (~40 ms on Linux) whenever an earlier one is unacknowledged.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    if let Some(user) = &config.username {
        let password = match &config.password_env {
            Some(var) => std::env::var(var).map_err(|_| LinkError::Password(var.clone()))?,
            None => String::new(),
        };
        options.set_credentials(user.clone(), password);
    }
    if tls {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| LinkError::TlsFile {
                path: p.display().to_string(),
                source,
            })
        };
        let Some(t) = &config.tls else {
            return Err(LinkError::Url(config.url.clone()));
        };
        let client_auth = match (&t.client_cert_file, &t.client_key_file) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
            ca: read(&t.ca_file)?,
            alpn: None,
            client_auth,
        }));
    }
    Ok(options)
}

/// A request publish as received, with what is needed to reply to it and acknowledge it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The publish (payload, topic, properties); acknowledged through [`Link::ack`].
    pub publish: Publish,
    /// Its place in the acknowledgement order ([`AckOrder::received`]).
    pub seq: u64,
}

/// What acknowledges a delivery (its place in the order and its packet id): small, so that
/// a request waiting to be acknowledged does not hold its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    seq: u64,
    pkid: u16,
}

impl Incoming {
    /// What acknowledges it ([`Link::ack`]).
    pub fn delivery(&self) -> Delivery {
        Delivery {
            seq: self.seq,
            pkid: self.publish.pkid,
        }
    }

    /// The topic as text (lossy).
    pub fn topic(&self) -> String {
        String::from_utf8_lossy(&self.publish.topic).into_owned()
    }

    /// The MQTT 5 properties, if any.
    pub fn properties(&self) -> Option<&PublishProperties> {
        self.publish.properties.as_ref()
    }
}

/// Which lane of the publisher a message takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Chunks, finals, errors and acks of requests being served: published first.
    Served,
    /// Refusals (shed, rate limited, malformed, expired, shutting down), duplicate and
    /// feedback acks: published when the served lane is empty.
    Refusals,
}

/// What the publisher task hands to rumqttc.
#[derive(Debug)]
enum Op {
    Publish(Outgoing),
    /// The outcome of delivery `seq` (packet id `pkid`) is final.
    Ack {
        seq: u64,
        pkid: u16,
    },
    /// UNSUBSCRIBE from these filters (after what the served lane holds); answers when sent.
    Unsubscribe(Vec<String>, oneshot::Sender<()>),
    /// Publishes everything queued in both lanes, then DISCONNECT; answers when done.
    Disconnect(oneshot::Sender<()>),
}

/// Publishing side of the link; cheap to clone into request tasks.
#[derive(Debug, Clone)]
pub struct Link {
    served: mpsc::Sender<Op>,
    refusals: mpsc::Sender<Op>,
}

/// The publisher task is gone (the daemon is stopping).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the MQTT publisher has stopped")]
pub struct LinkClosed;

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// Topic.
    pub topic: String,
    /// Payload.
    pub payload: Vec<u8>,
    /// MQTT 5 correlation data echoed from the request.
    pub correlation_data: Option<bytes::Bytes>,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// Message expiry, seconds.
    pub expiry_s: Option<u32>,
}

impl Link {
    fn lane(&self, lane: Lane) -> &mpsc::Sender<Op> {
        match lane {
            Lane::Served => &self.served,
            Lane::Refusals => &self.refusals,
        }
    }

    /// Queues a QoS 1 publish in `lane`. Waits while the lane is full; fails only when the
    /// publisher task is gone.
    pub async fn publish(&self, out: Outgoing, lane: Lane) -> Result<(), LinkClosed> {
        self.lane(lane)
            .send(Op::Publish(out))
            .await
            .map_err(|_| LinkClosed)
    }

    /// Queues the acknowledgement of a request (its outcome is final) in `lane`, after what
    /// that lane already holds.
    pub async fn ack(&self, delivery: Delivery, lane: Lane) -> Result<(), LinkClosed> {
        self.lane(lane)
            .send(Op::Ack {
                seq: delivery.seq,
                pkid: delivery.pkid,
            })
            .await
            .map_err(|_| LinkClosed)
    }

    /// Sends UNSUBSCRIBE for `filters` (at shutdown, with a clean session); the event loop
    /// closes the dispatcher's input at their UNSUBACKs.
    pub async fn unsubscribe(&self, filters: Vec<String>) -> Result<(), LinkClosed> {
        let (done, sent) = oneshot::channel();
        self.served
            .send(Op::Unsubscribe(filters, done))
            .await
            .map_err(|_| LinkClosed)?;
        sent.await.map_err(|_| LinkClosed)
    }

    /// Publishes what both lanes hold, then sends DISCONNECT (at shutdown).
    pub async fn disconnect(&self) -> Result<(), LinkClosed> {
        let (done, finished) = oneshot::channel();
        self.served
            .send(Op::Disconnect(done))
            .await
            .map_err(|_| LinkClosed)?;
        finished.await.map_err(|_| LinkClosed)
    }
}

/// Capacity of each publisher lane.
const LANE_CAPACITY: usize = 4096;

/// The acknowledgement order shared by the event loop (deliveries, reconnects) and the
/// publisher (outcomes, acks).
#[derive(Debug, Clone, Default)]
pub struct SharedAckOrder(Arc<Mutex<AckOrder>>);

impl SharedAckOrder {
    fn lock(&self) -> MutexGuard<'_, AckOrder> {
        // The order holds no invariant a panicking holder could break half-way.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// When the front of the acknowledgement line is acknowledged before its outcome is final
/// ([`crate::ack_order`]).
#[derive(Debug, Clone, Copy)]
pub struct AckPolicy {
    /// After waiting this long.
    pub deadline: Duration,
    /// When more deliveries than this wait (three quarters of the receive maximum).
    pub max_waiting: usize,
}

impl AckPolicy {
    /// The policy of a gateway with this ack deadline and receive maximum.
    pub fn new(deadline_s: f64, receive_maximum: u16) -> Self {
        Self {
            deadline: Duration::from_secs_f64(deadline_s.max(0.001)),
            max_waiting: (usize::from(receive_maximum) * 3 / 4).max(1),
        }
    }
}

/// A PUBACK of packet id `pkid` through rumqttc.
async fn send_ack(client: &AsyncClient, pkid: u16) -> bool {
    let mut publish = Publish::new("", QoS::AtLeastOnce, Vec::new(), None);
    publish.pkid = pkid;
    client.ack(&publish).await.is_ok()
}

/// Hands the lanes' messages to rumqttc, the served lane first, until DISCONNECT or until
/// every [`Link`] is dropped; acks leave in arrival order (`acks`, `policy`). A publish rumqttc
/// refuses (its event loop is gone) is counted in `replies_dropped`.
async fn run_publisher(
    client: AsyncClient,
    mut served: mpsc::Receiver<Op>,
    mut refusals: mpsc::Receiver<Op>,
    acks: SharedAckOrder,
    policy: AckPolicy,
    metrics: std::sync::Arc<Metrics>,
) {
    let early_before = std::sync::atomic::AtomicU64::new(0);
    // Sends the acks due now; `seq`/`pkid`: an outcome that just became final.
    let release = async |outcome: Option<(u64, u16)>| -> bool {
        let mut due = Vec::new();
        {
            let mut order = acks.lock();
            if let Some((seq, pkid)) = outcome {
                order.done(seq, pkid);
            }
            order.due(
                tokio::time::Instant::now().into_std(),
                policy.deadline,
                policy.max_waiting,
                &mut due,
            );
            let early = order.early();
            let before = early_before.swap(early, std::sync::atomic::Ordering::Relaxed);
            if early > before {
                metrics
                    .acks_early
                    .fetch_add(early - before, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let mut ok = true;
        for pkid in due {
            ok &= send_ack(&client, pkid).await;
        }
        ok
    };
    let forward = async |op: Op| -> Option<oneshot::Sender<()>> {
        let ok = match op {
            Op::Publish(out) => {
                let properties = PublishProperties {
                    correlation_data: out.correlation_data,
                    content_type: out.content_type,
                    message_expiry_interval: out.expiry_s,
                    ..PublishProperties::default()
                };
                client
                    .publish_with_properties(
                        out.topic,
                        QoS::AtLeastOnce,
                        false,
                        out.payload,
                        properties,
                    )
                    .await
                    .is_ok()
            }
            Op::Ack { seq, pkid } => release(Some((seq, pkid))).await,
            Op::Unsubscribe(filters, done) => {
                let mut ok = true;
                for filter in filters {
                    ok &= client.unsubscribe(filter).await.is_ok();
                }
                let _ = done.send(());
                ok
            }
            Op::Disconnect(done) => return Some(done),
        };
        if !ok {
            metrics
                .replies_dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        None
    };
    loop {
        let overdue = acks.lock().next_deadline(policy.deadline);
        let op = tokio::select! {
            biased;
            Some(op) = served.recv() => op,
            Some(op) = refusals.recv() => op,
            () = sleep_until_std(overdue) => {
                release(None).await;
                continue;
            }
            else => return,
        };
        let Some(done) = forward(op).await else {
            continue;
        };
        // Shutting down: what is queued goes out first.
        let mut pending = Vec::new();
        while let Ok(op) = served.try_recv() {
            pending.push(op);
        }
        while let Ok(op) = refusals.try_recv() {
            pending.push(op);
        }
        let mut waiting = vec![done];
        for op in pending {
            waiting.extend(forward(op).await);
        }
        let mut last = Vec::new();
        acks.lock().done_at_disconnect(&mut last);
        for pkid in last {
            send_ack(&client, pkid).await;
        }
        let _ = client.disconnect().await;
        for done in waiting {
            let _ = done.send(());
        }
        return;
    }
}

/// Sleeps until `at`, forever when `None`.
async fn sleep_until_std(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

/// Creates the link: the publishing side, the event loop to hand to [`run_event_loop`], and
/// the publisher task (to spawn) that feeds rumqttc from the link's two lanes.
pub fn connect(
    config: &BrokerConfig,
    receive_maximum: u16,
    metrics: std::sync::Arc<Metrics>,
) -> Result<LinkParts<impl Future<Output = ()> + Send + 'static>, LinkError> {
    let (client, eventloop) =
        AsyncClient::new(mqtt_options(config, receive_maximum)?, REQUEST_CHANNEL);
    let (served_tx, served_rx) = mpsc::channel(LANE_CAPACITY);
    let (refusals_tx, refusals_rx) = mpsc::channel(LANE_CAPACITY);
    let link = Link {
        served: served_tx,
        refusals: refusals_tx,
    };
    let acks = SharedAckOrder::default();
    let policy = AckPolicy::new(config.ack_deadline_s, receive_maximum);
    let publisher = run_publisher(
        client.clone(),
        served_rx,
        refusals_rx,
        acks.clone(),
        policy,
        metrics,
    );
    Ok(LinkParts {
        link,
        eventloop,
        subscriber: client,
        acks,
        publisher,
    })
}

/// What [`connect`] makes.
#[allow(missing_debug_implementations)] // EventLoop and the publisher future are not Debug.
pub struct LinkParts<P> {
    /// The publishing side, for request tasks.
    pub link: Link,
    /// The event loop, for [`run_event_loop`].
    pub eventloop: EventLoop,
    /// The client [`run_event_loop`] subscribes with.
    pub subscriber: AsyncClient,
    /// The acknowledgement order, for [`run_event_loop`].
    pub acks: SharedAckOrder,
    /// The publisher task, to spawn.
    pub publisher: P,
}

/// Polls the event loop until `cancel`: forwards request and feedback publishes to `incoming`,
/// (re)subscribes `filters` after every session-less CONNACK, backs off between failed polls.
#[allow(clippy::too_many_arguments)]
pub async fn run_event_loop(
    mut eventloop: EventLoop,
    subscriber: AsyncClient,
    acks: SharedAckOrder,
    filters: Vec<String>,
    incoming: mpsc::Sender<Incoming>,
    metrics: std::sync::Arc<Metrics>,
    backoff: (Duration, Duration),
    cancel: CancellationToken,
) {
    let (min, max) = backoff;
    let mut delay = min;
    let mut to_subscribe: Vec<String> = Vec::new();
    // Closed at the UNSUBACKs of a shutdown: nothing more is served.
    let mut incoming = Some(incoming);
    let mut unsubacks = 0usize;
    // Set once this daemon has sent DISCONNECT: the connection closing is then the goodbye.
    let mut leaving = false;
    loop {
        let event = tokio::select! {
            () = cancel.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                metrics
                    .mqtt_connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                delay = min;
                acks.lock().connected();
                tracing::info!(
                    session_present = ack.session_present,
                    "connected to the broker"
                );
                if !ack.session_present {
                    to_subscribe.clone_from(&filters);
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                // Waits while the dispatcher is busy: the broker then holds the requests.
                // The dispatcher never waits on this loop, so this cannot deadlock.
                let seq = acks.lock().received(
                    publish.pkid,
                    publish.dup,
                    tokio::time::Instant::now().into_std(),
                );
                let Some(to_dispatcher) = &incoming else {
                    tracing::debug!("a delivery after the unsubscription is not served");
                    continue;
                };
                if to_dispatcher.send(Incoming { publish, seq }).await.is_err() {
                    break;
                }
            }
            Ok(Event::Incoming(Packet::UnsubAck(_))) => {
                unsubacks += 1;
                if unsubacks >= filters.len() && incoming.take().is_some() {
                    tracing::info!("unsubscribed: what arrived before is answered, nothing after");
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => leaving = true,
            Ok(_) => {}
            Err(error) if leaving => {
                tracing::info!(%error, "disconnected from the broker");
                break;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_s = delay.as_secs_f64(), "broker connection lost");
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(max);
            }
        }
        to_subscribe.retain(|filter| {
            match subscriber.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                Ok(()) => {
                    tracing::info!(filter = %filter, "subscribed");
                    false
                }
                Err(_) => true,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            parse_broker_url("mqtts://broker.lan").unwrap(),
            ("broker.lan".into(), 8883, true)
        );
        assert_eq!(
            parse_broker_url("mqtt://[::1]:1883").unwrap(),
            ("::1".into(), 1883, false)
        );
        for bad in [
            "http://x",
            "mqtt://",
            "mqtt://h:port",
            "x",
            "mqtt://h:99999",
        ] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }
}
