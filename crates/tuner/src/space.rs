//! The search space file (`config/search-space.toml`): the vLLM flags to tune and their values,
//! the load each trial is measured with, and the latency limits a rate must keep.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use loadgen::LatencyLimits;

/// A space file that cannot be used. The message names the field.
#[derive(Debug, thiserror::Error)]
pub enum SpaceError {
    #[error("cannot read search space {path}")]
    Read { path: String, source: std::io::Error },
    #[error("search space {path}: {message}")]
    Invalid { path: String, message: String },
}

/// How a study picks the next flags to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Every combination, in order.
    Grid,
    /// Uniform draws without repeats.
    Random,
    /// Tree-structured Parzen estimator (model-based).
    Tpe,
}

impl std::str::FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "grid" => Ok(Strategy::Grid),
            "random" => Ok(Strategy::Random),
            "tpe" => Ok(Strategy::Tpe),
            o => Err(format!("unknown strategy `{o}`: expected grid, random or tpe")),
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::Grid => "grid",
            Strategy::Random => "random",
            Strategy::Tpe => "tpe",
        })
    }
}

/// A flag value as written in the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Range {
    pub start: f64,
    pub end: f64,
    pub step: f64,
}

/// One tunable flag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Parameter {
    /// vLLM flag name without dashes, e.g. `max-num-seqs`.
    pub flag: String,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub options: Option<Vec<Value>>,
    #[serde(default)]
    pub range: Option<Range>,
    /// The value of the baseline trial (vLLM's default); none: the flag is left out.
    #[serde(default)]
    pub default: Option<Value>,
}

fn yes() -> bool {
    true
}

impl Parameter {
    /// The values this parameter takes, as command-line strings, in the file's order.
    pub fn values(&self) -> Vec<String> {
        if let Some(opts) = &self.options {
            return opts.iter().map(flag_value).collect();
        }
        let Some(r) = &self.range else { return Vec::new() };
        // At most 10 000 (`validate`); below 0 (end before start) saturates to 0, the start
        // alone, as `max(0)` did.
        let n = crate::saturating_u32(((r.end - r.start) / r.step + 1e-9).floor());
        let integral = [r.start, r.end, r.step].iter().all(|x| x.fract() == 0.0);
        (0..=n)
            .map(|i| {
                let v = r.start + r.step * f64::from(i);
                if integral {
                    // A whole number printed without ".0"; `as` saturates past i64's range.
                    #[allow(clippy::cast_possible_truncation)]
                    let whole = v as i64;
                    format!("{whole}")
                } else {
                    // Round away float noise: 0.1 + 2 x 0.1 is printed 0.3.
                    format!("{}", (v * 1e6).round() / 1e6)
                }
            })
            .collect()
    }

    /// Whether the values are numbers (ordered): TPE then treats neighbours as similar.
    pub fn ordinal(&self) -> bool {
        self.range.is_some()
            || self.options.as_ref().is_some_and(|o| o.iter().all(|v| matches!(v, Value::Int(_) | Value::Float(_))))
    }
}

fn flag_value(v: &Value) -> String {
    v.to_string()
}

/// A load to measure: a length bucket, or the dataset (labelled with its mean lengths).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Workload {
    pub bucket: Bucket,
    pub dataset: bool,
}

/// Rows of `input_tokens,output_tokens`: CSV with that header, or JSON lines with those keys
/// (`prompt_tokens` / `completion_tokens` also accepted). Blank and `#` lines are skipped.
pub fn parse_dataset(text: &str) -> Result<Vec<(u32, u32)>, String> {
    let mut rows = Vec::new();
    let mut header_seen = false;
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let n = i + 1;
        let pos = |v: Option<u64>, what: &str| {
            v.and_then(|x| u32::try_from(x).ok())
                .filter(|x| *x > 0)
                .ok_or_else(|| format!("line {n}: `{what}` must be a positive integer"))
        };
        if l.starts_with('{') {
            let v: serde_json::Value = serde_json::from_str(l).map_err(|e| format!("line {n}: {e}"))?;
            let get = |a: &str, b: &str| v.get(a).or_else(|| v.get(b)).and_then(serde_json::Value::as_u64);
            rows.push((
                pos(get("input_tokens", "prompt_tokens"), "input_tokens")?,
                pos(get("output_tokens", "completion_tokens"), "output_tokens")?,
            ));
        } else if !header_seen && rows.is_empty() {
            let cols: Vec<&str> = l.split(',').map(str::trim).collect();
            if cols != ["input_tokens", "output_tokens"] {
                return Err(format!("line {n}: expected the header `input_tokens,output_tokens`"));
            }
            header_seen = true;
        } else {
            let cols: Vec<&str> = l.split(',').map(str::trim).collect();
            if cols.len() != 2 {
                return Err(format!("line {n}: expected 2 columns, found {}", cols.len()));
            }
            rows.push((pos(cols[0].parse().ok(), "input_tokens")?, pos(cols[1].parse().ok(), "output_tokens")?));
        }
    }
    if rows.is_empty() {
        return Err("no rows".into());
    }
    Ok(rows)
}

