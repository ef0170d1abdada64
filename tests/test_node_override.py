"""The Attention Backend node's override without a ComfyUI checkout (so CI runs it): the
calling conventions ComfyUI's models use reach the dispatcher and give SDPA's answer; what
it cannot route goes to ComfyUI's function unchanged. The model-family tests with real
ComfyUI classes are in test_comfyui_models.py (COMFYUI_DIR)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F

from comfy_env_attn.runtime import dispatch
from comfy_env_attn.runtime.comfyui import make_override


@pytest.fixture
def override(tmp_path, monkeypatch):
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(tmp_path / "none.toml"))
    dispatch._reset_for_tests()
    yield make_override("auto")
    dispatch._reset_for_tests()


def flat(b: int = 2, n: int = 77, heads: int = 4, d: int = 32, m: int | None = None):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, n, heads * d, generator=g)
    k, v = (torch.randn(b, m or n, heads * d, generator=g) for _ in range(2))
    return q, k, v


def split(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def must_not_run(*args, **kwargs):
    raise AssertionError("the override handles this call itself")


def test_heads_positional_or_by_keyword_and_both_layouts(override) -> None:
    q, k, v = flat()
    ref = F.scaled_dot_product_attention(split(q, 4), split(k, 4), split(v, 4))
    ref_flat = ref.transpose(1, 2).reshape(2, 77, 128)
    torch.testing.assert_close(override(must_not_run, q, k, v, 4), ref_flat)
    torch.testing.assert_close(override(must_not_run, q, k, v, heads=4), ref_flat)
    qs, ks, vs = (split(t, 4) for t in (q, k, v))
    out = override(must_not_run, qs, ks, vs, heads=4, skip_reshape=True,
                   skip_output_reshape=True)
    torch.testing.assert_close(out, ref)


def test_a_positional_padding_mask_is_applied(override) -> None:
    q, k, v = flat(m=20)
    mask = torch.ones(2, 77, 20, dtype=torch.bool)
    mask[:, :, 12:] = False  # text padding
    out = override(must_not_run, q, k, v, 4, mask)  # LTX-Video passes it fifth
    ref = F.scaled_dot_product_attention(split(q, 4), split(k, 4), split(v, 4),
                                         attn_mask=mask[:, None])
    torch.testing.assert_close(out, ref.transpose(1, 2).reshape(2, 77, 128))
    unmasked = override(must_not_run, q, k, v, 4)
    assert not torch.allclose(out, unmasked, atol=1e-3)


def test_what_it_cannot_route_goes_to_comfyui_unchanged(override) -> None:
    q, k, v = flat()
    seen = []

    def comfy(*args, **kwargs):
        seen.append((args, kwargs))
        return "comfy's answer"

    assert override(comfy, q, k, v) == "comfy's answer"  # no heads at all
    assert override(comfy, q, k, v, 5) == "comfy's answer"  # 5 does not divide 128
    assert len(seen) == 2 and seen[1][0][3] == 5


def test_the_taylor_node_routes_through_taylor_attention_with_its_parameters() -> None:
    from comfy_env_attn.runtime.comfyui import TAYLOR_PARAMS, TaylorAttention
    from comfy_env_attn.runtime.taylor import reset_taylor_stats, taylor_attention, taylor_stats

    class Model:  # ComfyUI's ModelPatcher, as far as a node uses it
        def __init__(self) -> None:
            self.model_options: dict = {}

        def clone(self) -> Model:
            return Model()

    original = Model()
    params = {name: spec[1]["default"] for name, spec in TAYLOR_PARAMS.items()}
    params.update(P=2, sub_head_blocks=1, min_tokens=16, quality_check=False)
    patched, label = TaylorAttention().apply(original, **params)
    assert original.model_options == {} and "Taylor attention (approximate; P=2" in label
    override = patched.model_options["transformer_options"]["optimized_attention_override"]
    q, k, v = (t * 0.3 for t in flat(n=64))
    reset_taylor_stats()
    out = override(must_not_run, q, k, v, 4)
    assert taylor_stats()["taylor_calls"] == 1  # the series ran, not a fallback
    qs, ks, vs = (split(t, 4) for t in (q, k, v))
    direct = taylor_attention(qs, ks, vs, P=2, sub_head_blocks=1, min_tokens=16,
                              quality_check=False)
    torch.testing.assert_close(out, direct.transpose(1, 2).reshape(2, 64, 128))
    exact = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(2, 64, 128)
    assert 0 < float((out - exact).abs().max()) < 0.1  # approximate, and close here
    assert override(lambda *a, **kw: "comfy's", q, k, v) == "comfy's"  # no heads
    assert override(lambda *a, **kw: "comfy's", q, k, v, 5) == "comfy's"  # unroutable
