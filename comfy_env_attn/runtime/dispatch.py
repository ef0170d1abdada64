"""Runtime dispatcher: route attention to the fastest backend the lock proved on this machine.

Imported inside every ComfyUI start, so it imports only the standard library and torch.
The lock is read once, on the first set_backend() or dispatch call, and checked against the
live process (torch, CUDA, the GPU, each backend's version and files). A missing, stale or
corrupt lock gives one warning and SDPA.

    from comfy_env_attn import set_backend, dispatch_attention
    set_backend("auto")                 # or "sage", "flash", "xformers", "sdpa", "auto" + exact
    out = dispatch_attention(q, k, v)   # [B, H, N, D] -> [B, H, N, D]
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from comfy_env_attn.core import choose
from comfy_env_attn.core.backends import BACKENDS, canonical
from comfy_env_attn.core.settings import SETTLE_MARGIN

log = logging.getLogger("comfy_env_attn")

# ComfyUI's COMFYUI_ATTENTION_MECHANISM values and our own names.
_ENV_NAMES = {"auto": "auto", "sage": "sage", "flash2": "flash", "flash3": "flash3",
              "xformers": "xformers", "pytorch": "sdpa", "sdpa": "sdpa"}
LOCK_NAME = "pylock.comfy-env-attn.toml"

Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, bool, Any], torch.Tensor]


@dataclass
class _State:
    mode: str = "auto"
    exact: bool = False
    label: str = ""
    backends: dict[str, Any] = field(default_factory=dict)  # lock entries, verified only
    device: str = ""  # the device type the lock verified on
    trusted: bool = False
    unverified: bool = False
    kernels: dict[str, Kernel] = field(default_factory=dict)
    mask_ok: set[str] = field(default_factory=set)
    routes: dict[tuple[Any, ...], list[str]] = field(default_factory=dict)
    failed: set[tuple[str, tuple[Any, ...]]] = field(default_factory=set)
    ready: bool = False


_S = _State()
_LOCK = threading.Lock()


# -- the lock -----------------------------------------------------------------------------

def _lock_path() -> Path:
    env = os.environ.get("COMFY_ENV_ATTN_LOCK")
    return Path(env) if env else Path(sys.prefix) / LOCK_NAME


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10
        import tomli as tomllib
    with open(path, "rb") as f:
        doc: dict[str, Any] = tomllib.load(f)
    return doc


def _record_sha256(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        d = distribution(dist)
    except PackageNotFoundError:
        return None
    text = d.read_text("RECORD")
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _live_device() -> tuple[str, str | None]:
    if torch.cuda.is_available():
        return "cuda", "%d.%d" % torch.cuda.get_device_capability()
    return "cpu", None


def stale_reasons(fp: dict[str, Any]) -> list[str]:
    """Why a lock's fingerprint does not match this process (empty when it does)."""
    out = []
    if fp.get("torch") != torch.__version__:
        out.append(f"torch is {torch.__version__}, the lock verified {fp.get('torch')}")
    if fp.get("torch_cuda") != torch.version.cuda:
        out.append(f"torch CUDA is {torch.version.cuda}, the lock verified "
                   f"{fp.get('torch_cuda')}")
    kind, cap = _live_device()
    if fp.get("device") != kind:
        out.append(f"the lock verified on {fp.get('device')}, this process runs on {kind}")
    elif kind == "cuda" and fp.get("capability") != cap:
        out.append(f"the lock verified on GPU sm {fp.get('capability')}, this GPU is sm {cap}")
    for name, info in fp.get("backends", {}).items():
        dist = info.get("dist", name)
        have = _version(dist)
        if have != info.get("version"):
            out.append(f"{dist} is {have or 'not installed'}, the lock verified "
                       f"{info.get('version')}")
        elif info.get("record_sha256") and _record_sha256(dist) != info["record_sha256"]:
            out.append(f"{dist} {have}: its files changed since verification")
    return out


def _load_lock() -> dict[str, Any] | None:
    """Verified backend entries of a fresh lock, or None after one warning."""
    path = _lock_path()
    if not path.exists():
        return None
    try:
        doc = _read_toml(path)
        tool = doc["tool"]["comfy-env-attn"]
        if tool.get("schema") != 1:
            raise ValueError(f"schema {tool.get('schema')!r}, expected 1")
        stale = stale_reasons(tool.get("fingerprint", {}))
    except Exception as e:
        log.warning("comfy-env-attn: the lock %s is unreadable (%s); using PyTorch SDPA. "
                    "Run: comfy-env-attn verify", path, e)
        return {}
    if stale:
        log.warning("comfy-env-attn: the lock %s is stale (%s); using PyTorch SDPA until "
                    "`comfy-env-attn verify` runs again", path, "; ".join(stale))
        return {}
    _S.device = tool.get("fingerprint", {}).get("device", "")
    return {n: b for n, b in tool.get("backends", {}).items()
            if b.get("status") == "verified"}


