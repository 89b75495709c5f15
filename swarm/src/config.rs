//! How a swarm connects to the broker and how its devices behave.

use std::path::PathBuf;
use std::time::Duration;

use qosroute_core::SloTable;
use rumqttc::v5::MqttOptions;
use rumqttc::{TlsConfiguration, Transport};

use crate::SwarmError;

/// How a swarm connects and how its devices behave. [`SwarmConfig::new`] gives the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SwarmConfig {
    /// `mqtt://HOST[:PORT]` (default port 1883) or `mqtts://HOST[:PORT]` (8883, needs
    /// `ca_file`).
    pub broker_url: String,
    /// PEM file of the CA that signs the broker's certificate (`mqtts://`).
    pub ca_file: Option<PathBuf>,
    /// The `{site}` segment of the gateway's topics.
    pub site: String,
    /// Simulated devices, one MQTT 5 connection each; request `i` is sent by device
    /// `i % devices`. Keep each device under the gateway's per-device rate limit.
    pub devices: usize,
    /// Device names (and client ids) are `{device_prefix}-{run tag}-{k}`.
    pub device_prefix: String,
    /// Replay speed: a request arriving at workload second `t` is published `t / speed`
    /// wall-clock seconds after the start.
    pub speed: f64,
    /// Fraction of requests encoded with postcard (the rest JSON), spread evenly over the run.
    pub postcard_share: f64,
    /// Whether the devices ask for streamed replies.
    pub stream: bool,
    /// The latency target devices put in their requests; `None`: the gateway's per-task SLO.
    /// Set, it is also the target the devices judge their answers by.
    pub slo_s_per_token: Option<f32>,
    /// The latency targets the devices judge their answers by when their requests carry none
    /// (`slo_s_per_token`), per task, in wall-clock seconds per output token: a device then
    /// decides itself whether its SLO was met, by the simulator's rule, from its publish to
    /// the last token ([`crate::RequestRecord::slo_met`]). `None`: the devices take the
    /// gateway's verdict (its clock, from when it received the request).
    pub device_slo: Option<SloTable>,
    /// A published request with no final or error reply this long after its publish is lost.
    pub reply_timeout: Duration,
    /// After the last request ended, the devices keep listening this long, to count late
    /// duplicates.
    pub linger: Duration,
    /// Every prompt starts with its request's id, so no two prompts share a prefix (as real
    /// devices' prompts do not). Off, every prompt is a prefix of the same filler text, which a
    /// real engine's prompt cache (llama.cpp's) serves without prefilling it again.
    pub unique_prompts: bool,
    /// After a final reply whose quality the truth knows, the device rates the answer with
    /// that quality (a `Feedback` on `qosroute/v1/{site}/feedback/{device}`).
    pub feedback: bool,
    /// Every device must be connected and subscribed within this at the start.
    pub connect_timeout: Duration,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// MQTT 5 session expiry of the devices, seconds; 0 makes clean sessions.
    pub session_expiry_s: u32,
    /// First reconnect delay; doubles up to `reconnect_max`.
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    pub reconnect_max: Duration,
    /// Publishes each device may queue while its connection is busy or down; a request that
    /// finds the queue full is not sent (and counted `not_sent`).
    pub queue_capacity: usize,
    /// QoS 1 publishes a device may have unacknowledged by the broker (or less, if the broker
    /// says so); the rest wait in its queue. rumqttc allocates a slot for each up front (216
    /// bytes), so this bounds each device's memory: the default of 256 takes 55 KiB,
    /// rumqttc's own default (65535) 14 MiB.
    pub max_inflight: u16,
}

impl SwarmConfig {
    /// The defaults for a broker and site: 16 devices, real time, a quarter postcard,
    /// streamed, the gateway's SLOs, 60 s reply timeout, 1 s linger, no feedback, persistent
    /// sessions of 5 minutes, reconnects from 0.1 s doubling to 2 s, queues of 4096 publishes,
    /// 256 in flight per device.
    pub fn new(broker_url: impl Into<String>, site: impl Into<String>) -> Self {
        Self {
            broker_url: broker_url.into(),
            ca_file: None,
            site: site.into(),
            devices: 16,
            device_prefix: "swarm".into(),
            speed: 1.0,
            postcard_share: 0.25,
            stream: true,
            slo_s_per_token: None,
            device_slo: None,
            reply_timeout: Duration::from_secs(60),
            linger: Duration::from_secs(1),
            unique_prompts: false,
            feedback: false,
            connect_timeout: Duration::from_secs(10),
            keep_alive: Duration::from_secs(10),
            session_expiry_s: 300,
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(2),
            queue_capacity: 4096,
            max_inflight: 256,
        }
    }

    /// The target a device judges a `task` request by, seconds per output token (see
    /// `device_slo`); `None`: the gateway's verdict.
    pub fn judging_slo(&self, task: qosroute_proto::Task) -> Option<f64> {
        if let Some(slo) = self.slo_s_per_token {
            return Some(f64::from(slo));
        }
        let table = self.device_slo.as_ref()?;
        Some(match task.as_str().parse::<qosroute_core::Task>() {
            Ok(t) => table.slo_s_per_token(t),
            Err(_) => table.default_s_per_token,
        })
    }

