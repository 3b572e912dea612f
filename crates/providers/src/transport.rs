//! How a call reaches an upstream: its URL, credentials and timeouts, the HTTP client that
//! carries it, and how failures are classified for retries.
//!
//! Two clients. A plain-`http://` upstream with no proxy configured in the environment (a
//! vLLM, Ollama or llama-server next to the gateway, the common case for a self-hosted one) is
//! called through hyper's pooled client directly. Everything else (TLS, proxies, redirects)
//! goes through reqwest, which wraps the same hyper client in layers this path does not need:
//! on a small chat answer they cost about a fifth of the gateway's own work per request
//! (follow-redirect and retry layers, the URL parsed twice more per call, the proxy matcher;
//! see bench/README.md).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::RwLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use futures::stream::BoxStream;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Incoming};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, Sleep};

use crate::{ProviderError, Timeouts, redact};

/// How an upstream takes its key.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyHeader {
    /// `Authorization: Bearer KEY` (OpenAI and its compatibles).
    Bearer,
    /// The key as it is, in a header of its own (`x-api-key`, `x-goog-api-key`).
    Named(&'static str),
}

/// What every HTTP upstream shares: its address, key, client and timeouts, and how a call
/// is sent and its failures classified.
pub(crate) struct Upstream {
    base_url: String,
    api_key: Option<String>,
    client: Client,
    pub timeouts: Timeouts,
    /// Headers every call carries: the key (marked sensitive, so never printed), the
    /// provider's fixed ones, and the JSON content type.
    headers: HeaderMap,
    /// Each path's full URL, parsed once: parsing it again for every call cost more than
    /// serialising the request's body. Paths are the provider's few endpoints (Gemini's name
    /// the configured upstream models), so the map stays small.
    endpoints: RwLock<HashMap<String, Endpoint>>,
}

enum Client {
    Direct(Box<HyperClient<HttpConnector, Full<Bytes>>>),
    Reqwest(reqwest::Client),
}

#[derive(Clone)]
enum Endpoint {
    Direct(http::Uri),
    Reqwest(reqwest::Url),
}

/// The variables reqwest reads for a proxy in front of a plain-HTTP upstream. When any is
/// set, calls go through reqwest, which honours them (and `NO_PROXY`).
const HTTP_PROXY_VARS: [&str; 4] = ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"];