# -- kernels ------------------------------------------------------------------------------

def _comfy_attention() -> Any:
    """ComfyUI's attention module when this process is ComfyUI (never imported by us)."""
    return sys.modules.get("comfy.ldm.modules.attention")


def _comfy_kernel(name: str) -> Kernel | None:
    mod = _comfy_attention()
    if mod is None:
        return None
    comfy_name = {"sdpa": "pytorch", "sage": "sage", "sage3": "sage3", "flash": "flash",
                  "xformers": "xformers"}.get(name)
    if comfy_name is None:
        return None
    fn = None
    getter = getattr(mod, "get_attention_function", None)
    if getter is not None:
        fn = getter(comfy_name, default=None)
    if fn is None:
        fn = getattr(mod, {"pytorch": "attention_pytorch", "sage3": "attention3_sage"}.get(
            comfy_name, f"attention_{comfy_name}"), None)
    if fn is None:
        return None
    comfy_fn = fn

    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, causal: bool,
             scale: Any) -> torch.Tensor:
        out: torch.Tensor = comfy_fn(q, k, v, q.shape[1], mask=mask, skip_reshape=True,
                                     skip_output_reshape=True)
        return out

    return call


def _bnhd(fn: Callable[..., Any], **fixed: Any) -> Kernel:
    def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, causal: bool,
             scale: Any) -> torch.Tensor:
        out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                 softmax_scale=scale, **fixed)
        if isinstance(out, tuple):
            out = out[0]
        return out.transpose(1, 2)  # type: ignore[no-any-return]

    return call


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, causal: bool,
          scale: Any) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          scale=scale)


def _direct_kernel(name: str) -> tuple[Kernel, bool]:
    """(kernel taking [B, H, N, D], whether it takes a mask). Imports the backend."""
    if name == "sdpa":
        return _sdpa, True
    if name == "sage":
        sage = importlib.import_module("sageattention").sageattn
        takes_mask = "attn_mask" in inspect.signature(sage).parameters

        def sage_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any,
                      causal: bool, scale: Any) -> torch.Tensor:
            kw: dict[str, Any] = {"tensor_layout": "HND", "is_causal": causal}
            if scale is not None:
                kw["sm_scale"] = scale
            if mask is not None:
                kw["attn_mask"] = mask
            return sage(q, k, v, **kw)  # type: ignore[no-any-return]

        return sage_call, takes_mask
    if name == "sage3":
        fn3 = importlib.import_module("sageattn3").sageattn3_blackwell
        return (lambda q, k, v, mask, causal, scale: fn3(q, k, v, is_causal=causal)), False
    if name == "flash":
        return _bnhd(importlib.import_module("flash_attn").flash_attn_func), False
    if name == "flash3":
        try:
            mod = importlib.import_module("flash_attn_interface")
        except ImportError:
            mod = importlib.import_module("flash_attn_3")
        return _bnhd(mod.flash_attn_func), False
    if name == "flash4":
        return _bnhd(importlib.import_module("flash_attn.cute").flash_attn_func), False
    if name == "xformers":
        xops = importlib.import_module("xformers.ops")

        def xf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, causal: bool,
               scale: Any) -> torch.Tensor:
            bias = xops.LowerTriangularMask() if causal else None
            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                  v.transpose(1, 2), attn_bias=bias,
                                                  scale=scale)
            return out.transpose(1, 2)  # type: ignore[no-any-return]

        return xf, False
    raise ValueError(f"unknown backend {name!r}")


def _kernel(name: str) -> Kernel:
    k = _S.kernels.get(name)
    if k is None:
        direct, takes_mask = _direct_kernel(name)
        comfy = _comfy_kernel(name)
        k = comfy or direct
        if takes_mask:
            _S.mask_ok.add(name)
        _S.kernels[name] = k
    return k


# -- choosing -----------------------------------------------------------------------------

