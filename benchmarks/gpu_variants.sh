#!/usr/bin/env bash
# Issue 11 on a GPU machine: build SageAttention 2 for this GPU's SM from a carried source,
# install it with comfy-env-attn into a venv that sees the base torch (sage and its variant
# sage_fp16 are verified and locked), then compare the two kernels (gpu_sage_variants.py).
#
#   SAGE_SRC=/path/to/SageAttention OUT=/path/to/results bash benchmarks/gpu_variants.sh
#
# SAGE_SRC is a source tree (or a .tar of one). With WHEELS=FOLDER (carried wheels, e.g.
# flash-attn-4 and its requirements) the same install also takes EXTRA (default flash4) from
# there, its requirements resolved offline from the folder; with COMFYUI_DIR, the node runs
# at Flux and Wan sizes afterwards (gpu_node.py). CEA runs the tool (default: this checkout
# with `python3 -m comfy_env_attn`; its interpreter needs the tool's requirements). With
# COMPARE=DIR (a checkout of an earlier commit), the install overhead is also timed for it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-variants}
WORK=${WORK:-/tmp/gpu-variants-work}
CEA=${CEA:-python3 -m comfy_env_attn}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 UV_OFFLINE=1 COMFY_ENV_ATTN_CACHE_DIR=$WORK/cache
step() { echo; echo "=== $(date +%T) $*"; }

step "machine"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
python3 -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)'
cc=$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')

step "build SageAttention 2 for sm $cc only"
src="$WORK/sage-src"
rm -rf "$src" "$WORK/wheel"; mkdir -p "$src"
if [ -d "${SAGE_SRC:?SageAttention source tree or .tar}" ]; then cp -r "$SAGE_SRC/." "$src"
else tar -xf "$SAGE_SRC" -C "$src"; fi
[ -f "$src/README.md" ] || echo "# SageAttention" > "$src/README.md"
t0=$(date +%s)
(cd "$src" && TORCH_CUDA_ARCH_LIST=$cc MAX_JOBS=${MAX_JOBS:-16} python3 -m pip wheel -q \
  --no-build-isolation --no-deps -w "$WORK/wheel" .) > "$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; exit 1; }
echo "built in $(( $(date +%s) - t0 )) s: $(ls "$WORK/wheel")"

step "venv that sees the base torch; install sage (its variant comes with it), verify, lock"
VENV=$WORK/venv
rm -rf "$VENV"; python3 -m venv --system-site-packages "$VENV"
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  base=$(python3 -c 'import site; print(site.getsitepackages()[0])')
  echo "$base" > "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/base-env.pth"
fi
t0=$(date +%s)
links=(--find-links "$WORK/wheel"); backends=sage
if [ -n "${WHEELS:-}" ]; then links+=(--find-links "$WHEELS"); backends="sage,${EXTRA:-flash4}"; fi
$CEA install --python "$VENV/bin/python" "${links[@]}" --no-embedded-index \
  --backends "$backends" --json > "$OUT/install.json"; echo "exit $? in $(( $(date +%s) - t0 )) s"
python3 -c "import json; d=json.load(open('$OUT/install.json')); print('ok', d['ok']); [print(r['backend'], r['action'], r['version'], json.dumps(r['verification'])[:300], r['note']) for r in d['backends']]" || head -c 3000 "$OUT/install.json"
cp "$VENV/pylock.comfy-env-attn.toml" "$OUT/" 2>/dev/null
$CEA lock --python "$VENV/bin/python" | head -40

step "install overhead with the built wheel, and grown to 60 MB (fresh venvs, against raw uv --no-cache)"
python3 benchmarks/gpu_install_overhead.py "$WORK/wheel" --runs "${RUNS:-9}" --pad-mb 0 60 \
  --runner tool target ${COMPARE:+--compare "$COMPARE"} --json "$OUT/install_overhead.json"

step "the two kernels side by side"
PYTHONPATH=$PWD "$VENV/bin/python" benchmarks/gpu_sage_variants.py --json "$OUT/variants.json"
step "which SDPA kernel each path runs (no lock: the dispatcher's plain SDPA)"
PYTHONPATH=$PWD COMFY_ENV_ATTN_LOCK=/nonexistent "$VENV/bin/python" \
  benchmarks/gpu_sdpa_paths.py --json "$OUT/sdpa_paths.json"
if [ -n "${COMFYUI_DIR:-}" ]; then
  step "the node at Flux and Wan sizes"
  PYTHONPATH=$PWD COMFY_ENV_ATTN_LOCK="$VENV/pylock.comfy-env-attn.toml" \
    "$VENV/bin/python" benchmarks/gpu_node.py --json "$OUT/node.json"
fi
step "done"
