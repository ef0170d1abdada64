"""Run inside the TARGET interpreter (a crash here cannot take the installer down). Needs only
the standard library and torch there: it loads this package's own files by path, so the
adapters it proves are runtime/adapters.py, the code the dispatcher calls.

    python _target.py '<json config>'

Config, one of:
  {"live": true}                      the live facts freshness compares (runtime/live.py)
  {"backend": NAME}                    accuracy: every claimed call variant at every claimed
                                       head dim and dtype, against float32 SDPA, within
                                       the backend's own limits (Backend.thresholds())
  {"bench": {NAME: [shape index, ...]}, "shapes": [...]}
                                       time those backends together at those shapes, in one
                                       process, in rotating order (the figures auto compares)
Optional: "device", "dtypes", "head_dims" (a subset of the model head dims), "min_time".
Prints one line "@@RESULT@@" + JSON, after whatever the backend printed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARK = "@@RESULT@@"
PACKAGE = Path(__file__).resolve().parent.parent


def load_package() -> None:
    """Make `comfy_env_attn` this folder's package, whatever the target has installed: only
    this package's folder becomes importable, not the site-packages around it."""
    spec = importlib.util.spec_from_file_location(
        "comfy_env_attn", PACKAGE / "__init__.py", submodule_search_locations=[str(PACKAGE)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["comfy_env_attn"] = module
    spec.loader.exec_module(module)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _err(e: BaseException) -> str:
    return "%s: %s" % (type(e).__name__, str(e)[:300])


# -- accuracy -----------------------------------------------------------------------------

def _features(variant: str) -> set[str]:
    """The features a variant's name combines (core.backends.VARIANTS): "varlen_causal_cross"
    is causal and cross, packed."""
    return set(variant.removeprefix("varlen").strip("_").split("_"))


def inputs(variant: str, dim: int, device: str, seed: int) -> dict[str, Any]:
    """Random inputs for one variant, in float32 on the CPU (cast per dtype by the caller)."""
    import torch

    uses = _features(variant)
    g = torch.Generator(device="cpu").manual_seed(seed)
    cuda = device.startswith("cuda")
    # smaller on a CPU, where bfloat16 attention is slow: the same variants, fewer tokens
    b, h, n, m, hk = (2, 4, 256, 256, 4) if cuda else (1, 2, 96, 96, 2)
    if "cross" in uses:  # a 64x64 latent against 77 text tokens
        b, n, m = 1, (4096 if cuda else 512), 77
    if "gqa" in uses:
        h, hk = 8, 2
    if variant.startswith("mask"):  # a length no multiple of 8, as text's often is: a bias
        n = m = n - 6               # gets padded to 8 in memory (xformers), proven here
    q = torch.randn(b, h, n, dim, generator=g)
    k = torch.randn(b, hk, m, dim, generator=g)
    v = torch.randn(b, hk, m, dim, generator=g)
    mask = None
    if variant == "mask_bool":  # text padding: each row attends to a random 75%, itself too
        mask = (torch.rand(b, 1, n, m, generator=g) > 0.25) | torch.eye(n, m, dtype=torch.bool)
    elif variant == "mask_additive":
        mask = -4.0 * torch.rand(b, 1, n, m, generator=g)
    return {"q": q, "k": k, "v": v, "mask": mask, "causal": "causal" in uses,
            "scale": 0.5 / math.sqrt(dim) if "scale" in uses else None}


def _varlen_inputs(variant: str, dim: int, device: str, seed: int) -> dict[str, Any]:
    """Three packed sequences of different lengths, [T, H, D], for one varlen variant:
    `varlen_cross` gives each sequence keys of another length than its queries (the
    longest equal, as a call's maxima may be), `varlen_gqa` fewer key/value heads."""
    import itertools

    import torch

    uses = _features(variant)
    g = torch.Generator(device="cpu").manual_seed(seed)
    lens = [100, 256, 37] if device.startswith("cuda") else [40, 96, 17]
    lens_k = [lens[0] + 16, lens[1], max(1, lens[2] - 8)] if "cross" in uses else lens
    h, hk = (8, 2) if "gqa" in uses else (4, 4)
    cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(x)], dtype=torch.int32)
                  for x in (lens, lens_k))
    q = torch.randn(sum(lens), h, dim, generator=g)
    k, v = (torch.randn(sum(lens_k), hk, dim, generator=g) for _ in range(2))
    return {"q": q, "k": k, "v": v, "cu_q": cu_q, "cu_k": cu_k, "max_q": max(lens),
            "max_k": max(lens_k), "causal": "causal" in uses,
            "scale": 0.5 / math.sqrt(dim) if "scale" in uses else None}


