//! A small, strict parser for the Prometheus text exposition format (version 0.0.4), which is
//! what vLLM's `/metrics` serves. Hand-written so that errors name the line and the fault, and
//! so that nothing outside the format (such as a doc's `...` gap marker) slips through.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

/// A syntax error, with the 1-based line it is on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {msg}")]
pub struct ParseError {
    pub line: usize,
    pub msg: String,
}

/// The type a `# TYPE` line declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
    Summary,
    Untyped,
}

/// One sample line: every label is kept, in the order written.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    /// Milliseconds since the epoch, when the line carries one.
    pub timestamp_ms: Option<i64>,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A parsed exposition: the samples in order, plus the declared types and help texts by
/// metric (family) name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: HashMap<String, MetricType>,
    pub help: HashMap<String, String>,
}

/// Parses a whole exposition. Blank lines and plain `#` comments are skipped; anything else
/// that is not a valid HELP, TYPE or sample line is an error.
pub fn parse(text: &str) -> Result<Exposition, ParseError> {
    let mut out = Exposition::default();
    // Sample names seen so far, to reject a TYPE line that comes after its samples.
    let mut seen_names: HashSet<String> = HashSet::new();
    // Series (name + sorted labels) seen so far, to reject duplicates.
    let mut seen_series: HashSet<(String, Vec<(String, String)>)> = HashSet::new();

    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        let err = |msg: String| ParseError { line, msg };
        let mut c = Cursor::new(raw);
        c.skip_blank();
        match c.peek() {
            None => continue,
            Some('#') => {
                c.bump();
                c.skip_blank();
                let word = c.word();
                match word {
                    "HELP" => {
                        c.expect_blank().map_err(&err)?;
                        let name = c.metric_name().map_err(&err)?.to_string();
                        let text = if c.peek().is_some() {
                            c.expect_blank().map_err(&err)?;
                            unescape_help(c.rest())
                        } else {
                            String::new()
                        };
                        if out.help.insert(name.clone(), text).is_some() {
                            return Err(err(format!("second HELP line for metric {name:?}")));
                        }
                    }
                    "TYPE" => {
                        c.expect_blank().map_err(&err)?;
                        let name = c.metric_name().map_err(&err)?.to_string();
                        c.expect_blank().map_err(&err)?;
                        let kind = match c.word() {
                            "counter" => MetricType::Counter,
                            "gauge" => MetricType::Gauge,
                            "histogram" => MetricType::Histogram,
                            "summary" => MetricType::Summary,
                            "untyped" => MetricType::Untyped,
                            other => return Err(err(format!("unknown metric type {other:?} for {name:?}"))),
                        };
                        c.skip_blank();
                        if let Some(ch) = c.peek() {
                            return Err(err(format!("unexpected {ch:?} after the type of {name:?}")));
                        }
                        let family = ["", "_bucket", "_count", "_sum"];
                        if family.iter().any(|s| seen_names.contains(&format!("{name}{s}"))) {
                            return Err(err(format!("TYPE line for {name:?} comes after its samples")));
                        }
                        if out.types.insert(name.clone(), kind).is_some() {
                            return Err(err(format!("second TYPE line for metric {name:?}")));
                        }
                    }
                    // Any other comment is ignored, as the format says.
                    _ => {}
                }
            }
            Some(_) => {
                let sample = sample_line(&mut c).map_err(&err)?;
                if let Some(base) = sample.name.strip_suffix("_bucket") {
                    if out.types.get(base) == Some(&MetricType::Histogram) {
                        let le = sample
                            .label("le")
                            .ok_or_else(|| err(format!("histogram bucket {:?} has no \"le\" label", sample.name)))?;
                        parse_float(le).ok_or_else(|| err(format!("invalid \"le\" value {le:?}")))?;
                    }
                }
                let mut key_labels = sample.labels.clone();
                key_labels.sort();
                if !seen_series.insert((sample.name.clone(), key_labels)) {
                    return Err(err(format!("duplicate series {:?} with the same labels", sample.name)));
                }
                seen_names.insert(sample.name.clone());
                out.samples.push(sample);
            }
        }
    }
    Ok(out)
}

