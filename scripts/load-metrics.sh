#!/usr/bin/env bash
# Load on the agent's /metrics while its decision loop runs (gpu-agent --simulate: simulated
# GPU, vLLM and built-in load), loopback only, bounded in time.
#   1. BASELINE_S (30) seconds without load: cycle jitter from a 10 ms poll of gpu_agent_cycles_total.
#   2. DURATION (60) seconds of `wrk -tTHREADS -cCONNS --latency .../metrics` (paced at RATE
#      requests/s when RATE > 0), with the same poll,
#      the cycle-duration histogram before/after, and the agent's CPU share and memory.
# Needs: cargo build --release --workspace; wrk (apt-get install wrk); python3; curl.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/measure-lib.sh
DURATION=${DURATION:-60}; BASELINE_S=${BASELINE_S:-30}; THREADS=${THREADS:-2}; CONNS=${CONNS:-32}; RATE=${RATE:-0}
PORT=${PORT:-$(free_port)}
dir=$(mktemp -d /tmp/gpu-agent-load.XXXXXX)
agent=""; poller=""
cleanup() {
    [ -n "$poller" ] && kill "$poller" 2>/dev/null || true
    [ -n "$agent" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM
url=http://127.0.0.1:$PORT

# TMPDIR keeps the simulation's state dir ours (not shared with another --simulate).
TMPDIR=$dir RUST_LOG=${RUST_LOG:-warn} timeout $((BASELINE_S + DURATION + 120)) \
    "$BIN/gpu-agent" --simulate --listen "127.0.0.1:$PORT" --socket "$dir/agent.sock" >"$dir/agent.log" 2>&1 &
agent=$!
wait_http "$url/healthz" 30
apid=$(agent_of "$agent")
sleep 5   # a few cycles so the governor and vllm-sim are running
echo "agent pid $apid on $url; $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"

echo "== baseline: ${BASELINE_S}s, no load"
python3 scripts/cycle-probe.py poll "$url/metrics" --interval 0.01 --duration "$BASELINE_S" || true

echo "== wrk -t$THREADS -c$CONNS -d${DURATION}s --latency $url/metrics (RATE=$RATE/s; 0: unpaced)"
curl -sf "$url/metrics" >"$dir/before.txt"
t0=$(cpu_ticks "$apid"); s0=$(date +%s.%N)
python3 scripts/cycle-probe.py poll "$url/metrics" --interval 0.01 --duration "$DURATION" >"$dir/poll.txt" &
poller=$!
wrk_paced "$url/metrics" "$DURATION" "$THREADS" "$CONNS" "$RATE"
wait "$poller" || true; poller=""
echo "agent CPU during wrk: $(cpu_share "$apid" "$t0" "$s0")"
echo "agent memory after wrk: $(mem "$apid")"
curl -sf "$url/metrics" >"$dir/after.txt"
cat "$dir/poll.txt"
python3 scripts/cycle-probe.py hist "$dir/before.txt" "$dir/after.txt" || true
echo "load average $(cut -d' ' -f1-3 /proc/loadavg)"
grep -E 'WARN|ERROR' "$dir/agent.log" | tail -5 || true
