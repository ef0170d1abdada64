"""Build small real wheels for the tests: proper dist-info, RECORD with hashes."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def build_wheel(folder: Path, name: str, version: str, files: dict[str, str | bytes], *,
                requires: list[str] | None = None, tag: str = "py3-none-any",
                record_hashes: bool = True, record_prefix: str = "") -> Path:
    """A wheel of these files; its RECORD may give no hashes, or write its paths with a
    prefix ('./'), as some real wheels do."""
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    meta = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            + "".join(f"Requires-Dist: {r}\n" for r in requires or []))
    wheel = f"Wheel-Version: 1.0\nGenerator: comfy-env-attn-tests\nRoot-Is-Purelib: true\nTag: {tag}\n"
    entries = {path: text.encode() if isinstance(text, str) else text
               for path, text in {**files, f"{info}/METADATA": meta,
                                  f"{info}/WHEEL": wheel}.items()}
    record = []
    for path, data in entries.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        record.append(f"{record_prefix}{path},"
                      f"{'sha256=' + digest.decode() if record_hashes else ''},{len(data)}")
    record.append(f"{info}/RECORD,,")
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(out, "w") as z:
        for path, data in entries.items():
            z.writestr(path, data)
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


# -- hostile wheels: each breaks one promise of the installer (issue 13) -------------------

# Runs at every `import torch` in the target if the wheel gets in.
TORCH_PAYLOAD = "PWNED = True\nraise SystemExit('torch replaced by a sageattention wheel')\n"


def hostile_wheel(folder: Path, kind: str, version: str) -> Path:
    """A sageattention wheel that works, plus one hostile part:
    torch      ships torch/__init__.py (overwrites or hides torch)
    sympy      requires sympy==0.0.1 (replaces a package torch needs)
    scripts    ships .data/scripts/pip and .data/scripts/activate (replaces the venv's)
    pth        ships a .pth file (code run at every Python start)
    distinfo   ships torch's .dist-info/METADATA (rewrites what torch says it is)
    """
    dist_dir = f"sageattention-{version}"
    files = {"sageattention/__init__.py": SAGE_OK}
    requires = ["torch>=2.0"]
    if kind == "torch":
        files["torch/__init__.py"] = TORCH_PAYLOAD
    elif kind == "sympy":
        requires.append("sympy==0.0.1")
    elif kind == "scripts":
        files[f"{dist_dir}.data/scripts/pip"] = "#!/bin/sh\necho pwned pip\n"
        files[f"{dist_dir}.data/scripts/activate"] = "echo pwned activate\n"
    elif kind == "pth":
        files["zz_sage_hook.pth"] = "import os; os.environ['PWNED'] = '1'\n"
    elif kind == "distinfo":
        import torch

        v = torch.__version__
        files[f"torch-{v}.dist-info/METADATA"] = f"Metadata-Version: 2.1\nName: torch\nVersion: {v}\n"
    else:
        raise ValueError(kind)
    return build_wheel(folder, "sageattention", version, files, requires=requires)


def sympy_impostor(folder: Path) -> Path:
    """The sympy 0.0.1 an index would serve for that requirement."""
    return build_wheel(folder, "sympy", "0.0.1",
                       {"sympy/__init__.py": "__version__ = '0.0.1'\n"}, requires=[])


def traversal_name(version: str) -> str:
    """A wheel filename, as an index link writes it, whose build tag climbs out of the
    download folder once unquoted: sageattention-V-1/../../../../evil-py3-none-any.whl."""
    return f"sageattention-{version}-1%2F..%2F..%2F..%2F..%2Fevil-py3-none-any.whl"


def data_wheel(folder: Path, version: str, *, script: str, data: str) -> Path:
    """A sageattention with a console script and a data file outside site-packages, each
    holding `script` / `data` (so that v1 and v2 differ there)."""
    dist_dir = f"sageattention-{version}"
    return build_wheel(folder, "sageattention", version, {
        "sageattention/__init__.py": SAGE_OK + f"\nVERSION = {version!r}\n",
        f"{dist_dir}.data/scripts/sage-info": f"#!/bin/sh\necho {script}\n",
        f"{dist_dir}.data/data/share/sageattention/notes.txt": data,
    }, requires=["torch>=2.0"])


def installed_plugin(folder: Path, module: str, src: str) -> Path:
    """`module`.py (`src`) in `folder` with its dist-info naming `module`:register in the
    entry point group comfy_env_attn.backends, as pip leaves a plugin (the distribution is
    the module's name with dashes)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(src)
    dist = module.replace("_", "-")
    info = folder / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[comfy_env_attn.backends]\n"
                                           f"{module.split('_')[0]} = {module}:register\n")
    (info / "RECORD").write_text(f"{module}.py,,\n{info.name}/METADATA,,\n")
    return folder


def installed_sage(folder: Path, src: str, version: str = "2.2.0") -> Path:
    """sageattention/__init__.py (`src`) and its dist-info in `folder`, as an install leaves
    them: importable and 'installed' once `folder` is on sys.path."""
    pkg = folder / "sageattention"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(src)
    info = folder / f"sageattention-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sageattention\n"
                                   f"Version: {version}\n")
    digest = hashlib.sha256(src.encode()).hexdigest()
    (info / "RECORD").write_text(f"sageattention/__init__.py,sha256={digest},{len(src)}\n"
                                 f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n")
    return folder


# xformers' memory_efficient_attention as far as the adapter uses it, over [B, N, H, D], as
# strict as the real kernels about a tensor bias: its rows 8-aligned in memory.
FAKE_XFORMERS_OPS = """
import torch
import torch.nn.functional as F
from xformers.ops.fmha import attn_bias as _ab

def _aligned(bias):
    if bias.stride(-2) % 8:
        raise ValueError("attn_bias is not correctly aligned (row stride %d)" % bias.stride(-2))
    return bias

def memory_efficient_attention(q, k, v, attn_bias=None, scale=None):
    n, m, mask = q.shape[1], k.shape[1], None
    if isinstance(attn_bias, torch.Tensor):
        mask = _aligned(attn_bias)
    elif isinstance(attn_bias, _ab.LowerTriangularMaskWithTensorBias):
        causal = torch.full((n, m), float("-inf")).triu(1).to(attn_bias.bias.dtype)
        mask = _aligned(attn_bias.bias) + causal
    elif isinstance(attn_bias, _ab.LowerTriangularMask):
        mask = torch.ones(n, m, dtype=torch.bool).tril()
    if k.shape[2] != q.shape[2]:
        k, v = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=2) for t in (k, v))
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        scale=scale).transpose(1, 2)
"""

FAKE_XFORMERS_BIAS = """
class LowerTriangularMask:
    pass

class LowerTriangularMaskWithTensorBias(LowerTriangularMask):
    def __init__(self, bias):
        self.bias = bias

class BlockDiagonalMask:
    pass

class BlockDiagonalCausalMask(BlockDiagonalMask):
    pass
"""


def installed_xformers(folder: Path, version: str = "0.0.32") -> Path:
    """A CPU stand-in for xformers (FAKE_XFORMERS_OPS) and its dist-info in `folder`."""
    fmha = folder / "xformers" / "ops" / "fmha"
    fmha.mkdir(parents=True)
    (folder / "xformers" / "__init__.py").write_text(f"__version__ = {version!r}\n")
    (folder / "xformers" / "ops" / "__init__.py").write_text(FAKE_XFORMERS_OPS)
    (fmha / "__init__.py").write_text("")
    (fmha / "attn_bias.py").write_text(FAKE_XFORMERS_BIAS)
    info = folder / f"xformers-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: xformers\nVersion: {version}\n")
    (info / "RECORD").write_text(f"xformers/__init__.py,,\n{info.name}/METADATA,,\n")
    return folder