def _env_override() -> str | None:
    for var in ("COMFY_ENV_ATTN_BACKEND", "COMFYUI_ATTENTION_MECHANISM"):
        v = os.environ.get(var, "").strip().lower()
        if v:
            return _ENV_NAMES.get(v) or canonical(v)
    return None


def _available_unverified() -> list[str]:
    out = []
    for name, b in BACKENDS.items():
        if name == "sdpa":
            continue
        root = b.import_name.split(".")[0]
        if importlib.util.find_spec(root) is not None:
            out.append(name)
    return out


def set_backend(name: str = "auto", *, exact: bool = False,
                allow_unverified: bool | None = None) -> str:
    """Choose the backend ("auto", a name or an alias); returns a readable label."""
    with _LOCK:
        env = _env_override()
        mode = env or ("auto" if name.lower() == "auto" else canonical(name))
        _S.mode, _S.exact, _S.routes = mode, exact, {}
        _ROUTES.clear()
        lock = _load_lock()
        if allow_unverified is None:
            allow_unverified = os.environ.get("COMFY_ENV_ATTN_UNVERIFIED") == "1"
        _S.unverified = False
        if lock is None and allow_unverified:
            cap = _live_device()[1]
            capt = tuple(int(x) for x in cap.split(".")) if cap else None
            order = choose.fixed_order(_available_unverified(), capt)  # type: ignore[arg-type]
            lock = {n: {"status": "verified", "quantized": BACKENDS[n].quantized,
                        "unverified": True, "rank": i} for i, n in enumerate(order)}
            _S.unverified = True
            _S.device = _live_device()[0]
        elif lock is None:
            log.warning("comfy-env-attn: no lock at %s; using PyTorch SDPA. Run: "
                        "comfy-env-attn install (or set COMFY_ENV_ATTN_UNVERIFIED=1)",
                        _lock_path())
            lock = {}
        _S.backends = lock
        _S.trusted = bool(lock)
        _S.ready = True
        _S.label = _describe()
        return _S.label


def get_backend() -> str:
    if not _S.ready:
        set_backend("auto")
    return _S.label


def _describe() -> str:
    if _S.mode != "auto":
        b = BACKENDS[_S.mode]
        info = _S.backends.get(_S.mode)
        if info is None and _S.mode != "sdpa":
            return f"{b.title}: not verified on this machine; using PyTorch SDPA"
        return f"{b.title} {info.get('version', '') if info else ''}".strip() + \
            (", verified" if info and not _S.unverified else "")
    if not _S.trusted:
        return "auto: PyTorch SDPA (no verified lock)"
    if _S.unverified:
        names = [n for n in sorted(_S.backends, key=lambda n: _S.backends[n]["rank"])]
        return f"auto (unverified, fixed GPU-tier order): {', '.join(names)}"
    best = None
    for info_name, info in _S.backends.items():
        for bch in info.get("bench", []):
            if "tflops" in bch and (best is None or bch["tflops"] > best[1]):
                if _S.exact and info.get("quantized"):
                    continue
                best = (info_name, bch["tflops"], bch["shape"])
    if best is None:
        return f"auto: {', '.join(_S.backends)} (verified)"
    info = _S.backends[best[0]]
    shape = "x".join(str(s) for s in best[2])
    return (f"auto{' (exact)' if _S.exact else ''}: {BACKENDS[best[0]].title} "
            f"{info.get('version', '')}, verified, {best[1]:.3g} TFLOP/s at {shape}; "
            f"chosen per input shape among {', '.join(_S.backends)}")


_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _route(key: tuple[Any, ...]) -> list[str]:
    head_dim, dtype, tokens, _nk, has_mask, _causal, _scale, device = key
    if not _S.trusted or (device != _S.device and not _S.unverified):
        order = ["sdpa"]
    elif _S.mode != "auto":
        order = [_S.mode, "sdpa"] if _S.mode in _S.backends else ["sdpa"]
    elif _S.unverified:
        order = sorted(_S.backends, key=lambda n: _S.backends[n]["rank"])
        if _S.exact:
            order = [n for n in order if not BACKENDS[n].quantized]
    else:
        order = [n for n, _ in choose.order_for(_S.backends, head_dim,
                                                _DTYPES.get(dtype, str(dtype)), tokens,
                                                exact=_S.exact)]
    out = []
    for n in order:
        if (n, key) in _S.failed:
            continue
        if n != "sdpa" and head_dim > BACKENDS[n].max_head_dim:
            continue
        if has_mask:
            try:
                _kernel(n)
            except Exception:
                continue
            if n not in _S.mask_ok:
                continue  # a mask is never dropped: only mask-capable backends
        out.append(n)
    if "sdpa" not in out:
        out.append("sdpa")
    _S.routes[key] = out
    return out


