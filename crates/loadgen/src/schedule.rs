//! Load schedules: piecewise-constant segments with Poisson arrivals and random lengths, or an
//! exact number of requests with gamma-distributed gaps (as `vllm bench serve --num-prompts
//! --request-rate --burstiness`).
//!
//! A seeded RNG makes every run of the same schedule send the same requests at the same offsets,
//! so a tuner comparing two server configurations compares like with like.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Gamma, LogNormal};
use serde::Serialize;

/// Spread of lognormal lengths read from a CSV trace (only means are given there).
pub const TRACE_LOGNORMAL_SIGMA: f64 = 0.5;

/// The header a CSV trace must start with.
pub const TRACE_HEADER: [&str; 4] = ["seconds", "requests_per_second", "mean_prompt_tokens", "mean_output_tokens"];

/// A schedule or trace that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ScheduleError {
    #[error("trace line 1: missing header `{}`", TRACE_HEADER.join(","))]
    MissingHeader,
    #[error("trace line {line}: expected {expected} columns, found {found}")]
    Columns { line: usize, expected: usize, found: usize },
    #[error("trace line {line}, column `{column}`: {message}")]
    Value { line: usize, column: &'static str, message: String },
    #[error("trace has a header but no segments")]
    Empty,
    #[error("invalid length distribution: {0}")]
    Length(String),
}

/// How many tokens a prompt or an output has.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthDist {
    Fixed(u32),
    /// Uniform over `lo..=hi`.
    Uniform {
        lo: u32,
        hi: u32,
    },
    /// Lognormal with the given mean (not median) and log-space sigma; samples are rounded and
    /// clamped to at least 1.
    LogNormal {
        mean: f64,
        sigma: f64,
    },
}

impl LengthDist {
    /// Checks the parameters so that sampling never fails later.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        match *self {
            LengthDist::Fixed(0) => Err(ScheduleError::Length("fixed length must be at least 1".into())),
            LengthDist::Uniform { lo, hi } if lo == 0 || lo > hi => {
                Err(ScheduleError::Length(format!("uniform range {lo}..={hi} must satisfy 1 <= lo <= hi")))
            }
            LengthDist::LogNormal { mean, .. } if !(mean.is_finite() && mean > 0.0) => {
                Err(ScheduleError::Length(format!("lognormal mean {mean} must be a positive number")))
            }
            LengthDist::LogNormal { sigma, .. } if !(sigma.is_finite() && sigma >= 0.0) => {
                Err(ScheduleError::Length(format!("lognormal sigma {sigma} must be >= 0")))
            }
            _ => Ok(()),
        }
    }

    /// Expected value, for planning and reports.
    pub fn mean(&self) -> f64 {
        match *self {
            LengthDist::Fixed(n) => f64::from(n),
            LengthDist::Uniform { lo, hi } => (f64::from(lo) + f64::from(hi)) / 2.0,
            LengthDist::LogNormal { mean, .. } => mean.max(1.0),
        }
    }

    /// One length, at least 1.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        match *self {
            LengthDist::Fixed(n) => n.max(1),
            LengthDist::Uniform { lo, hi } => {
                let (lo, hi) = (lo.max(1), hi.max(lo.max(1)));
                rng.random_range(lo..=hi)
            }
            LengthDist::LogNormal { mean, sigma } => {
                // E[X] = exp(mu + sigma^2/2), so mu = ln(mean) - sigma^2/2 keeps the asked mean.
                let mu = mean.max(1e-9).ln() - sigma * sigma / 2.0;
                let x = match LogNormal::new(mu, sigma.max(0.0)) {
                    Ok(d) => d.sample(rng),
                    Err(_) => mean,
                };
                // Clamp before the cast: an extreme tail draw must not wrap.
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                let n = x.round().clamp(1.0, f64::from(u32::MAX)) as u32;
                n
            }
        }
    }
}

/// How requests arrive within a segment.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Pace {
    /// Poisson arrivals (exponential gaps) at this mean rate; 0 sends nothing.
    Poisson { requests_per_second: f64 },
    /// All `requests` arrive at the segment's start ("infinite rate", as `--request-rate inf`).
    AllAtOnce { requests: u32 },
    /// Exactly `requests` arrivals at a mean rate, gaps gamma-distributed with shape
    /// `burstiness` (1: Poisson; below 1 burstier; infinite: evenly spaced). The first one
    /// arrives at the segment's start, and the segment lasts until the last one.
    Counted { requests: u32, requests_per_second: f64, burstiness: f64 },
}

