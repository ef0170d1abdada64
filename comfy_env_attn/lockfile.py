"""The lock: a PEP 751 pylock.comfy-env-attn.toml in the target's prefix.

[[packages]] are the installed attention wheels (name, version, url, sha256), so any PEP 751
installer can reproduce them. [tool.comfy-env-attn] holds the fingerprint (what verification
saw in the target), each backend's verification, and the order `auto` uses. Written
atomically and validated with packaging.pylock on write and on read.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_env_attn.candidates.sources import project_of
from comfy_env_attn.candidates.wheelhouse import record_beside
from comfy_env_attn.core.backends import BACKENDS, BY_DIST, normalize_dist, primary
from comfy_env_attn.core.errors import AttnError
from comfy_env_attn.core.lockmodel import (
    LOCK_NAME,
    BackendRecord,
    BenchRow,
    Check,
    Fingerprint,
    Live,
    LockedDist,
    LockModelError,
    ToolTable,
    lock_path,
    stale_reasons,
    tool_table,
)
from comfy_env_attn.core.paths import replace_file
from comfy_env_attn.core.progress import log, tool_command
from comfy_env_attn.core.records import dataclass
from comfy_env_attn.facts.installed import Installed, installed_backends

if TYPE_CHECKING:
    from collections.abc import Mapping

    from comfy_env_attn.facts.probe import Target
    from comfy_env_attn.install.edges import Fetched
    from comfy_env_attn.verify.run import Result

__all__ = ["LOCK_NAME", "lock_path"]


class LockError(AttnError):
    pass


@dataclass(frozen=True)
class LockedWheel:
    """One wheel a lock records (a [[packages]] entry)."""
    backend: str
    name: str  # distribution name
    version: str
    filename: str
    url: str
    sha256: str
    # built on this machine (install --build): source, its hash, SM archs ([packages.tool])
    built: dict[str, Any] | None = None
    # a requirement install put in, not a backend: the backends whose wheels needed it
    # ([packages.tool.comfy-env-attn] brought-by), so that uninstall can take it out again
    brought_by: tuple[str, ...] = ()


def speed_score(bench: tuple[BenchRow, ...], baseline: dict[str, float]) -> float | None:
    """Geometric mean of throughput relative to SDPA over the shapes both measured."""
    ratios = [b.tflops / baseline[b.label()] for b in bench
              if b.tflops is not None and baseline.get(b.label())]
    if not ratios:
        return None
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def auto_order(backends: dict[str, BackendRecord]) -> tuple[list[str], dict[str, float]]:
    """(verified backends by measured speed, SDPA = 1.0, unmeasured ones after SDPA;
    each measured one's speed relative to SDPA)."""
    sdpa = backends.get("sdpa")
    base = {b.label(): b.tflops for b in (sdpa.bench if sdpa else ()) if b.tflops}
    scored: list[tuple[float, bool, str]] = []
    unmeasured: list[str] = []
    speeds: dict[str, float] = {}
    for name, info in backends.items():
        if not info.verified:
            continue
        s = 1.0 if name == "sdpa" else speed_score(info.bench, base)
        if s is None:
            unmeasured.append(name)  # no shape in common with SDPA: no claim about speed
            continue
        speeds[name] = round(s, 4)
        scored.append((s, name == "sdpa", name))
    scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [n for _, _, n in scored] + unmeasured, speeds


def _clean(value: Any) -> Any:
    """TOML has no null: drop None values, recursively; floats rounded for readability."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return float(f"{value:.6g}")
    return value


def build(wheels: list[LockedWheel], tool: ToolTable) -> dict[str, Any]:
    from comfy_env_attn import __version__

    packages = []
    for w in sorted(wheels, key=lambda w: w.name):
        own = {**(w.built or {}), **({"brought-by": list(w.brought_by)} if w.brought_by else {})}
        packages.append({"name": w.name, "version": w.version,
                         "wheels": [{"name": w.filename, "url": w.url,
                                     "hashes": {"sha256": w.sha256}}],
                         **({"tool": {"comfy-env-attn": own}} if own else {})})
    doc: dict[str, Any] = _clean({"lock-version": "1.0",
                                  "created-by": f"comfy-env-attn {__version__}",
                                  "packages": packages,
                                  "tool": {"comfy-env-attn": tool.to_dict()}})
    return doc


# What writing a lock imports beyond this module (reading one: packaging.pylock).
_WRITER_MODULES = ("tomli_w", "packaging.pylock")


def load_in_background() -> None:
    """Load what writing a lock imports (_WRITER_MODULES: about 10 ms, a twentieth of a
    quick install's own time) in a thread, for a caller about to wait on something else:
    uv installing. `write` imports them as usual; Python's import lock makes it wait for a
    load still under way, and a load that failed is tried again there, where its error is
    reported."""
    threading.Thread(target=_load_writer, name="load-lock-writer", daemon=True).start()


def _load_writer() -> None:
    for name in _WRITER_MODULES:
        with contextlib.suppress(Exception):  # _load reports it, in write()
            importlib.import_module(name)


def _load(name: str, where: str) -> Any:
    """A module the lock needs. One that does not load is a broken install of the tool
    itself: a LockError saying so, not a traceback."""
    try:
        return importlib.import_module(name)
    except Exception as e:
        raise LockError(f"{where}: cannot load {name} ({type(e).__name__}: {e}): "
                        "reinstall comfy-env-attn") from None


def validate(doc: dict[str, Any], where: str) -> None:
    pylock = _load("packaging.pylock", where)
    try:
        pylock.Pylock.from_dict(doc)
    except (pylock.PylockValidationError, pylock.PylockUnsupportedVersionError) as e:
        raise LockError(f"{where}: not a valid PEP 751 lock: {e}") from None
    try:
        tool_table(doc)
    except LockModelError as e:
        raise LockError(f"{where}: {e}") from None


def write(path: Path, doc: dict[str, Any]) -> None:
    tomli_w = _load("tomli_w", f"cannot write the lock {path}")
    validate(doc, str(path))
    text = tomli_w.dumps(doc)
    try:
        replace_file(path, text)
    except OSError as e:
        raise LockError(f"cannot write the lock {path}: {e}") from None


def read(path: Path, *, python: str | None = None) -> dict[str, Any]:
    """The lock at `path`, validated. Missing, a LockError that says how to write it: for
    the target `python` (named in the command it gives), else for the environment whose
    lock it is."""
    from comfy_env_attn.facts.system import read_toml

    if not path.exists():
        raise LockError(f"no lock at {path}: run " + (
            f"{tool_command('install', python=python)} (or verify)" if python else
            "install (or verify) for the environment it belongs to"))
    doc = read_toml(path, what="lock", error=LockError)
    validate(doc, str(path))
    return doc


def wheels_of(doc: dict[str, Any]) -> list[LockedWheel]:
    out = []
    for p in doc.get("packages", []):
        for w in p.get("wheels", []):
            sha = (w.get("hashes") or {}).get("sha256")
            if not sha or not w.get("url"):
                raise LockError(f"lock package {p['name']} has no url and sha256")
            own = (p.get("tool") or {}).get("comfy-env-attn")
            own = dict(own) if isinstance(own, dict) else {}
            by = own.pop("brought-by", [])
            if not isinstance(by, list) or not all(isinstance(b, str) for b in by):
                raise LockError(f"lock package {p['name']}: brought-by must be a list of "
                                f"backend names, got {by!r}")
            out.append(LockedWheel(BY_DIST.get(normalize_dist(p["name"]), p["name"]),
                                   p["name"], p.get("version", ""), w["name"], w["url"], sha,
                                   own or None, tuple(by)))
    return out


def _fingerprint(live: Live, device: dict[str, Any], python: str | None) -> Fingerprint:
    """Each installed distribution once, under the backend that installs it: a variant
    (sage_fp16) is covered by its primary's entry (ToolTable.verified)."""
    locked = {}
    dists = {**{b.name: b.dist for b in BACKENDS.values() if primary(b.name) == b.name},
             **live.plugins}
    for name, dist in dists.items():
        have = live.dists.get(dist) if dist else None
        if have is not None:
            locked[name] = LockedDist(dist, have[0], have[1] or "")
    return Fingerprint(torch=live.torch or "", torch_cuda=live.torch_cuda,
                       device=device.get("type", "unverified"),
                       capability=device.get("capability"), device_name=device.get("name"),
                       python=python, adapters_sha256=live.adapters_sha256, backends=locked)


def _record(name: str, r: Result | None) -> BackendRecord:
    """A backend's lock entry. What it is (title, quantized, approximate) comes from the
    target, where a plugin may be the only place it is known."""
    b = BACKENDS.get(name)
    d = r.data if r is not None else {}
    kind = BackendRecord(name, "unverified", title=d.get("title") or (b.title if b else name),
                         quantized=bool(d.get("quantized", b.quantized if b else False)),
                         approximate=bool(d.get("approximate",
                                                b.approximate if b else False)),
                         shipped=bool(d.get("shipped", b.shipped if b else False)))
    if r is None:
        return kind
    checks = tuple(Check(c["variant"], c["head_dim"], c["dtype"], bool(c.get("passed")),
                         _num(c.get("max_abs")), _num(c.get("cosine")), c.get("error"))
                   for c in r.checks)
    bench = tuple(BenchRow(tuple(x["shape"]), x["dtype"], x.get("kv_len"),
                           x.get("ms"), x.get("tflops"), x.get("first_call_ms"), x.get("error"))
                  for x in r.bench)
    return replace(kind, status="verified" if r.passed else "failed",
                   version=d.get("version"), error=r.error, stage=d.get("stage"),
                   import_s=d.get("import_s"), checks=checks, bench=bench)


def _num(x: Any) -> float | None:
    """A finite float, or None (TOML has neither null nor a standard infinity here)."""
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def tool_table_from(results: dict[str, Result], *, python: str,
                    python_version: str | None = None,
                    installed: list[str] | None = None, live: Live | None = None) -> ToolTable:
    """What verification proved in the interpreter `python`, as the lock records it:
    a record for SDPA, each backend verified and each backend `installed`."""
    sdpa = results.get("sdpa")
    if live is None:  # verification's facts, or (nothing verified) the files now
        live_data = sdpa.data.get("live") if sdpa else None
        if live_data is None:
            from comfy_env_attn.verify.run import live_facts

            live_data = live_facts(python)
        live = Live.from_dict(live_data)
    device = (sdpa.data.get("device") if sdpa and sdpa.passed else None) or {}
    names = ["sdpa", *[n for n in BACKENDS if n in results or n in (installed or [])],
             *results]
    records = {n: _record(n, results.get(n)) for n in dict.fromkeys(names)}
    if not results:  # --no-verify: SDPA, built into torch, stays the trusted fallback
        records["sdpa"] = BackendRecord("sdpa", "verified", title=BACKENDS["sdpa"].title)
    order, speeds = auto_order(records)
    records = {n: replace(r, speed_vs_sdpa=speeds.get(n)) for n, r in records.items()}
    approximate = {n for n, r in records.items() if r.approximate}
    return ToolTable(fingerprint=_fingerprint(live, device, python_version),
                     backends=records, auto=tuple(n for n in order if n not in approximate),
                     exact=tuple(n for n in order
                                 if not records[n].quantized and n not in approximate),
                     written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     python=python)


def write_lock(target: Target, installed: dict[str, Installed], results: dict[str, Result],
               fetched: list[Fetched], *, live: Live | None = None,
               brought: Mapping[str, tuple[Fetched, tuple[str, ...]]] | None = None) -> Path:
    """`live`: the target's facts where the caller knows them (nothing verified: learned
    without starting its torch; after a rollback: the files as they are now); otherwise
    verification's. `brought`: the requirements this run installed (distribution -> its
    wheel and the backends that needed it); those the previous lock recorded stay while
    installed at the version it names."""
    path = lock_path(target.prefix)
    previous: list[LockedWheel] = []
    with contextlib.suppress(AttnError):
        previous = wheels_of(read(path))
    wheels: dict[str, LockedWheel] = {}
    for w in previous:
        inst = installed.get(normalize_dist(w.name))
        if inst is not None and inst.version == w.version:
            wheels[inst.name] = w
    for f in fetched:
        dist = project_of(f.candidate.filename)
        inst = installed.get(dist)
        if inst is not None and inst.version == f.candidate.filename.split("-")[1]:
            built = record_beside(f.path)
            wheels[dist] = LockedWheel(BY_DIST[dist], dist, inst.version,
                                       f.candidate.filename, f.candidate.url, f.sha256,
                                       built.lock_facts() if built else None)
    for dist, (f, by) in (brought or {}).items():
        inst = installed.get(dist)
        if inst is not None and inst.version == f.candidate.filename.split("-")[1]:
            wheels[dist] = LockedWheel(dist, dist, inst.version, f.candidate.filename,
                                       f.candidate.url, f.sha256, brought_by=by)
    doc = build(list(wheels.values()),
                tool_table_from(results, python=target.executable,
                                python_version=target.facts.get("python"),
                                installed=installed_backends(installed), live=live))
    write(path, doc)
    log(f"wrote {path}")
    return path


def stale(doc: dict[str, Any], python: str) -> list[str]:
    """Why the lock does not describe the target (empty when it does): the dispatcher's own
    rule, over facts learned in the target interpreter."""
    from comfy_env_attn.verify.run import live_facts

    return stale_reasons(tool_table(doc), Live.from_dict(live_facts(python)))
