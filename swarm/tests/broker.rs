//! The swarm against a real mosquitto: a fake gateway that misbehaves on purpose (every anomaly
//! must be counted, none may crash the swarm), and the real `qosrouted` with emulated experts
//! (every request must end exactly once).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use qosroute_core::{ExpertProfile, LatencyModel};
use qosroute_emulator::{EmulatedExpert, EmulatorOptions};
use qosroute_proto::{self as proto, Encoding, ErrorCode, Reply, Task};
use qosroute_sim::QualityTable;
use qosroute_swarm::{Outcome, QualityTruth, Swarm, SwarmConfig, SwarmRequest, probe_gateway};
use qosroute_testkit::{Broker, Daemon};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};

fn requests(n: usize, gap_s: f64) -> Vec<SwarmRequest> {
    (0..n)
        .map(|i| SwarmRequest {
            arrival_s: i as f64 * gap_s,
            task: Task::Mmlu,
            prompt_tokens: 50 + 10 * i as u32,
            output_tokens: 8,
            max_tokens: 8,
            quality_row: None,
        })
        .collect()
}

fn encode(reply: &Reply, encoding: Encoding) -> Vec<u8> {
    let mut buf = vec![0u8; proto::MAX_FRAME_BYTES];
    let n = proto::encode_reply(reply, encoding, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// A gateway that answers request `i` by `i % 5`: 0 properly (chunk, final); 1 with a
/// duplicated final; 2 with an error; 3 never; 4 properly but without correlation data. It
/// also sends garbage, an error without id and a reply for an unknown id to every requester.
async fn fake_gateway(port: u16, site: &str) -> tokio::task::JoinHandle<()> {
    let mut options = MqttOptions::new("fake-gateway", "127.0.0.1", port);
    options.set_max_packet_size(Some(1024 * 1024));
    let (client, mut eventloop) = AsyncClient::new(options, 1024);
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let filter = format!("qosroute/v1/{site}/req/#");
    let task = tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let publisher = client.clone();
        tokio::spawn(async move {
            while let Some((topic, payload, props)) = rx.recv().await {
                publisher
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
                    .await
                    .unwrap();
            }
        });
        client.try_subscribe(filter, QoS::AtLeastOnce).unwrap();
        loop {
            let Ok(event) = eventloop.poll().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let p = match event {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(t) = subscribed_tx.take() {
                        let _ = t.send(());
                    }
                    continue;
                }
                Event::Incoming(Packet::Publish(p)) => p,
                _ => continue,
            };
            let props = p.properties.clone().unwrap();
            let encoding = props
                .content_type
                .as_deref()
                .and_then(Encoding::from_content_type)
                .unwrap();
            let request = proto::decode_request(&p.payload, encoding).unwrap();
            let id = request.id.as_str();
            let i: usize = id.rsplit('-').next().unwrap().parse().unwrap();
            let topic = props.response_topic.clone().unwrap();
            let with_corr = PublishProperties {
                correlation_data: props.correlation_data.clone(),
                content_type: Some(encoding.content_type().into()),
                ..Default::default()
            };
            let send = |reply: Reply, props: PublishProperties| {
                tx.send((topic.clone(), encode(&reply, encoding), props))
                    .unwrap();
            };
            let chunk = || Reply::Chunk(proto::ReplyChunk::new(id, 0, "hi", true, "x").unwrap());
            let fin =
                || Reply::Final(proto::FinalReply::new(id, "x", 8, 5, 80, 0.01, true).unwrap());
            match i % 5 {
                0 => {
                    send(chunk(), with_corr.clone());
                    send(fin(), with_corr.clone());
                }
                1 => {
                    send(chunk(), with_corr.clone());
                    send(fin(), with_corr.clone());
                    // The same message again (a redelivery), then a second, different answer.
                    send(fin(), with_corr.clone());
                    let second = proto::FinalReply::new(id, "y", 8, 6, 90, 0.01, true).unwrap();
                    send(Reply::Final(second), with_corr.clone());
                }
                2 => send(
                    Reply::Error(proto::ErrorReply::new(id, ErrorCode::NoExpert, "no").unwrap()),
                    with_corr.clone(),
                ),
                3 => {}
                _ => {
                    send(chunk(), PublishProperties::default());
                    send(fin(), PublishProperties::default());
                }
            }
            // Noise, to every requester.
            tx.send((
                topic.clone(),
                b"\xffnot a reply".to_vec(),
                with_corr.clone(),
            ))
            .unwrap();
            send(
                Reply::Error(proto::ErrorReply::new("", ErrorCode::Malformed, "?").unwrap()),
                with_corr.clone(),
            );
            send(
                Reply::Final(
                    proto::FinalReply::new("someone-else-1", "x", 1, 1, 1, 0.1, true).unwrap(),
                ),
                with_corr,
            );
        }
    });
    tokio::time::timeout(Duration::from_secs(5), subscribed_rx)
        .await
        .unwrap()
        .unwrap();
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_gateway_s_duplicates_losses_and_garbage_are_counted_not_fatal() {
    let broker = Broker::start();
    let gateway = fake_gateway(broker.port, "fake").await;
    let mut config = SwarmConfig::new(broker.url(), "fake");
    config.devices = 3;
    config.postcard_share = 0.5;
    config.reply_timeout = Duration::from_secs(2);
    config.linger = Duration::from_millis(500);
    let report = Swarm::run(config, &requests(20, 0.01), None).await.unwrap();
    gateway.abort();
    let s = report.summary();
    assert_eq!(s.requests, 20);
    assert_eq!(s.published, 20);
    assert!(s.accounted, "{s:?}");
    assert_eq!(s.completed, 12, "{s:?}"); // i % 5 in {0, 1, 4}
    assert_eq!(s.errors_by_code.get("no_expert"), Some(&4));
    assert_eq!(s.lost, 4);
    assert_eq!(s.duplicated, 4);
    assert_eq!(s.extra_ends, 4);
    assert_eq!(
        s.redelivered_ends, 4,
        "byte-identical copies are redeliveries"
    );
    assert_eq!(s.unexpected.undecodable, 20);
    assert_eq!(s.unexpected.no_id, 20);
    assert_eq!(s.unexpected.unknown_id, 20);
    assert_eq!(s.unexpected.correlation_mismatch, 8); // chunk and final of each i % 5 == 4
    assert_eq!(s.unexpected.wrong_device, 0);
    for r in &report.records {
        let want = match r.index % 5 {
            0 | 1 | 4 => Outcome::Completed,
            2 => Outcome::Error(ErrorCode::NoExpert),
            _ => Outcome::Lost,
        };
        assert_eq!(r.outcome, want, "{r:?}");
        assert_eq!(
            r.encoding,
            if r.index % 2 == 1 {
                Encoding::Postcard
            } else {
                Encoding::Json
            }
        );
    }
    assert_eq!(report.experts, vec!["x".to_owned()]);
    assert!((s.slo_violation_rate - 0.0).abs() < 1e-12);
}

