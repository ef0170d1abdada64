"""Build small real wheels for the tests: proper dist-info, RECORD with hashes."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def build_wheel(folder: Path, name: str, version: str, files: dict[str, str], *,
                requires: list[str] | None = None, tag: str = "py3-none-any") -> Path:
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    meta = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires or []))
    wheel = f"Wheel-Version: 1.0\nGenerator: comfy-env-attn-tests\nRoot-Is-Purelib: true\nTag: {tag}\n"
    entries = {**files, f"{info}/METADATA": meta, f"{info}/WHEEL": wheel}
    record = []
    for path, text in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(out, "w") as z:
        for path, text in entries.items():
            z.writestr(path, text)
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return out


# A sageattention whose sageattn computes attention correctly (on any device).
SAGE_OK = '''
import torch
import torch.nn.functional as F

def sageattn(q, k, v, tensor_layout="HND", is_causal=False, attn_mask=None, sm_scale=None, **kw):
    if tensor_layout == "NHD":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                         is_causal=is_causal, scale=sm_scale).to(q.dtype)
    return out.transpose(1, 2) if tensor_layout == "NHD" else out
'''

# One whose results are wrong: plausible magnitude, wrong values (a "black image" backend).
SAGE_WRONG = '''
import torch
import torch.nn.functional as F

def sageattn(q, k, v, tensor_layout="HND", is_causal=False, **kw):
    return (F.scaled_dot_product_attention(q.float(), k.float(), v.float()) * 0.5).to(q.dtype)
'''

# One that segfaults on import.
SAGE_SEGFAULT = '''
import ctypes
ctypes.string_at(0)
def sageattn(*a, **kw):
    raise RuntimeError("unreachable")
'''


def sage_wheel(folder: Path, variant: str, version: str, *,
               requires: list[str] | None = None) -> Path:
    src = {"ok": SAGE_OK, "wrong": SAGE_WRONG, "segfault": SAGE_SEGFAULT}[variant]
    return build_wheel(folder, "sageattention", version,
                       {"sageattention/__init__.py": src},
                       requires=requires if requires is not None else ["torch>=2.0"])
