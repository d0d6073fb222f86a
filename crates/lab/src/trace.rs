//! Workload traces for the bench: the load generator's CSV format
//! (`seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens`), one piecewise-constant
//! segment per row, played in order. Parsing (with line and column in every error) is shared
//! with the load generator so the bench and a live run read a trace identically.

use std::path::Path;

use loadgen::schedule::{Schedule, ScheduleError};

/// A trace that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace {path}")]
    Read { path: String, source: std::io::Error },
    #[error("trace {path}")]
    Parse { path: String, source: ScheduleError },
}

/// A named workload trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub name: String,
    pub schedule: Schedule,
}

impl Trace {
    pub fn from_csv(name: &str, text: &str) -> Result<Self, TraceError> {
        let schedule =
            Schedule::from_csv(text).map_err(|source| TraceError::Parse { path: name.to_string(), source })?;
        Ok(Self { name: name.to_string(), schedule })
    }

    pub fn load(path: &Path) -> Result<Self, TraceError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TraceError::Read { path: shown.clone(), source })?;
        let name = path.file_stem().map_or(shown.clone(), |s| s.to_string_lossy().into_owned());
        let schedule = Schedule::from_csv(&text).map_err(|source| TraceError::Parse { path: shown, source })?;
        Ok(Self { name, schedule })
    }

    /// Seconds the trace spans.
    pub fn duration_s(&self) -> f64 {
        self.schedule.duration_s()
    }

    /// Start and end (seconds) of each segment.
    pub fn segment_bounds(&self) -> Vec<(f64, f64)> {
        let mut t = 0.0;
        self.schedule
            .segments
            .iter()
            .map(|s| {
                let b = (t, t + s.duration_s);
                t += s.duration_s;
                b
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_traces_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/traces");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("config/traces exists") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "csv") {
                let t = Trace::load(&p).unwrap_or_else(|e| panic!("{e}"));
                assert!(t.duration_s() >= 60.0 && t.duration_s() <= 1500.0, "{}: {}", t.name, t.duration_s());
                n += 1;
            }
        }
        assert!(n >= 4, "decode-heavy, prefill-heavy, bursty and diurnal traces");
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let e = Trace::from_csv("t", "seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens\n10,2,abc,5\n")
            .expect_err("bad number");
        let cause = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default();
        let msg = format!("{e}: {cause}");
        assert!(msg.contains("line 2") && msg.contains("mean_prompt_tokens"), "{msg}");
        let t = Trace::from_csv(
            "t",
            "seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens\n10,2,100,5\n5,0,100,5\n",
        )
        .expect("valid");
        assert_eq!(t.segment_bounds(), vec![(0.0, 10.0), (10.0, 15.0)]);
    }

    #[test]
    fn missing_file_is_an_error_not_a_panic() {
        assert!(matches!(Trace::load(Path::new("/nonexistent/x.csv")), Err(TraceError::Read { .. })));
    }
}
