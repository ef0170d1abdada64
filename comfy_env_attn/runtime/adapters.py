"""One adapter per backend: the only code that calls a backend's kernel.

Verification (verify/_target.py, in the target interpreter) loads this same file and proves
each call variant through it; the dispatcher calls the same adapters. Standard library and
torch only, and the backend packages only inside `load()`.

Every adapter takes and returns [B, H, N, D] tensors:

    adapter.load()                               # imports the backend; may learn capabilities
    out = adapter(q, k, v, mask, causal, scale)  # mask: None, bool (True attends) or additive,
                                                 # broadcastable to [B, H, N, M]
    out = adapter.varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)   # [T, H, D]

What each backend takes is declared in core/backends.py (`Backend.caps`, and
`Backend.not_supported_reasons(call, caps)`: every reason it cannot take a call); an adapter's
`caps` are those, narrowed by what `load()` learns of the installed package.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import replace
from typing import Any, ClassVar

import torch

from comfy_env_attn.core.backends import BACKENDS, Backend, Call, Capabilities

Tensor = torch.Tensor

def dtype_name(t: Tensor) -> str:
    """"bfloat16" for a torch.bfloat16 tensor: the name the lock's checks use."""
    return str(t.dtype).removeprefix("torch.")


def describe(q: Tensor, k: Tensor, mask: Tensor | None, causal: bool, scale: float | None,
             capability: tuple[int, int] | None = None) -> Call:
    """The Call (what the capability rules read) for [B, H, N, D] tensors."""
    return Call(dtype=dtype_name(q), head_dim=q.shape[-1], q_len=q.shape[-2], kv_len=k.shape[-2],
                q_heads=q.shape[1], kv_heads=k.shape[1],
                mask=None if mask is None else ("bool" if mask.dtype == torch.bool
                                                else "additive"),
                causal=causal, scale=scale is not None, device=q.device.type,
                capability=capability)


def merge_causal(mask: Tensor, q_len: int, kv_len: int) -> Tensor:
    """A mask with the causal triangle folded in, aligned top-left as SDPA aligns it: what
    a call with both a mask and causal means here (SDPA itself takes one or the other). The
    dispatcher folds it before choosing, so that no backend gets the pair, which
    verification never proves together."""
    tri = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril()
    return mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))


def _first(out: Any) -> Tensor:
    """Some kernels return (out, lse)."""
    return out[0] if isinstance(out, tuple) else out  # type: ignore[no-any-return]


# PyTorch's SDPA picks its kernel by a process-wide priority order. On an H100 torch puts
# cuDNN first (about twice FlashAttention 2's speed there), and ComfyUI runs its own SDPA
# with cuDNN first too (comfy/ops.py). But that order is global state: a context manager
# entered before CUDA was set up and exited after (ComfyUI's, around its first attention
# call) leaves the static order, flash first, behind, and every SDPA call outside it is then
# half as fast (seen on the H100: 0.85 against 0.42 ms at Flux's size). SDPA here always
# runs with cuDNN first, the rest in the current order; backends someone disabled stay
# disabled. Reading the order is one C call; it is changed, and put back, only when needed.
_GET_ORDER = getattr(torch._C, "_get_sdp_priority_order", None)
_SET_ORDER = getattr(torch._C, "_set_sdp_priority_order", None)
_CUDNN = 3  # int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
# PyTorch's own operator, bound once: a node that replaces F.scaled_dot_product_attention
# (with sageattn, or with dispatch_attention itself) does not change what the fallback runs
_SDPA_OP = torch._C._nn.scaled_dot_product_attention


def sdpa(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
    """PyTorch's SDPA, on CUDA with cuDNN first in its priority order."""
    if not q.is_cuda or _GET_ORDER is None or _SET_ORDER is None:
        return _SDPA_OP(q, k, v, **kw)
    order = _GET_ORDER()
    if not order or order[0] == _CUDNN:
        return _SDPA_OP(q, k, v, **kw)
    _SET_ORDER([_CUDNN, *(b for b in order if b != _CUDNN)])
    try:
        return _SDPA_OP(q, k, v, **kw)
    finally:
        _SET_ORDER(list(order))


class Adapter:
    """The SDPA adapter, and the base of the others."""

    name = "sdpa"

    def __init__(self) -> None:
        self.backend: Backend = BACKENDS[self.name]
        self.caps: Capabilities = self.backend.caps
        self.version: str | None = None
        self.origin: str | None = None
        self.loaded = False

    def load(self) -> None:
        self.version, self.origin, self.loaded = torch.__version__, torch.__file__, True

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                 scale: float | None) -> Tensor:
        if k.shape[1] != q.shape[1]:
            if q.shape[1] % k.shape[1]:
                raise ValueError(f"{q.shape[1]} query heads cannot share {k.shape[1]} "
                                 "key/value heads evenly")
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if causal and mask is not None:  # SDPA takes one or the other
            mask, causal = merge_causal(mask, q.shape[-2], k.shape[-2]), False
        return sdpa(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)

    def varlen(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
               max_k: int, causal: bool, scale: float | None) -> Tensor:
        """Per-sequence SDPA: no dense T x T mask, whatever the total length."""
        out = torch.empty_like(q)
        bq, bk = cu_q.tolist(), cu_k.tolist()
        for i in range(len(bq) - 1):
            qs = q[bq[i]:bq[i + 1]].transpose(0, 1).unsqueeze(0)
            ks = k[bk[i]:bk[i + 1]].transpose(0, 1).unsqueeze(0)
            vs = v[bk[i]:bk[i + 1]].transpose(0, 1).unsqueeze(0)
            o = self(qs, ks, vs, None, causal, scale)
            out[bq[i]:bq[i + 1]] = o.squeeze(0).transpose(0, 1)
        return out


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