def _call(fn: Any, variant: str, x: dict[str, Any], device: str, dtype: Any) -> Any:
    import torch

    if variant.startswith("varlen"):
        return fn.varlen(x["q"].to(device, dtype), x["k"].to(device, dtype),
                         x["v"].to(device, dtype), x["cu_q"].to(device), x["cu_k"].to(device),
                         x["max_q"], x["max_k"], x["causal"], x["scale"])
    mask = x["mask"]
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(dtype)
    return fn(x["q"].to(device, dtype), x["k"].to(device, dtype), x["v"].to(device, dtype),
              None if mask is None else mask.to(device), x["causal"], x["scale"])


def check(adapter: Any, ref: Any, variant: str, dim: int, dtype_name: str, device: str,
          limits: dict[str, float]) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, dtype_name)
    x = _varlen_inputs(variant, dim, device, 1234 + dim) if variant.startswith("varlen") \
        else inputs(variant, dim, device, 1234 + dim)
    res: dict[str, Any] = {"variant": variant, "head_dim": dim, "dtype": dtype_name}
    expected = _call(ref, variant, x, device, torch.float32).float()
    try:
        out = _call(adapter, variant, x, device, dtype)
        _sync(device)
    except Exception as e:
        res.update(passed=False, error=_err(e))
        return res
    if tuple(out.shape) != tuple(expected.shape) or out.dtype != dtype:
        # the dispatcher hands the output on as the model's next layer takes it: another
        # dtype (a float32 answer to bfloat16 queries) breaks that layer
        res.update(passed=False, error="output %s %s, expected %s %s"
                   % (tuple(out.shape), str(out.dtype).replace("torch.", ""),
                      tuple(expected.shape), dtype_name))
        return res
    out32 = out.float()
    finite = bool(torch.isfinite(out32).all())
    diff = (out32 - expected).abs()
    max_abs = float(diff.max()) if finite else math.inf
    cos = float(F.cosine_similarity(out32.flatten(), expected.flatten(), dim=0)) \
        if finite else 0.0
    res.update(max_abs=max_abs, cosine=cos)
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


