"""Runtime dispatcher: route each attention call to the fastest backend the lock proved for
that kind of call on this machine, through the same adapter verification proved.

Imported inside every ComfyUI start, so it imports only the standard library and torch.
The lock is read on the first set_backend() or dispatch call, validated against the typed
lock model and checked against the live process with the same rule the command line uses
(core.lockmodel.stale_reasons); a later set_backend reads it again once its file has
changed, and judges it again at most every LOCK_RECHECK_S seconds. A missing, stale or
invalid lock gives one warning and SDPA.

    from comfy_env_attn import set_backend, dispatch_attention
    set_backend("auto")                 # or "sage", "flash", "sdpa", ...; safe=, exact=
    out = dispatch_attention(q, k, v)   # [B, H, N, D] -> [B, H, N, D]
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from comfy_env_attn.core import choose
from comfy_env_attn.core.backends import BACKENDS, UNVERIFIED_ORDER, Call, lookup
from comfy_env_attn.core.lockmodel import (
    BackendRecord,
    ToolTable,
    lock_path,
    read_toml,
    stale_reasons,
    tool_table,
)
from comfy_env_attn.core.paths import replace_file
from comfy_env_attn.core.progress import tool_command
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.core.settings import settle_margin
from comfy_env_attn.runtime import plugins
from comfy_env_attn.runtime.adapters import (
    Adapter,
    adapter,
    describe,
    dtype_name,
    merge_causal,
    sdpa,
)
from comfy_env_attn.runtime.link import setup_link
from comfy_env_attn.runtime.live import live_facts
from comfy_env_attn.runtime.plugins import load_plugins, register_backend

log = logging.getLogger("comfy_env_attn")

__all__ = ["dispatch_attention", "dispatch_varlen_attention", "get_backend", "passed_over",
           "register_backend", "set_backend", "setup_link"]

# Values of COMFYUI_ATTENTION_MECHANISM (set by some cloud templates and launchers; ComfyUI
# itself reads flags) beyond ALIASES: ComfyUI's split, sub-quad and basic are its own
# memory-saving paths, and here the nearest is SDPA.
_ENV_NAMES = {"auto": "auto", "split": "sdpa", "sub-quad": "sdpa", "sub_quad": "sdpa",
              "basic": "sdpa", "quad": "sdpa"}


@dataclass
class _State:
    """The dispatcher's settings and the backends the lock lets it use."""
    mode: str = "auto"
    exact: bool = False
    safe: bool = False  # no fp8/fp4 P.V (core.choose's modes)
    approximate: bool = False  # auto may choose approximate backends
    label: str = ""
    table: ToolTable | None = None  # the fresh lock
    backends: dict[str, BackendRecord] = field(default_factory=dict)  # verified, trusted
    device: str = ""  # where the lock verified
    unverified: bool = False
    adapters: dict[str, Adapter] = field(default_factory=dict)  # loaded
    routes: dict[tuple[Any, ...], list[str]] = field(default_factory=dict)
    failed: dict[tuple[str, tuple[Any, ...]], str] = field(default_factory=dict)
    unloadable: dict[str, str] = field(default_factory=dict)  # import failed: why
    settled: dict[str, list[str]] = field(default_factory=dict)  # from the per-machine cache
    said: set[str] = field(default_factory=set)  # one log line per message
    ready: bool = False
    lock_seen: tuple[Any, ...] | None = None  # the lock file as `table` was read from it
    lock_judged: float = 0.0  # when (time.monotonic) it was judged fresh or not


_S = _State()
_LOCK = threading.Lock()
# set_backend's count: a route worked out under older settings (a call in flight while the
# settings changed) is used for that call and never kept
_GEN = [0]
_WARNED: set[tuple[str, str]] = set()  # (lock path, message): once per process


def _warn_once(key: str, msg: str, *args: Any) -> None:
    if (key, msg) not in _WARNED:
        _WARNED.add((key, msg))
        log.warning(msg, *args)


def _say_once(msg: str) -> None:
    if msg not in _S.said:
        _S.said.add(msg)
        log.warning("comfy-env-attn: %s", msg)


# -- the lock -----------------------------------------------------------------------------

def _lock_file() -> Path:
    return lock_path(sys.prefix)


def _lock_stat() -> tuple[Any, ...]:
    """The lock file as it is now (path, size, mtime, inode), or its path alone where there
    is none to read."""
    path = _lock_file()
    try:
        st = path.stat()
    except OSError:
        return (str(path),)
    return (str(path), st.st_size, st.st_mtime_ns, st.st_ino)


