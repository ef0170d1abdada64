"""The live facts lock freshness compares, learned in the process that runs attention.

The dispatcher calls `live_facts()` in ComfyUI's process; the command line runs the same
function in the target interpreter (verify/_target.py --live), so both judge a lock with the
same facts and core.lockmodel.stale_reasons.
"""

from __future__ import annotations

import csv
import hashlib
import os
from importlib.metadata import Distribution, PackageNotFoundError, distribution

import torch

from comfy_env_attn.core.backends import BACKENDS
from comfy_env_attn.core.lockmodel import Live
from comfy_env_attn.runtime.adapters import adapters_sha256


def dist_facts(dist: str) -> tuple[str, str | None] | None:
    """(version, digest of its files) of an installed distribution, None when absent.

    The digest covers its RECORD and, for each file RECORD lists, the path, size and
    modification time on disk: a file edited in place or overwritten by another
    distribution changes it, at the cost of one stat per file (no file is read), cheap
    enough for every ComfyUI start."""
    try:
        d = distribution(dist)
    except PackageNotFoundError:
        return None
    return (d.version, files_digest(d))


def files_digest(d: Distribution) -> str | None:
    record = d.read_text("RECORD")
    if record is None:
        return None
    h = hashlib.sha256(record.encode())
    for row in csv.reader(record.splitlines()):
        if not row or row[0].endswith(".pyc"):
            continue  # bytecode is rewritten by Python itself
        try:
            st = os.stat(d.locate_file(row[0]))  # type: ignore[arg-type]
            h.update(f"{row[0]}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{row[0]}|missing\n".encode())
    return h.hexdigest()


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
                dists={b.dist: dist_facts(b.dist) for b in BACKENDS.values() if b.dist},
                plugins={n: BACKENDS[n].dist for n in plugins})
