//! vLLM's Prometheus metrics: parsing the text format ([`parse`]), reducing one response to a
//! [`Snapshot`] (V1 names with V0 fallbacks, summed across engines), turning two snapshots into
//! a [`Window`] of rates and latency quantiles, and fetching `/metrics` ([`Scraper`]).
//!
//! ```text
//! let scraper = Scraper::new();
//! let a = scraper.scrape("http://127.0.0.1:8000/metrics", timeout).await?;
//! // ... one period later ...
//! let b = scraper.scrape(url, timeout).await?;
//! let w = Window::between(&a, &b, elapsed_seconds);
//! ```

mod inspect;
mod parse;
mod scrape;
mod snapshot;
mod window;

pub use inspect::inspect_text;
pub use parse::{parse, Exposition, MetricType, ParseError, Sample};
pub use scrape::{scrape, ScrapeError, Scraper, MAX_BODY_BYTES};
pub use snapshot::{names, CacheConfig, Histogram, Snapshot, Version};
pub use window::{Latency, Window};

/// The fixtures in crates/vllm-metrics/fixtures, shared by the tests of the submodules.
#[cfg(test)]
pub(crate) mod testdata {
    pub const V0: &str = include_str!("../fixtures/v0-opt125m.txt");
    pub const V1: &str = include_str!("../fixtures/v1-docs-excerpt.txt");
    /// vLLM 0.32.0's CPU build serving the tiny model, idle, then after exactly 40 requests of
    /// 256 prompt and 32 output tokens sharing a 128-token prefix (`gpu-agent loadgen`).
    pub const V1_CPU_IDLE: &str = include_str!("../fixtures/v1-0.32-cpu-idle.txt");
    pub const V1_CPU_AFTER_40: &str = include_str!("../fixtures/v1-0.32-cpu-after-40.txt");

    /// The docs excerpt without its `...` gap markers, which are not exposition text.
    pub fn v1_without_gaps() -> String {
        V1.lines().filter(|l| *l != "...").map(|l| format!("{l}\n")).collect()
    }
}
