//! One gateway site for the end-to-end tests: emulated experts, the daemon's config around
//! them, devices' requests and the replies they collect.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use qosroute_core::{ExpertProfile, LatencyModel};
use qosroute_emulator::{EmulatedExpert, EmulatorOptions, Faults};
use qosroute_proto::{self as proto, Encoding, Reply, Task};
use rumqttc::v5::mqttbytes::v5::PublishProperties;

use super::{Broker, Daemon, Device};

pub const SITE: &str = "test";

pub fn profile(name: &str) -> Arc<ExpertProfile> {
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

pub async fn expert(name: &str, faults: Faults) -> EmulatedExpert {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut options = EmulatorOptions::for_profile(&profile(name));
    options.faults = faults;
    EmulatedExpert::serve(profile(name), options, listener).unwrap()
}

pub fn expert_section(e: &EmulatedExpert, name: &str) -> String {
    format!(
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
default = 0.6
"#,
        url = e.base_url()
    )
}

pub fn config(broker: &Broker, experts: &[(&EmulatedExpert, &str)], extra: &str) -> String {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../policy-model/models/han");
    let mut c = format!(
        r#"
site = "{SITE}"
[broker]
url = "{url}"
client_id = "qosrouted-test-{port}"
reconnect_min_s = 0.1
reconnect_max_s = 1.0
[policy]
model_dir = "{model}"
[slo]
default_s_per_token = 0.5
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[telemetry]
scrape_interval_s = 0.2
stale_after_s = 2.0
[shutdown]
drain_deadline_s = 3.0
{extra}
"#,
        url = broker.url(),
        port = broker.port
    );
    for (e, name) in experts {
        c.push_str(&expert_section(e, name));
    }
    c
}

/// Waits until the daemon reports every named expert up (health checked).
pub async fn until_up(daemon: &Daemon, names: &[&str]) {
    for _ in 0..200 {
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

pub fn request(id: &str, stream: bool) -> proto::Request {
    proto::Request::new(
        id,
        Task::Mmlu,
        "What is the capital of France? Answer briefly.",
    )
    .unwrap()
    .with_max_tokens(12)
    .with_stream(stream)
}

pub fn encode(r: &proto::Request, e: Encoding) -> Vec<u8> {
    let mut buf = vec![0u8; proto::MAX_FRAME_BYTES];
    let n = proto::encode_request(r, e, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// Collects replies of request `id` until its `Final` or `Error`.
pub async fn replies(
    device: &mut Device,
    id: &str,
    encoding: Encoding,
) -> Vec<(Reply, Option<PublishProperties>)> {
    let mut out = Vec::new();
    loop {
        let p = device
            .next(Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("no final reply for {id}; got {out:?}"));
        let reply = proto::decode_reply(&p.payload, encoding).unwrap();
        if reply.id().as_str() != id {
            continue;
        }
        let end = matches!(reply, Reply::Final(_) | Reply::Error(_));
        out.push((reply, p.properties));
        if end {
            return out;
        }
    }
}

/// Sends `n` requests at once from device `device`; returns how many `Final`s and `Error`s
/// each id got.
pub async fn burst(
    broker: &Broker,
    daemon: &Daemon,
    device: &str,
    n: usize,
) -> BTreeMap<String, (u32, u32)> {
    let topic = format!("qosroute/v1/{SITE}/resp/{device}");
    let mut dev = Device::connect(broker.port, device, &[&topic]).await;
    for i in 0..n {
        dev.publish(
            &format!("qosroute/v1/{SITE}/req/{device}"),
            encode(&request(&format!("{device}-{i}"), false), Encoding::Json),
            PublishProperties::default(),
        )
        .await;
    }
    let mut ends: BTreeMap<String, (u32, u32)> = BTreeMap::new();
    while ends.values().map(|(f, e)| f + e).sum::<u32>() < n as u32 {
        let Some(p) = dev.next(Duration::from_secs(20)).await else {
            panic!(
                "replies missing: {ends:?}; daemon log:\n{}",
                daemon.log_text()
            );
        };
        let reply = proto::decode_reply(&p.payload, Encoding::Json).unwrap();
        let slot = ends.entry(reply.id().as_str().to_owned()).or_default();
        match reply {
            Reply::Final(_) => slot.0 += 1,
            Reply::Error(_) => slot.1 += 1,
            Reply::Chunk(_) => {}
        }
    }
    ends
}