/// Parses a sample value as Prometheus does: decimal or exponent notation, `NaN`, `+Inf`, `-Inf`.
pub(crate) fn parse_float(s: &str) -> Option<f64> {
    // Rust's parser also takes "infinity" and the like, as Go's does; it rejects empty strings,
    // stray characters and digit separators.
    s.parse::<f64>().ok()
}

fn sample_line(c: &mut Cursor<'_>) -> Result<Sample, String> {
    let name = c.metric_name()?.to_string();
    let before = c.pos;
    c.skip_blank();
    let mut labels: Vec<(String, String)> = Vec::new();
    if c.peek() != Some('{') {
        // No label set: the blank just skipped separates the name from the value.
        c.pos = before;
    } else {
        c.bump();
        loop {
            c.skip_blank();
            if c.peek() == Some('}') {
                c.bump();
                break;
            }
            let lname = c.label_name()?.to_string();
            c.skip_blank();
            if c.peek() != Some('=') {
                return Err(format!("expected '=' after label name {lname:?}"));
            }
            c.bump();
            c.skip_blank();
            let value = c.label_value(&lname)?;
            if labels.iter().any(|(k, _)| *k == lname) {
                return Err(format!("duplicate label {lname:?}"));
            }
            labels.push((lname, value));
            c.skip_blank();
            match c.peek() {
                Some(',') => c.bump(),
                Some('}') => {
                    c.bump();
                    break;
                }
                Some(ch) => return Err(format!("expected ',' or '}}' after a label value, found {ch:?}")),
                None => return Err("unterminated label set: expected '}'".to_string()),
            }
        }
    }
    c.expect_blank()?;
    let token = c.word();
    if token.is_empty() {
        return Err(format!("missing value for {name:?}"));
    }
    let value = parse_float(token).ok_or_else(|| format!("invalid value {token:?} for {name:?}"))?;
    c.skip_blank();
    let timestamp_ms = if c.peek().is_some() {
        let token = c.word();
        let ts = token.parse::<i64>().map_err(|_| format!("invalid timestamp {token:?} for {name:?}"))?;
        c.skip_blank();
        if let Some(ch) = c.peek() {
            return Err(format!("unexpected {ch:?} after the timestamp of {name:?}"));
        }
        Some(ts)
    } else {
        None
    };
    Ok(Sample { name, labels, value, timestamp_ms })
}

