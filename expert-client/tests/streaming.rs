//! Streaming chat completions against a real HTTP server on loopback: token order, usage and
//! the `qosroute` extension, odd byte splits, the dialects of vLLM, llama.cpp and Ollama, and
//! what the request looks like on the wire.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Framing, Reply, SAMPLE_TOKENS, Step, TestServer, bounded, data, stream_of};
use futures_util::StreamExt;
use qosroute_expert_client::{
    ChatMessage, ChatRequest, ExpertClient, ExpertError, ExpertKind, StreamEvent, Usage,
};
use serde_json::{Value, json};

/// Everything one answer said.
#[derive(Debug, PartialEq)]
struct Answer {
    tokens: Vec<String>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
    extension: Option<Value>,
}

async fn answer(client: &ExpertClient, request: ChatRequest) -> Result<Answer, ExpertError> {
    bounded(async {
        let mut stream = client.chat(request).await?;
        let mut tokens = Vec::new();
        let mut last_at = None;
        loop {
            match stream.next().await {
                Some(Ok(StreamEvent::Token { text, at })) => {
                    assert!(
                        last_at.is_none_or(|l| at >= l),
                        "arrival times go backwards"
                    );
                    last_at = Some(at);
                    tokens.push(text);
                }
                Some(Ok(StreamEvent::Done {
                    finish_reason,
                    usage,
                    extension,
                })) => {
                    assert!(stream.next().await.is_none(), "something after Done");
                    assert_eq!(stream.tokens_delivered() as usize, tokens.len());
                    return Ok(Answer {
                        tokens,
                        finish_reason,
                        usage,
                        extension,
                    });
                }
                Some(Err(e)) => return Err(e),
                None => panic!("the stream ended without Done or an error"),
            }
        }
    })
    .await
}

fn prompt() -> ChatRequest {
    ChatRequest::from_prompt("Why is the sky blue?", 64)
}

fn sample_answer(extension: Option<Value>) -> Answer {
    Answer {
        tokens: SAMPLE_TOKENS.iter().map(|t| (*t).to_owned()).collect(),
        finish_reason: Some("stop".into()),
        usage: Some(Usage {
            prompt_tokens: 14,
            completion_tokens: 10,
        }),
        extension,
    }
}

#[tokio::test]
async fn tokens_arrive_in_order_with_usage_and_the_extension() {
    let tokens = ["Hello", ",", " wörld", " 😀", "!"];
    let server =
        TestServer::start(move |_| Reply::sse(vec![Step::Write(stream_of(&tokens))])).await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::Vllm)).unwrap();
    let a = answer(&client, prompt()).await.unwrap();
    assert_eq!(a.tokens, tokens);
    assert_eq!(a.finish_reason.as_deref(), Some("stop"));
    assert_eq!(
        a.usage,
        Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 5
        })
    );
    assert_eq!(a.extension, Some(json!({"quality": 0.5})));
}

#[tokio::test]
async fn read_to_end_gathers_what_next_yields() {
    let tokens = ["Hello", ",", " wörld", " 😀", "!"];
    let server =
        TestServer::start(move |_| Reply::sse(vec![Step::Write(stream_of(&tokens))])).await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::Vllm)).unwrap();
    let read = bounded(async {
        let mut stream = client.chat(prompt()).await?;
        stream.read_to_end().await
    })
    .await
    .unwrap();
    assert_eq!(read.text, tokens.concat());
    assert_eq!(read.tokens, 5);
    assert!(read.first_token_at.unwrap() <= read.last_token_at.unwrap());
    assert!(read.mean_step_s().unwrap() >= 0.0);
    assert_eq!(read.finish_reason.as_deref(), Some("stop"));
    assert_eq!(read.usage.map(|u| u.completion_tokens), Some(5));
    assert_eq!(read.extension, Some(json!({"quality": 0.5})));
}

#[tokio::test]
async fn one_byte_writes_give_the_same_answer() {
    let tokens = ["Grüße", " aus", " 東京", " 😀"];
    let whole = stream_of(&tokens);
    let bytes = whole.clone();
    let server = TestServer::start(move |_| Reply::sse_in_pieces(&bytes, 1)).await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::Vllm)).unwrap();
    let split = answer(&client, prompt()).await.unwrap();
    assert_eq!(split.tokens, tokens);
    assert_eq!(split.extension, Some(json!({"quality": 0.5})));
}

#[tokio::test]
async fn crlf_split_between_writes_gives_the_same_answer() {
    let crlf = String::from_utf8(data("vllm-chat-stream.sse"))
        .unwrap()
        .replace('\n', "\r\n");
    // Cut every line end between its CR and its LF, and every other piece at odd places.
    let mut steps = Vec::new();
    for piece in crlf.split_inclusive('\r') {
        let bytes = piece.as_bytes();
        let (a, b) = bytes.split_at(bytes.len() / 3);
        steps.push(Step::Write(a.to_vec()));
        steps.push(Step::Write(b.to_vec()));
    }
    let server = TestServer::start(move |_| Reply::sse(steps.clone())).await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::Vllm)).unwrap();
    assert_eq!(
        answer(&client, prompt()).await.unwrap(),
        sample_answer(None)
    );
}

