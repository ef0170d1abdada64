"""Which verified backend is fastest for one kind of call, and why each other one is passed
over. Pure, standard library only: the runtime dispatcher and `doctor` share it.

A backend is a candidate for a call only when the lock proves every variant the call uses
(plain, causal, scale, cross, mask, GQA) at its head dim and dtype, and its declared rules
allow it (GPU, causal alignment). Candidates are ordered by the throughput the lock measured
at the nearest shape of the same head dim (nearest in log-tokens, cross-attention against
cross-attention). SDPA is always the last resort.

Modes narrow the candidates (`mode_reason`):
- default: every verified backend except approximate ones;
- `approximate=True`: approximate ones too (plugins such as taylor);
- `safe=True`: no kernel quantized below fp16 in P.V: exact backends, and quantized ones
  only where they keep P.V in fp16 (SageAttention's int8-QK/fp16-PV kernel, sage_fp16),
  never sageattn's fp8 P.V (sage) or fp4 (sage3), the ones that turn some models' images
  black or noisy. So where sage fails or is left out, sage_fp16 serves the call if it
  passed there and is faster than the exact backends;
- `exact=True`: no quantized or approximate backend at all (sage_fp16 quantizes Q and K
  to int8: it is out too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from comfy_env_attn.core.backends import BACKENDS, Call, Capabilities
from comfy_env_attn.core.lockmodel import BackendRecord, BenchRow
from comfy_env_attn.core.records import dataclass


@dataclass(frozen=True)
class Ranked:
    """A backend in a choice's order, with its measured speed and why it stands there."""
    name: str
    tflops: float | None  # measured at the nearest shape; None: not timed
    why: str


@dataclass(frozen=True)
class Choice:
    """The backends for one kind of call, best first, and those passed over with why."""
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


def mode_reason(name: str, record: BackendRecord | None, *, exact: bool = False,
                safe: bool = False, approximate: bool = False) -> str | None:
    """Why the mode leaves this backend out (None: it does not); see the module's doc. With
    no record (the dispatcher's unverified mode), what the backend declares of itself."""
    b = BACKENDS[name]
    quantized = b.quantized if record is None else record.quantized
    approx = b.approximate if record is None else record.approximate
    if exact and quantized:
        return f"{b.title} is quantized and exact mode is on"
    if safe and quantized and not b.fp16_pv:
        return f"{b.title} quantizes P.V below fp16 and safe mode is on"
    if approx and (exact or safe or not approximate):
        return f"{b.title} is approximate: " + (
            "exact mode is on" if exact else "safe mode is on" if safe else
            "auto uses it only with set_backend('auto', approximate=True)")
    return None


def reasons(name: str, record: BackendRecord, call: Call, *, exact: bool = False,
            safe: bool = False, approximate: bool = False) -> list[str]:
    """Every reason this verified backend may not take the call (empty: it may).
    `approximate`: the caller opted in to approximate backends."""
    why = mode_reason(name, record, exact=exact, safe=safe, approximate=approximate)
    out = [why] if why else []
    out += BACKENDS[name].not_supported_reasons(call, verified_caps(name, record))
    if not out:
        out += record.unproven(call.variants(), call.head_dim, call.dtype)
    return out


def _nearest(bench: tuple[BenchRow, ...], call: Call) -> BenchRow | None:
    best, best_d = None, math.inf
    cross = call.cross  # a bench row of cross-attention has a kv_len of its own
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
           exact: bool = False, safe: bool = False, approximate: bool = False) -> Choice:
    rows: list[tuple[float, str, Ranked]] = []
    passed_over = []
    for name, record in backends.items():
        if not record.verified or name not in BACKENDS:
            continue
        why_not = reasons(name, record, call, exact=exact, safe=safe,
                          approximate=approximate)
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