/// One piece of a schedule: a pace and length distributions held for `duration_s`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    pub duration_s: f64,
    pub pace: Pace,
    pub prompt: LengthDist,
    pub output: LengthDist,
}

impl Segment {
    pub fn poisson(duration_s: f64, requests_per_second: f64, prompt: LengthDist, output: LengthDist) -> Self {
        Segment { duration_s, pace: Pace::Poisson { requests_per_second }, prompt, output }
    }

    /// A burst of `requests` at once; the segment lasts `duration_s` before the next one starts.
    pub fn burst(requests: u32, duration_s: f64, prompt: LengthDist, output: LengthDist) -> Self {
        Segment { duration_s, pace: Pace::AllAtOnce { requests }, prompt, output }
    }

    /// Expected number of requests in this segment.
    pub fn expected_requests(&self) -> f64 {
        match self.pace {
            Pace::Poisson { requests_per_second } => requests_per_second * self.duration_s,
            Pace::AllAtOnce { requests } | Pace::Counted { requests, .. } => f64::from(requests),
        }
    }
}

/// One request to send: when (seconds from the run's start) and how long.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Arrival {
    pub at_s: f64,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
}

/// A sequence of segments played once (see [`Schedule::arrivals`]) or in a loop.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Schedule {
    pub segments: Vec<Segment>,
}

impl Schedule {
    /// Validates every segment.
    pub fn new(segments: Vec<Segment>) -> Result<Schedule, ScheduleError> {
        for (i, s) in segments.iter().enumerate() {
            let bad = |m: String| ScheduleError::Length(format!("segment {i}: {m}"));
            if !(s.duration_s.is_finite() && s.duration_s >= 0.0) {
                return Err(bad(format!("duration {} must be a finite number >= 0", s.duration_s)));
            }
            match s.pace {
                Pace::Poisson { requests_per_second: r } if !(r.is_finite() && r >= 0.0) => {
                    return Err(bad(format!("rate {r} must be a finite number >= 0")));
                }
                Pace::Counted { requests_per_second: r, .. } if !(r.is_finite() && r > 0.0) => {
                    return Err(bad(format!("rate {r} must be a finite number > 0")));
                }
                Pace::Counted { burstiness: b, .. } if b.is_nan() || b <= 0.0 => {
                    return Err(bad(format!("burstiness {b} must be > 0")));
                }
                _ => {}
            }
            s.prompt.validate().map_err(|e| bad(e.to_string()))?;
            s.output.validate().map_err(|e| bad(e.to_string()))?;
        }
        Ok(Schedule { segments })
    }

    /// `requests` requests all at t=0 (the tuner's `--request-rate inf` run).
    pub fn infinite_rate(requests: u32, prompt: LengthDist, output: LengthDist) -> Schedule {
        Schedule { segments: vec![Segment::burst(requests, 0.0, prompt, output)] }
    }

    /// Exactly `requests` requests at `requests_per_second` with gamma gaps of shape
    /// `burstiness` (`vllm bench serve --num-prompts --request-rate --burstiness`).
    pub fn counted(
        requests: u32,
        requests_per_second: f64,
        burstiness: f64,
        prompt: LengthDist,
        output: LengthDist,
    ) -> Result<Schedule, ScheduleError> {
        let duration_s = f64::from(requests) / requests_per_second;
        let pace = Pace::Counted { requests, requests_per_second, burstiness };
        Schedule::new(vec![Segment { duration_s, pace, prompt, output }])
    }

    /// A constant Poisson rate for `duration_s`.
    pub fn constant(duration_s: f64, requests_per_second: f64, prompt: LengthDist, output: LengthDist) -> Schedule {
        Schedule { segments: vec![Segment::poisson(duration_s, requests_per_second, prompt, output)] }
    }

