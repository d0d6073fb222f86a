//! A study's outputs in its directory: `result.json` (everything), `result.txt` (auto_tune.sh's
//! line format), `trials.csv`, and `report.svg` (score history against the baseline, and
//! throughput against P99 latency with the Pareto front).
//!
//! The SVG is written by hand: plotters' SVG backend needs a font feature (ttf/font-kit, with
//! system font lookup) to lay out axis labels; two scatter charts do not justify that.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;
use serde_json::{json, Value};

use super::rate::RunFigures;
use super::space::{Limits, SearchSpace};
use super::trial::{TrialKind, TrialRecord, TrialStatus};

/// The short form of a study's result (what `gpu-agent tune --json` prints).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StudySummary {
    pub study: String,
    pub model: String,
    pub strategy: String,
    pub trials: usize,
    pub failed_trials: usize,
    /// None when the memory search found none that starts (see `failure`).
    pub gpu_memory_utilization: Option<f64>,
    /// Why the study ended without trials (the memory search failed), as a result, not an abort.
    pub failure: Option<String>,
    pub limits: Limits,
    pub baseline: Option<Value>,
    pub best: Option<Value>,
    /// best / baseline - 1 in request throughput.
    pub improvement_over_baseline: Option<f64>,
    pub study_dir: String,
    pub files: Vec<String>,
}

impl StudySummary {
    /// The few lines `gpu-agent tune` prints without `--json`.
    pub fn text(&self) -> String {
        let mut o = String::new();
        let f = |v: &Value, k: &str| v["figures"][k].as_f64().unwrap_or(0.0);
        if let Some(why) = &self.failure {
            let _ = writeln!(o, "failed      {why}");
        }
        match &self.best {
            Some(b) => {
                let flags: std::collections::BTreeMap<String, String> =
                    serde_json::from_value(b["flags"].clone()).unwrap_or_default();
                let flags = super::launch::render_flags(&flags);
                let _ = writeln!(o, "best flags  {} (trial {})", flags.join(" "), b["trial"]);
                let _ = writeln!(
                    o,
                    "throughput  {:.2} req/s, {:.0} output tok/s at {} req/s offered; P99 TTFT {:.0} ms, TPOT {:.1} ms, E2E {:.0} ms",
                    f(b, "request_throughput"),
                    f(b, "output_throughput"),
                    b["figures"]["request_rate"].as_f64().map_or("unlimited".to_string(), |r| format!("{r:.2}")),
                    f(b, "p99_ttft_ms"),
                    f(b, "p99_tpot_ms"),
                    f(b, "p99_e2el_ms"),
                );
            }
            None => o.push_str("no trial met the limits at any rate\n"),
        }
        if let Some(base) = &self.baseline {
            let change =
                self.improvement_over_baseline.map_or(String::new(), |x| format!(" (best: {:+.1}%)", x * 100.0));
            let _ = writeln!(o, "baseline    {:.2} req/s{change}", base["score"].as_f64().unwrap_or(0.0));
        }
        let _ = writeln!(
            o,
            "trials      {} ({} failed), gpu-memory-utilization {}",
            self.trials,
            self.failed_trials,
            self.gpu_memory_utilization.map_or("none found".to_string(), |g| g.to_string())
        );
        let _ = writeln!(o, "results in  {}", self.study_dir);
        o
    }
}

/// Figures as JSON with `vllm bench serve`'s `request_rate` ("inf" when unlimited).
pub fn figures_json(f: &RunFigures) -> Value {
    let mut v = serde_json::to_value(f).unwrap_or(Value::Null);
    if let Some(m) = v.as_object_mut() {
        m.insert("request_rate".into(), f.request_rate.map_or_else(|| json!("inf"), |r| json!(r)));
    }
    v
}

fn failure(rec: &TrialRecord) -> Option<String> {
    match &rec.status {
        TrialStatus::Done => None,
        TrialStatus::StartFailed(e) => Some(e.to_string()),
        TrialStatus::LoadFailed(e) => Some(e.clone()),
    }
}

