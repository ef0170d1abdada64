"""diffusers integration: route a diffusers model's attention through the dispatcher.

Two routes, both ending in `comfy_env_attn.dispatch_attention` (the backend verified for
each kind of call on this machine, or PyTorch SDPA; COMFY_ENV_ATTN_BACKEND overrides it as
in ComfyUI):

1. A diffusers attention backend named "comfy_env_attn", for diffusers with an attention
   dispatcher (0.35 and later), after `register()`:

       from comfy_env_attn.diffusers import register
       register()
       pipe.transformer.set_attention_backend("comfy_env_attn")
       # or, for every model that goes through diffusers' dispatcher:
       from diffusers.models.attention_dispatch import attention_backend
       with attention_backend("comfy_env_attn"):
           image = pipe(prompt).images[0]

   It reaches the models whose processors call diffusers' `dispatch_attention_fn` (Flux,
   Wan, Qwen-Image and the other new-style transformers), not the processors that call
   PyTorch directly (UNet2DConditionModel's AttnProcessor2_0 and the like): route 2 does.

2. `use_dispatcher(pipe_or_model)`, for any diffusers version from 0.32 on: inside the
   `with`, every attention module of the model (or of each component of a pipeline) runs
   through the dispatcher, and on exit every module has its original processor back, also
   after an exception:

       from comfy_env_attn.diffusers import use_dispatcher
       with use_dispatcher(pipe):
           image = pipe(prompt).images[0]

   - diffusers' plain processors (AttnProcessor2_0, AttnProcessor, XFormersAttnProcessor)
     are swapped for DispatcherAttnProcessor, which computes what each of them computes;
     Flux's FluxAttnProcessor2_0 (diffusers 0.32 to 0.34) for DispatcherFluxAttnProcessor;
   - processors that go through diffusers' dispatcher (0.35 and later) keep their object
     and get this backend for the duration (`processor._attention_backend`);
   - custom processors (anything not defined by diffusers: NAG and the like) are left alone,
     and so are diffusers processors this module has no counterpart for; each kind is listed
     once in a log line.

Importing this module imports neither torch nor diffusers: they load on first use.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
from collections.abc import Iterator
from dataclasses import field
from typing import TYPE_CHECKING, Any

from comfy_env_attn.core.records import dataclass

if TYPE_CHECKING:
    import torch

log = logging.getLogger("comfy_env_attn")

BACKEND_NAME = "comfy_env_attn"  # the name diffusers knows this backend by
_ENUM_NAME = "COMFY_ENV_ATTN"  # its AttentionBackendName member

__all__ = ["BACKEND_NAME", "DispatcherAttnProcessor", "DispatcherFluxAttnProcessor", "Routing",
           "register", "use_dispatcher"]


# -- the call into the runtime --------------------------------------------------------------

_runtime: Any = None  # comfy_env_attn.runtime.dispatch, imported on the first call (torch)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool, scale: float | None) -> torch.Tensor:
    """[B, H, N, D] attention through the dispatcher. `dispatch_attention` is looked up on
    its module per call, so that a wrapper that replaces it there sees every call."""
    global _runtime
    if _runtime is None:
        _runtime = importlib.import_module("comfy_env_attn.runtime.dispatch")
    return _runtime.dispatch_attention(q, k, v, mask, causal, scale)  # type: ignore[no-any-return]


def _diffusers() -> Any:
    try:
        return importlib.import_module("diffusers")
    except ImportError as e:
        raise ImportError("comfy_env_attn.diffusers needs diffusers: "
                          "pip install 'comfy-env-attn[diffusers]'") from e


def _version() -> tuple[int, ...]:
    from packaging.version import Version

    return Version(_diffusers().__version__).release


# -- route 1: a backend in diffusers' attention dispatcher ----------------------------------

def _dispatcher_module() -> Any | None:
    """diffusers.models.attention_dispatch, or None where the installed diffusers has none."""
    _diffusers()
    try:
        return importlib.import_module("diffusers.models.attention_dispatch")
    except ImportError as e:
        log.debug("comfy-env-attn: this diffusers has no attention dispatcher (%s)", e)
        return None


def _add_enum_member(enum_cls: Any, name: str, value: str) -> Any:
    """Add a member to diffusers' AttentionBackendName, as if it had been declared there.

    diffusers validates every backend name against this str Enum (`AttentionBackendName(x)`
    in set_attention_backend, attention_backend and dispatch_attention_fn) and has no API to
    extend it; this sets the same tables Enum's own class construction sets (the lookup by
    value, by name, iteration and `__members__`)."""
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member._sort_order_ = len(enum_cls._member_names_)
    member.__objclass__ = enum_cls
    enum_cls._member_names_.append(name)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses member names
    return member


def register() -> str | None:
    """Register "comfy_env_attn" as a diffusers attention backend (idempotent).

    Returns the backend name, or None where the installed diffusers has no attention
    dispatcher (before 0.35): use `use_dispatcher` there."""
    ad = _dispatcher_module()
    if ad is None:
        return None
    names = ad.AttentionBackendName
    member = names._value2member_map_.get(BACKEND_NAME)
    if member is None:
        member = _add_enum_member(names, _ENUM_NAME, BACKEND_NAME)
    registry = ad._AttentionBackendRegistry
    if registry._backends.get(member) is not _diffusers_backend:
        checks = [c for c in (getattr(ad, "_check_device", None),
                              getattr(ad, "_check_shape", None)) if c is not None]
        registry.register(member, constraints=checks)(_diffusers_backend)
    return BACKEND_NAME


def _native(**kwargs: Any) -> Any:
    ad = importlib.import_module("diffusers.models.attention_dispatch")
    fn = ad._AttentionBackendRegistry._backends[ad.AttentionBackendName.NATIVE]
    names = ad._AttentionBackendRegistry._supported_arg_names[ad.AttentionBackendName.NATIVE]
    return fn(**{k: v for k, v in kwargs.items() if k in names})


def _diffusers_backend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                       is_causal: bool = False, scale: float | None = None,
                       enable_gqa: bool = False, return_lse: bool = False,
                       _parallel_config: Any = None) -> torch.Tensor:
    """The backend diffusers calls: [B, N, H, D] in and out (diffusers' layout), masks as its
    native backend takes them (a [B, M] key mask is widened to [B, 1, 1, M]; any other mask
    broadcasts to [B, H, N, M]). k and v may have fewer heads (enable_gqa or not)."""
    if return_lse:
        raise ValueError("the comfy_env_attn attention backend does not return the "
                         "log-sum-exp (return_lse=True); use diffusers' native backend")
    if dropout_p or _parallel_config is not None:  # neither is the dispatcher's: native does it
        return _native(query=query, key=key, value=value, attn_mask=attn_mask,  # type: ignore[no-any-return]
                       dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                       enable_gqa=enable_gqa, _parallel_config=_parallel_config)
    if attn_mask is not None and attn_mask.ndim == 2 and \
            attn_mask.shape[0] == query.shape[0] and attn_mask.shape[1] == key.shape[1]:
        attn_mask = attn_mask[:, None, None, :]
    out = _attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                     attn_mask, is_causal, scale)
    return out.transpose(1, 2)


# -- route 2: processors --------------------------------------------------------------------

class DispatcherAttnProcessor:
    """diffusers' AttnProcessor2_0 for `Attention` modules, with the attention itself through
    the dispatcher.

    `like` names the processor whose result it reproduces: "AttnProcessor2_0" (the default;
    it applies norm_q/norm_k and SDPA's default scale, as AttnProcessor2_0 does), or
    "AttnProcessor" / "XFormersAttnProcessor" (no norm_q/norm_k, `attn.scale`, as those do)."""

    def __init__(self, like: str = "AttnProcessor2_0") -> None:
        if like not in ("AttnProcessor2_0", "AttnProcessor", "XFormersAttnProcessor"):
            raise ValueError(f"unknown processor to reproduce: {like!r}")
        self.like = like
        self._qk_norm = like == "AttnProcessor2_0"

    def __repr__(self) -> str:
        return f"DispatcherAttnProcessor(like={self.like!r})"

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length,
                                                         batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1,
                                                 attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_heads(t, batch_size, attn.heads, head_dim)
                             for t in (query, key, value))
        if self._qk_norm:
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)

        scale: float | None = None  # AttnProcessor2_0: SDPA's 1/sqrt(head_dim)
        if not self._qk_norm and not math.isclose(float(attn.scale), head_dim ** -0.5,
                                                  rel_tol=1e-12):
            scale = float(attn.scale)
        hidden_states = _attention(query, key, value, attention_mask, False, scale)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1,
                                                              attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height,
                                                                    width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor  # type: ignore[no-any-return]


def _heads(t: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    """[B, N, H*D] -> [B, H, N, D], as diffusers' processors split heads."""
    return t.view(batch, -1, heads, head_dim).transpose(1, 2)


class DispatcherFluxAttnProcessor:
    """diffusers' FluxAttnProcessor2_0 (Flux's processor in diffusers 0.32 to 0.34, [B, H, N,
    D] inside), with the attention through the dispatcher. From 0.35 on, Flux's processor goes
    through diffusers' dispatcher, and `use_dispatcher` gives it this backend instead."""

    def __repr__(self) -> str:
        return "DispatcherFluxAttnProcessor()"

    def __call__(self, attn: Any, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: Any = None) -> Any:
        import torch

        batch_size = (hidden_states if encoder_hidden_states is None
                      else encoder_hidden_states).shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_heads(t, batch_size, attn.heads, head_dim)
                             for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:  # the double-stream blocks: text tokens first
            eq = attn.add_q_proj(encoder_hidden_states)
            ek = attn.add_k_proj(encoder_hidden_states)
            ev = attn.add_v_proj(encoder_hidden_states)
            eq, ek, ev = (_heads(t, batch_size, attn.heads, head_dim) for t in (eq, ek, ev))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query = torch.cat([eq, query], dim=2)
            key = torch.cat([ek, key], dim=2)
            value = torch.cat([ev, value], dim=2)

        if image_rotary_emb is not None:
            embeddings = importlib.import_module("diffusers.models.embeddings")
            query = embeddings.apply_rotary_emb(query, image_rotary_emb)
            key = embeddings.apply_rotary_emb(key, image_rotary_emb)

        hidden_states = _attention(query, key, value, attention_mask, False, None)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1,
                                                              attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        n_text = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :n_text], hidden_states[:, n_text:]
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


_OURS = (DispatcherAttnProcessor, DispatcherFluxAttnProcessor)


@dataclass
class Routing:
    """What `use_dispatcher` did, by module name (a pipeline's prefixed with its component's
    name): processors swapped for a dispatcher processor, processors given this backend
    (diffusers' own dispatcher), and the modules left alone."""

    swapped: list[str] = field(default_factory=list)
    backend_set: list[str] = field(default_factory=list)
    custom: dict[str, str] = field(default_factory=dict)  # module -> processor class
    unrouted: dict[str, str] = field(default_factory=dict)  # diffusers processors, no route

    @property
    def routed(self) -> list[str]:
        return self.swapped + self.backend_set


def _models(pipe_or_model: Any) -> list[tuple[str, Any]]:
    import torch

    if isinstance(pipe_or_model, torch.nn.Module):
        return [("", pipe_or_model)]
    components = getattr(pipe_or_model, "components", None)
    if isinstance(components, dict):
        return [(name, c) for name, c in components.items() if isinstance(c, torch.nn.Module)]
    raise TypeError(f"use_dispatcher takes a diffusers pipeline or model (a torch.nn.Module), "
                    f"not {type(pipe_or_model).__name__}")


def _from_diffusers(cls: type) -> bool:
    return cls.__module__ == "diffusers" or cls.__module__.startswith("diffusers.")


def _swaps() -> dict[type, Any]:
    """diffusers' processor classes -> the dispatcher processor that computes the same."""
    ap = importlib.import_module("diffusers.models.attention_processor")
    out: dict[type, Any] = {}
    for like in ("AttnProcessor2_0", "AttnProcessor", "XFormersAttnProcessor"):
        cls = getattr(ap, like, None)
        if isinstance(cls, type):
            out[cls] = DispatcherAttnProcessor(like)
    if (0, 32) <= _version() < (0, 35):  # 0.31's ignores the mask; from 0.35 it is an alias
        flux = DispatcherFluxAttnProcessor()
        for name in ("FluxAttnProcessor2_0", "FluxSingleAttnProcessor2_0"):
            cls = getattr(ap, name, None)
            if isinstance(cls, type):
                out[cls] = flux
    return out


_LOGGED: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.warning("comfy-env-attn: %s", msg)


def _listing(left: dict[str, str]) -> str:
    by_cls: dict[str, list[str]] = {}
    for module, cls in left.items():
        by_cls.setdefault(cls, []).append(module)
    parts = []
    for cls, modules in sorted(by_cls.items()):
        names = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3
                                           else "")
        parts.append(f"{cls} x{len(modules)} ({names})")
    return "; ".join(parts)


