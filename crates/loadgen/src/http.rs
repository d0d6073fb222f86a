//! HTTP load driver: streams `/v1/completions` requests at a schedule's arrival times and
//! measures them the way `vllm bench serve` does, so it works against the simulator and a real vLLM.
//! Prompts are text any tokenizer accepts ([`crate::prompt`]); token counts in the report are the
//! server's own (`usage`), falling back to the asked lengths where a server sends no usage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info};

use crate::prompt::synthetic_words;
use crate::report::{LoadReport, RequestOutcome, RequestRate};
use crate::schedule::{Arrival, Schedule};
use objectives::LatencyLimits;

/// A run that could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("invalid server URL `{url}`: {message}")]
    Url { url: String, message: String },
    #[error("asking {url} for its model: {message}")]
    Models { url: String, message: String },
}

/// `url_base` + `path` as a URI, checked to be plain `http://HOST[:PORT]`.
fn endpoint(url_base: &str, path: &str) -> Result<Uri, LoadError> {
    let url = format!("{}{path}", url_base.trim_end_matches('/'));
    let bad = |message: String| LoadError::Url { url: url_base.to_string(), message };
    let uri: Uri = url.parse().map_err(|e: hyper::http::uri::InvalidUri| bad(e.to_string()))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(bad("expected http://HOST:PORT".into()));
    }
    Ok(uri)
}

fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// The first model a server lists at `/v1/models` (what `vllm bench serve` sends by default).
pub async fn served_model(url_base: &str) -> Result<String, LoadError> {
    let uri = endpoint(url_base, "/v1/models")?;
    let bad = |message: String| LoadError::Models { url: uri.to_string(), message };
    let resp = http_client().get(uri.clone()).await.map_err(|e| bad(format!("connection: {e}")))?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| bad(e.to_string()))?.to_bytes();
    if status != StatusCode::OK {
        return Err(bad(format!("HTTP {}", status.as_u16())));
    }
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| bad(format!("bad JSON: {e}")))?;
    v.pointer("/data/0/id")
        .and_then(serde_json::Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| bad("no model listed in `data`".into()))
}

/// Knobs of a load run.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// At most this many requests in flight; later arrivals wait (`--max-concurrency`).
    pub max_concurrency: Option<usize>,
    /// Stop sending at this point and cancel what is still running (counted as failed).
    pub deadline: Option<Duration>,
    /// Objectives for `request_goodput`.
    pub slo: LatencyLimits,
    /// When > 0, every prompt starts with the same this many tokens (prefix-cache sharing).
    pub shared_prefix_tokens: u32,
}

