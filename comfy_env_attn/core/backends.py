"""The attention backends this tool knows: names, packages and what their kernels support.

Pure data. The dispatcher imports this module too, so it must stay standard-library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from comfy_env_attn.core.errors import UsageError


@dataclass(frozen=True)
class Backend:
    name: str
    dist: str  # normalized distribution name; "" for sdpa
    title: str
    import_name: str
    kernel: str
    quantized: bool
    # Compute capabilities the kernels run on, as (major, minor) ranges: min inclusive,
    # max inclusive. None means no GPU rule (sdpa).
    min_sm: tuple[int, int] | None
    max_sm: tuple[int, int] | None = None
    excluded_sm: tuple[tuple[int, int], ...] = ()
    max_head_dim: int = 256
    min_cuda: tuple[int, int] | None = None
    needs_torch_abi: bool = True  # compiled against libtorch: same torch major.minor


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("sdpa", "", "PyTorch SDPA", "torch.nn.functional",
                "scaled_dot_product_attention", quantized=False, min_sm=None,
                needs_torch_abi=False),
        # SageAttention 2.x: sm80/86/89/90/120, no sm100 kernels.
        Backend("sage", "sageattention", "SageAttention", "sageattention", "sageattn",
                quantized=True, min_sm=(8, 0), excluded_sm=((10, 0), (10, 3)),
                max_head_dim=128),
        Backend("sage3", "sageattn3", "SageAttention3", "sageattn3", "sageattn3_blackwell",
                quantized=True, min_sm=(10, 0), max_sm=(12, 1), excluded_sm=((11, 0),),
                max_head_dim=128, min_cuda=(12, 8)),
        Backend("flash", "flash-attn", "FlashAttention 2", "flash_attn", "flash_attn_func",
                quantized=False, min_sm=(8, 0), max_head_dim=256),
        Backend("flash3", "flash-attn-3", "FlashAttention 3", "flash_attn_interface",
                "flash_attn_func", quantized=False, min_sm=(9, 0), max_sm=(9, 0),
                max_head_dim=256),
        Backend("flash4", "flash-attn-4", "FlashAttention 4", "flash_attn.cute",
                "flash_attn_func", quantized=False, min_sm=(9, 0), max_sm=(10, 3),
                max_head_dim=256, needs_torch_abi=False),
        Backend("xformers", "xformers", "xformers", "xformers.ops",
                "memory_efficient_attention", quantized=False, min_sm=(5, 0),
                max_head_dim=256),
    )
}

ALIASES: dict[str, str] = {
    "sage2": "sage", "sageattention": "sage", "sageattn": "sage",
    "sageattn3": "sage3",
    "flash_attn": "flash", "flash2": "flash", "flash-attn": "flash", "fa2": "flash",
    "fa3": "flash3", "flash_attn_3": "flash3", "flash-attn-3": "flash3",
    "fa4": "flash4", "flash_attn_4": "flash4", "flash-attn-4": "flash4",
    "pytorch": "sdpa", "torch": "sdpa",
}

# Distribution name (normalized) -> backend name.
BY_DIST: dict[str, str] = {b.dist: b.name for b in BACKENDS.values() if b.dist}


def canonical(name: str) -> str:
    """The backend name for a name or alias; UsageError listing the valid names otherwise."""
    key = name.strip().lower()
    if key in BACKENDS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    key2 = key.replace("_", "-")
    if key2 in BY_DIST:
        return BY_DIST[key2]
    valid = ", ".join(BACKENDS)
    raise UsageError(f"unknown backend {name!r}; valid names: {valid} "
                     f"(aliases: {', '.join(sorted(ALIASES))})")


def parse_list(text: str | None) -> list[str]:
    """Backends from a comma-separated list; all installable ones when text is None or 'all'."""
    if text is None or text.strip().lower() == "all":
        return [n for n in BACKENDS if n != "sdpa"]
    out: list[str] = []
    for part in text.split(","):
        if not part.strip():
            continue
        n = canonical(part)
        if n not in out:
            out.append(n)
    if not out:
        raise UsageError(f"no backend named in {text!r}; valid names: {', '.join(BACKENDS)}")
    return out


_SEP = re.compile(r"[-_.]+")


def normalize_dist(name: str) -> str:
    """PEP 503 normalization."""
    return _SEP.sub("-", name).lower()
