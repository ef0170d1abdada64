"""The live facts lock freshness compares, learned in the process that runs attention.

The dispatcher calls `live_facts()` in ComfyUI's process; the command line runs the same
function in the target interpreter (verify/_target.py --live), so both judge a lock with the
same facts and core.lockmodel.stale_reasons.
"""

from __future__ import annotations

import hashlib
from importlib.metadata import PackageNotFoundError, distribution

import torch

from comfy_env_attn.core.backends import BACKENDS
from comfy_env_attn.core.lockmodel import Live
from comfy_env_attn.runtime.adapters import adapters_sha256


def dist_facts(dist: str) -> tuple[str, str | None] | None:
    """(version, sha256 of its RECORD) of an installed distribution, None when absent."""
    try:
        d = distribution(dist)
    except PackageNotFoundError:
        return None
    record = d.read_text("RECORD")
    return (d.version, None if record is None else hashlib.sha256(record.encode()).hexdigest())


def live_facts() -> Live:
    if torch.cuda.is_available():
        device, cap = "cuda", "%d.%d" % torch.cuda.get_device_capability()
    else:
        device, cap = "cpu", None
    return Live(torch=torch.__version__, torch_cuda=torch.version.cuda, device=device,
                capability=cap, adapters_sha256=adapters_sha256(),
                dists={b.dist: dist_facts(b.dist) for b in BACKENDS.values() if b.dist})
