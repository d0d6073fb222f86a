//! The simulated engine served in real time behind a vLLM-compatible HTTP API (hyper 1).
//!
//! One engine task owns the stepping: it runs a scheduler step, sleeps until the wall clock
//! reaches the step's end in virtual time (so latencies seen by clients are real), then hands
//! the step's token events to per-request channels. While idle it keeps the engine's virtual
//! clock level with the wall clock, so idle energy and gauges stay truthful.
//!
//! Here: the server, its engine task and accept loop; the HTTP API is in `http`, the answers
//! (whole or streamed) in `stream`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::sync::{watch, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::engine::{Engine, EngineConfig, EngineStats, RequestId, SimError, SimRequest, TokenEvent};
use crate::gpu::SimGpu;
use http::handle;

mod http;
mod lax;
mod request;
mod stream;

/// Prometheus' text exposition content type, as vLLM serves it.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Default `max_tokens` of `/v1/completions` (OpenAI's and vLLM's; chat's default is the rest
/// of the context).
pub const DEFAULT_MAX_TOKENS: u32 = 16;

/// How often an idle engine's clock is brought level with the wall clock.
const IDLE_TICK: Duration = Duration::from_millis(50);

/// How long shutdown waits for open connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Engine(#[from] SimError),
    #[error("cannot bind {addr}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A running simulated vLLM server.
pub struct SimServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
    accept_task: JoinHandle<()>,
    engine_task: JoinHandle<()>,
}

impl std::fmt::Debug for SimServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimServer").field("local_addr", &self.local_addr).finish_non_exhaustive()
    }
}

impl SimServer {
    /// Builds the engine (failing like vLLM when memory does not fit, before binding), binds
    /// `addr` and starts serving.
    pub async fn start(cfg: EngineConfig, gpu: Arc<SimGpu>, addr: SocketAddr) -> Result<SimServer, ServerError> {
        let model = cfg.model_name.clone();
        let max_model_len = cfg.max_model_len;
        let block_size = cfg.block_size;
        let fingerprint = fingerprint(&cfg);
        let engine = Engine::new(cfg, gpu)?;
        let listener = TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| ServerError::Bind { addr, source })?;
        // Line the engine's virtual clock up with the wall clock from here on.
        let now = Instant::now();
        let epoch = now.checked_sub(Duration::from_secs_f64(engine.now().max(0.0))).unwrap_or(now);
        let shared = Arc::new(Shared {
            core: Mutex::new(Core { engine, subscribers: HashMap::new(), closed: false }),
            wake: Notify::new(),
            epoch,
            model,
            max_model_len,
            block_size,
            fingerprint,
            created: unix_now(),
        });
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let engine_task = tokio::spawn(drive_engine(shared.clone(), shutdown_rx.clone()));
        let accept_task = tokio::spawn(accept_loop(listener, shared.clone(), shutdown_rx));
        info!(%local_addr, model = %shared.model, "simulated vLLM server listening");
        Ok(SimServer { local_addr, shared, shutdown_tx, accept_task, engine_task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The name requests must use in `model`.
    pub fn model(&self) -> &str {
        &self.shared.model
    }

    /// Queue and cache state right now.
    pub fn stats(&self) -> EngineStats {
        self.shared.lock().engine.stats()
    }

    /// The `/metrics` text, as a scrape would see it now.
    pub fn metrics_text(&self) -> String {
        self.shared.metrics_text()
    }

    /// Stops accepting, ends in-flight requests (their streams stop without `[DONE]`) and waits
    /// for the tasks to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        if let Err(e) = self.engine_task.await {
            warn!(error = %e, "engine task ended abnormally");
        }
        if let Err(e) = self.accept_task.await {
            warn!(error = %e, "accept task ended abnormally");
        }
        info!("simulated vLLM server stopped");
    }
}

/// The engine plus who waits for which request's tokens.
struct Core {
    engine: Engine,
    subscribers: HashMap<RequestId, UnboundedSender<TokenEvent>>,
    /// Set at shutdown: no more submissions.
    closed: bool,
}