impl Upstream {
    pub fn new(
        base_url: &str,
        api_key: Option<String>,
        key_header: KeyHeader,
        fixed: &[(&'static str, &'static str)],
        timeouts: Timeouts,
    ) -> Result<Self, ProviderError> {
        let proxied = HTTP_PROXY_VARS.iter().any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()));
        let direct = base_url.starts_with("http://") && !proxied;
        Self::with_client(base_url, api_key, key_header, fixed, timeouts, direct)
    }

    fn with_client(
        base_url: &str,
        api_key: Option<String>,
        key_header: KeyHeader,
        fixed: &[(&'static str, &'static str)],
        timeouts: Timeouts,
        direct: bool,
    ) -> Result<Self, ProviderError> {
        let base_url = base_url.trim_end_matches('/').to_string();
        let client = if direct {
            let mut connector = HttpConnector::new();
            connector.set_connect_timeout(Some(timeouts.connect));
            // As reqwest does: a request and its answer are each one write, and Nagle's
            // algorithm would hold a small one back for the peer's delayed ACK.
            connector.set_nodelay(true);
            // Idle connections close after 90 s, as reqwest's do; the pool needs a timer for it.
            let client = HyperClient::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector);
            Client::Direct(Box::new(client))
        } else {
            let client = reqwest::Client::builder()
                .connect_timeout(timeouts.connect)
                .build()
                .map_err(|e| ProviderError::Connect(e.to_string()))?;
            Client::Reqwest(client)
        };
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ACCEPT, HeaderValue::from_static("*/*"));
        for (name, value) in fixed {
            headers.insert(HeaderName::from_static(name), HeaderValue::from_static(value));
        }
        if let Some(key) = &api_key {
            let (name, value) = match key_header {
                KeyHeader::Bearer => (http::header::AUTHORIZATION, format!("Bearer {key}")),
                KeyHeader::Named(name) => (HeaderName::from_static(name), key.clone()),
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                ProviderError::Connect("the upstream's API key is not a valid HTTP header value".into())
            })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Ok(Upstream { base_url, api_key, client, timeouts, headers, endpoints: RwLock::default() })
    }

    /// The full URL of `path`, parsed at its first use.
    fn endpoint(&self, path: &str) -> Result<Endpoint, ProviderError> {
        if let Some(known) = self.endpoints.read().unwrap_or_else(|e| e.into_inner()).get(path) {
            return Ok(known.clone());
        }
        let url = format!("{}{path}", self.base_url);
        // The URL stays out of the message: it reaches clients, who need not learn the
        // internal addresses behind an alias (the log names the target).
        let endpoint = match self.client {
            Client::Direct(_) => url.parse().ok().map(Endpoint::Direct),
            Client::Reqwest(_) => reqwest::Url::parse(&url).ok().map(Endpoint::Reqwest),
        }
        .ok_or_else(|| ProviderError::Connect("the upstream's URL is not valid".into()))?;
        self.endpoints.write().unwrap_or_else(|e| e.into_inner()).insert(path.to_string(), endpoint.clone());
        Ok(endpoint)
    }

    /// POSTs `body` as JSON to `path`, within the first-byte timeout for the answer's head
    /// and the total one for all of it. A non-2xx answer becomes `ProviderError::Status` from
    /// the error body all three dialects share: `error.message`, and `error.code`,
    /// `error.type` or `error.status` as the code.
    pub async fn post(&self, path: &str, body: &impl serde::Serialize) -> Result<Answer, ProviderError> {
        let body = serde_json::to_vec(body).map_err(|e| ProviderError::Decode(e.to_string()))?;
        let now = Instant::now();
        let deadline = now + self.timeouts.total;
        let (head_by, head_timeout) = if self.timeouts.first_byte < self.timeouts.total {
            (now + self.timeouts.first_byte, "first byte")
        } else {
            (deadline, "total")
        };
        let answer = match (&self.client, self.endpoint(path)?) {
            (Client::Direct(client), Endpoint::Direct(uri)) => {
                let mut request = http::Request::new(Full::new(Bytes::from(body)));
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = uri;
                *request.headers_mut() = self.headers.clone();
                let response = tokio::time::timeout_at(head_by, client.request(request))
                    .await
                    .map_err(|_| ProviderError::Timeout(head_timeout))?
                    .map_err(|e| self.hyper_error(&e))?;
                let (head, body) = response.into_parts();
                Answer {
                    status: head.status,
                    headers: head.headers,
                    body: AnswerBody::Direct(body),
                    deadline,
                }
            }
            (Client::Reqwest(client), Endpoint::Reqwest(url)) => {
                let request =
                    client.post(url).headers(self.headers.clone()).body(body).timeout(self.timeouts.total);
                let mut response = tokio::time::timeout_at(head_by, request.send())
                    .await
                    .map_err(|_| ProviderError::Timeout(head_timeout))?
                    .map_err(|e| transport_error(e, self.api_key.as_deref()))?;
                let headers = std::mem::take(response.headers_mut());
                Answer { status: response.status(), headers, body: AnswerBody::Reqwest(response), deadline }
            }
            _ => unreachable!("an endpoint is parsed for its upstream's own client"),
        };
        if answer.status.is_success() { Ok(answer) } else { Err(self.status_error(answer).await) }
    }

    /// The error an unsuccessful answer stands for, its message scrubbed of the key.
    async fn status_error(&self, answer: Answer) -> ProviderError {
        let status = answer.status.as_u16();
        let retry_after = retry_after(&answer.headers);
        let reason = answer.status.canonical_reason();
        let text = answer.bytes(self.api_key.as_deref()).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let parsed: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        let error = &parsed["error"];
        let message = error["message"]
            .as_str()
            .or_else(|| error.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| text.chars().take(500).collect());
        // An empty body (a route the upstream doesn't serve, often) still says what happened.
        let message = if message.trim().is_empty() {
            match reason {
                Some(reason) => format!("the upstream answered {status} {reason} with no message"),
                None => format!("the upstream answered {status} with no message"),
            }
        } else {
            message
        };
        let code = ["code", "type", "status"].iter().find_map(|k| error[*k].as_str()).map(str::to_string);
        let param = error["param"].as_str().map(str::to_string);
        ProviderError::Status {
            status,
            message: redact(&message, self.api_key.as_deref()),
            code,
            param,
            retry_after,
        }
    }

    /// The answer's body as JSON: a `serde_json::Value`, or a typed answer read without one.
    pub async fn json<T: serde::de::DeserializeOwned>(&self, answer: Answer) -> Result<T, ProviderError> {
        let bytes = answer.bytes(self.api_key.as_deref()).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ProviderError::Decode(format!("error decoding response body: {e}")))
    }

    /// The answer's body as it arrives, for server-sent events.
    pub fn stream(&self, answer: Answer) -> BoxStream<'static, Result<Bytes, ProviderError>> {
        answer.stream(self.api_key.clone())
    }

    fn hyper_error(&self, e: &hyper_util::client::legacy::Error) -> ProviderError {
        let text = redact(&error_chain(e), self.api_key.as_deref());
        if e.is_connect() { ProviderError::Connect(text) } else { ProviderError::Decode(text) }
    }
}

