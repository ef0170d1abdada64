#!/usr/bin/env bash
# Run comfy-env-attn on a GPU machine as a user would, from carried wheels (no network).
#
#   WHEELS=/path/to/wheels SAGE2=/path/to/sage2-wheel-folder OUT=/path/to/results \
#       bash benchmarks/gpu_validate.sh
#
# WHEELS holds: uv, tomli-w, hatchling (+ pathspec, pluggy, trove-classifiers, tomlkit,
# packaging) to install this package; sageattention 1.0.6, xformers, flash-attn-4 and its
# requirements (nvidia-cutlass-dsl and its libs, quack-kernels, apache-tvm-ffi,
# torch-c-dlpack-ext). SAGE2 holds a SageAttention 2 wheel built on that machine.
# Everything goes to $OUT/log.txt; the plan, lock and benchmark tables to $OUT/*.json|toml.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
WHEELS=${WHEELS:?folder of carried wheels}
SAGE2=${SAGE2:-}
VENV=${VENV:-/tmp/cea-venv}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 UV_OFFLINE=1 COMFY_ENV_ATTN_TIMEOUT=${COMFY_ENV_ATTN_TIMEOUT:-10}
step() { echo; echo "=== $(date +%T) $*"; }

step "machine"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)'

step "venv that sees the base environment's torch (the base stays untouched)"
rm -rf "$VENV"
python3 -m venv --system-site-packages "$VENV"
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  # the base python3 is itself a venv: point the new one at its site-packages
  base=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  echo "$base" > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/base-env.pth"
fi
"$VENV/bin/python" -c 'import torch; print("venv sees torch", torch.__version__)'
"$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" . || exit 1
CEA="$VENV/bin/comfy-env-attn"

step "probe"
"$CEA" probe
"$CEA" probe --json > "$OUT/probe.json"; cat "$OUT/probe.json"

step "plan (embedded index only)"
"$CEA" plan -v | head -80
"$CEA" plan --json > "$OUT/plan.json"

if [ -z "${QUICK:-}" ]; then
  step "install from the embedded index alone (this machine reaches no wheel host)"
  "$CEA" install --backends sage,flash,xformers,flash4 --no-verify; echo "exit $?"

  step "install from carried wheels: sageattention 1.0.6, xformers, flash-attn-4"
  "$CEA" install --find-links "$WHEELS" --backends sage,xformers,flash4; echo "exit $?"
else
  step "install flash-attn-4 from carried wheels (QUICK: no offline demo, no 1.0.6)"
  "$CEA" install --find-links "$WHEELS" --backends flash4 --no-verify; echo "exit $?"
fi

if [ -n "$SAGE2" ]; then
  step "install SageAttention 2 built here (replaces 1.0.6), then verify everything"
  "$CEA" plan --find-links "$SAGE2" --find-links "$WHEELS" --backends sage
  "$CEA" install --find-links "$SAGE2" --find-links "$WHEELS" --backends sage --no-verify
  echo "exit $?"
fi

step "verify"
"$CEA" verify; echo "exit $?"
cp "$VENV/pylock.comfy-env-attn.toml" "$OUT/" 2>/dev/null

step "doctor"
"$CEA" doctor; echo "exit $?"

step "lock"
"$CEA" lock; echo "exit $?"
"$CEA" launch-args; "$CEA" launch-args --exact

step "dispatcher benchmark (bf16; each verified backend directly, and auto)"
"$VENV/bin/python" benchmarks/bench_dispatch.py --gpu --json "$OUT/dispatch.json"
"$VENV/bin/python" benchmarks/bench_dispatch.py --calls 20000
step "done"