/// State shared by the engine task and the HTTP handlers.
struct Shared {
    core: Mutex<Core>,
    /// Wakes the idle engine task on submission.
    wake: Notify,
    /// Wall-clock instant of virtual time 0.
    epoch: Instant,
    model: String,
    max_model_len: u32,
    /// The engine's KV block size, which the prefix cache's block hashes follow.
    block_size: u32,
    /// `system_fingerprint` of the answers.
    fingerprint: String,
    created: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wall time since start, in the engine's virtual seconds.
    fn wall_now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn metrics_text(&self) -> String {
        let mut core = self.lock();
        if !core.engine.has_work() {
            core.engine.idle_until(self.wall_now());
        }
        core.engine.metrics_text()
    }

    /// Submits a request; its events arrive on the returned channel. `None` after shutdown.
    fn submit(self: &Arc<Self>, req: SimRequest) -> Option<(RequestGuard, UnboundedReceiver<TokenEvent>)> {
        let mut core = self.lock();
        if core.closed {
            return None;
        }
        // An idle engine's clock may lag the wall clock by up to IDLE_TICK; the request
        // arrives now.
        if !core.engine.has_work() {
            core.engine.idle_until(self.wall_now());
        }
        let id = core.engine.submit(req);
        let (tx, rx) = unbounded_channel();
        core.subscribers.insert(id, tx);
        drop(core);
        self.wake.notify_one();
        Some((RequestGuard { shared: self.clone(), id, finished: false }, rx))
    }

    /// Hands one step's events to their requests; aborts requests whose client has gone.
    fn deliver(&self, events: Vec<TokenEvent>) {
        let mut core = self.lock();
        let mut gone = Vec::new();
        for ev in events {
            let (id, last) = match ev {
                TokenEvent::First { id } | TokenEvent::Token { id } => (id, false),
                TokenEvent::Finished { id, .. } => (id, true),
            };
            if let Some(tx) = core.subscribers.get(&id) {
                if tx.send(ev).is_err() && !last {
                    gone.push(id);
                }
            }
            if last {
                core.subscribers.remove(&id);
            }
        }
        for id in gone {
            debug!(id, "client gone, aborting request");
            core.subscribers.remove(&id);
            core.engine.abort(id);
        }
    }
}

/// Aborts its request in the engine when dropped before the request finished (client
/// disconnected, handler cancelled).
struct RequestGuard {
    shared: Arc<Shared>,
    id: RequestId,
    finished: bool,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.finished {
            let mut core = self.shared.lock();
            if core.subscribers.remove(&self.id).is_some() {
                debug!(id = self.id, "request dropped before finishing, aborting");
                core.engine.abort(self.id);
            }
        }
    }
}

