"""Taylor attention against exact float32 attention on the CPU with real torch, small inputs:
the feature map is the truncated series, the error falls as P grows, the probe, the full
denominator check and every fallback fire where they should and nowhere else, blocking does
not change the answer, the feature-size cap holds, the quality check logs."""

from __future__ import annotations

import ast
import itertools
import logging
import math
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

from comfy_env_attn.runtime import taylor as T
from comfy_env_attn.runtime.taylor import taylor_attention, taylor_stats

ROOT = Path(__file__).resolve().parent.parent
QUIET: dict[str, Any] = {"quality_check": False, "log_fallbacks": False}


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    """Fresh counters; one thread (small tensors: on a busy machine a second thread only
    waits), restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    T.reset_taylor_stats()
    yield
    T.reset_taylor_stats()
    torch.set_num_threads(threads)


def qkv(B: int = 1, H: int = 2, N: int = 160, D: int = 16, M: int | None = None,
        sigma: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    M = N if M is None else M
    return (torch.randn(B, H, N, D, generator=g) * sigma,
            torch.randn(B, H, M, D, generator=g) * sigma, torch.randn(B, H, M, D, generator=g))


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def taylor_series(x: torch.Tensor, P: int) -> torch.Tensor:
    return sum(x ** p / math.factorial(p) for p in range(P + 1))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("d", "P"), [(1, 4), (3, 1), (4, 4), (6, 3), (9, 2), (5, 6)])
def test_feature_map_is_the_truncated_series_with_each_monomial_once(d: int, P: int) -> None:
    g = torch.Generator().manual_seed(d * 10 + P)
    x = torch.randn(7, d, generator=g, dtype=torch.float64)
    y = torch.randn(9, d, generator=g, dtype=torch.float64)
    fm = T._feature_map(d, P, torch.device("cpu"), torch.float64)
    fx, fy = T._phi(x, fm), T._phi(y, fm)
    assert torch.equal(fx, T._phi(x, fm, gather=True))  # the GPU's way, the same numbers
    assert fx.shape == (7, math.comb(d + P, P)) == (7, T.feature_dim(d, P))
    assert T.feature_dim(d, P) == sum(math.comb(d + p - 1, p) for p in range(P + 1))
    torch.testing.assert_close(fx @ fy.T, taylor_series(x @ y.T, P), rtol=1e-12, atol=1e-12)


def test_error_falls_as_P_grows() -> None:
    q, k, v = qkv(N=200, D=8, sigma=0.5)  # scores s q·k: standard deviation 0.25
    exact = F.scaled_dot_product_attention(q, k, v)
    errs = [err(taylor_attention(q, k, v, P=P, sub_head_blocks=1, **QUIET), exact)
            for P in range(1, 7)]
    assert all(b < 0.6 * a for a, b in itertools.pairwise(errs)), errs
    assert errs[0] > 1e-2 and errs[-1] < 1e-2 * errs[0], errs
    assert taylor_stats()["taylor_calls"] == 6 and taylor_stats()["fallback_calls"] == 0


def test_error_falls_as_P_grows_with_qk_normalize_and_scale_mul() -> None:
    # qk_normalize and scale_mul change the function: the series converges to exact
    # attention of the unit vectors at scale * scale_mul (scores in [-1.5, 1.5])
    q, k, v = qkv(N=192, D=8, sigma=3.0, seed=1)
    s = 8 ** -0.5
    target = F.scaled_dot_product_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
                                            scale=1.5)
    errs = [err(taylor_attention(q, k, v, P=P, sub_head_blocks=1, qk_normalize=True,
                                 scale_mul=1.5 / s, **QUIET), target) for P in (1, 2, 3, 4, 6)]
    assert all(b < a for a, b in itertools.pairwise(errs)), errs
    assert errs[-1] < 2e-3, errs
    # against the original attention it is no approximation at all
    assert err(taylor_attention(q, k, v, P=6, sub_head_blocks=1, qk_normalize=True,
                                scale_mul=1.5 / s, **QUIET),
               F.scaled_dot_product_attention(q, k, v)) > 0.1


def test_sub_head_blocks_are_separate_heads_averaged() -> None:
    """The documented combination: each block attends alone (its own scores at the model's
    scale, the full v), the outputs are averaged; as P grows it converges to that average,
    not to the head's attention."""
    q, k, v = qkv(N=128, D=12, sigma=0.7, seed=2)
    s = 12 ** -0.5
    blocks = [slice(0, 4), slice(4, 8), slice(8, 12)]
    split = sum(F.scaled_dot_product_attention(q[..., b], k[..., b], v, scale=s)
                for b in blocks) / 3
    got = taylor_attention(q, k, v, P=8, sub_head_blocks=3, **QUIET)
    assert err(got, split) < 1e-5
    assert err(got, F.scaled_dot_product_attention(q, k, v)) > 20 * err(got, split)
    one = [taylor_attention(q[..., b], k[..., b], v, scale=s, P=3, sub_head_blocks=1, **QUIET)
           for b in blocks]
    torch.testing.assert_close(taylor_attention(q, k, v, P=3, sub_head_blocks=3, **QUIET),
                               sum(one) / 3, rtol=1e-5, atol=1e-6)


