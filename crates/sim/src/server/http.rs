//! The HTTP side: routing, vLLM's JSON and error bodies, and the one path both generation
//! endpoints take: read the body, check the model, check the request as vLLM does
//! ([`ApiRequest::generation`]), submit it, answer whole or streamed.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use super::request::{ApiRequest, ChatRequest, CompletionRequest, Limits};
use super::stream::{wait_whole, ChunkCtx, SseBody};
use super::{unix_now, Shared, METRICS_CONTENT_TYPE};
use crate::engine::SimRequest;

/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 32 << 20;

pub(super) type RespBody = BoxBody<Bytes, Infallible>;

/// A request answered with vLLM's error body instead of a generation.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(super) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    param: Option<String>,
    message: String,
}

impl ApiError {
    /// One of vLLM's own checks failed (`BadRequestError`).
    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, kind: "BadRequestError", param: None, message: message.into() }
    }

    /// vLLM's check of one parameter failed: it names the parameter in `param` and, with its
    /// value, at the end of the message.
    pub(super) fn bad_param(param: &str, value: impl std::fmt::Display, message: impl std::fmt::Display) -> ApiError {
        ApiError {
            param: Some(param.into()),
            ..ApiError::bad_request(format!("{message} (parameter={param}, value={value})"))
        }
    }

    /// The body does not fit the request model: FastAPI's validation error as vLLM reports it
    /// (pydantic's error line; the location, e.g. `body.messages`, as `param`).
    pub(super) fn validation(loc: impl Into<String>, kind: &str, msg: impl std::fmt::Display) -> ApiError {
        let loc = loc.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "Bad Request",
            message: format!("1 validation error:\n  {{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}'}}"),
            param: Some(loc),
        }
    }

    fn unknown_model(model: &str, served: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "NotFoundError",
            param: Some("model".into()),
            message: format!("The model `{model}` does not exist. Valid aliases: {served}"),
        }
    }

    pub(super) fn shutting_down() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "ServiceUnavailableError",
            param: None,
            message: "server is shutting down".into(),
        }
    }

    pub(super) fn into_response(self) -> Response<RespBody> {
        error_resp(self.status, self.kind, self.param.as_deref(), self.message)
    }
}

/// A body that is not JSON, reported as vLLM reports it: a `json_invalid` validation error at
/// the character where Python's parser gave up.
fn json_error(bytes: &[u8], e: &serde_json::Error) -> ApiError {
    let pos = if e.is_eof() {
        bytes.len()
    } else {
        let line_start: usize =
            bytes.split(|&b| b == b'\n').take(e.line().saturating_sub(1)).map(|l| l.len() + 1).sum();
        line_start + e.column().saturating_sub(1)
    };
    let reason = if e.is_eof() { "Expecting value".to_string() } else { e.to_string() };
    let loc = format!("body.{pos}");
    ApiError {
        message: format!(
            "1 validation error:\n  {{'type': 'json_invalid', 'loc': '{loc}', 'msg': 'JSON decode error', \
             'input': '<dict of 0 items>', 'ctx': {{'error': '{reason}'}}}}"
        ),
        ..ApiError::validation(loc, "json_invalid", "")
    }
}

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

/// vLLM's error body (OpenAI's: `{"error": {...}}`).
pub(super) fn error_resp(status: StatusCode, kind: &str, param: Option<&str>, message: String) -> Response<RespBody> {
    json_resp(status, &json!({"error": {"message": message, "type": kind, "param": param, "code": status.as_u16()}}))
}

pub(super) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<RespBody>, Infallible> {
    let path = req.uri().path().to_string();
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/metrics") => full(StatusCode::OK, METRICS_CONTENT_TYPE, shared.metrics_text()),
        (&Method::GET, "/health") => full(StatusCode::OK, "application/json", Bytes::new()),
        (&Method::GET, "/v1/models") => json_resp(StatusCode::OK, &models_json(&shared)),
        (&Method::POST, "/v1/completions") => {
            generate::<CompletionRequest>(shared, req).await.unwrap_or_else(ApiError::into_response)
        }
        (&Method::POST, "/v1/chat/completions") => {
            generate::<ChatRequest>(shared, req).await.unwrap_or_else(ApiError::into_response)
        }
        (_, "/metrics" | "/health" | "/v1/models" | "/v1/completions" | "/v1/chat/completions") => {
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
            // vLLM lists one default permission per model.
            "permission": [{
                "id": format!("modelperm-{:016x}", shared.created),
                "object": "model_permission",
                "created": shared.created,
                "allow_create_engine": false,
                "allow_sampling": true,
                "allow_logprobs": true,
                "allow_search_indices": false,
                "allow_view": true,
                "allow_fine_tuning": false,
                "organization": "*",
                "group": null,
                "is_blocking": false,
            }],
        }]
    })
}

/// One generation request, either endpoint: checked in vLLM's order (JSON, model, content),
/// then submitted; the answer streams or comes whole.
async fn generate<R: ApiRequest>(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<RespBody>, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("could not read request body: {e}")))?
        .to_bytes();
    let raw: Value = serde_json::from_slice(&bytes).map_err(|e| json_error(&bytes, &e))?;
    let body: R = super::request::parse(raw)?;
    if let Some(m) = body.model() {
        if m != shared.model {
            return Err(ApiError::unknown_model(m, &shared.model));
        }
    }
    let gen = body.generation(Limits { max_model_len: shared.max_model_len, block_size: shared.block_size })?;
    let sim_req =
        SimRequest { prompt_tokens: gen.prompt_tokens, max_tokens: gen.max_tokens, block_hashes: gen.block_hashes };
    let (guard, rx) = shared.submit(sim_req).ok_or_else(ApiError::shutting_down)?;
    let ctx = ChunkCtx {
        api: gen.api,
        id: format!("{}-{:016x}", gen.api.id_prefix(), guard.id),
        fingerprint: shared.fingerprint.clone(),
        created: unix_now(),
        model: shared.model.clone(),
        prompt_tokens: gen.prompt_tokens,
        max_tokens: gen.max_tokens,
    };
    if !gen.stream {
        return Ok(wait_whole(guard, rx, ctx).await);
    }
    let mut resp = Response::new(SseBody::new(rx, guard, ctx, gen.include_usage).boxed());
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    Ok(resp)
}