    /// Checks every value; the first problem names its field.
    pub fn validate(&self) -> Result<(), SwarmError> {
        let bad = |field: &'static str, message: String| Err(SwarmError::Config { field, message });
        parse_broker_url(&self.broker_url)?;
        if self.site.is_empty() || self.site.contains(['/', '+', '#']) {
            return bad(
                "site",
                format!("`{}` must be one non-empty topic level", self.site),
            );
        }
        if self.devices == 0 || self.devices > 100_000 {
            return bad("devices", format!("{} is not in 1..=100000", self.devices));
        }
        if self.device_prefix.is_empty()
            || self.device_prefix.len() > 20
            || !self
                .device_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return bad(
                "device_prefix",
                format!(
                    "`{}` must be 1-20 ASCII letters, digits, `-` or `_`",
                    self.device_prefix
                ),
            );
        }
        if !(self.speed.is_finite() && self.speed > 0.0) {
            return bad(
                "speed",
                format!("{} is not positive and finite", self.speed),
            );
        }
        if !(0.0..=1.0).contains(&self.postcard_share) {
            return bad(
                "postcard_share",
                format!("{} is not in [0, 1]", self.postcard_share),
            );
        }
        if let Some(slo) = self.slo_s_per_token
            && !(slo.is_finite() && slo > 0.0)
        {
            return bad(
                "slo_s_per_token",
                format!("{slo} is not positive and finite"),
            );
        }
        if let Some(table) = &self.device_slo {
            table
                .validate()
                .or_else(|e| bad("device_slo", e.to_string()))?;
        }
        if self.reply_timeout.is_zero() {
            return bad("reply_timeout", "must be longer than 0".into());
        }
        if self.queue_capacity == 0 {
            return bad("queue_capacity", "must be at least 1".into());
        }
        if self.max_inflight == 0 {
            return bad("max_inflight", "must be at least 1".into());
        }
        if self.reconnect_min.is_zero() || self.reconnect_max < self.reconnect_min {
            return bad(
                "reconnect_min",
                "must be positive and at most reconnect_max".into(),
            );
        }
        Ok(())
    }

    /// The rumqttc options of device `client_id`.
    pub(crate) fn mqtt_options(&self, client_id: &str) -> Result<MqttOptions, SwarmError> {
        let (host, port, tls) = parse_broker_url(&self.broker_url)?;
        let mut options = MqttOptions::new(client_id, host, port);
        options
            .set_keep_alive(self.keep_alive)
            .set_clean_start(self.session_expiry_s == 0)
            .set_session_expiry_interval(Some(self.session_expiry_s))
            .set_max_packet_size(Some(256 * 1024))
            .set_outgoing_inflight_upper_limit(self.max_inflight);
        // Without TCP_NODELAY a publish right after a PUBACK waits for the broker's delayed
        // ACK (~40 ms).
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        if tls {
            let Some(ca_file) = &self.ca_file else {
                return Err(SwarmError::Config {
                    field: "ca_file",
                    message: "an mqtts:// broker needs the CA file".into(),
                });
            };
            let ca = std::fs::read(ca_file).map_err(|source| SwarmError::TlsFile {
                path: ca_file.display().to_string(),
                source,
            })?;
            // rustls needs a process-wide crypto provider; the first one installed wins.
            let _ = rustls::crypto::ring::default_provider().install_default();
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth: None,
            }));
        }
        Ok(options)
    }
}

/// Host, port and whether TLS is used, from an `mqtt://` or `mqtts://` URL.
pub fn parse_broker_url(url: &str) -> Result<(String, u16, bool), SwarmError> {
    let bad = || SwarmError::BrokerUrl(url.to_owned());
    let (scheme, rest) = url.split_once("://").ok_or_else(bad)?;
    let tls = match scheme {
        "mqtt" | "tcp" => false,
        "mqtts" | "ssl" => true,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls_parse_with_default_ports() {
        assert_eq!(
            parse_broker_url("mqtt://127.0.0.1:1884").unwrap(),
            ("127.0.0.1".into(), 1884, false)
        );
        assert_eq!(
            parse_broker_url("mqtts://broker.lan").unwrap(),
            ("broker.lan".into(), 8883, true)
        );
        assert_eq!(
            parse_broker_url("mqtt://[::1]:1883/").unwrap(),
            ("::1".into(), 1883, false)
        );
        for bad in ["127.0.0.1:1883", "http://x", "mqtt://", "mqtt://h:port"] {
            assert!(parse_broker_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let ok = SwarmConfig::new("mqtt://127.0.0.1:1883", "lab");
        ok.validate().unwrap();
        let field = |c: SwarmConfig| match c.validate() {
            Err(SwarmError::Config { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(SwarmConfig {
                devices: 0,
                ..ok.clone()
            }),
            "devices"
        );
        assert_eq!(
            field(SwarmConfig {
                site: "a/b".into(),
                ..ok.clone()
            }),
            "site"
        );
        assert_eq!(
            field(SwarmConfig {
                speed: 0.0,
                ..ok.clone()
            }),
            "speed"
        );
        assert_eq!(
            field(SwarmConfig {
                postcard_share: 1.5,
                ..ok.clone()
            }),
            "postcard_share"
        );
        assert_eq!(
            field(SwarmConfig {
                device_prefix: "a b".into(),
                ..ok
            }),
            "device_prefix"
        );
    }
}