def test_blocking_gives_the_same_answer_as_unblocked() -> None:
    q, k, v = qkv(N=40, M=53, D=6, sigma=0.8, seed=3)  # cross-attention, ragged blocks
    for probe in (True, False):
        whole = taylor_attention(q, k, v, P=3, sub_head_blocks=2, block_size_q=40,
                                 block_size_k=53, early_probe=probe, min_tokens=0, **QUIET)
        for bq, bk in ((32, 16), (7, 5), (1, 53), (40, 1)):
            torch.testing.assert_close(
                taylor_attention(q, k, v, P=3, sub_head_blocks=2, block_size_q=bq,
                                 block_size_k=bk, early_probe=probe, min_tokens=0, **QUIET),
                whole, rtol=1e-5, atol=1e-6)
    assert taylor_stats()["taylor_calls"] == 10


def test_feature_size_cap_is_respected() -> None:
    # the seed's numbers: head dim 128, P=4, 4 blocks of 32 -> R = C(36, 4) = 58905
    assert T.plan_blocks(128, 4, 4, 370000) == [32] * 4
    assert T.feature_dim(32, 4) == 58905
    # one block would need C(132, 4) = 12,082,785 features: more blocks until under the cap
    assert T.feature_dim(128, 4) > 370000
    sizes = T.plan_blocks(128, 4, 1, 370000)
    assert sizes == [43, 43, 42] and T.feature_dim(43, 4) <= 370000 < T.feature_dim(64, 4)
    for D in (40, 64, 80, 96, 128, 160, 256):
        for cap in (50, 1000, 370000):
            sizes = T.plan_blocks(D, 4, 4, cap)
            assert sum(sizes) == D and max(sizes) - min(sizes) <= 1
            assert all(T.feature_dim(d, 4) <= cap for d in sizes)
            fewer = len(sizes) - 1  # the fewest blocks that fit
            if fewer >= 4:
                assert T.feature_dim(math.ceil(D / fewer), 4) > cap
    assert T.plan_blocks(16, 4, 1, 4) == []  # even one dimension needs P+1 = 5 features


def test_cap_raises_the_block_count_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = qkv(N=128, D=12, sigma=0.5, seed=4)
    caplog.set_level(logging.INFO, logger="comfy_env_attn")
    # C(6+2, 2) = 28 > 20, C(4+2, 2) = 15 <= 20: 3 blocks of 4 instead of 2 of 6
    out = taylor_attention(q, k, v, P=2, sub_head_blocks=2, max_feature_dim_R=20,
                           log_shapes=True, **QUIET)
    ref = taylor_attention(q, k, v, P=2, sub_head_blocks=3, **QUIET)
    torch.testing.assert_close(out, ref)
    text = caplog.text
    assert "3 sub-head blocks instead of 2" in text and "blocks [4, 4, 4], R=15" in text
    assert taylor_attention(q, k, v, P=2, max_feature_dim_R=2, **QUIET).shape == q.shape
    assert taylor_stats()["fallbacks"] == {"feature_dim": 1}


# ---------------------------------------------------------------------------------------
# the safeguards
# ---------------------------------------------------------------------------------------

