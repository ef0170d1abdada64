"""An "Attention Backend" node for ComfyUI: routes a model's attention through the dispatcher
via transformer_options["optimized_attention_override"].

ComfyUI's wrap_attn calls the override as `override(func, *args, **kwargs)`, with the
arguments the model passed to optimized_attention, whose every implementation has one
signature:

    attention_X(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                skip_output_reshape=False, **kwargs)

Models call it every way that signature allows: `heads` positional (SD UNets, Flux) or by
keyword (SD3's MMDiT, Wan), the mask positional (LTX-Video, Lumina 2, Qwen-Image, OmniGen2,
CrossAttention) or by keyword (Flux, HunyuanVideo), q/k/v as [B, N, H*D] or, with
skip_reshape, [B, H, N, D]; in SD3 `v` comes already split into heads ([B, N, H, D]) while
q and k are flat. Masks are bool (True = attend) or additive float, [N, M], [B, N, M] or
[B, H, N, M], expanded the way ComfyUI's attention_pytorch expands them. attn_precision
is a hint for ComfyUI's own upcasting functions; like attention_pytorch (ComfyUI's default
on GPUs), the dispatcher's kernels accumulate in float32 anyway. A call this module cannot
route exactly goes to ComfyUI's own function, unchanged; so does a call the dispatcher
fails on.

The node's backend list puts what the lock verified on this machine first, marked
"(verified)", and marks the others "(not verified here)"; a choice that is not verified runs
PyTorch SDPA, says so in one log line, and the node's label output says what will run.

ComfyUI loads it through the repository's root __init__.py (a clone in custom_nodes/, the
Comfy Registry, ComfyUI-Manager) or the loader `comfy-env-attn node install` places; both
import only this module, which imports the standard library, torch and core.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from typing import Any

from comfy_env_attn.core.backends import BACKENDS, lookup
from comfy_env_attn.core.progress import tool_command

log = logging.getLogger("comfy_env_attn")

# ComfyUI's attention signature; attention_sub_quad names the first three query, key, value.
_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape",
           "skip_output_reshape")
_ALIASES = {"query": "q", "key": "k", "value": "v"}

# What the dispatcher was last set to by this node: (backend, its mode, the dispatcher's
# state object and the mode/exact/safe it reported right after). Compared per call, so that the
# dispatcher is reconfigured only when another node or caller changed it.
_applied: list[Any] = [None]
_told: set[str] = set()


VERIFIED = "verified"
NOT_VERIFIED = "not verified here"
ALWAYS = "always available"  # SDPA without a lock: what the dispatcher falls back to


def _dispatch() -> Any:
    """The dispatcher, its lock read (imports torch: ComfyUI has it loaded)."""
    from comfy_env_attn.runtime import dispatch

    dispatch.get_backend()
    return dispatch


def choices() -> list[str]:
    """The node's backend list: auto, then what the lock verified here (marked), then the
    other backends this tool knows (marked as not verified here)."""
    try:
        verified = dict(_dispatch()._S.backends)
    except Exception:  # no torch, a broken plugin: offer the names, none verified
        verified = {}
    out = ["auto", "auto (exact)", "auto (safe)"]
    for name, rec in verified.items():
        out.append(f"{name} ({VERIFIED}{', approximate' if rec.approximate else ''})")
    if "sdpa" not in verified:
        out.append(f"sdpa ({ALWAYS})")
    return out + [f"{n} ({NOT_VERIFIED})" for n in BACKENDS if n not in verified
                  and n != "sdpa"]


MODES = ("", "exact", "safe")  # auto's modes (dispatch.set_backend's exact= and safe=)


def parse_choice(choice: str) -> tuple[str, str]:
    """(backend name or "auto", mode: "", "exact" or "safe") for an entry of the list, with
    or without its marker, so that a workflow saved on another machine (or before the lock
    changed) still loads. Raises ValueError for a name this tool does not know."""
    text = choice.strip().lower()
    for mode in MODES[1:]:
        if text == f"auto ({mode})":
            return "auto", mode
    name = text.split(" (", 1)[0].strip()
    if name == "auto":
        return "auto", ""
    found = lookup(name)
    if found is None:
        raise ValueError(f"unknown backend {choice!r}; valid: auto, {', '.join(BACKENDS)}")
    return found, ""


def announce(backend: str, mode: str) -> str:
    """Set the dispatcher to the choice and say what will run: the dispatcher's own label.
    A forced backend the lock did not verify logs one line naming what runs instead."""
    dispatch = _dispatch()
    _use_backend(dispatch, backend, mode)
    state = dispatch._S
    label = str(state.label)
    mode = state.mode  # COMFY_ENV_ATTN_BACKEND or COMFYUI_ATTENTION_MECHANISM may override
    if mode not in ("auto", "sdpa") and mode not in state.backends and not (
            state.unverified and dispatch._unverified_runs(mode)):
        why = (f"there is no fresh lock (run: {tool_command()} install, or verify)"
               if state.table is None else "the lock does not list it as verified")
        log.warning("comfy-env-attn: %s is not verified on this machine (%s); the Attention "
                    "Backend node uses PyTorch SDPA (sdpa) instead", mode, why)
    return label


class Unroutable(Exception):
    """A call the override leaves to ComfyUI's own function: what kind of input (logged
    once per kind) and the detail."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


