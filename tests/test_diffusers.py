"""comfy_env_attn.diffusers on real diffusers models with tiny random-weight configurations,
on the CPU: a UNet2DConditionModel (cross-attention with a text mask) and a
FluxTransformer2DModel (joint and single-stream blocks with RoPE), weights seeded.

No lock is read (COMFY_ENV_ATTN_LOCK names a missing file), so the dispatcher routes every
call to PyTorch SDPA; a wrapper around `dispatch.dispatch_attention` counts the calls, which
proves each route really goes through the dispatcher.

Tolerance: float32, max |out - ref| <= 1e-5 * max(1, max |ref|). Measured with diffusers
0.39.0, 0.42.1, 0.35.2, 0.34.0 and 0.32.2 on torch 2.13.0+cpu: 0.0 for every route and
model (the same SDPA calls on the same views), except the swap of diffusers' classic
AttnProcessor (baddbmm and softmax against SDPA): 1.1e-6 of a largest magnitude of 1.3. The
text mask changes the UNet's output by 0.13, over ten thousand times the tolerance.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from comfy_env_attn import diffusers as cdiff
from comfy_env_attn.runtime import dispatch

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5
AD: Any = cdiff._dispatcher_module()  # diffusers.models.attention_dispatch, or None
HAS_DISPATCHER = AD is not None
needs_dispatcher = pytest.mark.skipif(not HAS_DISPATCHER,
                                      reason="this diffusers has no attention dispatcher")


def close(out: Any, ref: Any) -> bool:
    return float((out - ref).abs().max()) <= TOLERANCE * max(1.0, float(ref.abs().max()))


@pytest.fixture(autouse=True)
def no_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("COMFY_ENV_ATTN_LOCK", str(tmp_path / "missing.toml"))
    for var in ("COMFY_ENV_ATTN_BACKEND", "COMFYUI_ATTENTION_MECHANISM",
                "COMFY_ENV_ATTN_UNVERIFIED"):
        monkeypatch.delenv(var, raising=False)
    dispatch._reset_for_tests()
    cdiff._LOGGED.clear()
    active = None
    if HAS_DISPATCHER:
        active = AD._AttentionBackendRegistry._active_backend
    yield
    if HAS_DISPATCHER:
        AD._AttentionBackendRegistry._active_backend = active  # set_attention_backend changes it for good
    dispatch._reset_for_tests()


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """The shapes of q in every call that reached dispatch_attention."""
    seen: list[tuple[int, ...]] = []
    real = dispatch.dispatch_attention

    def counting(q: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(tuple(q.shape))
        return real(q, *args, **kwargs)

    monkeypatch.setattr(dispatch, "dispatch_attention", counting)
    return seen


# -- tiny models -------------------------------------------------------------------------------

def tiny_unet() -> Any:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32).eval()


def unet_inputs(masked: bool = True) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]) if masked else None
    return {"sample": torch.randn(2, 4, 8, 8, generator=g), "timestep": 10,
            "encoder_hidden_states": torch.randn(2, 7, 32, generator=g),
            "encoder_attention_mask": mask}


def tiny_flux() -> Any:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8)).eval()


def flux_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    grid = torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    return {"hidden_states": torch.randn(2, 16, 4, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "pooled_projections": torch.randn(2, 32, generator=g),
            "timestep": torch.tensor([0.5, 0.5]),
            "img_ids": torch.stack(grid, -1).reshape(-1, 3), "txt_ids": torch.zeros(5, 3)}


MODELS = {"unet": (tiny_unet, unet_inputs), "flux": (tiny_flux, flux_inputs)}


def run(model: Any, inputs: dict[str, Any]) -> Any:
    with torch.no_grad():
        return model(**inputs).sample


def processors(model: Any) -> dict[str, Any]:
    """Each attention module's processor object (what must come back after the context)."""
    return {n: m.processor for n, m in model.named_modules() if hasattr(m, "set_processor")}


def backend_attrs(model: Any) -> dict[str, Any]:
    return {n: dict(vars(p)) for n, p in processors(model).items()}


# -- use_dispatcher ----------------------------------------------------------------------------

def use(model: Any, *args: Any, **kwargs: Any) -> Any:
    return cdiff.use_dispatcher(model, *args, **kwargs)


@pytest.mark.parametrize("name", list(MODELS))
def test_use_dispatcher_gives_the_default_output(name: str, calls: list[Any]) -> None:
    build, inputs = MODELS[name]
    model = build()
    ref = run(model, inputs())
    assert calls == []
    with use(model) as routing:
        out = run(model, inputs())
    n_modules = len(processors(model))
    assert sorted(routing.routed) == sorted(processors(model)) and n_modules >= 2
    assert routing.custom == {} and routing.unrouted == {}
    assert len(calls) == n_modules  # one dispatcher call per attention module
    assert close(out, ref), float((out - ref).abs().max())
    assert len(calls) == n_modules and close(run(model, inputs()), ref)  # and after, default


