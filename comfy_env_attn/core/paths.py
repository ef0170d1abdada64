"""Where the tool keeps its files on this machine (standard library only)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    """$COMFY_ENV_ATTN_CACHE_DIR, else the platform's user cache folder: probe results,
    downloads, build logs and the wheelhouse."""
    env = os.environ.get("COMFY_ENV_ATTN_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
        return base / "comfy-env-attn" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "comfy-env-attn"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "comfy-env-attn"


def replace_file(path: Path, text: str, *, durable: bool = False, tmp: Path | None = None,
                 newline: str | None = None) -> None:
    """Write a text file whole or not at all: into a temporary file beside it (`tmp`, else
    `.NAME.PID.tmp`), then renamed over it, so that a reader, a kill or a full disk leaves
    the old file or the new one, never half of one. `durable`: forced to disk before the
    rename (the journal, a RECORD a rollback must read after a power cut). On any failure
    the temporary file is removed and the error raised, the caller's to report or pass
    over (a cache that cannot be written is only slower)."""
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_cache(path: Path, text: str) -> None:
    """A cache file written whole (replace_file), its folder made; one that cannot be
    written is passed over: a cache is only ever faster."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, text)
    except OSError:
        pass
