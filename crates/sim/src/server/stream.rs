//! A generation's answer, completion or chat: one JSON object at the end, or a server-sent
//! event per token as the engine task delivers them, in vLLM's shapes (fields set to null
//! where vLLM writes null, left out where vLLM leaves them out).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::http::{json_resp, ApiError, RespBody};
use super::request::Api;
use super::RequestGuard;
use crate::engine::{FinishReason, TokenEvent};

/// Words the simulated model "generates", one per token.
const FILLER: [&str; 8] = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy"];

impl Api {
    /// Prefix of the answer's `id`.
    pub(super) fn id_prefix(self) -> &'static str {
        match self {
            Api::Completion => "cmpl",
            Api::Chat => "chatcmpl",
        }
    }

    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Api::Completion, _) => "text_completion",
            (Api::Chat, false) => "chat.completion",
            (Api::Chat, true) => "chat.completion.chunk",
        }
    }
}

/// What every chunk of one answer repeats.
pub(super) struct ChunkCtx {
    pub(super) api: Api,
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    /// `system_fingerprint`: on whole answers and on a stream's last event.
    pub(super) fingerprint: String,
    pub(super) prompt_tokens: u32,
    pub(super) max_tokens: u32,
}

type Obj = serde_json::Map<String, Value>;

impl ChunkCtx {
    fn usage(&self, completion: u32) -> Obj {
        let mut m = Obj::new();
        m.insert("prompt_tokens".into(), self.prompt_tokens.into());
        m.insert("total_tokens".into(), (self.prompt_tokens + completion).into());
        m.insert("completion_tokens".into(), completion.into());
        m
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Obj {
        let mut m = Obj::new();
        m.insert("id".into(), self.id.clone().into());
        m.insert("object".into(), self.api.object(chunk).into());
        m.insert("created".into(), self.created.into());
        m.insert("model".into(), self.model.clone().into());
        m.insert("choices".into(), choices);
        m
    }

    /// One SSE event; the last of the stream carries the fingerprint.
    fn event(&self, mut m: Obj, last: bool) -> Bytes {
        if last {
            m.insert("system_fingerprint".into(), self.fingerprint.clone().into());
        }
        Bytes::from(format!("data: {}\n\n", Value::Object(m)))
    }

    /// The events for one generated `text` (`finish` on the last; `last` when no usage event
    /// follows): a chat's first token comes after an event that opens the assistant's message.
    /// Fields as vLLM 0.32 writes them (`fixtures/vllm-0.32.0/*.sse`).
    fn token_events(&self, text: &str, first: bool, finish: Option<&str>, last: bool) -> Vec<Bytes> {
        let mut out = Vec::with_capacity(2);
        let choice = match self.api {
            Api::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null,
                "prompt_token_ids": null, "token_ids": null,
            }),
            Api::Chat => {
                if first {
                    let delta = json!({"role": "assistant", "content": ""});
                    let choice = json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null});
                    let mut m = self.envelope(true, json!([choice]));
                    m.insert("prompt_token_ids".into(), Value::Null);
                    m.insert("prompt_text".into(), Value::Null);
                    out.push(self.event(m, false));
                }
                let mut choice =
                    json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": finish});
                if finish.is_some() {
                    choice["stop_reason"] = Value::Null;
                }
                choice["token_ids"] = Value::Null;
                choice
            }
        };
        out.push(self.event(self.envelope(true, json!([choice])), last));
        out
    }

    /// The last event before `[DONE]` when usage was asked for.
    fn usage_event(&self, completion: u32) -> Bytes {
        let mut m = self.envelope(true, json!([]));
        m.insert("usage".into(), Value::Object(self.usage(completion)));
        self.event(m, true)
    }

    /// The whole answer of a non-streaming request, as vLLM 0.32 writes it
    /// (`fixtures/vllm-0.32.0/*.json`).
    fn whole(&self, text: &str, reason: &str, completion: u32) -> Value {
        let choice = match self.api {
            Api::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": reason, "stop_reason": null,
                "token_ids": null, "prompt_logprobs": null, "prompt_token_ids": null, "routed_experts": null,
            }),
            Api::Chat => json!({
                "index": 0,
                "message": {
                    "role": "assistant", "content": text, "refusal": null, "annotations": null, "audio": null,
                    "function_call": null, "reasoning": null,
                },
                "logprobs": null, "finish_reason": reason, "stop_reason": null, "token_ids": null,
                "routed_experts": null,
            }),
        };
        let mut m = self.envelope(false, json!([choice]));
        m.insert("service_tier".into(), Value::Null);
        m.insert("system_fingerprint".into(), self.fingerprint.clone().into());
        let mut usage = self.usage(completion);
        usage.insert("prompt_tokens_details".into(), Value::Null);
        usage.insert("completion_tokens_details".into(), Value::Null);
        m.insert("usage".into(), Value::Object(usage));
        if self.api == Api::Chat {
            for k in ["prompt_logprobs", "prompt_token_ids", "prompt_text"] {
                m.insert(k.into(), Value::Null);
            }
        }
        for k in ["kv_transfer_params", "ec_transfer_params", "metrics"] {
            m.insert(k.into(), Value::Null);
        }
        Value::Object(m)
    }
}

