//! An MQTT 5 test device.

use std::path::PathBuf;
use std::time::Duration;

/// How a test device connects.
#[derive(Debug, Clone, Default)]
pub struct DeviceOptions {
    /// A persistent session (clean start off) that the broker keeps this long after a
    /// disconnection.
    pub session_expiry_s: Option<u32>,
    /// Connect over TLS, trusting this CA (PEM).
    pub tls_ca: Option<PathBuf>,
    /// User name and password.
    pub credentials: Option<(String, String)>,
}

/// An MQTT 5 device: publishes requests and collects what arrives on its subscriptions.
pub struct Device {
    /// The client (publish, subscribe).
    pub client: rumqttc::v5::AsyncClient,
    /// Every publish received, in order.
    pub received: tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
    poller: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device").finish_non_exhaustive()
    }
}

impl Device {
    /// Connects as `id` and subscribes to `filters` (waits for the SUBACKs).
    pub async fn connect(port: u16, id: &str, filters: &[&str]) -> Self {
        Self::connect_with(port, id, filters, &DeviceOptions::default()).await
    }

    /// [`Device::connect`] with a persistent session, TLS or credentials.
    pub async fn connect_with(
        port: u16,
        id: &str,
        filters: &[&str],
        device: &DeviceOptions,
    ) -> Self {
        use rumqttc::v5::mqttbytes::v5::Packet;
        use rumqttc::v5::{AsyncClient, Event, MqttOptions};
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(10));
        options.set_max_packet_size(Some(1024 * 1024));
        if let Some(expiry) = device.session_expiry_s {
            options.set_clean_start(false);
            options.set_session_expiry_interval(Some(expiry));
        }
        if let Some((user, password)) = &device.credentials {
            options.set_credentials(user.clone(), password.clone());
        }
        if let Some(ca) = &device.tls_ca {
            let _ = rustls::crypto::ring::default_provider().install_default();
            options.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Simple {
                    ca: std::fs::read(ca).unwrap(),
                    alpn: None,
                    client_auth: None,
                },
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let (tx, received) = tokio::sync::mpsc::unbounded_channel();
        let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
        let poller = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if tx.send(p).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = acked_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        for f in filters {
            client
                .subscribe(*f, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                .await
                .unwrap();
            tokio::time::timeout(Duration::from_secs(5), acked_rx.recv())
                .await
                .expect("no SUBACK");
        }
        Device {
            client,
            received,
            poller,
        }
    }

    /// Publishes `payload` at QoS 1 with MQTT 5 properties.
    pub async fn publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        properties: rumqttc::v5::mqttbytes::v5::PublishProperties,
    ) {
        self.client
            .publish_with_properties(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload,
                properties,
            )
            .await
            .unwrap();
    }

    /// The next publish received, within `within`.
    pub async fn next(&mut self, within: Duration) -> Option<rumqttc::v5::mqttbytes::v5::Publish> {
        tokio::time::timeout(within, self.received.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.poller.abort();
    }
}