/// One input/output length pair measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub input_tokens: u32,
    pub output_tokens: u32,
}

/// The load of every run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// Length pairs; the search runs on the first, the capacity profile measures them all.
    #[serde(default)]
    pub buckets: Vec<Bucket>,
    /// A dataset of requests' lengths (CSV `input_tokens,output_tokens`, or JSON lines with
    /// those keys), relative to the space file. When set, the search replays it (each run
    /// draws `requests` of its rows, seeded) and `buckets` only add capacity-profile points.
    #[serde(default)]
    pub dataset: Option<std::path::PathBuf>,
    /// The dataset's rows, read by [`SearchSpace::load`].
    #[serde(skip)]
    pub dataset_rows: Vec<(u32, u32)>,
    /// Share of each prompt that is a common prefix (prefix-cache hits), 0..1.
    #[serde(default)]
    pub prefix_share: f64,
    /// Requests per load run.
    #[serde(default = "default_requests")]
    pub requests: u32,
    /// Lengths vary uniformly by +- this share around the bucket's (0: fixed lengths).
    #[serde(default)]
    pub length_spread: f64,
    /// Seed of arrivals and prompts: every trial sees the same requests.
    #[serde(default = "one")]
    pub seed: u64,
}

fn default_requests() -> u32 {
    200
}
fn one() -> u64 {
    1
}

/// `[limits]` as the search space writes them: the latency limits a rate must keep at P99 over
/// the run (milliseconds), and a prefix-cache hit rate it must reach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub p99_e2el_ms: Option<f64>,
    pub p99_ttft_ms: Option<f64>,
    pub p99_tpot_ms: Option<f64>,
    /// Minimum prefix-cache hit rate (0..1) the server must reach.
    pub min_prefix_cache_hit_rate: Option<f64>,
}

impl Limits {
    /// The latency limits (also the load report's goodput limits).
    pub fn latency(&self) -> LatencyLimits {
        LatencyLimits { ttft_ms: self.p99_ttft_ms, tpot_ms: self.p99_tpot_ms, e2e_ms: self.p99_e2el_ms }
    }
}

/// How to find `--gpu-memory-utilization` before the search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySearch {
    /// Use this value, no search.
    pub fixed: Option<f64>,
    /// Highest value tried first (auto_tune: 0.98).
    #[serde(default = "gmu_start")]
    pub start: f64,
    #[serde(default = "gmu_step")]
    pub step: f64,
    /// Lowest value tried.
    #[serde(default = "gmu_min")]
    pub min: f64,
}

impl Default for MemorySearch {
    fn default() -> Self {
        MemorySearch { fixed: None, start: gmu_start(), step: gmu_step(), min: gmu_min() }
    }
}

fn gmu_start() -> f64 {
    0.98
}
fn gmu_step() -> f64 {
    0.01
}
fn gmu_min() -> f64 {
    0.5
}

/// How the study runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudySpec {
    #[serde(default = "default_name")]
    pub name: String,
    /// Model served (`{model}` in the launch template; sent in requests).
    pub model: String,
    /// GPU name written into the capacity profile (default: the simulator's, or "unknown").
    #[serde(default)]
    pub gpu: Option<String>,
    #[serde(default = "tpe")]
    pub strategy: Strategy,
    /// Most trials, baseline included (grid: capped by the number of combinations).
    #[serde(default = "default_trials")]
    pub trials: u32,
    #[serde(default = "one")]
    pub seed: u64,
    /// GPU sets (CUDA_VISIBLE_DEVICES values); one server per set, trials in parallel.
    #[serde(default = "default_gpu_sets")]
    pub gpu_sets: Vec<String>,
    /// Seconds a server may take to answer `/health`.
    #[serde(default = "default_startup")]
    pub startup_timeout_s: f64,
    /// Seconds between SIGTERM and SIGKILL when stopping a server.
    #[serde(default = "default_grace")]
    pub stop_grace_s: f64,
    /// Most load runs of the rate search per trial (the unlimited-rate run included).
    #[serde(default = "default_rate_runs")]
    pub max_rate_runs: u32,
    /// Stop the rate search when the passing and failing rates are this close (relative).
    #[serde(default = "default_rate_tolerance")]
    pub rate_tolerance: f64,
}

