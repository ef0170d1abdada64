"""The live facts lock freshness compares, learned in the process that runs attention.

The dispatcher calls `live_facts()` in ComfyUI's process; the command line runs the same
function in the target interpreter (verify/_target.py --live), so both judge a lock with the
same facts and core.lockmodel.stale_reasons.
"""

from __future__ import annotations

import torch

from comfy_env_attn.core.backends import BACKENDS
from comfy_env_attn.core.fingerprint import adapters_sha256, dists_facts
from comfy_env_attn.core.lockmodel import Live


def live_facts() -> Live:
    """The facts of this process, plugins included (loaded first)."""
    from comfy_env_attn.runtime.plugins import load_plugins

    plugins = load_plugins()
    if torch.cuda.is_available():
        device, cap = "cuda", "%d.%d" % torch.cuda.get_device_capability()
    else:
        device, cap = "cpu", None
    return Live(torch=torch.__version__, torch_cuda=torch.version.cuda, device=device,
                capability=cap, adapters_sha256=adapters_sha256(),
                dists=dists_facts(b.dist for b in BACKENDS.values() if b.dist),
                plugins={n: BACKENDS[n].dist for n in plugins})