/// Sends `schedule`'s arrivals (one pass) to `url_base` (e.g. `http://127.0.0.1:8000`) and
/// reports. Each request is its own task; the same seed sends the same requests.
pub async fn run_http(
    url_base: &str,
    model: &str,
    schedule: &Schedule,
    seed: u64,
    opts: &LoadOptions,
) -> Result<LoadReport, LoadError> {
    let uri = endpoint(url_base, "/v1/completions")?;
    let client = http_client();
    let limiter = opts.max_concurrency.map(|n| Arc::new(Semaphore::new(n.max(1))));
    let mut prefix_rng = StdRng::seed_from_u64(seed ^ 0x5eed_0f9e_f1c5);
    let prefix: Vec<&'static str> = synthetic_words(opts.shared_prefix_tokens, &mut prefix_rng).collect();

    let start = Instant::now();
    let deadline = opts.deadline.map(|d| start + d);
    let mut tasks: JoinSet<RequestOutcome> = JoinSet::new();
    let mut outcomes = Vec::new();
    let mut sent = 0u64;
    let mut last_send_s = 0.0f64;
    for (i, arrival) in schedule.arrivals(seed).enumerate() {
        let at = start + Duration::from_secs_f64(arrival.at_s);
        if deadline.is_some_and(|d| at >= d) {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        // Reap finished tasks as we go so a long run does not hold every outcome in the JoinSet.
        while let Some(done) = tasks.try_join_next() {
            outcomes.push(done.unwrap_or_else(|e| RequestOutcome::failed(0, format!("request task failed: {e}"))));
        }
        let body = request_body(model, &arrival, seed.wrapping_add(i as u64), &prefix);
        let (client, uri, limiter) = (client.clone(), uri.clone(), limiter.clone());
        sent += 1;
        last_send_s = start.elapsed().as_secs_f64();
        tasks.spawn(async move {
            // Held until the request ends; as vLLM's bench, the clock starts once a slot is free.
            let _permit = match limiter {
                Some(s) => s.acquire_owned().await.ok(),
                None => None,
            };
            send_one(&client, uri, body, arrival.prompt_tokens).await
        });
    }
    info!(sent, "all arrivals sent, waiting for the last responses");

    loop {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), tasks.join_next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => tasks.join_next().await,
        };
        match next {
            Some(done) => {
                outcomes.push(done.unwrap_or_else(|e| RequestOutcome::failed(0, format!("request task failed: {e}"))))
            }
            None => break,
        }
    }
    let cancelled = tasks.len();
    tasks.abort_all();
    for _ in 0..cancelled {
        outcomes.push(RequestOutcome::failed(0, "cancelled at the run's deadline"));
    }
    let duration = start.elapsed().as_secs_f64();
    let rate = if schedule.is_infinite_rate() {
        RequestRate::Infinite
    } else if schedule.duration_s() > 0.0 {
        RequestRate::PerSecond(schedule.expected_requests() / schedule.duration_s())
    } else {
        RequestRate::PerSecond(0.0)
    };
    let mut report = LoadReport::from_outcomes(&outcomes, duration, rate, opts.max_concurrency, &opts.slo);
    report.achieved_request_rate = achieved_rate(sent, last_send_s, schedule.is_infinite_rate());
    Ok(report)
}

/// Requests sent per second of sending: `sent` over the time the last one went out (for `n`
/// Poisson arrivals at rate `r` the last comes at about `n / r`). Infinite for one burst.
fn achieved_rate(sent: u64, last_send_s: f64, infinite: bool) -> RequestRate {
    if infinite || (sent > 0 && last_send_s <= 0.0) {
        RequestRate::Infinite
    } else if sent == 0 {
        RequestRate::PerSecond(0.0)
    } else {
        RequestRate::PerSecond(sent as f64 / last_send_s)
    }
}

