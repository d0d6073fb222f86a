#!/usr/bin/env bash
# Many concurrent agentctl clients: CLIENTS (100) shell loops each running
# `agentctl --socket S status --json` back to back for DURATION (20) seconds against
# `gpu-agent --simulate`; counts calls by exit code (0 ok, 1 refused/failed, e.g. "busy",
# 3 unreachable) and prints one message per failing kind. Loopback/Unix socket only.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/measure-lib.sh
DURATION=${DURATION:-20}; CLIENTS=${CLIENTS:-100}
PORT=${PORT:-$(free_port)}
dir=$(mktemp -d /tmp/gpu-agent-ctl.XXXXXX)
agent=""; workers=()
cleanup() {
    for p in "${workers[@]}"; do kill "$p" 2>/dev/null || true; done
    [ -n "$agent" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT INT TERM
TMPDIR=$dir RUST_LOG=${RUST_LOG:-warn} timeout $((DURATION + 90)) \
    "$BIN/gpu-agent" --simulate --listen "127.0.0.1:$PORT" --socket "$dir/agent.sock" >"$dir/agent.log" 2>&1 &
agent=$!
wait_http "http://127.0.0.1:$PORT/healthz" 30
apid=$(agent_of "$agent")
sleep 2
c0=$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^gpu_agent_cycles_total /{print $2}')
t0=$(cpu_ticks "$apid"); s0=$(date +%s.%N)
end=$(( $(date +%s) + DURATION ))
for i in $(seq 1 "$CLIENTS"); do
    (
        while [ "$(date +%s)" -lt "$end" ]; do
            rc=0
            "$BIN/agentctl" --socket "$dir/agent.sock" status --json >/dev/null 2>"$dir/err.$i" || rc=$?
            echo "$rc" >>"$dir/rc.$i"
            [ "$rc" = 0 ] || cp "$dir/err.$i" "$dir/lasterr.$rc" 2>/dev/null || true
        done
    ) &
    workers+=($!)
done
for p in "${workers[@]}"; do wait "$p" || true; done
workers=()
s1=$(date +%s.%N)
echo "agent CPU during the run: $(cpu_share "$apid" "$t0" "$s0"); memory: $(mem "$apid")"
c1=$(curl -sf "http://127.0.0.1:$PORT/metrics" | awk '/^gpu_agent_cycles_total /{print $2}')
cat "$dir"/rc.* | sort | uniq -c | awk -v s0="$s0" -v s1="$s1" -v n="$CLIENTS" \
    '{ tot += $1; by[$2] = $1 } END { el = s1 - s0; printf "%d clients, %.1f s: %d calls, %.0f calls/s; ", n, el, tot, tot / el;
       for (k in by) printf "exit %s: %d  ", k, by[k]; print "" }'
for f in "$dir"/lasterr.*; do [ -e "$f" ] && echo "exit ${f##*.}: $(head -c 300 "$f")"; done
echo "decision cycles during the run: $((c1 - c0)) (period 1 s)"
echo "load average $(cut -d' ' -f1-3 /proc/loadavg)"
grep -E 'WARN|ERROR' "$dir/agent.log" | sort | uniq -c | tail -5 || true
