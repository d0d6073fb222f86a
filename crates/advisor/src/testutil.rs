//! vLLM windows for the advisor's unit tests.

use vllm_metrics::{Latency, Window};

pub fn lat(count: f64, mean: f64) -> Latency {
    Latency { count, mean: Some(mean), p50: None, p90: None, p99: None }
}

/// What a vLLM that answers but exports nothing useful gives (e.g. a restart in progress).
pub fn empty() -> Window {
    Window { seconds: 1.0, ..Window::default() }
}

/// One second of a server that finished `rate` requests of `prompt` / `output` tokens with
/// mean ITL `itl_s` and TTFT `ttft_s`, `running` in the batch (each holding 0.1% of the KV
/// cache), none waiting.
pub fn served(rate: f64, prompt: f64, output: f64, itl_s: f64, ttft_s: f64, running: f64) -> Window {
    Window {
        num_requests_running: Some(running),
        num_requests_waiting: Some(0.0),
        kv_cache_usage: Some(0.001 * running),
        request_rate: Some(rate),
        prompt_tokens_rate: Some(rate * prompt),
        generation_tokens_rate: Some(rate * output),
        preemptions: Some(0.0),
        mean_prompt_tokens: Some(prompt),
        mean_generation_tokens: Some(output),
        ttft: Some(lat(rate, ttft_s)),
        itl: Some(lat(rate * output, itl_s)),
        ..empty()
    }
}

/// A server whose step time follows the online model exactly: `alpha + beta B + delta P`.
pub fn modelled(rate: f64, prompt: f64, output: f64, alpha: f64, beta: f64, delta: f64) -> Window {
    let s = alpha / (1.0 - rate * (beta * output + delta * prompt));
    let ttft = 0.01 + 1.5 * s + 0.00002 * prompt;
    served(rate, prompt, output, s, ttft, rate * (output * s + ttft))
}