fn default_name() -> String {
    "study".into()
}
fn tpe() -> Strategy {
    Strategy::Tpe
}
fn default_trials() -> u32 {
    30
}
fn default_gpu_sets() -> Vec<String> {
    vec!["0".into()]
}
fn default_startup() -> f64 {
    900.0
}
fn default_grace() -> f64 {
    30.0
}
fn default_rate_runs() -> u32 {
    6
}
fn default_rate_tolerance() -> f64 {
    0.05
}

/// A parsed and checked search space.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchSpace {
    pub study: StudySpec,
    #[serde(default, rename = "parameter")]
    pub parameters: Vec<Parameter>,
    #[serde(default)]
    pub gpu_memory_utilization: MemorySearch,
    pub load: LoadSpec,
    #[serde(default)]
    pub limits: Limits,
    /// Flags passed to every trial unchanged (name without dashes -> value).
    #[serde(default)]
    pub fixed_flags: BTreeMap<String, Value>,
}

impl SearchSpace {
    pub fn load(path: &Path) -> Result<SearchSpace, SpaceError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SpaceError::Read { path: p.clone(), source })?;
        let mut space =
            SearchSpace::parse(&text).map_err(|message| SpaceError::Invalid { path: p.clone(), message })?;
        if let Some(d) = &space.load.dataset {
            let file = path.parent().unwrap_or(Path::new(".")).join(d);
            let text = std::fs::read_to_string(&file).map_err(|e| SpaceError::Invalid {
                path: p.clone(),
                message: format!("field `load.dataset`: {}: {e}", file.display()),
            })?;
            space.load.dataset_rows = parse_dataset(&text).map_err(|m| SpaceError::Invalid {
                path: p.clone(),
                message: format!("field `load.dataset`: {}: {m}", file.display()),
            })?;
        }
        Ok(space)
    }

    /// What each trial is measured on: the dataset (as the bucket of its mean lengths) first
    /// when there is one, then the buckets.
    pub fn workloads(&self) -> Vec<Workload> {
        let mut w = Vec::new();
        let rows = &self.load.dataset_rows;
        if !rows.is_empty() {
            let n = rows.len() as f64;
            let mean = |f: fn(&(u32, u32)) -> u32| {
                crate::saturating_u32((rows.iter().map(|r| f64::from(f(r))).sum::<f64>() / n).round().max(1.0))
            };
            w.push(Workload {
                bucket: Bucket { input_tokens: mean(|r| r.0), output_tokens: mean(|r| r.1) },
                dataset: true,
            });
        }
        w.extend(self.load.buckets.iter().map(|b| Workload { bucket: *b, dataset: false }));
        w
    }

    /// Parses and validates; the error is one line naming the field.
    pub fn parse(text: &str) -> Result<SearchSpace, String> {
        let space: SearchSpace = toml::from_str(text).map_err(|e| one_line(&e))?;
        space.validate()?;
        Ok(space)
    }

    /// The enabled parameters, the ones the search varies.
    pub fn active(&self) -> Vec<&Parameter> {
        self.parameters.iter().filter(|p| p.enabled).collect()
    }

    /// Number of combinations of the enabled parameters.
    pub fn grid_size(&self) -> u64 {
        self.active().iter().map(|p| p.values().len() as u64).product()
    }

    fn validate(&self) -> Result<(), String> {
        let s = &self.study;
        if s.model.trim().is_empty() {
            return Err("field `study.model`: empty".into());
        }
        if s.trials == 0 {
            return Err("field `study.trials`: must be at least 1".into());
        }
        if s.gpu_sets.is_empty() || s.gpu_sets.iter().any(|g| g.trim().is_empty()) {
            return Err("field `study.gpu_sets`: needs at least one non-empty GPU set such as \"0\" or \"0,1\"".into());
        }
        for (field, v) in [("study.startup_timeout_s", s.startup_timeout_s), ("study.stop_grace_s", s.stop_grace_s)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("field `{field}`: {v} must be a positive number of seconds"));
            }
        }
        if s.max_rate_runs < 2 {
            return Err("field `study.max_rate_runs`: must be at least 2 (the unlimited run and one rate)".into());
        }
        if !(s.rate_tolerance > 0.0 && s.rate_tolerance < 1.0) {
            return Err(format!("field `study.rate_tolerance`: {} must be in (0, 1)", s.rate_tolerance));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.parameters.iter().enumerate() {
            let at = format!("parameter[{i}]");
            if p.flag.is_empty() || p.flag.starts_with('-') || p.flag.contains(char::is_whitespace) {
                return Err(format!(
                    "field `{at}.flag`: `{}` must be a flag name without dashes, e.g. max-num-seqs",
                    p.flag
                ));
            }
            if !seen.insert(p.flag.replace('_', "-")) {
                return Err(format!("field `{at}.flag`: `{}` appears twice", p.flag));
            }
            if p.flag.replace('_', "-") == "gpu-memory-utilization" {
                return Err(format!(
                    "field `{at}.flag`: set gpu-memory-utilization in [gpu_memory_utilization], not as a parameter"
                ));
            }
            match (&p.options, &p.range) {
                (Some(_), Some(_)) => return Err(format!("field `{at}`: give either `options` or `range`, not both")),
                (None, None) => {
                    return Err(format!("field `{at}`: needs `options = [...]` or `range = {{start, end, step}}`"))
                }
                (Some(o), None) if o.is_empty() => return Err(format!("field `{at}.options`: empty")),
                (None, Some(r)) => {
                    if ![r.start, r.end, r.step].iter().all(|x| x.is_finite()) || r.step <= 0.0 || r.end < r.start {
                        return Err(format!("field `{at}.range`: needs finite start <= end and step > 0"));
                    }
                    if (r.end - r.start) / r.step > 10_000.0 {
                        return Err(format!("field `{at}.range`: more than 10000 values"));
                    }
                }
                _ => {}
            }
        }
        if self.active().is_empty() {
            return Err("field `parameter`: no enabled parameter to tune".into());
        }
        if self.grid_size() > 10_000_000 {
            return Err(format!("field `parameter`: {} combinations; at most 10000000", self.grid_size()));
        }
        for name in self.fixed_flags.keys() {
            if self.active().iter().any(|p| p.flag == *name) {
                return Err(format!("field `fixed_flags.{name}`: also a tuned parameter"));
            }
        }
        let g = &self.gpu_memory_utilization;
        if let Some(f) = g.fixed {
            if !(f > 0.0 && f <= 1.0) {
                return Err(format!("field `gpu_memory_utilization.fixed`: {f} must be in (0, 1]"));
            }
        }
        if !(g.start > 0.0 && g.start <= 1.0 && g.min > 0.0 && g.min <= g.start && g.step > 0.0) {
            return Err("field `gpu_memory_utilization`: needs 0 < min <= start <= 1 and step > 0".into());
        }
        let l = &self.load;
        if l.buckets.is_empty() && l.dataset.is_none() {
            return Err(
                "field `load.buckets`: needs at least one {input_tokens, output_tokens} (or set `load.dataset`)".into(),
            );
        }
        for (i, b) in l.buckets.iter().enumerate() {
            if b.input_tokens == 0 || b.output_tokens == 0 {
                return Err(format!("field `load.buckets[{i}]`: input_tokens and output_tokens must be at least 1"));
            }
        }
        if !(0.0..1.0).contains(&l.prefix_share) {
            return Err(format!("field `load.prefix_share`: {} must be in [0, 1)", l.prefix_share));
        }
        if !(0.0..1.0).contains(&l.length_spread) {
            return Err(format!("field `load.length_spread`: {} must be in [0, 1)", l.length_spread));
        }
        if l.requests < 2 {
            return Err("field `load.requests`: must be at least 2".into());
        }
        let lim = &self.limits;
        for (field, v) in [
            ("limits.p99_e2el_ms", lim.p99_e2el_ms),
            ("limits.p99_ttft_ms", lim.p99_ttft_ms),
            ("limits.p99_tpot_ms", lim.p99_tpot_ms),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(format!("field `{field}`: {v} must be a positive number of milliseconds"));
                }
            }
        }
        if let Some(h) = lim.min_prefix_cache_hit_rate {
            if !(0.0..=1.0).contains(&h) {
                return Err(format!("field `limits.min_prefix_cache_hit_rate`: {h} must be in [0, 1]"));
            }
        }
        if !lim.latency().is_set() {
            return Err("field `limits`: set at least one of p99_e2el_ms, p99_ttft_ms, p99_tpot_ms".into());
        }
        Ok(())
    }
}

