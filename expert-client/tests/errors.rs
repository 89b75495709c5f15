//! Failures against a real HTTP server on loopback: each gives the error that tells the daemon
//! what to do (with the tokens delivered), and none hangs (every call is under `bounded`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{Reply, Step, TestServer, bounded, short, stream_of, token_event};
use qosroute_expert_client::{
    ChatRequest, ChatStream, ExpertClient, ExpertEndpoint, ExpertError, ExpertKind,
    STATUS_BODY_EXCERPT_BYTES, StreamEvent, TimeoutPhase,
};
use tokio::time::Instant;

fn prompt() -> ChatRequest {
    ChatRequest::from_prompt("Why is the sky blue?", 64)
}

fn short_client(server: &TestServer) -> ExpertClient {
    let mut e = server.endpoint(ExpertKind::Vllm);
    e.timeouts = short();
    ExpertClient::new(e).unwrap()
}

/// Reads the stream to its end: the texts delivered and the error that ended it.
async fn until_error(mut stream: ChatStream) -> (Vec<String>, ExpertError) {
    bounded(async {
        let mut tokens = Vec::new();
        loop {
            match stream.next().await {
                Some(Ok(StreamEvent::Token { text, .. })) => tokens.push(text),
                Some(Ok(StreamEvent::Done { .. })) => panic!("the answer completed"),
                Some(Err(e)) => {
                    assert_eq!(e.tokens_delivered() as usize, tokens.len());
                    assert!(stream.next().await.is_none(), "something after the error");
                    return (tokens, e);
                }
                None => panic!("the stream ended without an error"),
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_500_with_a_body_is_a_status_error_with_a_bounded_excerpt() {
    let server = TestServer::start(|_| {
        Reply::fixed(
            500,
            "application/json",
            r#"{"error":{"message":"CUDA out of memory"}}"#,
        )
    })
    .await;
    let e = bounded(short_client(&server).chat(prompt()))
        .await
        .unwrap_err();
    match &e {
        ExpertError::Status { code, body } => {
            assert_eq!(*code, 500);
            assert!(body.contains("CUDA out of memory"), "{body}");
        }
        other => panic!("expected Status, got {other:?}"),
    }
    assert!(e.retry_is_invisible());

    let huge = "x".repeat(100_000);
    let server = TestServer::start(move |_| Reply::fixed(503, "text/plain", huge.clone())).await;
    match bounded(short_client(&server).chat(prompt()))
        .await
        .unwrap_err()
    {
        ExpertError::Status { code: 503, body } => {
            assert_eq!(body.len(), STATUS_BODY_EXCERPT_BYTES)
        }
        other => panic!("expected Status, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_refused_is_a_connect_error() {
    // Bind to learn a free port, then close it: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut e = ExpertEndpoint::new(
        "gone",
        format!("http://127.0.0.1:{port}"),
        "m",
        ExpertKind::Vllm,
    );
    e.timeouts = short();
    let client = ExpertClient::new(e).unwrap();
    let error = bounded(client.chat(prompt())).await.unwrap_err();
    assert!(matches!(error, ExpertError::Connect { .. }), "{error:?}");
    assert!(error.retry_is_invisible());
    assert!(matches!(
        bounded(client.health()).await,
        Err(ExpertError::Connect { .. })
    ));
    assert!(matches!(
        bounded(client.scrape_load()).await,
        Err(ExpertError::Connect { .. })
    ));
}

#[tokio::test]
async fn a_full_accept_queue_is_a_connect_timeout() {
    // A listener that never accepts, with a backlog of 1: once its queue is full, the kernel
    // drops further SYNs and connecting hangs until the connect timeout.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let mut e = ExpertEndpoint::new("full", format!("http://{addr}"), "m", ExpertKind::Vllm);
    e.timeouts = short();
    e.timeouts.first_token = Duration::from_secs(5);
    let error = bounded(ExpertClient::new(e).unwrap().chat(prompt()))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ExpertError::Timeout {
            phase: TimeoutPhase::Connect,
            tokens_delivered: 0
        }
    );
    drop(listener);
}

#[tokio::test]
async fn no_response_at_all_is_a_first_token_timeout() {
    let server = TestServer::start(|_| Reply::Silence).await;
    let started = Instant::now();
    let error = bounded(short_client(&server).chat(prompt()))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ExpertError::Timeout {
            phase: TimeoutPhase::FirstToken,
            tokens_delivered: 0
        }
    );
    // The deadline, not something earlier, ended it.
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn headers_and_keepalives_but_no_token_is_a_first_token_timeout() {
    let server = TestServer::start(|_| {
        Reply::sse(vec![
            Step::Write(
                b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n"
                    .to_vec(),
            ),
            Step::Write(b": keep-alive\n\n".to_vec()),
            Step::Sleep(Duration::from_millis(100)),
            Step::Write(b": keep-alive\n\n".to_vec()),
            Step::Stall,
        ])
    })
    .await;
    let stream = bounded(short_client(&server).chat(prompt())).await.unwrap();
    let (tokens, error) = until_error(stream).await;
    assert!(tokens.is_empty());
    assert_eq!(
        error,
        ExpertError::Timeout {
            phase: TimeoutPhase::FirstToken,
            tokens_delivered: 0
        }
    );
}

#[tokio::test]
async fn a_stall_mid_answer_is_a_between_tokens_timeout_with_the_count() {
    let server = TestServer::start(|_| {
        Reply::sse(vec![
            Step::Write(token_event("a")),
            Step::Write(token_event("b")),
            Step::Stall,
        ])
    })
    .await;
    let stream = bounded(short_client(&server).chat(prompt())).await.unwrap();
    let (tokens, error) = until_error(stream).await;
    assert_eq!(tokens, ["a", "b"]);
    assert_eq!(
        error,
        ExpertError::Timeout {
            phase: TimeoutPhase::BetweenTokens,
            tokens_delivered: 2
        }
    );
    assert!(!error.retry_is_invisible());
}

#[tokio::test]
async fn the_total_deadline_ends_a_trickling_answer() {
    let server = TestServer::start(|_| {
        let mut steps = Vec::new();
        for _ in 0..200 {
            steps.push(Step::Write(token_event("x")));
            steps.push(Step::Sleep(Duration::from_millis(20)));
        }
        Reply::sse(steps)
    })
    .await;
    let mut e = server.endpoint(ExpertKind::Vllm);
    e.timeouts = short();
    e.timeouts.between_tokens = Duration::from_secs(5);
    e.timeouts.total = Duration::from_millis(400);
    let stream = bounded(ExpertClient::new(e).unwrap().chat(prompt()))
        .await
        .unwrap();
    let (tokens, error) = until_error(stream).await;
    assert!(!tokens.is_empty());
    assert_eq!(error.timeout_phase(), Some(TimeoutPhase::Total));
}

#[tokio::test]
async fn a_dropped_connection_mid_answer_is_closed_with_the_count() {
    let server = TestServer::start(|_| {
        Reply::sse(vec![
            Step::Write(token_event("a")),
            Step::Write(token_event("b")),
            Step::Cut,
        ])
    })
    .await;
    let stream = bounded(short_client(&server).chat(prompt())).await.unwrap();
    let (tokens, error) = until_error(stream).await;
    assert_eq!(tokens, ["a", "b"]);
    assert_eq!(
        error,
        ExpertError::Closed {
            tokens_delivered: 2
        }
    );
}

#[tokio::test]
async fn a_clean_end_without_finish_is_closed() {
    let server = TestServer::start(|_| Reply::sse(vec![Step::Write(token_event("a"))])).await;
    let stream = bounded(short_client(&server).chat(prompt())).await.unwrap();
    let (tokens, error) = until_error(stream).await;
    assert_eq!(tokens, ["a"]);
    assert_eq!(
        error,
        ExpertError::Closed {
            tokens_delivered: 1
        }
    );
}

#[tokio::test]
async fn a_hangup_before_any_response_is_closed_with_nothing_delivered() {
    let server = TestServer::start(|_| Reply::Hangup).await;
    let error = bounded(short_client(&server).chat(prompt()))
        .await
        .unwrap_err();
    assert_eq!(
        error,
        ExpertError::Closed {
            tokens_delivered: 0
        }
    );
}

#[tokio::test]
async fn garbage_in_the_stream_is_a_protocol_error_after_the_good_tokens() {
    let server = TestServer::start(|_| {
        let mut bytes = token_event("fine");
        bytes.extend_from_slice(b"data: {\"choices\": [oops\n\n");
        Reply::sse(vec![Step::Write(bytes), Step::Write(stream_of(&["never"]))])
    })
    .await;
    let stream = bounded(short_client(&server).chat(prompt())).await.unwrap();
    let (tokens, error) = until_error(stream).await;
    assert_eq!(tokens, ["fine"]);
    assert!(
        matches!(
            error,
            ExpertError::Protocol {
                tokens_delivered: 1,
                ..
            }
        ),
        "{error:?}"
    );
}

#[tokio::test]
async fn an_error_object_mid_stream_is_a_protocol_error() {
    let server = TestServer::start(|_| {
        let mut bytes = token_event("a");
        bytes
            .extend_from_slice(b"data: {\"error\":{\"message\":\"engine died\",\"code\":500}}\n\n");
        Reply::sse(vec![Step::Write(bytes), Step::Stall])
    })
    .await;
    let stream = bounded(short_client(&server).chat(prompt())).await.unwrap();
    let (_, error) = until_error(stream).await;
    match error {
        ExpertError::Protocol {
            message,
            tokens_delivered: 1,
        } => assert!(message.contains("engine died")),
        other => panic!("expected Protocol, got {other:?}"),
    }
}

#[tokio::test]
async fn an_overlong_line_is_a_protocol_error_not_unbounded_growth() {
    let server = TestServer::start(|_| {
        let mut steps = vec![Step::Write(b"data: ".to_vec())];
        // 2 MiB without a line end, in 64 KiB writes.
        for _ in 0..32 {
            steps.push(Step::Write(vec![b'x'; 64 * 1024]));
        }
        steps.push(Step::Stall);
        Reply::sse(steps)
    })
    .await;
    let stream = bounded(short_client(&server).chat(prompt())).await.unwrap();
    let (_, error) = until_error(stream).await;
    assert!(
        matches!(&error, ExpertError::Protocol { message, .. } if message.contains("longer than")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_json_answer_instead_of_a_stream_is_a_protocol_error() {
    let server = TestServer::start(|_| {
        Reply::fixed(
            200,
            "application/json",
            r#"{"choices":[{"message":{"content":"hi"}}]}"#,
        )
    })
    .await;
    let error = bounded(short_client(&server).chat(prompt()))
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            ExpertError::Protocol {
                tokens_delivered: 0,
                ..
            }
        ),
        "{error:?}"
    );
}
