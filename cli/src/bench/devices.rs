//! The MQTT devices of `qosroute bench e2e`.

use super::*;

/// A connected MQTT 5 client subscribed to one topic; what arrives is stamped on receipt by
/// the task polling its event loop.
pub(super) struct Device {
    pub(super) client: AsyncClient,
    pub(super) inbox: mpsc::UnboundedReceiver<(Instant, Bytes)>,
    pub(super) poller: tokio::task::JoinHandle<()>,
    pub(super) stop: CancellationToken,
}

pub(super) fn broker_host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let (host, port, tls) =
        qosroute_swarm::parse_broker_url(url).map_err(|e| anyhow::anyhow!("{e}"))?;
    if tls {
        bail!("the bench uses a local broker without TLS");
    }
    Ok((host, port))
}

/// The MQTT 5 options of a load-generating device (`qosroute bench e2e`, `qosroute
/// validate`): clean start, 256 KiB packets, up to 1,024 publishes in flight, TCP_NODELAY
/// (without it a publish right after a PUBACK waits for the broker's delayed ACK).
pub(crate) fn device_options(client_id: &str, host: String, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(true)
        .set_max_packet_size(Some(256 * 1024))
        .set_outgoing_inflight_upper_limit(1024);
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    options
}

pub(super) async fn connect_device(
    broker: &(String, u16),
    client_id: &str,
    topic: &str,
    connection_errors: Arc<AtomicU64>,
) -> anyhow::Result<Device> {
    let stop = CancellationToken::new();
    let stop_poller = stop.clone();
    let options = device_options(client_id, broker.0.clone(), broker.1);
    let (client, mut eventloop) = AsyncClient::new(options, 4096);
    let (tx, inbox) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let sub_client = client.clone();
    let topic_owned = topic.to_owned();
    let poller = tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                () = stop_poller.cancelled() => break,
                e = eventloop.poll() => e,
            };
            match event {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((Instant::now(), p.payload));
                }
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = sub_client.try_subscribe(topic_owned.clone(), QoS::AtLeastOnce);
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(_) => {}
                Err(_) => {
                    connection_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        if client_disconnect(&sub_client) {
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Ok(e) = eventloop.poll().await {
                    if matches!(e, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
    });
    match tokio::time::timeout(Duration::from_secs(10), ready_rx.recv()).await {
        Ok(Some(())) => Ok(Device {
            client,
            inbox,
            poller,
            stop,
        }),
        _ => {
            poller.abort();
            bail!("{client_id}: not connected and subscribed to {topic} within 10 s")
        }
    }
}

pub(super) fn client_disconnect(client: &AsyncClient) -> bool {
    client.try_disconnect().is_ok()
}

impl Device {
    pub(super) async fn publish(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic.to_owned(), QoS::AtLeastOnce, false, payload)
            .await
            .context("publish failed")
    }

    pub(super) async fn recv(&mut self, within: Duration) -> Option<(Instant, Bytes)> {
        tokio::time::timeout(within, self.inbox.recv())
            .await
            .ok()
            .flatten()
    }

    pub(super) async fn close(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.poller).await;
    }
}

pub(super) fn encode(id: &str, stream: bool) -> anyhow::Result<Vec<u8>> {
    let prompt = format!("bench {id}");
    let request = proto::Request::new(id, Task::Chat, &prompt)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_max_tokens(MAX_TOKENS)
        .with_stream(stream);
    let mut buf = vec![0u8; 512];
    let n = proto::encode_request(&request, Encoding::Postcard, &mut buf)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    buf.truncate(n);
    Ok(buf)
}
