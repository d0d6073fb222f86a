# Shared helpers for the measurement scripts (sourced, not run). Loopback only.

BIN=${BIN:-target/release}
HZ=$(getconf CLK_TCK)

# wait_http URL [SECONDS]: until URL answers 200 or the time is up.
wait_http() {
    local url=$1 limit=${2:-30} i=0
    while [ "$i" -lt $((limit * 10)) ]; do
        curl -sf -o /dev/null "$url" && return 0
        sleep 0.1; i=$((i + 1))
    done
    echo "no answer from $url after ${limit}s" >&2
    return 1
}

# cpu_ticks PID: utime+stime in clock ticks (fields 14 and 15 of /proc/PID/stat; the name
# in field 2 has no spaces for our binaries).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# mem PID: "VmRSS=... VmHWM=..." in kB.
mem() { awk '/^VmRSS|^VmHWM/ {printf "%s=%s kB ", $1, $2}' "/proc/$1/status" | tr -d ':'; echo; }

# cpu_share PID T0_TICKS T0_SECONDS: percent of one core since (ticks, seconds).
cpu_share() {
    local t1 s1; t1=$(cpu_ticks "$1"); s1=$(date +%s.%N)
    awk -v a="$2" -v b="$t1" -v s0="$3" -v s1="$s1" -v hz="$HZ" \
        'BEGIN { printf "%.2f%% of one core (%.2f s CPU in %.1f s)\n", 100 * (b - a) / hz / (s1 - s0), (b - a) / hz, s1 - s0 }'
}

# free_port: a loopback port nobody listens on.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# agent_of PID: the gpu-agent process at or under PID (e.g. timeout -> /usr/bin/time -> gpu-agent).
agent_of() {
    local p=$1 i=0
    while [ "$(cat "/proc/$p/comm" 2>/dev/null)" != gpu-agent ]; do
        p=$(awk '{print $1}' "/proc/$p/task/$p/children" 2>/dev/null)
        i=$((i + 1))
        if [ -z "$p" ] || [ "$i" -gt 4 ]; then echo "no gpu-agent under $1" >&2; return 1; fi
    done
    echo "$p"
}

# wrk_paced URL DURATION THREADS CONNS RATE: wrk at about RATE requests/s in all (0: as fast as
# it can). wrk has no rate option; a Lua delay() of CONNS*1000/RATE ms between each connection's
# requests caps it (each connection waits, then sends, then waits for the answer, so the rate
# reached is a little under RATE; wrk reports the real one).
wrk_paced() {
    local url=$1 dur=$2 threads=$3 conns=$4 rate=$5 script=""
    if [ "$rate" -gt 0 ]; then
        script=$(mktemp /tmp/wrk-pace.XXXXXX.lua)
        echo "function delay() return $(( conns * 1000 / rate )) end" >"$script"
        wrk -t"$threads" -c"$conns" -d"${dur}s" --latency -s "$script" "$url"
        rm -f "$script"
    else
        wrk -t"$threads" -c"$conns" -d"${dur}s" --latency "$url"
    fi
}

# stop_pids_and_remove_dir: the EXIT trap of scripts that start several processes: kills and
# reaps every pid in the caller's `pids` array, then removes the caller's temp `dir`.
stop_pids_and_remove_dir() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$dir"
}
