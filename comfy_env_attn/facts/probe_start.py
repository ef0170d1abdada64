"""The target's probe, started before the command's own imports, and its cache: the
standard library alone, so that the target's Python starts within milliseconds of this tool's
(facts.probe reads the answer)."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from comfy_env_attn.core.paths import cache_dir

CACHE_SCHEMA = 5
_SCRIPT = Path(__file__).with_name("_interp_probe.py")


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _cache_file(kind: str, path: str) -> Path:
    """Where facts of one file or folder are cached: `interp` an interpreter's, `torch` a
    torch install's (shared by the venvs that see it)."""
    key = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:20]
    return cache_dir() / f"{kind}-{key}.json"


def _cached(exe: str) -> dict[str, Any] | None:
    """The cached facts of this interpreter while none of their witnesses changed."""
    try:
        doc = json.loads(_cache_file("interp", exe).read_text(encoding="utf-8"))
        if doc.get("schema") == CACHE_SCHEMA and doc.get("executable") == exe and \
                doc.get("witnesses") == {p: _stat(p) for p in doc.get("witnesses", {})}:
            facts: dict[str, Any] = doc["facts"]
            return facts
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    return None


# fast probes started early (start_probe) and not yet read: executable -> process
_PENDING: dict[str, subprocess.Popen[str]] = {}


def _start(executable: str, import_torch: bool) -> subprocess.Popen[str]:
    env = {**os.environ, "COMFY_ENV_ATTN_PROBE_NO_IMPORT": "0" if import_torch else "1"}
    return subprocess.Popen([executable, str(_SCRIPT)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def start_probe(executable: str) -> None:
    """Start the target's fast probe in the background when its cache cannot answer, so
    that starting the target's Python overlaps this tool's own imports (the CLI calls this
    first). Whatever goes wrong here is left for the real probe to report."""
    exe = os.path.abspath(executable)
    if exe in _PENDING or not os.path.isfile(exe) or _cached(exe) is not None:
        return
    try:
        _PENDING[exe] = _start(exe, import_torch=False)
    except OSError:
        return
    if len(_PENDING) == 1:
        atexit.register(_reap)


def _reap() -> None:
    for proc in _PENDING.values():
        proc.kill()
        proc.wait()
    _PENDING.clear()
