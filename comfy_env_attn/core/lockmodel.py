"""The lock's [tool.comfy-env-attn] table as typed, frozen data, and the one freshness rule.

Standard library only: the runtime dispatcher (inside every ComfyUI start) and the command
line both read the lock through this module, and both judge freshness with
`stale_reasons(locked, live)`; only how they learn the live facts differs (the dispatcher in
its own process, the command line by running runtime/live.py in the target interpreter).

Like packaging.pylock: `from_dict` validates every value and names the path of a bad one
(`backends.sage.checks[3].head_dim`); `to_dict` is its inverse.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

from comfy_env_attn.core.backends import SHIPPED_PLUGINS, primary
from comfy_env_attn.core.errors import AttnError
from comfy_env_attn.core.paths import parse_toml, readable_file
from comfy_env_attn.core.progress import tool_command
from comfy_env_attn.core.records import dataclass

LOCK_NAME = "pylock.comfy-env-attn.toml"
SCHEMA = 2
LOCK_ENV = "COMFY_ENV_ATTN_LOCK"


class LockModelError(AttnError):
    """A lock whose tool table is not what this version writes."""


def lock_path(prefix: str | os.PathLike[str]) -> Path:
    """The lock of the environment at `prefix` (COMFY_ENV_ATTN_LOCK overrides)."""
    env = os.environ.get(LOCK_ENV)
    return Path(env) if env else Path(prefix) / LOCK_NAME


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file as a dict (core.paths.parse_toml). Raises OSError, UnicodeDecodeError,
    ValueError (not a regular file: core.paths.readable_file; or the TOML error)."""
    readable_file(Path(path))
    return parse_toml(Path(path).read_bytes().decode("utf-8"))


# -- validation helpers -------------------------------------------------------------------

T = TypeVar("T")