def anti_aligned(N: int = 128, D: int = 8, x: float = -3.0,
                 seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Every query points against every key: every score is about x."""
    g = torch.Generator().manual_seed(seed)
    u = torch.zeros(D)
    u[0] = 1.0
    q = (u + 0.01 * torch.randn(1, 2, N, D, generator=g))
    k = -(u + 0.01 * torch.randn(1, 2, N, D, generator=g))
    return q, k, torch.randn(1, 2, N, D, generator=g), -x


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_probe_fires_at_odd_P_where_the_series_goes_negative(
        P: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # T_1(-3) = -2, T_3(-3) = -2: negative; T_2(-3) = 2.5, T_4(-3) = 1.375: even orders of
    # the series have no real root, so their denominators never go negative
    q, k, v, scale = anti_aligned()
    passes: list[tuple[bool, bool]] = []  # (with_S, with_z) of each pass over the keys
    real_state = T._state

    def state(*a: object, **kw: object) -> object:
        passes.append((bool(a[6]), bool(a[7])))
        return real_state(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(T, "_state", state)
    caplog.set_level(logging.WARNING, logger="comfy_env_attn")
    out = taylor_attention(q, k, v, scale=scale, P=P, sub_head_blocks=1, quality_check=False)
    exact = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if P % 2:
        assert torch.equal(out, exact)
        assert taylor_stats()["fallbacks"] == {"denominator": 1}
        assert passes == [(False, True)]  # z only: the expensive pass never ran
        assert "early probe of 16 queries" in caplog.text
        assert "-2" in caplog.text  # the denominator is -2 times the keys' weight
        taylor_attention(q, k, v, scale=scale * 1.3, P=P, sub_head_blocks=1,
                         quality_check=False)  # another value, the same message: said once
        assert taylor_stats()["fallbacks"] == {"denominator": 2}
        assert len(caplog.records) == 1
    else:
        assert taylor_stats()["fallbacks"] == {} and taylor_stats()["taylor_calls"] == 1
        assert passes == [(False, True), (True, False)]  # z probed, then S alone
        assert not torch.equal(out, exact) and caplog.text == ""


def test_probe_fires_on_a_small_positive_denominator() -> None:
    q, k, v, _ = anti_aligned()
    # T_1(-0.9995) = 0.0005 of each key's weight: positive, below the 1e-3 floor
    out = taylor_attention(q, k, v, scale=0.9995 / float(q[0, 0, 0] @ -k[0, 0, 0]), P=1,
                           sub_head_blocks=1, **QUIET)
    assert taylor_stats()["fallbacks"] == {"denominator": 1}
    assert out.shape == q.shape
    # well away from the root it does not fire
    taylor_attention(q, k, v, scale=0.5, P=1, sub_head_blocks=1, **QUIET)
    assert taylor_stats()["fallbacks"] == {"denominator": 1}


def test_full_check_catches_what_the_probe_missed(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = qkv(N=128, D=8, sigma=0.3, seed=6)
    k[..., 0] += 1.0
    q[0, 1, 77] = 0.0
    q[0, 1, 77, 0] = -8.0  # one query whose scores are all about -8 / sqrt(8)
    caplog.set_level(logging.WARNING, logger="comfy_env_attn")
    out = taylor_attention(q, k, v, P=1, sub_head_blocks=1, early_probe=False,
                           quality_check=False)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert taylor_stats()["fallbacks"] == {"denominator": 1}
    assert "queries 64..95" in caplog.text and "early probe" not in caplog.text
    # without fallback_on_negative it computes anyway, denominators raised to the floor
    out = taylor_attention(q, k, v, P=1, sub_head_blocks=1, fallback_on_negative=False,
                           **QUIET)
    assert bool(torch.isfinite(out).all())
    assert taylor_stats()["fallbacks"] == {"denominator": 1}
    assert taylor_stats()["taylor_calls"] == 1


def test_min_tokens() -> None:
    q, k, v = qkv(N=99, D=8)
    exact = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(taylor_attention(q, k, v, **QUIET), exact)
    assert taylor_stats()["fallbacks"] == {"min_tokens": 1}
    got = taylor_attention(q, k, v, min_tokens=99, **QUIET)
    assert not torch.equal(got, exact)
    # cross-attention counts the longer side
    q2, k2, v2 = qkv(N=20, M=100, D=8)
    assert not torch.equal(taylor_attention(q2, k2, v2, **QUIET),
                           F.scaled_dot_product_attention(q2, k2, v2))
    assert taylor_stats() | {"last_quality": None} == {
        "calls": 3, "taylor_calls": 2, "fallbacks": {"min_tokens": 1}, "fallback_calls": 1,
        "quality_checks": 0, "last_quality": None, "worst_quality": None}


def test_causal_and_per_query_masks_fall_back_once(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = qkv(N=128, D=8)
    caplog.set_level(logging.WARNING, logger="comfy_env_attn")
    for _ in range(3):
        assert torch.equal(taylor_attention(q, k, v, is_causal=True, quality_check=False),
                           F.scaled_dot_product_attention(q, k, v, is_causal=True))
    tri = torch.ones(128, 128, dtype=torch.bool).tril()
    for mask in (tri, torch.where(tri, 0.0, -math.inf), tri[None, None].expand(1, 2, -1, -1)):
        assert torch.equal(taylor_attention(q, k, v, mask, quality_check=False),
                           F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert taylor_stats()["fallbacks"] == {"causal": 3, "mask": 3}
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2, said  # each distinct message once
    assert "causal attention" in said[0] and "varies per query" in said[1]
    taylor_attention(q, k, v, is_causal=True, quality_check=False, log_fallbacks=False)
    assert len(caplog.records) == 2


def test_per_key_masks_are_exact() -> None:
    q, k, v = qkv(N=128, M=140, D=8, sigma=0.5, seed=7)
    keep = torch.rand(1, 1, 1, 140, generator=torch.Generator().manual_seed(1)) > 0.3
    bias = torch.where(keep, torch.randn(1, 2, 1, 140) * 0.5, -math.inf)
    for mask in (keep, keep[0, 0], bias, bias.expand(1, 2, 128, 140)):
        exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = taylor_attention(q, k, v, mask, P=6, sub_head_blocks=1, **QUIET)
        assert err(got, exact) < 1e-4
        unmasked = F.scaled_dot_product_attention(q, k, v)
        assert err(got, unmasked) > 1e-2
    assert taylor_stats()["fallbacks"] == {}


def test_quality_check_logs_every_n_calls(caplog: pytest.LogCaptureFixture) -> None:
    q, k, v = qkv(N=128, D=8, sigma=0.6)
    caplog.set_level(logging.INFO, logger="comfy_env_attn")
    for _ in range(4):
        taylor_attention(q, k, v, P=4, sub_head_blocks=1, quality_check_log_every=2,
                         quality_check_samples=8)
    lines = [r.getMessage() for r in caplog.records if "taylor quality" in r.getMessage()]
    assert len(lines) == 2 and "8 rows vs exact" in lines[0]
    st = taylor_stats()
    assert st["quality_checks"] == 2 and st["last_quality"]["samples"] == 8
    good = st["last_quality"]
    assert good["cosine"] > 0.9999 and good["max_abs"] < 1e-2
    # it measures the truth: a poor setting shows a poor number (qk_normalize is no
    # approximation of the original attention)
    taylor_attention(q, k, v, P=4, sub_head_blocks=1, qk_normalize=True)
    bad = taylor_stats()["last_quality"]
    assert bad["cosine"] < 0.999 and bad["max_abs"] > 10 * good["max_abs"]
    assert taylor_stats()["worst_quality"] == bad
    n = len(caplog.records)
    taylor_attention(q, k, v, quality_check=False)
    taylor_attention(q, k, v, quality_check_log_every=0)
    assert len(caplog.records) == n and taylor_stats()["quality_checks"] == 3


# ---------------------------------------------------------------------------------------
# dtypes, heads, ComfyUI's memory, imports
# ---------------------------------------------------------------------------------------

def test_half_inputs_gqa_and_value_dim() -> None:
    q, k, v = qkv(N=128, D=16, sigma=0.6)
    ref = taylor_attention(q, k, v, P=3, sub_head_blocks=2, **QUIET)
    for dt in (torch.bfloat16, torch.float16):
        for fp32 in (False, True):
            got = taylor_attention(q.to(dt), k.to(dt), v.to(dt), P=3, sub_head_blocks=2,
                                   force_fp32=fp32, **QUIET)
            assert got.dtype == dt and err(got, ref) < 0.03
    # grouped-query: 2 query heads share 1 key/value head
    kv1 = k[:, :1], v[:, :1]
    torch.testing.assert_close(taylor_attention(q, *kv1, **QUIET),
                               taylor_attention(q, kv1[0].expand_as(q), kv1[1].expand_as(q),
                                                **QUIET))
    wide = torch.randn(1, 2, 128, 24)
    assert taylor_attention(q, k, wide, **QUIET).shape == (1, 2, 128, 24)


def test_memory_reserve_asks_comfyui_only_when_loaded_and_not_on_cpu(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    asked: list[tuple[int, object]] = []
    q, k, v = qkv(N=128, D=8)
    taylor_attention(q, k, v, memory_reserve=True, **QUIET)  # no ComfyUI: nothing to ask
    mm = types.ModuleType("comfy.model_management")
    mm.free_memory = lambda n, dev: asked.append((n, dev))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    taylor_attention(q, k, v, memory_reserve=True, **QUIET)
    assert asked == []  # the CPU has nothing to free
    caplog.set_level(logging.INFO, logger="comfy_env_attn")
    assert T._reserve(torch.device("cuda", 0), 2**20 * 10, 1.5, True)
    assert asked == [(15 * 2**20, torch.device("cuda", 0))]
    assert "15 MiB" in caplog.text
    mm.free_memory = lambda n, dev: 1 / 0  # type: ignore[attr-defined]
    assert not T._reserve(torch.device("cuda", 0), 10, 1.0, False)


def test_imports_only_the_standard_library_and_torch() -> None:
    tree = ast.parse((ROOT / "comfy_env_attn" / "runtime" / "taylor.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
    assert names - set(sys.stdlib_module_names) - {"__future__"} == {"torch"}
