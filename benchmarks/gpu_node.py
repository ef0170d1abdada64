"""The Attention Backend node on a GPU: ComfyUI's own attention entry point
(`optimized_attention`, with the node's override in transformer_options, as a model calls
it) at the attention sizes of one Flux block and one Wan 2.1 14B block, against ComfyUI's
default attention function and ComfyUI's own sage function, on the same inputs.

    COMFYUI_DIR=/path/to/ComfyUI COMFY_ENV_ATTN_LOCK=/tmp/lock.toml \\
        python benchmarks/gpu_node.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from _common import rotated_ms  # noqa: E402

# (label, batch, query tokens, key tokens, heads, head dim, layout as the model calls it)
CASES = (("Flux 1024x1024 (joint, [B, H, N, D])", 1, 4608, 4608, 24, 128, "bhnd"),
         ("Wan 2.1 14B 480p self ([B, N, H*D], heads=)", 1, 32760, 32760, 40, 128, "flat"),
         ("Wan 2.1 14B text cross ([B, N, H*D], heads=)", 1, 32760, 512, 40, 128, "flat"))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--json")
    a = p.parse_args()
    sys.path.insert(0, os.environ["COMFYUI_DIR"])
    import comfy.ldm.modules.attention as attention
    import comfy.model_management  # noqa: F401  (ComfyUI picks its default attention here)
    import torch

    from comfy_env_attn.runtime import dispatch
    from comfy_env_attn.runtime.comfyui import make_override

    print("ComfyUI's default attention:", attention.optimized_attention.__name__)
    print("dispatcher:", dispatch.set_backend("auto"))
    opts = {"optimized_attention_override": make_override("auto")}
    sage = getattr(attention, "attention_sage", None) if attention.SAGE_ATTENTION_IS_AVAILABLE \
        else None
    results: list[dict[str, Any]] = []
    for label, b, n, m, h, d, layout in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        if layout == "bhnd":
            q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(b, h, m, d, device="cuda", dtype=torch.bfloat16, generator=g)
                    for _ in range(2))
            kw: dict[str, Any] = {"skip_reshape": True}
            args: tuple[Any, ...] = (q, k, v, h)
        else:
            q = torch.randn(b, n, h * d, device="cuda", dtype=torch.bfloat16, generator=g)
            k, v = (torch.randn(b, m, h * d, device="cuda", dtype=torch.bfloat16, generator=g)
                    for _ in range(2))
            kw = {"heads": h}
            args = (q, k, v)
        def call(fn: Any, args: tuple[Any, ...] = args, kw: dict[str, Any] = kw,
                 **extra: Any) -> Any:
            return lambda: fn(*args, **kw, **extra)

        fns = {"comfyui default": call(attention.optimized_attention),
               "node (auto)": call(attention.optimized_attention, transformer_options=opts)}
        if layout == "bhnd":  # the dispatcher alone, and torch's own SDPA, on the same inputs
            def flat(out: Any, b: int = b, n: int = n, hd: int = h * d) -> Any:
                return out.transpose(1, 2).reshape(b, n, hd)
            fns["dispatch_attention"] = \
                lambda q=q, k=k, v=v: flat(dispatch.dispatch_attention(q, k, v))
            fns["F.sdpa"] = \
                lambda q=q, k=k, v=v: flat(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        if sage is not None:
            fns["comfyui sage"] = call(sage)
        ref = fns["comfyui default"]().float()
        errs = {name: float((fn().float() - ref).abs().max()) for name, fn in fns.items()}
        chosen = [r[0] for r in dispatch._S.routes.values()]
        ms = rotated_ms(fns, rounds=8, calls=10)
        sdp = getattr(torch._C, "_get_sdp_priority_order", None)
        row = {"case": label, "ms": {k_: round(v_, 3) for k_, v_ in ms.items()},
               "sdp_priority": list(sdp()) if sdp else None,
               "sdp_choice": int(torch._fused_sdp_choice(q if layout == "bhnd" else
                                                         q.view(b, n, h, d).transpose(1, 2),
                                                         *(t if layout == "bhnd" else
                                                           t.view(b, m, h, d).transpose(1, 2)
                                                           for t in (k, v)))),
               "node_vs_default": round(ms["comfyui default"] / ms["node (auto)"], 3),
               "max_abs_vs_default": errs, "dispatcher_routes": chosen}
        print(json.dumps(row), flush=True)
        results.append(row)
        dispatch._S.routes.clear()
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