/// The engine task: step, sleep the step's real duration, deliver; idle-advance otherwise.
async fn drive_engine(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow() {
            break;
        }
        let stepped = {
            let mut core = shared.lock();
            if core.engine.has_work() {
                core.engine.step().map(|r| (r, core.engine.now()))
            } else {
                None
            }
        };
        match stepped {
            Some((report, now)) => {
                let due = shared.epoch + Duration::from_secs_f64(now.max(0.0));
                if due <= Instant::now() {
                    // Behind the wall clock (or a zero-length step): catch up, but let other
                    // tasks run between steps.
                    tokio::task::yield_now().await;
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    _ = shutdown.changed() => break,
                }
                shared.deliver(report.events);
            }
            None => {
                {
                    let mut core = shared.lock();
                    if !core.engine.has_work() {
                        core.engine.idle_until(shared.wall_now());
                    }
                }
                tokio::select! {
                    _ = shared.wake.notified() => {}
                    _ = tokio::time::sleep(IDLE_TICK) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
    }
    // Dropping the senders ends every waiting handler and stream.
    let mut core = shared.lock();
    core.closed = true;
    core.subscribers.clear();
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                // Token chunks are tiny: send them at once.
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let mut stop = shutdown.clone();
                conns.spawn(async move {
                    let svc = service_fn(move |req| handle(shared.clone(), req));
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                    tokio::pin!(conn);
                    let result = tokio::select! {
                        r = conn.as_mut() => r,
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            conn.await
                        }
                    };
                    if let Err(e) = result {
                        debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
                while conns.try_join_next().is_some() {}
            }
            _ = shutdown.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, async { while conns.join_next().await.is_some() {} }).await.is_err() {
        conns.abort_all();
    }
}

/// The `system_fingerprint` vLLM 0.32 reports, `vllm-0.32.0-` and 8 hex digits that follow the
/// configuration: the same flags give the same fingerprint.
fn fingerprint(cfg: &EngineConfig) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (&cfg.model_name, cfg.max_model_len, cfg.block_size, cfg.max_num_seqs, cfg.max_num_batched_tokens).hash(&mut h);
    cfg.gpu_memory_utilization.to_bits().hash(&mut h);
    format!("vllm-0.32.0-{:08x}", h.finish() & 0xffff_ffff)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use loadgen::{run_http, LengthDist, LoadOptions, Schedule};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::{Method, Request, StatusCode};
    use serde_json::{json, Value};
    fn gpu() -> Arc<SimGpu> {
        Arc::new(SimGpu::h100(1))
    }

    async fn start() -> SimServer {
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        SimServer::start(EngineConfig::default(), gpu(), addr).await.expect("server starts")
    }

    /// One request; returns status, content type and body text.
    async fn call(server: &SimServer, method: Method, path: &str, body: &str) -> (StatusCode, String, String) {
        let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", server.local_addr()))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("request");
        let resp = client.request(req).await.expect("response");
        let status = resp.status();
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, ct, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn successes(metrics: &str) -> f64 {
        metrics
            .lines()
            .filter(|l| l.starts_with("vllm:request_success_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_load_and_vllm_endpoints() {
        let server = start().await;
        let model = server.model().to_string();

        let (status, _, body) = call(&server, Method::GET, "/health", "").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
        let (status, _, body) = call(&server, Method::GET, "/v1/models", "").await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).expect("models json");
        assert_eq!(v["data"][0]["id"], model.as_str());

        let (status, ct, before) = call(&server, Method::GET, "/metrics", "").await;
        assert_eq!((status, ct.as_str()), (StatusCode::OK, METRICS_CONTENT_TYPE));
        let before = successes(&before);

        let schedule = Schedule::constant(1.5, 4.0, LengthDist::Fixed(64), LengthDist::Uniform { lo: 4, hi: 12 });
        let expected: Vec<_> = schedule.arrivals(11).collect();
        assert!(!expected.is_empty(), "the seed gives some arrivals");
        let opts = LoadOptions { deadline: Some(Duration::from_secs(8)), ..Default::default() };
        let url = format!("http://{}", server.local_addr());
        let report = run_http(&url, &model, &schedule, 11, &opts).await.expect("load run");
        assert_eq!(report.num_prompts, expected.len() as u64, "{report:?}");
        assert_eq!(report.completed, report.num_prompts, "{:?}", report.errors);
        assert_eq!(report.failed, 0);
        let want_out: u64 = expected.iter().map(|a| u64::from(a.max_tokens)).sum();
        assert_eq!(report.total_output_tokens, want_out);
        assert_eq!(report.total_input_tokens, 64 * expected.len() as u64);
        assert!(report.mean_ttft_ms > 0.0 && report.mean_e2el_ms >= report.mean_ttft_ms, "{report:?}");
        assert!(report.mean_itl_ms > 0.0 && report.mean_tpot_ms > 0.0, "{report:?}");

        let (_, _, after) = call(&server, Method::GET, "/metrics", "").await;
        let after = successes(&after);
        assert!(after >= before + expected.len() as f64, "request_success_total {before} -> {after}");

        // Non-streaming answer with usage.
        let req = json!({"model": model, "prompt": "hello there, simulated model", "max_tokens": 5});
        let (status, _, body) = call(&server, Method::POST, "/v1/completions", &req.to_string()).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).expect("completion json");
        assert_eq!(v["usage"]["completion_tokens"], 5);
        // hello, " there", ",", " simulate" + "d", " model": loadgen's count_tokens.
        assert_eq!(v["usage"]["prompt_tokens"], 6);
        assert_eq!(v["usage"]["total_tokens"], 11);
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert!(!v["choices"][0]["text"].as_str().unwrap_or_default().is_empty());
        server.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rejects_bad_requests_like_vllm() {
        let server = start().await;
        let (status, _, body) =
            call(&server, Method::POST, "/v1/completions", r#"{"model":"nope","prompt":"hi"}"#).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let v: Value = serde_json::from_str(&body).expect("error json");
        assert_eq!(
            v["error"],
            json!({
                "message": "The model `nope` does not exist. Valid aliases: meta-llama/Llama-3.1-8B-Instruct",
                "type": "NotFoundError", "param": "model", "code": 404,
            })
        );

        let (status, _, body) = call(&server, Method::POST, "/v1/completions", "{\"prompt\": ").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_str(&body).expect("error json");
        assert_eq!((v["error"]["type"].as_str(), v["error"]["param"].as_str()), (Some("Bad Request"), Some("body.11")));
        assert!(body.contains("json_invalid"), "{body}");

        for bad in [
            json!({"prompt": []}),
            json!({"prompt": {"a": 1}}),
            json!({"prompt": "x", "max_tokens": 0}),
            json!({"prompt": [1, 2], "max_tokens": 9000}),
            json!({"max_tokens": 3}),
        ] {
            let (status, _, body) = call(&server, Method::POST, "/v1/completions", &bad.to_string()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad} -> {body}");
        }
        let (status, _, _) = call(&server, Method::GET, "/v1/completions", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        let (status, _, _) = call(&server, Method::GET, "/nowhere", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        server.shutdown().await;
    }

    /// The `data:` payloads of an SSE body, checking the framing on the way.
    fn sse_events(body: &str) -> Vec<String> {
        assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
        let events: Vec<String> = body
            .split_terminator("\n\n")
            .map(|e| e.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data event: {e:?}")).to_string())
            .collect();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        events[..events.len() - 1].to_vec()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_chat_completions_whole_and_streamed() {
        let server = start().await;
        let messages = json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]);
        // 2 + 2 content tokens, 5 template tokens per message.
        let prompt = 4 + 2 * request::CHAT_TOKENS_PER_MESSAGE;
        let req = json!({"model": server.model(), "messages": messages, "max_tokens": 4});
        let (status, ct, body) = call(&server, Method::POST, "/v1/chat/completions", &req.to_string()).await;
        assert_eq!((status, ct.as_str()), (StatusCode::OK, "application/json"), "{body}");
        let v: Value = serde_json::from_str(&body).expect("chat json");
        assert_eq!(v["object"], "chat.completion");
        assert!(v["id"].as_str().is_some_and(|id| id.starts_with("chatcmpl-")), "{v}");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(v["choices"][0]["message"]["content"], " the quick brown fox");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(
            v["usage"],
            json!({
                "prompt_tokens": prompt, "completion_tokens": 4, "total_tokens": prompt + 4,
                "prompt_tokens_details": null, "completion_tokens_details": null,
            })
        );

        let opts = json!({"include_usage": 1});
        let req = json!({"messages": messages, "max_completion_tokens": 3, "stream": "true", "stream_options": opts});
        let (status, ct, body) = call(&server, Method::POST, "/v1/chat/completions", &req.to_string()).await;
        assert_eq!((status, ct.as_str()), (StatusCode::OK, "text/event-stream; charset=utf-8"), "{body}");
        let events: Vec<Value> =
            sse_events(&body).iter().map(|e| serde_json::from_str(e).expect("chunk json")).collect();
        assert_eq!(events.len(), 1 + 3 + 1, "role, 3 tokens, usage: {body}");
        assert!(events.iter().all(|e| e["object"] == "chat.completion.chunk" && e["id"] == events[0]["id"]));
        assert_eq!(events[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        let text: String = events[1..4].iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, " the quick brown");
        assert_eq!(events[2]["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(events[3]["choices"][0]["finish_reason"], "length");
        assert_eq!(events[4]["choices"], json!([]));
        assert_eq!(events[4]["usage"]["completion_tokens"], 3);
        assert_eq!(events[4]["usage"]["prompt_tokens"], prompt);

        for (bad, status) in [
            (json!({"model": "nope", "messages": messages}), StatusCode::NOT_FOUND),
            (json!({"messages": []}), StatusCode::BAD_REQUEST),
            (json!({"messages": [{"role": "user"}]}), StatusCode::BAD_REQUEST),
            (json!({"messages": messages, "max_tokens": 0}), StatusCode::BAD_REQUEST),
            (json!({"messages": messages, "max_tokens": 9000}), StatusCode::BAD_REQUEST),
            (json!({"messages": messages, "stream_options": {"include_usage": true}}), StatusCode::BAD_REQUEST),
        ] {
            let (got, _, body) = call(&server, Method::POST, "/v1/chat/completions", &bad.to_string()).await;
            assert_eq!(got, status, "{bad} -> {body}");
            let v: Value = serde_json::from_str(&body).expect("error json");
            assert_eq!(v["error"]["code"], status.as_u16(), "{body}");
        }
        let (status, _, _) = call(&server, Method::GET, "/v1/chat/completions", "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        server.shutdown().await;
    }

    fn counter(metrics: &str, name: &str) -> f64 {
        metrics.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }

    /// Sends a short text completion; returns its prompt tokens.
    async fn send_text(server: &SimServer, prompt: String) -> f64 {
        let body = json!({"prompt": prompt, "max_tokens": 2}).to_string();
        let (status, _, body) = call(server, Method::POST, "/v1/completions", &body).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        v["usage"]["prompt_tokens"].as_f64().unwrap_or_default()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_prompt_text_hits_the_prefix_cache() {
        let server = start().await;
        let words = |n: usize, from: usize| -> String {
            (0..n).map(|i| loadgen::prompt::WORDS[(i * 7 + from) % 48]).collect::<Vec<_>>().join(" ")
        };
        let cache = |server: &SimServer| {
            let m = server.metrics_text();
            (counter(&m, "vllm:prefix_cache_queries_total"), counter(&m, "vllm:prefix_cache_hits_total"))
        };
        let shared = words(64, 0);
        let first = send_text(&server, format!("{shared} {}", words(30, 1))).await;
        assert_eq!(first, 94.0);
        let (queries, hits) = cache(&server);
        assert_eq!((queries, hits), (94.0, 0.0), "a cold cache");
        // The same first 64 words (one token each): 4 full blocks of 16 hit.
        let second = send_text(&server, format!("{shared} {}", words(30, 5))).await;
        let (q2, h2) = cache(&server);
        assert_eq!((q2 - queries, h2 - hits), (second, 64.0));
        // Unrelated text hits nothing.
        let third = send_text(&server, words(94, 3)).await;
        let (q3, h3) = cache(&server);
        assert_eq!((q3 - q2, h3 - h2), (third, 0.0));
        server.shutdown().await;
    }

    async fn in_engine(server: &SimServer) -> u32 {
        let s = server.stats();
        s.running + s.waiting
    }

    /// Sends a long request over a raw socket, waits until the engine has it, hangs up, and
    /// expects the engine to drop it long before it could have finished.
    async fn hang_up_mid_request(server: &SimServer, path: &str, stream: bool) {
        let mut body = json!({"max_tokens": 5000, "stream": stream});
        if path.contains("chat") {
            body["messages"] = json!([{"role": "user", "content": "tell me a long story"}]);
        } else {
            body["prompt"] = json!([1, 2, 3, 4]);
        }
        let body = body.to_string();
        let mut sock = tokio::net::TcpStream::connect(server.local_addr()).await.expect("connect");
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        sock.write_all(head.as_bytes()).await.expect("send");
        if stream {
            let mut buf = vec![0u8; 4096];
            let mut got = String::new();
            while !got.contains("data: {") {
                let read = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await;
                let n = read.expect("chunk in time").expect("read");
                assert!(n > 0, "server closed early: {got}");
                got.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
            assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        }
        let t0 = Instant::now();
        while in_engine(server).await == 0 {
            assert!(t0.elapsed() < Duration::from_secs(5), "request never reached the engine");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(sock);
        // 5000 tokens take far longer than this; only an abort empties the engine so soon.
        let t0 = Instant::now();
        while in_engine(server).await > 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "request not aborted (stream {stream}): {:?}",
                server.stats()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn client_disconnect_aborts_request() {
        let server = start().await;
        for path in ["/v1/completions", "/v1/chat/completions"] {
            hang_up_mid_request(&server, path, true).await;
            hang_up_mid_request(&server, path, false).await;
        }
        server.shutdown().await;
    }

    #[tokio::test]
    async fn startup_fails_before_binding_when_memory_does_not_fit() {
        let cfg = EngineConfig { gpu_memory_utilization: 0.1, ..Default::default() };
        let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let err = SimServer::start(cfg, gpu(), addr).await.expect_err("must not start");
        assert!(matches!(err, ServerError::Engine(_)), "{err}");
    }
}
