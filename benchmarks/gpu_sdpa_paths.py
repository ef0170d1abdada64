"""Which kernel PyTorch's SDPA runs, by the path a call takes: torch's own priority, each SDPA
backend forced, ComfyUI's priority (cuDNN first, comfy/ops.py), the dispatcher's adapter,
dispatch_attention and, with COMFYUI_DIR, ComfyUI's attention function with and without the
node. Same inputs, ms per call (CUDA events, rotated rounds).

    [COMFYUI_DIR=/path/to/ComfyUI] python benchmarks/gpu_sdpa_paths.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import rotated_ms  # noqa: E402

SHAPES = {"Flux [1, 24, 4608, 128]": (1, 24, 4608, 4608, 128),
          "Wan cross [1, 40, 32760, 128] x 512": (1, 40, 32760, 512, 128),
          "SDXL [2, 10, 4096, 64]": (2, 10, 4096, 4096, 64)}


def _flat_call(att: Any, flat: list[Any], heads: int, opts: Any) -> Any:
    """ComfyUI's attention entry point as a model calls it ([B, N, H*D], heads=)."""
    extra = {} if opts is None else {"transformer_options": opts}

    def f(q: Any, k: Any, v: Any) -> Any:
        return att.optimized_attention(*flat, heads=heads, **extra)
    return f


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    a = p.parse_args()
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from comfy_env_attn.runtime import dispatch
    from comfy_env_attn.runtime.adapters import adapter

    comfy = None
    if os.environ.get("COMFYUI_DIR"):
        sys.path.insert(0, os.environ["COMFYUI_DIR"])
        import comfy.ldm.modules.attention as comfy_attention
        import comfy.ops as comfy_ops

        from comfy_env_attn.runtime.comfyui import make_override
        comfy = (comfy_attention, comfy_ops, {"optimized_attention_override":
                                              make_override("auto")})
    sdpa = adapter("sdpa")
    sdpa.load()
    dispatch.set_backend("auto")
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

    def forced(backend: Any) -> Any:
        def f(q: Any, k: Any, v: Any) -> Any:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return f

    def prioritized(q: Any, k: Any, v: Any) -> Any:
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)

    out: dict[str, Any] = {"torch": torch.__version__, "label": dispatch.get_backend()}
    for label, (b, h, n, m, d) in SHAPES.items():
        q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, h, m, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        fns: dict[str, Any] = {
            "F.sdpa (torch's priority)": F.scaled_dot_product_attention,
            "cuDNN forced": forced(SDPBackend.CUDNN_ATTENTION),
            "flash forced": forced(SDPBackend.FLASH_ATTENTION),
            "efficient forced": forced(SDPBackend.EFFICIENT_ATTENTION),
            "ComfyUI's priority (cuDNN first)": prioritized,
            "adapter sdpa": lambda q, k, v: sdpa(q, k, v, None, False, None),
            "dispatch_attention": dispatch.dispatch_attention,
        }
        if comfy is not None:
            att, ops, opts = comfy
            flat = [t.transpose(1, 2).reshape(b, t.shape[2], h * d) for t in (q, k, v)]
            fns["comfy.ops.scaled_dot_product_attention"] = ops.scaled_dot_product_attention
            fns["ComfyUI optimized_attention"] = _flat_call(att, flat, h, None)
            fns["ComfyUI + node (auto)"] = _flat_call(att, flat, h, opts)
        ok: dict[str, Any] = {}
        for name, f in fns.items():
            try:
                f(q, k, v)
                ok[name] = f
            except RuntimeError as e:
                out.setdefault("errors", {})[f"{label}: {name}"] = str(e).splitlines()[0][:160]
        ms = rotated_ms({n_: partial(f, q, k, v) for n_, f in ok.items()}, rounds=10, calls=5,
                        warmup=0)
        out[label] = {n_: round(t, 4) for n_, t in ms.items()}
        print(json.dumps({label: out[label]}, indent=1), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
