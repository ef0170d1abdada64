"""Backends from outside: `register_backend` makes a function an adapter like the built-in
ones, verified by the same checks, recorded in the same lock, chosen by the same rule.

    from comfy_env_attn import register_backend
    from comfy_env_attn.core.backends import ALL_DTYPES, MODEL_HEAD_DIMS, Capabilities

    def my_attention(q, k, v, mask, causal, scale):        # [B, H, N, D] in and out
        ...

    register_backend("mine", my_attention, dist="my-node-package",
                     capabilities=Capabilities(ALL_DTYPES, MODEL_HEAD_DIMS, causal=False))

A package ships one through the entry point group `comfy_env_attn.backends` (the entry
point names a function that registers): `comfy-env-attn verify` finds it in ComfyUI's
Python, proves it, and the dispatcher trusts what passed. An approximate backend (one that
trades accuracy for speed) registers its own accuracy limits and is never chosen by `auto`
unless asked (`set_backend("auto", approximate=True)` or by name).

Standard library and torch only.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from comfy_env_attn.core.backends import (
    ALL_DTYPES,
    BACKENDS,
    MODEL_HEAD_DIMS,
    SHIPPED_PLUGINS,
    Backend,
    Capabilities,
    normalize_dist,
    register,
)
from comfy_env_attn.runtime.adapters import ADAPTERS, Adapter, _version

log = logging.getLogger("comfy_env_attn")

ENTRY_POINT_GROUP = "comfy_env_attn.backends"
Kernel = Callable[..., Any]
_loaded = False
_failed: dict[str, str] = {}


def register_backend(name: str, fn: Kernel, *, capabilities: Capabilities | None = None,
                     approximate: bool = False, quantized: bool = False,
                     title: str | None = None, dist: str = "",
                     varlen: Kernel | None = None,
                     max_abs: float | None = None, min_cosine: float | None = None) -> None:
    """Register `fn(q, k, v, mask, causal, scale) -> out` ([B, H, N, D]) as backend `name`.

    `capabilities` says what it takes (default: every dtype and model head dim, no mask,
    causal, custom scale, cross-attention, no GQA); `dist` is the distribution that ships it
    (its version and files go into the lock's fingerprint); `varlen(q, k, v, cu_q, cu_k,
    max_q, max_k, causal, scale)` its kernel for packed sequences ([T, H, D]), with
    `capabilities.varlen`; `max_abs`/`min_cosine` are its accuracy limits against float32
    SDPA (default: the exact or quantized ones; required for an approximate backend).
    Registering a name again replaces it; the names of the plugins that ship with
    comfy-env-attn are theirs (a lock trusts their code through the fingerprint)."""
    if name in SHIPPED_PLUGINS:
        raise ValueError(f"{name!r} is a plugin that ships with comfy-env-attn: register "
                         "yours under another name")
    _register(name, fn, capabilities=capabilities, approximate=approximate,
              quantized=quantized, title=title, dist=dist, varlen=varlen, max_abs=max_abs,
              min_cosine=min_cosine, shipped=False)


def _register(name: str, fn: Kernel, *, capabilities: Capabilities | None,
              approximate: bool, quantized: bool, title: str | None, dist: str,
              varlen: Kernel | None, max_abs: float | None, min_cosine: float | None,
              shipped: bool) -> None:
    """register_backend, and for the plugins in SHIPPED_PLUGINS `shipped`: their code is
    this package's, which the lock's adapters_sha256 covers."""
    if approximate and (max_abs is None or min_cosine is None):
        raise ValueError(f"approximate backend {name!r} needs its accuracy limits "
                         "(max_abs=..., min_cosine=...)")
    caps = capabilities or Capabilities(ALL_DTYPES, MODEL_HEAD_DIMS, gqa=False)
    register(Backend(
        name, normalize_dist(dist) if dist else "", title or name,
        getattr(fn, "__module__", "") or "", getattr(fn, "__qualname__", "") or "",
        quantized=quantized, caps=caps, min_sm=None, needs_torch_abi=False,
        approximate=approximate, shipped=shipped,
        limits=None if max_abs is None or min_cosine is None else (max_abs, min_cosine)))

    class Plugin(Adapter):
        def load(self) -> None:
            self.version = _version(self.backend.dist) if self.backend.dist else None
            module = __import__(self.backend.import_name or "builtins", fromlist=["_"])
            self.origin = getattr(module, "__file__", None)
            self.loaded = True

        def __call__(self, q: Any, k: Any, v: Any, mask: Any, causal: bool,
                     scale: float | None) -> Any:
            return fn(q, k, v, mask, causal, scale)

        def varlen(self, q: Any, k: Any, v: Any, cu_q: Any, cu_k: Any, max_q: int,
                   max_k: int, causal: bool, scale: float | None) -> Any:
            if varlen is None:
                return super().varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
            return varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)

    Plugin.name = name
    Plugin.__qualname__ = f"Plugin[{name}]"
    ADAPTERS[name] = Plugin


_BUILTIN_ADAPTERS = frozenset(ADAPTERS)


def plugin_names() -> list[str]:
    """The registered plugin backends, in registration order."""
    return [n for n in BACKENDS if n not in _BUILTIN_ADAPTERS and n in ADAPTERS]


def load_plugins() -> list[str]:
    """Register the shipped plugins and every entry point of the group, once per process.
    A plugin that fails to load is reported once and left out; nothing raises."""
    global _loaded
    if not _loaded:
        _loaded = True
        _register_shipped()
        for ep in _entry_points():
            try:
                ep.load()()
            except Exception as e:  # a broken plugin must not break ComfyUI's start
                _failed[ep.name] = f"{type(e).__name__}: {e}"
                log.warning("comfy-env-attn: the backend plugin %s (%s) failed to load: %s",
                            ep.name, ep.value, _failed[ep.name])
    return plugin_names()


def _entry_points() -> list[Any]:
    try:
        return list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # a broken distribution's metadata
        return []


def _register_shipped() -> None:
    try:
        taylor = importlib.import_module("comfy_env_attn.runtime.taylor")
    except ImportError:
        return
    fn = getattr(taylor, "taylor_attention", None)
    if fn is not None:
        _register("taylor", fn, approximate=True, title="Taylor attention (approximate)",
                  capabilities=Capabilities(ALL_DTYPES, MODEL_HEAD_DIMS, causal=False,
                                            gqa=False), quantized=False, dist="",
                  varlen=None, max_abs=0.1, min_cosine=0.99, shipped=True)
