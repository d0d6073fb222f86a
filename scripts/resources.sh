#!/usr/bin/env bash
# Resident memory and CPU share of the agent, from procfs over WINDOW (60) seconds after a
# WARMUP (10) s, and from `/usr/bin/time -v` when it exits (SIGTERM). Loopback only.
#   idle: vllm-sim with no load + gpu-agent with [gpu] backend = "sim" scraping it.
#   busy: gpu-agent --simulate (its simulated vLLM engine and built-in load run inside the
#         agent process, so its figures include them).
# Needs: cargo build --release --workspace; /usr/bin/time (apt-get install time); curl.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/measure-lib.sh
WINDOW=${WINDOW:-60}; WARMUP=${WARMUP:-10}
dir=$(mktemp -d /tmp/gpu-agent-res.XXXXXX)
pids=()
trap stop_pids_and_remove_dir EXIT INT TERM
limit=$((WINDOW + WARMUP + 60))

# measure NAME PORT TPID: procfs figures of the agent (under /usr/bin/time), then stop it.
measure() {
    local name=$1 port=$2 tpid=$3 apid t0 s0
    wait_http "http://127.0.0.1:$port/healthz" 30
    apid=$(agent_of "$tpid")
    sleep "$WARMUP"
    t0=$(cpu_ticks "$apid"); s0=$(date +%s.%N)
    local peak=0 r
    for _ in $(seq 1 "$WINDOW"); do
        sleep 1
        r=$(awk '/^VmRSS/ {print $2}' "/proc/$apid/status"); [ "$r" -gt "$peak" ] && peak=$r
    done
    echo "$name: CPU $(cpu_share "$apid" "$t0" "$s0")"
    echo "$name: $(mem "$apid")(largest VmRSS sampled each second: $peak kB)"
    kill -TERM "$apid"; wait "$tpid" || true
    grep -E 'Maximum resident|User time|System time|Elapsed|Percent of CPU' "$dir/time.$name" | sed "s/^\s*/$name (time -v): /"
}

echo "$(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
# idle
vport=$(free_port); aport=$(free_port)
timeout $limit "$BIN/vllm-sim" --host 127.0.0.1 --port "$vport" >"$dir/vllm.log" 2>&1 & pids+=($!)
wait_http "http://127.0.0.1:$vport/metrics" 30
cat >"$dir/agent.toml" <<TOML
[agent]
listen = "127.0.0.1:$aport"
state_dir = "$dir/state"
[vllm]
metrics_url = "http://127.0.0.1:$vport/metrics"
[gpu]
backend = "sim"
[control]
socket = "$dir/agent.sock"
TOML
RUST_LOG=warn timeout $limit /usr/bin/time -v -o "$dir/time.idle" "$BIN/gpu-agent" --config "$dir/agent.toml" \
    >"$dir/agent-idle.log" 2>&1 & tpid=$!; pids+=($tpid)
measure idle "$aport" "$tpid"

# busy
bport=$(free_port)
TMPDIR=$dir RUST_LOG=warn timeout $limit /usr/bin/time -v -o "$dir/time.busy" "$BIN/gpu-agent" --simulate \
    --listen "127.0.0.1:$bport" --socket "$dir/busy.sock" >"$dir/agent-busy.log" 2>&1 & tpid=$!; pids+=($tpid)
measure busy "$bport" "$tpid"
echo "load average $(cut -d' ' -f1-3 /proc/loadavg)"