def bind(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's attention arguments by name, as Python would bind them to its signature."""
    if len(args) > len(_PARAMS):
        raise Unroutable("args", f"{len(args)} positional arguments")
    bound = {_PARAMS[i]: a for i, a in enumerate(args)}
    for key, value in kwargs.items():
        name = _ALIASES.get(key, key)
        if name in _PARAMS:
            if name in bound:
                raise Unroutable("args", f"{name} given twice")
            bound[name] = value
    missing = [n for n in ("q", "k", "v", "heads") if n not in bound]
    if missing:
        raise Unroutable("args", f"no {', '.join(missing)}")
    return bound


def _mask_bhnm(mask: Any, q: Any, b: int, heads: int, n: int, m: int) -> Any:
    """The mask as attention_pytorch hands it to SDPA: [N, M] -> [1, 1, N, M],
    [B, N, M] -> [B, 1, N, M]; it must broadcast to [B, H, N, M]. Float masks are additive
    and take q's dtype (ComfyUI's other functions add them in any dtype)."""
    import torch

    if not isinstance(mask, torch.Tensor):
        raise Unroutable("mask", f"a mask of type {type(mask).__name__}")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4:
        raise Unroutable("mask", f"a {mask.ndim}-D mask")
    want = (b, heads, n, m)
    if not all(have in (1, size) for have, size in zip(mask.shape, want, strict=True)):
        raise Unroutable("mask", f"a mask of shape {list(mask.shape)} for attention "
                         f"{list(want)}")
    if mask.dtype != torch.bool:
        if not mask.is_floating_point():
            raise Unroutable("mask", f"a {mask.dtype} mask")
        if mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
    if mask.device != q.device:
        mask = mask.to(q.device)
    return mask


def prepare(bound: dict[str, Any], kwargs: dict[str, Any]
            ) -> tuple[Any, Any, Any, Any, Any, Callable[[Any], Any]]:
    """(q, k, v as [B, H, N, D], mask broadcastable to [B, H, N, M] or None, scale,
    a function giving the output in the layout the caller asked for)."""
    import torch

    q, k, v = bound["q"], bound["k"], bound["v"]
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise Unroutable("args", "q, k or v that is not a tensor")
    try:
        heads = operator.index(bound["heads"])
    except TypeError:
        raise Unroutable("heads", f"heads={bound['heads']!r}") from None
    if heads <= 0:
        raise Unroutable("heads", f"heads={heads}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise Unroutable("dtype", f"dtypes {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise Unroutable("device", "q, k and v on different devices")
    if bound.get("skip_reshape", False):
        if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
            raise Unroutable("shape", f"skip_reshape and {q.ndim}-D, {k.ndim}-D, {v.ndim}-D "
                                    "q, k, v")
        b, h, n, d = q.shape
        if h != heads:
            raise Unroutable("heads", f"heads={heads} for a q of {h} heads")
        q4, k4, v4 = q, k, v
    else:
        if q.ndim != 3:
            raise Unroutable("shape", f"a {q.ndim}-D q without skip_reshape")
        b, n, width = q.shape
        if width % heads:
            raise Unroutable("heads", f"width {width} for {heads} heads")
        d = width // heads  # the head size comes from q: SD3 hands v over split into heads

        def split(t: Any) -> Any:
            if t.ndim == 3 and t.shape[2] == width:
                t = t.reshape(t.shape[0], t.shape[1], heads, d)
            elif not (t.ndim == 4 and tuple(t.shape[2:]) == (heads, d)):
                raise Unroutable("shape", f"k or v of shape {list(t.shape)} for {heads} heads "
                                         f"of {d}")
            return t.transpose(1, 2)

        q4, k4, v4 = q.reshape(b, n, heads, d).transpose(1, 2), split(k), split(v)
    if (k4.shape[0], k4.shape[1], k4.shape[3]) != (b, heads, d) or v4.shape != k4.shape:
        raise Unroutable("shape", f"q {list(q4.shape)}, k {list(k4.shape)}, "
                                  f"v {list(v4.shape)}")
    mask = bound.get("mask")
    if mask is not None:
        mask = _mask_bhnm(mask, q, b, heads, n, k4.shape[2])
    scale = kwargs.get("scale")
    if scale is not None and not isinstance(scale, (int, float)):
        raise Unroutable("scale", f"scale={scale!r}")

    if bound.get("skip_output_reshape", False):
        def layout(out: Any) -> Any:
            return out
    else:
        def layout(out: Any) -> Any:
            return out.transpose(1, 2).reshape(b, n, heads * d)

    return q4, k4, v4, mask, scale, layout


def _applied_now(dispatch: Any, backend: str, mode: str) -> tuple[Any, ...]:
    state = getattr(dispatch, "_S", None)
    return (backend, mode, id(state), getattr(state, "mode", None),
            getattr(state, "exact", None), getattr(state, "safe", None),
            getattr(state, "approximate", None), getattr(state, "unverified", None),
            getattr(state, "ready", True))


def _use_backend(dispatch: Any, backend: str, mode: str) -> None:
    if _applied[0] == _applied_now(dispatch, backend, mode):
        return
    dispatch.set_backend(backend, exact=mode == "exact", safe=mode == "safe")
    _applied[0] = _applied_now(dispatch, backend, mode)


def _tell(reason: str, detail: str, level: int = logging.INFO) -> None:
    """One log line per kind of call left to ComfyUI (not one per attention call)."""
    if reason not in _told:
        _told.add(reason)
        log.log(level, "comfy-env-attn: %s; ComfyUI's own attention function runs such "
                "calls", detail)


def make_override(backend: str, mode: str = "") -> Callable[..., Any]:
    """The transformer_options["optimized_attention_override"] for one backend choice."""
    from comfy_env_attn.runtime import dispatch

    def override(func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            q, k, v, mask, scale, layout = prepare(bind(args, kwargs), kwargs)
            _use_backend(dispatch, backend, mode)
        except Unroutable as e:
            _tell(e.kind, f"an attention call with {e} is not routed")
            return func(*args, **kwargs)
        except Exception as e:  # never an exception of ours inside a sampling run
            _tell(type(e).__name__, f"preparing attention failed ({type(e).__name__}: {e})",
                  logging.WARNING)
            return func(*args, **kwargs)
        extra = {} if scale is None else {"scale": scale}
        try:
            out = dispatch.dispatch_attention(q, k, v, attn_mask=mask, **extra)
        except Exception as e:
            _tell("dispatch:" + type(e).__name__,
                  f"the dispatcher failed ({type(e).__name__}: {str(e)[:200]})",
                  logging.WARNING)
            return func(*args, **kwargs)
        return layout(out)

    return override


class AttentionBackend:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # ComfyUI's API
        return {"required": {"model": ("MODEL",), "backend": (choices(), {
            "tooltip": "auto: the fastest backend verified here for each kind of call; "
                       "auto (exact): the same without quantized backends; auto (safe): "
                       "without kernels quantized below fp16 in P.V (SageAttention's fp8 "
                       "kernel: try it where sage renders black or noisy images). A "
                       "backend not verified here runs PyTorch SDPA."})}}

    @classmethod
    def VALIDATE_INPUTS(cls, backend: str) -> bool | str:  # ComfyUI's API
        # Replaces ComfyUI's "value not in list" check: the markers change with the lock,
        # and a workflow saved elsewhere names a backend with another marker.
        try:
            parse_choice(backend)
        except ValueError as e:
            return str(e)
        return True

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "label")
    OUTPUT_TOOLTIPS = ("the model, its attention routed through comfy-env-attn",
                       "what will run, as the dispatcher describes it")
    FUNCTION = "apply"
    CATEGORY = "advanced/attention"
    DESCRIPTION = ("Route this model's attention to the fastest backend comfy-env-attn "
                   "verified on this machine (auto), or to one verified backend.")

    def apply(self, model: Any, backend: str) -> tuple[Any, str]:
        name, mode = parse_choice(backend)
        m = model.clone()  # ModelPatcher.clone deep-copies model_options: the input is kept
        opts = m.model_options.setdefault("transformer_options", {})
        opts["optimized_attention_override"] = make_override(name, mode)
        try:
            label = announce(name, mode)
        except Exception as e:  # the override then hands every call to ComfyUI's function
            label = f"ComfyUI's own attention (the dispatcher did not start: {e})"
            log.warning("comfy-env-attn: %s", label)
        return (m, label)


# The Taylor node's main parameters (runtime/taylor.py has them all, with these defaults).
TAYLOR_PARAMS: dict[str, tuple[str, dict[str, Any]]] = {
    "P": ("INT", {"default": 4, "min": 1, "max": 8,
                  "tooltip": "terms of the exp series; more is closer and slower"}),
    "min_tokens": ("INT", {"default": 100, "min": 0, "max": 1 << 20,
                           "tooltip": "below this many tokens, exact attention"}),
    "sub_head_blocks": ("INT", {"default": 4, "min": 1, "max": 64,
                                "tooltip": "blocks per head, to keep the feature size "
                                           "under the cap (each attends on its own)"}),
    "qk_normalize": ("BOOLEAN", {"default": False}),
    "scale_mul": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0, "step": 0.01}),
    "quality_check": ("BOOLEAN", {"default": True,
                                  "tooltip": "compare sampled rows with exact attention and "
                                             "log the error"}),
}


def make_taylor_override(params: dict[str, Any]) -> Callable[..., Any]:
    """The override that runs ComfyUI's attention calls through taylor_attention with these
    parameters (it falls back to exact attention where its probe or a mask says so)."""

    def override(func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            q, k, v, mask, scale, layout = prepare(bind(args, kwargs), kwargs)
            from comfy_env_attn.runtime.taylor import taylor_attention

            return layout(taylor_attention(q, k, v, mask, False, scale, **params))
        except Unroutable as e:
            _tell(e.kind, f"an attention call with {e} is not routed")
        except Exception as e:  # never an exception of ours inside a sampling run
            _tell("taylor:" + type(e).__name__,
                  f"Taylor attention failed ({type(e).__name__}: {str(e)[:200]})",
                  logging.WARNING)
        return func(*args, **kwargs)

    return override


class TaylorAttention:
    """The approximate Taylor backend, chosen by hand: never by auto (see
    docs/approximate.md: on every input measured it was slower and less accurate than
    exact attention)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # ComfyUI's API
        return {"required": {"model": ("MODEL",), **TAYLOR_PARAMS}}

    RETURN_TYPES = ("MODEL", "STRING")
    RETURN_NAMES = ("model", "label")
    FUNCTION = "apply"
    CATEGORY = "advanced/attention"
    DESCRIPTION = ("Approximate attention by a truncated Taylor series of exp (experimental: "
                   "measured slower and less accurate than exact attention; see the label).")

    def apply(self, model: Any, **params: Any) -> tuple[Any, str]:
        m = model.clone()
        opts = m.model_options.setdefault("transformer_options", {})
        opts["optimized_attention_override"] = make_taylor_override(dict(params))
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        return (m, f"Taylor attention (approximate; {shown}); exact attention below "
                   f"{params.get('min_tokens', 100)} tokens and wherever its probe fails")


NODE_CLASS_MAPPINGS = {"ComfyEnvAttnBackend": AttentionBackend,
                       "ComfyEnvAttnTaylor": TaylorAttention}
NODE_DISPLAY_NAME_MAPPINGS = {"ComfyEnvAttnBackend": "Attention Backend (comfy-env-attn)",
                              "ComfyEnvAttnTaylor": "Taylor Attention (approximate)"}
