//! The bodies of `/v1/completions` and `/v1/chat/completions`, read as vLLM's pydantic models
//! read them (lax booleans, unknown fields ignored), and what each asks of the engine
//! ([`Generation`]): prompt length, block hashes for the prefix cache, output length.

use std::borrow::Cow;

use loadgen::prompt::{count_tokens, tokens};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::http::ApiError;
use super::lax::LaxBool;
use super::DEFAULT_MAX_TOKENS;
use crate::engine::BlockHasher;

/// Prompt tokens the chat template adds to each message: Llama 3's `<|start_header_id|>`, the
/// role and `<|end_header_id|>\n\n` before the content, `<|eot_id|>` after it. A chat's prompt
/// is, message by message, these plus the content's tokens ([`count_tokens`]).
pub(super) const CHAT_TOKENS_PER_MESSAGE: u32 = 5;

/// The template's tokens around a message's content (see [`CHAT_TOKENS_PER_MESSAGE`]); `None`
/// stands for the role.
const CHAT_HEAD: [Option<&str>; 4] = [Some("<|start_header_id|>"), None, Some("<|end_header_id|>"), Some("\n\n")];
const CHAT_TAIL: &str = "<|eot_id|>";

/// Which endpoint a request came in by; decides the answer's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Api {
    Completion,
    Chat,
}

/// What the server knows that the checks need.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) max_model_len: u32,
    pub(super) block_size: u32,
}

/// A checked request, as the engine and the answer need it.
#[derive(Debug)]
pub(super) struct Generation {
    pub(super) api: Api,
    pub(super) prompt_tokens: u32,
    pub(super) max_tokens: u32,
    pub(super) block_hashes: Vec<u64>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
}

/// A request body of one of the generation endpoints.
pub(super) trait ApiRequest: DeserializeOwned {
    fn model(&self) -> Option<&str>;
    /// Checks the request as vLLM does once the model is known to exist.
    fn generation(&self, limits: Limits) -> Result<Generation, ApiError>;
}

/// Reads a body already parsed as JSON, with the check vLLM makes on the raw data before the
/// fields (so with Python's truthiness: `"stream": "false"` passes it).
pub(super) fn parse<R: ApiRequest>(raw: Value) -> Result<R, ApiError> {
    if truthy(raw.get("stream_options")) && !truthy(raw.get("stream")) {
        return Err(ApiError::validation(
            "body",
            "value_error",
            "Value error, Stream options can only be defined when `stream=True`.",
        ));
    }
    serde_json::from_value(raw).map_err(|e| ApiError::validation("body", "value_error", e))
}

/// Python's `bool()` of a JSON value (absent is `None`, false).
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    /// vLLM's default is true: `"stream_options": {}` asks for usage.
    #[serde(default = "some_true")]
    include_usage: Option<LaxBool>,
}

fn some_true() -> Option<LaxBool> {
    Some(LaxBool(true))
}

fn completion_default_max_tokens() -> Option<i64> {
    Some(i64::from(DEFAULT_MAX_TOKENS))
}

/// The simulator's own fields, which vLLM ignores.
#[derive(Debug, Default, Deserialize)]
struct Extensions {
    /// Exact prompt length, overriding what the prompt implies.
    #[serde(default)]
    prompt_tokens: Option<u32>,
    /// Requests with the same id share a cached prefix without sending it ([`BlockHasher::with_prefix_group`]).
    #[serde(default)]
    prefix_id: Option<u64>,
    /// Length of the shared prefix (default: the whole prompt).
    #[serde(default)]
    prefix_tokens: Option<u32>,
}

/// Fields both endpoints read the same way.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<LaxBool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    /// Accepted for compatibility; the simulator never stops early.
    #[serde(default)]
    #[allow(dead_code)]
    ignore_eos: LaxBool,
    #[serde(flatten)]
    ext: Extensions,
}

