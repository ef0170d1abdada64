"""Tiny random-weight ComfyUI models of every family, sampled with and without the node.

Built from ComfyUI's own classes (supported_models -> model_base -> the family's diffusion
model), wrapped in ComfyUI's ModelPatcher and sampled through comfy.sample on the CPU.
ComfyUI keeps global state in its `comfy` package (and once imported, the dispatcher uses
ComfyUI's attention functions), so this runs as a script in a process of its own:

    COMFYUI_DIR=/path/to/ComfyUI python tests/comfyui_models.py OUT.json [FAMILY ...]

It writes one JSON document: per family, the no-node reference and every backend's run;
per calling convention, the override against ComfyUI's attention_pytorch. The tests in
test_comfyui_models.py read it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torchvision_stub import stub_torchvision

BACKENDS = ("auto", "auto (exact)", "sdpa")
SEED = 7
F32 = torch.float32


def setup_comfy(comfy_dir: str) -> None:
    """Make ComfyUI's `comfy` package importable on a CPU machine without torchvision."""
    sys.path.insert(0, comfy_dir)
    stub_torchvision()
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    logging.getLogger().setLevel(logging.WARNING)
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models


# -- building the models ---------------------------------------------------------------------

def randomize(module: torch.nn.Module, seed: int) -> None:
    """Deterministic random weights that keep activations O(1): fan-in scaled matrices,
    norm scales near 1, small biases. ComfyUI builds its layers uninitialised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda x: x[0]):
            r = torch.randn(p.shape, generator=g, dtype=F32)
            if p.ndim >= 2:
                p.copy_(r / max(1, p[0].numel()) ** 0.5)
            elif name.endswith(("weight", "scale")):
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.1 * r)
        for name, b in module.named_buffers():
            if name.endswith("pos_embed"):  # SD3's, allocated with torch.empty
                b.copy_(0.1 * torch.randn(b.shape, generator=g, dtype=F32))


def patcher(config_cls: Any, unet_config: dict[str, Any], seed: int) -> Any:
    import comfy.model_patcher

    config = config_cls({**unet_config, "dtype": F32})
    config.set_inference_dtype(F32, None)
    model = config.get_model({})
    randomize(model.diffusion_model, seed)
    model.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def text(n: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(1, n, dim, generator=torch.Generator().manual_seed(seed))


def padding(n: int, real: int) -> torch.Tensor:
    """A text encoder's attention mask: 1 for the prompt's tokens, 0 for padding (long)."""
    return torch.tensor([[1] * real + [0] * (n - real)], dtype=torch.long)


def joint_padding_mask(n_txt: int, real: int, n_img: int) -> torch.Tensor:
    """Flux-style joint mask [1, T+I, T+I] as ComfyUI's conditioning nodes store it (float16,
    log of a bool mask: -inf where a query may not see a padded text token)."""
    keep = torch.ones(1, n_txt + n_img, n_txt + n_img, dtype=torch.bool)
    keep[:, :, real:n_txt] = False
    return torch.log(keep.to(torch.float16))


@dataclass
class Case:
    model: Any
    latent: torch.Tensor
    positive: list[Any]
    negative: list[Any]
    cfg: float
    steps: int = 3
    sampler: str = "euler"
    scheduler: str = "simple"
    # the same conditioning without its masks: shows that the masks change the result
    unmasked: tuple[list[Any], list[Any]] | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _strip(cond: list[Any], keys: tuple[str, ...]) -> list[Any]:
    return [[c, {k: v for k, v in d.items() if k not in keys}] for c, d in cond]


def _unpadded(cond: list[Any]) -> list[Any]:
    """The same text with every token marked real (LTX-Video and Lumina 2 need a mask)."""
    return [[c, dict(d, attention_mask=torch.ones_like(d["attention_mask"]))] for c, d in cond]


def sd15(masked: bool = False) -> Case:
    import comfy.ldm.modules.attention as attention
    import comfy.supported_models as sm

    unet = {"use_checkpoint": False, "image_size": 32, "out_channels": 4,
            "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
            "in_channels": 4, "model_channels": 64, "num_res_blocks": [1, 1],
            "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
            "use_linear_in_transformer": False, "context_dim": 48, "num_heads": 8,
            "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False,
            "use_temporal_resblock": False}
    m = patcher(sm.SD15, unet, 1)
    pos = [[text(77, 48, 11), {}]]
    neg = [[text(77, 48, 12), {}]]
    case = Case(m, torch.zeros(1, 4, 16, 16), pos, neg, cfg=5.0, scheduler="normal")
    if masked:
        # Cross-attention with the text padding masked, the way attention-patch nodes call
        # it: CrossAttention's own call, optimized_attention_masked(q, k, v, heads, mask,
        # ...), with the mask as the fifth positional argument.
        keep = torch.zeros(1, 1, 77)
        keep[..., 30:] = -torch.finfo(F32).max

        def attn2(q: Any, k: Any, v: Any, extra_options: dict[str, Any]) -> Any:
            mask = keep.expand(q.shape[0], 1, 77)
            return attention.optimized_attention_masked(
                q, k, v, extra_options["n_heads"], mask,
                attn_precision=extra_options["attn_precision"],
                transformer_options=extra_options)

        def plain(q: Any, k: Any, v: Any, extra_options: dict[str, Any]) -> Any:
            return attention.optimized_attention(
                q, k, v, extra_options["n_heads"], attn_precision=extra_options["attn_precision"],
                transformer_options=extra_options)

        unmasked = m.clone()
        for name, count in (("input", 12), ("middle", 1), ("output", 12)):
            for i in range(count):
                m.set_model_attn2_replace(attn2, name, i)
                unmasked.set_model_attn2_replace(plain, name, i)
        case.extra["unmasked_model"] = unmasked
        case.note = "cross-attention through an attn2 replace patch with a positional [B, 1, M] mask"
    return case


def sdxl() -> Case:
    import comfy.supported_models as sm

    unet = {"use_checkpoint": False, "image_size": 32, "out_channels": 4,
            "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
            "adm_in_channels": 32 + 6 * 256, "in_channels": 4, "model_channels": 64,
            "num_res_blocks": [1, 1], "transformer_depth": [0, 1], "channel_mult": [1, 2],
            "transformer_depth_middle": 1, "use_linear_in_transformer": True,
            "context_dim": 64, "num_head_channels": 64, "transformer_depth_output": [0, 0, 1, 1],
            "use_temporal_attention": False, "use_temporal_resblock": False}
    m = patcher(sm.SDXL, unet, 2)
    g = torch.Generator().manual_seed(21)
    extra = {"width": 128, "height": 128}
    pos = [[text(77, 64, 21), {"pooled_output": torch.randn(1, 32, generator=g), **extra}]]
    neg = [[text(77, 64, 22), {"pooled_output": torch.randn(1, 32, generator=g), **extra}]]
    return Case(m, torch.zeros(1, 4, 16, 16), pos, neg, cfg=5.0, scheduler="normal")


def sd3() -> Case:
    import comfy.supported_models as sm

    unet = {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2,
            "input_size": None, "adm_in_channels": 32,
            "context_embedder_config": {"target": "torch.nn.Linear",
                                        "params": {"in_features": 32, "out_features": 128}},
            "num_patches": 256, "pos_embed_max_size": 16, "qk_norm": "rms",
            "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [0]}
    m = patcher(sm.SD3, unet, 3)
    g = torch.Generator().manual_seed(31)
    pos = [[text(97, 32, 31), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    neg = [[text(97, 32, 32), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    return Case(m, torch.zeros(1, 16, 16, 16), pos, neg, cfg=4.0,
                note="MMDiT-X (SD3.5 Medium) blocks: joint and x-block self-attention")


def _flux_like(config_cls: Any, unet: dict[str, Any], seed: int, guidance: float) -> Case:
    g = torch.Generator().manual_seed(seed * 10)
    n_txt, real, n_img = 24, 10, 64  # 16x16 latent, 2x2 patches: 8x8 image tokens
    mask = joint_padding_mask(n_txt, real, n_img)
    keys = {"pooled_output": torch.randn(1, 32, generator=g), "guidance": guidance,
            "attention_mask": mask, "attention_mask_img_shape": (8, 8)}
    pos = [[text(n_txt, 32, seed * 10 + 1), keys]]
    neg = [[text(n_txt, 32, seed * 10 + 2), dict(keys)]]
    strip = ("attention_mask", "attention_mask_img_shape")
    return Case(patcher(config_cls, unet, seed), torch.zeros(1, 16, 16, 16), pos, neg,
                cfg=2.0, unmasked=(_strip(pos, strip), _strip(neg, strip)),
                note="joint [B, T+I, T+I] float16 mask by keyword, as StyleModelApply stores it")


def flux() -> Case:
    import comfy.supported_models as sm

    unet = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "patch_size": 2,
            "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 256,
            "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
            "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True}
    return _flux_like(sm.Flux, unet, 4, 3.5)


def chroma() -> Case:
    import comfy.supported_models as sm

    unet = {"image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2,
            "context_in_dim": 32, "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2,
            "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000,
            "qkv_bias": True, "in_dim": 64, "out_dim": 256, "hidden_dim": 64, "n_layers": 2}
    return _flux_like(sm.Chroma, unet, 5, 0.0)


def wan21() -> Case:
    import comfy.supported_models as sm

    unet = {"image_model": "wan2.1", "model_type": "t2v", "patch_size": (1, 2, 2),
            "text_len": 512, "in_dim": 16, "dim": 256, "ffn_dim": 512, "freq_dim": 256,
            "text_dim": 32, "out_dim": 16, "num_heads": 2, "num_layers": 1,
            "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6}
    m = patcher(sm.WAN21_T2V, unet, 6)
    pos = [[text(24, 32, 61), {}]]
    neg = [[text(24, 32, 62), {}]]
    return Case(m, torch.zeros(1, 16, 2, 16, 16), pos, neg, cfg=5.0,
                note="self- and cross-attention, heads by keyword; Wan takes no mask")


def ltxv() -> Case:
    import comfy.supported_models as sm

    unet = {"image_model": "ltxv", "num_layers": 1, "attention_head_dim": 64,
            "num_attention_heads": 2, "cross_attention_dim": 128, "in_channels": 128,
            "caption_channels": 32}
    m = patcher(sm.LTXV, unet, 7)
    pos = [[text(16, 32, 71), {"attention_mask": padding(16, 9), "frame_rate": 25}]]
    neg = [[text(16, 32, 72), {"attention_mask": padding(16, 5), "frame_rate": 25}]]
    return Case(m, torch.zeros(1, 128, 2, 4, 4), pos, neg, cfg=3.0,
                unmasked=(_unpadded(pos), _unpadded(neg)),
                note="cross-attention mask [B, 1, 1, M] as the fifth positional argument")


def hunyuan_video() -> Case:
    import comfy.supported_models as sm

    unet = {"image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16,
            "patch_size": [1, 2, 2], "vec_in_dim": 32, "context_in_dim": 32,
            "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1,
            "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 256,
            "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False}
    m = patcher(sm.HunyuanVideo, unet, 8)
    g = torch.Generator().manual_seed(81)
    keys = {"pooled_output": torch.randn(1, 32, generator=g), "guidance": 6.0,
            "attention_mask": padding(20, 12)}
    pos = [[text(20, 32, 81), keys]]
    neg = [[text(20, 32, 82), dict(keys)]]
    strip = ("attention_mask",)
    # cfg 1 (guidance-distilled, as run): one batch of one; ComfyUI's HunyuanVideo builds its
    # joint mask for a batch of one.
    return Case(m, torch.zeros(1, 16, 2, 16, 16), pos, neg, cfg=1.0,
                unmasked=(_strip(pos, strip), _strip(neg, strip)),
                note="token-refiner [B, 1, M, M] and joint [1, 1, I+T] masks by keyword")


def lumina2() -> Case:
    import comfy.supported_models as sm

    unet = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 192,
            "cap_feat_dim": 32, "n_layers": 1, "n_refiner_layers": 1, "n_heads": 2,
            "n_kv_heads": 1, "multiple_of": 32, "qk_norm": True, "axes_dims": [32, 32, 32],
            "axes_lens": [300, 512, 512]}
    m = patcher(sm.Lumina2, unet, 9)
    pos = [[text(18, 32, 91), {"attention_mask": padding(18, 11)}]]
    neg = [[text(14, 32, 92), {"attention_mask": padding(14, 6)}]]
    return Case(m, torch.zeros(1, 16, 16, 16), pos, neg, cfg=4.0,
                unmasked=(_unpadded(pos), _unpadded(neg)),
                note="[B, M] and [B, 1, M] masks as the fifth positional argument, [B, H, N, D]")


def qwen_image() -> Case:
    import comfy.supported_models as sm

    unet = {"image_model": "qwen_image", "patch_size": 2, "in_channels": 64,
            "out_channels": 16, "num_layers": 1, "attention_head_dim": 128,
            "num_attention_heads": 2, "joint_attention_dim": 32,
            "axes_dims_rope": (16, 56, 56)}
    m = patcher(sm.QwenImage, unet, 10)
    pos = [[text(20, 32, 101), {}]]
    neg = [[text(20, 32, 102), {}]]
    return Case(m, torch.zeros(1, 16, 16, 16), pos, neg, cfg=2.5,
                note="optimized_attention_masked(q, k, v, heads, mask) with the mask "
                     "positional; ComfyUI's QwenImage drops the text mask, so it is None")


FAMILIES: dict[str, Callable[[], Case]] = {
    "sd15": sd15,
    "sd15_masked_cross_attention": lambda: sd15(masked=True),
    "sdxl": sdxl,
    "sd3": sd3,
    "flux": flux,
    "wan21": wan21,
    "ltxv": ltxv,
    "hunyuan_video": hunyuan_video,
    "chroma": chroma,
    "lumina2": lumina2,
    "qwen_image": qwen_image,
}


# -- running ---------------------------------------------------------------------------------

def node_modules() -> tuple[Any, Any]:
    from comfy_env_attn.runtime import comfyui, dispatch

    return comfyui, dispatch


class Counter:
    """Counts the dispatcher's calls (wraps the module attribute the node calls through)."""

    def __init__(self, dispatch: Any) -> None:
        self.n = 0
        inner = dispatch.dispatch_attention

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.n += 1
            return inner(*args, **kwargs)

        dispatch.dispatch_attention = counted


