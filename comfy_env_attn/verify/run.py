"""Prove each backend in a subprocess of the target Python, through the same adapter the
dispatcher calls (runtime/adapters.py, loaded there by _target.py): every call variant the
backend claims (plain, causal, custom scale, cross-attention of 4,096 queries against 77
keys, bool and additive masks, GQA) at every head dim it claims among those real models use
(40, 64, 80, 96, 128, 160, 256), in each dtype, against float32 SDPA on the same inputs.
The lock records which (variant, head dim, dtype) passed; the dispatcher routes only those.
Then the backends that passed are timed together at the shapes that decide a choice.

Besides the backends named: each one's variants (other kernels of its distribution, such as
sage_fp16 of sageattention) and the entry-point plugins the target has, each proven on its
own; a shipped plugin (taylor) only when named, or in `Options.include`.

The accuracy limits per kind of backend are core.backends' `Backend.thresholds()`: exact
kernels within bf16/fp16 rounding, quantized ones within 0.1 max abs error and cosine 0.99,
approximate plugins within the limits they register with.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import field, replace
from pathlib import Path
from typing import Any

from comfy_env_attn.core.backends import BACKENDS, MODEL_HEAD_DIMS, VARIANTS, variants
from comfy_env_attn.core.errors import AttnError, UsageError
from comfy_env_attn.core.process import own_group, stop_tree, stop_trees
from comfy_env_attn.core.records import dataclass

SCRIPT = Path(__file__).with_name("_target.py")
MARK = "@@RESULT@@"


class VerifyError(AttnError):
    """The target interpreter could not answer."""

# Shapes that decide a choice (FACTS.md section 7): SD 1.5 (head dims 40 and 80), SDXL, 77-token
# cross-attention, Flux at 1024 and 2048, video. [B, H, N, D] or [B, H, N, D, key/value length].
# Found on the H100: without a head dim 128 cross-attention shape, Wan's 512-token text
# cross-attention was chosen by self-attention timings (FA4) and ran 18% slower than SDPA.
GPU_SHAPES = [[2, 8, 4096, 40], [2, 20, 1024, 64], [2, 10, 4096, 64], [2, 10, 4096, 64, 77],
              [2, 8, 1024, 80], [1, 24, 4608, 128], [1, 24, 16896, 128], [1, 40, 32760, 128],
              [1, 40, 8192, 128, 512]]
CPU_SHAPES = [[1, 4, 256, 64], [1, 4, 1024, 64], [1, 4, 512, 128]]


HEAD_DIMS_ENV = "COMFY_ENV_ATTN_VERIFY_HEAD_DIMS"


def head_dims_from_env() -> tuple[int, ...] | None:
    """COMFY_ENV_ATTN_VERIFY_HEAD_DIMS=64,128: prove only these of the model head dims (a
    quicker verification, e.g. of taylor on a CPU; calls at the others go to SDPA)."""
    raw = os.environ.get(HEAD_DIMS_ENV, "").strip()
    if not raw:
        return None
    try:
        dims = tuple(dict.fromkeys(int(x) for x in raw.split(",") if x.strip()))
    except ValueError:
        dims = ()
    if not dims or any(d not in MODEL_HEAD_DIMS for d in dims):
        raise UsageError(f"{HEAD_DIMS_ENV}={raw!r}: give head dims among "
                         f"{', '.join(map(str, MODEL_HEAD_DIMS))}, comma-separated")
    return dims


@dataclass(frozen=True)
class Options:
    """How to verify: the device, shapes, time limits and whether to benchmark."""
    device: str | None = None  # None: cuda when torch sees a GPU, else cpu
    shapes: list[list[int]] | None = None  # None: GPU_SHAPES or CPU_SHAPES
    timeout: float = float(os.environ.get("COMFY_ENV_ATTN_VERIFY_TIMEOUT", "600"))
    min_time: float = 0.5
    bench: bool = True
    # None: every head dim the backend claims (or COMFY_ENV_ATTN_VERIFY_HEAD_DIMS's)
    head_dims: tuple[int, ...] | None = field(default_factory=head_dims_from_env)
    dtypes: tuple[str, ...] | None = None  # None: float16 and bfloat16 (GPU), float32 and
    #                                        bfloat16 (CPU)
    # processes proving at once; each backend's head dims are split across `shards`
    # processes (FlashAttention 4 compiles a kernel per variant and head dim: on a 16-core
    # GPU machine its checks took 78 s in one process)
    parallel: int = max(2, (os.cpu_count() or 2) // 2)
    shards: int = max(1, (os.cpu_count() or 2) // 4)
    env: dict[str, str] = field(default_factory=dict)
    # also prove these, which verification leaves out unless named (SHIPPED_PLUGINS):
    # `verify --include taylor`, through installer.reverify's fixed list of what is installed
    include: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    """One backend's verification: passed or not, its checks and timings, or the error."""
    backend: str
    passed: bool
    data: dict[str, Any]
    error: str | None = None

    @property
    def bench(self) -> list[dict[str, Any]]:
        return list(self.data.get("bench", []))

    @property
    def checks(self) -> list[dict[str, Any]]:
        return list(self.data.get("checks", []))

    @property
    def absent(self) -> bool:
        """A variant this build of its package lacks (core.backends.not_in_package): n/a,
        not a failure."""
        from comfy_env_attn.core.backends import not_in_package

        return not self.passed and not_in_package(self.backend, self.data.get("stage"))

    def summary(self) -> str:
        """One line: how many checks passed, and which variants failed where. An error of
        many lines (xformers' "No operator found" lists every kernel it tried) is joined
        into one and cut; --json has it whole."""
        if self.absent:
            return f"n/a: not in this package ({one_line(self.error)})"
        if not self.passed:
            return f"failed: {one_line(self.error)}"
        checks = self.checks
        good = [c for c in checks if c.get("passed")]
        worst = max((c.get("max_abs", 0.0) for c in good), default=0.0)
        cos = min((c.get("cosine", 1.0) for c in good), default=1.0)
        text = (f"passed {len(good)}/{len(checks)} checks: max abs error {worst:.2g}, "
                f"cosine >= {cos:.5f}")
        from comfy_env_attn.core.lockmodel import not_proven

        missing = not_proven((c["variant"], c["head_dim"], c["dtype"], bool(c.get("passed")))
                             for c in checks)
        return text + (f"; not proven: {missing}" if missing else "")


