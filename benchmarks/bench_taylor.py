"""Taylor attention against exact attention: time and error at 1,024, 4,096 and 8,192 tokens,
head dim 128.

    python benchmarks/bench_taylor.py                          # CPU, float32, 1 head
    python benchmarks/bench_taylor.py --device cuda            # GPU, bfloat16, 24 heads
    python benchmarks/bench_taylor.py --heads 2 --tokens 1024 --configs default,p2-1block
    python benchmarks/bench_taylor.py --device cuda --json taylor-h100.json

Inputs: q, k, v ~ N(0, 1) of shape [1, H, N, 128] (scores s q·k with standard deviation 1 at
the default scale 1/sqrt(128), --sigma scales q and k). Each row: the median time of a call
(CUDA synchronised; one call when a call takes over 10 s), its time as a multiple of SDPA's
in the same dtype, and its max abs error and cosine against float32 SDPA of the same inputs.
"fell back" says a row measured exact SDPA, not the series (taylor_stats). Two references
that compute nothing useful show what the numbers mean: "uniform" (every query gets the
mean of v) and "split, exact" (the 4-block average of exact softmax attentions: the limit of
the default configuration as P grows). The quality check is off while timing (its cost is a
few sampled rows of exact attention).

Configurations (--configs, comma separated):
  default      P=4, 4 sub-head blocks of 32 (R=58,905 each), blocks 32/16: the seed's defaults
  default-big  the same with block_size_q = block_size_k = 1024 (same output, fewer passes)
  p2-1block    P=2, one block of 128 (R=8,385): the series of the head's own attention
  p3-1block    P=3, one block of 128 (R=366,145): the largest order under the 370,000 cap
  p2-4blocks   P=2, 4 blocks of 32 (R=561 each)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from comfy_env_attn.runtime import taylor

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "default-big": {"block_size_q": 1024, "block_size_k": 1024},
    "p2-1block": {"P": 2, "sub_head_blocks": 1},
    "p3-1block": {"P": 3, "sub_head_blocks": 1},
    "p2-4blocks": {"P": 2, "sub_head_blocks": 4},
}


def timed(fn: Callable[[], torch.Tensor], device: str, repeats: int) -> tuple[float, Any]:
    """Median seconds of `fn` (one call when a call takes over 10 s), and its output."""
    def once() -> tuple[float, torch.Tensor]:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    dt, out = once()  # warm-up (and the only call when slow)
    if dt > 10:
        return dt, out
    times = []
    for _ in range(repeats):
        dt, out = once()
        times.append(dt)
    return statistics.median(times), out


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    o, r = out.float(), ref.float()
    return (float((o - r).abs().max()),
            float(F.cosine_similarity(o.flatten(), r.flatten(), dim=0)))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for N in args.tokens:
        measure(N, args, rows)
    return rows


def measure(N: int, args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    device, D = args.device, 128
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    g = torch.Generator(device="cpu").manual_seed(N)
    q32, k32, v32 = (torch.randn(1, args.heads, N, D, generator=g).to(device)
                     for _ in range(3))
    q32, k32 = q32 * args.sigma, k32 * args.sigma
    ref = F.scaled_dot_product_attention(q32, k32, v32)  # float32 reference
    q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)

    def add(name: str, seconds: float | None, out: torch.Tensor | None,
            fell_back: str = "") -> None:
        row: dict[str, Any] = {"tokens": N, "heads": args.heads, "dtype": args.dtype,
                               "device": device, "config": name,
                               "ms": None if seconds is None else seconds * 1e3,
                               "fell_back": fell_back}
        if out is not None:
            row["max_abs"], row["cosine"] = accuracy(out, ref)
        rows.append(row)
        print(fmt(row, rows), flush=True)

    sdpa_s, sdpa_out = timed(partial(F.scaled_dot_product_attention, q, k, v), device,
                             args.repeats)
    add("sdpa", sdpa_s, sdpa_out)
    for name in args.configs:
        kw = {**CONFIGS[name], "quality_check": False, "log_fallbacks": False}
        before = taylor.taylor_stats()["fallbacks"]
        s, out = timed(partial(taylor.taylor_attention, q, k, v, **kw), device, args.repeats)
        after = taylor.taylor_stats()["fallbacks"]
        add(name, s, out, ",".join(r for r in after if after[r] != before.get(r, 0)))
        del out
        if device == "cuda":
            torch.cuda.empty_cache()
    add("uniform (reference)", None, v32.mean(dim=2, keepdim=True).expand_as(v32))
    scale = D ** -0.5
    split = torch.stack([F.scaled_dot_product_attention(q32[..., b:b + 32], k32[..., b:b + 32],
                                                        v32, scale=scale)
                         for b in range(0, D, 32)]).mean(0)
    add("split, exact (reference)", None, split)


def fmt(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    sdpa = next((r["ms"] for r in rows if r["tokens"] == row["tokens"]
                 and r["config"] == "sdpa"), None)
    ms = "" if row["ms"] is None else f"{row['ms']:.3f}" if row["ms"] < 10 else f"{row['ms']:.1f}"
    ratio = "" if row["ms"] is None or not sdpa or row["config"] == "sdpa" \
        else f"{row['ms'] / sdpa:.0f}x" if row["ms"] / sdpa >= 10 else f"{row['ms'] / sdpa:.2f}x"
    err = "" if "max_abs" not in row else f"{row['max_abs']:.4f}"
    cos = "" if "cosine" not in row else f"{row['cosine']:.4f}"
    return (f"| {row['tokens']:>5} | {row['config']:<24} | {ms:>9} | {ratio:>7} | {err:>7} | "
            f"{cos:>6} | {row['fell_back'] or ''} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: float32 on the CPU, bfloat16 on CUDA")
    ap.add_argument("--heads", type=int, default=None, help="default: 1 on the CPU, 24 on CUDA")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--configs", default=None,
                    help="default: default,p2-1block,p2-4blocks on the CPU, "
                         "all on CUDA")
    ap.add_argument("--sigma", type=float, default=1.0, help="scale of q and k")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.heads = args.heads or (24 if cuda else 1)
    args.configs = (args.configs.split(",") if args.configs
                    else list(CONFIGS) if cuda
                    else ["default", "p2-1block", "p2-4blocks"])
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; valid: {', '.join(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"# taylor_attention vs SDPA: [1, {args.heads}, N, 128], {args.dtype}, {name}, "
          f"torch {torch.__version__}, q/k sigma {args.sigma}")
    print("| N     | config                   |        ms | vs SDPA | max abs | cosine | "
          "fell back |")
    print("|------:|:-------------------------|----------:|--------:|--------:|-------:|:--|")
    rows = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
    assert all(math.isfinite(r.get("cosine", 0.0)) for r in rows)


if __name__ == "__main__":
    main()