def sample(model: Any, case: Case, positive: list[Any] | None = None,
           negative: list[Any] | None = None) -> torch.Tensor:
    import comfy.sample

    # as nodes.common_ksampler (KSampler) does
    latent = comfy.sample.fix_empty_latent_channels(model, case.latent)
    noise = comfy.sample.prepare_noise(latent, SEED)
    with torch.no_grad():
        out: torch.Tensor = comfy.sample.sample(
            model, noise, case.steps, case.cfg, case.sampler, case.scheduler,
            positive if positive is not None else case.positive,
            negative if negative is not None else case.negative,
            latent, denoise=1.0, seed=SEED, disable_pbar=True)
    return out


def spied(model: Any) -> tuple[Any, list[int]]:
    """A clone whose attention calls are counted by an override that calls ComfyUI's own
    function unchanged."""
    calls = [0]

    def spy(func: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return func(*args, **kwargs)

    m = model.clone()
    m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = spy
    return m, calls


def weights_sum(model: Any) -> float:
    with torch.no_grad():
        return float(sum(p.double().abs().sum() for p in model.model.parameters()))


def run_family(name: str, node: Any, counter: Counter) -> dict[str, Any]:
    t0 = time.perf_counter()
    case = FAMILIES[name]()
    model = case.model
    res: dict[str, Any] = {"note": case.note, "backends": {}}
    options_before = copy.deepcopy(model.model_options)
    weights_before = weights_sum(model)
    ref = sample(model, case)
    res["finite"] = bool(torch.isfinite(ref).all())
    res["scale"] = float(ref.abs().max())
    spy_model, calls = spied(model)
    res["spy_diff"] = float((sample(spy_model, case) - ref).abs().max())
    res["attention_calls"] = calls[0]
    if case.unmasked is not None:
        res["mask_effect"] = float((sample(model, case, *case.unmasked) - ref).abs().max())
    if "unmasked_model" in case.extra:
        res["mask_effect"] = float((sample(case.extra["unmasked_model"], case) - ref).abs().max())
    for backend in BACKENDS:
        b: dict[str, Any] = {}
        try:
            patched = node.AttentionBackend().apply(model, backend)[0]
            counter.n = 0
            out = sample(patched, case)
            b["dispatch_calls"] = counter.n
            b["max_diff"] = float((out - ref).abs().max())
            b["finite"] = bool(torch.isfinite(out).all())
            b["override_set"] = "optimized_attention_override" in patched.model_options.get(
                "transformer_options", {})
        except Exception as e:
            b["error"] = f"{type(e).__name__}: {e}"
            b["traceback"] = traceback.format_exc()[-3000:]
        b["options_unchanged"] = model.model_options == options_before
        b["original_has_override"] = "optimized_attention_override" in \
            model.model_options.get("transformer_options", {})
        res["backends"][backend] = b
    res["weights_unchanged"] = weights_sum(model) == weights_before
    res["ref_again_diff"] = float((sample(model, case) - ref).abs().max())
    res["seconds"] = time.perf_counter() - t0
    return res


# -- calling conventions -----------------------------------------------------------------------

def conventions(node: Any, counter: Counter) -> dict[str, Any]:
    """The override against ComfyUI's attention_pytorch (its semantics for every argument),
    for each way ComfyUI's models call optimized_attention."""
    import comfy.ldm.modules.attention as attention

    g = torch.Generator().manual_seed(5)
    b, h, d, n, m = 2, 3, 16, 12, 7

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    def flat(t: torch.Tensor) -> torch.Tensor:  # [B, H, N, D] -> [B, N, H*D]
        return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)

    q4, k4, v4 = r(b, h, n, d), r(b, h, n, d), r(b, h, n, d)
    kx, vx = r(b, h, m, d), r(b, h, m, d)
    q, k, v = flat(q4), flat(k4), flat(v4)
    pad = torch.zeros(b, m)
    pad[0, 4:] = -torch.finfo(F32).max
    pad[1, 2:] = float("-inf")
    bool_nm = r(n, n) > -0.5
    bool_nm.fill_diagonal_(True)
    bool_bnm = r(b, n, n) > -0.5
    for i in range(b):
        bool_bnm[i].fill_diagonal_(True)
    bool_bhnm = r(b, h, n, n) > -0.5
    bool_bhnm[..., 0] = True
    topts = {"optimized_attention_override": None, "block": ("input", 1)}
    pt = attention.attention_pytorch
    cases: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
        "flat, heads positional (SD UNet)": ((q, k, v, h), {}),
        "flat, heads by keyword (SD3, Wan)": ((q, k, v), {"heads": h}),
        "flat cross-attention, other length (Wan, LTX)": ((q, flat(kx), flat(vx)), {"heads": h}),
        "SD3: v split into heads, q and k flat": (
            (q, k, v4.transpose(1, 2)), {"heads": h}),
        "[B,H,N,D] in, [B,N,H*D] out (Flux, Hunyuan)": ((q4, k4, v4, h), {"skip_reshape": True}),
        "[B,H,N,D] in and out (Wan, Cosmos)": (
            (q4, k4, v4), {"heads": h, "skip_reshape": True, "skip_output_reshape": True}),
        "[B,N,H*D] in, [B,H,N,D] out": ((q, k, v, h), {"skip_output_reshape": True}),
        "positional [B,1,1,M] mask (LTX-Video)": (
            (q, flat(kx), flat(vx), h, pad.view(b, 1, 1, m)), {}),
        "positional [B,M] mask, batch 1 (Lumina 2)": (
            (q4[:1], kx[:1], vx[:1], h, pad[:1]), {"skip_reshape": True}),
        "positional [B,1,M] mask (Lumina 2, SD cross-attention)": (
            (q4, kx, vx, h, pad.view(b, 1, m)), {"skip_reshape": True}),
        "positional [N,M] float mask": ((q, flat(kx), flat(vx), h, r(n, m)), {}),
        "keyword [B,N,M] float mask (Flux joint mask)": (
            (q4, k4, v4, h), {"skip_reshape": True, "mask": r(b, n, n)}),
        "keyword [B,H,N,M] float mask": ((q, k, v, h), {"mask": r(b, h, n, n)}),
        "keyword [B,1,M,M] float mask (Hunyuan token refiner)": (
            (q4, k4, v4, h), {"skip_reshape": True, "mask": r(b, 1, n, n)}),
        "bool [N,M] mask": ((q, k, v, h, bool_nm), {}),
        "bool [B,N,M] mask by keyword": ((q, k, v), {"heads": h, "mask": bool_bnm}),
        "bool [B,H,N,M] mask, [B,H,N,D]": ((q4, k4, v4, h, bool_bhnm), {"skip_reshape": True}),
        "every positional argument": ((q, k, v, h, None, F32, False, False), {}),
        "attn_precision, transformer_options and ComfyUI's wrapper key": (
            (q, k, v, h), {"attn_precision": F32, "transformer_options": topts,
                           "_inside_attn_wrapper": True}),
    }
    # attention_pytorch refuses a mask of another dtype (the other functions add it): the
    # node adds it in q's dtype
    half = r(b, 1, n, m).half()
    cases["float16 mask for float32 q"] = ((q, flat(kx), flat(vx), h, half), {})
    refs: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {"float16 mask for float32 q": ((q, flat(kx), flat(vx), h, half.float()), {})}
    out: dict[str, Any] = {}
    for label, (args, kwargs) in cases.items():
        res: dict[str, Any] = {}
        try:
            rargs, rkwargs = refs.get(label, (args, kwargs))
            ref = pt(*rargs, **dict(rkwargs, _inside_attn_wrapper=True))
            fallback = [0]

            def comfy_func(*a: Any, fallback: list[int] = fallback, **kw: Any) -> Any:
                fallback[0] += 1
                return pt(*a, **kw)

            counter.n = 0
            got = node.make_override("sdpa")(
                comfy_func, *args, **dict(kwargs, _inside_attn_wrapper=True))
            res["shape_ok"] = tuple(got.shape) == tuple(ref.shape)
            res["max_diff"] = float((got - ref).abs().max()) if res["shape_ok"] else None
            res["dispatch_calls"] = counter.n
            res["fallback_calls"] = fallback[0]
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            res["traceback"] = traceback.format_exc()[-2000:]
        out[label] = res
    return out


