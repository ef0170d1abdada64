"""What is installed in the target, read from metadata (dist-info) without importing it.

Names and versions come from the .dist-info folder names (a target has hundreds of
distributions; parsing every METADATA costs half a second); requirements and tags are read
only for the distributions a caller asks about.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, parse_tag
from packaging.utils import canonicalize_name

# Never replaced by an install: the constraint pins them and a wheel needing others is refused.
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")

_DIST_INFO = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)\.dist-info$")


@dataclass
class Installed:
    name: str  # canonical
    version: str
    location: str  # the site dir holding it
    dist_info: str  # path of its .dist-info (or .egg-info) folder
    _meta: dict[str, list[str]] | None = field(default=None, repr=False, compare=False)

    def _headers(self) -> dict[str, list[str]]:
        if self._meta is None:
            meta: dict[str, list[str]] = {}
            for fname in ("METADATA", "PKG-INFO"):
                p = Path(self.dist_info, fname)
                if p.is_file():
                    msg = HeaderParser().parsestr(p.read_text(encoding="utf-8", errors="replace"))
                    for k, v in msg.items():
                        meta.setdefault(k.lower(), []).append(v)
                    break
            self._meta = meta
        return self._meta

    @property
    def requires(self) -> tuple[str, ...]:
        return tuple(self._headers().get("requires-dist", []))

    @property
    def tags(self) -> frozenset[Tag]:
        tags: set[Tag] = set()
        try:
            text = Path(self.dist_info, "WHEEL").read_text(encoding="utf-8")
        except OSError:
            return frozenset()
        for line in text.splitlines():
            if line.startswith("Tag:"):
                try:
                    tags |= parse_tag(line.split(":", 1)[1].strip())
                except ValueError:
                    pass
        return frozenset(tags)

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


def _from_folder(site: str, entry: str) -> Installed | None:
    path = os.path.join(site, entry)
    m = _DIST_INFO.match(entry)
    if m is not None:
        return Installed(str(canonicalize_name(m["name"])), m["version"], site, path)
    if entry.endswith((".dist-info", ".egg-info")) and os.path.isdir(path):
        inst = Installed("", "", site, path)
        headers = inst._headers()
        name, version = headers.get("name", [""])[0], headers.get("version", [""])[0]
        if name:
            inst.name, inst.version = str(canonicalize_name(name)), version
            return inst
    return None


def read_installed(site_dirs: Iterable[str]) -> dict[str, Installed]:
    """Canonical name -> Installed, first site dir wins (as import does)."""
    out: dict[str, Installed] = {}
    for site in site_dirs:
        try:
            entries = sorted(os.listdir(site))
        except OSError:
            continue
        for entry in entries:
            if not entry.endswith((".dist-info", ".egg-info")):
                continue
            inst = _from_folder(site, entry)
            if inst is not None and inst.name not in out:
                out[inst.name] = inst
    return out


def torch_family(installed: dict[str, Installed]) -> dict[str, str]:
    """torch, torchvision, torchaudio versions as installed (the constraint that pins them)."""
    return {n: installed[n].version for n in TORCH_FAMILY if n in installed}


def installed_backends(installed: dict[str, Installed]) -> list[str]:
    """The attention backends whose distributions are installed, in the registry's order."""
    from comfy_env_attn.core.backends import BACKENDS

    return [b.name for b in BACKENDS.values() if b.dist and b.dist in installed]