def test_the_classic_attn_processor_is_reproduced(calls: list[Any]) -> None:
    """AttnProcessor (baddbmm and softmax, `attn.scale`) swaps for its own variant."""
    model = tiny_unet()
    model.set_attn_processor(diffusers.models.attention_processor.AttnProcessor())
    ref = run(model, unet_inputs())
    with use(model) as routing:
        assert {repr(p) for p in processors(model).values()} == \
            {"DispatcherAttnProcessor(like='AttnProcessor')"}
        out = run(model, unet_inputs())
    assert len(routing.swapped) == len(calls) == len(processors(model))
    assert close(out, ref), float((out - ref).abs().max())


def test_the_unet_mask_goes_through(calls: list[Any]) -> None:
    """The text mask reaches the dispatcher: without it the output differs widely."""
    model = tiny_unet()
    masked, plain = run(model, unet_inputs(True)), run(model, unet_inputs(False))
    assert float((masked - plain).abs().max()) > 1e3 * TOLERANCE
    with use(model):
        assert close(run(model, unet_inputs(True)), masked)
        assert close(run(model, unet_inputs(False)), plain)
    assert calls


@pytest.mark.parametrize("name", list(MODELS))
def test_originals_come_back(name: str) -> None:
    build, inputs = MODELS[name]
    model = build()
    before, attrs = processors(model), backend_attrs(model)
    with use(model):
        inside, inside_attrs = processors(model), backend_attrs(model)
    assert inside != before or inside_attrs != attrs  # routed inside
    assert all(processors(model)[n] is p for n, p in before.items())
    assert backend_attrs(model) == attrs

    with pytest.raises(RuntimeError, match="in the body"), use(model):
        run(model, inputs())
        raise RuntimeError("in the body")
    assert all(processors(model)[n] is p for n, p in before.items())
    assert backend_attrs(model) == attrs


def test_originals_come_back_when_the_forward_raises() -> None:
    model = tiny_unet()
    before = processors(model)
    bad = unet_inputs()
    bad["encoder_hidden_states"] = torch.randn(2, 7, 31)  # wrong width: to_k raises
    with pytest.raises(RuntimeError), use(model):
        run(model, bad)
    assert all(processors(model)[n] is p for n, p in before.items())