/// A streaming completion request with a text prompt of `a.prompt_tokens` words, the shared
/// prefix first (vLLM and vllm-sim both find cache hits from the content).
fn request_body(model: &str, a: &Arrival, seed: u64, prefix: &[&'static str]) -> Bytes {
    let mut rng = StdRng::seed_from_u64(seed);
    let shared = prefix.len().min(a.prompt_tokens as usize);
    let rest = a.prompt_tokens - u32::try_from(shared).unwrap_or(a.prompt_tokens);
    let words: Vec<&str> = prefix[..shared].iter().copied().chain(synthetic_words(rest, &mut rng)).collect();
    let text = words.join(" ");
    let body = serde_json::json!({
        "model": model,
        "prompt": text,
        "max_tokens": a.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": true,
        "temperature": 0.0,
    });
    Bytes::from(body.to_string())
}

/// Sends one request and reads its SSE stream.
async fn send_one(
    client: &Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    body: Bytes,
    prompt_tokens: u32,
) -> RequestOutcome {
    let req = match Request::post(uri).header(hyper::header::CONTENT_TYPE, "application/json").body(Full::new(body)) {
        Ok(r) => r,
        Err(e) => return RequestOutcome::failed(prompt_tokens, format!("building request: {e}")),
    };
    let st = Instant::now();
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => return RequestOutcome::failed(prompt_tokens, format!("connection: {e}")),
    };
    let status = resp.status();
    let mut body = resp.into_body();
    if status != StatusCode::OK {
        let text = match body.collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(_) => String::new(),
        };
        let message = serde_json::from_str(&text).ok().and_then(|v| error_message(&v)).unwrap_or(text);
        return RequestOutcome::failed(prompt_tokens, format!("HTTP {}: {}", status.as_u16(), clip(message.trim())));
    }
    let mut sse = SseReader::default();
    let mut out = RequestOutcome { prompt_tokens, ..Default::default() };
    let mut last: Option<Instant> = None;
    let mut text_chunks = 0u32;
    let mut usage_tokens: Option<u32> = None;
    let mut usage_prompt: Option<u32> = None;
    let mut done = false;
    while !done {
        let frame = match body.frame().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => return RequestOutcome::failed(prompt_tokens, format!("stream broke: {e}")),
            None => break,
        };
        let Ok(data) = frame.into_data() else { continue };
        let now = Instant::now();
        for event in sse.push(&data) {
            if event == "[DONE]" {
                done = true;
                break;
            }
            let v: serde_json::Value = match serde_json::from_str(&event) {
                Ok(v) => v,
                Err(e) => return RequestOutcome::failed(prompt_tokens, format!("bad chunk JSON: {e}")),
            };
            // vLLM reports a failure after the 200 header as an error event inside the stream.
            if let Some(message) = error_message(&v) {
                return RequestOutcome::failed(prompt_tokens, format!("server error in stream: {}", clip(&message)));
            }
            if let Some(n) = v.pointer("/usage/completion_tokens").and_then(serde_json::Value::as_u64) {
                usage_tokens = Some(u32::try_from(n).unwrap_or(u32::MAX));
            }
            if let Some(n) = v.pointer("/usage/prompt_tokens").and_then(serde_json::Value::as_u64) {
                usage_prompt = Some(u32::try_from(n).unwrap_or(u32::MAX));
            }
            let has_text =
                v.pointer("/choices/0/text").and_then(serde_json::Value::as_str).is_some_and(|t| !t.is_empty());
            if has_text {
                match last {
                    None => out.ttft = (now - st).as_secs_f64(),
                    Some(prev) => out.itl.push((now - prev).as_secs_f64()),
                }
                last = Some(now);
                text_chunks += 1;
            }
        }
    }
    let Some(last) = last else {
        return RequestOutcome::failed(prompt_tokens, "never received a token");
    };
    if !done {
        return RequestOutcome::failed(prompt_tokens, "stream ended without [DONE]");
    }
    out.e2el = (last - st).as_secs_f64();
    out.output_tokens = usage_tokens.unwrap_or(text_chunks);
    out.prompt_tokens = usage_prompt.unwrap_or(prompt_tokens);
    out.success = true;
    debug!(ttft = out.ttft, e2el = out.e2el, tokens = out.output_tokens, "request done");
    out
}

/// The message of an error body or event: vLLM's `{"object":"error","message":..}`, the OpenAI
/// `{"error":{"message":..}}` it sends inside streams, or FastAPI's `{"detail":..}`.
fn error_message(v: &serde_json::Value) -> Option<String> {
    let text = |p: &str| v.pointer(p).and_then(serde_json::Value::as_str).map(str::to_string);
    if v.get("object").and_then(serde_json::Value::as_str) == Some("error") {
        return text("/message");
    }
    match v.get("error") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(e) => text("/error/message").or_else(|| Some(e.to_string())),
        None => text("/detail").or_else(|| v.get("detail").map(ToString::to_string)),
    }
}

/// Keeps error messages in a report to one readable line.
fn clip(s: &str) -> String {
    const MAX: usize = 300;
    let line = s.replace('\n', " ");
    if line.chars().count() > MAX {
        format!("{}...", line.chars().take(MAX).collect::<String>())
    } else {
        line
    }
}

/// Splits a byte stream into SSE `data:` payloads.
#[derive(Debug, Default)]
struct SseReader {
    buf: String,
}

