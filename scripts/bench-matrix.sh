#!/usr/bin/env bash
# The governor bench over every shipped trace, policy and seed, one JSON line per run with the
# wall-clock fields (decision times) left out, so two builds can be compared byte for byte:
#   scripts/bench-matrix.sh [GPU_AGENT] > a.jsonl; ...; diff a.jsonl b.jsonl
# SEEDS (default "1 2 3") and POLICIES (default "default static:1200 agft governor") override.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-target/release/gpu-agent}"
seeds="${SEEDS:-1 2 3}"
policies="${POLICIES:-default static:1200 agft governor}"
for trace in config/traces/*.csv; do
    for policy in $policies; do
        for seed in $seeds; do
            RUST_LOG=error "$bin" bench --trace "$trace" --policy "$policy" --seed "$seed" --json \
                | python3 -c 'import json,sys; d=json.load(sys.stdin); [d.pop(k,None) for k in ("mean_decision_us","max_decision_us")]; print(json.dumps(d, sort_keys=True))'
        done
    done
done