/// `/v1/completions`.
#[derive(Debug, Deserialize)]
pub(super) struct CompletionRequest {
    #[serde(default)]
    prompt: Option<Value>,
    /// Absent: 16; null: the rest of the context (vLLM's `max_tokens: int | None = 16`).
    #[serde(default = "completion_default_max_tokens")]
    max_tokens: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

/// `/v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(super) struct ChatRequest {
    #[serde(default)]
    messages: Option<Vec<Value>>,
    #[serde(default)]
    max_tokens: Option<i64>,
    #[serde(default)]
    max_completion_tokens: Option<i64>,
    #[serde(flatten)]
    common: Common,
}

/// One prompt token as the request gives it.
#[derive(Debug, Clone, Copy)]
enum Tok<'a> {
    Id(u64),
    Text(&'a str),
}

impl ApiRequest for CompletionRequest {
    fn model(&self) -> Option<&str> {
        self.common.model.as_deref()
    }

    fn generation(&self, limits: Limits) -> Result<Generation, ApiError> {
        let Some(prompt) = &self.prompt else {
            return Err(ApiError::validation(
                "body",
                "value_error",
                "Value error, At least one of `prompt` or `prompt_embeds` must be set.",
            ));
        };
        let prompt = single_prompt(prompt)?;
        let toks = prompt_toks(prompt);
        // Empty text is one token: the BOS vLLM adds.
        let len = u32::try_from(toks.clone().count()).unwrap_or(u32::MAX).max(1);
        self.common.generation(Api::Completion, len, toks, self.max_tokens, limits)
    }
}

impl ApiRequest for ChatRequest {
    fn model(&self) -> Option<&str> {
        self.common.model.as_deref()
    }

    fn generation(&self, limits: Limits) -> Result<Generation, ApiError> {
        let messages = match &self.messages {
            None => return Err(ApiError::validation("body.messages", "missing", "Field required")),
            Some(m) if m.is_empty() => {
                return Err(ApiError::bad_request(
                    "Cannot apply chat template to an empty conversation. Provide at least one message.",
                ))
            }
            Some(m) => m.iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<Vec<_>, _>>()?,
        };
        let len = messages.iter().fold(0u32, |n, (_, content)| {
            n.saturating_add(count_tokens(content)).saturating_add(CHAT_TOKENS_PER_MESSAGE)
        });
        // As vLLM: `max_completion_tokens or max_tokens` (Python's `or`: 0 falls through).
        let max_tokens = self.max_completion_tokens.filter(|&n| n != 0).or(self.max_tokens);
        self.common.generation(Api::Chat, len, chat_toks(&messages), max_tokens, limits)
    }
}

impl Common {
    /// The checks and the block hashes both endpoints share, in vLLM's order: context length,
    /// then `max_tokens`. `len` is the prompt's length as its tokens `toks` imply.
    fn generation<'a>(
        &self,
        api: Api,
        len: u32,
        toks: impl Iterator<Item = Tok<'a>>,
        max_tokens: Option<i64>,
        limits: Limits,
    ) -> Result<Generation, ApiError> {
        let prompt_tokens = match self.ext.prompt_tokens {
            Some(0) => return Err(ApiError::bad_param("prompt_tokens", 0, "prompt_tokens must be at least 1")),
            Some(n) => n,
            None => len,
        };
        let max_tokens = output_len(prompt_tokens, max_tokens, limits.max_model_len)?;
        let stream = self.stream.is_some_and(|b| b.0);
        let include_usage =
            stream && self.stream_options.as_ref().is_some_and(|o| o.include_usage.is_some_and(|b| b.0));
        let block_hashes = self.block_hashes(toks, prompt_tokens, limits.block_size);
        Ok(Generation { api, prompt_tokens, max_tokens, block_hashes, stream, include_usage })
    }

    /// Hashes of the prompt's first `prompt_tokens` tokens, the extension's shared prefix first.
    fn block_hashes<'a>(&self, toks: impl Iterator<Item = Tok<'a>>, prompt_tokens: u32, block_size: u32) -> Vec<u64> {
        let (mut h, shared) = match self.ext.prefix_id {
            Some(id) => {
                let shared = self.ext.prefix_tokens.unwrap_or(prompt_tokens).min(prompt_tokens);
                (BlockHasher::with_prefix_group(block_size, id, shared), shared)
            }
            None => (BlockHasher::new(block_size), 0),
        };
        let skip = usize::try_from(shared).unwrap_or(usize::MAX);
        let take = usize::try_from(prompt_tokens - shared).unwrap_or(usize::MAX);
        for tok in toks.skip(skip).take(take) {
            match tok {
                Tok::Id(id) => h.push_id(id),
                Tok::Text(t) => h.push_text(t),
            }
        }
        h.finish()
    }
}

