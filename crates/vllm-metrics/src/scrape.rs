//! Fetching vLLM's `/metrics` over plain HTTP (hyper 1, pooled client). vLLM sits next to the
//! agent, so TLS is out of scope and an `https://` URL is refused with a clear error.

use std::error::Error as StdError;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper::{header, Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tracing::debug;

use super::parse::ParseError;
use super::snapshot::Snapshot;

/// Largest `/metrics` body accepted. A real one is tens of KiB; the cap keeps a misdirected URL
/// from eating memory.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// Why a scrape failed. Every message is one line naming the URL.
#[derive(Debug, thiserror::Error)]
pub enum ScrapeError {
    #[error("invalid metrics URL {url:?}: {msg}")]
    InvalidUrl { url: String, msg: String },
    #[error("metrics URL {url:?} uses https, which is not supported: use http://")]
    Https { url: String },
    #[error("scraping {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("scraping {url} failed: {msg}")]
    Request { url: String, msg: String },
    #[error("scraping {url}: HTTP status {status}")]
    Status { url: String, status: StatusCode },
    #[error("scraping {url}: body larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("scraping {url}: body is not UTF-8 (byte {offset})")]
    NotUtf8 { url: String, offset: usize },
    #[error("scraping {url}")]
    Parse { url: String, source: ParseError },
    #[error("scraping {url}: no vllm: metrics in the response (is this vLLM's /metrics?)")]
    NotVllm { url: String },
}

/// A reusable scraper: keeps one connection pool across scrapes.
#[derive(Clone)]
pub struct Scraper {
    client: Client<HttpConnector, Empty<Bytes>>,
    max_body: usize,
}

impl std::fmt::Debug for Scraper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraper").field("max_body", &self.max_body).finish_non_exhaustive()
    }
}

impl Default for Scraper {
    fn default() -> Self {
        Self::new()
    }
}

impl Scraper {
    /// A scraper with the [`MAX_BODY_BYTES`] cap. Must be used inside a tokio runtime.
    pub fn new() -> Self {
        Self::with_max_body(MAX_BODY_BYTES)
    }

    /// A scraper refusing bodies over `max_body` bytes.
    pub fn with_max_body(max_body: usize) -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(1)
            .build_http();
        Self { client, max_body }
    }

    /// GETs `url` and returns the body text. `timeout` bounds the whole exchange: connecting,
    /// the headers and the body.
    pub async fn fetch_text(&self, url: &str, timeout: Duration) -> Result<String, ScrapeError> {
        let uri = check_url(url)?;
        match tokio::time::timeout(timeout, self.fetch_inner(url, uri)).await {
            Ok(result) => result,
            Err(_) => Err(ScrapeError::Timeout { url: url.to_string(), timeout }),
        }
    }

    /// Fetches and reduces `url`. A response without any `vllm:` sample is an error, so that a
    /// wrong port does not read as an idle vLLM.
    pub async fn scrape(&self, url: &str, timeout: Duration) -> Result<Snapshot, ScrapeError> {
        let text = self.fetch_text(url, timeout).await?;
        let exp = super::parse::parse(&text).map_err(|source| ScrapeError::Parse { url: url.to_string(), source })?;
        if !exp.samples.iter().any(|s| s.name.starts_with("vllm:")) {
            return Err(ScrapeError::NotVllm { url: url.to_string() });
        }
        Ok(Snapshot::from_exposition(&exp))
    }

    async fn fetch_inner(&self, url: &str, uri: Uri) -> Result<String, ScrapeError> {
        let req = Request::get(uri)
            .header(header::ACCEPT, "text/plain;version=0.0.4")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ScrapeError::InvalidUrl { url: url.to_string(), msg: e.to_string() })?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| ScrapeError::Request { url: url.to_string(), msg: chain(&e) })?;
        let status = resp.status();
        if status != StatusCode::OK {
            return Err(ScrapeError::Status { url: url.to_string(), status });
        }
        let body = Limited::new(resp.into_body(), self.max_body).collect().await.map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                ScrapeError::TooLarge { url: url.to_string(), limit: self.max_body }
            } else {
                ScrapeError::Request { url: url.to_string(), msg: chain(e.as_ref()) }
            }
        })?;
        let bytes = body.to_bytes();
        debug!(url, bytes = bytes.len(), "scraped");
        String::from_utf8(bytes.to_vec())
            .map_err(|e| ScrapeError::NotUtf8 { url: url.to_string(), offset: e.utf8_error().valid_up_to() })
    }
}

/// One-off scrape with a fresh client; prefer a long-lived [`Scraper`] in loops.
pub async fn scrape(url: &str, timeout: Duration) -> Result<Snapshot, ScrapeError> {
    Scraper::new().scrape(url, timeout).await
}

