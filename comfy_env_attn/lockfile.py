"""The lock: a PEP 751 pylock.comfy-env-attn.toml in the target's prefix.

[[packages]] are the installed attention wheels (name, version, url, sha256), so any PEP 751
installer can reproduce them. [tool.comfy-env-attn] holds the fingerprint (what verification
saw in the target), each backend's verification, and the order `auto` uses. Written
atomically and validated with packaging.pylock on write and on read.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_env_attn.candidates.sources import project_of
from comfy_env_attn.core.backends import BACKENDS, BY_DIST, normalize_dist
from comfy_env_attn.core.errors import AttnError
from comfy_env_attn.core.progress import log
from comfy_env_attn.facts.installed import Installed, installed_backends, read_installed

if TYPE_CHECKING:
    from comfy_env_attn.facts.probe import Target
    from comfy_env_attn.facts.system import System
    from comfy_env_attn.install.edges import Fetched
    from comfy_env_attn.verify.run import Result

LOCK_NAME = "pylock.comfy-env-attn.toml"
SCHEMA = 1


class LockError(AttnError):
    pass


def lock_path(prefix: Path) -> Path:
    env = os.environ.get("COMFY_ENV_ATTN_LOCK")
    return Path(env) if env else prefix / LOCK_NAME


@dataclass(frozen=True)
class LockedWheel:
    backend: str
    name: str  # distribution name
    version: str
    filename: str
    url: str
    sha256: str


def record_sha256(dist_info: str) -> str | None:
    """Fingerprint of a distribution's files: the hash of its RECORD (which hashes each file)."""
    try:
        return hashlib.sha256(Path(dist_info, "RECORD").read_bytes()).hexdigest()
    except OSError:
        return None


def speed_score(bench: list[dict[str, Any]], baseline: dict[str, float]) -> float | None:
    """Geometric mean of throughput relative to SDPA over the shapes both measured."""
    ratios = []
    for b in bench:
        key = shape_key(b["shape"])
        if "tflops" in b and baseline.get(key):
            ratios.append(b["tflops"] / baseline[key])
    if not ratios:
        return None
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


def shape_key(shape: list[int]) -> str:
    return "x".join(str(s) for s in shape)


def auto_order(backends: dict[str, dict[str, Any]]) -> list[str]:
    """Verified backends by measured speed (SDPA = 1.0); unmeasured ones after SDPA."""
    base = {shape_key(b["shape"]): b["tflops"]
            for b in backends.get("sdpa", {}).get("bench", []) if "tflops" in b}
    scored: list[tuple[float, bool, str]] = []
    unmeasured: list[str] = []
    for name, info in backends.items():
        if info.get("status") != "verified":
            continue
        s = 1.0 if name == "sdpa" else speed_score(info.get("bench", []), base)
        if s is None:
            unmeasured.append(name)  # no shape in common with SDPA: no claim about speed
            continue
        info["speed_vs_sdpa"] = round(s, 4)
        scored.append((s, name == "sdpa", name))
    scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [n for _, _, n in scored] + unmeasured


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


def build(wheels: list[LockedWheel], fingerprint: dict[str, Any],
          backends: dict[str, dict[str, Any]], *, python: str) -> dict[str, Any]:
    from comfy_env_attn import __version__

    order = auto_order(backends)
    packages = []
    for w in sorted(wheels, key=lambda w: w.name):
        packages.append({"name": w.name, "version": w.version,
                         "wheels": [{"name": w.filename, "url": w.url,
                                     "hashes": {"sha256": w.sha256}}]})
    tool = {"schema": SCHEMA, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python": python, "fingerprint": fingerprint, "auto": order,
            "exact": [n for n in order if not backends[n].get("quantized")],
            "backends": backends}
    doc: dict[str, Any] = _clean({"lock-version": "1.0", "created-by": f"comfy-env-attn {__version__}",
                   "packages": packages, "tool": {"comfy-env-attn": tool}})
    return doc


def validate(doc: dict[str, Any], where: str) -> None:
    from packaging.pylock import Pylock, PylockUnsupportedVersionError, PylockValidationError

    try:
        Pylock.from_dict(doc)
    except (PylockValidationError, PylockUnsupportedVersionError) as e:
        raise LockError(f"{where}: not a valid PEP 751 lock: {e}") from None
    tool = doc.get("tool", {}).get("comfy-env-attn")
    if not isinstance(tool, dict) or tool.get("schema") != SCHEMA:
        raise LockError(f"{where}: no [tool.comfy-env-attn] table of schema {SCHEMA}")


