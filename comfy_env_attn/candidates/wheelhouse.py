"""The wheelhouse: wheels built on this machine (`install --build`), shared by every venv.

One folder per build, keyed by what decides whether the wheel loads: backend version, torch
and CUDA (the wheel's local label), Python and platform (its tags) and the SM archs its kernels
were compiled for. Beside each wheel, build.json records those facts and the source it was
built from; the plan reads them as a source like any index, so a second venv (or ComfyUI after
a reinstall) takes the wheel in seconds instead of building again.

    <wheelhouse>/<dist>/<wheel stem>-sm<archs>/<wheel>
    <wheelhouse>/<dist>/<wheel stem>-sm<archs>/build.json
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, field
from pathlib import Path
from typing import Any

from comfy_env_attn.candidates.sources import Candidate
from comfy_env_attn.candidates.wheelname import InvalidWheelName, parse_wheel_name
from comfy_env_attn.core.backends import normalize_dist
from comfy_env_attn.core.paths import cache_dir, replace_file
from comfy_env_attn.core.progress import log
from comfy_env_attn.core.records import dataclass

WHEELHOUSE_ENV = "COMFY_ENV_ATTN_WHEELHOUSE"
RECORD_NAME = "build.json"
SCHEMA = 1
SOURCE_PREFIX = "wheelhouse:"


def wheelhouse_dir() -> Path:
    """$COMFY_ENV_ATTN_WHEELHOUSE, or `wheelhouse` in the platform cache folder."""
    env = os.environ.get(WHEELHOUSE_ENV, "").strip()
    return Path(env).expanduser() if env else cache_dir() / "wheelhouse"


class WheelhouseError(ValueError):
    """A build.json that is not one this version writes."""


@dataclass(frozen=True)
class SourceFacts:
    """Where the built source came from and how it was checked."""

    url: str  # URL, archive path or directory as given
    sha256: str | None = None  # of the archive; of the file list and contents for a folder
    kind: str = "archive"  # "archive" or "directory"
    git_commit: str | None = None
    git_tree: str | None = None  # checked against the archive's files
    pinned: bool = False  # the embedded (or configured) pin matched

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceFacts:
        return cls(url=str(d["url"]), sha256=d.get("sha256"), kind=str(d.get("kind", "archive")),
                   git_commit=d.get("git_commit"), git_tree=d.get("git_tree"),
                   pinned=bool(d.get("pinned", False)))


@dataclass(frozen=True)
class BuildRecord:
    """build.json: what one wheel in the wheelhouse was built from and for."""

    backend: str
    dist: str
    filename: str
    sha256: str
    version: str  # as in the wheel (with the local label added here)
    upstream_version: str  # as the source's own build produced it
    torch: str
    torch_cuda: str | None
    python: str
    sm: tuple[str, ...]  # archs the kernels were compiled for ("9.0a"); empty: no GPU code
    source: SourceFacts
    arch_list: str | None = None  # TORCH_CUDA_ARCH_LIST as set for the build
    cxx11abi: bool | None = None
    nvcc: str | None = None
    compiler: str | None = None
    max_jobs: int | None = None
    seconds: float | None = None
    built_at: str | None = None
    log: str | None = None  # the full build log
    env: dict[str, str] = field(default_factory=dict)  # the backend's own switches

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sm"] = list(self.sm)
        d["source"] = self.source.to_dict()
        return {"schema": SCHEMA, **{k: v for k, v in d.items() if v not in (None, {})}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = RECORD_NAME) -> BuildRecord:
        if d.get("schema") != SCHEMA:
            raise WheelhouseError(f"{where}: schema {d.get('schema')!r}, expected {SCHEMA}")
        try:
            return cls(
                backend=str(d["backend"]), dist=str(d["dist"]), filename=str(d["filename"]),
                sha256=str(d["sha256"]), version=str(d["version"]),
                upstream_version=str(d["upstream_version"]), torch=str(d["torch"]),
                torch_cuda=d.get("torch_cuda"), python=str(d["python"]),
                sm=tuple(str(s) for s in d.get("sm", [])),
                source=SourceFacts.from_dict(d["source"]), arch_list=d.get("arch_list"),
                cxx11abi=d.get("cxx11abi"), nvcc=d.get("nvcc"), compiler=d.get("compiler"),
                max_jobs=d.get("max_jobs"), seconds=d.get("seconds"),
                built_at=d.get("built_at"), log=d.get("log"), env=dict(d.get("env", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise WheelhouseError(f"{where}: missing or malformed {e}") from None

    def lock_facts(self) -> dict[str, Any]:
        """What the lock records about a wheel built here."""
        out: dict[str, Any] = {"built-here": True, "source-url": self.source.url,
                               "source-kind": self.source.kind, "sm": list(self.sm)}
        for key, value in (("source-sha256", self.source.sha256),
                           ("source-git-commit", self.source.git_commit),
                           ("built-at", self.built_at), ("nvcc", self.nvcc)):
            if value:
                out[key] = value
        return out


def entry_dir(root: Path, dist: str, filename: str, sm: Iterable[str]) -> Path:
    """The folder of one build: its key is the wheel's name (version with torch and CUDA
    label, Python, platform) and the SM archs."""
    archs = "_".join(s.replace(".", "") for s in sm) or "none"
    return root / normalize_dist(dist) / f"{filename.removesuffix('.whl')}-sm{archs}"


def record_beside(wheel: Path) -> BuildRecord | None:
    """The build.json next to a wheel of the wheelhouse (None for any other wheel)."""
    path = wheel.parent / RECORD_NAME
    if not path.is_file():
        return None
    try:
        record = BuildRecord.from_dict(json.loads(path.read_text(encoding="utf-8")),
                                       where=str(path))
    except (OSError, ValueError):
        return None
    return record if record.filename == wheel.name else None


def write_record(folder: Path, record: BuildRecord) -> Path:
    path = folder / RECORD_NAME
    replace_file(path, json.dumps(record.to_dict(), indent=2) + "\n")
    return path


def candidate_of(record: BuildRecord, wheel: Path, root: Path) -> Candidate:
    return Candidate(filename=record.filename, url=wheel.resolve().as_uri(),
                     source=f"{SOURCE_PREFIX}{root}", sha256=record.sha256,
                     cuda=record.torch_cuda, built_torch=record.torch,
                     sm=record.sm or None, size=wheel.stat().st_size)


def load_wheelhouse(root: Path, projects: Iterable[str] | None = None) -> list[Candidate]:
    """Every wheel in the wheelhouse with its recorded build facts, newest build first (the
    resolver keeps the first of two files with one name). A folder without a readable
    build.json is skipped with one line: its facts are unknown."""
    wanted = None if projects is None else {normalize_dist(p) for p in projects}
    found: list[tuple[float, Candidate]] = []
    if not root.is_dir():
        return []
    for dist_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if wanted is not None and dist_dir.name not in wanted:
            continue
        for folder in sorted(p for p in dist_dir.iterdir() if p.is_dir()):
            wheels = sorted(folder.glob("*.whl"))
            record_path = folder / RECORD_NAME
            if not wheels:
                continue
            try:
                record = BuildRecord.from_dict(
                    json.loads(record_path.read_text(encoding="utf-8")), where=str(record_path))
                parse_wheel_name(record.filename)
            except (OSError, ValueError, InvalidWheelName) as e:
                log(f"wheelhouse: skipping {folder}: {e}")
                continue
            wheel = folder / record.filename
            if not wheel.is_file():
                log(f"wheelhouse: skipping {folder}: {record.filename} is missing")
                continue
            found.append((record_path.stat().st_mtime, candidate_of(record, wheel, root)))
    found.sort(key=lambda t: t[0], reverse=True)
    return [c for _, c in found]