# How long a lock judged fresh is trusted without judging it again, while its file stays as
# it was: set_backend at every call (two nodes' settings taking turns) would otherwise stat
# every backend's files each time (9 ms), and a backend changed in place (a node's
# requirements installed while ComfyUI runs) is still noticed at the next set_backend after.
LOCK_RECHECK_S = 5.0


def _load_lock() -> ToolTable | None:
    """The lock's table if it exists, is valid and fresh; None after one warning."""
    path = _lock_file()
    try:
        if not path.exists():
            _warn_once(str(path), "comfy-env-attn: no lock at %s; using PyTorch SDPA. Run: "
                       "%s install (or set COMFY_ENV_ATTN_UNVERIFIED=1)", path, tool_command())
            return None
        table = tool_table(read_toml(path))
        stale = stale_reasons(table, live_facts())
    except Exception as e:  # any invalid value: one warning, SDPA, never an exception
        _warn_once(str(path), "comfy-env-attn: the lock %s is invalid (%s); using PyTorch "
                   "SDPA. Run: %s verify", path, f"{type(e).__name__}: {e}", tool_command())
        return None
    if stale:
        _warn_once(str(path), "comfy-env-attn: the lock %s is stale (%s); using PyTorch SDPA "
                   "until `%s verify` runs again", path, "; ".join(stale), tool_command())
        return None
    return table


# Settled choices (close calls timed on the real input), kept beside the lock and keyed by
# the lock's own bytes, so the next start pays nothing and a new lock starts afresh.

def _settle_file() -> Path:
    p = _lock_file()
    return p.with_name(p.name + ".settled.json")


def _lock_digest() -> str:
    try:
        return hashlib.sha256(_lock_file().read_bytes()).hexdigest()
    except OSError:
        return ""


def _settle_key(rkey: tuple[Any, ...]) -> str:
    """A settled choice's key: the kind of call, and the mode, which decides the backends
    timed (safe mode times none of the approximate or quantized ones: its order is no
    answer for auto)."""
    return repr((rkey, _S.exact, _S.safe, _S.approximate))


def _read_settled() -> dict[str, list[str]]:
    try:
        doc = json.loads(_settle_file().read_text(encoding="utf-8"))
        if doc.get("lock_sha256") == _lock_digest() and isinstance(doc.get("choices"), dict):
            return {str(k): [str(n) for n in v] for k, v in doc["choices"].items()
                    if isinstance(v, list)}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    return {}


def _write_settled() -> None:
    try:
        replace_file(_settle_file(), json.dumps({"lock_sha256": _lock_digest(),
                                                 "choices": _S.settled}))
    except OSError:  # a read-only environment: settle again next start
        pass


# -- choosing -----------------------------------------------------------------------------

def _env_override() -> tuple[str, str] | None:
    """(the variable, the backend it names), where one is set to a backend."""
    for var in ("COMFY_ENV_ATTN_BACKEND", "COMFYUI_ATTENTION_MECHANISM"):
        v = os.environ.get(var, "").strip().lower()
        if not v:
            continue
        name = _ENV_NAMES.get(v) or lookup(v)
        if name is None:
            _warn_once(var, "comfy-env-attn: %s=%r is not a backend (valid: auto, %s); "
                       "ignored", var, v, ", ".join(BACKENDS))
            continue
        return var, name
    return None


def _available(name: str) -> bool:
    root = BACKENDS[name].import_name.split(".")[0]
    return name == "sdpa" or importlib.util.find_spec(root) is not None


def _unverified_runs(name: str) -> bool:
    """Whether unverified mode (no lock, allow_unverified) may run this backend here at all:
    its order, installed, the mode's rule, a GPU for any but SDPA. What _route asks of each
    call (the kernels' limits, the call's device) comes on top; the label says the same."""
    return name in UNVERIFIED_ORDER and _available(name) \
        and choose.mode_reason(name, None, exact=_S.exact, safe=_S.safe,
                               approximate=_S.approximate or _S.mode == name) is None \
        and (name == "sdpa" or _S.device == "cuda")


# the settings a process starts with (set_backend's defaults)
DEFAULTS: dict[str, Any] = {"name": "auto", "exact": False, "safe": False,
                            "approximate": False, "allow_unverified": None}


def _ensure() -> None:
    """The default settings, on a process's first call."""
    if not _S.ready:
        _apply(**DEFAULTS, asked=False, first=True)


def restore(previous: dict[str, Any] | None) -> None:
    """Put back settings taken with settings() (None: the defaults), as they were: nobody
    asks for them again, so an environment override is not said again."""
    _apply(**(previous or DEFAULTS), asked=False)


