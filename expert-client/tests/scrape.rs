//! Load scraping and health checks against a real HTTP server on loopback serving real
//! `/metrics` and `/slots` samples.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Reply, Step, TestServer, bounded, data};
use qosroute_expert_client::{
    EngineLoad, ExpertClient, ExpertError, ExpertKind, MetricNames, TimeoutPhase,
};

/// A server answering `path` with the file, 404 elsewhere.
async fn serving(routes: Vec<(&'static str, Reply)>) -> TestServer {
    TestServer::start(move |r| {
        routes.iter().find(|(p, _)| *p == r.path).map_or_else(
            || Reply::fixed(404, "text/plain", "Not Found"),
            |(_, reply)| reply.clone(),
        )
    })
    .await
}

fn metrics(file: &str) -> Reply {
    Reply::fixed(200, "text/plain; version=0.0.4; charset=utf-8", data(file))
}

async fn scrape(
    server: &TestServer,
    kind: ExpertKind,
    model: &str,
) -> Result<EngineLoad, ExpertError> {
    let mut e = server.endpoint(kind);
    e.model = model.to_owned();
    bounded(ExpertClient::new(e).unwrap().scrape_load()).await
}

fn signals(load: &EngineLoad) -> (Option<u32>, Option<u32>, Option<f64>) {
    (load.running, load.waiting, load.kv_cache_usage)
}

#[tokio::test]
async fn vllm_v1_metrics_are_read_for_the_model() {
    let server = serving(vec![("/metrics", metrics("vllm-v1-metrics.prom"))]).await;
    let load = scrape(&server, ExpertKind::Vllm, "Qwen/Qwen2.5-7B-Instruct")
        .await
        .unwrap();
    assert_eq!(signals(&load), (Some(3), Some(2), Some(0.4213)));
    assert_eq!(server.received()[0].path, "/metrics");
}

#[tokio::test]
async fn vllm_v0_metrics_use_the_older_cache_metric_name() {
    let server = serving(vec![("/metrics", metrics("vllm-v0-metrics.prom"))]).await;
    let load = scrape(
        &server,
        ExpertKind::Vllm,
        "meta-llama/Llama-3.1-8B-Instruct",
    )
    .await
    .unwrap();
    assert_eq!(signals(&load), (Some(7), Some(0), Some(0.8671)));
}

#[tokio::test]
async fn sglang_metrics_are_read() {
    let server = serving(vec![("/metrics", metrics("sglang-metrics.prom"))]).await;
    let load = scrape(
        &server,
        ExpertKind::SgLang,
        "meta-llama/Llama-3.1-8B-Instruct",
    )
    .await
    .unwrap();
    assert_eq!(signals(&load), (Some(4), Some(6), Some(0.12)));
}

#[tokio::test]
async fn llamacpp_metrics_without_kv_cache_leave_it_unknown() {
    let server = serving(vec![("/metrics", metrics("llamacpp-metrics.prom"))]).await;
    let load = scrape(&server, ExpertKind::LlamaCpp, "any").await.unwrap();
    assert_eq!(signals(&load), (Some(2), Some(1), None));
    // The running count came from /metrics, so /slots was not asked.
    assert_eq!(server.received().len(), 1);

    let server = serving(vec![("/metrics", metrics("llamacpp-metrics-with-kv.prom"))]).await;
    let load = scrape(&server, ExpertKind::LlamaCpp, "any").await.unwrap();
    assert_eq!(signals(&load), (Some(2), Some(1), Some(0.3125)));
}

#[tokio::test]
async fn llamacpp_without_metrics_falls_back_to_slots() {
    let disabled = Reply::fixed(
        501,
        "application/json",
        r#"{"error":{"code":501,"message":"This server does not support metrics endpoint. Start it with `--metrics`","type":"not_supported_error"}}"#,
    );
    let server = serving(vec![
        ("/metrics", disabled),
        (
            "/slots",
            Reply::fixed(200, "application/json", data("llamacpp-slots.json")),
        ),
    ])
    .await;
    let load = scrape(&server, ExpertKind::LlamaCpp, "any").await.unwrap();
    assert_eq!(signals(&load), (Some(2), None, None));
    let paths: Vec<String> = server.received().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/metrics", "/slots"]);
}

#[tokio::test]
async fn no_metrics_and_no_slots_is_all_unknown_not_an_error() {
    let server = serving(vec![]).await;
    let load = scrape(&server, ExpertKind::LlamaCpp, "any").await.unwrap();
    assert_eq!(signals(&load), (None, None, None));
    let load = scrape(&server, ExpertKind::Vllm, "any").await.unwrap();
    assert_eq!(signals(&load), (None, None, None));
}

#[tokio::test]
async fn a_missing_or_renamed_metric_is_none() {
    let server = serving(vec![("/metrics", metrics("vllm-v1-metrics.prom"))]).await;
    let mut e = server.endpoint(ExpertKind::Vllm);
    e.metric_names = MetricNames {
        running: Some("vllm:num_requests_running".into()),
        waiting: Some("vllm:renamed_waiting".into()),
        kv_usage: None,
    };
    let load = bounded(ExpertClient::new(e).unwrap().scrape_load())
        .await
        .unwrap();
    assert_eq!(signals(&load), (Some(3), None, None));
}

#[tokio::test]
async fn ollama_and_openai_have_no_metrics_and_are_not_asked() {
    let server = serving(vec![("/metrics", metrics("vllm-v1-metrics.prom"))]).await;
    for kind in [ExpertKind::Ollama, ExpertKind::OpenAi] {
        let load = scrape(&server, kind, "m").await.unwrap();
        assert_eq!(signals(&load), (None, None, None));
    }
    assert_eq!(server.accepts(), 0);
}

#[tokio::test]
async fn a_server_error_on_metrics_is_a_status_error() {
    let server = serving(vec![("/metrics", Reply::fixed(500, "text/plain", "boom"))]).await;
    let error = scrape(&server, ExpertKind::Vllm, "m").await.unwrap_err();
    assert_eq!(
        error,
        ExpertError::Status {
            code: 500,
            body: "boom".into()
        }
    );
}

#[tokio::test]
async fn a_stalled_scrape_times_out() {
    let server = serving(vec![(
        "/metrics",
        Reply::Http {
            status: 200,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            framing: common::Framing::Chunked,
            steps: vec![
                Step::Write(b"vllm:num_requests_running 1\n".to_vec()),
                Step::Stall,
            ],
        },
    )])
    .await;
    let mut e = server.endpoint(ExpertKind::Vllm);
    e.probe_timeout = Duration::from_millis(300);
    let error = bounded(ExpertClient::new(e).unwrap().scrape_load())
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ExpertError::Timeout {
            phase: TimeoutPhase::Total,
            tokens_delivered: 0
        }
    );
}