/// HELP text escapes: `\\` and `\n`; any other backslash is kept as written.
fn unescape_help(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        if ch != '\\' {
            out.push(ch);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// A position within one line.
struct Cursor<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(s: &'a str) -> Self {
        Self { s, pos: 0 }
    }

    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn bump(&mut self) {
        if let Some(ch) = self.peek() {
            self.pos += ch.len_utf8();
        }
    }

    fn rest(&self) -> &'a str {
        &self.s[self.pos..]
    }

    fn skip_blank(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t')) {
            self.bump();
        }
    }

    /// At least one space or tab, then any more.
    fn expect_blank(&mut self) -> Result<(), String> {
        match self.peek() {
            Some(' ' | '\t') => {
                self.skip_blank();
                Ok(())
            }
            Some(ch) => Err(format!("expected whitespace, found {ch:?}")),
            None => Err("expected whitespace, found end of line".to_string()),
        }
    }

    /// Everything up to the next blank or the end of the line.
    fn word(&mut self) -> &'a str {
        let start = self.pos;
        while matches!(self.peek(), Some(ch) if ch != ' ' && ch != '\t') {
            self.bump();
        }
        &self.s[start..self.pos]
    }

    fn take_ident(&mut self, first: fn(char) -> bool, rest: fn(char) -> bool, what: &str) -> Result<&'a str, String> {
        let start = self.pos;
        match self.peek() {
            Some(ch) if first(ch) => self.bump(),
            Some(ch) => return Err(format!("expected {what}, found {ch:?}")),
            None => return Err(format!("expected {what}, found end of line")),
        }
        while matches!(self.peek(), Some(ch) if rest(ch)) {
            self.bump();
        }
        Ok(&self.s[start..self.pos])
    }

    /// `[a-zA-Z_:][a-zA-Z0-9_:]*`
    fn metric_name(&mut self) -> Result<&'a str, String> {
        self.take_ident(
            |c| c.is_ascii_alphabetic() || c == '_' || c == ':',
            |c| c.is_ascii_alphanumeric() || c == '_' || c == ':',
            "a metric name",
        )
    }

    /// `[a-zA-Z_][a-zA-Z0-9_]*`
    fn label_name(&mut self) -> Result<&'a str, String> {
        self.take_ident(
            |c| c.is_ascii_alphabetic() || c == '_',
            |c| c.is_ascii_alphanumeric() || c == '_',
            "a label name or '}'",
        )
    }

    /// A double-quoted label value with the escapes `\\`, `\"` and `\n`.
    fn label_value(&mut self, label: &str) -> Result<String, String> {
        if self.peek() != Some('"') {
            return Err(format!("expected '\"' to open the value of label {label:?}"));
        }
        self.bump();
        let mut out = String::new();
        loop {
            let Some(ch) = self.peek() else {
                return Err(format!("unterminated value of label {label:?}"));
            };
            self.bump();
            match ch {
                '"' => return Ok(out),
                '\\' => {
                    let esc = self.peek();
                    self.bump();
                    match esc {
                        Some('\\') => out.push('\\'),
                        Some('"') => out.push('"'),
                        Some('n') => out.push('\n'),
                        Some(other) => {
                            return Err(format!("invalid escape '\\{other}' in the value of label {label:?}"))
                        }
                        None => return Err(format!("unterminated value of label {label:?}")),
                    }
                }
                _ => out.push(ch),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testdata::{v1_without_gaps, V0, V1};

    fn err_of(text: &str) -> ParseError {
        match parse(text) {
            Ok(e) => panic!("expected an error, parsed {} samples", e.samples.len()),
            Err(e) => e,
        }
    }

    #[test]
    fn parses_the_v0_fixture_completely() {
        let e = parse(V0).expect("v0 parses");
        let samples = V0.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
        assert_eq!(e.samples.len(), samples);
        assert_eq!(e.types.len(), V0.lines().filter(|l| l.starts_with("# TYPE")).count());
        assert_eq!(e.types["vllm:time_to_first_token_seconds"], MetricType::Histogram);
        assert_eq!(e.types["vllm:prompt_tokens_total"], MetricType::Counter);
        assert_eq!(e.help["process_open_fds"], "Number of open file descriptors.");
        let vm = e.samples.iter().find(|s| s.name == "process_virtual_memory_bytes").expect("vm");
        assert_eq!(vm.value, 6.634254336e9);
        let info = e.samples.iter().find(|s| s.name == "vllm:cache_config_info").expect("info");
        assert_eq!(info.labels.len(), 10, "every label kept");
        assert_eq!(info.label("num_gpu_blocks"), Some("7281"));
        let inf = e
            .samples
            .iter()
            .find(|s| s.name == "vllm:e2e_request_latency_seconds_bucket" && s.label("le") == Some("+Inf"))
            .expect("+Inf bucket");
        assert_eq!(inf.label("model_name"), Some("facebook/opt-125m"));
    }

    #[test]
    fn parses_the_v1_excerpt_without_its_gap_markers() {
        let e = parse(&v1_without_gaps()).expect("v1 parses");
        assert_eq!(e.samples.len(), 1 + 1 + 3 + 9);
        let stop = &e.samples[2];
        assert_eq!(stop.name, "vllm:request_success_total");
        assert_eq!(stop.label("finished_reason"), Some("stop"));
    }

    #[test]
    fn rejects_the_gap_marker_with_its_line() {
        let e = err_of(V1);
        assert_eq!(e.line, 4);
        assert_eq!(e.to_string(), "line 4: expected a metric name, found '.'");
    }

    #[test]
    fn special_values_timestamps_and_escapes() {
        let text = "# HELP m a \\\\ b\\nc\n\
                    m{a=\"q\\\"uote\",b=\"back\\\\slash\",c=\"new\\nline\",} NaN\n\
                    n +Inf 1700000000000\n\
                    o{} -Inf -5\n\
                    p 1.5E-3\n\
                    q\t2e+09\t\n";
        let e = parse(text).expect("parses");
        assert_eq!(e.help["m"], "a \\ b\nc");
        let m = &e.samples[0];
        assert!(m.value.is_nan());
        assert_eq!(m.label("a"), Some("q\"uote"));
        assert_eq!(m.label("b"), Some("back\\slash"));
        assert_eq!(m.label("c"), Some("new\nline"));
        assert_eq!(e.samples[1].value, f64::INFINITY);
        assert_eq!(e.samples[1].timestamp_ms, Some(1_700_000_000_000));
        assert_eq!(e.samples[2].value, f64::NEG_INFINITY);
        assert_eq!(e.samples[2].timestamp_ms, Some(-5));
        assert!(e.samples[2].labels.is_empty());
        assert_eq!(e.samples[3].value, 0.0015);
        assert_eq!(e.samples[4].value, 2e9);
        assert_eq!(e.samples[4].timestamp_ms, None);
    }

    #[test]
    fn blanks_around_the_label_set_are_allowed_but_needed_before_the_value() {
        let e = parse("a {x = \"1\" , y=\"2\"}\t3\n").expect("parses");
        assert_eq!(e.samples[0].labels, vec![("x".into(), "1".into()), ("y".into(), "2".into())]);
        assert_eq!(e.samples[0].value, 3.0);
        assert_eq!(err_of("a{x=\"1\"}3\n").msg, "expected whitespace, found '3'");
    }

    #[test]
    fn comments_and_blank_lines_are_skipped() {
        let e = parse("\n# just a comment\n#\n   \nx 1\n").expect("parses");
        assert_eq!(e.samples.len(), 1);
    }

    #[test]
    fn malformed_lines_name_their_line_and_fault() {
        let cases: &[(&str, usize, &str)] = &[
            ("a 1\nb{le 1} 2\n", 2, "expected '=' after label name \"le\""),
            ("a 1\n\nb{x=\"1\" 2\n", 3, "expected ',' or '}' after a label value, found '2'"),
            ("b{x=\"1\"\n", 1, "unterminated label set: expected '}'"),
            ("a 1\nb{x=\"abc} 2\n", 2, "unterminated value of label \"x\""),
            ("b{x=\"a\\tb\"} 2\n", 1, "invalid escape '\\t' in the value of label \"x\""),
            ("b{x=1} 2\n", 1, "expected '\"' to open the value of label \"x\""),
            ("b{x=\"1\",x=\"2\"} 2\n", 1, "duplicate label \"x\""),
            ("b{1x=\"1\"} 2\n", 1, "expected a label name or '}', found '1'"),
            ("a 1\nb\n", 2, "expected whitespace, found end of line"),
            ("b 1.2.3\n", 1, "invalid value \"1.2.3\" for \"b\""),
            ("b 1 12.5\n", 1, "invalid timestamp \"12.5\" for \"b\""),
            ("b 1 12 x\n", 1, "unexpected 'x' after the timestamp of \"b\""),
            ("9b 1\n", 1, "expected a metric name, found '9'"),
            ("a 1\na 2\n", 2, "duplicate series \"a\" with the same labels"),
            ("a{x=\"1\",y=\"2\"} 1\na{y=\"2\",x=\"1\"} 2\n", 2, "duplicate series \"a\" with the same labels"),
            ("# TYPE a counter\n# TYPE a gauge\n", 2, "second TYPE line for metric \"a\""),
            ("# TYPE a countr\n", 1, "unknown metric type \"countr\" for \"a\""),
            ("# TYPE a\n", 1, "expected whitespace, found end of line"),
            ("a_count 1\n# TYPE a histogram\n", 2, "TYPE line for \"a\" comes after its samples"),
            ("# HELP a x\n# HELP a y\n", 2, "second HELP line for metric \"a\""),
            ("# TYPE h histogram\nh_bucket 1\n", 2, "histogram bucket \"h_bucket\" has no \"le\" label"),
            ("# TYPE h histogram\nh_bucket{le=\"x\"} 1\n", 2, "invalid \"le\" value \"x\""),
            ("a 1\r\n", 1, "invalid value \"1\\r\" for \"a\""),
        ];
        for (text, line, msg) in cases {
            let e = err_of(text);
            assert_eq!((e.line, e.msg.as_str()), (*line, *msg), "input {text:?}");
        }
    }

    #[test]
    fn error_displays_as_one_line() {
        let e = err_of("a 1\nb 2\nc 3\nd 4\ne 5\nf 6\ng 7\nh 8\ni 9\nj 10\nk 11\nm{le 1} 2\n");
        assert_eq!(e.to_string(), "line 12: expected '=' after label name \"le\"");
    }
}