    /// Parses the CSV trace format `seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens`.
    /// Each row is one segment lasting `seconds`; lengths are lognormal around the given means
    /// (sigma [`TRACE_LOGNORMAL_SIGMA`]). Blank lines and lines starting with `#` are skipped.
    pub fn from_csv(text: &str) -> Result<Schedule, ScheduleError> {
        let mut lines = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.trim()))
            .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'));
        let (hline, header) = lines.next().ok_or(ScheduleError::MissingHeader)?;
        let cols: Vec<&str> = header.split(',').map(str::trim).collect();
        if cols != TRACE_HEADER {
            if cols.len() == TRACE_HEADER.len() && cols.iter().any(|c| c.parse::<f64>().is_err()) {
                let (col, found) = TRACE_HEADER
                    .iter()
                    .zip(&cols)
                    .find(|(want, got)| want != got)
                    .map(|(w, g)| (*w, *g))
                    .unwrap_or(("", ""));
                return Err(ScheduleError::Value {
                    line: hline,
                    column: col,
                    message: format!("header names `{found}`, expected `{col}`"),
                });
            }
            return Err(ScheduleError::MissingHeader);
        }
        let mut segments = Vec::new();
        for (line, row) in lines {
            let cells: Vec<&str> = row.split(',').map(str::trim).collect();
            if cells.len() != TRACE_HEADER.len() {
                return Err(ScheduleError::Columns { line, expected: TRACE_HEADER.len(), found: cells.len() });
            }
            let num = |idx: usize, min_exclusive: bool| -> Result<f64, ScheduleError> {
                let column = TRACE_HEADER[idx];
                let v: f64 = cells[idx].parse().map_err(|_| ScheduleError::Value {
                    line,
                    column,
                    message: format!("`{}` is not a number", cells[idx]),
                })?;
                let ok = v.is_finite() && if min_exclusive { v > 0.0 } else { v >= 0.0 };
                if !ok {
                    let want = if min_exclusive { "> 0" } else { ">= 0" };
                    return Err(ScheduleError::Value { line, column, message: format!("{v} must be {want}") });
                }
                Ok(v)
            };
            let seconds = num(0, false)?;
            let rate = num(1, false)?;
            let prompt = num(2, true)?;
            let output = num(3, true)?;
            segments.push(Segment::poisson(
                seconds,
                rate,
                LengthDist::LogNormal { mean: prompt, sigma: TRACE_LOGNORMAL_SIGMA },
                LengthDist::LogNormal { mean: output, sigma: TRACE_LOGNORMAL_SIGMA },
            ));
        }
        if segments.is_empty() {
            return Err(ScheduleError::Empty);
        }
        Ok(Schedule { segments })
    }

    /// A ~2.5 minute schedule that exercises a governor: quiet, ramp, burst, decode-heavy,
    /// prefill-heavy and idle phases. Meant to be looped ([`Schedule::arrivals_looped`]).
    pub fn demo() -> Schedule {
        let ln = |mean: f64| LengthDist::LogNormal { mean, sigma: 0.4 };
        Schedule {
            segments: vec![
                // low: a mostly idle GPU
                Segment::poisson(25.0, 0.5, ln(256.0), ln(128.0)),
                // ramp
                Segment::poisson(10.0, 1.0, ln(512.0), ln(192.0)),
                Segment::poisson(10.0, 2.0, ln(512.0), ln(192.0)),
                Segment::poisson(10.0, 4.0, ln(512.0), ln(192.0)),
                Segment::poisson(10.0, 6.0, ln(512.0), ln(192.0)),
                // burst: a batch job dumps requests at once, then trickles
                Segment::burst(48, 15.0, ln(1024.0), ln(256.0)),
                // decode-heavy: short prompts, long answers (memory-bound)
                Segment::poisson(30.0, 2.0, ln(128.0), ln(768.0)),
                // prefill-heavy: long prompts, short answers (compute-bound)
                Segment::poisson(25.0, 3.0, ln(3000.0), ln(24.0)),
                // idle
                Segment::poisson(10.0, 0.0, ln(256.0), ln(128.0)),
            ],
        }
    }

    /// Seconds the schedule spans.
    pub fn duration_s(&self) -> f64 {
        self.segments.iter().map(|s| s.duration_s).sum()
    }

    /// Expected number of requests in one pass.
    pub fn expected_requests(&self) -> f64 {
        self.segments.iter().map(Segment::expected_requests).sum()
    }

    /// True when some segment sends everything at once (reported as `request_rate: "inf"`).
    pub fn is_infinite_rate(&self) -> bool {
        self.segments.iter().any(|s| matches!(s.pace, Pace::AllAtOnce { .. }))
    }

    /// One pass of arrivals in time order; the same seed gives the same arrivals.
    pub fn arrivals(&self, seed: u64) -> Arrivals {
        Arrivals::new(self.segments.clone(), seed, false)
    }

    /// Arrivals repeating the schedule forever (empty when the schedule can send nothing).
    pub fn arrivals_looped(&self, seed: u64) -> Arrivals {
        let sends = self.expected_requests() > 0.0;
        let loops = sends && self.duration_s() > 0.0;
        Arrivals::new(if sends { self.segments.clone() } else { Vec::new() }, seed, loops)
    }
}

