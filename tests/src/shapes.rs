//! Response shapes: a JSON answer reduced to its keys and value types, SSE framing checked,
//! and the requests `scripts/vllm-cpu/capture.sh` sends, so that vllm-sim's answers can be held
//! against real vLLM's: recorded (`tests/fixtures/vllm-0.32.0/`) or live (`real_vllm.rs`).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// The captures of vLLM 0.32.0's answers to [`cases`] (see its README.md).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/vllm-0.32.0")
}

/// `v` reduced to its shape: each value by its type, objects key by key, arrays by their first
/// element (an empty array stays empty).
pub fn shape(v: &Value) -> Value {
    match v {
        Value::Null => json!("null"),
        Value::Bool(_) => json!("bool"),
        Value::Number(n) if n.is_f64() => json!("float"),
        Value::Number(_) => json!("integer"),
        Value::String(_) => json!("string"),
        Value::Array(items) => Value::Array(items.first().map(shape).into_iter().collect()),
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
    }
}

/// Where two shapes differ, one line per difference, by JSON path.
fn shape_diff(path: &str, want: &Value, got: &Value, out: &mut String) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                match g.get(k) {
                    Some(gv) => shape_diff(&format!("{path}.{k}"), wv, gv, out),
                    None => {
                        let _ = writeln!(out, "  {path}.{k}: missing (vLLM: {wv})");
                    }
                }
            }
            for k in g.keys().filter(|k| !w.contains_key(*k)) {
                let _ = writeln!(out, "  {path}.{k}: not in vLLM's answer");
            }
        }
        (Value::Array(w), Value::Array(g)) if !w.is_empty() && !g.is_empty() => {
            shape_diff(&format!("{path}[0]"), &w[0], &g[0], out);
        }
        _ if want != got => {
            let _ = writeln!(out, "  {path}: vLLM {want}, other {got}");
        }
        _ => {}
    }
}

pub fn assert_same_shape(what: &str, vllm: &Value, sim: &Value) {
    let mut diff = String::new();
    shape_diff("$", &shape(vllm), &shape(sim), &mut diff);
    assert!(diff.is_empty(), "{what}: the shape differs from vLLM's:\n{diff}vLLM: {vllm}\nother: {sim}");
}

/// The events of an SSE body, checked to be `data: <JSON>` then a blank line each, ending with
/// `data: [DONE]`.
pub fn sse_events(what: &str, body: &str) -> Vec<Value> {
    assert!(body.ends_with("data: [DONE]\n\n"), "{what}: the stream does not end with `data: [DONE]` and a blank line");
    let blocks: Vec<&str> = body.split_terminator("\n\n").collect();
    let (done, events) = blocks.split_last().unwrap_or((&"", &[]));
    assert_eq!(*done, "data: [DONE]", "{what}");
    events
        .iter()
        .map(|e| {
            let json = e.strip_prefix("data: ").unwrap_or_else(|| panic!("{what}: not a `data: ` event: {e:?}"));
            assert!(!json.contains('\n'), "{what}: an event spans lines: {e:?}");
            serde_json::from_str(json).unwrap_or_else(|err| panic!("{what}: event is not JSON ({err}): {json}"))
        })
        .collect()
}

/// The chunks a stream's shape is judged by: the first, a middle one, the last with content
/// (it carries the finish reason) and, when there is one, the usage chunk (no choices, last
/// before `[DONE]`).
pub fn stream_roles(what: &str, events: &[Value]) -> Vec<(&'static str, Value)> {
    let with_choices = |e: &&Value| e["choices"].as_array().is_some_and(|c| !c.is_empty());
    let content: Vec<&Value> = events.iter().filter(with_choices).collect();
    assert!(content.len() >= 3, "{what}: too few chunks with choices to judge ({})", content.len());
    let last = content[content.len() - 1];
    assert!(
        last["choices"][0]["finish_reason"].is_string(),
        "{what}: the last chunk with choices has no finish_reason"
    );
    let mut roles = vec![
        ("first chunk", events[0].clone()),
        ("middle chunk", content[content.len() / 2].clone()),
        ("last content chunk", last.clone()),
    ];
    let usage: Vec<&Value> = events.iter().filter(|e| !with_choices(e)).collect();
    match usage[..] {
        [] => {}
        [u] if std::ptr::eq(u, &events[events.len() - 1]) && u["usage"].is_object() => {
            roles.push(("usage chunk", u.clone()))
        }
        _ => panic!("{what}: chunks without choices other than one usage chunk right before [DONE]"),
    }
    roles
}

/// One captured request: fixture file, method, path, body (raw; `{model}` stands for the served
/// model). Kept in step with `scripts/vllm-cpu/capture.sh`.
#[derive(Debug)]
pub struct Case {
    pub file: &'static str,
    pub method: &'static str,
    pub path: &'static str,
    pub body: String,
}