/// Output length: as asked, or what is left of the context when not asked; checked in vLLM's
/// order (the prompt alone, prompt and output, then `max_tokens`) and errors worded as its.
fn output_len(prompt_tokens: u32, asked: Option<i64>, max_model_len: u32) -> Result<u32, ApiError> {
    if prompt_tokens > max_model_len {
        // vLLM tokenizes at most one token past the limit, hence "at least".
        let seen = prompt_tokens.min(max_model_len.saturating_add(1));
        return Err(ApiError::bad_param(
            "input_tokens",
            seen,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, your prompt contains at \
                 least {seen} input tokens, which exceeds this limit even without any output tokens. Please reduce \
                 the length of the input prompt."
            ),
        ));
    }
    let n = asked.unwrap_or(i64::from(max_model_len - prompt_tokens));
    let total = i64::from(prompt_tokens).saturating_add(n);
    if total > i64::from(max_model_len) {
        return Err(ApiError::bad_param(
            "input_tokens",
            prompt_tokens,
            format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {n} output \
                 tokens and your prompt contains at least {prompt_tokens} input tokens, for a total of at least \
                 {total} tokens. Please reduce the length of the input prompt or the number of requested output \
                 tokens."
            ),
        ));
    }
    match u32::try_from(n) {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(ApiError::bad_param("max_tokens", n, format!("max_tokens must be at least 1, got {n}."))),
    }
}

/// The one prompt of a completion request: text or token ids (a batch of one is unwrapped).
fn single_prompt(prompt: &Value) -> Result<&Value, ApiError> {
    match prompt {
        Value::String(_) => Ok(prompt),
        Value::Array(items) if items.is_empty() => Err(ApiError::bad_request("prompt must not be empty")),
        Value::Array(items) if items.iter().all(|v| v.as_u64().is_some()) => Ok(prompt),
        // A batch of one prompt, as clients sometimes send.
        Value::Array(items) if items.len() == 1 => single_prompt(&items[0]),
        Value::Array(_) => Err(ApiError::bad_request(
            "prompt must be a string or an array of token ids (batched prompts are not supported)",
        )),
        _ => Err(ApiError::bad_request("prompt must be a string or an array of token ids")),
    }
}

/// A checked prompt's tokens: ids as given, text by loadgen's rule ([`tokens`]).
fn prompt_toks(prompt: &Value) -> impl Iterator<Item = Tok<'_>> + Clone {
    let text = prompt.as_str().unwrap_or_default();
    let ids = prompt.as_array().map(Vec::as_slice).unwrap_or_default();
    tokens(text).map(Tok::Text).chain(ids.iter().filter_map(Value::as_u64).map(Tok::Id))
}

/// Role and text of message `i`; text parts are joined with newlines, as vLLM joins them for
/// string-content templates.
fn message(i: usize, m: &Value) -> Result<(&str, Cow<'_, str>), ApiError> {
    let role = m.get("role").and_then(Value::as_str);
    let content = match m.get("content") {
        Some(Value::String(s)) => Some(Cow::Borrowed(s.as_str())),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => texts.push(t),
                    _ => {
                        return Err(ApiError::bad_request(format!(
                        "messages[{i}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"
                    )))
                    }
                }
            }
            Some(Cow::Owned(texts.join("\n")))
        }
        _ => None,
    };
    match (role, content) {
        (Some(role), Some(content)) => Ok((role, content)),
        (None, _) => Err(ApiError::validation(format!("body.messages.{i}.role"), "missing", "Field required")),
        (_, None) => Err(ApiError::validation(format!("body.messages.{i}.content"), "missing", "Field required")),
    }
}