/// An upstream's successful answer: its head, and its body still to be read.
pub(crate) struct Answer {
    status: http::StatusCode,
    headers: HeaderMap,
    body: AnswerBody,
    /// When the whole call's total timeout runs out.
    deadline: Instant,
}

enum AnswerBody {
    Direct(Incoming),
    Reqwest(reqwest::Response),
}

impl Answer {
    async fn bytes(self, secret: Option<&str>) -> Result<Bytes, ProviderError> {
        match self.body {
            AnswerBody::Direct(body) => tokio::time::timeout_at(self.deadline, body.collect())
                .await
                .map_err(|_| ProviderError::Timeout("total"))?
                .map(|collected| collected.to_bytes())
                .map_err(|e| ProviderError::Decode(redact(&error_chain(&e), secret))),
            // reqwest enforces the total timeout itself.
            AnswerBody::Reqwest(response) => response.bytes().await.map_err(|e| transport_error(e, secret)),
        }
    }

    fn stream(self, secret: Option<String>) -> BoxStream<'static, Result<Bytes, ProviderError>> {
        use futures::StreamExt;
        match self.body {
            AnswerBody::Direct(body) => Box::pin(Frames {
                body,
                deadline: Box::pin(tokio::time::sleep_until(self.deadline)),
                secret,
                done: false,
            }),
            // Ends at its first error, as `Frames` does (reqwest's goes on after a timeout).
            AnswerBody::Reqwest(response) => response
                .bytes_stream()
                .scan(false, move |failed, chunk| {
                    let next = (!*failed).then(|| chunk.map_err(|e| transport_error(e, secret.as_deref())));
                    *failed = matches!(next, Some(Err(_)));
                    futures::future::ready(next)
                })
                .boxed(),
        }
    }
}

/// The data frames of a body read from hyper, ending in a `Timeout("total")` error when the
/// call's deadline passes first.
struct Frames {
    body: Incoming,
    deadline: Pin<Box<Sleep>>,
    secret: Option<String>,
    done: bool,
}

