//! [`ExpertClient`]: the HTTP/1.1 connection pool to one expert and its three requests (chat,
//! load scrape, health).
//!
//! Built on hyper 1 and hyper-util's pooled client (HTTP/1.1 only, keep-alive reuse), with
//! rustls (`ring` provider, system roots) for `https://` experts behind the `tls` feature.
//!
//! Task ownership: the pool runs one background task per open connection and one idle-reaper
//! task, spawned on the current tokio runtime by hyper-util. They belong to the pool: a
//! connection's task ends when the connection closes (server close, idle timeout of
//! [`POOL_IDLE_TIMEOUT`], or a dropped [`ChatStream`] mid-answer), and all of them end when the
//! last clone of the client is dropped. Nothing else is spawned.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, USER_AGENT};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::error::{ExpertError, STATUS_BODY_EXCERPT_BYTES, TimeoutPhase, chain, excerpt};
use crate::load::{EngineLoad, busy_slots};
use crate::prometheus::parse_exposition;
use crate::request::ChatRequest;
use crate::stream::{BodyError, ChatStream, deadline};
use crate::{ExpertEndpoint, ExpertKind};

/// An idle pooled connection is closed after this long. Below the 5 s keep-alive of uvicorn
/// (vLLM, SGLang) and cpp-httplib (llama.cpp), so the client never reuses a connection the
/// server is about to close.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Most idle connections kept per expert.
pub const POOL_MAX_IDLE: usize = 64;
/// Largest `/metrics` or `/slots` body read, bytes; a larger one is a protocol error.
pub const MAX_SCRAPE_BYTES: usize = 8 << 20;
/// Most bytes of a health response read (the rest is dropped with the connection).
const MAX_HEALTH_BYTES: usize = 1 << 20;

type PlainClient = Client<HttpConnector, Full<Bytes>>;
#[cfg(feature = "tls")]
type TlsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Clone)]
enum Transport {
    Plain(PlainClient),
    #[cfg(feature = "tls")]
    Tls(TlsClient),
}

impl Transport {
    fn request(&self, request: Request<Full<Bytes>>) -> hyper_util::client::legacy::ResponseFuture {
        match self {
            Transport::Plain(c) => c.request(request),
            #[cfg(feature = "tls")]
            Transport::Tls(c) => c.request(request),
        }
    }
}

/// Where the expert's API lives: scheme, host and port, and a path prefix.
#[derive(Debug, Clone)]
struct Base {
    scheme: Scheme,
    authority: Authority,
    prefix: String,
}

impl Base {
    fn parse(url: &str) -> Result<Base, ExpertError> {
        let invalid = |reason: String| ExpertError::InvalidEndpoint { reason };
        let uri: Uri = url
            .trim()
            .parse()
            .map_err(|e| invalid(format!("base URL `{url}`: {e}")))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| invalid(format!("base URL `{url}` has no scheme")))?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(invalid(format!(
                "base URL `{url}`: only http and https are supported"
            )));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| invalid(format!("base URL `{url}` has no host")))?;
        if uri.query().is_some() {
            return Err(invalid(format!("base URL `{url}` must not have a query")));
        }
        let path = uri.path().trim_end_matches('/');
        let path = path
            .strip_suffix("/v1")
            .unwrap_or(path)
            .trim_end_matches('/');
        Ok(Base {
            scheme,
            authority,
            prefix: path.to_owned(),
        })
    }

    fn uri(&self, path: &str) -> Result<Uri, ExpertError> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{path}", self.prefix))
            .build()
            .map_err(|e| ExpertError::InvalidEndpoint {
                reason: format!("path `{path}`: {e}"),
            })
    }
}

struct Inner {
    endpoint: ExpertEndpoint,
    name: Arc<str>,
    base: Base,
    transport: Transport,
    authorization: Option<HeaderValue>,
}

