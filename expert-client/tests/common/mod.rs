//! A scripted HTTP/1.1 server on 127.0.0.1:0 for the integration tests: keep-alive, chunked or
//! fixed-length or until-close bodies, controlled byte splits, stalls and cuts, and counts of
//! accepted connections and received requests.
//!
//! Ownership: the accept loop is one task owned by [`TestServer`] (aborted on drop); it owns the
//! connection tasks in a `JoinSet`, so they end with it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qosroute_expert_client::{ExpertEndpoint, ExpertKind, Timeouts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

/// One request as the server received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// One step of writing a body.
#[derive(Debug, Clone)]
pub enum Step {
    /// Write these bytes (as one HTTP chunk in chunked mode) and flush.
    Write(Vec<u8>),
    /// Wait.
    Sleep(Duration),
    /// Never write again (until the server is dropped).
    Stall,
    /// Close the connection abruptly, without ending the body.
    Cut,
}

/// How the body is framed.
#[derive(Debug, Clone)]
pub enum Framing {
    /// `Transfer-Encoding: chunked`, each `Write` one chunk.
    Chunked,
    /// `Content-Length` of all `Write`s (steps other than writes still apply).
    Fixed,
    /// No length; the body ends when the server closes the connection.
    UntilClose,
}

/// The reply to one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A status, headers and a body written step by step.
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        framing: Framing,
        steps: Vec<Step>,
    },
    /// Never answer.
    Silence,
    /// Close the connection without answering.
    Hangup,
}

impl Reply {
    /// 200 `text/event-stream`, chunked, the given steps.
    pub fn sse(steps: Vec<Step>) -> Reply {
        Reply::Http {
            status: 200,
            headers: vec![
                (
                    "Content-Type".into(),
                    "text/event-stream; charset=utf-8".into(),
                ),
                ("Cache-Control".into(), "no-cache".into()),
            ],
            framing: Framing::Chunked,
            steps,
        }
    }

    /// 200 `text/event-stream`, chunked, `bytes` written in pieces of `size` bytes.
    pub fn sse_in_pieces(bytes: &[u8], size: usize) -> Reply {
        Reply::sse(
            bytes
                .chunks(size.max(1))
                .map(|c| Step::Write(c.to_vec()))
                .collect(),
        )
    }

    /// A fixed-length reply.
    pub fn fixed(status: u16, content_type: &str, body: impl Into<Vec<u8>>) -> Reply {
        Reply::Http {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            framing: Framing::Fixed,
            steps: vec![Step::Write(body.into())],
        }
    }
}

type Handler = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// The running server.
pub struct TestServer {
    pub addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<Received>>>,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// Starts a server answering every request with `handler`.
    pub async fn start(handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestServer::on(listener, Arc::new(handler))
    }

    fn on(listener: TcpListener, handler: Handler) -> TestServer {
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let received = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let accepts = accepts.clone();
            let received = received.clone();
            tokio::spawn(async move {
                let mut connections = JoinSet::new();
                loop {
                    tokio::select! {
                        accepted = listener.accept() => {
                            let Ok((socket, _)) = accepted else { continue };
                            accepts.fetch_add(1, Ordering::SeqCst);
                            socket.set_nodelay(true).unwrap();
                            connections.spawn(serve(socket, handler.clone(), received.clone()));
                        }
                        Some(_) = connections.join_next(), if !connections.is_empty() => {}
                    }
                }
            })
        };
        TestServer {
            addr,
            accepts,
            received,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.accepts.load(Ordering::SeqCst)
    }

    /// Requests received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// An endpoint of `kind` on this server with generous timeouts.
    pub fn endpoint(&self, kind: ExpertKind) -> ExpertEndpoint {
        let mut e = ExpertEndpoint::new("test-expert", self.base_url(), "test-model", kind);
        e.timeouts = generous();
        e.probe_timeout = Duration::from_secs(5);
        e
    }
}

/// Timeouts no healthy loopback exchange comes near.
pub fn generous() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        first_token: Duration::from_secs(10),
        between_tokens: Duration::from_secs(10),
        total: Duration::from_secs(30),
    }
}

