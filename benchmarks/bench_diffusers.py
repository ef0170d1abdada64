"""One denoising step of a diffusers model with random weights: diffusers' default attention
against the same model through comfy-env-attn's dispatcher (`use_dispatcher`).

    python benchmarks/bench_diffusers.py --device cuda                  # Flux-dev shape, bf16
    python benchmarks/bench_diffusers.py --device cuda --model sdxl     # SDXL base UNet, bf16
    python benchmarks/bench_diffusers.py --device cpu                   # tiny Flux, float32
    ... [--double N --single N] [--res PX] [--steps N] [--json FILE]

One step is one forward of the denoiser, as a pipeline calls it per step:
- flux: FluxTransformer2DModel with Flux-dev's sizes (24 heads of 128, text width 4096,
  pooled 768, RoPE axes 16/56/56, guidance embedding), a 1024x1024 image (64x64 packed
  latents = 4,096 image tokens) and 512 text tokens, batch 1. All 19 double-stream and 38
  single-stream blocks by default on CUDA (12B parameters, 24 GB in bf16); --double and
  --single take fewer. On the CPU: 1 + 1 blocks of 2 heads of 64 at 256 image tokens.
- sdxl: the SDXL base UNet2DConditionModel (2.6B parameters), 128x128 latents (1024x1024),
  77 text tokens of 2048, batch 2 (classifier-free guidance). On the CPU: a tiny UNet.

Both sides run the same model object on the same inputs, in rounds that alternate which goes
first (CUDA events on a GPU, median of the rounds); the script prints the step times, the
speed-up, the largest difference between the two outputs (relative to the output's largest
magnitude) and which backend the dispatcher chose for each kind of attention call. The
dispatcher reads the lock of this environment (`comfy-env-attn install` writes it) or,
without one, uses PyTorch SDPA: then the two sides differ only by the dispatcher's overhead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from comfy_env_attn.diffusers import use_dispatcher
from comfy_env_attn.runtime import dispatch


def flux(args: argparse.Namespace, dtype: torch.dtype, dev: torch.device
         ) -> tuple[Any, dict[str, Any], str]:
    FluxTransformer2DModel = importlib.import_module("diffusers").FluxTransformer2DModel
    cuda = dev.type == "cuda"
    double = args.double if args.double is not None else (19 if cuda else 1)
    single = args.single if args.single is not None else (38 if cuda else 1)
    heads, head_dim, text, width, pooled = (24, 128, 4096, 512, 768) if cuda else \
        (2, 64, 64, 32, 64)
    res = args.res or (1024 if cuda else 256)
    side = res // 16  # 8x VAE, then 2x2 packing
    with torch.device(dev):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
            attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text,
            pooled_projection_dim=pooled, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56) if head_dim == 128 else (8, 28, 28)).to(dtype).eval()
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side * 1.0),
                                         torch.arange(side * 1.0), indexing="ij"), -1)
        inputs = {"hidden_states": torch.randn(1, side * side, 64, dtype=dtype),
                  "encoder_hidden_states": torch.randn(1, width, text, dtype=dtype),
                  "pooled_projections": torch.randn(1, pooled, dtype=dtype),
                  "timestep": torch.tensor([0.5], dtype=dtype),
                  "guidance": torch.tensor([3.5], dtype=dtype),
                  "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(width, 3)}
    what = (f"Flux-shaped transformer, {double} double + {single} single blocks, {heads} heads "
            f"of {head_dim}, {res}x{res} ({side * side} image + {width} text tokens), batch 1")
    return model, inputs, what


SDXL: dict[str, Any] = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "use_linear_projection": True, "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}
SDXL_TINY: dict[str, Any] = {**SDXL, "sample_size": 16, "block_out_channels": (32, 64, 64),
             "transformer_layers_per_block": (1, 1, 1), "attention_head_dim": (2, 4, 4),
             "cross_attention_dim": 64, "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 64 + 6 * 8, "norm_num_groups": 32}


def sdxl(args: argparse.Namespace, dtype: torch.dtype, dev: torch.device
         ) -> tuple[Any, dict[str, Any], str]:
    UNet2DConditionModel = importlib.import_module("diffusers").UNet2DConditionModel
    cfg = SDXL if dev.type == "cuda" else SDXL_TINY
    side = (args.res // 8) if args.res else cfg["sample_size"]
    text = cfg["cross_attention_dim"]
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    with torch.device(dev):
        model = UNet2DConditionModel(**cfg).to(dtype).eval()
        inputs = {"sample": torch.randn(2, 4, side, side, dtype=dtype), "timestep": 500,
                  "encoder_hidden_states": torch.randn(2, 77, text, dtype=dtype),
                  "added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, dtype=dtype),
                                        "time_ids": torch.randn(2, 6, dtype=dtype)}}
    what = (f"SDXL{'' if cfg is SDXL else '-shaped tiny'} UNet, {side}x{side} latents "
            f"({side * 8}x{side * 8}), 77 text tokens, batch 2")
    return model, inputs, what


def timed(fn: Any, cuda: bool) -> float:
    """Seconds for one call."""
    if cuda:
        start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        start.record()
        fn()
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", choices=("flux", "sdxl"), default="flux")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--double", type=int, help="Flux double-stream blocks (CUDA default 19)")
    p.add_argument("--single", type=int, help="Flux single-stream blocks (CUDA default 38)")
    p.add_argument("--res", type=int, help="image side in pixels (CUDA default 1024)")
    p.add_argument("--steps", type=int, help="timed rounds (each: one step of each side)")
    p.add_argument("--backend", help="the dispatcher's backend (default: auto)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    steps = args.steps or (10 if cuda else 3)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in place: no float32 copy of 12B parameters
    try:
        model, inputs, what = (flux if args.model == "flux" else sdxl)(args, dtype, dev)
    finally:
        torch.set_default_dtype(default_dtype)
    built = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    def step() -> Any:
        return model(**inputs).sample

    diffusers = importlib.import_module("diffusers")
    with torch.inference_mode():
        ref = step()  # diffusers' default, warm
        with use_dispatcher(model, args.backend) as routing:
            out = step()  # warm: the dispatcher picks (and may time) its choice here
            for _ in range(2):
                step()
        for _ in range(2):
            step()
        times: dict[str, list[float]] = {"default": [], "dispatcher": []}
        for r in range(steps):
            for side in (("default", "dispatcher") if r % 2 == 0 else
                         ("dispatcher", "default")):
                if side == "dispatcher":
                    with use_dispatcher(model, args.backend):
                        times[side].append(timed(step, cuda))
                else:
                    times[side].append(timed(step, cuda))
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    chosen = sorted({f"{name} for head dim {key[0][-1]}, {key[0][-2]} x {key[2][-2]} tokens"
                     f"{', masked' if key[4] is not None else ''}"
                     for key, (name, _) in dispatch._ROUTES.items()})
    result = {
        "model": what, "parameters": n_params, "device": torch.cuda.get_device_name(dev)
        if cuda else "cpu", "dtype": str(dtype).replace("torch.", ""),
        "diffusers": diffusers.__version__, "torch": torch.__version__,
        "dispatcher": dispatch.get_backend(), "dispatcher_chose": chosen,
        "routed_modules": len(routing.routed), "left_alone": len(routing.custom)
        + len(routing.unrouted), "steps_timed": steps, "build_s": round(built, 1),
        "default_ms": round(med["default"] * 1e3, 2),
        "dispatcher_ms": round(med["dispatcher"] * 1e3, 2),
        "speedup": round(med["default"] / med["dispatcher"], 3),
        "max_rel_diff": diff,
        "default_ms_all": [round(t * 1e3, 2) for t in times["default"]],
        "dispatcher_ms_all": [round(t * 1e3, 2) for t in times["dispatcher"]],
    }
    print(f"{what}; {n_params / 1e9:.2f}B parameters, {result['dtype']} on {result['device']}")
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}")
    print(f"dispatcher: {result['dispatcher']}")
    for c in chosen:
        print(f"  chose {c}")
    print(f"routed {result['routed_modules']} attention modules, left "
          f"{result['left_alone']} alone")
    print(f"one step, median of {steps}: default {result['default_ms']} ms, dispatcher "
          f"{result['dispatcher_ms']} ms, speed-up x{result['speedup']}")
    print(f"max |dispatcher - default| / max |default| = {diff:.3g}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
