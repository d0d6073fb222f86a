//! The agent's read-only HTTP server (hyper 1): GET only, routes answered by a [`Routes`]
//! implementation so the server knows nothing of what it serves.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

/// Prometheus' text format content type.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
pub const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

/// One answer: status, content type, body.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self { status, content_type: PLAIN_TEXT, body: body.into() }
    }
}

/// What the server serves. Called for GET and HEAD requests only.
pub trait Routes: Send + Sync + 'static {
    fn get(&self, path: &str) -> Reply;
}

/// Binds `addr`; fails at once (not in the background) when the address is taken.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves until `shutdown` turns true. Each connection is its own task.
pub async fn serve(listener: TcpListener, routes: Arc<dyn Routes>, mut shutdown: watch::Receiver<bool>) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "HTTP server listening");
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _peer)) = accepted else { continue };
                let routes = routes.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(routes.clone(), req));
                    if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                        debug!(error = %e, "HTTP connection ended with an error");
                    }
                });
            }
            _ = shutdown.changed() => break,
        }
    }
}

async fn answer(routes: Arc<dyn Routes>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = match *req.method() {
        Method::GET | Method::HEAD => routes.get(req.uri().path()),
        _ => Reply::text(StatusCode::METHOD_NOT_ALLOWED, "read-only: only GET is served\n"),
    };
    let body = if req.method() == Method::HEAD { String::new() } else { reply.body };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = reply.status;
    resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(reply.content_type));
    if reply.status == StatusCode::METHOD_NOT_ALLOWED {
        resp.headers_mut().insert(hyper::header::ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
    }
    Ok(resp)
}
