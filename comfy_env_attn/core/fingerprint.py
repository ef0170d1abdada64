"""The digests a lock's fingerprint holds, standard library only: the dispatcher (inside
ComfyUI, runtime/live.py) and the command line (a lock written without verification, which
need not start the target's torch to learn them) compute them with this one code."""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from importlib.metadata import Distribution, PackageNotFoundError, distribution
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def dist_facts(dist: str, path: Sequence[str] | None = None
               ) -> tuple[str, str | None] | None:
    """(version, digest of its files) of an installed distribution, None when absent: the
    first one on `path` (default: this process's sys.path).

    The digest covers its RECORD and, for each file RECORD lists, the path, size and
    modification time on disk: a file edited in place or overwritten by another
    distribution changes it, at the cost of one stat per file (no file is read), cheap
    enough for every ComfyUI start."""
    if path is None:
        try:
            d = distribution(dist)
        except PackageNotFoundError:
            return None
    else:
        found = next(iter(Distribution.discover(name=dist, path=list(path))), None)
        if found is None:
            return None
        d = found
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


def adapters_sha256() -> str:
    """The code verification proves: the adapters, the capability claims they read, and the
    plugins that ship with comfy-env-attn."""
    h = hashlib.sha256()
    for p in (_PACKAGE / "runtime" / "adapters.py", _PACKAGE / "core" / "backends.py",
              _PACKAGE / "runtime" / "plugins.py",  # the plugin machinery
              _PACKAGE / "runtime" / "taylor.py"):  # and the shipped plugin
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()