fn profile(name: &str, model: &str) -> Arc<ExpertProfile> {
    Arc::new(ExpertProfile {
        name: name.into(),
        model: model.into(),
        hardware: String::new(),
        source: String::new(),
        max_slots: 8,
        kv_tokens: 100_000,
        latency: LatencyModel {
            prefill_tok_s: 20_000.0,
            prefill_overhead_s: 0.0,
            decode_t0_s: 0.004,
            decode_d_s_per_seq: 0.0002,
            decode_e_s_per_ctx_token: 1e-8,
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_to_the_real_daemon_ends_exactly_once() {
    let broker = Broker::start();
    let table = Arc::new(QualityTable::embedded().unwrap());
    let names = [("fast-qwen", "qwen25_7b"), ("fast-llama", "llama31_8b")];
    let mut experts = Vec::new();
    let mut sections = String::new();
    for (name, model) in names {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let p = profile(name, model);
        let mut options = EmulatorOptions::for_profile(&p);
        options.quality = Some(table.clone());
        let e = EmulatedExpert::serve(p, options, listener).unwrap();
        sections.push_str(&format!(
            r#"
[[expert]]
name = "{name}"
base_url = "{url}"
model = "{model}"
kind = "vllm"
max_slots = 8
kv_tokens = 100000
[expert.latency]
prefill_tok_s = 20000.0
decode_t0_s = 0.004
decode_d_s_per_seq = 0.0002
decode_e_s_per_ctx_token = 1e-8
[expert.quality]
default = 0.6
"#,
            url = e.base_url()
        ));
        experts.push(e);
    }
    let site = "swarmtest";
    let daemon = Daemon::start(&format!(
        r#"
site = "{site}"
[broker]
url = "{url}"
client_id = "qosrouted-swarm-test-{port}"
reconnect_min_s = 0.1
reconnect_max_s = 1.0
[policy]
fallback = "least-loaded"
[slo]
default_s_per_token = 0.5
[metrics]
listen = "127.0.0.1:{{metrics_port}}"
[telemetry]
scrape_interval_s = 0.2
stale_after_s = 2.0
[shutdown]
drain_deadline_s = 3.0
{sections}"#,
        url = broker.url(),
        port = broker.port
    ));
    for _ in 0..200 {
        if names.iter().all(|(n, _)| {
            daemon.metric(&format!("qosroute_expert_up{{expert=\"{n}\"}}")) == Some(1.0)
        }) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut config = SwarmConfig::new(broker.url(), site);
    config.devices = 4;
    config.postcard_share = 0.5;
    config.feedback = true;
    config.reply_timeout = Duration::from_secs(20);
    config.linger = Duration::from_millis(300);
    probe_gateway(&config, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("{e}; daemon log:\n{}", daemon.log_text()));
    let workload = qosroute_sim::generate("poisson:rate=25,n=60", &table, 7).unwrap();
    let mut plan = SwarmRequest::from_workload(&workload);
    for r in &mut plan {
        r.max_tokens = r.max_tokens.min(24);
    }
    let truth = QualityTruth::new(table.clone(), names);
    let swarm = Swarm::start(config, &plan, Some(truth)).await.unwrap();
    let report = swarm.finish().await.unwrap();
    let s = report.summary();
    assert!(s.accounted, "{s:?}");
    assert_eq!((s.requests, s.published, s.lost), (60, 60, 0), "{s:?}");
    assert_eq!(s.completed + s.errors, 60);
    assert_eq!(s.completed, 60, "{s:?}; log:\n{}", daemon.log_text());
    assert_eq!((s.duplicated, s.chunk_gaps, s.replies_after_end), (0, 0, 0));
    assert_eq!(s.unexpected.total(), 0, "{:?}", s.unexpected);
    assert!(s.avg_qos.is_finite() && s.avg_qos > 0.0, "{}", s.avg_qos);
    assert!(s.ttft_s.p50 > 0.0 && s.per_token_s.p50 > 0.0);
    let mut served: Vec<&str> = s.experts.iter().map(|e| e.name.as_str()).collect();
    served.sort_unstable();
    assert_eq!(served, ["fast-llama", "fast-qwen"]);
    for r in report
        .records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed)
    {
        assert_eq!(r.ends, 1);
        assert!(r.chunks >= 1, "{r:?}");
        assert_eq!(r.output_tokens, Some(r.max_tokens.min(24)), "{r:?}");
        assert!(r.quality.is_some());
    }
    for encoding in [Encoding::Json, Encoding::Postcard] {
        assert!(
            report
                .records
                .iter()
                .any(|r| r.encoding == encoding && r.outcome == Outcome::Completed)
        );
    }
    assert_eq!(report.feedback_sent, s.completed);
    // The daemon answered each request once and applied the ratings.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // (Not all of it necessarily: the daemon records who answered only after publishing the
    // final reply, so a rating that overtakes that bookkeeping is ignored.)
    let applied = daemon.metric("qosroute_feedback_total").unwrap();
    assert!(applied > 0.0 && applied <= s.completed as f64, "{applied}");
    assert_eq!(
        daemon.metric("qosroute_requests_total{outcome=\"completed\"}"),
        Some(s.completed as f64)
    );
}