impl SseReader {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        let mut events = Vec::new();
        while let Some(end) = self.buf.find("\n\n") {
            let block: String = self.buf.drain(..end + 2).collect();
            for line in block.lines() {
                if let Some(payload) = line.strip_prefix("data:") {
                    events.push(payload.trim().to_string());
                }
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_reader_splits_across_frames() {
        let mut r = SseReader::default();
        assert!(r.push(b"data: {\"a\":1}\n").is_empty());
        assert_eq!(r.push(b"\ndata: {\"b\"").as_slice(), ["{\"a\":1}"]);
        assert_eq!(r.push(b":2}\n\ndata: [DONE]\n\n").as_slice(), ["{\"b\":2}", "[DONE]"]);
    }

    #[test]
    fn request_body_has_text_of_the_asked_length_and_shared_prefix() {
        let a = Arrival { at_s: 0.0, prompt_tokens: 50, max_tokens: 7 };
        let prefix: Vec<&'static str> = synthetic_words(20, &mut StdRng::seed_from_u64(0)).collect();
        let b1: serde_json::Value = serde_json::from_slice(&request_body("m", &a, 1, &prefix)).expect("json");
        let b2: serde_json::Value = serde_json::from_slice(&request_body("m", &a, 2, &prefix)).expect("json");
        let words = |b: &serde_json::Value| -> Vec<String> {
            b["prompt"].as_str().expect("text").split(' ').map(str::to_string).collect()
        };
        let (w1, w2) = (words(&b1), words(&b2));
        assert_eq!(w1.len(), 50);
        assert_eq!(crate::prompt::count_tokens(b1["prompt"].as_str().expect("text")), 50);
        assert_eq!(b1["max_tokens"], 7);
        assert_eq!(b1["ignore_eos"], true);
        assert_eq!(w1[..20], w2[..20]);
        assert_ne!(w1[20..], w2[20..]);
        let none: serde_json::Value = serde_json::from_slice(&request_body("m", &a, 1, &[])).expect("json");
        assert_eq!(none["prompt"].as_str().expect("text").split(' ').count(), 50);
    }

    #[test]
    fn error_messages_of_vllm_openai_and_fastapi_bodies() {
        let m = |s: &str| error_message(&serde_json::from_str(s).expect("json"));
        assert_eq!(
            m(r#"{"object":"error","message":"bad model","type":"NotFoundError"}"#).as_deref(),
            Some("bad model")
        );
        assert_eq!(
            m(r#"{"error":{"message":"Token id 20000 is out of vocabulary","type":"BadRequestError"}}"#).as_deref(),
            Some("Token id 20000 is out of vocabulary")
        );
        assert_eq!(m(r#"{"detail":"Not Found"}"#).as_deref(), Some("Not Found"));
        assert_eq!(m(r#"{"choices":[{"text":"a"}]}"#), None);
        assert_eq!(clip(&"x".repeat(400)).len(), 303);
    }

    #[test]
    fn achieved_rate_is_sent_over_sending_time() {
        assert_eq!(achieved_rate(10, 2.0, false), RequestRate::PerSecond(5.0));
        assert_eq!(achieved_rate(0, 0.0, false), RequestRate::PerSecond(0.0));
        assert_eq!(achieved_rate(5, 0.0, false), RequestRate::Infinite);
        assert_eq!(achieved_rate(5, 1.0, true), RequestRate::Infinite);
    }

    #[tokio::test]
    async fn bad_url_is_an_error() {
        let s = Schedule::infinite_rate(1, crate::LengthDist::Fixed(1), crate::LengthDist::Fixed(1));
        let e = run_http("localhost:80", "m", &s, 0, &LoadOptions::default()).await.expect_err("must fail");
        assert!(e.to_string().contains("localhost:80"), "{e}");
    }

    #[tokio::test]
    async fn unreachable_server_counts_failures() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
        let s = Schedule::infinite_rate(3, crate::LengthDist::Fixed(4), crate::LengthDist::Fixed(2));
        let r = run_http(&format!("http://127.0.0.1:{port}"), "m", &s, 0, &LoadOptions::default()).await.expect("run");
        assert_eq!((r.num_prompts, r.completed, r.failed), (3, 0, 3));
        assert!(r.errors[0].starts_with("connection"), "{:?}", r.errors);
    }
}