def set_backend(name: str = "auto", *, exact: bool = False, safe: bool = False,
                approximate: bool = False, allow_unverified: bool | None = None) -> str:
    """Choose the backend ("auto", a name or an alias); returns a readable label.
    exact: no quantized or approximate backend; safe: no kernel quantized below fp16 in
    P.V (SageAttention's fp16-PV kernel, sage_fp16, instead of sageattn's fp8 one, where it
    passed: for models whose images turn black or noisy with sage); approximate: auto may
    choose approximate ones (plugins such as taylor), which it never does otherwise. The
    rule is core.choose's (mode_reason)."""
    return _apply(name, exact=exact, safe=safe, approximate=approximate,
                  allow_unverified=allow_unverified, asked=True)


def _apply(name: str, *, exact: bool, safe: bool, approximate: bool,
           allow_unverified: bool | None, asked: bool, first: bool = False) -> str:
    """set_backend's work. `asked`: the caller asked for these settings (an override by
    the environment is said), rather than a first call starting with the defaults or a
    restore; `first`: only if nothing was applied yet."""
    load_plugins()
    mode = "auto" if name.strip().lower() == "auto" else lookup(name)
    if mode is None:
        raise ValueError(f"unknown backend {name!r}; valid: auto, {', '.join(BACKENDS)}")
    with _LOCK:
        if first and _S.ready:  # another thread applied settings meanwhile: they stand
            return _S.label
        env = _env_override()
        if env is not None and env[1] != mode:
            if asked:
                call = ", ".join([repr(name), *(f"{k}=True" for k, on in (
                    ("exact", exact), ("safe", safe), ("approximate", approximate)) if on)])
                _warn_once(f"{env[0]} {call}", "comfy-env-attn: %s=%s overrides "
                           "set_backend(%s)", env[0], env[1], call)
            mode = env[1]
        _S.mode, _S.exact, _S.safe = mode, exact, safe and not exact
        _S.approximate = approximate and not (exact or safe)
        if allow_unverified is None:
            allow_unverified = os.environ.get("COMFY_ENV_ATTN_UNVERIFIED") == "1"
        seen, now = _lock_stat(), time.monotonic()
        if not (_S.ready and seen == _S.lock_seen and now - _S.lock_judged < LOCK_RECHECK_S):
            table = _load_lock()
            if not (_S.ready and seen == _S.lock_seen and (table is None) == (_S.table is None)):
                # another lock, or the same one judged otherwise: what failed under the old
                # one is tried again; the same lock judged alike keeps it (whatever the mode)
                _S.failed, _S.unloadable, _S.said = {}, {}, set()
                if table is not None:
                    _S.settled = _read_settled()
            _S.table, _S.lock_seen, _S.lock_judged = table, seen, now
        table = _S.table
        _S.unverified, _S.backends = False, {}
        if table is not None:
            _S.backends = table.verified()
            _S.device = table.fingerprint.device
        elif allow_unverified:
            _S.unverified = True
            _S.device = "cuda" if torch.cuda.is_available() else "cpu"
        _S.ready = True
        _S.label = _describe()
        _GEN[0] += 1  # after the settings: a route begun before is not kept
        _S.routes = {}
        _ROUTES.clear()
        return _S.label


def settings() -> dict[str, Any]:
    """The keyword arguments that set_backend would take to choose as it does now."""
    _ensure()
    return {"name": _S.mode, "exact": _S.exact, "safe": _S.safe,
            "approximate": _S.approximate, "allow_unverified": _S.unverified}


def get_backend() -> str:
    _ensure()
    return _S.label


def _describe() -> str:
    demoted = sorted({f"{n} ({why})" for (n, _), why in _S.failed.items()} |
                     {f"{n} (cannot be loaded: {why})" for n, why in _S.unloadable.items()})
    tail = f"; demoted after failing: {', '.join(demoted)}" if demoted else ""
    if _S.mode != "auto":
        b = BACKENDS[_S.mode]
        rec = _S.backends.get(_S.mode)
        if _S.unverified and _unverified_runs(_S.mode):
            return f"{b.title} (unverified){tail}"
        if rec is None and _S.mode != "sdpa":
            return f"{b.title}: not verified on this machine; using PyTorch SDPA"
        version = rec.version if rec and rec.version else ""
        return f"{b.title} {version}".strip() + (", verified" if rec else "") + \
            " (calls it was not proven for go to PyTorch SDPA)" * (
                rec is not None and _S.mode != "sdpa") + tail
    if _S.unverified:
        return "auto (unverified, fixed GPU-tier order): " + ", ".join(
            n for n in UNVERIFIED_ORDER if _unverified_runs(n)) + tail
    if _S.table is None:
        return "auto: PyTorch SDPA (no verified lock)"
    best = None
    kind = " (exact)" if _S.exact else " (safe)" if _S.safe else ""
    allowed = [n for n, rec in _S.backends.items() if n in BACKENDS and choose.mode_reason(
        n, rec, exact=_S.exact, safe=_S.safe, approximate=_S.approximate) is None]
    for name in allowed:
        rec = _S.backends[name]
        for row in rec.bench:
            if row.tflops is not None and (best is None or row.tflops > best[1]):
                best = (name, row.tflops, row.label())
    if best is None:
        return f"auto{kind}: {', '.join(allowed)} (verified){tail}"
    rec = _S.backends[best[0]]
    return (f"auto{kind}: {BACKENDS[best[0]].title} "
            f"{rec.version or ''}, verified, {best[1]:.3g} TFLOP/s at {best[2]}; "
            f"chosen per input among {', '.join(allowed)}{tail}")


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor)