/// The client of one expert. Cheap to clone (clones share the connection pool); needs a tokio
/// runtime for its requests, not for [`ExpertClient::new`].
#[derive(Clone)]
pub struct ExpertClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for ExpertClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpertClient")
            .field("endpoint", &self.inner.endpoint)
            .finish_non_exhaustive()
    }
}

/// How a response body ended when read with a bound.
enum BodyEnd {
    Complete,
    Truncated,
    TimedOut,
    Broken(String),
}

/// A body that was read, or a path the server does not offer.
enum Fetched {
    Body(Vec<u8>),
    NotOffered(u16),
}

impl ExpertClient {
    /// Validates the endpoint and prepares its connection pool (no I/O yet).
    ///
    /// Fails with [`ExpertError::InvalidEndpoint`] for a base URL that is not `http(s)://host…`,
    /// an `https` URL without the `tls` feature or without usable root certificates, an API key
    /// that cannot be a header, or a zero timeout.
    pub fn new(endpoint: ExpertEndpoint) -> Result<Self, ExpertError> {
        let invalid = |reason: String| ExpertError::InvalidEndpoint { reason };
        let base = Base::parse(&endpoint.base_url)?;
        let t = endpoint.timeouts;
        for (what, d) in [
            ("connect", t.connect),
            ("first_token", t.first_token),
            ("between_tokens", t.between_tokens),
            ("total", t.total),
            ("probe", endpoint.probe_timeout),
        ] {
            if d.is_zero() {
                return Err(invalid(format!("the {what} timeout must be above zero")));
            }
        }
        let authorization = match &endpoint.api_key {
            None => None,
            Some(key) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    invalid("the API key contains characters not allowed in a header".to_owned())
                })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(t.connect));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(30)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(if endpoint.reuse_connections {
                POOL_MAX_IDLE
            } else {
                0
            });
        let transport = if base.scheme == Scheme::HTTPS {
            tls_transport(&builder, http)?
        } else {
            Transport::Plain(builder.build(http))
        };
        let name: Arc<str> = endpoint.name.as_str().into();
        Ok(ExpertClient {
            inner: Arc::new(Inner {
                endpoint,
                name,
                base,
                transport,
                authorization,
            }),
        })
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &ExpertEndpoint {
        &self.inner.endpoint
    }

    /// Sends `POST {base}/v1/chat/completions` with `"stream": true` and
    /// `"stream_options": {"include_usage": true}`, and returns the answer's stream once the
    /// response headers arrived (status 2xx, `text/event-stream`).
    ///
    /// Errors here (all with 0 tokens delivered): [`ExpertError::Connect`],
    /// [`ExpertError::Timeout`] (`Connect`, `FirstToken` or `Total`), [`ExpertError::Status`],
    /// [`ExpertError::Protocol`] (not an event stream), [`ExpertError::Closed`] (the server
    /// closed the connection without answering).
    pub async fn chat(&self, request: ChatRequest) -> Result<ChatStream, ExpertError> {
        let inner = &self.inner;
        let started_at = Instant::now();
        let timeouts = inner.endpoint.timeouts;
        let body = serde_json::to_vec(&request.to_body(&inner.endpoint.model)).map_err(|e| {
            ExpertError::Protocol {
                message: format!("cannot encode the request: {e}"),
                tokens_delivered: 0,
            }
        })?;
        let http_request = self.request(
            Method::POST,
            "/v1/chat/completions",
            "text/event-stream",
            Bytes::from(body),
        )?;
        let (until, phase) = deadline(&timeouts, started_at, None, started_at);
        tracing::trace!(expert = %inner.name, "sending chat request");
        let response = self.send(http_request, until, phase).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(status_error(status.as_u16(), response.into_body(), until).await);
        }
        if let Some(content_type) = response.headers().get(CONTENT_TYPE) {
            let text = String::from_utf8_lossy(content_type.as_bytes());
            if !text.to_ascii_lowercase().contains("event-stream") {
                return Err(ExpertError::Protocol {
                    message: format!(
                        "expected an event stream, got content type `{}`",
                        excerpt(text.as_bytes(), 100)
                    ),
                    tokens_delivered: 0,
                });
            }
        }
        let body = response.into_body().map_err(BodyError::from).boxed_unsync();
        Ok(ChatStream::new(
            inner.name.clone(),
            body,
            timeouts,
            started_at,
        ))
    }

    /// Reads the engine's own load signals (see [`EngineLoad`]; unknown signals are `None`, which
    /// the daemon must treat as saturated, never idle):
    /// - vLLM, SGLang: `GET /metrics` with the endpoint's [`crate::MetricNames`];
    /// - llama.cpp: `GET /metrics` (needs `--metrics`); when it gives no running count,
    ///   `GET /slots` for the number of busy slots;
    /// - Ollama, OpenAI: nothing (all `None`, no request).
    ///
    /// A path the server does not offer (404, 501) yields `None` signals, not an error. Each
    /// request runs under [`ExpertEndpoint::probe_timeout`].
    pub async fn scrape_load(&self) -> Result<EngineLoad, ExpertError> {
        let e = &self.inner.endpoint;
        match e.kind {
            ExpertKind::Ollama | ExpertKind::OpenAi => Ok(EngineLoad::unknown(Instant::now())),
            ExpertKind::Vllm | ExpertKind::SgLang | ExpertKind::LlamaCpp => {
                let mut load = match self.fetch("/metrics", "text/plain").await? {
                    Fetched::Body(bytes) => {
                        let exposition = parse_exposition(&String::from_utf8_lossy(&bytes));
                        if exposition.malformed_count > 0 {
                            tracing::debug!(expert = %self.inner.name, malformed = exposition.malformed_count, first = ?exposition.malformed.first(), "malformed lines in /metrics");
                        }
                        EngineLoad::from_metrics(
                            &exposition,
                            &e.metric_names,
                            &e.model,
                            Instant::now(),
                        )
                    }
                    Fetched::NotOffered(code) => {
                        tracing::debug!(expert = %self.inner.name, code, "no /metrics");
                        EngineLoad::unknown(Instant::now())
                    }
                };
                if e.kind == ExpertKind::LlamaCpp && load.running.is_none() {
                    match self.fetch("/slots", "application/json").await? {
                        Fetched::Body(bytes) => match busy_slots(&bytes) {
                            Ok(busy) => {
                                load.running = Some(busy);
                                load.scraped_at = Instant::now();
                            }
                            Err(error) => {
                                tracing::debug!(expert = %self.inner.name, %error, "unusable /slots")
                            }
                        },
                        Fetched::NotOffered(code) => {
                            tracing::debug!(expert = %self.inner.name, code, "no /slots")
                        }
                    }
                }
                Ok(load)
            }
        }
    }

    /// Checks that the server is up and ready: `GET /health` (vLLM, llama.cpp, SGLang),
    /// `/api/tags` (Ollama) or `/v1/models` (OpenAI); 2xx is healthy (llama.cpp answers 503
    /// while loading its model). Runs under [`ExpertEndpoint::probe_timeout`].
    pub async fn health(&self) -> Result<(), ExpertError> {
        let until = Instant::now() + self.inner.endpoint.probe_timeout;
        let request = self.request(
            Method::GET,
            self.inner.endpoint.kind.health_path(),
            "*/*",
            Bytes::new(),
        )?;
        let response = self.send(request, until, TimeoutPhase::Total).await?;
        let status = response.status();
        if !status.is_success() {
            return Err(status_error(status.as_u16(), response.into_body(), until).await);
        }
        // Read the (small) body so the connection can be reused; its content does not matter.
        let mut body = response.into_body();
        let _ = read_bounded(&mut body, MAX_HEALTH_BYTES, until).await;
        Ok(())
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        accept: &'static str,
        body: Bytes,
    ) -> Result<Request<Full<Bytes>>, ExpertError> {
        let uri = self.inner.base.uri(path)?;
        let mut builder = Request::builder()
            .method(method)
            .uri(uri)
            .header(ACCEPT, accept)
            .header(
                USER_AGENT,
                concat!("qosroute-expert-client/", env!("CARGO_PKG_VERSION")),
            );
        if !body.is_empty() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        if let Some(auth) = &self.inner.authorization {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        builder
            .body(Full::new(body))
            .map_err(|e| ExpertError::InvalidEndpoint {
                reason: format!("cannot build a request: {e}"),
            })
    }

    /// Sends a request and waits for the response headers until `until` (then `phase` times
    /// out).
    async fn send(
        &self,
        request: Request<Full<Bytes>>,
        until: Instant,
        phase: TimeoutPhase,
    ) -> Result<http::Response<Incoming>, ExpertError> {
        match tokio::time::timeout_at(until, self.inner.transport.request(request)).await {
            Err(_) => Err(ExpertError::Timeout {
                phase,
                tokens_delivered: 0,
            }),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) => Err(self.send_error(&error)),
        }
    }

    fn send_error(&self, error: &hyper_util::client::legacy::Error) -> ExpertError {
        let message = chain(error);
        if error.is_connect() {
            if timed_out(error) {
                return ExpertError::Timeout {
                    phase: TimeoutPhase::Connect,
                    tokens_delivered: 0,
                };
            }
            return ExpertError::Connect { message };
        }
        tracing::debug!(expert = %self.inner.name, error = %message, "request failed after connecting");
        ExpertError::Closed {
            tokens_delivered: 0,
        }
    }

    /// `GET path` under the probe timeout: the body (bounded by [`MAX_SCRAPE_BYTES`]), or
    /// `NotOffered` for 404/501.
    async fn fetch(&self, path: &str, accept: &'static str) -> Result<Fetched, ExpertError> {
        let until = Instant::now() + self.inner.endpoint.probe_timeout;
        let request = self.request(Method::GET, path, accept, Bytes::new())?;
        let response = self.send(request, until, TimeoutPhase::Total).await?;
        let status = response.status().as_u16();
        if status == 404 || status == 501 {
            let mut body = response.into_body();
            let _ = read_bounded(&mut body, STATUS_BODY_EXCERPT_BYTES, until).await;
            return Ok(Fetched::NotOffered(status));
        }
        if !response.status().is_success() {
            return Err(status_error(status, response.into_body(), until).await);
        }
        let mut body = response.into_body();
        let (bytes, end) = read_bounded(&mut body, MAX_SCRAPE_BYTES, until).await;
        match end {
            BodyEnd::Complete => Ok(Fetched::Body(bytes)),
            BodyEnd::Truncated => Err(ExpertError::Protocol {
                message: format!("`{path}` is larger than {MAX_SCRAPE_BYTES} bytes"),
                tokens_delivered: 0,
            }),
            BodyEnd::TimedOut => Err(ExpertError::Timeout {
                phase: TimeoutPhase::Total,
                tokens_delivered: 0,
            }),
            BodyEnd::Broken(message) => {
                tracing::debug!(expert = %self.inner.name, path, error = %message, "response body broke off");
                Err(ExpertError::Closed {
                    tokens_delivered: 0,
                })
            }
        }
    }
}

