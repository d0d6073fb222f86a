//! A completion's answer: one JSON object at the end, or a server-sent event per token as the
//! engine task delivers them.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper::{Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::http::{error_resp, json_resp, RespBody};
use super::RequestGuard;
use crate::engine::{FinishReason, TokenEvent};

/// Words the simulated model "generates", one per token.
const FILLER: [&str; 8] = [" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy"];

/// What every chunk of one completion repeats.
pub(super) struct ChunkCtx {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) prompt_tokens: u32,
    pub(super) max_tokens: u32,
}

impl ChunkCtx {
    fn usage(&self, completion: u32) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        })
    }

    fn chunk(&self, text: &str, finish: Option<&str>) -> Bytes {
        let v = json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish, "stop_reason": null}],
        });
        Bytes::from(format!("data: {v}\n\n"))
    }
}

fn reason_str(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

/// Non-streaming: wait for the end and answer with one completion object.
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
            None => {
                return error_resp(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "ServiceUnavailableError",
                    "server is shutting down",
                )
            }
        }
    };
    guard.finished = true;
    let text: String = (0..tokens).map(|i| FILLER[i as usize % FILLER.len()]).collect();
    json_resp(
        StatusCode::OK,
        &json!({
            "id": ctx.id,
            "object": "text_completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": reason_str(reason), "stop_reason": null}],
            "usage": ctx.usage(tokens),
        }),
    )
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
                self.tokens += 1;
                let last = self.tokens >= self.ctx.max_tokens;
                self.reason_sent |= last;
                out.push(self.ctx.chunk(word, last.then_some("length")));
            }
            TokenEvent::Finished { reason, .. } => {
                self.guard.finished = true;
                if !self.reason_sent {
                    out.push(self.ctx.chunk("", Some(reason_str(reason))));
                }
                if self.include_usage {
                    let v = json!({
                        "id": self.ctx.id,
                        "object": "text_completion",
                        "created": self.ctx.created,
                        "model": self.ctx.model,
                        "choices": [],
                        "usage": self.ctx.usage(self.tokens),
                    });
                    out.push(Bytes::from(format!("data: {v}\n\n")));
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
