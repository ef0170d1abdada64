"""What is installed in the target, read from metadata (dist-info) without importing it."""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, parse_tag
from packaging.utils import canonicalize_name


@dataclass(frozen=True)
class Installed:
    name: str  # canonical
    version: str
    tags: frozenset[Tag]
    requires: tuple[str, ...]
    location: str  # the site dir holding it
    dist_info: str  # path of its .dist-info folder

    @property
    def requires_torch(self) -> str | None:
        for r in self.requires:
            try:
                req = Requirement(r)
            except InvalidRequirement:
                continue
            if canonicalize_name(req.name) == "torch" and req.marker is None:
                return str(req.specifier) or None
        return None


def read_installed(site_dirs: Iterable[str]) -> dict[str, Installed]:
    """Canonical name -> Installed, first site dir wins (as import does)."""
    out: dict[str, Installed] = {}
    for site in site_dirs:
        for dist in md.distributions(path=[site]):
            name = dist.metadata["Name"]
            if not name:
                continue
            key = str(canonicalize_name(name))
            if key in out:
                continue
            tags: set[Tag] = set()
            wheel = dist.read_text("WHEEL") or ""
            for line in wheel.splitlines():
                if line.startswith("Tag:"):
                    try:
                        tags |= parse_tag(line.split(":", 1)[1].strip())
                    except ValueError:
                        pass
            path = getattr(dist, "_path", None)
            out[key] = Installed(key, dist.version, frozenset(tags),
                                 tuple(dist.requires or ()), site,
                                 str(path) if isinstance(path, Path) else "")
    return out


def torch_family(installed: dict[str, Installed]) -> dict[str, str]:
    """torch, torchvision, torchaudio versions as installed (the constraint that pins them)."""
    return {n: installed[n].version for n in ("torch", "torchvision", "torchaudio")
            if n in installed}