impl Stream for Frames {
    type Item = Result<Bytes, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        // Checked before each frame, so that a body that never stops sending is cut too.
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err(ProviderError::Timeout("total"))));
        }
        loop {
            match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => return Poll::Ready(Some(Ok(data))),
                    Err(_trailers) => continue,
                },
                Poll::Ready(Some(Err(e))) => {
                    self.done = true;
                    let text = redact(&error_chain(&e), self.secret.as_deref());
                    return Poll::Ready(Some(Err(ProviderError::Decode(text))));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// An error and its sources, as one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A transport failure, classified for retries, with any key scrubbed from the text and
/// without the upstream's URL: the text reaches clients, who need not learn the internal
/// addresses behind an alias (the log names the target).
fn transport_error(e: reqwest::Error, secret: Option<&str>) -> ProviderError {
    let e = e.without_url();
    let text = redact(&error_chain(&e), secret);
    if e.is_timeout() {
        ProviderError::Timeout("total")
    } else if e.is_connect() {
        ProviderError::Connect(text)
    } else {
        ProviderError::Decode(text)
    }
}

/// `Retry-After` in seconds (or `retry-after-ms`, which OpenAI also sends).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<f64>().ok())
    };
    get("retry-after-ms").map(|ms| ms / 1000.0).or_else(|| get("retry-after")).map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A one-connection HTTP server: reads a request, writes `parts` with a pause before
    /// each, then holds the connection open. Returns its base URL and the request it read.
    async fn serve(parts: Vec<(u64, String)>) -> (String, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            loop {
                let n = socket.read(&mut buffer).await.unwrap();
                request.extend_from_slice(&buffer[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= length {
                        break;
                    }
                }
            }
            for (pause_ms, part) in parts {
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                socket.write_all(part.as_bytes()).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            String::from_utf8_lossy(&request).to_string()
        });
        (url, task)
    }

    fn upstream(url: &str, direct: bool, first_byte_ms: u64, total_ms: u64) -> Upstream {
        // What `ferry serve` installs at start, for reqwest's TLS.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let timeouts = Timeouts {
            connect: Duration::from_secs(1),
            first_byte: Duration::from_millis(first_byte_ms),
            total: Duration::from_millis(total_ms),
        };
        let fixed = [("anthropic-version", "2023-06-01")];
        Upstream::with_client(url, Some("sk-secret-key".into()), KeyHeader::Bearer, &fixed, timeouts, direct)
            .unwrap()
    }

    /// An HTTP/1.1 answer with `body`.
    fn answer(status: &str, headers: &str, body: &str) -> String {
        format!("HTTP/1.1 {status}\r\n{headers}content-length: {}\r\n\r\n{body}", body.len())
    }

    fn ok() -> String {
        answer("200 OK", "content-type: application/json\r\n", "{\"id\":\"a\"}")
    }

    #[tokio::test]
    async fn both_clients_send_the_same_call_and_read_the_answer() {
        for direct in [true, false] {
            let (url, request) = serve(vec![(0, ok())]).await;
            let http = upstream(&url, direct, 2000, 5000);
            let answer = http.post("/v1/chat", &serde_json::json!({"x": 1})).await.unwrap();
            let body: serde_json::Value = http.json(answer).await.unwrap();
            assert_eq!(body["id"], "a", "direct: {direct}");
            request.abort();
            let (url, request) = serve(vec![(0, ok())]).await;
            let http = upstream(&url, direct, 2000, 5000);
            let _ = http.post("/v1/chat", &serde_json::json!({"x": 1})).await.unwrap();
            drop(http);
            let seen = request.await.unwrap().to_ascii_lowercase();
            assert!(seen.starts_with("post /v1/chat http/1.1\r\n"), "{seen}");
            for header in [
                "authorization: bearer sk-secret-key",
                "content-type: application/json",
                "anthropic-version: 2023-06-01",
            ] {
                assert!(seen.contains(header), "direct: {direct}, no {header} in {seen}");
            }
            assert!(seen.ends_with("{\"x\":1}"), "{seen}");
        }
    }

    #[tokio::test]
    async fn a_slow_head_is_a_first_byte_timeout_and_a_stalled_body_a_total_one() {
        for direct in [true, false] {
            let (url, _server) = serve(vec![(1000, ok())]).await;
            let http = upstream(&url, direct, 200, 5000);
            let e = http.post("/", &()).await.err().unwrap();
            assert!(matches!(e, ProviderError::Timeout("first byte")), "direct: {direct}: {e:?}");

            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            let (url, _server) = serve(vec![(0, head.into()), (0, "d\r\ndata: first\n\n\r\n".into())]).await;
            let http = upstream(&url, direct, 2000, 400);
            let answer = http.post("/", &()).await.unwrap();
            let mut chunks = http.stream(answer);
            assert_eq!(chunks.next().await.unwrap().unwrap(), Bytes::from_static(b"data: first\n\n"));
            let e = chunks.next().await.unwrap().err().unwrap();
            assert!(matches!(e, ProviderError::Timeout("total")), "direct: {direct}: {e:?}");
            assert!(chunks.next().await.is_none(), "direct: {direct}");
        }
    }

    #[tokio::test]
    async fn an_error_answer_keeps_its_message_and_retry_after_but_not_the_key() {
        for direct in [true, false] {
            let error = answer(
                "429 Too Many Requests",
                "retry-after: 3\r\n",
                r#"{"error":{"message":"slow down, sk-secret-key","type":"rate_limit","param":null}}"#,
            );
            let (url, _server) = serve(vec![(0, error)]).await;
            let http = upstream(&url, direct, 2000, 5000);
            match http.post("/", &()).await.err().unwrap() {
                ProviderError::Status { status, message, code, retry_after, .. } => {
                    assert_eq!(status, 429);
                    assert_eq!(message, "slow down, [REDACTED]");
                    assert_eq!(code.as_deref(), Some("rate_limit"));
                    assert_eq!(retry_after, Some(Duration::from_secs(3)));
                }
                other => panic!("direct: {direct}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let port = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        for direct in [true, false] {
            let http = upstream(&format!("http://127.0.0.1:{port}"), direct, 2000, 5000);
            let e = http.post("/", &()).await.err().unwrap();
            assert!(matches!(e, ProviderError::Connect(_)), "direct: {direct}: {e:?}");
            assert!(e.is_retryable());
        }
    }
}
