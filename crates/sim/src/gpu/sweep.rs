//! The measurements the model is fitted to: an NVML sweep of an H100 over its clocks, embedded
//! from `crates/sim/data/h100-dvfs-sweep.csv`.

use std::sync::OnceLock;

use super::MAX_MHZ;

const SWEEP_CSV: &str = include_str!("../../data/h100-dvfs-sweep.csv");

/// A malformed sweep table.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SweepError {
    #[error("sweep line {line}: bad or missing {field}")]
    BadField { line: usize, field: &'static str },
    #[error("sweep line {line}: unknown workload {name:?}")]
    UnknownWorkload { line: usize, name: String },
    #[error("sweep: {workload} needs at least 3 rows including one at 1980 MHz, found {found}")]
    TooFew { workload: &'static str, found: usize },
}

/// One measured row of the sweep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    pub mhz: u32,
    pub seconds: f64,
    pub watts: f64,
}

/// Measured curves by workload, clocks ascending.
#[derive(Debug, Clone, Default)]
pub struct Sweep {
    pub gemm: Vec<Measured>,
    pub decode_b16: Vec<Measured>,
    pub decode_b256: Vec<Measured>,
    pub prefill_4k: Vec<Measured>,
    /// (MHz, idle watts)
    pub idle: Vec<(u32, f64)>,
}

impl Sweep {
    /// Parses the sweep CSV (`sm_mhz,workload,sec_per_call,watts,...`; `#` lines are comments).
    pub fn parse(text: &str) -> Result<Sweep, SweepError> {
        let mut s = Sweep::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with("sm_mhz") {
                continue;
            }
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let num = |i: usize, field: &'static str| -> Result<f64, SweepError> {
                f.get(i)
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|v| v.is_finite() && *v > 0.0)
                    .ok_or(SweepError::BadField { line: n + 1, field })
            };
            let mhz = f
                .first()
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|m| *m > 0)
                .ok_or(SweepError::BadField { line: n + 1, field: "sm_mhz" })?;
            let watts = num(3, "watts")?;
            let workload = f.get(1).copied().unwrap_or("");
            if workload == "idle" {
                s.idle.push((mhz, watts));
                continue;
            }
            let m = Measured { mhz, seconds: num(2, "sec_per_call")?, watts };
            match workload {
                "gemm8k" => s.gemm.push(m),
                "decode_b16" => s.decode_b16.push(m),
                "decode_b256" => s.decode_b256.push(m),
                "prefill_4k" => s.prefill_4k.push(m),
                other => return Err(SweepError::UnknownWorkload { line: n + 1, name: other.to_string() }),
            }
        }
        for v in [&mut s.gemm, &mut s.decode_b16, &mut s.decode_b256, &mut s.prefill_4k] {
            v.sort_by_key(|m| m.mhz);
        }
        s.idle.sort_by_key(|r| r.0);
        for (workload, rows) in [("gemm8k", &s.gemm), ("decode_b16", &s.decode_b16), ("decode_b256", &s.decode_b256)] {
            if rows.len() < 3 || top(rows).is_none() {
                return Err(SweepError::TooFew { workload, found: rows.len() });
            }
        }
        if s.idle.len() < 3 {
            return Err(SweepError::TooFew { workload: "idle", found: s.idle.len() });
        }
        Ok(s)
    }

    /// The embedded H100 measurements.
    pub fn h100() -> &'static Sweep {
        static SWEEP: OnceLock<Sweep> = OnceLock::new();
        #[allow(clippy::expect_used)] // embedded data, checked by tests
        SWEEP.get_or_init(|| Sweep::parse(SWEEP_CSV).expect("embedded sweep parses"))
    }
}

/// The row measured at 1980 MHz: the reference that [`Work`](super::Work) seconds are given at.
pub(super) fn top(rows: &[Measured]) -> Option<Measured> {
    rows.iter().find(|m| m.mhz == MAX_MHZ).copied()
}