def write(path: Path, doc: dict[str, Any]) -> None:
    import tomli_w

    validate(doc, str(path))
    text = tomli_w.dumps(doc)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LockError(f"cannot write the lock {path}: {e}") from None


def read(path: Path) -> dict[str, Any]:
    from comfy_env_attn.facts.system import read_toml

    if not path.exists():
        raise LockError(f"no lock at {path}: run comfy-env-attn install or verify")
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
            out.append(LockedWheel(BY_DIST.get(normalize_dist(p["name"]), p["name"]),
                                   p["name"], p.get("version", ""), w["name"], w["url"], sha))
    return out


def fingerprint(target: Target, installed: dict[str, Installed],
                results: dict[str, Result]) -> dict[str, Any]:
    sdpa = results.get("sdpa")
    device = (sdpa.data.get("device") if sdpa else None) or {}
    fp: dict[str, Any] = {
        "python": target.facts.get("python"),
        "torch": sdpa.data.get("torch") if sdpa else target.facts.get("torch"),
        "torch_cuda": sdpa.data.get("torch_cuda") if sdpa else target.facts.get("torch_cuda"),
        "device": device.get("type", "unverified"),
        "device_name": device.get("name"),
        "capability": device.get("capability"),
        "backends": {},
    }
    for name in installed_backends(installed):
        inst = installed[BACKENDS[name].dist]
        fp["backends"][name] = {"dist": inst.name, "version": inst.version,
                                "record_sha256": record_sha256(inst.dist_info)}
    return fp


def backend_entries(installed: dict[str, Installed], results: dict[str, Result]
                    ) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in ["sdpa", *installed_backends(installed)]:
        b = BACKENDS[name]
        r = results.get(name)
        entry: dict[str, Any] = {"title": b.title, "quantized": b.quantized}
        if r is None:
            entry["status"] = "unverified"
        else:
            entry["status"] = "verified" if r.passed else "failed"
            entry["error"] = r.error
            entry["stage"] = r.data.get("stage")
            entry["version"] = r.data.get("version")
            entry["import_s"] = r.data.get("import_s")
            entry["checks"] = [{k: c.get(k) for k in ("head_dim", "dtype", "passed", "required",
                                                     "max_abs", "cosine", "finite", "error")}
                               for c in r.data.get("checks", [])]
            entry["bench"] = [{k: x.get(k) for k in ("shape", "dtype", "ms", "tflops",
                                                     "first_call_ms", "error")}
                              for x in r.data.get("bench", [])]
        out[name] = entry
    if not results:  # --no-verify: SDPA, built into torch, stays the trusted fallback
        out["sdpa"]["status"] = "verified"
    return out


def write_lock(target: Target, installed: dict[str, Installed], results: dict[str, Result],
               fetched: list[Fetched]) -> Path:
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
            wheels[dist] = LockedWheel(BY_DIST[dist], dist, inst.version,
                                               f.candidate.filename, f.candidate.url, f.sha256)
    doc = build(list(wheels.values()), fingerprint(target, installed, results),
                        backend_entries(installed, results), python=target.executable)
    write(path, doc)
    log(f"wrote {path}")
    return path


def lock_status(doc: dict[str, Any], target: Target, system: System) -> list[str]:
    """Why the lock does not describe the live target (empty when it does)."""
    tool = doc["tool"]["comfy-env-attn"]
    fp = tool.get("fingerprint", {})
    stale: list[str] = []
    if fp.get("torch") != target.facts.get("torch"):
        stale.append(f"torch is {target.facts.get('torch')}, the lock verified "
                     f"{fp.get('torch')}")
    if fp.get("device") == "cuda" and fp.get("capability") not in system.gpus:
        stale.append(f"verified on GPU sm {fp.get('capability')}, this machine has "
                     f"{', '.join(system.gpus) or 'no GPU'}")
    installed = read_installed(target.site_dirs)
    for info in fp.get("backends", {}).values():
        inst = installed.get(info["dist"])
        if inst is None:
            stale.append(f"{info['dist']} {info['version']} is no longer installed")
        elif inst.version != info["version"]:
            stale.append(f"{info['dist']} is {inst.version}, the lock verified {info['version']}")
        elif record_sha256(inst.dist_info) != info.get("record_sha256"):
            stale.append(f"{info['dist']} {inst.version} files changed since verification")
    for name in installed_backends(installed):
        if name not in fp.get("backends", {}):
            stale.append(f"{BACKENDS[name].dist} is installed but not in the lock")
    return stale
