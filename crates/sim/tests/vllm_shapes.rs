//! vllm-sim answers in real vLLM's shapes. The requests `scripts/vllm-cpu/capture.sh` sends to
//! a real vLLM 0.32.0 ([`cases`]) go to an in-process vllm-sim configured like the captured
//! server (the tiny model's name and 2048-token context); each answer must have vLLM's status
//! (`status.txt`) and the shape (object keys, recursively; value types; arrays by their first
//! element) of vLLM's answer in the case's file under `fixtures/vllm-0.32.0/`: the raw body, or
//! for a stream the raw SSE text, whose framing is checked and whose first, a middle, last-content
//! and (when asked for) usage chunks are compared.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use sim::engine::EngineConfig;
use sim::gpu::SimGpu;
use sim::server::SimServer;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vllm-0.32.0")
}

/// `v` reduced to its shape: each value by its type, objects key by key, arrays by their first
/// element (an empty array stays empty).
fn shape(v: &Value) -> Value {
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
            let _ = writeln!(out, "  {path}: vLLM {want}, vllm-sim {got}");
        }
        _ => {}
    }
}

fn assert_same_shape(what: &str, vllm: &Value, sim: &Value) {
    let mut diff = String::new();
    shape_diff("$", &shape(vllm), &shape(sim), &mut diff);
    assert!(diff.is_empty(), "{what}: vllm-sim's shape differs from vLLM's:\n{diff}vLLM: {vllm}\nvllm-sim: {sim}");
}

/// The events of an SSE body, checked to be `data: <JSON>` then a blank line each, ending with
/// `data: [DONE]`.
fn sse_events(what: &str, body: &str) -> Vec<Value> {
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
fn stream_roles(what: &str, events: &[Value]) -> Vec<(&'static str, Value)> {
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
struct Case {
    file: &'static str,
    method: &'static str,
    path: &'static str,
    body: String,
}

fn cases() -> Vec<Case> {
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
fn statuses(dir: &Path) -> Vec<(String, u16)> {
    let path = dir.join("status.txt");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("missing {} ({e})", path.display()));
    text.lines()
        .filter_map(|l| {
            let (file, code) = l.split_once(' ')?;
            Some((file.to_string(), code.trim().parse().ok()?))
        })
        .collect()
}

/// Sends one case's request; returns status and body.
async fn send(addr: SocketAddr, model: &str, case: &Case) -> (u16, String) {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = Request::builder()
        .method(Method::from_bytes(case.method.as_bytes()).expect("method"))
        .uri(format!("http://{addr}{}", case.path))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(case.body.replace("{model}", model))))
        .expect("request");
    let resp = client.request(req).await.expect("response");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_have_the_shapes_of_real_vllm_answers() {
    let dir = fixtures();
    let statuses = statuses(&dir);
    let cfg = EngineConfig { model_name: "tiny-llama".into(), max_model_len: 2048, ..EngineConfig::default() };
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let server = SimServer::start(cfg, Arc::new(SimGpu::h100(1)), addr).await.expect("starts");
    let cases = cases();
    for (file, _) in &statuses {
        assert!(cases.iter().any(|c| c.file == file), "{file} was captured but has no case here");
    }
    for case in &cases {
        let file = case.file;
        let path = dir.join(file);
        let recorded = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!("missing vLLM capture {} ({e}); see {}/README.md", path.display(), dir.display())
        });
        let want = statuses.iter().find(|(f, _)| f == file).map(|&(_, s)| s);
        let want = want.unwrap_or_else(|| panic!("{file}: no status in status.txt"));
        let (status, body) = send(server.local_addr(), server.model(), case).await;
        assert_eq!(status, want, "{file}: status; vllm-sim answered {body}");
        if file.ends_with(".sse") {
            let vllm = sse_events(&format!("{file} (vLLM)"), &recorded);
            let sim = sse_events(&format!("{file} (vllm-sim)"), &body);
            let vllm = stream_roles(&format!("{file} (vLLM)"), &vllm);
            let sim = stream_roles(&format!("{file} (vllm-sim)"), &sim);
            let names = |r: &[(&'static str, Value)]| r.iter().map(|(n, _)| *n).collect::<Vec<&'static str>>();
            assert_eq!(names(&sim), names(&vllm), "{file}: which chunks the stream has");
            for ((role, v), (_, s)) in vllm.iter().zip(&sim) {
                assert_same_shape(&format!("{file}, {role}"), v, s);
            }
        } else {
            let vllm: Value = serde_json::from_str(&recorded).unwrap_or_else(|e| panic!("{file}: not JSON: {e}"));
            let sim: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{file}: vllm-sim: not JSON: {e}"));
            assert_same_shape(file, &vllm, &sim);
        }
    }
    server.shutdown().await;
}

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
            "  $.b[0]: vLLM \"integer\", vllm-sim \"string\"\n",
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