#[tokio::test]
async fn every_split_size_of_a_sample_gives_the_same_answer() {
    let bytes = data("llamacpp-chat-stream.sse");
    for size in [2, 3, 7, 64, 1000] {
        let b = bytes.clone();
        let server = TestServer::start(move |_| Reply::sse_in_pieces(&b, size)).await;
        let client = ExpertClient::new(server.endpoint(ExpertKind::LlamaCpp)).unwrap();
        assert_eq!(
            answer(&client, prompt()).await.unwrap(),
            sample_answer(None),
            "pieces of {size}"
        );
    }
}

#[tokio::test]
async fn the_vllm_llamacpp_and_ollama_formats_are_understood() {
    for (file, kind) in [
        ("vllm-chat-stream.sse", ExpertKind::Vllm),
        ("llamacpp-chat-stream.sse", ExpertKind::LlamaCpp),
        ("llamacpp-chat-stream-no-done.sse", ExpertKind::LlamaCpp),
        ("ollama-chat-stream.sse", ExpertKind::Ollama),
    ] {
        let bytes = data(file);
        let server = TestServer::start(move |_| Reply::sse(vec![Step::Write(bytes.clone())])).await;
        let client = ExpertClient::new(server.endpoint(kind)).unwrap();
        assert_eq!(
            answer(&client, prompt()).await.unwrap(),
            sample_answer(None),
            "{file}"
        );
    }
}

#[tokio::test]
async fn crlf_keepalive_comments_and_null_usage_are_tolerated() {
    let bytes = data("quirks-crlf-keepalive.sse");
    let server = TestServer::start(move |_| Reply::sse_in_pieces(&bytes, 5)).await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::OpenAi)).unwrap();
    let expected = sample_answer(Some(
        json!({"quality": 0.83, "task": "qa", "expert": "emulated-7b"}),
    ));
    assert_eq!(answer(&client, prompt()).await.unwrap(), expected);
}

#[tokio::test]
async fn a_body_framed_by_connection_close_works_too() {
    let bytes = data("ollama-chat-stream.sse");
    let server = TestServer::start(move |_| Reply::Http {
        status: 200,
        headers: vec![("Content-Type".into(), "text/event-stream".into())],
        framing: Framing::UntilClose,
        steps: bytes.chunks(9).map(|c| Step::Write(c.to_vec())).collect(),
    })
    .await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::Ollama)).unwrap();
    assert_eq!(
        answer(&client, prompt()).await.unwrap(),
        sample_answer(None)
    );
}

#[tokio::test]
async fn the_request_is_a_streaming_chat_completion_with_extras_and_key() {
    let server = TestServer::start(|_| Reply::sse(vec![Step::Write(stream_of(&["ok"]))])).await;
    let mut endpoint = server.endpoint(ExpertKind::OpenAi);
    endpoint.base_url = format!("{}/v1/", server.base_url());
    endpoint.api_key = Some("sk-test".into());
    let client = ExpertClient::new(endpoint).unwrap();
    let mut request = ChatRequest {
        messages: vec![ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
        max_tokens: Some(32),
        temperature: Some(0.25),
        ..ChatRequest::default()
    };
    request.extra.insert(
        "qosroute".into(),
        json!({"quality": 0.9, "output_tokens": 1}),
    );
    answer(&client, request).await.unwrap();
    let received = server.received();
    assert_eq!(received.len(), 1);
    let r = &received[0];
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.header("authorization"), Some("Bearer sk-test"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("accept"), Some("text/event-stream"));
    assert_eq!(
        r.json(),
        json!({
            "model": "test-model",
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 32,
            "temperature": 0.25,
            "qosroute": {"quality": 0.9, "output_tokens": 1},
        })
    );
}

#[tokio::test]
async fn the_stream_adapter_yields_the_same_items() {
    let server = TestServer::start(|_| Reply::sse(vec![Step::Write(stream_of(&["a", "b"]))])).await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::Vllm)).unwrap();
    let stream = bounded(client.chat(prompt())).await.unwrap();
    let items: Vec<_> = bounded(stream.into_stream().collect::<Vec<_>>()).await;
    assert_eq!(items.len(), 3);
    assert!(matches!(&items[0], Ok(StreamEvent::Token { text, .. }) if text == "a"));
    assert!(matches!(&items[1], Ok(StreamEvent::Token { text, .. }) if text == "b"));
    assert!(matches!(&items[2], Ok(StreamEvent::Done { .. })));
}

#[tokio::test]
async fn empty_answers_complete_with_zero_tokens() {
    let server = TestServer::start(|_| Reply::sse(vec![Step::Write(stream_of(&[]))])).await;
    let client = ExpertClient::new(server.endpoint(ExpertKind::Vllm)).unwrap();
    let a = answer(&client, prompt()).await.unwrap();
    assert!(a.tokens.is_empty());
    assert_eq!(
        a.usage,
        Some(Usage {
            prompt_tokens: 3,
            completion_tokens: 0
        })
    );
}
