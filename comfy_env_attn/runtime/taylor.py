"""Taylor attention: softmax attention with exp(s q·k) replaced by its Taylor series truncated
at order P, evaluated through a feature map so that the cost is linear in the token count.

    out = taylor_attention(q, k, v)          # [B, H, N, D] in, [B, H, N, Dv] out, q's dtype

The method (docs/approximate.md has the derivation and the measurements):

* exp(x) ~ T_P(x) = sum_{p<=P} x^p / p!, and (q·k)^p = sum_{|a|=p} p!/a! q^a k^a over the
  multi-indices a of degree p (each monomial once, with its multinomial coefficient). So with
  phi(x)_a = x^a / sqrt(a!), phi(q')·phi(k') = T_P(q'·k') for q' = q sqrt(s), k' = k sqrt(s):
  a feature map of size R(d, P) = sum_p C(d+p-1, p) = C(d+P, P) for d dimensions.
* Attention becomes out_i = phi(q_i)·S / phi(q_i)·z with S = sum_j w_j phi(k_j) v_j^T and
  z = sum_j w_j phi(k_j) (w_j: per-key mask weights), computed blockwise over keys
  (block_size_k) and then over queries (block_size_q), so memory is R x Dv per head.
* Sub-head blocks: the head's D dimensions are split into `sub_head_blocks` contiguous
  blocks (more, if a block's R would exceed max_feature_dim_R). With one block the result is
  the truncated series of the exact attention and converges to it as P grows. With more than
  one block, each block attends on its own (softmax over its own scores q_b·k_b s, with the
  full v) and the outputs are averaged. That is a different function from the head's
  attention: exp(s q·k) is the product of the block exponentials, not their mean, and the
  exact product's feature map (the outer product of the block maps) is far larger than the
  full head's. Its error against exact attention does not go to zero as P grows.
* Safeguards: fp32 denominators; an early probe of the denominators on `probe_samples`
  queries before the expensive pass, and a check of every denominator after it, falling
  back to exact SDPA when one is non-finite, negative or too small; exact SDPA below
  `min_tokens`, for causal attention, and for a mask that varies per query; a sampled
  comparison with exact attention every `quality_check_log_every` calls.

Standard library and torch only; comfy.model_management only if ComfyUI already loaded it.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
log = logging.getLogger("comfy_env_attn")

# A denominator below this fraction of the keys' total weight is "too small": the exact one
# is the mean of exp(x) over the keys, positive; the truncated series' can cancel to ~0 or
# below (odd P with scores below the series' real root, or rounding).
DENOM_FLOOR = 1e-3

__all__ = ["feature_dim", "plan_blocks", "reset_taylor_stats", "taylor_attention",
           "taylor_stats"]


# ---------------------------------------------------------------------------------------
# counters and once-only messages
# ---------------------------------------------------------------------------------------

@dataclass
class _Stats:
    """Counts of taylor_attention's calls, fallbacks and quality checks."""
    calls: int = 0
    taylor_calls: int = 0
    fallbacks: dict[str, int] = field(default_factory=dict)
    quality_checks: int = 0
    last_quality: dict[str, float] | None = None
    worst_quality: dict[str, float] | None = None
    said: set[str] = field(default_factory=set)


_S = _Stats()
_LOCK = threading.Lock()


def taylor_stats() -> dict[str, Any]:
    """What happened so far in this process: calls, those computed by the series
    (`taylor_calls`), fallbacks to exact attention by reason, and the quality checks
    (`last_quality`, `worst_quality`: max_abs, mean_abs, cosine of the sampled rows against
    exact float32 attention; None before the first check)."""
    with _LOCK:
        return {"calls": _S.calls, "taylor_calls": _S.taylor_calls,
                "fallbacks": dict(_S.fallbacks), "fallback_calls": sum(_S.fallbacks.values()),
                "quality_checks": _S.quality_checks,
                "last_quality": None if _S.last_quality is None else dict(_S.last_quality),
                "worst_quality": None if _S.worst_quality is None else dict(_S.worst_quality)}


def reset_taylor_stats() -> None:
    """Zero the counters and forget which messages were said (tests, benchmarks)."""
    global _S
    with _LOCK:
        _S = _Stats()