def _elsewhere(call: Call) -> str | None:
    """Why the lock's proofs do not hold on the call's device (another kind, or a GPU of
    another capability than the one verification ran on)."""
    if call.device != _S.device:
        return f"the lock verified on {_S.device}; this call is on {call.device}"
    fp = _S.table.fingerprint if _S.table is not None else None
    if fp is not None and call.capability is not None and fp.capability and \
            "%d.%d" % call.capability != fp.capability:
        return (f"the lock verified on a GPU of sm {fp.capability}; this call is on one of "
                f"sm {call.capability[0]}.{call.capability[1]}")
    return None


def _route(call: Call, rkey: tuple[Any, ...]) -> list[str]:
    """The backends for this kind of call, best first; always ending with SDPA."""
    if _S.unverified:
        order = [n for n in UNVERIFIED_ORDER if _unverified_runs(n)
                 and not BACKENDS[n].not_supported_reasons(call)
                 and (_S.mode in ("auto", n) or n == "sdpa")
                 and (n == "sdpa" or call.device == "cuda")]
    elif _S.table is None or _elsewhere(call) or min(call.q_len, call.kv_len) == 0:
        order = ["sdpa"]  # no proof holds here, or an empty sequence (none proves one)
    elif _S.mode == "sdpa":
        order = ["sdpa"]  # asked for by name: nothing to prove
    elif _S.mode != "auto":
        rec = _S.backends.get(_S.mode)
        why = ["it is not verified on this machine"] if rec is None else \
            choose.reasons(_S.mode, rec, call, approximate=True)
        if why:
            _say_once(f"{_S.mode} passed over for {_call_text(call)}: {'; '.join(why)}; "
                      "using sdpa")
            order = ["sdpa"]
        else:
            order = [_S.mode, "sdpa"]
    else:
        order = choose.choose(_S.backends, call, exact=_S.exact, safe=_S.safe,
                              approximate=_S.approximate).names
        settled = _S.settled.get(_settle_key(rkey))
        if settled:
            order = [n for n in settled if n in order] + [n for n in order if n not in settled]
    out = [n for n in order if (n, rkey) not in _S.failed and n not in _S.unloadable]
    if "sdpa" not in out:
        out.append("sdpa")
    return out


def _call_text(call: Call) -> str:
    return f"head dim {call.head_dim} {call.dtype}, {'+'.join(call.variants())}"


def _adapter(name: str) -> Adapter:
    """The loaded adapter; a backend that fails to load (a package whose import raises, a
    missing CUDA library) is left out of every route from then on, said once."""
    a = _S.adapters.get(name)
    if a is None:
        a = adapter(name)
        try:
            a.load()
        except Exception as e:
            with _LOCK:
                _S.unloadable[name] = f"{type(e).__name__}: {str(e)[:200]}"
                _S.routes = {}
                _ROUTES.clear()
                _S.label = _describe()
            _say_once(f"{name} cannot be loaded ({_S.unloadable[name]}); its calls go to "
                      "the next backend")
            raise
        _S.adapters[name] = a
    return a