def fallbacks(node: Any, counter: Counter, dispatch: Any) -> dict[str, Any]:
    """Inputs the override cannot route: ComfyUI's function gets the call unchanged."""
    g = torch.Generator().manual_seed(6)
    b, h, d, n = 2, 3, 16, 12
    q4 = torch.randn(b, h, n, d, generator=g)
    q = q4.transpose(1, 2).reshape(b, n, h * d)
    cases: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
        "no heads (MMDiT-X's num_heads= call)": ((q, q, q), {"num_heads": h}),
        "heads that do not divide the width": ((q, q, q, 5), {}),
        "skip_reshape with heads != q.shape[1]": ((q4, q4, q4, h + 1), {"skip_reshape": True}),
        "[B*H, N, M] mask (not broadcastable)": ((q, q, q, h, torch.zeros(b * h, n, n)), {}),
        "5-D mask": ((q, q, q, h, torch.zeros(1, 1, 1, n, n)), {}),
        "q and k of different dtypes": ((q, q.double(), q, h), {}),
        "k of another batch size": ((q, q[:1], q[:1], h), {}),
        "2-D q": ((q[0], q[0], q[0], h), {}),
        "a ninth positional argument": ((q, q, q, h, None, None, False, False, 1), {}),
        "heads given twice": ((q, q, q, h), {"heads": h}),
    }
    out: dict[str, Any] = {}
    sentinel = object()
    for label, (args, kwargs) in cases.items():
        res: dict[str, Any] = {}
        seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def comfy_func(*a: Any, seen: list[Any] = seen, **kw: Any) -> Any:
            seen.append((a, kw))
            return sentinel

        try:
            counter.n = 0
            got = node.make_override("sdpa")(comfy_func, *args, **kwargs)
            res["returned_comfy_result"] = got is sentinel
            res["same_args"] = len(seen) == 1 and len(seen[0][0]) == len(args) and all(
                x is y for x, y in zip(seen[0][0], args, strict=True)) and seen[0][1] == kwargs
            res["dispatch_calls"] = counter.n
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
        out[label] = res
    # the dispatcher failing: ComfyUI's function runs instead, no exception
    inner = dispatch.dispatch_attention

    def broken(*a: Any, **kw: Any) -> Any:
        raise RuntimeError("a kernel failed")

    dispatch.dispatch_attention = broken
    seen2: list[int] = []

    def comfy_func2(*a: Any, **kw: Any) -> Any:
        seen2.append(1)
        return sentinel

    try:
        got = node.make_override("sdpa")(comfy_func2, q, q, q, h)
        out["the dispatcher raising"] = {"returned_comfy_result": got is sentinel,
                                         "same_args": seen2 == [1], "dispatch_calls": 0}
    except Exception as e:
        out["the dispatcher raising"] = {"error": f"{type(e).__name__}: {e}"}
    finally:
        dispatch.dispatch_attention = inner
    return out


def main(argv: list[str]) -> int:
    comfy_dir = os.environ.get("COMFYUI_DIR")
    if not comfy_dir:
        print("COMFYUI_DIR is not set", file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and contention)
    t0 = time.perf_counter()
    setup_comfy(comfy_dir)
    node, dispatch = node_modules()
    result: dict[str, Any] = {"import_seconds": time.perf_counter() - t0, "families": {},
                              "torch": torch.__version__}
    fallback_counter = Counter(dispatch)
    result["fallbacks"] = fallbacks(node, fallback_counter, dispatch)
    result["conventions"] = conventions(node, fallback_counter)
    names = argv[1:] or list(FAMILIES)
    for name in names:
        try:
            result["families"][name] = run_family(name, node, fallback_counter)
        except Exception as e:
            result["families"][name] = {"error": f"{type(e).__name__}: {e}",
                                        "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = time.perf_counter() - t0
    with open(argv[0], "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