def prove(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every claimed (variant, head dim, dtype) of one backend, through its adapter."""
    from comfy_env_attn.runtime import adapters

    result: dict[str, Any] = {"backend": cfg["backend"]}
    device = _device_facts(cfg, result)
    t0 = time.perf_counter()
    try:
        adapter = adapters.adapter(cfg["backend"])
        adapter.load()
    except Exception as e:
        result.update(passed=False, stage="import", error=_err(e),
                      traceback=traceback.format_exc()[-2000:])
        return result
    backend = adapter.backend
    result.update(version=adapter.version, origin=adapter.origin,
                  import_s=time.perf_counter() - t0, title=backend.title,
                  quantized=backend.quantized, approximate=backend.approximate,
                  shipped=backend.shipped)
    limits = backend.thresholds()
    ref = adapters.adapter("sdpa")
    caps = adapter.caps
    cuda = device.startswith("cuda")
    dtypes = [d for d in cfg.get("dtypes") or (["float16", "bfloat16"] if cuda
                                               else ["float32", "bfloat16"])
              if d in caps.dtypes]
    dims = [d for d in cfg.get("head_dims") or caps.head_dims if d in caps.head_dims]
    checks = []
    for variant in caps.variants():
        for dim in dims:
            for dt in dtypes:
                checks.append(check(adapter, ref, variant, dim, dt, device, limits[dt]))
    result["checks"] = checks
    result["check_s"] = time.perf_counter() - t0 - result["import_s"]
    plain = [c for c in checks if c["variant"] == "plain"]
    result["passed"] = any(c["passed"] for c in plain)
    if not result["passed"]:
        result["stage"] = "accuracy"
        first = next((c for c in plain), None)
        result["error"] = "no plain call passed" + (
            "" if first is None else " (head dim %d %s: %s)"
            % (first["head_dim"], first["dtype"], first.get("error", "failed")))
    return result


# -- timing -------------------------------------------------------------------------------

def _warm_gpu(device: str, seconds: float = 1.0) -> None:
    """Bring the GPU to its working clocks first, or whichever backend runs first looks
    slower."""
    import torch

    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def bench(fns: dict[str, Callable[..., Any]], device: str, shape: list[int],
          dtype_name: str, min_time: float) -> dict[str, dict[str, Any]]:
    """Median time per call of each function at one shape ([B, H, N, D] or [B, H, N, D, KV]),
    on the same inputs, in rounds of back-to-back calls whose order rotates (CUDA events on
    a GPU: a synchronize per call would add the launch latency to every sample)."""
    import torch

    dtype = getattr(torch, dtype_name)
    b, h, n, d = shape[:4]
    kv = shape[4] if len(shape) > 4 else n
    cuda = device.startswith("cuda")
    out: dict[str, dict[str, Any]] = {
        name: {"shape": shape[:4], "dtype": dtype_name, **({"kv_len": kv} if kv != n else {})}
        for name in fns}
    live: dict[str, Callable[..., Any]] = {}
    iters: dict[str, int] = {}
    rounds = 7
    try:
        q = torch.randn(b, h, n, d, device=device, dtype=dtype)
        k, v = (torch.randn(b, h, kv, d, device=device, dtype=dtype) for _ in range(2))
    except Exception as e:
        for res in out.values():
            res["error"] = _err(e)
        return out
    for name, fn in fns.items():
        res = out[name]
        try:
            t0 = time.perf_counter()
            fn(q, k, v, None, False, None)
            _sync(device)
            res["first_call_ms"] = (time.perf_counter() - t0) * 1e3
            t0 = time.perf_counter()
            for _ in range(3):
                fn(q, k, v, None, False, None)
            _sync(device)
            per_call = max((time.perf_counter() - t0) / 3, 1e-6)
            iters[name] = max(1, min(200, int(min_time / rounds / per_call)))
            live[name] = fn
        except Exception as e:
            res["error"] = _err(e)
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
                        fn(q, k, v, None, False, None)
                    end.record()
                    torch.cuda.synchronize()
                    samples[name].append(start.elapsed_time(end) / 1e3 / n_it)
                else:
                    t0 = time.perf_counter()
                    for _ in range(n_it):
                        fn(q, k, v, None, False, None)
                    samples[name].append((time.perf_counter() - t0) / n_it)
            except Exception as e:
                out[name]["error"] = _err(e)
    for name, ts in samples.items():
        if not ts or "error" in out[name]:
            continue
        ts.sort()
        med = ts[len(ts) // 2]
        out[name].update(ms=med * 1e3, tflops=4.0 * b * h * n * kv * d / med / 1e12)
    del q, k, v
    if cuda:
        torch.cuda.empty_cache()
    return out


def bench_together(cfg: dict[str, Any]) -> dict[str, Any]:
    """Time the verified backends in one process, each at the shapes it was proven for."""
    from comfy_env_attn.runtime import adapters

    result: dict[str, Any] = {"errors": {}}
    device = _device_facts(cfg, result)
    fns: dict[str, Any] = {}
    for name in cfg["bench"]:
        try:
            a = adapters.adapter(name)
            a.load()
            fns[name] = a
        except Exception as e:
            result["errors"][name] = _err(e)
    shapes = cfg["shapes"]
    dtype = cfg.get("bench_dtype") or ("bfloat16" if device.startswith("cuda") else "float32")
    min_time = cfg.get("min_time", 0.5)
    if device.startswith("cuda") and shapes:
        _warm_gpu(device)
    table: dict[str, list[dict[str, Any]]] = {name: [] for name in fns}
    for i, shape in enumerate(shapes):
        here = {n: f for n, f in fns.items() if i in cfg["bench"][n]}
        if len(here) < 2:
            continue  # nothing to choose between at this shape
        for name, res in bench(here, device, shape, dtype, min_time).items():
            table[name].append(res)
    result["bench"] = table
    return result


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


def main() -> None:
    cfg = json.loads(sys.argv[1])
    load_package()
    from comfy_env_attn.runtime.plugins import load_plugins

    load_plugins()  # backends from entry points, found in this interpreter
    if cfg.get("live"):
        from comfy_env_attn.runtime.live import live_facts

        result = live_facts().to_dict()
    elif "bench" in cfg:
        result = bench_together(cfg)
    else:
        t0 = time.perf_counter()
        result = prove(cfg)
        result["total_s"] = time.perf_counter() - t0
        if cfg["backend"] == "sdpa":  # the lock's fingerprint: what this process saw
            from comfy_env_attn.runtime.live import live_facts

            result["live"] = live_facts().to_dict()
    print(MARK + json.dumps(result))


if __name__ == "__main__":
    main()