def _settle(route: list[str], call: Call, rkey: tuple[Any, ...],
            args: tuple[Any, ...]) -> list[str]:
    """Reorder the leading close candidates by timing them here, on this input: the lock's
    numbers come from other processes, whose run-to-run spread (5% on an H100) can exceed
    the gap between the two fastest backends. Each is timed in rounds of back-to-back calls,
    the order rotating (CUDA events on a GPU), as a model calls it; the result is kept in the
    per-machine cache, so the next start does not time again."""
    key, gen = _settle_key(rkey), _GEN[0]  # the settings it is timed under
    choice = choose.choose(_S.backends, call, exact=_S.exact, safe=_S.safe,
                           approximate=_S.approximate)
    close = [n for n in choose.close_call(choice.order, settle_margin()) if n in route]
    if len(close) < 2 or os.environ.get("COMFY_ENV_ATTN_SETTLE") == "0":
        return route
    q = args[0]
    cuda = q.is_cuda
    fns: dict[str, Adapter] = {}
    for name in close:
        try:
            fns[name] = _adapter(name)
            for _ in range(2):
                fns[name](*args)  # warm-up (a JIT backend compiles here)
        except Exception as e:
            fns.pop(name, None)
            if name not in _S.unloadable:
                _S.failed[(name, rkey)] = f"{type(e).__name__}: {str(e)[:120]}"
                _say_once(f"{name} failed while timing it for {_call_text(call)} "
                          f"({type(e).__name__}: {str(e)[:200]})")
    left = [n for n in route if (n, rkey) not in _S.failed and n not in _S.unloadable]
    if len(fns) < 2:  # nothing left to time against each other
        return left if "sdpa" in left else [*left, "sdpa"]
    samples: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    rounds, calls = (6, 20) if cuda else (3, 3)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = fns[name]
            if cuda:
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record()
                for _ in range(calls):
                    fn(*args)
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn(*args)
                samples[name].append(time.perf_counter() - t0)
    med = {n: sorted(ts)[len(ts) // 2] for n, ts in samples.items() if ts}
    best = sorted(med, key=lambda n: med[n])
    order = best + [n for n in left if n not in best]
    with _LOCK:  # settings changed meanwhile (another thread): this order is not theirs
        if gen != _GEN[0]:
            return order
        _S.settled[key] = best
    _write_settled()
    return order


# (shape, dtype, k shape, v shape, mask dtype, causal, no scale, device) -> (backend, adapter):
# the hot path is one tuple, one dict lookup and the adapter call (None: plain SDPA inline).
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any, bool, float | None],
                  torch.Tensor]  # an Adapter, a Monitored one, or _other_sdpa
_ROUTES: dict[tuple[Any, ...], tuple[str, Kernel | None]] = {}
_plain_sdpa = sdpa  # adapters.sdpa: cuDNN first on CUDA, as ComfyUI runs it


def _route_key(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """The hot path's key -> the kind of call the choice is made for."""
    shape, dtype, kshape, _vshape, mask_dtype, causal, no_scale, device = key
    return (shape[-1], str(dtype), shape[-2], kshape[-2], shape[1], kshape[1],
            None if mask_dtype is None else str(mask_dtype), causal, not no_scale,
            device.type, device.index)


def _wants_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Gradients will flow back through the call: verification proves no backward pass."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _sdpa_only(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> str | None:
    """Why a dense call goes to PyTorch SDPA whatever the lock proves (None: the lock
    decides): gradients, tensors whose heads cannot be read from [B, H, N, D], values of
    another head size than the queries' (every check has one), or a mask neither bool nor
    floating (SDPA refuses it, where a backend might read 0/1 as a bias)."""
    if _wants_grad(q, k, v):
        return "it wants gradients, and verification proves no backward pass"
    if q.ndim != 4 or k.ndim != 4:
        return "its tensors are not [B, H, N, D]"
    if v.shape[-1] != q.shape[-1]:
        return f"its values' head size {v.shape[-1]} is not its queries' ({q.shape[-1]})"
    if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        return f"its mask is {dtype_name(mask)}, neither bool nor floating"
    return None


def _other_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, causal: bool,
                scale: float | None) -> torch.Tensor:
    """SDPA as PyTorch takes it, for inputs that are not [B, H, N, D] (no heads to read)."""
    return sdpa(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _sdpa_for(q: torch.Tensor, k: torch.Tensor) -> Kernel:
    """The SDPA that serves a call _sdpa_only sends there: the adapter (grouped heads,
    a mask with causal) where heads can be read, else PyTorch's own as it takes them."""
    return _SDPA if q.ndim == k.ndim == 4 else _other_sdpa


def _entry(key: tuple[Any, ...], args: tuple[Any, ...], settle: bool = True
           ) -> tuple[str, Kernel | None]:
    _ensure()
    gen = _GEN[0]
    q, k, v, mask, causal, scale = args
    if _sdpa_only(q, k, v, mask):
        return "sdpa", _sdpa_for(q, k)  # never kept: such calls are rare and need no choice
    call = describe(q, k, mask, causal, scale, _capability(q.device))
    rkey = _route_key(key)
    route = _S.routes.get(rkey) or _route(call, rkey)
    if settle and _S.mode == "auto" and _S.table is not None and \
            _settle_key(rkey) not in _S.settled:
        route = _settle(route, call, rkey, args)
    plain = mask is None and not causal and scale is None and k.shape[1] == q.shape[1]
    while True:
        name = route[0]
        kernel: Kernel | None = None
        if name == "sdpa" and plain:
            break
        try:
            base = _adapter(name)
        except Exception:  # said once and left out of every route (_adapter)
            route = [n for n in route if n != name]
            continue
        kernel = Monitored(name, base, rkey) if _monitored(name) else base
        break
    with _LOCK:  # set_backend moves the generation under the same lock
        if gen == _GEN[0]:
            _S.routes[rkey] = route
            if len(_ROUTES) > 4096:
                _ROUTES.clear()
            _ROUTES[key] = (name, kernel)
    return name, kernel


def dispatch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                       scale: float | None = None) -> torch.Tensor:
    """Attention over [B, H, N, D] tensors (k and v may have fewer heads, or another
    length) by the fastest backend proven for this kind of call. A mask is bool (True
    attends) or additive, broadcastable to [B, H, N, M]; it is never dropped, and with
    is_causal the triangle (aligned top-left, as SDPA aligns it) is folded into it. The
    output has q's dtype. Where gradients are wanted, PyTorch SDPA serves: verification
    proves no backend's backward pass."""
    if is_causal and attn_mask is not None:
        attn_mask, is_causal = merge_causal(attn_mask, q.shape[-2], k.shape[-2]), False
    if torch.is_grad_enabled() and _wants_grad(q, k, v):  # no_grad (ComfyUI): one C call
        return _sdpa_for(q, k)(q, k, v, attn_mask, is_causal, scale)
    key = (q.shape, q.dtype, k.shape, v.shape, None if attn_mask is None else attn_mask.dtype,
           is_causal, scale is None, q.device)
    try:
        name, kernel = _ROUTES[key]
    except KeyError:
        name, kernel = _entry(key, (q, k, v, attn_mask, is_causal, scale))
    if kernel is None:
        return _plain_sdpa(q, k, v)
    try:
        out = kernel(q, k, v, attn_mask, is_causal, scale)
    except Exception as e:
        return _after_failure(name, key, e, (q, k, v, attn_mask, is_causal, scale))
    return out if out.dtype == q.dtype else out.to(q.dtype)


