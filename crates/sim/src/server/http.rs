//! The HTTP side: routing, vLLM's JSON and error bodies, and `/v1/completions` checked as
//! vLLM checks it before the request reaches the engine.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use loadgen::prompt::count_tokens;
use serde::Deserialize;
use serde_json::{json, Value};

use super::stream::{wait_whole, ChunkCtx, SseBody};
use super::{unix_now, Shared, DEFAULT_MAX_TOKENS, METRICS_CONTENT_TYPE};
use crate::engine::{BlockHasher, SimRequest};

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 32 << 20;

pub(super) type RespBody = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

pub(super) fn json_resp(status: StatusCode, v: &Value) -> Response<RespBody> {
    full(status, "application/json", v.to_string())
}

/// vLLM's OpenAI-style error body.
pub(super) fn error_resp(status: StatusCode, kind: &str, message: impl Into<String>) -> Response<RespBody> {
    let message = message.into();
    json_resp(
        status,
        &json!({"object": "error", "message": message, "type": kind, "param": null, "code": status.as_u16()}),
    )
}

pub(super) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<RespBody>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => full(StatusCode::OK, METRICS_CONTENT_TYPE, shared.metrics_text()),
        (&Method::GET, "/health") => full(StatusCode::OK, "application/json", Bytes::new()),
        (&Method::GET, "/v1/models") => json_resp(StatusCode::OK, &models_json(&shared)),
        (&Method::POST, "/v1/completions") => completions(shared, req).await,
        (_, "/metrics" | "/health" | "/v1/models" | "/v1/completions") => {
            json_resp(StatusCode::METHOD_NOT_ALLOWED, &json!({"detail": "Method Not Allowed"}))
        }
        _ => json_resp(StatusCode::NOT_FOUND, &json!({"detail": "Not Found"})),
    };
    Ok(resp)
}

fn models_json(shared: &Shared) -> Value {
    json!({
        "object": "list",
        "data": [{
            "id": shared.model,
            "object": "model",
            "created": shared.created,
            "owned_by": "vllm",
            "root": shared.model,
            "parent": null,
            "max_model_len": shared.max_model_len,
            "permission": [],
        }]
    })
}

/// `/v1/completions` body: the OpenAI fields the simulator uses plus its extensions.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(default)]
    model: Option<String>,
    prompt: Value,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Accepted for compatibility; the simulator never stops early.
    #[serde(default)]
    #[allow(dead_code)]
    ignore_eos: bool,
    /// Extension: exact prompt length, overriding what the prompt implies.
    #[serde(default)]
    prompt_tokens: Option<u32>,
    /// Extension: requests with the same id share a cached prefix.
    #[serde(default)]
    prefix_id: Option<u64>,
    /// Extension: length of the shared prefix (default: the whole prompt).
    #[serde(default)]
    prefix_tokens: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Token count a prompt stands for: ids count one each, text by loadgen's one rule
/// ([`count_tokens`]); empty text is one token, the BOS vLLM adds.
fn prompt_len(prompt: &Value) -> Result<u32, String> {
    match prompt {
        Value::String(s) => Ok(count_tokens(s).max(1)),
        Value::Array(items) if items.is_empty() => Err("prompt must not be empty".into()),
        Value::Array(items) if items.iter().all(|v| v.as_u64().is_some()) => {
            Ok(u32::try_from(items.len()).unwrap_or(u32::MAX))
        }
        // A batch of one prompt, as clients sometimes send.
        Value::Array(items) if items.len() == 1 => prompt_len(&items[0]),
        Value::Array(_) => {
            Err("prompt must be a string or an array of token ids (batched prompts are not supported)".into())
        }
        _ => Err("prompt must be a string or an array of token ids".into()),
    }
}

async fn completions(shared_state: Arc<Shared>, req: Request<Incoming>) -> Response<RespBody> {
    let shared = &shared_state;
    let bytes = match Limited::new(req.into_body(), MAX_BODY_BYTES).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return error_resp(StatusCode::BAD_REQUEST, "BadRequestError", format!("could not read request body: {e}"))
        }
    };
    let body: CompletionRequest = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => return error_resp(StatusCode::BAD_REQUEST, "BadRequestError", format!("invalid JSON body: {e}")),
    };
    if let Some(m) = body.model.as_deref() {
        if m != shared.model {
            return error_resp(StatusCode::NOT_FOUND, "NotFoundError", format!("The model `{m}` does not exist."));
        }
    }
    let prompt_tokens = match body.prompt_tokens {
        Some(0) => return error_resp(StatusCode::BAD_REQUEST, "BadRequestError", "prompt_tokens must be at least 1"),
        Some(n) => n,
        None => match prompt_len(&body.prompt) {
            Ok(n) => n,
            Err(msg) => return error_resp(StatusCode::BAD_REQUEST, "BadRequestError", msg),
        },
    };
    let max_tokens = body.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if max_tokens == 0 {
        return error_resp(StatusCode::BAD_REQUEST, "BadRequestError", "max_tokens must be at least 1, got 0.");
    }
    let total = u64::from(prompt_tokens) + u64::from(max_tokens);
    if total > u64::from(shared.max_model_len) {
        return error_resp(
            StatusCode::BAD_REQUEST,
            "BadRequestError",
            format!(
                "This model's maximum context length is {} tokens. However, you requested {total} tokens \
                 ({prompt_tokens} in the messages, {max_tokens} in the completion). Please reduce the length \
                 of the messages or completion.",
                shared.max_model_len
            ),
        );
    }
    let block_hashes = match body.prefix_id {
        Some(id) => {
            let shared = body.prefix_tokens.unwrap_or(prompt_tokens).min(prompt_tokens);
            BlockHasher::with_prefix_group(shared_state.block_size, id, shared).finish()
        }
        None => Vec::new(),
    };
    let sim_req = SimRequest { prompt_tokens, max_tokens, block_hashes };
    let Some((guard, rx)) = shared_state.submit(sim_req) else {
        return error_resp(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailableError", "server is shutting down");
    };
    let ctx = ChunkCtx {
        id: format!("cmpl-{}", guard.id),
        created: unix_now(),
        model: shared.model.clone(),
        prompt_tokens,
        max_tokens,
    };
    if body.stream {
        let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
        let mut resp = Response::new(SseBody::new(rx, guard, ctx, include_usage).boxed());
        resp.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        resp
    } else {
        wait_whole(guard, rx, ctx).await
    }
}
