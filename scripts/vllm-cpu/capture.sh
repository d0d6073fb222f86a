#!/usr/bin/env bash
# Capture a real vLLM's responses (raw bodies) as fixtures for vllm-sim's API-parity test:
#   scripts/vllm-cpu/capture.sh http://127.0.0.1:8000 tests/fixtures/vllm-0.32.0
# The requests are tests/src/shapes.rs `cases()`: change both together.
# Writes one file per case and status.txt ("file HTTP-status" per line).
set -euo pipefail
url="${1:?usage: capture.sh URL OUT_DIR}"
out="${2:?usage: capture.sh URL OUT_DIR}"
mkdir -p "$out"
model="$(curl -sf "$url/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')"
: >"$out/status.txt"
case_() { # file method path [json-body]
    local file="$1" method="$2" path="$3" body="${4:-}"
    local code
    if [ -n "$body" ]; then
        code="$(curl -s -o "$out/$file" -w '%{http_code}' -X "$method" -H 'Content-Type: application/json' \
            --data-binary "$body" "$url$path")"
    else
        code="$(curl -s -o "$out/$file" -w '%{http_code}' -X "$method" "$url$path")"
    fi
    echo "$file $code" >>"$out/status.txt"
}
long="$(python3 -c 'print(" ".join(["the"] * 3000))')"
case_ models.json GET /v1/models
case_ completions.json POST /v1/completions "{\"model\":\"$model\",\"prompt\":\"the time of day\",\"max_tokens\":5,\"ignore_eos\":true}"
case_ completions.sse POST /v1/completions "{\"model\":\"$model\",\"prompt\":\"the time of day\",\"max_tokens\":5,\"ignore_eos\":true,\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
case_ completions-stream-1.sse POST /v1/completions "{\"model\":\"$model\",\"prompt\":\"the time\",\"max_tokens\":3,\"ignore_eos\":true,\"stream\":1}"
case_ chat.json POST /v1/chat/completions "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"the time of day\"}],\"max_tokens\":5,\"ignore_eos\":true}"
case_ chat.sse POST /v1/chat/completions "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"the time of day\"}],\"max_tokens\":5,\"ignore_eos\":true,\"stream\":true,\"stream_options\":{\"include_usage\":true}}"
case_ error-unknown-model.json POST /v1/completions '{"model":"no-such-model","prompt":"the","max_tokens":2}'
case_ error-bad-json.json POST /v1/completions '{"model":'
case_ error-empty-messages.json POST /v1/chat/completions "{\"model\":\"$model\",\"messages\":[],\"max_tokens\":2}"
case_ error-max-tokens-0.json POST /v1/completions "{\"model\":\"$model\",\"prompt\":\"the\",\"max_tokens\":0}"
case_ error-too-long.json POST /v1/completions "{\"model\":\"$model\",\"prompt\":\"$long\",\"max_tokens\":16}"
case_ error-not-found.json GET /v1/nothing
cat "$out/status.txt"