ONE_LINE_MAX = 300


def one_line(text: str | None) -> str:
    """An error's text as one line of at most ONE_LINE_MAX characters."""
    flat = " ".join((text or "").split())
    if len(flat) <= ONE_LINE_MAX:
        return flat
    return flat[:ONE_LINE_MAX].rstrip() + " ... (--json gives the whole error)"


# What torch says where it cannot use a GPU at all (a CPU build, no driver, none visible)
_NO_CUDA = ("not compiled with CUDA", "No CUDA GPUs are available", "Found no NVIDIA driver")


def baseline_failure(python: str, sdpa: Result, device: str | None) -> str:
    """Why nothing could be checked or timed: PyTorch's own SDPA, the reference, failed in
    the target; where torch says it cannot use a GPU there, the way to check on the CPU."""
    text = f"the SDPA baseline itself failed in {python}: {one_line(sdpa.error)}"
    if device != "cpu" and any(s in (sdpa.error or "") for s in _NO_CUDA):
        text += ("; this torch cannot use a GPU here: --device cpu checks on the CPU (a CUDA "
                 "backend is proven only on the GPU machine)")
    return text


def _config(backend: str, opts: Options) -> dict[str, Any]:
    cfg: dict[str, Any] = {"backend": backend, "device": opts.device}
    if opts.head_dims:
        cfg["head_dims"] = list(opts.head_dims)
    if opts.dtypes:
        cfg["dtypes"] = list(opts.dtypes)
    return cfg


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


