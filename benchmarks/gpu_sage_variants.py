"""SageAttention 2's two kernels on a GPU, as the lock and the dispatcher see them (issue 11):
`sage` (sageattn: fp8 P.V on sm89/90/120) and its variant `sage_fp16`
(sageattn_qk_int8_pv_fp16_cuda: int8 Q.K, fp16 P.V accumulated in fp32).

Run in a target where `comfy-env-attn install --backends sage` has verified and locked
them (COMFY_ENV_ATTN_LOCK, or the target's own lock):

    python benchmarks/gpu_sage_variants.py --json out.json

1. what the lock proved of each, per call variant (checks passed / failed, worst error);
2. each kernel's answer against float32 SDPA, called through its adapter, for plain,
   causal, scale and cross calls at head dims 64 and 128, and for inputs shaped like a
   DiT's (a large shared offset in Q and K, V with outlier channels) where fp8 P.V loses
   most;
3. ms per call (CUDA events, rotated rounds of back-to-back calls) of sdpa, sage and
   sage_fp16, and which backend auto, auto safe and auto exact route plain and causal
   calls to, with each passed-over backend's reasons.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import rotated_ms  # noqa: E402

NAMES = ("sdpa", "sage", "sage_fp16", "flash4")  # those not installed are left out


def lock_summary() -> dict[str, Any]:
    from comfy_env_attn.runtime import dispatch

    dispatch._reset_for_tests()
    dispatch.set_backend("auto")
    out: dict[str, Any] = {}
    for name, rec in dispatch._S.backends.items():
        checks = getattr(rec, "checks", ())
        failed = [c for c in checks if not getattr(c, "passed", True)]
        out[name] = {"verified": rec.verified, "checks": len(checks),
                     "failed": sorted({f"{c.variant}@{c.head_dim}/{c.dtype}"
                                       for c in failed})[:24]}
    return out


def _inputs(kind: str, b: int, h: int, n: int, kv: int, d: int, g: Any) -> tuple[Any, ...]:
    import torch

    def r(length: int) -> Any:
        return torch.randn(b, h, length, d, device="cuda", generator=g, dtype=torch.float32)

    q, k, v = r(n), r(kv), r(kv)
    if kind == "dit":  # shared offsets in Q and K, outlier channels in V
        off = torch.randn(1, h, 1, d, device="cuda", generator=g) * 4
        q, k = q + off, k + off
        v[..., : max(1, d // 16)] *= 20
    return tuple(t.to(torch.bfloat16) for t in (q, k, v))


def answers() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from comfy_env_attn.runtime.adapters import adapter

    g = torch.Generator(device="cuda").manual_seed(0)
    cases = [("plain", 4096, 4096, {}), ("causal", 4096, 4096, {"causal": True}),
             ("scale", 4096, 4096, {"scale": 0.05}), ("cross", 4096, 77, {}),
             ("dit", 4096, 4096, {})]
    out: dict[str, Any] = {}
    for name in ("sage", "sage_fp16"):
        a = adapter(name)
        try:
            a.load()
        except Exception as e:  # reported; the other kernel still runs
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        rows: dict[str, Any] = {}
        for d in (64, 128):
            for what, n, kv, kw in cases:
                q, k, v = _inputs(what, 2, 10, n, kv, d, g)
                causal, scale = bool(kw.get("causal")), kw.get("scale")
                got = a(q, k, v, None, causal, scale).float()
                ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                     is_causal=causal, scale=scale)
                rows[f"{what}@{d}"] = {
                    "max_abs": round(float((got - ref).abs().max()), 5),
                    "rel_l2": round(float((got - ref).norm() / ref.norm()), 5),
                    "cosine": round(float(F.cosine_similarity(got.flatten(), ref.flatten(),
                                                              dim=0)), 6)}
        out[name] = rows
    return out


def timings() -> dict[str, Any]:
    import torch

    from comfy_env_attn.runtime import dispatch
    from comfy_env_attn.runtime.adapters import adapter

    shapes = {"hd64 SDXL": ([2, 10, 4096, 64], False),
              "hd128 Flux": ([1, 24, 4608, 128], False),
              "hd128 Wan": ([1, 40, 8192, 128], False),
              "hd128 causal": ([1, 24, 4608, 128], True)}
    out: dict[str, Any] = {}
    for label, (shape, causal) in shapes.items():
        q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        fns = {}
        for n in NAMES:
            a = adapter(n)
            try:
                a.load()
            except Exception:  # an absent kernel is not timed
                continue
            fns[n] = a
        ms = rotated_ms({n: partial(f, q, k, v, None, causal, None) for n, f in fns.items()},
                        rounds=12, calls=10)
        row: dict[str, Any] = {"shape": shape, "causal": causal,
                               "ms": {n: round(t, 4) for n, t in ms.items()}}
        for mode, kw in (("auto", {}), ("auto safe", {"safe": True}),
                         ("auto exact", {"exact": True})):
            dispatch._reset_for_tests()
            dispatch.set_backend("auto", **kw)
            names, over = dispatch.passed_over(q, k, is_causal=causal)
            row[mode] = {"order": names, "passed_over": {n: list(w) for n, w in over}}
        out[label] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    a = p.parse_args()
    res: dict[str, Any] = {}
    for key, fn in (("lock", lock_summary), ("answers", answers), ("timings", timings)):
        try:
            res[key] = fn()
        except Exception as e:  # one part failing still reports the others
            res[key] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps({key: res[key]}, indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