class NAGLikeProcessor:
    """A processor of its own (as normalized attention guidance sets one): left alone."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_a_custom_processor_is_kept_and_listed_once(calls: list[Any],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_unet()
    ref = run(model, unet_inputs())
    target = "mid_block.attentions.0.transformer_blocks.0.attn2"
    module = model.get_submodule(target)
    custom = NAGLikeProcessor(module.processor)
    module.set_processor(custom)
    caplog.set_level(logging.WARNING, logger="comfy_env_attn")
    for _ in range(2):
        with use(model) as routing:
            assert module.processor is custom
            assert routing.custom == {target: "NAGLikeProcessor"}
            assert target not in routing.routed
            out = run(model, unet_inputs())
    assert module.processor is custom and custom.calls == 2
    assert len(calls) == 2 * (len(processors(model)) - 1)
    assert close(out, ref)
    listed = [r for r in caplog.records if "custom processors" in r.getMessage()]
    assert len(listed) == 1 and "NAGLikeProcessor x1 (" + target in listed[0].getMessage()


@needs_dispatcher
def test_a_custom_dispatcher_processor_keeps_its_backend() -> None:
    """A custom subclass of a processor that goes through diffusers' dispatcher is custom
    too: it does not get this backend."""
    model = tiny_flux()
    attn = model.get_submodule("single_transformer_blocks.0.attn")
    custom_cls = type("MyFluxProcessor", (type(attn.processor),), {"__module__": __name__})
    proc = custom_cls()
    attn.set_processor(proc)
    with use(model) as routing:
        assert "_attention_backend" not in vars(proc)
        assert routing.custom == {"single_transformer_blocks.0.attn": "MyFluxProcessor"}
        assert routing.backend_set == ["transformer_blocks.0.attn"]
    assert attn.processor is proc


def test_env_backend_sdpa_is_honoured(monkeypatch: pytest.MonkeyPatch,
                                      calls: list[Any]) -> None:
    model = tiny_unet()
    ref = run(model, unet_inputs())
    with use(model, backend="flash"):
        assert dispatch._S.mode == "flash"  # asked for, not verified here: SDPA serves it
        assert close(run(model, unet_inputs()), ref)
    monkeypatch.setenv("COMFY_ENV_ATTN_BACKEND", "sdpa")
    with use(model, backend="flash"):
        assert dispatch._S.mode == "sdpa" and "Flash" not in dispatch.get_backend()
        n = len(calls)
        assert close(run(model, unet_inputs()), ref) and len(calls) > n
    monkeypatch.delenv("COMFY_ENV_ATTN_BACKEND")
    dispatch._reset_for_tests()
    dispatch.set_backend("sdpa")
    with use(model, backend="flash"):
        assert dispatch._S.mode == "flash"
    assert dispatch._S.mode == "sdpa"  # the dispatcher's choice before the context


def test_a_pipeline_routes_every_component(calls: list[Any]) -> None:
    base: Any = diffusers.DiffusionPipeline

    class TwoModels(base):  # type: ignore[misc]
        def __init__(self, unet: Any, transformer: Any) -> None:
            super().__init__()
            self.register_modules(unet=unet, transformer=transformer)

    pipe = TwoModels(tiny_unet(), tiny_flux())
    refs = run(pipe.unet, unet_inputs()), run(pipe.transformer, flux_inputs())
    before = {**processors(pipe.unet), **processors(pipe.transformer)}
    with use(pipe) as routing:
        outs = run(pipe.unet, unet_inputs()), run(pipe.transformer, flux_inputs())
    assert {n.split(".")[0] for n in routing.routed} == {"unet", "transformer"}
    assert len(routing.routed) == len(before) == len(calls)
    assert all(close(o, r) for o, r in zip(outs, refs, strict=True))
    after = {**processors(pipe.unet), **processors(pipe.transformer)}
    assert all(after[n] is p for n, p in before.items())


def test_not_a_model() -> None:
    with pytest.raises(TypeError, match="pipeline or model"), use(object()):
        pass


# -- the registered diffusers backend ----------------------------------------------------------

@needs_dispatcher
def test_registered_backend_gives_the_default_output(calls: list[Any]) -> None:
    assert cdiff.register() == cdiff.register() == "comfy_env_attn"
    assert AD.AttentionBackendName("comfy_env_attn").value == "comfy_env_attn"
    assert "comfy_env_attn" in {m.value for m in AD.AttentionBackendName.__members__.values()}

    model = tiny_flux()
    ref = run(model, flux_inputs())
    model.set_attention_backend("comfy_env_attn")
    out = run(model, flux_inputs())
    assert len(calls) == 2 and close(out, ref)
    model.reset_attention_backend()
    AD._AttentionBackendRegistry._active_backend = AD.AttentionBackendName.NATIVE

    fresh = tiny_flux()
    with AD.attention_backend("comfy_env_attn"):
        out = run(fresh, flux_inputs())
    assert len(calls) == 4 and close(out, ref)
    assert AD._AttentionBackendRegistry._active_backend == AD.AttentionBackendName.NATIVE
    run(fresh, flux_inputs())
    assert len(calls) == 4  # the default again


@needs_dispatcher
@pytest.mark.parametrize("mask", ["none", "key_bool", "full_additive", "nm_bool"])
@pytest.mark.parametrize("gqa", [False, True])
def test_registered_backend_layout_and_masks(mask: str, gqa: bool, calls: list[Any]) -> None:
    """diffusers hands backends [B, N, H, D]; masks as its native backend takes them."""
    cdiff.register()
    g = torch.Generator().manual_seed(2)
    b, n, m, h, d = 2, 6, 5, 4, 8
    hk = 2 if gqa else h
    q = torch.randn(b, n, h, d, generator=g)
    k, v = torch.randn(b, m, hk, d, generator=g), torch.randn(b, m, hk, d, generator=g)
    masks = {"none": None,
             "key_bool": torch.tensor([[True] * m, [True] * 3 + [False] * (m - 3)]),
             "full_additive": torch.randn(b, h, n, m, generator=g),
             "nm_bool": torch.rand(n, m, generator=g) > 0.3}
    attn_mask = masks[mask]
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask[..., 0] = True  # every query attends somewhere
    # a [B, M] key mask means [B, 1, 1, M] (as recent diffusers widen it; 0.35 did not)
    ref_mask = attn_mask[:, None, None, :] if mask == "key_bool" else attn_mask
    ref = AD.dispatch_attention_fn(q, k, v, backend="native", attn_mask=ref_mask,
                                   enable_gqa=gqa)
    out = AD.dispatch_attention_fn(q, k, v, backend="comfy_env_attn", attn_mask=attn_mask,
                                   enable_gqa=gqa)
    assert out.shape == (b, n, h, d) and close(out, ref)
    assert calls == [(b, h, n, d)]


def test_importing_the_module_loads_neither_torch_nor_diffusers() -> None:
    code = ("import sys, comfy_env_attn, comfy_env_attn.diffusers\n"
            "print(sorted({'torch', 'diffusers'} & set(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True)
    assert r.stdout.strip() == "[]"
