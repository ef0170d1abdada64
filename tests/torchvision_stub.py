"""A stand-in torchvision for starting ComfyUI on a CPU torch that has none; standard library
only, so that a process can install it before ComfyUI imports torch."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types


def stub_torchvision() -> None:
    """comfy.model_base imports the Cosmos model, which imports torchvision.transforms at
    module level and uses it only at run time. A CPU-only torch has no matching wheel."""
    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        tr = types.ModuleType("torchvision.transforms")
        tr.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
        tv.transforms = tr  # type: ignore[attr-defined]
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tr
