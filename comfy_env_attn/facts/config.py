"""comfy-env's TOML as an input: `[cuda] packages = [...]` names the CUDA packages a node needs;
the attention ones among them become the requested backends."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from comfy_env_attn.core.backends import BY_DIST, normalize_dist
from comfy_env_attn.core.errors import ProfileError
from comfy_env_attn.facts.system import read_toml


@dataclass(frozen=True)
class CudaConfig:
    backends: list[str]
    left_to_comfy_env: list[str]


def read_cuda_config(path: str | Path) -> CudaConfig:
    p = Path(path)
    doc = read_toml(p, what="comfy-env config")
    cuda = doc.get("cuda")
    if not isinstance(cuda, dict) or "packages" not in cuda:
        raise ProfileError(f"{p}: no [cuda] table with a packages list")
    pkgs = cuda["packages"]
    if not isinstance(pkgs, list) or not all(isinstance(x, str) for x in pkgs):
        raise ProfileError(f"{p}: [cuda] packages must be a list of strings, got {pkgs!r}")
    backends: list[str] = []
    others: list[str] = []
    for spec in pkgs:
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        name = normalize_dist(m[1]) if m else spec
        backend = BY_DIST.get(name)
        if backend is None:
            others.append(spec)
        elif backend not in backends:
            backends.append(backend)
    return CudaConfig(backends, others)
