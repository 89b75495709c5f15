//! HTTP/1.1 keep-alive: sequential requests to one expert share one TCP connection (counted
//! by the server's accepts), and a connection is not reused after an answer was abandoned.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Reply, Step, TestServer, bounded, data, stream_of, token_event};
use qosroute_expert_client::{ChatRequest, ExpertClient, ExpertKind, StreamEvent};

fn route(path: &str) -> Reply {
    match path {
        "/v1/chat/completions" => Reply::sse_in_pieces(&stream_of(&["a", "b", "c"]), 7),
        "/metrics" => Reply::fixed(200, "text/plain", data("vllm-v1-metrics.prom")),
        "/health" => Reply::fixed(200, "text/plain", ""),
        _ => Reply::fixed(404, "text/plain", "no"),
    }
}

async fn complete(client: &ExpertClient) -> u32 {
    bounded(async {
        let mut s = client
            .chat(ChatRequest::from_prompt("hi", 8))
            .await
            .unwrap();
        loop {
            match s.next().await {
                Some(Ok(StreamEvent::Token { .. })) => {}
                Some(Ok(StreamEvent::Done { .. })) => return s.tokens_delivered(),
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let server = TestServer::start(|r| route(&r.path)).await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::Vllm)).unwrap();
    for _ in 0..5 {
        assert_eq!(complete(&client).await, 3);
    }
    bounded(client.health()).await.unwrap();
    bounded(client.scrape_load()).await.unwrap();
    // A clone shares the pool.
    assert_eq!(complete(&client.clone()).await, 3);
    assert_eq!(server.received().len(), 8);
    assert_eq!(server.accepts(), 1);
}

#[tokio::test]
async fn an_abandoned_answer_does_not_poison_the_pool() {
    let server = TestServer::start(|r| {
        if r.json_is_prompt("stall") {
            Reply::sse(vec![Step::Write(token_event("x")), Step::Stall])
        } else {
            route(&r.path)
        }
    })
    .await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::Vllm)).unwrap();
    let mut s = bounded(client.chat(ChatRequest::from_prompt("stall", 8)))
        .await
        .unwrap();
    assert!(matches!(
        bounded(s.next()).await,
        Some(Ok(StreamEvent::Token { .. }))
    ));
    drop(s);
    // The next answer gets a fresh connection and completes.
    assert_eq!(complete(&client).await, 3);
    assert_eq!(server.accepts(), 2);
}

trait PromptIs {
    fn json_is_prompt(&self, text: &str) -> bool;
}

impl PromptIs for common::Received {
    fn json_is_prompt(&self, text: &str) -> bool {
        !self.body.is_empty() && self.json()["messages"][0]["content"] == text
    }
}