fn reason_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

/// Non-streaming: wait for the end and answer with one object.
pub(super) async fn wait_whole(
    mut guard: RequestGuard,
    mut rx: UnboundedReceiver<TokenEvent>,
    ctx: ChunkCtx,
) -> Response<RespBody> {
    let mut tokens = 0u32;
    let reason = loop {
        match rx.recv().await {
            Some(TokenEvent::First { .. } | TokenEvent::Token { .. }) => tokens += 1,
            Some(TokenEvent::Finished { reason, .. }) => break reason,
            None => return ApiError::shutting_down().into_response(),
        }
    };
    guard.finished = true;
    let text: String = (0..tokens).map(|i| FILLER[i as usize % FILLER.len()]).collect();
    json_resp(StatusCode::OK, &ctx.whole(&text, reason_str(reason), tokens))
}

/// Streaming body: one SSE chunk per token, then an optional usage chunk and `[DONE]`.
/// Dropping it (client gone) aborts the request through its guard.
pub(super) struct SseBody {
    rx: UnboundedReceiver<TokenEvent>,
    guard: RequestGuard,
    ctx: ChunkCtx,
    include_usage: bool,
    tokens: u32,
    /// Whether a chunk already carried the finish reason.
    reason_sent: bool,
    /// Frames ready to send, in reverse order (popped from the end).
    pending: Vec<Bytes>,
    ended: bool,
}

impl SseBody {
    pub(super) fn new(
        rx: UnboundedReceiver<TokenEvent>,
        guard: RequestGuard,
        ctx: ChunkCtx,
        include_usage: bool,
    ) -> SseBody {
        SseBody { rx, guard, ctx, include_usage, tokens: 0, reason_sent: false, pending: Vec::new(), ended: false }
    }

    fn on_event(&mut self, ev: TokenEvent) {
        let mut out = Vec::new();
        match ev {
            TokenEvent::First { .. } | TokenEvent::Token { .. } => {
                let word = FILLER[self.tokens as usize % FILLER.len()];
                let first = self.tokens == 0;
                self.tokens += 1;
                let last = self.tokens >= self.ctx.max_tokens;
                self.reason_sent |= last;
                out.extend(self.ctx.token_events(word, first, last.then_some("length"), last && !self.include_usage));
            }
            TokenEvent::Finished { reason, .. } => {
                self.guard.finished = true;
                if !self.reason_sent {
                    let (first, last) = (self.tokens == 0, !self.include_usage);
                    out.extend(self.ctx.token_events("", first, Some(reason_str(reason)), last));
                }
                if self.include_usage {
                    out.push(self.ctx.usage_event(self.tokens));
                }
                out.push(Bytes::from_static(b"data: [DONE]\n\n"));
                self.ended = true;
            }
        }
        out.reverse();
        out.append(&mut self.pending);
        self.pending = out;
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        loop {
            if let Some(b) = self.pending.pop() {
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(ev)) => self.on_event(ev),
                // Engine stopped: end the stream without [DONE] so the client sees it cut short.
                Poll::Ready(None) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
