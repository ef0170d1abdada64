"""Where the tool keeps its files on this machine (standard library only)."""

from __future__ import annotations

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
