"""comfy-sparse-attn parity: make `comfy.<name>` importable from a custom node's file."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path


def setup_link(source: str | os.PathLike[str], name: str) -> bool:
    """Make `comfy.<name>` importable from the file `source` (or `source/<name>`), without
    a symlink (Windows has none for most users). Does nothing when ComfyUI ships the real
    file. Returns True when it registered the module."""
    stem = name[:-3] if name.endswith(".py") else name
    comfy = sys.modules.get("comfy")
    if comfy is None:
        try:
            comfy = importlib.import_module("comfy")
        except ImportError:
            return False
    for base in getattr(comfy, "__path__", []):
        if os.path.exists(os.path.join(base, f"{stem}.py")) or \
                os.path.isdir(os.path.join(base, stem)):
            return False  # the real one: ComfyUI ships it
    full = f"comfy.{stem}"
    if full in sys.modules:
        return False
    path = Path(source)
    if path.is_dir():
        path = path / f"{stem}.py"
    spec = importlib.util.spec_from_file_location(full, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as {full}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[full]
        raise
    setattr(comfy, stem, module)
    return True