/// toml's errors span several lines (with a caret drawing); keep the message and the key.
fn one_line(e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(_) => {
            let line = e.to_string().lines().next().unwrap_or_default().trim().trim_end_matches(':').to_string();
            format!("{line}: {msg}")
        }
        None => msg,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const SMALL: &str = r#"
[study]
model = "m"
strategy = "grid"
[[parameter]]
flag = "max-num-seqs"
options = [4, 16, 64]
default = 256
[[parameter]]
flag = "max-num-batched-tokens"
range = { start = 1024, end = 4096, step = 1024 }
[[parameter]]
flag = "block-size"
enabled = false
options = [16, 32]
[load]
buckets = [{ input_tokens = 128, output_tokens = 16 }]
[limits]
p99_e2el_ms = 2000
"#;

    #[test]
    fn parses_values_and_defaults() {
        let s = SearchSpace::parse(SMALL).expect("parses");
        assert_eq!(s.active().len(), 2);
        assert_eq!(s.active()[1].values(), ["1024", "2048", "3072", "4096"]);
        assert_eq!(s.grid_size(), 12);
        assert_eq!(s.study.gpu_sets, ["0"]);
        assert_eq!(s.gpu_memory_utilization.start, 0.98);
        assert_eq!(s.load.requests, 200);
        let r = Parameter {
            flag: "x".into(),
            enabled: true,
            options: None,
            range: Some(Range { start: 0.8, end: 0.9, step: 0.05 }),
            default: None,
        };
        assert_eq!(r.values(), ["0.8", "0.85", "0.9"]);
        assert!(r.ordinal());
    }

    #[test]
    fn datasets_load_relative_to_the_space_and_errors_name_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("lens.csv"), "input_tokens,output_tokens\n100,10\n300,30\n").expect("csv");
        let text = SMALL.replace(
            "buckets = [{ input_tokens = 128, output_tokens = 16 }]",
            "dataset = \"lens.csv\"\nbuckets = [{ input_tokens = 64, output_tokens = 8 }]",
        );
        std::fs::write(dir.path().join("s.toml"), &text).expect("space");
        let s = SearchSpace::load(&dir.path().join("s.toml")).expect("loads");
        assert_eq!(s.load.dataset_rows, vec![(100, 10), (300, 30)]);
        let w = s.workloads();
        assert_eq!(w.len(), 2);
        assert!(w[0].dataset && w[0].bucket == Bucket { input_tokens: 200, output_tokens: 20 });
        assert_eq!(parse_dataset("{\"prompt_tokens\": 5, \"output_tokens\": 2}\n").expect("jsonl"), vec![(5, 2)]);
        assert!(parse_dataset("input_tokens,output_tokens\n5,x\n").expect_err("bad").contains("line 2"));
        assert!(parse_dataset("a,b\n").expect_err("header").contains("header"));
        std::fs::write(dir.path().join("lens.csv"), "input_tokens,output_tokens\n0,1\n").expect("csv");
        let e = SearchSpace::load(&dir.path().join("s.toml")).expect_err("zero").to_string();
        assert!(e.contains("load.dataset") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (SMALL.replace("options = [4, 16, 64]", "options = []"), "parameter[0].options"),
            (SMALL.replace("step = 1024", "step = 0"), "parameter[1].range"),
            (SMALL.replace("p99_e2el_ms = 2000", "p99_e2el_ms = -1"), "limits.p99_e2el_ms"),
            (SMALL.replace("p99_e2el_ms = 2000", ""), "`limits`"),
            (SMALL.replace("strategy = \"grid\"", "strategy = \"bayes\""), "bayes"),
            (SMALL.replace("[limits]", "[limits]\nbogus = 1"), "bogus"),
            (SMALL.replace("output_tokens = 16", "output_tokens = 0"), "load.buckets[0]"),
            (SMALL.replace("flag = \"block-size\"", "flag = \"max-num-seqs\""), "appears twice"),
            (SMALL.replace("model = \"m\"", "model = \"\""), "study.model"),
        ];
        for (text, want) in cases {
            let e = SearchSpace::parse(&text).expect_err(want);
            assert!(e.contains(want), "{want}: {e}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