pub fn cases() -> Vec<Case> {
    let case = |file, method, path, body: &str| Case { file, method, path, body: body.to_string() };
    let long = vec!["the"; 3000].join(" ");
    let chat = r#"[{"role":"user","content":"the time of day"}]"#;
    vec![
        case("models.json", "GET", "/v1/models", ""),
        case(
            "completions.json",
            "POST",
            "/v1/completions",
            r#"{"model":"{model}","prompt":"the time of day","max_tokens":5,"ignore_eos":true}"#,
        ),
        case(
            "completions.sse",
            "POST",
            "/v1/completions",
            concat!(
                r#"{"model":"{model}","prompt":"the time of day","max_tokens":5,"ignore_eos":true,"#,
                r#""stream":true,"stream_options":{"include_usage":true}}"#
            ),
        ),
        case(
            "completions-stream-1.sse",
            "POST",
            "/v1/completions",
            r#"{"model":"{model}","prompt":"the time","max_tokens":3,"ignore_eos":true,"stream":1}"#,
        ),
        case(
            "chat.json",
            "POST",
            "/v1/chat/completions",
            &format!(r#"{{"model":"{{model}}","messages":{chat},"max_tokens":5,"ignore_eos":true}}"#),
        ),
        case(
            "chat.sse",
            "POST",
            "/v1/chat/completions",
            &format!(
                concat!(
                    r#"{{"model":"{{model}}","messages":{chat},"max_tokens":5,"ignore_eos":true,"#,
                    r#""stream":true,"stream_options":{{"include_usage":true}}}}"#
                ),
                chat = chat
            ),
        ),
        case(
            "error-unknown-model.json",
            "POST",
            "/v1/completions",
            r#"{"model":"no-such-model","prompt":"the","max_tokens":2}"#,
        ),
        case("error-bad-json.json", "POST", "/v1/completions", r#"{"model":"#),
        case(
            "error-empty-messages.json",
            "POST",
            "/v1/chat/completions",
            r#"{"model":"{model}","messages":[],"max_tokens":2}"#,
        ),
        case(
            "error-max-tokens-0.json",
            "POST",
            "/v1/completions",
            r#"{"model":"{model}","prompt":"the","max_tokens":0}"#,
        ),
        case(
            "error-too-long.json",
            "POST",
            "/v1/completions",
            &format!(r#"{{"model":"{{model}}","prompt":"{long}","max_tokens":16}}"#),
        ),
        case("error-not-found.json", "GET", "/v1/nothing", ""),
    ]
}

/// vLLM's status of each case, from `status.txt` (`file status` per line).
pub fn statuses(dir: &Path) -> Vec<(String, u16)> {
    let path = dir.join("status.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("missing {} ({e})", path.display()));
    text.lines()
        .filter_map(|l| {
            let (file, code) = l.split_once(' ')?;
            Some((file.to_string(), code.trim().parse().ok()?))
        })
        .collect()
}

/// Sends one case to `addr` (`{model}` in its body replaced by `model`): status and body.
pub fn send(addr: SocketAddr, model: &str, case: &Case) -> (u16, String) {
    let body = case.body.replace("{model}", model);
    let r = crate::http(case.method, addr, case.path, (!body.is_empty()).then_some(body.as_str()))
        .unwrap_or_else(|e| panic!("{}: {e}", case.file));
    (r.status, r.body)
}

/// `other`'s answer to `case` has vLLM's status and shape (streams: framing and the first,
/// middle, last-content and usage chunks).
pub fn assert_alike(file: &str, (vllm_status, vllm_body): (u16, &str), (status, body): (u16, &str)) {
    assert_eq!(status, vllm_status, "{file}: status; vLLM answered {vllm_body}, the other {body}");
    if file.ends_with(".sse") {
        let vllm = sse_events(&format!("{file} (vLLM)"), vllm_body);
        let other = sse_events(&format!("{file} (other)"), body);
        let vllm = stream_roles(&format!("{file} (vLLM)"), &vllm);
        let other = stream_roles(&format!("{file} (other)"), &other);
        let names = |r: &[(&'static str, Value)]| r.iter().map(|(n, _)| *n).collect::<Vec<&'static str>>();
        assert_eq!(names(&other), names(&vllm), "{file}: which chunks the stream has");
        for ((role, v), (_, o)) in vllm.iter().zip(&other) {
            assert_same_shape(&format!("{file}, {role}"), v, o);
        }
    } else {
        let vllm: Value = serde_json::from_str(vllm_body).unwrap_or_else(|e| panic!("{file}: vLLM: not JSON: {e}"));
        let other: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{file}: not JSON: {e}: {body}"));
        assert_same_shape(file, &vllm, &other);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_keep_keys_and_types_and_arrays_by_their_first_element() {
        let v = json!({"a": [{"x": 1, "y": null}, {"z": "ignored"}], "b": "s", "c": 1.5, "d": [], "e": true});
        assert_eq!(
            shape(&v),
            json!({"a": [{"x": "integer", "y": "null"}], "b": "string", "c": "float", "d": [], "e": "bool"})
        );
        let mut diff = String::new();
        shape_diff("$", &shape(&json!({"a": 1, "b": [1]})), &shape(&json!({"b": ["x"], "c": 2})), &mut diff);
        assert_eq!(
            diff,
            concat!(
                "  $.a: missing (vLLM: \"integer\")\n",
                "  $.b[0]: vLLM \"integer\", other \"string\"\n",
                "  $.c: not in vLLM's answer\n",
            )
        );
    }

    #[test]
    fn sse_framing_is_checked() {
        let ok = "data: {\"a\":1}\n\ndata: [DONE]\n\n";
        assert_eq!(sse_events("ok", ok), vec![json!({"a": 1})]);
        for bad in ["data: {\"a\":1}\n\n", "data: {\"a\":1}\ndata: [DONE]\n\n", "event: x\n\ndata: [DONE]\n\n"] {
            assert!(std::panic::catch_unwind(|| sse_events("bad", bad)).is_err(), "{bad:?}");
        }
    }
}