#[tokio::test]
async fn health_asks_each_kind_its_own_path() {
    let server = serving(vec![
        (
            "/health",
            Reply::fixed(200, "application/json", r#"{"status":"ok"}"#),
        ),
        (
            "/api/tags",
            Reply::fixed(200, "application/json", r#"{"models":[]}"#),
        ),
        (
            "/v1/models",
            Reply::fixed(200, "application/json", r#"{"object":"list","data":[]}"#),
        ),
    ])
    .await;
    for kind in ExpertKind::ALL {
        let client = ExpertClient::new(server.endpoint(kind)).unwrap();
        bounded(client.health())
            .await
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
    }
    let paths: Vec<String> = server.received().into_iter().map(|r| r.path).collect();
    assert_eq!(
        paths,
        ["/health", "/health", "/health", "/api/tags", "/v1/models"]
    );
}

#[tokio::test]
async fn health_fails_while_loading_and_times_out_when_silent() {
    let server = serving(vec![(
        "/health",
        Reply::fixed(
            503,
            "application/json",
            r#"{"error":{"code":503,"message":"Loading model"}}"#,
        ),
    )])
    .await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::LlamaCpp)).unwrap();
    assert!(matches!(
        bounded(client.health()).await,
        Err(ExpertError::Status { code: 503, .. })
    ));

    let server = TestServer::start(|_| Reply::Silence).await;
    let mut e = server.endpoint(ExpertKind::Vllm);
    e.probe_timeout = Duration::from_millis(300);
    let error = bounded(ExpertClient::new(e).unwrap().health())
        .await
        .unwrap_err();
    assert_eq!(error.timeout_phase(), Some(TimeoutPhase::Total));
}