def _get(d: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], where: str,
         default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise LockModelError(f"{where}.{key}: missing")
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and kind is not bool and not (
            isinstance(kind, tuple) and bool in kind):
        raise LockModelError(f"{where}.{key}: expected {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise LockModelError(f"{where}.{key}: expected {_kind_name(kind)}, got {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _table(d: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = _get(d, key, dict, where, {})
    return dict(value)


def _tables(d: Mapping[str, Any], key: str, where: str) -> list[tuple[str, Mapping[str, Any]]]:
    items = _get(d, key, list, where, [])
    out: list[tuple[str, Mapping[str, Any]]] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise LockModelError(f"{where}.{key}[{i}]: expected a table, got {item!r}")
        out.append((f"{where}.{key}[{i}]", item))
    return out


def _positive(value: float | None, where: str) -> float | None:
    if value is not None and not value > 0:
        raise LockModelError(f"{where}: expected a positive number, got {value!r}")
    return value


def _strs(d: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    items = _get(d, key, list, where, [])
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise LockModelError(f"{where}.{key}[{i}]: expected str, got {x!r}")
    return tuple(items)


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """TOML has no null: leave None out."""
    return {k: v for k, v in d.items() if v is not None}


# -- the model ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LockedDist:
    """One backend's distribution as verification saw it."""

    dist: str
    version: str
    # its RECORD and each listed file's path, size and mtime (core.fingerprint.files_digest);
    # "" where it has no list of its files (an egg, a legacy egg-info file)
    files_sha256: str

    def same_files(self, digest: str | None) -> bool:
        """Whether files_digest's answer now (None: no RECORD) is what was verified."""
        return (digest or "") == self.files_sha256

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> LockedDist:
        return cls(_get(d, "dist", str, where), _get(d, "version", str, where),
                   _get(d, "files_sha256", str, where))

    def to_dict(self) -> dict[str, Any]:
        return {"dist": self.dist, "version": self.version, "files_sha256": self.files_sha256}


@dataclass(frozen=True)
class Fingerprint:
    """What verification saw: the facts that decide whether its results still hold."""

    torch: str
    torch_cuda: str | None
    device: str  # "cuda" or "cpu": where verification ran
    capability: str | None = None  # "9.0" when device is cuda
    device_name: str | None = None
    python: str | None = None
    adapters_sha256: str | None = None  # the adapter code that was verified
    backends: Mapping[str, LockedDist] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "fingerprint") -> Fingerprint:
        backends = {}
        for name, b in _table(d, "backends", where).items():
            if not isinstance(b, dict):
                raise LockModelError(f"{where}.backends.{name}: expected a table")
            backends[name] = LockedDist.from_dict(b, f"{where}.backends.{name}")
        device = _get(d, "device", str, where)
        if device not in ("cuda", "cpu", "unverified"):
            raise LockModelError(f"{where}.device: expected cuda or cpu, got {device!r}")
        return cls(torch=_get(d, "torch", str, where),
                   torch_cuda=_get(d, "torch_cuda", str, where, None),
                   device=device, capability=_get(d, "capability", str, where, None),
                   device_name=_get(d, "device_name", str, where, None),
                   python=_get(d, "python", str, where, None),
                   adapters_sha256=_get(d, "adapters_sha256", str, where, None),
                   backends=backends)

    def to_dict(self) -> dict[str, Any]:
        return _clean({"torch": self.torch, "torch_cuda": self.torch_cuda,
                       "device": self.device, "capability": self.capability,
                       "device_name": self.device_name, "python": self.python,
                       "adapters_sha256": self.adapters_sha256,
                       "backends": {n: b.to_dict() for n, b in self.backends.items()}})


@dataclass(frozen=True)
class Check:
    """One accuracy check: a call variant at one head dim and dtype, against float32 SDPA."""

    variant: str
    head_dim: int
    dtype: str
    passed: bool
    max_abs: float | None = None
    cosine: float | None = None
    error: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> Check:
        return cls(variant=_get(d, "variant", str, where), head_dim=_get(d, "head_dim", int, where),
                   dtype=_get(d, "dtype", str, where), passed=_get(d, "passed", bool, where),
                   max_abs=_get(d, "max_abs", float, where, None),
                   cosine=_get(d, "cosine", float, where, None),
                   error=_get(d, "error", str, where, None))

    def to_dict(self) -> dict[str, Any]:
        return _clean({"variant": self.variant, "head_dim": self.head_dim,
                       "dtype": self.dtype, "passed": self.passed, "max_abs": self.max_abs,
                       "cosine": self.cosine, "error": self.error})


@dataclass(frozen=True)
class BenchRow:
    """Time per call at one shape [B, H, N, D] (key/value length kv_len)."""

    shape: tuple[int, int, int, int]
    dtype: str
    kv_len: int | None = None  # None: self-attention (= N)
    ms: float | None = None
    tflops: float | None = None
    first_call_ms: float | None = None
    error: str | None = None

    @property
    def kv(self) -> int:
        return self.kv_len if self.kv_len is not None else self.shape[2]

    @property
    def timed(self) -> bool:
        return self.tflops is not None and self.ms is not None

    def label(self) -> str:
        s = "x".join(str(x) for x in self.shape)
        return s if self.kv_len is None else f"{s} kv{self.kv_len}"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> BenchRow:
        shape = _get(d, "shape", list, where)
        if len(shape) != 4 or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0
                                      for x in shape):
            raise LockModelError(f"{where}.shape: expected 4 positive integers, got {shape!r}")
        kv = _get(d, "kv_len", int, where, None)
        if kv is not None and kv <= 0:
            raise LockModelError(f"{where}.kv_len: expected a positive integer, got {kv!r}")
        return cls(shape=(shape[0], shape[1], shape[2], shape[3]),
                   dtype=_get(d, "dtype", str, where), kv_len=kv,
                   ms=_positive(_get(d, "ms", float, where, None), f"{where}.ms"),
                   tflops=_positive(_get(d, "tflops", float, where, None), f"{where}.tflops"),
                   first_call_ms=_get(d, "first_call_ms", float, where, None),
                   error=_get(d, "error", str, where, None))

    def to_dict(self) -> dict[str, Any]:
        return _clean({"shape": list(self.shape), "dtype": self.dtype, "kv_len": self.kv_len,
                       "ms": self.ms, "tflops": self.tflops,
                       "first_call_ms": self.first_call_ms, "error": self.error})


STATUSES = ("verified", "failed", "unverified")


def not_proven(checks: Iterable[tuple[str, int, str, bool]]) -> str:
    """The call variants verification did not pass, each with where ('causal (40 bfloat16,
    40 float16, 64 bfloat16, 64 float16, ...)'), from (variant, head dim, dtype, passed):
    what the install's summary line and the lock's table say of a backend, whose calls of
    these go to PyTorch SDPA. Empty when every check passed."""
    failed: dict[str, list[str]] = {}
    for variant, head_dim, dtype, passed in checks:
        if not passed:
            failed.setdefault(variant, []).append(f"{head_dim} {dtype}")
    return "; ".join(f"{v} ({', '.join(where[:4])}{', ...' if len(where) > 4 else ''})"
                     for v, where in failed.items())


@dataclass(frozen=True)
class BackendRecord:
    """What verification showed for one backend."""

    name: str
    status: str
    quantized: bool = False
    approximate: bool = False
    shipped: bool = False  # all its code ships with comfy-env-attn (adapters_sha256 covers it)
    title: str | None = None
    version: str | None = None
    error: str | None = None
    stage: str | None = None
    import_s: float | None = None
    speed_vs_sdpa: float | None = None
    checks: tuple[Check, ...] = ()
    bench: tuple[BenchRow, ...] = ()

    @property
    def verified(self) -> bool:
        return self.status == "verified"

    def proven(self, variant: str, head_dim: int, dtype: str) -> bool:
        """Whether verification passed this variant at this head dim and dtype."""
        return any(c.passed for c in self.checks
                   if c.variant == variant and c.head_dim == head_dim and c.dtype == dtype)

    def unproven(self, variants: tuple[str, ...], head_dim: int, dtype: str) -> list[str]:
        """The variants of a call that verification did not pass, each with what it saw."""
        out = []
        for v in variants:
            if self.proven(v, head_dim, dtype):
                continue
            failed = [c for c in self.checks if c.variant == v and c.head_dim == head_dim
                      and c.dtype == dtype]
            out.append(f"{v} at head dim {head_dim} {dtype} " +
                       (f"failed verification ({failed[0].error})" if failed
                        else "was not verified"))
        return out

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any], where: str) -> BackendRecord:
        status = _get(d, "status", str, where)
        if status not in STATUSES:
            raise LockModelError(f"{where}.status: expected one of {', '.join(STATUSES)}, "
                                 f"got {status!r}")
        return cls(name=name, status=status, quantized=_get(d, "quantized", bool, where, False),
                   approximate=_get(d, "approximate", bool, where, False),
                   shipped=_get(d, "shipped", bool, where, False),
                   title=_get(d, "title", str, where, None),
                   version=_get(d, "version", str, where, None),
                   error=_get(d, "error", str, where, None),
                   stage=_get(d, "stage", str, where, None),
                   import_s=_get(d, "import_s", float, where, None),
                   speed_vs_sdpa=_get(d, "speed_vs_sdpa", float, where, None),
                   checks=tuple(Check.from_dict(c, w) for w, c in _tables(d, "checks", where)),
                   bench=tuple(BenchRow.from_dict(b, w) for w, b in _tables(d, "bench", where)))

    def to_dict(self) -> dict[str, Any]:
        return _clean({"status": self.status, "quantized": self.quantized,
                       "approximate": self.approximate, "shipped": self.shipped,
                       "title": self.title,
                       "version": self.version, "error": self.error, "stage": self.stage,
                       "import_s": self.import_s, "speed_vs_sdpa": self.speed_vs_sdpa,
                       "checks": [c.to_dict() for c in self.checks],
                       "bench": [b.to_dict() for b in self.bench]})