class _Imported(Adapter):
    """An adapter whose kernel comes from an installed package."""

    module = ""

    def _import(self) -> Any:
        mod = importlib.import_module(self.module)
        self.version = _version(self.backend.dist)
        self.origin = getattr(mod, "__file__", None)
        self.loaded = True
        return mod


class Sage(_Imported):
    """sageattn, which picks its kernel by GPU (fp8 P.V on sm89/90/120); its variants are
    other kernels of the same package, called the same way with their own options."""

    name, module = "sage", "sageattention"
    options: ClassVar[dict[str, Any]] = {}  # the kernel's own keywords, on every call

    def load(self) -> None:
        mod = self._import()
        fn = getattr(mod, self.backend.kernel, None)
        if fn is None:  # SageAttention 1.x has sageattn only
            have = f"{self.backend.dist} {self.version}" if self.version else self.backend.dist
            raise ImportError(f"{have} has no {self.backend.kernel}")
        self._fn = fn
        self._varlen = getattr(mod, "sageattn_varlen", None) if self.caps.varlen else None
        params = inspect.signature(fn).parameters
        # SageAttention 2 has no mask argument (its **kwargs swallows one silently): claim
        # masks only where the installed kernel names attn_mask
        masks = frozenset({"bool", "additive"}) if "attn_mask" in params else frozenset()
        self.caps = replace(self.caps, masks=masks, varlen=self._varlen is not None)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                 scale: float | None) -> Tensor:
        kw: dict[str, Any] = {"tensor_layout": "HND", "is_causal": causal, **self.options}
        if scale is not None:
            kw["sm_scale"] = scale
        if mask is not None:
            kw["attn_mask"] = mask
        return _first(self._fn(q, k, v, **kw))

    def varlen(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
               max_k: int, causal: bool, scale: float | None) -> Tensor:
        assert self._varlen is not None
        return _first(self._varlen(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=causal,
                                   sm_scale=scale))


class SageFp16(Sage):
    """sageattn_qk_int8_pv_fp16_cuda: int8 Q.K^T, fp16 P.V accumulated in fp32 (the most
    accurate of its pv_accum_dtype choices)."""

    name = "sage_fp16"
    options: ClassVar[dict[str, Any]] = {"pv_accum_dtype": "fp32"}


class Sage3(_Imported):
    name, module = "sage3", "sageattn3"

    def load(self) -> None:
        self._fn = self._import().sageattn3_blackwell

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                 scale: float | None) -> Tensor:
        if scale is not None or mask is not None:  # not claimed: never routed here
            raise ValueError("SageAttention3 takes no custom scale or mask")
        return _first(self._fn(q, k, v, is_causal=causal))


class _Flash(_Imported):
    """flash-attn's functions take [B, N, H, D]."""

    attr = "flash_attn_func"

    def load(self) -> None:
        mod = self._import()
        self._fn = getattr(mod, self.attr)
        self._varlen = getattr(mod, "flash_attn_varlen_func", None)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                 scale: float | None) -> Tensor:
        if mask is not None:
            raise ValueError(f"{self.backend.title} takes no mask")
        out = _first(self._fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              causal=causal, softmax_scale=scale))
        return out.transpose(1, 2)

    def varlen(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
               max_k: int, causal: bool, scale: float | None) -> Tensor:
        assert self._varlen is not None
        return _first(self._varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                                   softmax_scale=scale))


class Flash(_Flash):
    name, module = "flash", "flash_attn"


class Flash3(_Flash):
    name, module = "flash3", "flash_attn_interface"

    def _import(self) -> Any:
        try:
            return super()._import()
        except ImportError:
            self.module = "flash_attn_3"
            return super()._import()


class Flash4(_Flash):
    name, module = "flash4", "flash_attn.cute"


class Xformers(_Imported):
    name, module = "xformers", "xformers.ops"

    def load(self) -> None:
        self._ops = self._import()
        self._bias = importlib.import_module("xformers.ops.fmha.attn_bias")

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool,
                 scale: float | None) -> Tensor:
        b, h, n, _ = q.shape
        m = k.shape[-2]
        bias: Any = None
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                    ~mask, float("-inf"))
            # memory_efficient_attention wants the bias's last dim 8-aligned in memory
            full = torch.empty(b, h, n, (m + 7) // 8 * 8, dtype=q.dtype, device=q.device)
            full[..., :m] = mask.to(q.dtype).expand(b, h, n, m)
            bias = full[..., :m]
            if causal:
                bias = self._bias.LowerTriangularMaskWithTensorBias(bias)
        elif causal:
            bias = self._bias.LowerTriangularMask()
        out = self._ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                   v.transpose(1, 2), attn_bias=bias,
                                                   scale=scale)
        return out.transpose(1, 2)  # type: ignore[no-any-return]

    def varlen(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int,
               max_k: int, causal: bool, scale: float | None) -> Tensor:
        lq = (cu_q[1:] - cu_q[:-1]).tolist()
        lk = (cu_k[1:] - cu_k[:-1]).tolist()
        cls = self._bias.BlockDiagonalCausalMask if causal else self._bias.BlockDiagonalMask
        out = self._ops.memory_efficient_attention(q[None], k[None], v[None],
                                                   attn_bias=cls.from_seqlens(lq, lk),
                                                   scale=scale)
        return out[0]  # type: ignore[no-any-return]


ADAPTERS: dict[str, type[Adapter]] = {a.name: a for a in (Adapter, Sage, SageFp16, Sage3, Flash,
                                                           Flash3, Flash4, Xformers)}


def adapter(name: str) -> Adapter:
    """A new, unloaded adapter for a backend name."""
    return ADAPTERS[name]()