_MISSING = object()


@contextlib.contextmanager
def use_dispatcher(pipe_or_model: Any, backend: str | None = None, *,
                   exact: bool = False) -> Iterator[Routing]:
    """Route the attention of a diffusers pipeline's components, or of one model, through
    the dispatcher inside the `with`; restore every original processor on exit, also after
    an exception. Yields a Routing that says which modules went where.

    `backend` ("auto", "sage", "flash", ...) sets the dispatcher's backend for the duration,
    with `exact` as in set_backend; COMFY_ENV_ATTN_BACKEND still overrides it. Without it,
    the dispatcher keeps its current choice (auto on first use)."""
    from comfy_env_attn.runtime import dispatch

    models = _models(pipe_or_model)
    name = register()
    member = None
    if name is not None:
        member = importlib.import_module(
            "diffusers.models.attention_dispatch").AttentionBackendName(name)
    swaps = _swaps()
    routing = Routing()
    swapped: list[tuple[Any, Any]] = []  # (module, its original processor)
    given: dict[int, tuple[Any, Any]] = {}  # id(processor) -> (processor, its own value)
    previous = dispatch.settings() if dispatch._S.ready else None  # restored whole
    try:
        if backend is not None:
            dispatch.set_backend(backend, exact=exact)
        for prefix, model in models:
            for mod_name, module in model.named_modules():
                proc = getattr(module, "processor", None)
                if proc is None or not callable(getattr(module, "set_processor", None)):
                    continue
                full = ".".join(p for p in (prefix, mod_name) if p)
                cls = type(proc)
                if isinstance(proc, _OURS):
                    routing.swapped.append(full)
                elif cls in swaps:
                    module.set_processor(swaps[cls])
                    swapped.append((module, proc))
                    routing.swapped.append(full)
                elif not _from_diffusers(cls):
                    routing.custom[full] = cls.__qualname__
                elif member is not None and hasattr(cls, "_attention_backend"):
                    if id(proc) not in given:
                        given[id(proc)] = (proc, proc.__dict__.get("_attention_backend",
                                                                   _MISSING))
                        proc._attention_backend = member
                    routing.backend_set.append(full)
                else:
                    routing.unrouted[full] = cls.__qualname__
        if routing.custom:
            _log_once("attention modules with custom processors are left alone: "
                      + _listing(routing.custom))
        if routing.unrouted:
            _log_once("attention modules whose diffusers processor has no dispatcher "
                      "counterpart keep it: " + _listing(routing.unrouted))
        yield routing
    finally:
        for module, proc in reversed(swapped):
            module.set_processor(proc)
        for proc, old in given.values():
            if old is _MISSING:
                proc.__dict__.pop("_attention_backend", None)
            else:
                proc._attention_backend = old
        if backend is not None:
            dispatch.restore(previous)
