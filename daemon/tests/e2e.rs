//! End to end: the real `qosrouted` binary, a real mosquitto broker, emulated experts over real
//! HTTP, and MQTT devices (MQTT 5 and 3.1.1).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::time::Duration;

use qosroute_emulator::Faults;
use qosroute_proto::{self as proto, Encoding, ErrorCode, Reply, Task};
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use support::site::{SITE, config, encode, expert, expert_section, replies, request, until_up};
use support::{Broker, Device, start_daemon};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_request_streams_chunks_then_one_final_on_its_response_topic() {
    let broker = Broker::start();
    let (a, b) = (
        expert("a", Faults::default()).await,
        expert("b", Faults::default()).await,
    );
    let daemon = start_daemon(&config(&broker, &[(&a, "a"), (&b, "b")], ""));
    until_up(&daemon, &["a", "b"]).await;
    let mut device = Device::connect(broker.port, "dev-json", &["answers/dev-json"]).await;
    let props = PublishProperties {
        response_topic: Some("answers/dev-json".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr-42")),
        content_type: Some("application/json".into()),
        ..Default::default()
    };
    device
        .publish(
            &format!("qosroute/v1/{SITE}/req/dev-json"),
            encode(&request("r1", true), Encoding::Json),
            props,
        )
        .await;
    let got = replies(&mut device, "r1", Encoding::Json).await;
    let chunks: Vec<&proto::ReplyChunk> = got
        .iter()
        .filter_map(|(r, _)| match r {
            Reply::Chunk(c) => Some(c),
            _ => None,
        })
        .collect();
    assert!(!chunks.is_empty(), "{got:?}");
    assert!(
        chunks.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "chunks in order"
    );
    assert!(chunks.last().unwrap().done);
    let text: String = chunks.iter().map(|c| c.text.as_str()).collect();
    assert!(!text.trim().is_empty());
    let Reply::Final(fin) = &got.last().unwrap().0 else {
        panic!("ended with {:?}", got.last())
    };
    assert_eq!(fin.output_tokens, 12);
    assert!(["a", "b"].contains(&fin.expert.as_str()));
    for (_, p) in &got {
        let p = p.as_ref().unwrap();
        assert_eq!(p.correlation_data.as_deref(), Some(&b"corr-42"[..]));
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
    }
    assert_eq!(
        daemon.metric("qosroute_requests_total{outcome=\"completed\"}"),
        Some(1.0)
    );
    assert_eq!(
        daemon.metric("qosroute_policy_fallbacks_total"),
        Some(0.0),
        "the learned router decided"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postcard_and_mqtt311_devices_are_answered_on_their_device_topics() {
    let broker = Broker::start();
    let a = expert("a", Faults::default()).await;
    let daemon = start_daemon(&config(&broker, &[(&a, "a")], ""));
    until_up(&daemon, &["a"]).await;

    // Postcard over the `/pc` suffix, no MQTT 5 properties: reply on resp/{device}, postcard.
    let mut device = Device::connect(
        broker.port,
        "dev-pc",
        &[&format!("qosroute/v1/{SITE}/resp/dev-pc")],
    )
    .await;
    device
        .publish(
            &format!("qosroute/v1/{SITE}/req/dev-pc/pc"),
            encode(&request("p1", false), Encoding::Postcard),
            PublishProperties::default(),
        )
        .await;
    let got = replies(&mut device, "p1", Encoding::Postcard).await;
    assert!(matches!(got.last().unwrap().0, Reply::Final(_)), "{got:?}");

    // An MQTT 3.1.1 device (no properties at all).
    let mut options = rumqttc::MqttOptions::new("dev-311", "127.0.0.1", broker.port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 64);
    client
        .subscribe(
            format!("qosroute/v1/{SITE}/resp/dev-311"),
            rumqttc::QoS::AtLeastOnce,
        )
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let poller = tokio::spawn(async move {
        let mut subscribed = false;
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => subscribed = true,
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = tx.send(p.payload);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
            let _ = subscribed;
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .publish(
            format!("qosroute/v1/{SITE}/req/dev-311"),
            rumqttc::QoS::AtLeastOnce,
            false,
            encode(&request("m1", true), Encoding::Json),
        )
        .await
        .unwrap();
    let mut last = None;
    while let Ok(Some(payload)) = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
        let reply = proto::decode_reply(&payload, Encoding::Json).unwrap();
        let end = matches!(reply, Reply::Final(_) | Reply::Error(_));
        last = Some(reply);
        if end {
            break;
        }
    }
    poller.abort();
    assert!(matches!(last, Some(Reply::Final(_))), "{last:?}");
    drop(daemon);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_payloads_get_error_replies_and_valid_ones_still_succeed() {
    let broker = Broker::start();
    let a = expert("a", Faults::default()).await;
    let daemon = start_daemon(&config(&broker, &[(&a, "a")], ""));
    until_up(&daemon, &["a"]).await;
    let topic = format!("qosroute/v1/{SITE}/resp/dev-bad");
    let mut device = Device::connect(broker.port, "dev-bad", &[&topic]).await;
    let req = format!("qosroute/v1/{SITE}/req/dev-bad");
    let cases: Vec<(Vec<u8>, &str, ErrorCode)> = vec![
        (b"{not json".to_vec(), "", ErrorCode::Malformed),
        (
            br#"{"v":1,"id":"x1","prompt":"hi","max_tokens":"many"}"#.to_vec(),
            "x1",
            ErrorCode::Malformed,
        ),
        (
            br#"{"v":9,"id":"x2","prompt":"hi","max_tokens":5}"#.to_vec(),
            "x2",
            ErrorCode::UnsupportedVersion,
        ),
        (
            br#"{"v":1,"id":"x3","prompt":"hi","max_tokens":0}"#.to_vec(),
            "x3",
            ErrorCode::Invalid,
        ),
        (
            format!(
                r#"{{"v":1,"id":"x4","prompt":"{}","max_tokens":5}}"#,
                "a".repeat(20_000)
            )
            .into_bytes(),
            "x4",
            ErrorCode::TooLarge,
        ),
    ];
    for (payload, id, code) in &cases {
        device
            .publish(&req, payload.clone(), PublishProperties::default())
            .await;
        let p = device
            .next(Duration::from_secs(10))
            .await
            .expect("no error reply");
        let reply = proto::decode_reply(&p.payload, Encoding::Json).unwrap();
        let Reply::Error(e) = reply else {
            panic!("expected an error, got {reply:?}")
        };
        assert_eq!(
            e.code,
            *code,
            "payload {:?}",
            String::from_utf8_lossy(&payload[..payload.len().min(60)])
        );
        assert_eq!(e.id.as_str(), *id);
    }
    device
        .publish(
            &req,
            encode(&request("ok1", false), Encoding::Json),
            PublishProperties::default(),
        )
        .await;
    let got = replies(&mut device, "ok1", Encoding::Json).await;
    assert!(matches!(got.last().unwrap().0, Reply::Final(_)), "{got:?}");
    assert_eq!(
        daemon.metric("qosroute_requests_total{outcome=\"malformed\"}"),
        Some(cases.len() as f64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expert_failing_before_its_first_token_is_retried_and_one_dying_mid_stream_is_a_clear_error()
 {
    let broker = Broker::start();
    let broken = expert(
        "broken",
        Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
    )
    .await;
    let dying = expert(
        "dying",
        Faults {
            fail_after_tokens: Some(3),
            ..Faults::default()
        },
    )
    .await;
    let good = expert("good", Faults::default()).await;
    // The fallback alone decides here, so which expert is tried first is known: the failing
    // ones are listed as better (higher quality priors).
    let mut cfg = config(&broker, &[(&broken, "broken"), (&good, "good")], "");
    cfg = cfg.replace(
        &format!(
            "model_dir = \"{}\"",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../policy-model/models/han")
        ),
        "",
    );
    cfg = cfg.replacen("default = 0.6", "default = 0.9", 1);
    let daemon = start_daemon(&cfg);
    until_up(&daemon, &["broken", "good"]).await;
    let topic = format!("qosroute/v1/{SITE}/resp/dev-r");
    let mut device = Device::connect(broker.port, "dev-r", &[&topic]).await;
    device
        .publish(
            &format!("qosroute/v1/{SITE}/req/dev-r"),
            encode(&request("t1", true), Encoding::Json),
            PublishProperties::default(),
        )
        .await;
    let got = replies(&mut device, "t1", Encoding::Json).await;
    let Reply::Final(fin) = &got.last().unwrap().0 else {
        panic!("{got:?}")
    };
    assert_eq!(fin.expert.as_str(), "good", "retried on the healthy expert");
    assert!(daemon.metric("qosroute_retries_total").unwrap() >= 1.0);
    drop(daemon);

    let daemon = start_daemon(&config(&broker, &[(&dying, "dying")], ""));
    until_up(&daemon, &["dying"]).await;
    device
        .publish(
            &format!("qosroute/v1/{SITE}/req/dev-r"),
            encode(&request("t2", true), Encoding::Json),
            PublishProperties::default(),
        )
        .await;
    let got = replies(&mut device, "t2", Encoding::Json).await;
    let Reply::Error(e) = &got.last().unwrap().0 else {
        panic!("{got:?}")
    };
    assert_eq!(e.code, ErrorCode::ExpertFailed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_cleanly() {
    let broker = Broker::start();
    let a = expert("a", Faults::default()).await;
    let mut daemon = start_daemon(&config(&broker, &[(&a, "a")], ""));
    until_up(&daemon, &["a"]).await;
    let topic = format!("qosroute/v1/{SITE}/resp/dev-d");
    let mut device = Device::connect(broker.port, "dev-d", &[&topic]).await;
    // Long enough to be in flight at SIGTERM: 100 tokens at >= 5 ms per step (the emulator
    // answers min(max_tokens, 128) tokens).
    let long = proto::Request::new("long", Task::Chat, "Tell me a long story.")
        .unwrap()
        .with_max_tokens(100);
    device
        .publish(
            &format!("qosroute/v1/{SITE}/req/dev-d"),
            encode(&long, Encoding::Json),
            PublishProperties::default(),
        )
        .await;
    // Wait for the first chunk, then ask the daemon to stop.
    let first = device
        .next(Duration::from_secs(10))
        .await
        .expect("no first chunk");
    assert!(matches!(
        proto::decode_reply(&first.payload, Encoding::Json).unwrap(),
        Reply::Chunk(_)
    ));
    daemon.signal("TERM");
    let got = replies(&mut device, "long", Encoding::Json).await;
    let Reply::Final(fin) = &got.last().unwrap().0 else {
        panic!("{got:?}")
    };
    assert_eq!(
        fin.output_tokens, 100,
        "the in-flight request finished during the drain"
    );
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)),
        Some(0),
        "log:\n{}",
        daemon.log_text()
    );
    let log = daemon.log_text();
    assert!(
        !log.contains("broker connection lost"),
        "its own DISCONNECT is not a lost connection:\n{log}"
    );
}

#[test]
fn check_config_prints_every_problem_with_its_key() {
    let dir = support::Scratch::new("check");
    let good = dir.path("good.toml");
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/qosrouted.example.toml"
    ))
    .unwrap()
    .replace(
        "model_dir = \"policy-model/models/han\"",
        &format!(
            "model_dir = \"{}/../policy-model/models/han\"",
            env!("CARGO_MANIFEST_DIR")
        ),
    );
    std::fs::write(&good, &text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qosrouted"))
        .arg("--check-config")
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK (2 experts"));

    let bad = dir.path("bad.toml");
    std::fs::write(
        &bad,
        text.replace("site = \"lab\"", "site = \"\"")
            .replace("max_slots = 4", "max_slots = 0"),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qosrouted"))
        .arg("--check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(
        err.contains("site:") && err.contains("expert[0].max_slots"),
        "{err}"
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_qosrouted"))
        .arg("--check-config")
        .arg(dir.path("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_calibration_moves_a_misconfigured_latency_model_toward_the_experts_real_speed() {
    let broker = Broker::start();
    let a = expert("a", Faults::default()).await;
    // The emulated expert's decode step is 5 ms; the config says 10 ms.
    let cfg =
        config(&broker, &[(&a, "a")], "").replace("decode_t0_s = 0.005", "decode_t0_s = 0.010");
    let daemon = start_daemon(&cfg);
    until_up(&daemon, &["a"]).await;
    let t0 = || {
        daemon
            .metric("qosroute_expert_decode_t0_seconds{expert=\"a\"}")
            .unwrap()
    };
    assert_eq!(t0(), 0.010);
    let topic = format!("qosroute/v1/{SITE}/resp/dev-c");
    let mut device = Device::connect(broker.port, "dev-c", &[&topic]).await;
    for i in 0..25 {
        let id = format!("c{i}");
        let r = proto::Request::new(&id, Task::Chat, "Count to thirty.")
            .unwrap()
            .with_max_tokens(30);
        device
            .publish(
                &format!("qosroute/v1/{SITE}/req/dev-c"),
                encode(&r, Encoding::Json),
                PublishProperties::default(),
            )
            .await;
        let got = replies(&mut device, &id, Encoding::Json).await;
        assert!(matches!(got.last().unwrap().0, Reply::Final(_)), "{got:?}");
    }
    let fitted = t0();
    eprintln!("decode t0 after 25 requests: {fitted} s (configured 0.010, emulated 0.005)");
    assert!(
        (0.004..0.0085).contains(&fitted),
        "t0 after 25 requests: {fitted} (configured 0.010, real 0.005)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_valid_reload_and_keeps_the_old_config_on_a_bad_one() {
    let broker = Broker::start();
    let (a, b) = (
        expert("a", Faults::default()).await,
        expert("b", Faults::default()).await,
    );
    let daemon = start_daemon(&config(&broker, &[(&a, "a")], ""));
    until_up(&daemon, &["a"]).await;
    assert_eq!(daemon.metric("qosroute_expert_up{expert=\"b\"}"), None);
    let metrics_line = format!("listen = \"127.0.0.1:{}\"", daemon.metrics_port);
    let with_b = config(&broker, &[(&a, "a"), (&b, "b")], "")
        .replace("listen = \"127.0.0.1:{metrics_port}\"", &metrics_line);
    std::fs::write(&daemon.config, &with_b).unwrap();
    daemon.signal("HUP");
    until_up(&daemon, &["a", "b"]).await;

    // A bad file changes nothing.
    std::fs::write(
        &daemon.config,
        with_b.replace("max_slots = 8", "max_slots = 0"),
    )
    .unwrap();
    daemon.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    until_up(&daemon, &["a", "b"]).await;
    assert!(
        daemon.log_text().contains("reload refused"),
        "{}",
        daemon.log_text()
    );

    // And it still serves.
    let topic = format!("qosroute/v1/{SITE}/resp/dev-h");
    let mut device = Device::connect(broker.port, "dev-h", &[&topic]).await;
    device
        .publish(
            &format!("qosroute/v1/{SITE}/req/dev-h"),
            encode(&request("h1", false), Encoding::Json),
            PublishProperties::default(),
        )
        .await;
    let got = replies(&mut device, "h1", Encoding::Json).await;
    assert!(matches!(got.last().unwrap().0, Reply::Final(_)), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_over_its_rate_gets_an_explicit_rate_limited_reply() {
    let broker = Broker::start();
    let a = expert("a", Faults::default()).await;
    let daemon = start_daemon(&config(
        &broker,
        &[(&a, "a")],
        "[admission]\ndevice_rate_per_s = 0.5\ndevice_burst = 2.0\n",
    ));
    until_up(&daemon, &["a"]).await;
    let topic = format!("qosroute/v1/{SITE}/resp/dev-rl");
    let mut device = Device::connect(broker.port, "dev-rl", &[&topic]).await;
    for i in 0..3 {
        device
            .publish(
                &format!("qosroute/v1/{SITE}/req/dev-rl"),
                encode(&request(&format!("q{i}"), false), Encoding::Json),
                PublishProperties::default(),
            )
            .await;
    }
    let mut ends = std::collections::BTreeMap::new();
    while ends.len() < 3 {
        let p = device
            .next(Duration::from_secs(10))
            .await
            .expect("missing replies");
        match proto::decode_reply(&p.payload, Encoding::Json).unwrap() {
            Reply::Final(f) => {
                ends.insert(f.id.as_str().to_owned(), "final".to_owned());
            }
            Reply::Error(e) => {
                ends.insert(e.id.as_str().to_owned(), e.code.as_str().to_owned());
            }
            Reply::Chunk(_) => {}
        }
    }
    assert_eq!(ends["q0"], "final");
    assert_eq!(ends["q1"], "final");
    assert_eq!(ends["q2"], ErrorCode::RateLimited.as_str());
    assert_eq!(
        daemon.metric("qosroute_requests_total{outcome=\"rate_limited\"}"),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_on_an_answered_request_is_applied_and_unknown_ids_are_ignored() {
    let broker = Broker::start();
    let a = expert("a", Faults::default()).await;
    let daemon = start_daemon(&config(&broker, &[(&a, "a")], ""));
    until_up(&daemon, &["a"]).await;
    let topic = format!("qosroute/v1/{SITE}/resp/dev-f");
    let mut device = Device::connect(broker.port, "dev-f", &[&topic]).await;
    device
        .publish(
            &format!("qosroute/v1/{SITE}/req/dev-f"),
            encode(&request("f1", false), Encoding::Json),
            PublishProperties::default(),
        )
        .await;
    let got = replies(&mut device, "f1", Encoding::Json).await;
    assert!(matches!(got.last().unwrap().0, Reply::Final(_)), "{got:?}");
    let feedback = |id: &str, score: f32| {
        let mut buf = vec![0u8; 256];
        let n = proto::encode_feedback(
            &proto::Feedback::new(id, score).unwrap(),
            Encoding::Json,
            &mut buf,
        )
        .unwrap();
        buf.truncate(n);
        buf
    };
    let fb_topic = format!("qosroute/v1/{SITE}/feedback/dev-f");
    device
        .publish(
            &fb_topic,
            feedback("nobody", 0.9),
            PublishProperties::default(),
        )
        .await;
    device
        .publish(&fb_topic, feedback("f1", 0.9), PublishProperties::default())
        .await;
    device
        .publish(&fb_topic, b"garbage".to_vec(), PublishProperties::default())
        .await;
    for _ in 0..100 {
        if daemon.metric("qosroute_feedback_total") == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        daemon.metric("qosroute_feedback_total"),
        Some(1.0),
        "{}",
        daemon.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_restart_the_daemon_reconnects_resubscribes_and_serves() {
    let mut broker = Broker::start();
    let a = expert("a", Faults::default()).await;
    let daemon = start_daemon(&config(&broker, &[(&a, "a")], ""));
    until_up(&daemon, &["a"]).await;
    assert_eq!(daemon.metric("qosroute_mqtt_connections_total"), Some(1.0));
    broker.restart(Duration::from_millis(500));
    // The broker lost every session: the daemon must reconnect and subscribe again.
    for _ in 0..200 {
        if daemon.metric("qosroute_mqtt_connections_total") == Some(2.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        daemon.metric("qosroute_mqtt_connections_total"),
        Some(2.0),
        "{}",
        daemon.log_text()
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let topic = format!("qosroute/v1/{SITE}/resp/dev-b");
    let mut device = Device::connect(broker.port, "dev-b", &[&topic]).await;
    device
        .publish(
            &format!("qosroute/v1/{SITE}/req/dev-b"),
            encode(&request("b1", false), Encoding::Json),
            PublishProperties::default(),
        )
        .await;
    let got = replies(&mut device, "b1", Encoding::Json).await;
    assert!(matches!(got.last().unwrap().0, Reply::Final(_)), "{got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_model_file_falls_back_to_qos_greedy_and_counts_it() {
    let broker = Broker::start();
    let a = expert("a", Faults::default()).await;
    let dir = support::Scratch::new("bad-model");
    std::fs::write(dir.path("router-f32.onnx"), b"this is not an onnx model").unwrap();
    let cfg = config(&broker, &[(&a, "a")], "").replace(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../policy-model/models/han"),
        dir.0.to_str().unwrap(),
    );
    let daemon = start_daemon(&cfg);
    until_up(&daemon, &["a"]).await;
    assert!(
        daemon.log_text().contains("learned router unusable"),
        "{}",
        daemon.log_text()
    );
    let topic = format!("qosroute/v1/{SITE}/resp/dev-m");
    let mut device = Device::connect(broker.port, "dev-m", &[&topic]).await;
    device
        .publish(
            &format!("qosroute/v1/{SITE}/req/dev-m"),
            encode(&request("m1", false), Encoding::Json),
            PublishProperties::default(),
        )
        .await;
    let got = replies(&mut device, "m1", Encoding::Json).await;
    assert!(matches!(got.last().unwrap().0, Reply::Final(_)), "{got:?}");
    assert_eq!(daemon.metric("qosroute_policy_fallbacks_total"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_telemetry_feeds_local_experts_and_an_unobservable_device_counts_as_saturated() {
    let broker = Broker::start();
    let here = expert("here", Faults::default()).await;
    let gpu = expert("gpu-here", Faults::default()).await;
    let mut cfg = config(&broker, &[], "").replace(
        "stale_after_s = 2.0",
        "stale_after_s = 2.0\nhost_busy_above = 1.0",
    );
    let local = |section: String, device: &str| {
        section.replace(
            "max_slots = 8\n",
            &format!("max_slots = 8\nlocal = true\ndevice = \"{device}\"\n"),
        )
    };
    cfg.push_str(&local(expert_section(&here, "here"), "cpu"));
    // This host has no GPU of that name: its load is unknown, so never idle.
    cfg.push_str(&local(expert_section(&gpu, "gpu-here"), "gpu:no-such-gpu"));
    let daemon = start_daemon(&cfg);
    until_up(&daemon, &["here", "gpu-here"]).await;
    let foreign = |name: &str| {
        daemon
            .metric(&format!(
                "qosroute_expert_foreign_requests{{expert=\"{name}\"}}"
            ))
            .unwrap()
    };
    // CPU utilisation needs two readings 200 ms apart: until then it is unknown (saturated).
    let mut cpu = None;
    for _ in 0..100 {
        cpu = daemon.metric("qosroute_host_cpu_utilisation");
        if cpu.is_some() && foreign("here") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cpu = cpu.unwrap_or_else(|| panic!("no host CPU reading:\n{}", daemon.metrics()));
    assert!((0.0..=1.0).contains(&cpu), "{cpu}");
    assert!(daemon.metric("qosroute_host_memory_used").is_some());
    assert_eq!(foreign("here"), 0.0, "a known, not-taken CPU adds no load");
    assert_eq!(foreign("gpu-here"), 8.0, "an unobservable GPU is saturated");
    assert!(daemon.log_text().contains("host telemetry detected"));

    let topic = format!("qosroute/v1/{SITE}/resp/dev-h");
    let mut device = Device::connect(broker.port, "dev-h", &[&topic]).await;
    for i in 0..3 {
        let id = format!("h{i}");
        device
            .publish(
                &format!("qosroute/v1/{SITE}/req/dev-h"),
                encode(&request(&id, true), Encoding::Json),
                PublishProperties::default(),
            )
            .await;
        let got = replies(&mut device, &id, Encoding::Json).await;
        assert!(matches!(got.last().unwrap().0, Reply::Final(_)), "{got:?}");
    }
}