/// Short timeouts for tests where a deadline is the behaviour under test.
pub fn short() -> Timeouts {
    Timeouts {
        connect: Duration::from_millis(300),
        first_token: Duration::from_millis(300),
        between_tokens: Duration::from_millis(200),
        total: Duration::from_secs(20),
    }
}

/// Fails the test instead of hanging: every client call in the tests goes through this.
pub async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), future)
        .await
        .expect("the client hung")
}

async fn serve(mut socket: TcpStream, handler: Handler, received: Arc<Mutex<Vec<Received>>>) {
    let mut buffer = Vec::new();
    loop {
        let Some(request) = read_request(&mut socket, &mut buffer).await else {
            return;
        };
        let close_after = request
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"));
        received.lock().unwrap().push(request.clone());
        let keep_open = match handler(&request) {
            Reply::Silence => {
                std::future::pending::<()>().await;
                false
            }
            Reply::Hangup => false,
            Reply::Http {
                status,
                headers,
                framing,
                steps,
            } => write_reply(&mut socket, status, &headers, &framing, &steps).await,
        };
        if !keep_open || close_after {
            return;
        }
    }
}

/// Writes a reply; whether the connection may serve another request.
async fn write_reply(
    socket: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    framing: &Framing,
    steps: &[Step],
) -> bool {
    let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    match framing {
        Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
        Framing::Fixed => {
            let len: usize = steps
                .iter()
                .map(|s| if let Step::Write(b) = s { b.len() } else { 0 })
                .sum();
            head.push_str(&format!("Content-Length: {len}\r\n"));
        }
        Framing::UntilClose => head.push_str("Connection: close\r\n"),
    }
    head.push_str("\r\n");
    if socket.write_all(head.as_bytes()).await.is_err() {
        return false;
    }
    for step in steps {
        match step {
            // An empty chunk would end a chunked body.
            Step::Write(bytes) if bytes.is_empty() => {}
            Step::Write(bytes) => {
                let ok = match framing {
                    Framing::Chunked => {
                        let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
                        chunk.extend_from_slice(bytes);
                        chunk.extend_from_slice(b"\r\n");
                        socket.write_all(&chunk).await.is_ok()
                    }
                    Framing::Fixed | Framing::UntilClose => socket.write_all(bytes).await.is_ok(),
                };
                if !ok || socket.flush().await.is_err() {
                    return false;
                }
            }
            Step::Sleep(d) => tokio::time::sleep(*d).await,
            Step::Stall => std::future::pending::<()>().await,
            Step::Cut => return false,
        }
    }
    match framing {
        Framing::Chunked => socket.write_all(b"0\r\n\r\n").await.is_ok(),
        Framing::Fixed => true,
        Framing::UntilClose => false,
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Reads one request (head and `Content-Length` body); `None` at EOF or on a broken request.
async fn read_request(socket: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<Received> {
    let head_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buffer[..head_end].to_vec()).ok()?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_owned();
    let path = first.next()?.to_owned();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let length = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let body_start = head_end + 4;
    while buffer.len() < body_start + length {
        let mut chunk = [0u8; 4096];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = buffer[body_start..body_start + length].to_vec();
    buffer.drain(..body_start + length);
    Some(Received {
        method,
        path,
        headers,
        body,
    })
}

/// The bytes of a test data file.
pub fn data(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The answer every sample stream carries.
pub const SAMPLE_TOKENS: [&str; 10] = [
    "The",
    " sky",
    " looks",
    " blue",
    " because",
    " air",
    " scatters",
    " short",
    " wavelengths",
    ".",
];

/// One SSE chat chunk with `content`.
pub fn token_event(content: &str) -> Vec<u8> {
    let chunk = serde_json::json!({
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}],
    });
    format!("data: {chunk}\n\n").into_bytes()
}

/// A complete stream of `tokens`, with `finish_reason`, usage, an extension and `[DONE]`.
pub fn stream_of(tokens: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for t in tokens {
        out.extend(token_event(t));
    }
    out.extend(
        format!(
            "data: {}\n\n",
            serde_json::json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]})
        )
        .into_bytes(),
    );
    out.extend(
        format!(
            "data: {}\n\n",
            serde_json::json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": tokens.len()}, "qosroute": {"quality": 0.5}})
        )
        .into_bytes(),
    );
    out.extend_from_slice(b"data: [DONE]\n\n");
    out
}
