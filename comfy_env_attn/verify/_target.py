"""Run inside the TARGET interpreter, one backend per process (a crash here cannot take the
installer down). Standard library and torch only: the target need not have this package.

    python _target.py '<json config>'

Config: {"backend", "device", "head_dims", "extra_head_dims", "dtypes", "thresholds",
         "shapes" (or "gpu_shapes" and "cpu_shapes", chosen here by the device), "min_time",
         "check_only", "bench_only"}.
Prints one line "@@RESULT@@" + JSON, after whatever the backend printed.
With {"backends": [...]} instead of "backend", times those backends together, in one
process, interleaved (the figures `auto` compares).

Accuracy: the backend's output against float32 SDPA on the same inputs: max absolute
error, cosine similarity, NaN/Inf. Speed: median time per call after warm-up (the first
calls of a JIT backend such as FlashAttention 4 compile kernels; that cost is reported
separately as first_call_ms).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

MARK = "@@RESULT@@"


def _kernel(backend: str) -> tuple[Callable[..., Any], str, str]:
    """(fn(q, k, v) -> out for [B, H, N, D] inputs, version, where it came from)."""
    import torch
    import torch.nn.functional as F

    def bhnd_to_bnhd(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(q: Any, k: Any, v: Any) -> Any:
            out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            if isinstance(out, tuple):
                out = out[0]
            return out.transpose(1, 2)

        return call

    if backend == "sdpa":
        return F.scaled_dot_product_attention, torch.__version__, "torch"
    if backend == "sage":
        import sageattention

        fn = sageattention.sageattn
        return (lambda q, k, v: fn(q, k, v, tensor_layout="HND", is_causal=False),
                _version("sageattention"), sageattention.__file__ or "")
    if backend == "sage3":
        import sageattn3

        fn3 = sageattn3.sageattn3_blackwell
        return (lambda q, k, v: fn3(q, k, v), _version("sageattn3"), sageattn3.__file__ or "")
    if backend == "flash":
        import flash_attn

        return bhnd_to_bnhd(flash_attn.flash_attn_func), _version("flash-attn"), \
            flash_attn.__file__ or ""
    if backend == "flash3":
        try:
            import flash_attn_interface as fa3
        except ImportError:
            import flash_attn_3 as fa3
        return bhnd_to_bnhd(fa3.flash_attn_func), _version("flash-attn-3"), fa3.__file__ or ""
    if backend == "flash4":
        from flash_attn import cute

        return bhnd_to_bnhd(cute.flash_attn_func), _version("flash-attn-4"), cute.__file__ or ""
    if backend == "xformers":
        import xformers.ops as xops

        return bhnd_to_bnhd(xops.memory_efficient_attention), _version("xformers"), \
            xops.__file__ or ""
    raise ValueError("unknown backend %r" % backend)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def check_accuracy(fn: Callable[..., Any], device: str, dim: int, dtype_name: str,
                   limits: dict[str, float]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    g = torch.Generator(device="cpu").manual_seed(1234 + dim)
    shape = (2, 4, 256, dim)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.to(device), k.to(device), v.to(device)).float()
    res: dict[str, Any] = {"head_dim": dim, "dtype": dtype_name, "shape": list(shape)}
    try:
        out = fn(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype))
        _sync(device)
    except Exception as e:
        res.update(passed=False, error="%s: %s" % (type(e).__name__, str(e)[:300]))
        return res
    if tuple(out.shape) != shape:
        res.update(passed=False, error="output shape %s, expected %s" % (tuple(out.shape), shape))
        return res
    out32 = out.float()
    finite = bool(torch.isfinite(out32).all())
    diff = (out32 - ref).abs()
    max_abs = float(diff.max()) if finite else float("inf")
    cos = float(F.cosine_similarity(out32.flatten(), ref.flatten(), dim=0)) if finite else 0.0
    res.update(max_abs=max_abs, mean_abs=float(diff.mean()) if finite else float("inf"),
               cosine=cos, finite=finite, out_dtype=str(out.dtype).replace("torch.", ""))
    problems = []
    if not finite:
        problems.append("NaN or Inf in the output")
    if max_abs > limits["max_abs"]:
        problems.append("max abs error %.3g > %.3g" % (max_abs, limits["max_abs"]))
    if cos < limits["min_cosine"]:
        problems.append("cosine similarity %.5f < %.5f" % (cos, limits["min_cosine"]))
    res["passed"] = not problems
    if problems:
        res["error"] = "; ".join(problems)
    return res


def _warm_gpu(device: str, seconds: float = 1.0) -> None:
    """Bring the GPU to its working clocks: each backend is timed in a fresh process, and a
    cold GPU would make whichever backend runs first look slower."""
    import torch

    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def bench(fns: dict[str, Callable[..., Any]], device: str, shape: list[int],
          dtype_name: str, min_time: float) -> dict[str, dict[str, Any]]:
    """Median time per call of each function at one shape, on the same inputs, in rounds of
    back-to-back calls whose order rotates: backends compared in one process, at the same
    clocks, not across processes (CUDA events on a GPU: a synchronize per call would add
    the launch latency to every sample)."""
    import torch

    dtype = getattr(torch, dtype_name)
    b, h, n, d = shape
    cuda = device.startswith("cuda")
    out: dict[str, dict[str, Any]] = {name: {"shape": shape, "dtype": dtype_name}
                                      for name in fns}
    live: dict[str, Callable[..., Any]] = {}
    iters: dict[str, int] = {}
    rounds = 7
    try:
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype) for _ in range(3))
    except Exception as e:
        for res in out.values():
            res["error"] = "%s: %s" % (type(e).__name__, str(e)[:300])
        return out
    for name, fn in fns.items():
        res = out[name]
        try:
            t0 = time.perf_counter()
            fn(q, k, v)
            _sync(device)
            res["first_call_ms"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            for _ in range(3):
                fn(q, k, v)
            _sync(device)
            per_call = max((time.perf_counter() - t0) / 3, 1e-6)
            iters[name] = max(1, min(200, int(min_time / rounds / per_call)))
            live[name] = fn
        except Exception as e:
            res["error"] = "%s: %s" % (type(e).__name__, str(e)[:300])
    samples: dict[str, list[float]] = {name: [] for name in live}
    names = list(live)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)] if names else []:
            fn, n_it = live[name], iters[name]
            try:
                if cuda:
                    start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                    end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                    start.record()
                    for _ in range(n_it):
                        fn(q, k, v)
                    end.record()
                    torch.cuda.synchronize()
                    samples[name].append(start.elapsed_time(end) / 1e3 / n_it)
                else:
                    t0 = time.perf_counter()
                    for _ in range(n_it):
                        fn(q, k, v)
                    samples[name].append((time.perf_counter() - t0) / n_it)
            except Exception as e:
                out[name]["error"] = "%s: %s" % (type(e).__name__, str(e)[:300])
    for name, ts in samples.items():
        if not ts or "error" in out[name]:
            continue
        ts.sort()
        med = ts[len(ts) // 2]
        out[name].update(ms=med * 1e3, tflops=4.0 * b * h * n * n * d / med / 1e12,
                         iters=iters[name] * len(ts), spread=(ts[-1] - ts[0]) / med)
    del q, k, v
    if cuda:
        torch.cuda.empty_cache()
    return out


def _bench_plan(cfg: dict[str, Any], device: str) -> tuple[list[list[int]], str, float]:
    """(shapes, dtype, seconds per shape): the device decides the default shapes, in this
    process, so that every backend is timed at the same ones."""
    shapes = cfg.get("shapes")
    if shapes is None:
        shapes = cfg.get("gpu_shapes" if device.startswith("cuda") else "cpu_shapes", [])
    dtype = cfg.get("bench_dtype") or ("bfloat16" if device.startswith("cuda") else "float32")
    min_time = cfg.get("min_time", 0.5)
    if device.startswith("cuda") and shapes:
        _warm_gpu(device)
        min_time = max(min_time, 1.0)  # backends within a few % of each other
    return shapes, dtype, min_time


def _device_facts(cfg: dict[str, Any], result: dict[str, Any]) -> str:
    import torch

    device: str = cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
    result["torch"] = torch.__version__
    result["torch_cuda"] = torch.version.cuda
    if device.startswith("cuda"):
        cap = torch.cuda.get_device_capability()
        result["device"] = {"type": "cuda", "name": torch.cuda.get_device_name(),
                            "capability": "%d.%d" % cap}
    else:
        result["device"] = {"type": "cpu", "name": "cpu"}
    return device


def bench_together(cfg: dict[str, Any]) -> None:
    """Time several verified backends in one process (the numbers `auto` compares)."""
    result: dict[str, Any] = {"backends": cfg["backends"], "errors": {}}
    device = _device_facts(cfg, result)
    fns: dict[str, Callable[..., Any]] = {}
    for name in cfg["backends"]:
        try:
            fns[name] = _kernel(name)[0]
        except Exception as e:
            result["errors"][name] = "%s: %s" % (type(e).__name__, str(e)[:300])
    shapes, dtype, min_time = _bench_plan(cfg, device)
    table: dict[str, list[dict[str, Any]]] = {name: [] for name in fns}
    for shape in shapes:
        for name, res in bench(fns, device, shape, dtype, min_time).items():
            table[name].append(res)
    result["bench"] = table
    print(MARK + json.dumps(result))


def main() -> None:
    cfg = json.loads(sys.argv[1])
    if "backends" in cfg:
        bench_together(cfg)
        return
    result: dict[str, Any] = {"backend": cfg["backend"]}
    t_start = time.perf_counter()
    try:
        device = _device_facts(cfg, result)
        t0 = time.perf_counter()
        fn, version, origin = _kernel(cfg["backend"])
        result.update(version=version, origin=origin,
                      import_s=time.perf_counter() - t0)
    except Exception as e:
        result.update(passed=False, stage="import",
                      error="%s: %s" % (type(e).__name__, str(e)[:500]),
                      traceback=traceback.format_exc()[-2000:])
        print(MARK + json.dumps(result))
        return
    dtypes = cfg.get("dtypes") or (["float16", "bfloat16"] if device.startswith("cuda")
                                   else ["float32", "bfloat16"])
    limits = cfg["thresholds"]
    checks = []
    if not cfg.get("bench_only"):
        for dim in cfg.get("head_dims", [64, 128]):
            for dt in dtypes:
                checks.append(dict(check_accuracy(fn, device, dim, dt, limits[dt]),
                                   required=True))
        for dim in cfg.get("extra_head_dims", []):
            for dt in dtypes:
                checks.append(dict(check_accuracy(fn, device, dim, dt, limits[dt]),
                                   required=False))
    result["checks"] = checks
    failed = [c for c in checks if c["required"] and not c["passed"]]
    result["passed"] = not failed
    if failed:
        result["stage"] = "accuracy"
        result["error"] = "; ".join("head dim %d %s: %s" % (c["head_dim"], c["dtype"],
                                                            c.get("error", "failed"))
                                    for c in failed)
    benches = []
    if not failed and not cfg.get("check_only"):
        shapes, dtype, min_time = _bench_plan(cfg, device)
        benches = [bench({"x": fn}, device, shape, dtype, min_time)["x"] for shape in shapes]
    result["bench"] = benches
    result["total_s"] = time.perf_counter() - t_start
    print(MARK + json.dumps(result))


if __name__ == "__main__":
    main()
