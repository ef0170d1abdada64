"""The digests a lock's fingerprint holds, standard library only: the dispatcher (inside
ComfyUI, runtime/live.py) and the command line (a lock written without verification, which
need not start the target's torch to learn them) compute them with this one code."""

from __future__ import annotations

import csv
import hashlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def dist_facts(dist: str, path: Sequence[str] | None = None
               ) -> tuple[str, str | None] | None:
    """(version, digest of its files) of an installed distribution, None when absent: the
    first one on `path` (default: this process's sys.path).

    The digest covers its RECORD and, for each file RECORD lists, the path, size and
    modification time on disk: a file edited in place or overwritten by another
    distribution changes it, at the cost of one stat per file (no file is read), cheap
    enough for every ComfyUI start."""
    meta = find_metadata_dir(dist, sys.path if path is None else path)
    if meta is None:
        return None
    return (metadata_version(meta), files_digest(meta))


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def find_metadata_dir(dist: str, path: Sequence[str]) -> Path | None:
    """The first `<name>-<version>.dist-info` (or `.egg-info` folder) of this distribution
    on `path`, the one `importlib.metadata` finds (name compared normalised: `flash-attn`
    is `flash_attn-2.8.3.dist-info`). Read directly: importing importlib.metadata costs a
    start more than the whole search."""
    want = _normal(dist)
    for entry in path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for name in names:
            stem, dot, kind = name.rpartition(".")
            if dot and kind.lower() in ("dist-info", "egg-info") and \
                    _normal(stem.partition("-")[0]) == want:
                folder = Path(entry or ".", name)
                if folder.is_dir():
                    return folder
    return None


def metadata_version(meta: Path) -> str:
    """The Version field of a dist-info's METADATA (an egg-info's PKG-INFO), as
    importlib.metadata reads it (email's header rules: metadata_headers)."""
    for file in ("METADATA", "PKG-INFO"):
        try:
            text = (meta / file).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        for key, value in metadata_headers(text):
            if key.lower() == "version":
                return value
        return ""
    return ""


def metadata_headers(text: str) -> list[tuple[str, str]]:
    """The header fields of a METADATA file (RFC 822 style, up to the first empty line; a
    line starting with whitespace, blank or not, continues the field before it), in order. What
    email.parser's HeaderParser returns for these files, without importing the email
    package at every start."""
    out: list[tuple[str, str]] = []
    for line in _LINE_BREAK.split(text):  # not splitlines(): \f or \u2028 break no line
        if not line:
            break
        if line[0] in " \t" and out:
            name, value = out[-1]
            out[-1] = (name, f"{value}\n{line}")
            continue
        m = _HEADER.match(line)
        if m is None:
            break  # neither a field nor its continuation: the headers have ended
        out.append((m[1], m[2].strip()))
    return out


_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_HEADER = re.compile(r"([\x21-\x39\x3b-\x7e]+):(.*)", re.S)


def files_digest(meta: Path) -> str | None:
    """The digest of a dist-info folder's RECORD and the files it lists (None: no RECORD)."""
    try:
        record = (meta / "RECORD").read_text(encoding="utf-8")
    except OSError:
        return None
    h = hashlib.sha256(record.encode())
    for row in csv.reader(record.splitlines()):
        if not row or row[0].endswith(".pyc"):
            continue  # bytecode is rewritten by Python itself
        try:
            st = os.stat(meta.parent / row[0])
            h.update(f"{row[0]}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{row[0]}|missing\n".encode())
    return h.hexdigest()


def adapters_sha256() -> str:
    """The code verification proves: the adapters, the capability claims they read, and the
    plugins that ship with comfy-env-attn."""
    h = hashlib.sha256()
    for p in (_PACKAGE / "runtime" / "adapters.py", _PACKAGE / "core" / "backends.py",
              _PACKAGE / "runtime" / "plugins.py",  # the plugin machinery
              _PACKAGE / "runtime" / "taylor.py"):  # and the shipped plugin
        if p.exists():
            h.update(p.read_bytes())
    return h.hexdigest()