/// Iterator over a schedule's arrivals. Owns its copy of the segments.
#[derive(Debug)]
pub struct Arrivals {
    segments: Vec<Segment>,
    rng: StdRng,
    looped: bool,
    idx: usize,
    seg_start: f64,
    /// Time of the last arrival within the current segment (Poisson clock).
    t: f64,
    burst_left: Option<u32>,
}

impl Arrivals {
    fn new(segments: Vec<Segment>, seed: u64, looped: bool) -> Self {
        Arrivals {
            segments,
            rng: StdRng::seed_from_u64(seed),
            looped,
            idx: 0,
            seg_start: 0.0,
            t: 0.0,
            burst_left: None,
        }
    }

    fn next_segment(&mut self) {
        if let Some(s) = self.segments.get(self.idx) {
            self.seg_start += s.duration_s;
        }
        self.idx += 1;
        if self.looped && self.idx >= self.segments.len() {
            self.idx = 0;
        }
        self.t = self.seg_start;
        self.burst_left = None;
    }
}

impl Iterator for Arrivals {
    type Item = Arrival;

    fn next(&mut self) -> Option<Arrival> {
        loop {
            let seg = self.segments.get(self.idx)?.clone();
            match seg.pace {
                Pace::AllAtOnce { requests } => {
                    let left = *self.burst_left.get_or_insert(requests);
                    if left == 0 {
                        self.next_segment();
                        continue;
                    }
                    self.burst_left = Some(left - 1);
                    return Some(self.make(self.seg_start, &seg));
                }
                Pace::Poisson { requests_per_second } => {
                    let end = self.seg_start + seg.duration_s;
                    let gap = match Exp::new(requests_per_second) {
                        Ok(d) if requests_per_second > 0.0 => d.sample(&mut self.rng),
                        _ => f64::INFINITY,
                    };
                    // Exponential gaps are memoryless, so restarting the clock at the segment
                    // boundary keeps each segment a proper Poisson process.
                    if self.t + gap >= end {
                        self.next_segment();
                        continue;
                    }
                    self.t += gap;
                    return Some(self.make(self.t, &seg));
                }
                Pace::Counted { requests, requests_per_second, burstiness } => {
                    let left = *self.burst_left.get_or_insert(requests);
                    if left == 0 {
                        // The segment ends with its last arrival, not at its nominal length.
                        self.segments[self.idx].duration_s = (self.t - self.seg_start).max(0.0);
                        self.next_segment();
                        continue;
                    }
                    if left < requests {
                        self.t += gamma_gap(requests_per_second, burstiness, &mut self.rng);
                    }
                    self.burst_left = Some(left - 1);
                    return Some(self.make(self.t, &seg));
                }
            }
        }
    }
}

/// A gap with mean `1 / rate` and shape `burstiness` (coefficient of variation
/// `1 / sqrt(burstiness)`); infinite burstiness is a constant gap.
fn gamma_gap<R: Rng + ?Sized>(rate: f64, burstiness: f64, rng: &mut R) -> f64 {
    if burstiness.is_infinite() {
        return 1.0 / rate;
    }
    match Gamma::new(burstiness, 1.0 / (rate * burstiness)) {
        Ok(d) => d.sample(rng),
        Err(_) => 1.0 / rate,
    }
}