def _after_failure(name: str, key: tuple[Any, ...], err: Exception,
                   args: tuple[Any, ...]) -> torch.Tensor:
    """A backend fault is remembered for this kind of call (one log line) and the next
    backend serves it; a fault of the caller's input (SDPA rejects it too) is raised and
    demotes nothing."""
    if name == "sdpa":
        raise err
    try:
        out = _SDPA(*args)
    except Exception:
        raise err from None  # the input itself is at fault: the backend keeps its place
    rkey = _route_key(key)
    with _LOCK:
        _S.failed[(name, rkey)] = f"{type(err).__name__}: {str(err)[:120]}"
        _S.routes.pop(rkey, None)
        _ROUTES.pop(key, None)
        _S.label = _describe()
    nxt = _entry(key, args, settle=False)[0]
    log.warning("comfy-env-attn: %s failed for head dim %s, %s, %s tokens (%s: %s); using %s "
                "for such calls from now on", name, rkey[0], rkey[1], rkey[2],
                type(err).__name__, str(err)[:200], nxt)
    return out if nxt == "sdpa" else dispatch_attention(*args)


_SDPA = adapter("sdpa")


# -- the quality monitor ------------------------------------------------------------------

MONITOR_EVERY_ENV = "COMFY_ENV_ATTN_MONITOR_EVERY"  # calls between checks (default 50)
MONITOR_ENV = "COMFY_ENV_ATTN_MONITOR"  # "quantized": watch quantized backends too
MONITOR_ROWS = 8


def _monitored(name: str) -> bool:
    rec = _S.backends.get(name)
    b = BACKENDS.get(name)
    if b is None:
        return False
    if b.approximate or (rec is not None and rec.approximate):
        return True
    return b.quantized and os.environ.get(MONITOR_ENV, "").strip().lower() == "quantized"


def _monitor_every() -> int:
    try:
        return max(1, int(os.environ.get(MONITOR_EVERY_ENV, "50")))
    except ValueError:
        _warn_once(MONITOR_EVERY_ENV, "comfy-env-attn: %s=%r is not a whole number; using 50",
                   MONITOR_EVERY_ENV, os.environ.get(MONITOR_EVERY_ENV))
        return 50