# (shape, dtype, k shape, no mask, causal, no scale, is_cuda) -> (backend, kernel): the hot
# path is one tuple, one dict lookup and the kernel call (None: plain SDPA, called inline).
_ROUTES: dict[tuple[Any, ...], tuple[str, Kernel | None]] = {}
_plain_sdpa = F.scaled_dot_product_attention


def _settle(route: list[str], rkey: tuple[Any, ...], args: tuple[Any, ...]) -> list[str]:
    """Reorder the leading close candidates by timing them here, on this input: the lock's
    numbers come from other processes, whose run-to-run spread (5% on an H100) can exceed
    the gap between the two fastest backends."""
    head_dim, dtype, tokens = rkey[0], rkey[1], rkey[2]
    rows = choose.ranked(_S.backends, head_dim, _DTYPES.get(dtype, str(dtype)), tokens,
                         exact=_S.exact)
    close = [n for n in choose.close_call(rows, SETTLE_MARGIN) if n in route]
    if len(close) < 2 or os.environ.get("COMFY_ENV_ATTN_SETTLE") == "0":
        return route
    q = args[0]
    cuda = q.is_cuda
    timed: dict[str, float] = {}
    for name in close:
        try:
            kernel = _sdpa if name == "sdpa" else _kernel(name)
            for _ in range(2):
                kernel(*args)
            if cuda:
                torch.cuda.synchronize()
            samples = []
            for _ in range(3):
                t0 = time.perf_counter()
                kernel(*args)
                if cuda:
                    torch.cuda.synchronize()
                samples.append(time.perf_counter() - t0)
            timed[name] = sorted(samples)[1]
        except Exception as e:
            _S.failed.add((name, rkey))
            log.warning("comfy-env-attn: %s failed while timing it for head dim %s, %s (%s: "
                        "%s)", name, head_dim, dtype, type(e).__name__, str(e)[:200])
    best = sorted(timed, key=lambda n: timed[n])
    rest = [n for n in route if n not in best and (n, rkey) not in _S.failed]
    return best + rest


def _route_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """The hot path's key -> the kind of input the choice is made for."""
    shape, dtype, kshape, no_mask, causal, no_scale, is_cuda = key
    return (shape[-1], dtype, shape[-2], kshape[-2], not no_mask, causal, not no_scale,
            "cuda" if is_cuda else "cpu")


def _entry(key: tuple[Any, ...], args: tuple[Any, ...] | None = None
           ) -> tuple[str, Kernel | None]:
    if not _S.ready:
        set_backend("auto")
    _shape, _dtype, _kshape, no_mask, causal, no_scale, _cuda = key
    rkey = _route_key(key)
    route = _route(rkey)
    if args is not None and _S.mode == "auto" and _S.trusted and not _S.unverified:
        route = _settle(route, rkey, args)
        _S.routes[rkey] = route
    name = route[0]
    if name == "sdpa":
        kernel: Kernel | None = None if no_mask and not causal and no_scale else _sdpa
    elif not no_scale and _comfy_attention() is not None:
        kernel = _direct_kernel(name)[0]  # ComfyUI's functions take no scale everywhere
    else:
        kernel = _kernel(name)
    if len(_ROUTES) > 4096:
        _ROUTES.clear()
    _ROUTES[key] = (name, kernel)
    return name, kernel


def dispatch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                       scale: float | None = None) -> torch.Tensor:
    """Attention over [B, H, N, D] tensors by the fastest backend proven for this input."""
    key = (q.shape, q.dtype, k.shape, attn_mask is None, is_causal, scale is None, q.is_cuda)
    try:
        name, kernel = _ROUTES[key]
    except KeyError:
        name, kernel = _entry(key, (q, k, v, attn_mask, is_causal, scale))
    if kernel is None:
        return _plain_sdpa(q, k, v)
    try:
        return kernel(q, k, v, attn_mask, is_causal, scale)
    except Exception as e:
        return _after_failure(name, key, e, q, k, v, attn_mask, is_causal, scale)


