"""Prove each backend in a subprocess of the target Python: a real attention call against a
float32 SDPA reference, then a short timed run at representative shapes.

Thresholds (against float32 SDPA on random normal inputs, [2, 4, 256, D]):

| backend kind                         | dtype    | max abs error | cosine >= |
|--------------------------------------|----------|---------------|-----------|
| exact (sdpa, flash*, xformers)       | float32  | 1e-3          | 0.99999   |
|                                      | float16  | 5e-3          | 0.9999    |
|                                      | bfloat16 | 3e-2          | 0.999     |
| quantized (sage: int8/fp8)           | any      | 0.1           | 0.99      |
| quantized (sage3: fp4)               | any      | 0.3           | 0.97      |

Exact kernels land within bf16 rounding of the reference (FA4: 5e-4 to 1e-3 on an H100);
SageAttention 2 reaches cosine 0.9993, max error 0.005 to 0.02 (FACTS.md section 6).
A backend producing black images (NaN, zeros, garbage) misses these by orders of magnitude.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_env_attn.core.backends import BACKENDS

SCRIPT = Path(__file__).with_name("_target.py")
MARK = "@@RESULT@@"

EXACT = {"float32": {"max_abs": 1e-3, "min_cosine": 0.99999},
         "float16": {"max_abs": 5e-3, "min_cosine": 0.9999},
         "bfloat16": {"max_abs": 3e-2, "min_cosine": 0.999}}
QUANTIZED = {dt: {"max_abs": 0.1, "min_cosine": 0.99} for dt in EXACT}
FP4 = {dt: {"max_abs": 0.3, "min_cosine": 0.97} for dt in EXACT}

# Head dims each backend claims beyond the required 64 and 128.
EXTRA_DIMS = {"sage": [96], "flash": [96, 256], "flash3": [256], "flash4": [96],
              "xformers": [96, 256], "sdpa": [96, 256], "sage3": []}

GPU_SHAPES = [[2, 20, 1024, 64], [2, 10, 4096, 64], [1, 24, 4608, 128],
              [1, 24, 16896, 128], [1, 40, 32760, 128]]
CPU_SHAPES = [[1, 4, 256, 64], [1, 4, 1024, 64], [1, 4, 512, 128]]


def thresholds(backend: str) -> dict[str, dict[str, float]]:
    if backend == "sage3":
        return FP4
    return QUANTIZED if BACKENDS[backend].quantized else EXACT


@dataclass(frozen=True)
class Options:
    device: str | None = None  # None: cuda when torch sees a GPU, else cpu
    shapes: list[list[int]] | None = None  # None: GPU_SHAPES or CPU_SHAPES
    timeout: float = float(os.environ.get("COMFY_ENV_ATTN_VERIFY_TIMEOUT", "600"))
    min_time: float = 0.5
    bench: bool = True
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    backend: str
    passed: bool
    data: dict[str, Any]
    error: str | None = None

    @property
    def bench(self) -> list[dict[str, Any]]:
        return list(self.data.get("bench", []))

    def summary(self) -> str:
        if not self.passed:
            return f"failed: {self.error}"
        checks = self.data.get("checks", [])
        worst = max((c.get("max_abs", 0.0) for c in checks if c.get("passed")), default=0.0)
        cos = min((c.get("cosine", 1.0) for c in checks if c.get("passed")), default=1.0)
        return f"passed: max abs error {worst:.2g}, cosine >= {cos:.5f}"


def _shapes(cfg: dict[str, Any], opts: Options) -> dict[str, Any]:
    if not opts.bench:
        cfg["shapes"] = []
    elif opts.shapes is not None:
        cfg["shapes"] = opts.shapes
    else:  # the script picks by the device it finds
        cfg["gpu_shapes"], cfg["cpu_shapes"] = GPU_SHAPES, CPU_SHAPES
    return cfg


def _config(backend: str, opts: Options) -> dict[str, Any]:
    return _shapes({"backend": backend, "device": opts.device, "head_dims": [64, 128],
                    "extra_head_dims": EXTRA_DIMS.get(backend, []),
                    "thresholds": thresholds(backend), "min_time": opts.min_time}, opts)


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _run(python: str, cfg: dict[str, Any], opts: Options
         ) -> subprocess.CompletedProcess[str] | str:
    """The script's run, or why it could not start or answer."""
    env = {**os.environ, **opts.env, "PYTHONFAULTHANDLER": "1"}  # a crash prints its stack
    try:
        return subprocess.run([python, str(SCRIPT), json.dumps(cfg)], capture_output=True,
                              text=True, timeout=opts.timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"no answer within {opts.timeout:.0f} s (killed)"
    except OSError as e:
        return f"cannot run {python}: {e}"


def _result_line(r: subprocess.CompletedProcess[str]) -> dict[str, Any] | None:
    line = next((ln for ln in reversed(r.stdout.splitlines()) if ln.startswith(MARK)), None)
    return None if line is None else dict(json.loads(line[len(MARK):]))


def run_one(python: str, backend: str, opts: Options, *, check_only: bool = False) -> Result:
    cfg = _config(backend, opts)
    if check_only:
        cfg["check_only"] = True
    t0 = time.monotonic()
    r = _run(python, cfg, opts)
    if isinstance(r, str):
        return Result(backend, False, {"stage": "start" if "cannot run" in r else "timeout"}, r)
    data = _result_line(r)
    tail = (r.stderr.strip().splitlines() or [""])[-1][:300]
    if data is None:
        if r.returncode < 0:
            why = f"the verification process crashed with {_signal_name(r.returncode)}"
        else:
            why = f"the verification process exited {r.returncode} without a result"
        return Result(backend, False, {"stage": "crash", "returncode": r.returncode,
                                       "stderr_tail": r.stderr[-2000:]},
                      f"{why}{f': {tail}' if tail else ''}")
    data["wall_s"] = round(time.monotonic() - t0, 3)
    if r.returncode != 0 and data.get("passed"):
        return Result(backend, False, data, f"exited {r.returncode} after its checks: {tail}")
    return Result(backend, bool(data.get("passed")), data, data.get("error"))


def verify(python: str, backends: list[str], opts: Options | None = None,
           progress: Any = None) -> dict[str, Result]:
    """Each backend's accuracy in its own process (a crash there takes nothing else down),
    SDPA first; then the ones that passed timed together in one process, so that the
    numbers `auto` compares come from the same clocks. If that process fails, each is
    timed alone."""
    opts = opts or Options()
    results: dict[str, Result] = {}
    order = ["sdpa"] + [b for b in backends if b != "sdpa"]
    for name in order:
        if progress:
            progress(f"verifying {name} ...")
        res = run_one(python, name, opts, check_only=opts.bench)
        results[name] = res
        if progress:
            progress(f"  {name}: {res.summary()}")
    passed = [n for n in order if results[n].passed]
    if not opts.bench or not passed:
        return results
    if progress:
        progress(f"timing {', '.join(passed)} together ...")
    cfg = _shapes({"backends": passed, "device": opts.device, "min_time": opts.min_time}, opts)
    r = _run(python, cfg, opts)
    together = None if isinstance(r, str) else _result_line(r)
    for name in passed:
        bench = (together or {}).get("bench", {}).get(name)
        if bench is None:  # that process failed: time this one alone
            if progress:
                progress(f"  timing {name} alone ({r if isinstance(r, str) else 'no result'})")
            alone = run_one(python, name, opts)
            bench = alone.data.get("bench", [])
        results[name].data["bench"] = bench
    return results
