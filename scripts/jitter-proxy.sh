#!/usr/bin/env bash
# Decision-cycle jitter to sub-millisecond: the agent scrapes vLLM first thing in each cycle,
# so a stamping proxy in front of vllm-sim records every cycle start (scripts/cycle-probe.py
# proxy). Runs vllm-sim, the proxy, the agent (config: backend "sim", metrics_url = proxy),
# `gpu-agent loadgen` on vllm-sim (LOAD=1) and `wrk` on the agent's /metrics (WRK=1; paced at
# RATE requests/s when RATE > 0), all on
# loopback, for DURATION (60) seconds, then stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/measure-lib.sh
DURATION=${DURATION:-60}; THREADS=${THREADS:-2}; CONNS=${CONNS:-32}; WRK=${WRK:-1}; LOAD=${LOAD:-1}; RATE=${RATE:-0}
TRACE=${TRACE:-config/traces/decode-heavy.csv}
dir=$(mktemp -d /tmp/gpu-agent-jitter.XXXXXX)
pids=()
trap stop_pids_and_remove_dir EXIT INT TERM
vport=$(free_port); pport=$(free_port); aport=$(free_port)
limit=$((DURATION + 60))

timeout $limit "$BIN/vllm-sim" --host 127.0.0.1 --port "$vport" >"$dir/vllm.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$vport/metrics" 30
cat >"$dir/agent.toml" <<TOML
[agent]
listen = "127.0.0.1:$aport"
state_dir = "$dir/state"
[vllm]
metrics_url = "http://127.0.0.1:$pport/metrics"
[gpu]
backend = "sim"
[control]
socket = "$dir/agent.sock"
TOML
python3 scripts/cycle-probe.py proxy --listen "127.0.0.1:$pport" --upstream "http://127.0.0.1:$vport/metrics" \
    --duration "$((DURATION + 5))" >"$dir/proxy.txt" 2>&1 & proxy=$!; pids+=($proxy)
sleep 0.5
RUST_LOG=${RUST_LOG:-warn} timeout $limit "$BIN/gpu-agent" --config "$dir/agent.toml" >"$dir/agent.log" 2>&1 & pids+=($!)
agent=$!
wait_http "http://127.0.0.1:$aport/healthz" 30
apid=$(agent_of "$agent")
if [ "$LOAD" = 1 ]; then
    timeout $limit "$BIN/gpu-agent" loadgen --url "http://127.0.0.1:$vport" --trace "$TRACE" >"$dir/loadgen.log" 2>&1 & pids+=($!)
fi
echo "agent pid $apid; wrk=$WRK rate=$RATE loadgen=$LOAD; $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
curl -sf "http://127.0.0.1:$aport/metrics" >"$dir/before.txt"
t0=$(cpu_ticks "$apid"); s0=$(date +%s.%N)
if [ "$WRK" = 1 ]; then
    wrk_paced "http://127.0.0.1:$aport/metrics" "$DURATION" "$THREADS" "$CONNS" "$RATE"
else
    sleep "$DURATION"
fi
echo "agent CPU: $(cpu_share "$apid" "$t0" "$s0"); memory: $(mem "$apid")"
curl -sf "http://127.0.0.1:$aport/metrics" >"$dir/after.txt"
python3 scripts/cycle-probe.py hist "$dir/before.txt" "$dir/after.txt" || true
wait "$proxy" || true
cat "$dir/proxy.txt"
echo "load average $(cut -d' ' -f1-3 /proc/loadavg)"
grep -E 'WARN|ERROR' "$dir/agent.log" | tail -5 || true