@dataclass(frozen=True)
class ToolTable:
    """[tool.comfy-env-attn]: the fingerprint, each backend's record, the auto order."""

    fingerprint: Fingerprint
    backends: Mapping[str, BackendRecord]
    auto: tuple[str, ...] = ()
    exact: tuple[str, ...] = ()
    written: str | None = None
    python: str | None = None
    schema: int = SCHEMA

    def verified(self) -> dict[str, BackendRecord]:
        """The verified backends that the fingerprint also covers: a backend verified but
        missing from the fingerprint cannot be checked for changes, so it is not trusted.
        SDPA is torch's, a shipped plugin's code is covered by adapters_sha256 (only the
        ones that really ship: a plugin of outside code that says so is not trusted), and a
        variant's distribution by its primary's entry (one per distribution)."""
        fp = self.fingerprint.backends
        return {n: b for n, b in self.backends.items()
                if b.verified and (n == "sdpa" or n in fp or primary(n) in fp
                                   or (b.shipped and n in SHIPPED_PLUGINS))}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ToolTable:
        where = "tool.comfy-env-attn"
        if not isinstance(d, Mapping):
            raise LockModelError(f"{where}: expected a table")
        schema = d.get("schema")
        if schema != SCHEMA:
            raise LockModelError(f"{where}.schema is {schema!r}: this comfy-env-attn reads "
                                 f"schema {SCHEMA} (the lock was written by another version; "
                                 f"run: {tool_command()} verify)")
        backends = {}
        for name, b in _table(d, "backends", where).items():
            if not isinstance(b, dict):
                raise LockModelError(f"{where}.backends.{name}: expected a table")
            backends[name] = BackendRecord.from_dict(name, b, f"{where}.backends.{name}")
        fp = d.get("fingerprint")
        if not isinstance(fp, dict):
            raise LockModelError(f"{where}.fingerprint: missing")
        return cls(fingerprint=Fingerprint.from_dict(fp, f"{where}.fingerprint"),
                   backends=backends, auto=_strs(d, "auto", where),
                   exact=_strs(d, "exact", where),
                   written=_get(d, "written", str, where, None),
                   python=_get(d, "python", str, where, None), schema=schema)

    def to_dict(self) -> dict[str, Any]:
        return _clean({"schema": self.schema, "written": self.written, "python": self.python,
                       "fingerprint": self.fingerprint.to_dict(), "auto": list(self.auto),
                       "exact": list(self.exact),
                       "backends": {n: b.to_dict() for n, b in self.backends.items()}})