def _say_once(level: int, msg: str, key: str | None = None) -> None:
    """Log `msg` the first time `key` (default: the message itself) comes up."""
    with _LOCK:
        if (key or msg) in _S.said:
            return
        _S.said.add(key or msg)
    log.log(level, "comfy-env-attn: taylor: %s", msg)


# ---------------------------------------------------------------------------------------
# the feature map
# ---------------------------------------------------------------------------------------

def feature_dim(d: int, P: int) -> int:
    """Features of the symmetric map over d dimensions, degrees 0..P: sum_p C(d+p-1, p)."""
    return math.comb(d + P, P)


def plan_blocks(D: int, P: int, sub_head_blocks: int, max_feature_dim_R: int) -> list[int]:
    """Block sizes for a head of D dimensions: `sub_head_blocks` near-equal contiguous
    blocks, more while a block's feature size exceeds the cap. [] when even one dimension
    per block does not fit."""
    nb = min(max(1, sub_head_blocks), D)
    while nb <= D:
        sizes = [D // nb + (1 if i < D % nb else 0) for i in range(nb)]
        if feature_dim(sizes[0], P) <= max_feature_dim_R:
            return sizes
        nb += 1
    return []


@dataclass(frozen=True)
class _FeatureMap:
    """The monomial feature map of one head dim and degree, built once."""
    d: int
    prefix: list[list[int]]  # prefix[p-1][j]: degree p-1 monomials whose last index <= j
    coef: Tensor             # 1 / sqrt(a!) for every monomial, in the order _phi builds them
    parent: list[Tensor]     # the same as gather indices, per degree p: the degree p-1
    last: list[Tensor]       # monomial and the variable that make each degree p one

    @property
    def R(self) -> int:
        return int(self.coef.shape[0])


_MAPS: dict[tuple[int, int, str, torch.dtype], _FeatureMap] = {}


def _feature_map(d: int, P: int, device: torch.device, dtype: torch.dtype) -> _FeatureMap:
    """The monomials of degree 0..P over d variables, each once (indices i1 <= ... <= ip),
    in colexicographic order: those of degree p whose last index is j are the degree p-1
    ones whose last index is <= j (a prefix of that degree's list) times x_j. Cached."""
    key = (d, P, str(device), dtype)
    got = _MAPS.get(key)
    if got is not None:
        return got
    prefix: list[list[int]] = []
    parents: list[Tensor] = []
    lasts: list[Tensor] = []
    last = torch.zeros(1, dtype=torch.long)            # degree 0: the constant monomial
    mult = torch.zeros(1, dtype=torch.long)            # multiplicity of its last index
    logfact = [torch.zeros(1, dtype=torch.float64)]    # log(a!) per degree
    lf = logfact[0]
    for p in range(1, P + 1):
        counts = [math.comb(j + p - 1, p - 1) for j in range(d)]
        prefix.append(counts)
        parents.append(torch.cat([torch.arange(c) for c in counts]).to(device))
        lasts.append(torch.repeat_interleave(torch.arange(d), torch.tensor(counts)).to(device))
        new_last, new_mult, new_lf = [], [], []
        for j, c in enumerate(counts):
            m = torch.where(last[:c] == j, mult[:c] + 1, torch.ones(c, dtype=torch.long))
            new_last.append(torch.full((c,), j, dtype=torch.long))
            new_mult.append(m)
            new_lf.append(lf[:c] + torch.log(m.to(torch.float64)))
        last, mult, lf = torch.cat(new_last), torch.cat(new_mult), torch.cat(new_lf)
        logfact.append(lf)
    coef = torch.exp(-0.5 * torch.cat(logfact)).to(device, dtype)
    fm = _FeatureMap(d, prefix, coef, parents, lasts)
    _MAPS[key] = fm
    return fm


def _phi(x: Tensor, fm: _FeatureMap, gather: bool | None = None) -> Tensor:
    """[..., n, d] -> [..., n, R]: phi(x)_a = x^a / sqrt(a!) for every |a| <= P, each
    degree written into its slice of one buffer: by d slice products per degree, or by two
    gathers and one product per degree (`gather`; default: on a GPU, for blocks under 2^28
    features, where a launch costs more than its share of the work; measured on an H100)."""
    out = torch.empty(*x.shape[:-1], fm.R, dtype=x.dtype, device=x.device)
    out[..., 0] = 1
    if gather is None:
        gather = x.is_cuda and out.numel() < 2**28
    lo, hi = 0, 1  # the previous degree's slice
    for counts, parent, last in zip(fm.prefix, fm.parent, fm.last, strict=True):
        at = hi
        if gather:
            at += len(parent)
            torch.mul(out[..., lo:hi].index_select(-1, parent), x.index_select(-1, last),
                      out=out[..., hi:at])
        else:
            for j, c in enumerate(counts):
                torch.mul(out[..., lo:lo + c], x[..., j:j + 1], out=out[..., at:at + c])
                at += c
        lo, hi = hi, at
    return out.mul_(fm.coef)


# ---------------------------------------------------------------------------------------
# fallbacks, masks, memory
# ---------------------------------------------------------------------------------------

class _Fallback(Exception):
    def __init__(self, reason: str, detail: str, key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.key = key  # what makes two of them the same message (default: the detail)


def _expand_heads(q: Tensor, t: Tensor) -> Tensor:
    if t.shape[1] == q.shape[1]:
        return t
    return t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)


def _exact(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
           scale: float | None) -> Tensor:
    return F.scaled_dot_product_attention(q, _expand_heads(q, k), _expand_heads(q, v),
                                          attn_mask=mask, is_causal=causal, scale=scale)


def _key_weights(mask: Tensor, B: int, H: int, Nq: int, Nk: int) -> Tensor:
    """A mask that is the same for every query is a per-key factor exp(bias_j) on the
    exponential, exact for the series as well: -> [B, H, Nk] float32 weights in [0, 1].
    Anything else cannot be linearised."""
    if mask.dim() > 4 or mask.shape[-1] != Nk:
        raise _Fallback("mask", f"a mask of shape {tuple(mask.shape)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if m.shape[2] != 1:
        if m.shape[2] != Nq or not bool((m == m[:, :, :1]).all()):
            raise _Fallback("mask", "a mask that varies per query")
        m = m[:, :, :1]
    if m.shape[0] not in (1, B) or m.shape[1] not in (1, H):
        raise _Fallback("mask", f"a mask of shape {tuple(mask.shape)}")
    if m.dtype == torch.bool:
        w = m.to(torch.float32)
    else:
        bias = m.to(torch.float32)
        if bool(torch.isnan(bias).any()) or bool((bias == math.inf).any()):
            raise _Fallback("mask", "a mask with NaN or +inf")
        top = bias.amax(dim=-1, keepdim=True).clamp_min(-1e30)
        w = torch.exp(bias - top)  # the common factor exp(top) cancels in the ratio
    return w[:, :, 0].expand(B, H, Nk)


def _reserve(device: torch.device, nbytes: int, factor: float, say: bool) -> bool:
    """Ask ComfyUI to free `nbytes * factor` on `device` (only if ComfyUI is loaded and the
    device is not the CPU). True when it was asked."""
    mm = sys.modules.get("comfy.model_management")
    if mm is None or device.type == "cpu" or not hasattr(mm, "free_memory"):
        return False
    need = int(nbytes * factor)
    try:
        mm.free_memory(need, device)
    except Exception as e:  # never fail the attention call over a reservation
        _say_once(logging.WARNING, f"memory_reserve failed ({type(e).__name__}: {e})")
        return False
    if say:
        _say_once(logging.INFO, f"memory_reserve asked ComfyUI for {need / 2**20:.0f} MiB "
                                f"on {device}")
    return True


# ---------------------------------------------------------------------------------------
# the computation
# ---------------------------------------------------------------------------------------

def _state(kb: Tensor, v: Tensor, w: Tensor | None, fm: _FeatureMap, cd: torch.dtype,
           block_k: int, with_S: bool, with_z: bool) -> tuple[Tensor | None, Tensor | None]:
    """One pass over the keys ([G, M, d], G = batch x heads): S = sum_j w_j phi(k_j) v_j^T
    ([G, R, Dv]) and/or z = sum_j w_j phi(k_j) ([G, R, 1]), summed in float32 (phi is cast
    up once per key block, so the per-block products are float32 too)."""
    G, Nk, _ = kb.shape
    S = torch.zeros(G, fm.R, v.shape[-1], dtype=torch.float32, device=kb.device) \
        if with_S else None
    z = torch.zeros(G, fm.R, 1, dtype=torch.float32, device=kb.device) if with_z else None
    ones = torch.ones(G, min(block_k, Nk), 1, dtype=torch.float32, device=kb.device)
    for j0 in range(0, Nk, block_k):
        fT = _phi(kb[:, j0:j0 + block_k].to(cd), fm).float().transpose(1, 2)
        wj = ones[:, :fT.shape[2]] if w is None else w[:, j0:j0 + block_k, None]
        if z is not None:
            z.baddbmm_(fT, wj)
        if S is not None:
            vj = v[:, j0:j0 + block_k].float()
            S.baddbmm_(fT, vj if w is None else vj * wj)
    return S, z


def _dens(fq: Tensor, z: Tensor, den_dtype: torch.dtype) -> Tensor:
    return torch.bmm(fq.to(den_dtype), z.to(den_dtype)).squeeze(-1).float()


def _lowest(den: Tensor, total: Tensor) -> Tensor:
    """The smallest denominator as a fraction of the keys' weight (NaN if any is NaN)."""
    rel = den / total.clamp_min(1e-30).unsqueeze(-1)
    return torch.where(torch.isfinite(rel), rel, torch.full_like(rel, math.nan)).amin()


def _check(lowest: Tensor, where: list[str], fallback_on_negative: bool) -> None:
    """`lowest[i]`: the smallest relative denominator of the queries `where[i]` (one host
    sync for all of them)."""
    lo = lowest.tolist()
    stage = "probe" if where[0].startswith("early") else "full"  # said once per stage
    for value, place in zip(lo, where, strict=True):
        if math.isnan(value):
            raise _Fallback("denominator", f"a non-finite denominator ({place})",
                            f"denominator nan {stage}")
    for value, place in zip(lo, where, strict=True):
        if fallback_on_negative and value <= DENOM_FLOOR:
            raise _Fallback("denominator", f"a denominator at {value:.3g} of the keys' "
                                           f"weight, at most {DENOM_FLOOR:g} ({place})",
                            f"denominator small {stage}")


def _sample_rows(n: int, count: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:min(count, n)].sort().values


def _taylor(q: Tensor, k: Tensor, v: Tensor, w: Tensor | None, s: float, *, P: int,
            sizes: list[int], qk_normalize: bool, block_q: int, block_k: int,
            fallback_on_negative: bool, force_fp32: bool, early_probe: bool,
            probe_samples: int, denom_fp32: bool, seed: int) -> Tensor:
    B, H, Nq, _ = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    cd = torch.float32 if force_fp32 or q.dtype == torch.float32 else q.dtype
    den_dtype = torch.float32 if denom_fp32 else cd
    if qk_normalize:
        q = F.normalize(q.float(), dim=-1)
        k = F.normalize(k.float(), dim=-1)
    root = math.sqrt(s)  # q' = q sqrt(s), k' = k sqrt(s): phi(q')·phi(k') = T_P(s q·k)
    qs = (q.float() * root).to(cd).reshape(B * H, Nq, -1)
    ks = (k.float() * root).to(cd).reshape(B * H, Nk, -1)
    vs = v.reshape(B * H, Nk, Dv)
    ws = None if w is None else w.reshape(B * H, Nk)
    total = ws.sum(-1) if ws is not None else torch.full((B * H,), float(Nk), device=q.device)
    out = torch.zeros(B * H, Nq, Dv, dtype=torch.float32, device=q.device)
    floor = (total * DENOM_FLOOR).unsqueeze(-1)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    zs: list[Tensor | None] = [None] * len(sizes)
    if early_probe:  # every block's z first, probed before any S: the keys' features once
        probe = _sample_rows(Nq, probe_samples, seed).to(q.device)
        lows = []
        for i, (d0, d) in enumerate(zip(starts, sizes, strict=True)):
            fm = _feature_map(d, P, q.device, cd)
            _, z = _state(ks[..., d0:d0 + d], vs, ws, fm, cd, block_k, False, True)
            assert z is not None
            zs[i] = z
            lows.append(_lowest(_dens(_phi(qs[:, probe, d0:d0 + d], fm), z, den_dtype), total))
        _check(torch.stack(lows), [f"early probe of {len(probe)} queries"] * len(sizes),
               fallback_on_negative)
    for i, (d0, d) in enumerate(zip(starts, sizes, strict=True)):
        fm = _feature_map(d, P, q.device, cd)
        qb = qs[..., d0:d0 + d]
        S, z = _state(ks[..., d0:d0 + d], vs, ws, fm, cd, block_k, True, zs[i] is None)
        z = zs[i] if z is None else z
        assert S is not None and z is not None
        S_cd = S.to(cd)
        del S
        lows, where = [], []
        for i0 in range(0, Nq, block_q):
            fq = _phi(qb[:, i0:i0 + block_q], fm)
            den = _dens(fq, z, den_dtype)
            lows.append(_lowest(den, total))
            where.append(f"queries {i0}..{i0 + fq.shape[1] - 1}")
            den = torch.where(den.abs() < floor, floor, den)  # used only without fallback
            out[:, i0:i0 + block_q] += torch.bmm(fq, S_cd).float() / den.unsqueeze(-1)
        _check(torch.stack(lows), where, fallback_on_negative)
    out /= len(sizes)  # blocks as separate heads, outputs averaged
    if not bool(torch.isfinite(out).all()):
        raise _Fallback("non-finite", "a non-finite output")
    return out.reshape(B, H, Nq, Dv)


def _quality(q: Tensor, k: Tensor, v: Tensor, w: Tensor | None, s: float, out: Tensor,
             samples: int, seed: int) -> dict[str, float]:
    """Sampled rows of `out` against exact float32 softmax attention of the same inputs."""
    rows = _sample_rows(q.shape[2], samples, seed).to(q.device)
    scores = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * s
    if w is not None:
        scores = scores + torch.log(w).unsqueeze(2)
    exact = torch.softmax(scores, dim=-1) @ v.float()
    got = out[:, :, rows].float()
    diff = (got - exact).abs()
    cos = F.cosine_similarity(got.flatten(), exact.flatten(), dim=0)
    return {"samples": float(len(rows)), "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean()), "cosine": float(cos)}


def taylor_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None,
                     is_causal: bool = False, scale: float | None = None, *,
                     P: int = 4, min_tokens: int = 100, max_feature_dim_R: int = 370000,
                     sub_head_blocks: int = 4, qk_normalize: bool = False,
                     scale_mul: float = 1.0, block_size_q: int = 32, block_size_k: int = 16,
                     fallback_on_negative: bool = True, force_fp32: bool = False,
                     memory_reserve: bool = False, memory_reserve_factor: float = 1.1,
                     memory_reserve_log: bool = False, early_probe: bool = True,
                     probe_samples: int = 16, denom_fp32: bool = True,
                     quality_check: bool = True, quality_check_samples: int = 16,
                     quality_check_log_every: int = 1, log_shapes: bool = False,
                     log_fallbacks: bool = True) -> Tensor:
    """Attention of [B, H, N, D] q and [B, Hk, M, D] k, v (Hk dividing H) with exp(s q·k)
    replaced by its Taylor series to order P; -> [B, H, N, Dv] in q's dtype.

    Exact SDPA instead (said once per reason with `log_fallbacks`, counted in
    `taylor_stats()`): below `min_tokens` tokens (the longer of N and M), for `is_causal`,
    for a mask that varies per query (a per-key bool or additive mask is applied exactly),
    when no block size keeps the feature size under `max_feature_dim_R`, and when a
    denominator is non-finite or, with `fallback_on_negative`, at most DENOM_FLOOR of the
    keys' weight (the early probe checks `probe_samples` queries before the expensive pass;
    every query is checked after it). Without `fallback_on_negative` such denominators are
    raised to that floor instead.

    `scale` is the model's (default 1/sqrt(D)); `scale_mul` and `qk_normalize` (unit q and
    k per head and token) change what the series is evaluated on, never the exact fallback
    nor the quality check's reference. `force_fp32` evaluates the feature maps and the
    query-side products in float32 (default: in q's dtype); the keys' sums S and z are
    accumulated in float32 either way, and `denom_fp32` evaluates each denominator
    phi(q)·z in float32 too (otherwise in the features' dtype).
    """
    B, H, Nq, D = q.shape
    with _LOCK:
        _S.calls += 1
        call = _S.calls
    s = (scale if scale is not None else 1.0 / math.sqrt(D))
    w: Tensor | None = None
    try:
        if k.dim() != 4 or v.dim() != 4 or k.shape[-1] != D or k.shape[1] == 0 \
                or H % k.shape[1] or k.shape[:3] != v.shape[:3] or k.shape[0] != B:
            raise _Fallback("shape", f"q {tuple(q.shape)}, k {tuple(k.shape)}, "
                                     f"v {tuple(v.shape)}")
        Nk = k.shape[2]
        if is_causal:
            raise _Fallback("causal", "causal attention")
        if max(Nq, Nk) < min_tokens:
            raise _Fallback("min_tokens", f"{max(Nq, Nk)} tokens, below min_tokens "
                                          f"{min_tokens}")
        sizes = plan_blocks(D, P, sub_head_blocks, max_feature_dim_R)
        if not sizes:
            raise _Fallback("feature_dim", f"no block of head dim {D} keeps C(d+{P},{P}) "
                                           f"under max_feature_dim_R {max_feature_dim_R}")
        if attn_mask is not None:
            w = _key_weights(attn_mask, B, H, Nq, Nk)
        R = feature_dim(sizes[0], P)
        if len(sizes) != max(1, min(sub_head_blocks, D)):
            _say_once(logging.INFO, f"head dim {D}, P={P}: {len(sizes)} sub-head blocks "
                                    f"instead of {sub_head_blocks}, to keep R={R} under "
                                    f"max_feature_dim_R {max_feature_dim_R}")
        if log_shapes:
            _say_once(logging.INFO, f"q {list(q.shape)} k {list(k.shape)} {q.dtype}, P={P}, "
                                    f"blocks {sizes}, R={R}, mask "
                                    f"{'per key' if w is not None else 'none'}")
        kx, vx = _expand_heads(q, k), _expand_heads(q, v)
        if memory_reserve:
            cd_size = 4 if force_fp32 else q.element_size()
            state = B * H * R * (v.shape[-1] + 1) * 4 * 2  # S in float32 and its cast
            temps = B * H * max(block_size_q, block_size_k) * R * cd_size * 3
            _reserve(q.device, state + temps + B * H * Nq * v.shape[-1] * 4,
                     memory_reserve_factor, memory_reserve_log)
        out = _taylor(q, kx, vx, w, s * scale_mul, P=P, sizes=sizes,
                      qk_normalize=qk_normalize, block_q=max(1, block_size_q),
                      block_k=max(1, block_size_k), fallback_on_negative=fallback_on_negative,
                      force_fp32=force_fp32, early_probe=early_probe,
                      probe_samples=max(1, probe_samples), denom_fp32=denom_fp32, seed=call)
    except _Fallback as fb:
        with _LOCK:
            _S.fallbacks[fb.reason] = _S.fallbacks.get(fb.reason, 0) + 1
        if log_fallbacks:
            _say_once(logging.WARNING, f"exact attention instead for {fb.detail}", fb.key)
        return _exact(q, k, v, attn_mask, is_causal, scale)
    with _LOCK:
        _S.taylor_calls += 1
        n = _S.taylor_calls
    if quality_check and quality_check_log_every > 0 and n % quality_check_log_every == 0:
        qual = _quality(q, kx, vx, w, s, out, max(1, quality_check_samples), call)
        with _LOCK:
            _S.quality_checks += 1
            _S.last_quality = qual
            if _S.worst_quality is None or qual["cosine"] < _S.worst_quality["cosine"]:
                _S.worst_quality = qual
        log.info("comfy-env-attn: taylor quality (%d rows vs exact, head dim %d, %d tokens, "
                 "P=%d, %d blocks): max_abs=%.4g mean_abs=%.4g cosine=%.6f",
                 int(qual["samples"]), D, Nk, P, len(sizes), qual["max_abs"],
                 qual["mean_abs"], qual["cosine"])
    return out.to(q.dtype)
