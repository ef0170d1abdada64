"""comfy-env-attn: fast attention backends for ComfyUI that are proven on this machine.

The runtime API (set_backend, dispatch_attention, dispatch_varlen_attention, passed_over,
register_backend, taylor_attention) lives in comfy_env_attn.runtime and is loaded on first
use, so that importing the package for the command line never imports torch.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing loads after what starts first (cli._start_probe)
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_DISPATCH = {"set_backend", "get_backend", "dispatch_attention", "dispatch_varlen_attention",
             "passed_over", "setup_link", "register_backend"}


def __getattr__(name: str) -> Any:
    if name in _DISPATCH:
        from comfy_env_attn.runtime import dispatch

        return getattr(dispatch, name)
    if name == "taylor_attention":
        import importlib

        return importlib.import_module("comfy_env_attn.runtime.taylor").taylor_attention
    raise AttributeError(f"module 'comfy_env_attn' has no attribute {name!r}")