#[cfg(feature = "tls")]
fn tls_transport(
    builder: &hyper_util::client::legacy::Builder,
    mut http: HttpConnector,
) -> Result<Transport, ExpertError> {
    http.enforce_http(false);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(provider)
        .map_err(|e| ExpertError::InvalidEndpoint {
            reason: format!("TLS set-up failed: {e}"),
        })?
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Transport::Tls(builder.build(connector)))
}

#[cfg(not(feature = "tls"))]
fn tls_transport(
    _builder: &hyper_util::client::legacy::Builder,
    _http: HttpConnector,
) -> Result<Transport, ExpertError> {
    Err(ExpertError::InvalidEndpoint {
        reason: "https experts need the `tls` feature of qosroute-expert-client".to_owned(),
    })
}

/// Whether an I/O timeout is somewhere in the error's chain (the connector's connect timeout).
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    let mut depth = 0;
    while let Some(e) = current {
        if e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        current = e.source();
        depth += 1;
        if depth > 8 {
            break;
        }
    }
    false
}

/// Reads at most `limit` bytes of `body` before `until`.
async fn read_bounded(body: &mut Incoming, limit: usize, until: Instant) -> (Vec<u8>, BodyEnd) {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout_at(until, body.frame()).await {
            Err(_) => return (out, BodyEnd::TimedOut),
            Ok(None) => return (out, BodyEnd::Complete),
            Ok(Some(Err(e))) => return (out, BodyEnd::Broken(chain(&e))),
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    let room = limit.saturating_sub(out.len());
                    if data.len() > room {
                        out.extend_from_slice(data.get(..room).unwrap_or(&[]));
                        return (out, BodyEnd::Truncated);
                    }
                    out.extend_from_slice(&data);
                }
            }
        }
    }
}

