"""After every install test: torch's files and sympy's, byte for byte, as their RECORDs say.

One walk per test: a file whose stat (size, mtime, ctime, inode) differs from the session's
first walk is hashed and compared with its RECORD sha256; a file that appeared or went away
fails at once. ctime cannot be set back, so an unchanged stat means unchanged bytes.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import os
from pathlib import Path

import torch

SITE = Path(torch.__file__).resolve().parent.parent
DISTS = ("torch", "sympy")

Stat = tuple[int, int, int, int]


def _walk(root: Path) -> dict[str, Stat]:
    out: dict[str, Stat] = {}
    stack = [str(root)]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    if e.name != "__pycache__":
                        stack.append(e.path)
                    continue
                st = e.stat(follow_symlinks=False)
                out[e.path] = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    return out


def _record(dist: str) -> tuple[dict[str, str], set[str]]:
    """(absolute path -> urlsafe-b64 sha256, top-level folders) from the dist's RECORD."""
    info = next(SITE.glob(f"{dist}-*.dist-info"))
    hashes: dict[str, str] = {}
    tops: set[str] = set()
    for row in csv.reader((info / "RECORD").read_text(encoding="utf-8").splitlines()):
        if not row or row[0].startswith(".."):
            continue
        path = os.path.normpath(SITE / row[0])
        if len(row) > 1 and row[1].startswith("sha256="):
            hashes[path] = row[1][len("sha256="):]
        top = row[0].split("/", 1)[0]
        if "/" in row[0] and not top.endswith(".dist-info") and top != "__pycache__":
            tops.add(top)
    return hashes, tops


class Baseline:
    def __init__(self) -> None:
        self.hashes: dict[str, str] = {}
        self.roots: list[Path] = []
        for dist in DISTS:
            hashes, tops = _record(dist)
            self.hashes.update(hashes)
            self.roots += [SITE / t for t in sorted(tops)]
            self.roots += list(SITE.glob(f"{dist}-*.dist-info"))
        self.stats = self.walk()

    def walk(self) -> dict[str, Stat]:
        out: dict[str, Stat] = {}
        for r in self.roots:
            out.update(_walk(r))
        return out

    def problems(self) -> list[str]:
        now = self.walk()
        out = [f"{p} appeared" for p in now.keys() - self.stats.keys()]
        out += [f"{p} disappeared" for p in self.stats.keys() - now.keys()]
        for p in now.keys() & self.stats.keys():
            if now[p] == self.stats[p]:
                continue
            want = self.hashes.get(p)
            digest = hashlib.sha256(Path(p).read_bytes()).digest()
            if want != base64.urlsafe_b64encode(digest).rstrip(b"=").decode():
                out.append(f"{p} changed")
        return sorted(out)


_BASELINE: Baseline | None = None


def baseline() -> Baseline:
    global _BASELINE
    if _BASELINE is None:
        _BASELINE = Baseline()
    return _BASELINE
