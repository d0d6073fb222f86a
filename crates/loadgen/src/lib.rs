//! Load generation: schedules of arrivals and an HTTP driver that reports like `vllm bench serve`.

pub mod http;
pub mod prompt;
pub mod report;
pub mod schedule;

pub use http::{run_http, served_model, LoadError, LoadOptions};
pub use objectives::LatencyLimits;
pub use report::{LoadReport, RequestOutcome, RequestRate};
pub use schedule::{Arrival, Arrivals, LengthDist, Pace, Schedule, ScheduleError, Segment};