def _after_failure(name: str, key: tuple[Any, ...], err: Exception, q: torch.Tensor,
                   k: torch.Tensor, v: torch.Tensor, mask: Any, causal: bool,
                   scale: Any) -> torch.Tensor:
    """Remember the failure for this kind of input (one log line), go on to the next."""
    if name == "sdpa":
        raise err
    rkey = _route_key(key)
    with _LOCK:
        _S.failed.add((name, rkey))
        _S.routes.pop(rkey, None)
        _ROUTES.pop(key, None)
    nxt = _entry(key)[0]
    log.warning("comfy-env-attn: %s failed for head dim %s, %s, %s tokens (%s: %s); using %s "
                "for such inputs from now on", name, rkey[0], rkey[1], rkey[2],
                type(err).__name__, str(err)[:200], nxt)
    return dispatch_attention(q, k, v, mask, causal, scale)


# -- varlen -------------------------------------------------------------------------------

def _sdpa_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                 cu_k: torch.Tensor, causal: bool, scale: Any) -> torch.Tensor:
    """Per-sequence SDPA: no dense T x T mask, whatever the total length."""
    out = torch.empty_like(q)
    bq, bk = cu_q.tolist(), cu_k.tolist()
    for i in range(len(bq) - 1):
        qs = q[bq[i]:bq[i + 1]].transpose(0, 1).unsqueeze(0)
        ks = k[bk[i]:bk[i + 1]].transpose(0, 1).unsqueeze(0)
        vs = v[bk[i]:bk[i + 1]].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale)
        out[bq[i]:bq[i + 1]] = o.squeeze(0).transpose(0, 1)
    return out


def _varlen_kernel(name: str) -> Callable[..., torch.Tensor] | None:
    if name == "flash":
        fa = importlib.import_module("flash_attn").flash_attn_varlen_func
        return lambda q, k, v, cq, ck, mq, mk, causal, scale: fa(
            q, k, v, cq, ck, mq, mk, causal=causal, softmax_scale=scale)
    if name == "sage":
        mod = importlib.import_module("sageattention")
        sv = getattr(mod, "sageattn_varlen", None)
        if sv is None:
            return None
        return lambda q, k, v, cq, ck, mq, mk, causal, scale: sv(
            q, k, v, cq, ck, mq, mk, is_causal=causal, sm_scale=scale)
    if name == "xformers":
        xops = importlib.import_module("xformers.ops")
        fmha = importlib.import_module("xformers.ops.fmha")

        def xf(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cq: torch.Tensor,
               ck: torch.Tensor, mq: int, mk: int, causal: bool, scale: Any) -> torch.Tensor:
            lq = (cq[1:] - cq[:-1]).tolist()
            lk = (ck[1:] - ck[:-1]).tolist()
            cls = fmha.attn_bias.BlockDiagonalCausalMask if causal else \
                fmha.attn_bias.BlockDiagonalMask
            bias = cls.from_seqlens(lq, lk)
            out: torch.Tensor = xops.memory_efficient_attention(
                q[None], k[None], v[None], attn_bias=bias, scale=scale)[0]
            return out

        return xf
    return None


def dispatch_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor,
                              max_seqlen_q: int, max_seqlen_kv: int, *,
                              is_causal: bool = False, scale: float | None = None
                              ) -> torch.Tensor:
    """Attention over packed sequences, [T, H, D] with cumulative lengths; same dtype out."""
    if not _S.ready:
        set_backend("auto")
    key = ("varlen", q.shape[-1], q.dtype, max_seqlen_q, False, is_causal, scale is not None,
           q.device.type)
    route = _S.routes.get(key)
    if route is None:
        dense = _route((q.shape[-1], q.dtype, max_seqlen_q, max_seqlen_kv, False, is_causal,
                        scale is not None, q.device.type))
        route = [n for n in dense if n == "sdpa" or (n, key) not in _S.failed]
        _S.routes[key] = route
    for name in route:
        if name == "sdpa":
            break
        try:
            fn = _varlen_kernel(name)
            if fn is None:
                continue
            out = fn(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv,
                     is_causal, scale)
            return out.to(q.dtype)
        except Exception as e:
            with _LOCK:
                _S.failed.add((name, key))
                _S.routes.pop(key, None)
            log.warning("comfy-env-attn: %s varlen failed (%s: %s); trying the next backend",
                        name, type(e).__name__, str(e)[:200])
    return _sdpa_varlen(q, k, v, cu_seqlens_q, cu_seqlens_kv, is_causal, scale)


# -- comfy-sparse-attn parity -------------------------------------------------------------

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


def _reset_for_tests() -> None:
    global _S
    _S = _State()
    _ROUTES.clear()
