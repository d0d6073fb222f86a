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
    message: String,
}

impl ApiError {
    pub(super) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, kind: "BadRequestError", message: message.into() }
    }

    fn not_found(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::NOT_FOUND, kind: "NotFoundError", message: message.into() }
    }

    pub(super) fn shutting_down() -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "ServiceUnavailableError",
            message: "server is shutting down".into(),
        }
    }

    pub(super) fn into_response(self) -> Response<RespBody> {
        error_resp(self.status, self.kind, self.message)
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
                "id": format!("modelperm-{:032x}", shared.created),
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
    let raw: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let body: R = super::request::parse(raw)?;
    if let Some(m) = body.model() {
        if m != shared.model {
            return Err(ApiError::not_found(format!("The model `{m}` does not exist.")));
        }
    }
    let gen = body.generation(Limits { max_model_len: shared.max_model_len, block_size: shared.block_size })?;
    let sim_req =
        SimRequest { prompt_tokens: gen.prompt_tokens, max_tokens: gen.max_tokens, block_hashes: gen.block_hashes };
    let (guard, rx) = shared.submit(sim_req).ok_or_else(ApiError::shutting_down)?;
    let ctx = ChunkCtx {
        api: gen.api,
        id: format!("{}-{}", gen.api.id_prefix(), guard.id),
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
