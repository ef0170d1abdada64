# comfy-env-attn as a ComfyUI custom node (a copy of its repository).
# comfy-env-attn node loader: ComfyUI imports this file from custom_nodes/. The node
# comes from comfy-env-attn installed in ComfyUI's Python; in a copy of the repository (git
# clone, Comfy Registry) the package beside this file serves when none is installed. Without
# either, no node is loaded and one line says how to install it: never an import error.
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

NODE_CLASS_MAPPINGS: dict[str, Any] = {}
# comfy-env-attn is not on PyPI yet: the name alone finds nothing there
_PYPI = " (not on PyPI yet: until it is, give pip a clone of its repository in its place)"
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}


def _installed() -> bool:
    # an empty folder an uninstall left behind imports as a namespace package: not an install
    spec = importlib.util.find_spec("comfy_env_attn")
    return spec is not None and spec.origin is not None


def _load() -> None:
    here = Path(__file__).resolve().parent
    if not _installed() and (here / "comfy_env_attn" / "runtime" / "comfyui.py").is_file():
        sys.path.append(str(here))
    if not _installed():
        print("comfy-env-attn: the Attention Backend node is not loaded: comfy-env-attn is not "
              "installed in this Python. Install it (torch is left alone): "
              f'"{sys.executable}" -m pip install comfy-env-attn{_PYPI}', file=sys.stderr)
        return
    from comfy_env_attn.runtime import comfyui

    NODE_CLASS_MAPPINGS.update(comfyui.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(comfyui.NODE_DISPLAY_NAME_MAPPINGS)


try:
    _load()
except Exception as e:  # a broken or old install: say so; ComfyUI's start goes on
    print(f"comfy-env-attn: the Attention Backend node is not loaded ({type(e).__name__}: "
          f"{e}). Reinstall it (torch is left alone): "
          f'"{sys.executable}" -m pip install --upgrade comfy-env-attn{_PYPI}',
          file=sys.stderr)