fn check_url(url: &str) -> Result<Uri, ScrapeError> {
    let invalid = |msg: &str| ScrapeError::InvalidUrl { url: url.to_string(), msg: msg.to_string() };
    let uri: Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| invalid(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(s) if s.eq_ignore_ascii_case("https") => return Err(ScrapeError::Https { url: url.to_string() }),
        Some(s) => return Err(invalid(&format!("unsupported scheme {s:?}, expected http"))),
        None => return Err(invalid("missing scheme, expected http://host:port/metrics")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("missing host"));
    }
    Ok(uri)
}

/// An error and its sources on one line ("client error (Connect): tcp connect error: ...").
fn chain(e: &(dyn StdError + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::Response;
    use hyper_util::rt::TokioIo;
    use tokio::net::TcpListener;

    use super::*;
    use crate::testdata::V0;

    const T: Duration = Duration::from_secs(5);

    /// Serves `status` and `body` to every request until the test's runtime ends.
    async fn serve(status: StatusCode, body: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let body = Bytes::from(body);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req: Request<Incoming>| {
                        let body = body.clone();
                        async move {
                            let mut resp = Response::new(Full::new(body));
                            *resp.status_mut() = status;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn scrapes_a_served_fixture_twice_with_one_client() {
        let addr = serve(StatusCode::OK, V0.as_bytes().to_vec()).await;
        let scraper = Scraper::new();
        let url = format!("http://{addr}/metrics");
        for _ in 0..2 {
            let s = scraper.scrape(&url, T).await.expect("scrape");
            assert_eq!(s.prompt_tokens_total, Some(5.0));
            assert_eq!(s.generation_tokens_total, Some(7.0));
            assert_eq!(s.model_names, vec!["facebook/opt-125m".to_string()]);
        }
        let s = scrape(&url, T).await.expect("one-off scrape");
        assert_eq!(s.request_success_total, Some(1.0));
    }

    #[tokio::test]
    async fn a_server_that_never_answers_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accept and hold connections without ever answering.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let started = std::time::Instant::now();
        let err = scrape(&format!("http://{addr}/metrics"), Duration::from_millis(200)).await.expect_err("hangs");
        assert!(matches!(err, ScrapeError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(err.to_string().contains("timed out after 200ms"), "{err}");
    }

    #[tokio::test]
    async fn non_200_is_an_error() {
        let addr = serve(StatusCode::INTERNAL_SERVER_ERROR, b"boom".to_vec()).await;
        let err = scrape(&format!("http://{addr}/metrics"), T).await.expect_err("500");
        assert!(matches!(err, ScrapeError::Status { status, .. } if status == 500), "{err}");
        assert_eq!(err.to_string(), format!("scraping http://{addr}/metrics: HTTP status 500 Internal Server Error"));
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused() {
        let addr = serve(StatusCode::OK, V0.as_bytes().to_vec()).await;
        let err =
            Scraper::with_max_body(1000).scrape(&format!("http://{addr}/metrics"), T).await.expect_err("too large");
        assert!(matches!(err, ScrapeError::TooLarge { limit: 1000, .. }), "{err}");
    }

    #[tokio::test]
    async fn bad_bodies_are_errors_naming_the_fault() {
        let addr = serve(StatusCode::OK, b"vllm:x 1\n...\n".to_vec()).await;
        let err = scrape(&format!("http://{addr}/"), T).await.expect_err("parse");
        assert!(matches!(&err, ScrapeError::Parse { source, .. } if source.line == 2), "{err}");

        let addr = serve(StatusCode::OK, b"node_load1 0.5\n".to_vec()).await;
        let err = scrape(&format!("http://{addr}/"), T).await.expect_err("not vllm");
        assert!(matches!(err, ScrapeError::NotVllm { .. }), "{err}");

        let addr = serve(StatusCode::OK, b"vllm:x 1\xff\n".to_vec()).await;
        let err = scrape(&format!("http://{addr}/"), T).await.expect_err("utf-8");
        assert!(matches!(err, ScrapeError::NotUtf8 { offset: 8, .. }), "{err}");
    }

    #[tokio::test]
    async fn urls_are_checked_before_connecting() {
        let err = scrape("https://127.0.0.1:8000/metrics", T).await.expect_err("https");
        assert!(matches!(err, ScrapeError::Https { .. }));
        assert!(err.to_string().contains("use http://"), "{err}");
        for bad in ["127.0.0.1:8000/metrics", "ftp://h/metrics", "http://", "not a url"] {
            let err = scrape(bad, T).await.expect_err(bad);
            assert!(matches!(err, ScrapeError::InvalidUrl { .. }), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_a_request_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let err = scrape(&format!("http://{addr}/metrics"), T).await.expect_err("refused");
        assert!(matches!(err, ScrapeError::Request { .. }), "{err}");
        assert!(!err.to_string().contains('\n'));
    }
}