class Monitored:
    """An approximate (or, when asked, quantized) backend whose answers are sampled: every
    N calls a few query rows are compared with exact softmax attention and the error is
    logged; past the backend's own accuracy limit the kind of call goes to the next backend,
    said once."""

    def __init__(self, name: str, inner: Adapter, rkey: tuple[Any, ...]) -> None:
        self.name, self.inner, self.rkey = name, inner, rkey
        self.calls = 0
        self.every = _monitor_every()
        limits = BACKENDS[name].thresholds()
        self.min_cosine = min(v["min_cosine"] for v in limits.values())
        self.max_abs = max(v["max_abs"] for v in limits.values())
        self.last: float | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any,
                 causal: bool, scale: float | None) -> torch.Tensor:
        out = self.inner(q, k, v, mask, causal, scale)
        self.calls += 1
        if self.calls % self.every == 1 or self.every == 1:
            self._check(q, k, v, mask, causal, scale, out)
        return out

    def _check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any,
               causal: bool, scale: float | None, out: torch.Tensor) -> None:
        n = q.shape[-2]
        rows = torch.linspace(0, n - 1, min(MONITOR_ROWS, n), device=q.device).long()
        m = None if mask is None else mask.expand(*q.shape[:-2], n, k.shape[-2])[..., rows, :]
        if causal:  # the sampled rows' part of the triangle (no mask comes with causal)
            m = torch.arange(k.shape[-2], device=q.device)[None, :] <= rows[:, None]
        exact = _SDPA(q[..., rows, :].float(), k.float(), v.float(),
                      None if m is None else (m if m.dtype == torch.bool else m.float()),
                      False, scale)
        got = out[..., rows, :].float()
        cos = float(F.cosine_similarity(got.flatten(), exact.flatten(), dim=0))
        err = float((got - exact).abs().max())
        self.last = cos
        log.info("comfy-env-attn: %s quality check: cosine %.5f, max abs error %.3g against "
                 "exact attention (head dim %s, %s tokens)", self.name, cos, err, self.rkey[0],
                 self.rkey[2])
        if not (cos >= self.min_cosine and err <= self.max_abs):
            why = (f"quality check: cosine {cos:.4f} (limit {self.min_cosine}), max abs error "
                   f"{err:.3g} (limit {self.max_abs})")
            with _LOCK:
                _S.failed[(self.name, self.rkey)] = why
                _S.routes.pop(self.rkey, None)
                for key in [k_ for k_ in _ROUTES if _route_key(k_) == self.rkey]:
                    _ROUTES.pop(key, None)
                _S.label = _describe()
            _say_once(f"{self.name} failed its {why} for head dim {self.rkey[0]}, "
                      f"{self.rkey[2]} tokens; such calls go to the next backend from now on")


# -- varlen -------------------------------------------------------------------------------

def _check_cu(cu: torch.Tensor, total: int, max_len: int, what: str) -> list[int]:
    """The sequences' lengths (read on the host once), or ValueError saying what is wrong."""
    if cu.dtype not in (torch.int32, torch.int64) or cu.ndim != 1 or cu.numel() < 2:
        raise ValueError(f"{what} must be a 1-D int32/int64 tensor of at least 2 offsets, "
                         f"got {cu.dtype} of shape {tuple(cu.shape)}")
    offs = cu.tolist()
    lens = [b - a for a, b in itertools.pairwise(offs)]
    if offs[0] != 0 or min(lens) < 0 or offs[-1] != total:
        raise ValueError(f"{what} must start at 0, never decrease and end at the packed "
                         f"length {total}; got {offs[:4]}{'...' if len(offs) > 4 else ''} "
                         f"ending at {offs[-1]}")
    if max(lens) > max_len:
        raise ValueError(f"max_seqlen for {what} is {max_len}, but a sequence is "
                         f"{max(lens)} long")
    return lens