/// A chat's prompt tokens: each message in the template (see [`CHAT_TOKENS_PER_MESSAGE`]).
fn chat_toks<'a>(messages: &'a [(&'a str, Cow<'a, str>)]) -> impl Iterator<Item = Tok<'a>> + 'a {
    messages.iter().flat_map(|(role, content)| {
        CHAT_HEAD
            .into_iter()
            .map(move |t| Tok::Text(t.unwrap_or(role)))
            .chain(tokens(content).map(Tok::Text))
            .chain(std::iter::once(Tok::Text(CHAT_TAIL)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: Limits = Limits { max_model_len: 8192, block_size: 16 };

    fn completion(v: Value) -> Result<Generation, ApiError> {
        parse::<CompletionRequest>(v)?.generation(LIMITS)
    }

    fn chat(v: Value) -> Result<Generation, ApiError> {
        parse::<ChatRequest>(v)?.generation(LIMITS)
    }

    fn words(n: usize, offset: usize) -> String {
        (0..n).map(|i| loadgen::prompt::WORDS[(i + offset) % 48]).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn the_template_adds_the_documented_tokens_per_message() {
        let msgs = [("user", Cow::Borrowed("hello there")), ("assistant", Cow::Borrowed(""))];
        assert_eq!(chat_toks(&msgs).count(), 2 + 2 * CHAT_TOKENS_PER_MESSAGE as usize);
        let g =
            chat(json!({"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3})).expect("valid");
        assert_eq!((g.prompt_tokens, g.max_tokens), (2 + CHAT_TOKENS_PER_MESSAGE, 3));
        let content = json!([{"type": "text", "text": "hello"}, {"type": "text", "text": "there"}]);
        let parts = json!({"messages": [{"role": "user", "content": content}]});
        assert_eq!(chat(parts).expect("parts").prompt_tokens, 3 + CHAT_TOKENS_PER_MESSAGE);
    }

    #[test]
    fn output_length_follows_vllm() {
        let g = |v| completion(v).map(|g| g.max_tokens).map_err(|e| e.to_string());
        assert_eq!(g(json!({"prompt": "hi"})), Ok(DEFAULT_MAX_TOKENS));
        assert_eq!(g(json!({"prompt": "hi", "max_tokens": null})), Ok(8191));
        assert!(g(json!({"prompt": "hi", "max_tokens": 0})).is_err_and(|e| e.contains("at least 1, got 0")));
        assert!(g(json!({"prompt": "hi", "max_tokens": -3})).is_err_and(|e| e.contains("got -3")));
        assert!(g(json!({"prompt": "hi", "max_tokens": 8192})).is_err_and(|e| e.contains("a total of at least 8193")));
        let c = |v| chat(v).map(|g| g.max_tokens).map_err(|e| e.to_string());
        let m = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(c(json!({"messages": m})), Ok(8192 - 6));
        assert_eq!(c(json!({"messages": m, "max_tokens": 9})), Ok(9));
        assert_eq!(c(json!({"messages": m, "max_completion_tokens": 7, "max_tokens": 9})), Ok(7));
        assert_eq!(c(json!({"messages": m, "max_completion_tokens": 0, "max_tokens": 9})), Ok(9));
        assert!(c(json!({"messages": m, "max_tokens": 0})).is_err());
        let long = words(9000, 0);
        assert!(c(json!({"messages": [{"role": "user", "content": long}]}))
            .is_err_and(|e| e.contains("at least 8193 input tokens, which exceeds this limit")));
        let fits = words(8192 - 5, 0);
        assert!(c(json!({"messages": [{"role": "user", "content": fits}]})).is_err_and(|e| e.contains("got 0")));
    }

    #[test]
    fn accepts_what_vllm_accepts() {
        for (stream, want) in [(json!(1), true), (json!("true"), true), (json!(0), false), (json!("false"), false)] {
            let g = completion(json!({"prompt": "x", "stream": stream, "ignore_eos": stream})).expect("lax");
            assert_eq!(g.stream, want, "{stream}");
        }
        let g = completion(json!({"prompt": "x", "stream": null, "temperature": 0.2, "n": 1, "whatever": {"a": []}}))
            .expect("unknown fields are ignored");
        assert!(!g.stream);
        let usage = |opts: Value| {
            completion(json!({"prompt": "x", "stream": "yes", "stream_options": opts})).map(|g| g.include_usage)
        };
        assert!(usage(json!({})).expect("{}"), "vLLM's include_usage defaults to true");
        assert!(!usage(json!({"include_usage": "0"})).expect("lax"));
        assert!(!usage(json!({"include_usage": null})).expect("null"));
        assert!(!usage(Value::Null).expect("no options"));
        // Stream options without streaming, judged on the raw value like vLLM's validator.
        assert!(completion(json!({"prompt": "x", "stream_options": {"include_usage": true}})).is_err());
        assert!(completion(json!({"prompt": "x", "stream": false, "stream_options": {}})).is_ok());
        assert!(completion(json!({"prompt": "x", "ignore_eos": null})).is_err(), "ignore_eos is a plain bool");
    }

    #[test]
    fn rejects_bad_messages() {
        for bad in [
            json!({}),
            json!({"messages": []}),
            json!({"messages": [{"content": "hi"}]}),
            json!({"messages": [{"role": "user"}]}),
            json!({"messages": [{"role": "user", "content": null}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
            json!({"messages": ["hi"]}),
            json!({"messages": "hi"}),
        ] {
            assert!(chat(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn shared_leading_text_gives_shared_leading_blocks() {
        let hashes = |text: String| completion(json!({"prompt": text})).expect("valid").block_hashes;
        let a = hashes(format!("{} {}", words(64, 0), words(40, 7)));
        let b = hashes(format!("{} {}", words(64, 0), words(40, 11)));
        assert_eq!(a.len(), 104 / 16);
        assert_eq!(a[..4], b[..4], "64 shared one-token words: 4 shared blocks");
        assert_ne!(a[4], b[4]);
        let c = hashes(words(104, 5));
        assert_ne!(a[0], c[0]);
        // Chats share the blocks of their shared leading messages.
        let system = json!({"role": "system", "content": words(60, 0)});
        let ca = chat(json!({"messages": [system, {"role": "user", "content": "one"}]})).expect("a").block_hashes;
        let cb = chat(json!({"messages": [system, {"role": "user", "content": "two"}]})).expect("b").block_hashes;
        assert_eq!(ca.len(), 4);
        assert_eq!(ca[..3], cb[..3]);
    }

    #[test]
    fn extensions_override_the_length_and_map_prefix_ids_to_blocks() {
        let g = completion(json!({"prompt": [1, 2, 3], "prompt_tokens": 100})).expect("override");
        assert_eq!(g.prompt_tokens, 100);
        assert!(g.block_hashes.is_empty(), "only 3 tokens are known");
        assert!(completion(json!({"prompt": "x", "prompt_tokens": 0})).is_err());
        let grouped = |ids: Vec<u64>| {
            completion(json!({"prompt": ids, "prefix_id": 7, "prefix_tokens": 40})).expect("grouped").block_hashes
        };
        let a = grouped((0..64).collect());
        let b = grouped((1000..1064).collect());
        assert_eq!(a.len(), 4);
        assert_eq!(a[..2], b[..2], "the group's two full blocks, whatever ids stand in for them");
        assert_ne!(a[2], b[2]);
        assert_eq!(a[..2], BlockHasher::with_prefix_group(16, 7, 40).finish()[..]);
    }
}
