"""What the GPU must show for the adapters and the per-variant lock (issue 8), in one run:

1. `verify` of SDPA and the installed backends (wall time; the lock is written);
2. causal, custom-scale and cross-attention answers of each backend against float32 SDPA,
   through the dispatcher with the backend forced;
3. auto against each verified backend, per head dim (40, 64, 80, 128): ms per call over
   rotated rounds of back-to-back calls (CUDA events), auto's ratio to the fastest;
4. the first call of a new kind of input in a fresh process, with and without the settled
   choice cached beside the lock.

    COMFY_ENV_ATTN_LOCK=/tmp/lock.toml python benchmarks/gpu_check.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import rotated_ms  # noqa: E402

SHAPES = {40: [2, 8, 4096, 40], 64: [2, 10, 4096, 64], 80: [2, 8, 1024, 80],
          128: [1, 24, 4608, 128]}


def verify_and_lock(backends: list[str]) -> dict[str, object]:
    from comfy_env_attn import lockfile
    from comfy_env_attn.verify.run import Options, verify

    t0 = time.perf_counter()
    results = verify(sys.executable, backends, Options(), progress=print)
    wall = time.perf_counter() - t0
    table = lockfile.tool_table_from(results, python=sys.executable)
    path = Path(os.environ["COMFY_ENV_ATTN_LOCK"])
    lockfile.write(path, lockfile.build([], table))
    return {"verify_wall_s": round(wall, 1),
            "summary": {n: r.summary() for n, r in results.items()},
            "import_s": {n: r.data.get("import_s") for n in results
                         for r in [results[n]]},
            "check_s": {n: results[n].data.get("check_s") for n in results},
            "auto": list(table.auto)}


def answers() -> dict[str, dict[str, float]]:
    import torch
    import torch.nn.functional as F

    from comfy_env_attn.runtime import dispatch

    g = torch.Generator(device="cuda").manual_seed(0)
    out: dict[str, dict[str, float]] = {}
    for name in ("sage", "flash4"):
        dispatch._reset_for_tests()
        os.environ["COMFY_ENV_ATTN_SETTLE"] = "0"
        dispatch.set_backend(name)
        row = {}
        for what, n, kv, kw in (("causal", 4096, 4096, {"is_causal": True}),
                                ("scale", 4096, 4096, {"scale": 0.05}),
                                ("cross", 4096, 77, {}),
                                ("plain", 4096, 4096, {})):
            q = torch.randn(2, 10, n, 64, device="cuda", generator=g, dtype=torch.bfloat16)
            k, v = (torch.randn(2, 10, kv, 64, device="cuda", generator=g,
                                dtype=torch.bfloat16) for _ in range(2))
            got = dispatch.dispatch_attention(q, k, v, **kw).float()
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
            key = next(iter(dispatch._S.routes.values()))[0] if dispatch._S.routes else "?"
            dispatch._S.routes.clear()
            row[what] = float((got - ref).abs().max())
            row[what + "_cos"] = float(F.cosine_similarity(got.flatten(), ref.flatten(), dim=0))
            row[what + "_by"] = key  # type: ignore[assignment]
        out[name] = row
    os.environ.pop("COMFY_ENV_ATTN_SETTLE", None)
    return out


def per_head_dim() -> dict[str, dict[str, object]]:
    import torch

    from comfy_env_attn.runtime import dispatch
    from comfy_env_attn.runtime.adapters import adapter

    out: dict[str, dict[str, object]] = {}
    dispatch._reset_for_tests()
    dispatch.set_backend("auto")
    names = list(dispatch._S.backends)
    for hd, shape in SHAPES.items():
        q, k, v = (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        fns = {}
        for n in names:
            rec = dispatch._S.backends[n]
            if rec.proven("plain", hd, "bfloat16"):
                a = adapter(n)
                a.load()
                fns[n] = a
        dispatch.dispatch_attention(q, k, v)  # auto's first call (settles if close)
        chosen = dispatch.passed_over(q, k, v=v)[0][0]  # what the route leads with
        fns["auto"] = lambda q, k, v, m, c, s: dispatch.dispatch_attention(q, k, v)
        med = rotated_ms({n: partial(f, q, k, v, None, False, None) for n, f in fns.items()},
                         rounds=12, calls=20)
        best = min((m for n, m in med.items() if n != "auto"))
        out[str(hd)] = {"shape": shape, "ms": {n: round(m, 4) for n, m in med.items()},
                        "auto_chose": chosen, "auto_vs_best": round(best / med["auto"], 3)}
    return out


def first_use() -> dict[str, float]:
    code = ("import time, torch; t0 = time.perf_counter();"
            "from comfy_env_attn import dispatch_attention;"
            "q = torch.randn(1, 24, 4608, 128, device='cuda', dtype=torch.bfloat16);"
            "dispatch_attention(q, q, q); torch.cuda.synchronize();"
            "print(time.perf_counter() - t0)")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    settled = Path(os.environ["COMFY_ENV_ATTN_LOCK"] + ".settled.json")
    settled.unlink(missing_ok=True)
    out = {}
    for label in ("first start (settles)", "next start (cached)"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=env)
        out[label] = round(float(r.stdout.strip().splitlines()[-1]), 2) if r.returncode == 0 \
            else r.stderr[-300:]
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    p.add_argument("--backends", default="sage,flash4")
    a = p.parse_args()
    res: dict[str, object] = {"verify": verify_and_lock(a.backends.split(","))}
    print(json.dumps(res, indent=1), flush=True)
    res["answers"] = answers()
    print(json.dumps(res["answers"], indent=1), flush=True)
    res["per_head_dim"] = per_head_dim()
    print(json.dumps(res["per_head_dim"], indent=1), flush=True)
    res["first_use_s"] = first_use()
    print(json.dumps(res["first_use_s"], indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