def tool_table(doc: Mapping[str, Any]) -> ToolTable:
    """The typed tool table of a whole lock document."""
    tool = doc.get("tool") if isinstance(doc, Mapping) else None
    if not isinstance(tool, Mapping) or "comfy-env-attn" not in tool:
        raise LockModelError("no [tool.comfy-env-attn] table")
    return ToolTable.from_dict(tool["comfy-env-attn"])


# -- freshness ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Live:
    """The facts freshness compares, as the process that will run attention sees them."""

    torch: str | None
    torch_cuda: str | None
    device: str  # "cuda" when torch sees a GPU, else "cpu"
    capability: str | None
    adapters_sha256: str | None
    # normalized dist name -> (version, files digest), None when not installed
    dists: Mapping[str, tuple[str, str | None] | None] = field(default_factory=dict)
    plugins: Mapping[str, str] = field(default_factory=dict)  # plugin backend -> its dist

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Live:
        dists = {}
        for name, v in dict(d.get("dists") or {}).items():
            dists[name] = None if v is None else (str(v[0]), None if v[1] is None else str(v[1]))
        return cls(torch=d.get("torch"), torch_cuda=d.get("torch_cuda"),
                   device=str(d.get("device")), capability=d.get("capability"),
                   adapters_sha256=d.get("adapters_sha256"), dists=dists,
                   plugins={str(n): str(v) for n, v in dict(d.get("plugins") or {}).items()})

    def to_dict(self) -> dict[str, Any]:
        return {"torch": self.torch, "torch_cuda": self.torch_cuda, "device": self.device,
                "capability": self.capability, "adapters_sha256": self.adapters_sha256,
                "dists": {n: None if v is None else list(v) for n, v in self.dists.items()},
                "plugins": dict(self.plugins)}


def stale_reasons(locked: ToolTable, live: Live) -> list[str]:
    """Why the lock does not describe the live process (empty when it does). The dispatcher
    and the command line both decide with this."""
    fp = locked.fingerprint
    out = []
    if fp.device == "unverified" and any(n != "sdpa" for n in locked.backends):
        # a lock of SDPA alone (nothing else fitted, or all was uninstalled) has nothing to
        # prove: the dispatcher runs SDPA either way
        out.append("nothing was verified (install --no-verify)")
    if fp.torch != live.torch:
        out.append(f"torch is {live.torch or 'not installed'}, the lock verified {fp.torch}")
    elif fp.torch_cuda != live.torch_cuda:
        out.append(f"torch's CUDA is {live.torch_cuda}, the lock verified {fp.torch_cuda}")
    if fp.device in ("cuda", "cpu") and fp.device != live.device:
        out.append(f"the lock was verified on the {fp.device.upper() if fp.device == 'cpu' else 'GPU'}"
                   f", attention runs on the {'GPU' if live.device == 'cuda' else 'CPU'}")
    elif fp.device == "cuda" and fp.capability != live.capability:
        out.append(f"the lock verified GPU sm {fp.capability}, this GPU is sm {live.capability}")
    if fp.adapters_sha256 != live.adapters_sha256:
        out.append("the installed comfy-env-attn's adapters differ from the ones verified")
    for d in fp.backends.values():
        have = live.dists.get(d.dist)
        if have is None:
            out.append(f"{d.dist} {d.version} is no longer installed")
        elif have[0] != d.version:
            out.append(f"{d.dist} is {have[0]}, the lock verified {d.version}")
        elif not d.same_files(have[1]):
            out.append(f"{d.dist} {have[0]}: its files changed since verification")
    locked_dists = {d.dist for d in fp.backends.values()}
    for dist, have in live.dists.items():
        if have is not None and dist not in locked_dists:
            out.append(f"{dist} {have[0]} is installed but not in the lock")
    return out