def dispatch_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              cu_seqlens_q: torch.Tensor, cu_seqlens_kv: torch.Tensor,
                              max_seqlen_q: int, max_seqlen_kv: int, *,
                              is_causal: bool = False, scale: float | None = None
                              ) -> torch.Tensor:
    """Attention over packed sequences, [T, H, D] with cumulative lengths; same dtype out.
    A backend serves it only where verification proved its packed kernel with each feature
    the call uses (causal, scale, other key lengths, fewer key/value heads)."""
    lens_q = _check_cu(cu_seqlens_q, q.shape[0], max_seqlen_q, "cu_seqlens_q")
    lens_k = _check_cu(cu_seqlens_kv, k.shape[0], max_seqlen_kv, "cu_seqlens_kv")
    if len(lens_q) != len(lens_k):
        raise ValueError("cu_seqlens_q and cu_seqlens_kv must describe as many sequences")
    _ensure()
    gen = _GEN[0]
    # as verification passed them, and as the packed kernels take them: int32 on q's device
    # (int64 or host offsets are checked above, and would fail there or come in unproven)
    cu_q, cu_k = (cu if cu.dtype == torch.int32 and cu.device == q.device
                  else cu.to(q.device, torch.int32) for cu in (cu_seqlens_q, cu_seqlens_kv))
    args = (q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_kv, is_causal, scale)
    if 0 in lens_q or 0 in lens_k or _wants_grad(q, k, v) or v.shape[-1] != q.shape[-1]:
        return _SDPA.varlen(*args)  # an empty sequence, gradients, values of another head
        #                             size: no proof covers them
    call = Call(dtype=dtype_name(q), head_dim=q.shape[-1], q_len=max_seqlen_q,
                kv_len=max_seqlen_kv, q_heads=q.shape[1], kv_heads=k.shape[1],
                causal=is_causal, scale=scale is not None, device=q.device.type,
                capability=_capability(q.device), varlen=True,
                lengths_differ=lens_q != lens_k)
    rkey = ("varlen", q.shape[-1], q.dtype, max_seqlen_q, max_seqlen_kv, q.shape[1],
            k.shape[1], lens_q != lens_k, is_causal, scale is not None, q.device)
    route = _S.routes.get(rkey) or _route(call, rkey)
    with _LOCK:
        if gen == _GEN[0]:
            _S.routes[rkey] = route
    answer = None  # SDPA's, where a backend failed and SDPA was asked whose fault it was
    for name in route:
        if name == "sdpa":
            break
        try:
            out = _adapter(name).varlen(*args)
            return out if out.dtype == q.dtype else out.to(q.dtype)
        except Exception as e:
            if name not in _S.unloadable and answer is None:  # SDPA is asked once
                try:  # the input itself at fault (SDPA rejects it too): nothing is demoted
                    answer = _SDPA.varlen(*args)
                except Exception:
                    raise e from None
            with _LOCK:
                if name not in _S.unloadable:  # that one was said by _adapter
                    _S.failed[(name, rkey)] = f"{type(e).__name__}: {str(e)[:120]}"
                    log.warning("comfy-env-attn: %s varlen failed (%s: %s); trying the next "
                                "backend", name, type(e).__name__, str(e)[:200])
                _S.routes.pop(rkey, None)
                _S.label = _describe()
    return answer if answer is not None else _SDPA.varlen(*args)


def passed_over(q: torch.Tensor, k: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False, scale: float | None = None, *,
                v: torch.Tensor | None = None
                ) -> tuple[list[str], list[tuple[str, tuple[str, ...]]]]:
    """(the backends dispatch_attention tries for such a call, best first, ending with
    SDPA; every other backend the lock verified, or set_backend named, with each reason it
    is left out): what the dispatcher decides, explained, as it stands now (a backend that
    failed here, or cannot be loaded, included). `v`: the values, where only they may want
    gradients (without it, q's and k's say)."""
    _ensure()
    if is_causal and attn_mask is not None:
        attn_mask, is_causal = merge_causal(attn_mask, q.shape[-2], k.shape[-2]), False
    names = [n for n in _S.backends if n in BACKENDS]
    if _S.mode not in ("auto", *names):
        names.append(_S.mode)
    only = _sdpa_only(q, k, k if v is None else v, attn_mask)
    call = rkey = None
    if only:
        order = ["sdpa"]
    else:
        call = describe(q, k, attn_mask, is_causal, scale, _capability(q.device))
        rkey = _route_key((q.shape, q.dtype, k.shape, None,
                           None if attn_mask is None else attn_mask.dtype, is_causal,
                           scale is None, q.device))
        order = _S.routes.get(rkey) or _route(call, rkey)
    out = []
    for name in names:
        if name in order or name == "sdpa":
            continue
        rec = _S.backends.get(name)
        why = [only] if only else []
        if name in _S.unloadable:
            why.append(f"cannot be loaded ({_S.unloadable[name]})")
        if rkey is not None and (name, rkey) in _S.failed:
            why.append(f"failed on such a call here ({_S.failed[(name, rkey)]})")
        if _S.mode not in ("auto", name):
            why.append(f"set_backend({_S.mode!r}) chose another backend")
        if rec is None:
            why.append("it is not verified on this machine" if _S.table is not None
                       else "no fresh lock")
        elif call is not None:  # the lock's proofs, for a call they can speak of
            elsewhere = _elsewhere(call)
            why += [elsewhere] if elsewhere else []
            why += choose.reasons(name, rec, call, exact=_S.exact, safe=_S.safe,
                                  approximate=_S.approximate or _S.mode == name)
        out.append((name, tuple(why) or ("ranked after the others",)))
    return order, out


def _reset_for_tests() -> None:
    global _S
    _S = _State()
    _ROUTES.clear()
    _WARNED.clear()
    plugins._loaded = False