fn trial_json(rec: &TrialRecord) -> Value {
    json!({
        "id": rec.id,
        "kind": format!("{:?}", rec.kind).to_lowercase(),
        "status": rec.status.label(),
        "error": failure(rec),
        "flags": rec.flags,
        "gpu_set": rec.gpu_set,
        "score": rec.score,
        "best": rec.best().map(figures_json),
        "seconds": rec.seconds,
        "buckets": rec.searches.iter().map(|(b, s)| json!({
            "input_tokens": b.input_tokens,
            "output_tokens": b.output_tokens,
            "best": s.best().map(figures_json),
            "runs": s.runs.iter().map(figures_json).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn brief(rec: &TrialRecord) -> Value {
    json!({ "trial": rec.id, "flags": rec.flags, "score": rec.score, "figures": rec.best().map(figures_json) })
}

/// Search and baseline trials in id order (profile runs are not part of the search).
fn searched(records: &[TrialRecord]) -> Vec<&TrialRecord> {
    let mut v: Vec<&TrialRecord> = records.iter().filter(|r| r.kind != TrialKind::Profile).collect();
    v.sort_by_key(|r| r.id);
    v
}

pub fn best(records: &[TrialRecord]) -> Option<&TrialRecord> {
    searched(records)
        .into_iter()
        .filter(|r| r.score.is_some_and(|s| s > 0.0))
        .max_by(|a, b| a.score.unwrap_or(0.0).total_cmp(&b.score.unwrap_or(0.0)).then(b.id.cmp(&a.id)))
}

/// Writes every output file and returns the summary. `failure` says why a study that ran no
/// trials ended (result.txt then holds it).
pub fn write_all(
    dir: &Path,
    space: &SearchSpace,
    records: &[TrialRecord],
    gmu: Option<f64>,
    failure: Option<String>,
    has_profile: bool,
) -> std::io::Result<StudySummary> {
    let trials = searched(records);
    let baseline = trials.iter().find(|r| r.kind == TrialKind::Baseline).copied();
    let top = best(records);
    let improvement = match (top.and_then(|b| b.score), baseline.and_then(|b| b.score)) {
        (Some(b), Some(base)) if base > 0.0 => Some(b / base - 1.0),
        _ => None,
    };
    let mut files = vec!["result.json", "result.txt", "trials.csv", "report.svg"];
    if has_profile {
        files.push("capacity-profile.json");
    }
    let summary = StudySummary {
        study: space.study.name.clone(),
        model: space.study.model.clone(),
        strategy: space.study.strategy.to_string(),
        trials: trials.len(),
        failed_trials: trials.iter().filter(|r| r.score.is_none()).count(),
        gpu_memory_utilization: gmu,
        failure,
        limits: space.limits,
        baseline: baseline.map(brief),
        best: top.map(brief),
        improvement_over_baseline: improvement,
        study_dir: dir.display().to_string(),
        files: files.iter().map(|f| dir.join(f).display().to_string()).collect(),
    };
    let mut full = serde_json::to_value(&summary).unwrap_or(Value::Null);
    if let Some(m) = full.as_object_mut() {
        m.insert("all_trials".into(), Value::Array(records.iter().map(trial_json).collect()));
    }
    write_atomic(&dir.join("result.json"), &serde_json::to_string_pretty(&full).unwrap_or_default())?;
    let mut txt = result_txt(space, records, dir);
    if let Some(why) = &summary.failure {
        txt = format!("study failed: {why}\n{txt}");
    }
    write_atomic(&dir.join("result.txt"), &txt)?;
    write_atomic(&dir.join("trials.csv"), &trials_csv(space, records))?;
    write_atomic(&dir.join("report.svg"), &svg(space, records))?;
    Ok(summary)
}

fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// auto_tune.sh's lines: one per trial with a passing rate, then the best.
pub fn result_txt(space: &SearchSpace, records: &[TrialRecord], dir: &Path) -> String {
    let params = space.active();
    let mut out = String::new();
    let names = |rec: &TrialRecord, prefix: &str| {
        params
            .iter()
            .map(|p| {
                format!(
                    "{prefix}{}: {}",
                    p.flag.replace('-', "_"),
                    rec.flags.get(&p.flag).map_or("default", String::as_str)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    for rec in searched(records) {
        let Some(b) = rec.best() else { continue };
        let _ = writeln!(
            out,
            "{}, request_rate: {}, e2el: {:.2}, throughput: {:.2}, goodput: {:.2}",
            names(rec, ""),
            b.rate_text(),
            b.p99_e2el_ms,
            b.request_throughput,
            b.request_goodput.unwrap_or(b.request_throughput)
        );
    }
    if let Some(b) = best(records) {
        let _ = writeln!(
            out,
            "{}, best_throughput: {:.2}, profile saved in: {}",
            names(b, "best_"),
            b.score.unwrap_or(0.0),
            dir.display()
        );
    }
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn trials_csv(space: &SearchSpace, records: &[TrialRecord]) -> String {
    let params = space.active();
    let mut out = String::from("id,kind,status,gpu_set");
    for p in &params {
        let _ = write!(out, ",{}", p.flag);
    }
    out.push_str(",gpu_memory_utilization,score,request_rate,request_throughput,output_throughput,request_goodput,p99_ttft_ms,p99_tpot_ms,p99_e2el_ms,rate_runs,seconds,error\n");
    let mut recs: Vec<&TrialRecord> = records.iter().collect();
    recs.sort_by_key(|r| r.id);
    for r in recs {
        let b = r.best();
        let num = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x:.3}"));
        let mut row = vec![
            r.id.to_string(),
            format!("{:?}", r.kind).to_lowercase(),
            r.status.label().to_string(),
            r.gpu_set.clone(),
        ];
        row.extend(params.iter().map(|p| r.flags.get(&p.flag).cloned().unwrap_or_default()));
        row.push(r.flags.get("gpu-memory-utilization").cloned().unwrap_or_default());
        row.push(num(r.score));
        row.push(b.map_or(String::new(), RunFigures::rate_text));
        row.push(num(b.map(|b| b.request_throughput)));
        row.push(num(b.map(|b| b.output_throughput)));
        row.push(num(b.and_then(|b| b.request_goodput)));
        row.push(num(b.map(|b| b.p99_ttft_ms)));
        row.push(num(b.map(|b| b.p99_tpot_ms)));
        row.push(num(b.map(|b| b.p99_e2el_ms)));
        row.push(r.searches.iter().map(|(_, s)| s.runs.len()).sum::<usize>().to_string());
        row.push(format!("{:.1}", r.seconds));
        row.push(failure(r).unwrap_or_default());
        out.push_str(&row.iter().map(|f| csv_field(f)).collect::<Vec<_>>().join(","));
        out.push('\n');
    }
    out
}

/// Non-dominated points when maximising y and minimising x, sorted by x.
pub fn pareto(points: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut p: Vec<(f64, f64)> = points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
    p.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
    let mut front: Vec<(f64, f64)> = Vec::new();
    for pt in p {
        if front.last().is_none_or(|l| pt.1 > l.1) {
            front.push(pt);
        }
    }
    front
}

/// About `n` round tick values covering `lo..hi`.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-9);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| span / s <= n as f64).unwrap_or(10.0 * mag);
    let mut t = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while t <= hi + step * 1e-9 {
        // Rounded so 3 x 0.1 prints as 0.3.
        out.push(((t / step).round() * step * 1e9).round() / 1e9);
        t += step;
    }
    out
}

/// One chart's frame: maps data to pixels and draws axes.
struct Panel {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
    xr: (f64, f64),
    yr: (f64, f64),
}

impl Panel {
    fn px(&self, x: f64) -> f64 {
        self.x0 + (x - self.xr.0) / (self.xr.1 - self.xr.0).max(1e-12) * self.w
    }
    fn py(&self, y: f64) -> f64 {
        self.y0 + self.h - (y - self.yr.0) / (self.yr.1 - self.yr.0).max(1e-12) * self.h
    }
    fn axes(&self, out: &mut String, title: &str, xlabel: &str, ylabel: &str) {
        let (x0, y0, w, h) = (self.x0, self.y0, self.w, self.h);
        let _ = writeln!(out, r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#444"/>"##);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" font-size="15" font-weight="bold">{title}</text>"#,
            x0 + w / 2.0,
            y0 - 12.0
        );
        let _ =
            writeln!(out, r#"<text x="{}" y="{}" text-anchor="middle">{xlabel}</text>"#, x0 + w / 2.0, y0 + h + 38.0);
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="middle" transform="rotate(-90 {} {})">{ylabel}</text>"#,
            x0 - 48.0,
            y0 + h / 2.0,
            x0 - 48.0,
            y0 + h / 2.0
        );
        for t in ticks(self.xr.0, self.xr.1, 6) {
            let x = self.px(t);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle" font-size="11">{}</text>"##,
                y0,
                y0 + h,
                y0 + h + 16.0,
                fmt_tick(t)
            );
        }
        for t in ticks(self.yr.0, self.yr.1, 5) {
            let y = self.py(t);
            let _ = writeln!(
                out,
                r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
                x0,
                x0 + w,
                x0 - 6.0,
                y + 4.0,
                fmt_tick(t)
            );
        }
    }
}

fn fmt_tick(t: f64) -> String {
    if t.abs() >= 100.0 || t.fract() == 0.0 {
        format!("{t:.0}")
    } else {
        format!("{t:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn range(vals: impl Iterator<Item = f64>, pad_zero: bool) -> (f64, f64) {
    let (mut lo, mut hi) = vals.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| (l.min(v), h.max(v)));
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if pad_zero {
        lo = lo.min(0.0);
    }
    if hi <= lo {
        hi = lo + 1.0;
    }
    let pad = (hi - lo) * 0.05;
    (if pad_zero { lo } else { lo - pad }, hi + pad)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// The two-panel report.
pub fn svg(space: &SearchSpace, records: &[TrialRecord]) -> String {
    let trials = searched(records);
    let mut out = String::new();
    let (width, height) = (1100.0, 470.0);
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="20" y="24" font-size="16">{} ({}, {} trials): request throughput within the limits</text>"#,
        esc(&space.study.name),
        space.study.strategy,
        trials.len()
    );

    // History: every trial's score, the best so far, the baseline.
    let n = trials.len().max(1) as f64;
    let hist = Panel {
        x0: 80.0,
        y0: 70.0,
        w: 420.0,
        h: 320.0,
        xr: (0.0, n + 1.0),
        yr: range(trials.iter().filter_map(|r| r.score), true),
    };
    hist.axes(&mut out, "History", "trial", "requests/s at the best rate within limits");
    if let Some(base) = trials.iter().find(|r| r.kind == TrialKind::Baseline).and_then(|r| r.score) {
        let y = hist.py(base);
        let _ = writeln!(
            out,
            r##"<line x1="{}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#888" stroke-dasharray="6 4"/><text x="{}" y="{:.1}" font-size="11" fill="#666">baseline {base:.2}</text>"##,
            hist.x0,
            hist.x0 + hist.w,
            hist.x0 + 4.0,
            y - 4.0
        );
    }
    let mut best = f64::NEG_INFINITY;
    let mut line = String::new();
    for (i, r) in trials.iter().enumerate() {
        let x = hist.px(i as f64 + 1.0);
        match r.score {
            Some(s) => {
                best = best.max(s);
                let color = if r.kind == TrialKind::Baseline { "#888" } else { "#1f77b4" };
                let _ = writeln!(
                    out,
                    r#"<circle cx="{x:.1}" cy="{:.1}" r="4" fill="{color}"><title>trial {}: {s:.2} req/s</title></circle>"#,
                    hist.py(s),
                    r.id
                );
            }
            None => {
                let y = hist.py(0.0);
                let _ = writeln!(
                    out,
                    r##"<path d="M{:.1} {:.1} l8 8 m0 -8 l-8 8" stroke="#d62728" stroke-width="2"><title>trial {}: {}</title></path>"##,
                    x - 4.0,
                    y - 4.0,
                    r.id,
                    esc(r.status.label())
                );
            }
        }
        if best.is_finite() {
            let _ = write!(line, "{}{x:.1},{:.1} ", if line.is_empty() { "M" } else { "L" }, hist.py(best));
        }
    }
    if !line.is_empty() {
        let _ = writeln!(out, r##"<path d="{line}" fill="none" stroke="#2ca02c" stroke-width="2"/>"##);
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" font-size="11"><tspan fill="#1f77b4">● trial</tspan>  <tspan fill="#2ca02c">— best so far</tspan>  <tspan fill="#d62728">✕ failed</tspan></text>"##,
        hist.x0,
        hist.y0 + hist.h + 60.0
    );

    // Throughput against latency: every passing run of every trial, and the Pareto front.
    let pts: Vec<(f64, f64)> = trials
        .iter()
        .flat_map(|r| r.searches.iter().flat_map(|(_, s)| s.runs.iter()))
        .filter(|f| f.passed)
        .map(|f| (f.p99_e2el_ms, f.request_throughput))
        .collect();
    let sc = Panel {
        x0: 620.0,
        y0: 70.0,
        w: 440.0,
        h: 320.0,
        xr: range(pts.iter().map(|p| p.0), false),
        yr: range(pts.iter().map(|p| p.1), true),
    };
    sc.axes(&mut out, "Throughput vs latency (runs within limits)", "P99 end-to-end latency (ms)", "requests/s");
    for (x, y) in &pts {
        let _ = writeln!(
            out,
            r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#1f77b4" fill-opacity="0.5"/>"##,
            sc.px(*x),
            sc.py(*y)
        );
    }
    let front = pareto(&pts);
    if !front.is_empty() {
        let d: String = front
            .iter()
            .enumerate()
            .map(|(i, (x, y))| format!("{}{:.1},{:.1} ", if i == 0 { "M" } else { "L" }, sc.px(*x), sc.py(*y)))
            .collect();
        let _ = writeln!(out, r##"<path d="{d}" fill="none" stroke="#ff7f0e" stroke-width="2"/>"##);
        for (x, y) in &front {
            let _ = writeln!(
                out,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#ff7f0e"><title>{y:.2} req/s at {x:.0} ms</title></circle>"##,
                sc.px(*x),
                sc.py(*y)
            );
        }
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" font-size="11"><tspan fill="#ff7f0e">— Pareto front</tspan></text>"##,
        sc.x0,
        sc.y0 + sc.h + 60.0
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pareto_keeps_only_undominated_points() {
        let pts = [(100.0, 5.0), (200.0, 4.0), (150.0, 8.0), (300.0, 9.0), (120.0, 5.5)];
        assert_eq!(pareto(&pts), vec![(100.0, 5.0), (120.0, 5.5), (150.0, 8.0), (300.0, 9.0)]);
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(ticks(0.0, 10.0, 5), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(ticks(0.13, 0.61, 5), vec![0.2, 0.3, 0.4, 0.5, 0.6]);
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }
}