impl Arrivals {
    fn make(&mut self, at_s: f64, seg: &Segment) -> Arrival {
        let prompt_tokens = seg.prompt.sample(&mut self.rng);
        let max_tokens = seg.output.sample(&mut self.rng);
        Arrival { at_s, prompt_tokens, max_tokens }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens\n\
                        # warm up\n\
                        10,2,512,128\n\
                        \n\
                        5, 0, 100, 10\n";

    #[test]
    fn parses_good_trace() {
        let s = Schedule::from_csv(GOOD).expect("good trace");
        assert_eq!(s.segments.len(), 2);
        assert_eq!(s.segments[0].duration_s, 10.0);
        assert_eq!(s.segments[0].pace, Pace::Poisson { requests_per_second: 2.0 });
        assert_eq!(s.segments[0].prompt, LengthDist::LogNormal { mean: 512.0, sigma: TRACE_LOGNORMAL_SIGMA });
        assert_eq!(s.segments[1].pace, Pace::Poisson { requests_per_second: 0.0 });
        assert_eq!(s.duration_s(), 15.0);
        assert_eq!(s.expected_requests(), 20.0);
    }

    #[test]
    fn bad_traces_name_line_and_column() {
        assert_eq!(Schedule::from_csv(""), Err(ScheduleError::MissingHeader));
        assert_eq!(Schedule::from_csv("10,2,512,128\n"), Err(ScheduleError::MissingHeader));
        let e = Schedule::from_csv("seconds,rps,mean_prompt_tokens,mean_output_tokens\n").expect_err("must fail");
        assert!(e.to_string().contains("requests_per_second"), "{e}");
        let hdr = "seconds,requests_per_second,mean_prompt_tokens,mean_output_tokens\n";
        assert_eq!(Schedule::from_csv(hdr), Err(ScheduleError::Empty));
        let e = Schedule::from_csv(&format!("{hdr}10,2,512\n")).expect_err("must fail");
        assert_eq!(e, ScheduleError::Columns { line: 2, expected: 4, found: 3 });
        let e = Schedule::from_csv(&format!("{hdr}10,2,512,128\n10,x,512,128\n")).expect_err("must fail");
        assert_eq!(e.to_string(), "trace line 3, column `requests_per_second`: `x` is not a number");
        let e = Schedule::from_csv(&format!("{hdr}10,2,0,128\n")).expect_err("must fail");
        assert!(matches!(e, ScheduleError::Value { line: 2, column: "mean_prompt_tokens", .. }), "{e}");
        let e = Schedule::from_csv(&format!("{hdr}-1,2,5,128\n")).expect_err("must fail");
        assert!(matches!(e, ScheduleError::Value { line: 2, column: "seconds", .. }), "{e}");
        let e = Schedule::from_csv(&format!("{hdr}1,inf,5,128\n")).expect_err("must fail");
        assert!(matches!(e, ScheduleError::Value { line: 2, column: "requests_per_second", .. }), "{e}");
    }

    #[test]
    fn poisson_rate_and_lengths_match_on_average() {
        let prompt = LengthDist::LogNormal { mean: 400.0, sigma: 0.5 };
        let s = Schedule::constant(2000.0, 5.0, prompt, LengthDist::Uniform { lo: 10, hi: 30 });
        let a: Vec<Arrival> = s.arrivals(7).collect();
        let rate = a.len() as f64 / 2000.0;
        assert!((rate - 5.0).abs() < 0.25, "rate {rate}");
        assert!(a.windows(2).all(|w| w[0].at_s <= w[1].at_s));
        assert!(a.iter().all(|x| x.at_s < 2000.0 && (10..=30).contains(&x.max_tokens)));
        let mean_p = a.iter().map(|x| f64::from(x.prompt_tokens)).sum::<f64>() / a.len() as f64;
        assert!((mean_p - 400.0).abs() < 20.0, "mean prompt {mean_p}");
        // Coefficient of variation of exponential gaps is 1.
        let gaps: Vec<f64> = a.windows(2).map(|w| w[1].at_s - w[0].at_s).collect();
        let m = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let sd = (gaps.iter().map(|g| (g - m).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
        assert!((sd / m - 1.0).abs() < 0.1, "cv {}", sd / m);
        // Reproducible with the same seed, different with another.
        assert_eq!(a, s.arrivals(7).collect::<Vec<_>>());
        assert_ne!(a, s.arrivals(8).collect::<Vec<_>>());
    }

    #[test]
    fn segments_change_rate_and_bursts_arrive_together() {
        let f = LengthDist::Fixed(8);
        let s = Schedule::new(vec![
            Segment::poisson(100.0, 1.0, f, f),
            Segment::burst(30, 10.0, f, f),
            Segment::poisson(100.0, 10.0, f, f),
        ])
        .expect("valid");
        let a: Vec<Arrival> = s.arrivals(1).collect();
        let first = a.iter().filter(|x| x.at_s < 100.0).count();
        let burst = a.iter().filter(|x| x.at_s == 100.0).count();
        let last = a.iter().filter(|x| x.at_s >= 110.0).count();
        assert!((70..=130).contains(&first), "first {first}");
        assert_eq!(burst, 30);
        assert!((850..=1150).contains(&last), "last {last}");
        assert!(s.is_infinite_rate());
        let inf: Vec<Arrival> = Schedule::infinite_rate(5, f, f).arrivals(0).collect();
        assert_eq!(inf.len(), 5);
        assert!(inf.iter().all(|x| x.at_s == 0.0 && x.prompt_tokens == 8));
    }

    #[test]
    fn counted_sends_exactly_n_at_the_rate_with_the_asked_burstiness() {
        let f = LengthDist::Fixed(8);
        for (burstiness, cv) in [(1.0, 1.0), (0.25, 2.0), (4.0, 0.5), (f64::INFINITY, 0.0)] {
            let s = Schedule::counted(4000, 5.0, burstiness, f, f).expect("valid");
            let a: Vec<Arrival> = s.arrivals(9).collect();
            assert_eq!(a.len(), 4000);
            assert_eq!(a[0].at_s, 0.0);
            let gaps: Vec<f64> = a.windows(2).map(|w| w[1].at_s - w[0].at_s).collect();
            let m = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let sd = (gaps.iter().map(|g| (g - m).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
            assert!((1.0 / m - 5.0).abs() < 0.35, "burstiness {burstiness}: rate {}", 1.0 / m);
            assert!((sd / m - cv).abs() < 0.12, "burstiness {burstiness}: cv {}", sd / m);
        }
        // A segment after a counted one starts once its last request has arrived.
        let mut s = Schedule::counted(3, 1.0, 1.0, f, f).expect("valid");
        s.segments.push(Segment::burst(2, 0.0, f, f));
        let a: Vec<Arrival> = s.arrivals(1).collect();
        assert_eq!(a.len(), 5);
        assert!(a.windows(2).all(|w| w[0].at_s <= w[1].at_s), "{a:?}");
        assert!(Schedule::counted(3, 0.0, 1.0, f, f).is_err());
        assert!(Schedule::counted(3, 1.0, 0.0, f, f).is_err());
    }

    #[test]
    fn demo_loops_and_varies() {
        let d = Schedule::demo();
        let span = d.duration_s();
        assert!((120.0..=180.0).contains(&span), "demo lasts {span} s");
        let a: Vec<Arrival> = d.arrivals_looped(3).take_while(|x| x.at_s < 2.0 * span).collect();
        assert!(a.iter().any(|x| x.at_s > span), "second loop present");
        let once = d.arrivals(3).count();
        assert!(once > 100, "{once} requests per pass");
        let empty = Schedule::constant(10.0, 0.0, LengthDist::Fixed(1), LengthDist::Fixed(1));
        assert_eq!(empty.arrivals_looped(0).next(), None);
    }

    #[test]
    fn invalid_lengths_rejected() {
        let f = LengthDist::Fixed(1);
        assert!(Schedule::new(vec![Segment::poisson(1.0, 1.0, LengthDist::Fixed(0), f)]).is_err());
        let u = LengthDist::Uniform { lo: 5, hi: 2 };
        assert!(Schedule::new(vec![Segment::poisson(1.0, 1.0, f, u)]).is_err());
        assert!(Schedule::new(vec![Segment::poisson(1.0, -1.0, f, f)]).is_err());
        let l = LengthDist::LogNormal { mean: 0.4, sigma: 2.0 };
        let mut rng = StdRng::seed_from_u64(0);
        assert!((0..1000).all(|_| l.sample(&mut rng) >= 1));
    }
}
