"""Which backend the lock says is fastest for one kind of input. Pure, standard library only:
the runtime dispatcher and `doctor` (which never imports torch) share it.

A kind of input is (head dim, dtype, tokens). The lock measured each verified backend at a few
shapes; for a call the nearest measured shape of the same head dim decides (nearest in
log-tokens), and the order is by measured throughput there. Backends the lock did not verify for
that head dim are left out; SDPA is always the last resort.
"""

from __future__ import annotations

import math
from typing import Any

FIXED_ORDER = ["flash4", "flash3", "sage", "flash", "xformers", "sage3", "sdpa"]


def verified(backends: dict[str, Any]) -> list[str]:
    return [n for n, b in backends.items() if b.get("status") == "verified"]


def supports(info: dict[str, Any], head_dim: int, dtype: str) -> bool | None:
    """True/False from the lock's accuracy checks; None when it did not check that kind."""
    seen = None
    for c in info.get("checks", []):
        if c.get("head_dim") == head_dim:
            if c.get("dtype") == dtype:
                return bool(c.get("passed"))
            seen = bool(c.get("passed")) if seen is None else seen and bool(c.get("passed"))
    return seen


def _nearest_bench(info: dict[str, Any], head_dim: int, tokens: int) -> dict[str, Any] | None:
    best, best_d = None, math.inf
    for b in info.get("bench", []):
        if "ms" not in b or "shape" not in b:
            continue
        shape = b["shape"]
        d = abs(math.log(max(shape[2], 1)) - math.log(max(tokens, 1)))
        if shape[3] != head_dim:
            d += 100.0  # another head dim only when nothing of this one was measured
        if d < best_d:
            best, best_d = b, d
    return best


def order_for(backends: dict[str, Any], head_dim: int, dtype: str, tokens: int, *,
              exact: bool = False, device: str | None = None) -> list[tuple[str, str]]:
    """[(backend, why)] best first for this kind; SDPA always included last if not earlier."""
    return [(n, why) for n, _, why in ranked(backends, head_dim, dtype, tokens, exact=exact)]


def ranked(backends: dict[str, Any], head_dim: int, dtype: str, tokens: int, *,
           exact: bool = False) -> list[tuple[str, float | None, str]]:
    """[(backend, measured TFLOP/s at the nearest shape or None, why)], best first."""
    rows: list[tuple[float, str, str]] = []
    for name in verified(backends):
        info = backends[name]
        if exact and info.get("quantized"):
            continue
        ok = supports(info, head_dim, dtype)
        if ok is False or (ok is None and name != "sdpa"):
            continue  # only head dims the lock proved (SDPA is the safe fallback anyway)
        b = _nearest_bench(info, head_dim, tokens)
        if b is None:
            rows.append((math.inf, name, "verified, not timed"))
            continue
        # throughput at that shape: it carries over to other batch and head counts,
        # where milliseconds would not
        bb, hh, nn, dd = b["shape"]
        tflops = b.get("tflops") or 4.0 * bb * hh * nn * nn * dd / (b["ms"] * 1e9)
        est = 1.0 / tflops
        shape = "x".join(str(s) for s in b["shape"])
        tf = f", {b['tflops']:.3g} TFLOP/s" if "tflops" in b else ""
        note = "" if ok else f" (head dim {head_dim} not checked)"
        rows.append((est, name, f"{b['ms']:.3g} ms at {shape}{tf}{note}"))
    rows.sort(key=lambda r: (r[0], r[1] != "sdpa"))
    out = [(n, None if math.isinf(est) else 1.0 / est, why) for est, n, why in rows]
    if "sdpa" not in [n for n, _, _ in out]:
        out.append(("sdpa", None, "built into torch (fallback)"))
    return out


def close_call(rows: list[tuple[str, float | None, str]], margin: float) -> list[str]:
    """The leading backends whose measured throughput is within `margin` of the best: too
    close for numbers taken in another process to decide (settled on first use)."""
    if len(rows) < 2 or rows[0][1] is None:
        return []
    best = rows[0][1]
    close = [n for n, tf, _ in rows if tf is not None and tf >= best * (1 - margin)]
    return close if len(close) > 1 else []


def fixed_order(available: list[str], capability: tuple[int, int] | None) -> list[str]:
    """The GPU-tier order of unverified mode: FACTS.md section 4's kernel support only."""
    out = []
    for n in FIXED_ORDER:
        if n not in available and n != "sdpa":
            continue
        if capability is None and n != "sdpa":
            continue
        if capability is not None:
            if n == "flash3" and capability != (9, 0):
                continue
            if n == "flash4" and capability not in ((9, 0), (10, 0), (10, 3)):
                continue
            if n == "sage3" and capability < (10, 0):
                continue
            if n in ("sage", "flash") and capability < (8, 0):
                continue
            if n == "sage" and capability[0] == 10:
                continue
        out.append(n)
    return out
