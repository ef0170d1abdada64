#!/usr/bin/env bash
# Issue 12 on a GPU machine: `install --build --backends sage` builds SageAttention 2 from a
# carried source for this GPU's SM only, installs, verifies and locks it; a second venv then
# installs it from the wheelhouse without building. With ALL_ARCH_LIMIT=SECONDS it also times
# the same source built for every SM it supports (the cost the single-SM build avoids), cut
# off after that many seconds.
#
#   SRC=.whl/SageAttention-<commit>-noassets.tar.gz OUT=$OUT bash benchmarks/gpu_build.sh
#   SRC=... OUT=$OUT ALL_ARCH_ONLY=1 ALL_ARCH_LIMIT=540 bash benchmarks/gpu_build.sh
#
# CEA runs the tool (default: this checkout, `python3 -m comfy_env_attn`, whose interpreter
# has the tool's requirements); BASE is the interpreter whose torch the venvs see. Venvs,
# cache and wheelhouse go to WORK; OUT gets only the log, build.json, the locks and the build
# logs (a handful of files).
set -uo pipefail
cd "$(dirname "$0")/.."
SRC=$(realpath "${SRC:?carried SageAttention source archive or folder}")
OUT=${OUT:-/tmp/gpu-build}
WORK=${WORK:-/tmp/gpu-build-work}
BASE=${BASE:-python3}
CEA=${CEA:-python3 -m comfy_env_attn}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 UV_OFFLINE=1 COMFY_ENV_ATTN_CACHE_DIR=$WORK/cache \
  COMFY_ENV_ATTN_WHEELHOUSE=$WORK/wheelhouse
step() { echo; echo "=== $(date +%T) $*"; }
secs() { echo $(( $(date +%s) - $1 )); }

step "machine"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
$BASE -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)'
(nvcc --version || "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version) | tail -2
gcc --version | head -1; ninja --version; nproc; free -g | head -2
sha256sum "$SRC" 2>/dev/null

mkvenv() {  # a venv that sees the base environment's torch; the base stays untouched
  rm -rf "$1"
  $BASE -m venv --system-site-packages "$1"
  if ! "$1/bin/python" -c 'import torch' 2>/dev/null; then
    base=$($BASE -c 'import site; print(site.getsitepackages()[0])')
    echo "$base" > "$("$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/base-env.pth"
  fi
}
V1=$WORK/venv1 V2=$WORK/venv2
mkvenv "$V1"; mkvenv "$V2"

if [ -z "${ALL_ARCH_ONLY:-}" ]; then
step "checks only (nothing fetched or compiled)"
$CEA build --dry-run --python "$V1/bin/python" --backends sage --source "$SRC"; echo "exit $?"

step "install --build --backends sage (this GPU's SM only)"
t=$(date +%s)
$CEA install --build --python "$V1/bin/python" --backends sage --source "$SRC" \
  --shapes 1x24x4608x128,1x40x32760x128
echo "exit $? after $(secs "$t") s"
cp "$V1/pylock.comfy-env-attn.toml" "$OUT/lock-venv1.toml"
find "$WORK/wheelhouse" -name build.json -exec cp {} "$OUT/build.json" \; -exec cat {} \;
cp "$(ls -t "$WORK"/cache/build-logs/*.log | head -1)" "$OUT/build-sm.log"

step "a second venv: install from the wheelhouse (no build)"
t=$(date +%s)
$CEA install --python "$V2/bin/python" --backends sage --shapes 1x24x4608x128
echo "exit $? after $(secs "$t") s"
cp "$V2/pylock.comfy-env-attn.toml" "$OUT/lock-venv2.toml"
$CEA doctor --python "$V2/bin/python" | tail -8
fi

if [ -n "${ALL_ARCH_LIMIT:-}" ]; then
  step "the same source for every SM it supports (cut off after $ALL_ARCH_LIMIT s)"
  { echo 'gpus = ["8.0", "8.6", "8.9", "9.0", "12.0", "12.1"]'
    $CEA probe --python "$V1/bin/python" --toml | grep -v '^gpu'; } > "$WORK/all-sm.toml"
  t=$(date +%s)
  COMFY_ENV_ATTN_WHEELHOUSE=$WORK/wheelhouse-all timeout "$ALL_ARCH_LIMIT" \
    $CEA build --python "$V1/bin/python" --backends sage --source "$SRC" \
    --system "$WORK/all-sm.toml"
  echo "exit $? after $(secs "$t") s"
  log=$(ls -t "$WORK"/cache/build-logs/*.log | head -1)
  cp "$log" "$OUT/build-all-sm.log"
  echo "ninja steps done per extension when it ended:"
  grep -o '\[[0-9]*/[0-9]*\]' "$log" | sort -t/ -k2 -n | tail -5
fi