/// A [`ExpertError::Status`] with an excerpt of the body (whatever arrived before `until`).
async fn status_error(code: u16, mut body: Incoming, until: Instant) -> ExpertError {
    let (bytes, _) = read_bounded(&mut body, STATUS_BODY_EXCERPT_BYTES + 4, until).await;
    ExpertError::Status {
        code,
        body: excerpt(&bytes, STATUS_BODY_EXCERPT_BYTES),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_drop_a_trailing_slash_or_v1_and_keep_other_prefixes() {
        let b = Base::parse("http://10.0.0.5:8000/").unwrap();
        assert_eq!(
            b.uri("/metrics").unwrap().to_string(),
            "http://10.0.0.5:8000/metrics"
        );
        let b = Base::parse("https://api.example.com/v1").unwrap();
        assert_eq!(
            b.uri("/v1/chat/completions").unwrap().to_string(),
            "https://api.example.com/v1/chat/completions"
        );
        let b = Base::parse(" http://gw/experts/a/v1/ ").unwrap();
        assert_eq!(
            b.uri("/health").unwrap().to_string(),
            "http://gw/experts/a/health"
        );
    }

    #[test]
    fn unusable_endpoints_are_refused_with_a_reason() {
        for url in [
            "",
            "localhost:8000",
            "ftp://x",
            "http://x/?a=b",
            "not a url",
        ] {
            let e = ExpertEndpoint::new("a", url, "m", ExpertKind::Vllm);
            assert!(
                matches!(
                    ExpertClient::new(e),
                    Err(ExpertError::InvalidEndpoint { .. })
                ),
                "{url:?} was accepted"
            );
        }
        let mut e = ExpertEndpoint::new("a", "http://x", "m", ExpertKind::Vllm);
        e.timeouts.first_token = Duration::ZERO;
        assert!(matches!(
            ExpertClient::new(e),
            Err(ExpertError::InvalidEndpoint { .. })
        ));
        let mut e = ExpertEndpoint::new("a", "http://x", "m", ExpertKind::Vllm);
        e.api_key = Some("bad\nkey".into());
        assert!(matches!(
            ExpertClient::new(e),
            Err(ExpertError::InvalidEndpoint { .. })
        ));
    }

    #[test]
    fn a_client_is_built_without_a_runtime_and_hides_its_key() {
        let mut e = ExpertEndpoint::new("a", "http://127.0.0.1:1", "m", ExpertKind::OpenAi);
        e.api_key = Some("sk-secret".into());
        let c = ExpertClient::new(e).unwrap();
        assert!(!format!("{c:?}").contains("sk-secret"));
    }
}