class _Runs:
    """The verification processes of one verify() call, stopped together when it is
    interrupted (the threads waiting on them then end at once, where concurrent.futures
    would hold the command's exit until each ended by itself); once stopped, none starts (a
    worker thread the stop frees would take the next job)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen[str]] = set()
        self.stopped = False

    def start(self, cmd: list[str], env: dict[str, str]) -> subprocess.Popen[str] | None:
        with self.lock:
            if self.stopped:
                return None
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env, **own_group())
            self.running.add(proc)
            return proc

    def done(self, proc: subprocess.Popen[str]) -> None:
        with self.lock:
            self.running.discard(proc)

    def stop(self) -> None:
        """Each process a moment to end (Triton's and Inductor's temporary folders), then
        killed with all it started."""
        with self.lock:
            self.stopped = True
            running = list(self.running)
        stop_trees(running, grace=STOP_GRACE_S)


STOP_GRACE_S = 2.0  # an interrupted verification process's time to end by itself
DRAIN_S = 2.0  # a stopped process's output, read for no longer (a child it left holds it)
WAIT_STEP_S = 0.5  # how often a wait on a verification process looks for a stop


def _run(python: str, cfg: dict[str, Any], opts: Options, runs: _Runs | None = None
         ) -> subprocess.CompletedProcess[str] | str:
    """The script's run, or why it could not start or answer. It runs in a process group of
    its own, stopped whole on a timeout or an interrupt: kernels compiled on first use
    (Triton) start processes of their own."""
    env = {**os.environ, **opts.env, "PYTHONFAULTHANDLER": "1"}  # a crash prints its stack
    runs = runs or _Runs()
    try:
        proc = runs.start([python, str(SCRIPT), json.dumps(cfg)], env)
    except OSError as e:
        return f"cannot run {python}: {e}"
    if proc is None:
        return "interrupted"
    deadline = time.monotonic() + opts.timeout
    try:
        while True:  # in steps, so that a stop (runs.stop, another thread) is seen
            try:
                out, err = proc.communicate(timeout=min(WAIT_STEP_S,
                                                        max(0.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                if runs.stopped:  # the group was stopped: what it left may hold the pipes
                    _drain(proc)
                    return "interrupted"
                if time.monotonic() >= deadline:
                    stop_tree(proc)
                    _drain(proc)
                    return f"no answer within {opts.timeout:.0f} s (killed)"
    except BaseException:  # interrupted while waiting here
        stop_tree(proc, grace=STOP_GRACE_S)
        raise
    finally:
        runs.done(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _drain(proc: subprocess.Popen[str]) -> None:
    """What a stopped process's output still holds, for no longer than DRAIN_S: a process it
    started that left its group (a compile server) may hold the pipes open for good. POSIX
    reads them here, and closes them; Windows reads them in daemon threads, left to end
    with the process (closing a pipe there waits on the thread's read)."""
    try:
        proc.communicate(timeout=DRAIN_S)
    except subprocess.TimeoutExpired:
        if os.name != "nt":
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def _result_line(r: subprocess.CompletedProcess[str]) -> dict[str, Any] | None:
    line = next((ln for ln in reversed(r.stdout.splitlines()) if ln.startswith(MARK)), None)
    return None if line is None else dict(json.loads(line[len(MARK):]))


def run_one(python: str, backend: str, opts: Options, runs: _Runs | None = None) -> Result:
    """Prove one backend in its own process."""
    return _result(backend, _config(backend, opts), python, opts, runs)


SHIPPED_PLUGINS = frozenset({"taylor"})  # approximate: verified when asked for by name


def _order(backends: list[str], opts: Options) -> list[str]:
    """SDPA, the backends named, each one's variants and opts.include, once each."""
    named = [b for b in backends if b != "sdpa"]
    return list(dict.fromkeys(["sdpa", *[n for b in named for n in (b, *variants(b))],
                               *opts.include]))


def _shards(backend: str, opts: Options) -> list[Options]:
    """The backend's claimed head dims dealt round-robin into at most opts.shards groups."""
    if backend not in BACKENDS:
        return [opts]  # a plugin known only in the target
    claimed = BACKENDS[backend].caps.head_dims
    dims = [d for d in (opts.head_dims or claimed) if d in claimed]
    n = max(1, min(len(dims), opts.shards))
    if n == 1:
        return [opts]
    return [replace(opts, head_dims=tuple(dims[i::n])) for i in range(n)]


def _merge(backend: str, parts: list[Result]) -> Result:
    """One backend's result from its shards: a shard that could not check (import, crash,
    timeout) speaks for the backend; otherwise the checks of all, passed when a plain call
    passed somewhere."""
    broken = [r for r in parts if "checks" not in r.data]
    if broken or len(parts) == 1:
        return broken[0] if broken else parts[0]
    data = dict(parts[0].data)
    data["checks"] = sorted((c for r in parts for c in r.checks),
                            key=lambda c: (VARIANTS.index(c["variant"])
                                           if c["variant"] in VARIANTS else len(VARIANTS),
                                           c["head_dim"], c["dtype"]))
    for key in ("import_s", "check_s", "total_s", "wall_s"):
        values = [r.data[key] for r in parts if key in r.data]
        if values:
            data[key] = max(values)
    plain = [c for c in data["checks"] if c["variant"] == "plain"]
    passed = any(c["passed"] for c in plain)
    error = None
    if not passed:
        first = plain[0] if plain else None
        error = "no plain call passed" + ("" if first is None else
                                          f" (head dim {first['head_dim']} {first['dtype']}: "
                                          f"{first.get('error', 'failed')})")
        data.update(stage="accuracy", error=error)
    else:
        data.pop("stage", None)
        data.pop("error", None)
    data["passed"] = passed
    return Result(backend, passed, data, error)


def _result(backend: str, cfg: dict[str, Any], python: str, opts: Options,
            runs: _Runs | None = None) -> Result:
    t0 = time.monotonic()
    r = _run(python, cfg, opts, runs)
    if isinstance(r, str):
        stage = "start" if "cannot run" in r else "interrupted" if r == "interrupted" \
            else "timeout"
        return Result(backend, False, {"stage": stage}, r)
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


def live_facts(python: str, opts: Options | None = None) -> dict[str, Any]:
    """runtime/live.py's facts, learned in the target interpreter (imports torch there)."""
    opts = opts or Options()
    r = _run(python, {"live": True}, opts)
    data = None if isinstance(r, str) else _result_line(r)
    if data is None:
        why = r if isinstance(r, str) else (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise VerifyError(f"cannot read the live facts of {python}: {why}")
    return data


def _proven_shapes(result: Result, shapes: list[list[int]], dtype: str) -> list[int]:
    """The shapes whose head dim (and cross-attention, where the shape has a key/value
    length) verification passed for this backend at the timing dtype."""
    ok = {(c["variant"], c["head_dim"]) for c in result.checks
          if c.get("passed") and c["dtype"] == dtype}
    return [i for i, s in enumerate(shapes)
            if ("plain", s[3]) in ok and (len(s) < 5 or ("cross", s[3]) in ok)]


def verify(python: str, backends: list[str], opts: Options | None = None,
           progress: Any = None) -> dict[str, Result]:
    """Prove each backend in its own process (a crash there takes nothing else down), several
    at once; then time the ones that passed together in one process, each at the shapes it
    was proven for, so that the numbers `auto` compares come from the same clocks. If that
    process fails, each is timed alone."""
    opts = opts or Options()
    order = _order(backends, opts)
    if progress:
        progress(f"verifying {', '.join(order)} ...")
    t0 = time.monotonic()
    results: dict[str, Result] = {}

    def done(name: str, parts: list[Result]) -> None:
        # one line per backend as it finishes, with the time since verification began
        results[name] = _merge(name, parts)
        if progress:
            progress(f"  {name}: {results[name].summary()} ({time.monotonic() - t0:.1f} s)")

    from concurrent.futures import ThreadPoolExecutor, as_completed  # ~10 ms to import: only here

    runs = _Runs()
    pool = ThreadPoolExecutor(max_workers=max(1, opts.parallel))
    try:
        futures = {name: [pool.submit(run_one, python, name, o, runs)
                       for o in _shards(name, opts)]
                   for name in order}
        done("sdpa", [f.result() for f in futures["sdpa"]])
        # plugins from entry points, as SDPA's process found them in the target: proven
        # like the rest (shipped plugins, such as taylor, only when named)
        found = (results["sdpa"].data.get("live") or {}).get("plugins") or []
        extra = [n for n in found if n not in order and n not in SHIPPED_PLUGINS]
        if extra and progress:
            progress(f"verifying plugins {', '.join(extra)} ...")
        futures.update({name: [pool.submit(run_one, python, name, opts, runs)]
                        for name in extra})
        order += extra
        owner = {f: name for name in order[1:] for f in futures[name]}
        left = {name: len(futures[name]) for name in order[1:]}
        for f in as_completed(owner):
            name = owner[f]
            left[name] -= 1
            if left[name] == 0:
                done(name, [g.result() for g in futures[name]])
    except BaseException:  # an interrupt: stop the processes, then the threads end with them
        try:
            pool.shutdown(wait=False, cancel_futures=True)
        finally:
            runs.stop()
        raise
    pool.shutdown()
    results = {name: results[name] for name in order}
    passed = [n for n in order if results[n].passed]
    if not opts.bench or len(passed) < 2:
        return results  # nothing to choose between
    device = (results["sdpa"].data.get("device") or {}).get("type", "cpu")
    shapes = opts.shapes if opts.shapes is not None else \
        (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    dtype = "bfloat16"  # what models run (on a CPU too, so that half-only backends compare)
    plan = {n: _proven_shapes(results[n], shapes, dtype) for n in passed}
    if progress:
        progress(f"timing {', '.join(passed)} together ...")
    cfg = {"bench": plan, "shapes": shapes, "device": opts.device, "min_time": opts.min_time,
           "bench_dtype": dtype}
    r = _run(python, cfg, opts)
    together = None if isinstance(r, str) else _result_line(r)
    if together is None:  # that process failed: time each alone against SDPA
        if progress:
            progress(f"  timing each alone ({r if isinstance(r, str) else 'no result'})")
        for name in passed[1:]:
            pair = _run(python, {**cfg, "bench": {"sdpa": plan["sdpa"], name: plan[name]}},
                        opts)
            data = None if isinstance(pair, str) else _result_line(pair)
            bench = (data or {}).get("bench") or {}
            results[name].data["bench"] = bench.get(name, [])
            if bench.get("sdpa") and not results["sdpa"].data.get("bench"):
                results["sdpa"].data["bench"] = bench["sdpa"]
        return results
    for name in passed:
        results[name].data["bench"] = together.get("bench", {}).get(name, [])
    return results
