"""Which verified backend is fastest for one kind of call, and why each other one is passed
over. Pure, standard library only: the runtime dispatcher and `doctor` share it.

A backend is a candidate for a call only when the lock proves every variant the call uses
(plain, causal, scale, cross, mask, GQA) at its head dim and dtype, and its declared rules
allow it (GPU, causal alignment). Candidates are ordered by the throughput the lock measured
at the nearest shape of the same head dim (nearest in log-tokens, cross-attention against
cross-attention). SDPA is always the last resort.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from comfy_env_attn.core.backends import BACKENDS, Call, Capabilities
from comfy_env_attn.core.lockmodel import BackendRecord, BenchRow


@dataclass(frozen=True)
class Ranked:
    name: str
    tflops: float | None  # measured at the nearest shape; None: not timed
    why: str


@dataclass(frozen=True)
class Choice:
    order: tuple[Ranked, ...]  # best first; SDPA always present
    passed_over: tuple[tuple[str, tuple[str, ...]], ...]  # (backend, every reason)

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.order]


def verified_caps(name: str, record: BackendRecord) -> Capabilities:
    """The declared capabilities, with masks as verification found them (an adapter learns
    whether the installed package takes a mask only when it loads it)."""
    caps = BACKENDS[name].caps
    masks = frozenset(m for m in ("bool", "additive")
                      if any(c.passed and c.variant == f"mask_{m}" for c in record.checks))
    return replace(caps, masks=masks)


def reasons(name: str, record: BackendRecord, call: Call, *, exact: bool = False,
            approximate: bool = False) -> list[str]:
    """Every reason this verified backend may not take the call (empty: it may).
    `approximate`: the caller opted in to approximate backends."""
    out = []
    if exact and record.quantized:
        out.append(f"{BACKENDS[name].title} is quantized and exact mode is on")
    if record.approximate and (exact or not approximate):
        out.append(f"{BACKENDS[name].title} is approximate: "
                   + ("exact mode is on" if exact else
                      "auto uses it only with set_backend('auto', approximate=True)"))
    out += BACKENDS[name].not_supported_reasons(call, verified_caps(name, record))
    if not out:
        out += record.unproven(call.variants(), call.head_dim, call.dtype)
    return out


def _nearest(bench: tuple[BenchRow, ...], call: Call) -> BenchRow | None:
    best, best_d = None, math.inf
    cross = call.kv_len != call.q_len
    for b in bench:
        if not b.timed:
            continue
        d = abs(math.log(max(b.shape[2], 1)) - math.log(max(call.q_len, 1)))
        if b.shape[3] != call.head_dim:
            d += 100.0  # another head dim only when nothing of this one was measured
        if (b.kv_len is not None) != cross:
            d += 50.0  # self- against cross-attention only when nothing else was
        if d < best_d:
            best, best_d = b, d
    return best


def choose(backends: Mapping[str, BackendRecord], call: Call, *,
           exact: bool = False, approximate: bool = False) -> Choice:
    rows: list[tuple[float, str, Ranked]] = []
    passed_over = []
    for name, record in backends.items():
        if not record.verified or name not in BACKENDS:
            continue
        why_not = reasons(name, record, call, exact=exact, approximate=approximate)
        if why_not:
            if name != "sdpa":
                passed_over.append((name, tuple(why_not)))
            continue
        b = _nearest(record.bench, call)
        if b is None or b.tflops is None:
            rows.append((math.inf, name, Ranked(name, None, "verified, not timed")))
            continue
        # throughput at that shape: it carries over to other batch and head counts, where
        # milliseconds would not
        rows.append((1.0 / b.tflops, name,
                     Ranked(name, b.tflops, f"{b.ms:.3g} ms at {b.label()}, "
                                            f"{b.tflops:.3g} TFLOP/s")))
    rows.sort(key=lambda r: (r[0], r[1] != "sdpa"))
    order = [r for _, _, r in rows]
    if "sdpa" not in [r.name for r in order]:
        order.append(Ranked("sdpa", None, "built into torch (the fallback)"))
    return Choice(tuple(order), tuple(passed_over))


def close_call(order: tuple[Ranked, ...] | list[Ranked], margin: float) -> list[str]:
    """The leading backends whose measured throughput is within `margin` of the best: too
    close for numbers taken in another process to decide (timed on first use)."""
    if len(order) < 2 or order[0].tflops is None:
        return []
    best = order[0].tflops
    close = [r.name for r in order if r.tflops is not None and r.tflops >= best * (1 - margin)]
    return close if len(close) > 1 else []
