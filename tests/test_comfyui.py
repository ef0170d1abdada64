"""The ComfyUI route, against a real ComfyUI checkout (COMFYUI_DIR; skipped without it).

Inside ComfyUI the dispatcher calls ComfyUI's own attention functions; the results must be
the same as outside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set")


def test_dispatch_inside_comfyui_uses_its_attention_functions(tmp_path: Path) -> None:
    from test_dispatch import fake_sage, write_lock

    fakes = fake_sage(tmp_path, takes_mask=True)
    lock = write_lock(tmp_path / "lock.toml", sage_ms=1.0, sdpa_ms=5.0)
    code = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = [{str(fakes)!r}, {COMFYUI_DIR!r}]
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
        import comfy.model_management
        import comfy.ldm.modules.attention as attn
        import torch, torch.nn.functional as F
        from comfy_env_attn.runtime import dispatch
        import sageattention
        label = dispatch.set_backend("auto")
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 2, 128, 64, generator=g) for _ in range(3))
        out = dispatch.dispatch_attention(q, k, v)
        kernel = dispatch._S.kernels["sage"]
        ref = F.scaled_dot_product_attention(q, k, v)
        comfy_out = attn.get_attention_function("sage")(q, k, v, 2, skip_reshape=True,
                                                        skip_output_reshape=True)
        print(json.dumps({{"label": label, "calls": len(sageattention.CALLS),
                          "kernel": kernel.__qualname__,
                          "err": float((out - ref).abs().max()),
                          "same_as_comfy": bool(torch.equal(out, comfy_out))}}))
    """)
    env = {**os.environ, "COMFY_ENV_ATTN_LOCK": str(lock)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["kernel"].startswith("_comfy_kernel"), res  # ComfyUI's own function
    assert res["calls"] == 2  # once through the dispatcher, once called directly
    assert res["err"] < 1e-5 and res["same_as_comfy"]
